"""The ingest service's HTTP application (Pacifica ingest wire contract)."""
from __future__ import annotations

from urllib.parse import parse_qs

import cherrypy

from common import migrations
from common.celery_app import make_celery
from common import registry
from common.clients import ArchiveClient, MetadataClient
from common.db import request_connection
from common.errors import BadRequest, LabvaultError, MethodNotAllowed, NotFound
from common.settings import Settings
from common.web import (
    HealthMixin,
    OpenApiDocument,
    as_labvault_error,
    drain,
    error_headers,
    int_param,
    json_body,
    make_application,
    read_json,
    wsgi_json,
)
from ingest_service import models
from common.auth import Identities
from ingest_service import identity, idempotency
from ingest_service import openapi
from ingest_service import resumable
from ingest_service.dashboard import DashboardFiles
from ingest_service.overview import JobViews
from ingest_service.services import IngestService, parse_length
from ingest_service.tasks import enqueue_job
from ingest_service.staging import Staging


class Upload:
    """``POST /ingest`` and ``POST /upload``: the raw tar is the body."""

    exposed = True

    def __init__(self, service: IngestService, identities: Identities):
        self.service = service
        self.identities = identities

    # The bundle is streamed to the staging volume by the handler; CherryPy must not
    # read it first (handler config applies before the body is processed).
    @cherrypy.config(**{"request.process_request_body": False})
    def POST(self, **_params):  # noqa: N802
        request = cherrypy.serving.request
        try:
            identity = self.identities.identify(request.headers, request.remote.ip)
            idempotent = idempotency.from_headers(request.headers.get(idempotency.KEY_HEADER),
                                                  request.headers.get(idempotency.DEDUPE_HEADER))
            state = self.service.upload(request.rfile.read, parse_length(request.headers.get("Content-Length")),
                                        identity, idempotent)
        except LabvaultError as exc:
            # A refusal before the body was read (401, 413) closes the connection: never read it.
            if exc.headers.get("Connection") != "close":
                drain(request.rfile)
            raise
        except BaseException:
            drain(request.rfile)
            raise
        return json_body(state)


class ResumableUploads:
    """tus 1.0 at ``/uploads/`` (``ingest_service.resumable``): ``POST /uploads/`` creates,
    ``HEAD``/``PATCH``/``DELETE /uploads/<id>``, ``OPTIONS /uploads/`` advertises; ``GET /uploads/<id>``
    answers the job's state once the last byte is in (before that, where the upload stands)."""

    exposed = True

    def __init__(self, uploads: resumable.Uploads, service: IngestService, identities: Identities):
        self.uploads = uploads
        self.service = service
        self.identities = identities

    def OPTIONS(self, *path, **_params):  # noqa: N802
        headers = _tus_answer()
        headers.update({"Tus-Version": resumable.TUS_VERSION, "Tus-Extension": ",".join(resumable.EXTENSIONS),
                        "Tus-Max-Size": str(self.uploads.max_bytes),
                        "Tus-Checksum-Algorithm": ",".join(resumable.CHECKSUMS)})
        cherrypy.serving.response.status = 204
        return b""

    @cherrypy.config(**{"request.process_request_body": False})
    def POST(self, *path, **_params):  # noqa: N802
        headers, request = _tus_answer(), cherrypy.serving.request
        try:
            identity = _identify(self.identities)  # first: a stranger learns nothing else
            if path:
                raise NotFound("create an upload with POST /uploads/", code="not_found")
            if parse_length(request.headers.get("Content-Length")) or "Transfer-Encoding" in request.headers:
                raise BadRequest("creating an upload takes no body: send the bytes with PATCH",
                                 code="unexpected_body")
            resumable.check_version(request.headers.get("Tus-Resumable"))
        except LabvaultError:
            _close_unread()
            raise
        row = self.uploads.create(identity, request.headers.get("Upload-Length"),
                                  request.headers.get("Upload-Metadata"), request.headers.get("Upload-Defer-Length"))
        location = f"{request.script_name}/uploads/{row.upload_id}"
        headers.update({"Location": location, "Upload-Offset": "0",
                        "Upload-Expires": resumable.http_date(row.expires)})
        if row.job_id is not None:  # nothing to send: it is a job already
            headers[resumable.JOB_HEADER] = str(row.job_id)
        return json_body(_upload_document(row, 0, location), status=201)

    def HEAD(self, *path, **_params):  # noqa: N802
        headers, request = _tus_answer(), cherrypy.serving.request
        identity = _identify(self.identities)
        resumable.check_version(request.headers.get("Tus-Resumable"))
        row = self.uploads.find(_upload_id(path), identity)
        headers.update({"Upload-Offset": str(self.uploads.offset(row)), "Upload-Length": str(row.length),
                        "Cache-Control": "no-store"})
        if row.metadata:
            headers["Upload-Metadata"] = row.metadata
        if resumable.is_finished(row):
            headers[resumable.JOB_HEADER] = str(row.job_id)
        else:
            headers["Upload-Expires"] = resumable.http_date(row.expires)
        return b""

    @cherrypy.config(**{"request.process_request_body": False})
    def PATCH(self, *path, **_params):  # noqa: N802
        headers, request = _tus_answer(), cherrypy.serving.request
        try:
            identity = _identify(self.identities)
            resumable.check_version(request.headers.get("Tus-Resumable"))
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != resumable.PATCH_TYPE:
                raise resumable.UnsupportedMediaType(f"a PATCH body is Content-Type: {resumable.PATCH_TYPE}")
            chunk = resumable.Chunk(offset=resumable.parse_number("upload_offset", request.headers.get("Upload-Offset")),
                                    length=parse_length(request.headers.get("Content-Length")),
                                    read=request.rfile.read,
                                    checksum=resumable.parse_checksum(request.headers.get("Upload-Checksum")))
            row, job_id = self.uploads.append(_upload_id(path), identity, chunk)
        except LabvaultError as exc:
            if exc.code not in ("upload_interrupted", "checksum_mismatch"):
                _close_unread()  # refused before the body was read: never read it
            raise
        headers.update({"Upload-Offset": str(row.offset), "Upload-Expires": resumable.http_date(row.expires)})
        if job_id is not None:
            headers[resumable.JOB_HEADER] = str(job_id)
            headers.pop("Upload-Expires")
        cherrypy.serving.response.status = 204
        return b""

    def DELETE(self, *path, **_params):  # noqa: N802
        _tus_answer()
        identity = _identify(self.identities)
        resumable.check_version(cherrypy.serving.request.headers.get("Tus-Resumable"))
        self.uploads.terminate(_upload_id(path), identity)
        cherrypy.serving.response.status = 204
        return b""

    def GET(self, *path, **_params):  # noqa: N802
        identity = _identify(self.identities)
        upload_id = _upload_id(path)
        job_id = self.uploads.job_id(upload_id, identity)
        if job_id is not None:
            return json_body(self.service.state(job_id, identity))
        row = self.uploads.find(upload_id, identity)
        return json_body(_upload_document(row, self.uploads.offset(row),
                                          f"{cherrypy.serving.request.script_name}/uploads/{row.upload_id}"))


