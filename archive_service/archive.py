"""The archive's domain: write-once files by id, verified while they stream in.

Plain Python (no CherryPy): ``app.py`` decodes requests and calls ``Archive``.
The rules every way in (PUT, PATCH) shares:
- bytes are hashed as they are written (the declared hash type, and always sha256,
  which fixity checks re-compute); with an expected hash sum a mismatch aborts the
  write, so nothing becomes visible (no file, no temp file, no object, no row);
- write-once: the same bytes again are accepted without change, other bytes are a conflict;
- the bytes are published first and the row second, so a listed file always has bytes.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import stat as stat_module
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Protocol

from archive_service.models import ArchiveFile, database
from archive_service.storage import AlreadyExists, Storage
from common.db import utcnow
from common.errors import BadRequest, Conflict, Forbidden, NotFound
from common.hashing import CHUNK_SIZE, DEFAULT_HASH_TYPE, HEX_LENGTHS, new_hasher, normalise_hashsum, normalise_hashtype

logger = logging.getLogger(__name__)

# The digest the archive keeps of every file, whatever the writer declared.
SHA256 = "sha256"

# The id column is a signed 64-bit integer in every database we run on.
MAX_FILE_ID = 2 ** 63 - 1
_DIGITS = re.compile(r"[0-9]+")


class Readable(Protocol):
    def read(self, size: int = ...) -> bytes: ...


@dataclass(frozen=True)
class PutResult:
    created: bool
    total_bytes: int


@dataclass(frozen=True)
class FileInfo:
    file_id: int
    size: int
    hashtype: str
    hashsum: str
    mtime: datetime.datetime  # naive UTC
    created: datetime.datetime  # naive UTC
    sha256: str | None = None  # None only for files archived before the archive kept it

    @property
    def mtime_epoch(self) -> float:
        return _epoch(self.mtime)

    @property
    def created_epoch(self) -> float:
        return _epoch(self.created)


@dataclass(frozen=True)
class _Expected:
    hashtype: str
    hashsum: str | None


def parse_file_id(value: object) -> int:
    """A file id as a non-negative 64-bit int, or 400 ``invalid_file_id``."""
    text = str(value).strip() if value is not None else ""
    if isinstance(value, bool) or not _DIGITS.fullmatch(text) or int(text) > MAX_FILE_ID:
        raise BadRequest(f"file id must be a non-negative integer, not {text[:40]!r}", code="invalid_file_id")
    return int(text)


class Archive:
    """Write-once file store: ``storage`` holds the bytes, the ``ArchiveFile`` table their record."""

    def __init__(self, storage: Storage, patch_roots: Iterable[str | os.PathLike] = ()):
        self.storage = storage
        self.patch_roots = tuple(os.path.realpath(root) for root in patch_roots if str(root).strip())

    # -- writing ----------------------------------------------------------------

    def put(self, file_id: int | str, stream: Readable, hashtype: str | None = None,
            hashsum: str | None = None, mtime: datetime.datetime | float | None = None,
            size: int | None = None) -> PutResult:
        """Store ``stream`` under ``file_id``, verifying ``hashsum`` first; ``size``, if known, must match."""
        file_id = parse_file_id(file_id)
        expected = _expected(hashtype, hashsum)
        when = utcnow() if mtime is None else _utc_naive(mtime)
        existing = ArchiveFile.get_or_none(ArchiveFile.file_id == file_id)
        if existing is not None:
            return self._compare_with_record(existing, stream, expected, size)
        return self._write_new(file_id, stream, expected, when, size)

    def patch(self, file_id: int | str, path: str, hashtype: str | None = None,
              hashsum: str | None = None) -> PutResult:
        """Copy the server-local file ``path`` (under a patch root) in, with ``put``'s rules."""
        file_id = parse_file_id(file_id)
        source = self._allowed_source(path)
        try:
            # realpath already resolved every link; O_NOFOLLOW refuses one swapped in since.
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFound(f"source file {path!r} does not exist", code="source_not_found") from None
        except OSError as exc:
            raise Forbidden(f"cannot open source file {path!r}: {exc.strerror}",
                            code="path_not_allowed") from None
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise BadRequest(f"source {path!r} is not a regular file", code="source_not_file")
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        # The source is copied, never moved: a failed job deletes its archive files, so
        # taking the source away as well could lose the only copy of the data.
        with handle:
            return self.put(file_id, handle, hashtype, hashsum, mtime=st.st_mtime, size=st.st_size)

    def _write_new(self, file_id: int, stream: Readable, expected: _Expected,
                   when: datetime.datetime, size: int | None) -> PutResult:
        hashers = _hashers(expected.hashtype)
        with self.storage.begin_write(file_id) as upload:
            total = _copy(file_id, stream, upload.write, hashers.values(), size)
            digest, sha256 = hashers[expected.hashtype].hexdigest(), hashers[SHA256].hexdigest()
            _verify(file_id, expected, digest)
            try:
                upload.commit()
            except AlreadyExists:
                return self._settle_race(file_id, expected.hashtype, digest, sha256, total, when)
        try:
            with database.atomic():
                # Ignoring a conflict is safe: only a writer of these very bytes inserts a row
                # for this id (see _settle_race).
                _insert_ignore(file_id, total, expected.hashtype, digest, sha256, when)
        except BaseException:
            # The row is what makes a file archived; bytes without it must not stay behind.
            self.storage.delete(file_id)
            raise
        logger.info("archived file %d (%d bytes, %s %s)", file_id, total, expected.hashtype, digest)
        return PutResult(True, total)

    def _compare_with_record(self, existing: ArchiveFile, stream: Readable, expected: _Expected,
                             size: int | None) -> PutResult:
        hashers = _hashers(existing.hashtype, expected.hashtype)
        total = _copy(existing.file_id, stream, None, hashers.values(), size)
        _verify(existing.file_id, expected, hashers[expected.hashtype].hexdigest())
        if (total != existing.size or hashers[existing.hashtype].hexdigest() != existing.hashsum
                or (existing.sha256 and hashers[SHA256].hexdigest() != existing.sha256)):
            raise _exists(existing.file_id)
        return PutResult(False, total)

    def _settle_race(self, file_id: int, hashtype: str, digest: str, sha256: str, total: int,
                     when: datetime.datetime) -> PutResult:
        # Another writer published this id after our row lookup, or a crash left bytes
        # without their row. Identical bytes are the idempotent case, anything else a conflict.
        hasher = new_hasher(SHA256)
        try:
            with self.storage.open_read(file_id) as handle:
                stored = _copy(file_id, handle, None, [hasher], None)
        except FileNotFoundError:
            raise Conflict(f"file {file_id} changed while it was being written; try again",
                           code="file_exists") from None
        if stored != total or hasher.hexdigest() != sha256:
            raise _exists(file_id)
        # Heals a file left without its row; a no-op when the other writer's row is there
        # (and its own insert ignores ours).
        with database.atomic():
            _insert_ignore(file_id, total, hashtype, digest, sha256, when)
        return PutResult(False, total)

    def adopt(self, file_id: int, size: int, mtime: datetime.datetime | float,
              md5: str | None = None, source_sha256: Callable[[], str] | None = None) -> FileInfo:
        """Record bytes a backend already placed under ``file_id`` (a server-side copy), after
        reading them back: the size must be ``size`` and the md5 ``md5`` or, without one, the
        sha256 ``source_sha256()``. A copy that does not match is deleted (400 ``hash_mismatch``)."""
        file_id = parse_file_id(file_id)
        hashers = _hashers("md5")
        try:
            with self.storage.open_read(file_id) as handle:
                total = _copy(file_id, handle, None, hashers.values(), None)
            sha256 = hashers[SHA256].hexdigest()
            if total != size:
                raise BadRequest(f"file {file_id}: the copy has {total} bytes, the source {size}",
                                 code="hash_mismatch")
            if md5 is not None:
                _verify(file_id, _Expected("md5", md5.lower()), hashers["md5"].hexdigest())
            elif source_sha256 is not None:
                _verify(file_id, _Expected(SHA256, source_sha256()), sha256)
            with database.atomic():
                _insert_ignore(file_id, total, SHA256, sha256, sha256, _utc_naive(mtime))
        except BaseException:
            self.storage.delete(file_id)
            raise
        return self.stat(file_id)

    # -- reading and the rest -------------------------------------------------------

    def stat(self, file_id: int | str) -> FileInfo:
        """The stored record of ``file_id``; 404 ``file_not_found`` when absent."""
        file_id = parse_file_id(file_id)
        row = ArchiveFile.get_or_none(ArchiveFile.file_id == file_id)
        if row is None:
            raise NotFound(f"file {file_id} is not in the archive", code="file_not_found")
        return FileInfo(row.file_id, row.size, row.hashtype, row.hashsum, row.mtime, row.created, row.sha256)

    def open(self, file_id: int | str, start: int = 0, end: int | None = None) -> tuple[FileInfo, BinaryIO]:
        """The record and a stream of bytes ``start``..``end`` inclusive (the caller closes it;
        it need not be seekable); 404 when absent."""
        info = self.stat(file_id)
        try:
            return info, self.storage.open_read(info.file_id, start, end)
        except FileNotFoundError:
            logger.error("file %d has a record but no bytes in storage", info.file_id)
            raise NotFound(f"file {info.file_id} is not in the archive", code="file_not_found") from None

    def delete(self, file_id: int | str) -> None:
        """Remove the record and the bytes; 404 ``file_not_found`` when neither exists."""
        file_id = parse_file_id(file_id)
        with database.atomic():
            rows = ArchiveFile.delete().where(ArchiveFile.file_id == file_id).execute()
        # Record first: a crash in between leaves unlisted bytes (a second DELETE removes
        # them) rather than a listed file with no bytes.
        removed = self.storage.delete(file_id)
        if not rows and not removed:
            raise NotFound(f"file {file_id} is not in the archive", code="file_not_found")
        logger.info("deleted file %d", file_id)

    def stage(self, file_id: int | str) -> None:
        """Bring a file online for reading: nothing to do on disk or S3 beyond checking it exists."""
        self.stat(file_id)

    def _allowed_source(self, path: str) -> str:
        text = str(path or "")
        if not text or "\0" in text or not os.path.isabs(text):
            raise Forbidden(f"source {text[:200]!r} must be an absolute path", code="path_not_allowed")
        real = os.path.realpath(text)
        for root in self.patch_roots:
            if os.path.commonpath([root, real]) == root:
                return real
        raise Forbidden(f"source {text[:200]!r} is not under an allowed directory",
                        code="path_not_allowed")


