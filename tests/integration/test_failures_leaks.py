"""No answer of any service, and no job's ``exception``, carries a traceback or a server path.

Sweeps the error paths of all five services in both worlds (bad ids, bad JSON, unknown
routes, wrong methods, refused documents, failed jobs): every error is the JSON shape
``{"status", "code", "message"}`` and names neither the data directory, the code's
directory nor a Python file.
"""
from __future__ import annotations

import json

import pytest
import requests

from tests.helpers import FIXTURES, REPO, load_json

JSON = {"Content-Type": "application/json"}

# (service, method, path, body): every one answers an error.
PROBES = [
    # ingest
    ("ingest", "GET", "/nowhere", None),
    ("ingest", "GET", "/ingest", None),
    ("ingest", "DELETE", "/upload", None),
    ("ingest", "PUT", "/get_state/1", None),
    ("ingest", "GET", "/get_state/abc", None),
    ("ingest", "GET", "/get_state?job_id=%00", None),
    ("ingest", "GET", "/get_state/99999999999", None),
    ("ingest", "GET", "/get_state/" + "9" * 40, None),
    ("ingest", "GET", "/get_state", None),
    ("ingest", "POST", "/move", b"{not json"),
    ("ingest", "POST", "/move", b'{"a": 1}'),
    ("ingest", "POST", "/move", b"\xff\xfe"),
    ("ingest", "POST", "/move", json.dumps([{"destinationTable": "Files", "name": "x",
                                             "source": "/etc/passwd"}]).encode()),
    ("ingest", "POST", "/ingest?x=1", None),  # no body: a job that fails at open tar, not an error
    # metadata
    ("metadata", "GET", "/nowhere", None),
    ("metadata", "GET", "/getid?range=abc&mode=file", None),
    ("metadata", "GET", "/getid?range=1&mode=../../etc", None),
    ("metadata", "GET", "/getid?range=-5&mode=file", None),
    ("metadata", "GET", "/users?_id=abc", None),
    ("metadata", "GET", "/users?no_such_field=1", None),
    ("metadata", "GET", "/users?page_number=x", None),
    ("metadata", "GET", "/no_such_table", None),
    ("metadata", "PUT", "/users", b"{not json"),
    ("metadata", "PUT", "/users", b'[{"_id": "not a number"}]'),
    ("metadata", "PUT", "/ingest", b"[]"),
    ("metadata", "PUT", "/ingest", b'[{"destinationTable": "Transactions._id", "value": "x"}]'),
    ("metadata", "POST", "/users?_id=10", b"[1, 2]"),
    ("metadata", "DELETE", "/getid", None),
    # archive
    ("archive", "GET", "/abc", None),
    ("archive", "GET", "/-1", None),
    ("archive", "GET", "/99999999999", None),
    ("archive", "GET", "/" + "9" * 40, None),
    ("archive", "HEAD", "/99999999999", None),
    ("archive", "DELETE", "/99999999999", None),
    ("archive", "POST", "/99999999999", None),
    ("archive", "PUT", "/abc", b"x"),
    ("archive", "PUT", "/99999999990?hashtype=crc32&hashsum=00", b"x"),
    ("archive", "PUT", "/99999999991?hashtype=sha1&hashsum=" + "0" * 40, b"x"),
    ("archive", "PATCH", "/99999999992", b"{not json"),
    ("archive", "PATCH", "/99999999993", json.dumps({"path": "/etc/passwd"}).encode()),
    ("archive", "PATCH", "/99999999994", json.dumps({"path": "relative/x"}).encode()),
    ("archive", "GET", "/a/b/c", None),
    # policy
    ("policy", "GET", "/nowhere", None),
    ("policy", "GET", "/ingest", None),
    ("policy", "POST", "/ingest", b"{not json"),
    ("policy", "POST", "/ingest", b'{"a": 1}'),
    ("policy", "POST", "/ingest", b"[]"),
    ("policy", "POST", "/uploader", b"{}"),
    ("policy", "POST", "/uploader", b'{"user": 10, "from": "../etc/passwd"}'),
    # stats
    ("stats", "GET", "/nowhere", None),
    ("stats", "POST", "/", b"{}"),
]


def forbidden_texts(stack) -> list[str]:
    return [str(stack.data_dir), str(REPO), "site-packages", "Traceback", 'File "', ".py\", line"]


def assert_clean(text: str, stack, what: str) -> None:
    for forbidden in forbidden_texts(stack):
        assert forbidden not in text, f"{what}: {forbidden!r} in {text[:500]!r}"


@pytest.mark.parametrize("service,method,path,body", PROBES,
                         ids=[f"{s}-{m}-{p[:40]}" for s, m, p, _ in PROBES])
def test_error_answers_are_json_without_tracebacks_or_paths(stack, service, method, path, body):
    response = requests.request(method, stack.url(service) + path, data=body, timeout=30,
                                headers=JSON if body is not None else {})
    what = f"{method} {service}{path}"
    assert_clean(response.text, stack, what)
    if (service, method) == ("ingest", "POST") and path.startswith("/ingest"):
        # An empty upload is a job (that fails at open tar): its exception is checked below.
        final = stack.wait_job(response.json()["job_id"])
        assert final["state"] == "FAILED"
        assert_clean(final["exception"], stack, f"job {final['job_id']}")
        return
    assert response.status_code >= 400, what
    if method == "HEAD":
        return
    assert response.headers["Content-Type"].startswith("application/json"), what
    answer = response.json()
    assert set(answer) == {"status", "code", "message"}, what
    assert answer["status"].startswith(str(response.status_code)), what


def test_failed_jobs_tell_no_server_paths(stack):
    """The exception texts of jobs failing at each step, including a /move whose source is gone."""
    exceptions = []
    for raw in (b"", b"not a tar" * 100):
        exceptions.append(stack.ingest(raw)["exception"])
    document = load_json(FIXTURES / "move-md.json")
    for entry in document:
        if entry["destinationTable"] == "Files":
            entry["source"] = str(stack.data_dir / "movable" / "gone.txt")
    response = requests.post(stack.url("ingest") + "/move", json=document, timeout=10)
    assert response.status_code == 200, response.text
    final = stack.wait_job(response.json()["job_id"])
    assert final["exception"].startswith("file_missing: ")
    exceptions.append(final["exception"])
    for text in exceptions:
        assert_clean(text, stack, "job exception")