def _tus_answer():
    """The response's headers, with the ``Tus-Resumable`` every tus answer carries (errors too)."""
    headers = cherrypy.serving.response.headers
    headers["Tus-Resumable"] = resumable.TUS_VERSION
    return headers


def _close_unread() -> None:
    """Answer and close: a body left unread is never read (it may be gigabytes)."""
    cherrypy.serving.response.headers["Connection"] = "close"


def _upload_id(path: tuple) -> str:
    if len(path) != 1:
        raise NotFound("name the upload: /uploads/<upload_id>", code="upload_not_found")
    return path[0]


def _upload_document(row, offset: int, location: str) -> dict:
    return {"upload_id": row.upload_id, "location": location, "length": int(row.length), "offset": offset,
            "expires": str(row.expires), "job_id": None if row.job_id is None else int(row.job_id)}


class Move:
    exposed = True

    def __init__(self, service: IngestService, identities: Identities):
        self.service = service
        self.identities = identities

    def POST(self, **_params):  # noqa: N802
        request = cherrypy.serving.request
        identity = self.identities.identify(request.headers, request.remote.ip)
        return json_body(self.service.move(read_json(), identity))


class StateEndpoint:
    """``GET /get_state?job_id=N`` and ``GET /get_state/N``, answered before CherryPy.

    Every client polls this endpoint, many times per job, and CherryPy's request
    machinery costs several times the query itself (tests/bench/get_state.py
    measures it); so this thin WSGI layer answers it and hands every other request
    to the CherryPy application. Same JSON, same error shape.
    """

    PATH = "/get_state"

    def __init__(self, application, service: IngestService, identities: Identities, database):
        self.application = application
        self.service = service
        self.identities = identities
        self.database = database

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path != self.PATH and not path.startswith(self.PATH + "/"):
            return self.application(environ, start_response)
        try:
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                raise MethodNotAllowed("use GET")
            raw = path[len(self.PATH) + 1:] or parse_qs(environ.get("QUERY_STRING", "")).get("job_id", [None])[0]
            if not raw:
                raise BadRequest("job_id is required", code="invalid_job_id")
            job_id = int_param("job_id", raw)
            with request_connection(self.database):
                identity = self.identities.identify(EnvironHeaders(environ), environ.get("REMOTE_ADDR", ""))
                status, body, headers = 200, self.service.state(job_id, identity), []
        except Exception as exc:  # noqa: BLE001 - every failure answers JSON, as CherryPy's do
            error = as_labvault_error(exc, f"GET {path}")
            status, body, headers = error.status, error.to_dict(), error_headers(error)
            if status == 405:
                headers.append(("Allow", "GET, HEAD"))
        return wsgi_json(start_response, status, body, headers, environ.get("REQUEST_METHOD") != "HEAD")


