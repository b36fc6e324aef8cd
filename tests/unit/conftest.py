"""Fixtures shared by the unit tests.

Every database-backed fixture runs its tests twice: on SQLite (a fresh file per
test) and on PostgreSQL (``[postgres]``; skipped without a server, failed under
CI=true). Creating a PostgreSQL database costs about 100 ms, so each service gets
one per session, its schema synced once, and its tables emptied before each test.
"""
from __future__ import annotations

from collections.abc import Iterator

import peewee
import pytest

from common import db as dbmod
from common import migrations, registry
from tests.helpers import FIXTURES
from tests.servers import postgres_databases, require_postgres

DATABASES = ("sqlite", "postgres")
# Services whose tables the unit tests exercise: every service that has tables.
SERVICES = tuple(service.name for service in registry.with_tables())


def service_models(service: str):
    return registry.get(service).models_module()


@pytest.fixture(scope="session")
def postgres_urls() -> Iterator[dict[str, str]]:
    """Service -> URL of this session's PostgreSQL database for it, schema applied; dropped after."""
    require_postgres()
    with postgres_databases(*SERVICES) as urls:
        for service, url in urls.items():
            db = dbmod.open_database(url)
            with db.connection_context():
                migrations.sync(db, service_models(service).SCHEMA)
        yield urls


def service_tables(models) -> list[type[peewee.Model]]:
    """The models of a service's ``models`` module, each after the models it references."""
    found = [value for value in vars(models).values()
             if isinstance(value, type) and issubclass(value, peewee.Model)
             and value._meta.database is models.database]
    return peewee.sort_models(found)


def empty_tables(db: peewee.Database, models) -> None:
    """Delete every row of the service's tables and restart the serial ids, as in a fresh database."""
    # DELETE and ALTER SEQUENCE take milliseconds here; TRUNCATE of the same tables a tenth of a second.
    existing = set(db.get_tables())  # abstract bases such as BaseModel have no table
    statements = [f'DELETE FROM "{model._meta.table_name}"' for model in reversed(service_tables(models))
                  if model._meta.table_name in existing]
    sequences = db.execute_sql("SELECT sequence_name FROM information_schema.sequences "
                               "WHERE sequence_schema = current_schema()").fetchall()
    statements += [f'ALTER SEQUENCE "{name}" RESTART' for (name,) in sequences]
    with db.atomic():
        # A connection a broken test left inside a transaction would otherwise hang the run.
        db.execute_sql("SET LOCAL lock_timeout = '20s'")
        db.execute_sql("; ".join(statements))


def service_database(request, tmp_path, service: str) -> peewee.Database:
    """``service``'s models bound to an empty, synced database of the kind ``request.param`` names."""
    models = service_models(service)
    if request.param == "sqlite":
        db = dbmod.open_database(f"sqlite:///{tmp_path}/{service}.sqlite3")
        migrations.sync(db, models.SCHEMA)
    else:
        db = dbmod.open_database(request.getfixturevalue("postgres_urls")[service])
        empty_tables(db, models)
    dbmod.bind(models.database, db)
    return db


@pytest.fixture(params=DATABASES)
def metadata_db(request, tmp_path):
    """An empty metadata database (SQLite file or PostgreSQL), schema applied, models bound to it."""
    db = service_database(request, tmp_path, "metadata")
    yield db
    dbmod.close_quietly(db)


@pytest.fixture
def metadata_seeded(metadata_db):
    """``metadata_db`` loaded with Pacifica's seed (users 10 and 11, project 1234a, instrument 54...)."""
    from metadata_service.seed import load_seed

    load_seed(FIXTURES / "metadata-seed")
    return metadata_db


@pytest.fixture(params=DATABASES)
def archive_db(request, tmp_path):
    """An empty archive database (SQLite file or PostgreSQL), models bound to it."""
    db = service_database(request, tmp_path, "archive")
    yield db
    dbmod.close_quietly(db)


@pytest.fixture(params=DATABASES)
def ingest_db(request, tmp_path):
    """An empty ingest database (SQLite file or PostgreSQL), models bound to it."""
    db = service_database(request, tmp_path, "ingest")
    yield db
    dbmod.close_quietly(db)


@pytest.fixture(params=DATABASES)
def stats_db(request, tmp_path):
    """An empty stats database (SQLite file or PostgreSQL), models bound to it."""
    db = service_database(request, tmp_path, "stats")
    yield db
    dbmod.close_quietly(db)


@pytest.fixture(params=DATABASES)
def empty_database(request, tmp_path):
    """A database with no tables at all (SQLite file or PostgreSQL), for schema tests."""
    if request.param == "sqlite":
        db = dbmod.open_database(f"sqlite:///{tmp_path}/empty.sqlite3")
        yield db
        dbmod.close_quietly(db)
        return
    require_postgres()
    with postgres_databases("empty") as urls:
        db = dbmod.open_database(urls["empty"])
        yield db
        dbmod.close_quietly(db)
