"""What the ingest endpoints do: take an upload or a move document, create its job, enqueue it."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

from common.auth import OPEN, Identity
from common.bundles import check_document
from common.clients import MetadataClient
from common.errors import (
    BadRequest,
    Forbidden,
    LabvaultError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from common.hashing import hash_file
from common.settings import Settings
from ingest_service import idempotency, jobs, notices
from ingest_service.staging import Staging, read_body

logger = logging.getLogger(__name__)


class IngestService:
    def __init__(self, settings: Settings, metadata: MetadataClient, staging: Staging,
                 enqueue: Callable[[int], None]):
        self.settings = settings
        self.metadata = metadata
        self.staging = staging
        self.enqueue = enqueue
        self.max_bundle_bytes = settings.getint("ingest", "max_bundle_bytes")
        self.idempotency_hours = settings.getfloat("ingest", "idempotency_hours")
        self.move_roots = [Path(os.path.realpath(root)) for root in settings.getlist("ingest", "move_roots")]

    def upload(self, read: Callable[[int], bytes], length: int | None, identity: Identity = OPEN,
               idempotent: idempotency.Request | None = None) -> dict:
        """Stream a bundle to the staging volume as a new job of ``identity`` and enqueue it; returns the state.

        With ``idempotent`` (see ``ingest_service.idempotency``) a bundle sent again under a bound
        key answers the job the key is bound to, and makes none.
        """
        if length is not None and length > self.max_bundle_bytes:
            raise PayloadTooLarge(f"bundle of {length} bytes is larger than the limit of {self.max_bundle_bytes}")
        uploader = idempotency.uploader_of(identity.user)
        if idempotent is not None and not idempotent.by_digest:
            bound = idempotency.find(idempotent.key, uploader)
            if bound is not None and jobs.find(int(bound.job_id)) is not None:
                # A retry: its bytes are only hashed, never staged, and no job is made.
                digest = hashlib.sha256()
                read_body(read, self.max_bundle_bytes, length, digest.update)
                return self.state(idempotency.check(bound, digest.hexdigest()), identity)
        # Hashed on the way only when a key needs the digest: SHA-256 of a 10 GiB upload costs
        # the ingest process tens of seconds of CPU.
        digest = hashlib.sha256() if idempotent is not None else None
        return self.create_job(identity, lambda job_id: self.staging.receive(
            job_id, read, self.max_bundle_bytes, expected=length, digest=digest),
            digest=digest, idempotent=idempotent)

    def move(self, document, identity: Identity = OPEN) -> dict:
        """Accept a metadata list whose Files carry server-local ``source`` paths."""
        document = check_document(document)
        for entry in document:
            if entry.get("destinationTable") == "Files" and isinstance(entry.get("source"), str):
                self._check_move_source(entry["source"])
        raw = json.dumps(document).encode("utf-8")
        return self.create_job(identity, lambda job_id: self.staging.receive(
            job_id, io.BytesIO(raw).read, len(raw), suffix=".json"), kind="move")

    def create_job(self, identity: Identity, stage: Callable[[int], object], kind: str = "upload",
                   job_id: int | None = None, digest=None, idempotent: idempotency.Request | None = None) -> dict:
        """The one way a job comes to be (``POST /ingest``, ``POST /move``, a finished resumable upload):
        a new job of ``identity`` at ``UPLOADING``, whose bundle ``stage(job_id)`` puts on the staging
        volume, then ``start_staged``; returns its state. ``job_id``: one allocated beforehand (a
        resumable upload records it first, so a crash in between cannot lose which job its bytes
        became). ``digest``: the hasher ``stage`` fed with the bundle's bytes, if it had one."""
        if job_id is None:
            job_id = self.metadata.getid("upload_job", 1)
        jobs.create(job_id, kind=kind, owner=identity.user)
        self._stage(job_id, lambda: stage(job_id))
        return self.start_staged(job_id, None if digest is None else digest.hexdigest(), identity, idempotent)

    def start_staged(self, job_id: int, digest: str | None, identity: Identity = OPEN,
                     idempotent: idempotency.Request | None = None) -> dict:
        """A job whose bundle (SHA-256 ``digest``) is staged whole: bind its idempotency key, then
        enqueue it; returns its state. When the key is already bound to another job, this job and
        its staged bytes are removed and the bound job answers (409 for other bytes).

        A caller that could not hash the bytes as they arrived passes ``digest=None``: the staged
        bundle is then read once more, and only when an idempotency key needs it.
        """
        if idempotent is None:
            return self._start(job_id)
        if digest is None:
            digest = self._staged_digest(job_id)
        try:
            binding = self._bind(idempotent.key_for(digest), idempotency.uploader_of(identity.user), digest, job_id)
        except LabvaultError as exc:
            self._fail_upload(job_id, exc)  # never enqueued: the reaper must not run it keyless
            raise
        except Exception:
            logger.exception("job %s: binding its idempotency key failed", job_id)
            error = LabvaultError("the idempotency key could not be recorded; the service log has the details")
            self._fail_upload(job_id, error)
            raise error from None
        if int(binding.job_id) == job_id:
            return self._start(job_id, unbind_on_failure=True)
        # Another upload bound the key first (a retry, or a concurrent twin): this job never was.
        self.staging.discard(job_id)
        jobs.delete(job_id)
        return self.state(idempotency.check(binding, digest), identity)

    def _bind(self, key: str, uploader: int, digest: str, job_id: int):
        binding = idempotency.bind(key, uploader, digest, job_id, self.idempotency_hours)
        if int(binding.job_id) != job_id and jobs.find(int(binding.job_id)) is None:
            # The bound job is gone (removed by hand): the key names nothing any more.
            idempotency.unbind_row(binding.id)
            binding = idempotency.bind(key, uploader, digest, job_id, self.idempotency_hours)
        return binding

    def _staged_digest(self, job_id: int) -> str:
        try:
            return hash_file(self.staging.bundle_path(job_id), "sha256")
        except OSError as exc:
            logger.error("job %s: cannot read the staged bundle to hash it: %s", job_id, exc)
            error = LabvaultError("the staged bundle could not be read; send it again", code="staging_unavailable")
            self._fail_upload(job_id, error)
            raise error from None

    def state(self, job_id: int, identity: Identity = OPEN) -> dict:
        """The job's state; a job ``identity`` may not see does not exist for it (404)."""
        job = jobs.get(job_id)
        if not identity.may_see(job.owner):
            raise NotFound(f"no job {job_id}", code="job_not_found")
        return jobs.state_json(job)

    def _check_move_source(self, source: str) -> None:
        if not self.move_roots:
            raise Forbidden("POST /move is disabled: no [ingest] move_roots are configured",
                            code="path_not_allowed")
        resolved = Path(os.path.realpath(source))
        if not any(resolved == root or root in resolved.parents for root in self.move_roots):
            raise Forbidden(f"source {source[:200]!r} is not under an allowed move root",
                            code="path_not_allowed")

    def _stage(self, job_id: int, receive: Callable[[], object]) -> None:
        """Run ``receive``; if it fails, the job is FAILED at UPLOADING with its code, and it raises.

        Staging sorts out its own failures (413, ``upload_interrupted``,
        ``insufficient_storage``, ``staging_unavailable``) and removes what it wrote.
        """
        try:
            receive()
        except LabvaultError as exc:
            self._fail_upload(job_id, exc)
            raise
        except Exception:
            logger.exception("job %s: staging the upload failed", job_id)
            error = LabvaultError("the upload could not be staged; the service log has the details")
            self._fail_upload(job_id, error)
            raise error from None

    def _start(self, job_id: int, unbind_on_failure: bool = False) -> dict:
        try:
            self.enqueue(job_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure
            logger.error("job %s: could not enqueue: %s", job_id, exc)
            error = ServiceUnavailable("the task queue is unreachable; try again later", code="broker_unavailable")
            if unbind_on_failure:
                idempotency.unbind(job_id)  # the client is told to try again: with the same key
            self._fail_upload(job_id, error, publish=False)
            raise error from None
        return self.state(job_id)

    def _fail_upload(self, job_id: int, error: LabvaultError, publish: bool = True) -> None:
        self.staging.discard(job_id)
        jobs.set_state(job_id, jobs.FAILED, jobs.UPLOADING, 0, error.as_exception_text())
        if publish:
            # Not when the broker is what failed: the event would wait for it too.
            notices.job_ended(self.settings, job_id)


def parse_length(header: str | None) -> int | None:
    if header is None or header == "":
        return None
    if not header.strip().isdigit():
        raise BadRequest("Content-Length must be a whole number", code="invalid_content_length")
    return int(header)
