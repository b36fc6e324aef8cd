"""What an operation is: a named, versioned, described computation on files or projects.

An operation is one class. The engine (``stats_service.runs``) validates the inputs against
``input_schema`` (JSON Schema), works out which files the result depends on
(``input_files``), looks the result up in the cache under sha256(name, version, canonical
inputs, those files' digests), and only on a miss calls ``run`` with a context that fetches
files, reports progress and collects outputs. A third-party package adds operations through
the ``labvault.operations`` entry-point group (each entry names an ``Operation`` subclass).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from common.db import utcnow
from common.errors import UnprocessableEntity
from common.settings import Settings
from stats_service.catalog import Catalog, FileRecord
from stats_service.models import Run

FILE_INPUT = {
    "type": "object",
    "properties": {"file_id": {"type": "integer", "minimum": 1, "maximum": 2 ** 63 - 1}},
    "required": ["file_id"],
    "additionalProperties": False,
}
PROJECT_INPUT = {
    "type": "object",
    "properties": {"project": {"type": "string", "minLength": 1, "maxLength": 255}},
    "required": ["project"],
    "additionalProperties": False,
}


class Operation:
    """Base of every operation; subclasses set the class attributes and ``run``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    input_schema: ClassVar[dict] = FILE_INPUT
    # Kinds of input it applies to ("anndata", "table", "other", "project"); the project
    # build runs every operation that applies to a file's kind on that file.
    applies_to: ClassVar[tuple[str, ...]] = ()
    # The deployment's settings, given by the engine that runs the operation (None in isolation).
    settings: Settings | None = None

    def input_files(self, inputs: dict, catalog: Catalog) -> list[FileRecord]:
        """The files the result depends on: their digests are part of the cache key."""
        if "file_id" in inputs:
            record = catalog.file(inputs["file_id"])
            if record is None:
                raise UnprocessableEntity(f"inputs: no file {inputs['file_id']}", code="unknown_input")
            return [record]
        if "project" in inputs:
            if catalog.project(inputs["project"]) is None:
                raise UnprocessableEntity(f"inputs: no project {str(inputs['project'])[:100]!r}",
                                          code="unknown_input")
            return catalog.files_of_project(inputs["project"])
        return []

    def finished(self, engine, run) -> None:
        """Called once a run of this operation ended ``ok`` and its outputs are stored."""

    def extra_digests(self, inputs: dict, files: list[FileRecord], catalog: Catalog) -> dict[str, str]:
        """Digests of what else the result depends on (metadata, a template), keyed apart from file ids."""
        return {}

    def run(self, context: RunContext) -> dict[str, Any]:
        """Compute; report progress with ``context.progress``, add files with ``context.add_output``;
        return the result as JSON-able data. Raise a ``LabvaultError`` with a code for bad input."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "input_schema": self.input_schema, "applies_to": list(self.applies_to)}


@dataclass
class RunContext:
    """What a running operation sees: its inputs and files, progress, outputs, other runs."""

    engine: Any  # the stats_service.runs.Engine running it
    run: Run
    inputs: dict
    files: list[FileRecord]
    workdir: Path
    outputs: dict[str, tuple[Path, str]] = field(default_factory=dict)
    _last_progress: float = 0.0

    @property
    def settings(self) -> Settings:
        return self.engine.settings

    @property
    def catalog(self) -> Catalog:
        return self.engine.catalog

    def progress(self, percent: float, message: str = "") -> None:
        """Record 0-100 progress (at most twice a second)."""
        now = time.monotonic()
        if now - self._last_progress < 0.5 and percent < 100:
            return
        self._last_progress = now
        (Run.update(percent=max(0.0, min(100.0, float(percent))), message=message[:500], heartbeat=utcnow())
         .where(Run.run_id == self.run.run_id).execute())

    def fetch(self, record: FileRecord) -> Path:
        """The archived bytes of ``record`` in a private temporary file, verified against its digest."""
        # The name keeps its suffix: readers tell .tsv from .csv by it.
        target = self.workdir / f"input-{record.file_id}{PurePosixPath(record.name).suffix[:16]}"
        if not target.exists():
            self.engine.download(record.file_id, target, record.hashtype, record.hashsum)
        return target

    def path(self, name: str) -> Path:
        """A private temporary path to write an output (or scratch data) to."""
        return self.workdir / f"out-{len(self.outputs)}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"

    def add_output(self, name: str, data: bytes | Path, content_type: str) -> None:
        """Keep ``data`` (bytes, or a file from ``path``) as output ``name`` of this run."""
        if isinstance(data, (bytes, bytearray)):
            target = self.path(name)
            target.write_bytes(data)
            data = target
        self.outputs[name] = (Path(data), content_type)

    def obtain(self, operation: str, inputs: dict) -> Run:
        """The ``ok`` run of another operation (cached, or run now in this process)."""
        return self.engine.obtain(operation, inputs)

    def output_bytes(self, run: Run, name: str) -> bytes:
        return self.engine.output_bytes(run, name)
