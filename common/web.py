"""CherryPy plumbing shared by the five services: JSON in and out, one error shape,
a database connection per request, and serving (built-in server or uWSGI).

Handlers stay small: decode with ``read_json``, call the domain, return ``json_body``.
Errors raised anywhere in a request end up in ``handle_error``, the one place that
turns them into ``{"status", "code", "message"}``; tracebacks go to the log only.
"""
from __future__ import annotations

import atexit
import datetime
import decimal
import json
import logging
import re
import sqlite3
import sys
import uuid

import cherrypy
import peewee
from cheroot import server as cheroot_server
from playhouse.pool import MaxConnectionsExceeded

from common.auth import SERVICE_TOKEN_HEADER, same_secret
from common.db import release
from common.errors import (
    BadRequest,
    DatabaseUnavailable,
    InsufficientStorage,
    LabvaultError,
    PayloadTooLarge,
    Unauthorized,
    code_for_status,
    is_disk_full,
    status_line,
)
from common.logs import setup_logging
from common.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_JSON_LIMIT = 64 * 1024 * 1024
# The largest integer any database column of the suite holds (a signed 64-bit BIGINT);
# past it a parameter is a client error, not the database's.
MAX_INT = 2 ** 63 - 1


def _encode_default(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value) -> str:
    return json.dumps(value, default=_encode_default, ensure_ascii=False)


def json_body(value, status: int = 200) -> bytes:
    """Set the JSON content type (and status) and return the encoded body."""
    response = cherrypy.serving.response
    response.status = status
    response.headers["Content-Type"] = "application/json"
    return dumps(value).encode("utf-8")


def read_json(limit: int = DEFAULT_JSON_LIMIT):
    """The request body decoded as JSON; ``invalid_json`` (400) or ``payload_too_large`` (413)."""
    request = cherrypy.serving.request
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"JSON body larger than {limit} bytes")
    raw = request.body.read(limit + 1) if request.body else b""
    if len(raw) > limit:
        raise PayloadTooLarge(f"JSON body larger than {limit} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply", code="invalid_json") from None


def drain(rfile) -> None:
    """Consume what is left of a request body in chunks.

    Left to the HTTP server, an unread body is read in one piece, i.e. into memory.
    """
    try:
        while rfile.read(1024 * 1024):
            pass
    except Exception:  # noqa: BLE001 - the client went away; nothing left to protect
        logger.debug("draining a request body failed", exc_info=True)


def int_param(name: str, value) -> int:
    """An integer request parameter that a database column can hold, or 400 ``invalid_<name>``."""
    text = str(value).strip()
    try:
        # Bounded before int(): Python refuses to convert very long digit strings (ValueError too).
        number = int(text) if len(text) <= 20 else None
    except (TypeError, ValueError):
        number = None
    if number is None or not -MAX_INT - 1 <= number <= MAX_INT:
        raise BadRequest(f"{name} must be an integer from {-MAX_INT - 1} to {MAX_INT}, not {text[:40]!r}",
                         code=f"invalid_{name}")
    return number


def _database_errors() -> tuple[type[BaseException], ...]:
    """What a database that is locked, down or out of connections raises (peewee wraps most)."""
    errors: tuple[type[BaseException], ...] = (peewee.OperationalError, peewee.InterfaceError,
                                               sqlite3.OperationalError, MaxConnectionsExceeded)
    try:
        import psycopg2
    except ImportError:
        return errors
    return errors + (psycopg2.OperationalError, psycopg2.InterfaceError)


DATABASE_ERRORS = _database_errors()


def _value_errors() -> tuple[type[BaseException], ...]:
    """What a database raises for a value it cannot hold (an integer out of range, a NUL in text)."""
    errors: tuple[type[BaseException], ...] = (peewee.DataError, OverflowError)
    try:
        import psycopg2
    except ImportError:
        return errors
    return errors + (psycopg2.DataError,)


VALUE_ERRORS = _value_errors()


