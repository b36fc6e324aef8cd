"""The policy service's OpenAPI 3 description, served at ``GET /openapi.json``."""
from __future__ import annotations

from common import openapi as oa


def describe() -> dict:
    paths = oa.common_paths()
    paths.update({
        "/ingest": {"post": oa.operation("may this submitter put this bundle into this project with this "
                                         "instrument (200 success, 412 policy_denied)",
                                         body=oa.json_body("the bundle's metadata list"))},
        "/uploader": {"post": oa.operation("Pacifica uploader queries", oa.json_response("rows", oa.ANY_LIST),
                                           body=oa.json_body('{"user", "from", "columns", "where"}'))},
    })
    return oa.document("labvault policy", "Decisions: who may upload what (internal: needs the service token).",
                       paths)
