"""Celery adapters for the stats service (thin: the work is in ``runs`` and ``projects``)."""
from __future__ import annotations

from common.celery_app import celery_for, enqueue, task
from common.db import bind
from common.settings import Settings, once_per_settings
from stats_service import models, projects
from stats_service.runs import Engine

RUN_OPERATION = "stats.run_operation"
REFRESH_PROJECT = "stats.refresh_project"
REFRESH_TRANSACTION = "stats.refresh_transaction"
REFRESH_PROJECTS = "stats.refresh_projects"
REAP_RUNS = "stats.reap_runs"

# Per process and settings object; each entry keeps its settings object alive (see celery_for).
@once_per_settings
def engine_for(settings: Settings) -> Engine:
    """One engine (database binding, HTTP session, discovered operations) per process and settings."""
    bind(models.database, settings.database_url("stats"))
    return Engine(settings)


def periodic(settings: Settings) -> dict:
    """The stats service's beat entries: refresh every project; re-drive runs whose worker died."""
    refresh = settings.getfloat("stats", "refresh_interval")
    reap = settings.getfloat("stats", "reap_interval")
    options = {"queue": "stats", "routing_key": "stats"}
    return {
        "refresh-projects": {"task": REFRESH_PROJECTS, "schedule": refresh,
                             "options": {**options, "expires": max(refresh, 1.0)}},
        "reap-runs": {"task": REAP_RUNS, "schedule": reap, "options": {**options, "expires": max(reap, 1.0)}},
    }


def on_ingested(settings: Settings, job_id: int) -> None:
    """The after-ingest hand-off (in the ingest worker): only enqueue; the stats worker does the rest."""
    enqueue(celery_for(settings), REFRESH_TRANSACTION, int(job_id))


def enqueue_run(settings: Settings, run_id: str) -> None:
    enqueue(celery_for(settings), RUN_OPERATION, run_id)


def enqueue_refresh(settings: Settings, project: str, force: bool = False) -> None:
    enqueue(celery_for(settings), REFRESH_PROJECT, str(project), bool(force))


@task(RUN_OPERATION, queue="stats")
def run_operation(settings: Settings, run_id: str) -> str:
    """Run one queued operation run (``POST /operations/<name>``, or a re-drive); safe to run twice."""
    engine = engine_for(settings)
    with models.database.connection_context():
        return engine.execute(str(run_id)).state


@task(REFRESH_TRANSACTION, queue="stats")
def refresh_transaction(settings: Settings, transaction_id: int) -> str:
    """Bring the statistics of the project a new transaction went into up to date."""
    engine = engine_for(settings)
    row = engine.metadata.first("transactions", _id=int(transaction_id))
    if row is None or row.get("project") is None:
        return "no project"
    with models.database.connection_context():
        return projects.refresh(engine, str(row["project"]))


@task(REFRESH_PROJECT, queue="stats")
def refresh_project(settings: Settings, project: str, force: bool = False) -> str:
    engine = engine_for(settings)
    with models.database.connection_context():
        return projects.refresh(engine, str(project), bool(force))


@task(REFRESH_PROJECTS, queue="stats")
def refresh_projects(settings: Settings) -> int:
    """Enqueue a refresh of every project (cheap for those whose files did not change)."""
    names = engine_for(settings).catalog.projects()
    for project in names:
        enqueue_refresh(settings, project)
    return len(names)


@task(REAP_RUNS, queue="stats")
def reap_runs(settings: Settings) -> list[str]:
    engine = engine_for(settings)
    with models.database.connection_context():
        return engine.reap(lambda run_id: enqueue_run(settings, run_id))
