"""The archive service over HTTP, Pacifica archiveinterface-compatible: bytes by file id.

``PUT /<id>`` streams in, ``GET /<id>`` streams out (with Range), ``HEAD /<id>`` describes,
``DELETE /<id>`` removes, ``PATCH /<id>`` copies a server-local file in, ``POST /<id>``
stages. ``GET /fixity`` lists files whose last fixity check found a problem and
``GET /fixity/summary`` counts results. ``GET /presign/<id>?expires=<seconds>&filename=<name>``
answers a URL that serves the file without labvault (S3: a presigned GetObject; 404
``presign_unsupported`` on POSIX). Named routes win over ``/<id>``: CherryPy looks up
attributes before it pops an id. Handlers decode, call ``archive.Archive`` or
``fixity``, encode; errors become JSON in common.web.
"""
from __future__ import annotations

import base64
import datetime
import email.utils
import logging
import time
from typing import Iterable

import cherrypy
from cherrypy.lib import httputil

from archive_service import fixity, models
from archive_service.archive import Archive, FileInfo, PutResult, parse_file_id
from archive_service.backends import make_storage
from common import migrations
from common.errors import BadRequest, LabvaultError, LengthRequired, NotFound, code_for_status, status_line
from common.hashing import CHUNK_SIZE
from common.settings import Settings
from archive_service import openapi
from common.web import HealthMixin, OpenApiDocument, drain, int_param, json_body, make_application, read_json

logger = logging.getLogger(__name__)

HASH_TYPE_HEADER = "X-Hash-Type"
HASH_SUM_HEADER = "X-Hash-Sum"
SHA256_HEADER = "X-Labvault-Sha256"
# Range requests are answered in pieces of this size, whatever the backend.
SEND_CHUNK = CHUNK_SIZE
# S3's longest presigned URL (SigV4): seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


class RangeNotSatisfiable(LabvaultError):
    status = 416
    code = code_for_status(416)

    def __init__(self, size: int):
        super().__init__(f"the requested range is outside the file's {size} bytes")
        self.headers = {"Content-Range": f"bytes */{size}"}


class FixitySummary:
    """``GET /fixity/summary``: counts of the last fixity results."""

    exposed = True

    def GET(self, **_params) -> bytes:  # noqa: N802
        return json_body(fixity.summary())


class FixityProblems:
    """``GET /fixity?result=mismatch&page_number=1&items_per_page=100``: files whose last check failed."""

    exposed = True

    def __init__(self):
        self.summary = FixitySummary()

    def GET(self, *path, result: str | None = None, page_number="1", items_per_page="100",  # noqa: N802
            **_params) -> bytes:
        if path:  # CherryPy hands what follows /fixity/ over as positional arguments
            raise NotFound(f"no resource /fixity/{'/'.join(path)[:60]}", code="not_found")
        return json_body(fixity.problems(result, int_param("page_number", page_number),
                                         int_param("items_per_page", items_per_page)))


class Presign:
    """``GET /presign/<id>?expires=<seconds>&filename=<name>``: a URL that serves the file without
    labvault, valid ``expires`` seconds (1 to 7 days, S3's limit). Behind the service token like
    every archive route: the stats service hands these URLs to holders of a download token."""

    exposed = True

    def __init__(self, archive: Archive):
        self.archive = archive

    def GET(self, *path, expires="3600", filename=None, **_params) -> bytes:  # noqa: N802
        if len(path) != 1:
            raise NotFound("GET /presign/<file_id>", code="not_found")
        seconds = int_param("expires", expires)
        if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
            raise BadRequest(f"expires is 1 to {MAX_PRESIGN_SECONDS} seconds", code="invalid_expires")
        if filename is not None and (not isinstance(filename, str) or len(filename) > 255):
            raise BadRequest("filename is one name of at most 255 characters", code="invalid_filename")
        info = self.archive.stat(parse_file_id(path[0]))
        url = self.archive.storage.presigned_url(info.file_id, seconds, filename=filename)
        if url is None:
            raise NotFound(f"the {self.archive.storage.media} archive serves its files itself: no presigned URLs",
                           code="presign_unsupported")
        return json_body({"url": url, "expires": int(time.time()) + seconds})


