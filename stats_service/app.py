"""The stats service's HTTP application: operations and their runs, project and file statistics.

``GET /operations``; ``POST /operations/<name>`` ``{"inputs": {...}}`` (200 cached, 202 queued,
422 for inputs that break the schema); ``GET /operations/runs/<id>``; ``GET /stats/<project>``,
``/stats/<project>/figures``, ``/stats/<project>/figures/<name>.png``, and the same per file
under ``/stats/files/<file_id>``.
"""
from __future__ import annotations

import json

import cherrypy

from common import migrations
from common.errors import BadRequest, NotFound
from common.settings import Settings
from common.web import HealthMixin, int_param, json_body, make_application, read_json
from stats_service import models, projects
from stats_service.models import FileStats, ProjectStats, Run
from stats_service.runs import Engine, run_document

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


class Root(HealthMixin):
    exposed = True
    service_title = "Stats"

    def __init__(self, engine: Engine, enqueue_run):
        self.operations = Operations(engine, enqueue_run)
        self.stats = Stats(engine)


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    """The stats application; refuses to build on a schema of another major version."""
    from stats_service.tasks import enqueue_run
    db = migrations.bind_service(models.database, settings.database_url("stats"), models.SCHEMA, check_schema)
    engine = Engine(settings)
    # A response streamed from the archive must not be buffered whole.
    return make_application(Root(engine, lambda run_id: enqueue_run(settings, run_id)), db=db,
                            extra={"/stats": {"response.stream": True}})
