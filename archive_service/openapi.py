"""The archive service's OpenAPI 3 description, served at ``GET /openapi.json``."""
from __future__ import annotations

from common import openapi as oa

FILE_ID = oa.path("file_id", "the file's id", {"type": "integer"})
BYTES = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                               "format": "binary"}}}}


BATCH_ENTRY = {"type": "object", "required": ["id", "status"], "properties": {
    "id": {"type": "integer", "nullable": True, "description": "the member's file id (null: its header was unreadable)"},
    "status": {"type": "integer", "description": "201 stored, 200 the same bytes were there, 4xx not stored"},
    "total_bytes": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"}}}
BATCH_BODY = {"required": True, "description": (
    "members one after the other, each a header line (a JSON object "
    '{"id": N, "size": N, "hashtype": "sha1", "hashsum": "hex", "mtime": epoch} and a newline, '
    "at most 4096 bytes) followed by exactly size bytes"),
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def describe() -> dict:
    paths = oa.common_paths()
    paths["/{file_id}"] = {
        "get": oa.operation("the file's bytes (Range supported)", oa.binary("the bytes"), parameters=[FILE_ID],
                            extra={"206": oa.binary("a range of the bytes")}),
        "head": oa.operation("size, mtime and stored digest", {"description": "headers only"},
                             parameters=[FILE_ID]),
        "put": oa.operation("store the bytes (write-once; verified against hashtype/hashsum)", status="201",
                            parameters=[FILE_ID, oa.query("hashtype", "e.g. sha1"),
                                        oa.query("hashsum", "expected hex digest")],
                            body=BYTES, extra={"200": oa.json_response("the same bytes were there")}),
        "patch": oa.operation("move a local file in", parameters=[FILE_ID], body=oa.json_body('{"path": ...}')),
        "delete": oa.operation("remove the file", parameters=[FILE_ID]),
        "post": oa.operation("stage the file (a no-op here)", parameters=[FILE_ID]),
    }
    paths["/batch"] = {"post": oa.operation(
        "store many files in one request, each verified and write-once as by PUT; answered once every "
        "stored file is durable. The first failure sets the status (its error, with the list)",
        oa.json_response("every member stored", {"type": "object", "required": ["files"], "properties": {
            "message": {"type": "string"}, "files": {"type": "array", "items": BATCH_ENTRY}}}),
        body=BATCH_BODY)}
    paths["/fixity"] = {"get": oa.operation(
        "files whose last fixity check was not ok (paged)",
        oa.json_response("the files with their last check, and the paging", {"type": "object"}),
        parameters=[oa.query("result", "mismatch or unreadable (default: both)"),
                    oa.query("page_number", "page, from 1", {"type": "integer", "minimum": 1}),
                    oa.query("items_per_page", "rows a page", {"type": "integer", "minimum": 1})])}
    paths["/fixity/summary"] = {"get": oa.operation(
        "counts of files by their last fixity result", oa.json_response("counts", {"type": "object"}))}
    paths["/presign/{file_id}"] = {"get": oa.operation(
        "a URL serving the file without labvault (S3 presigned; 404 presign_unsupported on POSIX)",
        oa.json_response("the URL and its expiry (epoch seconds)", {
            "type": "object", "required": ["url", "expires"],
            "properties": {"url": {"type": "string"}, "expires": {"type": "integer"}}}),
        parameters=[FILE_ID, oa.query("expires", "seconds the URL stays valid, 1 to 604800",
                                      {"type": "integer", "minimum": 1, "maximum": 604800}),
                    oa.query("filename", "the name a browser saves the file under")])}
    return oa.document("labvault archive", "File bytes by id (internal: needs the service token).", paths)
