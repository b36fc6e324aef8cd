"""Domain errors: each carries its HTTP status and a machine code.

Domain code raises these; one place per service (``common.web``) turns them into
``{"status": "...", "code": "...", "message": "..."}``. Callers branch on ``code``,
never on the message text.
"""
from __future__ import annotations

import errno
from http import HTTPStatus


class LabvaultError(Exception):
    """Base of every error labvault reports to a client or records on a job."""

    status: int = 500
    code: str = "internal_error"
    # Seconds a client should wait before trying again (sent as Retry-After); None: no advice.
    retry_after: int | None = None
    # Response headers the error needs (e.g. WWW-Authenticate on a 401).
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, code: str | None = None):
        # One line only: the message ends up in a job's `exception` and in JSON bodies.
        super().__init__(" ".join(str(message).split()))
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)

    def as_exception_text(self) -> str:
        """The job table's `exception` form: ``code: message``."""
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict:
        return {"status": status_line(self.status), "code": self.code, "message": self.message}


class BadRequest(LabvaultError):
    status, code = 400, "bad_request"


# On an answer given before the request body was read: the server closes the connection
# instead of reading (and holding) a body nobody wants, however large it was declared.
CLOSE = {"Connection": "close"}


class Unauthorized(LabvaultError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="labvault", Basic realm="labvault"', **CLOSE}


class Forbidden(LabvaultError):
    status, code = 403, "forbidden"


class NotFound(LabvaultError):
    status, code = 404, "not_found"


class MethodNotAllowed(LabvaultError):
    status, code = 405, "method_not_allowed"


class Conflict(LabvaultError):
    status, code = 409, "conflict"


class LengthRequired(LabvaultError):
    status, code = 411, "length_required"


class PreconditionFailed(LabvaultError):
    status, code = 412, "precondition_failed"


class PayloadTooLarge(LabvaultError):
    status, code = 413, "payload_too_large"
    headers = CLOSE


class UnprocessableEntity(LabvaultError):
    """Well-formed input that breaks a rule of its schema (an operation's inputs)."""

    status, code = 422, "unprocessable_entity"


class ServiceUnavailable(LabvaultError):
    status, code = 503, "service_unavailable"
    retry_after = 5


class DatabaseUnavailable(ServiceUnavailable):
    """The service's own database is locked, down or out of connections; worth retrying soon."""

    code = "database_unavailable"
    retry_after = 2


class InsufficientStorage(LabvaultError):
    """A disk (staging volume, archive) is full."""

    status, code = 507, "insufficient_storage"


class SchemaMismatch(LabvaultError):
    status, code = 503, "schema_mismatch"


class RemoteError(LabvaultError):
    """Another service's error answer, relayed with that service's own status and code."""

    def __init__(self, message: str, *, code: str, status: int):
        super().__init__(message, code=code)
        self.status = status


# A full disk (or quota) wherever a service writes: staging volume, archive root, SQLite file.
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` says a disk (or a quota) is full."""
    return isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS


# Statuses of HTTP extensions the suite speaks, which http.HTTPStatus does not know.
EXTRA_PHRASES = {460: "Checksum Mismatch"}  # tus 1.0, checksum extension


def status_line(status: int) -> str:
    if status in EXTRA_PHRASES:
        return f"{status} {EXTRA_PHRASES[status]}"
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def code_for_status(status: int) -> str:
    """Machine code for an HTTP error raised outside our domain code (routing, server limits)."""
    try:
        phrase = EXTRA_PHRASES.get(status) or HTTPStatus(status).phrase
        return phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"
