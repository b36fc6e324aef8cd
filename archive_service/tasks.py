"""Celery adapters for the archive service (thin: the work is in ``fixity`` and ``storage``)."""
from __future__ import annotations

import logging

from archive_service import fixity, models
from archive_service.backends import make_storage
from archive_service.storage import Storage
from common.celery_app import task
from common.db import bind
from common.settings import Settings, once_per_settings

logger = logging.getLogger(__name__)

CHECK_FIXITY = "archive.check_fixity"
SWEEP_UPLOADS = "archive.sweep_uploads"

# Per worker process and settings object; each entry keeps its settings alive (see ingest's tasks).
@once_per_settings
def storage_for(settings: Settings) -> Storage:
    """The archive database bound and the backend built, once per worker process and settings."""
    bind(models.database, settings.database_url("archive"))
    return make_storage(settings)


def periodic(settings: Settings) -> dict:
    """The archive's beat entries: fixity every ``[archive] fixity_interval`` seconds, the sweep of
    unfinished uploads every ``[archive] sweep_interval``."""
    def every(task_name: str, interval: float) -> dict:
        # Runs that waited longer than one interval (no worker was there) are dropped:
        # the next one does the same work.
        return {"task": task_name, "schedule": interval,
                "options": {"queue": "archive", "routing_key": "archive", "expires": max(interval, 1.0)}}

    return {"check-fixity": every(CHECK_FIXITY, settings.getfloat("archive", "fixity_interval", 3600.0)),
            "sweep-uploads": every(SWEEP_UPLOADS, settings.getfloat("archive", "sweep_interval", 3600.0))}


@task(CHECK_FIXITY, queue="archive")
def check_fixity(settings: Settings, limit: int | None = None) -> dict[str, int]:
    """Re-check up to ``[archive] fixity_batch`` files not checked for ``fixity_days`` days; run by beat.

    Safe to run twice: a second run finds those files freshly checked and moves on to others.
    """
    storage = storage_for(settings)
    with models.database.connection_context():
        outcomes = fixity.run(storage, int(limit or settings.getint("archive", "fixity_batch")),
                              settings.getfloat("archive", "fixity_days"))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.result] = counts.get(outcome.result, 0) + 1
    return counts


@task(SWEEP_UPLOADS, queue="archive")
def sweep_uploads(settings: Settings) -> int:
    """Abort unfinished writes (S3 multipart uploads, POSIX temp files) older than
    ``[archive] stale_upload_hours``: what a crashed archive process left behind."""
    storage = storage_for(settings)
    removed = storage.sweep_uploads(settings.getfloat("archive", "stale_upload_hours") * 3600)
    if removed:
        logger.info("swept %d unfinished upload(s)", removed)
    return removed
