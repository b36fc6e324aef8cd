"""The metadata service's HTTP contract, against a real server on a free port and a SQLite file."""
from __future__ import annotations

import pytest
import requests

from common import db as dbmod
from common import migrations
from common.clients import MetadataClient
from common.errors import LabvaultError, SchemaMismatch
from metadata_service import models
from metadata_service.app import build_app
from metadata_service.seed import load_seed
from tests.helpers import FIXTURES, load_json, make_settings, serve_wsgi

TIMEOUT = 30


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return make_settings(tmp_path_factory.mktemp("metadata"))


@pytest.fixture(scope="module")
def url(settings):
    db = dbmod.bind(models.database, settings.database_url("metadata"))
    migrations.sync(db, models.SCHEMA)
    load_seed(FIXTURES / "metadata-seed")
    dbmod.close_quietly(db)
    with serve_wsgi(build_app(settings)) as base:
        yield base


def call(method, url, path, **kwargs):
    return requests.request(method, f"{url}{path}", timeout=TIMEOUT, **kwargs)


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code, body
    assert body["status"].startswith(str(status))
    assert "Traceback" not in body["message"] and "\n" not in body["message"]


def document(transaction_id, first_file_id, name="good-md.json"):
    entries = load_json(FIXTURES / "metadata-files" / name)
    entries.append({"destinationTable": "Transactions._id", "value": transaction_id})
    for n, entry in enumerate(e for e in entries if e["destinationTable"] == "Files"):
        entry["_id"] = first_file_id + n
    return entries


def total_rows(url):
    return {table: len(call("GET", url, f"/{table}").json())
            for table in ("transactions", "files", "keys", "values", "trans_key_value", "file_key_value")}


def test_health(url):
    response = call("GET", url, "/")
    assert response.status_code == 200
    assert response.json() == {"message": "Metadata Up and Running"}


def test_getid(url):
    first = call("GET", url, "/getid", params={"range": 1, "mode": "fresh_mode"})
    assert first.status_code == 200 and first.json() == {"startIndex": 1, "endIndex": 1}
    assert call("GET", url, "/getid?range=10&mode=fresh_mode").json() == {"startIndex": 2, "endIndex": 11}
    assert_error(call("GET", url, "/getid?range=0&mode=file"), 400, "invalid_range")
    assert_error(call("GET", url, "/getid?range=x&mode=file"), 400, "invalid_range")
    assert_error(call("GET", url, "/getid?range=1000001&mode=file"), 400, "invalid_range")
    assert_error(call("GET", url, "/getid?mode=file"), 400, "invalid_range")
    assert_error(call("GET", url, "/getid?range=1&mode=Bad-Mode"), 400, "invalid_mode")
    assert_error(call("GET", url, "/getid?range=1"), 400, "invalid_mode")


def test_ingest_put_and_post(url):
    job = call("GET", url, "/getid?range=1&mode=upload_job").json()["startIndex"]
    files = call("GET", url, "/getid?range=3&mode=file").json()["startIndex"]
    response = call("PUT", url, "/ingest", json=document(job, files))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "success"}
    transaction = call("GET", url, f"/transactions?_id={job}").json()
    assert [(t["_id"], t["submitter"], t["project"]) for t in transaction] == [(job, 10, "1234a")]
    rows = call("GET", url, "/files", params={"transaction": job}).json()
    assert [(f["_id"], f["subdir"], f["name"]) for f in rows][:2] == [(files, "a/b", "foo.txt"),
                                                                     (files + 1, "a/b", "bar.txt")]
    # Datetimes go out as ISO strings, in UTC.
    assert rows[0]["mtime"] == "2016-11-29 22:09:05"
    assert call("GET", url, "/trans_key_value", params={"transaction": job}).json()[0]["transaction"] == job

    job = call("GET", url, "/getid?range=1&mode=upload_job").json()["startIndex"]
    files = call("GET", url, "/getid?range=3&mode=file").json()["startIndex"]
    response = call("POST", url, "/ingest", json=document(job, files))
    assert response.status_code == 200 and response.json() == {"status": "success"}
    assert_error(call("POST", url, "/ingest", json=document(job, files + 10)), 409, "duplicate_id")


