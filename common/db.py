"""Database handles: one peewee database per service, chosen by URL, opened on demand.

Each service's models bind to a ``peewee.DatabaseProxy`` declared in its
``models.py``; ``open_database`` makes the real database from a settings URL and
``bind`` points the proxy at it. Nothing connects until the first query.
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path

import peewee
from playhouse.db_url import connect as url_connect

logger = logging.getLogger(__name__)

# SQLite settings that make one file safe for several processes (five services and
# a worker): WAL lets readers go on while a writer commits, busy_timeout waits for
# a lock instead of failing at once, foreign_keys enforces the relationships.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10000,
    "foreign_keys": 1,
    "synchronous": "normal",
}


def utcnow() -> datetime.datetime:
    """The current time as a naive UTC datetime: how every service stores times."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def open_database(url: str) -> peewee.Database:
    """A peewee database for ``url`` (sqlite:///path, postgresql://...); does not connect."""
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return url_connect(url, pragmas=SQLITE_PRAGMAS, autoconnect=True)
    return url_connect(url, autoconnect=True)


def bind(proxy: peewee.DatabaseProxy, url_or_db) -> peewee.Database:
    """Point a service's model proxy at the database named by ``url_or_db``."""
    db = open_database(url_or_db) if isinstance(url_or_db, str) else url_or_db
    proxy.initialize(db)
    return db


def is_sqlite(db: peewee.Database) -> bool:
    return isinstance(db, peewee.SqliteDatabase)


def close_quietly(db: peewee.Database) -> None:
    try:
        if not db.is_closed():
            db.close()
    except peewee.PeeweeException:
        logger.debug("closing the database failed", exc_info=True)
