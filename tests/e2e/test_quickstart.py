"""Whole flows as a user runs them: the README's commands, and a real Pacifica upload client."""
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import requests
from pacifica.uploader import Uploader
from pacifica.uploader.bundler import Bundler
from pacifica.uploader.metadata import MetaData, MetaObj
from pacifica.uploader.metadata.policyquery import PolicyQuery

from tests.helpers import env_for, wait_for

LABVAULT = str(Path(sys.executable).parent / "labvault")


def run(stack, *args, check=True):
    result = subprocess.run([LABVAULT, *args], env=env_for(stack.settings), capture_output=True,
                            text=True, timeout=300, cwd=stack.data_dir)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_readme_bundle_and_ingest_wait(stack, tmp_path):
    source = tmp_path / "mydir"
    (source / "run1" / "deeper").mkdir(parents=True)
    (source / "run1" / "a.txt").write_text("hello\n")
    (source / "run1" / "deeper" / "b b.csv").write_text("x,y\n1,2\n")
    (source / "top.bin").write_bytes(os.urandom(300_000))
    out = tmp_path / "b.tar"
    run(stack, "bundle", str(source), "-o", str(out), "--submitter", "10", "--project", "1234a",
        "--instrument", "54", "--key", "Sample=wafer 7", "--hashtype", "sha256")
    result = run(stack, "ingest", str(out), "--wait", "--url", stack.url("ingest"))
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert (final["state"], final["task"], final["task_percent"], final["complete"]) == \
        ("OK", "ingest metadata", "100", True)
    rows = requests.get(f"{stack.url('metadata')}/files", params={"transaction": final["job_id"]}, timeout=10).json()
    assert sorted((row["subdir"], row["name"]) for row in rows) == \
        [("", "top.bin"), ("run1", "a.txt"), ("run1/deeper", "b b.csv")]
    for row in rows:
        body = requests.get(f"{stack.url('archive')}/{row['_id']}", timeout=10).content
        assert hashlib.sha256(body).hexdigest() == row["hashsum"]


def test_ingest_wait_exits_1_on_a_failed_job(stack, tmp_path):
    source = tmp_path / "d"
    source.mkdir()
    (source / "x.txt").write_text("x")
    out = tmp_path / "bad.tar"
    run(stack, "bundle", str(source), "-o", str(out), "--submitter", "10", "--project", "nope",
        "--instrument", "54")
    result = run(stack, "ingest", str(out), "--wait", "--url", stack.url("ingest"), check=False)
    assert result.returncode == 1
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert (final["state"], final["task"]) == ("FAILED", "Policy Validation")


def test_every_command_has_help():
    for command in ("up", "serve", "worker", "beat", "dbsync", "dbchk", "job", "reap", "seed", "bundle", "ingest",
                    "webhook"):
        result = subprocess.run([LABVAULT, command, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage: labvault" in result.stdout, command


def test_real_pacifica_upload_client(stack, tmp_path, monkeypatch):
    """pacifica-uploader, unmodified: policy queries, bundling (metadata.txt last, PAX), /upload, /get_state."""
    # The client finds its servers the way it always does: POLICY_* and INGEST_* variables.
    monkeypatch.setenv("POLICY_PORT", str(stack.settings.getint("policy", "port")))
    monkeypatch.setenv("INGEST_PORT", str(stack.settings.getint("ingest", "port")))
    projects = PolicyQuery(user="dmlb2001", from_table="projects", columns=["_id", "title"], where={}).get_results()
    assert "1234a" in [row["_id"] for row in projects]
    instruments = PolicyQuery(user=10, from_table="instruments", columns=["_id", "name"],
                              where={"project_id": "1234a"}).get_results()
    assert [row["_id"] for row in instruments] == [54]

    metadata = MetaData([
        MetaObj(destinationTable="Transactions.submitter", value=10, metaID="logon", displayType="logged_on"),
        MetaObj(destinationTable="Transactions.project", value="1234a", metaID="project",
                queryDependency={"logon": "logon"}, valueField="_id", queryFields=["_id", "title"]),
        MetaObj(destinationTable="Transactions.instrument", value=54, metaID="instrument"),
        MetaObj(destinationTable="TransactionKeyValue", key="Tag", value="pacifica-client", metaID="tag"),
    ])
    assert PolicyQuery(user=10).valid_metadata(metadata)["status"] == "success"
    payload = {"data/scan 1/spectrum é.dat": os.urandom(50_000), "data/notes/日本.txt": "メモ".encode()}
    file_data = [{"name": name, "fileobj": io.BytesIO(raw), "size": len(raw), "mtime": 1_700_000_000}
                 for name, raw in payload.items()]
    bundle_path = tmp_path / "client.tar"
    with open(bundle_path, "wb") as handle:
        Bundler(metadata, file_data).stream(handle)

    uploader = Uploader()
    with open(bundle_path, "rb") as handle:
        job_id = uploader.upload(handle, content_length=bundle_path.stat().st_size)
    final = wait_for(lambda: (lambda s: s if s["complete"] else None)(uploader.getstate(job_id)),
                     timeout=90, message="the client's job")
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100"), final
    rows = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10).json()
    assert sorted(row["name"] for row in rows) == ["spectrum é.dat", "日本.txt"]
