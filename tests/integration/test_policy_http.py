"""The policy service over HTTP, asking a real metadata service seeded with Pacifica's fixtures."""
from __future__ import annotations

import pytest
import requests

from common import db as dbmod
from common import migrations
from policy_service.app import build_app
from tests.helpers import FIXTURES, free_port, load_json, make_settings, serve_wsgi

TIMEOUT = 30


@pytest.fixture(scope="module")
def metadata_app(tmp_path_factory):
    """The real metadata application on a fresh database seeded with Pacifica's seed."""
    from metadata_service import app as metadata_service_app
    from metadata_service import models
    from metadata_service.seed import load_seed

    settings = make_settings(tmp_path_factory.mktemp("metadata"))
    db = dbmod.bind(models.database, settings.database_url("metadata"))
    migrations.sync(db, models.SCHEMA)
    load_seed(FIXTURES / "metadata-seed")
    dbmod.close_quietly(db)
    return metadata_service_app.build_app(settings)


@pytest.fixture(scope="module")
def metadata_url(metadata_app):
    with serve_wsgi(metadata_app) as url:
        yield url


@pytest.fixture(scope="module")
def admin_only_project(metadata_url):
    """Project 1235 with instrument 104 linked to it and no members."""
    link = {"project": "1235", "instrument": 104, "relationship": "ad417f50-5401-446d-8e5f-69892777f9b1"}
    response = requests.put(f"{metadata_url}/project_instrument", json=[link], timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return {"project": "1235", "instrument": 104}


@pytest.fixture(scope="module")
def policy_url(tmp_path_factory, metadata_url):
    settings = make_settings(tmp_path_factory.mktemp("policy"), metadata={"url": metadata_url})
    with serve_wsgi(build_app(settings)) as url:
        yield url


def post(url, path, body=None, data=None):
    return requests.post(f"{url}{path}", json=body, data=data, timeout=TIMEOUT)


def metadata_document(name=None, submitter=10, project="1234a", instrument=54):
    """A fixture document, or good-md.json with the three parties replaced."""
    if name:
        return load_json(FIXTURES / name)
    values = {"Transactions.submitter": submitter, "Transactions.project": project,
              "Transactions.instrument": instrument}
    document = load_json(FIXTURES / "metadata-files" / "good-md.json")
    for entry in document:
        if entry.get("destinationTable") in values:
            entry["value"] = values[entry["destinationTable"]]
    return document


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code
    assert body["status"].startswith(str(status))
    assert "Traceback" not in body["message"]
    return body["message"]


# -- service basics ---------------------------------------------------------------------

def test_health(policy_url):
    response = requests.get(policy_url + "/", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"message": "Policy Up and Running"}


def test_bad_bodies_are_json_errors(policy_url):
    assert_error(post(policy_url, "/ingest", data=b"{not json"), 400, "invalid_json")
    assert_error(post(policy_url, "/ingest", {"destinationTable": "Files"}), 400, "invalid_metadata")
    assert_error(post(policy_url, "/uploader", {"user": 10}), 400, "invalid_query")
    assert requests.get(policy_url + "/ingest", timeout=TIMEOUT).status_code == 405


# -- POST /ingest ------------------------------------------------------------------------

def test_good_metadata_is_allowed(policy_url):
    response = post(policy_url, "/ingest", metadata_document("metadata-files/good-md.json"))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "success"}


def test_policy_ingest_query_fixture_is_allowed(policy_url):
    # Pacifica's own policy query: submitter 10 is a member of 1236é (a closed project,
    # non-ASCII id) and instrument 54 is linked to it. Existence and links are what the
    # contract checks, so it passes; the Files and Transactions._id entries are ignored.
    response = post(policy_url, "/ingest", metadata_document("policy-ingest-query.json"))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "success"}


def test_bad_project_is_denied_and_named(policy_url):
    message = assert_error(post(policy_url, "/ingest", metadata_document("metadata-files/bad-project-md.json")),
                           412, "policy_denied")
    assert "unknown project '12'" in message


