"""Every accepted job ends, under ``labvault up`` (SQLite, filesystem broker): a worker
killed in the middle of a transfer is started again and the reaper re-drives its job;
a `labvault up` stopped (SIGTERM) in the middle of a transfer hands the job back and the
next `labvault up` completes it;
a job whose worker keeps dying fails ``worker_lost`` and leaves nothing behind; and
``labvault reap`` settles what it finds, printing what it did.
"""
import json
import os
import signal
from pathlib import Path

import pytest
import requests

from common.db import open_database, utcnow
from ingest_service.models import Job
from tests.helpers import (
    FIXTURES,
    Stack,
    archive_sha1,
    fixture_bundle,
    large_bundle,
    seeded,
    wait_for,
)

OK_END = ("OK", "ingest metadata", "100", True)
# Small enough that a lost run is re-driven within seconds, large enough that a live
# run (heartbeat every 0.2 s) never looks lost.
RECOVERY = {"heartbeat_interval": "0.2", "heartbeat_stale": "2", "reap_interval": "0.5",
            "max_attempts": "2", "progress_interval": "0.02"}


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory):
    """150 MB in six files: long enough in `ingest files` to kill the worker half-way."""
    return large_bundle(tmp_path_factory.mktemp("big"), 25)


@pytest.fixture(scope="module")
def recovering(tmp_path_factory):
    """``labvault up`` of its own (the test kills its worker), with quick heartbeats and reaper."""
    with seeded(Stack(tmp_path_factory.mktemp("recovering"), ingest=RECOVERY)) as running:
        yield running


