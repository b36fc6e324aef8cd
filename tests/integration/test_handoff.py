"""The after-ingest hand-off: listeners declared through the registry hear of every committed job,
and neither their absence nor their failure touches the job."""
import pytest

from common import registry
from common.registry import Service
from ingest_service import jobs, pipeline
from tests.integration.test_ingest_pipeline import context, stage_job  # noqa: F401 - fixture

HEARD: list[tuple[str, int]] = []


def record(settings, job_id):
    HEARD.append(("record", job_id))


def explode(settings, job_id):
    HEARD.append(("explode", job_id))
    raise RuntimeError("a listener that fails")


@pytest.fixture
def listeners():
    HEARD.clear()
    yield lambda *specs: [registry.register(spec) for spec in specs]
    for name in ("listener-a", "listener-b"):
        registry.unregister(name)


def listener(name: str, function: str) -> Service:
    return Service(name=name, port=1, app="unused:app", order=99,
                   listeners={registry.INGESTED: f"{__name__}:{function}"})


def test_a_committed_job_is_handed_to_every_listener(context, listeners):  # noqa: F811
    listeners(listener("listener-a", "record"))
    job_id = stage_job(context, [("a.txt", b"a")])
    assert pipeline.process_job(context, job_id) == "OK"
    assert HEARD == [("record", job_id)]


def test_a_failing_listener_leaves_the_job_ok_and_the_others_still_hear(context, listeners, caplog):  # noqa: F811
    listeners(listener("listener-a", "explode"), listener("listener-b", "record"))
    job_id = stage_job(context, [("a.txt", b"a")])
    assert pipeline.process_job(context, job_id) == "OK"
    assert sorted(HEARD) == [("explode", job_id), ("record", job_id)]
    assert jobs.state_json(jobs.get(job_id))["state"] == "OK"
    assert "listener-a listener of ingested failed" in caplog.text


def test_a_failed_job_is_not_handed_off(context, listeners):  # noqa: F811
    listeners(listener("listener-a", "record"))
    job_id = stage_job(context, [("a.txt", b"a")])
    context.staging.bundle_path(job_id).write_bytes(b"not a tar")
    with pytest.raises(pipeline.JobFailed):
        pipeline.process_job(context, job_id)
    assert HEARD == []


def test_without_listeners_a_job_ends_as_before(context):  # noqa: F811
    job_id = stage_job(context, [("a.txt", b"a")])
    assert pipeline.process_job(context, job_id) == "OK"
