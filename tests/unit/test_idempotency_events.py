"""Idempotency keys and webhook subscriptions on SQLite and PostgreSQL; CloudEvents and their
signature as plain Python."""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json

import pytest

from common import events
from common.db import utcnow
from common.errors import BadRequest
from ingest_service import idempotency, webhooks
from ingest_service.models import Delivery, IdempotencyKey, Subscription
from tests.helpers import make_settings

A, B = "a" * 64, "b" * 64


# -- headers ----------------------------------------------------------------------------

@pytest.mark.parametrize("key, dedupe, expected", [
    (None, None, None),
    ("order-17", None, idempotency.Request(key="order-17")),
    ("~" * 200, None, idempotency.Request(key="~" * 200)),
    (None, "digest", idempotency.Request(by_digest=True)),
    (None, " Digest ", idempotency.Request(by_digest=True)),
    ("k", "", idempotency.Request(key="k")),
])
def test_the_headers_name_a_key_or_ask_for_the_digest(key, dedupe, expected):
    assert idempotency.from_headers(key, dedupe) == expected


@pytest.mark.parametrize("key, dedupe, code", [
    ("", None, "invalid_idempotency_key"),
    ("x" * 201, None, "invalid_idempotency_key"),
    ("two words", None, "invalid_idempotency_key"),
    ("caf\xe9", None, "invalid_idempotency_key"),
    ("nul\x00", None, "invalid_idempotency_key"),
    ("k", "digest", "invalid_idempotency_key"),
    (None, "bytes", "invalid_dedupe"),
])
def test_malformed_headers_are_refused_before_the_body_is_read(key, dedupe, code):
    with pytest.raises(BadRequest) as caught:
        idempotency.from_headers(key, dedupe)
    assert caught.value.code == code and caught.value.status == 400
    assert caught.value.headers.get("Connection") == "close"


def test_a_digest_request_keys_on_the_digest():
    assert idempotency.Request(by_digest=True).key_for(A) == "sha256:" + A
    assert idempotency.Request(key="k").key_for(A) == "k"


# -- bindings ----------------------------------------------------------------------------

def test_a_key_binds_once_and_answers_its_job_after(ingest_db):
    first = idempotency.bind("k", 10, A, 1, hours=1)
    again = idempotency.bind("k", 10, A, 2, hours=1)
    assert (int(first.job_id), int(again.job_id)) == (1, 1)
    assert idempotency.check(again, A) == 1
    with pytest.raises(idempotency.KeyReused) as caught:
        idempotency.check(again, B)
    assert caught.value.status == 409 and caught.value.code == "idempotency_key_reused"
    assert IdempotencyKey.select().count() == 1


def test_keys_are_per_uploader(ingest_db):
    assert int(idempotency.bind("k", 10, A, 1, hours=1).job_id) == 1
    assert int(idempotency.bind("k", 11, B, 2, hours=1).job_id) == 2
    assert int(idempotency.bind("k", idempotency.ANYONE, B, 3, hours=1).job_id) == 3
    assert idempotency.uploader_of(None) == idempotency.ANYONE


def test_an_expired_key_binds_afresh_and_the_reaper_removes_expired_keys(ingest_db):
    idempotency.bind("old", 10, A, 1, hours=1)
    idempotency.bind("live", 10, A, 2, hours=1)
    past = utcnow() - datetime.timedelta(hours=2)
    IdempotencyKey.update(expires=past).where(IdempotencyKey.key == "old").execute()
    assert idempotency.find("old", 10) is None
    assert int(idempotency.bind("old", 10, B, 3, hours=1).job_id) == 3  # replaced, not 409
    IdempotencyKey.update(expires=past).where(IdempotencyKey.key == "old").execute()
    assert idempotency.expire() == 1
    assert [row.key for row in IdempotencyKey.select()] == ["live"]


def test_unbinding_frees_a_key_whose_job_never_started(ingest_db):
    idempotency.bind("k", 10, A, 7, hours=1)
    assert idempotency.unbind(7) == 1
    assert int(idempotency.bind("k", 10, B, 8, hours=1).job_id) == 8


# -- events ------------------------------------------------------------------------------

