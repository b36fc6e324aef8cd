"""How errors become answers (common.web): database and disk failures get their own codes,
503s say when to come back, and nothing a driver or the OS says reaches the client."""
from __future__ import annotations

import errno
import json
import sqlite3

import peewee
import pytest
from playhouse.pool import MaxConnectionsExceeded

from common.errors import (
    BadRequest,
    DatabaseUnavailable,
    InsufficientStorage,
    LabvaultError,
    ServiceUnavailable,
)
from common.web import JsonErrors, as_labvault_error, error_headers, outermost

SECRET = "/srv/labvault/var/db/metadata.sqlite3"


def database_errors():
    errors = [peewee.OperationalError("database is locked"),
              peewee.InterfaceError("connection already closed"),
              sqlite3.OperationalError(f"unable to open database file {SECRET}"),
              MaxConnectionsExceeded("Exceeded maximum connections.")]
    try:
        import psycopg2
        errors.append(psycopg2.OperationalError('connection to server at "10.0.0.5", port 5432 failed'))
    except ImportError:
        pass
    return errors


@pytest.mark.parametrize("exc", database_errors(), ids=lambda exc: type(exc).__name__)
def test_database_failures_are_503_database_unavailable(exc):
    error = as_labvault_error(exc)
    assert isinstance(error, DatabaseUnavailable)
    assert (error.status, error.code) == (503, "database_unavailable")
    assert SECRET not in error.message and "10.0.0.5" not in error.message
    assert error_headers(error) == [("Retry-After", str(error.retry_after))]


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_507_without_the_path(number):
    error = as_labvault_error(OSError(number, "No space left on device", SECRET))
    assert isinstance(error, InsufficientStorage)
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert SECRET not in error.message


def test_anything_else_is_a_plain_500():
    error = as_labvault_error(RuntimeError(f"boom in {SECRET}"))
    assert (error.status, error.code) == (500, "internal_error")
    assert SECRET not in error.message and error_headers(error) == []


def test_our_errors_pass_through_and_only_unavailable_ones_say_retry():
    refused = BadRequest("no", code="invalid_json")
    assert as_labvault_error(refused) is refused and error_headers(refused) == []
    down = ServiceUnavailable("down", code="metadata_unavailable")
    assert error_headers(down) == [("Retry-After", "5")]


def call(application, path="/get_state/1"):
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(headers)
    body = b"".join(application({"REQUEST_METHOD": "GET", "PATH_INFO": path}, start_response))
    return seen["status"], seen["headers"], body


def test_json_errors_answers_for_a_plain_wsgi_layer():
    def broken(environ, start_response):
        raise peewee.OperationalError(f"could not connect: {SECRET}")
    status, headers, body = call(JsonErrors(broken))
    assert status == "503 Service Unavailable"
    assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "2"
    assert int(headers["Content-Length"]) == len(body)
    answer = json.loads(body)
    assert answer["code"] == "database_unavailable" and SECRET not in body.decode()


def test_json_errors_leaves_good_answers_and_started_responses_alone():
    def fine(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    assert call(JsonErrors(fine)) == ("200 OK", {"Content-Type": "text/plain"}, b"ok")

    def fails_late(environ, start_response):
        start_response("200 OK", [])
        raise LabvaultError("too late to change the status")
    with pytest.raises(LabvaultError):
        call(JsonErrors(fails_late))


def test_outermost_guards_everything_and_wraps_only_plain_wsgi_layers_in_json_errors():
    import cherrypy

    from common.web import RequestGuard
    application = cherrypy.Application(object())
    guarded = outermost(application)
    assert isinstance(guarded, RequestGuard) and guarded.application is application
    assert outermost(guarded) is guarded
    plain = outermost(lambda environ, start_response: [])
    assert isinstance(plain, RequestGuard) and isinstance(plain.application, JsonErrors)
