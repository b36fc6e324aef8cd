"""The production servers the tests can use: PostgreSQL, RabbitMQ, uWSGI.

On a user's machine a test that needs one of them skips with the reason when it is
absent; under ``CI=true`` a missing server fails the test instead (CI starts them).
Each test session gets its own PostgreSQL databases and its own RabbitMQ vhost, and
removes them afterwards, so runs never see each other's rows or messages.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
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
