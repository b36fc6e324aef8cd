"""The ingest benchmark runs (tiny case, embedded default) and writes the JSON it promises."""
import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_the_ingest_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABVAULT_")}
    result = subprocess.run([sys.executable, "-m", "tests.bench.ingest", "--cases", "10x4K,2x100K", "--repeat", "1",
                             "--get-state-seconds", "1", "--json", str(out), "--work-dir", str(work)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio" in result.stdout and str(out) in result.stdout

    results = json.loads(out.read_text())
    assert results["deployment"]["kind"] == "embedded" and not results["deployment"]["not_observed"]
    assert results["machine"]["cpus"] >= 1 and results["machine"]["filesystem"]["type"]
    assert [case["case"] for case in results["cases"]] == ["10x4K", "2x100K"]
    for case in results["cases"]:
        assert case["seconds"] > 0 and case["limit_seconds"] > 0 and case["ratio"] > 0
        assert 0 < case["accept_seconds"] <= case["seconds"]
        assert case["files_per_s"] > 0 and case["cpu_seconds"] > 0
        for role in ("ingest", "archive", "metadata", "worker"):
            assert case["processes"][role]["peak_rss_mib"] > 10
            assert case["processes"][role]["cpu_seconds"] >= 0
        assert set(case["targets"]) >= {"ratio", "peak_rss_mib"}
        assert case["limit_runs"][0]["hash_mismatches"] == 0
    assert results["get_state"]["requests"] > 0 and results["get_state"]["p99_ms"] > 0

    # Everything it started is gone; the bundles stay in the given work directory, the deployment not.
    for pids in results["deployment"]["processes"].values():
        assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert sorted(p.name for p in work.iterdir()) == ["bundles"]


def test_a_running_deployment_is_observed_through_its_listening_sockets():
    import socket

    from tests.bench import ingest as bench
    child = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                              "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                              "print(s.getsockname()[1], flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        assert bench.pids_listening(port) == ([child.pid], False)
        monitor = bench.Monitor({"ingest": [child.pid]})
        with monitor:
            pass
        figures = monitor.figures()["ingest"]
        assert figures["processes"] == 1 and figures["peak_rss_mib"] > 1
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            assert bench.pids_listening(unused.getsockname()[1]) == ([], False)
    finally:
        child.kill()
        child.wait()
