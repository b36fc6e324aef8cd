"""Idempotent uploads: the same bundle sent again under the same key answers the job it made.

An uploader names an upload with ``Idempotency-Key: <key>`` (or asks with
``Labvault-Dedupe: digest`` that the bundle's SHA-256 be the key). Once the bundle has
arrived whole, the key is *bound*: one row (uploader, key) -> (bundle digest, job), under a
unique index, so of two uploads racing with one key exactly one binds it. Another upload
with a bound key gets the bound job back when its bytes have the same digest (its own
staged bytes are removed, no second job or transaction is made) and 409
``idempotency_key_reused`` when they differ. A job that failed stays the key's answer: a
client retries a failed job under a new key. Keys expire after ``[ingest] idempotency_hours``
(an expired key binds afresh; the reaper removes expired rows). A key is bound only once the
bytes are staged and is unbound again when the job cannot be enqueued, so an upload that
never became a job leaves its key free for the retry.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import peewee

from common.db import utcnow
from common.errors import CLOSE, BadRequest, Conflict
from ingest_service.models import IdempotencyKey, database

KEY_HEADER = "Idempotency-Key"
DEDUPE_HEADER = "Labvault-Dedupe"
MAX_KEY_LENGTH = 200
# The uploader of open mode, where nobody is authenticated: one key space for everyone.
ANYONE = -1
DIGEST_PREFIX = "sha256:"


class KeyReused(Conflict):
    code = "idempotency_key_reused"


class BadHeader(BadRequest):
    """A malformed idempotency header, refused before the body is read: the connection is
    closed rather than the body read for nothing, however large it was declared."""

    headers = CLOSE


@dataclass(frozen=True)
class Request:
    """The idempotency an upload asked for: an explicit ``key``, or ``by_digest`` (the key is the
    bundle's SHA-256, known once it has arrived)."""

    key: str | None = None
    by_digest: bool = False

    def key_for(self, digest: str) -> str:
        return DIGEST_PREFIX + digest if self.by_digest else str(self.key)


def from_headers(key: str | None, dedupe: str | None) -> Request | None:
    """The request's idempotency from its two headers, or None; 400 for a malformed one."""
    if dedupe is not None and dedupe.strip() != "":
        if dedupe.strip().lower() != "digest":
            raise BadHeader(f"{DEDUPE_HEADER} takes only 'digest'", code="invalid_dedupe")
        if key is not None:
            raise BadHeader(f"give either {KEY_HEADER} or {DEDUPE_HEADER}: digest, not both",
                             code="invalid_idempotency_key")
        return Request(by_digest=True)
    if key is None:
        return None
    # Visible ASCII only (the header's bytes arrive as latin-1 text): a key is compared byte for
    # byte, and odd bytes would be stored, logged and compared differently by every layer.
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all("!" <= char <= "~" for char in key):
        raise BadHeader(f"{KEY_HEADER} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters",
                         code="invalid_idempotency_key")
    return Request(key=key)


def uploader_of(user: int | None) -> int:
    return ANYONE if user is None else int(user)


def find(key: str, uploader: int) -> IdempotencyKey | None:
    """The live (not expired) binding of ``key`` for ``uploader``, or None."""
    return IdempotencyKey.get_or_none((IdempotencyKey.key == key) & (IdempotencyKey.uploader == uploader)
                                      & (IdempotencyKey.expires > utcnow()))


def bind(key: str, uploader: int, digest: str, job_id: int, hours: float) -> IdempotencyKey:
    """Bind ``key`` to ``job_id``, or return the live binding another upload made first.

    An expired binding is replaced. The caller compares the returned row's ``job_id`` with its own.
    """
    for _ in range(3):
        now = utcnow()
        try:
            with database.atomic():
                return IdempotencyKey.create(key=key, uploader=uploader, digest=digest, job_id=job_id,
                                             created=now, expires=now + datetime.timedelta(hours=hours))
        except peewee.IntegrityError:
            pass
        existing = IdempotencyKey.get_or_none((IdempotencyKey.key == key) & (IdempotencyKey.uploader == uploader))
        if existing is None:
            continue  # removed meanwhile (expired and reaped): try again
        if existing.expires > now:
            return existing
        (IdempotencyKey.delete().where((IdempotencyKey.id == existing.id)
                                       & (IdempotencyKey.expires <= now)).execute())
    raise KeyReused("the idempotency key is being bound by another upload; try again")


def check(binding: IdempotencyKey, digest: str) -> int:
    """The bound job for an upload of ``digest``, or 409 ``idempotency_key_reused``."""
    if binding.digest != digest:
        raise KeyReused(f"this {KEY_HEADER} was used for a different bundle (job {int(binding.job_id)}); "
                        f"use a new key for a new bundle")
    return int(binding.job_id)


def unbind(job_id: int) -> int:
    """Free the key bound to ``job_id`` (its job never started); returns rows removed."""
    return IdempotencyKey.delete().where(IdempotencyKey.job_id == job_id).execute()


def unbind_row(binding_id: int) -> int:
    return IdempotencyKey.delete().where(IdempotencyKey.id == binding_id).execute()


def expire(now: datetime.datetime | None = None) -> int:
    """Remove every expired binding; returns how many."""
    return IdempotencyKey.delete().where(IdempotencyKey.expires <= (now or utcnow())).execute()
