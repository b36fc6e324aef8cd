"""Job state: create, read, update and present jobs in Pacifica's state JSON.

Every change is one UPDATE of one row that names only the columns it sets, so a
progress update, a state change and an attempt count written by different
processes (web service, workers, the admin command) never undo each other.

A run of a job first *claims* it (``claim``): one conditional UPDATE, so of several
runs of one job (a redelivered message, a re-enqueue by the reaper) only one holds
it at a time. The holder keeps ``heartbeat`` fresh while it runs; a claim whose
heartbeat is older than ``[ingest] heartbeat_stale`` belongs to a run that is gone
and may be taken over.
"""
from __future__ import annotations

import datetime
import decimal
from typing import Callable

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


def create(job_id: int, kind: str = "upload", owner: int | None = None) -> Job:
    """A new job at ``UPLOADING``; ``owner`` is the authenticated user (None in open mode)."""
    now = utcnow()
    return Job.create(job_id=job_id, kind=kind, state=OK, task=UPLOADING, task_percent=0,
                      exception="", created=now, updated=now, owner=owner)


def delete(job_id: int) -> int:
    """Remove a job row that never started (an upload whose idempotency key answered another job)."""
    return Job.delete().where(Job.job_id == job_id).execute()


def find(job_id: int) -> Job | None:
    """The job, or None when there is no such job."""
    return Job.get_or_none(Job.job_id == job_id)


def get(job_id: int) -> Job:
    job = Job.get_or_none(Job.job_id == job_id)
    if job is None:
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job


def reserve_file_ids(job_id: int, count: int, allocate: Callable[[], int]) -> int:
    """The first of the job's ``count`` file ids: ``allocate()``d and recorded on the row the
    first time (one conditional UPDATE, only if no range is recorded yet), the recorded one after."""
    job = get(job_id)
    if job.file_id_start is None:
        start = allocate()
        (Job.update(file_id_start=start, file_count=count, updated=utcnow())
         .where((Job.job_id == job_id) & Job.file_id_start.is_null()).execute())
        job = get(job_id)
    return int(job.file_id_start)


def update(job_id: int, **fields) -> int:
    """Set fields on one job (atomic single-row UPDATE) and stamp ``updated``; returns rows changed."""
    fields["updated"] = utcnow()
    return (Job.update({getattr(Job, name): value for name, value in fields.items()})
            .where(Job.job_id == job_id).execute())


def count_attempt(job_id: int, **fields) -> int:
    """Add one to the job's ``attempts`` in the database itself (no read-modify-write), setting
    ``fields`` in the same UPDATE; returns rows changed."""
    values = {getattr(Job, name): value for name, value in fields.items()}
    values.update({Job.attempts: Job.attempts + 1, Job.updated: utcnow()})
    return Job.update(values).where(Job.job_id == job_id).execute()


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


def unfinished_condition():
    """``is_complete`` negated, as a query condition."""
    return (Job.state != FAILED) & ~((Job.task == INGEST_METADATA) & (Job.task_percent >= 100))


def unfinished() -> list[Job]:
    """Jobs that are neither failed nor done, oldest first."""
    return list(Job.select().where(unfinished_condition()).order_by(Job.job_id))


# -- claims and heartbeats ------------------------------------------------------

def stale_cutoff(seconds: float) -> datetime.datetime:
    """The moment before which a heartbeat counts as stale."""
    return utcnow() - datetime.timedelta(seconds=seconds)


def _claimable(stale_before: datetime.datetime):
    return (unfinished_condition()
            & (Job.claimed_by.is_null() | Job.heartbeat.is_null() | (Job.heartbeat < stale_before)))


def claim(job_id: int, run_id: str, stale_before: datetime.datetime) -> bool:
    """Make ``run_id`` the holder of an unfinished job nobody holds (or whose holder's heartbeat
    is older than ``stale_before``); True if it now holds the job."""
    return bool(Job.update({Job.claimed_by: run_id, Job.heartbeat: utcnow()})
                .where((Job.job_id == job_id) & _claimable(stale_before)).execute())


def touch(job_id: int, run_id: str | None = None) -> int:
    """Refresh the heartbeat: of the run ``run_id`` (0 rows when it no longer holds the job), or,
    without ``run_id``, of the job itself (e.g. while its upload is still arriving)."""
    query = Job.update({Job.heartbeat: utcnow()}).where(Job.job_id == job_id)
    if run_id is not None:
        query = query.where(Job.claimed_by == run_id)
    return query.execute()


def release(job_id: int, run_id: str, give_back_attempt: bool = False) -> int:
    """Let go of a claim ``run_id`` holds (``give_back_attempt``: and un-count its attempt, for a
    run that stopped because its worker shut down); returns rows changed (0 if it held none)."""
    values = {Job.claimed_by: None}
    if give_back_attempt:
        values[Job.attempts] = Job.attempts - 1  # the run counted one when it started
    return (Job.update(values)
            .where((Job.job_id == job_id) & (Job.claimed_by == run_id)).execute())


def redrive(job_id: int, stale_before: datetime.datetime) -> bool:
    """Drop a stale claim (or none) so a new run may start at once, and stamp the heartbeat so the
    job waits another stale period before it is re-driven again; False if a live run holds it."""
    return bool(Job.update({Job.claimed_by: None, Job.heartbeat: utcnow()})
                .where((Job.job_id == job_id) & _claimable(stale_before)).execute())


def quiet_since(stale_before: datetime.datetime) -> list[Job]:
    """Unfinished jobs with no sign of life (heartbeat, update) since ``stale_before``, oldest first."""
    return list(Job.select()
                .where(unfinished_condition() & (Job.updated < stale_before)
                       & (Job.heartbeat.is_null() | (Job.heartbeat < stale_before)))
                .order_by(Job.job_id))


def held_for(job_id: int, stale_seconds: float) -> float | None:
    """Seconds until the claim on ``job_id`` goes stale (0: nobody holds it); None when the job
    is finished or gone, so there is nothing to wait for."""
    job = Job.get_or_none(Job.job_id == job_id)
    if job is None or is_complete(job):
        return None
    if job.claimed_by is None or job.heartbeat is None:
        return 0.0
    age = (utcnow() - job.heartbeat).total_seconds()
    return max(0.0, stale_seconds - age)




# -- listings -------------------------------------------------------------------

def listing(state: str | None = None, owners: list[int] | None = None, job_ids: list[int] | None = None,
            either: tuple[int, list[int]] | None = None, limit: int = 50, offset: int = 0) -> tuple[int, list[Job]]:
    """``(total, page)`` of jobs, newest first: ``state`` ``OK``/``FAILED``, or ``running`` (not
    complete) or ``done`` (complete and OK); only ``owners``' jobs and ``job_ids`` when given;
    ``either=(user, ids)``: only jobs owned by ``user`` or among ``ids``."""
    query = Job.select()
    if state == FAILED:
        query = query.where(Job.state == FAILED)
    elif state == OK:
        query = query.where(Job.state == OK)
    elif state == "running":
        query = query.where(unfinished_condition())
    elif state == "done":
        query = query.where((Job.state == OK) & ~unfinished_condition())
    elif state:
        raise BadRequest("state is OK, FAILED, running or done", code="invalid_state")
    if owners is not None:
        query = query.where(Job.owner.in_(owners))
    if job_ids is not None:
        query = query.where(Job.job_id.in_(job_ids))
    if either is not None:
        query = query.where((Job.owner == either[0]) | Job.job_id.in_(either[1]))
    return query.count(), list(query.order_by(Job.job_id.desc()).limit(limit).offset(offset))
