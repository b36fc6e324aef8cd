"""Resumable uploads (tus 1.0: core, creation, termination, expiration, checksum).

A client creates an upload with its length, then sends its bytes in PATCHes at the offset the
server holds; after a broken connection or a restarted service it asks (HEAD) where to go on.
The bytes collect in a part file on the staging volume; the row (``models.ResumableUpload``)
holds the offset, stored only after the bytes are fsynced, so a restart never claims bytes it
lost (and bytes past the stored offset, written by a PATCH that died, are cut off). When the
last byte is in, the part file becomes the staged bundle of a new job through
``IngestService.create_job``, the same call ``POST /ingest`` makes.

One PATCH at a time per upload: the PATCH holds an exclusive ``flock`` on the part file while
it writes. A lock the kernel holds dies with its process, so a service killed mid-PATCH leaves
no claim behind to wait out; a second PATCH meanwhile is refused (423 ``upload_locked``).

No CherryPy here: the handlers pass headers and a ``read`` function.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import email.utils
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from common.auth import Identity
from common.db import utcnow
from common.errors import BadRequest, Conflict, LabvaultError, NotFound, PayloadTooLarge
from common.settings import Settings
from ingest_service import jobs
from ingest_service.models import ResumableUpload
from ingest_service.services import IngestService
from ingest_service.staging import CHUNK, Staging, UploadInterrupted, disk_errors, write_all

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "termination", "expiration", "checksum")
# Upload-Checksum algorithms, by their tus names (hashlib's).
CHECKSUMS = ("sha1", "sha256", "sha512", "md5")
PATCH_TYPE = "application/offset+octet-stream"
JOB_HEADER = "Labvault-Job-Id"
MAX_METADATA = 4096
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_METADATA_KEY = re.compile(r"[!-+\--~]+")  # printable ASCII but space and comma


class VersionUnsupported(LabvaultError):
    status, code = 412, "tus_version_unsupported"
    headers = {"Tus-Version": TUS_VERSION}


class UnsupportedMediaType(LabvaultError):
    status, code = 415, "unsupported_media_type"


class UploadLocked(LabvaultError):
    status, code = 423, "upload_locked"
    retry_after = 1


class UploadExpired(LabvaultError):
    status, code = 410, "upload_expired"


class ChecksumMismatch(LabvaultError):
    # tus checksum extension: 460 Checksum Mismatch.
    status, code = 460, "checksum_mismatch"


@dataclass(frozen=True)
class Chunk:
    """What a PATCH brings: where it says it starts, its declared length (None when chunked), an
    optional ``Upload-Checksum`` already parsed, and how to read its body."""

    offset: int
    length: int | None
    read: Callable[[int], bytes]
    checksum: tuple[str, bytes] | None = None


def check_version(header: str | None) -> None:
    """``Tus-Resumable`` of a request: it must be the version this server speaks."""
    if header is None or header.strip() != TUS_VERSION:
        raise VersionUnsupported(f"this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}")


def parse_number(name: str, header: str | None) -> int:
    """A non-negative integer header (``Upload-Length``, ``Upload-Offset``), or 400 ``invalid_<name>``."""
    text = (header or "").strip()
    if not _DIGITS.fullmatch(text) or int(text) > 2 ** 63 - 1:
        raise BadRequest(f"{name.replace('_', '-').title()} must be a whole number of bytes, not {text[:40]!r}",
                         code=f"invalid_{name}")
    return int(text)


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent)."""
    if not header or not header.strip():
        return {}
    if len(header) > MAX_METADATA:
        raise BadRequest(f"Upload-Metadata longer than {MAX_METADATA} characters", code="invalid_upload_metadata")
    found: dict[str, str] = {}
    for pair in header.split(","):
        key, _, value = pair.strip().partition(" ")
        if not _METADATA_KEY.fullmatch(key) or key in found:
            raise BadRequest(f"Upload-Metadata has a missing, malformed or repeated key {key[:40]!r}",
                             code="invalid_upload_metadata")
        try:
            found[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace")
        except binascii.Error:
            raise BadRequest(f"Upload-Metadata value of {key[:40]!r} is not base64",
                             code="invalid_upload_metadata") from None
    return found


def parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``, or None without one."""
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUMS:
        raise BadRequest(f"Upload-Checksum algorithm {algorithm[:20]!r} is not one of {', '.join(CHECKSUMS)}",
                         code="checksum_algorithm_unsupported")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise BadRequest(f"Upload-Checksum is not a base64 {algorithm} digest", code="invalid_upload_checksum")
    return algorithm, digest


def http_date(moment: datetime.datetime) -> str:
    """An RFC 7231 date (``Upload-Expires``) of a naive UTC time."""
    return email.utils.format_datetime(moment.replace(tzinfo=datetime.UTC), usegmt=True)


def is_finished(row: ResumableUpload) -> bool:
    return row.job_id is not None and jobs.find(int(row.job_id)) is not None


class Uploads:
    """The resumable uploads of the ingest service (``/uploads/``)."""

    def __init__(self, settings: Settings, service: IngestService, staging: Staging):
        self.service = service
        self.staging = staging
        self.max_bytes = settings.getint("ingest", "max_bundle_bytes")
        self.expiry = datetime.timedelta(hours=settings.getfloat("ingest", "upload_expiry_hours"))

    def create(self, identity: Identity, length_header: str | None, metadata_header: str | None,
               defer_header: str | None = None) -> ResumableUpload:
        """A new upload of ``identity`` for ``Upload-Length`` bytes (413 over ``[ingest] max_bundle_bytes``)."""
        if defer_header is not None:
            raise BadRequest("Upload-Defer-Length is not supported: send Upload-Length", code="invalid_upload_length")
        if length_header is None:
            raise BadRequest("Upload-Length is required", code="invalid_upload_length")
        length = parse_number("upload_length", length_header)
        if length > self.max_bytes:
            raise PayloadTooLarge(f"an upload of {length} bytes is larger than the limit of {self.max_bytes}")
        parse_metadata(metadata_header)
        now = utcnow()
        row = ResumableUpload.create(upload_id=secrets.token_hex(16), owner=identity.user, length=length,
                                     offset=0, metadata=(metadata_header or "").strip(), created=now,
                                     expires=now + self.expiry)
        try:
            with disk_errors():
                self.staging.uploads_dir.mkdir(parents=True, exist_ok=True)
                os.close(os.open(self.staging.upload_part(row.upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except BaseException:
            ResumableUpload.delete().where(ResumableUpload.upload_id == row.upload_id).execute()
            raise
        if length == 0:  # complete as it is: no PATCH will come (tus clients send none)
            self._finish(row, identity)
            row = ResumableUpload.get_by_id(row.upload_id)
        return row

    def find(self, upload_id: str, identity: Identity, unfinished_only: bool = True) -> ResumableUpload:
        """The upload, if ``identity`` created it (404 otherwise: another's upload does not exist for
        them); an unfinished one past its expiry is 410 ``upload_expired``."""
        row = None
        if _UPLOAD_ID.fullmatch(upload_id or ""):
            row = ResumableUpload.get_or_none(ResumableUpload.upload_id == upload_id)
        if row is None or row.owner != identity.user:
            raise NotFound("no such upload", code="upload_not_found")
        if unfinished_only and row.job_id is None and row.expires < utcnow():
            raise UploadExpired("the upload expired; its bytes are removed (start a new one)")
        return row

    def offset(self, row: ResumableUpload) -> int:
        """Bytes of ``row`` the server holds: the stored offset, or less if the part file lost some."""
        if row.job_id is not None:
            return int(row.offset)
        try:
            return min(int(row.offset), self.staging.upload_part(row.upload_id).stat().st_size)
        except OSError:
            return 0

    def append(self, upload_id: str, identity: Identity, chunk: Chunk) -> tuple[ResumableUpload, int | None]:
        """Write ``chunk`` at the upload's offset; returns the row as now stored and, once the last
        byte is in, the job it became.

        A body cut short keeps (and counts) the bytes that arrived, then raises ``upload_interrupted``,
        unless it carried a checksum, which a part cannot match: then nothing of it counts.
        A checksum mismatch is 460 and the offset stays.
        """
        row = self.find(upload_id, identity)
        with self._locked(row) as fd:
            row = self.find(upload_id, identity)  # as it is now that nobody else writes
            held = self._reconcile(row, fd)
            if chunk.offset != held:
                raise Conflict(f"Upload-Offset {chunk.offset} is not the upload's offset {held}",
                               code="offset_mismatch")
            if chunk.length is not None and held + chunk.length > row.length:
                raise PayloadTooLarge(f"{chunk.length} bytes at offset {held} go past Upload-Length {row.length}")
            written, interrupted = 0, False
            if held < row.length:
                written, interrupted = self._receive(fd, held, row.length - held, chunk)
            if written:
                with disk_errors():
                    os.fsync(fd)
                now = utcnow()
                (ResumableUpload.update(offset=held + written, expires=now + self.expiry)
                 .where(ResumableUpload.upload_id == row.upload_id).execute())
            if interrupted:
                raise UploadInterrupted(f"the chunk stopped after {written} bytes; they are kept "
                                        f"(offset {held + written}): HEAD and go on from there")
            row = ResumableUpload.get_by_id(row.upload_id)
            job_id = self._finish(row, identity) if row.offset == row.length else None
            return ResumableUpload.get_by_id(row.upload_id), job_id

    def terminate(self, upload_id: str, identity: Identity) -> None:
        """Remove the upload and its bytes (a finished upload: only its record; the job goes on)."""
        row = self.find(upload_id, identity, unfinished_only=False)
        if row.job_id is not None:
            ResumableUpload.delete().where(ResumableUpload.upload_id == row.upload_id).execute()
            return
        with self._locked(row):
            self._remove(row.upload_id)

    def job_id(self, upload_id: str, identity: Identity) -> int | None:
        """The job a finished upload became (None while bytes are still missing)."""
        row = self.find(upload_id, identity, unfinished_only=False)
        return int(row.job_id) if is_finished(row) else None

    # -- inside -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, row: ResumableUpload):
        """The part file open for writing, under an exclusive lock (423 while another PATCH holds it)."""
        part = self.staging.upload_part(row.upload_id)
        try:
            fd = os.open(part, os.O_WRONLY)
        except FileNotFoundError:
            if row.offset == row.length:
                fd = None  # finished: the part file became the job's bundle (or is about to)
            else:
                raise NotFound("no such upload", code="upload_not_found") from None
        except OSError:
            with disk_errors():
                raise
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise UploadLocked("another request is writing to this upload; try again shortly") from None
                    raise
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _reconcile(self, row: ResumableUpload, fd: int | None) -> int:
        """The offset to trust: the stored one, cut to the bytes the file holds; bytes past it (a
        PATCH that died before storing its offset) are cut off."""
        if fd is None:
            return int(row.offset)
        with disk_errors():
            size = os.fstat(fd).st_size
            if size > row.offset:
                os.ftruncate(fd, row.offset)
        if size < row.offset:
            logger.warning("upload %s: the part file holds %d of the %d bytes recorded; going on from %d",
                           row.upload_id, size, row.offset, size)
            ResumableUpload.update(offset=size).where(ResumableUpload.upload_id == row.upload_id).execute()
            return size
        return int(row.offset)

    def _receive(self, fd: int, start: int, room: int, chunk: Chunk) -> tuple[int, bool]:
        """Stream the body to ``fd`` at ``start``; returns (bytes kept, whether the body was cut short)."""
        want = room if chunk.length is None else chunk.length
        hasher = hashlib.new(chunk.checksum[0]) if chunk.checksum else None
        written, interrupted = 0, False
        with disk_errors():
            os.lseek(fd, start, os.SEEK_SET)
        while written < want or chunk.length is None:
            try:
                data = chunk.read(min(CHUNK, want - written + (1 if chunk.length is None else 0)))
            except Exception as exc:  # noqa: BLE001 - the client side of the body failed
                logger.info("upload: the body stopped after %d bytes (%s)", written, type(exc).__name__)
                interrupted = True
                break
            if not data:
                interrupted = chunk.length is not None
                break
            if written + len(data) > want:
                raise PayloadTooLarge(f"the chunk goes past Upload-Length ({start + want} bytes)")
            if hasher is not None:
                hasher.update(data)
            with disk_errors():
                write_all(fd, data)
            written += len(data)
        if hasher is not None and (interrupted or hasher.digest() != chunk.checksum[1]):
            with disk_errors():
                os.ftruncate(fd, start)
            if interrupted:
                return 0, True
            raise ChecksumMismatch(f"the chunk's {chunk.checksum[0]} does not match Upload-Checksum; "
                                   f"it was discarded (offset {start})")
        return written, interrupted

    def _finish(self, row: ResumableUpload, identity: Identity) -> int:
        """Turn a whole upload into its job (once): the job id is recorded on the row first, so a
        crash in between finds it again; then ``create_job``, exactly as ``POST /ingest``."""
        if row.job_id is None:
            job_id = self.service.metadata.getid("upload_job", 1)
            (ResumableUpload.update(job_id=job_id)
             .where((ResumableUpload.upload_id == row.upload_id) & ResumableUpload.job_id.is_null()).execute())
            row = ResumableUpload.get_by_id(row.upload_id)
        job_id = int(row.job_id)
        if jobs.find(job_id) is None:
            part = self.staging.upload_part(row.upload_id)
            self.service.create_job(identity, lambda new_id: self.staging.adopt(new_id, part), job_id=job_id)
        return job_id

    def _remove(self, upload_id: str) -> None:
        ResumableUpload.delete().where(ResumableUpload.upload_id == upload_id).execute()
        self.staging.upload_part(upload_id).unlink(missing_ok=True)


def expire(staging: Staging, now: datetime.datetime | None = None,
           orphan_age: datetime.timedelta = datetime.timedelta(hours=1)) -> list[str]:
    """Remove every unfinished upload past its expiry, row and bytes (not one a PATCH is writing to),
    and part files with no row older than ``orphan_age``; returns the upload ids removed."""
    now = now or utcnow()
    removed = []
    for row in ResumableUpload.select().where(ResumableUpload.job_id.is_null() & (ResumableUpload.expires < now)):
        part = staging.upload_part(row.upload_id)
        try:
            fd = os.open(part, os.O_WRONLY)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # being written to right now: not abandoned
            ResumableUpload.delete().where(ResumableUpload.upload_id == row.upload_id).execute()
            part.unlink(missing_ok=True)
            removed.append(row.upload_id)
        finally:
            if fd is not None:
                os.close(fd)
    cutoff = (now - orphan_age).replace(tzinfo=datetime.UTC).timestamp()
    if staging.uploads_dir.is_dir():
        for part in staging.uploads_dir.glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff and not ResumableUpload.get_or_none(
                        ResumableUpload.upload_id == part.stem):
                    part.unlink()
    if removed:
        logger.warning("reaper: removed %d expired resumable upload(s): %s", len(removed), ", ".join(removed))
    return removed

