"""One typed HTTP client per service, on a shared ``requests.Session``.

Every call has an explicit timeout. Connection errors, timeouts and 5xx answers
are retried with exponential backoff; when retries run out the call raises
``ServiceUnavailable`` with the code ``<service>_unavailable``. A 4xx answer raises
``LabvaultError`` carrying the service's own ``code`` and status, so callers branch
on codes, never on message text.
"""
from __future__ import annotations

import email.utils
import json
import logging
import time
from typing import Any, BinaryIO, Callable, Iterable
from urllib.parse import quote

import requests

from common.auth import SERVICE_TOKEN_HEADER
from common.errors import LabvaultError, RemoteError, ServiceUnavailable
from common.settings import Settings

logger = logging.getLogger(__name__)


def make_session(pool_size: int = 16) -> requests.Session:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size,
                                            max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ServiceClient:
    """Base for the per-service clients: base URL, timeouts, retries, error mapping."""

    service = ""
    # Internal services get the shared service token ([auth] service_token) on every call.
    internal = True

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 base_url: str | None = None):
        self.base_url = (base_url or settings.service_url(self.service)).rstrip("/")
        self.timeout = (settings.getfloat("http", "connect_timeout"), settings.getfloat("http", "read_timeout"))
        self.retries = settings.getint("http", "retries")
        self.backoff = settings.getfloat("http", "backoff")
        self.session = session or make_session()
        token = settings.service_token if self.internal else ""
        self.headers = {SERVICE_TOKEN_HEADER: token} if token else {}

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(self, method: str, path: str, *, body_factory: Callable[[], Any] | None = None,
                retries: int | None = None, **kwargs) -> requests.Response:
        """Send a request; retry transport errors and 5xx; raise on any error status.

        ``body_factory`` makes a fresh body for each attempt (streams cannot be resent).
        """
        kwargs.setdefault("timeout", self.timeout)
        if self.headers:
            kwargs["headers"] = {**self.headers, **(kwargs.get("headers") or {})}
        attempts = 1 + (self.retries if retries is None else retries)
        last_problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            if body_factory is not None:
                kwargs["data"] = body_factory()
            try:
                response = self.session.request(method, self.url(path), **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_problem = f"cannot reach the {self.service} service at {self.base_url} ({type(exc).__name__})"
                logger.warning("%s %s: %s (attempt %d of %d)", method, path, last_problem, attempt + 1, attempts)
                continue
            if response.status_code >= 500:
                error = _error_from(response)
                last_problem = f"the {self.service} service answered {response.status_code}: {error.message}"
                logger.warning("%s %s: %s (attempt %d of %d)", method, path, last_problem, attempt + 1, attempts)
                continue
            if response.status_code >= 400:
                raise _error_from(response)
            return response
        raise ServiceUnavailable(last_problem, code=f"{self.service}_unavailable")

    def health(self) -> dict:
        return self.request("GET", "/", retries=0).json()


def _error_from(response: requests.Response) -> LabvaultError:
    code, message = f"http_{response.status_code}", response.reason or "error"
    body = None
    try:
        body = response.json()
        if isinstance(body, dict):
            code = str(body.get("code") or code)
            message = str(body.get("message") or message)
    except ValueError:
        pass
    error = RemoteError(message, code=code, status=response.status_code)
    # What else the answer said (e.g. the per-file list of POST /batch), for the caller to read.
    error.body = body if isinstance(body, dict) else None
    return error


class MetadataClient(ServiceClient):
    service = "metadata"

    def getid(self, mode: str, count: int = 1) -> int:
        """Reserve ``count`` consecutive ids of ``mode``; returns the first."""
        answer = self.request("GET", "/getid", params={"range": count, "mode": mode}).json()
        return int(answer["startIndex"])

    def ingest(self, document: list[dict]) -> dict:
        return self.request("PUT", "/ingest", json=document).json()

    def query(self, objects: str, **filters) -> list[dict]:
        return self.request("GET", f"/{objects}", params=filters).json()

    def first(self, objects: str, **filters) -> dict | None:
        rows = self.query(objects, **filters)
        return rows[0] if rows else None

    def delete(self, objects: str, **filters) -> None:
        """Delete the rows matching ``filters`` (at least one; a list value means any of)."""
        self.request("DELETE", f"/{objects}", params=filters)


class PolicyClient(ServiceClient):
    service = "policy"

    def check_ingest(self, document: list[dict], uploader: int | None = None) -> None:
        """Raises ``policy_denied`` (412) when the upload is not allowed.

        ``uploader``: the user the ingest service authenticated (None without authentication).
        """
        headers = {} if uploader is None else {"X-Labvault-Uploader": str(int(uploader))}
        self.request("POST", "/ingest", json=document, headers=headers)


class ArchiveClient(ServiceClient):
    service = "archive"

    def put(self, file_id: int, open_stream: Callable[[], BinaryIO | Iterable[bytes]],
            hashtype: str | None = None, hashsum: str | None = None, mtime: float | None = None) -> dict:
        """Stream a file in; the archive verifies ``hashsum`` before the file becomes visible."""
        params = {}
        if hashtype and hashsum:
            params = {"hashtype": hashtype, "hashsum": hashsum}
        headers = {"Content-Type": "application/octet-stream"}
        if mtime is not None:
            headers["Last-Modified"] = email.utils.formatdate(mtime, usegmt=True)
        response = self.request("PUT", f"/{int(file_id)}", body_factory=open_stream, params=params,
                                headers=headers)
        return response.json()

    def put_batch(self, open_body: Callable[[], bytes | Iterable[bytes]]) -> list[dict]:
        """Send many files in one ``POST /batch``; ``open_body()`` makes the body (an iterable
        with a length, see ``batch_header``) afresh for each attempt. Returns the archive's
        per-file list, whether every file was stored or not: entries with a status of 400 or
        more failed, and every other one is stored and durable."""
        headers = {"Content-Type": "application/octet-stream"}
        try:
            response = self.request("POST", "/batch", body_factory=open_body, headers=headers)
        except RemoteError as error:
            files = (error.body or {}).get("files") if error.status < 500 else None
            if not isinstance(files, list):
                raise
            return files
        return response.json()["files"]

    def patch(self, file_id: int, path: str, hashtype: str | None = None, hashsum: str | None = None) -> dict:
        body = {"path": path}
        if hashtype and hashsum:
            body.update(hashtype=hashtype, hashsum=hashsum)
        return self.request("PATCH", f"/{int(file_id)}", json=body).json()

    def head(self, file_id: int) -> dict[str, str] | None:
        try:
            return dict(self.request("HEAD", f"/{int(file_id)}").headers)
        except LabvaultError as exc:
            if exc.status == 404:
                return None
            raise

    def get(self, file_id: int) -> requests.Response:
        return self.request("GET", f"/{int(file_id)}", stream=True)

    def delete(self, file_id: int, retries: int | None = None) -> bool:
        """Remove a file; False if it was not there. ``retries`` overrides ``[http] retries``."""
        try:
            self.request("DELETE", f"/{int(file_id)}", retries=retries)
            return True
        except LabvaultError as exc:
            if exc.status == 404:
                return False
            raise

    def presigned_url(self, file_id: int, seconds: int, filename: str | None = None) -> str | None:
        """A URL serving the file without labvault (S3), or None when the archive serves its files itself."""
        params = {"expires": int(seconds)}
        if filename:
            params["filename"] = filename
        try:
            return self.request("GET", f"/presign/{int(file_id)}", params=params).json()["url"]
        except LabvaultError as exc:
            if exc.code == "presign_unsupported":
                return None
            raise

    def fixity_summary(self) -> dict:
        """The archive's fixity summary (``GET /fixity/summary``); 404 when it keeps none."""
        return self.request("GET", "/fixity/summary", retries=0).json()


def batch_header(file_id: int, size: int, hashtype: str | None = None, hashsum: str | None = None,
                 mtime: float | None = None) -> bytes:
    """The header line of one member of a ``POST /batch`` body; ``size`` bytes follow it."""
    header = {"id": int(file_id), "size": int(size)}
    if hashtype and hashsum:
        header.update(hashtype=hashtype, hashsum=hashsum)
    if mtime is not None:
        header["mtime"] = float(mtime)
    return json.dumps(header, separators=(",", ":")).encode("ascii") + b"\n"


class IngestIdentityClient(ServiceClient):
    """The ingest service's internal question: whose API token is this (by its SHA-256)?"""

    service = "ingest"

    def user_for_token(self, digest: str) -> int | None:
        try:
            return int(self.request("GET", f"/identity/tokens/{quote(digest)}").json()["user"])
        except LabvaultError as exc:
            if exc.status == 404:
                return None
            raise


class IngestClient(ServiceClient):
    service = "ingest"
    internal = False  # the public service: never sent the service token

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 base_url: str | None = None, token: str | None = None):
        super().__init__(settings, session, base_url)
        if token:
            self.headers = {"Authorization": f"Bearer {token}"}

    def upload(self, open_stream: Callable[[], BinaryIO], path: str = "/ingest", idempotency_key: str | None = None,
               dedupe: bool = False) -> dict:
        """POST a bundle. Without an idempotency key (or ``dedupe``: the bundle's digest as the key)
        it is sent once: sent again after a lost answer it would make a second job. With one, a
        connection failure or a 5xx is retried, since the service answers a retry with the same job."""
        headers = {"Content-Type": "application/octet-stream"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if dedupe:
            headers["Labvault-Dedupe"] = "digest"
        idempotent = idempotency_key is not None or dedupe
        return self.request("POST", path, body_factory=open_stream, retries=None if idempotent else 0,
                            headers=headers).json()

    def get_state(self, job_id: int) -> dict:
        return self.request("GET", f"/get_state/{quote(str(job_id))}").json()

    def jobs(self, **params) -> dict:
        """A page of ``GET /jobs`` (``state``, ``submitter``, ``project``, ``limit``, ``offset``)."""
        return self.request("GET", "/jobs", params={k: v for k, v in params.items() if v is not None}).json()