def as_labvault_error(exc: BaseException, where: str = "") -> LabvaultError:
    """The error a client is told about ``exc``: ours as it is; a database that is locked or
    down is 503 ``database_unavailable``; a full disk 507 ``insufficient_storage``; anything
    else 500 ``internal_error``. The details (driver messages name hosts, files name paths)
    and any traceback go to the log, never into the answer.
    """
    if isinstance(exc, LabvaultError):
        if exc.status >= 500:
            logger.warning("%s: %s", where or "request", exc.as_exception_text())
        return exc
    if isinstance(exc, DATABASE_ERRORS):
        logger.warning("%s: database unavailable: %s: %s", where or "request", type(exc).__name__,
                       " ".join(str(exc).split())[:300])
        return DatabaseUnavailable("the service's database is busy or unreachable; try again shortly")
    if is_disk_full(exc):
        logger.error("%s: disk full: %s", where or "request", exc)
        return InsufficientStorage("the service's storage is full; try again later")
    if isinstance(exc, VALUE_ERRORS):
        # Our own values always fit: a number or text the database cannot hold came from the client.
        logger.info("%s: value refused by the database: %s", where or "request", " ".join(str(exc).split())[:300])
        return BadRequest("a value in the request is out of range or not storable", code="invalid_value")
    logger.error("unhandled error in %s", where or "request", exc_info=exc)
    return LabvaultError("internal error; the service log has the details")


def error_headers(error: LabvaultError) -> list[tuple[str, str]]:
    """Extra response headers for ``error``: ``Retry-After`` when retrying later may succeed,
    and any the error class names (``WWW-Authenticate`` on a 401)."""
    headers = list(error.headers.items())
    if error.retry_after is not None:
        headers.append(("Retry-After", str(int(error.retry_after))))
    return headers


def _error_response(error: LabvaultError) -> None:
    response = cherrypy.serving.response
    response.status = status_line(error.status)
    response.headers["Content-Type"] = "application/json"
    response.headers.pop("Content-Length", None)
    for name, value in error_headers(error):
        response.headers[name] = value
    response.body = dumps(error.to_dict()).encode("utf-8")


def handle_error() -> None:
    """``request.error_response``: any exception a handler let escape becomes JSON."""
    request = cherrypy.serving.request
    _error_response(as_labvault_error(sys.exc_info()[1], f"{request.method} {request.path_info}"))


def wsgi_json(start_response, status: int, body, headers=(), with_body: bool = True) -> list[bytes]:
    """Answer ``body`` as JSON from a plain WSGI layer (the JSON CherryPy handlers send)."""
    payload = dumps(body).encode("utf-8")
    start_response(status_line(status), [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(payload))), *headers])
    return [payload if with_body else b""]


class JsonErrors:
    """WSGI middleware: an exception escaping a plain WSGI layer (the ingest service's
    ``get_state`` fast path) still answers the JSON error shape, not the server's 500 page.

    CherryPy applications map their own errors (``handle_error``); this covers what sits
    in front of them. Only before the response has started; after that there is nothing
    left to fix.
    """

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        started = []

        def tracking_start_response(status, headers, exc_info=None):
            started.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.application(environ, tracking_start_response)
        except Exception as exc:  # noqa: BLE001 - every error must answer JSON
            if started:
                raise
            error = as_labvault_error(exc, f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}")
            return wsgi_json(start_response, error.status, error.to_dict(), error_headers(error))


def outermost(application):
    """What a server runs for ``application``: the ``RequestGuard`` in front of everything, and
    ``JsonErrors`` around plain WSGI layers (CherryPy applications map their own errors)."""
    if isinstance(application, RequestGuard):
        return application
    if not isinstance(application, cherrypy.Application):
        application = JsonErrors(application)
    return RequestGuard(application)


# A Content-Length is digits only (no sign, no space, no exponent); anything else is refused
# before a byte of the body is read. Past MAX_BODY (1 PiB) a declared body is absurd for every
# service (the ingest service's own limit, [ingest] max_bundle_bytes, is far lower).
_CONTENT_LENGTH = re.compile(r"[0-9]{1,16}")
MAX_BODY = 2 ** 50
# In a path or query: NUL and other control characters, raw or %-encoded.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]|%(?:[01][0-9a-fA-F]|7[fF])")


