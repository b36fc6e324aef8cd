"""What the ingest endpoints do: take an upload or a move document, create its job, enqueue it."""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

from common.bundles import check_document
from common.clients import MetadataClient
from common.errors import BadRequest, LabvaultError, PayloadTooLarge, ServiceUnavailable
from common.settings import Settings
from ingest_service import jobs
from ingest_service.staging import Staging

logger = logging.getLogger(__name__)


class IngestService:
    def __init__(self, settings: Settings, metadata: MetadataClient, staging: Staging,
                 enqueue: Callable[[int], None]):
        self.metadata = metadata
        self.staging = staging
        self.enqueue = enqueue
        self.max_bundle_bytes = settings.getint("ingest", "max_bundle_bytes")
        self.move_roots = [Path(os.path.realpath(root)) for root in settings.getlist("ingest", "move_roots")]

    def upload(self, read: Callable[[int], bytes], length: int | None) -> dict:
        """Stream a bundle to the staging volume as a new job and enqueue it; returns the state."""
        if length is not None and length > self.max_bundle_bytes:
            raise PayloadTooLarge(f"bundle of {length} bytes is larger than the limit of {self.max_bundle_bytes}")
        job_id = self.metadata.getid("upload_job", 1)
        jobs.create(job_id, kind="upload")
        try:
            self.staging.receive(job_id, read, self.max_bundle_bytes, expected=length)
        except LabvaultError as exc:
            self._fail_upload(job_id, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - a client that went away mid-body
            error = LabvaultError(f"the upload stopped before the whole body arrived ({type(exc).__name__})",
                                  code="upload_interrupted", status=400)
            self._fail_upload(job_id, error)
            raise error from None
        return self._start(job_id)

    def move(self, document) -> dict:
        """Accept a metadata list whose Files carry server-local ``source`` paths."""
        document = check_document(document)
        for entry in document:
            if entry.get("destinationTable") == "Files" and isinstance(entry.get("source"), str):
                self._check_move_source(entry["source"])
        job_id = self.metadata.getid("upload_job", 1)
        jobs.create(job_id, kind="move")
        raw = json.dumps(document).encode("utf-8")
        self.staging.receive(job_id, io.BytesIO(raw).read, len(raw), suffix=".json")
        return self._start(job_id)

    def state(self, job_id: int) -> dict:
        return jobs.state_json(jobs.get(job_id))

    def _check_move_source(self, source: str) -> None:
        if not self.move_roots:
            raise LabvaultError("POST /move is disabled: no [ingest] move_roots are configured",
                                code="path_not_allowed", status=403)
        resolved = Path(os.path.realpath(source))
        if not any(resolved == root or root in resolved.parents for root in self.move_roots):
            raise LabvaultError(f"source {source[:200]!r} is not under an allowed move root",
                                code="path_not_allowed", status=403)

    def _start(self, job_id: int) -> dict:
        try:
            self.enqueue(job_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure
            logger.error("job %s: could not enqueue: %s", job_id, exc)
            error = ServiceUnavailable("the task queue is unreachable; try again later", code="broker_unavailable")
            self._fail_upload(job_id, error)
            raise error from None
        return self.state(job_id)

    def _fail_upload(self, job_id: int, error: LabvaultError) -> None:
        self.staging.discard(job_id)
        jobs.set_state(job_id, jobs.FAILED, jobs.UPLOADING, 0, error.as_exception_text())


def parse_length(header: str | None) -> int | None:
    if header is None or header == "":
        return None
    if not header.strip().isdigit():
        raise BadRequest("Content-Length must be a whole number", code="invalid_content_length")
    return int(header)
