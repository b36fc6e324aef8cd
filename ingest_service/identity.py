"""Who is asking the ingest service: the ``[auth]`` mode, with its lookups.

Tokens live in the ingest database (only their digests); user names and admin
membership come from the metadata service, cached for a short while because every
``get_state`` poll asks.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

from common.access import Directory
from common.auth import Authenticator, Identity, new_token, token_digest
from common.clients import MetadataClient
from common.db import utcnow
from common.errors import NotFound
from common.settings import Settings
from ingest_service.models import ApiToken

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
    """Identify requests to the ingest service (see ``common.auth``)."""

    def __init__(self, settings: Settings, metadata: MetadataClient):
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


def user_for_token(digest: str) -> int | None:
    token = ApiToken.get_or_none((ApiToken.digest == digest) & ApiToken.revoked.is_null())
    return None if token is None else int(token.user)


def create_token(user: int, label: str = "") -> str:
    """A new API token for ``user``; only its digest is stored, so this is the only time it is seen."""
    token = new_token()
    ApiToken.create(digest=token_digest(token), user=user, label=label, created=utcnow())
    return token


def token_rows(user: int | None = None) -> list[ApiToken]:
    query = ApiToken.select().order_by(ApiToken.created)
    if user is not None:
        query = query.where(ApiToken.user == user)
    return list(query)


def revoke_token(prefix: str) -> ApiToken:
    """Revoke the one live token whose digest starts with ``prefix`` (as ``token list`` shows it)."""
    matches = list(ApiToken.select().where(ApiToken.digest.startswith(prefix.lower()) & ApiToken.revoked.is_null()))
    if len(matches) != 1 or len(prefix) < 8:
        raise NotFound(f"no single live token starts with {prefix[:16]!r} (give at least 8 characters)",
                       code="token_not_found")
    ApiToken.update(revoked=utcnow()).where(ApiToken.digest == matches[0].digest).execute()
    return matches[0]
