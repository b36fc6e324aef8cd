"""The production way under load and failure: uWSGI services, Celery workers on RabbitMQ,
PostgreSQL databases.

The Pacifica fixture flows run on this stack through the parametrized ``stack``
fixture (tests/conftest.py); these tests need a stack of their own, because they
restart the broker and kill workers.
"""
import configparser
import contextlib
import datetime
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from common.db import close_all, open_database, utcnow
from common.settings import Settings
from ingest_service.models import Job
from tests.helpers import (
    REPO,
    archive_sha1,
    env_for,
    job_archive_files,
    large_bundle,
    payload_bundle,
    seeded,
    wait_for,
)
from tests.servers import (
    existing_databases,
    existing_vhosts,
    rabbitmqctl,
    require_postgres,
    require_rabbitmq,
    require_uwsgi,
)

OK_END = ("OK", "ingest metadata", "100", True)


def uwsgi_ini(service: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(REPO / "config" / "uwsgi" / f"{service}.ini")
    return parser["uwsgi"]


@pytest.mark.parametrize("service", ["ingest", "metadata", "archive", "policy", "stats"])
def test_uwsgi_ini_runs_each_service_the_production_way(service):
    ini = uwsgi_ini(service)
    module, _, attribute = ini["module"].partition(":")
    assert (module, attribute) == (f"{service}_service.wsgi", "application")
    assert importlib.util.find_spec(module) is not None
    # The module resolves from any working directory: the ini names the source tree.
    assert Path(ini["pythonpath"].replace("%d", str(REPO / "config" / "uwsgi") + "/")).resolve() == REPO
    for option in ("master", "lazy-apps", "die-on-term", "need-app"):
        assert ini[option] == "true", option
    assert int(ini["processes"]) >= 2 and int(ini["threads"]) >= 2
    assert ini["add-header"] == "Connection: close"
    assert "post-buffering" not in ini  # bodies stream; never held whole


def test_uwsgi_leaves_the_body_limit_to_the_application():
    # [ingest] max_bundle_bytes is the one limit; uWSGI's limit-post would answer nothing.
    assert "limit-post" not in uwsgi_ini("ingest")
    assert Settings.load(environ={}).getint("ingest", "max_bundle_bytes") == 10 * 1024 ** 3
    # An upload may last as long as the body limit takes at a modest rate.
    assert int(uwsgi_ini("ingest")["harakiri"]) >= 3600


# -- a stack of our own ---------------------------------------------------------

@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    require_postgres()
    require_rabbitmq()
    require_uwsgi()
    from tests.production import ProductionStack
    # Quick heartbeats: a job whose worker was killed is taken over by the run its redelivered
    # message starts once the dead run's claim is stale (3 s), not after the default 120 s.
    running = ProductionStack(tmp_path_factory.mktemp("production"), workers=2,
                              ingest={"heartbeat_interval": "0.5", "heartbeat_stale": "3", "reap_interval": "0.5"})
    with seeded(running):
        yield running


def metadata_files(stack, job_id: int) -> list[dict]:
    response = requests.get(f"{stack.url('metadata')}/files", params={"transaction": job_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def assert_ingested_once(stack, finals: list[dict], payloads: list[dict[str, bytes]]) -> None:
    """Every job OK; each payload file once in the metadata, once in the archive, ids unique."""
    seen_ids = []
    for final, payload in zip(finals, payloads):
        assert (final["state"], final["task"], final["task_percent"], final["complete"]) == OK_END, final
        rows = metadata_files(stack, final["job_id"])
        assert sorted(f"{row['subdir']}/{row['name']}" for row in rows) == sorted(payload)
        for row in rows:
            head = requests.head(f"{stack.url('archive')}/{row['_id']}", timeout=10)
            assert head.status_code == 200, row
            assert int(head.headers["Content-Length"]) == len(payload[f"{row['subdir']}/{row['name']}"])
        seen_ids += [row["_id"] for row in rows]
    assert len(seen_ids) == len(set(seen_ids)) == sum(len(payload) for payload in payloads)


def unique_payload(tag: str, count: int = 3) -> dict[str, bytes]:
    return {f"{tag}/part{n}.bin": os.urandom(1000 + 97 * n) for n in range(count)}


def test_workers_run_prefork_with_the_production_celery_settings(fresh):
    inspect = fresh.celery.control.inspect(timeout=2.0, limit=2)
    pools = {name: answer["pool"] for name, answer in (inspect.stats() or {}).items()}
    assert len(pools) == 2, pools
    for pool in pools.values():
        assert pool["max-concurrency"] == 2 and "prefork" in pool["implementation"]
    confs = inspect.conf() or {}
    assert len(confs) == 2, confs
    for conf in confs.values():
        assert conf["broker_transport_options"] == {"confirm_publish": True}
        assert conf["task_default_delivery_mode"] == "persistent"
        assert (conf["task_acks_late"], conf["task_reject_on_worker_lost"]) == (True, True)
        assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
        assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (21000, 21600)
    vhost = urlsplit(fresh.settings.get("celery", "broker_url")).path.lstrip("/")
    listed = rabbitmqctl("list_queues", "-p", vhost, "name", "durable", "--quiet", "--no-table-headers")
    durable = dict(line.split() for line in listed.splitlines() if line.strip())
    assert {name: durable.get(name) for name in ("ingest", "archive", "stats")} == \
        {"ingest": "true", "archive": "true", "stats": "true"}


def test_twenty_bundles_posted_at_once_each_land_exactly_once(fresh):
    payloads = [unique_payload(f"concurrent{n}") for n in range(20)]
    before = archived_ids(fresh)
    with ThreadPoolExecutor(max_workers=20) as pool:
        posted = list(pool.map(lambda payload: fresh.post(payload_bundle(payload)), payloads))
    job_ids = [state["job_id"] for state in posted]
    assert len(set(job_ids)) == 20
    finals = [fresh.wait_job(job_id, timeout=120) for job_id in job_ids]
    assert_ingested_once(fresh, finals, payloads)
    assert len(archived_ids(fresh) - before) == 60


def test_a_declared_length_over_the_body_limit_is_refused_before_any_job(fresh):
    """413 payload_too_large before the body is read; no job is created and nothing is staged."""
    next_id = requests.get(f"{fresh.url('metadata')}/getid", params={"range": 1, "mode": "upload_job"},
                           timeout=10).json()["startIndex"] + 1
    host, port = fresh.url("ingest").removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {10 * 1024 ** 3 + 1}\r\n\r\n".encode() + b"z" * 1000)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"code": "payload_too_large"' in answer
    assert fresh.state(next_id)["code"] == "job_not_found"
    staging = fresh.settings.path("ingest", "staging_dir")
    assert not staging.exists() or not list(staging.glob(f"{next_id}.*"))


def archived_ids(stack) -> set[str]:
    return {path.rpartition("/")[2] for path in job_archive_files(stack)}


def ingest_posters(stack, since: int = 0) -> list[int]:
    """Pids of the ingest service's uWSGI workers that answered a POST /ingest, from its log."""
    text = (stack.log_dir / "ingest.log").read_bytes()[since:].decode(errors="replace")
    return [int(pid) for pid in re.findall(r"^\[pid: (\d+)\|[^\n]*\] POST /ingest ", text, re.MULTILINE)]


def test_workers_and_enqueue_survive_a_rabbitmq_restart(fresh):
    first = [unique_payload(f"before{n}") for n in range(4)]
    finals = [fresh.ingest(payload_bundle(payload)) for payload in first]
    assert_ingested_once(fresh, finals, first)
    before = set(ingest_posters(fresh))
    mark = (fresh.log_dir / "ingest.log").stat().st_size
    try:
        rabbitmqctl("stop_app")
    finally:
        rabbitmqctl("start_app")
    # Post until an ingest process that enqueued before the restart has enqueued again:
    # its pooled broker connection died with the broker and must have been replaced.
    second, posted = [], []
    while not set(ingest_posters(fresh, mark)) & before:
        assert len(second) < 20, "no ingest process that posted before the restart answered again"
        second.append(unique_payload(f"after{len(second)}"))
        posted.append(fresh.post(payload_bundle(second[-1])))
    finals = [fresh.wait_job(state["job_id"], timeout=120) for state in posted]
    assert_ingested_once(fresh, finals, second)
    wait_for(lambda: fresh.answering_workers() == set(fresh.worker_pids()), timeout=60,
             message="both workers to answer on the restarted broker")


def test_a_worker_killed_in_the_middle_of_ingest_files_hands_the_job_over(fresh, tmp_path):
    # ~240 MB in six files: the transfer lasts long enough (about a second here) to
    # catch the job with some of its files archived and some not.
    bundle, expected = large_bundle(tmp_path, 40)

    with open(bundle, "rb") as body:
        response = requests.post(fresh.url("ingest") + "/ingest", data=body, timeout=120,
                                 headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    try:
        # Which worker took it, asked as soon as it starts (before its files move).
        victim = wait_for(lambda: fresh.worker_running(job_id), timeout=60, interval=0.01,
                          message=f"a worker to take job {job_id}")

        def moving():
            state = fresh.state(job_id)
            assert not state["complete"], f"job ended before the worker could be killed: {state}"
            # Past the first file: the second run must also meet files already archived.
            return state["task"] == "ingest files" and 20 <= float(state["task_percent"]) < 80
        wait_for(moving, timeout=60, interval=0.01, message=f"job {job_id} half-way through its files")
        fresh.kill_worker(victim)
        assert fresh.state(job_id)["complete"] is False

        final = fresh.wait_job(job_id, timeout=180)
        assert (final["state"], final["task"], final["task_percent"], final["complete"]) == OK_END, final
        rows = metadata_files(fresh, job_id)
        assert sorted(f"{row['subdir']}/{row['name']}" for row in rows) == sorted(expected)
        for row in rows:
            assert row["hashsum"] == expected[f"{row['subdir']}/{row['name']}"]
            assert archive_sha1(fresh, row["_id"]) == row["hashsum"]
        # The killed worker's half-sent file was dropped, not left half-written.
        incoming = fresh.settings.path("archive", "root") / ".incoming"
        assert not incoming.exists() or not list(incoming.iterdir())
    finally:
        bundle.unlink(missing_ok=True)
        while len(fresh.worker_pids()) < 2:
            fresh.start_worker()


def test_beat_sends_the_reaper_which_re_drives_a_job_whose_message_was_lost(fresh):
    """A bundle accepted and staged, its message never published: `labvault beat` ends it."""
    payload = unique_payload("lost")
    job_id = requests.get(f"{fresh.url('metadata')}/getid", params={"range": 1, "mode": "upload_job"},
                          timeout=10).json()["startIndex"]
    long_ago = utcnow() - datetime.timedelta(hours=1)
    database = open_database(fresh.settings.database_url("ingest"))
    try:
        with database.bind_ctx([Job]):
            Job.create(job_id=job_id, created=long_ago, updated=long_ago)
    finally:
        close_all(database)
    staging = fresh.settings.path("ingest", "staging_dir")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / f"{job_id}.tar").write_bytes(payload_bundle(payload))
    with open(fresh.log_dir / "beat.log", "ab") as log:
        beat = subprocess.Popen([sys.executable, "-m", "common.cli", "beat"], env=env_for(fresh.settings),
                                cwd=fresh.data_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        final = fresh.wait_job(job_id, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(beat.pid, signal.SIGTERM)
        try:
            beat.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait()
    assert_ingested_once(fresh, [final], [payload])
    assert "Sending due task reap-jobs (ingest.reap_jobs)" in (fresh.log_dir / "beat.log").read_text()


def test_stop_leaves_no_process_database_or_vhost(tmp_path):
    require_postgres()
    require_rabbitmq()
    require_uwsgi()
    from tests.production import ProductionStack
    stack = ProductionStack(tmp_path, workers=1, concurrency=1).start()
    groups = [process.pid for process in stack.services.values()] + stack.worker_pids()
    databases = {urlsplit(stack.settings.database_url(name)).path.lstrip("/")
                 for name in ("ingest", "metadata", "archive", "stats")}
    vhost = urlsplit(stack.settings.get("celery", "broker_url")).path.lstrip("/")
    assert len(databases) == 4 and vhost
    stack.stop()
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    assert not databases & existing_databases()
    assert vhost not in existing_vhosts()
