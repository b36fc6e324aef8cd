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
import json
import logging
import os
import re
import stat as stat_module
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Protocol

from archive_service.models import ArchiveFile, database
from archive_service.storage import AlreadyExists, Storage
from common.db import utcnow
from common.errors import BadRequest, Conflict, Forbidden, LabvaultError, NotFound
from common.hashing import CHUNK_SIZE, DEFAULT_HASH_TYPE, HEX_LENGTHS, new_hasher, normalise_hashsum, normalise_hashtype

logger = logging.getLogger(__name__)

# The digest the archive keeps of every file, whatever the writer declared.
SHA256 = "sha256"

# A batch member's header line (JSON and its newline) is at most this long.
MAX_BATCH_HEADER = 4096

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


@dataclass
class BatchResult:
    """The answer to a batch: one entry per member read, in order, and whether all were stored.

    An entry is ``{"id", "status": 201|200, "total_bytes"}`` for a member that is stored and
    durable, or ``{"id", "status": 4xx, "code", "message"}`` for one that is not (nothing of it
    is visible). A member that cannot be read or verified ends the batch (the members after
    it are not read); an id taken by other bytes is found when its group is published, and
    fails alone.
    """

    files: list[dict]
    failure: LabvaultError | None = None


@dataclass
class _Pending:
    index: int
    upload: object
    expected: _Expected | None
    digest: str
    sha256: str
    total: int
    when: datetime.datetime


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

    def put_batch(self, body: Readable, sync_batch: int = 256) -> BatchResult:
        """Store the members of a batch body, each with ``put``'s rules (verified before it is
        visible, write-once), published and made durable ``sync_batch`` at a time.

        The body is a sequence of members, each a header line, a JSON object
        ``{"id": N, "size": N, "hashtype": "sha1", "hashsum": "...", "mtime": epoch}`` (at most
        ``MAX_BATCH_HEADER`` bytes with its newline), followed by exactly ``size`` bytes. Every
        member listed as stored is durable (bytes, names and rows on disk) when this returns.
        """
        frames = _FrameReader(body)
        if not self.storage.group_commit:
            sync_batch = 1  # see Storage.group_commit
        files: list[dict] = []
        pending: list[_Pending] = []
        seen: set[int] = set()
        file_id = None
        try:
            while True:
                file_id = None
                header = frames.header()
                if header is None:
                    break
                file_id = parse_file_id(header.get("id"))
                size, expected, when = _member_header(file_id, header)
                if file_id in seen:
                    raise BadRequest(f"file {file_id} is twice in the batch", code="duplicate_file_id")
                seen.add(file_id)
                # Whether the id is taken is asked once per group, at publishing (one query,
                # not one a file): until then the member is only a temporary file.
                pending.append(self._write_member(len(files), file_id, frames.member(size), expected, when, size))
                files.append({"id": file_id})  # filled in once the group is published
                if len(pending) >= sync_batch:
                    self._publish(pending, files)
                    pending = []
        except LabvaultError as error:
            files.append({"id": file_id, "status": error.status, "code": error.code, "message": error.message})
            self._publish(pending, files)
            return BatchResult(files, error)
        except BaseException:
            for entry in pending:
                entry.upload.abort()
            raise
        self._publish(pending, files)
        failure = next((entry for entry in files if entry["status"] >= 400), None)
        if failure is None:
            logger.info("archived a batch of %d files", len(files))
            return BatchResult(files)
        return BatchResult(files, LabvaultError(failure["message"], code=failure["code"]))

    def _write_member(self, index: int, file_id: int, member: Readable, expected: _Expected,
                      when: datetime.datetime, size: int) -> _Pending:
        hashers = _hashers(expected.hashtype)
        upload = self.storage.begin_write(file_id)
        try:
            total = _copy(file_id, member, upload.write, hashers.values(), size)
            digest = hashers[expected.hashtype].hexdigest()
            _verify(file_id, expected, digest)
        except BaseException:
            upload.abort()
            raise
        return _Pending(index, upload, expected, digest, hashers[SHA256].hexdigest(), total, when)

    def _publish(self, pending: list[_Pending], files: list[dict]) -> None:
        """The group commit of verified members: bytes and names durable, then their rows
        in one transaction; an id another writer published first is settled as ``put`` does."""
        if not pending:
            return
        existing = {row.file_id: row for row in
                    ArchiveFile.select().where(ArchiveFile.file_id.in_([e.upload.file_id for e in pending]))}
        if existing:
            for entry in pending:
                row = existing.get(entry.upload.file_id)
                if row is not None:
                    entry.upload.abort()
                    files[entry.index] = self._compare_digests(row, entry)
            pending = [entry for entry in pending if entry.upload.file_id not in existing]
        outcomes = self.storage.commit_many([entry.upload for entry in pending])
        rows = []
        for entry, outcome in zip(pending, outcomes):
            file_id = entry.upload.file_id
            if outcome is None:
                rows.append(entry)
                files[entry.index] = {"id": file_id, "status": 201, "total_bytes": entry.total}
                continue
            try:
                result = self._settle_race(file_id, entry.expected.hashtype, entry.digest, entry.sha256,
                                           entry.total, entry.when)
                files[entry.index] = _stored(file_id, result)
            except LabvaultError as error:
                files[entry.index] = {"id": file_id, "status": error.status, "code": error.code,
                                      "message": error.message}
        try:
            _insert_rows([(e.upload.file_id, e.total, e.expected.hashtype, e.digest, e.sha256, e.when) for e in rows])
        except BaseException:
            # As in put: bytes without their row must not stay behind.
            for entry in rows:
                self.storage.delete(entry.upload.file_id)
            raise

    def _compare_digests(self, row: ArchiveFile, entry: _Pending) -> dict:
        """A batch member whose id is archived already: the same bytes are a no-op, others a conflict."""
        file_id = entry.upload.file_id
        if row.sha256:
            if entry.total == row.size and entry.sha256 == row.sha256:
                return {"id": file_id, "status": 200, "total_bytes": entry.total}
            error = _exists(file_id)
            return {"id": file_id, "status": error.status, "code": error.code, "message": error.message}
        try:
            # A record without the digest this batch computed: compare with the stored bytes.
            result = self._settle_race(file_id, entry.expected.hashtype, entry.digest, entry.sha256,
                                       entry.total, entry.when)
        except LabvaultError as error:
            return {"id": file_id, "status": error.status, "code": error.code, "message": error.message}
        return _stored(file_id, result)

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


