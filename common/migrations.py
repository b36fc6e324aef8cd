"""Versioned schema migrations: a version table and ordered upgrade steps per service.

A service declares a ``Schema``: its name and a list of ``Migration`` steps, each
taking the database to a (major, minor) version. ``sync`` applies the steps the
database has not seen, each in its own transaction; ``check`` compares the
database with the code; ``require`` is what a service calls before it serves.
A major version change means the code cannot run on the old schema.

Several processes may sync one database at once (every container of a deployment
running ``labvault dbsync`` at start): each step re-reads the version inside its
transaction under a lock (PostgreSQL: an advisory lock; SQLite: the write lock of
BEGIN IMMEDIATE), so a step is applied exactly once.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import peewee

from common.db import bind, close_all, is_postgres, is_sqlite, utcnow
from common.errors import SchemaMismatch

Version = tuple[int, int]

# PostgreSQL advisory lock key of migrations: the same in every process and run.
MIGRATION_LOCK = zlib.crc32(b"labvault migrations")


class SchemaVersion(peewee.Model):
    """One row per service schema living in this database."""

    component = peewee.CharField(primary_key=True, max_length=64)
    major = peewee.IntegerField()
    minor = peewee.IntegerField()
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "labvault_schema_version"


@dataclass(frozen=True)
class Migration:
    version: Version
    description: str
    apply: Callable[[peewee.Database], None]


@dataclass
class Schema:
    name: str
    migrations: list[Migration] = field(default_factory=list)

    def __post_init__(self):
        versions = [m.version for m in self.migrations]
        if versions != sorted(set(versions)):
            raise ValueError(f"{self.name}: migrations must be in strictly rising version order")

    @property
    def version(self) -> Version:
        return self.migrations[-1].version if self.migrations else (0, 0)


def create_tables(*models: type[peewee.Model]) -> Callable[[peewee.Database], None]:
    """A migration step that creates ``models`` (for a schema's first version)."""
    def apply(db: peewee.Database) -> None:
        with db.bind_ctx(models):
            db.create_tables(models, safe=True)
    return apply


def current_version(db: peewee.Database, schema: Schema) -> Version | None:
    """The version recorded in ``db`` for ``schema``, or None if it was never synced."""
    with db.bind_ctx([SchemaVersion]):
        if not _table_exists(db, SchemaVersion._meta.table_name):
            return None
        row = SchemaVersion.get_or_none(SchemaVersion.component == schema.name)
        return (row.major, row.minor) if row else None


def sync(db: peewee.Database, schema: Schema) -> list[Version]:
    """Apply every step newer than the database's version; returns the versions applied."""
    applied = []
    with db.bind_ctx([SchemaVersion]):
        with _locked(db):
            db.create_tables([SchemaVersion], safe=True)
        for step in schema.migrations:
            # Cheap look first, the authoritative one under the lock.
            if step.version <= (current_version(db, schema) or (0, 0)):
                continue
            with _locked(db):
                if step.version <= (current_version(db, schema) or (0, 0)):
                    continue  # another process applied it while we waited
                step.apply(db)
                now = utcnow()
                (SchemaVersion
                 .insert(component=schema.name, major=step.version[0], minor=step.version[1], updated=now)
                 .on_conflict(conflict_target=[SchemaVersion.component],
                              update={SchemaVersion.major: step.version[0],
                                      SchemaVersion.minor: step.version[1],
                                      SchemaVersion.updated: now})
                 .execute())
            applied.append(step.version)
    return applied


@contextlib.contextmanager
def _locked(db: peewee.Database) -> Iterator[None]:
    """A transaction that no other ``sync`` on this database runs alongside."""
    with db.atomic("IMMEDIATE") if is_sqlite(db) else db.atomic():
        if is_postgres(db):
            # One key for every schema: services may share a database, and with it the
            # version table. Released with the transaction.
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        yield


def _table_exists(db: peewee.Database, name: str) -> bool:
    if is_postgres(db):
        # Honours the connection's search_path, where CREATE TABLE put it; peewee's
        # table_exists only looks in "public".
        return db.execute_sql("SELECT to_regclass(%s) IS NOT NULL", (f'"{name}"',)).fetchone()[0]
    return db.table_exists(name)


def check(db: peewee.Database, schema: Schema, equal: bool = False) -> tuple[bool, str]:
    """Is the database usable by this code? ``equal`` demands the exact version."""
    have = current_version(db, schema)
    want = schema.version
    if have is None:
        return False, f"{schema.name}: database has no schema yet (code wants {_fmt(want)}); run 'labvault dbsync'"
    if have == want:
        return True, f"{schema.name}: database at {_fmt(have)}, same as the code"
    if equal:
        return False, f"{schema.name}: database at {_fmt(have)}, code wants {_fmt(want)}"
    if have[0] != want[0]:
        return False, f"{schema.name}: database at {_fmt(have)}, code needs major version {want[0]}; run 'labvault dbsync'"
    if have < want:
        return True, f"{schema.name}: database at {_fmt(have)}, code at {_fmt(want)}; 'labvault dbsync' will add the rest"
    return True, f"{schema.name}: database at {_fmt(have)} is newer than the code ({_fmt(want)})"


def require(db: peewee.Database, schema: Schema) -> None:
    """Refuse to serve on a schema whose major version differs from the code's."""
    have = current_version(db, schema)
    if have is None or have[0] != schema.version[0]:
        raise SchemaMismatch(check(db, schema)[1])


def bind_service(proxy: peewee.DatabaseProxy, url: str, schema: Schema, check_schema: bool = True) -> peewee.Database:
    """Bind a service's models to ``url``; with ``check_schema``, refuse another major version first.

    The connection used for the check is closed (and a pool emptied): requests open
    their own, and nothing is left for a fork (uWSGI without lazy-apps) to copy.
    """
    db = bind(proxy, url)
    if check_schema:
        try:
            require(db, schema)
        finally:
            close_all(db)
    return db


def _fmt(version: Version) -> str:
    return f"{version[0]}.{version[1]}"
