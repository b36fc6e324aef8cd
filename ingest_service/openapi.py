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

UPLOAD_STATUS = {
    "type": "object",
    "required": ["upload_id", "location", "length", "offset", "expires", "job_id"],
    "properties": {
        "upload_id": {"type": "string"}, "location": {"type": "string"},
        "length": {"type": "integer"}, "offset": {"type": "integer", "description": "bytes the server holds"},
        "expires": {"type": "string"}, "job_id": {"type": "integer", "nullable": True},
    },
}
UPLOAD_ID = oa.path("upload_id", "the upload (as its Location names it)")
TUS_RESUMABLE = oa.header("Tus-Resumable", "1.0.0 (tus); another or none is 412 with Tus-Version", required=True)


def _no_content(description: str, headers: dict[str, str]) -> dict:
    return {"description": description,
            "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()}}


def resumable_paths() -> dict:
    """tus 1.0 (core, creation, termination, expiration, checksum) at /uploads/."""
    return {
        "/uploads/": {
            "options": oa.operation("tus discovery: the version, extensions, largest upload, checksum algorithms",
                                    _no_content("what the server speaks", {
                                        "Tus-Version": "1.0.0", "Tus-Extension": "creation,termination,expiration,checksum",
                                        "Tus-Max-Size": "[ingest] max_bundle_bytes",
                                        "Tus-Checksum-Algorithm": "sha1,sha256,sha512,md5"}), status="204"),
            "post": oa.operation(
                "create a resumable upload (tus creation); same identity and size limit as POST /ingest",
                {**oa.json_response("the upload", {"$ref": "#/components/schemas/UploadStatus"}),
                 "headers": {"Location": {"description": "the upload's URL", "schema": {"type": "string"}},
                             "Upload-Expires": {"description": "RFC 7231 date", "schema": {"type": "string"}}}},
                status="201", parameters=[
                    TUS_RESUMABLE,
                    oa.header("Upload-Length", "the bundle's size in bytes (413 over the limit)", required=True),
                    oa.header("Upload-Metadata", "comma-separated 'key base64value' pairs, e.g. filename")]),
        },
        "/uploads/{upload_id}": {
            "head": oa.operation("where the upload stands (tus core): Upload-Offset, Upload-Length, Upload-Expires; "
                                 "Labvault-Job-Id once finished", _no_content("the offset", {
                                     "Upload-Offset": "bytes the server holds", "Upload-Length": "the whole size"}),
                                 parameters=[UPLOAD_ID, TUS_RESUMABLE]),
            "patch": oa.operation(
                "append bytes at Upload-Offset (409 elsewhere, 423 while another PATCH writes, 460 on a "
                "checksum mismatch); the last byte makes the job, named by Labvault-Job-Id",
                _no_content("the bytes are in", {"Upload-Offset": "the new offset",
                                                 "Upload-Expires": "RFC 7231 date (unfinished uploads)",
                                                 "Labvault-Job-Id": "the job, once the last byte is in"}),
                status="204", parameters=[
                    UPLOAD_ID, TUS_RESUMABLE, oa.header("Upload-Offset", "where these bytes go", required=True),
                    oa.header("Upload-Checksum", "'<sha1|sha256|sha512|md5> <base64 digest>' of this chunk")],
                body={"required": True, "description": "the next bytes of the bundle", "content": {
                    "application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}}}),
            "delete": oa.operation("terminate the upload and remove its bytes (tus termination)",
                                   _no_content("removed", {}), status="204", parameters=[UPLOAD_ID, TUS_RESUMABLE]),
            "get": oa.operation("the job's state once the last byte is in (as GET /get_state); before, the upload's",
                                oa.json_response("the state", {"anyOf": [STATE_REF, {
                                    "$ref": "#/components/schemas/UploadStatus"}]}), parameters=[UPLOAD_ID]),
        },
    }


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
    paths.update(resumable_paths())
    return oa.document("labvault ingest", "Uploads (Pacifica ingest contract), jobs, the dashboard.", paths,
                       schemas={"State": STATE, "UploadStatus": UPLOAD_STATUS})
