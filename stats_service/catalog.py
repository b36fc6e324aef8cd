"""What the stats service knows of projects and files: read from the metadata service.

A file's *digest* (``hashtype:hashsum`` as ingested and verified by the archive) names its
content; operation results are cached by it, so a file whose bytes did not change is never
processed twice.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

from common.access import Directory
from common.clients import MetadataClient
from common.errors import LabvaultError, NotFound

PAGE = 1000

# Kinds of file an operation may apply to, from the file name.
ANNDATA, TABLE, OTHER, PROJECT = "anndata", "table", "other", "project"
_SUFFIXES = {".h5ad": ANNDATA, ".csv": TABLE, ".tsv": TABLE}


def kind_of(name: str) -> str:
    """The kind of a file by its name: ``anndata`` (.h5ad), ``table`` (.csv, .tsv) or ``other``."""
    return _SUFFIXES.get(posixpath.splitext(name.lower())[1], OTHER)


@dataclass(frozen=True)
class FileRecord:
    file_id: int
    name: str
    subdir: str
    size: int
    hashtype: str
    hashsum: str
    mimetype: str
    transaction: int
    project: str

    @property
    def path(self) -> str:
        return posixpath.join(self.subdir, self.name) if self.subdir else self.name

    @property
    def digest(self) -> str:
        return f"{self.hashtype}:{self.hashsum}"

    @property
    def kind(self) -> str:
        return kind_of(self.name)


class Catalog:
    """Projects and their files, from the metadata service (deleted rows left out)."""

    def __init__(self, metadata: MetadataClient):
        self.metadata = metadata
        self.directory = Directory(metadata)

    def project(self, project_id: str) -> dict | None:
        try:
            return _live(self.metadata.first("projects", _id=str(project_id)))
        except LabvaultError as exc:
            if exc.code == "invalid_filter":  # a value the column cannot hold names no project
                return None
            raise

    def require_project(self, project_id: str) -> dict:
        project = self.project(project_id)
        if project is None:
            raise NotFound(f"no project {str(project_id)[:100]!r}", code="project_not_found")
        return project

    def projects(self) -> list[str]:
        return [str(row["_id"]) for row in self._all("projects") if _live(row)]

    def file(self, file_id: int) -> FileRecord | None:
        try:
            row = _live(self.metadata.first("files", _id=int(file_id)))
        except LabvaultError as exc:
            if exc.code == "invalid_filter":
                return None
            raise
        if row is None:
            return None
        transaction = self.metadata.first("transactions", _id=row["transaction"]) or {}
        return _record(row, str(transaction.get("project")))

    def require_file(self, file_id: int) -> FileRecord:
        record = self.file(file_id)
        if record is None:
            raise NotFound(f"no file {file_id}", code="file_not_found")
        return record

    def files_of_project(self, project_id: str) -> list[FileRecord]:
        """Every live file of the project's transactions, by file id."""
        transactions = {row["_id"] for row in self._all("transactions", project=str(project_id)) if _live(row)}
        files = [_record(row, str(project_id)) for row in self._by("files", "transaction", transactions)]
        return sorted(files, key=lambda record: record.file_id)

    def describe(self, files: list[FileRecord]) -> list[dict[str, Any]]:
        """Each file with its transaction's submitter and instrument and its key/values (the
        transaction's, then the file's own, which win for a key both have; several values of
        one key become a list), as ``metadata.tsv`` and the sample layout need them."""
        transactions = {row["_id"]: row for row in self._by("transactions", "_id", {f.transaction for f in files})}
        trans_pairs = self._by("trans_key_value", "transaction", set(transactions))
        file_pairs = self._by("file_key_value", "file", {f.file_id for f in files})
        keys = {row["_id"]: row["key"] for row in self._by("keys", "_id", {p["key"] for p in trans_pairs + file_pairs})}
        values = {row["_id"]: row["value"]
                  for row in self._by("values", "_id", {p["value"] for p in trans_pairs + file_pairs})}

        def gather(pairs, owner: str) -> dict[Any, dict[str, list[str]]]:
            found: dict[Any, dict[str, list[str]]] = {}
            for pair in pairs:
                if pair["key"] in keys and pair["value"] in values:
                    found.setdefault(pair[owner], {}).setdefault(keys[pair["key"]], []).append(values[pair["value"]])
            return found
        by_transaction, by_file = gather(trans_pairs, "transaction"), gather(file_pairs, "file")
        described = []
        for record in files:
            transaction = transactions.get(record.transaction, {})
            merged = {**by_transaction.get(record.transaction, {}), **by_file.get(record.file_id, {})}
            described.append({"record": record, "submitter": transaction.get("submitter"),
                              "instrument": transaction.get("instrument"), "created": transaction.get("created"),
                              "keys": {key: sorted(vals) if len(vals) > 1 else vals[0]
                                       for key, vals in sorted(merged.items())}})
        return described

    def _by(self, objects: str, field: str, ids: set) -> list[dict]:
        """Live rows of ``objects`` whose ``field`` is one of ``ids`` (asked 100 at a time)."""
        ids = sorted(ids, key=str)
        found: list[dict] = []
        for start in range(0, len(ids), 100):
            found.extend(row for row in self._all(objects, **{field: ids[start:start + 100]}) if _live(row))
        return found

    def _all(self, objects: str, **filters) -> Iterator[dict]:
        page = 1
        while True:
            rows = self.metadata.query(objects, page_number=page, items_per_page=PAGE, **filters)
            yield from rows
            if len(rows) < PAGE:
                return
            page += 1


def _live(row: dict | None) -> dict | None:
    return row if row is not None and row.get("deleted") is None else None


def _record(row: dict, project: str) -> FileRecord:
    return FileRecord(file_id=int(row["_id"]), name=str(row["name"]), subdir=str(row.get("subdir") or ""),
                      size=int(row["size"]), hashtype=str(row.get("hashtype") or ""),
                      hashsum=str(row.get("hashsum") or ""), mimetype=str(row.get("mimetype") or ""),
                      transaction=int(row["transaction"]), project=project)
