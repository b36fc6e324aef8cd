"""The pipeline called directly (as the task does) against the stack's real services; the
claim that keeps two runs of a job apart; the reaper that ends what nobody runs."""
import datetime
import hashlib
import json
import os
import threading

import pytest

from common import migrations
from common.celery_app import RetryLater
from common.db import bind, open_database, utcnow
from ingest_service import jobs, models, pipeline, reaper, tasks
from ingest_service.models import Job
from tests.helpers import make_settings, make_tar


@pytest.fixture
def context(stack, tmp_path):
    settings = make_settings(tmp_path, ingest={"progress_interval": "0"},
                             **{name: {"url": stack.url(name)} for name in ("metadata", "policy", "archive")})
    db = bind(models.database, settings.database_url("ingest"))
    migrations.sync(db, models.SCHEMA)
    with db.connection_context():
        yield pipeline.IngestContext.from_settings(settings)


def stage_job(context, members):
    document = [{"destinationTable": "Transactions.submitter", "value": 10},
                {"destinationTable": "Transactions.project", "value": "1234a"},
                {"destinationTable": "Transactions.instrument", "value": 54}]
    for name, raw in members:
        document.append({"destinationTable": "Files", "name": name, "subdir": "", "size": len(raw),
                         "hashtype": "sha256", "hashsum": hashlib.sha256(raw).hexdigest(),
                         "mimetype": "application/octet-stream"})
    job_id = context.metadata.getid("upload_job")
    jobs.create(job_id)
    context.staging.root.mkdir(parents=True, exist_ok=True)
    context.staging.bundle_path(job_id).write_bytes(
        make_tar([("metadata.txt", json.dumps(document).encode())] + [(f"data/{n}", r) for n, r in members]))
    return job_id


def test_task_percent_rises_inside_ingest_files_as_bytes_move(context, monkeypatch):
    seen = []
    real_update = jobs.update

    def recording_update(job_id, **fields):
        if "task_percent" in fields and "task" not in fields:
            seen.append(float(fields["task_percent"]))
        real_update(job_id, **fields)
    monkeypatch.setattr(jobs, "update", recording_update)
    members = [(f"part{n}.bin", os.urandom(3 * 1024 * 1024)) for n in range(4)]
    job_id = stage_job(context, members)
    assert pipeline.process_job(context, job_id) == "OK"
    inside = [p for p in seen if 0 < p < 100]
    assert len(inside) >= 4, seen
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert jobs.state_json(jobs.get(job_id))["task_percent"] == "100"


def test_a_second_run_of_a_finished_job_does_nothing(context):
    job_id = stage_job(context, [("a.txt", b"a")])
    assert pipeline.process_job(context, job_id) == "OK"
    before = jobs.get(job_id)
    assert pipeline.process_job(context, job_id) == "OK"
    assert jobs.get(job_id).updated == before.updated


def test_a_run_cut_short_repeats_safely_with_the_same_file_ids(context):
    """A worker lost after the files moved: the re-run reuses its ids and writes nothing twice."""
    job_id = stage_job(context, [("a.txt", b"alpha"), ("b.txt", b"beta")])
    run = pipeline.JobRun(context, jobs.get(job_id))
    manifest = run._open_bundle()
    run._ingest_files(manifest)
    run.tar.close()
    first_ids = sorted(run.file_ids.values())
    jobs.set_state(job_id, "OK", jobs.INGEST_FILES, 100)  # as a crash would leave it
    assert pipeline.process_job(context, job_id) == "OK"
    rows = context.metadata.query("files", transaction=job_id)
    assert sorted(row["_id"] for row in rows) == first_ids
    assert jobs.get(job_id).attempts == 1


def test_archive_keeps_the_members_mtime(context):
    job_id = stage_job(context, [("old.txt", b"old news")])
    assert pipeline.process_job(context, job_id) == "OK"
    file_id = context.metadata.query("files", transaction=job_id)[0]["_id"]
    assert context.archive.head(file_id)["X-Pacifica-Mtime"] == "1700000000"  # make_tar's mtime


def test_files_go_in_batches_in_the_bundles_order_and_a_bad_one_fails_the_job_leaving_nothing(context):
    """Seven files in batches of at most three (``[ingest] archive_batch_files``): all stored when
    good; a wrong hash in the third batch fails ``ingest files`` naming that member, and the
    files the first batches stored are removed with the job."""
    context.settings = context.settings.with_overrides({"ingest": {"archive_batch_files": "3"}})
    members = [(f"f{n}.bin", os.urandom(500 + n)) for n in range(7)]
    job_id = stage_job(context, members)
    assert pipeline.process_job(context, job_id) == "OK"
    rows = {row["name"]: row["_id"] for row in context.metadata.query("files", transaction=job_id)}
    for name, raw in members:
        assert context.archive.get(rows[name]).content == raw

    job_id = stage_job(context, members)
    bundle = context.staging.bundle_path(job_id)
    raw = bundle.read_bytes()
    at = raw.index(members[6][1])  # the seventh member's bytes, in the third batch
    bundle.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, job_id)
    state = jobs.state_json(jobs.get(job_id))
    assert (state["state"], state["task"]) == ("FAILED", "ingest files")
    assert state["exception"].startswith("hash_mismatch: data/f6.bin: its sha256 is not the declared")
    start = jobs.get(job_id).file_id_start
    assert all(context.archive.head(file_id) is None for file_id in range(start, start + 7))


