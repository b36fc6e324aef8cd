"""Dependencies that fail in the middle of a job, with real processes.

The suite runs as separate processes (``labvault serve <service>`` for each service and
``labvault worker``, as ``labvault up`` would start them, but without a supervisor that
stops everything when one goes), so a test can stop, kill, freeze (SIGSTOP) or restart
one service while a job is on its way:

- policy gone, or answering 503 because *its* metadata service is gone: FAILED at
  ``Policy Validation`` with ``policy_unavailable`` (never ``policy_denied``);
- archive gone before or during ``ingest files``: FAILED there with ``archive_unavailable``;
- metadata gone after the files moved: FAILED at ``ingest metadata`` with ``metadata_unavailable``;
- a service's SQLite database locked: 503 ``database_unavailable`` with ``Retry-After``.

After each: no metadata row, no archive file, no staged bundle. To stop a job *between*
steps without racing it, a test freezes the next service the job needs and waits until
the job state shows it waiting there; to have the archive die with a file published but
not yet answered, a test holds the archive database's write lock, so the archive stalls
on its row insert right after the bytes went into place.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from common.clients import ArchiveClient
from ingest_service.cleanup import sweep_pending_deletes
from ingest_service.staging import Staging
from tests.helpers import (
    FIXTURES,
    REPO,
    StackBase,
    env_for,
    free_port,
    make_tar,
    payload_bundle,
    wait_for,
)

# Short enough that a locked database answers 503 quickly; the archive's is longer so a test
# can kill the archive while it waits on the lock (see test_archive_killed_mid_transfer...).
BUSY_MS = {"ingest": 500, "metadata": 500, "archive": 1500}
MAX_MEMBERS = 20


class Suite(StackBase):
    """The five services and one worker, each its own process (and process group), on free ports."""

    def __init__(self, data_dir: Path, **sections):
        super().__init__(data_dir, **sections)
        self.log_dir = self.data_dir / "log"
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 60) -> Suite:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cli("dbsync")
        try:
            for service in self.SERVICES:
                self.start_service(service, wait=False)
            self.processes["worker"] = self._spawn("worker", ["worker", "--concurrency", "1"], self.settings)
            for service in self.SERVICES:
                self.wait_up(service, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20) -> None:
        """End everything at once. SIGKILL: the tests are done with these processes, and a
        graceful stop waits seconds for the server threads that hold the worker's idle
        keep-alive connections."""
        processes, self.processes = list(self.processes.values()), {}
        for process in processes:
            _signal_group(process, signal.SIGKILL)
        for process in processes:
            _reap(process, timeout)

    def start_service(self, service: str, wait: bool = True, **sections) -> None:
        """(Re)start ``service``; ``sections`` override settings for this process only."""
        settings = self.settings.with_overrides(sections) if sections else self.settings
        self.processes[service] = self._spawn(service, ["serve", service], settings)
        if wait:
            self.wait_up(service)

    def stop_service(self, service: str) -> None:
        """SIGTERM (CherryPy stops cleanly) and wait."""
        self._end(service, 20)

    def kill_service(self, service: str) -> None:
        """SIGKILL, as a crash would (works on a frozen process too), and wait."""
        process = self.processes.pop(service)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)

    def freeze(self, service: str) -> None:
        os.kill(self.processes[service].pid, signal.SIGSTOP)

    def thaw(self, service: str) -> None:
        os.kill(self.processes[service].pid, signal.SIGCONT)

    def wait_up(self, service: str, timeout: float = 60) -> None:
        process = self.processes[service]

        def answering() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{service} exited:\n{self.log_tail(service)}")
            try:
                return requests.get(self.url(service) + "/", timeout=2).ok
            except requests.RequestException:
                return False
        wait_for(answering, timeout=timeout, message=f"{service} to answer")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def database_file(self, service: str) -> Path:
        return Path(self.settings.database_url(service).split(":///", 1)[1].split("?", 1)[0])

    def _spawn(self, name: str, args: list[str], settings) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # A process group each: a kill reaches the worker's pool too, and Ctrl-C on pytest does not.
            return subprocess.Popen([sys.executable, "-m", "common.cli", *args], env=env_for(settings),
                                    cwd=self.data_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def _end(self, name: str, timeout: float) -> None:
        process = self.processes.pop(name)
        _signal_group(process, signal.SIGCONT, signal.SIGTERM)
        _reap(process, timeout)


def _signal_group(process: subprocess.Popen, *signals: int) -> None:
    """Signal the process group of a process this module started (SIGCONT first: a frozen
    process cannot act on SIGTERM)."""
    if process.poll() is not None:
        return
    for signum in signals:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)


def _reap(process: subprocess.Popen, timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever outlived its leader
    process.wait()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    databases = {service: {"database": f"sqlite:///{root}/db/{service}.sqlite3?busy_timeout={ms}"}
                 for service, ms in BUSY_MS.items()}
    databases["ingest"].update(reject_undeclared="true", max_members=str(MAX_MEMBERS))
    # Bounded retries with backoff on every service-to-service call; small here to keep tests short.
    running = Suite(root, http={"retries": "2", "backoff": "0.1"}, **databases).start()
    try:
        running.cli("seed", str(FIXTURES / "metadata-seed"))
        yield running
    finally:
        running.stop()


# -- what a failed job must leave: nothing -------------------------------------------------

def archive_files(suite) -> set[str]:
    """Every file under the archive root, temporary ones included."""
    root = suite.settings.path("archive", "root")
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def published_files(suite) -> set[str]:
    return {name for name in archive_files(suite) if not name.startswith(".incoming")}


def metadata_rows(suite, table: str, **filters) -> list[dict]:
    response = requests.get(f"{suite.url('metadata')}/{table}", params=filters, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def staging(suite) -> Staging:
    return Staging(suite.settings.path("ingest", "staging_dir"))


def assert_nothing_left(suite, job_id: int) -> None:
    assert metadata_rows(suite, "transactions", _id=job_id) == []
    assert metadata_rows(suite, "files", transaction=job_id) == []
    assert archive_files(suite) == set()
    assert not list(staging(suite).root.glob(f"{job_id}.*"))


def assert_failed(final: dict, step: str, code: str) -> None:
    assert (final["state"], final["task"], final["complete"]) == ("FAILED", step, True), final
    assert final["exception"].startswith(f"{code}: "), final
    text = final["exception"]
    assert "\n" not in text and "Traceback" not in text, text
    assert str(REPO) not in text and "/tmp/" not in text, text


def bundle(size: int = 200_000) -> bytes:
    return payload_bundle({"deps/a.bin": os.urandom(size), "deps/b.txt": b"second file\n"})


def state_at(suite, job_id: int, task: str, moving: bool = False):
    def check():
        state = suite.state(job_id)
        assert state["state"] == "OK", state
        return state["task"] == task and (not moving or float(state["task_percent"]) > 0)
    return check


# -- policy ------------------------------------------------------------------------------

def test_policy_gone_mid_job_fails_policy_validation_as_unavailable(suite):
    suite.freeze("policy")
    try:
        job_id = suite.post(bundle())["job_id"]
        # The job has reached the step and its call is waiting on the frozen service: now it dies.
        wait_for(state_at(suite, job_id, "Policy Validation"), timeout=60, message="Policy Validation")
    finally:
        suite.kill_service("policy")
    try:
        final = suite.wait_job(job_id, timeout=60)
        assert_failed(final, "Policy Validation", "policy_unavailable")
    finally:
        suite.start_service("policy")
    assert_nothing_left(suite, job_id)


def test_policy_without_its_metadata_is_unavailable_not_denied(suite):
    """The policy service answers 503 metadata_unavailable; the job records policy_unavailable."""
    suite.stop_service("policy")
    suite.start_service("policy", metadata={"url": f"http://127.0.0.1:{free_port()}"})
    try:
        document = json.loads(FIXTURES.joinpath("metadata-files", "good-md.json").read_text())
        answer = requests.post(suite.url("policy") + "/ingest", json=document, timeout=30)
        assert (answer.status_code, answer.json()["code"]) == (503, "metadata_unavailable"), answer.text
        assert int(answer.headers["Retry-After"]) > 0
        final = suite.ingest(bundle(), timeout=60)
        assert_failed(final, "Policy Validation", "policy_unavailable")
        assert "policy_denied" not in final["exception"]
    finally:
        suite.stop_service("policy")
        suite.start_service("policy")
    assert_nothing_left(suite, final["job_id"])


# -- archive -----------------------------------------------------------------------------

def test_archive_gone_before_ingest_files_fails_there_as_unavailable(suite):
    suite.stop_service("archive")
    try:
        final = suite.ingest(bundle(), timeout=60)
        assert_failed(final, "ingest files", "archive_unavailable")
    finally:
        suite.start_service("archive")
    # Nothing was written; whatever deletions had to wait for the archive find nothing to delete.
    sweep_pending_deletes(staging(suite), ArchiveClient(suite.settings))
    assert staging(suite).pending_deletes() == {}
    assert_nothing_left(suite, final["job_id"])


def test_archive_killed_mid_transfer_leaves_its_files_to_the_sweeper(suite):
    lock = sqlite3.connect(suite.database_file("archive"), isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        job_id = suite.post(bundle())["job_id"]
        # The first file's bytes are in place; its row waits for our lock: the archive dies now.
        written = wait_for(lambda: published_files(suite), timeout=60, interval=0.005,
                           message="the first file to be published")
        suite.kill_service("archive")
    finally:
        lock.rollback()
        lock.close()
    try:
        final = suite.wait_job(job_id, timeout=60)
        assert_failed(final, "ingest files", "archive_unavailable")
        assert metadata_rows(suite, "transactions", _id=job_id) == []
        assert metadata_rows(suite, "files", transaction=job_id) == []
        assert not list(staging(suite).root.glob(f"{job_id}.*"))
        # The failed job could not remove its file: the archive was down.
        assert published_files(suite) == written
    finally:
        suite.start_service("archive")
    pending = staging(suite).pending_deletes()
    assert {str(file_id) for file_id in pending[job_id]} >= {Path(name).name for name in written}
    # The sweeper (the reaper's periodic task, or the next job's start) finishes the work.
    assert sweep_pending_deletes(staging(suite), ArchiveClient(suite.settings)) == len(written)
    assert staging(suite).pending_deletes() == {}
    assert_nothing_left(suite, job_id)


# -- metadata ----------------------------------------------------------------------------

def test_metadata_gone_after_the_files_moved_fails_ingest_metadata(suite):
    suite.freeze("archive")
    try:
        job_id = suite.post(bundle())["job_id"]
        # File ids are reserved and the bytes are on their way to the (frozen) archive.
        wait_for(state_at(suite, job_id, "ingest files", moving=True), timeout=60, message="bytes moving")
        suite.stop_service("metadata")
    finally:
        suite.thaw("archive")
    try:
        final = suite.wait_job(job_id, timeout=60)
        assert_failed(final, "ingest metadata", "metadata_unavailable")
    finally:
        suite.start_service("metadata")
    # The archive was up for the clean-up: the job's files are gone.
    assert_nothing_left(suite, job_id)


# -- the services' own databases -----------------------------------------------------------

@contextlib.contextmanager
def locked(suite, service: str):
    """Hold ``service``'s SQLite write lock (in WAL mode readers go on; writers wait, then fail)."""
    connection = sqlite3.connect(suite.database_file(service), isolation_level=None, timeout=10)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.rollback()
        connection.close()


