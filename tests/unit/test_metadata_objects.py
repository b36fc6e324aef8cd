"""Generic object REST domain code, and the value rules (dates, mimetypes, subdirs) it shares."""
from __future__ import annotations

import datetime

import pytest

from common.errors import BadRequest, Conflict, LabvaultError, NotFound
from metadata_service import models, objects
from metadata_service.objects import (
    check_mimetype,
    normalise_subdir,
    parse_date,
    parse_datetime,
)


def error_of(call, *args):
    with pytest.raises(LabvaultError) as caught:
        call(*args)
    assert "\n" not in caught.value.message
    return caught.value


def counts():
    return {table: model.select().count() for table, model in objects.TABLES.items()}


# -- values ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Tue Nov 29 14:09:05 PST 2016", datetime.datetime(2016, 11, 29, 22, 9, 5)),
    ("Tue Nov 29 14:09:05 PDT 2016", datetime.datetime(2016, 11, 29, 21, 9, 5)),
    ("Fri Sep 13 08:15:26 EST 2013", datetime.datetime(2013, 9, 13, 13, 15, 26)),
    ("Fri Sep 13 08:15:26 2013", datetime.datetime(2013, 9, 13, 8, 15, 26)),
    ("Tue Oct 01 2013", datetime.datetime(2013, 10, 1)),
    ("Mon Jul 1 00:00:00 2017", datetime.datetime(2017, 7, 1)),
    ("2016-11-29T14:09:05-08:00", datetime.datetime(2016, 11, 29, 22, 9, 5)),
    ("2016-11-29T22:09:05Z", datetime.datetime(2016, 11, 29, 22, 9, 5)),
    ("2016-11-29 22:09:05.250000", datetime.datetime(2016, 11, 29, 22, 9, 5, 250000)),
    ("2016-11-29", datetime.datetime(2016, 11, 29)),
    ("20161129", datetime.datetime(2016, 11, 29)),
    (1480457345, datetime.datetime(2016, 11, 29, 22, 9, 5)),
    (1480457345.5, datetime.datetime(2016, 11, 29, 22, 9, 5, 500000)),
    ("1480457345", datetime.datetime(2016, 11, 29, 22, 9, 5)),
    (None, None),
    ("", None),
])
def test_parse_datetime(text, expected):
    assert parse_datetime(text) == expected


@pytest.mark.parametrize("text", ["not a date", "Tue Nov 29 14:09:05 XYZT 2016", "2016-13-45", True,
                                  [2016], "99999999999999999999", float("nan")])
def test_parse_datetime_refuses(text):
    assert error_of(parse_datetime, text).code == "invalid_date"


def test_parse_date_keeps_the_written_day():
    assert parse_date("Tue Oct 01 2013") == datetime.date(2013, 10, 1)
    assert parse_date("2013-10-01T23:30:00-05:00") == datetime.date(2013, 10, 1)
    assert parse_date(None) is None


@pytest.mark.parametrize("value", ["text/plain", "application/vnd.ms-excel", "image/svg+xml",
                                   "text/plain; charset=utf-8", 'text/plain;format="a b"', "x-a.b/c_d"])
def test_good_mimetypes(value):
    assert check_mimetype(value) == value


@pytest.mark.parametrize("value", ["lame-mime-type", "text/", "/plain", "text/pl ain", "text/plain/x",
                                   "", None, 5, "t\u00e9xt/plain", "text/plain; charset"])
def test_bad_mimetypes(value):
    assert error_of(check_mimetype, value).code == "invalid_mimetype"


@pytest.mark.parametrize("value, expected", [("data/a/b/", "a/b"), ("data//a/b", "a/b"), ("a/b", "a/b"),
                                             ("/a/./b/", "a/b"), ("data", ""), ("", ""), (None, ""),
                                             ("a/data/b", "a/data/b"), ("database/x", "database/x")])
def test_normalise_subdir(value, expected):
    assert normalise_subdir(value) == expected


def test_subdir_may_not_climb():
    assert error_of(normalise_subdir, "data/../etc").code == "invalid_metadata"


# -- GET ---------------------------------------------------------------------------------

