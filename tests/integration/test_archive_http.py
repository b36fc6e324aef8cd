"""The archive service over real HTTP: every endpoint, Range, chunked bodies, the typed client."""
from __future__ import annotations

import email.utils
import hashlib
import os
import socket

import pytest
import requests

from archive_service import models
from archive_service.app import build_app
from common import db as common_db
from common import migrations
from common.clients import ArchiveClient
from common.errors import LabvaultError, SchemaMismatch
from tests.helpers import make_settings, serve_wsgi

DATA = os.urandom(64 * 1024) + b"end"


def sha1(data):
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def sources(tmp_path):
    path = tmp_path / "sources"
    path.mkdir()
    return path


@pytest.fixture
def settings(tmp_path, sources):
    return make_settings(tmp_path, archive={"patch_roots": f"{sources}, {tmp_path / 'elsewhere'}"},
                         http={"retries": 0})


@pytest.fixture
def base_url(settings):
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    with serve_wsgi(build_app(settings)) as url:
        yield url


@pytest.fixture
def client(settings, base_url):
    return ArchiveClient(settings, base_url=base_url)


@pytest.fixture
def root(settings):
    return settings.path("archive", "root")


def leftovers(root):
    """Every file under the archive root (temp files included) and every row."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    # The proxy is bound to the served application's database; use it as it is.
    with models.database.connection_context():
        rows = [row.file_id for row in models.ArchiveFile.select()]
    return files, rows


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code and body["status"].startswith(str(status))
    assert "Traceback" not in response.text


def test_health(base_url):
    response = requests.get(base_url + "/", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"message": "Archive Up and Running"}


def test_refuses_to_build_without_a_schema(tmp_path):
    with pytest.raises(SchemaMismatch):
        build_app(make_settings(tmp_path / "fresh"))


def test_put_get_round_trip_and_write_once(base_url, root):
    url = f"{base_url}/17"
    response = requests.put(url, data=DATA, params={"hashtype": "sha1", "hashsum": sha1(DATA)}, timeout=10)
    assert response.status_code == 201
    assert response.json() == {"message": "File added to archive", "total_bytes": len(DATA)}

    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == DATA
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(DATA))

    again = requests.put(url, data=DATA, timeout=10)
    assert again.status_code == 200
    assert again.json() == {"message": "File already in archive", "total_bytes": len(DATA)}

    assert_error(requests.put(url, data=DATA + b"!", timeout=10), 409, "file_exists")
    assert requests.get(url, timeout=10).content == DATA
    assert leftovers(root) == (["11/17"], [17])


def test_hash_mismatch_leaves_nothing(base_url, root):
    response = requests.put(f"{base_url}/18", data=DATA,
                            headers={"X-Hash-Type": "sha256", "X-Hash-Sum": "0" * 64}, timeout=10)
    assert_error(response, 400, "hash_mismatch")
    assert "0" * 64 in response.json()["message"]
    assert hashlib.sha256(DATA).hexdigest() in response.json()["message"]
    assert leftovers(root) == ([], [])
    assert_error(requests.get(f"{base_url}/18", timeout=10), 404, "file_not_found")


def test_hash_headers_are_used(base_url):
    digest = hashlib.sha256(DATA).hexdigest()
    response = requests.put(f"{base_url}/19", data=DATA,
                            headers={"X-Hash-Type": "sha256", "X-Hash-Sum": digest}, timeout=10)
    assert response.status_code == 201
    head = requests.head(f"{base_url}/19", timeout=10)
    assert head.headers["X-Hash-Type"] == "sha256" and head.headers["X-Hash-Sum"] == digest


def test_bad_hash_arguments(base_url, root):
    assert_error(requests.put(f"{base_url}/20?hashtype=crc32&hashsum=ab", data=DATA, timeout=10),
                 400, "unsupported_hashtype")
    assert_error(requests.put(f"{base_url}/20?hashtype=sha1&hashsum=zz", data=DATA, timeout=10),
                 400, "invalid_hashsum")
    # The connection stays usable after a refused body (it was drained).
    with requests.Session() as session:
        assert_error(session.put(f"{base_url}/20?hashtype=crc32&hashsum=ab", data=DATA, timeout=10),
                     400, "unsupported_hashtype")
        assert session.put(f"{base_url}/20", data=b"ok", timeout=10).status_code == 201
    assert leftovers(root) == (["14/20"], [20])


def test_multi_mib_put_round_trips(base_url):
    payload = os.urandom(3 * 1024 * 1024 + 7) * 2
    response = requests.put(f"{base_url}/21", data=payload, timeout=30)
    assert response.json()["total_bytes"] == len(payload)
    fetched = requests.get(f"{base_url}/21", timeout=30)
    assert hashlib.sha1(fetched.content).hexdigest() == hashlib.sha1(payload).hexdigest()


def test_chunked_put(base_url):
    pieces = [os.urandom(100_000) for _ in range(25)]
    payload = b"".join(pieces)
    response = requests.put(f"{base_url}/22", data=iter(pieces), params={"hashsum": sha1(payload)},
                            timeout=30)
    assert response.status_code == 201, response.text
    assert response.json()["total_bytes"] == len(payload)
    assert requests.get(f"{base_url}/22", timeout=30).content == payload


def test_form_encoded_body_is_stored_raw(base_url):
    body = b"a=1&b=2&c=%20"
    response = requests.put(f"{base_url}/23", data=body,
                            headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert response.status_code == 201
    assert requests.get(f"{base_url}/23", timeout=10).content == body


def test_empty_file(base_url):
    response = requests.put(f"{base_url}/24", data=b"", timeout=10)
    assert response.status_code == 201 and response.json()["total_bytes"] == 0
    assert requests.get(f"{base_url}/24", timeout=10).content == b""


def raw_request(base_url, head: bytes, body: bytes = b"") -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_truncated_body_leaves_nothing(base_url, root):
    answer = raw_request(base_url, b"PUT /25 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", b"x" * 400)
    assert answer.startswith(b"HTTP/1.1 400") and b"incomplete_body" in answer
    assert leftovers(root) == ([], [])


def test_put_without_a_length_is_refused(base_url, root):
    answer = raw_request(base_url, b"PUT /26 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411") and b"length_required" in answer
    assert leftovers(root) == ([], [])


def test_range_requests(base_url):
    requests.put(f"{base_url}/27", data=DATA, timeout=10)
    response = requests.get(f"{base_url}/27", headers={"Range": "bytes=10-19"}, timeout=10)
    assert response.status_code == 206 and response.content == DATA[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
    response = requests.get(f"{base_url}/27", headers={"Range": "bytes=-3"}, timeout=10)
    assert response.status_code == 206 and response.content == b"end"
    response = requests.get(f"{base_url}/27", headers={"Range": f"bytes={len(DATA) + 5}-"}, timeout=10)
    assert response.status_code == 416
    # The code is derived from the status phrase, which Python 3.13 shortened.
    assert response.json()["code"].endswith("range_not_satisfiable")


def test_head(base_url):
    mtime = 1_650_000_000
    requests.put(f"{base_url}/28", data=DATA, timeout=10,
                 headers={"Last-Modified": email.utils.formatdate(mtime, usegmt=True)})
    response = requests.head(f"{base_url}/28", timeout=10)
    assert response.status_code == 200 and response.content == b""
    headers = response.headers
    assert headers["Content-Length"] == headers["X-Pacifica-File-Size"] == str(len(DATA))
    assert headers["X-Pacifica-Mtime"] == str(mtime)
    assert headers["Last-Modified"] == email.utils.formatdate(mtime, usegmt=True)
    assert int(headers["X-Pacifica-Ctime"]) > mtime
    assert headers["X-Pacifica-File-Storage-Media"] == "disk"
    assert headers["X-Pacifica-Messsage"] == "File was found"
    assert headers["X-Hash-Type"] == "sha1" and headers["X-Hash-Sum"] == sha1(DATA)
    assert requests.head(f"{base_url}/29", timeout=10).status_code == 404
    # Epoch seconds are taken as well.
    requests.put(f"{base_url}/30", data=b"x", headers={"Last-Modified": "1234567890"}, timeout=10)
    assert requests.head(f"{base_url}/30", timeout=10).headers["X-Pacifica-Mtime"] == "1234567890"
    assert_error(requests.put(f"{base_url}/31", data=b"x", headers={"Last-Modified": "yesterday"},
                              timeout=10), 400, "invalid_mtime")


def test_delete(base_url, root):
    requests.put(f"{base_url}/32", data=DATA, timeout=10)
    response = requests.delete(f"{base_url}/32", timeout=10)
    assert response.status_code == 200 and response.json() == {"message": "File removed"}
    assert_error(requests.delete(f"{base_url}/32", timeout=10), 404, "file_not_found")
    assert leftovers(root) == ([], [])


def test_stage(base_url):
    requests.put(f"{base_url}/33", data=DATA, timeout=10)
    response = requests.post(f"{base_url}/33", timeout=10)
    assert response.status_code == 200 and response.json() == {"message": "File was staged"}
    assert_error(requests.post(f"{base_url}/34", timeout=10), 404, "file_not_found")


def test_patch(base_url, sources, tmp_path, root):
    source = sources / "in.bin"
    source.write_bytes(DATA)
    response = requests.patch(f"{base_url}/35", json={"path": str(source), "hashtype": "sha1",
                                                      "hashsum": sha1(DATA)}, timeout=10)
    assert response.status_code == 201
    assert response.json() == {"message": "File moved into archive", "total_bytes": len(DATA)}
    assert source.read_bytes() == DATA
    assert requests.get(f"{base_url}/35", timeout=10).content == DATA
    again = requests.patch(f"{base_url}/35", json={"path": str(source)}, timeout=10)
    assert again.status_code == 200 and again.json()["message"] == "File moved into archive"

    outside = tmp_path / "outside.bin"
    outside.write_bytes(DATA)
    assert_error(requests.patch(f"{base_url}/36", json={"path": str(outside)}, timeout=10),
                 403, "path_not_allowed")
    assert_error(requests.patch(f"{base_url}/36", json={"path": str(sources / "nope")}, timeout=10),
                 404, "source_not_found")
    assert_error(requests.patch(f"{base_url}/36", json={"path": str(source), "hashsum": "0" * 40},
                                timeout=10), 400, "hash_mismatch")
    assert_error(requests.patch(f"{base_url}/36", json={"nopath": 1}, timeout=10), 400, "invalid_request")
    assert_error(requests.patch(f"{base_url}/36", data=b"{", timeout=10), 400, "invalid_json")
    assert leftovers(root) == (["23/35"], [35])


@pytest.mark.parametrize("file_id", ["abc", "-1", "1.5", str(2 ** 64)])
def test_invalid_file_ids(base_url, file_id):
    url = f"{base_url}/{file_id}"
    for response in (requests.get(url, timeout=10), requests.put(url, data=b"x", timeout=10),
                     requests.delete(url, timeout=10), requests.post(url, timeout=10),
                     requests.patch(url, json={"path": "/x"}, timeout=10)):
        assert_error(response, 400, "invalid_file_id")
    assert requests.head(url, timeout=10).status_code == 400


def test_put_without_an_id(base_url):
    assert_error(requests.put(f"{base_url}/", data=b"x", timeout=10), 400, "invalid_file_id")


def test_through_the_archive_client(client):
    digest = sha1(DATA)
    answer = client.put(40, lambda: iter([DATA[:1000], DATA[1000:]]), "sha1", digest)
    assert answer == {"message": "File added to archive", "total_bytes": len(DATA)}
    assert client.put(40, lambda: DATA, "sha1", digest)["message"] == "File already in archive"
    with pytest.raises(LabvaultError) as excinfo:
        client.put(41, lambda: DATA, "sha1", "0" * 40)
    assert (excinfo.value.status, excinfo.value.code) == (400, "hash_mismatch")
    with pytest.raises(LabvaultError) as excinfo:
        client.put(40, lambda: b"other", None, None)
    assert (excinfo.value.status, excinfo.value.code) == (409, "file_exists")

    headers = client.head(40)
    assert headers["X-Hash-Sum"] == digest and headers["X-Pacifica-File-Size"] == str(len(DATA))
    assert client.head(41) is None
    with client.get(40) as response:
        assert b"".join(response.iter_content(8192)) == DATA
    assert client.delete(40) is True
    assert client.delete(40) is False
    assert client.health() == {"message": "Archive Up and Running"}


def test_patch_through_the_archive_client(client, sources):
    source = sources / "c.bin"
    source.write_bytes(DATA)
    assert client.patch(42, str(source), "sha1", sha1(DATA))["total_bytes"] == len(DATA)
    with pytest.raises(LabvaultError) as excinfo:
        client.patch(43, "/etc/passwd")
    assert (excinfo.value.status, excinfo.value.code) == (403, "path_not_allowed")


def test_presign_on_posix_is_refused_with_a_code_and_checks_its_arguments(base_url, client):
    assert requests.put(f"{base_url}/31", data=b"bytes", timeout=10).status_code == 201
    assert_error(requests.get(f"{base_url}/presign/31", timeout=10), 404, "presign_unsupported")
    assert client.presigned_url(31, 60) is None
    assert_error(requests.get(f"{base_url}/presign/32", timeout=10), 404, "file_not_found")
    assert_error(requests.get(f"{base_url}/presign/31", params={"expires": "0"}, timeout=10), 400, "invalid_expires")
    assert_error(requests.get(f"{base_url}/presign/31", params={"expires": str(10**30)}, timeout=10), 400,
                 "invalid_expires")
    assert_error(requests.get(f"{base_url}/presign/31", params={"filename": "x" * 300}, timeout=10), 400,
                 "invalid_filename")
    assert requests.get(f"{base_url}/presign/x/y", timeout=10).status_code == 404
