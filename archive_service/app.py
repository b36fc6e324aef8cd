"""The archive service over HTTP, Pacifica archiveinterface-compatible: bytes by file id.

``PUT /<id>`` streams in, ``GET /<id>`` streams out (with Range), ``HEAD /<id>`` describes,
``DELETE /<id>`` removes, ``PATCH /<id>`` copies a server-local file in, ``POST /<id>``
stages. Handlers decode, call ``archive.Archive``, encode; errors become JSON in common.web.
"""
from __future__ import annotations

import datetime
import email.utils
import logging
from typing import Iterable

import cherrypy
from cherrypy.lib import httputil
from cherrypy.lib import static

from archive_service import models
from archive_service.archive import Archive, FileInfo, PutResult, parse_file_id
from archive_service.storage import make_storage
from common import migrations
from common.errors import BadRequest, LengthRequired
from common.settings import Settings
from archive_service import openapi
from common.web import HealthMixin, OpenApiDocument, drain, json_body, make_application, read_json

logger = logging.getLogger(__name__)

HASH_TYPE_HEADER = "X-Hash-Type"
HASH_SUM_HEADER = "X-Hash-Sum"


@cherrypy.popargs("file_id")
class ArchiveRoot(HealthMixin):
    """``/`` is the health answer; ``/<file_id>`` is a file."""

    exposed = True
    service_title = "Archive"

    def __init__(self, archive: Archive):
        self.openapi_json = OpenApiDocument(openapi.describe)
        self.archive = archive

    # noqa below: the verbs are CherryPy MethodDispatcher method names.
    def GET(self, file_id: str | None = None, **_params) -> bytes | Iterable[bytes]:  # noqa: N802
        if file_id is None:
            return super().GET()
        info, handle = self.archive.open(_required_id(file_id))
        try:
            _describe(info)
            cherrypy.serving.response.headers["Content-Type"] = "application/octet-stream"
            # The public serve_fileobj learns the length only from fstat(), which an S3
            # stream has not; this is the helper it delegates to (Range, 206, 416).
            return static._serve_fileobj(handle, "application/octet-stream", info.size)
        except BaseException:
            handle.close()
            raise

    def HEAD(self, file_id: str | None = None, **_params) -> bytes:  # noqa: N802
        info = self.archive.stat(_required_id(file_id))
        headers = cherrypy.serving.response.headers
        _describe(info)
        headers.update({
            "Content-Type": "application/octet-stream",
            "Content-Length": str(info.size),
            "X-Pacifica-File-Size": str(info.size),
            "X-Pacifica-Mtime": str(int(info.mtime_epoch)),
            "X-Pacifica-Ctime": str(int(info.created_epoch)),
            "X-Pacifica-File-Storage-Media": "disk",
            # Three s's: Pacifica's spelling, which its clients read.
            "X-Pacifica-Messsage": "File was found",
        })
        return b""

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
    archive = Archive(make_storage(settings), settings.getlist("archive", "patch_roots"))
    return make_application(ArchiveRoot(archive), db=db,
                            service_token=settings.service_token)


def _required_id(file_id) -> int:
    if file_id is None:
        raise BadRequest("a file id is required: /<file_id>", code="invalid_file_id")
    return parse_file_id(file_id)


def _describe(info: FileInfo) -> None:
    headers = cherrypy.serving.response.headers
    headers["Last-Modified"] = httputil.HTTPDate(info.mtime_epoch)
    headers[HASH_TYPE_HEADER] = info.hashtype
    headers[HASH_SUM_HEADER] = info.hashsum


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
