"""Purge a project: its computed files, statistics and figures, and on request its archived
files and metadata rows. What would go is planned first (so the command can show it and ask)."""
from __future__ import annotations

from dataclasses import dataclass, field

from stats_service.catalog import FileRecord
from stats_service.models import ComputedFile, FileStats, ProjectStats, Run, RunOutput


@dataclass
class Plan:
    project: str
    runs: list[str]
    outputs: list[int]            # archive ids of the runs' outputs
    computed_files: int
    files: list[FileRecord] = field(default_factory=list)   # only with delete_files
    transactions: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        found = [f"{len(self.runs)} operation run(s) with {len(self.outputs)} stored output(s) "
                 f"(statistics, figures, computed files)",
                 f"{self.computed_files} computed file record(s), the project's statistics"]
        if self.files:
            found.append(f"{len(self.files)} archived file(s) ({sum(f.size for f in self.files)} bytes) and the "
                         f"metadata of {len(self.transactions)} transaction(s)")
        return found


def plan(engine, project: str, delete_files: bool) -> Plan:
    files = engine.catalog.files_of_project(project)
    file_ids = [record.file_id for record in files]
    runs = [run.run_id for run in Run.select(Run.run_id).where(
        (Run.project == project) | (Run.file_id.in_(file_ids) if file_ids else False))]
    outputs = [row.archive_id for row in RunOutput.select(RunOutput.archive_id).where(RunOutput.run.in_(runs))] \
        if runs else []
    computed = ComputedFile.select().where(ComputedFile.project == project).count()
    return Plan(project, runs, outputs, computed, files if delete_files else [],
                sorted({record.transaction for record in files}) if delete_files else [])


def execute(engine, plan: Plan) -> None:
    """Remove what ``plan`` lists: archive objects first, then the rows that pointed at them, so a
    purge cut short can be run again and finishes the job."""
    for archive_id in plan.outputs:
        engine.archive.delete(archive_id)
    for start in range(0, len(plan.runs), 500):
        chunk = plan.runs[start:start + 500]
        RunOutput.delete().where(RunOutput.run.in_(chunk)).execute()
        Run.delete().where(Run.run_id.in_(chunk)).execute()
    ComputedFile.delete().where(ComputedFile.project == plan.project).execute()
    FileStats.delete().where(FileStats.project == plan.project).execute()
    ProjectStats.delete().where(ProjectStats.project == plan.project).execute()
    if not plan.files:
        return
    for record in plan.files:
        engine.archive.delete(record.file_id)
    file_ids = [record.file_id for record in plan.files]
    metadata = engine.metadata
    for start in range(0, len(file_ids), 100):
        chunk = file_ids[start:start + 100]
        metadata.delete("file_key_value", file=chunk)
        metadata.delete("files", _id=chunk)
    for start in range(0, len(plan.transactions), 100):
        chunk = plan.transactions[start:start + 100]
        metadata.delete("trans_key_value", transaction=chunk)
        metadata.delete("transactions", _id=chunk)
