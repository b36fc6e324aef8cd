"""Downloads: API tokens (ScPCA's API-KEY, plus expiry and revocation), who may download what,
signed expiring URLs, and tars of a transaction or a project streamed from the archive.

A token is shown once; only its SHA-256 is kept. A download URL on the POSIX archive is
``/download/computed/<id>?expires=<epoch>&signature=<hmac>``: the HMAC-SHA256 (with a key every
stats process shares through the database) covers the file and the expiry, so a tampered or
expired URL is refused. On S3 the archive presigns instead. A project that is not public gives
URLs only to its members (and admins), identified as the ingest service identifies uploaders.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
import tarfile
import time
from typing import Iterable, Iterator

from common.access import Directory
from common.auth import revoke_by_prefix
from common.db import utcnow
from common.errors import BadRequest, Forbidden, NotFound
from common.hashing import CHUNK_SIZE
from common.settings import Settings
from stats_service.catalog import FileRecord
from stats_service.models import DownloadToken, IssuedDownload, Secret
from stats_service.runs import VerifyingReader

TERMS_VERSION = "1"
TERMS = ("Data downloaded from this labvault deployment is provided as is, for research use, under the "
         "terms its submitting facility set for each project. Cite each project as its README.md says. "
         "Do not share your API token: every download URL is recorded with the token it was issued to.")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,63}$")
TOKEN_PREFIX = "dl_"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(settings: Settings, email, is_activated, user: int | None) -> tuple[str, DownloadToken]:
    """A new download token; ``(token, row)``. The token itself is never stored."""
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.match(email):
        raise BadRequest("email must be an e-mail address", code="invalid_email")
    if not isinstance(is_activated, bool):
        raise BadRequest("is_activated must be true or false (true accepts the terms)", code="invalid_request")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = DownloadToken.create(digest=token_digest(token), email=email, is_activated=is_activated,
                               terms_version=TERMS_VERSION if is_activated else None, user=user,
                               expires=utcnow() + datetime.timedelta(days=settings.getfloat("downloads", "token_days")))
    return token, row


def token_document(row: DownloadToken, token: str | None = None) -> dict:
    document = {"email": row.email, "is_activated": row.is_activated, "terms_and_conditions": TERMS,
                "terms_version": row.terms_version, "created": f"{row.created:%Y-%m-%d %H:%M:%S}",
                "expires": f"{row.expires:%Y-%m-%d %H:%M:%S}", "user": row.user,
                "revoked": f"{row.revoked:%Y-%m-%d %H:%M:%S}" if row.revoked else None}
    if token is not None:
        document = {"id": token, **document}
    return document


def find_token(token: str) -> DownloadToken | None:
    return DownloadToken.get_or_none(DownloadToken.digest == token_digest(token))


def activate(token: str) -> DownloadToken:
    row = find_token(token)
    if row is None:
        raise NotFound("no such token", code="token_not_found")
    DownloadToken.update(is_activated=True, terms_version=TERMS_VERSION).where(
        DownloadToken.digest == row.digest).execute()
    return DownloadToken.get_by_id(row.digest)


def valid_token(api_key: str | None) -> DownloadToken:
    """The token behind an ``API-KEY`` header, if it may download: else 403 with why."""
    row = find_token(api_key) if api_key else None
    if row is None:
        raise Forbidden("the API-KEY is not a valid token", code="invalid_token")
    if row.revoked is not None:
        raise Forbidden("the token was revoked", code="token_revoked")
    if row.expires <= utcnow():
        raise Forbidden("the token has expired; ask for a new one (POST /tokens)", code="token_expired")
    if not row.is_activated:
        raise Forbidden("the token is not activated: accept the terms (is_activated: true)",
                        code="token_not_activated")
    return row


def revoke_token(prefix: str) -> DownloadToken:
    """Revoke the one live token whose digest starts with ``prefix`` (as ``download-token list`` shows)."""
    return revoke_by_prefix(DownloadToken, prefix)


# -- who may download what -----------------------------------------------------------

def is_public(settings: Settings, project: str) -> bool:
    """``[downloads] public_projects``: ``*`` (every project) or a comma-separated list."""
    listed = settings.getlist("downloads", "public_projects")
    return "*" in listed or project in listed


def require_access(settings: Settings, directory: Directory, token: DownloadToken, project: str) -> None:
    """403 ``project_not_public`` unless the project is public or the token's user is a member or an admin."""
    if is_public(settings, project):
        return
    if token.user is not None and directory.may_see_project(int(token.user), project):
        return
    raise Forbidden(f"project {project[:100]!r} is not public: only its members may download it",
                    code="project_not_public")