def _expected(hashtype: str | None, hashsum: str | None) -> _Expected:
    """The hash to compute (and, with a sum, to demand), validated before any byte is read."""
    if hashsum is None or not str(hashsum).strip():
        return _Expected(normalise_hashtype(hashtype) if hashtype else DEFAULT_HASH_TYPE, None)
    if not hashtype:
        # A bare "sha256:..." names its own type.
        prefix, sep, _ = str(hashsum).partition(":")
        hashtype = prefix if sep else DEFAULT_HASH_TYPE
    name = normalise_hashtype(hashtype)
    digest = normalise_hashsum(hashsum, name)
    if len(digest) != HEX_LENGTHS[name]:
        # No byte can match a digest of the wrong length: refuse before reading the body,
        # as the mismatch it is (an ingest reports it at `ingest files`).
        raise BadRequest(f"expected {name} {digest[:80]!r} has the wrong length; the bytes cannot match it",
                         code="hash_mismatch")
    return _Expected(name, digest)


def _copy(file_id: int, stream: Readable, sink: Callable[[bytes], None] | None,
          hashers: Iterable, size: int | None) -> int:
    hashers = list(hashers)
    total = 0
    while True:
        try:
            chunk = stream.read(CHUNK_SIZE)
        except (OSError, ValueError) as exc:
            # A client that went away, or a malformed chunked body: the bytes are incomplete.
            raise BadRequest(f"file {file_id}: reading the body failed after {total} bytes ({exc})",
                             code="incomplete_body") from None
        if not chunk:
            break
        for hasher in hashers:
            hasher.update(chunk)
        if sink is not None:
            sink(chunk)
        total += len(chunk)
    if size is not None and total != size:
        raise BadRequest(f"file {file_id}: expected {size} bytes, received {total}", code="incomplete_body")
    return total