def _stored(file_id: int, result: PutResult) -> dict:
    return {"id": file_id, "status": 201 if result.created else 200, "total_bytes": result.total_bytes}


def _member_header(file_id: int, header: dict) -> tuple[int, _Expected, datetime.datetime]:
    """(size, expected hash, mtime) of a batch member's header, or 400."""
    size = header.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_ID:
        raise BadRequest(f"file {file_id}: size must be a non-negative integer", code="invalid_request")
    hashtype, hashsum = header.get("hashtype"), header.get("hashsum")
    if not isinstance(hashtype, (str, type(None))) or not isinstance(hashsum, (str, type(None))):
        raise BadRequest(f"file {file_id}: hashtype and hashsum must be strings", code="invalid_request")
    mtime = header.get("mtime")
    if mtime is None:
        when = utcnow()
    else:
        if isinstance(mtime, bool) or not isinstance(mtime, (int, float)):
            raise BadRequest(f"file {file_id}: mtime must be seconds since the epoch", code="invalid_mtime")
        try:
            when = _utc_naive(mtime)
        except (OverflowError, OSError, ValueError):
            raise BadRequest(f"file {file_id}: mtime {mtime!r} is out of range", code="invalid_mtime") from None
    return size, _expected(hashtype, hashsum), when


class _FrameReader:
    """Reads a batch body (header line, bytes, header line, bytes, ...) in large pieces."""

    def __init__(self, body: Readable):
        self._body = body
        self._buffer = b""
        self._offset = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = self._body.read(CHUNK_SIZE)
        except (OSError, ValueError) as exc:
            raise BadRequest(f"reading the batch failed ({exc})", code="incomplete_body") from None
        if not chunk:
            self._eof = True
            return False
        self._buffer = self._buffer[self._offset:] + chunk
        self._offset = 0
        return True

    def header(self) -> dict | None:
        """The next member's header, or None at the end of the body."""
        while True:
            end = self._buffer.find(b"\n", self._offset, self._offset + MAX_BATCH_HEADER)
            if end >= 0:
                break
            if len(self._buffer) - self._offset >= MAX_BATCH_HEADER:
                raise BadRequest(f"a batch member's header is longer than {MAX_BATCH_HEADER} bytes",
                                 code="invalid_request")
            if not self._fill():
                if self._offset == len(self._buffer):
                    return None
                raise BadRequest("the batch ends inside a member's header", code="incomplete_body")
        line = self._buffer[self._offset:end]
        self._offset = end + 1
        try:
            header = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("a batch member's header is not a JSON object", code="invalid_request") from None
        if not isinstance(header, dict):
            raise BadRequest("a batch member's header is not a JSON object", code="invalid_request")
        return header

    def member(self, size: int) -> Readable:
        return _MemberReader(self, size)

    def take(self, limit: int) -> bytes:
        if self._offset == len(self._buffer) and not self._fill():
            return b""
        piece = self._buffer[self._offset:self._offset + limit]
        self._offset += len(piece)
        return piece


