"""The metadata service's OpenAPI 3 description, served at ``GET /openapi.json``."""
from __future__ import annotations

from common import openapi as oa
from metadata_service.objects import TABLES

PAGING = [oa.query("page_number", "page, from 1", {"type": "integer", "minimum": 1}),
          oa.query("items_per_page", "rows per page", {"type": "integer", "minimum": 1})]


def _objects(table: str) -> dict:
    rows = oa.json_response("the rows", oa.ANY_LIST)
    return {
        "get": oa.operation(f"{table}: rows matching field=value filters", rows, parameters=PAGING),
        "put": oa.operation(f"{table}: insert rows", body=oa.json_body("a row or a list of rows")),
        "post": oa.operation(f"{table}: update the rows matching the filters", body=oa.json_body("new values")),
        "delete": oa.operation(f"{table}: delete the rows matching the filters (at least one)"),
    }


def describe() -> dict:
    paths = oa.common_paths()
    ingest = oa.operation("a whole metadata document in one transaction",
                          body=oa.json_body("the metadata list with Transactions._id and Files _id"))
    paths.update({
        "/getid": {"get": oa.operation("reserve consecutive ids", oa.json_response("the range", {
            "type": "object", "required": ["startIndex", "endIndex"]}), parameters=[
            oa.query("range", "how many", {"type": "integer", "minimum": 1}, required=True),
            oa.query("mode", "upload_job, file, ...", required=True)])},
        "/ingest": {"put": ingest, "post": ingest},
    })
    for table in sorted(TABLES):
        paths[f"/{table}"] = _objects(table)
    return oa.document("labvault metadata", "Users, projects, instruments, transactions, files, key/values "
                                            "(internal: needs the service token).", paths)
