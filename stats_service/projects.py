"""A project's statistics: build them from its files' runs, once at a time, newest inputs winning.

``refresh`` claims the project's row (one conditional UPDATE, a heartbeat while it builds);
a refresh that finds the project claimed marks it ``dirty`` and leaves, and the holder goes
round once more before it lets go, so two ingests into one project never build at once and
the build that ends last saw the newest files. A build lists the project's files, and when
their digests are those of the last build (and nothing is forced) stops there; otherwise it
obtains, per file, the run of every operation that applies to the file's kind (cache hits for
unchanged files), then the project figures, and stores the summary ``GET /stats/<project>``
serves.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

from common import events
from common.db import close_quietly, utcnow
from common.errors import LabvaultError
from common.heartbeat import Heartbeat
from stats_service import computed, models
from stats_service.catalog import FileRecord
from stats_service.models import FAILED, OK, FileStats, ProjectStats, Run
from stats_service.runs import Engine, canonical, holder_name

logger = logging.getLogger(__name__)

HELD, UNCHANGED, BUILT, SKIPPED = "held", "unchanged", "built", "skipped"
PROJECT_OPERATION = "project_figures"


def skip_list(engine: Engine) -> dict[str, str]:
    """``[stats] skip_projects``: ``project: reason`` entries, one a line or separated by ``;``."""
    raw = engine.settings.get("stats", "skip_projects", "")
    entries = {}
    for part in raw.replace("\n", ";").split(";"):
        project, _, reason = part.partition(":")
        if project.strip():
            entries[project.strip()] = reason.strip() or "listed in [stats] skip_projects"
    return entries


def inputs_digest(files: list[FileRecord]) -> str:
    return hashlib.sha256(canonical([[record.file_id, record.digest] for record in files]).encode()).hexdigest()


def refresh(engine: Engine, project: str, force: bool = False) -> str:
    """Bring ``project``'s statistics up to date; returns HELD, UNCHANGED, BUILT or SKIPPED."""
    project = str(project)
    reason = skip_list(engine).get(project)
    ProjectStats.insert(project=project).on_conflict_ignore().execute()
    if reason is not None:
        ProjectStats.update(state="skipped", error=reason).where(ProjectStats.project == project).execute()
        return SKIPPED
    holder = holder_name()
    if not _claim(engine, project, holder):
        ProjectStats.update(dirty=True).where(ProjectStats.project == project).execute()
        logger.info("project %s: a build is under way; it will go round once more", project)
        return HELD
    outcome = UNCHANGED
    try:
        with Heartbeat(lambda: _touch(project, holder), engine.heartbeat_interval, f"project-{project[:40]}",
                       done=lambda: close_quietly(models.database)):
            while True:
                ProjectStats.update(dirty=False).where(ProjectStats.project == project).execute()
                if _build(engine, project, force) == BUILT:
                    outcome = BUILT
                force = False
                if not ProjectStats.get_by_id(project).dirty:
                    return outcome
    finally:
        (ProjectStats.update(claimed_by=None)
         .where((ProjectStats.project == project) & (ProjectStats.claimed_by == holder)).execute())


def _claim(engine: Engine, project: str, holder: str) -> bool:
    stale = utcnow() - datetime.timedelta(seconds=engine.stale_seconds)
    return bool(ProjectStats.update(claimed_by=holder, heartbeat=utcnow())
                .where((ProjectStats.project == project)
                       & (ProjectStats.claimed_by.is_null() | (ProjectStats.heartbeat < stale)))
                .execute())


def _touch(project: str, holder: str) -> int:
    return (ProjectStats.update(heartbeat=utcnow())
            .where((ProjectStats.project == project) & (ProjectStats.claimed_by == holder)).execute())


