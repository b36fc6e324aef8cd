"""Webhook subscriptions and the delivery of events to them.

A subscription names a URL, the event types it wants, optionally one project, and the user
it acts for (``owner``; None for an operator's subscription, which sees every project). An
event goes to every enabled subscription whose types include it, whose project (if any) is
the event's, and whose owner may see the event's project (a member or an admin, asked
again at every event, so a user who leaves a project stops hearing of it).

Each delivery is one POST of the event in CloudEvents' structured JSON mode, signed with the
subscription's secret (``common.events.sign``), with ``[events] connect_timeout`` and
``timeout``. A 2xx answer is a success; anything else (another status, a redirect, a
timeout, a refused connection) a failure. Every attempt is recorded (``Delivery``) and
logged. Failures in a row are counted on the subscription and reset by a success; the
``[events] disable_after``-th disables it (``labvault webhook enable`` re-enables it and
resets the count). A failed attempt is tried again after ``retry_delay * 2**(attempt-1)``
seconds (at most ``retry_max_delay``), up to ``max_attempts`` attempts per event, while the
subscription stays enabled. No Celery here: the task adapter turns ``Retry`` into a
Celery retry.
"""
from __future__ import annotations

import datetime
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import requests

from common import events
from common.db import utcnow
from common.errors import BadRequest, NotFound
from common.settings import Settings
from ingest_service.models import Delivery, Subscription

logger = logging.getLogger(__name__)

DELIVERED, SKIPPED, DISABLED, GAVE_UP = "delivered", "skipped", "disabled", "gave up"
MAX_URL_LENGTH = 2000
USER_AGENT = "labvault-webhooks/1"


@dataclass(frozen=True)
class Retry:
    """The attempt failed; try again in ``delay`` seconds."""

    delay: float
    reason: str


def check_url(url: str) -> str:
    """An http(s) URL with a host, or 400 ``invalid_url``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL_LENGTH:
        raise BadRequest("a webhook URL is http:// or https:// with a host", code="invalid_url")
    return url.strip()


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def add(url: str, types: list[str], project: str | None = None, owner: int | None = None,
        secret: str | None = None) -> Subscription:
    """A new enabled subscription (the caller checked that ``owner`` may see ``project``)."""
    if secret is not None and not 8 <= len(secret) <= 255:
        raise BadRequest("a webhook secret has 8 to 255 characters", code="invalid_secret")
    return Subscription.create(url=check_url(url), events=",".join(types), project=project, owner=owner,
                               secret=secret or new_secret(), created=utcnow())


def get(subscription_id: int) -> Subscription:
    row = Subscription.get_or_none(Subscription.id == subscription_id)
    if row is None:
        raise NotFound(f"no webhook subscription {subscription_id}", code="subscription_not_found")
    return row


def listing() -> list[Subscription]:
    return list(Subscription.select().order_by(Subscription.id))


def remove(subscription_id: int) -> None:
    get(subscription_id)
    Subscription.delete().where(Subscription.id == subscription_id).execute()


def set_enabled(subscription_id: int, enabled: bool) -> Subscription:
    """Enable (and reset the failure count) or disable a subscription."""
    get(subscription_id)
    values: dict[str, Any] = {"enabled": enabled}
    if enabled:
        values.update(failures=0, disabled_at=None)
    else:
        values.update(disabled_at=utcnow())
    Subscription.update(values).where(Subscription.id == subscription_id).execute()
    return get(subscription_id)


def deliveries(subscription_id: int, limit: int = 20) -> list[Delivery]:
    """The subscription's latest delivery attempts, newest first."""
    return list(Delivery.select().where(Delivery.subscription == subscription_id)
                .order_by(Delivery.id.desc()).limit(limit))


def matching(event: dict[str, Any], may_see: Callable[[int, str], bool]) -> list[Subscription]:
    """The enabled subscriptions ``event`` goes to; ``may_see(user, project)`` is the visibility rule."""
    project = event.get("labvaultproject")
    found = []
    for row in Subscription.select().where(Subscription.enabled == True).order_by(Subscription.id):  # noqa: E712
        if event["type"] not in row.events.split(","):
            continue
        if row.project is not None and row.project != project:
            continue
        if row.owner is not None and not _owner_sees(int(row.owner), event, project, may_see):
            continue
        found.append(row)
    return found


