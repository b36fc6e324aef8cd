"""Versioned schema migrations: ordered steps, version checks, refusing a major mismatch."""
import peewee
import pytest

from common import migrations
from common.db import open_database
from common.errors import SchemaMismatch
from common.migrations import Migration, Schema, create_tables


class Thing(peewee.Model):
    name = peewee.CharField()


def add_column(db):
    db.execute_sql('ALTER TABLE "thing" ADD COLUMN "size" INTEGER DEFAULT 0')


V1 = Schema("things", [Migration((1, 0), "things", create_tables(Thing))])
V1_1 = Schema("things", V1.migrations + [Migration((1, 1), "size column", add_column)])
V2 = Schema("things", V1_1.migrations + [Migration((2, 0), "no-op major", lambda db: None)])


@pytest.fixture
def db(tmp_path):
    database = open_database(f"sqlite:///{tmp_path}/m.sqlite3")
    yield database
    database.close()


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
