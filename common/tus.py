"""A tus 1.0 client: how ``labvault ingest`` sends a large bundle as a resumable upload.

Create the upload (``POST /uploads/``), send the file in PATCHes of ``chunk_size`` bytes at the
server's offset; when a connection breaks, or the service answers 5xx, 423 or is down, wait
(backing off), ask the server's offset (HEAD) and go on from there. The server keeps the part
of a chunk that arrived before a cut, so a break costs only the bytes that were in flight.
No ``Upload-Checksum`` is sent, for that reason (a checksummed chunk counts whole or not at
all); the bundle's own per-file hashes are verified when the job ingests it.

The upload's URL is kept in a small state file (``state_dir``, keyed by the service, the file's
path, size and modification time), so running the same command again after the client itself
died resumes the same upload.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin

import requests

from common.errors import LabvaultError, RemoteError, ServiceUnavailable
from common.hashing import HashingReader

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
JOB_HEADER = "Labvault-Job-Id"
# Statuses worth waiting out (then HEAD and go on): the service restarting or busy, a PATCH of
# ours that the server still holds (423), an offset that moved under us (409).
TRANSIENT = {409, 423, 500, 502, 503, 504}


def default_state_dir() -> Path:
    """Where upload URLs are remembered: ``$XDG_CACHE_HOME/labvault/uploads`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labvault" / "uploads"


class ResumableUpload:
    """One file sent to an ingest service's ``/uploads/`` until it became a job.

    ``session``/``headers``/``timeout``: as the service's client has them (the Authorization
    header in token mode). ``on_offset(n)``: the server holds ``n`` bytes (after a resume);
    ``on_sent(n)``: ``n`` more bytes went out; ``say(text)``: one line for the user.
    """

    def __init__(self, base_url: str, path: Path, *, session: requests.Session, headers: dict,
                 timeout: tuple[float, float], chunk_size: int, state_dir: Path | None = None,
                 on_offset: Callable[[int], None] = lambda n: None, on_sent: Callable[[int], None] = lambda n: None,
                 say: Callable[[str], None] = lambda text: None, max_wait: float = 30.0, give_up_after: float = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.path = Path(path)
        self.session, self.timeout = session, timeout
        self.headers = {**headers, "Tus-Resumable": TUS_VERSION}
        self.chunk_size = max(1, int(chunk_size))
        self.state_dir = state_dir
        self.on_offset, self.on_sent, self.say = on_offset, on_sent, say
        self.max_wait, self.give_up_after = max_wait, give_up_after
        stat = self.path.stat()
        self.size = stat.st_size
        key = f"{self.base_url}\n{os.path.realpath(self.path)}\n{stat.st_size}\n{stat.st_mtime_ns}"
        self.state_file = None if state_dir is None else Path(state_dir) / (hashlib.sha256(key.encode()).hexdigest() + ".json")
        self.url: str | None = None

    # -- the whole transfer ------------------------------------------------------------

    def run(self) -> int:
        """Send the file; returns the id of the job it became."""
        offset = self._resume_or_create()
        self.on_offset(offset)
        job_id = None
        failures, quiet_since = 0, time.monotonic()
        with open(self.path, "rb") as handle:
            while job_id is None:
                try:
                    offset, job_id = self._patch(handle, offset)
                    failures, quiet_since = 0, time.monotonic()
                    continue
                except _Transient as problem:
                    reason = str(problem)
                failures += 1
                if time.monotonic() - quiet_since > self.give_up_after:
                    raise ServiceUnavailable(f"no progress for {self.give_up_after:.0f}s ({reason}); run the "
                                             f"same command again to resume", code="ingest_unavailable")
                wait = min(self.max_wait, 0.5 * 2 ** min(failures - 1, 10))
                self.say(f"{reason}; retrying in {wait:.1f}s")
                time.sleep(wait)
                known = self._offset()
                if known is None:
                    continue
                offset, job_id = known
                self.say(f"resuming at {offset / 1048576:.1f} of {self.size / 1048576:.1f} MiB")
                self.on_offset(offset)
        self._forget()
        return job_id

    def _resume_or_create(self) -> int:
        remembered = self._remembered()
        if remembered:
            self.url = remembered
            try:
                known = self._offset(strict=True)
            except LabvaultError as exc:
                if exc.status not in (404, 410):
                    raise
                self.say(f"the upload remembered for {self.path.name} is gone ({exc.code}); starting anew")
                known = None
            if known is not None:
                self.say(f"resuming the upload of {self.path.name} at {known[0] / 1048576:.1f} MiB")
                return known[0]
        self.url = self._create()
        self._remember()
        return 0

    # -- requests ------------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        try:
            response = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Transient(f"connection to {self.base_url} lost ({type(exc).__name__})") from None
        if response.status_code in TRANSIENT:
            raise _Transient(f"the ingest service answered {response.status_code}")
        if response.status_code >= 400:
            error = _error(response)
            if error.code == "upload_interrupted":
                # The body stopped arriving (at either end: a service shutting down stops reading);
                # what arrived is kept.
                raise _Transient(f"the chunk was cut short ({error.message})")
            raise error
        return response

    def _create(self) -> str:
        name = base64.b64encode(self.path.name.encode("utf-8")).decode("ascii")
        for attempt in range(8):
            try:
                response = self._send("POST", self.base_url + "/uploads/", headers={
                    "Upload-Length": str(self.size), "Upload-Metadata": f"filename {name}"})
                break
            except _Transient as problem:
                if attempt == 7:
                    raise ServiceUnavailable(f"cannot create the upload: {problem}", code="ingest_unavailable") from None
                time.sleep(min(self.max_wait, 0.5 * 2 ** attempt))
        location = response.headers.get("Location")
        if not location:
            raise RemoteError("the ingest service created no upload (no Location)", code="invalid_answer", status=502)
        return urljoin(self.base_url + "/", location)

    def _offset(self, strict: bool = False) -> tuple[int, int | None] | None:
        """(the server's offset, the job id if the upload is finished); None when it cannot be asked now."""
        try:
            response = self._send("HEAD", self.url)
        except _Transient:
            if strict:
                raise ServiceUnavailable(f"cannot reach {self.base_url}", code="ingest_unavailable") from None
            return None
        job = response.headers.get(JOB_HEADER)
        return int(response.headers["Upload-Offset"]), (int(job) if job else None)

    def _patch(self, handle, offset: int) -> tuple[int, int | None]:
        length = min(self.chunk_size, self.size - offset)
        handle.seek(offset)
        response = self._send("PATCH", self.url, data=HashingReader(handle, length=length, on_read=self.on_sent), headers={
            "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)})
        job = response.headers.get(JOB_HEADER)
        return int(response.headers["Upload-Offset"]), (int(job) if job else None)

    # -- the state file ---------------------------------------------------------------------

    def _remembered(self) -> str | None:
        if self.state_file is None:
            return None
        try:
            return str(json.loads(self.state_file.read_text(encoding="utf-8"))["url"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remember(self) -> None:
        if self.state_file is None:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"url": self.url, "path": str(self.path)}), encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            logger.warning("cannot remember the upload URL (%s); a new run will start anew", exc)

    def _forget(self) -> None:
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)


class _Transient(Exception):
    """A failure worth waiting out and resuming after."""


def _error(response: requests.Response) -> LabvaultError:
    code, message = f"http_{response.status_code}", response.reason or "error"
    try:
        body = response.json()
        code, message = str(body.get("code") or code), str(body.get("message") or message)
    except (ValueError, AttributeError):
        pass
    return RemoteError(message, code=code, status=response.status_code)
