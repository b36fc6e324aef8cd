"""The metadata service's CherryPy application: getid, ingest and object REST."""
from __future__ import annotations

import logging

import cherrypy

from common import migrations
from common.settings import Settings
from metadata_service import openapi
from common.web import HealthMixin, OpenApiDocument, json_body, make_application, read_json
from metadata_service import ids, ingest, objects
from metadata_service.models import SCHEMA, database

logger = logging.getLogger(__name__)


class GetId:
    """``GET /getid?range=N&mode=M``: reserve N consecutive ids of mode M."""

    exposed = True

    def GET(self, **params):  # noqa: N802 - CherryPy MethodDispatcher verb
        return json_body(ids.getid(params.get("mode"), params.get("range")))


class Ingest:
    """``PUT /ingest`` (or POST): a whole metadata document in one transaction."""

    exposed = True

    def PUT(self, **_params):  # noqa: N802
        return json_body(ingest.ingest_document(read_json()))

    POST = PUT


class Objects:
    """``/<table>``: Pacifica-style query, insert, update and delete of one model's rows."""

    exposed = True

    def __init__(self, table: str):
        self.table = table

    def GET(self, **params):  # noqa: N802
        return json_body(objects.query(self.table, params))

    def PUT(self, **_params):  # noqa: N802
        return json_body({"status": "success", "count": objects.insert(self.table, read_json())})

    def POST(self, **params):  # noqa: N802
        return json_body({"status": "success", "count": objects.update(self.table, params, read_json())})

    def DELETE(self, **params):  # noqa: N802
        return json_body({"status": "success", "count": objects.delete(self.table, params)})


class Root(HealthMixin):
    exposed = True
    service_title = "Metadata"

    def __init__(self):
        self.openapi_json = OpenApiDocument(openapi.describe)
        self.getid = GetId()
        self.ingest = Ingest()
        for table in objects.TABLES:
            setattr(self, table, Objects(table))


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    """The metadata WSGI application; refuses (SchemaMismatch) a database not synced to SCHEMA."""
    db = migrations.bind_service(database, settings.database_url("metadata"), SCHEMA, check_schema)
    return make_application(Root(), db=db, service_token=settings.service_token)
