"""The first hour, as a user meets it on a terminal: `labvault up` tells the truth (a port
taken, a second `up`, the auth mode), commands say which deployment they work on and what
to do when there is none, and `labvault ingest` explains what went wrong in one line.
Every command runs as a user runs it: a subprocess (a pseudo-terminal where it matters).
"""
import gzip
import os
import pty
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import Stack, env_for, make_settings, wait_for

LABVAULT = str(Path(sys.executable).parent / "labvault")


def labvault(*args, env=None, cwd=None, timeout=120):
    return subprocess.run([LABVAULT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def on_terminal(*args, env, cwd, until: bytes, timeout=90) -> tuple[subprocess.Popen, bytes, int]:
    """Run a command on a pseudo-terminal, reading what it shows until ``until`` appears (or it exits).
    Returns the process, what it showed, and the terminal (close it once the process ended)."""
    parent, child = pty.openpty()
    process = subprocess.Popen([LABVAULT, *args], env=env, cwd=cwd, stdin=child, stdout=child, stderr=child)
    os.close(child)
    shown = bytearray()

    def seen():
        try:
            shown.extend(os.read(parent, 65536))
        except OSError:
            return True  # the terminal closed: the command exited
        return until in shown
    wait_for(seen, timeout=timeout, interval=0.01, message=f"{until!r} on the terminal")
    return process, bytes(shown), parent


def test_up_names_the_service_whose_port_is_taken_and_does_not_say_up(tmp_path):
    stack = Stack(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.settings.getint("archive", "port")))
        squatter.listen()
        process, shown, terminal = on_terminal("up", env=env_for(stack.settings), cwd=tmp_path,
                                               until=b"cannot listen")
        assert process.wait(timeout=30) != 0
        os.close(terminal)
    text = shown.decode()
    assert f"the archive service cannot listen on 127.0.0.1:{stack.settings.getint('archive', 'port')}" in text
    assert "labvault: up" not in text


def test_a_second_up_on_one_data_directory_is_refused_and_leaves_the_first_alone(tmp_path):
    stack = Stack(tmp_path).start()
    try:
        pid_files = sorted(p.name for p in (tmp_path / "run").glob("*.pid"))
        second = Stack(tmp_path)  # other ports: only the data directory is shared
        result = labvault("up", env=env_for(second.settings), cwd=tmp_path, timeout=60)
        assert result.returncode != 0
        assert f"another 'labvault up' (pid {stack.process.pid}) runs on {tmp_path}" in result.stderr
        assert sorted(p.name for p in (tmp_path / "run").glob("*.pid")) == pid_files
        assert stack.state(1).get("code") == "job_not_found"  # the first one still answers
    finally:
        stack.stop()


def test_up_shows_the_auth_mode_and_the_open_mode_warning_on_the_terminal(tmp_path):
    stack = Stack(tmp_path)
    process, shown, terminal = on_terminal("up", env=env_for(stack.settings), cwd=tmp_path, until=b"labvault: up")
    try:
        assert b"auth mode open" in shown and b"WARNING: open mode" in shown
    finally:
        process.terminate()
        # Keep the terminal open while it stops: it says "stopped" there.
        wait_for(lambda: _drain(terminal) or process.poll() is not None, timeout=90, message="up to stop")
        os.close(terminal)
    assert process.returncode == 0


def _drain(terminal: int) -> bool:
    import select
    if select.select([terminal], [], [], 0.05)[0]:
        try:
            os.read(terminal, 65536)
        except OSError:
            pass
    return False


def test_commands_say_which_data_directory_and_what_to_do_without_a_deployment(tmp_path):
    empty = tmp_path / "nothing-here"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABVAULT_")}
    for args in (("job", "--job-id", "1", "--state", "OK", "--task", "open tar"), ("reap",), ("token", "list"),
                 ("dbchk",)):
        result = labvault(*args, "--data-dir", str(empty), env=env, cwd=elsewhere)
        assert result.returncode != 0, args
        assert f"data directory {empty} (from --data-dir)" in result.stderr, args
        assert "Traceback" not in result.stderr, args
        if args[0] != "dbchk":
            assert "run 'labvault up' (or 'labvault dbsync') first" in result.stderr, args
    # The same deployment from the environment, from any working directory.
    result = labvault("token", "list", env={**env, "LABVAULT_DATA_DIR": str(empty)}, cwd=elsewhere)
    assert f"data directory {empty} (from LABVAULT_DATA_DIR)" in result.stderr
    seeded = labvault("seed", str(Path(__file__).parents[1] / "fixtures" / "pacifica" / "metadata-seed"),
                      "--data-dir", str(empty), env=env, cwd=elsewhere)
    assert seeded.returncode == 0 and f"WARNING: no labvault deployment at {empty} yet" in seeded.stderr


def test_ingest_explains_what_went_wrong_in_one_line(tmp_path):
    settings = make_settings(tmp_path, auth={"mode": "token"})
    env = env_for(settings)
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"\0" * 1024)
    zipped = tmp_path / "b.tar.gz"
    zipped.write_bytes(gzip.compress(b"\0" * 1024))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    cases = [
        (("ingest", str(bundle), "--url", f"127.0.0.1:{port}"), f"give it as http://127.0.0.1:{port}"),
        (("ingest", str(zipped)), "is gzip-compressed; labvault takes an uncompressed tar"),
        (("ingest", str(bundle), "--url", f"http://127.0.0.1:{port}"), "is the service running"),
    ]
    for args, expected in cases:
        result = labvault(*args, env={**env, "LABVAULT_HTTP_RETRIES": "0"}, cwd=tmp_path)
        assert result.returncode == 1, args
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len([line for line in result.stderr.splitlines() if line.startswith("labvault ingest:")]) <= 2


def test_ingest_without_a_token_in_token_mode_says_to_pass_one(tmp_path):
    stack = Stack(tmp_path, auth={"mode": "token"}).start()
    try:
        bundle = tmp_path / "b.tar"
        bundle.write_bytes(b"\0" * 1024)
        env = {k: v for k, v in env_for(stack.settings).items() if k != "LABVAULT_TOKEN"}
        result = labvault("ingest", str(bundle), env=env, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "unauthorized" in result.stderr and "pass --token (or set LABVAULT_TOKEN)" in result.stderr
    finally:
        stack.stop()


def test_version_and_every_option_shows_its_default():
    result = labvault("--version")
    assert result.returncode == 0 and result.stdout.startswith("labvault ")
    help_text = labvault("ingest", "--help").stdout
    assert "(default: 3600.0)" in help_text
    assert "keep the job's current one" in " ".join(labvault("job", "--help").stdout.split())