def test_query_all_and_by_fields(metadata_seeded):
    users = objects.query("users", {})
    assert [user["_id"] for user in users] == [10, 11]
    assert users[0]["network_id"] == "dmlb2001"
    assert set(users[0]) >= {"_id", "first_name", "created", "updated", "deleted", "encoding"}
    assert objects.query("users", {"_id": "11"})[0]["first_name"] == "bob"
    assert objects.query("users", {"network_id": "nobody"}) == []
    assert [p["_id"] for p in objects.query("projects", {"_id": "1236\u00e9"})] == ["1236\u00e9"]
    links = objects.query("project_user", {"user": "10", "project": "1234a"})
    assert [(link["project"], link["user"]) for link in links] == [("1234a", 10)]
    assert links[0]["uuid"] == "45d17677-833f-4835-9714-1839cd315e5d"
    assert [g["_id"] for g in objects.query("groups", {"is_admin": "true"})] == [0]
    assert [g["_id"] for g in objects.query("groups", {"is_admin": "False"})] == [1000, 1001]
    assert [u["_id"] for u in objects.query("users", {"_id": ["11", "10", "99"]})] == [10, 11]
    dated = objects.query("projects", {"closed_date": "2014-09-29"})
    assert [p["_id"] for p in dated] == ["1236\u00e9", "1237"]
    assert dated[0]["closed_date"] == datetime.date(2014, 9, 29)
    # Pacifica clients send recursion parameters; rows here are flat anyway.
    assert len(objects.query("users", {"recursion_depth": "0"})) == 2


def test_query_paging(metadata_seeded):
    ids = [p["_id"] for p in objects.query("projects", {})]
    assert ids == sorted(ids) and len(ids) == 5
    assert [p["_id"] for p in objects.query("projects", {"items_per_page": "2"})] == ids[:2]
    assert [p["_id"] for p in objects.query("projects", {"items_per_page": "2", "page_number": "3"})] == ids[4:]
    assert objects.query("projects", {"items_per_page": "2", "page_number": "4"}) == []
    assert [p["_id"] for p in objects.query("projects", {"page_number": "1"})] == ids


@pytest.mark.parametrize("table, params, status, code", [
    ("nope", {}, 404, "not_found"),
    ("id_counter", {}, 404, "not_found"),
    ("users", {"color": "red"}, 400, "unknown_field"),
    ("users", {"_id": "ten"}, 400, "invalid_filter"),
    ("users", {"_id": ["10", "x"]}, 400, "invalid_filter"),
    ("groups", {"is_admin": "maybe"}, 400, "invalid_filter"),
    ("projects", {"closed_date": "whenever"}, 400, "invalid_filter"),
    ("users", {"page_number": "0"}, 400, "invalid_page_number"),
    ("users", {"items_per_page": "x"}, 400, "invalid_items_per_page"),
])
def test_query_errors(metadata_seeded, table, params, status, code):
    error = error_of(objects.query, table, params)
    assert (error.status, error.code) == (status, code)


# -- PUT ---------------------------------------------------------------------------------

def test_insert_one_and_many(metadata_seeded):
    assert objects.insert("users", {"_id": 12, "first_name": "Ann", "created": "Tue Oct 01 2013"}) == 1
    row = objects.query("users", {"_id": "12"})[0]
    assert row["first_name"] == "Ann" and row["last_name"] == ""
    assert row["created"] == datetime.datetime(2013, 10, 1)
    assert objects.insert("users", [{"first_name": "Bea"}, {"first_name": "Cy"}]) == 2
    assert [u["first_name"] for u in objects.query("users", {})][-2:] == ["Bea", "Cy"]
    assert objects.insert("projects", {"_id": 4321, "title": "numeric id"}) == 1
    assert objects.query("projects", {"_id": "4321"})[0]["title"] == "numeric id"
    assert objects.insert("keys", []) == 0


