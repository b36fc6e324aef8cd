"""Claims and heartbeats of jobs, on SQLite and PostgreSQL: one run holds a job at a time, a
stale claim can be taken over, the heartbeat thread keeps a claim fresh and notices a
takeover; and the schema 1.0 -> 1.1 upgrade that added them, with a row in the table."""
from __future__ import annotations

import datetime
import decimal
import os
import subprocess
import sys

import pytest

from common import db, migrations
from common.migrations import Schema
from ingest_service import jobs, models, pipeline
from ingest_service.models import ApiToken, Job
from ingest_service.staging import Staging
from tests.helpers import REPO, make_settings, wait_for
from tests.unit.processes import database_url, run_processes

MINUTE = datetime.timedelta(seconds=60)


def age_heartbeat(job_id: int, seconds: float = 600) -> datetime.datetime:
    """Make the job's heartbeat ``seconds`` old, as a run lost that long ago leaves it."""
    then = db.utcnow() - datetime.timedelta(seconds=seconds)
    Job.update(heartbeat=then).where(Job.job_id == job_id).execute()
    return then


def test_one_run_holds_a_job_until_it_lets_go_or_its_heartbeat_goes_stale(ingest_db):
    jobs.create(1)
    cutoff = jobs.stale_cutoff(60)
    assert jobs.claim(1, "a", cutoff)
    assert not jobs.claim(1, "b", cutoff)
    job = jobs.get(1)
    assert job.claimed_by == "a" and job.heartbeat is not None
    assert jobs.touch(1, "a") == 1
    # Run a is lost: its heartbeat goes stale and b takes over; a learns it at its next beat.
    age_heartbeat(1)
    assert jobs.claim(1, "b", jobs.stale_cutoff(60))
    assert (jobs.touch(1, "a"), jobs.touch(1, "b")) == (0, 1)
    assert jobs.release(1, "a") == 0
    assert jobs.get(1).claimed_by == "b"
    assert jobs.release(1, "b") == 1
    assert jobs.get(1).claimed_by is None
    assert jobs.claim(1, "c", jobs.stale_cutoff(60))


def test_a_finished_job_is_never_claimed(ingest_db):
    for job_id in (1, 2, 3):
        jobs.create(job_id)
    jobs.set_state(1, jobs.OK, jobs.INGEST_METADATA, 100)
    jobs.set_state(2, jobs.FAILED, jobs.POLICY, 0, "policy_denied: no")
    jobs.set_state(3, jobs.OK, jobs.INGEST_METADATA, 99.5)
    assert [jobs.claim(n, "a", jobs.stale_cutoff(60)) for n in (1, 2, 3, 4)] == [False, False, True, False]


def test_quiet_jobs_and_how_long_a_claim_holds(ingest_db):
    now = db.utcnow()
    Job.create(job_id=1, updated=now - 2 * MINUTE)                            # no sign of life
    Job.create(job_id=2, updated=now)                                          # just updated
    Job.create(job_id=3, updated=now - 2 * MINUTE, heartbeat=now, claimed_by="a")  # running
    Job.create(job_id=4, updated=now - 2 * MINUTE, state=jobs.FAILED)
    assert [job.job_id for job in jobs.quiet_since(now - MINUTE)] == [1]
    assert jobs.held_for(1, 60) == 0.0
    assert 55 < jobs.held_for(3, 60) <= 60
    assert jobs.held_for(4, 60) is None and jobs.held_for(5, 60) is None
    # Re-driving drops a stale claim and stamps the heartbeat, so the job waits a stale period again.
    age_heartbeat(3)
    assert jobs.redrive(3, now - MINUTE)
    job = jobs.get(3)
    assert job.claimed_by is None and job.heartbeat > now - MINUTE
    assert [job.job_id for job in jobs.quiet_since(db.utcnow() - MINUTE)] == [1]
    # A live claim is not re-driven.
    assert jobs.claim(3, "b", now - MINUTE)
    assert not jobs.redrive(3, now - MINUTE)
    assert jobs.get(3).claimed_by == "b"


def claim_in_child(url: str, job_id: int, run_id: str) -> bool:
    database = db.bind(models.database, url)
    try:
        return jobs.claim(job_id, run_id, jobs.stale_cutoff(60))
    finally:
        database.close()


def test_of_many_processes_claiming_one_job_at_once_exactly_one_wins(ingest_db):
    jobs.create(3)
    age_heartbeat(3)
    Job.update(claimed_by="lost").where(Job.job_id == 3).execute()
    results = run_processes(claim_in_child, [(database_url(ingest_db), 3, f"run{n}") for n in range(6)],
                            databases=[ingest_db])
    assert results.count(True) == 1
    assert jobs.get(3).claimed_by == f"run{results.index(True)}"


