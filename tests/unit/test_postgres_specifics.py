"""What differs between SQLite and PostgreSQL, pinned down: database URLs and pooling, serial
ids after explicit ids, text order and length, big integers, booleans, IN filters, column
types, and seed upserts from several processes at once. Most tests run on both databases."""
from __future__ import annotations

import contextlib
import datetime
import decimal
import uuid

import peewee
import pytest
from playhouse.pool import PooledPostgresqlDatabase

from common import db as dbmod
from common import migrations
from common.errors import BadRequest
from common.settings import SettingsError
from ingest_service import jobs
from metadata_service import models, objects
from metadata_service.seed import load_seed
from tests.helpers import FIXTURES, load_json
from tests.servers import PG_HOST, PG_PORT, PG_USER, database_url, require_postgres
from tests.unit.processes import database_url as url_of
from tests.unit.processes import run_processes

SEED = FIXTURES / "metadata-seed"

# -- URLs and connections -------------------------------------------------------------


def test_database_urls_choose_the_database_and_connect_to_nothing(tmp_path):
    sqlite = dbmod.open_database(f"sqlite:///{tmp_path}/x/m.sqlite3")
    assert isinstance(sqlite, peewee.SqliteDatabase) and sqlite.is_closed()
    assert (tmp_path / "x").is_dir() and not (tmp_path / "x" / "m.sqlite3").exists()

    plain = dbmod.open_database("postgresql://lv:secret@db.invalid:6543/metadata")
    assert type(plain) is peewee.PostgresqlDatabase and plain.is_closed()
    assert plain.database == "metadata"
    assert plain.connect_params == {"user": "lv", "password": "secret", "host": "db.invalid", "port": 6543,
                                    "connect_timeout": 10}

    pooled = dbmod.open_database("postgresql+pool://lv@db.invalid/metadata")
    assert isinstance(pooled, PooledPostgresqlDatabase) and pooled.is_closed()
    assert (pooled._max_connections, pooled._stale_timeout, pooled._wait_timeout) == (10, 300, 10)
    assert dbmod.is_postgres(pooled) and not dbmod.is_sqlite(pooled)

    # The URL's query parameters win over the defaults and reach psycopg2.
    tuned = dbmod.open_database("postgres+pool://lv@db.invalid/metadata?max_connections=3&stale_timeout=60"
                                "&timeout=0&connect_timeout=2&sslmode=require")
    assert (tuned._max_connections, tuned._stale_timeout, tuned._wait_timeout) == (3, 60, float("inf"))
    assert tuned.connect_params["connect_timeout"] == 2 and tuned.connect_params["sslmode"] == "require"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "db.sqlite3", "postgresql://host-but-no-database"])
def test_unsupported_database_urls_are_settings_errors(url):
    with pytest.raises(SettingsError):
        dbmod.open_database(url)


def test_a_pool_lends_one_connection_again_and_close_all_empties_it(postgres_urls):
    url = postgres_urls["metadata"].replace("postgresql://", "postgresql+pool://")
    pool = dbmod.open_database(url)
    pool.connect()
    first = pool.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    dbmod.close_quietly(pool)  # back to the pool, still open
    assert pool.execute_sql("SELECT pg_backend_pid()").fetchone()[0] == first
    dbmod.close_all(pool)
    assert pool.is_closed() and not pool._connections and not pool._in_use


# -- ids, text, numbers -----------------------------------------------------------------