def assert_database_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert (body["code"], body["status"]) == ("database_unavailable", "503 Service Unavailable"), body
    assert 0 < int(response.headers["Retry-After"]) <= 60


def test_locked_metadata_database_is_503_with_retry_after(suite):
    getid = suite.url("metadata") + "/getid?range=1&mode=file"
    with locked(suite, "metadata"):
        assert_database_unavailable(requests.get(getid, timeout=30))
        assert_database_unavailable(requests.put(suite.url("metadata") + "/users", timeout=30,
                                                 json=[{"first_name": "Lock", "network_id": "lock-test"}]))
        # Reads go on under WAL.
        assert requests.get(suite.url("metadata") + "/users?_id=10", timeout=30).status_code == 200
    assert requests.get(getid, timeout=30).status_code == 200
    assert metadata_rows(suite, "users", network_id="lock-test") == []


def test_locked_ingest_database_is_503_and_stages_nothing(suite):
    before = set(staging(suite).root.glob("*")) if staging(suite).root.exists() else set()
    with locked(suite, "ingest"):
        response = requests.post(suite.url("ingest") + "/ingest", data=bundle(), timeout=30,
                                 headers={"Content-Type": "application/octet-stream"})
        assert_database_unavailable(response)
    assert (set(staging(suite).root.glob("*")) if staging(suite).root.exists() else set()) == before
    assert requests.get(suite.url("ingest") + "/", timeout=10).status_code == 200


