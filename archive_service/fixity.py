"""Fixity: re-read stored files, re-compute their digest, record ``ok | mismatch | unreadable``.

Plain Python (no CherryPy, no Celery): the command line, the Celery task and the HTTP
endpoints call these functions. Each run does bounded work (``limit`` files, those
checked longest ago first, never-checked ones before all), so a periodic run walks the
whole archive over time. A file whose bytes cannot be read is ``unreadable``, never ``ok``.
Every check is kept in ``FixityCheck``; the file row carries the last one.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

from peewee import fn

from archive_service.models import MISMATCH, OK, RESULTS, UNREADABLE, ArchiveFile, FixityCheck, database
from archive_service.storage import Storage
from common.db import utcnow
from common.errors import BadRequest
from common.hashing import CHUNK_SIZE, new_hasher

logger = logging.getLogger(__name__)

PROBLEMS = (MISMATCH, UNREADABLE)
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Outcome:
    file_id: int
    result: str
    detail: str
    checked: datetime.datetime  # naive UTC

    def __str__(self) -> str:
        return f"file {self.file_id}: {self.result}" + (f" ({self.detail})" if self.detail else "")


def check_file(storage: Storage, row: ArchiveFile, now: datetime.datetime | None = None) -> Outcome:
    """Read ``row``'s bytes back, compare size and digest with the record, and record the result."""
    now = now or utcnow()
    # Files archived before the archive kept a sha256 are checked against the declared hash.
    hashtype, expected = ("sha256", row.sha256) if row.sha256 else (row.hashtype, row.hashsum)
    hasher, sha256, size = new_hasher(hashtype), new_hasher("sha256"), 0
    try:
        with storage.open_read(row.file_id) as handle:
            while chunk := handle.read(CHUNK_SIZE):
                hasher.update(chunk)
                sha256.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return _record(row, UNREADABLE, "no stored bytes", None, None, now)
    except Exception as exc:  # noqa: BLE001 - whatever stops the read, the bytes were not verified
        logger.warning("fixity: reading file %d failed", row.file_id, exc_info=True)
        return _record(row, UNREADABLE, f"reading failed: {_one_line(exc)}", None, size, now)
    if size != row.size:
        return _record(row, MISMATCH, f"size {size}, recorded {row.size}", sha256.hexdigest(), size, now)
    if hasher.hexdigest() != expected:
        return _record(row, MISMATCH, f"{hashtype} {hasher.hexdigest()}, recorded {expected}",
                       sha256.hexdigest(), size, now)
    return _record(row, OK, "", sha256.hexdigest(), size, now)


def run(storage: Storage, limit: int = 100, older_than_days: float | None = None,
        file_id: int | None = None) -> list[Outcome]:
    """Check at most ``limit`` files: ``file_id`` alone, or those not checked for
    ``older_than_days`` days (all when None), oldest check first."""
    if limit < 1:
        raise BadRequest("limit must be at least 1", code="invalid_limit")
    query = ArchiveFile.select()
    if file_id is not None:
        query = query.where(ArchiveFile.file_id == file_id)
    else:
        if older_than_days is not None:
            cutoff = utcnow() - datetime.timedelta(days=older_than_days)
            query = query.where(ArchiveFile.fixity_checked.is_null() | (ArchiveFile.fixity_checked < cutoff))
        # Never-checked first (false sorts before true), then the longest ago.
        query = query.order_by(ArchiveFile.fixity_checked.is_null(False), ArchiveFile.fixity_checked,
                               ArchiveFile.file_id)
    outcomes = [check_file(storage, row) for row in query.limit(limit)]
    problems = sum(outcome.result != OK for outcome in outcomes)
    logger.info("fixity: checked %d file(s), %d problem(s)", len(outcomes), problems)
    return outcomes


def problems(result: str | None = None, page_number: int = 1, items_per_page: int = 100) -> dict:
    """Files whose last check found ``result`` (default: any problem), a page at a time."""
    wanted = PROBLEMS if not result else (_valid_result(result),)
    if page_number < 1 or not 1 <= items_per_page <= MAX_PAGE_SIZE:
        raise BadRequest(f"page_number must be 1 or more and items_per_page 1 to {MAX_PAGE_SIZE}",
                         code="invalid_page")
    query = ArchiveFile.select().where(ArchiveFile.fixity_result.in_(wanted))
    total = query.count()
    rows = list(query.order_by(ArchiveFile.file_id).paginate(page_number, items_per_page))
    return {"result": list(wanted), "page_number": page_number, "items_per_page": items_per_page,
            "total": total, "items": [_describe(row) for row in rows]}


def summary() -> dict:
    """How many files' last check found each result, and how many were never checked."""
    counts = {name: 0 for name in RESULTS}
    for value, count in (ArchiveFile.select(ArchiveFile.fixity_result, fn.COUNT(ArchiveFile.file_id))
                         .group_by(ArchiveFile.fixity_result).tuples()):
        key = "unchecked" if value is None else value
        counts[key] = counts.get(key, 0) + count
    counts.setdefault("unchecked", 0)
    oldest = ArchiveFile.select(fn.MIN(ArchiveFile.fixity_checked)).scalar()
    return {**counts, "total": sum(counts.values()),
            "oldest_check": oldest.isoformat(sep=" ") if oldest else None}


def history(file_id: int, limit: int = 100) -> list[dict]:
    """The checks of one file, newest first."""
    rows = (FixityCheck.select().where(FixityCheck.file_id == file_id)
            .order_by(FixityCheck.checked.desc(), FixityCheck.id.desc()).limit(limit))
    return [{"checked": row.checked.isoformat(sep=" "), "result": row.result, "detail": row.detail,
             "sha256": row.sha256, "size": row.size} for row in rows]


def _record(row: ArchiveFile, result: str, detail: str, sha256: str | None, size: int | None,
            now: datetime.datetime) -> Outcome:
    detail = detail[:255]
    with database.atomic():
        FixityCheck.create(file_id=row.file_id, checked=now, result=result, sha256=sha256, size=size,
                           detail=detail)
        update = {ArchiveFile.fixity_checked: now, ArchiveFile.fixity_result: result}
        if result == OK and not row.sha256:
            update[ArchiveFile.sha256] = sha256  # verified against the declared hash: keep it now
        ArchiveFile.update(update).where(ArchiveFile.file_id == row.file_id).execute()
    if result != OK:
        logger.warning("fixity: file %d is %s: %s", row.file_id, result, detail)
    return Outcome(row.file_id, result, detail, now)


def _describe(row: ArchiveFile) -> dict:
    last = (FixityCheck.select().where(FixityCheck.file_id == row.file_id)
            .order_by(FixityCheck.checked.desc(), FixityCheck.id.desc()).first())
    return {"file_id": row.file_id, "size": row.size, "hashtype": row.hashtype, "hashsum": row.hashsum,
            "sha256": row.sha256, "result": row.fixity_result,
            "checked": row.fixity_checked.isoformat(sep=" ") if row.fixity_checked else None,
            "detail": last.detail if last else ""}


def _valid_result(value: str) -> str:
    text = str(value).strip().lower()
    if text not in RESULTS:
        raise BadRequest(f"result must be one of {', '.join(RESULTS)}, not {str(value)[:40]!r}",
                         code="invalid_result")
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
