"""Celery adapters for the ingest service (thin: the work is in ``pipeline`` and ``reaper``)."""
from __future__ import annotations

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from common.celery_app import RetryLater, enqueue, make_celery, task
from common.db import bind
from common.settings import Settings
from ingest_service import jobs, models, pipeline, reaper
from ingest_service.services import sweep_pending_deletes

# Per worker process and settings object. Each entry keeps its settings object alive, so
# no later settings object can reuse its id() and be taken for it (tests build many).
_contexts: dict[int, tuple[Settings, pipeline.IngestContext]] = {}
_apps: dict[int, tuple[Settings, Celery]] = {}


def context_for(settings: Settings) -> pipeline.IngestContext:
    """One context (database binding, HTTP session) per worker process and settings."""
    entry = _contexts.get(id(settings))
    if entry is None:
        bind(models.database, settings.database_url("ingest"))
        entry = _contexts[id(settings)] = (settings, pipeline.IngestContext.from_settings(
            settings, time_limits=(SoftTimeLimitExceeded,)))
    return entry[1]


def celery_for(settings: Settings) -> Celery:
    """A Celery app to enqueue with, one per worker process and settings (it connects on first use)."""
    entry = _apps.get(id(settings))
    if entry is None:
        entry = _apps[id(settings)] = (settings, make_celery(settings))
    return entry[1]


# A failed job is an expected outcome (the job row has it): no traceback in the worker log.
@task("ingest.process_job", queue="ingest", throws=(pipeline.JobFailed,))
def process_job(settings: Settings, job_id: int) -> str:
    """Run ingest job ``job_id`` through its steps; safe to run twice, never two runs at once.

    When another run holds the job, this one comes back once that run's heartbeat would be
    stale: a run lost with its worker blocks the job for about ``[ingest] heartbeat_stale``.
    """
    context = context_for(settings)
    with models.database.connection_context():
        result = pipeline.process_job(context, int(job_id))
        if result == pipeline.HELD:
            wait = jobs.held_for(int(job_id), settings.getfloat("ingest", "heartbeat_stale"))
            if wait is not None:
                # A little past the moment the claim goes stale, and never a busy loop.
                raise RetryLater(max(1.0, wait + 0.5), f"job {job_id} is held by another run")
        return result


@task("ingest.reap_jobs", queue="ingest")
def reap_jobs(settings: Settings) -> list[str]:
    """Re-drive or end the unfinished jobs nobody is running (``reaper.reap``); run by beat."""
    context = context_for(settings)
    app = celery_for(settings)
    with models.database.connection_context():
        reaped = reaper.reap(context, lambda job_id: enqueue(app, "ingest.process_job", job_id))
    # Archive files a failed job could not remove while the archive was away.
    sweep_pending_deletes(context.staging, context.archive)
    return [str(entry) for entry in reaped]
