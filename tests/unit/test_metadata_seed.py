"""load_seed: Pacifica's seed directory, single-file seeds, idempotence, malformed seeds."""
from __future__ import annotations

import datetime
import json
import shutil

import pytest

from common.errors import BadRequest
from metadata_service import objects
from metadata_service.seed import SEED_TABLES, load_seed
from tests.helpers import FIXTURES, load_json

SEED = FIXTURES / "metadata-seed"
EXPECTED = {"users": 2, "groups": 3, "user_group": 1, "projects": 5, "instruments": 2, "relationships": 2,
            "project_user": 2, "project_instrument": 2, "instrument_user": 1}


def dump():
    return {table: objects.query(table, {}) for table in objects.TABLES}


def test_loads_the_pacifica_seed_directory(metadata_db):
    assert load_seed(SEED) == EXPECTED
    tables = dump()
    assert {table: len(rows) for table, rows in tables.items() if rows} == EXPECTED
    # Other files in the directory (files.json, transactions.json, ...) are not seed tables.
    assert tables["transactions"] == tables["files"] == tables["keys"] == []
    project = objects.query("projects", {"_id": "1234a"})[0]
    assert project["accepted_date"] == datetime.date(2013, 10, 1)
    assert project["submitted_date"] == datetime.datetime(2013, 9, 13, 8, 15, 26)
    assert project["closed_date"] is None
    assert objects.query("groups", {"_id": "0"})[0]["is_admin"] is True
    assert objects.query("user_group", {})[0]["user"] == 10
    assert objects.query("instrument_user", {})[0]["relationship"] == "ad417f50-5401-446d-8e5f-69892777f9b1"


def test_loading_twice_changes_nothing(metadata_db):
    load_seed(SEED)
    first = dump()
    assert load_seed(SEED) == EXPECTED
    assert dump() == first


def test_loading_again_updates_changed_rows(metadata_db, tmp_path):
    load_seed(SEED)
    users = load_json(SEED / "users.json")
    users[1]["first_name"] = "Robert"
    users.append({"_id": 12, "first_name": "New"})
    (tmp_path / "users.json").write_text(json.dumps(users), encoding="utf-8")
    assert load_seed(tmp_path / "users.json") == {"users": 3}
    assert [u["first_name"] for u in objects.query("users", {})] == ["David\u00e9", "Robert", "New"]


def test_one_file_mapping_tables_to_rows(metadata_db, tmp_path):
    seed = {table: load_json(SEED / f"{table}.json") for table in SEED_TABLES}
    seed["transactions"] = [{"_id": 1}]  # not a seed table: ignored
    (tmp_path / "seed.json").write_text(json.dumps(seed), encoding="utf-8")
    assert load_seed(tmp_path / "seed.json") == EXPECTED
    assert objects.query("transactions", {}) == []


def test_directory_with_some_tables(metadata_db, tmp_path):
    for table in ("users", "groups", "user_group"):
        shutil.copy(SEED / f"{table}.json", tmp_path)
    (tmp_path / "notes.txt").write_text("not a seed", encoding="utf-8")
    assert load_seed(tmp_path) == {"users": 2, "groups": 3, "user_group": 1}


@pytest.mark.parametrize("name, content, named", [
    ("users.json", "{not json", "users.json"),
    ("users.json", '{"_id": 10}', "users.json"),
    ("users.json", "[1, 2]", "users.json"),
    ("users.json", '[{"_id": 10, "shoe_size": 9}]', "users.json"),
    ("projects.json", '[{"_id": "p", "closed_date": "someday"}]', "projects.json"),
    ("project_user.json", '[{"project": "nope", "user": 10, "relationship": "r"}]', "project_user.json"),
    ("relationships.json", '[{"uuid": "r1"}]', "relationships.json"),
])
def test_malformed_seed_loads_nothing(metadata_db, tmp_path, name, content, named):
    # users.json of the real seed goes in first, in the same transaction, and must be undone.
    if name != "users.json":
        shutil.copy(SEED / "users.json", tmp_path)
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(BadRequest) as caught:
        load_seed(tmp_path)
    assert caught.value.code == "invalid_seed"
    assert named in caught.value.message and "\n" not in caught.value.message
    assert all(rows == [] for rows in dump().values())


def test_missing_or_odd_paths(metadata_db, tmp_path):
    with pytest.raises(BadRequest) as caught:
        load_seed(tmp_path / "absent")
    assert caught.value.code == "invalid_seed"
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(BadRequest) as caught:
        load_seed(tmp_path / "list.json")
    assert caught.value.code == "invalid_seed"
    (tmp_path / "empty.json").write_text("{}", encoding="utf-8")
    assert load_seed(tmp_path / "empty.json") == {}