def test_locked_archive_database_is_503_and_keeps_no_bytes(suite):
    url = suite.url("archive") + "/777000111"
    with locked(suite, "archive"):
        assert_database_unavailable(requests.put(url, data=b"bytes without their row", timeout=30))
    assert requests.head(url, timeout=10).status_code == 404
    assert archive_files(suite) == set()


# -- settings that refuse bundles ------------------------------------------------------------

PARTIES = json.dumps([{"destinationTable": "Transactions.submitter", "value": 10},
                      {"destinationTable": "Transactions.project", "value": "1234a"},
                      {"destinationTable": "Transactions.instrument", "value": 54}]).encode()


def test_undeclared_member_fails_ingest_files_with_reject_undeclared(suite):
    final = suite.ingest(make_tar([("metadata.txt", PARTIES), ("data/extra.bin", b"x")]), timeout=60)
    assert_failed(final, "ingest files", "undeclared_member")
    assert_nothing_left(suite, final["job_id"])


def test_too_many_members_fail_open_tar(suite):
    # Undeclared members: should the limit not apply, the job still fails, later, leaving nothing.
    raw = make_tar([("metadata.txt", PARTIES)] + [(f"data/m{n}", b"") for n in range(MAX_MEMBERS + 5)])
    final = suite.ingest(raw, timeout=60)
    assert_failed(final, "open tar", "too_many_members")
    assert_nothing_left(suite, final["job_id"])
