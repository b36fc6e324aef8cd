"""What an operation is: a named, versioned, described computation on files or projects.

An operation is one class. The engine (``stats_service.runs``) validates the inputs against
``input_schema`` (JSON Schema), works out which files the result depends on
(``input_files``), looks the result up in the cache under sha256(name, version, canonical
inputs, those files' digests), and only on a miss calls ``run`` with a context that fetches
files, reports progress and collects outputs. A third-party package adds operations through
the ``labvault.operations`` entry-point group (each entry names an ``Operation`` subclass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from common.errors import UnprocessableEntity

if TYPE_CHECKING:  # the engine imports this module
    from common.settings import Settings
    from stats_service.catalog import Catalog, FileRecord
    from stats_service.runs import RunContext

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