def _verify(file_id: int, expected: _Expected, actual: str) -> None:
    if expected.hashsum is not None and actual != expected.hashsum:
        logger.info("file %d: %s mismatch (expected %s, got %s)", file_id, expected.hashtype,
                    expected.hashsum, actual)
        raise BadRequest(f"file {file_id}: expected {expected.hashtype} {expected.hashsum}, got {actual}",
                         code="hash_mismatch")


def _exists(file_id: int) -> Conflict:
    return Conflict(f"file {file_id} is already archived with different content", code="file_exists")


def _hashers(*hashtypes: str) -> dict:
    """One hasher per named type, and sha256 always (one object when a type repeats)."""
    hashers = {}
    for name in (*hashtypes, SHA256):
        hashers.setdefault(name, new_hasher(name))
    return hashers


def _insert_ignore(file_id: int, size: int, hashtype: str, hashsum: str, sha256: str,
                   mtime: datetime.datetime) -> None:
    (ArchiveFile
     .insert(file_id=file_id, size=size, hashtype=hashtype, hashsum=hashsum, sha256=sha256, mtime=mtime,
             created=utcnow())
     .on_conflict(action="NOTHING", conflict_target=[ArchiveFile.file_id])
     .execute())


def _utc_naive(value: datetime.datetime | float | int) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value
    return datetime.datetime.fromtimestamp(float(value), datetime.UTC).replace(tzinfo=None)


def _epoch(value: datetime.datetime) -> float:
    return value.replace(tzinfo=datetime.UTC).timestamp()
