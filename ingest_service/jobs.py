"""Job state: create, read, update and present jobs in Pacifica's state JSON.

Every change is one UPDATE of one row that names only the columns it sets, so a
progress update, a state change and an attempt count written by different
processes (web service, workers, the admin command) never undo each other.
"""
from __future__ import annotations

import decimal

from common.db import utcnow
from common.errors import BadRequest, NotFound
from ingest_service.models import Job

# Step labels, in order and verbatim (clients match on them).
UPLOADING = "UPLOADING"
OPEN_TAR = "open tar"
LOAD_METADATA = "load metadata"
POLICY = "Policy Validation"
INGEST_FILES = "ingest files"
MOVE_FILES = "move files"
INGEST_METADATA = "ingest metadata"

OK = "OK"
FAILED = "FAILED"


def is_complete(job: Job) -> bool:
    """Terminal: failed, or the last step done."""
    return job.state == FAILED or (job.task == INGEST_METADATA and job.task_percent >= 100)


def format_percent(value) -> str:
    value = decimal.Decimal(value)
    if value == 100:
        return "100"
    return f"{value:.1f}"


def state_json(job: Job) -> dict:
    """The Pacifica state document, exactly these keys."""
    return {
        "job_id": int(job.job_id),
        "state": job.state,
        "task": job.task,
        "task_percent": format_percent(job.task_percent),
        "complete": is_complete(job),
        "created": str(job.created),
        "updated": str(job.updated),
        "exception": job.exception,
    }


def create(job_id: int, kind: str = "upload") -> Job:
    now = utcnow()
    return Job.create(job_id=job_id, kind=kind, state=OK, task=UPLOADING, task_percent=0,
                      exception="", created=now, updated=now)


def get(job_id: int) -> Job:
    job = Job.get_or_none(Job.job_id == job_id)
    if job is None:
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job


def update(job_id: int, **fields) -> int:
    """Set fields on one job (atomic single-row UPDATE) and stamp ``updated``; returns rows changed."""
    fields["updated"] = utcnow()
    return (Job.update({getattr(Job, name): value for name, value in fields.items()})
            .where(Job.job_id == job_id).execute())


def count_attempt(job_id: int) -> int:
    """Add one to the job's ``attempts`` in the database itself (no read-modify-write); returns rows changed."""
    return (Job.update({Job.attempts: Job.attempts + 1, Job.updated: utcnow()})
            .where(Job.job_id == job_id).execute())


def set_state(job_id: int, state: str, task: str, percent, exception: str = "") -> None:
    update(job_id, state=state, task=task, task_percent=check_percent(percent), exception=storable(exception))


def check_percent(percent) -> decimal.Decimal:
    """``percent`` as a Decimal from 0 to 100, or BadRequest ``invalid_percent``.

    The column holds up to 9999.999: PostgreSQL would refuse more, SQLite keep it.
    """
    try:
        value = decimal.Decimal(str(percent))
    except decimal.InvalidOperation:
        value = decimal.Decimal("NaN")
    if not value.is_finite() or not 0 <= value <= 100:
        raise BadRequest(f"task_percent must be from 0 to 100, not {str(percent)[:40]!r}", code="invalid_percent")
    return value


def storable(text: str) -> str:
    """``text`` with what PostgreSQL text cannot hold (NUL, lone surrogates) escaped."""
    text = text.replace("\0", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def unfinished() -> list[Job]:
    """Jobs that are neither failed nor done, oldest first."""
    jobs = Job.select().where(Job.state != FAILED).order_by(Job.job_id)
    return [job for job in jobs if not is_complete(job)]