def test_insert_generates_uuids(metadata_seeded):
    objects.insert("relationships", {"name": "pi", "display_name": "PI"})
    row = objects.query("relationships", {"name": "pi"})[0]
    assert len(row["uuid"]) == 36
    objects.insert("project_user", {"project": "1235", "user": 11, "relationship": row["uuid"]})
    assert len(objects.query("project_user", {"project": "1235"})[0]["uuid"]) == 36


def test_transactions_and_files_without_id_take_ids_from_getid(metadata_seeded):
    from metadata_service import ids

    objects.insert("transactions", {"_id": 40})
    handed_out = ids.getid("upload_job", 3)  # an upload may hold these ids without rows yet
    objects.insert("transactions", {"description": "auto"})
    auto = objects.query("transactions", {"description": "auto"})[0]["_id"]
    assert auto > handed_out["endIndex"]
    objects.insert("files", {"name": "a", "size": 0, "transaction": auto, "hashsum": "SHA1:" + "AB" * 20})
    file = objects.query("files", {"transaction": str(auto)})[0]
    assert file["hashtype"] == "sha1" and file["hashsum"] == "ab" * 20
    assert file["mimetype"] == "application/octet-stream"


@pytest.mark.parametrize("table, body, status, code", [
    ("users", {"_id": 10}, 409, "duplicate_id"),
    ("users", [{"_id": 20}, {"_id": 20}], 409, "duplicate_id"),
    ("projects", {"_id": "1234a"}, 409, "duplicate_id"),
    ("keys", [{"key": "k"}, {"key": "k"}], 409, "duplicate_id"),
    ("user_group", {"user": 10, "group": 0}, 409, "duplicate_id"),
    ("project_user", {"project": "nope", "user": 10,
                      "relationship": "ad417f50-5401-446d-8e5f-69892777f9b1"}, 400, "unknown_reference"),
    ("files", {"_id": 5, "name": "x", "size": 1, "transaction": 999}, 400, "unknown_reference"),
    ("users", {"_id": 21, "shoe_size": 9}, 400, "unknown_field"),
    ("projects", {"title": "no id"}, 400, "missing_field"),
    ("relationships", {"display_name": "no name"}, 400, "missing_field"),
    ("users", {"_id": "abc"}, 400, "invalid_value"),
    ("users", {"first_name": {"a": 1}}, 400, "invalid_value"),
    ("users", {"first_name": None}, 400, "invalid_value"),
    ("users", {"first_name": "x" * 300}, 400, "invalid_value"),
    ("groups", {"is_admin": "sometimes"}, 400, "invalid_value"),
    ("projects", {"_id": "p", "closed_date": "someday"}, 400, "invalid_date"),
    ("transactions", {"_id": 3, "submitter": 10, "created": "soon"}, 400, "invalid_date"),
    ("users", "a string", 400, "invalid_object"),
    ("users", [{"_id": 30}, 5], 400, "invalid_object"),
    ("nope", {}, 404, "not_found"),
])
def test_insert_errors_leave_nothing(metadata_seeded, table, body, status, code):
    before = counts()
    # A good row ahead of the bad one must be rolled back with it.
    good_first = [{"_id": 77, "first_name": "rolled back"}] if table == "users" else []
    error = error_of(objects.insert, table, good_first + body if isinstance(body, list) else body)
    assert (error.status, error.code) == (status, code)
    assert counts() == before


def test_insert_list_rolls_back_as_a_whole(metadata_seeded):
    before = counts()
    error = error_of(objects.insert, "users", [{"_id": 50}, {"_id": 51}, {"_id": 10}])
    assert error.code == "duplicate_id" and "users[2]" in error.message
    assert counts() == before


@pytest.mark.parametrize("body, code", [
    ({"_id": 9, "name": "x", "size": 1, "transaction": 1, "mimetype": "lame-mime-type"}, "invalid_mimetype"),
    ({"_id": 9, "name": "x", "size": -1, "transaction": 1}, "invalid_value"),
    ({"_id": 9, "name": "x", "size": 1, "transaction": 1, "hashtype": "crc32", "hashsum": "ab"},
     "unsupported_hashtype"),
    ({"_id": 9, "name": "x", "size": 1, "transaction": 1, "hashtype": "sha1", "hashsum": "xyz"}, "invalid_hashsum"),
    ({"_id": 9, "name": "x", "size": 1, "transaction": 1, "hashtype": "sha1", "hashsum": "deadbeef"},
     "invalid_hashsum"),
])
def test_file_value_rules(metadata_seeded, body, code):
    objects.insert("transactions", {"_id": 1})
    assert error_of(objects.insert, "files", body).code == code


