"""docker-compose.yml, checked by structure (no container engine needed).

It must parse; every command must name something that exists (a uWSGI ini whose
module is a real wsgi.py, a labvault subcommand); ports, URLs and LABVAULT_*
names must agree with config/; the ingest service and its workers must share the
staging volume at the configured path.
"""
import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

from common.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DEFAULTS = configparser.ConfigParser(interpolation=None)
DEFAULTS.read(REPO / "config" / "labvault.ini")
LABVAULT_SERVICES = ("ingest", "metadata", "archive", "policy", "stats")


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def uwsgi_ini(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(REPO / "config" / "uwsgi" / f"{name}.ini")
    return parser


def test_the_production_stack_is_all_there():
    expected = {"rabbitmq", "postgres", "s3", "migrate", *LABVAULT_SERVICES, "ingest-worker", "stats-worker", "beat"}
    assert expected <= set(SERVICES)


def test_exactly_one_beat_sends_the_periodic_tasks():
    senders = [name for name, service in SERVICES.items()
               if command_of(service)[:2] == ["labvault", "beat"] or "--beat" in command_of(service)]
    assert senders == ["beat"]
    assert SERVICES["beat"].get("deploy", {}).get("replicas", 1) == 1


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_healthcheck_and_valid_dependencies(name):
    service = SERVICES[name]
    if name != "migrate":
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for dependency, spec in (service.get("depends_on") or {}).items():
        assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        condition = spec["condition"] if isinstance(spec, dict) else "service_started"
        assert condition in ("service_started", "service_healthy", "service_completed_successfully")
        if condition == "service_healthy":
            assert SERVICES[dependency].get("healthcheck"), f"{dependency} cannot become healthy"


@pytest.mark.parametrize("name", LABVAULT_SERVICES)
def test_service_commands_run_real_uwsgi_configs_on_the_configured_port(name):
    command = command_of(SERVICES[name])
    assert command[:2] == ["uwsgi", "--ini"], command
    ini_path = REPO / command[2]
    assert ini_path.is_file(), ini_path
    ini = uwsgi_ini(ini_path.stem)
    module = ini.get("uwsgi", "module").split(":")[0]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
    port = DEFAULTS.getint(name, "port")
    text = ini_path.read_text()
    # The address comes from the settings' variables, with the settings' defaults: loopback.
    assert "http-socket = %(listen_host):%(listen_port)" in text
    assert re.search(rf"if-env = LABVAULT_{name.upper()}_PORT\nset-placeholder = listen_port=%\(_\)", text)
    assert re.search(rf"if-not-env = LABVAULT_{name.upper()}_PORT\nset-placeholder = listen_port={port}\n", text)
    assert re.search(rf"if-not-env = LABVAULT_{name.upper()}_HOST\nset-placeholder = listen_host=127.0.0.1\n", text)
    published = [f"{port}:{port}"] if name == "ingest" else [f"127.0.0.1:{port}:{port}"]
    assert SERVICES[name]["ports"] == published


def test_a_stack_reachable_by_others_authenticates():
    environment = SERVICES["ingest"]["environment"]
    assert environment["LABVAULT_AUTH_MODE"] in ("token", "proxy")
    assert environment["LABVAULT_AUTH_SERVICE_TOKEN"].startswith("${LABVAULT_SERVICE_TOKEN:?")


def test_labvault_commands_are_real_subcommands():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for name, service in SERVICES.items():
        command = command_of(service)
        if command and command[0] == "labvault":
            assert command[1] in subcommands, f"{name}: labvault {command[1]}"
            if command[1] == "worker":
                queues = command[command.index("--queues") + 1].split(",")
                assert set(queues) <= {"ingest", "archive", "stats"}


def test_environment_names_and_urls_agree_with_the_settings():
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if not key.startswith("LABVAULT_"):
                continue
            if key == "LABVAULT_DATA_DIR":
                continue
            section, _, option = key[len("LABVAULT_"):].lower().partition("_")
            assert DEFAULTS.has_option(section, option), f"{name}: {key} names no setting"
            if option == "url" and section in LABVAULT_SERVICES:
                host, port = re.match(r"http://([^:/]+):(\d+)", value).groups()
                assert host == section and int(port) == DEFAULTS.getint(section, "port"), key


def test_ingest_and_its_workers_share_the_staging_volume_at_the_configured_path():
    staging = SERVICES["ingest"]["environment"]["LABVAULT_INGEST_STAGING_DIR"]
    for name in ("ingest", "ingest-worker"):
        mounts = SERVICES[name]["volumes"]
        assert f"staging:{staging}" in mounts, name
    assert "staging" in COMPOSE["volumes"]


def test_mounted_config_files_exist():
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), f"{name}: {source}"


def test_the_bundle_maximum_is_one_setting():
    # The application enforces [ingest] max_bundle_bytes (JSON 413); uWSGI adds no second limit.
    assert not uwsgi_ini("ingest").has_option("uwsgi", "limit-post")
    assert SERVICES["ingest"]["environment"]["LABVAULT_INGEST_MAX_BUNDLE_BYTES"] == \
        DEFAULTS.get("ingest", "max_bundle_bytes")
