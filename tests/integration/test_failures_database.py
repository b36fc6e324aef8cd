"""A service whose PostgreSQL database is down answers 503 ``database_unavailable`` with
``Retry-After``, never 500 (the SQLite lock case is in test_failures_dependencies).

The applications run in-process on a real server, built without the start-up schema
check (which would refuse a database it cannot reach), pointed at a port nobody
listens on, plainly and through a connection pool.
"""
from __future__ import annotations

import pytest
import requests

from archive_service import models as archive_models
from archive_service.app import build_app as build_archive
from common.web import outermost
from ingest_service import models as ingest_models
from ingest_service.app import build_app as build_ingest
from metadata_service import models as metadata_models
from metadata_service.app import build_app as build_metadata
from tests.helpers import free_port, make_settings, serve_wsgi
from tests.servers import need


class NoBroker:
    def send_task(self, name, args, **_options):
        raise AssertionError("nothing may be enqueued without a database")


@pytest.fixture
def proxies():
    """Put the model proxies back as they were: other tests in this process use them."""
    saved = [(module.database, module.database.obj) for module in (archive_models, ingest_models, metadata_models)]
    yield
    for proxy, obj in saved:
        proxy.initialize(obj)


def assert_database_unavailable(response: requests.Response, what: str) -> None:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert response.headers["Content-Type"].startswith("application/json"), what
    assert int(response.headers["Retry-After"]) > 0, what
    body = response.json()
    assert body["code"] == "database_unavailable", f"{what}: {body}"
    # The driver's own message names the server; it goes to the log, not to the client.
    assert "127.0.0.1" not in body["message"] and "Traceback" not in response.text, body


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+pool"])
def test_postgresql_down_is_503_with_retry_after(tmp_path, proxies, scheme):
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        need(False, "psycopg2 is not installed (pip install '.[postgres]')")
    url = f"{scheme}://postgres@127.0.0.1:{free_port()}/labvault_gone"
    settings = make_settings(tmp_path, **{service: {"database": url} for service in ("ingest", "metadata", "archive")})
    probes = {
        "metadata": (build_metadata(settings, check_schema=False),
                     [("GET", "/users?_id=10"), ("GET", "/getid?range=1&mode=file"), ("PUT", "/users")]),
        "archive": (build_archive(settings, check_schema=False), [("GET", "/12"), ("PUT", "/12"), ("DELETE", "/12")]),
        # get_state is answered by a plain WSGI layer in front of CherryPy: served as the
        # servers serve it (common.web.serve and wsgi_application wrap it the same way).
        "ingest": (outermost(build_ingest(settings, check_schema=False, celery_app=NoBroker())),
                   [("GET", "/get_state/1"), ("GET", "/get_state?job_id=1"), ("GET", "/")]),
    }
    for service, (application, requests_) in probes.items():
        with serve_wsgi(application) as base:
            for method, path in requests_:
                body = b"[{}]" if method == "PUT" else None
                response = requests.request(method, base + path, data=body, timeout=30)
                assert_database_unavailable(response, f"{service} {method} {path}")
