"""The stats service's OpenAPI 3 description, served at ``GET /openapi.json``."""
from __future__ import annotations

from common import openapi as oa

PROJECT = oa.path("project", "a project id")
FILE_ID = oa.path("file_id", "an archived file's id", {"type": "integer"})
FIGURE = oa.path("name", "a figure's name, ending .png")
API_KEY = oa.header("API-KEY", "a download token (POST /tokens)")
PNG = oa.binary("the figure", "image/png")
ANY = oa.binary("the bytes", "application/octet-stream")
TAR = oa.binary("a tar of the files under their original paths", "application/x-tar")


def describe() -> dict:
    paths = oa.common_paths()
    paths.update({
        "/operations": {"get": oa.operation("every operation, with its input schema",
                                            oa.json_response("operations", oa.ANY_LIST))},
        "/operations/{name}": {
            "get": oa.operation("one operation", parameters=[oa.path("name", "operation name")]),
            "post": oa.operation("run an operation (200 cached or done, 202 queued)", parameters=[
                oa.path("name", "operation name")], body=oa.json_body('{"inputs": {...}, "force": false}'),
                extra={"202": oa.json_response("queued")})},
        "/operations/runs/{run_id}": {"get": oa.operation("a run", parameters=[oa.path("run_id", "the run")])},
        "/stats/{project}": {"get": oa.operation("a project's statistics", parameters=[PROJECT])},
        "/stats/{project}/figures": {"get": oa.operation("a project's figures", oa.json_response(
            "names, sizes, digests", {"type": "array", "items": {"type": "object"}}), parameters=[PROJECT])},
        "/stats/{project}/figures/{name}": {"get": oa.operation("one figure", PNG, parameters=[PROJECT, FIGURE],
                                                                extra={"304": {"description": "not modified"}})},
        "/stats/files/{file_id}": {"get": oa.operation("a file's statistics", parameters=[FILE_ID])},
        "/stats/files/{file_id}/figures": {"get": oa.operation(
            "a file's figures", oa.json_response("the figures", {"type": "array", "items": {"type": "object"}}),
            parameters=[FILE_ID])},
        "/stats/files/{file_id}/figures/{name}": {"get": oa.operation(
            "one figure of a file", PNG, parameters=[FILE_ID, FIGURE], extra={"304": {"description": "not modified"}})},
        "/tokens": {"post": oa.operation("a new download token (shown once)", status="201",
                                         body=oa.json_body('{"email": ..., "is_activated": true}'))},
        "/tokens/terms": {"get": oa.operation("the terms a token accepts")},
        "/tokens/{token}": {
            "get": oa.operation("a token's state", parameters=[oa.path("token", "the token")]),
            "put": oa.operation("accept the terms", parameters=[oa.path("token", "the token")],
                                body=oa.json_body('{"is_activated": true}'))},
        "/computed_files": {"get": oa.operation("computed files (no URLs)", oa.json_response("the files", oa.ANY_LIST),
                                                parameters=[
            oa.query("project", "only this project's"),
            oa.query("limit", "1 to 1000", {"type": "integer", "minimum": 1, "maximum": 1000}),
            oa.query("offset", "rows to skip", {"type": "integer", "minimum": 0})])},
        "/computed_files/{id}": {"get": oa.operation("one computed file; with an API-KEY, a download_url", parameters=[
            oa.path("id", "the computed file", {"type": "integer"}), API_KEY])},
        "/download/computed/{id}": {"get": oa.operation("a computed file's bytes (a signed URL)", ANY, parameters=[
            oa.path("id", "the computed file", {"type": "integer"}), oa.query("expires", "from the signed URL"),
            oa.query("signature", "from the signed URL")], extra={"304": {"description": "not modified"}})},
        "/download/transaction/{id}": {"get": oa.operation("a transaction's files as a tar", TAR, parameters=[
            oa.path("id", "the transaction", {"type": "integer"}), API_KEY])},
        "/download/project/{id}": {"get": oa.operation("a project's files as a tar", TAR, parameters=[
            oa.path("id", "the project"), API_KEY])},
    })
    return oa.document("labvault stats", "Operations, statistics, figures, computed files, downloads.", paths)
