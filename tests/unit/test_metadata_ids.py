"""getid: range and mode rules, floors above directly inserted rows, disjoint ranges under concurrency."""
from __future__ import annotations

import threading

import pytest

from common import db
from common.errors import BadRequest
from metadata_service import ids, models, objects
from tests.unit.processes import database_url, run_processes


def test_fresh_mode_starts_at_one_and_ranges_follow(metadata_db):
    assert ids.getid("upload_job", "1") == {"startIndex": 1, "endIndex": 1}
    assert ids.getid("upload_job", "10") == {"startIndex": 2, "endIndex": 11}
    assert ids.getid("file", 5) == {"startIndex": 1, "endIndex": 5}
    assert ids.getid("my_mode_2", 1_000_000) == {"startIndex": 1, "endIndex": 1_000_000}
    assert ids.getid("my_mode_2", 1) == {"startIndex": 1_000_001, "endIndex": 1_000_001}


@pytest.mark.parametrize("mode", [None, "", "Upload", "1file", "_x", "a-b", "a b", "a" * 65, "fil\u00e9", 7])
def test_bad_mode(metadata_db, mode):
    with pytest.raises(BadRequest) as caught:
        ids.getid(mode, "1")
    assert caught.value.code == "invalid_mode"


@pytest.mark.parametrize("count", [None, "", "0", 0, "-1", "1000001", 1_000_001, "abc", "1.5", True, 2.0])
def test_bad_range(metadata_db, count):
    with pytest.raises(BadRequest) as caught:
        ids.getid("file", count)
    assert caught.value.code == "invalid_range"


def test_bad_request_allocates_nothing(metadata_db):
    with pytest.raises(BadRequest):
        ids.getid("file", "0")
    assert models.IdCounter.select().count() == 0


def test_never_below_rows_inserted_directly(metadata_seeded):
    objects.insert("transactions", {"_id": 500, "submitter": 10, "project": "1234a", "instrument": 54})
    objects.insert("files", {"_id": 900, "name": "x", "size": 1, "transaction": 500})
    assert ids.getid("upload_job", 2) == {"startIndex": 501, "endIndex": 502}
    assert ids.getid("file", 1) == {"startIndex": 901, "endIndex": 901}
    # Other modes have no rows to stay above.
    assert ids.getid("other", 1)["startIndex"] == 1
    # A row inserted behind the counter's back moves the next range above it again.
    objects.insert("transactions", {"_id": 1000})
    assert ids.getid("upload_job", 1)["startIndex"] == 1001
    # ...but an older, lower row does not pull the counter back.
    objects.insert("transactions", {"_id": 700})
    assert ids.getid("upload_job", 1)["startIndex"] == 1002


def assert_disjoint(ranges):
    ordered = sorted(ranges)
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        assert start > end, f"overlapping ranges around {start}"


def test_concurrent_threads_get_disjoint_ranges(metadata_db):
    ranges, errors = [], []
    lock = threading.Lock()

    def work(seed):
        try:
            for n in range(30):
                got = ids.allocate("upload_job", (seed * 7 + n) % 13 + 1)
                with lock:
                    ranges.append(got)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            # peewee keeps one connection per thread: each worker had its own.
            metadata_db.close()

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(ranges) == 8 * 30
    assert_disjoint(ranges)
    assert min(start for start, _ in ranges) == 1
    total = sum(end - start + 1 for start, end in ranges)
    assert max(end for _, end in ranges) == total  # no gaps either


def allocate_ranges(url, sizes):
    """In a child process: allocate one range per size over a connection of its own."""
    database = db.bind(models.database, url)
    try:
        return [ids.allocate("file", size) for size in sizes]
    finally:
        database.close()


def test_concurrent_processes_get_disjoint_ranges(metadata_db):
    # Rows the floor of mode "file" must stay above, seen by every process.
    models.Transactions.insert(id=1).execute()
    models.Files.insert(id=100, name="f", size=1, transaction=1).execute()
    url = database_url(metadata_db)
    calls = [(url, [(seed + n) % 5 + 1 for n in range(40)]) for seed in range(4)]
    results = run_processes(allocate_ranges, calls, databases=[metadata_db])
    ranges = [tuple(pair) for result in results for pair in result]
    assert len(ranges) == 160
    assert_disjoint(ranges)
    # None lost: together they cover 101.. without a gap, and the counter is right behind them.
    total = sum(size for _, sizes in calls for size in sizes)
    assert (min(start for start, _ in ranges), max(end for _, end in ranges)) == (101, 100 + total)
    assert models.IdCounter.get_by_id("file").next_id == 101 + total
