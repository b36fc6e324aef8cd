"""OpenAPI 3 descriptions: the one error schema every service references, and small builders.

Each service describes its routes in its own package (``<service>/openapi.py``, a function
``describe()`` returning the document) and serves it at ``GET /openapi.json``. Every
operation answers errors in the one shape ``{"status", "code", "message"}``
(``common.errors.LabvaultError.to_dict``), so every operation's ``default`` response is
the shared ``Error`` and only its successful answers are described per route.
"""
from __future__ import annotations

from typing import Any

VERSION = "3.0.3"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "code", "message"],
    "properties": {
        "status": {"type": "string", "description": "the HTTP status line, e.g. '412 Precondition Failed'"},
        "code": {"type": "string", "description": "a machine code, e.g. 'policy_denied'"},
        "message": {"type": "string", "description": "one line for people; never a traceback"},
    },
}

ERROR_REF = {"$ref": "#/components/responses/Error"}
ANY_OBJECT = {"type": "object"}
ANY_LIST = {"type": "array"}


def document(title: str, description: str, paths: dict[str, dict], version: str = "0.1.0",
             schemas: dict[str, Any] | None = None) -> dict:
    """A whole OpenAPI 3 document with the shared ``Error`` schema and response."""
    return {
        "openapi": VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, **(schemas or {})},
            "responses": {"Error": {"description": "any error, in the one labvault shape",
                                    "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    }


def json_response(description: str, schema: dict | None = None) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": ANY_OBJECT if schema is None else schema}}}


def operation(summary: str, ok: dict | None = None, *, status: str = "200", parameters: list | None = None,
              body: dict | None = None, extra: dict | None = None) -> dict:
    """One operation: ``ok`` is its success response (JSON object by default); errors are ``Error``."""
    responses = {status: ok or json_response(summary)}
    responses.update(extra or {})
    responses["default"] = ERROR_REF
    described: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        described["parameters"] = parameters
    if body is not None:
        described["requestBody"] = body
    return described


def binary(description: str, content_type: str = "application/octet-stream") -> dict:
    return {"description": description, "content": {content_type: {"schema": {"type": "string",
                                                                               "format": "binary"}}}}


def json_body(description: str = "a JSON document", schema: dict | None = None, required: bool = True) -> dict:
    return {"required": required, "description": description,
            "content": {"application/json": {"schema": schema or {}}}}


def query(name: str, description: str, schema: dict | None = None, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema or {"type": "string"}}


def path(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string"}}


def header(name: str, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "header", "required": required, "description": description,
            "schema": {"type": "string"}}


HEALTH = {"get": operation("health: '<Service> Up and Running'",
                           json_response("the service answers", {"type": "object", "required": ["message"],
                                                                 "properties": {"message": {"type": "string"}}}))}
OPENAPI = {"get": operation("this description (OpenAPI 3)", json_response("the OpenAPI document"))}


def common_paths() -> dict[str, dict]:
    """``/`` and ``/openapi.json``, which every service has."""
    return {"/": HEALTH, "/openapi.json": OPENAPI}
