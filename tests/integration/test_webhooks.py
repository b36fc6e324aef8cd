"""Webhook events end to end: a receiving server started here gets signed CloudEvents when jobs end
and when a project's stats and computed files are built; a server answering 500 gets retries with
growing delays until the subscription is disabled, and re-enabling it delivers again.

The suite runs with ``[events] retry_delay = 1`` and ``disable_after = 3``, so the whole
retry-and-disable cycle takes about three seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import fixture_bundle, new_project, payload_bundle, seeded, stack_kind, wait_for

RETRY_DELAY = 1.0
DISABLE_AFTER = 3
SECRET = "s3cret-for-the-tests"


class Receiver:
    """A small HTTP server recording every POST (arrival time, headers, raw body); answers ``status``."""

    def __init__(self, status: int = 204):
        self.status = status
        self.received: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append({"at": time.monotonic(), "headers": dict(self.headers),
                                              "body": body, "path": self.path})
                    status = receiver.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(entry["body"]) for entry in self.received]

    def wait(self, predicate, timeout: float = 90, message: str = "an event") -> dict:
        """The first received entry (with its parsed ``event``) that ``predicate(event)`` accepts."""
        def found():
            with self.lock:
                entries = list(self.received)
            for entry in entries:
                event = json.loads(entry["body"])
                if predicate(event):
                    return {**entry, "event": event}
            return None
        return wait_for(found, timeout=timeout, interval=0.1, message=message)


@pytest.fixture(scope="module", params=["embedded", "production"])
def events_stack(request, tmp_path_factory):
    """The suite with quick retries, in each of its two worlds (as the shared ``stack`` fixture)."""
    kind = stack_kind(request.param)
    root = tmp_path_factory.mktemp(f"events-{request.param}")
    stack = kind(root, events={"retry_delay": str(RETRY_DELAY), "disable_after": str(DISABLE_AFTER),
                               "retry_max_delay": "5", "timeout": "5"})
    with seeded(stack) as running:
        yield running


def add_webhook(stack, url: str, events: str, *extra: str) -> int:
    done = stack.cli("webhook", "add", url, "--events", events, *extra)
    return int(done.stdout.split()[1])


def subscription(stack, subscription_id: int) -> dict:
    rows = json.loads(stack.cli("webhook", "list", "--json").stdout)
    return next(row for row in rows if row["id"] == subscription_id)


def verify(entry: dict, secret: str = SECRET) -> None:
    expected = "sha256=" + hmac.new(secret.encode(), entry["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(entry["headers"]["X-Labvault-Signature"], expected)
    assert entry["headers"]["Content-Type"] == "application/cloudevents+json"


def test_signed_events_for_an_ok_job_and_a_failed_one(events_stack):
    stack = events_stack
    with Receiver() as receiver:
        hook = add_webhook(stack, receiver.url, "job.ok,job.failed", "--secret", SECRET)
        try:
            ok = stack.ingest(payload_bundle({"a/x.txt": b"hello events\n"}))
            failed = stack.ingest(fixture_bundle("bad-hashsum-md.json"))
            assert (ok["state"], failed["state"]) == ("OK", "FAILED")

            got_ok = receiver.wait(lambda e: e["type"] == "job.ok" and e["data"]["job"]["job_id"] == ok["job_id"])
            got_failed = receiver.wait(lambda e: e["type"] == "job.failed"
                                       and e["data"]["job"]["job_id"] == failed["job_id"])
            for entry in (got_ok, got_failed):
                verify(entry)
                event = entry["event"]
                assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"
                assert event["source"] == "/labvault/ingest" and event["id"] and event["time"].endswith("Z")
                assert event["labvaultproject"] == "1234a"
            assert got_ok["event"]["subject"] == f"projects/1234a/jobs/{ok['job_id']}"
            assert got_ok["event"]["data"]["job"] == stack.state(ok["job_id"])
            assert got_ok["event"]["data"]["added"]["transaction"] == ok["job_id"]
            assert got_ok["event"]["data"]["added"]["files"] == 1
            assert got_failed["event"]["data"]["job"]["exception"].startswith("hash_mismatch: ")
            assert got_failed["event"]["data"]["added"] is None
            # A wrong secret does not verify: the signature covers the exact bytes with this secret.
            with pytest.raises(AssertionError):
                verify(got_ok, secret="another secret")
            deliveries = json.loads(stack.cli("webhook", "deliveries", str(hook), "--json").stdout)
            assert {(row["type"], row["status"], row["attempt"]) for row in deliveries} >= {
                ("job.ok", 204, 1), ("job.failed", 204, 1)}
        finally:
            stack.cli("webhook", "remove", str(hook))


def test_a_job_failed_by_hand_is_announced(events_stack):
    stack = events_stack
    with Receiver() as receiver:
        hook = add_webhook(stack, receiver.url, "job.failed", "--secret", SECRET)
        try:
            ok = stack.ingest(payload_bundle({"c/v.txt": b"failed later by an admin\n"}))
            stack.cli("job", "--job-id", str(ok["job_id"]), "--state", "FAILED", "--task", "ingest metadata",
                      "--force")
            entry = receiver.wait(lambda e: e["data"]["job"]["job_id"] == ok["job_id"], message="job.failed")
            verify(entry)
            assert entry["event"]["type"] == "job.failed"
            assert entry["event"]["data"]["job"]["exception"].startswith("failed_by_admin: ")
            assert not [e for e in receiver.events() if e["type"] != "job.failed"]
        finally:
            stack.cli("webhook", "remove", str(hook))


def test_failing_server_gets_backoff_then_the_subscription_is_disabled_and_can_be_enabled(events_stack):
    stack = events_stack
    with Receiver(status=500) as receiver:
        hook = add_webhook(stack, receiver.url, "job.ok", "--secret", SECRET)
        try:
            first = stack.ingest(payload_bundle({"b/y.txt": b"retry me\n"}))
            wait_for(lambda: not subscription(stack, hook)["enabled"], timeout=60, interval=0.3,
                     message="the subscription to be disabled")
            row = subscription(stack, hook)
            assert row["failures"] == DISABLE_AFTER and "HTTP 500" in row["last_error"]
            assert row["disabled_at"]
            attempts = [entry for entry in receiver.received
                        if json.loads(entry["body"])["data"]["job"]["job_id"] == first["job_id"]]
            assert len(attempts) == DISABLE_AFTER
            assert len({json.loads(entry["body"])["id"] for entry in attempts}) == 1  # one event, tried again
            gaps = [later["at"] - earlier["at"] for earlier, later in zip(attempts, attempts[1:])]
            assert gaps[0] >= RETRY_DELAY * 0.9 and gaps[1] >= 2 * RETRY_DELAY * 0.9, gaps
            assert gaps[1] > gaps[0], gaps
            for entry in attempts:
                verify(entry)

            # Disabled: a new event does not reach it. An enabled subscription to the same event
            # shows when the fan-out has happened (both are enqueued by one task).
            receiver.status = 200
            with Receiver() as control:
                watcher = add_webhook(stack, control.url, "job.ok", "--secret", SECRET)
                quiet = stack.ingest(payload_bundle({"b/z.txt": b"nobody hears\n"}))
                control.wait(lambda e: e["data"]["job"]["job_id"] == quiet["job_id"], message="the control")
                stack.cli("webhook", "remove", str(watcher))
            assert not [e for e in receiver.events() if e["data"]["job"]["job_id"] == quiet["job_id"]]

            stack.cli("webhook", "enable", str(hook))
            row = subscription(stack, hook)
            assert row["enabled"] and row["failures"] == 0
            again = stack.ingest(payload_bundle({"b/w.txt": b"heard again\n"}))
            verify(receiver.wait(lambda e: e["data"]["job"]["job_id"] == again["job_id"], message="re-enabled delivery"))
            wait_for(lambda: subscription(stack, hook)["last_error"] == "", timeout=30, interval=0.3,
                     message="the success to reset the subscription")
        finally:
            stack.cli("webhook", "remove", str(hook))


def test_stats_and_computed_files_built_are_announced_for_the_subscribed_project(events_stack):
    stack = events_stack
    project = new_project(stack, "events")
    with Receiver() as receiver:
        hook = add_webhook(stack, receiver.url, "stats.built,computed_file.built", "--project", project,
                           "--secret", SECRET)
        other = add_webhook(stack, receiver.url + "?other", "stats.built", "--project", "1234a", "--secret", SECRET)
        try:
            final = stack.ingest(payload_bundle({"tables/t.csv": b"gene,score\nA,1\nB,2\n"}, project=project))
            assert final["state"] == "OK"
            stats = receiver.wait(lambda e: e["type"] == "stats.built", timeout=120, message="stats.built")
            verify(stats)
            assert stats["event"]["subject"] == f"projects/{project}"
            assert stats["event"]["source"] == "/labvault/stats"
            assert stats["event"]["data"]["project"] == project and stats["event"]["data"]["totals"]["files"] == 1
            computed = receiver.wait(lambda e: e["type"] == "computed_file.built", timeout=120,
                                     message="computed_file.built")
            verify(computed)
            data = computed["event"]["data"]
            assert data["project"] == project and data["kind"] and data["sha256"]
            assert computed["event"]["subject"] == f"projects/{project}/computed_files/{data['id']}"
            # Only the subscribed project's events, and only the subscribed types.
            assert all(e["labvaultproject"] == project for e in receiver.events())
            assert not [e for e in receiver.events() if e["type"].startswith("job.")]
        finally:
            stack.cli("webhook", "remove", str(hook))
            stack.cli("webhook", "remove", str(other))


def test_webhook_commands_refuse_what_is_wrong(events_stack):
    stack = events_stack
    for args, words in [
        (("add", "ftp://example.org/x", "--events", "job.ok"), "http"),
        (("add", "http://127.0.0.1:9/x", "--events", "job.ok,job.exploded"), "job.exploded"),
        (("add", "http://127.0.0.1:9/x"), "--events"),
        (("add", "http://127.0.0.1:9/x", "--events", "job.ok", "--project", "no-such-project"), "no project"),
        (("add", "http://127.0.0.1:9/x", "--events", "job.ok", "--user", "999999"), "no user"),
        # User 11 of the seed is neither a member of project 1234a nor an admin (user 10 is both).
        (("add", "http://127.0.0.1:9/x", "--events", "job.ok", "--user", "11", "--project", "1234a"), "may not see"),
        (("add", "http://127.0.0.1:9/x", "--events", "job.ok", "--user", "11"), "not an admin"),
        (("enable", "424242"), "no webhook subscription"),
        (("remove", "nope"), "id"),
    ]:
        done = stack.cli("webhook", *args, check=False)
        assert done.returncode != 0, args
        assert words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    member = stack.cli("webhook", "add", "http://127.0.0.1:9/x", "--events", "job.ok", "--user", "10",
                       "--project", "1234a", "--secret", SECRET)
    stack.cli("webhook", "remove", member.stdout.split()[1])
    # Without --secret a secret is made and shown once.
    done = stack.cli("webhook", "add", "http://127.0.0.1:9/x", "--events", "job.ok")
    hook = int(done.stdout.split()[1])
    assert "secret: whsec_" in done.stdout
    listed = stack.cli("webhook", "list").stdout
    assert "whsec_" not in listed and f"{hook}  enabled" in listed
    stack.cli("webhook", "disable", str(hook))
    assert not subscription(stack, hook)["enabled"]
    stack.cli("webhook", "remove", str(hook))
    with contextlib.suppress(StopIteration):
        subscription(stack, hook)
        raise AssertionError("removed subscription still listed")