def test_the_heartbeat_keeps_a_claim_fresh_and_notices_a_takeover(ingest_db):
    jobs.create(4)
    assert jobs.claim(4, "a", jobs.stale_cutoff(60))
    old = age_heartbeat(4)
    with pipeline.job_heartbeat(4, "a", interval=0.02) as heartbeat:
        wait_for(lambda: jobs.get(4).heartbeat > old, timeout=10, message="a heartbeat")
        assert not heartbeat.lost
        Job.update(claimed_by="b").where(Job.job_id == 4).execute()
        wait_for(lambda: heartbeat.lost, timeout=10, message="the heartbeat to notice the takeover")
    assert not heartbeat._thread.is_alive()


def test_a_run_leaves_a_held_job_alone_and_takes_over_a_stale_claim(ingest_db, tmp_path):
    settings = make_settings(tmp_path, ingest={"heartbeat_stale": "60"})
    context = pipeline.IngestContext(settings, None, None, None, Staging(tmp_path / "staging"))
    jobs.create(5)
    assert jobs.claim(5, "other", jobs.stale_cutoff(60))
    assert pipeline.process_job(context, 5) == pipeline.HELD
    job = jobs.get(5)
    assert (job.attempts, job.claimed_by, job.task) == (0, "other", jobs.UPLOADING)
    # The holder was lost: a run claims the job, counts its attempt (no bundle staged: it
    # fails at its first step) and lets go of its claim at the end.
    age_heartbeat(5)
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, 5)
    job = jobs.get(5)
    assert (job.attempts, job.claimed_by, job.state, job.task) == (1, None, jobs.FAILED, jobs.OPEN_TAR)


def test_a_job_out_of_attempts_fails_worker_lost_instead_of_running_again(ingest_db, tmp_path):
    settings = make_settings(tmp_path, ingest={"max_attempts": "2"})
    staging = Staging(tmp_path / "staging")
    context = pipeline.IngestContext(settings, None, None, None, staging)
    jobs.create(8)
    jobs.set_state(8, jobs.OK, jobs.LOAD_METADATA, 0)
    Job.update(attempts=2).where(Job.job_id == 8).execute()
    staging.root.mkdir()
    staging.bundle_path(8).write_bytes(b"a bundle whose run kills its worker")
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, 8)
    job = jobs.get(8)
    assert (job.state, job.task, job.attempts, job.claimed_by) == (jobs.FAILED, jobs.LOAD_METADATA, 2, None)
    assert job.exception == "worker_lost: the job stopped 2 times without finishing"
    assert not staging.bundle_path(8).exists()


def test_owner_is_recorded_and_tokens_have_their_table(ingest_db):
    jobs.create(6, owner=2 ** 40)
    jobs.create(7)
    assert (jobs.get(6).owner, jobs.get(7).owner) == (2 ** 40, None)
    ApiToken.create(digest="a" * 64, user=10, label="microscope 3")
    token = ApiToken.get_by_id("a" * 64)
    assert (token.user, token.label, token.revoked) == (10, "microscope 3", None)
    assert token.created <= db.utcnow()


def test_dbsync_upgrades_a_1_0_job_table_and_keeps_its_rows(empty_database, tmp_path):
    migrations.sync(empty_database, Schema("ingest", models.SCHEMA.migrations[:1]))
    created = datetime.datetime(2026, 1, 25, 16, 54, 50, 123456)
    p = empty_database.param
    empty_database.execute_sql(
        'INSERT INTO "ingest_job" (job_id, kind, state, task, task_percent, exception, created, updated, '
        f"attempts, file_id_start, file_count) VALUES ({', '.join([p] * 11)})",
        (41, "upload", "OK", "ingest files", 42.5, "", created, created, 1, 1000, 3))
    url = database_url(empty_database)
    empty_database.close()
    env = dict(os.environ, LABVAULT_INGEST_DATABASE=url)
    done = subprocess.run([sys.executable, "-m", "common.cli", "dbsync", "--data-dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ingest: schema 1.3 (1.1, 1.2, 1.3)" in done.stdout
    db.bind(models.database, empty_database)
    assert migrations.current_version(empty_database, models.SCHEMA) == (1, 3)
    job = jobs.get(41)
    assert (job.task, job.task_percent, job.created, job.attempts, job.file_id_start, job.file_count) == \
        ("ingest files", decimal.Decimal("42.5"), created, 1, 1000, 3)
    assert (job.claimed_by, job.heartbeat, job.owner, job.project) == (None, None, None, None)
    assert jobs.claim(41, "a", jobs.stale_cutoff(60))
    ApiToken.create(digest="b" * 64, user=10)
    check = subprocess.run([sys.executable, "-m", "common.cli", "dbchk", "--equal", "--data-dir", str(tmp_path)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "ingest: database at 1.3, same as the code" in check.stdout
