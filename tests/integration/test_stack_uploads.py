"""Uploads through the suite's own HTTP servers, in both worlds.

CherryPy's server (``labvault up``) and uWSGI (production) hand request bodies to the
application differently (uWSGI gives a chunked body only to its own API), so the
upload paths run against each.
"""
import os
import socket

import requests

from common.web import ChunkedReader, UwsgiChunkedInput
from tests.helpers import payload_bundle, wait_for


def chunk_source(*chunks: bytes):
    pieces = iter(chunks + (b"",))
    return lambda: next(pieces)


def test_chunked_reader_reads_across_chunk_boundaries():
    reader = ChunkedReader(chunk_source(b"ab", b"cde\nf", b"g\nh"))
    assert reader.read(3) == b"abc"
    assert reader.readline() == b"de\n"
    assert reader.read(0) == b""
    assert list(reader) == [b"fg\n", b"h"]
    assert reader.read(10) == b"" and reader.read() == b""


def test_uwsgi_middleware_gives_only_chunked_bodies_to_the_reader():
    seen = []
    app = UwsgiChunkedInput(lambda environ, start: seen.append(environ["wsgi.input"].read()) or [],
                            chunk_source(b"x" * 5, b"y"))
    app({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": None}, None)
    plain = type("Body", (), {"read": lambda self, size=-1: b"plain"})()
    app({"CONTENT_LENGTH": "5", "wsgi.input": plain}, None)
    assert seen == [b"xxxxxy", b"plain"]


def archived_bytes(stack, job_id: int) -> dict[str, bytes]:
    rows = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10).json()
    return {f"{row['subdir']}/{row['name']}": requests.get(f"{stack.url('archive')}/{row['_id']}", timeout=30).content
            for row in rows}


def test_chunked_upload_is_staged_whole_and_ingested(stack):
    payload = {"chunked/a.bin": os.urandom(700_000), "chunked/b.txt": b"hello\n"}
    raw = payload_bundle(payload)
    # A generator body: requests sends it with Transfer-Encoding: chunked.
    pieces = (raw[start:start + 65536] for start in range(0, len(raw), 65536))
    response = requests.post(stack.url("ingest") + "/ingest", data=pieces, timeout=60,
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    final = stack.wait_job(response.json()["job_id"])
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100"), final
    assert archived_bytes(stack, final["job_id"]) == payload


def test_streamed_file_upload_with_content_length_is_ingested(stack, tmp_path):
    payload = {"streamed/c.bin": os.urandom(3 * 1024 * 1024 + 11)}
    path = tmp_path / "bundle.tar"
    path.write_bytes(payload_bundle(payload))
    with open(path, "rb") as body:
        response = requests.post(stack.url("ingest") + "/upload", data=body, timeout=60,
                                 headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    final = stack.wait_job(response.json()["job_id"])
    assert (final["state"], final["task"]) == ("OK", "ingest metadata"), final
    assert archived_bytes(stack, final["job_id"]) == payload


def test_an_upload_cut_short_fails_its_job_and_leaves_nothing_staged(stack):
    # The job id the upload will get: the one after the id reserved here.
    next_id = requests.get(f"{stack.url('metadata')}/getid", params={"range": 1, "mode": "upload_job"},
                           timeout=10).json()["startIndex"] + 1
    host, port = stack.url("ingest").removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 900000\r\n\r\n" + b"y" * 10_000)
        # Let the service create the job and start reading before the client goes away.
        wait_for(lambda: stack.state(next_id).get("job_id") == next_id, timeout=30,
                 message="the upload's job to exist")
    final = stack.wait_job(next_id, timeout=60)
    assert (final["state"], final["task"]) == ("FAILED", "UPLOADING")
    assert final["exception"].startswith("upload_interrupted: ")
    staging = stack.settings.path("ingest", "staging_dir")
    assert not list(staging.glob(f"{next_id}.*"))
