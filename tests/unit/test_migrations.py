"""Versioned schema migrations on SQLite and PostgreSQL: ordered steps, version checks, refusing a
major mismatch, several processes syncing at once, and ``labvault dbsync``/``dbchk`` for real."""
import os
import subprocess
import sys

import peewee
import pytest

from common import db as dbmod
from common import migrations, registry
from common.errors import SchemaMismatch
from common.migrations import Migration, Schema, create_tables
from tests.helpers import REPO
from tests.servers import postgres_databases, require_postgres
from tests.unit.processes import database_url, run_processes


class Thing(peewee.Model):
    name = peewee.CharField()


def add_column(db):
    db.execute_sql('ALTER TABLE "thing" ADD COLUMN "size" INTEGER DEFAULT 0')


V1 = Schema("things", [Migration((1, 0), "things", create_tables(Thing))])
V1_1 = Schema("things", V1.migrations + [Migration((1, 1), "size column", add_column)])
V2 = Schema("things", V1_1.migrations + [Migration((2, 0), "no-op major", lambda db: None)])


@pytest.fixture
def db(empty_database):
    return empty_database


def test_sync_applies_only_new_steps_in_order(db):
    assert migrations.current_version(db, V1) is None
    assert migrations.sync(db, V1) == [(1, 0)]
    assert migrations.sync(db, V1) == []
    assert migrations.sync(db, V1_1) == [(1, 1)]
    assert migrations.current_version(db, V1_1) == (1, 1)
    assert "size" in [column.name for column in db.get_columns("thing")]


def test_check_and_require(db):
    assert migrations.check(db, V1)[0] is False
    with pytest.raises(SchemaMismatch):
        migrations.require(db, V1)
    migrations.sync(db, V1)
    assert migrations.check(db, V1_1) == (True, migrations.check(db, V1_1)[1])
    assert migrations.check(db, V1_1, equal=True)[0] is False
    migrations.require(db, V1_1)  # same major: serves, dbsync adds the rest
    with pytest.raises(SchemaMismatch, match="major version 2"):
        migrations.require(db, V2)
    assert migrations.check(db, V2)[0] is False


def test_failed_step_leaves_the_version_where_it_was(db):
    migrations.sync(db, V1)

    def broken(database):
        database.execute_sql('ALTER TABLE "thing" ADD COLUMN "x" INTEGER')
        raise RuntimeError("step failed")
    with pytest.raises(RuntimeError):
        migrations.sync(db, Schema("things", V1.migrations + [Migration((1, 1), "broken", broken)]))
    assert migrations.current_version(db, V1) == (1, 0)
    assert "x" not in [column.name for column in db.get_columns("thing")]


def test_versions_must_rise():
    with pytest.raises(ValueError):
        Schema("bad", [Migration((1, 1), "a", lambda db: None), Migration((1, 0), "b", lambda db: None)])


def sync_in_child(url, schema):
    """In a child process: sync ``schema`` over a database connection of its own."""
    database = dbmod.open_database(url)
    try:
        return migrations.sync(database, schema)
    finally:
        database.close()


def test_several_processes_syncing_at_once_apply_each_step_once(db):
    def add_index(database):
        database.execute_sql('CREATE INDEX "by_size" ON "thing" ("size")')
    schema = Schema("things", V1_1.migrations + [Migration((1, 2), "index", add_index)])
    # Without the lock, two processes would both add the column (or create the index) and one would fail.
    results = run_processes(sync_in_child, [(database_url(db), schema)] * 4, databases=[db])
    applied = sorted(version for result in results for version in result)
    assert applied == [(1, 0), (1, 1), (1, 2)]
    assert migrations.current_version(db, schema) == (1, 2)


SERVICE_TABLES = {
    "metadata": {"users", "projects", "instruments", "groups", "user_group", "relationships", "project_user",
                 "project_instrument", "instrument_user", "transactions", "files", "keys", "values",
                 "trans_key_value", "file_key_value", "id_counter"},
    "archive": {"archive_file", "archive_fixity_check", "archive_imported_object"},
    "ingest": {"ingest_job", "ingest_api_token", "ingest_idempotency_key", "ingest_webhook", "ingest_webhook_delivery",
               "ingest_resumable_upload"},
}
SERVICE_VERSIONS = {"metadata": (1, 0), "archive": (1, 2), "ingest": (1, 3)}


def labvault(tmp_path, urls, *args):
    env = dict(os.environ, **{f"LABVAULT_{service.upper()}_DATABASE": url for service, url in urls.items()})
    return subprocess.run([sys.executable, "-m", "common.cli", *args, "--data-dir", str(tmp_path)],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_dbsync_and_dbchk_on_empty_postgresql_databases(tmp_path):
    require_postgres()
    with postgres_databases(*SERVICE_TABLES) as urls:
        before = labvault(tmp_path, urls, "dbchk")
        assert before.returncode == 1 and "run 'labvault dbsync'" in before.stdout
        done = labvault(tmp_path, urls, "dbsync")
        assert done.returncode == 0, done.stderr
        assert "metadata: schema 1.0 (1.0)" in done.stdout
        again = labvault(tmp_path, urls, "dbsync")
        # Every service with tables answers (stats on its default SQLite file under --data-dir).
        with_tables = len(registry.with_tables())
        assert again.returncode == 0 and again.stdout.count("nothing to do") == with_tables
        # Production's pooled form of the URL works for the commands too.
        pooled = {service: url.replace("postgresql://", "postgresql+pool://") for service, url in urls.items()}
        check = labvault(tmp_path, pooled, "dbchk", "--equal")
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.count("same as the code") == with_tables
        for service, tables in SERVICE_TABLES.items():
            database = dbmod.open_database(urls[service])
            with database.connection_context():
                assert set(database.get_tables()) == tables | {"labvault_schema_version"}
                versions = database.execute_sql(
                    "SELECT component, major, minor FROM labvault_schema_version").fetchall()
            assert versions == [(service, *SERVICE_VERSIONS[service])]