class Batch:
    """``POST /batch``: many files in one request (see ``Archive.put_batch`` for the body)."""

    exposed = True

    def __init__(self, archive: Archive, sync_batch: int):
        self.archive = archive
        self.sync_batch = sync_batch

    @cherrypy.config(**{"request.process_request_body": False})
    def POST(self, *path, **_params) -> bytes:  # noqa: N802
        request = cherrypy.serving.request
        try:
            if path:
                raise NotFound(f"no resource /batch/{'/'.join(path)[:60]}", code="not_found")
            _body_length(request.headers)  # 411 without a length or a chunked body
            result = self.archive.put_batch(request.rfile, self.sync_batch)
        finally:
            drain(request.rfile)
        if result.failure is None:
            return json_body({"message": f"{len(result.files)} files in the archive", "files": result.files})
        # The first failure sets the status; the list says what is stored (and durable).
        failed = next(entry for entry in result.files if entry["status"] >= 400)
        return json_body({"status": status_line(failed["status"]), "code": failed["code"],
                          "message": failed["message"], "files": result.files}, failed["status"])


@cherrypy.popargs("file_id")
class ArchiveRoot(HealthMixin):
    """``/`` is the health answer; ``/<file_id>`` is a file."""

    exposed = True
    service_title = "Archive"

    def __init__(self, archive: Archive, sync_batch: int = 256):
        self.openapi_json = OpenApiDocument(openapi.describe)
        self.archive = archive
        self.fixity = FixityProblems()
        self.presign = Presign(archive)


        self.batch = Batch(archive, sync_batch)

    # noqa below: the verbs are CherryPy MethodDispatcher method names.
    def GET(self, file_id: str | None = None, **_params) -> bytes | Iterable[bytes]:  # noqa: N802
        if file_id is None:
            return super().GET()
        info = self.archive.stat(_required_id(file_id))
        start, end = _byte_range(cherrypy.serving.request.headers.get("Range"), info.size)
        # The backend reads the range itself (S3: a ranged GetObject): no seek needed.
        info, handle = self.archive.open(info.file_id, start, end)
        response = cherrypy.serving.response
        self._describe(info)
        if end is not None:
            response.status = 206
            response.headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        # A Content-Length keeps CherryPy from collecting the body in memory.
        response.headers["Content-Length"] = str((info.size if end is None else end + 1) - start)
        return _stream(handle)

    def HEAD(self, file_id: str | None = None, **_params) -> bytes:  # noqa: N802
        info = self.archive.stat(_required_id(file_id))
        self._describe(info)
        cherrypy.serving.response.headers["Content-Length"] = str(info.size)
        return b""

    def _describe(self, info: FileInfo) -> None:
        """The headers GET and HEAD share: size, times, digests, storage media."""
        headers = cherrypy.serving.response.headers
        headers.update({
            # Stored bytes are never interpreted: no type guessing, no sniffing.
            "Content-Type": "application/octet-stream",
            "X-Content-Type-Options": "nosniff",
            "Accept-Ranges": "bytes",
            "Last-Modified": httputil.HTTPDate(info.mtime_epoch),
            HASH_TYPE_HEADER: info.hashtype,
            HASH_SUM_HEADER: info.hashsum,
            "X-Pacifica-File-Size": str(info.size),
            "X-Pacifica-Mtime": str(int(info.mtime_epoch)),
            "X-Pacifica-Ctime": str(int(info.created_epoch)),
            "X-Pacifica-File-Storage-Media": self.archive.storage.media,
            # Three s's: Pacifica's spelling, which its clients read.
            "X-Pacifica-Messsage": "File was found",
        })
        if info.sha256:
            headers[SHA256_HEADER] = info.sha256
            headers["Digest"] = "sha-256=" + base64.b64encode(bytes.fromhex(info.sha256)).decode("ascii")

    # The body must reach the handler unread: CherryPy would otherwise parse a form-encoded
    # body into memory. Handler config is applied before the body is processed.
    @cherrypy.config(**{"request.process_request_body": False})
    def PUT(self, file_id: str | None = None, hashtype: str | None = None,  # noqa: N802
            hashsum: str | None = None, **_params) -> bytes:
        request = cherrypy.serving.request
        try:
            headers = request.headers
            result = self.archive.put(
                _required_id(file_id), request.rfile,
                hashtype or headers.get(HASH_TYPE_HEADER), hashsum or headers.get(HASH_SUM_HEADER),
                mtime=_last_modified(headers.get("Last-Modified")), size=_body_length(headers))
        finally:
            drain(request.rfile)
        return _put_answer(result, "File added to archive", "File already in archive")

    def PATCH(self, file_id: str | None = None, **_params) -> bytes:  # noqa: N802
        file_id = _required_id(file_id)
        body = read_json()
        if not isinstance(body, dict) or not isinstance(body.get("path"), str) or not body["path"]:
            raise BadRequest('PATCH needs a JSON object {"path": "..."}', code="invalid_request")
        result = self.archive.patch(file_id, body["path"], body.get("hashtype"), body.get("hashsum"))
        return _put_answer(result, "File moved into archive", "File moved into archive")

    def DELETE(self, file_id: str | None = None, **_params) -> bytes:  # noqa: N802
        self.archive.delete(_required_id(file_id))
        return json_body({"message": "File removed"})

    def POST(self, file_id: str | None = None, **_params) -> bytes:  # noqa: N802
        self.archive.stage(_required_id(file_id))
        return json_body({"message": "File was staged"})


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    """The archive's CherryPy application; refuses to build on a schema of another major version."""
    db = migrations.bind_service(models.database, settings.database_url("archive"), models.SCHEMA, check_schema)
    storage = make_storage(settings)
    # A bucket that is not there (or cannot be reached) stops the start with one clear line.
    storage.prepare(create=settings.getbool("archive", "create_bucket", False))
    archive = Archive(storage, settings.getlist("archive", "patch_roots"))
    # Under `labvault serve` the backend's thread pools end with the server, or CherryPy would
    # wait for them forever before the process exits.
    cherrypy.engine.subscribe("stop", storage.shutdown)
    return make_application(ArchiveRoot(archive, settings.getint("archive", "sync_batch")), db=db,
                            service_token=settings.service_token)


