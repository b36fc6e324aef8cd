"""Celery adapters for the ingest service (thin: the work is in ``pipeline`` and ``reaper``)."""
from __future__ import annotations

import datetime
import logging

from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded

from common.access import Directory
from common.celery_app import RetryLater, celery_for, enqueue, make_celery, shutting_down, task
from common.db import bind
from common.errors import LabvaultError
from common.settings import Settings, once_per_settings
from ingest_service import jobs, models, pipeline, reaper, webhooks

logger = logging.getLogger(__name__)

PROCESS_JOB = "ingest.process_job"
REAP_JOBS = "ingest.reap_jobs"
PUBLISH_EVENT = "ingest.publish_event"
DELIVER_EVENT = "ingest.deliver_event"

# Per worker process and settings object. Each entry keeps its settings object alive, so
# no later settings object can reuse its id() and be taken for it (tests build many).
@once_per_settings
def context_for(settings: Settings) -> pipeline.IngestContext:
    """One context (database binding, HTTP session) per worker process and settings."""
    bind(models.database, settings.database_url("ingest"))
    return pipeline.IngestContext.from_settings(settings, time_limits=(SoftTimeLimitExceeded,),
                                                stopping=shutting_down)


def enqueue_job(app: Celery, job_id: int) -> None:
    """Send job ``job_id`` to the ingest queue; the one way a job is enqueued (after its row is committed)."""
    enqueue(app, PROCESS_JOB, job_id)


def periodic(settings: Settings) -> dict:
    """The ingest service's beat entries: the reaper every ``[ingest] reap_interval`` seconds."""
    interval = settings.getfloat("ingest", "reap_interval")
    return {
        "reap-jobs": {
            "task": REAP_JOBS,
            "schedule": interval,
            # Reaps that waited longer than one interval (no worker was there) are dropped:
            # the next one does the same work.
            "options": {"queue": "ingest", "routing_key": "ingest", "expires": max(interval, 1.0)},
        },
    }


# A failed job is an expected outcome (the job row has it): no traceback in the worker log.
@task(PROCESS_JOB, queue="ingest", throws=(pipeline.JobFailed,))
def process_job(settings: Settings, job_id: int) -> str:
    """Run ingest job ``job_id`` through its steps; safe to run twice, never two runs at once.

    When another run holds the job, this one comes back once that run's heartbeat would be
    stale: a run lost with its worker blocks the job for about ``[ingest] heartbeat_stale``.
    When the worker shuts down, the run gives the job back unfinished and the message is
    requeued.
    """
    context = context_for(settings)
    with models.database.connection_context():
        result = pipeline.process_job(context, int(job_id))
        if result == pipeline.HANDED_BACK:
            # Not acked as done: the broker keeps the message for the next worker (RabbitMQ
            # requeues it; the filesystem broker's copy is dropped at `labvault up`, whose
            # reaper re-drives the job).
            raise Reject(f"job {job_id} handed back: the worker is shutting down", requeue=True)
        if result == pipeline.HELD:
            wait = jobs.held_for(int(job_id), settings.getfloat("ingest", "heartbeat_stale"))
            if wait is not None:
                # A little past the moment the claim goes stale, and never a busy loop.
                raise RetryLater(max(1.0, wait + 0.5), f"job {job_id} is held by another run")
        return result


@task(REAP_JOBS, queue="ingest")
def reap_jobs(settings: Settings) -> list[str]:
    """Re-drive or end the unfinished jobs nobody is running (``reaper.run``); sent by beat."""
    context = context_for(settings)  # binds the job database
    app = celery_for(settings)
    with models.database.connection_context():
        reaped = reaper.run(context, lambda job_id: enqueue_job(app, job_id))
    return [str(entry) for entry in reaped]


def on_event(settings: Settings, cloud_event: dict) -> None:
    """The listener of ``registry.EVENT`` (in whichever process published it): only enqueue the fan-out.

    The event travels as the task's argument, not as an id: it may come from a service that
    cannot write this service's tables (the stats workers), and it is small.
    """
    enqueue(celery_for(settings), PUBLISH_EVENT, cloud_event)


@task(PUBLISH_EVENT, queue="ingest")
def publish_event(settings: Settings, event: dict) -> int:
    """Enqueue one delivery of ``event`` per subscription it goes to; returns how many."""
    context = context_for(settings)
    directory = Directory(context.metadata)
    seen: dict[tuple[int, str], bool] = {}

    def may_see(user: int, project: str) -> bool:
        if (user, project) not in seen:
            seen[user, project] = directory.may_see_project(user, project)
        return seen[user, project]

    try:
        with models.database.connection_context():
            targets = webhooks.matching(event, may_see)
    except LabvaultError as exc:
        # The metadata service (who may see what) is away: the event waits rather than be lost.
        raise RetryLater(10.0, f"event {event.get('id')}: {exc.as_exception_text()}") from None
    app = celery_for(settings)
    for subscription in targets:
        enqueue(app, DELIVER_EVENT, int(subscription.id), event)
    return len(targets)


@task(DELIVER_EVENT, queue="ingest")
def deliver_event(settings: Settings, subscription_id: int, event: dict) -> str:
    """One attempt to deliver ``event`` to a subscription; a failure comes back with backoff."""
    context_for(settings)  # binds the database
    with models.database.connection_context():
        outcome = webhooks.deliver(settings, int(subscription_id), event)
    if isinstance(outcome, webhooks.Retry):
        raise RetryLater(outcome.delay, f"webhook {subscription_id}: {outcome.reason}")
    return outcome


def reap_once(settings: Settings, stale_before: datetime.datetime | None = None) -> list[reaper.Reaped]:
    """The reaper run by a process that is not a worker (``labvault reap``, ``labvault up``)."""
    context = context_for(settings)
    app = make_celery(settings)
    try:
        with models.database.connection_context():
            return reaper.run(context, lambda job_id: enqueue_job(app, job_id), stale_before)
    finally:
        app.close()


def recover_at_up(settings: Settings, started: datetime.datetime, out) -> None:
    """``labvault up``: settle every job a previous run left unfinished before ``started``."""
    reaped = reap_once(settings, stale_before=started)
    requeued = [entry.job_id for entry in reaped if entry.action == reaper.REQUEUED]
    if requeued:
        print(f"labvault: re-enqueued {len(requeued)} unfinished job(s): "
              f"{', '.join(map(str, requeued))}", file=out)
    for entry in reaped:
        if entry.action == reaper.FAILED:
            print(f"labvault: {entry}", file=out)
