"""``labvault jobs``, ``labvault status`` and ``labvault ingest DIR --wait`` as a user runs them:
a subprocess, on a pipe (one line per step) and on a pseudo-terminal (bars with rate and time left)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_first_hour import on_terminal
from tests.helpers import env_for

LABVAULT = str(Path(sys.executable).parent / "labvault")


def run(stack, *args, timeout=180):
    return subprocess.run([LABVAULT, *args], env=env_for(stack.settings), capture_output=True, text=True,
                          timeout=timeout, cwd=stack.data_dir)


def payload(folder: Path) -> Path:
    (folder / "run1").mkdir(parents=True)
    (folder / "run1" / "a.txt").write_text("hello\n")
    (folder / "b.bin").write_bytes(os.urandom(4096))
    return folder


def test_ingest_a_directory_and_wait_on_a_pipe_then_list_it(stack, tmp_path):
    source = payload(tmp_path / "mydir")
    result = run(stack, "ingest", str(source), "--wait", "--submitter", "10", "--project", "1234a",
                 "--instrument", "54", "--key", "Sample=wafer 7")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["state"] == "OK" and state["complete"], state
    steps = [line for line in result.stderr.splitlines() if line.startswith(f"job {state['job_id']}:")]
    assert len(steps) == len({line.split("%")[0].rsplit(" ", 1)[0] for line in steps})  # one line per step
    assert steps[-1].endswith("ingest metadata 100%")

    listed = run(stack, "jobs", "--json", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    job = next(job for job in json.loads(listed.stdout)["jobs"] if job["job_id"] == state["job_id"])
    assert job["state"] == "OK" and str(job["project"]) == "1234a" and job["submitter"] == 10
    table = run(stack, "jobs", "--project", "1234a", "--state", "done")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["JOB", "STATE", "STEP"]
    assert any(line.split()[0] == str(state["job_id"]) for line in table.stdout.splitlines()[1:])
    assert "missing" not in run(stack, "jobs", "--state", "FAILED").stderr


def test_a_failed_directory_ingest_exits_1_with_its_code(stack, tmp_path):
    source = payload(tmp_path / "denied")
    result = run(stack, "ingest", str(source), "--wait", "--submitter", "10", "--project", "no-such-project",
                 "--instrument", "54")
    assert result.returncode == 1, result.stderr
    assert "policy_denied" in result.stderr and "Policy Validation" in result.stderr


def test_ingest_on_a_terminal_shows_bars_with_rate_and_time_left(stack, tmp_path):
    source = payload(tmp_path / "tty")
    process, shown, terminal = on_terminal(
        "ingest", str(source), "--wait", "--submitter", "10", "--project", "1234a", "--instrument", "54",
        env=env_for(stack.settings), cwd=stack.data_dir, until=b'"complete": true')
    try:
        assert process.wait(timeout=60) == 0
    finally:
        os.close(terminal)
    text = shown.decode(errors="replace")
    assert "upload [" in text and "MiB/s" in text and "s left" in text
    assert "ingest metadata [" in text and "100%" in text


def test_status_reports_every_service_and_exits_0_when_all_are_up(stack):
    result = run(stack, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    assert {entry["name"] for entry in found["services"]} >= {"ingest", "metadata", "archive", "policy", "stats"}
    assert all(entry["up"] and entry["url"].startswith("http://") for entry in found["services"])
    assert found["broker"]["up"] and set(found["broker"]["queues"]) >= {"ingest", "stats"}
    assert found["auth_mode"] == "open"
    human = run(stack, "status")
    assert human.returncode == 0 and "ingest" in human.stdout and "workers" in human.stdout


def test_status_exits_1_when_a_service_is_down(stack, tmp_path):
    env = env_for(stack.settings)
    env["LABVAULT_POLICY_URL"] = "http://127.0.0.1:9"  # nothing listens there
    result = subprocess.run([LABVAULT, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert any(line.split()[:2] == ["policy", "DOWN"] for line in result.stdout.splitlines()), result.stdout
