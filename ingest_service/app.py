"""The ingest service's HTTP application (Pacifica ingest wire contract)."""
from __future__ import annotations

import cherrypy

from common import migrations
from common.celery_app import enqueue, make_celery
from common.clients import MetadataClient
from common.db import bind
from common.errors import BadRequest, PayloadTooLarge
from common.settings import Settings
from common.web import HealthMixin, drain, int_param, json_body, make_application, read_json
from ingest_service import models
from ingest_service.services import IngestService, parse_length
from ingest_service.staging import Staging


class Upload:
    """``POST /ingest`` and ``POST /upload``: the raw tar is the body."""

    exposed = True

    def __init__(self, service: IngestService):
        self.service = service

    # The bundle is streamed to the staging volume by the handler; CherryPy must not
    # read it first (handler config applies before the body is processed).
    @cherrypy.config(**{"request.process_request_body": False})
    def POST(self, **_params):  # noqa: N802
        request = cherrypy.serving.request
        try:
            state = self.service.upload(request.rfile.read, parse_length(request.headers.get("Content-Length")))
        except PayloadTooLarge:
            raise  # the HTTP server closes the connection after a 413: nothing to drain
        except BaseException:
            drain(request.rfile)
            raise
        return json_body(state)


class Move:
    exposed = True

    def __init__(self, service: IngestService):
        self.service = service

    def POST(self, **_params):  # noqa: N802
        return json_body(self.service.move(read_json()))


@cherrypy.popargs("job_id")
class GetState:
    exposed = True

    def __init__(self, service: IngestService):
        self.service = service

    def GET(self, job_id=None, **_params):  # noqa: N802
        if job_id is None:
            raise BadRequest("job_id is required", code="invalid_job_id")
        return json_body(self.service.state(int_param("job_id", job_id)))


class Root(HealthMixin):
    exposed = True
    service_title = "Ingest"

    def __init__(self, service: IngestService):
        self.ingest = self.upload = Upload(service)
        self.move = Move(service)
        self.get_state = GetState(service)


def build_app(settings: Settings, check_schema: bool = True, celery_app=None) -> cherrypy.Application:
    db = bind(models.database, settings.database_url("ingest"))
    if check_schema:
        migrations.require(db, models.SCHEMA)
    celery_app = celery_app or make_celery(settings)
    service = IngestService(settings, MetadataClient(settings),
                            Staging(settings.path("ingest", "staging_dir")),
                            lambda job_id: enqueue(celery_app, "ingest.process_job", job_id))
    return make_application(Root(service), db=db)
