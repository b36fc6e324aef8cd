"""One contract for every storage backend: the POSIX directory and S3 (a real SeaweedFS server).

Each test runs on both; the only backend-specific code here is ``leftovers``, which
lists everything a backend holds (temporary files, objects, open multipart uploads)
so a test can assert that a failed or aborted write left nothing behind.
"""
from __future__ import annotations

import threading

import pytest
import requests

from archive_service.storage import AlreadyExists, PosixStorage, StoredStat

MIB = 1024 * 1024


@pytest.fixture(params=["posix", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "posix":
        return PosixStorage(tmp_path / "archive")
    from archive_service.s3 import S3Storage
    endpoint = request.getfixturevalue("s3_endpoint")
    backend = S3Storage(request.getfixturevalue("s3_bucket"), "archive/files", endpoint_url=endpoint.url,
                        region=endpoint.region, addressing_style="path", part_size=5 * MIB, upload_concurrency=3)
    backend.prepare(create=True)
    return backend


def leftovers(storage) -> list[str]:
    """Everything the backend holds: files (temporary ones too) or objects and open uploads."""
    if isinstance(storage, PosixStorage):
        root = storage.root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    client = storage.client
    objects = client.list_objects_v2(Bucket=storage.bucket).get("Contents") or []
    uploads = client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads") or []
    return sorted([obj["Key"] for obj in objects] + [f"upload:{u['Key']}" for u in uploads])


def stored_name(storage, file_id: int) -> str:
    if isinstance(storage, PosixStorage):
        return str(storage.path_for(file_id).relative_to(storage.root))
    return storage.key_for(file_id)


def store(storage, file_id, data):
    with storage.begin_write(file_id) as upload:
        upload.write(data)
        upload.commit()


def read_all(storage, file_id, start=0, end=None) -> bytes:
    with storage.open_read(file_id, start, end) as handle:
        chunks = []
        while chunk := handle.read(64 * 1024):
            chunks.append(chunk)
    return b"".join(chunks)


def test_commit_publishes_and_nothing_is_visible_before(storage):
    with storage.begin_write(257) as upload:
        upload.write(b"hello ")
        upload.write(b"world")
        assert upload.bytes_written == 11
        assert storage.stat(257) is None
        upload.commit()
    assert read_all(storage, 257) == b"hello world"
    assert leftovers(storage) == [stored_name(storage, 257)]
    stat = storage.stat(257)
    assert isinstance(stat, StoredStat) and stat.size == 11 and stat.mtime > 0


def test_empty_file(storage):
    store(storage, 4, b"")
    assert storage.stat(4).size == 0
    assert read_all(storage, 4) == b""


def test_large_file_in_parts_round_trips(storage):
    # Three 5 MiB parts and a short last one on S3: the multipart path.
    data = bytes(range(256)) * (4 * 16 * MIB // 256 // 4 + 77)
    with storage.begin_write(6) as upload:
        for offset in range(0, len(data), MIB):
            upload.write(data[offset:offset + MIB])
        upload.commit()
    assert storage.stat(6).size == len(data)
    assert read_all(storage, 6) == data
    assert leftovers(storage) == [stored_name(storage, 6)]


def test_ranged_reads_need_no_seek(storage):
    store(storage, 5, b"0123456789")
    assert read_all(storage, 5, 4, 6) == b"456"
    assert read_all(storage, 5, 7) == b"789"
    assert read_all(storage, 5, 0, 0) == b"0"
    assert read_all(storage, 5, 9, 9) == b"9"


def test_missing_file(storage):
    assert storage.stat(9) is None
    assert storage.delete(9) is False
    with pytest.raises(FileNotFoundError):
        storage.open_read(9)
    with pytest.raises(FileNotFoundError):
        storage.open_read(9, 2, 5)


def test_delete(storage):
    store(storage, 3, b"x")
    assert storage.delete(3) is True
    assert storage.stat(3) is None
    assert storage.delete(3) is False
    assert leftovers(storage) == []


def test_commit_refuses_an_existing_file_and_leaves_it_alone(storage):
    store(storage, 7, b"first")
    for size in (6, 11 * MIB):  # one request, and the multipart path
        upload = storage.begin_write(7)
        upload.write(b"s" * size)
        with pytest.raises(AlreadyExists):
            upload.commit()
    assert read_all(storage, 7) == b"first"
    assert leftovers(storage) == [stored_name(storage, 7)]


def test_abort_and_leaving_uncommitted_leave_nothing(storage):
    upload = storage.begin_write(1)
    upload.write(b"data" * (3 * MIB))  # 12 MiB: parts already sent on S3
    upload.abort()
    upload.abort()  # idempotent
    with storage.begin_write(2) as upload:
        upload.write(b"data")
    with pytest.raises(RuntimeError):
        with storage.begin_write(3) as upload:
            upload.write(b"d" * (6 * MIB))
            raise RuntimeError("caller failed")
    assert leftovers(storage) == []
    assert storage.stat(1) is None and storage.stat(3) is None


def test_concurrent_writers_of_one_id_exactly_one_wins(storage):
    barrier = threading.Barrier(6)
    outcomes = {}

    def write(n):
        upload = storage.begin_write(42)
        upload.write(f"writer {n} ".encode() * 1000)
        barrier.wait()
        try:
            upload.commit()
            outcomes[n] = "won"
        except AlreadyExists:
            outcomes[n] = "lost"

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [n for n, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert read_all(storage, 42) == f"writer {winners[0]} ".encode() * 1000
    assert leftovers(storage) == [stored_name(storage, 42)]


def test_sweep_discards_stale_unfinished_writes(storage):
    upload = storage.begin_write(11)
    upload.write(b"u" * (6 * MIB))  # an open multipart upload on S3, a temp file on POSIX
    assert storage.sweep_uploads(3600) == 0
    assert storage.sweep_uploads(-60) == 1
    assert leftovers(storage) == []
    upload.abort()  # the owner finds it gone and does not mind


@pytest.mark.parametrize("bad", [-1, "1", 1.0, True, None])
def test_ids_must_be_non_negative_ints(storage, bad):
    with pytest.raises(ValueError):
        storage.begin_write(bad)
    with pytest.raises(ValueError):
        storage.stat(bad)
    with pytest.raises(ValueError):
        storage.open_read(bad)


def test_presigned_url(storage):
    store(storage, 12, b"signed bytes")
    url = storage.presigned_url(12, 60, filename="result.h5ad")
    if isinstance(storage, PosixStorage):
        assert url is None
        return
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200 and answer.content == b"signed bytes"
    assert answer.headers["Content-Disposition"] == 'attachment; filename="result.h5ad"'
    assert answer.headers["Content-Type"] == "application/octet-stream"


def test_commit_many_publishes_each_and_refuses_a_taken_id_alone(storage):
    store(storage, 2, b"already here")
    uploads = []
    for file_id in (1, 2, 3):
        upload = storage.begin_write(file_id)
        upload.write(b"new %d" % file_id)
        uploads.append(upload)
    outcomes = storage.commit_many(uploads)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], AlreadyExists) and outcomes[1].file_id == 2
    assert read_all(storage, 1) == b"new 1" and read_all(storage, 3) == b"new 3"
    assert read_all(storage, 2) == b"already here"
    assert leftovers(storage) == sorted(stored_name(storage, n) for n in (1, 2, 3))
