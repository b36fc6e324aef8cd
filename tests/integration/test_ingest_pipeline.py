"""The pipeline called directly (as the task does) against the stack's real services."""
import hashlib
import json
import os

import pytest

from common import migrations
from common.db import bind
from ingest_service import jobs, models, pipeline
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