def _required_id(file_id) -> int:
    if file_id is None:
        raise BadRequest("a file id is required: /<file_id>", code="invalid_file_id")
    return parse_file_id(file_id)


def _byte_range(header: str | None, size: int) -> tuple[int, int | None]:
    """(start, end inclusive) of a single-range request; (0, None) for the whole file.

    Several ranges get the whole file (200), which RFC 9110 allows; a range that cannot
    be satisfied is 416 with ``Content-Range: bytes */size``.
    """
    if not header:
        return 0, None
    ranges = httputil.get_ranges(header, size)
    if ranges is None or len(ranges) > 1:
        return 0, None  # not a byte range we understand, or several: the whole file
    if not ranges:
        raise RangeNotSatisfiable(size)
    start, stop = ranges[0]
    return start, stop - 1


def _stream(handle) -> Iterable[bytes]:
    try:
        while chunk := handle.read(SEND_CHUNK):
            yield chunk
    finally:
        handle.close()


def _put_answer(result: PutResult, created: str, unchanged: str) -> bytes:
    return json_body({"message": created if result.created else unchanged,
                      "total_bytes": result.total_bytes}, 201 if result.created else 200)


def _body_length(headers) -> int | None:
    """The declared body length, so a body cut short is refused; None for chunked bodies."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return None
    length = headers.get("Content-Length")
    if length is None:
        raise LengthRequired("PUT needs a Content-Length or a chunked body")
    try:
        return int(length)
    except ValueError:
        raise BadRequest(f"Content-Length {length[:40]!r} is not a number", code="invalid_request") from None


def _last_modified(value: str | None) -> datetime.datetime | float | None:
    """Pacifica clients send an HTTP date; a number of epoch seconds is taken too."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise BadRequest(f"Last-Modified {text[:60]!r} is not an HTTP date", code="invalid_mtime") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
