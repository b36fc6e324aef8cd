"""Benchmark: ``GET /get_state`` requests per second under uWSGI, with a bounded load.

Starts the ingest service exactly as deployed (``uwsgi --ini config/uwsgi/ingest.ini``,
only the port changed) on a scratch database holding 1,000 jobs, then loads it from
this machine's loopback for a fixed time with a fixed number of keep-alive
connections, asking for random jobs. Uses ``wrk`` when it is installed (Debian
package ``wrk``), else a Python load generator (which costs more CPU, so reads
lower). Prints requests per second and latency percentiles; asserts nothing.

    python -m tests.bench.get_state [--seconds 10] [--connections 8] [--database URL]

Target: at least 5,000 requests/s with p99 under 10 ms on 2 cores.
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOBS = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the measured run")
    parser.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    parser.add_argument("--database", help="ingest database URL (default: SQLite in a scratch directory)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    args = parser.parse_args()

    uwsgi = shutil.which("uwsgi", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not uwsgi:
        print("uWSGI is not installed: pip install '.[uwsgi]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="labvault-bench-") as scratch:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABVAULT_")}
        # The ini takes its address from the settings' variables: loopback, this port, nothing else.
        env.update(LABVAULT_DATA_DIR=scratch, LABVAULT_INGEST_HOST="127.0.0.1", LABVAULT_INGEST_PORT=str(port))
        if args.database:
            env["LABVAULT_INGEST_DATABASE"] = args.database
        prepare(env)
        server = subprocess.Popen([uwsgi, "--ini", "config/uwsgi/ingest.ini"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            wait_up(port)
            use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk"))
            run = run_wrk if use_wrk else run_python
            run(port, 2.0, args.connections)  # warm-up: every worker built, every connection open
            rate, p50, p99 = run(port, args.seconds, args.connections)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"GET /get_state under uWSGI ({'wrk' if use_wrk else 'python generator'}, "
          f"{args.connections} connections, {args.seconds:.0f} s, {os.cpu_count()} cores, "
          f"{'SQLite' if not args.database else args.database.split(':')[0]})")
    print(f"  requests/s: {rate:,.0f}")
    print(f"  latency p50: {p50:.2f} ms   p99: {p99:.2f} ms")
    print(f"  target (>= 5,000 req/s, p99 < 10 ms): {'met' if rate >= 5000 and p99 < 10 else 'NOT met'}")
    return 0


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(env: dict) -> None:
    """Schema plus ``JOBS`` jobs in the scratch ingest database."""
    subprocess.run([sys.executable, "-m", "common.cli", "dbsync"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    code = ("from common.settings import Settings\nfrom common.db import bind\n"
            "from ingest_service import jobs, models\n"
            "db = bind(models.database, Settings.load().database_url('ingest'))\n"
            f"with db.atomic():\n    [jobs.create(n) for n in range(1, {JOBS + 1})]\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


def wait_up(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/get_state?job_id=1")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the ingest service did not start under uWSGI")


WRK_SCRIPT = f"""
request = function()
  return wrk.format("GET", "/get_state?job_id=" .. math.random(1, {JOBS}))
end
"""


def run_wrk(port: int, seconds: float, connections: int) -> tuple[float, float, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-s", script.name, f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise SystemExit("some answers were not 200:\n" + out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate, _wrk_ms(out, "50%"), _wrk_ms(out, "99%")


def _wrk_ms(out: str, label: str) -> float:
    value, unit = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_python(port: int, seconds: float, connections: int) -> tuple[float, float, float]:
    with multiprocessing.Pool(connections) as pool:
        results = pool.starmap(_client, [(port, seconds)] * connections)
    latencies = sorted(latency for chunk in results for latency in chunk)
    count = len(latencies)
    return count / seconds, latencies[count // 2] * 1000, latencies[int(count * 0.99)] * 1000


def _client(port: int, seconds: float) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = []
    end = time.monotonic() + seconds
    while (start := time.monotonic()) < end:
        try:
            # uWSGI's http-socket closes after each answer; say so, and reconnect as wrk does.
            connection.request("GET", f"/get_state?job_id={random.randint(1, JOBS)}",
                               headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
        except ConnectionError:
            connection.close()  # a reset under load: counted as not served, like wrk's socket errors
            continue
        if response.status != 200:
            raise SystemExit(f"answer {response.status}")
        latencies.append(time.monotonic() - start)
    return latencies


def poll_until(url: str, job_id: int, token: str | None, stop, send) -> None:
    """Ask ``GET /get_state`` for ``job_id`` back to back until ``stop`` is set (a process target);
    sends a summary (requests, errors, requests/s, p50 and p99 ms) through the pipe end ``send``.

    ``tests.bench.ingest`` runs it while a job is ingested: the rate under load."""
    import urllib.parse
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=10)
    path = f"{parsed.path.rstrip('/')}/get_state?job_id={job_id}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies, errors = [], 0
    started = time.monotonic()
    while not stop.is_set():
        start = time.monotonic()
        try:
            # Keep-alive where the server keeps it (CherryPy); http.client reconnects where it
            # closes after each answer (uWSGI's http-socket).
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            connection.close()
            errors += 1
            continue
        if response.status != 200:
            errors += 1
            continue
        latencies.append(time.monotonic() - start)
    seconds = time.monotonic() - started
    latencies.sort()
    count = len(latencies)
    send.send({"requests": count, "errors": errors, "seconds": round(seconds, 3),
               "requests_per_s": round(count / seconds, 1) if seconds else 0.0,
               "p50_ms": round(latencies[count // 2] * 1000, 2) if count else None,
               "p99_ms": round(latencies[min(count - 1, int(count * 0.99))] * 1000, 2) if count else None})


if __name__ == "__main__":
    sys.exit(main())