def test_serial_ids_continue_after_explicit_ones(metadata_seeded):
    # The seed gave users 10 and 11: PostgreSQL's sequence did not see them.
    objects.insert("users", {"first_name": "auto"})
    assert objects.query("users", {"first_name": "auto"})[0]["_id"] == 12
    objects.insert("users", {"_id": 500, "first_name": "explicit"})
    objects.insert("users", [{"first_name": "next"}])
    assert objects.query("users", {"first_name": "next"})[0]["_id"] == 501
    # A lower explicit id never moves the sequence back onto ids it already handed out.
    objects.insert("users", {"_id": 300, "first_name": "lower"})
    objects.insert("users", {"first_name": "after"})
    assert objects.query("users", {"first_name": "after"})[0]["_id"] == 502
    objects.delete("users", {"_id": "502"})
    objects.insert("users", {"_id": 30, "first_name": "low"})
    objects.insert("users", {"first_name": "last"})
    # The sequence had handed out 502 (perhaps to a row not yet committed elsewhere), so
    # PostgreSQL goes on from there; SQLite takes max(id) + 1 and reuses it.
    expected = 503 if dbmod.is_postgres(metadata_seeded) else 502
    assert objects.query("users", {"first_name": "last"})[0]["_id"] == expected
    objects.insert("keys", {"_id": 7, "key": "k7"})
    objects.insert("keys", {"key": "k8"})
    assert objects.query("keys", {"key": "k8"})[0]["_id"] == 8


def test_string_keys_are_exact_and_sorted_by_code_point(metadata_seeded):
    for project_id in ("1234A", "1234b", "12345", "1234-z", "\u00e91"):
        objects.insert("projects", {"_id": project_id})
    assert [p["_id"] for p in objects.query("projects", {"_id": "1234A"})] == ["1234A"]
    assert [p["_id"] for p in objects.query("projects", {"_id": "1236\u00e9"})] == ["1236\u00e9"]
    assert objects.query("projects", {"_id": "1236e"}) == []  # no accent folding either
    ids = [p["_id"] for p in objects.query("projects", {})]
    assert ids == sorted(ids)
    page = objects.query("projects", {"items_per_page": "3", "page_number": "2"})
    assert [p["_id"] for p in page] == ids[3:6]


def test_in_filters_booleans_and_dates(metadata_seeded):
    found = objects.query("projects", {"_id": ["1236\u00e9", "1234a", "nope"]})
    assert [p["_id"] for p in found] == ["1234a", "1236\u00e9"]
    assert [g["_id"] for g in objects.query("groups", {"is_admin": ["true", "false"]})] == [0, 1000, 1001]
    objects.update("instruments", {"_id": "54"}, {"active": "f"})
    assert objects.query("instruments", {"_id": "54"})[0]["active"] is False
    assert objects.query("projects", {"accepted_date": "2013-10-01", "_id": ["1234a"]})[0]["closed_date"] is None


def test_char_fields_hold_their_length_in_characters_everywhere(metadata_seeded):
    name = "\u00e9" * 255  # 510 bytes: fits varchar(255), which counts characters
    objects.insert("users", {"_id": 20, "first_name": name})
    assert objects.query("users", {"_id": "20"})[0]["first_name"] == name
    with pytest.raises(BadRequest) as caught:
        objects.insert("users", {"_id": 21, "first_name": name + "x"})
    assert caught.value.code == "invalid_value"
    objects.insert("projects", {"_id": "long", "title": "t" * 100_000})
    assert len(objects.query("projects", {"_id": "long"})[0]["title"]) == 100_000


@pytest.mark.parametrize("bad", ["a\0b", "a\ud800b"])
def test_text_no_database_can_store_is_refused_in_rows_and_filters(metadata_seeded, bad):
    with pytest.raises(BadRequest) as caught:
        objects.insert("users", {"first_name": bad})
    assert caught.value.code == "invalid_value"
    with pytest.raises(BadRequest) as caught:
        objects.query("users", {"first_name": bad})
    assert caught.value.code == "invalid_filter"
    assert len(objects.query("users", {})) == 2


def test_pacifica_transactions_and_files_with_a_three_gib_file(metadata_seeded):
    transactions = load_json(SEED / "transactions.json")
    objects.insert("transactions", transactions)
    objects.insert("files", load_json(SEED / "files.json"))
    big = objects.query("files", {"_id": "104"})[0]
    assert big["size"] == 3 * 2 ** 30 and big["subdir"] == "a/b/\u00e9" and big["name"] == "bar\u00e9.txt"
    assert big["mtime"] == datetime.datetime(2016, 11, 12, 21, 38, 21)
    assert [f["_id"] for f in objects.query("files", {"size": str(3 * 2 ** 30)})] == [104]
    assert objects.query("transactions", {"_id": "67"})[0]["created"] == datetime.datetime(2017, 7, 15)