def post_file(stack, path: Path) -> int:
    with open(path, "rb") as body:
        response = requests.post(stack.url("ingest") + "/ingest", data=body, timeout=120,
                                 headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def job_row(stack, job_id: int) -> Job:
    """The job's row as the ingest database has it (attempts, claim, file ids)."""
    db = open_database(stack.settings.database_url("ingest"))
    try:
        with db.bind_ctx([Job]):
            return Job.get_by_id(job_id)
    finally:
        db.close()


def worker_pid(stack) -> int:
    return int((stack.data_dir / "run" / "worker.pid").read_text())


def kill_worker_mid_transfer(stack, job_id: int, attempt: int) -> None:
    """SIGKILL the worker's process group (worker, pool, beat) while run ``attempt`` of the job
    is half-way through its files; wait until `up` has started a new worker."""
    def moving():
        # One read of the row: the run's attempt, step and percent as one update left them.
        row = job_row(stack, job_id)
        assert row.state == "OK" and row.task_percent < 100, "job ended before the worker could be killed"
        return row.attempts == attempt and row.task == "ingest files" and 10 <= row.task_percent < 90
    wait_for(moving, timeout=60, interval=0.01, message=f"run {attempt} of job {job_id} half-way through")
    victim = worker_pid(stack)
    os.killpg(victim, signal.SIGKILL)
    assert stack.state(job_id)["complete"] is False
    wait_for(lambda: worker_pid(stack) != victim, timeout=30, message="labvault up to start a new worker")


def metadata_files(stack, job_id: int) -> list[dict]:
    response = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def assert_nothing_incoming(stack) -> None:
    incoming = stack.settings.path("archive", "root") / ".incoming"
    assert not incoming.exists() or not list(incoming.iterdir())


def test_a_worker_killed_during_ingest_files_is_restarted_and_the_job_completes(recovering, big_bundle):
    bundle, expected = big_bundle
    job_id = post_file(recovering, bundle)
    kill_worker_mid_transfer(recovering, job_id, attempt=1)

    # The filesystem broker does not redeliver: the reaper in the new worker's beat does.
    final = recovering.wait_job(job_id, timeout=90)
    assert (final["state"], final["task"], final["task_percent"], final["complete"]) == OK_END, final
    # The run lets go of its claim right after it recorded the end.
    row = wait_for(lambda: (lambda row: row if row.claimed_by is None else None)(job_row(recovering, job_id)),
                   timeout=10, message="the claim to be released")
    assert row.attempts == 2
    rows = metadata_files(recovering, job_id)
    assert sorted(f"{r['subdir']}/{r['name']}" for r in rows) == sorted(expected)
    for r in rows:
        assert r["hashsum"] == expected[f"{r['subdir']}/{r['name']}"]
        assert archive_sha1(recovering, r["_id"]) == r["hashsum"]
    assert_nothing_incoming(recovering)
    assert not recovering.settings.path("ingest", "staging_dir").joinpath(f"{job_id}.tar").exists()
    assert "worker exited with status" in (recovering.data_dir / "up.log").read_text()


def test_a_job_whose_worker_dies_every_time_fails_worker_lost_and_leaves_nothing(recovering, big_bundle):
    bundle, _ = big_bundle
    job_id = post_file(recovering, bundle)
    kill_worker_mid_transfer(recovering, job_id, attempt=1)
    kill_worker_mid_transfer(recovering, job_id, attempt=2)  # [ingest] max_attempts = 2

    final = recovering.wait_job(job_id, timeout=60)
    assert (final["state"], final["task"], final["complete"]) == ("FAILED", "ingest files", True), final
    assert final["exception"] == "worker_lost: the job stopped 2 times without finishing"
    row = wait_for(lambda: (lambda row: row if row.claimed_by is None else None)(job_row(recovering, job_id)),
                   timeout=10, message="the reaper's claim to be released")
    assert row.attempts == 2 and row.file_id_start is not None
    assert metadata_files(recovering, job_id) == []
    for file_id in range(int(row.file_id_start), int(row.file_id_start) + row.file_count):
        assert requests.head(f"{recovering.url('archive')}/{file_id}", timeout=10).status_code == 404
    assert_nothing_incoming(recovering)
    staging = recovering.settings.path("ingest", "staging_dir")
    assert not list(staging.glob(f"{job_id}.*"))
    # The stack works on: a new job goes through.
    assert recovering.ingest(fixture_bundle("good-md.json"))["state"] == "OK"


def test_sigterm_of_up_mid_transfer_hands_the_job_back_and_the_next_up_completes_it(tmp_path, big_bundle):
    bundle, expected = big_bundle
    stack = Stack(tmp_path, ingest=RECOVERY).start()
    try:
        stack.cli("seed", str(FIXTURES / "metadata-seed"))
        job_id = post_file(stack, bundle)
        wait_for(lambda: (lambda row: row.task == "ingest files" and 10 <= row.task_percent < 90)(
            job_row(stack, job_id)), timeout=60, interval=0.01, message="the job half-way through its files")
    finally:
        stack.stop()
    assert stack.process.returncode == 0
    # A restart is not a failure: unfinished, nobody holds it, no attempt used up.
    row = job_row(stack, job_id)
    assert (row.state, row.task, row.exception) == ("OK", "ingest files", ""), row.exception
    # (Its percent may already be 100: every byte sent, the archive's group commit not yet answered.)
    assert row.claimed_by is None and row.attempts == 0
    assert "handed back unfinished" in (tmp_path / "log" / "worker.log").read_text()

    again = Stack(tmp_path, ingest=RECOVERY).start()
    try:
        final = again.wait_job(job_id, timeout=120)
        assert (final["state"], final["task"], final["task_percent"], final["complete"]) == OK_END, final
        rows = metadata_files(again, job_id)
        assert sorted(f"{r['subdir']}/{r['name']}" for r in rows) == sorted(expected)  # every file, once
        for r in rows:
            assert archive_sha1(again, r["_id"]) == expected[f"{r['subdir']}/{r['name']}"]
        assert_nothing_incoming(again)
        assert f"re-enqueued 1 unfinished job(s): {job_id}" in (tmp_path / "up.log").read_text()
    finally:
        again.stop()


def test_labvault_reap_settles_quiet_jobs_and_says_what_it_did(tmp_path):
    """No services needed: nothing to remove from the archive, and the broker is a folder."""
    stack = Stack(tmp_path, ingest={"heartbeat_stale": "60", "max_attempts": "3"})
    stack.cli("dbsync")
    staging = stack.settings.path("ingest", "staging_dir")
    staging.mkdir(parents=True)
    long_ago = utcnow().replace(year=2020)
    db = open_database(stack.settings.database_url("ingest"))
    with db.bind_ctx([Job]):
        def job(job_id, **fields):
            Job.create(job_id=job_id, created=long_ago, updated=long_ago, **fields)
        job(1)                                                    # accepted, message lost
        job(2, task="ingest files", attempts=1, claimed_by="gone:1:x", heartbeat=long_ago)
        job(3, task="open tar", attempts=3, heartbeat=long_ago)  # out of attempts
        job(4)                                                    # upload that never finished
        job(5)                                                    # upload still arriving
        job(6, task="load metadata", attempts=1, claimed_by="live:1:y", heartbeat=utcnow())
        job(7, state="FAILED", task="open tar")
        job(8, task="ingest metadata", task_percent=100)
    db.close()
    for job_id in (1, 2, 3):
        (staging / f"{job_id}.tar").write_bytes(b"bundle")
    (staging / "4.tar.part").write_bytes(b"half")
    os.utime(staging / "4.tar.part", (0, 0))
    (staging / "5.tar.part").write_bytes(b"still coming")

    result = stack.cli("reap")
    assert result.stdout.splitlines() == [
        "job 1: re-enqueued (at 'UPLOADING', 0 of 3 attempts made)",
        "job 2: re-enqueued (at 'ingest files', 1 of 3 attempts made)",
        "job 3: failed (at 'open tar': worker_lost: the job stopped 3 times without finishing)",
        "job 4: failed (at 'UPLOADING': upload_interrupted: the upload stopped before the whole bundle arrived)",
        "reap: 2 re-enqueued, 2 failed",
    ]
    queued = [json.loads(path.read_text())["headers"]["task"]
              for path in (stack.settings.path("celery", "broker_dir") / "out").glob("*.msg")]
    # The two re-driven jobs, and the job.failed events of the two it ended (for the webhooks).
    assert sorted(queued) == ["ingest.process_job"] * 2 + ["ingest.publish_event"] * 2
    assert sorted(p.name for p in staging.iterdir()) == ["1.tar", "2.tar", "5.tar.part"]
    with db.bind_ctx([Job]):
        assert Job.get_by_id(2).claimed_by is None  # the lost run's claim is gone: the new run starts at once
        assert [Job.get_by_id(n).state for n in range(1, 9)] == ["OK", "OK", "FAILED", "FAILED", "OK", "OK",
                                                                  "FAILED", "OK"]
    db.close()
    # Just re-driven: the next reap leaves them their stale period to start.
    assert stack.cli("reap").stdout.strip() == "reap: nothing to do"

