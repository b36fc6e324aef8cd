"""Benchmark: ingest end to end, next to the durable one-pass limit on the same bundle and disk.

Run from the repository root (a script that prints figures, not a test; it asserts nothing):

    python -m tests.bench.ingest [--cases 1x1G,1000x64K,10000x4K] [--repeat 1]
                                 [--deployment embedded|production | --url URL [--pid ROLE=PID ...]]
                                 [--sync-batch N] [--json PATH] [--work-dir DIR] [--keep]

For each case (``NxSIZE``: N files of SIZE bytes, SIZE with a K, M or G suffix) it writes a
bundle to disk (streamed, payload from a seeded generator, ``metadata.txt`` first with sha1
hashes), POSTs it to the deployment's ingest service and follows the job to ``OK``. It
prints the accept time (POST start to the answer with the job id), the end-to-end time
(POST start to ``OK``), MB/s, files/s, and, per labvault process (ingest, archive, metadata,
worker; policy and stats apart), the CPU seconds spent during the case (its own and its
children's, uWSGI and Celery pool processes included) and its peak resident memory.

On the same bundle file, in the same run, one process does the least any durable ingest
must do (the *limit*): read the tar as a stream, hash each member with the hash it declares
(sha1) and the sha256 the archive keeps of every file, write each to its own file under the
archive's sharding, and fsync the files in groups of ``--sync-batch`` (default: the
deployment's ``[archive] sync_batch``, else 1, as the archive fsyncs each file) and then
their directories, before counting them done. It writes next to the archive directory, on
the same filesystem. Each case's ratio is limit seconds / labvault seconds (1.0: as fast
as the limit), checked against issue 14's targets.

Then it runs the case with the most files once more while another process asks
``GET /get_state`` for that job as fast as it can, and prints requests/s and latencies (a
separate run, so the polling does not slow down the measured ones).

The embedded default (``labvault up``) or the production shape (``--deployment production``:
uWSGI, RabbitMQ, PostgreSQL, as ``tests.production`` starts it) is started in a temporary
directory on free ports, seeded with the Pacifica seed, and stopped and removed at the end.
``--url`` uses a running deployment instead: its processes are found through the sockets
listening on the services' ports and the ``labvault worker`` command lines, or named with
``--pid ROLE=PID``; a process that cannot be observed is reported as such.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CASES = "1x1G,1000x64K,10000x4K"
ROLES = ("ingest", "archive", "metadata", "worker")
OTHER_ROLES = ("policy", "stats")
SUFFIXES = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
MIB = 1024 * 1024
CHUNK = MIB
# Issue 14's targets, as ratios to the limit in the same run and per-process limits.
SMALL_FILE_BYTES = 64 * 1024
SMALL_RATIO, LARGE_RATIO = 0.6, 0.8
RSS_LIMIT_MIB = 150
CPU_PER_SMALL_FILE_MS = 0.3
# The deployment this script starts: the shipped defaults, except what a benchmark bundle
# needs (a 10 GiB case is larger than 10 GiB with its headers; 100,000 Files entries are
# about 16 MB of metadata) and no statistics build after each case (it would run into the
# next case's figures; statistics are not part of an ingest).
BENCH_PROJECT = "1234a"
BENCH_SECTIONS = {
    "ingest": {"max_bundle_bytes": str(1024 ** 4), "max_metadata_bytes": str(256 * MIB)},
    "stats": {"skip_projects": f"{BENCH_PROJECT}: the ingest benchmark measures ingest only"},
}


# -- cases and bundles ---------------------------------------------------------

@dataclass(frozen=True)
class Case:
    count: int
    size: int
    label: str

    @property
    def payload_bytes(self) -> int:
        return self.count * self.size

    @property
    def small(self) -> bool:
        return self.size <= SMALL_FILE_BYTES

    def ratio_target(self) -> float | None:
        """Issue 14: many small files at least 0.6 x the limit, one large file at least 0.8 x."""
        if self.small and self.count >= 1000:
            return SMALL_RATIO
        if self.count == 1 and self.size >= 1024 ** 3:
            return LARGE_RATIO
        return None


def parse_case(text: str) -> Case:
    match = re.fullmatch(r"\s*([0-9][0-9_,]*)\s*[xX]\s*([0-9]+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not NxSIZE (e.g. 1000x64K, 1x1G)")
    count = int(match.group(1).replace("_", "").replace(",", ""))
    size = int(match.group(2)) * SUFFIXES[match.group(3).upper()]
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one file")
    return Case(count, size, f"{count}x{match.group(2)}{match.group(3).upper()}")


def parse_cases(text: str) -> list[Case]:
    return [parse_case(part) for part in text.split(",") if part.strip()]


_BLOCK = random.Random(14).randbytes(4 * MIB)
_VIEW = memoryview(_BLOCK)


def payload_chunks(index: int, size: int):
    """File ``index``'s bytes: its number, then a window of a seeded random block, cycling.

    Cheap to generate at disk speed and different in every file, so nothing downstream can
    take a shortcut on repeated content."""
    head = (b"%015d\n" % index)[:size]
    yield head
    left, pos = size - len(head), (index * 1_000_003) % len(_BLOCK)
    while left > 0:
        n = min(left, len(_BLOCK) - pos, CHUNK)
        yield _VIEW[pos:pos + n]
        left -= n
        pos = (pos + n) % len(_BLOCK)


def member_path(index: int, count: int) -> tuple[str, str]:
    """(subdir, name): at most 1,000 files per directory, as instruments write runs."""
    return f"run{index // 1000:04d}", f"f{index:07d}.bin"


def write_bundle(case: Case, out: Path, submitter=10, project=BENCH_PROJECT, instrument=54) -> Path:
    """Write ``case``'s bundle to ``out`` (metadata.txt first, then the payload), streamed:
    the payload is generated twice (hashes first, then the bytes), never held whole."""
    from common.bundles import build_metadata
    files = []
    for index in range(case.count):
        digest = hashlib.sha1()
        for chunk in payload_chunks(index, case.size):
            digest.update(chunk)
        subdir, name = member_path(index, case.count)
        files.append({"name": name, "subdir": subdir, "size": case.size, "hashtype": "sha1",
                      "hashsum": digest.hexdigest(), "mimetype": "application/octet-stream"})
    document = build_metadata(submitter, project, instrument, files)
    raw = json.dumps(document, separators=(",", ":")).encode()
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb", buffering=CHUNK) as handle:
        _member(handle, "metadata.txt", len(raw))
        handle.write(raw)
        handle.write(tarfile.NUL * (-len(raw) % tarfile.BLOCKSIZE))
        for index in range(case.count):
            subdir, name = member_path(index, case.count)
            _member(handle, f"data/{subdir}/{name}", case.size)
            for chunk in payload_chunks(index, case.size):
                handle.write(chunk)
            handle.write(tarfile.NUL * (-case.size % tarfile.BLOCKSIZE))
        handle.write(tarfile.NUL * 2 * tarfile.BLOCKSIZE)
        handle.write(tarfile.NUL * (-handle.tell() % tarfile.RECORDSIZE))
    os.replace(tmp, out)
    return out


def _member(handle, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 1_700_000_000
    info.mode = 0o644
    handle.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


# -- the durable one-pass limit -----------------------------------------------

def limit_run(bundle: Path, out_dir: Path, sync_batch: int) -> dict:
    """Read ``bundle`` as a stream, hash every payload member (sha1 and sha256), write each to
    its own file, fsync in groups of ``sync_batch`` and then their directories. Returns the
    seconds, CPU seconds and peak RSS of this, and how many members did not match their sha1."""
    start = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    declared: dict[str, str] = {}
    computed: dict[str, str] = {}
    stored_sha256: dict[str, str] = {}
    unsynced: list[Path] = []   # written, not yet fsynced (groups of more than one file)
    undone: list[Path] = []     # fsynced, their directory not yet
    made: set[Path] = set()
    count = written = 0

    def settle() -> None:
        for path in unsynced:
            # A new descriptor writes back the file's pages all the same; holding every file of a
            # large group open could run out of descriptors.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for folder in {path.parent for path in unsynced + undone}:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        unsynced.clear()
        undone.clear()

    with tarfile.open(bundle, mode="r|", bufsize=CHUNK) as tar:
        for member in tar:
            if not member.isreg():
                continue
            source = tar.extractfile(member)
            if member.name == "metadata.txt":
                for entry in json.loads(source.read()):
                    if entry.get("destinationTable") == "Files":
                        declared[f"data/{entry['subdir']}/{entry['name']}"] = entry["hashsum"]
                continue
            count += 1
            # The archive's sharding (id % 256), so directory fsyncs match its own.
            folder = out_dir / f"{count % 256:02x}"
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
            path = folder / str(count)
            sha1, sha256 = hashlib.sha1(), hashlib.sha256()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                while chunk := source.read(CHUNK):
                    sha1.update(chunk)
                    sha256.update(chunk)
                    os.write(fd, chunk)
                    written += len(chunk)
                if sync_batch == 1:
                    os.fsync(fd)  # as the archive does each file: through its own descriptor
            finally:
                os.close(fd)
            computed[member.name] = sha1.hexdigest()
            stored_sha256[member.name] = sha256.hexdigest()  # the digest the archive records
            (undone if sync_batch == 1 else unsynced).append(path)
            if len(unsynced) + len(undone) >= sync_batch:
                settle()
    settle()
    seconds = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    bad = [name for name, digest in computed.items() if declared.get(name) != digest]
    return {"seconds": seconds, "files": count, "bytes": written, "sync_batch": sync_batch,
            "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "peak_rss_mib": cpu1.ru_maxrss / 1024, "hash_mismatches": len(bad)}


def run_limit(bundle: Path, out_dir: Path, sync_batch: int) -> dict:
    """``limit_run`` in a process of its own (a clean CPU and memory account), then its files removed."""
    try:
        result = subprocess.run([sys.executable, "-m", "tests.bench.ingest", "--limit-run", str(bundle),
                                 str(out_dir), str(sync_batch)], cwd=REPO, capture_output=True, text=True,
                                timeout=6 * 3600)
        if result.returncode != 0:
            raise SystemExit(f"the limit run failed on {bundle.name}:\n{result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# -- observing processes ---------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds of the process and its reaped children) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # state ppid ... utime(11) stime(12) cutime(13) cstime(14), counted after the command name.
    return int(fields[1]), sum(int(value) for value in fields[11:15]) / CLK_TCK


def _all_parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat:
                parents[int(entry.name)] = stat[0]
    return parents


def descendants(roots: list[int], parents: dict[int, int] | None = None) -> set[int]:
    """``roots`` and every live process below them."""
    parents = _all_parents() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [pid for pid in roots if pid in parents]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Monitor:
    """CPU seconds and peak RSS of each role's process trees over one case.

    CPU: the sum over a role's live processes of their own and their reaped children's
    utime+stime, at the end minus at the start. Peak RSS: the largest single process of the
    role, from VmRSS sampled every ``interval`` and from VmHWM, which the start resets
    (``/proc/<pid>/clear_refs``) so it covers the case alone and catches what sampling misses.
    """

    def __init__(self, roles: dict[str, list[int]], interval: float = 0.05):
        self.roles = roles
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_kib: dict[str, int] = {role: 0 for role in roles}
        self.peak_sum_kib: dict[str, int] = {role: 0 for role in roles}
        self.hwm_reset: dict[int, bool] = {}

    def trees(self) -> dict[str, set[int]]:
        parents = _all_parents()
        return {role: descendants(pids, parents) for role, pids in self.roles.items()}

    def cpu(self) -> dict[str, float]:
        return {role: sum((_stat(pid) or (0, 0.0))[1] for pid in pids) for role, pids in self.trees().items()}

    def __enter__(self) -> Monitor:
        for pids in self.trees().values():
            for pid in pids:
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                    self.hwm_reset[pid] = True
                except OSError:
                    self.hwm_reset[pid] = False
        self.cpu_start = self.cpu()
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        trees, refreshed = self.trees(), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.5:  # new uWSGI or pool processes
                trees, refreshed = self.trees(), time.monotonic()
            self._take(trees, "VmRSS")
            self._stop.wait(self.interval)

    def _take(self, trees: dict[str, set[int]], key: str) -> None:
        for role, pids in trees.items():
            values = [value for pid in pids if (key == "VmRSS" or self.hwm_reset.get(pid))
                      and (value := _kib(pid, key)) is not None]
            if values:
                self.peak_kib[role] = max(self.peak_kib[role], max(values))
                if key == "VmRSS":
                    self.peak_sum_kib[role] = max(self.peak_sum_kib[role], sum(values))

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.cpu_end = self.cpu()
        self._take(self.trees(), "VmHWM")

    def figures(self) -> dict[str, dict]:
        trees = self.trees()
        return {role: {"cpu_seconds": round(max(0.0, self.cpu_end[role] - self.cpu_start[role]), 3),
                       "peak_rss_mib": round(self.peak_kib[role] / 1024, 1),
                       "peak_rss_sum_mib": round(self.peak_sum_kib[role] / 1024, 1),
                       "processes": len(trees[role])}
                for role in self.roles}


def total_cpu(roles: dict[str, list[int]]) -> float:
    return sum(Monitor(roles).cpu().values())


def wait_quiet(roles: dict[str, list[int]], timeout: float = 300.0, window: float = 1.0) -> float:
    """Wait until the deployment's processes use under 5 % of a core over ``window`` seconds (the
    work a job hands on after ``OK``, and the last writes, are done); returns seconds waited."""
    start = time.monotonic()
    # No dirty pages of earlier work (a staged 1 GiB bundle, the bundle just written) are
    # written back during the next measurement.
    os.sync()
    before = total_cpu(roles)
    while time.monotonic() - start < timeout:
        time.sleep(window)
        now = total_cpu(roles)
        if now - before < 0.05 * window:
            break
        before = now
    return time.monotonic() - start


# -- finding the processes of a running deployment --------------------------------

def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def pids_listening(port: int) -> tuple[list[int], bool]:
    """Root processes holding a socket listening on ``port``; and whether some /proc entries
    could not be read (another user's processes)."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders, hidden = set(), False
    if not inodes:
        return [], False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in inodes:
                        holders.add(int(entry.name))
                        break
        except PermissionError:
            hidden = True
        except OSError:
            pass
    parents = _all_parents()
    # uWSGI's workers share their master's socket: keep the topmost holder of each tree.
    return sorted(pid for pid in holders if parents.get(pid) not in holders), hidden


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


# What ties a worker to a deployment: it consumes that broker and writes that ingest database.
_SAME_DEPLOYMENT = ("LABVAULT_CELERY_BROKER_URL", "LABVAULT_INGEST_DATABASE", "LABVAULT_DATA_DIR", "LABVAULT_CONFIG")


def worker_pids(like: dict[str, str] | None) -> list[int]:
    """Root processes of ``labvault worker`` (Celery's pool processes are below them); with ``like``
    (the ingest service's environment), only those of the same deployment."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                words = [Path(arg.decode(errors="replace")).name for arg in argv]
                if "worker" in words and ("labvault" in words or "common.cli" in words):
                    found.add(int(entry.name))
    if like is not None:
        found = {pid for pid in found if (env := _environ(pid)) is not None
                 and all(env.get(key) == like.get(key) for key in _SAME_DEPLOYMENT)}
    parents = _all_parents()
    return sorted(pid for pid in found if parents.get(pid) not in found)


def discover(settings, ingest_url: str, named: dict[str, list[int]]) -> tuple[dict, dict, list]:
    """The processes of a running deployment by role, why a role could not be observed, and notes.

    The ingest service is the process listening on ``ingest_url``'s port; the other services
    listen where its settings say (its environment, else ``settings``); the workers are the
    ``labvault worker`` processes with its broker and ingest database."""
    roles, missing = {}, {}
    local = urllib.parse.urlsplit(ingest_url).hostname in ("127.0.0.1", "localhost", "::1")
    ingest_env = None
    if "ingest" in named:
        roles["ingest"] = named["ingest"]
    elif local:
        pids, hidden = pids_listening(urllib.parse.urlsplit(ingest_url).port or 80)
        if pids:
            roles["ingest"] = pids
        else:
            missing["ingest"] = (f"no process of this user listens on {ingest_url}"
                                 + (" (some processes of other users cannot be read)" if hidden else ""))
    else:
        missing["ingest"] = f"{ingest_url} is not on this machine"
    if roles.get("ingest"):
        ingest_env = _environ(roles["ingest"][0])
        if ingest_env is not None:
            from common.settings import Settings
            with contextlib.suppress(Exception):  # an unreadable config file: keep ours
                settings = Settings.load(environ=ingest_env)
    for role in ROLES + OTHER_ROLES:
        if role in named:
            roles[role] = named[role]
        elif role == "ingest":
            continue
        elif role == "worker":
            pids = worker_pids(ingest_env) if local else []
            if pids:
                roles[role] = pids
            else:
                missing[role] = ("no 'labvault worker' process of this user on this machine"
                                 + (" with the ingest service's broker and database" if ingest_env else ""))
        else:
            url = settings.service_url(role)
            parsed = urllib.parse.urlsplit(url)
            if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
                missing[role] = f"{url} is not on this machine"
                continue
            pids, hidden = pids_listening(parsed.port or 80)
            if pids:
                roles[role] = pids
            else:
                missing[role] = (f"no process of this user listens on {url}"
                                 + (" (some processes of other users cannot be read)" if hidden else ""))
    for role in missing:
        missing[role] += f"; name it with --pid {role}=PID"
    notes = []
    if ingest_env is None and roles.get("worker"):
        notes.append("the ingest service's environment is unknown: every 'labvault worker' of this "
                                  "user is counted; name the right ones with --pid worker=PID")
    return roles, missing, notes


# -- talking to the deployment ------------------------------------------------------

class Client:
    """The ingest service over keep-alive HTTP (reconnecting when the server closes)."""

    def __init__(self, url: str, token: str | None = None):
        parsed = urllib.parse.urlsplit(url)
        self.kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self.host, self.port = parsed.hostname, parsed.port
        self.prefix = parsed.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.connection = self.kind(self.host, self.port, timeout=600)

    def post(self, bundle: Path) -> dict:
        connection = self.kind(self.host, self.port, timeout=6 * 3600, blocksize=CHUNK)
        try:
            with open(bundle, "rb") as body:
                try:
                    connection.request("POST", self.prefix + "/ingest", body=body, headers={
                        **self.headers, "Content-Type": "application/octet-stream",
                        "Content-Length": str(os.path.getsize(bundle))})
                except OSError:
                    pass  # the server answered before reading it all (a 413, a 401): read its answer
                try:
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    raise SystemExit(f"POST /ingest failed: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise SystemExit(f"POST /ingest answered {response.status}: {answer[:300].decode(errors='replace')}")
        return json.loads(answer)

    def state(self, job_id: int) -> dict:
        for attempt in range(3):
            try:
                self.connection.request("GET", f"{self.prefix}/get_state?job_id={job_id}", headers=self.headers)
                response = self.connection.getresponse()
                answer = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.connection.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            raise SystemExit(f"GET /get_state answered {response.status}: {answer[:300].decode(errors='replace')}")
        return json.loads(answer)


def _server_time(text: str) -> float:
    """A state document's UTC time as epoch seconds."""
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
    return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC).timestamp()