# -- seed upserts ---------------------------------------------------------------------------

def load_seed_in_child(url):
    """In a child process: load Pacifica's seed over a database connection of its own."""
    database = dbmod.bind(models.database, url)
    try:
        return load_seed(SEED)
    finally:
        database.close()


def test_several_processes_loading_one_seed_at_once(metadata_db):
    results = run_processes(load_seed_in_child, [(url_of(metadata_db),)] * 3, databases=[metadata_db])
    # On PostgreSQL the loaders do not queue at BEGIN: the later inserts become upserts.
    assert results == [load_seed(SEED)] * 3
    counts = {table: len(objects.query(table, {})) for table in objects.TABLES}
    assert {table: count for table, count in counts.items() if count} == results[0]
    objects.insert("users", {"first_name": "auto"})  # the sequence moved past the seed's ids
    assert objects.query("users", {"first_name": "auto"})[0]["_id"] == 12


# -- PostgreSQL only ------------------------------------------------------------------------

EXPECTED_TYPES = {
    ("files", "size"): "bigint",
    ("files", "id"): "bigint",
    ("files", "name"): "text",
    ("files", "mimetype"): "character varying(255)",
    ("files", "mtime"): "timestamp without time zone",
    ("transactions", "id"): "bigint",
    ("projects", "id"): "character varying(255)",
    ("values", "value"): "text",
    ("instruments", "active"): "boolean",
    ("users", "id"): "integer",
    ("id_counter", "next_id"): "bigint",
    ("ingest_job", "job_id"): "bigint",
    ("ingest_job", "task_percent"): "numeric(7,3)",
    ("ingest_job", "updated"): "timestamp without time zone",
    ("archive_file", "size"): "bigint",
    ("archive_file", "created"): "timestamp without time zone",
}


def column_types(db):
    rows = db.execute_sql("SELECT table_name, column_name, format_type(atttypid, atttypmod) "
                          "FROM information_schema.columns JOIN pg_attribute "
                          "ON attrelid = to_regclass(quote_ident(table_name)) AND attname = column_name "
                          "WHERE table_schema = current_schema()").fetchall()
    return {(table, column): kind for table, column, kind in rows}


def test_postgresql_column_types(postgres_urls):
    types = {}
    for url in postgres_urls.values():
        database = dbmod.open_database(url)
        with database.connection_context():
            types.update(column_types(database))
    assert {key: types[key] for key in EXPECTED_TYPES} == EXPECTED_TYPES


@contextlib.contextmanager
def icu_database(locale: str):
    """A fresh database whose default collation is ICU ``locale`` (as a production server may have)."""
    import psycopg2

    name = f"labvault_{uuid.uuid4().hex[:10]}_icu"
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            try:
                cursor.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                               f"LOCALE_PROVIDER icu ICU_LOCALE '{locale}' LOCALE 'C'")
            except psycopg2.Error as exc:  # a server built without ICU: nothing to compare against
                pytest.skip(f"cannot create an ICU {locale} database: {str(exc).strip()}")
        yield database_url(name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_project_order_does_not_follow_the_server_locale():
    require_postgres()
    with icu_database("en-US") as url:
        database = dbmod.bind(models.database, url)
        try:
            migrations.sync(database, models.SCHEMA)
            for project_id in ("1234b", "1234a", "1234A", "1234-9", "12349"):
                objects.insert("projects", {"_id": project_id})
            own_order = [row[0] for row in database.execute_sql("SELECT id FROM projects ORDER BY id")]
            assert own_order == ["1234-9", "12349", "1234a", "1234A", "1234b"]  # en-US: case and '-' weigh little
            assert [p["_id"] for p in objects.query("projects", {})] == ["1234-9", "12349", "1234A", "1234a", "1234b"]
        finally:
            database.close()


def test_task_percent_keeps_three_decimal_places(ingest_db):
    jobs.create(1)
    jobs.update(1, task_percent=12.3456)
    assert jobs.get(1).task_percent == decimal.Decimal("12.346")
