"""The ingest path end to end on the embedded default: real services, a real worker.

Every Pacifica fixture bundle ends at its step; a failed job leaves nothing behind.
"""
import hashlib
import json
import os

import pytest
import requests

from tests.helpers import FIXTURES, fixture_bundle, job_archive_files, load_json, make_tar


def archive_files(stack) -> set[str]:
    return job_archive_files(stack)


def staged(stack) -> list[str]:
    folder = stack.settings.path("ingest", "staging_dir")
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def metadata_rows(stack, table, **filters) -> list[dict]:
    response = requests.get(f"{stack.url('metadata')}/{table}", params=filters, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def assert_nothing_left(stack, job_id, archive_before):
    assert metadata_rows(stack, "transactions", _id=job_id) == []
    assert metadata_rows(stack, "files", transaction=job_id) == []
    assert archive_files(stack) == archive_before
    assert not [name for name in staged(stack) if name.startswith(f"{job_id}.")]


def test_health_answers(stack):
    for service in ("ingest", "metadata", "archive", "policy", "stats"):
        answer = requests.get(stack.url(service) + "/", timeout=5).json()
        assert answer["message"].endswith("Up and Running")


def test_good_bundle_is_archived_and_recorded(stack):
    state = stack.post(fixture_bundle("good-md.json"))
    assert set(state) == {"job_id", "state", "task", "task_percent", "complete", "created", "updated", "exception"}
    assert isinstance(state["job_id"], int) and isinstance(state["task_percent"], str)
    final = stack.wait_job(state["job_id"])
    assert (final["state"], final["task"], final["task_percent"], final["complete"], final["exception"]) == \
        ("OK", "ingest metadata", "100", True, "")

    files = metadata_rows(stack, "files", transaction=state["job_id"])
    assert len(files) == 3
    payload = {p.name: p.read_bytes() for p in (FIXTURES / "data").rglob("*") if p.is_file()}
    for row in files:
        assert row["hashtype"] == "sha1"
        body = requests.get(f"{stack.url('archive')}/{row['_id']}", timeout=10).content
        assert body == payload[row["name"]]
        assert hashlib.sha1(body).hexdigest() == row["hashsum"]
    transaction = metadata_rows(stack, "transactions", _id=state["job_id"])[0]
    assert (transaction["submitter"], transaction["project"], transaction["instrument"]) == (10, "1234a", 54)
    assert not [name for name in staged(stack) if name.startswith(f"{state['job_id']}.")]


@pytest.mark.parametrize("metadata,step,code", [
    ("bad-hashsum-md.json", "ingest files", "hash_mismatch"),
    ("bad-json-md.notjson", "load metadata", "invalid_metadata"),
    ("bad-mimetype-md.json", "ingest metadata", "invalid_mimetype"),
    ("bad-project-md.json", "Policy Validation", "policy_denied"),
])
def test_bad_fixture_bundles_fail_at_their_step_and_leave_nothing(stack, metadata, step, code):
    before = archive_files(stack)
    final = stack.ingest(fixture_bundle(metadata))
    assert (final["state"], final["task"], final["complete"]) == ("FAILED", step, True)
    assert final["exception"].startswith(f"{code}: ")
    assert "\n" not in final["exception"] and "Traceback" not in final["exception"]
    assert_nothing_left(stack, final["job_id"], before)


def test_bad_tarfile_fails_at_open_tar(stack):
    before = archive_files(stack)
    final = stack.ingest((FIXTURES / "bad-tarfile.tar").read_bytes())
    assert (final["state"], final["task"]) == ("FAILED", "open tar")
    assert final["exception"].startswith("bad_tar: ")
    assert_nothing_left(stack, final["job_id"], before)


def test_pacifica_client_shape_upload_alias_metadata_last(stack):
    """What Pacifica's uploader sends: /upload, metadata.txt last, PAX, extra keys, ISO times."""
    document = [
        {"destinationTable": "Transactions.submitter", "value": 10, "metaID": "logon", "displayType": "logged_on"},
        {"destinationTable": "Transactions.project", "value": "1234a", "queryDependency": {"user": "logon"}},
        {"destinationTable": "Transactions.instrument", "value": 54, "displayFormat": "{_id} {name}"},
        {"destinationTable": "TransactionKeyValue", "key": "Sample Name", "value": "wafer 7"},
        {"destinationTable": "SomethingNew", "value": "ignored"},
    ]
    members = [("data/run 1/naïve résumé.txt", b"hello world\n"), ("data/run 1/日本語.bin", os.urandom(70000))]
    for name, raw in members:
        document.append({"destinationTable": "Files", "name": name.rsplit("/", 1)[1], "subdir": "run 1",
                         "size": len(raw), "hashtype": "sha1", "hashsum": hashlib.sha1(raw).hexdigest(),
                         "mimetype": "application/octet-stream", "source": None,
                         "mtime": "2026-01-25T16:54:50", "ctime": "2026-01-25T16:54:50"})
    raw = make_tar(members + [("metadata.txt", json.dumps(document).encode())])
    final = stack.wait_job(stack.post(raw, path="/upload")["job_id"])
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100")
    names = sorted(row["name"] for row in metadata_rows(stack, "files", transaction=final["job_id"]))
    assert names == ["naïve résumé.txt", "日本語.bin"]


def test_lenient_client_inputs_are_accepted(stack):
    """What hand-written metadata looks like: upper-case hash types and sums, prefixes, sizes as
    text, no mimetype or times, ``./`` member names, directory members."""
    raw = b"spectrum,1\n"
    document = [{"destinationTable": "Transactions.submitter", "value": "10"},
                {"destinationTable": "Transactions.project", "value": "1234a"},
                {"destinationTable": "Transactions.instrument", "value": "54"},
                {"destinationTable": "Files", "name": "s.csv", "subdir": "/data/x/", "size": str(len(raw)),
                 "hashtype": "SHA256", "hashsum": "SHA256:" + hashlib.sha256(raw).hexdigest().upper()}]
    bundle = make_tar([("./metadata.txt", json.dumps(document).encode()), ("./data/x/s.csv", raw)])
    final = stack.ingest(bundle)
    assert (final["state"], final["task"], final["exception"]) == ("OK", "ingest metadata", "")
    row = metadata_rows(stack, "files", transaction=final["job_id"])[0]
    assert (row["subdir"], row["hashtype"], row["mimetype"]) == ("x", "sha256", "application/octet-stream")


def test_get_state_forms_and_errors(stack):
    job_id = stack.ingest(fixture_bundle("good-md.json"))["job_id"]
    base = stack.url("ingest")
    assert requests.get(f"{base}/get_state/{job_id}", timeout=5).json()["job_id"] == job_id
    for url, status, code in ((f"{base}/get_state?job_id=999999", 404, "job_not_found"),
                              (f"{base}/get_state/999999", 404, "job_not_found"),
                              (f"{base}/get_state?job_id=abc", 400, "invalid_job_id"),
                              (f"{base}/get_state/abc", 400, "invalid_job_id"),
                              (f"{base}/get_state", 400, "invalid_job_id")):
        response = requests.get(url, timeout=5)
        assert response.status_code == status, url
        assert response.headers["Content-Type"] == "application/json"
        assert response.json()["code"] == code


def test_admin_job_command_changes_state(stack):
    job_id = stack.ingest(fixture_bundle("good-md.json"))["job_id"]
    failing = ("job", "--job-id", str(job_id), "--state", "FAILED", "--task", "ingest files",
               "--task-percent", "0.0", "--exception", "Failed by administrator")
    refused = stack.cli(*failing, check=False)
    assert refused.returncode == 1 and "finished OK" in refused.stderr and "--force" in refused.stderr
    assert stack.state(job_id)["state"] == "OK"
    files = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10).json()
    assert files
    stack.cli(*failing, "--force")
    state = stack.state(job_id)
    assert (state["state"], state["task"], state["task_percent"], state["exception"], state["complete"]) == \
        ("FAILED", "ingest files", "0.0", "Failed by administrator", True)
    # Cleaned up as any failure: the job's files are gone from the archive.
    for row in files:
        assert requests.head(f"{stack.url('archive')}/{row['_id']}", timeout=10).status_code == 404
    missing = stack.cli("job", "--job-id", "999999", "--state", "OK", "--task", "open tar", check=False)
    assert missing.returncode == 1 and "no job 999999" in missing.stderr
    bad_task = stack.cli("job", "--job-id", str(job_id), "--state", "OK", "--task", "x", check=False)
    assert bad_task.returncode == 2 and "'ingest files'" in bad_task.stderr


