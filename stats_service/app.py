"""The stats service's HTTP application: operations and their runs, project and file statistics.

``GET /operations``; ``POST /operations/<name>`` ``{"inputs": {...}}`` (200 cached, 202 queued,
422 for inputs that break the schema); ``GET /operations/runs/<id>``; ``GET /stats/<project>``,
``/stats/<project>/figures``, ``/stats/<project>/figures/<name>.png``, and the same per file
under ``/stats/files/<file_id>``.
"""
from __future__ import annotations

import json
import logging

import cherrypy

from common import migrations
from common.auth import Identities
from common.clients import IngestIdentityClient
from common.errors import BadRequest, NotFound
from common.settings import Settings
from common.web import HealthMixin, OpenApiDocument, int_param, json_body, make_application, read_json
from stats_service import computed, downloads, models, openapi, projects
from stats_service.models import ComputedFile, FileStats, IssuedDownload, ProjectStats, Run
from stats_service.runs import Engine, run_document

logger = logging.getLogger(__name__)

MAX_INPUTS_BYTES = 64 * 1024


class Operations:
    """``/operations``, ``/operations/<name>``, ``/operations/runs/<id>``."""

    exposed = True

    def __init__(self, engine: Engine, enqueue_run):
        self.engine = engine
        self.enqueue_run = enqueue_run

    def GET(self, *path, **_params):  # noqa: N802 - CherryPy MethodDispatcher verb
        if not path:
            return json_body([op.describe() for _, op in sorted(self.engine.operations.items())])
        if len(path) == 2 and path[0] == "runs":
            run = Run.get_or_none(Run.run_id == path[1][:64])
            if run is None:
                raise NotFound(f"no run {path[1][:64]!r}", code="run_not_found")
            return json_body(run_document(run))
        if len(path) == 1:
            return json_body(self.engine.operation(path[0]).describe())
        raise NotFound("no such resource", code="not_found")

    def POST(self, *path, **_params):  # noqa: N802
        if len(path) != 1:
            raise NotFound("POST /operations/<name>", code="not_found")
        body = read_json(MAX_INPUTS_BYTES)
        if not isinstance(body, dict) or set(body) - {"inputs", "force"}:
            raise BadRequest('the body must be {"inputs": {...}}', code="invalid_request")
        run, cached = self.engine.request(path[0], body.get("inputs"), force=body.get("force") is True)
        if run.state == models.QUEUED and run.attempts == 0:
            self.enqueue_run(run.run_id)
        return json_body(run_document(run, cached), 200 if cached or run.state == models.OK else 202)


class Stats:
    """``/stats/<project>[/figures[/<name>.png]]`` and ``/stats/files/<file_id>[...]``."""

    exposed = True

    def __init__(self, engine: Engine):
        self.engine = engine

    def GET(self, *path, **_params):  # noqa: N802
        if len(path) >= 2 and path[0] == "files" and path[1].isdigit():
            return self._file(int_param("file_id", path[1]), path[2:])
        if not path or len(path) > 3 or (len(path) >= 2 and path[1] != "figures"):
            raise NotFound("GET /stats/<project>[/figures[/<name>.png]]", code="not_found")
        project = path[0]
        self.engine.catalog.require_project(project)
        row = ProjectStats.get_or_none(ProjectStats.project == project)
        if len(path) == 1:
            return json_body(_project_document(project, row, projects.skip_list(self.engine).get(project)))
        figures_run = row.figures_run if row is not None else None
        return self._figures(figures_run, path[2:], f"project {project}")

    def _file(self, file_id: int, rest: tuple[str, ...]):
        record = self.engine.catalog.require_file(file_id)
        row = FileStats.get_or_none(FileStats.file_id == file_id)
        run = Run.get_or_none(Run.run_id == row.run) if row is not None and row.run else None
        if not rest:
            document = {"file_id": file_id, "path": record.path, "project": record.project, "kind": record.kind,
                        "state": run.state if run is not None else "none"}
            if run is not None and run.state == models.OK:
                document["stats"] = json.loads(run.result)
            elif run is not None and run.state == models.FAILED:
                document["error"] = {"code": run.error_code, "message": run.error_message}
            document["figures"] = projects.figures_of(self.engine, run.run_id if run is not None else None)
            return json_body(document)
        if rest[0] != "figures" or len(rest) > 2:
            raise NotFound("GET /stats/files/<file_id>[/figures[/<name>.png]]", code="not_found")
        return self._figures(run.run_id if run is not None else None, rest[1:], f"file {file_id}")

    def _figures(self, run_id: str | None, rest: tuple[str, ...], what: str):
        if not rest:
            return json_body(projects.figures_of(self.engine, run_id))
        name = rest[0]
        if not name.endswith(".png") or run_id is None:
            raise NotFound(f"{what} has no figure {name[:100]!r}", code="figure_not_found")
        output = models.RunOutput.get_or_none((models.RunOutput.run == run_id) & (models.RunOutput.name == name))
        if output is None:
            raise NotFound(f"{what} has no figure {name[:100]!r}", code="figure_not_found")
        return _serve_output(self.engine, output)


