"""Events: what the suite tells the outside when something ends, as CloudEvents 1.0.

A service that wants the world to hear of something calls ``publish``; it builds one
CloudEvent (JSON, structured mode) and hands it to every listener of ``registry.EVENT``
(the service that keeps the webhook subscriptions enqueues its delivery). Publishing
never fails or slows its caller: it only builds a small dict and enqueues, after the
caller's commit, and every error is logged and swallowed, since the thing the event
tells of has already happened.

The event types, as webhook subscriptions name them:

- ``job.ok`` / ``job.failed``: an ingest job ended; subject ``projects/<P>/jobs/<id>``
  (``jobs/<id>`` when the bundle never named a readable project); data: the job's state
  document, its project, submitter and what it added.
- ``stats.built``: a project's statistics and figures were built; subject ``projects/<P>``.
- ``computed_file.built``: a computed file (a zip, a merged AnnData) was built; subject
  ``projects/<P>/computed_files/<id>``.

The signature of a delivery is ``sign(secret, body)``, one home for the rule.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import uuid
from typing import Any

from common import registry
from common.settings import Settings

logger = logging.getLogger(__name__)

JOB_OK = "job.ok"
JOB_FAILED = "job.failed"
STATS_BUILT = "stats.built"
COMPUTED_FILE_BUILT = "computed_file.built"
TYPES = (JOB_OK, JOB_FAILED, STATS_BUILT, COMPUTED_FILE_BUILT)

SPECVERSION = "1.0"
SOURCE_PREFIX = "/labvault/"
CONTENT_TYPE = "application/cloudevents+json"
SIGNATURE_HEADER = "X-Labvault-Signature"


def cloud_event(event_type: str, source: str, subject: str, data: dict[str, Any],
                project: str | None = None) -> dict[str, Any]:
    """A CloudEvents 1.0 event in its JSON form. ``project`` (the extension attribute
    ``labvaultproject``) is what subscriptions filter on; None for an event of no project."""
    if event_type not in TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    event: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": str(uuid.uuid4()),
        "type": event_type,
        "source": SOURCE_PREFIX + source,
        "subject": subject,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    if project is not None:
        event["labvaultproject"] = str(project)
    return event


def publish(settings: Settings, event_type: str, source: str, subject: str, data: dict[str, Any],
            project: str | None = None) -> dict[str, Any] | None:
    """Tell the listeners of ``registry.EVENT`` (they only enqueue); returns the event, or None when
    it could not even be built. Never raises: call it after the commit of what it tells of."""
    try:
        event = cloud_event(event_type, source, subject, data, project)
        json.dumps(event)  # what cannot travel as JSON is the caller's bug: found here, not in a worker
    except Exception:  # noqa: BLE001 - an event is never worth failing the work it reports
        logger.exception("could not build the %s event of %s", event_type, subject)
        return None
    try:
        registry.emit(registry.EVENT, settings, cloud_event=event)
    except Exception:  # noqa: BLE001 - emit logs a failing listener; this is for the registry itself
        logger.exception("could not publish the %s event of %s", event_type, subject)
    return event


def body_of(event: dict[str, Any]) -> bytes:
    """The bytes a delivery sends (and signs): compact UTF-8 JSON."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    """The ``X-Labvault-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256 with ``secret``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def parse_types(text: str) -> list[str]:
    """A comma-separated list of event types, checked (ValueError naming the unknown ones)."""
    wanted = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in wanted if name not in TYPES]
    if unknown or not wanted:
        raise ValueError(f"unknown event type(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TYPES)}")
    return wanted
