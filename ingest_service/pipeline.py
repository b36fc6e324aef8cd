"""The ingest pipeline: run one job through its steps, recording each on the job row.

Upload jobs: open tar -> load metadata -> Policy Validation -> ingest files ->
ingest metadata. Move jobs: load metadata -> Policy Validation -> move files ->
ingest metadata. One Celery task runs a whole job: the steps share the open tar
and its member index, and the job row, not the broker, is the checkpoint.

A job is safe to run twice: a finished job is left alone, file ids are reserved
once and kept on the job row, the archive is write-once by id (same bytes again
is a no-op) and the metadata transaction is only inserted if it is not there.

A run first claims its job (``jobs.claim``), so two runs never work on one job
at once: the one that cannot claim returns ``HELD`` and does nothing. While it
runs, a heartbeat thread keeps the claim fresh; a run whose claim was taken over
(its heartbeat went stale) stops without touching the job.

A worker that is shutting down (``IngestContext.stopping``) is not a failure: the run
stops at the next file or step, gives the job back unfinished (claim released, the
attempt not counted) and returns ``HANDED_BACK``; the next worker, or the reaper at
the next start, runs it on. A dependency that fails while the worker shuts down
(the services stop too) hands the job back as well.

A failed step records FAILED with that step's label and ``code: message``,
deletes the archive files the job wrote and the staged bundle (``fail_job``, also
the reaper's way to end a job), and raises ``JobFailed`` so the task fails too.
Nothing here imports CherryPy or Celery.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from common import bundles, registry
from common.bundles import BundleError, Manifest
from common.clients import ArchiveClient, MetadataClient, PolicyClient, batch_header, make_session
from common.db import close_quietly
from common.heartbeat import Heartbeat
from common.errors import LabvaultError
from common.hashing import CHUNK_SIZE, HashingReader
from common.settings import Settings
from ingest_service import jobs, models, notices
from ingest_service.models import Job
from ingest_service.cleanup import remove_archive_files
from ingest_service.staging import Staging

logger = logging.getLogger(__name__)

# What process_job answers when another live run holds the job.
HELD = "held"
# What process_job answers when the worker shuts down: the job is unfinished, nobody holds it.
HANDED_BACK = "handed back"


class JobFailed(Exception):
    """A job ended FAILED; the job row says where and why (plain args so Celery can pickle it)."""

    def __init__(self, job_id: int, step: str, exception_text: str):
        super().__init__(job_id, step, exception_text)
        self.job_id, self.step, self.exception_text = job_id, step, exception_text

    def __str__(self) -> str:
        return f"job {self.job_id} failed at {self.step!r}: {self.exception_text}"


class _StepFailed(Exception):
    def __init__(self, step: str, error: LabvaultError):
        super().__init__(step)
        self.step, self.error = step, error


class _ClaimLost(Exception):
    """Another run took the job over: this run must stop without writing anything more."""


class _Stopping(Exception):
    """The worker is shutting down: this run hands the job back without failing it."""


def _never() -> bool:
    return False


@dataclass
class IngestContext:
    """What a job needs from the outside, built once per process from settings."""

    settings: Settings
    metadata: MetadataClient
    policy: PolicyClient
    archive: ArchiveClient
    staging: Staging
    # Exceptions that mean "the task ran out of time" (Celery's soft time limit; the
    # task adapter supplies them so this module stays free of Celery).
    time_limits: tuple[type[BaseException], ...] = ()
    # True once the worker shuts down (the task adapter supplies it: Celery's warm shutdown).
    stopping: Callable[[], bool] = _never

    @classmethod
    def from_settings(cls, settings: Settings, time_limits: tuple[type[BaseException], ...] = (),
                      stopping: Callable[[], bool] = _never) -> IngestContext:
        session = make_session()
        return cls(settings,
                   MetadataClient(settings, session),
                   PolicyClient(settings, session),
                   ArchiveClient(settings, session),
                   Staging(settings.path("ingest", "staging_dir")),
                   time_limits, stopping)


def new_run_id() -> str:
    """A name for one run of a job, unique across machines, telling where it runs."""
    return f"{socket.gethostname()[:180]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def worker_lost(attempts: int) -> LabvaultError:
    """The failure of a job that started ``attempts`` times and never finished."""
    return LabvaultError(f"the job stopped {attempts} times without finishing", code="worker_lost")


def process_job(context: IngestContext, job_id: int, run_id: str | None = None) -> str:
    """Run job ``job_id`` to its end; returns its final state (``HELD`` if another live run
    holds it, ``"missing"`` if there is no such job) or raises ``JobFailed``.

    A job that already started ``[ingest] max_attempts`` times fails ``worker_lost`` instead
    of running again: RabbitMQ would redeliver, without end, a job whose run kills its worker.
    """
    job = jobs.find(job_id)
    if job is None:
        logger.warning("job %s: no such job, nothing to do", job_id)
        return "missing"
    if jobs.is_complete(job):
        logger.info("job %s: already %s, nothing to do", job_id, job.state)
        return job.state
    if context.stopping():
        return HANDED_BACK  # arrived while the worker shuts down: not even claimed
    run_id = run_id or new_run_id()
    stale = context.settings.getfloat("ingest", "heartbeat_stale")
    if not jobs.claim(job_id, run_id, jobs.stale_cutoff(stale)):
        job = jobs.get(job_id)
        if jobs.is_complete(job):
            return job.state
        logger.info("job %s: run %s holds it; this run leaves it alone", job_id, job.claimed_by)
        return HELD
    result = None
    try:
        job = jobs.get(job_id)
        if job.attempts >= context.settings.getint("ingest", "max_attempts"):
            error = worker_lost(job.attempts)
            fail_job(context, job_id, job.task, error)
            raise JobFailed(job_id, job.task, error.as_exception_text())
        # The new run's first step with its attempt, in one update: nobody sees this attempt
        # counted beside the step and percent the last run left.
        jobs.count_attempt(job_id, task=JobRun.first_step(job), task_percent=0)
        with job_heartbeat(job_id, run_id, context.settings.getfloat("ingest", "heartbeat_interval")) as heartbeat:
            result = JobRun(context, jobs.get(job_id), heartbeat).run()
            return result
    finally:
        try:
            # A run handed back did not use up an attempt: a restart is not a lost worker.
            jobs.release(job_id, run_id, give_back_attempt=result == HANDED_BACK)
        except Exception:  # noqa: BLE001 - must not hide how the run ended; the claim goes stale anyway
            logger.warning("job %s: could not release the claim of run %s", job_id, run_id, exc_info=True)


def job_heartbeat(job_id: int, run_id: str, interval: float) -> Heartbeat:
    """The heartbeat of ``run_id``'s claim on a job, from a thread with its own database connection."""
    return Heartbeat(lambda: jobs.touch(job_id, run_id), interval, f"heartbeat-{job_id}",
                     done=lambda: close_quietly(models.database))


