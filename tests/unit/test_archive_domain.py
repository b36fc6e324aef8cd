"""Archive domain rules on real SQLite and PostgreSQL databases and POSIX storage: verify,
write-once (also between processes), clean up."""
from __future__ import annotations

import datetime
import hashlib
import io
import os
import threading

import pytest

from archive_service import archive as archive_module
from archive_service import models
from archive_service.archive import Archive, parse_file_id
from archive_service.models import ArchiveFile, database
from archive_service.storage import PosixStorage
from common import db as common_db
from common.errors import LabvaultError
from tests.unit.processes import database_url, run_processes

DATA = b"labvault archive bytes\n" * 1000


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Untouchable(io.RawIOBase):
    """A stream that fails the test if anyone reads it (validation must come first)."""

    def read(self, size=-1):
        raise AssertionError("the stream was read")


@pytest.fixture
def sources(tmp_path):
    path = tmp_path / "sources"
    path.mkdir()
    return path


@pytest.fixture
def archive(tmp_path, archive_db, sources):
    return Archive(PosixStorage(tmp_path / "archive"), patch_roots=[str(sources)])


def leftovers(archive):
    """Every file under the storage root (temp files included) and every row."""
    root = archive.storage.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return files, [row.file_id for row in ArchiveFile.select()]


def assert_error(excinfo, status, code):
    assert excinfo.value.status == status
    assert excinfo.value.code == code
    assert "\n" not in excinfo.value.message


# -- put -----------------------------------------------------------------------------------

def test_put_stores_bytes_and_record(archive):
    result = archive.put(12, io.BytesIO(DATA))
    assert result.created is True and result.total_bytes == len(DATA)
    info = archive.stat(12)
    assert (info.size, info.hashtype, info.hashsum) == (len(DATA), "sha1", sha1(DATA))
    info, handle = archive.open(12)
    with handle:
        assert handle.read() == DATA
    assert leftovers(archive) == (["0c/12"], [12])


def test_put_verifies_the_expected_hash_and_keeps_its_type(archive):
    archive.put("13", io.BytesIO(DATA), "SHA256", sha256(DATA).upper())
    assert (archive.stat(13).hashtype, archive.stat(13).hashsum) == ("sha256", sha256(DATA))
    # A prefixed sum names its own type.
    archive.put(14, io.BytesIO(DATA), None, f"sha256:{sha256(DATA)}")
    assert archive.stat(14).hashtype == "sha256"


def test_put_with_only_a_hashtype_hashes_with_it(archive):
    archive.put(15, io.BytesIO(DATA), "md5")
    assert archive.stat(15).hashsum == hashlib.md5(DATA).hexdigest()


def test_hash_mismatch_leaves_nothing(archive):
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(20, io.BytesIO(DATA), "sha1", sha1(b"other bytes"))
    assert_error(excinfo, 400, "hash_mismatch")
    assert sha1(b"other bytes") in excinfo.value.message and sha1(DATA) in excinfo.value.message
    assert leftovers(archive) == ([], [])


def test_same_bytes_again_is_accepted_without_change(archive):
    archive.put(21, io.BytesIO(DATA), mtime=datetime.datetime(2020, 1, 2, 3, 4, 5))
    before = archive.stat(21)
    again = archive.put(21, io.BytesIO(DATA), "sha256", sha256(DATA), mtime=1e9)
    assert again.created is False and again.total_bytes == len(DATA)
    assert archive.stat(21) == before
    assert leftovers(archive) == (["15/21"], [21])


def test_other_bytes_under_an_existing_id_conflict_and_leave_nothing(archive):
    archive.put(22, io.BytesIO(DATA))
    for other in (DATA + b"x", DATA[:-1], b""):
        with pytest.raises(LabvaultError) as excinfo:
            archive.put(22, io.BytesIO(other))
        assert_error(excinfo, 409, "file_exists")
    _, handle = archive.open(22)
    with handle:
        assert handle.read() == DATA
    assert leftovers(archive) == (["16/22"], [22])


def test_existing_id_with_a_wrong_expected_hash_is_a_mismatch(archive):
    archive.put(23, io.BytesIO(DATA))
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(23, io.BytesIO(DATA), "sha1", sha1(b"nope"))
    assert_error(excinfo, 400, "hash_mismatch")