class RequestGuard:
    """WSGI middleware in front of every service: requests built to break things get a fast 4xx
    in the JSON error shape before any handler, database or body read sees them.

    A malformed, negative or absurd ``Content-Length``; a path or query with control
    characters (NUL above all: PostgreSQL cannot store it, file systems end names at it)
    or not UTF-8. The answer closes the connection, so no body is waited for or read.
    """

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        error = self.problem(environ)
        if error is None:
            return self.application(environ, start_response)
        return wsgi_json(start_response, error.status, error.to_dict(), [("Connection", "close")],
                         environ.get("REQUEST_METHOD") != "HEAD")

    @staticmethod
    def problem(environ) -> LabvaultError | None:
        length = environ.get("CONTENT_LENGTH", "")
        if length and not (length.isascii() and length.isdigit()):
            return BadRequest("Content-Length must be a whole number of bytes", code="invalid_content_length")
        if length and (not _CONTENT_LENGTH.fullmatch(length) or int(length) > MAX_BODY):
            return PayloadTooLarge(f"a body of {length[:40]} bytes is more than any labvault service takes")
        path, query = environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        if _CONTROL.search(path) or _CONTROL.search(query):
            return BadRequest("the path or query contains control characters", code="invalid_path")
        try:
            # WSGI hands the path over as latin-1 decoded bytes: they must be UTF-8.
            path.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return BadRequest("the path is not UTF-8", code="invalid_path")
        return None


