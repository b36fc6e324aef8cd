"""A 300 MiB bundle through a connection cut at 40 % and an ingest service restarted at 80 %:
``labvault ingest`` and a stock tus client (tuspy) each finish it with no byte sent twice beyond
the chunk in flight, the job OK and every archived file's digest right. And a client killed
half-way resumes its upload when run again.

Between the client and the ingest service sits a TCP proxy (a thread per direction) that counts
the bytes it forwards to the service and cuts every connection once, at 40 %; at 80 % the test
restarts the suite (``labvault up``: the ingest service with it) on the same data directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.helpers import Stack, archive_sha1, env_for, free_port, large_bundle, seeded, wait_for

MIB = 1024 * 1024
CHUNK = 8 * MIB
# Request lines and headers the proxy counts too: a few hundred bytes per request.
HEADER_SLACK = 256 * 1024


class CuttingProxy:
    """Forwards connections from a loopback port to ``target_port``, counting the bytes sent to the
    service (``forwarded``); ``cut_at``: once that many are through, every open connection is cut
    (both sides), once."""

    def __init__(self, target_port: int, cut_at: int | None = None, hold_at: int | None = None):
        self.target_port, self.cut_at, self.hold_at = target_port, cut_at, hold_at
        # Past ``hold_at`` bytes nothing more goes through until ``released`` (while the service restarts).
        self.held = threading.Event()
        self.released = threading.Event()
        self.forwarded = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the service is down: the client sees its connection refused
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = source.recv(256 * 1024)
                if not data:
                    break
                sink.sendall(data)
                if counted:
                    with self.lock:
                        self.forwarded += len(data)
                        cut = self.cut_at is not None and self.forwarded >= self.cut_at
                        if cut:
                            self.cut_at = None
                    if cut:
                        self.cut_all()
                        return
                    if self.hold_at is not None and self.forwarded >= self.hold_at and not self.released.is_set():
                        self.held.set()
                        self.released.wait(timeout=300)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        with self.lock:
            self.sockets.discard(sock)

    def cut_all(self) -> None:
        self.cuts += 1
        with self.lock:
            victims = list(self.sockets)
        for sock in victims:
            self._close(sock)

    def close(self) -> None:
        self.running = False
        self.listener.close()
        self.cut_all()


@pytest.fixture(scope="module")
def resuming(tmp_path_factory):
    """A suite of its own (the tests restart it), taking bundles up to 2 GiB."""
    root = tmp_path_factory.mktemp("resumable")
    with seeded(Stack(root, ingest={"max_bundle_bytes": str(2 * 1024 * MIB)})) as stack:
        yield stack


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """About 300 MiB: six files of 50 MiB, written from random blocks (never whole in memory)."""
    return large_bundle(tmp_path_factory.mktemp("big"), mib_per_file=50, files=6)


def restart_when_held(stack, proxy: CuttingProxy) -> threading.Thread:
    """Restart the suite (stop, start on the same data directory) once the proxy holds the bytes
    past its ``hold_at``: the ingest service goes down in the middle of a PATCH."""
    def run():
        proxy.held.wait(timeout=600)
        try:
            stack.stop()
        finally:
            proxy.released.set()
        stack.start()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def check_archived(stack, job_id: int, expected: dict[str, str]) -> None:
    rows = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=30).json()
    assert {f"{row['subdir']}/{row['name']}": archive_sha1(stack, row["_id"]) for row in rows} == expected


def resent(proxy: CuttingProxy, size: int) -> int:
    return proxy.forwarded - size


def test_labvault_ingest_resumes_after_a_cut_and_a_restart(resuming, big, tmp_path):
    bundle, expected = big
    size = bundle.stat().st_size
    proxy = CuttingProxy(resuming.settings.getint("ingest", "port"), cut_at=int(size * 0.4), hold_at=int(size * 0.8))
    restarter = restart_when_held(resuming, proxy)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "common.cli", "ingest", str(bundle), "--url", proxy.url,
                               "--wait", "--timeout", "600", "--chunk-size", str(CHUNK)],
                              env={**env_for(resuming.settings), "XDG_CACHE_HOME": str(tmp_path / "cache")},
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        restarter.join(timeout=300)
    finally:
        proxy.close()
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert (final["state"], final["task"], final["task_percent"], final["complete"]) == \
        ("OK", "ingest metadata", "100", True), final
    assert "resumable upload" in done.stderr and done.stderr.count("resuming at") >= 2, done.stderr[-3000:]
    check_archived(resuming, final["job_id"], expected)
    print(f"\nlabvault ingest: {size} bytes, forwarded {proxy.forwarded}, sent twice {resent(proxy, size)} "
          f"(chunk {CHUNK}), {proxy.cuts} cut(s) and a restart, {seconds:.1f}s with the ingest")
    assert 0 <= resent(proxy, size) <= CHUNK + HEADER_SLACK
    assert not list((tmp_path / "cache").rglob("*.json")), "the finished upload is still remembered"


def test_tuspy_resumes_after_a_cut_and_a_restart(resuming, big):
    from tusclient import client as tus
    bundle, expected = big
    size = bundle.stat().st_size
    proxy = CuttingProxy(resuming.settings.getint("ingest", "port"), cut_at=int(size * 0.4), hold_at=int(size * 0.8))
    restarter = restart_when_held(resuming, proxy)
    started = time.monotonic()
    try:
        uploader = tus.TusClient(proxy.url + "/uploads/").uploader(
            str(bundle), chunk_size=CHUNK, retries=120, retry_delay=1, metadata={"filename": bundle.name})
        uploader.upload()
        restarter.join(timeout=300)
    finally:
        proxy.close()
    job_id = int(uploader.request.response_headers["labvault-job-id"])
    final = resuming.wait_job(job_id, timeout=600)
    seconds = time.monotonic() - started
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100"), final
    assert requests.get(uploader.url, timeout=10).json() == final
    check_archived(resuming, job_id, expected)
    print(f"\ntuspy: {size} bytes, forwarded {proxy.forwarded}, sent twice {resent(proxy, size)} "
          f"(chunk {CHUNK}), {proxy.cuts} cut(s) and a restart, {seconds:.1f}s with the ingest")
    assert 0 <= resent(proxy, size) <= CHUNK + HEADER_SLACK


def test_a_client_killed_half_way_resumes_its_upload_when_run_again(resuming, tmp_path):
    bundle, expected = large_bundle(tmp_path, mib_per_file=8, files=5)
    size = bundle.stat().st_size
    proxy = CuttingProxy(resuming.settings.getint("ingest", "port"))
    env = {**env_for(resuming.settings), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "common.cli", "ingest", str(bundle), "--url", proxy.url, "--wait",
               "--resumable", "--chunk-size", str(2 * MIB)]
    try:
        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: proxy.forwarded >= size // 2 or first.poll() is not None, timeout=120, interval=0.01,
                     message="half the bundle")
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        assert list((tmp_path / "cache").rglob("*.json")), "the upload URL was not remembered"
        second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        proxy.close()
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the upload of" in second.stderr, second.stderr[-2000:]
    final = json.loads(second.stdout.strip().splitlines()[-1])
    assert final["state"] == "OK" and final["complete"], final
    check_archived(resuming, final["job_id"], expected)
    assert resent(proxy, size) <= 2 * MIB + HEADER_SLACK


def test_an_unfinished_upload_past_its_expiry_is_removed_by_the_reaper(tmp_path):
    """The reaper (Celery beat's ``ingest.reap_jobs``) removes an abandoned upload: row and bytes."""
    with seeded(Stack(tmp_path / "suite", ingest={"upload_expiry_hours": "0.0005", "reap_interval": "0.5"})) as stack:
        url = stack.url("ingest")
        created = requests.post(url + "/uploads/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1000"},
                                timeout=10)
        assert created.status_code == 201, created.text
        upload = url + created.headers["Location"]
        sent = requests.patch(upload, data=b"q" * 100, timeout=10, headers={
            "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"})
        assert sent.status_code == 204, sent.text
        part = stack.settings.path("ingest", "staging_dir") / "uploads" / (upload.rsplit("/", 1)[1] + ".part")
        assert part.stat().st_size == 100
        wait_for(lambda: not part.exists(), timeout=60, interval=0.2, message="the reaper to remove the upload")
        assert requests.head(upload, headers={"Tus-Resumable": "1.0.0"}, timeout=10).status_code == 404