@dataclass
class Deployment:
    kind: str
    url: str
    roles: dict[str, list[int]]
    missing: dict[str, str]
    archive_dir: Path | None
    sync_batch_setting: int | None
    token: str | None = None
    local: bool = True
    notes: list[str] = field(default_factory=list)


def run_case(deployment: Deployment, case: Case, bundle: Path, poll_seconds: float = 0.0) -> dict:
    """One ingest of ``bundle``: accept and end-to-end seconds, per-process CPU and peak RSS; with
    ``poll_seconds``, another process asks ``GET /get_state`` as fast as it can for that long."""
    client = Client(deployment.url, deployment.token)
    poller = gets = None
    with Monitor(deployment.roles) as monitor:
        wall0, start = time.time(), time.monotonic()
        state = client.post(bundle)
        accept = time.monotonic() - start
        job_id = state["job_id"]
        if poll_seconds:
            poller = StatePoller(deployment.url, job_id, deployment.token).start()
        try:
            # Polled gently (its cost lands on the ingest service); the end time is the job's own
            # `updated` when the server shares this clock, so the poll interval does not count.
            interval = 0.02
            while not state.get("complete"):
                if poller and time.monotonic() - start > poll_seconds:
                    gets, poller = poller.stop(), None
                time.sleep(interval)
                interval = min(interval * 1.5, 0.25)
                state = client.state(job_id)
            observed = time.monotonic() - start
        finally:
            client.connection.close()
            if poller:
                gets = poller.stop()
    if state["state"] != "OK":
        raise SystemExit(f"case {case.label}: job {job_id} {state['state']} at {state['task']!r}: "
                         f"{state['exception']}")
    seconds = observed
    if deployment.local:
        server = _server_time(state["updated"]) - wall0
        if 0 < server <= observed:
            seconds = server
    processes = monitor.figures()
    cpu = sum(processes[role]["cpu_seconds"] for role in processes)
    result = {"job_id": job_id, "accept_seconds": round(accept, 3), "seconds": round(seconds, 3),
              "observed_seconds": round(observed, 3),
              "mb_per_s": round(case.payload_bytes / 1e6 / seconds, 1),
              "files_per_s": round(case.count / seconds, 1),
              "cpu_seconds": round(cpu, 3), "cpu_ms_per_file": round(cpu * 1000 / case.count, 3),
              "processes": processes}
    if gets is not None:
        result["get_state"] = gets
    return result


