"""``POST /batch`` over real HTTP on each backend (POSIX and a real S3 server): many files in one
request, each verified before it is visible and write-once, the first failure as a JSON 4xx
with the per-file list, and nothing visible of a member that did not arrive whole."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from archive_service import models
from archive_service.app import build_app
from common import db as common_db
from common import migrations
from common.clients import ArchiveClient, batch_header
from tests.helpers import serve_wsgi, wait_for
from tests.integration.test_archive_backends import backend_settings, leftovers, name_of, rows

MIB = 1024 * 1024

MEMBERS = {n: os.urandom(n * 1000 + 7) for n in range(1, 7)}


@pytest.fixture(params=["posix", pytest.param("s3", marks=pytest.mark.s3)])
def settings(request, tmp_path):
    return backend_settings(request, tmp_path, sync_batch="2")  # several group commits in one small batch


@pytest.fixture
def app(settings):
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    return build_app(settings)


@pytest.fixture
def base_url(app):
    with serve_wsgi(app) as url:
        yield url


@pytest.fixture
def storage(app):
    return app.root.archive.storage


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def frame(file_id, data, hashsum=None, size=None):
    return batch_header(file_id, len(data) if size is None else size, "sha1",
                        sha1(data) if hashsum is None else hashsum, 1_700_000_000) + data


def body_of(members):
    return b"".join(frame(n, data) for n, data in members.items())


def post(url, body, **headers):
    return requests.post(url + "/batch", data=body, timeout=60,
                         headers={"Content-Type": "application/octet-stream", **headers})


def stored_names(backend, ids):
    return sorted(name_of(backend, n) for n in ids)


def test_a_batch_stores_every_file_and_again_changes_nothing(settings, base_url, storage):
    client = ArchiveClient(settings, base_url=base_url)
    answer = client.put_batch(lambda: body_of(MEMBERS))
    assert [(e["id"], e["status"], e["total_bytes"]) for e in answer] == \
        [(n, 201, len(data)) for n, data in MEMBERS.items()]
    for n, data in MEMBERS.items():
        response = requests.get(f"{base_url}/{n}", timeout=30)
        assert response.content == data and response.headers["X-Hash-Sum"] == sha1(data)
    assert rows() == list(MEMBERS)
    assert leftovers(storage) == stored_names(storage, MEMBERS)
    again = client.put_batch(lambda: body_of(MEMBERS))
    assert [e["status"] for e in again] == [200] * len(MEMBERS)


def test_a_hash_mismatch_is_a_json_400_naming_the_file_and_nothing_of_it_stays(base_url, storage):
    body = frame(1, b"first") + frame(2, b"second", hashsum=sha1(b"other")) + frame(3, b"third")
    response = post(base_url, body)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == "hash_mismatch" and answer["status"].startswith("400")
    assert [(e["id"], e["status"]) for e in answer["files"]] == [(1, 201), (2, 400)]
    assert rows() == [1]
    assert leftovers(storage) == stored_names(storage, [1])


def test_the_same_id_with_other_bytes_is_a_409_and_the_stored_file_is_unchanged(base_url, storage):
    assert post(base_url, frame(5, b"original")).status_code == 200
    response = post(base_url, frame(5, b"replacement") + frame(6, b"six"))
    assert response.status_code == 409 and response.json()["code"] == "file_exists"
    assert [(e["id"], e["status"]) for e in response.json()["files"]] == [(5, 409), (6, 201)]
    assert requests.get(f"{base_url}/5", timeout=30).content == b"original"
    assert rows() == [5, 6]


@pytest.mark.parametrize("body, code", [
    (frame(1, b"abc", size=50), "incomplete_body"),              # says 50 bytes, the body has 3
    (b"{" * 100000, "invalid_request"),                         # no header line at all
    (b'{"id": 99999999999999999999999, "size": 1}\nx', "invalid_file_id"),
    (b'{"id": 1, "size": 3, "hashtype": "sha1", "hashsum": "ab"}\nabc', "hash_mismatch"),
])
def test_lying_lengths_and_bad_headers_are_a_clear_400_and_leave_nothing(base_url, storage, body, code):
    response = post(base_url, body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert "Traceback" not in response.text and "/" not in response.json()["message"]
    assert rows() == [] and leftovers(storage) == []


def test_a_length_shorter_than_the_bytes_stores_that_many_and_refuses_the_rest(base_url, storage):
    body = batch_header(1, 3, "sha1", sha1(b"abc")) + b"abcdef"
    response = post(base_url, body)
    assert response.status_code == 400 and response.json()["code"] == "incomplete_body", response.text
    assert [(e["id"], e["status"]) for e in response.json()["files"]] == [(1, 201), (None, 400)]
    assert rows() == [1] and leftovers(storage) == stored_names(storage, [1])


def raw_request(url, head: bytes, body: bytes = b"", wait: float = 0.0) -> bytes:
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(head + body)
        if wait:
            time.sleep(wait)
            return b""
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_batch_needs_a_length(base_url):
    answer = raw_request(base_url, b"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                                   b"Connection: close\r\n\r\n", frame(1, b"abc"))
    assert answer.startswith(b"HTTP/1.1 411"), answer[:200]
    assert b'"code": "length_required"' in answer or b'"code":"length_required"' in answer


def test_a_client_that_dies_mid_batch_leaves_only_whole_files(base_url, storage):
    """The connection ends inside the third member: the first two are stored (whole and
    verified), nothing of the third is visible, no temporary file or open upload stays."""
    body = frame(1, MEMBERS[1]) + frame(2, MEMBERS[2]) + frame(3, MEMBERS[6])
    cut = len(body) - 3000
    raw_request(base_url, f"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode(), body[:cut], wait=0.3)
    # The two whole members are published once the server finds the body cut short.
    wait_for(lambda: rows() == [1, 2], timeout=30, message="the whole members to be stored")
    wait_for(lambda: leftovers(storage) == stored_names(storage, [1, 2]), timeout=30,
             message="nothing but the two whole members")
    assert requests.get(f"{base_url}/2", timeout=30).content == MEMBERS[2]
    assert requests.get(f"{base_url}/3", timeout=30).status_code == 404


def test_the_backends_threads_end_with_the_server_and_come_back_for_the_next_write(settings, base_url, storage):
    """CherryPy waits for every thread before its process exits: an idle pool would hold a stop up."""
    import threading
    def pool_threads():
        return {t for t in threading.enumerate() if t.name.startswith(("archive-sync", "s3-part"))}
    others = pool_threads()  # earlier tests' servers, never stopped
    client = ArchiveClient(settings, base_url=base_url)
    client.put_batch(lambda: body_of(MEMBERS))  # POSIX: the group's fsyncs run in a pool
    storage.shutdown()  # what the server's stop does (cherrypy.engine "stop")
    assert pool_threads() - others == set()
    again = {n + 100: data for n, data in MEMBERS.items()}
    assert len(client.put_batch(lambda: body_of(again))) == len(again)
