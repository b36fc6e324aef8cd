"""SQLite commits survive a power cut by default (synchronous=full in WAL mode); a URL may
trade that for speed, and a level SQLite does not know is refused at start."""
from __future__ import annotations

import pytest

from common import db as common_db
from common.settings import SettingsError


def level(url: str) -> int:
    database = common_db.open_database(url)
    try:
        database.connect()
        return database.execute_sql("PRAGMA synchronous").fetchone()[0]
    finally:
        common_db.close_quietly(database)


def test_a_commit_is_synced_by_default_and_a_url_may_say_otherwise(tmp_path):
    assert level(f"sqlite:///{tmp_path / 'a.sqlite3'}") == 2  # FULL
    assert level(f"sqlite:///{tmp_path / 'b.sqlite3'}?synchronous=normal") == 1
    assert level(f"sqlite:///{tmp_path / 'c.sqlite3'}?synchronous=normal&busy_timeout=50") == 1


def test_an_unknown_level_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="synchronous"):
        common_db.open_database(f"sqlite:///{tmp_path / 'd.sqlite3'}?synchronous=sometimes")
