"""Resumable uploads (tus 1.0) on the ingest service, protocol by protocol: every status the
core, creation, termination, expiration and checksum extensions define, identity, partial
chunks, one writer at a time, and expiry.

The ingest and metadata applications run in-process on real servers, on SQLite, with a small
bundle limit (no broker: the jobs are only recorded as sent). The last test sends a bundle with
a stock tus client through the whole suite, in both worlds.
"""
import base64
import datetime
import email.utils
import hashlib
import io
import socket
import time

import pytest
import requests

from common import migrations, registry
from common.auth import Identity
from common.db import bind
from ingest_service import models, resumable
from ingest_service.app import build_app
from ingest_service.identity import create_token
from ingest_service.staging import Staging
from tests.helpers import NoBroker, make_settings, payload_bundle, serve_wsgi, wait_for

LIMIT = 2_000_000
TUS = {"Tus-Resumable": "1.0.0"}
PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}


@pytest.fixture(scope="module")
def metadata_url(tmp_path_factory):
    """A metadata service of the module's own (job ids come from it)."""
    settings = make_settings(tmp_path_factory.mktemp("metadata"))
    metadata = registry.get("metadata")
    db, schema = metadata.database(settings)
    with db.connection_context():
        migrations.sync(db, schema)
    with serve_wsgi(metadata.build_app(settings)) as url:
        yield url


def start(settings):
    migrations.sync(bind(models.database, settings.database_url("ingest")), models.SCHEMA)
    broker = NoBroker()
    return broker, serve_wsgi(build_app(settings, celery_app=broker))


@pytest.fixture
def ingest(metadata_url, tmp_path):
    settings = make_settings(tmp_path, ingest={"max_bundle_bytes": LIMIT}, metadata={"url": metadata_url})
    broker, server = start(settings)
    with server as url:
        yield url, Staging(settings.path("ingest", "staging_dir")), broker


def create(url, length, headers=None, metadata="filename YnVuZGxlLnRhcg=="):
    response = requests.post(url + "/uploads/", headers={**TUS, "Upload-Length": str(length),
                                                          "Upload-Metadata": metadata, **(headers or {})}, timeout=10)
    assert response.status_code == 201, response.text
    return url + response.headers["Location"], response


def patch(upload, offset, body, headers=None):
    return requests.patch(upload, data=body, headers={**PATCH, "Upload-Offset": str(offset), **(headers or {})},
                          timeout=30)


def offset_of(upload):
    response = requests.head(upload, headers=TUS, timeout=10)
    assert response.status_code == 200, response.status_code
    return int(response.headers["Upload-Offset"])


def error_of(response, status, code):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Tus-Resumable"] == "1.0.0"
    body = response.json()
    assert body["code"] == code and body["message"] and "Traceback" not in response.text, body


def test_options_advertises_version_extensions_limit_and_checksums(ingest):
    url, _, _ = ingest
    response = requests.options(url + "/uploads/", timeout=10)
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) >= {"creation", "termination", "expiration", "checksum"}
    assert int(response.headers["Tus-Max-Size"]) == LIMIT
    assert set(response.headers["Tus-Checksum-Algorithm"].split(",")) >= {"sha1", "sha256", "md5"}


def test_a_missing_or_other_tus_version_is_412_with_the_version_spoken(ingest):
    url, _, _ = ingest
    for headers in ({}, {"Tus-Resumable": "0.2.2"}):
        response = requests.post(url + "/uploads/", headers={"Upload-Length": "10", **headers}, timeout=10)
        error_of(response, 412, "tus_version_unsupported")
        assert response.headers["Tus-Version"] == "1.0.0"


def test_creation_answers_201_with_location_expiry_and_an_empty_part_file(ingest):
    url, staging, _ = ingest
    upload, response = create(url, 1000)
    upload_id = upload.rsplit("/", 1)[1]
    assert len(upload_id) == 32 and response.headers["Tus-Resumable"] == "1.0.0"
    expires = email.utils.parsedate_to_datetime(response.headers["Upload-Expires"])
    assert expires > datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=23)
    assert response.json()["upload_id"] == upload_id and response.json()["offset"] == 0
    assert staging.upload_part(upload_id).stat().st_size == 0
    head = requests.head(upload, headers=TUS, timeout=10)
    assert (head.status_code, head.headers["Upload-Offset"], head.headers["Upload-Length"]) == (200, "0", "1000")
    assert head.headers["Upload-Metadata"] == "filename YnVuZGxlLnRhcg==" and head.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("headers, status, code", [
    ({"Upload-Length": str(LIMIT + 1)}, 413, "payload_too_large"),
    ({"Upload-Length": str(10 ** 30)}, 400, "invalid_upload_length"),
    ({"Upload-Length": "-1"}, 400, "invalid_upload_length"),
    ({"Upload-Length": "12", "Upload-Metadata": "file n@me"}, 400, "invalid_upload_metadata"),
    ({"Upload-Length": "12", "Upload-Metadata": "name !!notbase64"}, 400, "invalid_upload_metadata"),
    ({"Upload-Defer-Length": "1"}, 400, "invalid_upload_length"),
    ({}, 400, "invalid_upload_length"),
])
def test_creation_refuses_bad_lengths_and_metadata(ingest, headers, status, code):
    url, staging, _ = ingest
    error_of(requests.post(url + "/uploads/", headers={**TUS, **headers}, timeout=10), status, code)
    assert not list(staging.uploads_dir.glob("*")) if staging.uploads_dir.exists() else True


