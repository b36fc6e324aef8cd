"""``sqlite:///...?busy_timeout=MS``: how long a write waits for another's lock before it fails."""
from __future__ import annotations

import sqlite3
import time

import peewee
import pytest

from common.db import SQLITE_PRAGMAS, open_database
from common.settings import SettingsError


def test_busy_timeout_from_the_url(tmp_path):
    path = tmp_path / "x.sqlite3"
    db = open_database(f"sqlite:///{path}?busy_timeout=150")
    db.execute_sql("CREATE TABLE t (x INTEGER)")
    assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 150
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(peewee.OperationalError, match="locked"):
            db.execute_sql("INSERT INTO t VALUES (1)")
        assert 0.1 < time.monotonic() - started < 5
        # Readers are not held up (WAL).
        assert db.execute_sql("SELECT count(*) FROM t").fetchone()[0] == 0
    finally:
        lock.rollback()
        lock.close()
        db.close()


def test_the_default_and_a_bad_value(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'y.sqlite3'}")
    assert dict(db._pragmas)["busy_timeout"] == SQLITE_PRAGMAS["busy_timeout"]
    with pytest.raises(SettingsError):
        open_database(f"sqlite:///{tmp_path / 'z.sqlite3'}?busy_timeout=soon")
