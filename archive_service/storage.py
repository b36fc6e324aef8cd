"""Where archive bytes live: one small interface with POSIX-style primitives, and backends.

A writer gets an ``Upload``, writes into it, then either ``commit()``s (the file
appears under its id atomically, and only if no file is there yet) or ``abort()``s
(nothing appears). The archive's domain code hashes and verifies between the two,
so a file that fails verification is never visible. The S3 backend
(``archive_service.s3``: multipart upload, conditional complete) sits behind the
same interface; both pass one contract test-suite.

Backends speak the archive's vocabulary only: a missing file is ``FileNotFoundError``,
a lost write-once race ``AlreadyExists``, a backend that cannot be reached
``StorageUnavailable``. No caller knows which backend it talks to.
"""
from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import io
import logging
import os
import itertools
import threading
import uuid
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

from common.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

# Threads that sync the files (and directories) of one group commit at once.
SYNC_THREADS = 16


class StorageUnavailable(ServiceUnavailable):
    """The backend cannot be used right now (endpoint unreachable, access denied, no bucket)."""

    code = "storage_unavailable"


class AlreadyExists(Exception):
    """``Upload.commit``: a file is already stored under this id; nothing was replaced."""

    def __init__(self, file_id: int):
        super().__init__(f"a file is already stored under id {file_id}")
        self.file_id = file_id


class StoredStat(NamedTuple):
    size: int
    mtime: float  # seconds since the epoch, as the backend records it


