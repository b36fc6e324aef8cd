"""Record the objects already in a bucket as archive files, in one metadata transaction.

``import_bucket`` lists ``s3://bucket/prefix``, compares the listing with what earlier
runs imported (``ImportedObject``), copies each new object into the archive (a
server-side copy when the archive is on the same S3 endpoint, streamed through the
archive otherwise), verifies every copy by reading it back, and records all of them
as one transaction in the metadata service. A later run adds new objects and reports
removed and changed ones; archived files are never changed (write-once). A run that
finds every previously imported object gone refuses unless told the wipe is wanted.

All or nothing: when a copy or the metadata ingest fails, the copies this run made are
deleted and nothing is recorded. Plain Python; boto3 is imported by the S3 backend only.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import logging
import mimetypes
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable

from archive_service.archive import Archive
from archive_service.models import ImportedObject, database
from common.db import utcnow
from common.errors import BadRequest, LabvaultError, NotFound

logger = logging.getLogger(__name__)

_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
# CopyObject's limit; larger objects are streamed through the archive.
MAX_SERVER_COPY = 5 * 1024 ** 3
COPY_WORKERS = 8


class BucketWipeRefused(LabvaultError):
    status, code = 409, "bucket_wipe_refused"


@dataclass(frozen=True)
class Source:
    bucket: str
    prefix: str  # "" or ending in "/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class SourceObject:
    key: str
    etag: str
    size: int
    modified: datetime.datetime


@dataclass
class ImportReport:
    source: str
    transaction_id: int | None = None
    added: list[tuple[str, int]] = field(default_factory=list)  # (key, file id)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0


def parse_source(url: str) -> Source:
    """``s3://bucket[/prefix]`` -> Source; 400 ``invalid_source`` otherwise."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", str(url).strip())
    if not match:
        raise BadRequest(f"source must look like s3://bucket/prefix, not {str(url)[:100]!r}", code="invalid_source")
    prefix = (match.group(2) or "").strip("/")
    return Source(match.group(1), f"{prefix}/" if prefix else "")


def list_objects(client, source: Source) -> list[SourceObject]:
    """Every object under the source prefix ("directory" placeholders left out)."""
    from archive_service.s3 import is_missing, unavailable  # the S3 backend's error vocabulary

    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix):
            for item in page.get("Contents") or []:
                if item["Key"].endswith("/"):
                    continue
                found.append(SourceObject(item["Key"], item["ETag"].strip('"').lower(), int(item["Size"]),
                                          item["LastModified"]))
    except Exception as exc:  # noqa: BLE001 - botocore's errors, told in the archive's words
        if is_missing(exc):
            raise NotFound(f"bucket {source.bucket!r} does not exist", code="source_not_found") from None
        raise unavailable(f"list {source.url}", exc) from None
    return found


def import_bucket(archive: Archive, client, source: Source, metadata, submitter, project, instrument,
                  allow_wipe: bool = False, server_side: bool = True) -> ImportReport:
    """Import what is new under ``source``; report what was removed or changed since earlier runs.

    ``client``: a boto3 S3 client for the source; ``metadata``: a ``MetadataClient``;
    ``server_side``: the archive's backend can copy from the source bucket itself.
    """
    report = ImportReport(source.url)
    listing = {obj.key: obj for obj in list_objects(client, source)}
    records = {row.key: row for row in ImportedObject.select().where(
        (ImportedObject.bucket == source.bucket) & (ImportedObject.prefix == source.prefix))}
    present = {key: row for key, row in records.items() if row.removed is None}
    if present and not listing and not allow_wipe:
        raise BucketWipeRefused(f"every object under {source.url} is gone ({len(present)} imported before); "
                                "pass --allow-bucket-wipe if that is intended")
    report.removed = sorted(key for key in present if key not in listing)
    new = [obj for key, obj in sorted(listing.items()) if key not in present]
    for key, row in present.items():
        obj = listing.get(key)
        if obj is not None and (obj.etag != row.etag or obj.size != row.size):
            report.changed.append(key)
    report.unchanged = len(present) - len(report.removed) - len(report.changed)

    if new:
        report.transaction_id = metadata.getid("upload_job", 1)
        first = metadata.getid("file", len(new))
        file_ids = {obj.key: first + n for n, obj in enumerate(new)}
        entries = _copy_all(archive, client, source, new, file_ids, server_side)
        try:
            metadata.ingest(_document(report.transaction_id, source, submitter, project, instrument, new,
                                      entries, file_ids))
        except BaseException:
            _forget(archive, file_ids.values())
            raise
        report.added = [(obj.key, file_ids[obj.key]) for obj in new]
    _record(source, report, listing, new)
    logger.info("import of %s: %d added, %d removed, %d changed, %d unchanged", source.url, len(report.added),
                len(report.removed), len(report.changed), report.unchanged)
    return report


