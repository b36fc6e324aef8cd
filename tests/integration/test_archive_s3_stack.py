"""The whole suite with the archive on S3 (a real SeaweedFS server): Pacifica's good bundle
ingests and comes back byte for byte, with Range; a bundle with a wrong hash leaves no
object and no open multipart upload behind."""
from __future__ import annotations

import uuid

import pytest
import requests

from tests.helpers import FIXTURES, Stack, fixture_bundle, seeded

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_stack(s3_endpoint, tmp_path_factory):
    bucket = f"labvault-stack-{uuid.uuid4().hex[:8]}"
    stack = Stack(tmp_path_factory.mktemp("s3-stack"),
                  archive={"backend": "s3", "bucket": bucket, "prefix": "archive", "endpoint_url": s3_endpoint.url,
                           "region": s3_endpoint.region, "addressing_style": "path", "create_bucket": "true"})
    stack.environ = s3_endpoint.environ()
    stack.bucket = bucket
    stack.s3 = s3_endpoint.client()
    with seeded(stack) as running:
        yield running


def bucket_contents(stack) -> tuple[list[str], list[str]]:
    """The objects and open uploads of ingested files (stats outputs, which builds after an
    earlier test's ingest may add at any moment, have ids of their own range and are left out)."""
    from stats_service.runs import DERIVED_ID_BASE

    def ingested(key: str) -> bool:
        return int(key.rsplit("/", 1)[1]) < DERIVED_ID_BASE
    objects = stack.s3.list_objects_v2(Bucket=stack.bucket).get("Contents") or []
    uploads = stack.s3.list_multipart_uploads(Bucket=stack.bucket).get("Uploads") or []
    return (sorted(obj["Key"] for obj in objects if ingested(obj["Key"])),
            sorted(upload["Key"] for upload in uploads if ingested(upload["Key"])))


def test_the_good_bundle_lives_on_s3_and_comes_back_byte_for_byte(s3_stack):
    final = s3_stack.ingest(fixture_bundle("good-md.json"))
    assert (final["state"], final["task"], final["complete"]) == ("OK", "ingest metadata", True), final
    files = requests.get(f"{s3_stack.url('metadata')}/files", params={"transaction": final["job_id"]},
                         timeout=10).json()
    payload = {p.name: p.read_bytes() for p in (FIXTURES / "data").rglob("*") if p.is_file()}
    assert len(files) == 3
    objects, uploads = bucket_contents(s3_stack)
    assert uploads == []
    for row in files:
        url = f"{s3_stack.url('archive')}/{row['_id']}"
        expected = payload[row["name"]]
        assert f"archive/{row['_id']}" in objects
        whole = requests.get(url, timeout=30)
        assert whole.content == expected
        assert whole.headers["X-Pacifica-File-Storage-Media"] == "s3"
        assert whole.headers["X-Hash-Sum"] == row["hashsum"]
        if len(expected) > 4:
            part = requests.get(url, headers={"Range": f"bytes=2-{len(expected) - 2}"}, timeout=30)
            assert part.status_code == 206 and part.content == expected[2:-1]
        head = requests.head(url, timeout=30)
        assert head.headers["X-Pacifica-File-Size"] == str(len(expected))


def test_a_wrong_hash_leaves_no_object_and_no_open_upload(s3_stack):
    before = bucket_contents(s3_stack)
    final = s3_stack.ingest(fixture_bundle("bad-hashsum-md.json"))
    assert (final["state"], final["task"]) == ("FAILED", "ingest files")
    assert final["exception"].startswith("hash_mismatch: ")
    assert bucket_contents(s3_stack) == before
    assert before[1] == []


def test_a_computed_file_on_s3_downloads_through_a_presigned_url_that_expires(s3_stack):
    import hashlib
    import time
    from tests.helpers import new_project, payload_bundle, wait_for

    project = new_project(s3_stack, "s3dl")
    final = s3_stack.ingest(payload_bundle({"tables/a.csv": b"x,y\n1,2\n"}, project=project, keys={"sample": "s1"}))
    assert final["state"] == "OK", final
    stats = s3_stack.url("stats")

    def project_zip():
        listed = requests.get(f"{stats}/computed_files", params={"project": project}, timeout=30).json()
        return next((row for row in listed if row["kind"] == "project_zip" and row["sha256"]), None)
    row = wait_for(project_zip, timeout=120, interval=0.3, message=f"the project zip of {project}")
    key = requests.post(f"{stats}/tokens", json={"email": "reader@example.org", "is_activated": True},
                        timeout=30).json()["id"]
    answer = requests.get(f"{stats}/computed_files/{row['id']}", headers={"API-KEY": key}, timeout=30).json()
    url = answer["download_url"]
    # Presigned by S3 itself: the URL names the S3 server and carries a SigV4 signature.
    assert url.startswith(s3_stack.s3.meta.endpoint_url) and "X-Amz-Signature=" in url, url
    body = requests.get(url, timeout=60)
    assert body.status_code == 200 and hashlib.sha256(body.content).hexdigest() == row["sha256"]
    assert body.headers["Content-Type"] == "application/octet-stream"
    assert row["filename"] in body.headers.get("Content-Disposition", "")
    tampered = url.replace("X-Amz-Expires=", "X-Amz-Expires=9")
    assert requests.get(tampered, timeout=30).status_code == 403
    # An URL past its expiry stops working (asked of the archive with one second to live).
    output = requests.get(f"{s3_stack.url('archive')}/presign/{_archive_id_of(s3_stack, url)}",
                          params={"expires": "1"}, timeout=30).json()
    time.sleep(2.5)
    assert requests.get(output["url"], timeout=30).status_code == 403


def _archive_id_of(stack, url: str) -> int:
    """The archive file id in a presigned URL's object key (``<prefix>/<id>``)."""
    path = url.split("?", 1)[0]
    return int(path.rstrip("/").rsplit("/", 1)[1])