def test_a_cloud_event_has_the_required_attributes():
    event = events.cloud_event(events.JOB_OK, "ingest", "projects/p/jobs/1", {"job": {"job_id": 1}}, "p")
    assert event["specversion"] == "1.0" and event["type"] == "job.ok" and event["source"] == "/labvault/ingest"
    assert event["subject"] == "projects/p/jobs/1" and event["datacontenttype"] == "application/json"
    assert event["labvaultproject"] == "p" and len(event["id"]) == 36
    assert datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).tzinfo is not None
    with pytest.raises(ValueError):
        events.cloud_event("job.exploded", "ingest", "x", {})


def test_the_signature_is_the_hmac_of_the_exact_body():
    event = events.cloud_event(events.STATS_BUILT, "stats", "projects/é", {"project": "é"}, "é")
    body = events.body_of(event)
    assert json.loads(body) == event
    expected = hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert events.sign("secret", body) == "sha256=" + expected
    assert events.sign("secret", body + b" ") != events.sign("secret", body)


def test_event_types_are_checked():
    assert events.parse_types("job.ok, stats.built,job.ok") == ["job.ok", "stats.built"]
    for bad in ("", "job.ok,nope", ",,"):
        with pytest.raises(ValueError):
            events.parse_types(bad)


def test_publishing_never_raises_for_a_bad_event(tmp_path):
    settings = make_settings(tmp_path)
    assert events.publish(settings, "no.such.type", "ingest", "x", {}) is None
    assert events.publish(settings, events.JOB_OK, "ingest", "x", {"not json": object()}) is None


# -- subscriptions -----------------------------------------------------------------------

def test_urls_are_http_or_https_with_a_host():
    assert webhooks.check_url(" https://lims.example.org/hook ") == "https://lims.example.org/hook"
    for bad in ("ftp://x/y", "file:///etc/passwd", "http://", "javascript:alert(1)", "https://" + "a" * 2000):
        with pytest.raises(BadRequest):
            webhooks.check_url(bad)


def test_events_go_to_the_enabled_subscriptions_that_match(ingest_db):
    all_jobs = webhooks.add("http://a/", ["job.ok", "job.failed"])
    of_p = webhooks.add("http://b/", ["job.ok"], project="p")
    of_user = webhooks.add("http://c/", ["job.ok"], project="p", owner=11)
    admin_all = webhooks.add("http://d/", ["job.ok"], owner=10)
    stats_only = webhooks.add("http://e/", ["stats.built"])
    off = webhooks.add("http://f/", ["job.ok"])
    webhooks.set_enabled(off.id, False)
    visible = {(10, "p"), (10, "q")}

    def targets(event):
        return [row.id for row in webhooks.matching(event, lambda user, project: (user, project) in visible)]

    ok_p = events.cloud_event(events.JOB_OK, "ingest", "projects/p/jobs/1", {"owner": 11}, "p")
    assert targets(ok_p) == [all_jobs.id, of_p.id, admin_all.id]  # user 11 no longer sees p
    visible.add((11, "p"))
    assert targets(ok_p) == [all_jobs.id, of_p.id, of_user.id, admin_all.id]
    failed_q = events.cloud_event(events.JOB_FAILED, "ingest", "projects/q/jobs/2", {}, "q")
    assert targets(failed_q) == [all_jobs.id]
    no_project = events.cloud_event(events.JOB_OK, "ingest", "jobs/3", {"owner": 10})
    assert targets(no_project) == [all_jobs.id, admin_all.id]  # an event of no project: its owner's
    built = events.cloud_event(events.STATS_BUILT, "stats", "projects/q", {}, "q")
    assert targets(built) == [stats_only.id]


def test_a_made_secret_is_long_and_a_given_one_is_checked(ingest_db):
    assert webhooks.add("http://a/", ["job.ok"]).secret.startswith("whsec_")
    with pytest.raises(BadRequest):
        webhooks.add("http://a/", ["job.ok"], secret="short")


def test_enabling_resets_the_failure_count(ingest_db):
    row = webhooks.add("http://a/", ["job.ok"])
    Subscription.update(failures=9, enabled=False, disabled_at=utcnow()).where(Subscription.id == row.id).execute()
    row = webhooks.set_enabled(row.id, True)
    assert (row.enabled, row.failures, row.disabled_at) == (True, 0, None)