def test_creation_with_a_body_is_refused_unread(ingest):
    url, _, _ = ingest
    response = requests.post(url + "/uploads/", data=b"x" * 100, headers={**TUS, "Upload-Length": "100"}, timeout=10)
    error_of(response, 400, "unexpected_body")


def test_patch_checks_type_offset_length_and_checksum_and_the_offset_stays(ingest):
    url, _, _ = ingest
    upload, _ = create(url, 100)
    error_of(patch(upload, 0, b"a" * 10, {"Content-Type": "application/octet-stream"}), 415, "unsupported_media_type")
    error_of(patch(upload, 5, b"a" * 10), 409, "offset_mismatch")
    error_of(patch(upload, 0, b"a" * 101), 413, "payload_too_large")
    error_of(patch(upload, 0, b"a" * 10, {"Upload-Checksum": "crc32 AAAA"}), 400, "checksum_algorithm_unsupported")
    error_of(patch(upload, 0, b"a" * 10, {"Upload-Checksum": "sha1 bm90IGEgZGlnZXN0"}), 400, "invalid_upload_checksum")
    wrong = base64.b64encode(hashlib.sha1(b"b" * 10).digest()).decode()
    response = patch(upload, 0, b"a" * 10, {"Upload-Checksum": f"sha1 {wrong}"})
    error_of(response, 460, "checksum_mismatch")
    assert response.reason == "Checksum Mismatch"
    error_of(patch(upload, "x", b"a"), 400, "invalid_upload_offset")
    assert offset_of(upload) == 0
    for algorithm in ("sha1", "sha256", "md5"):
        chunk = algorithm.encode() * 4
        digest = base64.b64encode(hashlib.new(algorithm, chunk).digest()).decode()
        before = offset_of(upload)
        response = patch(upload, before, chunk, {"Upload-Checksum": f"{algorithm} {digest}"})
        assert response.status_code == 204, response.text
        assert int(response.headers["Upload-Offset"]) == before + len(chunk) == offset_of(upload)
        assert email.utils.parsedate_to_datetime(response.headers["Upload-Expires"])


def test_the_last_chunk_makes_the_job_as_post_ingest_does(ingest):
    url, staging, broker = ingest
    raw = payload_bundle({"tus/a.bin": b"a" * 70_000, "tus/b.txt": b"hello\n"})
    upload, _ = create(url, len(raw))
    upload_id = upload.rsplit("/", 1)[1]
    first = patch(upload, 0, raw[:50_000])
    assert first.status_code == 204 and "Labvault-Job-Id" not in first.headers
    before = requests.get(upload, timeout=10).json()
    assert (before["offset"], before["length"], before["job_id"]) == (50_000, len(raw), None)
    last = patch(upload, 50_000, raw[50_000:])
    assert last.status_code == 204, last.text
    assert int(last.headers["Upload-Offset"]) == len(raw)
    job_id = int(last.headers["Labvault-Job-Id"])
    assert broker.sent == [("ingest.process_job", [job_id])]
    assert staging.bundle_path(job_id).read_bytes() == raw
    assert not staging.upload_part(upload_id).exists()
    state = requests.get(upload, timeout=10).json()
    assert state == requests.get(f"{url}/get_state/{job_id}", timeout=10).json()
    assert (state["job_id"], state["state"], state["task"]) == (job_id, "OK", "UPLOADING")
    head = requests.head(upload, headers=TUS, timeout=10)
    assert (head.headers["Upload-Offset"], head.headers["Labvault-Job-Id"]) == (str(len(raw)), str(job_id))
    # The last answer lost: asking again with nothing left to send answers the same job, once.
    again = patch(upload, len(raw), b"")
    assert (again.status_code, again.headers["Labvault-Job-Id"]) == (204, str(job_id))
    assert len(broker.sent) == 1


def test_an_empty_upload_is_a_job_at_creation(ingest):
    url, staging, broker = ingest
    upload, response = create(url, 0)
    job_id = int(response.headers["Labvault-Job-Id"])
    assert response.json()["job_id"] == job_id and broker.sent == [("ingest.process_job", [job_id])]
    assert staging.bundle_path(job_id).read_bytes() == b""
    assert requests.get(upload, timeout=10).json()["job_id"] == job_id


