"""Computed files: which exist for a project, building them after its statistics, listing them.

One row per (project, sample, kind) names the newest run that built it; a run of the same
inputs is a cache hit, so rebuilding a project whose files and metadata did not change
touches nothing, and a new bundle into one sample rebuilds the project zip and that sample's
zip only (the other samples' runs are hits).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from common import events
from common.db import utcnow
from stats_service.catalog import ANNDATA
from stats_service.models import OK, ComputedFile, Run, RunOutput

logger = logging.getLogger(__name__)

PROJECT_ZIP, SAMPLE_ZIP, METADATA_ZIP, MERGED = "project_zip", "sample_zip", "metadata_zip", "merged_anndata"
NO_SAMPLE = "NA"


def sample_of(described: dict, key: str) -> str:
    """A file's sample: its (or its transaction's) ``key`` value; ``NA`` when it has none."""
    value = described["keys"].get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value not in (None, "") else NO_SAMPLE

OUTPUT_OF = {PROJECT_ZIP: "package.zip", SAMPLE_ZIP: "package.zip", METADATA_ZIP: "package.zip",
             MERGED: "merged.h5ad"}


def build_all(engine, project: str, force: bool = False) -> list[ComputedFile]:
    """Every computed file of ``project`` up to date: the data and metadata zips, one zip per
    named sample, and the merged AnnData when it has two or more ``.h5ad`` files."""
    described = engine.catalog.describe(engine.catalog.files_of_project(project))
    if not described:
        return []
    key = engine.settings.get("downloads", "sample_key", "sample")
    samples = sorted({sample_of(entry, key) for entry in described} - {NO_SAMPLE})
    wanted = [(PROJECT_ZIP, {"project": project}), (METADATA_ZIP, {"project": project})]
    wanted += [(SAMPLE_ZIP, {"project": project, "sample": sample}) for sample in samples]
    if sum(entry["record"].kind == ANNDATA for entry in described) >= 2:
        wanted.append((MERGED, {"project": project}))
    for name, inputs in wanted:
        run = engine.obtain(name, inputs, force)
        if run.state == OK:
            # A cache hit never ran ``finished``; registering again is idempotent.
            register(engine, name, run)
        else:
            logger.warning("project %s: %s %s failed: %s %s", project, name, inputs, run.error_code,
                           run.error_message)
    return list(ComputedFile.select().where(ComputedFile.project == project).order_by(ComputedFile.id))


def register(engine, kind: str, run: Run) -> ComputedFile:
    """Point the (project, sample, kind) row at ``run``'s output (or its recorded reason to skip)."""
    inputs = json.loads(run.inputs)
    result = json.loads(run.result) if run.result else {}
    samples = inputs.get("samples")
    sample = ",".join(sorted(samples)) if samples else inputs.get("sample", "")
    where = ((ComputedFile.project == inputs["project"]) & (ComputedFile.sample == sample)
             & (ComputedFile.kind == kind))
    current = ComputedFile.get_or_none(where)
    if current is not None and current.run == run.run_id:
        return current  # a cache hit: the same build, nothing to change
    values: dict[str, Any] = {"run": run.run_id, "filename": result.get("filename", ""), "updated": utcnow(),
                              "output": None, "size": None, "sha256": None, "skipped_code": None,
                              "skipped_reason": None}
    if result.get("skipped"):
        values.update(skipped_code=result["skipped"]["code"], skipped_reason=result["skipped"]["message"])
    else:
        output = RunOutput.get_or_none((RunOutput.run == run.run_id) & (RunOutput.name == OUTPUT_OF[kind]))
        if output is not None:
            values.update(output=output.name, size=output.size, sha256=output.sha256)
    (ComputedFile.insert(project=inputs["project"], sample=sample, kind=kind, **values)
     .on_conflict(conflict_target=[ComputedFile.project, ComputedFile.sample, ComputedFile.kind], update=values)
     .execute())
    row = ComputedFile.get(where)
    if not row.skipped_code:
        # New bytes for downloaders (a skip built nothing to fetch).
        # Without the input digests: one per file of the project, they would make the event as
        # large as the project is wide (GET /computed_files/<id> has them).
        data = {key: value for key, value in document(row).items() if key != "inputs"}
        events.publish(engine.settings, events.COMPUTED_FILE_BUILT, "stats",
                       f"projects/{row.project}/computed_files/{row.id}", data, row.project)
    return row


def document(row: ComputedFile) -> dict[str, Any]:
    """A computed file as the listing shows it (never with a URL)."""
    run = Run.get_or_none(Run.run_id == row.run) if row.run else None
    built = run.finished if run is not None and run.finished else row.updated
    entry: dict[str, Any] = {"id": row.id, "project": row.project, "sample": row.sample or None, "kind": row.kind,
                             "filename": row.filename, "size": row.size, "sha256": row.sha256,
                             # When these bytes were built (a cache hit builds nothing).
                             "created": f"{built:%Y-%m-%d %H:%M:%S}",
                             "inputs": json.loads(run.input_digests) if run is not None else {}}
    if row.skipped_code:
        entry["skipped"] = {"code": row.skipped_code, "message": row.skipped_reason}
    return entry


def listing(project: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    query = ComputedFile.select().order_by(ComputedFile.id)
    if project is not None:
        query = query.where(ComputedFile.project == project)
    return [document(row) for row in query.offset(offset).limit(limit)]