def test_backoff_doubles_from_retry_delay_up_to_its_cap(tmp_path):
    settings = make_settings(tmp_path, events={"retry_delay": "2", "retry_max_delay": "20"})
    assert [webhooks.backoff(settings, attempt) for attempt in range(1, 7)] == [2, 4, 8, 16, 20, 20]
    assert webhooks.backoff(settings, 10_000) == 20


def test_a_disabled_or_removed_subscription_receives_nothing(ingest_db, tmp_path):
    settings = make_settings(tmp_path)
    row = webhooks.add("http://127.0.0.1:9/never", ["job.ok"])
    webhooks.set_enabled(row.id, False)
    event = events.cloud_event(events.JOB_OK, "ingest", "jobs/1", {})
    assert webhooks.deliver(settings, row.id, event) == webhooks.SKIPPED
    webhooks.remove(row.id)
    assert webhooks.deliver(settings, row.id, event) == webhooks.SKIPPED
    assert Delivery.select().count() == 0


def test_old_delivery_records_are_forgotten(ingest_db):
    Delivery.create(subscription=1, event_id="e1", event_type="job.ok", attempt=1, status=200,
                    at=utcnow() - datetime.timedelta(days=40))
    Delivery.create(subscription=1, event_id="e2", event_type="job.ok", attempt=1, status=200, at=utcnow())
    assert webhooks.forget_deliveries(30) == 1
    assert [row.event_id for row in Delivery.select()] == ["e2"]


def test_the_reaper_forgets_expired_keys_and_old_deliveries(ingest_db, tmp_path):
    from ingest_service import reaper
    idempotency.bind("gone", 10, A, 1, hours=1)
    idempotency.bind("kept", 10, A, 2, hours=1)
    IdempotencyKey.update(expires=utcnow() - datetime.timedelta(seconds=1)).where(
        IdempotencyKey.key == "gone").execute()
    Delivery.create(subscription=1, event_id="e1", event_type="job.ok", attempt=1, status=500,
                    at=utcnow() - datetime.timedelta(days=3))
    reaper.forget(make_settings(tmp_path, events={"keep_days": "2"}))
    assert [row.key for row in IdempotencyKey.select()] == ["kept"]
    assert Delivery.select().count() == 0


def test_start_staged_binds_replays_and_refuses_for_any_path_that_staged_a_bundle(ingest_db, tmp_path):
    """What a finished upload of any kind goes through; without a digest it hashes the staged bundle."""
    from ingest_service import jobs
    from ingest_service.services import IngestService
    from ingest_service.staging import Staging
    settings = make_settings(tmp_path)
    staging = Staging(tmp_path / "staging")
    enqueued: list[int] = []
    service = IngestService(settings, None, staging, enqueued.append)

    def staged_job(job_id: int, raw: bytes) -> None:
        jobs.create(job_id)
        staging.root.mkdir(parents=True, exist_ok=True)
        staging.bundle_path(job_id).write_bytes(raw)

    key = idempotency.Request(key="tus-1")
    staged_job(1, b"bundle one")
    assert service.start_staged(1, None, idempotent=key)["job_id"] == 1
    staged_job(2, b"bundle one")
    assert service.start_staged(2, hashlib.sha256(b"bundle one").hexdigest(), idempotent=key)["job_id"] == 1
    assert jobs.find(2) is None and not staging.bundle_path(2).exists()
    staged_job(3, b"bundle two")
    with pytest.raises(idempotency.KeyReused):
        service.start_staged(3, None, idempotent=key)
    assert jobs.find(3) is None and not staging.bundle_path(3).exists()
    assert enqueued == [1]
    # A job whose queue is unreachable frees its key for the retry.
    def refuse(_job_id):
        raise ConnectionError("broker down")
    service.enqueue = refuse
    staged_job(4, b"bundle four")
    with pytest.raises(Exception) as caught:
        service.start_staged(4, None, idempotent=idempotency.Request(key="tus-4"))
    assert getattr(caught.value, "code", "") == "broker_unavailable"
    assert idempotency.find("tus-4", idempotency.ANYONE) is None
    assert jobs.get(4).state == "FAILED"