def raw_patch(url: str, upload: str, offset: int, declared: int, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    path = upload.removeprefix(url)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                  f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                  f"Content-Length: {declared}\r\n\r\n").encode() + sent)
    return sock


def test_a_chunk_cut_midway_keeps_and_counts_the_bytes_that_arrived(ingest):
    url, staging, _ = ingest
    upload, _ = create(url, 1_000_000)
    sock = raw_patch(url, upload, 0, 600_000, b"c" * 250_000)
    time.sleep(0.2)
    sock.close()
    wait_for(lambda: offset_of(upload) == 250_000, timeout=10, message="the partial chunk to count")
    assert staging.upload_part(upload.rsplit("/", 1)[1]).read_bytes() == b"c" * 250_000
    assert patch(upload, 250_000, b"d" * 10).status_code == 204


def test_a_checksummed_chunk_cut_midway_counts_nothing(ingest):
    url, _, _ = ingest
    upload, _ = create(url, 1000)
    body = b"e" * 600
    host, port = url.removeprefix("http://").split(":")
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"PATCH {upload.removeprefix(url)} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                      f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                      f"Upload-Checksum: sha1 {digest}\r\nContent-Length: 600\r\n\r\n").encode() + body[:300])
        time.sleep(0.2)
    time.sleep(0.5)
    assert offset_of(upload) == 0


def test_a_second_writer_is_refused_while_the_first_writes(ingest):
    url, _, _ = ingest
    upload, _ = create(url, 1_000_000)
    sock = raw_patch(url, upload, 0, 500_000, b"f" * 1000)
    try:
        def locked():
            response = patch(upload, 0, b"g" * 10)
            return [response] if response.status_code == 423 else None  # a 4xx Response is falsy
        response, = wait_for(locked, timeout=30, message="a 423")
        error_of(response, 423, "upload_locked")
        assert response.headers["Retry-After"]
    finally:
        sock.close()
    wait_for(lambda: offset_of(upload) == 1000, timeout=30, message="the first writer's bytes")


def test_termination_removes_the_upload_and_its_bytes(ingest):
    url, staging, _ = ingest
    upload, _ = create(url, 100)
    assert patch(upload, 0, b"h" * 10).status_code == 204
    response = requests.delete(upload, headers=TUS, timeout=10)
    assert response.status_code == 204 and response.headers["Tus-Resumable"] == "1.0.0"
    assert not staging.upload_part(upload.rsplit("/", 1)[1]).exists()
    assert requests.head(upload, headers=TUS, timeout=10).status_code == 404
    error_of(patch(upload, 10, b"i"), 404, "upload_not_found")
    error_of(requests.delete(upload, headers=TUS, timeout=10), 404, "upload_not_found")


@pytest.mark.parametrize("upload_id", ["0" * 32, "nothex", "A" * 32, "x" * 5000])
def test_unknown_or_malformed_ids_are_404(ingest, upload_id):
    url, _, _ = ingest
    error_of(patch(url + "/uploads/" + upload_id, 0, b"x"), 404, "upload_not_found")
    assert requests.get(url + "/uploads/" + upload_id, timeout=10).json()["code"] == "upload_not_found"


def test_an_expired_upload_is_410_and_the_reaper_removes_row_and_bytes(metadata_url, tmp_path):
    settings = make_settings(tmp_path, ingest={"upload_expiry_hours": "0.0003"},  # about a second
                             metadata={"url": metadata_url})
    _, server = start(settings)
    staging = Staging(settings.path("ingest", "staging_dir"))
    with server as url:
        upload, _ = create(url, 100)
        upload_id = upload.rsplit("/", 1)[1]
        assert patch(upload, 0, b"j" * 10).status_code == 204
        wait_for(lambda: requests.head(upload, headers=TUS, timeout=10).status_code == 410, timeout=10,
                 message="the upload to expire")
        error_of(patch(upload, 10, b"k"), 410, "upload_expired")
        with models.database.connection_context():
            assert resumable.expire(staging) == [upload_id]
            assert models.ResumableUpload.get_or_none(models.ResumableUpload.upload_id == upload_id) is None
        assert not staging.upload_part(upload_id).exists()
        assert requests.head(upload, headers=TUS, timeout=10).status_code == 404


