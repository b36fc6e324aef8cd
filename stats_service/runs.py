"""The operation engine: validate, look up the cache, run, record, store outputs in the archive.

A run is keyed by sha256(name, version, canonical inputs, input file digests). ``request``
answers the cached ``ok`` run of a key (counting the hit on it), or the live run already
working on it, or a new queued run; ``execute`` runs a queued run under a claim with a
heartbeat (the ingest reaper's pattern: a run whose worker died goes stale and is
re-driven or failed by ``reap``). Outputs are written to a private temporary directory,
then stored in the archive (the same bytes from any stats process on any machine) and the
directory removed. Nothing here imports CherryPy or Celery.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable

from common.clients import ArchiveClient, MetadataClient, make_session
from common.db import close_quietly, utcnow
from common.errors import Conflict, LabvaultError, NotFound, UnprocessableEntity
from common.hashing import CHUNK_SIZE, hash_file, new_hasher
from common.heartbeat import Heartbeat
from common.settings import Settings
from stats_service import models
from stats_service.catalog import Catalog
from stats_service.models import FAILED, OK, QUEUED, RUNNING, Run, RunOutput
from stats_service.operations import discover
from stats_service.operations.base import Operation, RunContext

logger = logging.getLogger(__name__)

# Outputs are archived under ids of their own range, so the files users upload keep
# consecutive ids (a transaction's files are not interleaved with the stats they caused).
# Below 2**53, so a browser reads every id exactly.
DERIVED_ID_MODE = "derived_file"
DERIVED_ID_BASE = 10 ** 15

LIBRARIES = ("numpy", "scipy", "h5py", "anndata", "matplotlib", "labvault")
MAX_JSON_DEPTH = 32


def canonical(value: Any) -> str:
    """The one JSON text of ``value`` (sorted keys, no spaces), so equal inputs give equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(operation: Operation, inputs: dict, digests: dict[str, str]) -> str:
    text = canonical([operation.name, operation.version, inputs, digests])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def environment() -> dict[str, str]:
    """The versions of what computes a result, recorded with it."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def new_run_id() -> str:
    return uuid.uuid4().hex


def holder_name() -> str:
    return f"{socket.gethostname()[:180]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_document(run: Run, cached: bool = False) -> dict[str, Any]:
    """The run as ``GET /operations/runs/<id>`` shows it."""
    outputs = {output.name: {"size": output.size, "sha256": output.sha256, "content_type": output.content_type}
               for output in RunOutput.select().where(RunOutput.run == run.run_id).order_by(RunOutput.name)}
    document = {
        "run_id": run.run_id, "operation": run.operation, "version": run.version, "state": run.state,
        "percent": round(run.percent, 1), "message": run.message, "cached": cached,
        "inputs": json.loads(run.inputs), "input_digests": json.loads(run.input_digests),
        "cache_key": run.cache_key, "outputs": outputs,
        "result": json.loads(run.result) if run.result else None,
        "environment": json.loads(run.environment) if run.environment else None,
        "created": _time(run.created), "started": _time(run.started), "finished": _time(run.finished),
        "seconds": run.seconds, "cache_hits": run.cache_hits, "attempts": run.attempts,
    }
    if run.state == FAILED:
        document["error"] = {"code": run.error_code, "message": run.error_message}
    return document


def _time(value: datetime.datetime | None) -> str | None:
    return None if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


class VerifyingReader:
    """Reads a stream that must be ``size`` bytes hashing to ``hashtype:hashsum``; at its end a
    stream that is not raises ``Conflict`` ``input_corrupt`` (naming ``label``, never a path on
    a server), so a consumer never finishes with wrong bytes."""

    def __init__(self, raw: BinaryIO, size: int, hashtype: str, hashsum: str, label: str):
        self._raw, self.size, self.label = raw, size, label
        self._hasher = new_hasher(hashtype) if hashtype and hashsum else None
        self._expected = (hashsum or "").lower()
        self._seen = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size is not None and size >= 0 else CHUNK_SIZE)
        self._seen += len(data)
        if self._hasher is not None:
            self._hasher.update(data)
        # Checked as soon as the declared size is reached (a reader that knows the size may never
        # ask for the end) and again at the end (more bytes than declared).
        if not data or self._seen >= self.size:
            self._check()
        return data

    def _check(self) -> None:
        if self._seen != self.size or (self._hasher is not None and self._hasher.hexdigest() != self._expected):
            raise Conflict(f"{self.label[:200]} no longer matches its recorded digest", code="input_corrupt")

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _ClosingStream:
    """An HTTP response body as a readable stream that gives the connection back when closed."""

    def __init__(self, response):
        self._response = response

    def read(self, size: int = -1) -> bytes:
        return self._response.raw.read(None if size is None or size < 0 else size)

    def close(self) -> None:
        self._response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Engine:
    """Operations and runs for one process, built from settings."""

    def __init__(self, settings: Settings, operations: dict[str, Operation] | None = None,
                 metadata: MetadataClient | None = None, archive: ArchiveClient | None = None):
        session = make_session()
        self.settings = settings
        self.operations = discover() if operations is None else operations
        for operation in self.operations.values():
            operation.settings = settings
        self.metadata = metadata or MetadataClient(settings, session)
        self.archive = archive or ArchiveClient(settings, session)
        self.catalog = Catalog(self.metadata)
        self.work_dir = settings.path("stats", "work_dir")
        self.heartbeat_interval = settings.getfloat("stats", "heartbeat_interval")
        self.stale_seconds = settings.getfloat("stats", "heartbeat_stale")
        self.max_attempts = settings.getint("stats", "max_attempts")

    # -- asking ------------------------------------------------------------------

    def operation(self, name: str) -> Operation:
        try:
            return self.operations[name]
        except KeyError:
            raise NotFound(f"no operation {str(name)[:100]!r}", code="operation_not_found") from None

    def validate(self, operation: Operation, inputs: Any) -> dict:
        """``inputs`` if they satisfy the operation's schema, else 422 ``invalid_inputs`` naming the error."""
        import jsonschema
        if not isinstance(inputs, dict):
            raise UnprocessableEntity('inputs must be an object: {"inputs": {...}}', code="invalid_inputs")
        validator = jsonschema.Draft202012Validator(operation.input_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(inputs))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "inputs"
            raise UnprocessableEntity(f"{where}: {error.message[:300]}", code="invalid_inputs")
        return inputs

    def request(self, name: str, inputs: Any, force: bool = False) -> tuple[Run, bool]:
        """The run answering ``name(inputs)``: ``(run, True)`` for a cache hit, else the live or a
        new queued run and False. ``force`` ignores the cache (a new run even if one is ``ok``)."""
        operation = self.operation(name)
        inputs = self.validate(operation, inputs)
        files = operation.input_files(inputs, self.catalog)
        digests = {str(record.file_id): record.digest for record in files}
        digests.update(operation.extra_digests(inputs, files, self.catalog))
        key = cache_key(operation, inputs, digests)
        if not force:
            hit = Run.select().where((Run.cache_key == key) & (Run.state == OK)).order_by(Run.finished.desc()).first()
            if hit is not None:
                Run.update(cache_hits=Run.cache_hits + 1, last_hit=utcnow()).where(Run.run_id == hit.run_id).execute()
                return Run.get_by_id(hit.run_id), True
            live = (Run.select().where((Run.cache_key == key) & Run.state.in_((QUEUED, RUNNING)))
                    .order_by(Run.created.desc()).first())
            if live is not None and not self._stale(live):
                return live, False
        run = Run.create(run_id=new_run_id(), operation=operation.name, version=operation.version, cache_key=key,
                         inputs=canonical(inputs), input_digests=canonical(digests),
                         project=inputs.get("project") or (files[0].project if len(files) == 1 else None),
                         file_id=inputs.get("file_id"), state=QUEUED)
        return run, False

    def obtain(self, name: str, inputs: dict, force: bool = False) -> Run:
        """The finished run of ``name(inputs)``, running it here if nobody else has (used inline by
        project builds); a run another live process holds is waited for."""
        run, cached = self.request(name, inputs, force)
        if cached:
            return run
        deadline = time.monotonic() + self.stale_seconds * 4
        while True:
            run = self.execute(run.run_id)
            if run.state in (OK, FAILED) or time.monotonic() > deadline:
                return run
            time.sleep(0.5)  # held by a live run elsewhere: wait for it to end

    # -- running -------------------------------------------------------------------

    def execute(self, run_id: str) -> Run:
        """Run a queued (or stale) run to its end; a run another live process holds is left alone."""
        run = Run.get_or_none(Run.run_id == run_id)
        if run is None:
            raise NotFound(f"no run {run_id}", code="run_not_found")
        if run.state in (OK, FAILED):
            return run
        holder = holder_name()
        if not self._claim(run_id, holder):
            return Run.get_by_id(run_id)
        run = Run.get_by_id(run_id)
        if run.attempts > self.max_attempts:
            return self._fail(run, LabvaultError(f"the run stopped {run.attempts - 1} times without finishing",
                                                 code="worker_lost"))
        operation = self.operations.get(run.operation)
        if operation is None or operation.version != run.version:
            return self._fail(run, LabvaultError(f"operation {run.operation} {run.version} is not installed here",
                                                 code="operation_unavailable"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"run-{run_id[:12]}-", dir=self.work_dir))
        started = time.monotonic()
        try:
            with Heartbeat(lambda: self._touch(run_id, holder), self.heartbeat_interval, f"run-{run_id[:12]}",
                           done=lambda: close_quietly(models.database)) as heartbeat:
                inputs = json.loads(run.inputs)
                files = operation.input_files(inputs, self.catalog)
                context = RunContext(self, run, inputs, files, workdir)
                result = operation.run(context)
                if heartbeat.lost:
                    logger.warning("run %s: taken over by another process; its result is dropped", run_id)
                    return Run.get_by_id(run_id)
                stored = [self._store(run, name, path, content_type)
                          for name, (path, content_type) in sorted(context.outputs.items())]
                (Run.update(state=OK, percent=100.0, message="done", result=canonical(result),
                            environment=canonical(environment()), finished=utcnow(),
                            seconds=round(time.monotonic() - started, 3), claimed_by=None)
                 .where((Run.run_id == run_id) & (Run.claimed_by == holder)).execute())
                logger.info("run %s (%s): ok, %d output(s)", run_id, run.operation, len(stored))
                finished = Run.get_by_id(run_id)
                operation.finished(self, finished)
                return finished
        except LabvaultError as error:
            return self._fail(run, error, time.monotonic() - started)
        except Exception:  # noqa: BLE001 - a failing operation fails its run, never the worker
            logger.exception("run %s (%s) failed", run_id, run.operation)
            return self._fail(run, LabvaultError("the operation failed unexpectedly; the worker log has the details",
                                                 code="operation_failed"), time.monotonic() - started)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _claim(self, run_id: str, holder: str) -> bool:
        stale = utcnow() - datetime.timedelta(seconds=self.stale_seconds)
        return bool(Run.update({Run.claimed_by: holder, Run.heartbeat: utcnow(), Run.state: RUNNING,
                                Run.started: utcnow(), Run.attempts: Run.attempts + 1})
                    .where((Run.run_id == run_id) & Run.state.in_((QUEUED, RUNNING))
                           & (Run.claimed_by.is_null() | Run.heartbeat.is_null() | (Run.heartbeat < stale)))
                    .execute())

    def _touch(self, run_id: str, holder: str) -> int:
        return Run.update(heartbeat=utcnow()).where((Run.run_id == run_id) & (Run.claimed_by == holder)).execute()

    def _stale(self, run: Run) -> bool:
        if run.state == QUEUED:
            return run.created < utcnow() - datetime.timedelta(seconds=self.stale_seconds)
        return run.heartbeat is None or run.heartbeat < utcnow() - datetime.timedelta(seconds=self.stale_seconds)

    def _fail(self, run: Run, error: LabvaultError, seconds: float | None = None) -> Run:
        logger.warning("run %s (%s) failed: %s", run.run_id, run.operation, error.as_exception_text())
        (Run.update(state=FAILED, error_code=error.code, error_message=error.message[:2000], finished=utcnow(),
                    seconds=None if seconds is None else round(seconds, 3), claimed_by=None,
                    environment=canonical(environment()))
         .where(Run.run_id == run.run_id).execute())
        return Run.get_by_id(run.run_id)

    # -- outputs and inputs in the archive --------------------------------------------

    def _store(self, run: Run, name: str, path: Path, content_type: str) -> RunOutput:
        digest = hash_file(path, "sha256")
        archive_id = DERIVED_ID_BASE + self.metadata.getid(DERIVED_ID_MODE, 1)
        self.archive.put(archive_id, lambda: open(path, "rb"), "sha256", digest)
        return RunOutput.create(run=run.run_id, name=name, archive_id=archive_id, size=path.stat().st_size,
                                sha256=digest, content_type=content_type)

    def download(self, file_id: int, target: Path, hashtype: str, hashsum: str) -> None:
        """Stream an archived file to ``target``, checking it against ``hashtype:hashsum``."""
        hasher = new_hasher(hashtype or "sha256")
        with self.archive.get(file_id) as response, open(target, "wb") as handle:
            for chunk in response.iter_content(CHUNK_SIZE):
                hasher.update(chunk)
                handle.write(chunk)
        if hashsum and hasher.hexdigest() != hashsum.lower():
            target.unlink(missing_ok=True)
            raise Conflict(f"archived file {file_id} does not match its recorded digest", code="input_corrupt")

    def output(self, run: Run, name: str) -> RunOutput:
        output = RunOutput.get_or_none((RunOutput.run == run.run_id) & (RunOutput.name == name))
        if output is None:
            raise NotFound(f"run {run.run_id} has no output {str(name)[:100]!r}", code="output_not_found")
        return output

    def open_archived(self, file_id: int) -> BinaryIO:
        """A file-like stream of an archived file's bytes, straight from the archive (not seekable)."""
        response = self.archive.get(file_id)
        response.raw.decode_content = True
        return _ClosingStream(response)

    def output_bytes(self, run: Run, name: str) -> bytes:
        with self.archive.get(self.output(run, name).archive_id) as response:
            return response.content

    def output_stream(self, output: RunOutput) -> Callable[[], Any]:
        """An iterator over an output's bytes, streamed from the archive."""
        response = self.archive.get(output.archive_id)

        def chunks():
            with response:
                yield from response.iter_content(CHUNK_SIZE)
        return chunks()

    # -- the reaper --------------------------------------------------------------------

    def reap(self, enqueue: Callable[[str], None]) -> list[str]:
        """Re-drive or fail runs whose worker went away: queued or running with no sign of life for
        ``[stats] heartbeat_stale`` seconds. Returns what was done."""
        stale = utcnow() - datetime.timedelta(seconds=self.stale_seconds)
        done = []
        quiet = Run.select().where((Run.state.in_((QUEUED, RUNNING)))
                                   & (Run.heartbeat.is_null() | (Run.heartbeat < stale)) & (Run.created < stale))
        for run in quiet:
            if run.attempts >= self.max_attempts:
                self._fail(run, LabvaultError(f"the run stopped {run.attempts} times without finishing",
                                              code="worker_lost"))
                done.append(f"run {run.run_id}: failed worker_lost")
            else:
                # Stamp the heartbeat so it waits another stale period before the next re-drive.
                Run.update(heartbeat=utcnow()).where(Run.run_id == run.run_id).execute()
                enqueue(run.run_id)
                done.append(f"run {run.run_id}: re-enqueued")
        return done
