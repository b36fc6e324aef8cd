"""Settings: defaults, the INI file, environment overrides, typed access."""
import pytest

from common.settings import Settings, SettingsError


def test_defaults_hang_off_the_data_dir(tmp_path):
    settings = Settings.load(environ={"LABVAULT_DATA_DIR": str(tmp_path)})
    assert settings.data_dir == tmp_path
    assert settings.database_url("metadata") == f"sqlite:///{tmp_path}/db/metadata.sqlite3"
    assert settings.service_url("ingest") == "http://127.0.0.1:8066"
    assert settings.getint("archive", "port") == 8080


def test_file_then_environment_environment_wins(tmp_path):
    ini = tmp_path / "site.ini"
    ini.write_text("[ingest]\nport = 9000\nreject_undeclared = yes\n[metadata]\nurl = http://meta:1/\n")
    settings = Settings.load(environ={"LABVAULT_CONFIG": str(ini), "LABVAULT_INGEST_PORT": "9100"})
    assert settings.getint("ingest", "port") == 9100
    assert settings.getbool("ingest", "reject_undeclared") is True
    assert settings.service_url("metadata") == "http://meta:1"
    assert settings.service_url("ingest") == "http://127.0.0.1:9100"


def test_keys_with_underscores_and_new_sections():
    settings = Settings.load(environ={"LABVAULT_INGEST_MAX_BUNDLE_BYTES": "5", "LABVAULT_EXTRA_THING": "x"})
    assert settings.getint("ingest", "max_bundle_bytes") == 5
    assert settings.get("extra", "thing") == "x"


def test_errors_name_the_setting(tmp_path):
    settings = Settings.load(environ={"LABVAULT_INGEST_PORT": "eighty"})
    with pytest.raises(SettingsError, match=r"\[ingest\] port"):
        settings.getint("ingest", "port")
    with pytest.raises(SettingsError, match="missing setting"):
        settings.get("nowhere", "nothing")
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(tmp_path / "missing.ini", environ={})


def test_child_environment_round_trips(tmp_path):
    settings = Settings.load(environ={"LABVAULT_DATA_DIR": str(tmp_path), "LABVAULT_STATS_PORT": "7777"})
    again = Settings.load(environ=settings.as_environ())
    assert again.data_dir == tmp_path and again.getint("stats", "port") == 7777
    assert again.with_overrides({"stats": {"port": 1}}).getint("stats", "port") == 1
    assert again.getint("stats", "port") == 7777
    assert again.getlist("ingest", "move_roots") == []