class EnvironHeaders:
    """Request headers read from a WSGI environ (``get`` by header name)."""

    def __init__(self, environ):
        self.environ = environ

    def get(self, name: str, default=None):
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), default)


class TokenOwners:
    """``GET /identity/tokens/<sha256 of a token>``: whose API token it is, for the other public
    services (stats downloads) to identify users as this service does. Guarded by the service
    token when one is set."""

    exposed = True

    def GET(self, *path, **_params):  # noqa: N802
        if len(path) != 2 or path[0] != "tokens":
            raise NotFound("GET /identity/tokens/<digest>", code="not_found")
        user = identity.user_for_token(path[1][:64].lower())
        if user is None:
            raise NotFound("no live API token has that digest", code="token_not_found")
        return json_body({"user": user})


def _identify(identities: Identities):
    request = cherrypy.serving.request
    return identities.identify(request.headers, request.remote.ip)


class Jobs:
    """``GET /jobs?state=&submitter=&project=&limit=&offset=`` and ``GET /jobs/<id>`` (with its files)."""

    exposed = True

    def __init__(self, views: JobViews, identities: Identities):
        self.views = views
        self.identities = identities

    def GET(self, *path, state=None, submitter=None, project=None, limit="50", offset="0", **_params):  # noqa: N802
        who = _identify(self.identities)
        if len(path) == 1:
            return json_body(self.views.details(who, int_param("job_id", path[0])))
        if path:
            raise NotFound("GET /jobs or /jobs/<job_id>", code="not_found")
        submitter = None if submitter in (None, "") else int_param("submitter", submitter)
        return json_body(self.views.listing(who, state, submitter, project or None,
                                            int_param("limit", limit), int_param("offset", offset)))


class Dashboard:
    """``GET /dashboard/`` and its static files, ``/dashboard/config.json`` (where the page finds
    the services), ``/dashboard/api/fixity`` (the internal archive's summary, asked with the
    service token) and ``/dashboard/api/openapi/<service>`` (descriptions for the API page)."""

    exposed = True

    def __init__(self, settings: Settings, views: JobViews, identities: Identities):
        self.files = DashboardFiles(settings, identities.mode)
        self.views = views
        self.identities = identities

    def GET(self, *path, **_params):  # noqa: N802
        if not path and not cherrypy.serving.request.path_info.endswith("/"):
            raise cherrypy.HTTPRedirect("/dashboard/", 301)  # so the page's relative links resolve
        if path == ("config.json",):
            return json_body(self.files.config())
        if path == ("api", "fixity"):
            _identify(self.identities)
            return json_body(self.views.fixity())
        if len(path) == 3 and path[:2] == ("api", "openapi") and path[2] in registry.names():
            return json_body(registry.describe_api(path[2]) or {})
        content_type, body = self.files.read(path[0] if len(path) == 1 else ("index.html" if not path else ""))
        response = cherrypy.serving.response
        response.headers.update({"Content-Type": content_type, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
        return body


class Root(HealthMixin):
    exposed = True
    service_title = "Ingest"

    def __init__(self, service: IngestService, identities: Identities, views: JobViews, settings: Settings):
        self.ingest = self.upload = Upload(service, identities)
        self.uploads = ResumableUploads(resumable.Uploads(settings, service, service.staging), service, identities)
        self.move = Move(service, identities)
        self.identity = TokenOwners()
        self.jobs = Jobs(views, identities)
        self.dashboard = Dashboard(settings, views, identities)
        self.openapi_json = OpenApiDocument(openapi.describe)


def build_app(settings: Settings, check_schema: bool = True, celery_app=None) -> StateEndpoint:
    """The ingest WSGI application: the state endpoint in front of the CherryPy application."""
    db = migrations.bind_service(models.database, settings.database_url("ingest"), models.SCHEMA, check_schema)
    celery_app = celery_app or make_celery(settings)
    metadata = MetadataClient(settings)
    service = IngestService(settings, metadata, Staging(settings.path("ingest", "staging_dir")),
                            lambda job_id: enqueue_job(celery_app, job_id))
    identities = identity.identities(settings, metadata)
    views = JobViews(metadata, ArchiveClient(settings))
    internal = {"/identity": {"tools.labvault_service_token.on": True,
                              "tools.labvault_service_token.token": settings.service_token}}
    return StateEndpoint(make_application(Root(service, identities, views, settings), db=db,
                                          extra=internal if settings.service_token else None),
                         service, identities, db)
