"""Idempotent uploads: the same bundle under the same Idempotency-Key makes one job and one
transaction; another bundle under that key is 409; two uploads racing with one key make one job;
``Labvault-Dedupe: digest`` makes the bundle's digest the key; a malformed key is a fast 400."""
from __future__ import annotations

import concurrent.futures
import json
import os
import uuid

import requests

from tests.helpers import payload_bundle


def post(stack, raw: bytes, path: str = "/ingest", **headers) -> requests.Response:
    return requests.post(stack.url("ingest") + path, data=raw,
                         headers={"Content-Type": "application/octet-stream", **headers}, timeout=60)


def transactions(stack, job_id: int) -> list[dict]:
    response = requests.get(f"{stack.url('metadata')}/transactions", params={"_id": job_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def total_jobs(stack) -> int:
    return requests.get(stack.url("ingest") + "/jobs", params={"limit": 1}, timeout=10).json()["total"]


def unique_bundle(tag: str = "") -> bytes:
    return payload_bundle({f"idem/{uuid.uuid4().hex}.bin": os.urandom(2048) + tag.encode()})


def test_the_same_bundle_with_the_same_key_twice_is_one_job_and_one_transaction(stack):
    key = f"upload-{uuid.uuid4()}"
    raw = unique_bundle()
    first = post(stack, raw, **{"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    job_id = first.json()["job_id"]
    final = stack.wait_job(job_id)
    assert final["state"] == "OK"
    jobs_before = total_jobs(stack)

    again = post(stack, raw, path="/upload", **{"Idempotency-Key": key})  # the alias shares the keys
    assert again.status_code == 200, again.text
    assert again.json() == stack.state(job_id)  # the bound job's state: finished, OK
    assert total_jobs(stack) == jobs_before
    assert len(transactions(stack, job_id)) == 1


def test_the_same_key_with_another_bundle_is_409(stack):
    key = f"upload-{uuid.uuid4()}"
    first = post(stack, unique_bundle(), **{"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    jobs_before = total_jobs(stack)
    other = post(stack, unique_bundle("other"), **{"Idempotency-Key": key})
    assert other.status_code == 409, other.text
    body = other.json()
    assert body["code"] == "idempotency_key_reused" and str(first.json()["job_id"]) in body["message"]
    assert "Traceback" not in other.text
    assert total_jobs(stack) == jobs_before
    stack.wait_job(first.json()["job_id"])


def test_concurrent_uploads_with_one_key_make_one_job(stack):
    key = f"race-{uuid.uuid4()}"
    raw = unique_bundle()
    jobs_before = total_jobs(stack)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(stack, raw, **{"Idempotency-Key": key}), range(4)))
    assert [answer.status_code for answer in answers] == [200] * 4, [answer.text for answer in answers]
    job_ids = {answer.json()["job_id"] for answer in answers}
    assert len(job_ids) == 1
    job_id = job_ids.pop()
    assert stack.wait_job(job_id)["state"] == "OK"
    assert total_jobs(stack) == jobs_before + 1
    assert len(transactions(stack, job_id)) == 1


def test_dedupe_by_digest_answers_the_job_the_same_bytes_made(stack):
    raw = unique_bundle()
    first = post(stack, raw, **{"Labvault-Dedupe": "digest"})
    assert first.status_code == 200, first.text
    again = post(stack, raw, **{"Labvault-Dedupe": "digest"})
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    other = post(stack, unique_bundle(), **{"Labvault-Dedupe": "digest"})
    assert other.status_code == 200 and other.json()["job_id"] != first.json()["job_id"]
    # Without a header nothing is deduplicated: Pacifica's clients keep their behaviour.
    plain = post(stack, raw)
    assert plain.status_code == 200 and plain.json()["job_id"] != first.json()["job_id"]
    for job_id in (first.json()["job_id"], other.json()["job_id"], plain.json()["job_id"]):
        stack.wait_job(job_id)


def test_a_failed_job_stays_the_answer_of_its_key(stack):
    key = f"failing-{uuid.uuid4()}"
    raw = payload_bundle({"idem/x.bin": b"x"}, project="no-such-project")
    first = post(stack, raw, **{"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    final = stack.wait_job(first.json()["job_id"])
    assert final["state"] == "FAILED"
    again = post(stack, raw, **{"Idempotency-Key": key})
    assert again.status_code == 200 and again.json() == final


def test_malformed_idempotency_headers_are_a_fast_400(stack):
    jobs_before = total_jobs(stack)
    raw = unique_bundle()
    for headers, code in [({"Idempotency-Key": "k" * 201}, "invalid_idempotency_key"),
                          ({"Idempotency-Key": "has space"}, "invalid_idempotency_key"),
                          ({"Idempotency-Key": "caf\xe9"}, "invalid_idempotency_key"),
                          ({"Idempotency-Key": ""}, "invalid_idempotency_key"),
                          ({"Labvault-Dedupe": "everything"}, "invalid_dedupe"),
                          ({"Labvault-Dedupe": "digest", "Idempotency-Key": "both"}, "invalid_idempotency_key")]:
        answer = post(stack, raw, **headers)
        assert answer.status_code == 400, (headers, answer.text)
        assert answer.json()["code"] == code and "Traceback" not in answer.text
    assert total_jobs(stack) == jobs_before


def test_labvault_ingest_sends_the_key_or_asks_for_dedupe(stack, tmp_path):
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(unique_bundle())
    url = stack.url("ingest")
    runs = [stack.cli("ingest", str(bundle), "--url", url, *extra)
            for extra in (["--dedupe"], ["--dedupe"], ["--idempotency-key", "cli-1"], ["--idempotency-key", "cli-1"])]
    job_ids = [json.loads(run.stdout.strip().splitlines()[-1])["job_id"] for run in runs]
    assert job_ids[0] == job_ids[1] and job_ids[2] == job_ids[3] and job_ids[0] != job_ids[2]
    other = tmp_path / "other.tar"
    other.write_bytes(unique_bundle("other"))
    refused = stack.cli("ingest", str(other), "--url", url, "--idempotency-key", "cli-1", check=False)
    assert refused.returncode == 1 and "idempotency_key_reused" in refused.stderr
    for job_id in set(job_ids):
        stack.wait_job(job_id)
