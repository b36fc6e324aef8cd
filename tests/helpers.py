"""Builders and harnesses the tests share: settings, free ports, servers, bundles, polling."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import requests
from cheroot import wsgi

from common import registry
from common.settings import Settings

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "pacifica"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(data_dir: Path, **sections) -> Settings:
    """Settings for a test: everything under ``data_dir``, plus ``sections`` overrides."""
    overrides = {"data": {"dir": str(data_dir)}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return Settings.load(environ={}, overrides=overrides)


@contextlib.contextmanager
def serve_wsgi(application, port: int | None = None) -> Iterator[str]:
    """Serve a WSGI application on a free loopback port in a thread, guarded as ``labvault serve``
    guards it (``common.web.outermost``, ``guard_server``); yields its base URL."""
    from common.web import guard_server, outermost
    port = port or free_port()
    server = wsgi.Server(("127.0.0.1", port), outermost(application), numthreads=8)
    guard_server(server)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        thread.join(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def make_tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tar (in memory) of regular files ``(name, content)`` in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def fixture_bundle(metadata_file: str | Path, metadata_last: bool = False) -> bytes:
    """A bundle of the Pacifica fixture payload with ``metadata_file`` as metadata.txt."""
    metadata = Path(metadata_file)
    if not metadata.is_absolute():
        metadata = FIXTURES / "metadata-files" / metadata
    members = [(str(p.relative_to(FIXTURES)), p.read_bytes())
               for p in sorted((FIXTURES / "data").rglob("*")) if p.is_file()]
    entry = ("metadata.txt", metadata.read_bytes())
    return make_tar(members + [entry] if metadata_last else [entry] + members)


def payload_bundle(payload: dict[str, bytes], submitter=10, project="1234a", instrument=54,
                   keys: dict[str, str] | None = None) -> bytes:
    """A bundle of ``payload`` (path under data/ -> bytes) with sha1 Files entries, for the seed's
    submitter, project and instrument, with transaction ``keys``."""
    document = [{"destinationTable": "Transactions.submitter", "value": submitter},
                {"destinationTable": "Transactions.project", "value": project},
                {"destinationTable": "Transactions.instrument", "value": instrument}]
    document += [{"destinationTable": "TransactionKeyValue", "key": key, "value": value}
                 for key, value in (keys or {}).items()]
    for path, raw in payload.items():
        subdir, _, name = path.rpartition("/")
        document.append({"destinationTable": "Files", "name": name, "subdir": subdir, "size": len(raw),
                         "hashtype": "sha1", "hashsum": hashlib.sha1(raw).hexdigest(),
                         "mimetype": "application/octet-stream"})
    return make_tar([("metadata.txt", json.dumps(document).encode())]
                    + [(f"data/{path}", raw) for path, raw in payload.items()])


def env_for(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that must see exactly ``settings`` (plus ``extra``,
    e.g. the S3 credentials boto3 finds in the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABVAULT_")}
    env.update(settings.as_environ())
    env.update(extra or {})
    return env


class StackBase:
    """The suite on free ports under ``data_dir``, seen from outside: settings, URLs, uploads, jobs.

    Subclasses start and stop the processes: ``Stack`` (``labvault up``) and
    ``tests.production.ProductionStack`` (uWSGI, RabbitMQ, PostgreSQL).
    """

    SERVICES = tuple(registry.names())

    def __init__(self, data_dir: Path, **sections):
        self.data_dir = Path(data_dir)
        ports = {service: {"port": free_port()} for service in self.SERVICES}
        merged = {"celery": {"polling_interval": "0.05"}, "ingest": {"progress_interval": "0.05"},
                  "http": {"backoff": "0.1"}}
        for section, values in list(ports.items()) + list(sections.items()):
            merged.setdefault(section, {}).update(values)
        self.settings = make_settings(self.data_dir, **merged)
        # Variables every child gets beyond the settings (S3 credentials for boto3's chain).
        self.environ: dict[str, str] = {}

    def url(self, service: str) -> str:
        return self.settings.service_url(service)

    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``labvault ARGS`` against this stack (``env``: extra variables, e.g. a setting)."""
        result = subprocess.run([sys.executable, "-m", "common.cli", *args],
                                env={**env_for(self.settings, self.environ), **(env or {})},
                                capture_output=True, text=True, timeout=timeout, cwd=self.data_dir)
        if check and result.returncode != 0:
            raise AssertionError(f"labvault {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, timeout: float = 90) -> StackBase:
        raise NotImplementedError

    def stop(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def post(self, raw: bytes, path: str = "/ingest") -> dict:
        response = requests.post(self.url("ingest") + path, data=raw,
                                 headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def state(self, job_id: int) -> dict:
        return requests.get(self.url("ingest") + "/get_state", params={"job_id": job_id}, timeout=10).json()

    def wait_job(self, job_id: int, timeout: float = 90) -> dict:
        return wait_for(lambda: (lambda s: s if s.get("complete") else None)(self.state(job_id)),
                        timeout=timeout, message=f"job {job_id} to finish")

    def ingest(self, raw: bytes, timeout: float = 90) -> dict:
        return self.wait_job(self.post(raw)["job_id"], timeout)


class Stack(StackBase):
    """The whole suite started by ``labvault up`` on free ports under ``data_dir``."""

    def __init__(self, data_dir: Path, **sections):
        super().__init__(data_dir, **sections)
        self.process = None

    def start(self, timeout: float = 90) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "up.log"
        # A second start in the same directory appends: look only at what this one says.
        seen = log_path.stat().st_size if log_path.exists() else 0
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "common.cli", "up"],
                                        env=env_for(self.settings, self.environ),
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        wait_for(lambda: b"labvault: up" in log_path.read_bytes()[seen:] or self._died(),
                 timeout=timeout, message="labvault up")
        if self.process.poll() is not None:
            raise AssertionError("labvault up exited:\n" + (self.data_dir / "up.log").read_text(errors="replace"))
        return self

    def _died(self) -> bool:
        return self.process.poll() is not None

    def stop(self, timeout: float = 60) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()


def stack_kind(world: str) -> type:
    """The stack class of a test world: ``embedded`` (``labvault up``: SQLite, filesystem broker,
    POSIX archive) or ``production`` (the services under uWSGI, Celery workers on a RabbitMQ
    vhost, PostgreSQL databases; skipped, or failed under CI=true, without those servers)."""
    if world != "production":
        return Stack
    from tests.servers import require_postgres, require_rabbitmq, require_uwsgi
    require_postgres()
    require_rabbitmq()
    require_uwsgi()
    from tests.production import ProductionStack
    return ProductionStack


@contextlib.contextmanager
def seeded(stack):
    """Start ``stack``, load the Pacifica seed into it, yield it; stop it afterwards."""
    stack.start()
    try:
        stack.cli("seed", str(FIXTURES / "metadata-seed"))
        yield stack
    finally:
        stack.stop()


def large_bundle(folder: Path, mib_per_file: int, files: int = 6) -> tuple[Path, dict[str, str]]:
    """A bundle of ``files`` random files of ``mib_per_file`` MiB under ``folder``.

    Returns its path and the expected ``{"subdir/name": sha1}``; the source files are
    removed again (only the bundle is kept).
    """
    from common import bundles
    source = Path(folder) / "source"
    for n in range(files):
        subdir = source / f"run{n % 2}"
        subdir.mkdir(parents=True, exist_ok=True)
        with open(subdir / f"frame{n}.raw", "wb") as handle:
            handle.writelines(os.urandom(1024 * 1024) for _ in range(mib_per_file))
    described = bundles.describe_tree(source)
    bundle = Path(folder) / "big.tar"
    bundles.write_bundle(bundle, described,
                         bundles.build_metadata(10, "1234a", 54, [entry for _, entry in described]))
    for path, _ in described:
        path.unlink()
    return bundle, {f"{entry['subdir']}/{entry['name']}": entry["hashsum"] for _, entry in described}


def archive_sha1(stack, file_id: int) -> str:
    """SHA-1 of an archived file, streamed back from the stack's archive service."""
    import hashlib
    digest = hashlib.sha1()
    with requests.get(f"{stack.url('archive')}/{file_id}", stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        for chunk in response.iter_content(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class NoBroker:
    """Stands in for the Celery app where uploads must not (or need not) reach a queue; records sends."""

    def __init__(self):
        self.sent = []

    def send_task(self, name, args, **_options):
        self.sent.append((name, args))


# -- projects and derived-data inputs ------------------------------------------------

MEMBER_RELATIONSHIP = "ad417f50-5401-446d-8e5f-69892777f9b1"  # the seed's "member of"


def new_project(stack, prefix: str = "p") -> str:
    """A fresh project in the stack's metadata service, with the seed's user 10 and instrument 54
    related to it, so ``payload_bundle(..., project=...)`` ingests into it."""
    import uuid
    project = f"{prefix}-{uuid.uuid4().hex[:8]}"
    url = stack.url("metadata")
    for table, rows in (("projects", [{"_id": project, "title": f"Test project {project}"}]),
                        ("project_user", [{"project": project, "user": 10, "relationship": MEMBER_RELATIONSHIP}]),
                        ("project_instrument", [{"project": project, "instrument": 54,
                                                 "relationship": MEMBER_RELATIONSHIP}])):
        response = requests.put(f"{url}/{table}", json=rows, timeout=30)
        assert response.status_code < 300, response.text
    return project


def h5ad_bytes(seed: int = 0, n_cells: int = 120, n_genes: int = 60, raw: bool = False,
               samples: tuple[str, ...] = ("s1", "s2"), cell_types: tuple[str, ...] = ("T", "B", "NK")):
    """An ``.h5ad`` (bytes) of random counts with 13 ``MT-`` genes, sample and cell-type columns
    and an ``X_umap``; with ``raw``, the counts are in ``raw.X`` and ``X`` is log-normalised.
    Returns ``(bytes, counts)``, counts a dense cells x genes array."""
    import tempfile

    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.5, n_genes)
    depth = rng.integers(50, 2000, n_cells)
    counts = np.stack([rng.poisson(weights / weights.sum() * d) for d in depth]).astype(np.float32)
    genes = [f"MT-{i}" if i < 13 else f"GENE{i}" for i in range(n_genes)]
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    obs["sample"] = pd.Categorical(rng.choice(list(samples), n_cells))
    obs["cell_type"] = pd.Categorical(rng.choice(list(cell_types), n_cells))
    matrix = scipy.sparse.csr_matrix(counts)
    if raw:
        lognorm = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4)
        adata = anndata.AnnData(X=scipy.sparse.csr_matrix(lognorm.astype(np.float32)), obs=obs,
                                var=pd.DataFrame(index=genes))
        adata.raw = anndata.AnnData(X=matrix, var=pd.DataFrame(index=genes), obs=obs)
    else:
        adata = anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["X_umap"] = rng.normal(size=(n_cells, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.h5ad"
        adata.write_h5ad(path)
        return path.read_bytes(), counts


def write_plugin(root: Path, name: str, files: dict[str, str], entry_points: dict[str, dict[str, str]]) -> Path:
    """A plug-in distribution ``name`` under ``root`` as an installed one looks (its modules and a
    dist-info with entry points), found by a process with ``root`` on PYTHONPATH."""
    import textwrap
    files = dict(files)
    info = f"{name.replace('-', '_')}-0.1.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"
    files[f"{info}/entry_points.txt"] = "".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items())
        for group, entries in entry_points.items())
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def derived_archive_ids(stack) -> set[int]:
    """Archive ids holding the stats service's outputs (figures, computed files), which the
    stats builds after every ingest add on their own; tests counting a job's files leave them out."""
    from common.db import open_database
    db = open_database(stack.settings.database_url("stats").replace("+pool", ""))
    try:
        with db.connection_context():
            if not db.table_exists("stats_run_output"):
                return set()
            return {int(row[0]) for row in db.execute_sql("SELECT archive_id FROM stats_run_output").fetchall()}
    finally:
        db.close()


def job_archive_files(stack) -> set[str]:
    """Files under the archive root (relative paths, POSIX archive) other than the stats outputs."""
    root = stack.settings.path("archive", "root")
    files = {p for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts}
    derived = derived_archive_ids(stack)
    return {str(p.relative_to(root)) for p in files if not (p.name.isdigit() and int(p.name) in derived)}