class GuardedRequest(cheroot_server.HTTPRequest):
    """cheroot's request, with its own refusals (malformed request line, header or length) in
    the JSON error shape instead of plain text, and an application's ``Connection: close``
    honoured: cheroot would otherwise read a body nobody wants in one piece before closing."""

    def simple_response(self, status, msg=""):
        code = int(str(status).split()[0])
        if code < 400:
            return super().simple_response(status, msg)
        # Whatever follows on this connection (a body, the rest of a bad request) is garbage.
        self.close_connection = True
        error_code = "invalid_content_length" if "Content-Length" in str(msg) else code_for_status(code)
        body = dumps({"status": status_line(code), "code": error_code,
                      "message": str(msg or status_line(code))}).encode("utf-8")
        head = (f"{self.server.protocol} {status_line(code)}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
        try:
            self.conn.wfile.write(head + body)
        except OSError:
            pass  # the client is gone; nothing left to tell it

    def send_headers(self):
        if any(key.lower() == b"connection" and value.lower() == b"close" for key, value in self.outheaders):
            self.close_connection = True
        return super().send_headers()


class GuardedConnection(cheroot_server.HTTPConnection):
    RequestHandlerClass = GuardedRequest


def guard_server(server) -> None:
    """Make a cheroot server (CherryPy's, or a test's) answer its own errors as JSON."""
    server.ConnectionClass = GuardedConnection


def error_page(status, message, traceback, version) -> str:
    """``error_page.default``: CherryPy's own errors (404 route, 405, 413...) as JSON."""
    code = int(str(status).split()[0])
    # CherryPy's messages for routing errors name the path only; never the traceback.
    text = str(message or "").splitlines()[0] if message else status_line(code)
    cherrypy.serving.response.headers["Content-Type"] = "application/json"
    return dumps({"status": status_line(code), "code": code_for_status(code), "message": text})


class DatabaseTool(cherrypy.Tool):
    """Open the service's database connection for a request and release it afterwards.

    See ``common.db.release``: SQLite keeps one connection per thread, a pooled
    PostgreSQL URL (postgresql+pool://) borrows from the pool. Never shared across
    processes: each process opens its own on its first request.
    """

    def __init__(self):
        super().__init__("on_start_resource", self._open, priority=20)

    def _setup(self):
        super()._setup()
        cherrypy.serving.request.hooks.attach("on_end_request", self._close, priority=80)

    @staticmethod
    def _open(db=None):
        if db is not None:
            db.connect(reuse_if_open=True)
            cherrypy.serving.request.labvault_db = db

    @staticmethod
    def _close():
        db = getattr(cherrypy.serving.request, "labvault_db", None)
        if db is not None:
            release(db)


cherrypy.tools.labvault_db = DatabaseTool()


PUBLIC_PATHS = ("/", "/openapi.json")


def require_service_token(token: str = "") -> None:
    """Refuse (401 ``service_token_required``) a request without the shared service token.

    The health answer (``GET /``) stays open for load balancers and healthchecks, and the
    API description (``GET /openapi.json``) for people: it holds no data.
    """
    request = cherrypy.serving.request
    if not token or (request.path_info in PUBLIC_PATHS and request.method in ("GET", "HEAD")):
        return
    if not same_secret(request.headers.get(SERVICE_TOKEN_HEADER, ""), token):
        # Unauthorized closes the connection: the body, however large, is never read.
        raise Unauthorized(f"this service answers other labvault services only ({SERVICE_TOKEN_HEADER})",
                           code="service_token_required")


# Before the request body is processed: a stranger's body is never read, not even a form.
cherrypy.tools.labvault_service_token = cherrypy.Tool("before_request_body", require_service_token, priority=10)


def make_application(root, db=None, extra: dict | None = None, service_token: str = "") -> cherrypy.Application:
    """A CherryPy application for ``root`` with the config every service shares.

    ``service_token``: when set, every request but the health answer must carry it
    (the internal services: metadata, archive, policy).
    """
    config = app_config(db, extra)
    if service_token:
        config["/"].update({"tools.labvault_service_token.on": True,
                            "tools.labvault_service_token.token": service_token})
    return cherrypy.Application(root, "", config)


def app_config(db=None, extra: dict | None = None) -> dict:
    """Per-application CherryPy config every service shares (MethodDispatcher REST)."""
    root = {
        "request.dispatch": cherrypy.dispatch.MethodDispatcher(),
        "request.show_tracebacks": False,
        "request.error_response": handle_error,
        "error_page.default": error_page,
        "tools.encode.on": False,
        "tools.trailing_slash.on": False,
        # handle_error logs what needs a traceback; client errors are not worth one.
        "tools.log_tracebacks.on": False,
        "tools.log_headers.on": False,
    }
    if db is not None:
        root.update({"tools.labvault_db.on": True, "tools.labvault_db.db": db})
    config = {"/": root}
    for path, values in (extra or {}).items():
        config.setdefault(path, {}).update(values)
    return config


def global_config(settings: Settings, service: str, host: str | None = None, port: int | None = None) -> dict:
    return {
        "server.socket_host": host or settings.get(service, "host"),
        "server.socket_port": int(port or settings.getint(service, "port")),
        "server.thread_pool": 16,
        "server.socket_timeout": 60,
        # Body limits are enforced by the handlers so they can answer JSON.
        "server.max_request_body_size": 0,
        "engine.autoreload.on": False,
        "checker.on": False,
        "log.screen": False,
        "request.show_tracebacks": False,
        "error_page.default": error_page,
    }


def serve(application, settings: Settings, service: str,
          host: str | None = None, port: int | None = None) -> None:
    """Run one service (a CherryPy application, or WSGI in front of one) until SIGTERM/SIGINT."""
    cherrypy.config.update(global_config(settings, service, host, port))
    cherrypy.tree.graft(outermost(application), "")
    server = cherrypy.server
    server.httpserver, server.bind_addr = server.httpserver_from_self()
    guard_server(server.httpserver)
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    logger.info("%s service listening on http://%s:%s", service,
                cherrypy.server.socket_host, cherrypy.server.socket_port)
    cherrypy.engine.block()


def wsgi_application(application, settings: Settings | None = None):
    """Prepare an application for uWSGI (one call per worker, after fork: ``lazy-apps``).

    No built-in server and no autoreload; the engine started, and exited with the worker;
    logging configured from ``settings``; chunked request bodies readable from wsgi.input.
    """
    if settings is not None:
        setup_logging(settings)
    cherrypy.config.update({"engine.autoreload.on": False, "checker.on": False,
                            "log.screen": False, "request.show_tracebacks": False,
                            "error_page.default": error_page})
    cherrypy.server.unsubscribe()
    cherrypy.engine.start()
    # uWSGI ends a worker by leaving Python, never through CherryPy: exit the engine
    # ourselves (atexit runs this before CherryPy's own "bus still started" warning).
    atexit.register(cherrypy.engine.exit)
    application = outermost(application)
    try:
        import uwsgi
    except ImportError:  # not under uWSGI: the WSGI server de-chunks bodies itself
        return application
    return UwsgiChunkedInput(application, uwsgi.chunked_read)


class UwsgiChunkedInput:
    """WSGI middleware: a ``Transfer-Encoding: chunked`` body read through ``uwsgi.chunked_read``.

    uWSGI's http-socket leaves wsgi.input empty for a chunked body (there is no
    Content-Length) and hands the chunks only to its own API; the handlers read
    wsgi.input (CherryPy's ``request.rfile``), so this puts the chunks there.
    """

    def __init__(self, application, read_chunk):
        self.application = application
        self.read_chunk = read_chunk

    def __call__(self, environ, start_response):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            environ["wsgi.input"] = ChunkedReader(self.read_chunk)
            environ["wsgi.input_terminated"] = True
        return self.application(environ, start_response)


class ChunkedReader:
    """A file-like body made of the pieces ``read_chunk()`` returns until it returns b''."""

    def __init__(self, read_chunk):
        self._read_chunk = read_chunk
        self._buffer = bytearray()
        self._done = False

    def _fill(self, wanted) -> None:
        while not self._done and (wanted is None or len(self._buffer) < wanted):
            chunk = self._read_chunk()
            if not chunk:
                self._done = True
            else:
                self._buffer += chunk

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def read(self, size: int | None = -1) -> bytes:
        wanted = None if size is None or size < 0 else size
        self._fill(wanted)
        return self._take(len(self._buffer) if wanted is None else wanted)

    def readline(self, size: int | None = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 or self._done or (limit is not None and len(self._buffer) >= limit):
                break
            self._fill(len(self._buffer) + 1)
        count = len(self._buffer) if end < 0 else end + 1
        return self._take(count if limit is None else min(count, limit))

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


class HealthMixin:
    """``GET /``: the Pacifica-style "... Up and Running" answer."""

    service_title = "labvault"

    def GET(self):  # noqa: N802 - CherryPy MethodDispatcher verb
        return json_body({"message": f"{self.service_title} Up and Running"})


class OpenApiDocument:
    """``GET /openapi.json`` (CherryPy's dispatcher finds it as ``openapi_json``): the service's
    OpenAPI 3 description, built once by ``describe()``."""

    exposed = True

    def __init__(self, describe):
        self._describe = describe
        self._document = None

    def GET(self, **_params):  # noqa: N802
        if self._document is None:
            self._document = self._describe()
        return json_body(self._document)


def allow_origins(origins=()) -> None:
    """Cross-origin answers for the pages of other labvault services (the dashboard, served by
    the ingest service): only the listed origins, only the methods and headers they use.

    A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from a listed origin is
    answered here, before any handler; other requests from it get the headers added.
    """
    request, response = cherrypy.serving.request, cherrypy.serving.response
    origin = request.headers.get("Origin", "").rstrip("/")
    if not origin or origin not in {allowed.strip().rstrip("/") for allowed in origins}:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response.headers.update({"Access-Control-Allow-Methods": "GET, POST, PUT",
                                 "Access-Control-Allow-Headers": "Authorization, API-KEY, Content-Type",
                                 "Access-Control-Max-Age": "600"})
        response.status = 204
        response.body = b""
        request.handler = None  # answered: no handler runs


# After dispatch (the tools are known), before the body is read or a handler runs.
cherrypy.tools.labvault_cors = cherrypy.Tool("on_start_resource", allow_origins, priority=5)