@pytest.mark.parametrize("parties, expected", [
    ({"submitter": 999}, "unknown submitter 999"),
    ({"instrument": 999}, "unknown instrument 999"),
    # Beyond what the metadata service's integer column can hold: still just unknown.
    ({"instrument": 10 ** 12}, "unknown instrument 1000000000000"),
    ({"instrument": 104}, "instrument 104 is not linked to project '1234a'"),
    ({"submitter": 11}, "submitter 11 is not a member of project '1234a'"),
    ({"submitter": 999, "project": "nope", "instrument": "x"},
     "unknown submitter 999; unknown project 'nope'; unknown instrument 'x'"),
])
def test_denials_name_what_failed(policy_url, parties, expected):
    message = assert_error(post(policy_url, "/ingest", metadata_document(**parties)), 412, "policy_denied")
    assert expected in message


def test_missing_party_is_denied(policy_url):
    document = [entry for entry in metadata_document()
                if entry.get("destinationTable") != "Transactions.instrument"]
    message = assert_error(post(policy_url, "/ingest", document), 412, "policy_denied")
    assert "missing Transactions.instrument" in message


def test_admin_bypasses_membership(policy_url, admin_only_project):
    # User 10 is in group 0 (is_admin) but not a member of 1235; user 11 is neither.
    response = post(policy_url, "/ingest", metadata_document(**admin_only_project))
    assert response.status_code == 200, response.text
    message = assert_error(post(policy_url, "/ingest", metadata_document(submitter=11, **admin_only_project)),
                           412, "policy_denied")
    assert message.endswith("submitter 11 is not a member of project '1235'")


def test_metadata_service_stopped_is_503(tmp_path, metadata_app):
    port = free_port()
    settings = make_settings(tmp_path, metadata={"url": f"http://127.0.0.1:{port}"},
                             http={"retries": 0, "connect_timeout": 2})
    with serve_wsgi(build_app(settings)) as policy_url:
        # The same metadata application on a server of its own, so stopping it leaves
        # the module's server alone.
        with serve_wsgi(metadata_app, port=port):
            assert post(policy_url, "/ingest", metadata_document()).status_code == 200
        message = assert_error(post(policy_url, "/ingest", metadata_document()), 503, "metadata_unavailable")
        assert "metadata" in message
        assert_error(post(policy_url, "/uploader", {"user": 10, "from": "users"}), 503, "metadata_unavailable")


# -- POST /uploader -----------------------------------------------------------------------

def ask(policy_url, **body):
    response = post(policy_url, "/uploader", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_uploader_user_by_network_id(policy_url):
    rows = ask(policy_url, user="dmlb2001", columns=["last_name", "first_name"],
               where={"network_id": "dmlb2001"}, **{"from": "users"})
    assert rows == [{"last_name": "Brown\u00e9 Jr", "first_name": "David\u00e9"}]


def test_uploader_projects_of_an_instrument(policy_url):
    rows = ask(policy_url, user="dmlb2001", where={"instrument_id": 54}, **{"from": "projects"})
    assert sorted(row["_id"] for row in rows) == ["1234a", "1236\u00e9"]
    assert all("title" in row for row in rows)


def test_uploader_proposals_alias(policy_url):
    rows = ask(policy_url, user=10, columns=["_id"], where={"proposal_id": "1236\u00e9"}, **{"from": "proposals"})
    assert rows == [{"_id": "1236\u00e9"}]


def test_uploader_instruments_of_a_project(policy_url):
    rows = ask(policy_url, user="dmlb2001", where={"project_id": "1234a"}, **{"from": "instruments"})
    assert [row["_id"] for row in rows] == [54]
    assert rows[0]["name_short"] == "Nittany Liquid Prob\u00e9s"


def test_uploader_non_member_sees_nothing(policy_url):
    assert ask(policy_url, user=11, where={"project_id": "1234a"}, **{"from": "instruments"}) == []
    assert ask(policy_url, user="bjohn", **{"from": "projects"}) == []
    assert ask(policy_url, user=11, where={"project_id": "1234a"}, **{"from": "users"}) == []


def test_uploader_unknown_user(policy_url):
    response = post(policy_url, "/uploader", {"user": "nobody", "from": "projects"})
    assert_error(response, 412, "unknown_user")
