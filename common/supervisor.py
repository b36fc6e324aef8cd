"""``labvault up``: the whole suite on one machine, as child processes of one command.

Order of events: create the data directory, bring every schema up to date, empty
the filesystem broker's queue (it does not redeliver after a crash, so what it holds
is stale), start every registered service (``common.registry``) and wait until each
answers, run each service's ``on_up`` hook (the ingest service settles the jobs a
previous run left unfinished with its reaper: the job table is the truth, every job
quiet since this start has no live run, so it is enqueued again, or failed when its
upload never finished or its attempts are used up), start a worker with Celery beat
in it (the services' periodic tasks, the reaper among them), print where everything
listens, and on SIGINT or SIGTERM stop it all: the worker first (its running jobs are
handed back unfinished, not failed, and the next ``labvault up`` re-drives them), the
services last.

A worker that dies is started again (its whole process group killed first), up to
``WORKER_RESTARTS`` times in ``RESTART_WINDOW`` seconds; the jobs it was running are
re-driven by the reaper once their heartbeats go stale. A service that dies stops
everything. Each child's pid is in ``<data dir>/run/<name>.pid``.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TextIO

import requests

from common import registry
from common.celery_app import broker_folder
from common.commands import sync_all
from common.db import utcnow
from common.settings import Settings

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# A worker's running jobs give themselves back at their next file or step.
WORKER_STOP_TIMEOUT = 60.0
WORKER = "worker"
WORKER_COMMAND = ["worker", "--beat"]
WORKER_RESTARTS = 5
RESTART_WINDOW = 300.0


class Supervisor:
    def __init__(self, settings: Settings, out: TextIO):
        self.settings = settings
        self.out = out
        self.services = registry.services()
        self.children: dict[str, subprocess.Popen] = {}
        self._stopping = False
        self._restarts: collections.deque[float] = collections.deque()

    def run(self) -> int:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = data_dir / "log"
        self.log_dir.mkdir(exist_ok=True)
        self.run_dir = data_dir / "run"
        self.run_dir.mkdir(exist_ok=True)
        with self.only_up_on_this_directory():
            return self._run()

    def _run(self) -> int:
        print(f"labvault: data directory {self.settings.data_dir}", file=self.out)
        self.check_ports_free()
        sync_all(self.settings, self.out)
        # Nothing of this deployment runs yet: a job quiet since this moment has no live run.
        started = utcnow()
        self.drop_queued_messages()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for service in self.services:
                self.start(service.name, ["serve", service.name])
            self.wait_until_up()
            # Before the worker starts, so nothing they settle (the ingest service's unfinished
            # jobs) can have a run under way.
            for service in self.services:
                if service.on_up:
                    registry.load(service.on_up)(self.settings, started, self.out)
            self.start(WORKER, WORKER_COMMAND)
            for service in self.services:
                print(f"  {service.name:<9} {service.url(self.settings)}", file=self.out)
            print(f"  worker    queues {', '.join(registry.queues())}; periodic tasks by beat; "
                  f"logs in {self.log_dir}", file=self.out)
            self.print_auth_mode()
            print("labvault: up; Ctrl-C stops everything", file=self.out, flush=True)
            return self.watch()
        finally:
            self.stop_all()

    @contextlib.contextmanager
    def only_up_on_this_directory(self):
        """Hold ``<data dir>/run/up.lock`` while running: a second ``up`` on the same data directory
        is refused before it touches anything (pid files, the broker's queue, the ports)."""
        with open(self.run_dir / "up.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                raise SystemExit(f"labvault: another 'labvault up' (pid {holder}) runs on {self.settings.data_dir}; "
                                 "stop it first (Ctrl-C in its terminal, or kill -TERM that pid)") from None
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield

    def check_ports_free(self) -> None:
        """Each service's address must be free, or `up` would take whatever answers there for its own."""
        for service in self.services:
            host, port = service.bind_address(self.settings)
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError as exc:
                    raise SystemExit(f"labvault: the {service.name} service cannot listen on {host}:{port}: "
                                     f"{exc.strerror or exc}; stop what uses it, or set "
                                     f"LABVAULT_{service.name.upper()}_PORT (or [{service.name}] port)") from None

    def print_auth_mode(self) -> None:
        mode = self.settings.get("auth", "mode", "open")
        print(f"labvault: auth mode {mode}", file=self.out)
        if mode == "open":
            print("labvault: WARNING: open mode: anyone who can reach the ingest service uploads as any "
                  "submitter and sees every job; keep it on loopback, or set [auth] mode = token", file=self.out)

    def drop_queued_messages(self) -> None:
        """Empty the filesystem broker's queue: the reaper enqueues again what still has to run."""
        folder = broker_folder(self.settings)
        if folder:
            # Whole messages, and any a writer left half-written when it died (common.broker).
            for message in [*(folder / "out").glob("*.msg"), *(folder / "out").glob("*.msg.part")]:
                message.unlink(missing_ok=True)

    def start(self, name: str, command: list[str]) -> None:
        env = dict(os.environ)
        env.update(self.settings.as_environ())
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # start_new_session: Ctrl-C reaches only `up`, which stops the children in order,
            # and each child's process group (a worker's pool and beat) can be ended as one.
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "common.cli", *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        # Whole or not at all: someone may be reading it (a test, a monitoring script).
        pid_file = self.run_dir / f"{name}.pid"
        pid_file.with_suffix(".tmp").write_text(f"{self.children[name].pid}\n")
        os.replace(pid_file.with_suffix(".tmp"), pid_file)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {service.name: service for service in self.services}
        while waiting:
            self.check_children()
            for name, service in sorted(waiting.items()):
                try:
                    if requests.get(service.url(self.settings) + "/", timeout=2).ok:
                        del waiting[name]
                except requests.RequestException:
                    pass
            if time.monotonic() > deadline:
                raise SystemExit(f"labvault: {', '.join(sorted(waiting))} did not start; see {self.log_dir}")
            if waiting:
                time.sleep(0.2)

    def watch(self) -> int:
        while not self._stopping:
            dead = self.check_children(raise_on_exit=False)
            if dead == WORKER and self._may_restart():
                self.restart_worker()
            elif dead:
                print(f"labvault: {dead} stopped unexpectedly; see {self.log_dir / (dead + '.log')}; "
                      "stopping everything", file=self.out, flush=True)
                return 1
            time.sleep(0.3)
        return 0

    def _may_restart(self) -> bool:
        """At most WORKER_RESTARTS restarts in RESTART_WINDOW seconds: a worker that cannot run stops `up`."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW:
            self._restarts.popleft()
        return len(self._restarts) < WORKER_RESTARTS

    def restart_worker(self) -> None:
        old = self.children[WORKER]
        # Its pool processes and beat may outlive it; a pool process still running a job
        # would hold the job's claim while the new worker's reaper waits for it.
        _kill_group(old.pid)
        self._restarts.append(time.monotonic())
        self.start(WORKER, WORKER_COMMAND)
        print(f"labvault: worker exited with status {old.returncode}; started again (pid "
              f"{self.children[WORKER].pid}); see {self.log_dir / (WORKER + '.log')}", file=self.out, flush=True)

    def check_children(self, raise_on_exit: bool = True) -> str | None:
        for name, child in self.children.items():
            if child.poll() is not None:
                if raise_on_exit:
                    raise SystemExit(f"labvault: {name} exited with status {child.returncode}; "
                                     f"see {self.log_dir / (name + '.log')}")
                return name
        return None

    def stop_all(self) -> None:
        """The worker first, the services after: a stopping worker gives its jobs back (Celery's
        warm shutdown), and while it does, the services its jobs call must still answer."""
        if WORKER in self.children:
            self._stop([WORKER], WORKER_STOP_TIMEOUT)
        self._stop([name for name in self.children if name != WORKER], STOP_TIMEOUT)
        if self.children:
            print("labvault: stopped", file=self.out, flush=True)
        self.children.clear()

    def _stop(self, names: list[str], timeout: float) -> None:
        for name in names:
            if self.children[name].poll() is None:
                self.children[name].terminate()
        deadline = time.monotonic() + timeout
        for name in names:
            child = self.children[name]
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()
            # Whatever of its process group outlived it (a worker's pool or beat).
            _kill_group(child.pid)
            with contextlib.suppress(OSError):
                (self.run_dir / f"{name}.pid").unlink()

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
