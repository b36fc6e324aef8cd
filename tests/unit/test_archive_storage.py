"""PosixStorage: staged writes, atomic write-once publish, sharded paths, nothing left on abort."""
from __future__ import annotations

import threading

import pytest

from archive_service.storage import (
    AlreadyExists,
    PosixStorage,
    StoredStat,
    make_storage,
)
from common.settings import SettingsError
from tests.helpers import make_settings


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def storage(tmp_path):
    return PosixStorage(tmp_path / "archive")


def store(storage, file_id, data):
    with storage.begin_write(file_id) as upload:
        upload.write(data)
        upload.commit()


def test_commit_publishes_under_a_sharded_path(storage):
    with storage.begin_write(257) as upload:
        upload.write(b"hello ")
        upload.write(b"world")
        assert upload.bytes_written == 11
        assert storage.stat(257) is None  # nothing visible before commit
        upload.commit()
    assert (storage.root / "01" / "257").read_bytes() == b"hello world"
    assert files_under(storage.root) == ["01/257"]  # temp file gone
    stat = storage.stat(257)
    assert isinstance(stat, StoredStat) and stat.size == 11 and stat.mtime > 0


def test_open_read_is_seekable(storage):
    store(storage, 5, b"0123456789")
    with storage.open_read(5) as handle:
        handle.seek(4)
        assert handle.read(3) == b"456"
        assert handle.seekable()


def test_missing_file(storage):
    assert storage.stat(9) is None
    assert storage.delete(9) is False
    with pytest.raises(FileNotFoundError):
        storage.open_read(9)


def test_delete(storage):
    store(storage, 3, b"x")
    assert storage.delete(3) is True
    assert storage.stat(3) is None
    assert files_under(storage.root) == []


def test_commit_refuses_an_existing_file_and_leaves_it_alone(storage):
    store(storage, 7, b"first")
    upload = storage.begin_write(7)
    upload.write(b"second")
    with pytest.raises(AlreadyExists):
        upload.commit()
    assert storage.open_read(7).read() == b"first"
    assert files_under(storage.root) == ["07/7"]


def test_abort_and_leaving_uncommitted_leave_nothing(storage):
    upload = storage.begin_write(1)
    upload.write(b"data")
    upload.abort()
    upload.abort()  # idempotent
    with storage.begin_write(2) as upload:
        upload.write(b"data")
    with pytest.raises(RuntimeError):
        with storage.begin_write(3) as upload:
            upload.write(b"data")
            raise RuntimeError("caller failed")
    assert files_under(storage.root) == []


def test_concurrent_writers_of_one_id_exactly_one_wins(storage):
    barrier = threading.Barrier(8)
    outcomes = {}

    def write(n):
        upload = storage.begin_write(42)
        upload.write(f"writer {n}".encode())
        barrier.wait()
        try:
            upload.commit()
            outcomes[n] = "won"
        except AlreadyExists:
            outcomes[n] = "lost"

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1
    assert storage.open_read(42).read() == f"writer {winners[0]}".encode()
    assert files_under(storage.root) == [f"{42:02x}/42"]


@pytest.mark.parametrize("bad", [-1, "1", 1.0, True, None])
def test_ids_must_be_non_negative_ints(storage, bad):
    with pytest.raises(ValueError):
        storage.begin_write(bad)
    with pytest.raises(ValueError):
        storage.stat(bad)


def test_make_storage(tmp_path):
    storage = make_storage(make_settings(tmp_path, archive={"backend": "POSIX", "root": str(tmp_path / "r")}))
    assert isinstance(storage, PosixStorage) and storage.root == tmp_path / "r"
    default = make_storage(make_settings(tmp_path))
    assert default.root == tmp_path / "archive"
    with pytest.raises(SettingsError):
        make_storage(make_settings(tmp_path, archive={"backend": "tape"}))