def _owner_sees(owner: int, event: dict[str, Any], project: str | None, may_see) -> bool:
    if project is not None:
        return may_see(owner, project)
    # An event of no project (a job that failed before its metadata was read): its owner's only.
    data = event.get("data") or {}
    return data.get("owner") == owner


def deliver(settings: Settings, subscription_id: int, event: dict[str, Any],
            session: requests.Session | None = None) -> str | Retry:
    """Make one attempt to deliver ``event``; safe to run twice (an event delivered is not sent again)."""
    row = Subscription.get_or_none(Subscription.id == subscription_id)
    if row is None or not row.enabled:
        return SKIPPED
    event_id = str(event["id"])
    attempts = Delivery.select().where((Delivery.subscription == subscription_id) & (Delivery.event_id == event_id))
    if attempts.where(Delivery.status.between(200, 299)).exists():
        return DELIVERED
    attempt = attempts.count() + 1
    body = events.body_of(event)
    headers = {"Content-Type": events.CONTENT_TYPE, "User-Agent": USER_AGENT,
               events.SIGNATURE_HEADER: events.sign(row.secret, body)}
    timeouts = (settings.getfloat("events", "connect_timeout"), settings.getfloat("events", "timeout"))
    status, error = None, ""
    started = time.monotonic()
    try:
        # stream=True: the answer's body is never read (a server could send gigabytes back).
        response = (session or requests).post(row.url, data=body, headers=headers, timeout=timeouts,
                                              allow_redirects=False, stream=True)
        status = response.status_code
        response.close()
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except requests.RequestException as exc:
        error = _describe(exc)
    duration = int((time.monotonic() - started) * 1000)
    Delivery.create(subscription=subscription_id, event_id=event_id, event_type=event["type"][:64],
                    attempt=attempt, status=status, error=error, duration_ms=duration, at=utcnow())
    if not error:
        Subscription.update(failures=0, last_error="", last_delivery=utcnow()).where(
            Subscription.id == subscription_id).execute()
        logger.info("webhook %s: %s %s delivered (attempt %d, HTTP %s, %d ms)", subscription_id, event["type"],
                    event_id, attempt, status, duration)
        return DELIVERED
    return _failed(settings, row, event, attempt, error)


def _failed(settings: Settings, row: Subscription, event: dict[str, Any], attempt: int, error: str) -> str | Retry:
    # Counted in the database itself: deliveries to one subscription may run side by side.
    Subscription.update(failures=Subscription.failures + 1, last_error=f"{utcnow():%Y-%m-%d %H:%M:%S} {error}",
                        last_delivery=utcnow()).where(Subscription.id == row.id).execute()
    failures = Subscription.get_by_id(row.id).failures
    disable_after = settings.getint("events", "disable_after")
    logger.warning("webhook %s: %s %s attempt %d failed: %s (%d failure(s) in a row)", row.id, event["type"],
                   event["id"], attempt, error, failures)
    if failures >= disable_after:
        changed = (Subscription.update(enabled=False, disabled_at=utcnow())
                   .where((Subscription.id == row.id) & (Subscription.enabled == True)).execute())  # noqa: E712
        if changed:
            logger.error("webhook %s disabled after %d failed deliveries in a row; 'labvault webhook enable %s' "
                         "turns it back on", row.id, failures, row.id)
        return DISABLED
    if attempt >= settings.getint("events", "max_attempts"):
        logger.error("webhook %s: %s %s not delivered after %d attempts; given up", row.id, event["type"],
                     event["id"], attempt)
        return GAVE_UP
    return Retry(backoff(settings, attempt), error)


def backoff(settings: Settings, attempt: int) -> float:
    """Seconds before the attempt after ``attempt`` (1, 2, ...): doubling from ``retry_delay``, capped."""
    delay = settings.getfloat("events", "retry_delay") * 2 ** min(attempt - 1, 30)
    return min(delay, settings.getfloat("events", "retry_max_delay"))


def _describe(exc: requests.RequestException) -> str:
    """A one-line reason for a failed request, without the URL's query or a traceback."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def forget_deliveries(days: float, now: datetime.datetime | None = None) -> int:
    """Remove delivery records older than ``days``; returns how many."""
    cutoff = (now or utcnow()) - datetime.timedelta(days=days)
    return Delivery.delete().where(Delivery.at < cutoff).execute()
