"""The archive's batch write (``Archive.put_batch``, behind ``POST /batch``) on real SQLite and
PostgreSQL and POSIX storage: every member verified before it is visible, write-once, a
group commit that answers only for durable files, nothing left of a member that failed."""
from __future__ import annotations

import hashlib
import io
import os

import pytest

from archive_service.archive import Archive
from archive_service.models import ArchiveFile
from archive_service.storage import PosixStorage
from common.clients import batch_header


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def frame(file_id, data, hashsum=None, hashtype="sha1", size=None, mtime=1_700_000_000):
    return batch_header(file_id, len(data) if size is None else size, hashtype,
                        sha1(data) if hashsum is None else hashsum, mtime) + data


@pytest.fixture
def archive(tmp_path, archive_db):
    return Archive(PosixStorage(tmp_path / "archive"))


def stored(archive):
    """Published files (no temp file counts) and rows."""
    root = archive.storage.root
    files = sorted(int(p.name) for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts) \
        if root.exists() else []
    incoming = list((root / ".incoming").glob("*")) if (root / ".incoming").exists() else []
    return files, sorted(row.file_id for row in ArchiveFile.select()), incoming


def test_batch_stores_every_member_in_groups(archive):
    members = {n: os.urandom(n * 37) for n in range(1, 12)}
    body = b"".join(frame(n, data) for n, data in members.items())
    result = archive.put_batch(io.BytesIO(body), sync_batch=4)
    assert result.failure is None
    assert [(e["id"], e["status"], e["total_bytes"]) for e in result.files] == \
        [(n, 201, len(data)) for n, data in members.items()]
    assert stored(archive) == (list(members), list(members), [])
    for n, data in members.items():
        with archive.open(n)[1] as handle:
            assert handle.read() == data
    assert archive.stat(3).mtime.year == 2023


def test_batch_again_is_a_no_op_and_other_bytes_conflict(archive):
    body = frame(1, b"one") + frame(2, b"two")
    archive.put_batch(io.BytesIO(body))
    again = archive.put_batch(io.BytesIO(body))
    assert [e["status"] for e in again.files] == [200, 200]
    clash = archive.put_batch(io.BytesIO(frame(3, b"three") + frame(2, b"TWO") + frame(4, b"four")))
    # A taken id is found when its group is published: the others of the group are stored.
    assert [(e["id"], e["status"]) for e in clash.files] == [(3, 201), (2, 409), (4, 201)]
    assert clash.files[1]["code"] == "file_exists" and clash.failure.code == "file_exists"
    assert stored(archive) == ([1, 2, 3, 4], [1, 2, 3, 4], [])
    with archive.open(2)[1] as handle:
        assert handle.read() == b"two"


def test_hash_mismatch_leaves_nothing_of_that_member(archive):
    result = archive.put_batch(io.BytesIO(frame(1, b"good") + frame(2, b"bad", hashsum=sha1(b"other"))
                                          + frame(3, b"never")))
    assert [(e["id"], e["status"]) for e in result.files] == [(1, 201), (2, 400)]
    assert result.files[1]["code"] == "hash_mismatch"
    assert stored(archive) == ([1], [1], [])


@pytest.mark.parametrize("body, code", [
    (frame(1, b"abc")[:-1], "incomplete_body"),                       # truncated member
    (frame(1, b"abc", size=10), "incomplete_body"),                   # a length that lies (longer)
    (batch_header(1, 3, "sha1", sha1(b"abc"))[:-5], "incomplete_body"),  # ends inside a header
    (b"not json\n" + b"abc", "invalid_request"),
    (b"[1, 2]\n", "invalid_request"),
    (b"x" * 5000, "invalid_request"),                                # a header line without end
    (batch_header(1, -1, None, None), "invalid_request"),
    (b'{"id": 1, "size": 3, "hashtype": "nope", "hashsum": "00"}\nabc', "unsupported_hashtype"),
    (b'{"id": "x", "size": 3}\nabc', "invalid_file_id"),
    (b'{"id": 1, "size": 3, "mtime": 1e300}\nabc', "invalid_mtime"),
    (b'{"id": 1, "size": 1e400}\n', "invalid_request"),
    (frame(1, b"abc") + frame(1, b"abc"), "duplicate_file_id"),
])
def test_bad_framing_is_a_clear_failure_and_leaves_no_partial_file(archive, body, code):
    result = archive.put_batch(io.BytesIO(body))
    assert result.failure is not None
    assert result.files[-1]["status"] == 400 and result.files[-1]["code"] == code, result.files
    assert "\n" not in result.files[-1]["message"]
    files, rows, incoming = stored(archive)
    assert incoming == [] and files == rows
    assert files in ([], [1])  # only a duplicate's first, whole, verified member stays


def test_a_lying_length_shorter_than_the_bytes_fails_the_next_header(archive):
    result = archive.put_batch(io.BytesIO(frame(1, b"abcdef", size=3)))
    assert [(e["id"], e["status"]) for e in result.files][-1][1] == 400
    assert stored(archive) == ([], [], [])


class Crash(Exception):
    pass


class CrashingBody(io.RawIOBase):
    """A body whose reading dies (the process or the connection) after ``limit`` bytes."""

    def __init__(self, raw: bytes, limit: int):
        self._raw, self._limit, self._at = raw, limit, 0

    def read(self, size=-1):
        if self._at >= self._limit:
            raise Crash()
        piece = self._raw[self._at:min(self._limit, self._at + max(size, 1))]
        self._at += len(piece)
        return piece


def test_a_crash_mid_batch_leaves_no_visible_partial_file(archive):
    body = b"".join(frame(n, os.urandom(3000)) for n in range(1, 9))
    with pytest.raises(Crash):
        archive.put_batch(CrashingBody(body, len(body) - 100), sync_batch=3)
    files, rows, incoming = stored(archive)
    # Only whole groups that were published before the crash are there, each with its row.
    assert files == rows == list(range(1, 1 + len(files))) and len(files) % 3 == 0
    assert incoming == []


def test_group_commit_syncs_each_file_and_each_directory_once(archive, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    archive.put_batch(io.BytesIO(b"".join(frame(n, b"x%d" % n) for n in (1, 2, 257))), sync_batch=10)
    # Three files and two shard directories (1 and 257 share 01/).
    assert len(synced) == 5


def test_a_group_larger_than_one_insert_statement_records_every_row(archive):
    members = {n: b"%d" % n for n in range(1000, 1230)}
    result = archive.put_batch(io.BytesIO(b"".join(frame(n, data) for n, data in members.items())), sync_batch=500)
    assert result.failure is None and len(result.files) == 230
    assert stored(archive) == (list(members), list(members), [])
    assert archive.stat(1229).size == 4 and archive.stat(1229).sha256 == hashlib.sha256(b"1229").hexdigest()
