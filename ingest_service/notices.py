"""The events the ingest service publishes: ``job.ok`` and ``job.failed`` when a job ends.

Called where a job becomes terminal (the pipeline's success and ``fail_job``, which the
reaper and ``labvault job`` use too, and an upload that failed before it became a job run),
after the job row says so. Never raises: the job's end is already recorded.
"""
from __future__ import annotations

import logging

from common import events
from common.settings import Settings
from ingest_service import jobs

logger = logging.getLogger(__name__)


def job_ended(settings: Settings, job_id: int) -> dict | None:
    """Publish the end of job ``job_id`` as ``job.ok`` or ``job.failed``; returns the event (None if
    the job is not finished, or the event could not be made)."""
    try:
        job = jobs.find(job_id)
        if job is None or not jobs.is_complete(job):
            return None
        event_type = events.JOB_FAILED if job.state == jobs.FAILED else events.JOB_OK
        project = job.project
        added = None
        if event_type == events.JOB_OK:
            # The job id is the transaction id; its files have consecutive ids from file_id_start.
            added = {"transaction": int(job.job_id), "files": int(job.file_count or 0),
                     "first_file_id": None if job.file_id_start is None else int(job.file_id_start)}
        subject = f"jobs/{int(job.job_id)}" if project is None else f"projects/{project}/jobs/{int(job.job_id)}"
        data = {"job": jobs.state_json(job), "kind": job.kind, "project": project,
                "owner": None if job.owner is None else int(job.owner), "added": added}
    except Exception:  # noqa: BLE001 - the job ended whatever happens to its event
        logger.exception("job %s: could not describe its end for the event", job_id)
        return None
    return events.publish(settings, event_type, "ingest", subject, data, project)