@pytest.mark.parametrize("hashtype, hashsum, code", [
    ("crc32", "abcd", "unsupported_hashtype"),
    ("sha1", "not-hex", "invalid_hashsum"),
    ("sha1", "abcd", "hash_mismatch"),  # wrong length for sha1: cannot match
    ("sha1", "md5:" + hashlib.md5(DATA).hexdigest(), "invalid_hashsum"),
])
def test_bad_hash_arguments_are_refused_before_reading(archive, hashtype, hashsum, code):
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(24, Untouchable(), hashtype, hashsum)
    assert_error(excinfo, 400, code)
    assert leftovers(archive) == ([], [])


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "", None, str(2 ** 63), True])
def test_invalid_file_ids(archive, bad):
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(bad, Untouchable())
    assert_error(excinfo, 400, "invalid_file_id")


def test_parse_file_id():
    assert parse_file_id(" 7 ") == 7
    assert parse_file_id(2 ** 63 - 1) == 2 ** 63 - 1


def test_short_body_is_refused_and_leaves_nothing(archive):
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(25, io.BytesIO(DATA), size=len(DATA) + 10)
    assert_error(excinfo, 400, "incomplete_body")
    assert leftovers(archive) == ([], [])


def test_mtime_is_stored_as_naive_utc(archive):
    aware = datetime.datetime(2021, 6, 1, 12, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    archive.put(26, io.BytesIO(b"a"), mtime=aware)
    assert archive.stat(26).mtime == datetime.datetime(2021, 6, 1, 10, 0)
    archive.put(27, io.BytesIO(b"b"), mtime=0)
    assert archive.stat(27).mtime_epoch == 0


def test_failed_row_insert_removes_the_published_file(archive, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("database went away")
    monkeypatch.setattr(archive_module, "_insert_ignore", broken)
    with pytest.raises(RuntimeError):
        archive.put(28, io.BytesIO(DATA))
    assert leftovers(archive) == ([], [])


def test_bytes_without_a_row_are_adopted_when_identical(archive):
    # What a crash between publishing and inserting the row leaves behind.
    with archive.storage.begin_write(29) as upload:
        upload.write(DATA)
        upload.commit()
    result = archive.put(29, io.BytesIO(DATA))
    assert result.created is False
    assert archive.stat(29).hashsum == sha1(DATA)
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(29, io.BytesIO(b"different"))
    assert_error(excinfo, 409, "file_exists")
    assert leftovers(archive) == (["1d/29"], [29])


def test_bytes_without_a_row_conflict_when_different(archive):
    with archive.storage.begin_write(30) as upload:
        upload.write(b"stray")
        upload.commit()
    with pytest.raises(LabvaultError) as excinfo:
        archive.put(30, io.BytesIO(DATA))
    assert_error(excinfo, 409, "file_exists")
    assert leftovers(archive) == (["1e/30"], [])


@pytest.mark.parametrize("same_bytes", [True, False])
def test_concurrent_puts_of_one_id(archive, same_bytes):
    barrier = threading.Barrier(6)
    outcomes = []
    lock = threading.Lock()

    def put(n):
        payload = DATA if same_bytes else DATA + str(n).encode()
        barrier.wait()
        try:
            outcome = "created" if archive.put(31, io.BytesIO(payload)).created else "same"
        except LabvaultError as exc:
            outcome = exc.code
        finally:
            database.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("created") == 1
    assert set(outcomes) == ({"created", "same"} if same_bytes else {"created", "file_exists"})
    info, handle = archive.open(31)
    with handle:
        assert sha1(handle.read()) == info.hashsum
    assert leftovers(archive) == (["1f/31"], [31])


def put_in_child(url, root, file_id, payload):
    """In a child process: one PUT through an Archive and a database connection of its own."""
    database = common_db.bind(models.database, url)
    try:
        return "created" if Archive(PosixStorage(root)).put(file_id, io.BytesIO(payload), "sha1",
                                                            sha1(payload)).created else "same"
    except LabvaultError as exc:
        return exc.code
    finally:
        database.close()


@pytest.mark.parametrize("same_bytes", [True, False])
def test_two_processes_putting_one_id_at_once(archive, archive_db, same_bytes):
    url, root = database_url(archive_db), archive.storage.root
    for file_id in (32, 33, 34):  # a few rounds: the processes meet at different points
        payloads = [DATA, DATA if same_bytes else DATA + b"other"]
        outcomes = run_processes(put_in_child, [(url, root, file_id, payload) for payload in payloads],
                                 databases=[archive_db])
        assert sorted(outcomes) == (["created", "same"] if same_bytes else ["created", "file_exists"])
        winner = payloads[outcomes.index("created")]
        assert archive.stat(file_id).hashsum == sha1(winner)
        info, handle = archive.open(file_id)
        with handle:
            assert handle.read() == winner and info.size == len(winner)
    assert leftovers(archive) == (["20/32", "21/33", "22/34"], [32, 33, 34])


def test_sizes_above_two_gib_and_long_digests(archive):
    # The metadata seed has a 3 GiB file; a 32-bit column would overflow on PostgreSQL.
    big = 3 * 2 ** 30
    archive_module._insert_ignore(35, big, "sha512", "f" * 128, "e" * 64, datetime.datetime(2016, 11, 12, 21, 38, 21))
    info = archive.stat(35)
    assert (info.size, info.hashtype, len(info.hashsum)) == (big, "sha512", 128)
    assert info.mtime == datetime.datetime(2016, 11, 12, 21, 38, 21)
    archive_module._insert_ignore(35, 1, "sha1", "0" * 40, "0" * 64, datetime.datetime(2020, 1, 1))  # ignored: write-once
    assert archive.stat(35).size == big
    archive.put(2 ** 63 - 1, io.BytesIO(b"largest id"))
    assert archive.stat(str(2 ** 63 - 1)).size == 10


# -- read, delete, stage -----------------------------------------------------------------

def test_absent_files_are_404(archive):
    for call in (archive.stat, archive.open, archive.delete, archive.stage):
        with pytest.raises(LabvaultError) as excinfo:
            call(40)
        assert_error(excinfo, 404, "file_not_found")


def test_delete_removes_bytes_and_record(archive):
    archive.put(41, io.BytesIO(DATA))
    archive.stage(41)
    archive.delete(41)
    assert leftovers(archive) == ([], [])
    # Once gone, the id can be written again (a re-run job after a failed one).
    assert archive.put(41, io.BytesIO(b"new")).created is True


def test_record_without_bytes_is_404_on_open(archive):
    archive.put(42, io.BytesIO(DATA))
    archive.storage.delete(42)
    with pytest.raises(LabvaultError) as excinfo:
        archive.open(42)
    assert_error(excinfo, 404, "file_not_found")


# -- patch ---------------------------------------------------------------------------------

def test_patch_copies_and_leaves_the_source(archive, sources):
    source = sources / "sub" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(DATA)
    os.utime(source, (1_600_000_000, 1_600_000_000))
    result = archive.patch(50, str(source), "sha256", sha256(DATA))
    assert result.created is True and result.total_bytes == len(DATA)
    assert source.read_bytes() == DATA
    info = archive.stat(50)
    assert info.hashtype == "sha256" and info.mtime_epoch == 1_600_000_000
    assert archive.patch(50, str(source)).created is False


def test_patch_hash_mismatch_leaves_nothing(archive, sources):
    source = sources / "f"
    source.write_bytes(DATA)
    with pytest.raises(LabvaultError) as excinfo:
        archive.patch(51, str(source), "sha1", sha1(b"x"))
    assert_error(excinfo, 400, "hash_mismatch")
    assert leftovers(archive) == ([], [])
    assert source.exists()


def test_patch_refuses_paths_outside_the_roots(archive, sources, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(DATA)
    (sources / "link").symlink_to(outside)
    for path in (str(outside), str(sources / "link"), str(sources / ".." / "outside.bin"),
                 "outside.bin", "", "/etc/passwd"):
        with pytest.raises(LabvaultError) as excinfo:
            archive.patch(52, path)
        assert_error(excinfo, 403, "path_not_allowed")
    assert leftovers(archive) == ([], [])


def test_patch_missing_source_and_non_files(archive, sources):
    with pytest.raises(LabvaultError) as excinfo:
        archive.patch(53, str(sources / "missing"))
    assert_error(excinfo, 404, "source_not_found")
    (sources / "dir").mkdir()
    with pytest.raises(LabvaultError) as excinfo:
        archive.patch(53, str(sources / "dir"))
    assert_error(excinfo, 400, "source_not_file")


def test_patch_without_roots_refuses_everything(tmp_path, archive_db, sources):
    archive = Archive(PosixStorage(tmp_path / "archive"), patch_roots=[])
    source = sources / "f"
    source.write_bytes(b"x")
    with pytest.raises(LabvaultError) as excinfo:
        archive.patch(54, str(source))
    assert_error(excinfo, 403, "path_not_allowed")
