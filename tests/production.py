"""The suite run the production way: every service under uWSGI, Celery workers on RabbitMQ,
every database on PostgreSQL.

``ProductionStack`` has the interface of ``tests.helpers.Stack``. Each stack provisions
its own databases and RabbitMQ vhost (``tests.servers``) and, on ``stop``, ends every
process it started and removes them. Settings reach every process only through the
LABVAULT_* environment, as in a deployment. Logs: ``<data_dir>/log/<process>.log``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from common import registry
from common.celery_app import make_celery
from tests.helpers import REPO, StackBase, env_for
from tests.servers import postgres_databases, rabbitmq_vhost, uwsgi_binary

UWSGI_DIR = REPO / "config" / "uwsgi"
DATABASES = tuple(service.name for service in registry.with_tables())
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0


class ProductionStack(StackBase):
    """Five uWSGI services and ``workers`` Celery workers on private PostgreSQL databases and vhost."""

    def __init__(self, data_dir: Path, workers: int = 2, concurrency: int = 2, **sections):
        super().__init__(data_dir, **sections)
        self.worker_count = workers
        self.concurrency = concurrency
        self.log_dir = self.data_dir / "log"
        self.services: dict[str, subprocess.Popen] = {}
        self.workers: dict[int, subprocess.Popen] = {}  # pid (also its process group) -> process
        self._resources = contextlib.ExitStack()
        self._celery = None
        self._started_workers = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> ProductionStack:
        """Provision, migrate, start everything and wait until every service and worker answers."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            databases = self._resources.enter_context(postgres_databases(*DATABASES))
            broker_url = self._resources.enter_context(rabbitmq_vhost())
            # The services use a connection pool per uWSGI worker, as a deployment would.
            overrides = {service: {"database": url.replace("postgresql://", "postgresql+pool://", 1)}
                         for service, url in databases.items()}
            overrides["celery"] = {"broker_url": broker_url}
            self.settings = self.settings.with_overrides(overrides)
            self.cli("dbsync")
            for service in self.SERVICES:
                port = self.settings.getint(service, "port")
                # Before --ini: the ini binds its default port only when no socket was given.
                self.services[service] = self._spawn(service, [
                    uwsgi_binary(), "--http-socket", f"127.0.0.1:{port}", "--ini", str(UWSGI_DIR / f"{service}.ini")])
            for _ in range(self.worker_count):
                self.start_worker(wait=False)
            self._wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End every process (SIGTERM, SIGKILL after ``timeout``), then drop the databases and vhost."""
        # Workers first: a warm shutdown may still call the services.
        _terminate(self.workers.values(), timeout)
        _terminate(self.services.values(), timeout)
        # Forget them: a second stop must not signal process groups that are gone.
        self.workers.clear()
        self.services.clear()
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        self._resources.close()

    # -- workers -----------------------------------------------------------------

    def start_worker(self, wait: bool = True, timeout: float = START_TIMEOUT) -> int:
        """Start one more ``labvault worker`` (its own process group); returns its pid."""
        self._started_workers += 1
        process = self._spawn(f"worker-{self._started_workers}", [
            sys.executable, "-m", "common.cli", "worker", "--concurrency", str(self.concurrency)])
        self.workers[process.pid] = process
        if wait:
            self._wait_until_up(timeout)
        return process.pid

    def worker_pids(self) -> list[int]:
        """Pids of the workers still running."""
        return [pid for pid, process in self.workers.items() if process.poll() is None]

    def kill_worker(self, pid: int) -> None:
        """SIGKILL a worker's whole process group (main process and pool) at once."""
        _kill_group(pid)
        self.workers.pop(pid).wait(timeout=STOP_TIMEOUT)

    def worker_running(self, job_id: int) -> int | None:
        """Pid of the worker whose pool is running ``ingest.process_job`` for ``job_id``."""
        # limit: answer as soon as every live worker replied, not after the whole timeout.
        live = len(self.worker_pids())
        active = self._control(lambda control: control.inspect(timeout=1.0, limit=live).active()) or {}
        for hostname, requests_ in active.items():
            for request in requests_:
                if request.get("name") == "ingest.process_job" and list(request.get("args") or []) == [job_id]:
                    return _worker_pid(hostname)
        return None

    def answering_workers(self) -> set[int]:
        """Pids of the workers that answer a remote-control ping (so consume) now."""
        replies = self._control(lambda control: control.ping(timeout=0.5)) or []
        return {_worker_pid(hostname) for reply in replies for hostname in reply}

    @property
    def celery(self):
        """A Celery app on this stack's vhost, for remote control (ping, inspect)."""
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    def _control(self, ask):
        """``ask(app.control)``, or None when the broker connection failed (callers poll again)."""
        with self.celery.connection_for_write() as connection:
            errors = connection.connection_errors + connection.channel_errors
        try:
            return ask(self.celery.control)
        except errors:
            # The broker went away (a test restarts it): the next call starts on a new connection.
            self._celery.close()
            self._celery = None
            return None

    # -- helpers -----------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # start_new_session: a process group per process, so a stop (or a test's
            # SIGKILL) reaches uWSGI's workers and Celery's pool too, and Ctrl-C on
            # pytest does not.
            return subprocess.Popen(command, env=env_for(self.settings, self.environ), cwd=self.data_dir, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.services)
        while True:
            self._check_alive()
            for service in sorted(waiting):
                with contextlib.suppress(requests.RequestException):
                    if requests.get(self.url(service) + "/", timeout=2).ok:
                        waiting.discard(service)
            # Workers answer a ping once they consume; ask only when the services are up.
            silent = set(self.worker_pids()) - (self.answering_workers() if not waiting else set())
            if not waiting and not silent:
                return
            if time.monotonic() > deadline:
                names = sorted(waiting) + [f"worker {pid}" for pid in sorted(silent)]
                raise AssertionError(f"not up after {timeout:.0f}s: {', '.join(names)}\n" + self.log_tails())
            time.sleep(0.2)

    def _check_alive(self) -> None:
        dead = [name for name, process in self.services.items() if process.poll() is not None]
        dead += [f"worker {pid}" for pid, process in self.workers.items() if process.poll() is not None]
        if dead:
            raise AssertionError(f"exited: {', '.join(dead)}\n" + self.log_tails())

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every process log, for a failure message."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)


def _worker_pid(hostname: str) -> int:
    # `labvault worker` names itself labvault-<pid>@<host>.
    return int(hostname.split("@", 1)[0].rsplit("-", 1)[1])


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _terminate(processes, timeout: float) -> None:
    """SIGTERM each leader, wait up to ``timeout``, then SIGKILL what is left of each group."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Whatever outlived its leader (or the leader itself, past the deadline).
        _kill_group(process.pid)
        process.wait()
