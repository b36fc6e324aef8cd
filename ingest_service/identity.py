"""The ingest service's API tokens: they live in its database (only their digests).

Who is asking is decided by ``common.auth.Identities`` with ``user_for_token`` below; other
services ask this service about a token's digest (``GET /identity/tokens/<digest>``).
"""
from __future__ import annotations

from common.auth import Identities, new_token, revoke_by_prefix, token_digest
from common.clients import MetadataClient
from common.db import utcnow
from common.settings import Settings
from ingest_service.models import ApiToken


def identities(settings: Settings, metadata: MetadataClient) -> Identities:
    """Who is asking the ingest service, its own token table answering for tokens."""
    return Identities(settings, metadata, user_for_token)

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
    return revoke_by_prefix(ApiToken, prefix)