class StatePoller:
    """Another process asks ``GET /get_state`` for one job as fast as it can, until stopped."""

    def __init__(self, url: str, job_id: int, token: str | None):
        self.args = (url, job_id, token)

    def start(self) -> StatePoller:
        from tests.bench.get_state import poll_until
        context = multiprocessing.get_context("fork")
        self.stop_event = context.Event()
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=poll_until, args=(*self.args, self.stop_event, send), daemon=True)
        self.process.start()
        return self

    def stop(self) -> dict:
        self.stop_event.set()
        summary = self.receive.recv() if self.receive.poll(30) else {"error": "the poller did not answer"}
        self.process.join(timeout=10)
        return summary


# -- starting and stopping a deployment ----------------------------------------------

@contextlib.contextmanager
def started(kind: str, folder: Path, workers: int, concurrency: int):
    """The embedded default or the production shape under ``folder``, seeded; stopped after."""
    from common.settings import Settings
    from tests.helpers import FIXTURES, Stack
    defaults = Settings.load(environ={})
    # StackBase's test settings poll faster than shipped; measure what users run.
    sections = {section: dict(values) for section, values in BENCH_SECTIONS.items()}
    sections["ingest"]["progress_interval"] = defaults.get("ingest", "progress_interval")
    sections["celery"] = {"polling_interval": defaults.get("celery", "polling_interval")}
    sections["http"] = {"backoff": defaults.get("http", "backoff")}
    if kind == "production":
        from tests.production import ProductionStack
        from tests.servers import port_open, AMQP_HOST, AMQP_PORT, PG_HOST, PG_PORT, uwsgi_binary
        for ok, what in ((port_open(PG_HOST, PG_PORT), f"PostgreSQL at {PG_HOST}:{PG_PORT}"),
                         (port_open(AMQP_HOST, AMQP_PORT), f"RabbitMQ at {AMQP_HOST}:{AMQP_PORT}"),
                         (uwsgi_binary() is not None, "uWSGI (pip install '.[uwsgi]')"),
                         (shutil.which("rabbitmqctl") is not None, "rabbitmqctl on the PATH")):
            if not ok:
                raise SystemExit(f"--deployment production needs {what}")
        stack = ProductionStack(folder, workers=workers, concurrency=concurrency, **sections)
    else:
        stack = Stack(folder, **sections)
    try:
        stack.start()
        stack.cli("seed", str(FIXTURES / "metadata-seed"))
        if kind == "production":
            pids = {name: [process.pid] for name, process in stack.services.items()}
            pids["worker"] = stack.worker_pids()
            roles = {role: pids[role] for role in ROLES + OTHER_ROLES if role in pids}
            roles.update(pids)
        else:
            run_dir = stack.settings.data_dir / "run"
            pids = {path.stem: [int(path.read_text())] for path in run_dir.glob("*.pid")}
            roles = {role: pids[role] for role in ROLES + OTHER_ROLES if role in pids}
            roles.update(pids)  # a plug-in's service too
        yield stack, roles
    finally:
        stack.stop()


