"""The shared HTTP plumbing against real servers: one JSON error shape, retries, error codes."""
import threading

import pytest
import requests

from common.clients import ArchiveClient, MetadataClient, ServiceClient
from common.errors import BadRequest, LabvaultError, ServiceUnavailable
from common.web import HealthMixin, json_body, make_application, read_json
from tests.helpers import free_port, make_settings, serve_wsgi


class Flaky(HealthMixin):
    """Fails its first ``failures`` POSTs with 503, then echoes."""

    exposed = True
    service_title = "Flaky"

    def __init__(self, failures):
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def POST(self):  # noqa: N802
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.failures
        body = read_json()
        if failing:
            raise ServiceUnavailable("try later", code="busy")
        if body == "bad":
            raise BadRequest("that is bad", code="bad_thing")
        if body == "crash":
            raise RuntimeError("secret /srv/path in a message")
        return json_body({"echo": body})


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, http={"retries": "2", "backoff": "0.01", "read_timeout": "5"})


def client_for(settings, url):
    client = ServiceClient(settings, base_url=url)
    client.service = "flaky"
    return client


def test_5xx_is_retried_then_succeeds(settings):
    root = Flaky(failures=2)
    with serve_wsgi(make_application(root)) as url:
        assert client_for(settings, url).request("POST", "/", json="hi").json() == {"echo": "hi"}
    assert root.calls == 3


def test_retries_run_out_as_service_unavailable(settings):
    root = Flaky(failures=10)
    with serve_wsgi(make_application(root)) as url, pytest.raises(ServiceUnavailable) as caught:
        client_for(settings, url).request("POST", "/", json="hi")
    assert caught.value.code == "flaky_unavailable" and root.calls == 3
    assert "try later" in caught.value.message


def test_4xx_carries_the_service_code_and_is_not_retried(settings):
    root = Flaky(failures=0)
    with serve_wsgi(make_application(root)) as url, pytest.raises(LabvaultError) as caught:
        client_for(settings, url).request("POST", "/", json="bad")
    assert (caught.value.status, caught.value.code, caught.value.message) == (400, "bad_thing", "that is bad")
    assert root.calls == 1


def test_unexpected_errors_never_show_a_traceback_or_a_path(settings):
    with serve_wsgi(make_application(Flaky(failures=0))) as url:
        response = requests.post(url, json="crash", timeout=5)
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "Traceback" not in response.text and "/srv/path" not in response.text


def test_unreachable_service_is_unavailable_with_its_own_code(settings):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable) as caught:
        MetadataClient(settings, base_url=url).getid("file")
    assert caught.value.code == "metadata_unavailable"
    with pytest.raises(ServiceUnavailable) as caught:
        ArchiveClient(settings, base_url=url).delete(1)
    assert caught.value.code == "archive_unavailable"


def test_cherrypy_own_errors_are_json(settings):
    with serve_wsgi(make_application(Flaky(failures=0))) as url:
        for method, path, status, code in (("GET", "/missing", 404, "not_found"),
                                           ("PUT", "/", 405, "method_not_allowed")):
            response = requests.request(method, url + path, timeout=5)
            assert response.status_code == status
            assert response.headers["Content-Type"] == "application/json"
            assert response.json()["code"] == code
