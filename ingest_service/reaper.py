"""The reaper: every accepted job ends, whatever happened to its message or its worker.

The job table is the truth, not the broker. A message can be lost (the filesystem
broker does not redeliver; a crash can fall between an upload and its enqueue) and a
worker can die in the middle of a run. So the reaper looks for unfinished jobs with
no sign of life (heartbeat, update, bytes arriving) for ``[ingest] heartbeat_stale``
seconds and settles each:

- still at ``UPLOADING`` without a whole staged bundle: the upload never finished ->
  FAILED ``upload_interrupted``;
- run ``[ingest] max_attempts`` times already -> FAILED at its current step with
  ``worker_lost`` (a job that keeps killing its worker must not loop forever);
- otherwise -> enqueued again. The claim makes a second copy of a message harmless.

Failures go through the pipeline's own failure path (archive files and staged bundle
removed) under a claim of the reaper's, so a run that starts meanwhile is never failed
under its feet. No Celery here: the caller passes ``enqueue``.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import LabvaultError
from ingest_service import idempotency, jobs, pipeline, resumable, webhooks
from ingest_service.cleanup import sweep_pending_deletes
from ingest_service.models import Job

logger = logging.getLogger(__name__)

REQUEUED = "re-enqueued"
FAILED = "failed"


@dataclass(frozen=True)
class Reaped:
    """What the reaper did to one job."""

    job_id: int
    action: str  # REQUEUED or FAILED
    detail: str

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.action} ({self.detail})"


def run(context: pipeline.IngestContext, enqueue: Callable[[int], None],
        stale_before: datetime.datetime | None = None) -> list[Reaped]:
    """The reaper's one entry point: settle quiet jobs (``reap``), finish the archive deletions
    failed jobs had to leave (``cleanup.sweep_pending_deletes``), remove resumable uploads past
    their expiry, rows and bytes (``resumable.expire``), and forget what expired (idempotency
    keys, old webhook delivery records)."""
    reaped = reap(context, enqueue, stale_before)
    sweep_pending_deletes(context.staging, context.archive)
    resumable.expire(context.staging)
    forget(context.settings)
    return reaped


def forget(settings) -> None:
    """Remove expired idempotency keys and webhook delivery records older than ``[events] keep_days``."""
    expired = idempotency.expire()
    old = webhooks.forget_deliveries(settings.getfloat("events", "keep_days"))
    if expired or old:
        logger.info("reaper: %d expired idempotency key(s), %d old webhook delivery record(s) removed",
                    expired, old)


def reap(context: pipeline.IngestContext, enqueue: Callable[[int], None],
         stale_before: datetime.datetime | None = None) -> list[Reaped]:
    """Settle every unfinished job quiet since ``stale_before`` (default: ``[ingest] heartbeat_stale``
    seconds ago); returns what was done, oldest job first."""
    settings = context.settings
    cutoff = stale_before or jobs.stale_cutoff(settings.getfloat("ingest", "heartbeat_stale"))
    max_attempts = settings.getint("ingest", "max_attempts")
    done = []
    for job in jobs.quiet_since(cutoff):
        job_id = int(job.job_id)
        if job.task == jobs.UPLOADING and not context.staging.arrived_whole(job_id):
            arriving = context.staging.last_write(job_id)
            if arriving is not None and arriving >= cutoff:
                continue  # the body is still coming in
            entry = _end(context, job, jobs.UPLOADING, LabvaultError(
                "the upload stopped before the whole bundle arrived", code="upload_interrupted"), cutoff)
        elif job.attempts >= max_attempts:
            entry = _end(context, job, job.task, pipeline.worker_lost(job.attempts), cutoff)
        else:
            # Drop the lost run's claim first, so the new run need not wait for it to go stale.
            if not jobs.redrive(job_id, cutoff):
                continue  # a run claimed it meanwhile
            enqueue(job_id)
            entry = Reaped(job_id, REQUEUED, f"at {job.task!r}, {job.attempts} of {max_attempts} attempts made")
        if entry is not None:
            logger.warning("reaper: %s", entry)
            done.append(entry)
    return done


def _end(context: pipeline.IngestContext, job: Job, step: str, error: LabvaultError,
         cutoff: datetime.datetime) -> Reaped | None:
    job_id = int(job.job_id)
    run_id = "reaper:" + pipeline.new_run_id()
    if not jobs.claim(job_id, run_id, cutoff):
        return None  # a run took it meanwhile, or it ended
    try:
        pipeline.fail_job(context, job_id, step, error)
    finally:
        jobs.release(job_id, run_id)
    return Reaped(job_id, FAILED, f"at {step!r}: {error.as_exception_text()}")