def sync_batch_setting(settings) -> int | None:
    """The archive's ``[archive] sync_batch`` (files per group fsync), when this version has it."""
    value = settings.get("archive", "sync_batch", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


# -- the machine -------------------------------------------------------------------------

def filesystem_of(path: Path) -> dict:
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    return {"path": str(path), "mount": best[0], "type": best[1], "device": best[2]}


def machine(path: Path) -> dict:
    model = "?"
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    memory = _kib_line("/proc/meminfo", "MemTotal")
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "memory_gib": round(memory / MIB, 1) if memory else None,
            "python": platform.python_version(), "filesystem": filesystem_of(path)}


def _kib_line(path: str, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}


# -- the run -------------------------------------------------------------------------------

def measure(args, deployment: Deployment, work: Path, bundles_dir: Path) -> dict:
    sync_batch = args.sync_batch or deployment.sync_batch_setting or 1
    limit_root = (deployment.archive_dir.parent if deployment.archive_dir else work) / "bench-limit"
    results = {"benchmark": "ingest", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": machine(limit_root.parent), "git": git_commit(),
               "load_average_start": os.getloadavg(),
               "deployment": {"kind": deployment.kind, "url": deployment.url,
                              "processes": {role: pids for role, pids in deployment.roles.items()},
                              "not_observed": deployment.missing, "notes": deployment.notes},
               "limit": {"directory": str(limit_root), "sync_batch": sync_batch,
                         "sync_batch_from": "--sync-batch" if args.sync_batch else
                         ("[archive] sync_batch" if deployment.sync_batch_setting else
                          "default 1 (the archive fsyncs each file)")},
               "repeat": args.repeat, "cases": []}
    for case in args.cases:
        bundle = bundles_dir / f"{case.label}.tar"
        if not bundle.exists():
            print(f"{case.label}: writing the bundle ({case.payload_bytes / MIB:,.0f} MiB of payload) ...", flush=True)
            write_bundle(case, bundle)
        runs, limits = [], []
        for repeat in range(args.repeat):
            wait_quiet(deployment.roles)
            runs.append(run_case(deployment, case, bundle))
            print(f"{case.label} run {repeat + 1}: labvault {runs[-1]['seconds']:.2f} s (accept "
                  f"{runs[-1]['accept_seconds']:.2f} s)", end="", flush=True)
            wait_quiet(deployment.roles)
            limits.append(run_limit(bundle, limit_root, sync_batch))
            print(f", limit {limits[-1]['seconds']:.2f} s", flush=True)
            if limits[-1]["hash_mismatches"]:
                raise SystemExit(f"{case.label}: the limit found {limits[-1]['hash_mismatches']} hash mismatches")
        results["cases"].append(summarise(case, bundle, runs, limits))
    if args.get_state and args.cases:
        case = max(args.cases, key=lambda c: (c.count, c.payload_bytes))
        wait_quiet(deployment.roles)
        run = run_case(deployment, case, bundles_dir / f"{case.label}.tar", poll_seconds=args.get_state_seconds)
        results["get_state"] = {"case": case.label, "ingest_seconds_while_polled": run["seconds"], **run["get_state"]}
    results["load_average_end"] = os.getloadavg()
    return results