class _MemberReader:
    """The ``size`` bytes of one member; reads short (and ``_copy`` says so) when the body ends early."""

    def __init__(self, frames: _FrameReader, size: int):
        self._frames = frames
        self._left = size

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        piece = self._frames.take(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(piece)
        return piece


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


_ROW_FIELDS = ("file_id", "size", "hashtype", "hashsum", "sha256", "mtime", "created")
# Rows of one INSERT: 700 bound values stay under the smallest SQLite limit (999).
INSERT_ROWS = 100


def _insert_rows(rows: list[tuple]) -> None:
    """``_insert_ignore`` for many rows ``(file_id, size, hashtype, hashsum, sha256, mtime)`` in
    one transaction, ``INSERT_ROWS`` a statement. The statement is written here, not by the
    ORM: building it row by row cost more than everything else a small file needs."""
    if not rows:
        return
    db = database.obj if hasattr(database, "obj") else database

    def quoted(name: str) -> str:
        return f"{db.quote[0]}{name}{db.quote[1]}"

    fields = [ArchiveFile._meta.fields[name] for name in _ROW_FIELDS]
    columns = ", ".join(quoted(field.column_name) for field in fields)
    one_row = "(" + ", ".join([db.param] * len(fields)) + ")"
    mtime, created = ArchiveFile.mtime.db_value, ArchiveFile.created.db_value
    now = created(utcnow())
    with database.atomic():
        for start in range(0, len(rows), INSERT_ROWS):
            chunk = rows[start:start + INSERT_ROWS]
            values = [value for file_id, size, hashtype, hashsum, sha256, when in chunk
                      for value in (file_id, size, hashtype, hashsum, sha256, mtime(when), now)]
            db.execute_sql(f"INSERT INTO {quoted(ArchiveFile._meta.table_name)} ({columns}) VALUES "
                           f"{', '.join([one_row] * len(chunk))} "
                           f"ON CONFLICT ({quoted(ArchiveFile.file_id.column_name)}) DO NOTHING", values)


def _utc_naive(value: datetime.datetime | float | int) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value
    return datetime.datetime.fromtimestamp(float(value), datetime.UTC).replace(tzinfo=None)


def _epoch(value: datetime.datetime) -> float:
    return value.replace(tzinfo=datetime.UTC).timestamp()
