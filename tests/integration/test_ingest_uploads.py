"""The upload endpoint on its own: size limits, interrupted bodies, chunked bodies, no leftovers.

The ingest application runs in-process on a real server with a small bundle limit; job
ids come from the session stack's metadata service.
"""
import socket

import pytest
import requests

from common import migrations
from common.db import bind
from ingest_service import models
from ingest_service.app import build_app
from tests.helpers import NoBroker, make_settings, serve_wsgi, wait_for

LIMIT = 100_000


@pytest.fixture
def ingest(stack, tmp_path):
    settings = make_settings(tmp_path, ingest={"max_bundle_bytes": LIMIT}, metadata={"url": stack.url("metadata")})
    migrations.sync(bind(models.database, settings.database_url("ingest")), models.SCHEMA)
    broker = NoBroker()
    with serve_wsgi(build_app(settings, celery_app=broker)) as url:
        yield url, settings.path("ingest", "staging_dir"), broker


def raw_request(url: str, head: bytes, body: bytes = b"", close_early: bool = False) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        if close_early:
            return b""
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_declared_length_over_the_limit_is_413_before_reading(ingest):
    url, staging, broker = ingest
    head = (f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {50 * 1024 ** 3}\r\n\r\n").encode()
    answer = raw_request(url, head)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"code": "payload_too_large"' in answer
    assert not list(staging.glob("*")) if staging.exists() else True
    assert broker.sent == []


def test_chunked_body_over_the_limit_is_413_and_removed(ingest):
    url, staging, broker = ingest

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    response = requests.post(url + "/ingest", data=chunks(), timeout=30)
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert list(staging.glob("*")) == []
    assert broker.sent == []


def test_chunked_body_within_the_limit_is_accepted(ingest):
    url, staging, broker = ingest
    response = requests.post(url + "/upload", data=iter([b"a" * 1000, b"b" * 1000]), timeout=30)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert (staging / f"{job_id}.tar").stat().st_size == 2000
    assert broker.sent == [("ingest.process_job", [job_id])]


def test_interrupted_upload_fails_the_job_and_leaves_nothing(ingest):
    url, staging, broker = ingest
    head = (b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 90000\r\n\r\n")
    raw_request(url, head, b"y" * 1000, close_early=True)

    def failed_job():
        with models.database.connection_context():
            job = models.Job.select().order_by(models.Job.job_id.desc()).first()
            return job if job and job.state == "FAILED" else None
    job = wait_for(failed_job, timeout=30, message="the interrupted upload to be recorded")
    assert job.task == "UPLOADING" and job.exception.startswith("upload_interrupted: ")
    assert list(staging.glob("*")) == []
    assert broker.sent == []