def test_in_token_mode_only_the_creator_may_go_on(metadata_url, tmp_path):
    settings = make_settings(tmp_path, auth={"mode": "token"}, metadata={"url": metadata_url})
    _, server = start(settings)
    with models.database.connection_context():
        mine, theirs = create_token(10), create_token(11)
    with server as url:
        error_of(requests.post(url + "/uploads/", headers={**TUS, "Upload-Length": "10"}, timeout=10),
                 401, "unauthorized")
        upload, _ = create(url, 10, {"Authorization": f"Bearer {mine}"})
        other = {"Authorization": f"Bearer {theirs}"}
        error_of(patch(upload, 0, b"l" * 10, other), 404, "upload_not_found")
        assert requests.head(upload, headers={**TUS, **other}, timeout=10).status_code == 404
        error_of(requests.delete(upload, headers={**TUS, **other}, timeout=10), 404, "upload_not_found")
        assert requests.get(upload, headers=other, timeout=10).status_code == 404
        assert offset_of_with(upload, {"Authorization": f"Bearer {mine}"}) == 0
        with models.database.connection_context():
            row = models.ResumableUpload.get_by_id(upload.rsplit("/", 1)[1])
            assert row.owner == 10


def offset_of_with(upload, headers):
    return int(requests.head(upload, headers={**TUS, **headers}, timeout=10).headers["Upload-Offset"])


def test_restart_trusts_only_fsynced_offsets_and_cuts_extra_bytes(tmp_path):
    """A part file longer than the stored offset (bytes written by a PATCH that died before it stored
    its offset) is cut back; one shorter makes the offset go back to what is there."""
    settings = make_settings(tmp_path)
    migrations.sync(bind(models.database, settings.database_url("ingest")), models.SCHEMA)
    staging = Staging(settings.path("ingest", "staging_dir"))
    uploads = resumable.Uploads(settings, service=None, staging=staging)
    with models.database.connection_context():
        row = uploads.create(Identity(None), "100", None)
        models.ResumableUpload.update(offset=40).where(models.ResumableUpload.upload_id == row.upload_id).execute()
        staging.upload_part(row.upload_id).write_bytes(b"m" * 60)
        updated, _ = uploads.append(row.upload_id, Identity(None), resumable.Chunk(40, 5, io.BytesIO(b"nnnnn").read))
        assert updated.offset == 45
        assert staging.upload_part(row.upload_id).read_bytes() == b"m" * 40 + b"n" * 5
        staging.upload_part(row.upload_id).write_bytes(b"m" * 30)
        assert uploads.offset(models.ResumableUpload.get_by_id(row.upload_id)) == 30
        error = pytest.raises(Exception, uploads.append, row.upload_id, Identity(None),
                              resumable.Chunk(45, 1, io.BytesIO(b"o").read))
        assert error.value.code == "offset_mismatch"
        updated, _ = uploads.append(row.upload_id, Identity(None), resumable.Chunk(30, 2, io.BytesIO(b"pp").read))
        assert updated.offset == 32


def test_a_stock_tus_client_uploads_a_bundle_that_becomes_a_job(stack, tmp_path):
    """Through the suite's own servers in both worlds (CherryPy's, and uWSGI with PostgreSQL)."""
    from tusclient import client as tus
    payload = {"tuspy/a.bin": bytes(range(256)) * 3000, "tuspy/b.txt": b"resumable\n"}
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(payload_bundle(payload))
    uploader = tus.TusClient(stack.url("ingest") + "/uploads/").uploader(
        str(bundle), chunk_size=200_000, upload_checksum=True, metadata={"filename": "bundle.tar"})
    uploader.upload()
    job_id = int(uploader.request.response_headers["labvault-job-id"])
    final = stack.wait_job(job_id)
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100"), final
    assert requests.get(uploader.url, timeout=10).json()["job_id"] == job_id
    rows = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10).json()
    assert {f"{row['subdir']}/{row['name']}": requests.get(f"{stack.url('archive')}/{row['_id']}", timeout=30).content
            for row in rows} == payload


def test_the_command_line_client_sends_in_chunks_and_forgets_the_finished_upload(ingest, tmp_path):
    from common.clients import make_session
    from common.errors import LabvaultError
    from common.tus import ResumableUpload
    url, staging, broker = ingest
    raw = payload_bundle({"client/a.bin": b"r" * 300_000})
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(raw)
    offsets, sent = [], []
    upload = ResumableUpload(url, bundle, session=make_session(), headers={}, timeout=(5, 30), chunk_size=65_536,
                             state_dir=tmp_path / "state", on_offset=offsets.append, on_sent=sent.append)
    job_id = upload.run()
    assert broker.sent == [("ingest.process_job", [job_id])]
    assert staging.bundle_path(job_id).read_bytes() == raw
    assert offsets == [0] and sum(sent) == len(raw)
    assert not list((tmp_path / "state").glob("*.json"))
    big = tmp_path / "big.tar"
    with open(big, "wb") as handle:
        handle.truncate(LIMIT + 1)
    with pytest.raises(LabvaultError) as refused:
        ResumableUpload(url, big, session=make_session(), headers={}, timeout=(5, 30), chunk_size=65_536).run()
    assert (refused.value.status, refused.value.code) == (413, "payload_too_large")