class JobRun:
    def __init__(self, context: IngestContext, job: Job, heartbeat: Heartbeat | None = None):
        self.context = context
        self.job = job
        self.job_id = int(job.job_id)
        self.heartbeat = heartbeat
        self.settings = context.settings
        self.tar: tarfile.TarFile | None = None
        self.index: bundles.BundleIndex | None = None
        self.file_ids: dict[int, int] = {}  # metadata position of a Files entry -> its file id
        self._last_progress = 0.0
        self.progress_interval = self.settings.getfloat("ingest", "progress_interval")

    @staticmethod
    def first_step(job: Job) -> str:
        return jobs.LOAD_METADATA if job.kind == "move" else jobs.OPEN_TAR

    def run(self) -> str:
        try:
            if self.job.kind == "move":
                manifest = self._load_move_document()
                self._note_project(manifest)
                self._check_policy(manifest)
                self._move_files(manifest)
            else:
                manifest = self._open_bundle()
                self._note_project(manifest)
                self._check_policy(manifest)
                self._ingest_files(manifest)
            self._ingest_metadata(manifest)
            self._check_claim()
        except _ClaimLost:
            return self._stand_down()
        except _Stopping:
            return self._hand_back()
        except _StepFailed as failure:
            if self._claim_lost():
                # Maybe the other run's doing (e.g. it recorded the metadata first): its job now.
                return self._stand_down()
            if self.context.stopping():
                # The services it calls may be stopping with the worker: not the job's fault.
                return self._hand_back()
            fail_job(self.context, self.job_id, failure.step, failure.error)
            raise JobFailed(self.job_id, failure.step, failure.error.as_exception_text()) from None
        finally:
            if self.tar is not None:
                self.tar.close()
        jobs.set_state(self.job_id, jobs.OK, jobs.INGEST_METADATA, 100)
        self.context.staging.discard(self.job_id)
        logger.info("job %s: ingested", self.job_id)
        # The hand-off: whoever derives data from what arrived (stats, computed files) hears of
        # it here. Listeners only enqueue; one that fails is logged and the job stays OK.
        registry.emit(registry.INGESTED, self.settings, job_id=self.job_id)
        notices.job_ended(self.settings, self.job_id)
        return jobs.OK

    # -- steps --------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, label: str):
        """Record ``label`` at 0% and turn any error inside into a failure of this step."""
        self._check_claim()
        self._check_stopping()
        jobs.set_state(self.job_id, jobs.OK, label, 0)
        try:
            yield
        except (_ClaimLost, _Stopping):
            raise
        except LabvaultError as error:
            raise _StepFailed(label, error) from None
        except self.context.time_limits:
            raise _StepFailed(label, LabvaultError("the job ran longer than [celery] task_soft_time_limit",
                                                   code="time_limit_exceeded")) from None
        except Exception:  # noqa: BLE001 - every failure must end the job, not hang it
            logger.exception("job %s: unexpected error at %r", self.job_id, label)
            raise _StepFailed(label, LabvaultError("unexpected error; the worker log has the details")) from None

    def _open_bundle(self) -> Manifest:
        path = self.context.staging.bundle_path(self.job_id)
        with self.step(jobs.OPEN_TAR):
            if not path.is_file():
                raise BundleError("the staged bundle is gone", code="bundle_missing")
            self.tar, members = bundles.read_index(path, self.settings.getint("ingest", "max_members"))
        with self.step(jobs.LOAD_METADATA):
            self.index = bundles.classify(members)
            document = bundles.read_metadata(self.tar, self.index.metadata,
                                             self.settings.getint("ingest", "max_metadata_bytes"))
            return bundles.parse_manifest(document)

    def _load_move_document(self) -> Manifest:
        path = self.context.staging.document_path(self.job_id)
        with self.step(jobs.LOAD_METADATA):
            if not path.is_file():
                raise BundleError("the staged move document is gone", code="bundle_missing")
            document = bundles.decode_metadata(path.read_bytes())
            return bundles.parse_manifest(document, with_source=True)

    def _note_project(self, manifest: Manifest) -> None:
        """Record the project the metadata names on the job (what its events are filtered by)."""
        for entry in manifest.document:
            if entry.get("destinationTable") == "Transactions.project":
                value = entry.get("value")
                if isinstance(value, (str, int)) and not isinstance(value, bool) and 0 < len(str(value)) <= 255:
                    jobs.update(self.job_id, project=jobs.storable(str(value)))
                return

    def _check_policy(self, manifest: Manifest) -> None:
        with self.step(jobs.POLICY):
            self.context.policy.check_ingest(manifest.document, self.job.owner)

    def _ingest_files(self, manifest: Manifest) -> None:
        with self.step(jobs.INGEST_FILES):
            pairs = bundles.match_payload(manifest, self.index,
                                          self.settings.getbool("ingest", "reject_undeclared"))
            bundle = self.context.staging.bundle_path(self.job_id)
            self._store_batches(manifest, [(declared, MemberSource(bundle, member), member.mtime)
                                           for declared, member in pairs],
                                order=[member.offset_data for _, member in pairs])

    def _move_files(self, manifest: Manifest) -> None:
        with self.step(jobs.MOVE_FILES):
            openers = []
            for declared in manifest.files:
                source = Path(declared.source)
                try:
                    info = source.stat()
                except OSError:
                    raise BundleError(f"source of data/{declared.key[:200]} is missing", code="file_missing") from None
                if info.st_size != declared.size:
                    raise BundleError(f"source of data/{declared.key[:200]} is {info.st_size} bytes, metadata says "
                                      f"{declared.size}", code="size_mismatch")
                openers.append((declared, lambda source=source: open(source, "rb"), info.st_mtime))
            self._store_all(manifest, openers)

    def _ingest_metadata(self, manifest: Manifest) -> None:
        with self.step(jobs.INGEST_METADATA):
            if self.context.metadata.first("transactions", _id=self.job_id):
                logger.info("job %s: transaction already recorded (second run)", self.job_id)
                return
            self.context.metadata.ingest(self._metadata_document(manifest))

    # -- helpers ------------------------------------------------------------

    def _file_ids(self, count: int) -> int:
        """The first of ``count`` file ids for this job, reserved once and kept on the row.

        Two runs of one job agree on the ids whichever reserves first (``jobs.reserve_file_ids``).
        """
        return jobs.reserve_file_ids(self.job_id, count,
                                     lambda: self.context.metadata.getid("file", count) if count else 0)

    def _store_batches(self, manifest: Manifest, openers: list, order: list[int]) -> None:
        """Send every ``(declared, opener, mtime)`` to the archive in batches (``POST /batch``),
        in the order of ``order`` (the members' offsets: the staged tar is read once, front to
        back). The archive verifies each file before it is visible and answers once the
        batch is durable; ``task_percent`` follows the bytes sent.
        """
        start = self._file_ids(len(openers))
        self.file_ids = {declared.position: start + n for n, (declared, _, _) in enumerate(openers)}
        ordered = [item for _, item in sorted(zip(order, openers), key=lambda pair: pair[0])]
        most_files = max(1, self.settings.getint("ingest", "archive_batch_files"))
        most_bytes = max(1, self.settings.getint("ingest", "archive_batch_bytes"))
        total = max(manifest.total_bytes, 1)
        finished = 0
        batch: list = []
        size = 0
        for item in ordered + [None]:
            if batch and (item is None or len(batch) >= most_files or size + item[0].size > most_bytes):
                self._send_batch(batch, finished, total)
                finished += size
                batch, size = [], 0
            if item is not None:
                batch.append(item)
                size += item[0].size
        self._progress(1.0, force=True)

    def _send_batch(self, batch: list, finished: int, total: int) -> None:
        self._check_stopping()
        members = [(self.file_ids[declared.position], declared, opener, mtime)
                   for declared, opener, mtime in batch]

        def on_bytes(sent: int) -> None:
            self._check_stopping()  # mid-batch: the archive keeps only the files that arrived whole
            self._progress((finished + sent) / total)

        try:
            answers = self.context.archive.put_batch(lambda: BatchBody(members, on_bytes))
        except LabvaultError:
            self._progress(finished / total, force=True)
            raise
        by_id = {entry.get("id"): entry for entry in answers if isinstance(entry, dict)}
        failed = next((entry for entry in answers if isinstance(entry, dict) and entry.get("status", 500) >= 400), None)
        for file_id, declared, _, _ in members:
            entry = by_id.get(file_id)
            if failed is not None and failed.get("id") in (file_id, None):
                self._progress(finished / total, force=True)
                what = (f"its {declared.hashtype} is not the declared {declared.hashsum}"
                        if failed.get("code") == "hash_mismatch" else str(failed.get("message", "")))
                raise LabvaultError(f"data/{declared.key[:200]}: {what}", code=str(failed.get("code") or "archive_error"))
            if entry is None or entry.get("status", 500) >= 400:
                continue  # not reached: the failure above names its own file first
            if int(entry.get("total_bytes", -1)) != declared.size:
                raise LabvaultError(f"archive stored {entry.get('total_bytes')} bytes of data/{declared.key[:200]}, "
                                    f"expected {declared.size}", code="size_mismatch")
        missing = [declared for file_id, declared, _, _ in members if file_id not in by_id]
        if missing or failed is not None:
            where = f"data/{missing[0].key[:200]}" if missing else "a file"
            raise LabvaultError(f"the archive did not store {where}", code="archive_incomplete")

    def _store_all(self, manifest: Manifest, openers: list) -> None:
        """Stream every ``(declared, opener, mtime)`` into the archive with its expected hash.

        ``task_percent`` follows the bytes sent.
        """
        start = self._file_ids(len(openers))
        self.file_ids = {declared.position: start + n for n, (declared, _, _) in enumerate(openers)}
        total = max(manifest.total_bytes, 1)
        finished = 0
        for declared, opener, mtime in openers:
            self._check_stopping()
            sent = 0

            def on_read(count: int) -> None:
                nonlocal sent
                sent += count
                self._check_stopping()  # mid-file: the archive drops a body that stops short
                self._progress((finished + sent) / total)  # noqa: B023 - runs only while this file streams

            def fresh_body(opener=opener, size=declared.size):
                nonlocal sent
                sent = 0  # a retry sends the file again from its start
                return HashingReader(opener(), length=size, on_read=on_read)

            file_id = self.file_ids[declared.position]
            try:
                answer = self.context.archive.put(file_id, fresh_body, declared.hashtype, declared.hashsum, mtime)
            except LabvaultError as error:
                # task_percent where the job stopped (the bytes of this file did not count), and
                # the member's path in the bundle, not the archive's internal file id.
                self._progress(finished / total, force=True)
                what = (f"its {declared.hashtype} is not the declared {declared.hashsum}"
                        if error.code == "hash_mismatch" else error.message)
                raise LabvaultError(f"data/{declared.key[:200]}: {what}", code=error.code) from None
            if int(answer.get("total_bytes", -1)) != declared.size:
                raise LabvaultError(f"archive stored {answer.get('total_bytes')} bytes of data/{declared.key[:200]}, "
                                    f"expected {declared.size}", code="size_mismatch")
            finished += declared.size
        self._progress(1.0, force=True)

    def _progress(self, fraction: float, force: bool = False) -> None:
        """Record ``task_percent``, at most once per ``[ingest] progress_interval``."""
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_interval:
            return
        self._last_progress = now
        self._check_claim()
        jobs.update(self.job_id, task_percent=round(min(100.0, 100.0 * fraction), 3))

    def _metadata_document(self, manifest: Manifest) -> list[dict]:
        document = []
        for position, entry in enumerate(manifest.document):
            table = entry.get("destinationTable")
            if table == "Transactions._id":
                continue  # the job id is the transaction id, whatever the client said
            if table == "Files":
                # In place: the policy has read the document already, and a copy of every
                # entry would double the worker's memory for a bundle of many files.
                entry.pop("source", None)
                entry["_id"] = self.file_ids[position]
            document.append(entry)
        document.append({"destinationTable": "Transactions._id", "value": self.job_id})
        return document

    def _claim_lost(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.lost

    def _check_claim(self) -> None:
        if self._claim_lost():
            raise _ClaimLost()

    def _check_stopping(self) -> None:
        if self.context.stopping():
            raise _Stopping()

    def _hand_back(self) -> str:
        logger.warning("job %s: the worker is shutting down; the job is handed back unfinished", self.job_id)
        return HANDED_BACK

    def _stand_down(self) -> str:
        logger.warning("job %s: another run took the job over; this run stops here", self.job_id)
        return HELD


class MemberSource:
    """The bytes of a (regular, not sparse: ``bundles.classify``) member, read straight from
    the staged tar at its offset, without tarfile's per-member machinery. Calling it opens them."""

    def __init__(self, bundle: Path, member: tarfile.TarInfo):
        self.bundle, self.offset = bundle, member.offset_data

    def __call__(self) -> BinaryIO:
        handle = open(self.bundle, "rb")
        handle.seek(self.offset)
        return handle


class BatchBody:
    """The body of one ``POST /batch``: for each member its header line and its bytes, in
    pieces of about ``CHUNK_SIZE`` (small files share a piece). ``len()`` is known in
    advance, so the request carries a Content-Length and streams."""

    def __init__(self, members: list, on_bytes: Callable[[int], None] | None = None):
        self.members = members  # (file id, declared, opener or MemberSource, mtime)
        self.on_bytes = on_bytes
        self.headers = [batch_header(file_id, declared.size, declared.hashtype, declared.hashsum, mtime)
                        for file_id, declared, _, mtime in members]
        self.length = sum(len(header) for header in self.headers) + sum(m[1].size for m in members)
        self.sent = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        piece = bytearray()
        self.sent = 0
        handle, bundle = None, None
        try:
            for header, (_, declared, opener, _) in zip(self.headers, self.members):
                piece += header
                if isinstance(opener, MemberSource) and bundle == opener.bundle:
                    # Members of one staged tar share one handle (and its read-ahead).
                    if handle.tell() != opener.offset:
                        handle.seek(opener.offset)
                else:
                    if handle is not None:
                        handle.close()
                    handle = opener()
                    bundle = opener.bundle if isinstance(opener, MemberSource) else None
                left = declared.size
                while left:
                    data = handle.read(min(left, CHUNK_SIZE))
                    if not data:
                        raise LabvaultError(f"data/{declared.key[:200]} ended {left} bytes early while it was sent",
                                            code="size_mismatch")
                    left -= len(data)
                    if not piece and len(data) >= CHUNK_SIZE:
                        yield self._count(data)  # a large file's bytes go as they are read
                        continue
                    piece += data
                    if len(piece) >= CHUNK_SIZE:
                        yield self._count(bytes(piece))
                        piece.clear()
            if piece:
                yield self._count(bytes(piece))
        finally:
            if handle is not None:
                handle.close()

    def _count(self, data: bytes) -> bytes:
        # Reported before the piece goes: a stop asked for meanwhile ends the request here.
        self.sent += len(data)
        if self.on_bytes:
            self.on_bytes(self.sent)
        return data


def fail_job(context: IngestContext, job_id: int, step: str, error: LabvaultError) -> None:
    """End a job FAILED at ``step`` with ``error``, removing what it wrote: its archive files and
    its staged bundle. The caller holds the job (its run, or the reaper's claim)."""
    logger.warning("job %s: FAILED at %r: %s", job_id, step, error.as_exception_text())
    _remove_archive_files(context, job_id)
    context.staging.discard(job_id)
    job = jobs.get(job_id)
    jobs.set_state(job_id, jobs.FAILED, step, job.task_percent, error.as_exception_text())
    notices.job_ended(context.settings, job_id)


def _remove_archive_files(context: IngestContext, job_id: int) -> None:
    """Delete the job's archive files; those the archive cannot take now wait for the sweeper."""
    job = jobs.get(job_id)
    if job.file_id_start is None:
        return
    start = int(job.file_id_start)
    remove_archive_files(context.archive, context.staging, job_id, range(start, start + job.file_count))
