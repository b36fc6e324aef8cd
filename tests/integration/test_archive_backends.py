"""The archive service over HTTP on each backend (POSIX and a real S3 server): digests on
HEAD and GET, Range, verified-before-visible, racing writers, fixity, start-up checks."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest
import requests

from archive_service import fixity, models
from archive_service.app import build_app
from archive_service.storage import PosixStorage
from common import db as common_db
from common import migrations
from archive_service.storage import StorageUnavailable
from tests.helpers import REPO, env_for, make_settings, serve_wsgi

MIB = 1024 * 1024
DATA = os.urandom(200 * 1024) + b"end"


def backend_settings(request, tmp_path, **archive):
    """Settings for the backend ``request.param`` names (``posix``, or ``s3`` on the test S3
    server), with these ``[archive]`` settings besides."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        archive.update({"backend": "s3", "bucket": request.getfixturevalue("s3_bucket"), "prefix": "files",
                        "endpoint_url": endpoint.url, "region": endpoint.region, "addressing_style": "path",
                        "create_bucket": "true", "part_size": str(5 * MIB)})
    return make_settings(tmp_path, archive=archive, http={"retries": 0})


@pytest.fixture(params=["posix", pytest.param("s3", marks=pytest.mark.s3)])
def settings(request, tmp_path):
    return backend_settings(request, tmp_path)


@pytest.fixture
def app(settings):
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    return build_app(settings)


@pytest.fixture
def base_url(app):
    with serve_wsgi(app) as url:
        yield url


@pytest.fixture
def storage(app):
    return app.root.archive.storage


def leftovers(storage) -> list[str]:
    if isinstance(storage, PosixStorage):
        root = storage.root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    objects = storage.client.list_objects_v2(Bucket=storage.bucket).get("Contents") or []
    return sorted([obj["Key"] for obj in objects] + [f"upload:{u['Key']}" for u in storage.open_uploads()])


def rows() -> list[int]:
    with models.database.connection_context():
        return [row.file_id for row in models.ArchiveFile.select().order_by(models.ArchiveFile.file_id)]


def name_of(storage, file_id) -> str:
    if isinstance(storage, PosixStorage):
        return str(storage.path_for(file_id).relative_to(storage.root))
    return storage.key_for(file_id)


def assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["status"].startswith(str(status))
    assert "Traceback" not in response.text and "/tmp" not in response.text


def test_round_trip_with_digests_range_and_safe_headers(base_url, storage):
    media = "disk" if isinstance(storage, PosixStorage) else "s3"
    sha1, sha256 = hashlib.sha1(DATA).hexdigest(), hashlib.sha256(DATA).hexdigest()
    response = requests.put(f"{base_url}/7", data=DATA, params={"hashtype": "sha1", "hashsum": sha1}, timeout=30)
    assert response.status_code == 201 and response.json()["total_bytes"] == len(DATA)
    for method in (requests.head, requests.get):
        headers = method(f"{base_url}/7", timeout=30).headers
        assert headers["X-Hash-Type"] == "sha1" and headers["X-Hash-Sum"] == sha1
        assert headers["X-Labvault-Sha256"] == sha256
        assert headers["X-Pacifica-File-Storage-Media"] == media
        assert headers["X-Pacifica-File-Size"] == headers["Content-Length"] == str(len(DATA))
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Accept-Ranges"] == "bytes"
    assert requests.get(f"{base_url}/7", timeout=30).content == DATA
    part = requests.get(f"{base_url}/7", headers={"Range": "bytes=1000-1999"}, timeout=30)
    assert part.status_code == 206 and part.content == DATA[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(DATA)}"
    assert requests.get(f"{base_url}/7", headers={"Range": "bytes=-3"}, timeout=30).content == b"end"
    tail = requests.get(f"{base_url}/7", headers={"Range": f"bytes={len(DATA) - 10}-"}, timeout=30)
    assert tail.status_code == 206 and tail.content == DATA[-10:]
    refused = requests.get(f"{base_url}/7", headers={"Range": f"bytes={len(DATA)}-"}, timeout=30)
    assert refused.status_code == 416 and refused.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert requests.put(f"{base_url}/7", data=DATA, timeout=30).status_code == 200
    assert_error(requests.put(f"{base_url}/7", data=DATA[:-1] + b"!", timeout=30), 409, "file_exists")
    assert leftovers(storage) == [name_of(storage, 7)] and rows() == [7]