def _serve_output(engine: Engine, output: models.RunOutput):
    """An output's bytes with validators: the ETag is its sha256, so a rebuilt figure is a new ETag."""
    request, response = cherrypy.serving.request, cherrypy.serving.response
    etag = f'"{output.sha256}"'
    response.headers.update({"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                             "Last-Modified": cherrypy.lib.httputil.HTTPDate(output.created.timestamp())})
    if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        response.status = 304
        return b""
    response.headers["Content-Type"] = output.content_type
    response.headers["Content-Length"] = str(output.size)
    return engine.output_stream(output)


def _project_document(project: str, row: ProjectStats | None, skipped: str | None) -> dict:
    if skipped is None and row is not None and row.state == "skipped":
        skipped = row.error  # skipped by a process with its own skip list (a worker, regenerate)
    if skipped is not None:
        return {"project": project, "state": "skipped", "reason": skipped}
    if row is None or row.summary is None:
        state = row.state if row is not None else "none"
        return {"project": project, "state": state,
                "message": "no statistics yet: they are built after the project's next ingest, "
                           "or by 'labvault regenerate --project'"}
    document = json.loads(row.summary)
    if row.state != models.OK:
        document["state"] = row.state  # a rebuild under way (or failed): the last summary is still here
    if row.error:
        document["error"] = row.error
    return document


class Tokens:
    """``POST /tokens``, ``GET /tokens/terms``, ``GET|PUT /tokens/<token>`` (ScPCA's token contract)."""

    exposed = True

    def __init__(self, settings: Settings, identities: Identities):
        self.settings = settings
        self.identities = identities

    def POST(self, *path, **_params):  # noqa: N802
        if path:
            raise NotFound("POST /tokens", code="not_found")
        body = read_json(4096)
        if not isinstance(body, dict):
            raise BadRequest('the body must be {"email": ..., "is_activated": true}', code="invalid_request")
        token, row = downloads.create_token(self.settings, body.get("email"), body.get("is_activated", False),
                                            self._requester())
        return json_body(downloads.token_document(row, token), 201)

    def GET(self, *path, **_params):  # noqa: N802
        if path == ("terms",):
            return json_body({"terms_and_conditions": downloads.TERMS, "version": downloads.TERMS_VERSION})
        row = downloads.find_token(path[0]) if len(path) == 1 else None
        if row is None:
            raise NotFound("no such token", code="token_not_found")
        return json_body(downloads.token_document(row, path[0]))

    def PUT(self, *path, **_params):  # noqa: N802
        body = read_json(4096)
        if len(path) != 1 or not isinstance(body, dict) or body.get("is_activated") is not True:
            raise BadRequest('PUT /tokens/<token> {"is_activated": true} accepts the terms', code="invalid_request")
        return json_body(downloads.token_document(downloads.activate(path[0]), path[0]))

    def _requester(self) -> int | None:
        """The labvault user asking, when the request says who it is; None for an anonymous token."""
        request = cherrypy.serving.request
        if "Authorization" not in request.headers and self.identities.authenticator.proxy_header \
                not in request.headers:
            return None
        return self.identities.identify(request.headers, request.remote.ip).user


class ComputedFiles:
    """``GET /computed_files?project=P`` (no URLs) and ``GET /computed_files/<id>`` (a URL with an API-KEY)."""

    exposed = True

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        # False once the archive said it cannot presign (POSIX): this process signs its own URLs
        # from then on, without asking again for every URL.
        self.archive_presigns = True

    def GET(self, *path, project=None, limit="100", offset="0", **_params):  # noqa: N802
        if not path:
            limit, offset = int_param("limit", limit), int_param("offset", offset)
            if not 1 <= limit <= 1000 or not 0 <= offset <= 2 ** 31:
                raise BadRequest("limit is 1 to 1000, offset 0 or more", code="invalid_paging")
            return json_body(computed.listing(project, limit, offset))
        if len(path) != 1 or not path[0].isdigit() or len(path[0]) > 18:
            raise NotFound("GET /computed_files/<id>", code="computed_file_not_found")
        row = ComputedFile.get_or_none(ComputedFile.id == int(path[0]))
        if row is None:
            raise NotFound(f"no computed file {path[0]}", code="computed_file_not_found")
        document = computed.document(row)
        api_key = cherrypy.serving.request.headers.get("API-KEY")
        if api_key is not None:
            token = downloads.valid_token(api_key)
            downloads.require_access(self.settings, self.engine.catalog.directory, token, row.project)
            if row.sha256 is not None:
                document["download_url"], document["download_url_expires"] = self._url(row, token)
        return json_body(document)

    def _url(self, row: ComputedFile, token) -> tuple[str, str]:
        """A presigned S3 URL when the archive can make one, else a URL labvault signs and serves."""
        seconds = self.settings.getfloat("downloads", "url_seconds")
        output = models.RunOutput.get_or_none((models.RunOutput.run == row.run) & (models.RunOutput.name == row.output))
        url = None
        if output is not None and self.archive_presigns:
            url = self.engine.archive.presigned_url(output.archive_id, int(seconds), row.filename)
            self.archive_presigns = url is not None
        if url is not None:
            kind, expires = "s3", downloads.expiry(seconds)
        else:
            path, expires = downloads.signed_path(row.id, seconds)
            base = (self.settings.get("downloads", "public_url", "").strip() or self.settings.service_url("stats"))
            kind, url = "signed", base.rstrip("/") + path
        downloads.record(token, f"computed_file {row.id}", kind, expires)
        return url, f"{expires:%Y-%m-%d %H:%M:%S}"


class Download:
    """``GET /download/computed/<id>?expires&signature`` (a signed URL), ``GET /download/transaction/<id>``
    and ``GET /download/project/<id>`` (a tar, with an API-KEY)."""

    exposed = True

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine

    def GET(self, *path, expires=None, signature=None, **_params):  # noqa: N802
        if len(path) != 2 or path[0] not in ("computed", "transaction", "project"):
            raise NotFound("GET /download/computed|transaction|project/<id>", code="not_found")
        if path[0] == "computed":
            return self._computed(path[1], expires, signature)
        token = downloads.valid_token(cherrypy.serving.request.headers.get("API-KEY"))
        if path[0] == "transaction":
            project, records = self._transaction(int_param("transaction", path[1]))
        else:
            project = str(self.engine.catalog.require_project(path[1])["_id"])
            records = self.engine.catalog.files_of_project(project)
        downloads.require_access(self.settings, self.engine.catalog.directory, token, project)
        grant = downloads.record(token, f"{path[0]} {path[1][:200]}", "stream")
        name = f"{path[0]}_{path[1]}.tar".replace("/", "_")
        response = cherrypy.serving.response
        response.headers.update({"Content-Type": "application/x-tar", "X-Content-Type-Options": "nosniff",
                                 "Content-Disposition": f'attachment; filename="{_safe_filename(name)}"'})

        def broken(message: str) -> None:
            logger.error("download %s cut short: %s", grant.what, message)
            IssuedDownload.update(error=message[:2000]).where(IssuedDownload.id == grant.id).execute()
        return downloads.stream_tar(self.engine, records, broken)

    def _transaction(self, transaction: int):
        row = self.engine.metadata.first("transactions", _id=transaction) if transaction < 2 ** 63 else None
        if row is None or row.get("deleted") is not None:
            raise NotFound(f"no transaction {transaction}", code="transaction_not_found")
        records = [record for record in self.engine.catalog.files_of_project(str(row["project"]))
                   if record.transaction == transaction]
        return str(row["project"]), records

    def _computed(self, raw_id: str, expires, signature):
        if not raw_id.isdigit() or len(raw_id) > 18:
            raise NotFound("no such computed file", code="computed_file_not_found")
        downloads.check_signature(int(raw_id), expires, signature)
        row = ComputedFile.get_or_none(ComputedFile.id == int(raw_id))
        if row is None or row.run is None or row.output is None:
            raise NotFound(f"no computed file {raw_id}", code="computed_file_not_found")
        output = models.RunOutput.get((models.RunOutput.run == row.run) & (models.RunOutput.name == row.output))
        cherrypy.serving.response.headers["Content-Disposition"] = \
            f'attachment; filename="{_safe_filename(row.filename)}"'
        return _serve_output(self.engine, output)


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200] or "download"


class Root(HealthMixin):
    exposed = True
    service_title = "Stats"

    def __init__(self, settings: Settings, engine: Engine, enqueue_run, identities: Identities):
        self.operations = Operations(engine, enqueue_run)
        self.stats = Stats(engine)
        self.tokens = Tokens(settings, identities)
        self.computed_files = ComputedFiles(settings, engine)
        self.download = Download(settings, engine)
        self.openapi_json = OpenApiDocument(openapi.describe)


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    """The stats application; refuses to build on a schema of another major version."""
    from stats_service.tasks import enqueue_run
    db = migrations.bind_service(models.database, settings.database_url("stats"), models.SCHEMA, check_schema)
    engine = Engine(settings)
    asking = IngestIdentityClient(settings)
    identities = Identities(settings, engine.metadata, asking.user_for_token)
    root = Root(settings, engine, lambda run_id: enqueue_run(settings, run_id), identities)
    # The dashboard's page (served by the ingest service) calls this service from the browser.
    origins = settings.getlist("stats", "cors_origins") or [
        settings.get("dashboard", "ingest_url", "").strip() or settings.service_url("ingest")]
    # Responses streamed from the archive must not be buffered whole.
    return make_application(root, db=db, extra={"/": {"tools.labvault_cors.on": True,
                                                        "tools.labvault_cors.origins": origins},
                                                  "/stats": {"response.stream": True},
                                                  "/download": {"response.stream": True}})
