"""The policy service's CherryPy application: ``GET /``, ``POST /ingest``, ``POST /uploader``."""
from __future__ import annotations

import cherrypy

from common.clients import MetadataClient
from common.settings import Settings
from policy_service import openapi
from common.web import HealthMixin, OpenApiDocument, int_param, json_body, make_application, read_json
from policy_service.policy import IngestPolicy
from policy_service.uploader import UploaderQueries


# Set by the ingest service, which authenticated the uploader; internal callers only
# (see [auth] service_token).
UPLOADER_HEADER = "X-Labvault-Uploader"


class IngestResource:
    """``POST /ingest``: 200 when the metadata document may be uploaded, else 412 ``policy_denied``."""

    exposed = True

    def __init__(self, policy: IngestPolicy):
        self.policy = policy

    def POST(self, **_params):  # noqa: N802 - CherryPy MethodDispatcher verb
        uploader = cherrypy.serving.request.headers.get(UPLOADER_HEADER)
        self.policy.check(read_json(), None if uploader is None else int_param("uploader", uploader))
        return json_body({"status": "success"})


class UploaderResource:
    """``POST /uploader``: the Pacifica upload-client query, answered as a JSON list."""

    exposed = True

    def __init__(self, queries: UploaderQueries):
        self.queries = queries

    def POST(self, **_params):  # noqa: N802 - CherryPy MethodDispatcher verb
        return json_body(self.queries.answer(read_json()))


class PolicyRoot(HealthMixin):
    """``GET /``: health."""

    exposed = True
    service_title = "Policy"

    def __init__(self, metadata: MetadataClient):
        self.openapi_json = OpenApiDocument(openapi.describe)
        self.ingest = IngestResource(IngestPolicy(metadata))
        self.uploader = UploaderResource(UploaderQueries(metadata))


def build_app(settings: Settings, check_schema: bool = True) -> cherrypy.Application:
    """The policy application; it owns no database, so ``check_schema`` is accepted and ignored."""
    return make_application(PolicyRoot(MetadataClient(settings)), service_token=settings.service_token)