def record(token: DownloadToken, what: str, url_kind: str, expires: datetime.datetime | None = None) -> IssuedDownload:
    return IssuedDownload.create(token=token.digest, what=what, url_kind=url_kind, expires=expires)


# -- signed URLs -----------------------------------------------------------------------

def signing_key() -> bytes:
    """The key every stats process signs with: made once, kept in the stats database."""
    Secret.insert(name="url_signing", value=secrets.token_hex(32)).on_conflict_ignore().execute()
    return bytes.fromhex(Secret.get_by_id("url_signing").value)


def signature(computed_id: int, expires: int) -> str:
    return hmac.new(signing_key(), f"computed_file:{int(computed_id)}:{int(expires)}".encode(),
                    hashlib.sha256).hexdigest()


def expiry(seconds: float) -> datetime.datetime:
    """When a URL issued now for ``seconds`` stops working (naive UTC, whole seconds)."""
    return datetime.datetime.fromtimestamp(int(time.time() + seconds), datetime.timezone.utc).replace(tzinfo=None)


def signed_path(computed_id: int, seconds: float) -> tuple[str, datetime.datetime]:
    expires = expiry(seconds)
    epoch = int(expires.replace(tzinfo=datetime.timezone.utc).timestamp())
    return (f"/download/computed/{int(computed_id)}?expires={epoch}&signature={signature(computed_id, epoch)}",
            expires)


def check_signature(computed_id: int, expires: str | None, given: str | None) -> None:
    """403 ``invalid_signature`` for a tampered URL, ``url_expired`` for an old one."""
    if not expires or not given or not expires.isdigit() or len(expires) > 12:
        raise Forbidden("the download URL is not signed", code="invalid_signature")
    if not hmac.compare_digest(signature(computed_id, int(expires)), str(given)[:128]):
        raise Forbidden("the download URL's signature does not match", code="invalid_signature")
    if int(expires) < time.time():
        raise Forbidden("the download URL has expired; ask for a new one", code="url_expired")


# -- a tar streamed from the archive ---------------------------------------------------

def stream_tar(engine, records: Iterable[FileRecord], on_error) -> Iterator[bytes]:
    """A tar of ``records`` under their original paths, each file read from the archive once and
    checked against its stored digest on the way out. The last chunk of each file is held back
    until its digest is checked, so a file that no longer matches never arrives whole: the
    stream ends there (``on_error(message)`` records it) and the tar is visibly cut short."""
    for record in records:
        info = tarfile.TarInfo(record.path)
        info.size, info.mode, info.mtime = record.size, 0o644, 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        reader = VerifyingReader(engine.open_archived(record.file_id), record.size, record.hashtype,
                                 record.hashsum, record.path)
        held = b""
        try:
            with reader:
                while True:
                    chunk = reader.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    if held:
                        yield held
                    held = chunk
        except Exception as exc:  # noqa: BLE001 - any failure must cut the stream, never pass wrong bytes
            on_error(f"{record.path[:200]}: {getattr(exc, 'message', None) or type(exc).__name__}")
            return
        yield held
        if record.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - record.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (tarfile.BLOCKSIZE * 2)