def test_a_wrong_hash_leaves_no_object_and_no_open_upload(base_url, storage):
    big = os.urandom(MIB) * 12  # several parts on S3
    for body in (DATA, big):
        response = requests.put(f"{base_url}/8", data=body, timeout=60,
                                headers={"X-Hash-Type": "sha256", "X-Hash-Sum": "0" * 64})
        assert_error(response, 400, "hash_mismatch")
    assert leftovers(storage) == [] and rows() == []
    assert_error(requests.get(f"{base_url}/8", timeout=30), 404, "file_not_found")


def test_racing_puts_of_different_bytes_one_wins_whole(base_url, storage):
    bodies = {n: bytes([n]) * (6 * MIB + n) for n in range(2)}
    barrier = threading.Barrier(2)
    answers = {}

    def put(n):
        barrier.wait()
        answers[n] = requests.put(f"{base_url}/9", data=bodies[n], timeout=120)

    threads = [threading.Thread(target=put, args=(n,)) for n in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(answer.status_code for answer in answers.values())
    assert statuses == [201, 409], {n: a.text for n, a in answers.items()}
    winner = next(n for n, answer in answers.items() if answer.status_code == 201)
    stored = requests.get(f"{base_url}/9", timeout=60).content
    assert stored == bodies[winner]
    assert leftovers(storage) == [name_of(storage, 9)] and rows() == [9]


def corrupt(storage, file_id: int) -> None:
    """Change the stored bytes behind the archive's back: a flipped byte on disk, an overwritten object."""
    if isinstance(storage, PosixStorage):
        path = storage.path_for(file_id)
        path.chmod(0o640)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    else:
        with storage.open_read(file_id) as handle:
            raw = bytearray(handle.read())
        raw[len(raw) // 2] ^= 0x01
        storage.client.put_object(Bucket=storage.bucket, Key=storage.key_for(file_id), Body=bytes(raw))


def test_fixity_finds_corrupted_and_missing_files(base_url, storage):
    for file_id in (1, 2, 3):
        assert requests.put(f"{base_url}/{file_id}", data=DATA + bytes([file_id]), timeout=30).status_code == 201
    with models.database.connection_context():
        assert [o.result for o in fixity.run(storage, limit=10)] == ["ok", "ok", "ok"]
    corrupt(storage, 2)
    storage.delete(3)
    with models.database.connection_context():
        # Everything was checked just now: nothing is older than a day.
        assert fixity.run(storage, limit=10, older_than_days=1) == []
        outcomes = {o.file_id: o for o in fixity.run(storage, limit=10)}
        assert {n: o.result for n, o in outcomes.items()} == {1: "ok", 2: "mismatch", 3: "unreadable"}
        assert fixity.run(storage, file_id=2)[0].result == "mismatch"
        assert [entry["result"] for entry in fixity.history(2)] == ["mismatch", "mismatch", "ok"]

    listing = requests.get(f"{base_url}/fixity", params={"result": "mismatch"}, timeout=30).json()
    assert listing["total"] == 1 and [item["file_id"] for item in listing["items"]] == [2]
    assert "sha256" in listing["items"][0]["detail"]
    problems = requests.get(f"{base_url}/fixity", timeout=30).json()
    assert [(item["file_id"], item["result"]) for item in problems["items"]] == [(2, "mismatch"), (3, "unreadable")]
    paged = requests.get(f"{base_url}/fixity", params={"items_per_page": 1, "page_number": 2}, timeout=30).json()
    assert [item["file_id"] for item in paged["items"]] == [3] and paged["total"] == 2
    summary = requests.get(f"{base_url}/fixity/summary", timeout=30).json()
    assert (summary["ok"], summary["mismatch"], summary["unreadable"], summary["unchecked"]) == (1, 1, 1, 0)
    assert summary["total"] == 3
    assert_error(requests.get(f"{base_url}/fixity", params={"result": "bad"}, timeout=30), 400, "invalid_result")
    assert_error(requests.get(f"{base_url}/fixity", params={"page_number": "x"}, timeout=30),
                 400, "invalid_page_number")
    assert_error(requests.get(f"{base_url}/fixity", params={"items_per_page": 0}, timeout=30), 400, "invalid_page")
    assert requests.put(f"{base_url}/fixity", data=b"x", timeout=30).status_code == 405
    assert_error(requests.get(f"{base_url}/fixity/nothing", timeout=30), 404, "not_found")


def test_fixity_checks_the_oldest_first_in_bounded_runs(base_url, storage):
    for file_id in range(1, 6):
        requests.put(f"{base_url}/{file_id}", data=b"x" * file_id, timeout=30)
    with models.database.connection_context():
        first = [o.file_id for o in fixity.run(storage, limit=2)]
        second = [o.file_id for o in fixity.run(storage, limit=2)]
        third = [o.file_id for o in fixity.run(storage, limit=2)]
    assert first == [1, 2] and second == [3, 4] and third == [5, 1]


@pytest.mark.s3
def test_a_missing_bucket_stops_the_start_in_one_line(s3_endpoint, s3_bucket, tmp_path):
    settings = make_settings(tmp_path, archive={"backend": "s3", "bucket": s3_bucket,
                                                "endpoint_url": s3_endpoint.url, "addressing_style": "path"})
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        build_app(settings)
    result = subprocess.run([sys.executable, "-m", "common.cli", "serve", "archive"], env=env_for(settings),
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"S3 bucket {s3_bucket!r} does not exist; create it or set [archive] create_bucket = true" in result.stderr
    build_app(make_settings(tmp_path, archive={"backend": "s3", "bucket": s3_bucket, "create_bucket": "true",
                                               "endpoint_url": s3_endpoint.url, "addressing_style": "path"}))
    s3_endpoint.client().head_bucket(Bucket=s3_bucket)  # raises if it is not there


def test_the_fixity_command_line(base_url, settings, storage):
    for file_id in (1, 2):
        requests.put(f"{base_url}/{file_id}", data=DATA + bytes([file_id]), timeout=30)
    corrupt(storage, 2)
    result = subprocess.run([sys.executable, "-m", "common.cli", "fixity", "--limit", "10"], env=env_for(settings),
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert "file 2: mismatch" in result.stdout and "2 checked, 1 ok, 1 with problems" in result.stdout
    again = subprocess.run([sys.executable, "-m", "common.cli", "fixity", "--file-id", "1"], env=env_for(settings),
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and "1 checked, 1 ok" in again.stdout
    summary = requests.get(f"{base_url}/fixity/summary", timeout=30).json()
    assert (summary["ok"], summary["mismatch"]) == (1, 1)


@pytest.mark.s3
def test_under_uwsgi_a_missing_bucket_stops_the_archive_in_one_line(s3_endpoint, s3_bucket, tmp_path):
    from tests.helpers import free_port
    from tests.servers import require_uwsgi, uwsgi_binary
    require_uwsgi()
    settings = make_settings(tmp_path, archive={"backend": "s3", "bucket": s3_bucket,
                                                "endpoint_url": s3_endpoint.url, "addressing_style": "path"})
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    result = subprocess.run([uwsgi_binary(), "--http-socket", f"127.0.0.1:{free_port()}", "--ini",
                             str(REPO / "config" / "uwsgi" / "archive.ini")], env=env_for(settings),
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"archive: cannot start: S3 bucket {s3_bucket!r} does not exist" in output
    assert "Traceback" not in output