class OutOfTime(Exception):
    """Stands for Celery's SoftTimeLimitExceeded, raised inside a step."""


def test_a_job_past_its_time_limit_fails_with_its_own_code_and_is_cleaned_up(context, monkeypatch):
    context.time_limits = (OutOfTime,)
    job_id = stage_job(context, [("slow.bin", os.urandom(1000))])

    def out_of_time(*_args, **_kwargs):
        raise OutOfTime()
    monkeypatch.setattr(context.metadata, "ingest", out_of_time)
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, job_id)
    state = jobs.state_json(jobs.get(job_id))
    assert (state["state"], state["task"]) == ("FAILED", "ingest metadata")
    assert state["exception"].startswith("time_limit_exceeded: ")
    file_id = jobs.get(job_id).file_id_start
    assert context.archive.head(file_id) is None
    assert not context.staging.bundle_path(job_id).exists()


# -- claims and the reaper ------------------------------------------------------------

def service_urls(stack) -> dict:
    return {name: {"url": stack.url(name)} for name in ("metadata", "policy", "archive")}


@pytest.fixture
def task_settings(stack, tmp_path):
    """Settings for calling the Celery task function itself, as a worker does."""
    settings = make_settings(tmp_path, ingest={"progress_interval": "0"}, **service_urls(stack))
    database = open_database(settings.database_url("ingest"))
    migrations.sync(database, models.SCHEMA)
    database.close()
    return settings


def test_two_runs_of_one_job_at_once_only_one_does_the_work(task_settings, monkeypatch):
    context = tasks.context_for(task_settings)
    job_id = stage_job(context, [("a.txt", b"alpha"), ("b.txt", b"beta")])
    inside, go_on = threading.Event(), threading.Event()
    real_check = context.policy.check_ingest

    def slow_check(document, uploader=None):
        inside.set()
        assert go_on.wait(30)
        return real_check(document, uploader)
    monkeypatch.setattr(context.policy, "check_ingest", slow_check)
    outcomes = {}

    def run(name):
        try:
            outcomes[name] = tasks.process_job(task_settings, job_id)
        except RetryLater as later:
            outcomes[name] = later
    first = threading.Thread(target=run, args=("first",))
    first.start()
    try:
        assert inside.wait(30), "the first run did not reach Policy Validation"
        second = threading.Thread(target=run, args=("second",))
        second.start()
        second.join(30)
    finally:
        go_on.set()
        first.join(60)
    assert outcomes["first"] == "OK"
    # The first run's claim is fresh: the second comes back once it would be stale.
    later = outcomes["second"]
    assert isinstance(later, RetryLater) and 100 < later.countdown <= 121, later
    job = jobs.get(job_id)
    assert (job.attempts, job.claimed_by) == (1, None)
    assert len(context.metadata.query("files", transaction=job_id)) == 2


def lose_run(job_id: int, attempts: int) -> None:
    """What a worker lost an hour ago leaves on the job row."""
    long_ago = utcnow() - datetime.timedelta(hours=1)
    (Job.update(attempts=attempts, claimed_by="lost-host:1:abc", heartbeat=long_ago, updated=long_ago)
     .where(Job.job_id == job_id).execute())


def test_the_reaper_ends_a_job_out_of_attempts_and_removes_what_it_wrote(context):
    job_id = stage_job(context, [("a.txt", b"alpha"), ("b.txt", b"beta")])
    # The last of three runs was lost in `ingest files`, after its files were archived.
    run = pipeline.JobRun(context, jobs.get(job_id))
    run._ingest_files(run._open_bundle())
    run.tar.close()
    file_ids = sorted(run.file_ids.values())
    assert all(context.archive.head(file_id) for file_id in file_ids)
    lose_run(job_id, attempts=3)

    enqueued = []
    reaped = reaper.reap(context, enqueued.append)
    assert [str(entry) for entry in reaped] == [
        f"job {job_id}: failed (at 'ingest files': worker_lost: the job stopped 3 times without finishing)"]
    assert enqueued == []
    state = jobs.state_json(jobs.get(job_id))
    assert (state["state"], state["task"], state["complete"]) == ("FAILED", "ingest files", True)
    assert state["exception"] == "worker_lost: the job stopped 3 times without finishing"
    assert jobs.get(job_id).claimed_by is None
    assert [context.archive.head(file_id) for file_id in file_ids] == [None, None]
    assert not context.staging.bundle_path(job_id).exists()
    assert context.metadata.query("files", transaction=job_id) == []


def test_the_reaper_re_drives_a_lost_run_and_the_job_completes_once(context):
    job_id = stage_job(context, [("a.txt", b"alpha")])
    jobs.set_state(job_id, jobs.OK, jobs.INGEST_FILES, 40)
    lose_run(job_id, attempts=1)
    enqueued = []
    reaped = reaper.reap(context, enqueued.append)
    assert [(entry.job_id, entry.action) for entry in reaped] == [(job_id, reaper.REQUEUED)]
    assert enqueued == [job_id]
    assert reaper.reap(context, enqueued.append) == []  # just re-driven: it gets a stale period to start
    assert pipeline.process_job(context, job_id) == "OK"
    job = jobs.get(job_id)
    assert (job.attempts, job.claimed_by) == (2, None)
    assert len(context.metadata.query("files", transaction=job_id)) == 1