# -- POST ---------------------------------------------------------------------------------

def test_update(metadata_seeded):
    before = objects.query("users", {"_id": "11"})[0]
    assert objects.update("users", {"_id": "11"}, {"first_name": "Rob", "middle_initial": "Q"}) == 1
    after = objects.query("users", {"_id": "11"})[0]
    assert (after["first_name"], after["middle_initial"]) == ("Rob", "Q")
    assert after["updated"] > before["updated"] and after["created"] == before["created"]
    assert objects.update("projects", {"science_theme": "g\u00e9neral"}, {"project_type": "user"}) == 5
    assert objects.update("users", {"_id": "99"}, {"first_name": "ghost"}) == 0
    assert objects.update("groups", {"_id": "1000"}, {"deleted": "2020-01-01"}) == 1
    assert objects.query("groups", {"_id": "1000"})[0]["deleted"] == datetime.datetime(2020, 1, 1)


@pytest.mark.parametrize("params, body, status, code", [
    ({}, {"first_name": "all"}, 400, "filter_required"),
    ({"recursion_depth": "1"}, {"first_name": "all"}, 400, "filter_required"),
    ({"_id": "10"}, {}, 400, "invalid_object"),
    ({"_id": "10"}, [{"first_name": "x"}], 400, "invalid_object"),
    ({"_id": "10"}, {"_id": 12}, 400, "immutable_field"),
    ({"_id": "10"}, {"nickname": "d"}, 400, "unknown_field"),
    ({"nickname": "d"}, {"first_name": "d"}, 400, "unknown_field"),
])
def test_update_errors(metadata_seeded, params, body, status, code):
    before = objects.query("users", {})
    error = error_of(objects.update, "users", params, body)
    assert (error.status, error.code) == (status, code)
    assert objects.query("users", {}) == before


def test_update_checks_references(metadata_seeded):
    error = error_of(objects.update, "user_group", {"user": "10"}, {"group": 4242})
    assert (error.status, error.code) == (400, "unknown_reference")
    assert objects.update("keys", {"_id": "1"}, {"key": "x"}) == 0
    assert objects.insert("keys", [{"key": "a"}, {"key": "b"}]) == 2
    error = error_of(objects.update, "keys", {"key": "b"}, {"key": "a"})
    assert (error.status, error.code) == (409, "duplicate_id")


# -- DELETE -------------------------------------------------------------------------------

def test_delete(metadata_seeded):
    assert error_of(objects.delete, "users", {}).code == "filter_required"
    error = error_of(objects.delete, "users", {"_id": "10"})
    assert (error.status, error.code) == (409, "in_use")
    assert error_of(objects.delete, "relationships", {"name": "t\u00e9st_rel_1"}).code == "in_use"
    assert objects.query("users", {"_id": "10"})
    assert objects.delete("users", {"_id": "11"}) == 1
    assert objects.delete("users", {"_id": "11"}) == 0
    assert objects.delete("project_user", {"user": "10"}) == 2
    assert objects.delete("relationships", {"name": "t\u00e9st_rel_2"}) == 1
    assert objects.query("users", {"_id": "11"}) == []


def test_tables_are_the_rest_endpoints():
    assert set(objects.TABLES) == {
        "users", "projects", "instruments", "groups", "user_group", "relationships", "project_user",
        "project_instrument", "instrument_user", "transactions", "files", "keys", "values",
        "trans_key_value", "file_key_value"}
    assert "id_counter" not in objects.TABLES
    assert models.IdCounter not in objects.TABLES.values()
    with pytest.raises(NotFound):
        objects.model_for("id_counter")
    assert issubclass(NotFound, LabvaultError) and issubclass(Conflict, LabvaultError)
    assert issubclass(BadRequest, LabvaultError)
