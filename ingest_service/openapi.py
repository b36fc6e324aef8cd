"""The ingest service's OpenAPI 3 description, served at ``GET /openapi.json``."""
from __future__ import annotations

from common import openapi as oa

STATE = {
    "type": "object",
    "required": ["job_id", "state", "task", "task_percent", "complete", "created", "updated", "exception"],
    "properties": {
        "job_id": {"type": "integer"},
        "state": {"type": "string", "enum": ["OK", "FAILED"]},
        "task": {"type": "string"},
        "task_percent": {"type": "string", "description": "a decimal number as a string, 0 to 100"},
        "complete": {"type": "boolean"},
        "created": {"type": "string"},
        "updated": {"type": "string"},
        "exception": {"type": "string", "description": "'<code>: <message>' when FAILED, else empty"},
    },
}
STATE_REF = {"$ref": "#/components/schemas/State"}
LISTED_JOB = {"allOf": [STATE_REF, {"type": "object", "properties": {
    "kind": {"type": "string"}, "owner": {"type": "integer", "nullable": True},
    "submitter": {}, "project": {}}}]}
JOB_ID = oa.path("job_id", "the job id (also the metadata transaction id)", {"type": "integer"})
TAR = {"required": True, "description": "the bundle: an uncompressed tar",
       "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def describe() -> dict:
    paths = oa.common_paths()
    upload = oa.operation(
        "upload a bundle; answers the new job's state (with an idempotency key already bound to the "
        "same bundle: the bound job's state, and no new job)", oa.json_response("the job", STATE_REF), body=TAR,
        parameters=[oa.header("Idempotency-Key", "1 to 200 visible ASCII characters naming this upload, per "
                              "uploader: the same bundle again answers the job it made; another bundle is 409 "
                              "idempotency_key_reused; kept [ingest] idempotency_hours"),
                    oa.header("Labvault-Dedupe", "'digest': the bundle's SHA-256 is its idempotency key "
                              "(the same bytes again answer the job they made)")],
        extra={"409": oa.json_response("idempotency_key_reused: the key was bound to another bundle",
                                       {"$ref": "#/components/schemas/Error"})})
    paths.update({
        "/ingest": {"post": upload},
        "/upload": {"post": {**upload, "summary": "alias of POST /ingest (Pacifica clients)"}},
        "/move": {"post": oa.operation("ingest server-local files named by a metadata document",
                                       oa.json_response("the job", STATE_REF), body=oa.json_body("the metadata list"))},
        "/get_state": {"get": oa.operation("a job's state", oa.json_response("the state", STATE_REF), parameters=[
            oa.query("job_id", "the job", {"type": "integer"}, required=True)])},
        "/get_state/{job_id}": {"get": oa.operation("a job's state", oa.json_response("the state", STATE_REF),
                                                    parameters=[JOB_ID])},
        "/jobs": {"get": oa.operation("jobs the requester may see, newest first", oa.json_response("a page", {
            "type": "object", "required": ["total", "limit", "offset", "jobs"],
            "properties": {"total": {"type": "integer"}, "limit": {"type": "integer"},
                           "offset": {"type": "integer"}, "jobs": {"type": "array", "items": LISTED_JOB}}}),
            parameters=[oa.query("state", "OK, FAILED, running or done",
                                 {"type": "string", "enum": ["OK", "FAILED", "running", "done"]}),
                        oa.query("submitter", "jobs owned by this user or whose transaction names them",
                                 {"type": "integer"}),
                        oa.query("project", "jobs whose transaction names this project"),
                        oa.query("limit", "page size, 1 to 500", {"type": "integer", "minimum": 1, "maximum": 500}),
                        oa.query("offset", "jobs to skip", {"type": "integer", "minimum": 0})])},
        "/jobs/{job_id}": {"get": oa.operation("one job: state, submitter, project and its files (with hashes)",
                                               oa.json_response("the job", {"allOf": [LISTED_JOB, {
                                                   "type": "object", "properties": {"files": oa.ANY_LIST}}]}),
                                               parameters=[JOB_ID])},
        "/identity/tokens/{digest}": {"get": oa.operation(
            "internal: whose API token has this SHA-256", oa.json_response("the user", {
                "type": "object", "properties": {"user": {"type": "integer"}}}),
            parameters=[oa.path("digest", "SHA-256 hex of the token")])},
        "/dashboard/": {"get": oa.operation("the dashboard (HTML)", oa.binary("the page", "text/html"))},
        "/dashboard/{file}": {"get": oa.operation("the dashboard's static files",
                                                  oa.binary("the file", "text/plain"),
                                                  parameters=[oa.path("file", "index.html, app.js, style.css, api.html")])},
        "/dashboard/config.json": {"get": oa.operation("where the dashboard finds the services", oa.json_response(
            "public URLs and the auth mode", {"type": "object", "required": ["ingest", "stats", "auth_mode"]}))},
        "/dashboard/api/fixity": {"get": oa.operation("the archive's fixity summary (404 until it keeps one)")},
        "/dashboard/api/openapi/{service}": {"get": oa.operation(
            "a service's OpenAPI description, for the dashboard's rendering",
            parameters=[oa.path("service", "a service name")])},
    })
    return oa.document("labvault ingest", "Uploads (Pacifica ingest contract), jobs, the dashboard.", paths,
                       schemas={"State": STATE})
