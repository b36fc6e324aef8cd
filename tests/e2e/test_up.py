"""``labvault up`` as an operator meets it: recovery of unfinished jobs, a clean stop."""
import socket

from common import migrations
from common.db import bind
from ingest_service import jobs, models
from tests.helpers import FIXTURES, Stack, fixture_bundle


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_redrives_unfinished_jobs_and_stops_cleanly(tmp_path):
    stack = Stack(tmp_path)
    stack.cli("dbsync")
    stack.cli("seed", str(FIXTURES / "metadata-seed"))
    staging = stack.settings.path("ingest", "staging_dir")
    staging.mkdir(parents=True)
    # What a crash leaves: a bundle that arrived but whose message was lost, a job that
    # was half-way through its files, and an upload that never finished.
    db = bind(models.database, stack.settings.database_url("ingest"))
    with db.connection_context():
        migrations.require(db, models.SCHEMA)
        for job_id in (9001, 9002, 9003):
            jobs.create(job_id)
        jobs.set_state(9002, "OK", "ingest files", 40)
    (staging / "9001.tar").write_bytes(fixture_bundle("good-md.json"))
    (staging / "9002.tar").write_bytes(fixture_bundle("good-md.json", metadata_last=True))
    (staging / "9003.tar.part").write_bytes(b"half a bundle")
    broker = stack.settings.path("celery", "broker_dir") / "out"
    broker.mkdir(parents=True)
    (broker / "0_stale.ingest.msg").write_text("{}")

    stack.start()
    try:
        for job_id in (9001, 9002):
            final = stack.wait_job(job_id)
            assert (final["state"], final["task"], final["task_percent"]) == ("OK", "ingest metadata", "100")
        interrupted = stack.state(9003)
        assert (interrupted["state"], interrupted["task"], interrupted["complete"]) == ("FAILED", "UPLOADING", True)
        assert interrupted["exception"].startswith("upload_interrupted: ")
        assert sorted(p.name for p in staging.iterdir()) == []
        assert "re-enqueued 2 unfinished job(s): 9001, 9002" in (tmp_path / "up.log").read_text()
    finally:
        stack.stop()
    assert stack.process.returncode == 0
    assert "labvault: stopped" in (tmp_path / "up.log").read_text()
    for service in Stack.SERVICES:
        assert not port_open(stack.settings.getint(service, "port")), service


def test_serve_refuses_a_database_without_schema(tmp_path):
    stack = Stack(tmp_path)
    result = stack.cli("serve", "metadata", check=False, timeout=60)
    assert result.returncode == 2
    assert "run 'labvault dbsync'" in result.stderr
    assert stack.cli("dbchk", check=False).returncode == 1
    stack.cli("dbsync")
    assert stack.cli("dbchk", "--equal").returncode == 0
