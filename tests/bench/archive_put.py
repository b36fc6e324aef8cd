"""Memory benchmark of the archive service: does a large PUT (and GET) stream, or buffer?

Run from the repository root:  python -m tests.bench.archive_put [--mib 200]

It serves the archive in a child process, PUTs --mib MiB twice (with a Content-Length,
then chunked) and GETs it back, and prints the server's resident memory (VmRSS) and
peak (VmHWM) around each transfer. Linux only (reads /proc). Figures, not assertions:
growth far below the body size means the body was streamed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
BLOCK = os.urandom(1024 * 1024)


class Body:
    """``size`` bytes made of one repeated random MiB; has a length, so requests streams it."""

    def __init__(self, size: int):
        self.size = size
        self.sent = 0
        self.hasher = hashlib.sha1()

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.sent
        n = left if n is None or n < 0 else min(n, left)
        parts, start = [], self.sent % len(BLOCK)
        while n > 0:
            part = BLOCK[start:start + n]
            parts.append(part)
            n -= len(part)
            start = 0
        chunk = b"".join(parts)
        self.sent += len(chunk)
        self.hasher.update(chunk)
        return chunk

    def chunks(self):
        while chunk := self.read(len(BLOCK)):
            yield chunk


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def serve(data_dir: str, port: int) -> None:
    from archive_service import models
    from archive_service.app import build_app
    from common import db as common_db
    from common import migrations
    from tests.helpers import make_settings, serve_wsgi

    settings = make_settings(Path(data_dir))
    db = common_db.bind(models.database, settings.database_url("archive"))
    migrations.sync(db, models.SCHEMA)
    common_db.close_quietly(db)
    with serve_wsgi(build_app(settings), port=port):
        while True:
            time.sleep(3600)


def measure(pid: int, label: str, action) -> None:
    before = memory_kib(pid)
    started = time.monotonic()
    detail = action()
    seconds = time.monotonic() - started
    after = memory_kib(pid)
    print(f"{label:<22} {seconds:6.2f}s  RSS {before['VmRSS'] / 1024:7.1f} -> {after['VmRSS'] / 1024:7.1f} MiB"
          f"  peak {before['VmHWM'] / 1024:7.1f} -> {after['VmHWM'] / 1024:7.1f} MiB  {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="body size in MiB (default 200)")
    parser.add_argument("--serve", nargs=2, metavar=("DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return

    from tests.helpers import free_port, wait_for

    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        child = subprocess.Popen([sys.executable, "-m", "tests.bench.archive_put", "--serve", data_dir, str(port)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _up(base), timeout=30, message="the archive service")
            print(f"archive server pid {child.pid}, body {args.mib} MiB")

            def put(file_id, chunked):
                body = Body(size)
                data = body.chunks() if chunked else body
                answer = requests.put(f"{base}/{file_id}", data=data, timeout=600)
                answer.raise_for_status()
                total = answer.json()["total_bytes"]
                return f"{answer.status_code} total_bytes={total} sha1={body.hasher.hexdigest()[:12]}"

            def get(file_id):
                hasher, count = hashlib.sha1(), 0
                with requests.get(f"{base}/{file_id}", stream=True, timeout=600) as answer:
                    for chunk in answer.iter_content(1024 * 1024):
                        hasher.update(chunk)
                        count += len(chunk)
                return f"{count} bytes sha1={hasher.hexdigest()[:12]}"

            measure(child.pid, "PUT (Content-Length)", lambda: put(1, chunked=False))
            measure(child.pid, "PUT (chunked)", lambda: put(2, chunked=True))
            measure(child.pid, "GET", lambda: get(1))
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
