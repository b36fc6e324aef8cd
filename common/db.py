"""Database handles: one peewee database per service, chosen by URL, opened on demand.

Each service's models bind to a ``peewee.DatabaseProxy`` declared in its
``models.py``; ``open_database`` makes the real database from a settings URL and
``bind`` points the proxy at it. Nothing connects until the first query.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import sqlite3
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import peewee
from playhouse.db_url import connect as url_connect
from playhouse.db_url import parse as parse_url
from playhouse.pool import PooledDatabase

from common.settings import SettingsError

logger = logging.getLogger(__name__)

# SQLite settings that make one file safe for several processes (five services and
# a worker): WAL lets readers go on while a writer commits, busy_timeout waits for
# a lock instead of failing at once, foreign_keys enforces the relationships.
# synchronous=full: in WAL mode a commit syncs the log, so a committed row survives a
# power cut. With "normal" the last commits before a power cut can roll back, each
# database file on its own: the archive could lose the rows of files an ingest already
# answered OK for (ARCHITECTURE.md, "Durability"). The archive commits once per group
# of files and the metadata once per job, so the sync costs little where it matters.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10000,
    "foreign_keys": 1,
    "synchronous": "full",
}
SQLITE_SYNCHRONOUS = ("off", "normal", "full", "extra")

SQLITE_SCHEMES = ("sqlite",)
POSTGRES_SCHEMES = ("postgresql", "postgres")
POOLED_POSTGRES_SCHEMES = ("postgresql+pool", "postgres+pool")

# Defaults for every PostgreSQL URL: an unreachable server fails a request after
# seconds instead of hanging it on the operating system's TCP timeout.
POSTGRES_DEFAULTS = {"connect_timeout": 10}
# Defaults for a pool (one per process). Comfortably above the threads of one
# uWSGI worker (config/uwsgi: 4), so a thread never waits on its neighbours; idle
# connections are retired after five minutes so a server restart or a firewall
# that drops idle sockets costs one reconnect, not an error; a thread waits up to
# ten seconds for a free connection before MaxConnectionsExceeded.
POOL_DEFAULTS = {"max_connections": 10, "stale_timeout": 300, "timeout": 10}


class WaitingSqliteDatabase(peewee.SqliteDatabase):
    """SQLite that waits, up to busy_timeout, when its connection set-up finds the file locked.

    The first connections to a new file race to switch it to WAL; that switch needs the
    file to itself and SQLite answers "database is locked" at once instead of calling
    its busy handler, so several processes starting together would fail.
    """

    def _connect(self):
        deadline = time.monotonic() + dict(self._pragmas).get("busy_timeout", SQLITE_PRAGMAS["busy_timeout"]) / 1000
        delay = 0.005
        while True:
            try:
                return super()._connect()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)  # back off: the other connection is done in milliseconds
            delay = min(delay * 2, 0.2)


def utcnow() -> datetime.datetime:
    """The current time as a naive UTC datetime: how every service stores times."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def open_database(url: str) -> peewee.Database:
    """A peewee database for ``url``; does not connect. ``SettingsError`` for an unsupported URL.

    - ``sqlite:///path`` (embedded default): one file shared by all processes, in WAL mode;
      ``?busy_timeout=MS`` sets how long a write waits for another's lock (default 10000)
      before the request fails with 503 ``database_unavailable``; ``?synchronous=normal``
      trades the last commits before a power cut for speed (default ``full``: see SQLITE_PRAGMAS).
    - ``postgresql://user:pw@host:5432/name``: a plain connection per thread, opened on
      first use and closed when the request (or command) ends. Fine for commands,
      Celery workers and tests.
    - ``postgresql+pool://user:pw@host:5432/name`` (production web services): a pool per
      process (defaults: ``POOL_DEFAULTS``), so a request borrows a connection instead of
      opening one. Under uWSGI set ``lazy-apps = true`` (config/uwsgi/*.ini do): each
      worker builds its application, and so its pool, after the fork, and no
      connection is ever shared between processes.

    Query parameters are passed to the database class or psycopg2 and win over the
    defaults, e.g. ``?max_connections=20&stale_timeout=60&timeout=5&sslmode=require``.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in SQLITE_SCHEMES:
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        params = parse_url(url)
        pragmas = dict(SQLITE_PRAGMAS)
        if "busy_timeout" in params:
            busy = params.pop("busy_timeout")
            if isinstance(busy, bool) or not isinstance(busy, int) or busy < 0:
                raise SettingsError(f"database URL: busy_timeout must be whole milliseconds, not {busy!r}")
            pragmas["busy_timeout"] = busy
        if "synchronous" in params:
            level = str(params.pop("synchronous")).lower()
            if level not in SQLITE_SYNCHRONOUS:
                raise SettingsError(f"database URL: synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, "
                                    f"not {level[:20]!r}")
            pragmas["synchronous"] = level
        return WaitingSqliteDatabase(**params, pragmas=pragmas, autoconnect=True)
    if scheme in POSTGRES_SCHEMES:
        defaults = dict(POSTGRES_DEFAULTS)
    elif scheme in POOLED_POSTGRES_SCHEMES:
        defaults = {**POSTGRES_DEFAULTS, **POOL_DEFAULTS}
    else:
        raise SettingsError(f"database URL must start with sqlite:///, postgresql:// or postgresql+pool://, "
                            f"not {scheme or url[:20]!r}")
    given = {key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    try:
        # playhouse passes the URL's query parameters through; ours only fill the gaps.
        return url_connect(url, autoconnect=True, **{k: v for k, v in defaults.items() if k not in given})
    except ValueError as exc:  # e.g. no database name
        raise SettingsError(f"database URL: {exc}") from None


def bind(proxy: peewee.DatabaseProxy, url_or_db) -> peewee.Database:
    """Point a service's model proxy at the database named by ``url_or_db``."""
    db = open_database(url_or_db) if isinstance(url_or_db, str) else url_or_db
    proxy.initialize(db)
    return db


def is_sqlite(db: peewee.Database | peewee.DatabaseProxy) -> bool:
    """True for SQLite (a proxy counts as what it is bound to)."""
    return isinstance(getattr(db, "obj", db), peewee.SqliteDatabase)


def is_postgres(db: peewee.Database | peewee.DatabaseProxy) -> bool:
    """True for PostgreSQL, pooled or not (a proxy counts as what it is bound to)."""
    return isinstance(getattr(db, "obj", db), peewee.PostgresqlDatabase)


def close_quietly(db: peewee.Database) -> None:
    """Give back this thread's connection (to the pool, if pooled); never raises."""
    try:
        if not db.is_closed():
            db.close()
    except peewee.PeeweeException:
        logger.debug("closing the database failed", exc_info=True)


def release(db: peewee.Database) -> None:
    """End of a request's use of the database.

    SQLite keeps the thread's connection open for its next request (opening the file
    and setting its pragmas costs more than a small query; the connection never
    leaves its thread). Others give it back (to the pool, with a +pool URL).
    """
    if not is_sqlite(db):
        close_quietly(db)


@contextlib.contextmanager
def request_connection(db: peewee.Database):
    """The connection one request uses; see ``release``."""
    db.connect(reuse_if_open=True)
    try:
        yield db
    finally:
        release(db)


def close_all(db: peewee.Database) -> None:
    """Close this thread's connection and, for a pool, every idle one: nothing is left for a fork to inherit."""
    close_quietly(db)
    if isinstance(db, PooledDatabase):
        db.close_idle()