@pytest.mark.parametrize("body, status, code", [
    (lambda: document(9001, 9001, "bad-mimetype-md.json"), 400, "invalid_mimetype"),
    (lambda: document(9001, 9001, "bad-project-md.json"), 400, "unknown_project"),
    (lambda: document(9001, 9001, "bad-hashsum-md.json"), 400, "invalid_hashsum"),
    (lambda: [e for e in document(9001, 9001) if e["destinationTable"] != "Transactions._id"],
     400, "invalid_metadata"),
    (lambda: {"destinationTable": "Files"}, 400, "invalid_metadata"),
])
def test_ingest_rejections_leave_nothing(url, body, status, code):
    before = total_rows(url)
    assert_error(call("PUT", url, "/ingest", json=body()), status, code)
    assert total_rows(url) == before


def test_ingest_bad_json(url):
    assert_error(call("PUT", url, "/ingest", data=b"{nope", headers={"Content-Type": "application/json"}),
                 400, "invalid_json")
    assert call("GET", url, "/ingest").status_code == 405


def test_object_query(url):
    users = call("GET", url, "/users").json()
    assert [u["_id"] for u in users][:2] == [10, 11]
    assert call("GET", url, "/users?network_id=dmlb2001").json()[0]["_id"] == 10
    assert call("GET", url, "/projects?_id=1236%C3%A9").json()[0]["title"].endswith("(expired closed and end)")
    assert len(call("GET", url, "/project_instrument?instrument=54").json()) == 2
    page = call("GET", url, "/projects?items_per_page=2&page_number=2").json()
    assert [p["_id"] for p in page] == ["1236\u00e9", "1237"]
    assert call("GET", url, "/groups?is_admin=true").json()[0]["name"] == "admin"
    assert_error(call("GET", url, "/users?_id=abc"), 400, "invalid_filter")
    assert_error(call("GET", url, "/users?shoe=9"), 400, "unknown_field")
    assert_error(call("GET", url, "/no_such_table"), 404, "not_found")
    assert_error(call("GET", url, "/id_counter"), 404, "not_found")


def test_object_put_post_delete(url):
    response = call("PUT", url, "/users", json=[{"_id": 500, "first_name": "Ann"}, {"_id": 501}])
    assert response.status_code == 200 and response.json() == {"status": "success", "count": 2}
    assert_error(call("PUT", url, "/users", json={"_id": 500}), 409, "duplicate_id")
    assert_error(call("PUT", url, "/users", json={"_id": 502, "hat": 1}), 400, "unknown_field")
    assert_error(call("PUT", url, "/user_group", json={"user": 500, "group": 77}), 400, "unknown_reference")
    assert call("GET", url, "/users?_id=502").json() == []

    response = call("POST", url, "/users?_id=501", json={"first_name": "Bo", "created": "Tue Oct 01 2013"})
    assert response.json() == {"status": "success", "count": 1}
    row = call("GET", url, "/users?_id=501").json()[0]
    assert (row["first_name"], row["created"]) == ("Bo", "2013-10-01 00:00:00")
    assert_error(call("POST", url, "/users", json={"first_name": "everyone"}), 400, "filter_required")
    assert_error(call("POST", url, "/users?_id=501", json={"created": "never"}), 400, "invalid_date")

    assert call("PUT", url, "/user_group", json={"user": 500, "group": 1000}).status_code == 200
    assert_error(call("DELETE", url, "/users?_id=500"), 409, "in_use")
    assert_error(call("DELETE", url, "/users"), 400, "filter_required")
    assert call("DELETE", url, "/user_group?user=500").json() == {"status": "success", "count": 1}
    assert call("DELETE", url, "/users?_id=500&_id=501").json() == {"status": "success", "count": 2}
    assert call("GET", url, "/users?_id=500").json() == []


def test_metadata_client_speaks_the_contract(url, settings):
    client = MetadataClient(settings, base_url=url)
    assert client.health() == {"message": "Metadata Up and Running"}
    job = client.getid("upload_job")
    start = client.getid("file", 3)
    assert client.ingest(document(job, start)) == {"status": "success"}
    assert client.first("transactions", _id=job)["project"] == "1234a"
    assert [f["_id"] for f in client.query("files", transaction=job)] == [start, start + 1, start + 2]
    with pytest.raises(LabvaultError) as caught:
        client.ingest(document(job, start + 5))
    assert (caught.value.status, caught.value.code) == (409, "duplicate_id")


def test_refuses_an_unsynced_database(url, tmp_path):
    serving = models.database.obj
    try:
        with pytest.raises(SchemaMismatch):
            build_app(make_settings(tmp_path))
    finally:
        # The models' proxy is process-wide: give it back to the running server.
        models.database.initialize(serving)