def _build(engine: Engine, project: str, force: bool) -> str:
    files = engine.catalog.files_of_project(project)
    digest = inputs_digest(files)
    row = ProjectStats.get_by_id(project)
    if not force and row.state == OK and row.inputs_digest == digest:
        return UNCHANGED
    ProjectStats.update(state="building").where(ProjectStats.project == project).execute()
    try:
        entries = [_file_entry(engine, record, force) for record in files]
        figures_run = None
        if any(entry["state"] == OK for entry in entries):
            figures_run = engine.obtain(PROJECT_OPERATION, {"project": project}, force)
        summary = _summary(engine, project, files, entries, figures_run)
    except Exception as error:
        # The metadata or archive service away, or worse: the next refresh tries again.
        ProjectStats.update(state=FAILED, error=_as_text(error)).where(ProjectStats.project == project).execute()
        raise
    # The statistics are served from here on, whatever happens to the downloads.
    ProjectStats.update(state=OK, summary=canonical(summary), built=utcnow(), error=None,
                        figures_run=figures_run.run_id if figures_run else None).where(
        ProjectStats.project == project).execute()
    try:
        computed.build_all(engine, project, force)
    except Exception as error:
        # The inputs digest stays the old one, so the next refresh builds the downloads again
        # (the statistics are cache hits by then).
        ProjectStats.update(error=f"computed files: {_as_text(error)}").where(ProjectStats.project == project).execute()
        raise
    ProjectStats.update(inputs_digest=digest).where(ProjectStats.project == project).execute()
    logger.info("project %s: statistics and computed files built from %d file(s)", project, len(files))
    events.publish(engine.settings, events.STATS_BUILT, "stats", f"projects/{project}", {
        "project": project, "state": OK, "built": summary["built"], "totals": summary["totals"],
        "figures": [figure["name"] for figure in figures_of(engine, summary.get("figures_run"))],
        "figure_errors": summary.get("figure_errors", {})}, project)
    return BUILT


def _as_text(error: Exception) -> str:
    if isinstance(error, LabvaultError):
        return error.as_exception_text()
    logger.exception("project build failed")
    return "internal_error: the build failed unexpectedly; the worker log has the details"


def _file_entry(engine: Engine, record: FileRecord, force: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"file_id": record.file_id, "path": record.path, "kind": record.kind,
                             "size": record.size}
    operations = [op for op in engine.operations.values() if record.kind in op.applies_to]
    if not operations:
        entry["state"] = "not_applicable"
        _remember_file(record, None)
        return entry
    stats: dict[str, Any] = {}
    for operation in sorted(operations, key=lambda op: op.name):
        run = engine.obtain(operation.name, {"file_id": record.file_id}, force)
        entry.setdefault("runs", {})[operation.name] = run.run_id
        if run.state == OK:
            stats.update(json.loads(run.result) or {})
            _remember_file(record, run.run_id)
        else:
            entry["state"] = FAILED
            entry["error"] = {"code": run.error_code or "operation_failed",
                              "message": run.error_message or "the operation did not finish"}
            _remember_file(record, run.run_id)
            return entry
    entry["state"] = OK
    entry["stats"] = stats
    return entry


def _remember_file(record: FileRecord, run_id: str | None) -> None:
    values = {"project": record.project, "path": record.path, "kind": record.kind, "digest": record.digest,
              "run": run_id, "updated": utcnow()}
    (FileStats.insert(file_id=record.file_id, **values)
     .on_conflict(conflict_target=[FileStats.file_id], update=values).execute())


def _summary(engine: Engine, project: str, files: list[FileRecord], entries: list[dict],
             figures_run: Run | None) -> dict[str, Any]:
    ok = [entry for entry in entries if entry["state"] == OK]
    totals = {
        "files": len(files), "bytes": sum(record.size for record in files),
        "files_with_stats": len(ok), "files_failed": sum(entry["state"] == FAILED for entry in entries),
        "anndata_files": sum(record.kind == "anndata" for record in files),
        "tables": sum(record.kind == "table" for record in files),
        "cells": sum(int(entry["stats"].get("n_obs", 0)) for entry in ok),
        "table_rows": sum(int(entry["stats"].get("rows", 0)) for entry in ok),
    }
    summary: dict[str, Any] = {"project": project, "state": OK, "built": f"{utcnow():%Y-%m-%d %H:%M:%S}",
                               "totals": totals, "files": entries}
    if figures_run is not None:
        summary["figures_run"] = figures_run.run_id
        if figures_run.state == OK:
            result = json.loads(figures_run.result) or {}
            summary["project_stats"] = result.get("stats", {})
            summary["figure_errors"] = result.get("figure_errors", {})
        else:
            summary["figure_errors"] = {"*": {"code": figures_run.error_code, "message": figures_run.error_message}}
    return summary


def figures_of(engine: Engine, run_id: str | None) -> list[dict[str, Any]]:
    """The PNG outputs of a run, as ``GET .../figures`` lists them."""
    if not run_id:
        return []
    run = Run.get_or_none(Run.run_id == run_id)
    if run is None or run.state != OK:
        return []
    return [{"name": output.name[:-4], "size": output.size, "sha256": output.sha256,
             "built": f"{output.created:%Y-%m-%d %H:%M:%S}"}
            for output in run.outputs.order_by(models.RunOutput.name) if output.name.endswith(".png")]