def summarise(case: Case, bundle: Path, runs: list[dict], limits: list[dict]) -> dict:
    def median(values):
        return round(statistics.median(values), 3)
    seconds = median([run["seconds"] for run in runs])
    limit = median([run["seconds"] for run in limits])
    cpu = median([run["cpu_seconds"] for run in runs])
    processes = {}
    for role in runs[0]["processes"]:
        processes[role] = {"cpu_seconds": median([run["processes"][role]["cpu_seconds"] for run in runs]),
                           "peak_rss_mib": max(run["processes"][role]["peak_rss_mib"] for run in runs),
                           "peak_rss_sum_mib": max(run["processes"][role]["peak_rss_sum_mib"] for run in runs),
                           "processes": runs[-1]["processes"][role]["processes"]}
    ratio = round(limit / seconds, 3) if seconds else None
    target = case.ratio_target()
    peak = max((figures["peak_rss_mib"] for figures in processes.values()), default=0.0)
    checks = {"ratio": {"target": target, "value": ratio, "met": None if target is None else ratio >= target},
              "peak_rss_mib": {"target": RSS_LIMIT_MIB, "value": peak, "met": peak < RSS_LIMIT_MIB}}
    if case.ratio_target() == SMALL_RATIO:  # many small files: a job's fixed cost does not count
        per_file = round(cpu * 1000 / case.count, 3)
        checks["cpu_ms_per_file"] = {"target": CPU_PER_SMALL_FILE_MS, "value": per_file,
                                     "met": per_file < CPU_PER_SMALL_FILE_MS}
    return {"case": case.label, "files": case.count, "file_bytes": case.size, "payload_bytes": case.payload_bytes,
            "bundle_bytes": os.path.getsize(bundle),
            "accept_seconds": median([run["accept_seconds"] for run in runs]),
            "seconds": seconds, "limit_seconds": limit, "ratio": ratio,
            "mb_per_s": round(case.payload_bytes / 1e6 / seconds, 1),
            "files_per_s": round(case.count / seconds, 1),
            "limit_mb_per_s": round(case.payload_bytes / 1e6 / limit, 1),
            "cpu_seconds": cpu, "cpu_ms_per_file": round(cpu * 1000 / case.count, 3),
            "processes": processes, "targets": checks, "runs": runs, "limit_runs": limits}


