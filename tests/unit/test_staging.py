"""The staging volume (ingest_service.staging) and the clean-up of a failed job's archive
files (ingest_service.services): every failure leaves nothing, says why by code, and
names no server path; deletions the archive could not take wait for the sweeper."""
from __future__ import annotations

import errno
import io
import json

import pytest

from common.errors import (
    BadRequest,
    InsufficientStorage,
    PayloadTooLarge,
    ServiceUnavailable,
)
from ingest_service import staging as staging_module
from ingest_service.cleanup import remove_archive_files, sweep_pending_deletes
from ingest_service.staging import Staging, StagingUnavailable, UploadInterrupted


@pytest.fixture
def staging(tmp_path):
    return Staging(tmp_path / "staging")


def leftovers(staging) -> list[str]:
    return sorted(p.name for p in staging.root.iterdir()) if staging.root.exists() else []


def test_a_whole_body_is_renamed_into_place(staging):
    assert staging.receive(7, io.BytesIO(b"x" * 3_000_000).read, 10_000_000, expected=3_000_000) == 3_000_000
    assert leftovers(staging) == ["7.tar"]
    assert staging.bundle_path(7).stat().st_size == 3_000_000


def test_over_the_limit_is_413_and_removed(staging):
    with pytest.raises(PayloadTooLarge):
        staging.receive(1, io.BytesIO(b"x" * 5000).read, 4000)
    assert leftovers(staging) == []


def test_a_client_that_goes_away_is_upload_interrupted(staging):
    chunks = [b"abc"]

    def read(_size):
        if not chunks:
            raise ConnectionResetError("peer went away")
        return chunks.pop()
    with pytest.raises(UploadInterrupted) as caught:
        staging.receive(2, read, 1000)
    assert caught.value.code == "upload_interrupted" and "3 bytes" in caught.value.message
    with pytest.raises(UploadInterrupted):
        staging.receive(3, io.BytesIO(b"short").read, 1000, expected=900)
    assert leftovers(staging) == []


@pytest.mark.parametrize("number,error,code", [
    (errno.ENOSPC, InsufficientStorage, "insufficient_storage"),
    (errno.EDQUOT, InsufficientStorage, "insufficient_storage"),
    (errno.EIO, StagingUnavailable, "staging_unavailable"),
])
def test_a_failing_volume_has_its_code_and_keeps_no_part(staging, monkeypatch, number, error, code):
    written = []

    def write_some(fd, data):
        if written:
            raise OSError(number, "volume trouble", str(staging.root / "4.tar.part"))
        written.append(len(data))
        staging_module.os.write(fd, data)
    monkeypatch.setattr(staging_module, "write_all", write_some)
    with pytest.raises(error) as caught:
        staging.receive(4, io.BytesIO(b"y" * (3 * staging_module.CHUNK)).read, 10 ** 9)
    assert caught.value.code == code
    assert str(staging.root) not in caught.value.message
    assert leftovers(staging) == []


def test_a_staging_root_that_cannot_be_made_is_staging_unavailable(tmp_path):
    (tmp_path / "taken").write_text("a file where the directory should be")
    with pytest.raises(StagingUnavailable) as caught:
        Staging(tmp_path / "taken").receive(5, io.BytesIO(b"x").read, 10)
    assert str(tmp_path) not in caught.value.message


# -- deletions that wait for the archive ------------------------------------------------------

class FakeArchive:
    """``ArchiveClient.delete``'s contract: True when removed, False when absent,
    ``ServiceUnavailable`` once it is down (``down_after`` deletions)."""

    def __init__(self, files, down_after=None):
        self.files = set(files)
        self.down_after = down_after
        self.calls = []

    def delete(self, file_id, retries=None):
        self.calls.append((file_id, retries))
        if self.down_after is not None and len(self.calls) > self.down_after:
            raise ServiceUnavailable("cannot reach the archive service", code="archive_unavailable")
        if file_id in self.files:
            self.files.discard(file_id)
            return True
        return False


def test_remove_archive_files_defers_the_rest_once_the_archive_is_down(staging):
    archive = FakeArchive({10, 11, 12, 13}, down_after=1)
    assert remove_archive_files(archive, staging, 42, range(10, 14)) == [11, 12, 13]
    # One failed delete (with its retries) is enough to know: the others are not tried.
    assert [file_id for file_id, _ in archive.calls] == [10, 11]
    assert staging.pending_deletes() == {42: [11, 12, 13]}
    assert not list(staging.root.glob("*.tar"))


def test_remove_archive_files_with_the_archive_up_defers_nothing(staging):
    archive = FakeArchive({10, 12})
    assert remove_archive_files(archive, staging, 43, range(10, 13)) == []
    assert archive.files == set() and staging.pending_deletes() == {}


def test_sweep_finishes_what_waited_and_keeps_what_still_cannot_go(staging):
    staging.defer_deletes(42, [11, 12, 13])
    staging.defer_deletes(44, [20])
    down = FakeArchive({11, 12, 13, 20}, down_after=1)
    assert sweep_pending_deletes(staging, down) == 1
    assert down.calls == [(11, 0), (12, 0)]  # no retries: a sweep comes again anyway
    assert staging.pending_deletes() == {42: [12, 13], 44: [20]}

    up = FakeArchive({13, 20})  # 12 went meanwhile: absent counts as done
    assert sweep_pending_deletes(staging, up) == 2
    assert staging.pending_deletes() == {} and up.files == set()
    assert list(staging.pending_dir.iterdir()) == []


def test_a_sweep_with_nothing_waiting_touches_nothing(staging):
    archive = FakeArchive(set())
    assert sweep_pending_deletes(staging, archive) == 0
    assert archive.calls == [] and not staging.root.exists()


def test_an_unreadable_record_is_left_for_an_operator(staging):
    staging.defer_deletes(45, [1])
    (staging.pending_dir / "46.json").write_text("{not json")
    assert staging.pending_deletes() == {45: [1]}
    assert json.loads((staging.pending_dir / "45.json").read_text()) == {"job_id": 45, "file_ids": [1]}


def test_other_archive_errors_are_logged_not_deferred(staging):
    class Refusing(FakeArchive):
        def delete(self, file_id, retries=None):
            raise BadRequest("refused", code="invalid_file_id")
    assert remove_archive_files(Refusing(set()), staging, 47, [1, 2]) == []
    assert staging.pending_deletes() == {}


def test_a_record_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "staging").write_text("a file where the staging directory should be")
    assert Staging(tmp_path / "staging").defer_deletes(48, [7, 8]) is False
    assert "[7, 8]" in caplog.text
