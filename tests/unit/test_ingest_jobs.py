"""Job rows on SQLite and PostgreSQL: the state JSON, decimal percentages, naive UTC times,
and single-row updates that several processes can make at once without losing any."""
from __future__ import annotations

import datetime
import decimal

import pytest

from common import db
from common.errors import BadRequest, NotFound
from ingest_service import jobs, models, pipeline
from ingest_service.models import Job
from ingest_service.staging import Staging
from tests.helpers import make_settings
from tests.unit.processes import database_url, run_processes

STATE_KEYS = {"job_id", "state", "task", "task_percent", "complete", "created", "updated", "exception"}


def test_a_new_job_and_its_state_json(ingest_db):
    before = db.utcnow()
    jobs.create(17)
    state = jobs.state_json(jobs.get(17))
    assert set(state) == STATE_KEYS
    assert (state["job_id"], state["state"], state["task"], state["task_percent"], state["complete"],
            state["exception"]) == (17, "OK", "UPLOADING", "0.0", False, "")
    created = datetime.datetime.fromisoformat(state["created"])
    assert before <= created <= db.utcnow()
    with pytest.raises(NotFound):
        jobs.get(18)


@pytest.mark.parametrize("percent, shown", [(0, "0.0"), ("42.5", "42.5"), (33.33333, "33.3"), (99.96, "100.0"),
                                            (decimal.Decimal("100.000"), "100"), (100, "100")])
def test_task_percent_is_a_decimal_string(ingest_db, percent, shown):
    jobs.create(1)
    jobs.set_state(1, jobs.OK, jobs.INGEST_FILES, percent)
    job = jobs.get(1)
    assert isinstance(job.task_percent, decimal.Decimal)
    assert jobs.state_json(job)["task_percent"] == shown


@pytest.mark.parametrize("percent", [-1, 100.001, 10_000, "nan", "inf", "abc"])
def test_task_percent_out_of_range_is_refused(ingest_db, percent):
    jobs.create(1)
    with pytest.raises(BadRequest) as caught:
        jobs.set_state(1, jobs.OK, jobs.INGEST_FILES, percent)
    assert caught.value.code == "invalid_percent"
    assert jobs.get(1).task_percent == 0


def test_success_and_failure_are_complete(ingest_db):
    jobs.create(1)
    jobs.create(2)
    jobs.create(3)
    jobs.set_state(1, jobs.OK, jobs.INGEST_METADATA, 100)
    jobs.set_state(2, jobs.FAILED, jobs.POLICY, 0, "policy_denied: no")
    jobs.set_state(3, jobs.OK, jobs.INGEST_METADATA, 99.5)
    assert [jobs.state_json(jobs.get(n))["complete"] for n in (1, 2, 3)] == [True, True, False]
    assert [job.job_id for job in jobs.unfinished()] == [3]


def test_times_are_naive_utc_and_keep_microseconds(ingest_db):
    moment = datetime.datetime(2026, 1, 25, 16, 54, 50, 123456)
    Job.create(job_id=1, created=moment, updated=moment)
    if db.is_postgres(ingest_db):
        # A timestamp column without time zone ignores the session's zone: nothing shifts.
        ingest_db.execute_sql("SET TIME ZONE 'America/Los_Angeles'")
    job = jobs.get(1)
    assert job.created == moment and job.created.tzinfo is None
    assert jobs.state_json(job)["created"] == "2026-01-25 16:54:50.123456"


def test_big_ids_and_exception_text_every_database_can_store(ingest_db):
    job_id = 2 ** 40 + 1
    jobs.create(job_id)
    jobs.update(job_id, file_id_start=2 ** 62, file_count=3)
    jobs.set_state(job_id, jobs.FAILED, jobs.LOAD_METADATA, 0, "invalid_metadata: name 'a\0b' \ud800 \u30d1")
    job = jobs.get(job_id)
    assert (job.file_id_start, job.file_count) == (2 ** 62, 3)
    assert job.exception == "invalid_metadata: name 'a\\x00b' \\ud800 \u30d1"
    assert jobs.update(job_id + 1, task="x") == 0  # no such job: nothing changed


def test_a_run_counts_its_attempt_and_a_finished_job_is_left_alone(ingest_db, tmp_path):
    settings = make_settings(tmp_path)
    context = pipeline.IngestContext(settings, None, None, None, Staging(tmp_path / "staging"))
    jobs.create(5)
    # No staged bundle: the run fails at its first step, before any other service is called.
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, 5)
    job = jobs.get(5)
    assert (job.attempts, job.state, job.task) == (1, jobs.FAILED, jobs.OPEN_TAR)
    assert job.exception.startswith("bundle_missing: ")
    assert pipeline.process_job(context, 5) == jobs.FAILED
    assert jobs.get(5).attempts == 1


def hammer_job(url, job_id, what, times):
    """In a child process: ``times`` updates of one kind to one job, over a connection of its own."""
    database = db.bind(models.database, url)
    try:
        for n in range(times):
            if what == "attempts":
                jobs.count_attempt(job_id)
            else:
                jobs.update(job_id, task_percent=decimal.Decimal(n + 1) / times * 100)
        return times
    finally:
        database.close()


def test_concurrent_updates_of_one_job_lose_nothing(ingest_db):
    jobs.create(9)
    url = database_url(ingest_db)
    calls = [(url, 9, "attempts", 40)] * 3 + [(url, 9, "percent", 40)]
    run_processes(hammer_job, calls, databases=[ingest_db])
    job = jobs.get(9)
    # Read-modify-write of attempts (or of the whole row) would have lost increments here.
    assert job.attempts == 120
    assert job.task_percent == 100