def report(results: dict, out=sys.stdout) -> None:
    def met(check):
        return "-" if check is None or check["met"] is None else ("met" if check["met"] else "NOT met")
    box = results["machine"]
    deployment = results["deployment"]
    print(f"\nlabvault ingest benchmark, {results['date']}, {deployment['kind']} ({deployment['url']}), "
          f"commit {(results['git']['commit'] or '?')[:10]}{' (dirty)' if results['git']['dirty'] else ''}", file=out)
    print(f"machine: {box['cpus']} x {box['cpu_model']}, {box['memory_gib']} GiB, kernel {box['kernel']}, "
          f"{box['filesystem']['type']} at {box['filesystem']['mount']}; load average "
          f"{results['load_average_start'][0]:.2f} at start, {results['load_average_end'][0]:.2f} at end", file=out)
    print(f"limit: one process, tar stream -> sha1+sha256 -> one file each, fsync every "
          f"{results['limit']['sync_batch']} file(s) ({results['limit']['sync_batch_from']}) and their directories; "
          f"medians of {results['repeat']} run(s)", file=out)
    header = (f"{'case':<11}{'accept s':>9}{'labvault s':>11}{'limit s':>9}{'ratio':>7}  {'target':<13}"
              f"{'MB/s':>8}{'files/s':>9}{'CPU s':>8}{'CPU ms/file':>12}  peak RSS MiB")
    print(header, file=out)
    for case in results["cases"]:
        ratio = case["targets"]["ratio"]
        target = f">= {ratio['target']} {met(ratio)}" if ratio["target"] else "-"
        rss = " ".join(f"{role} {case['processes'][role]['peak_rss_mib']:.0f}" for role in ROLES
                       if role in case["processes"])
        print(f"{case['case']:<11}{case['accept_seconds']:>9.2f}{case['seconds']:>11.2f}{case['limit_seconds']:>9.2f}"
              f"{case['ratio']:>7.2f}  {target:<13}{case['mb_per_s']:>8.1f}{case['files_per_s']:>9.4g}"
              f"{case['cpu_seconds']:>8.2f}{case['cpu_ms_per_file']:>12.3f}  {rss}", file=out)
    print("\nper process: CPU seconds / peak RSS MiB (largest single process; all its processes together)", file=out)
    roles = [role for role in ROLES + OTHER_ROLES if any(role in case["processes"] for case in results["cases"])]
    print(f"{'case':<11}" + "".join(f"{role:>24}" for role in roles), file=out)
    for case in results["cases"]:
        cells = []
        for role in roles:
            p = case["processes"].get(role)
            cells.append(f"{p['cpu_seconds']:.2f} s / {p['peak_rss_mib']:.0f} ({p['peak_rss_sum_mib']:.0f})"
                         if p else "not observed")
        print(f"{case['case']:<11}" + "".join(f"{cell:>24}" for cell in cells), file=out)
    for role, why in deployment["not_observed"].items():
        print(f"not observed: {role}: {why}", file=out)
    for note in deployment["notes"]:
        print(f"note: {note}", file=out)
    print("\ntargets (issue 14):", file=out)
    for case in results["cases"]:
        checks = case["targets"]
        parts = [f"peak RSS of every process {checks['peak_rss_mib']['value']:.0f} < {RSS_LIMIT_MIB} MiB "
                 f"{met(checks['peak_rss_mib'])}"]
        if checks["ratio"]["target"]:
            parts.insert(0, f"ratio {checks['ratio']['value']:.2f} >= {checks['ratio']['target']} {met(checks['ratio'])}")
        if "cpu_ms_per_file" in checks:
            parts.append(f"CPU {checks['cpu_ms_per_file']['value']:.3f} < {CPU_PER_SMALL_FILE_MS} ms/file "
                         f"{met(checks['cpu_ms_per_file'])}")
        print(f"  {case['case']:<11}" + "; ".join(parts), file=out)
    gets = results.get("get_state")
    if gets and "requests" in gets:
        print(f"\nGET /get_state during {gets['case']} (one polling process, one connection): "
              f"{gets['requests_per_s']:,.0f} req/s, p50 {gets['p50_ms']:.2f} ms, p99 {gets['p99_ms']:.2f} ms, "
              f"{gets['requests']:,} requests in {gets['seconds']:.1f} s, {gets['errors']} errors; that ingest "
              f"took {gets['ingest_seconds_while_polled']:.2f} s", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=parse_cases, default=DEFAULT_CASES,
                        help=f"comma-separated NxSIZE cases, SIZE in bytes with K, M or G (default {DEFAULT_CASES})")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; figures are medians (default 1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--deployment", choices=["embedded", "production"], default="embedded",
                       help="what to start: labvault up (default), or uWSGI + RabbitMQ + PostgreSQL")
    where.add_argument("--url", help="the ingest service of a running deployment, instead of starting one")
    parser.add_argument("--pid", action="append", default=[], metavar="ROLE=PID",
                        help="with --url: a process to observe (ingest, archive, metadata, worker, policy, stats)")
    parser.add_argument("--archive-dir", type=Path,
                        help="with --url: the archive's directory (the limit writes next to it; default the work dir)")
    parser.add_argument("--token", default=os.environ.get("LABVAULT_TOKEN"), help="with --url: an API token")
    parser.add_argument("--workers", type=int, default=1, help="production: Celery workers (default 1)")
    parser.add_argument("--concurrency", type=int, default=2, help="production: pool processes per worker (default 2)")
    parser.add_argument("--sync-batch", type=int,
                        help="files per group fsync of the limit (default: [archive] sync_batch, else 1)")
    parser.add_argument("--get-state-seconds", type=float, default=10.0,
                        help="how long GET /get_state is polled at the start of its extra run (default 10)")
    parser.add_argument("--no-get-state", dest="get_state", action="store_false",
                        help="skip the GET /get_state run under load")
    parser.add_argument("--json", type=Path, help="where the results go (default: a file in the temp directory)")
    parser.add_argument("--work-dir", type=Path,
                        help="bundles, the deployment and the limit's files (default: a new temp directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (bundles are reused)")
    parser.add_argument("--limit-run", nargs=3, metavar=("BUNDLE", "DIR", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.limit_run:
        print(json.dumps(limit_run(Path(args.limit_run[0]), Path(args.limit_run[1]), int(args.limit_run[2]))))
        return 0
    if isinstance(args.cases, str):
        args.cases = parse_cases(args.cases)
    if args.repeat < 1 or (args.sync_batch is not None and args.sync_batch < 1):
        parser.error("--repeat and --sync-batch take a positive number")
    named = {}
    for item in args.pid:
        role, _, pid = item.partition("=")
        if role not in ROLES + OTHER_ROLES or not pid.isdigit():
            parser.error(f"--pid {item!r}: ROLE=PID with ROLE one of {', '.join(ROLES + OTHER_ROLES)}")
        named.setdefault(role, []).append(int(pid))

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = args.json or Path(tempfile.gettempdir()) / f"labvault-bench-ingest-{stamp}.json"
    made_work = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="labvault-bench-ingest-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bundles_dir = work / "bundles"
    bundles_dir.mkdir(exist_ok=True)
    try:
        if args.url:
            from common.settings import Settings
            settings = Settings.load()
            roles, missing, notes = discover(settings, args.url, named)
            host = urllib.parse.urlsplit(args.url).hostname
            deployment = Deployment("url", args.url.rstrip("/"), roles, missing, args.archive_dir,
                                    sync_batch_setting(settings), args.token,
                                    local=host in ("127.0.0.1", "localhost", "::1"), notes=notes)
            if args.archive_dir is None:
                deployment.notes.append(f"the limit writes under {work}, which may not be the archive's filesystem; "
                                        "--archive-dir names the archive's directory")
            results = measure(args, deployment, work, bundles_dir)
        else:
            with started(args.deployment, work / "deployment", args.workers, args.concurrency) as (stack, roles):
                settings = stack.settings
                archive = settings.path("archive", "root") if settings.get("archive", "backend") == "posix" else None
                deployment = Deployment(args.deployment, stack.url("ingest"), roles, {}, archive,
                                        sync_batch_setting(settings))
                deployment.notes.append(f"[stats] skip_projects = {BENCH_PROJECT} (no statistics build after a case); "
                                        "bundle and metadata size limits raised for large cases")
                if args.deployment == "production":
                    deployment.notes.append(f"{args.workers} worker(s) x {args.concurrency} pool processes")
                results = measure(args, deployment, work, bundles_dir)
    finally:
        if not args.keep:
            # The deployment's files always go; bundles stay in a --work-dir to be reused.
            shutil.rmtree(work if made_work else work / "deployment", ignore_errors=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\nresults: {json_path}" + (f"; work directory kept: {work}" if args.keep or not made_work else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
