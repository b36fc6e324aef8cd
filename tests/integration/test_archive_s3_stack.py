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
    objects = stack.s3.list_objects_v2(Bucket=stack.bucket).get("Contents") or []
    uploads = stack.s3.list_multipart_uploads(Bucket=stack.bucket).get("Uploads") or []
    return sorted(obj["Key"] for obj in objects), sorted(upload["Key"] for upload in uploads)


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
