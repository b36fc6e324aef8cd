"""Full disks, for real: the staging directory (and the archive root) is a 2 MiB file system.

``POST /ingest`` answers 507 ``insufficient_storage``, the partial upload is removed, the
job is FAILED at ``UPLOADING`` and the service goes on serving. The ingest application
runs in-process on a real server (as in test_ingest_uploads); job ids come from the
session stack's metadata service. The archive answers a PUT that fills its disk the same
way and keeps no partial file (an ingest job then fails ``archive_unavailable``, the
client having retried the 5xx).

The small file system is a tmpfs (needs root, or CAP_SYS_ADMIN); failing that, an ext4
image on a loop device. Without either the test skips, saying why (under CI=true it fails).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from archive_service import models as archive_models
from archive_service.app import build_app as build_archive
from common import migrations
from common.db import bind, close_quietly
from ingest_service import models
from ingest_service.app import build_app
from tests.helpers import NoBroker, make_settings, payload_bundle, serve_wsgi
from tests.servers import need

SIZE = 2 * 1024 * 1024


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def small_filesystem(where: Path):
    """Mount a 2 MiB file system on ``where``; yields what it is; unmounts afterwards."""
    where.mkdir(parents=True)
    problems = []
    mounted = None
    if shutil.which("mount"):
        result = _run("mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(where))
        if result.returncode == 0:
            mounted = "tmpfs"
        else:
            problems.append(f"tmpfs: {result.stderr.strip()}")
        if mounted is None and shutil.which("mkfs.ext4"):
            image = where.with_name(where.name + ".img")
            with open(image, "wb") as handle:
                handle.truncate(4 * SIZE)  # ext4's own metadata takes some
            made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))  # no blocks kept for root
            result = _run("mount", "-o", "loop", str(image), str(where)) if made.returncode == 0 else made
            if result.returncode == 0:
                mounted = "ext4 on a loop device"
            else:
                problems.append(f"loop: {result.stderr.strip()}")
    else:
        problems.append("no mount command")
    need(mounted is not None, "cannot make a small file system here: " + "; ".join(problems))
    try:
        yield mounted
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))


@pytest.fixture
def ingest(stack, tmp_path):
    staging = tmp_path / "staging"
    with small_filesystem(staging):
        settings = make_settings(tmp_path, ingest={"staging_dir": str(staging)}, metadata={"url": stack.url("metadata")})
        migrations.sync(bind(models.database, settings.database_url("ingest")), models.SCHEMA)
        broker = NoBroker()
        with serve_wsgi(build_app(settings, celery_app=broker)) as url:
            yield url, staging, broker


def latest_job():
    with models.database.connection_context():
        return models.Job.select().order_by(models.Job.job_id.desc()).first()


def post(url: str, data) -> requests.Response:
    return requests.post(url + "/ingest", data=data, timeout=60, headers={"Content-Type": "application/octet-stream"})


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_full_staging_volume_is_507_and_the_service_goes_on(ingest, chunked):
    url, staging, broker = ingest
    free = shutil.disk_usage(staging).free
    raw = os.urandom(free + SIZE // 4)
    body = (raw[start:start + 65536] for start in range(0, len(raw), 65536)) if chunked else raw
    response = post(url, body)
    assert response.status_code == 507, response.text
    answer = response.json()
    assert answer["code"] == "insufficient_storage" and str(staging) not in answer["message"], answer
    job = latest_job()
    assert (job.state, job.task) == ("FAILED", "UPLOADING")
    assert job.exception.startswith("insufficient_storage: ") and str(staging) not in job.exception
    assert list(staging.iterdir()) == []  # the partial upload is gone, so is the space it took
    assert shutil.disk_usage(staging).free >= free - 64 * 1024
    assert broker.sent == []

    # The service keeps serving: the failed job's state, and the next upload that fits.
    state = requests.get(f"{url}/get_state/{job.job_id}", timeout=10).json()
    assert (state["state"], state["task"], state["complete"]) == ("FAILED", "UPLOADING", True)
    response = post(url, payload_bundle({"small/ok.bin": os.urandom(100_000)}))
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert (staging / f"{job_id}.tar").is_file()
    assert broker.sent == [("ingest.process_job", [job_id])]


def test_full_archive_volume_is_507_and_keeps_nothing(tmp_path):
    root = tmp_path / "archive"
    with small_filesystem(root):
        settings = make_settings(tmp_path, archive={"root": str(root)})
        saved = archive_models.database.obj
        try:
            db = bind(archive_models.database, settings.database_url("archive"))
            migrations.sync(db, archive_models.SCHEMA)
            close_quietly(db)
            with serve_wsgi(build_archive(settings)) as url:
                raw = os.urandom(shutil.disk_usage(root).free + SIZE // 4)
                response = requests.put(f"{url}/4242", data=raw, timeout=60)
                assert response.status_code == 507, response.text
                answer = response.json()
                assert answer["code"] == "insufficient_storage" and str(root) not in answer["message"]
                assert [p for p in root.rglob("*") if p.is_file()] == []  # no partial file
                assert requests.head(f"{url}/4242", timeout=10).status_code == 404
                assert requests.put(f"{url}/4243", data=b"fits", timeout=10).status_code == 201
        finally:
            archive_models.database.initialize(saved)
