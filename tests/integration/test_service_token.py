"""With [auth] service_token set, metadata, archive and policy answer only the other services."""
import pytest
import requests

from common.auth import SERVICE_TOKEN_HEADER
from tests.helpers import Stack, fixture_bundle, seeded

SECRET = "an-internal-secret"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    with seeded(Stack(tmp_path_factory.mktemp("guarded"), auth={"service_token": SECRET})) as stack:
        yield stack


def test_the_suite_still_works_from_the_outside(guarded):
    final = guarded.ingest(fixture_bundle("good-md.json"))
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100")


@pytest.mark.parametrize("service,method,path", [
    ("archive", "PUT", "/424242"), ("archive", "GET", "/1"), ("archive", "DELETE", "/1"),
    ("metadata", "GET", "/users"), ("metadata", "PUT", "/ingest"), ("metadata", "GET", "/getid?range=1&mode=file"),
    ("policy", "POST", "/ingest"), ("policy", "POST", "/uploader"),
])
def test_internal_endpoints_refuse_callers_without_the_token(guarded, service, method, path):
    url = guarded.url(service) + path
    response = requests.request(method, url, data=b"x" * 1000, timeout=10)
    assert response.status_code == 401
    assert response.json()["code"] == "service_token_required"
    response = requests.request(method, url, data=b"{}", timeout=10, headers={SERVICE_TOKEN_HEADER: "wrong"})
    assert response.status_code == 401
    assert requests.get(guarded.url(service) + "/", timeout=10).status_code == 200  # health stays open


def test_the_token_opens_them(guarded):
    response = requests.get(guarded.url("metadata") + "/users", params={"_id": 10}, timeout=10,
                            headers={SERVICE_TOKEN_HEADER: SECRET})
    assert response.status_code == 200 and response.json()[0]["network_id"] == "dmlb2001"
    # The refused PUT above stored nothing.
    response = requests.head(guarded.url("archive") + "/424242", timeout=10, headers={SERVICE_TOKEN_HEADER: SECRET})
    assert response.status_code == 404