class Upload(abc.ABC):
    """One file being written. Use as a context manager: leaving it uncommitted aborts."""

    def __init__(self, file_id: int):
        self.file_id = file_id
        self.bytes_written = 0
        self.finished = False

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append ``data``; nothing is visible under the id until ``commit``."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Publish atomically under the id; raises ``AlreadyExists`` (and cleans up) if one is there."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard everything written; safe to call more than once and after ``commit``."""

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.finished:
            self.abort()


class Storage(abc.ABC):
    """File bytes by integer id, write-once."""

    # What HEAD reports as X-Pacifica-File-Storage-Media.
    media = "disk"
    # True when commit_many makes a group durable for less than its files one by one. Without
    # it a batch publishes each file as soon as it is verified: an unfinished upload may hold
    # a part in memory (S3), and a group of them would hold a part each.
    group_commit = False

    def prepare(self, create: bool = False) -> None:
        """Check the backend can be used before serving; ``StorageUnavailable`` says why not."""

    @abc.abstractmethod
    def begin_write(self, file_id: int) -> Upload:
        """Start writing the file for ``file_id``."""

    @abc.abstractmethod
    def open_read(self, file_id: int, start: int = 0, end: int | None = None) -> BinaryIO:
        """A readable (not necessarily seekable) stream of bytes ``start``..``end`` inclusive
        (``end`` None: to the end); ``FileNotFoundError`` when absent."""

    @abc.abstractmethod
    def stat(self, file_id: int) -> StoredStat | None:
        """Size and modification time of the stored file, or None when absent."""

    @abc.abstractmethod
    def delete(self, file_id: int) -> bool:
        """Remove the stored file; False when there was none."""

    def commit_many(self, uploads: list[Upload]) -> list[AlreadyExists | None]:
        """Publish several finished uploads (a group commit); every one published is durable
        when this returns. One answer per upload: None (published) or ``AlreadyExists``
        (nothing replaced, the upload discarded). Any other error discards every upload
        not yet published and propagates.

        This default commits one by one (S3: each object is durable once its PUT answers);
        ``PosixStorage`` syncs the group together.
        """
        outcomes: list[AlreadyExists | None] = []
        try:
            for upload in uploads:
                try:
                    upload.commit()
                    outcomes.append(None)
                except AlreadyExists as exc:
                    outcomes.append(exc)
        except BaseException:
            for upload in uploads:
                upload.abort()  # a no-op for those already published
            raise
        return outcomes

    def presigned_url(self, file_id: int, expires_seconds: int, filename: str | None = None) -> str | None:
        """A URL that serves the file without labvault for ``expires_seconds``; None when the
        backend has no such thing (POSIX: labvault serves the bytes itself)."""
        check_id(file_id)
        return None

    def sweep_uploads(self, older_than_seconds: float) -> int:
        """Discard unfinished writes older than this (a crashed writer's leftovers); returns how many."""
        return 0

    def shutdown(self) -> None:
        """End the backend's worker threads (the server is stopping; none is in use any more).
        CherryPy waits for every thread before its process exits, so an idle pool would hold
        the stop up. A later write starts a new pool."""


def check_id(file_id: int) -> int:
    """Backends only ever see non-negative ints, so an id can never name a path outside the root."""
    if isinstance(file_id, bool) or not isinstance(file_id, int) or file_id < 0:
        raise ValueError(f"file id must be a non-negative int, not {file_id!r}")
    return file_id


class PosixUpload(Upload):
    """A temporary file under ``root/.incoming/``, hard-linked into place on commit."""

    def __init__(self, storage: PosixStorage, file_id: int):
        super().__init__(file_id)
        self._storage = storage
        fd, self._tmp_path = storage.new_temporary(file_id)
        self._handle = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.finished:
            raise ValueError("upload already finished")
        self._handle.write(data)
        self.bytes_written += len(data)

    def commit(self) -> None:
        final = self.publish()
        _fsync_dir(final.parent)

    def sync(self) -> None:
        """Flush the bytes to the disk and close the temporary file (the first half of commit)."""
        if self.finished:
            raise ValueError("upload already finished")
        try:
            self._handle.flush()
            # The bytes must be on disk before the name is: after a crash a published
            # file is either complete or absent, never a truncated copy.
            os.fsync(self._handle.fileno())
            # Stored files never change (write-once); read-only says so to anyone with a shell.
            os.fchmod(self._handle.fileno(), 0o440)
            self._handle.close()
        except BaseException:
            self.abort()
            raise

    def publish(self) -> Path:
        """Give the file its name (the second half of commit, its directory not yet synced)."""
        if self.finished:
            raise ValueError("upload already finished")
        if not self._handle.closed:
            self.sync()
        final = self._storage.path_for(self.file_id)
        try:
            self._storage.make_shard(final.parent)
            # link() is atomic and refuses an existing target, so of two writers of one id
            # exactly one wins; rename() would silently replace the other's file.
            try:
                os.link(self._tmp_path, final)
            except FileNotFoundError:
                # The shard directory went away since this process made it: make it again.
                self._storage.make_shard(final.parent, again=True)
                os.link(self._tmp_path, final)
        except FileExistsError:
            self.abort()
            raise AlreadyExists(self.file_id) from None
        except BaseException:
            self.abort()
            raise
        self.finished = True
        self._unlink_tmp()
        return final

    def abort(self) -> None:
        self.finished = True
        if not self._handle.closed:
            try:
                self._handle.close()
            except OSError:
                logger.debug("closing %s failed", self._tmp_path, exc_info=True)
        self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        try:
            os.unlink(self._tmp_path)
        except FileNotFoundError:
            pass


class PosixStorage(Storage):
    """Files under ``root/<id % 256 as 2 hex digits>/<id>``; writes staged in ``root/.incoming``.

    The staging directory sits inside the root so the publishing hard link never
    crosses a filesystem.
    """

    group_commit = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.incoming = self.root / ".incoming"
        self._shards: set[Path] = set()  # shard directories known to exist
        # Temporary names: unique to this storage object (a process may hold several), counted
        # up; O_EXCL refuses a name a crashed writer left (the next number is taken then).
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count()
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync_pool_lock = threading.Lock()

    def new_temporary(self, file_id: int) -> tuple[int, str]:
        """A new, empty temporary file for ``file_id`` in ``incoming``: (descriptor, path)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            path = os.path.join(self.incoming, f"{file_id}.{self._tag}-{next(self._counter)}.part")
            try:
                return os.open(path, flags, 0o600), path
            except FileExistsError:
                continue
            except FileNotFoundError:
                self.incoming.mkdir(parents=True, exist_ok=True)  # the first write (or it was removed)
                return os.open(path, flags, 0o600), path

    def make_shard(self, directory: Path, again: bool = False) -> None:
        if again or directory not in self._shards:
            directory.mkdir(parents=True, exist_ok=True)
            self._shards.add(directory)

    def path_for(self, file_id: int) -> Path:
        file_id = check_id(file_id)
        # 256 shards keep directories small enough for any filesystem at millions of files.
        return self.root / f"{file_id % 256:02x}" / str(file_id)

    def begin_write(self, file_id: int) -> Upload:
        check_id(file_id)
        return PosixUpload(self, file_id)

    def commit_many(self, uploads: list[Upload]) -> list[AlreadyExists | None]:
        """The group commit: sync every file, then link each into place, then sync each
        directory that got a name once. Same guarantee as ``commit`` one by one (bytes on
        disk before the name, names on disk before the answer) with one directory sync per
        directory instead of one per file."""
        outcomes: list[AlreadyExists | None] = []
        published: list[Path] = []
        try:
            # Syncs issued together let the filesystem commit its journal once for many
            # of them (a sync releases the GIL): the group commit proper.
            self._in_parallel(lambda upload: upload.sync(), uploads)
            for upload in uploads:
                try:
                    published.append(upload.publish())
                    outcomes.append(None)
                except AlreadyExists as exc:
                    outcomes.append(exc)
            self._in_parallel(_fsync_dir, list(dict.fromkeys(path.parent for path in published)))
        except BaseException:
            for upload in uploads:
                upload.abort()
            for path in published:
                # Published but not durably answered: the caller records no row for them.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        return outcomes

    def shutdown(self) -> None:
        with self._sync_pool_lock:
            pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _in_parallel(self, action, items: list) -> None:
        if len(items) < 2:
            for item in items:
                action(item)
            return
        with self._sync_pool_lock:
            if self._sync_pool is None:
                self._sync_pool = concurrent.futures.ThreadPoolExecutor(SYNC_THREADS, "archive-sync")
        futures = [self._sync_pool.submit(action, item) for item in items]
        concurrent.futures.wait(futures)  # every one ends before the caller cleans up
        for future in futures:
            future.result()

    def open_read(self, file_id: int, start: int = 0, end: int | None = None) -> BinaryIO:
        handle = open(self.path_for(file_id), "rb")
        if start:
            handle.seek(start)
        if end is None:
            return handle
        return LimitedReader(handle, max(0, end - start + 1))

    def stat(self, file_id: int) -> StoredStat | None:
        try:
            st = os.stat(self.path_for(file_id))
        except FileNotFoundError:
            return None
        return StoredStat(st.st_size, st.st_mtime)

    def delete(self, file_id: int) -> bool:
        try:
            os.unlink(self.path_for(file_id))
        except FileNotFoundError:
            return False
        return True

    def sweep_uploads(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        removed = 0
        try:
            entries = list(os.scandir(self.incoming))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # its writer finished or aborted meanwhile
        return removed


class LimitedReader(io.RawIOBase):
    """At most ``length`` bytes of ``raw``; closing it closes ``raw``."""

    def __init__(self, raw: BinaryIO, length: int):
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._raw.read(size)
        self._left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _fsync_dir(path: Path) -> None:
    # The new directory entry is only durable once the directory itself is synced.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        logger.debug("cannot open %s to sync it", path, exc_info=True)
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("syncing %s failed", path, exc_info=True)
    finally:
        os.close(fd)
