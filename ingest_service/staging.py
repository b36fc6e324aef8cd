"""The staging volume: where uploaded bundles (and /move documents) wait for their job, and
where archive deletions a failed job could not make wait for the archive to come back.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from common.errors import InsufficientStorage, LabvaultError, PayloadTooLarge, is_disk_full

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
PENDING_DELETES = "pending-deletes"
UPLOADS = "uploads"


class Staging:
    def __init__(self, root: Path):
        self.root = Path(root)

    def bundle_path(self, job_id: int) -> Path:
        return self.root / f"{int(job_id)}.tar"

    def document_path(self, job_id: int) -> Path:
        return self.root / f"{int(job_id)}.json"

    @staticmethod
    def part_path(path: Path) -> Path:
        """Where the bytes of ``path`` land while they arrive (renamed to ``path`` when whole)."""
        return path.with_name(path.name + ".part")

    def arrived_whole(self, job_id: int) -> bool:
        """Whether the bundle (or /move document) of a job arrived whole."""
        return self.bundle_path(job_id).is_file() or self.document_path(job_id).is_file()

    def last_write(self, job_id: int) -> datetime.datetime | None:
        """When bytes of a job's unfinished upload last arrived (naive UTC), or None."""
        times = []
        for path in (self.bundle_path(job_id), self.document_path(job_id)):
            with contextlib.suppress(OSError):
                times.append(self.part_path(path).stat().st_mtime)
        if not times:
            return None
        return datetime.datetime.fromtimestamp(max(times), datetime.UTC).replace(tzinfo=None)

    def receive(self, job_id: int, read: Callable[[int], bytes], limit: int,
                suffix: str = ".tar", expected: int | None = None, digest=None) -> int:
        """Stream ``read`` into ``<job_id><suffix>`` in chunks; returns the byte count.

        ``digest`` (a ``hashlib`` object) is fed every chunk on the way, so the bundle's
        hash costs no second read.

        The bytes land under a ``.part`` name and are renamed once complete, so a
        staged bundle is always whole. Whatever goes wrong, what was written is
        removed: over ``limit`` bytes is 413; a ``read`` that fails, or a body that
        ends before its declared ``expected`` length, is ``upload_interrupted`` (the
        client went away); a full staging volume is 507 ``insufficient_storage``; any
        other failure of the volume is 503 ``staging_unavailable``. Messages never name
        server paths.
        """
        final = self.root / f"{int(job_id)}{suffix}"
        part = self.part_path(final)
        total = 0
        with disk_errors():
            self.root.mkdir(parents=True, exist_ok=True)
            # Unbuffered: a buffered file would retry its failed write when closed and
            # raise again, over the error already on its way.
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                def write(chunk: bytes) -> None:
                    if digest is not None:
                        digest.update(chunk)
                    with disk_errors():
                        write_all(fd, chunk)
                total = read_body(read, limit, expected, write)
                with disk_errors():
                    os.fsync(fd)
            finally:
                os.close(fd)
            with disk_errors():
                os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return total

    # -- resumable uploads -----------------------------------------------------------

    @property
    def uploads_dir(self) -> Path:
        return self.root / UPLOADS

    def upload_part(self, upload_id: str) -> Path:
        """Where the bytes of resumable upload ``upload_id`` (hex, checked by the caller) collect."""
        return self.uploads_dir / f"{upload_id}.part"

    def adopt(self, job_id: int, part: Path) -> int:
        """Make the whole bytes at ``part`` (a finished resumable upload, on this volume) the staged
        bundle of ``job_id``: one rename, so the bundle is whole or absent; returns its size."""
        final = self.bundle_path(job_id)
        with disk_errors():
            size = part.stat().st_size
            os.replace(part, final)
        return size

    def discard(self, job_id: int) -> None:
        """Remove everything staged for ``job_id`` (no error when nothing is there)."""
        for path in (self.bundle_path(job_id), self.document_path(job_id)):
            for candidate in (path, self.part_path(path)):
                candidate.unlink(missing_ok=True)

    # -- archive deletions that have to wait ------------------------------------------

    @property
    def pending_dir(self) -> Path:
        return self.root / PENDING_DELETES

    def defer_deletes(self, job_id: int, file_ids: Iterable[int]) -> bool:
        """Record archive files of ``job_id`` that must go but could not (the archive was down);
        no ids clears the record. False (and the ids in the log) when it cannot be written.

        One small JSON file per job on the staging volume, which the ingest service and
        every worker share; ``ingest_service.cleanup.sweep_pending_deletes`` finishes the
        work. Written whole (temporary name, then rename), so a sweep never reads half a
        record. Never raises: it runs on a job's failure path, which must still end the job.
        """
        ids = sorted({int(file_id) for file_id in file_ids})
        record = self.pending_dir / f"{int(job_id)}.json"
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        try:
            if not ids:
                record.unlink(missing_ok=True)
                return True
            self.pending_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"job_id": int(job_id), "file_ids": ids}), encoding="utf-8")
            os.replace(tmp, record)
        except OSError as exc:
            logger.error("job %s: cannot record pending archive deletions (%s); remove by hand: %s",
                         job_id, exc, ids)
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        logger.warning("job %s: %d archive file(s) left for the sweeper", job_id, len(ids))
        return True

    def pending_deletes(self) -> dict[int, list[int]]:
        """Every recorded deletion: job id -> file ids still to remove."""
        pending: dict[int, list[int]] = {}
        if not self.pending_dir.is_dir():
            return pending
        for record in sorted(self.pending_dir.glob("*.json")):
            try:
                body = json.loads(record.read_text(encoding="utf-8"))
                pending[int(body["job_id"])] = [int(file_id) for file_id in body["file_ids"]]
            except (OSError, ValueError, KeyError, TypeError):
                logger.error("unreadable pending-delete record %s; left for an operator", record.name)
        return pending


def read_body(read: Callable[[int], bytes], limit: int, expected: int | None,
              sink: Callable[[bytes], None]) -> int:
    """Pass the body ``read`` gives to ``sink`` chunk by chunk; returns the byte count.

    Over ``limit`` bytes is 413; a ``read`` that fails, or a body shorter than its declared
    ``expected`` length, is ``upload_interrupted``. ``Staging.receive`` writes with it; an
    upload whose key is already bound only hashes with it (its bytes are not needed).
    """
    total = 0
    while True:
        try:
            chunk = read(CHUNK)
        except Exception as exc:  # noqa: BLE001 - the client side of the body failed
            raise UploadInterrupted(f"the upload stopped after {total} bytes "
                                    f"({type(exc).__name__})") from None
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"bundle larger than the limit of {limit} bytes")
        sink(chunk)
    if expected is not None and total != expected:
        raise UploadInterrupted(f"the upload stopped after {total} of {expected} bytes")
    return total


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """Turn an ``OSError`` of the staging volume into a client-safe error (no path in it)."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            logger.error("staging volume full: %s", exc)
            raise InsufficientStorage("the staging volume is full; try again later") from None
        logger.error("staging volume failed: %s", exc)
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise StagingUnavailable(f"the staging volume failed ({reason}); try again later") from None


class UploadInterrupted(LabvaultError):
    status, code = 400, "upload_interrupted"


class StagingUnavailable(LabvaultError):
    status, code = 503, "staging_unavailable"
    retry_after = 5
