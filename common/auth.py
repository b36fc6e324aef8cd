"""Identity: who is asking, in one of three modes.

- ``open``: no authentication; a job belongs to nobody and everybody sees it (a
  single-user laptop: the embedded default, with a warning in the log).
- ``token``: a per-user API token, sent as ``Authorization: Bearer <token>`` or as the
  password of HTTP Basic (so Pacifica clients, which only know Basic, can use it).
- ``proxy``: a fronting proxy that authenticated the user names them in a header;
  the header counts only when the request comes from a configured proxy address.

Tokens are stored only as their SHA-256; the token itself is shown once, at creation.
Nothing here imports CherryPy: callers pass the request's headers and address.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from common.access import Directory, may_see_owned
from common.db import utcnow
from common.errors import NotFound, Unauthorized
from common.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

MODES = ("open", "token", "proxy")
# The header services send each other the shared [auth] service_token in.
SERVICE_TOKEN_HEADER = "X-Labvault-Service-Token"
TOKEN_PREFIX = "lv_"


@dataclass(frozen=True)
class Identity:
    """The requester: ``user`` is None in open mode (anyone)."""

    user: int | None
    admin: bool = False

    @property
    def anonymous(self) -> bool:
        return self.user is None

    def may_see(self, owner: int | None) -> bool:
        """Whether this requester may see something owned by ``owner`` (None: owned by nobody)."""
        return may_see_owned(self.user, self.admin, owner)


OPEN = Identity(None)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def revoke_by_prefix(model, prefix: str):
    """Revoke the one live token row of ``model`` (a table with ``digest`` and ``revoked``) whose
    digest starts with ``prefix``, as the token listings show it; 404 ``token_not_found`` unless
    exactly one matches a prefix of 8 hex characters or more. Answers the revoked row."""
    prefix = str(prefix).strip().lower()
    if len(prefix) < 8 or len(prefix) > 64 or any(ch not in "0123456789abcdef" for ch in prefix):
        matches = []
    else:
        matches = list(model.select().where(model.digest.startswith(prefix) & model.revoked.is_null()).limit(2))
    if len(matches) != 1:
        raise NotFound(f"no single live token starts with {prefix[:16]!r} (give at least 8 hex characters)",
                       code="token_not_found")
    model.update(revoked=utcnow()).where(model.digest == matches[0].digest).execute()
    return model.get_by_id(matches[0].digest)


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def presented_secret(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <t>`` or the password of ``Authorization: Basic``."""
    value = (headers.get("Authorization") or "").strip()
    scheme, _, credentials = value.partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        return decoded.partition(":")[2] or None
    return None


class Authenticator:
    """Turns a request's headers and address into an ``Identity`` for the configured mode.

    ``user_for_token(digest)`` answers the user id a token digest belongs to (or None);
    ``user_for_name(name)`` resolves a proxy's user name (a network id, or an id) to a
    user id (or None); ``is_admin(user)`` says whether a user is in an admin group.
    """

    def __init__(self, mode: str, user_for_token: Callable[[str], int | None],
                 user_for_name: Callable[[str], int | None], is_admin: Callable[[int], bool],
                 proxy_addresses: list[str] = (), proxy_header: str = "X-Remote-User"):
        if mode not in MODES:
            raise SettingsError(f"[auth] mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.user_for_token = user_for_token
        self.user_for_name = user_for_name
        self.is_admin = is_admin
        self.proxy_header = proxy_header
        try:
            self.proxies = [ipaddress.ip_network(address.strip(), strict=False) for address in proxy_addresses]
        except ValueError as exc:
            raise SettingsError(f"[auth] proxy_addresses: {exc}") from None
        if mode == "proxy" and not self.proxies:
            raise SettingsError("[auth] mode = proxy needs proxy_addresses")
        if mode == "open":
            logger.warning("authentication is off ([auth] mode = open): anyone who can reach the "
                           "ingest service can upload as any submitter and see every job")

    @classmethod
    def from_settings(cls, settings: Settings, **lookups) -> "Authenticator":
        return cls(settings.get("auth", "mode", "open").strip().lower(), **lookups,
                   proxy_addresses=settings.getlist("auth", "proxy_addresses"),
                   proxy_header=settings.get("auth", "proxy_header", "X-Remote-User"))

    def identify(self, headers: Mapping[str, str], remote_addr: str) -> Identity:
        """The requester, or 401 ``unauthorized``."""
        if self.mode == "open":
            return OPEN
        if self.mode == "token":
            token = presented_secret(headers)
            if not token:
                raise Unauthorized("an API token is required (Authorization: Bearer, or as the Basic password)")
            user = self.user_for_token(token_digest(token))
            if user is None:
                raise Unauthorized("the API token is not valid")
            return Identity(user, self.is_admin(user))
        name = headers.get(self.proxy_header)
        if not name or not self._from_proxy(remote_addr):
            # A header from anywhere else is ignored: it could have been written by anyone.
            raise Unauthorized("requests must come through the authenticating proxy")
        user = self.user_for_name(name.strip())
        if user is None:
            raise Unauthorized(f"the proxy named an unknown user {name.strip()[:80]!r}")
        return Identity(user, self.is_admin(user))

    def _from_proxy(self, remote_addr: str) -> bool:
        try:
            address = ipaddress.ip_address(remote_addr)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)


CACHE_SECONDS = 60.0


class TTLCache:
    """A small thread-safe memo whose entries expire after ``seconds``."""

    def __init__(self, seconds: float = CACHE_SECONDS):
        self.seconds = seconds
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, key, compute: Callable[[], object]):
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry and entry[0] > now:
                return entry[1]
        value = compute()
        with self._lock:
            self._entries[key] = (now + self.seconds, value)
        return value


class Identities:
    """Identify requests to a public service (ingest, stats) in the ``[auth]`` mode.

    ``user_for_token(digest)`` is where the tokens live (the ingest service's table, or a
    question to the ingest service); user names and admin membership come from the metadata
    service (``common.access``), cached for a short while because every poll asks.
    """

    def __init__(self, settings: Settings, metadata, user_for_token: Callable[[str], int | None]):
        self.directory = Directory(metadata)
        self._names = TTLCache()
        self._admins = TTLCache()
        self.authenticator = Authenticator.from_settings(
            settings, user_for_token=user_for_token, user_for_name=self.user_for_name, is_admin=self.is_admin)

    @property
    def mode(self) -> str:
        return self.authenticator.mode

    def identify(self, headers: Mapping[str, str], remote_addr: str) -> Identity:
        return self.authenticator.identify(headers, remote_addr)

    def user_for_name(self, name: str) -> int | None:
        def look_up():
            row = self.directory.user_by_network_id(name)
            if row is None and name.isdigit():
                row = self.directory.user(name)
            return None if row is None else int(row["_id"])
        return self._names.get(name, look_up)

    def is_admin(self, user: int) -> bool:
        return self._admins.get(user, lambda: self.directory.is_admin(user))
