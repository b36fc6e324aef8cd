"""Speed benchmark of the archive's write paths: one ``PUT`` per file against ``POST /batch``.

Run from the repository root:  python -m tests.bench.archive_batch [--files 10000] [--kib 4]

It serves the archive (POSIX, SQLite) in a child process and stores --files files of --kib KiB
three ways on the same disk in the same run: the durable one-pass reference (this process
writes each file, hashes it with sha1 and sha256, fsyncs it, then fsyncs the directories),
one ``PUT`` per file, and ``POST /batch`` requests of --batch files (what ``ingest files``
sends). It prints seconds, files/s, the ratio to the reference and the archive server's CPU
per file (from /proc; Linux only). Figures, not assertions; other work on the machine moves them.
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

from common.clients import batch_header
from tests.bench.archive_put import REPO, _up

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def reference(folder: Path, files: list[bytes]) -> float:
    """The durable one-pass copy: write, hash (sha1 and sha256), fsync each; fsync each directory."""
    started = time.monotonic()
    directories = set()
    for n, data in enumerate(files):
        directory = folder / f"{n % 256:02x}"
        if directory not in directories:
            directory.mkdir(parents=True, exist_ok=True)
            directories.add(directory)
        hashlib.sha1(data).hexdigest()
        hashlib.sha256(data).hexdigest()
        with open(directory / str(n), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000, help="how many files (default 10000)")
    parser.add_argument("--kib", type=int, default=4, help="KiB a file (default 4)")
    parser.add_argument("--batch", type=int, default=1000, help="files a POST /batch (default 1000)")
    args = parser.parse_args()

    from tests.helpers import free_port, wait_for

    files = [os.urandom(args.kib * 1024) for _ in range(args.files)]
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        child = subprocess.Popen([sys.executable, "-m", "tests.bench.archive_put", "--serve", data_dir, str(port)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _up(base), timeout=30, message="the archive service")
            limit = reference(Path(data_dir) / "reference", files)
            print(f"{args.files} files of {args.kib} KiB; durable one-pass reference {limit:.2f}s "
                  f"({args.files / limit:,.0f} files/s)")
            session = requests.Session()

            def per_file(first_id: int) -> None:
                for n, data in enumerate(files):
                    answer = session.put(f"{base}/{first_id + n}", data=data, timeout=60,
                                         params={"hashtype": "sha1", "hashsum": hashlib.sha1(data).hexdigest()})
                    answer.raise_for_status()

            def batched(first_id: int) -> None:
                for start in range(0, len(files), args.batch):
                    body = b"".join(batch_header(first_id + n, len(data), "sha1", hashlib.sha1(data).hexdigest())
                                    + data for n, data in enumerate(files[start:start + args.batch], start))
                    answer = session.post(f"{base}/batch", data=body, timeout=600)
                    answer.raise_for_status()

            for label, action, first_id in (("PUT per file", per_file, 1_000_000),
                                            ("POST /batch", batched, 2_000_000)):
                cpu = cpu_seconds(child.pid)
                started = time.monotonic()
                action(first_id)
                seconds = time.monotonic() - started
                cpu = cpu_seconds(child.pid) - cpu
                print(f"{label:<14} {seconds:7.2f}s  {args.files / seconds:8,.0f} files/s  ratio {limit / seconds:5.2f}"
                      f"  archive CPU {1000 * cpu / args.files:.3f} ms/file")
        finally:
            child.terminate()
            child.wait(timeout=30)


if __name__ == "__main__":
    main()
