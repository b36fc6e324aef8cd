"""Ingest of one Pacifica metadata document: its transaction, files and key/values.

The document is checked completely before the database is touched, then every
row goes in inside one transaction, so a rejected document leaves nothing behind.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import peewee

from common.errors import BadRequest, Conflict
from metadata_service.models import (Files, FileKeyValue, Instruments, Keys, Projects, Transactions,
                                     TransKeyValue, Users, Values, utcnow, write_transaction)
from metadata_service.objects import (check_hash, check_hashtype, check_mimetype, check_text, coerce,
                                      integrity_error, normalise_subdir, parse_date, parse_datetime)

logger = logging.getLogger(__name__)

INVALID = "invalid_metadata"
DEFAULT_MIMETYPE = "application/octet-stream"
# A value is a unique index entry; PostgreSQL's btree refuses entries much above 2.7 kB.
MAX_VALUE_BYTES = 2048
# Rows per INSERT: stays under SQLite's 999 bound parameters on old builds.
BATCH = 50

_TRANSACTION_TABLES = {
    "Transactions._id": Transactions.id,
    "Transactions.submitter": Transactions.submitter,
    "Transactions.project": Transactions.project,
    "Transactions.instrument": Transactions.instrument,
}


@dataclass
class FileEntry:
    index: int
    id: int
    name: str
    subdir: str
    size: int
    mimetype: str
    hashtype: str | None
    hashsum: str | None
    mtime: datetime.datetime | None
    ctime: datetime.datetime | None
    suspense_date: datetime.date | None
    encoding: str

    @property
    def path(self) -> str:
        return f"{self.subdir}/{self.name}" if self.subdir else self.name

    def row(self, transaction_id: int) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "subdir": self.subdir, "size": self.size,
                "mimetype": self.mimetype, "hashtype": self.hashtype, "hashsum": self.hashsum,
                "mtime": self.mtime, "ctime": self.ctime, "suspense_date": self.suspense_date,
                "encoding": self.encoding, "transaction": transaction_id}


@dataclass
class Document:
    """A checked metadata document, ready to be written."""

    transaction_id: int
    submitter: int
    project: str
    instrument: int
    files: list[FileEntry] = field(default_factory=list)
    transaction_kvs: list[tuple[str, str]] = field(default_factory=list)
    file_kvs: list[tuple[int, str, str]] = field(default_factory=list)


def _text(value: Any, what: str, label: str, max_bytes: int = MAX_VALUE_BYTES) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(f"{what}: {label} must be a string", code=INVALID)
    check_text(value, f"{what}: {label}", INVALID)
    if len(value.encode("utf-8")) > max_bytes:
        raise BadRequest(f"{what}: {label} is longer than {max_bytes} bytes", code=INVALID)
    return value


def _key(entry: dict, what: str) -> str:
    if entry.get("key") in (None, ""):
        raise BadRequest(f"{what}: missing key", code=INVALID)
    if "value" not in entry or entry["value"] is None:
        raise BadRequest(f"{what}: missing value", code=INVALID)
    return _text(entry["key"], what, "key", Keys.key.max_length)


def _file_entry(index: int, entry: dict, what: str) -> FileEntry:
    for required in ("_id", "name", "size"):
        if entry.get(required) is None:
            raise BadRequest(f"{what}: missing {required}", code=INVALID)
    file_id = coerce(Files.id, entry["_id"], what, INVALID)
    name = entry["name"]
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise BadRequest(f"{what}: name must be a file name without '/', not {str(name)[:80]!r}", code=INVALID)
    check_text(name, f"{what}: name", INVALID)
    what = f"{what} {name!r}"
    size = coerce(Files.size, entry["size"], what, INVALID)
    if file_id < 0 or size < 0:
        raise BadRequest(f"{what}: _id and size must not be negative", code=INVALID)
    mimetype = entry.get("mimetype")
    mimetype = check_mimetype(mimetype, what) if mimetype not in (None, "") else DEFAULT_MIMETYPE
    hashtype, hashsum = entry.get("hashtype"), entry.get("hashsum")
    if hashsum not in (None, ""):
        hashtype, hashsum = check_hash(hashtype, hashsum, what)
    else:
        hashtype, hashsum = (check_hashtype(hashtype, what) if hashtype not in (None, "") else None), None
    encoding = entry.get("encoding")
    return FileEntry(
        index=index, id=file_id, name=name, subdir=normalise_subdir(entry.get("subdir"), what), size=size,
        mimetype=mimetype, hashtype=hashtype, hashsum=hashsum,
        mtime=parse_datetime(entry.get("mtime"), f"{what}: mtime"),
        ctime=parse_datetime(entry.get("ctime"), f"{what}: ctime"),
        suspense_date=parse_date(entry.get("suspense_date"), f"{what}: suspense_date"),
        encoding=_text(encoding, what, "encoding", 255) if encoding not in (None, "") else "UTF8")


def parse_document(document: Any) -> Document:
    """Check a Pacifica metadata list (plus ``Transactions._id`` and Files ``_id``s) without the database."""
    if not isinstance(document, list):
        raise BadRequest("metadata must be a JSON list of objects", code=INVALID)
    transaction: dict[str, Any] = {}
    files: list[FileEntry] = []
    transaction_kvs: dict[tuple[str, str], None] = {}
    file_kv_entries: list[tuple[int, dict]] = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise BadRequest(f"metadata[{index}] is not an object", code=INVALID)
        table = entry.get("destinationTable")
        if not isinstance(table, str):
            continue  # not a table name: ignored like an unknown table
        what = f"metadata[{index}] ({table})"
        if table in _TRANSACTION_TABLES:
            if entry.get("value") in (None, ""):
                raise BadRequest(f"{what}: missing value", code=INVALID)
            value = coerce(_TRANSACTION_TABLES[table], entry["value"], what, INVALID)
            if transaction.setdefault(table, value) != value:
                raise BadRequest(f"{what}: given twice with different values", code=INVALID)
        elif table == "Files":
            files.append(_file_entry(index, entry, what))
        elif table == "TransactionKeyValue":
            transaction_kvs[(_key(entry, what), _text(entry["value"], what, "value"))] = None
        elif table == "FileKeyValue":
            file_kv_entries.append((index, entry))
        # Any other destinationTable is ignored: real clients add their own.
    for table in _TRANSACTION_TABLES:
        if table not in transaction:
            raise BadRequest(f"metadata has no {table} entry", code=INVALID)
    if transaction["Transactions._id"] < 0:
        raise BadRequest("Transactions._id must not be negative", code=INVALID)
    return Document(
        transaction_id=transaction["Transactions._id"], submitter=transaction["Transactions.submitter"],
        project=transaction["Transactions.project"], instrument=transaction["Transactions.instrument"],
        files=_unique_files(files), transaction_kvs=list(transaction_kvs),
        file_kvs=_file_kvs(file_kv_entries, files))


def _unique_files(files: list[FileEntry]) -> list[FileEntry]:
    by_id: dict[int, FileEntry] = {}
    by_path: dict[str, FileEntry] = {}
    for entry in files:
        if entry.id in by_id:
            raise Conflict(f"metadata[{entry.index}] (Files): _id {entry.id} is also the _id of "
                           f"metadata[{by_id[entry.id].index}]", code="duplicate_id")
        if entry.path in by_path:
            raise BadRequest(f"metadata[{entry.index}] (Files): {entry.path!r} is also declared by "
                             f"metadata[{by_path[entry.path].index}]", code=INVALID)
        by_id[entry.id], by_path[entry.path] = entry, entry
    return files


def _file_kvs(entries: list[tuple[int, dict]], files: list[FileEntry]) -> list[tuple[int, str, str]]:
    ids = {entry.id for entry in files}
    by_path = {entry.path: entry.id for entry in files}
    found: dict[tuple[int, str, str], None] = {}
    for index, entry in entries:
        what = f"metadata[{index}] (FileKeyValue)"
        key = _key(entry, what)
        value = _text(entry["value"], what, "value")
        reference = entry.get("file", entry.get("file_id"))
        if reference is not None:
            file_id = coerce(Files.id, reference, what, INVALID)
            if file_id not in ids:
                raise BadRequest(f"{what}: file {file_id} is not the _id of a Files entry", code=INVALID)
        elif isinstance(entry.get("name"), str):
            path = normalise_subdir(entry.get("subdir"), what)
            path = f"{path}/{entry['name']}" if path else entry["name"]
            if path not in by_path:
                raise BadRequest(f"{what}: no Files entry is named {path!r}", code=INVALID)
            file_id = by_path[path]
        else:
            raise BadRequest(f"{what}: name the file by file, file_id or name and subdir", code=INVALID)
        found[(file_id, key, value)] = None
    return list(found)


def ingest_document(document: Any) -> dict[str, str]:
    """Write a metadata document in one transaction; ``{"status": "success"}`` or a domain error."""
    doc = parse_document(document)
    with write_transaction():
        _check_database(doc)
        try:
            _write(doc)
        except (peewee.IntegrityError, peewee.DataError) as exc:
            # Only a concurrent writer can get here: the checks above saw no conflict.
            logger.info("ingest of transaction %d refused by the database: %s", doc.transaction_id, exc)
            raise integrity_error(exc, f"transaction {doc.transaction_id}", "insert") from None
    logger.info("ingested transaction %d: %d files, %d key/values", doc.transaction_id, len(doc.files),
                len(doc.transaction_kvs) + len(doc.file_kvs))
    return {"status": "success"}


def _check_database(doc: Document) -> None:
    if Transactions.select().where(Transactions.id == doc.transaction_id).exists():
        raise Conflict(f"transaction {doc.transaction_id} already exists", code="duplicate_id")
    by_id = {entry.id: entry for entry in doc.files}
    for chunk in peewee.chunked(sorted(by_id), 500):
        taken = Files.select(Files.id).where(Files.id.in_(chunk)).order_by(Files.id).limit(1).scalar()
        if taken is not None:
            raise Conflict(f"metadata[{by_id[taken].index}] (Files) {by_id[taken].name!r}: file _id {taken} "
                           f"already exists", code="duplicate_id")
    for model, value, code in ((Users, doc.submitter, "unknown_submitter"),
                               (Projects, doc.project, "unknown_project"),
                               (Instruments, doc.instrument, "unknown_instrument")):
        if not model.select().where(model.id == value).exists():
            raise BadRequest(f"{model._meta.table_name} has no {value!r}", code=code)


def _write(doc: Document) -> None:
    now = utcnow()
    Transactions.insert(id=doc.transaction_id, submitter=doc.submitter, project=doc.project,
                        instrument=doc.instrument, created=now, updated=now).execute()
    for chunk in peewee.chunked([entry.row(doc.transaction_id) for entry in doc.files], BATCH):
        Files.insert_many(chunk).execute()
    keys = _ids_for(Keys, Keys.key, {kv[0] for kv in doc.transaction_kvs} | {kv[1] for kv in doc.file_kvs})
    values = _ids_for(Values, Values.value,
                      {kv[1] for kv in doc.transaction_kvs} | {kv[2] for kv in doc.file_kvs})
    rows = [{"transaction": doc.transaction_id, "key": keys[key], "value": values[value]}
            for key, value in doc.transaction_kvs]
    for chunk in peewee.chunked(rows, BATCH):
        TransKeyValue.insert_many(chunk).execute()
    rows = [{"file": file_id, "key": keys[key], "value": values[value]} for file_id, key, value in doc.file_kvs]
    for chunk in peewee.chunked(rows, BATCH):
        FileKeyValue.insert_many(chunk).execute()


def _ids_for(model: type[peewee.Model], field: peewee.Field, texts: set[str]) -> dict[str, int]:
    """Ids of the rows holding ``texts`` in ``field``, creating the missing ones."""
    found: dict[str, int] = {}
    for chunk in peewee.chunked(sorted(texts), BATCH):
        # ON CONFLICT DO NOTHING: another ingest may create the same key at the same time.
        (model.insert_many([{field.name: text} for text in chunk])
         .on_conflict(action="NOTHING", conflict_target=[field]).execute())
        for pk, text in model.select(model.id, field).where(field.in_(chunk)).tuples():
            found[text] = pk
    return found
