"""Memory, temporary space and speed of building a computed file's data zip, by package size.

Run from the repository root:  python -m tests.bench.package [--gib 1,10] [--member-mib 512]

For each size it builds, in a fresh child process, a project zip of that many GiB with
``stats_service.packages.write_zip`` (members of --member-mib MiB, each read from a
non-seekable stream the way an archive response is read, ZIP64 where a member passes
2 GiB) into a temporary directory, and prints the seconds, the MiB/s, the child's peak
resident memory (VmHWM) and the bytes left in the directory beside the zip itself. In
the same run it copies the same bytes into one plain file (the reference: what writing
the output costs at all). Linux only (reads /proc). Figures, not assertions: the target
is a peak memory and a temporary space that do not grow with the package.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.archive_put import Body, memory_kib

MIB = 1024 * 1024
GIB = 1024 * MIB


class Stream:
    """A member's bytes as an archive response gives them: read() only, no seek, no length."""

    def __init__(self, size: int):
        self._body = Body(size)

    def read(self, n: int = -1) -> bytes:
        return self._body.read(n)

    def close(self) -> None:
        pass


def members(total: int, member_size: int):
    from stats_service.packages import Member
    count, rest = divmod(total, member_size)
    sizes = [member_size] * count + ([rest] if rest else [])
    return [Member(f"sample-{i % 4}/data/part-{i:05d}.bin", size, lambda size=size: Stream(size))
            for i, size in enumerate(sizes)]


def build(folder: Path, total: int, member_size: int, reference: bool) -> dict:
    """One build (or the reference copy) in this process; its figures as a dict."""
    from stats_service.packages import write_zip
    target = folder / ("reference.bin" if reference else "package.zip")
    start = time.perf_counter()
    if reference:
        with open(target, "wb") as out:
            for member in members(total, member_size):
                stream = member.open()
                while chunk := stream.read(MIB):
                    out.write(chunk)
    else:
        write_zip(target, members(total, member_size), {"metadata.tsv": b"path\n", "README.md": b"# bench\n"})
    seconds = time.perf_counter() - start
    beside = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p != target)
    return {"seconds": seconds, "bytes": target.stat().st_size,
            "peak_rss_mib": memory_kib(os.getpid())["VmHWM"] / 1024, "temporary_bytes_beside_output": beside}


def run_child(total: int, member_size: int, reference: bool, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        output = subprocess.run([sys.executable, "-m", "tests.bench.package", "--child", str(total), str(member_size),
                                 "1" if reference else "0", str(folder)],
                                check=True, capture_output=True, text=True).stdout
        return json.loads(output.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", default="1,10", help="package sizes in GiB, comma separated (default 1,10)")
    parser.add_argument("--member-mib", type=int, default=512, help="size of each member in MiB (default 512)")
    parser.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        total, member_size, reference, folder = args.child
        print(json.dumps(build(Path(folder), int(total), int(member_size), reference == "1")))
        return
    base = Path(tempfile.mkdtemp(prefix="labvault-bench-package-", dir=args.dir))
    try:
        print(f"{'GiB':>5} {'zip s':>8} {'MiB/s':>8} {'copy s':>8} {'ratio':>6} {'peak MiB':>9} "
              f"{'copy peak':>9} {'temp bytes':>10}")
        for gib in (float(x) for x in args.gib.split(",")):
            total = int(gib * GIB)
            package = run_child(total, args.member_mib * MIB, False, base / "zip")
            copy = run_child(total, args.member_mib * MIB, True, base / "copy")
            print(f"{gib:>5g} {package['seconds']:>8.2f} {total / MIB / package['seconds']:>8.0f} "
                  f"{copy['seconds']:>8.2f} {copy['seconds'] / package['seconds']:>6.2f} "
                  f"{package['peak_rss_mib']:>9.0f} {copy['peak_rss_mib']:>9.0f} "
                  f"{package['temporary_bytes_beside_output']:>10}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
