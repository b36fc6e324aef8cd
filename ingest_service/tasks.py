"""Celery adapters for the ingest service (thin: the work is in ``pipeline``)."""
from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded

from common.celery_app import task
from common.db import bind
from common.settings import Settings
from ingest_service import models, pipeline

_contexts: dict[int, pipeline.IngestContext] = {}


def context_for(settings: Settings) -> pipeline.IngestContext:
    """One context (database binding, HTTP session) per worker process and settings."""
    context = _contexts.get(id(settings))
    if context is None:
        bind(models.database, settings.database_url("ingest"))
        context = _contexts[id(settings)] = pipeline.IngestContext.from_settings(
            settings, time_limits=(SoftTimeLimitExceeded,))
    return context


# A failed job is an expected outcome (the job row has it): no traceback in the worker log.
@task("ingest.process_job", queue="ingest", throws=(pipeline.JobFailed,))
def process_job(settings: Settings, job_id: int) -> str:
    """Run ingest job ``job_id`` through its steps; safe to run twice."""
    context = context_for(settings)
    with models.database.connection_context():
        return pipeline.process_job(context, int(job_id))
