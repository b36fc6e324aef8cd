"""``labvault up``: the whole suite on one machine, as child processes of one command.

Order of events: create the data directory, bring every schema up to date,
settle the jobs a previous run left unfinished (the job table is the truth: the
filesystem broker does not redeliver after a crash, so its queue is emptied and
every unfinished job is enqueued once more), start the five services and a
worker, wait until each answers, print where they listen, and on SIGINT or
SIGTERM stop them all.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

import requests

from common.celery_app import broker_folder, enqueue, make_celery
from common.cli import SERVICE_MODULES, service_database, sync_all
from common.settings import Settings

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class Supervisor:
    def __init__(self, settings: Settings, out: TextIO):
        self.settings = settings
        self.out = out
        self.children: dict[str, subprocess.Popen] = {}
        self._stopping = False

    def run(self) -> int:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = data_dir / "log"
        self.log_dir.mkdir(exist_ok=True)
        print(f"labvault: data directory {data_dir}", file=self.out)
        sync_all(self.settings, self.out)
        pending = self.recover_jobs()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for service in SERVICE_MODULES:
                self.start(service, ["serve", service])
            self.start("worker", ["worker"])
            self.wait_until_up()
            if pending:
                app = make_celery(self.settings)
                for job_id in pending:
                    enqueue(app, "ingest.process_job", job_id)
                print(f"labvault: re-enqueued {len(pending)} unfinished job(s): "
                      f"{', '.join(map(str, pending))}", file=self.out)
            for service in SERVICE_MODULES:
                print(f"  {service:<9} {self.settings.service_url(service)}", file=self.out)
            print(f"  worker    queues ingest, archive, stats; logs in {self.log_dir}", file=self.out)
            print("labvault: up; Ctrl-C stops everything", file=self.out, flush=True)
            return self.watch()
        finally:
            self.stop_all()

    def recover_jobs(self) -> list[int]:
        """Fail jobs whose upload never finished; return the jobs to run again."""
        from ingest_service import jobs
        from ingest_service.staging import Staging
        staging = Staging(self.settings.path("ingest", "staging_dir"))
        folder = broker_folder(self.settings)
        if folder:
            for message in (folder / "out").glob("*.msg"):
                message.unlink(missing_ok=True)
        db, _ = service_database(self.settings, "ingest")
        pending = []
        with db.connection_context():
            for job in jobs.unfinished():
                if job.task == jobs.UPLOADING and not staging_ready(staging, job):
                    staging.discard(job.job_id)
                    jobs.set_state(job.job_id, jobs.FAILED, jobs.UPLOADING, 0,
                                   "upload_interrupted: the service stopped before the upload finished")
                else:
                    pending.append(int(job.job_id))
        return pending

    def start(self, name: str, command: list[str]) -> None:
        env = dict(os.environ)
        env.update(self.settings.as_environ())
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # start_new_session: Ctrl-C reaches only `up`, which stops the children in order.
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "common.cli", *command], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = set(SERVICE_MODULES)
        while waiting:
            self.check_children()
            for service in sorted(waiting):
                try:
                    if requests.get(self.settings.service_url(service) + "/", timeout=2).ok:
                        waiting.discard(service)
                except requests.RequestException:
                    pass
            if time.monotonic() > deadline:
                raise SystemExit(f"labvault: {', '.join(sorted(waiting))} did not start; see {self.log_dir}")
            if waiting:
                time.sleep(0.2)

    def watch(self) -> int:
        while not self._stopping:
            dead = self.check_children(raise_on_exit=False)
            if dead:
                print(f"labvault: {dead} stopped unexpectedly; see {self.log_dir / (dead + '.log')}; "
                      "stopping everything", file=self.out, flush=True)
                return 1
            time.sleep(0.3)
        return 0

    def check_children(self, raise_on_exit: bool = True) -> str | None:
        for name, child in self.children.items():
            if child.poll() is not None:
                if raise_on_exit:
                    raise SystemExit(f"labvault: {name} exited with status {child.returncode}; "
                                     f"see {self.log_dir / (name + '.log')}")
                return name
        return None

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, child in self.children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()
        if self.children:
            print("labvault: stopped", file=self.out, flush=True)
        self.children.clear()

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True


def staging_ready(staging, job) -> bool:
    """Whether the bundle of a job still at UPLOADING arrived whole (it was renamed into place)."""
    return Path(staging.bundle_path(job.job_id)).is_file() or Path(staging.document_path(job.job_id)).is_file()