def test_move_takes_files_under_allowed_roots_only(stack):
    response = requests.post(stack.url("ingest") + "/move", timeout=10,
                             json=load_json(FIXTURES / "move-md.json"))
    assert response.status_code == 403
    assert response.json()["code"] == "path_not_allowed"
    response = requests.post(stack.url("ingest") + "/move", data=b"{not json", timeout=10)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_json")


def test_move_ingests_server_local_files(stack):
    movable = stack.data_dir / "movable"
    document = load_json(FIXTURES / "move-md.json")
    source = movable / "foo.txt"
    source.write_bytes(b"foo\n")
    for entry in document:
        if entry["destinationTable"] == "Files":
            entry["source"] = str(source)
    response = requests.post(stack.url("ingest") + "/move", json=document, timeout=10)
    assert response.status_code == 200, response.text
    final = stack.wait_job(response.json()["job_id"])
    assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100")
    row = metadata_rows(stack, "files", transaction=final["job_id"])[0]
    assert requests.get(f"{stack.url('archive')}/{row['_id']}", timeout=10).content == b"foo\n"
    assert source.exists(), "a move copies in; the source stays until the operator removes it"


def test_move_with_a_missing_source_fails_at_move_files(stack):
    document = load_json(FIXTURES / "bad-move-md.json")
    for entry in document:
        if entry["destinationTable"] == "Files":
            entry["source"] = str(stack.data_dir / "movable" / "not-there.txt")
    response = requests.post(stack.url("ingest") + "/move", json=document, timeout=10)
    final = stack.wait_job(response.json()["job_id"])
    assert (final["state"], final["task"]) == ("FAILED", "move files")
    assert final["exception"].startswith("file_missing: ")


def test_unknown_paths_and_methods_answer_json(stack):
    response = requests.get(stack.url("ingest") + "/nowhere", timeout=5)
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    response = requests.get(stack.url("ingest") + "/ingest", timeout=5)
    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")