def _copy_all(archive: Archive, client, source: Source, objects: list[SourceObject], file_ids: dict[str, int],
              server_side: bool) -> dict[str, dict]:
    """Copy and verify every object (in parallel); on any failure remove every copy and raise."""
    done: dict[str, dict] = {}

    def one(obj: SourceObject) -> tuple[str, dict]:
        # Each worker thread has its own connection; give it back when the copy is recorded.
        with database.connection_context():
            return obj.key, _copy_one(archive, client, source, obj, file_ids[obj.key], server_side)

    with concurrent.futures.ThreadPoolExecutor(max_workers=COPY_WORKERS) as pool:
        futures = [pool.submit(one, obj) for obj in objects]
        failure: BaseException | None = None
        for future in concurrent.futures.as_completed(futures):
            try:
                key, entry = future.result()
                done[key] = entry
            except BaseException as exc:  # noqa: BLE001 - collected, then raised after cleanup
                failure = failure or exc
                for other in futures:
                    other.cancel()
    if failure is not None:
        _forget(archive, file_ids.values())
        raise failure
    return done


def _copy_one(archive: Archive, client, source: Source, obj: SourceObject, file_id: int,
              server_side: bool) -> dict:
    md5 = obj.etag if _PLAIN_MD5.fullmatch(obj.etag) else None
    if server_side and obj.size <= MAX_SERVER_COPY:
        archive.storage.copy_in(file_id, source.bucket, obj.key)
        # A multipart ETag is no digest of the bytes: read the source too and compare sha256.
        info = archive.adopt(file_id, obj.size, obj.modified, md5=md5,
                             source_sha256=None if md5 else _source_sha256(client, source, obj))
    else:
        body = client.get_object(Bucket=source.bucket, Key=obj.key)["Body"]
        try:
            archive.put(file_id, body, "md5" if md5 else None, md5, mtime=obj.modified, size=obj.size)
        finally:
            body.close()
        info = archive.stat(file_id)
    return {"sha256": info.sha256, "size": info.size}


def _source_sha256(client, source: Source, obj: SourceObject) -> Callable[[], str]:
    def digest() -> str:
        import hashlib
        hasher = hashlib.sha256()
        body = client.get_object(Bucket=source.bucket, Key=obj.key)["Body"]
        try:
            for chunk in iter(lambda: body.read(1024 * 1024), b""):
                hasher.update(chunk)
        finally:
            body.close()
        return hasher.hexdigest()
    return digest


def _document(transaction_id: int, source: Source, submitter, project, instrument, objects: list[SourceObject],
              entries: dict[str, dict], file_ids: dict[str, int]) -> list[dict]:
    document: list[dict] = [
        {"destinationTable": "Transactions.submitter", "value": submitter},
        {"destinationTable": "Transactions.project", "value": str(project)},
        {"destinationTable": "Transactions.instrument", "value": instrument},
        {"destinationTable": "Transactions._id", "value": transaction_id},
        {"destinationTable": "TransactionKeyValue", "key": "imported_from", "value": source.url},
    ]
    for obj in objects:
        relative = obj.key[len(source.prefix):]
        subdir, name = posixpath.split(relative)
        modified = obj.modified.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        document.append({
            "destinationTable": "Files", "_id": file_ids[obj.key], "name": name, "subdir": subdir,
            "size": entries[obj.key]["size"], "hashtype": "sha256", "hashsum": entries[obj.key]["sha256"],
            "mimetype": mimetypes.guess_type(name)[0] or "application/octet-stream",
            "mtime": modified, "ctime": modified,
        })
    return document


def _record(source: Source, report: ImportReport, listing: dict[str, SourceObject],
            new: list[SourceObject]) -> None:
    now = utcnow()
    ids = dict(report.added)
    with database.atomic():
        for obj in new:
            (ImportedObject
             .insert(bucket=source.bucket, prefix=source.prefix, key=obj.key, file_id=ids[obj.key],
                     transaction_id=report.transaction_id, etag=obj.etag, size=obj.size, imported=now,
                     removed=None)
             .on_conflict(conflict_target=[ImportedObject.bucket, ImportedObject.prefix, ImportedObject.key],
                          update={ImportedObject.file_id: ids[obj.key],
                                  ImportedObject.transaction_id: report.transaction_id,
                                  ImportedObject.etag: obj.etag, ImportedObject.size: obj.size,
                                  ImportedObject.imported: now, ImportedObject.removed: None})
             .execute())
        if report.removed:
            for start in range(0, len(report.removed), 500):
                (ImportedObject.update(removed=now)
                 .where((ImportedObject.bucket == source.bucket) & (ImportedObject.prefix == source.prefix)
                        & ImportedObject.key.in_(report.removed[start:start + 500]))
                 .execute())


def _forget(archive: Archive, file_ids) -> None:
    for file_id in file_ids:
        try:
            archive.delete(file_id)
        except LabvaultError as exc:
            if exc.status != 404:
                logger.warning("import: removing file %d failed: %s", file_id, exc.as_exception_text())
