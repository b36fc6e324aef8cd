"""Requests built to break things, against every route of every service on real servers (both
worlds: CherryPy's server under ``labvault up``, and uWSGI): each gets a fast, clean answer.

Property-based (hypothesis, a bounded number of examples so CI stays quick): integers beyond any
database column wherever a number is parsed, deeply nested JSON, control characters and bytes
that are not UTF-8 in paths, malformed, negative or absurd ``Content-Length``, and a huge
declared body from a client without credentials. Every answer: no 5xx, the JSON error shape for
an error, no traceback, no server path, and within a second.

The stack runs in token mode with a service token, so the requests that carry credentials reach
the handlers, and the ones that do not show that a stranger's body is never read.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from common.auth import SERVICE_TOKEN_HEADER
from tests.helpers import REPO, seeded, stack_kind

SERVICE_TOKEN = "hostile-requests-service-token"
ANSWER_WITHIN = 1.0
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# (service, method, path with {n} where a number is parsed). Mutating routes name tables and
# ids nothing else in this stack depends on.
ROUTES = [
    ("ingest", "GET", "/"),
    ("ingest", "GET", "/get_state/{n}"),
    ("ingest", "GET", "/get_state?job_id={n}"),
    ("ingest", "HEAD", "/get_state/{n}"),
    ("ingest", "POST", "/ingest"),
    ("ingest", "POST", "/upload"),
    ("ingest", "POST", "/move"),
    ("ingest", "POST", "/uploads/"),
    ("ingest", "GET", "/uploads/{n}"),
    ("ingest", "HEAD", "/uploads/{n}"),
    ("ingest", "PATCH", "/uploads/{n}"),
    ("ingest", "DELETE", "/uploads/{n}"),
    ("metadata", "GET", "/"),
    ("metadata", "GET", "/getid?range={n}&mode=file"),
    ("metadata", "GET", "/users?_id={n}"),
    ("metadata", "GET", "/files?page_number={n}&items_per_page={n}"),
    ("metadata", "GET", "/transactions?_id={n}&items_per_page=5"),
    ("metadata", "PUT", "/ingest"),
    ("metadata", "PUT", "/keys"),
    ("metadata", "POST", "/keys?_id={n}"),
    ("metadata", "DELETE", "/values?_id={n}"),
    ("archive", "GET", "/"),
    ("archive", "GET", "/{n}"),
    ("archive", "HEAD", "/{n}"),
    ("archive", "PUT", "/{n}"),
    ("archive", "PATCH", "/{n}"),
    ("archive", "DELETE", "/{n}"),
    ("archive", "POST", "/{n}"),
    ("policy", "GET", "/"),
    ("policy", "POST", "/ingest"),
    ("policy", "POST", "/uploader"),
    ("stats", "GET", "/"),
]
NUMBERED = [route for route in ROUTES if "{n}" in route[2]]
WITH_BODY = [route for route in ROUTES if route[1] in ("POST", "PUT", "PATCH")]
# Routes whose body is JSON (the others take a tar, file bytes, or nothing).
JSON_BODY = [route for route in WITH_BODY
             if route[:2] not in (("ingest", "POST"), ("archive", "PUT"), ("archive", "POST")) or route[2] == "/move"]
GUARDED = [route for route in ROUTES if route[2] != "/"]  # every route but the open health answer

BOUNDARIES = [0, -1, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 40,
              -(10 ** 40), 10 ** 400]
NUMBERS = st.one_of(st.sampled_from(BOUNDARIES), st.integers(min_value=-(10 ** 30), max_value=10 ** 30))
BAD_LENGTHS = ["-1", "-0", "abc", "1e3", "0x10", "+5", "5 5", "١٢", "²", "1" * 30, str(2 ** 64), str(10 ** 17),
               "99999999999999999999999999999999999999999"]


@pytest.fixture(scope="module", params=["embedded", "production"])
def hostile(request, tmp_path_factory):
    """A stack of its own (these requests try to break it), in token mode, with an ingest token."""
    kind = stack_kind(request.param)
    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with seeded(kind(root, auth={"mode": "token", "service_token": SERVICE_TOKEN})) as running:
        running.token = running.cli("token", "create", "--user", "10").stdout.strip()
        yield running


def credentials(stack, service: str) -> dict[str, str]:
    if service == "ingest":
        return {"Authorization": f"Bearer {stack.token}"}
    return {SERVICE_TOKEN_HEADER: SERVICE_TOKEN}


def send(stack, service: str, method: str, target: bytes, headers: dict[str, str], body: bytes = b"") -> tuple:
    """One request over a raw socket (so nothing in between fixes it); (status, headers, body, seconds)."""
    parts = urlsplit(stack.url(service))
    head = [method.encode() + b" " + target + b" HTTP/1.1", f"Host: {parts.hostname}".encode()]
    head += [f"{name}: {value}".encode("utf-8") for name, value in headers.items()]
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=ANSWER_WITHIN * 3) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock, method=method)
        try:
            response.begin()
            content = response.read()
        except (socket.timeout, TimeoutError):
            pytest.fail(f"{method} {target[:80]!r} on {service}: no answer within {ANSWER_WITHIN * 3}s")
        return response.status, dict(response.getheaders()), content, time.monotonic() - started


def check(stack, answer: tuple, method: str, what: str, client_error: bool = True) -> None:
    status, headers, content, seconds = answer
    assert status < 500, f"{what}: {status} {content[:300]!r}"
    if client_error:
        assert 400 <= status < 500, f"{what}: {status} {content[:300]!r}"
    assert seconds < ANSWER_WITHIN, f"{what}: answered after {seconds:.2f}s"
    text = content.decode("utf-8", "replace")
    for leak in ("Traceback", str(REPO), str(stack.data_dir), "site-packages", 'File "'):
        assert leak not in text, f"{what}: the answer shows {leak!r}: {text[:300]}"
    if status >= 400 and method != "HEAD":
        document = json.loads(content)
        assert set(document) == {"status", "code", "message"} and document["status"].startswith(str(status)), \
            f"{what}: {text[:300]}"


@EXAMPLES
@given(route=st.sampled_from(NUMBERED), number=NUMBERS)
def test_integers_beyond_any_column_wherever_a_number_is_parsed(hostile, route, number):
    service, method, path = route
    target = path.replace("{n}", str(number)).encode()
    body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
    answer = send(hostile, service, method, target,
                  {**credentials(hostile, service), "Content-Length": str(len(body)),
                   "Content-Type": "application/json"}, body)
    check(hostile, answer, method, f"{method} {target[:80]!r} on {service}", client_error=False)


@EXAMPLES
@given(route=st.sampled_from(JSON_BODY), depth=st.integers(min_value=50, max_value=200_000),
       opener=st.sampled_from(["[", '{"a":']))
def test_deeply_nested_json(hostile, route, depth, opener):
    service, method, path = route
    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + closer * depth).encode()
    target = path.replace("{n}", "77").encode()
    answer = send(hostile, service, method, target,
                  {**credentials(hostile, service), "Content-Length": str(len(body)),
                   "Content-Type": "application/json"}, body)
    check(hostile, answer, method, f"{method} {target!r} on {service} nested {depth} deep")


JUNK = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1f), min_size=1, max_size=8),
    st.sampled_from(["\x00", "%00", "a%00b", "%ff%fe", "%c0%af", "%ed%a0%80", "\x7f", "%0d%0a", "..%2f..%2f"]),
    st.binary(min_size=1, max_size=8).map(lambda raw: quote(raw, safe="")),
)


@EXAMPLES
@given(route=st.sampled_from(ROUTES), junk=JUNK, where=st.sampled_from(["path", "query"]))
def test_nul_bytes_and_invalid_characters_in_paths(hostile, route, junk, where):
    service, method, path = route
    path = path.replace("{n}", "5")
    if where == "path":
        target = path.split("?")[0].rstrip("/") + "/" + junk
    else:
        target = path + ("&" if "?" in path else "?") + "x=" + junk
    # Sent as it is (raw control characters too): a server must cope with what arrives.
    raw = target.encode("utf-8", "surrogateescape").replace(b" ", b"%20").replace(b"\r", b"%0d").replace(b"\n", b"%0a")
    answer = send(hostile, service, method, raw, {**credentials(hostile, service), "Content-Length": "0"})
    # A junk segment may also be a well-formed id or name that does not exist: any 4xx is fine,
    # and a harmless query parameter may even be ignored (2xx).
    check(hostile, answer, method, f"{method} {raw[:80]!r} on {service}", client_error=False)


@EXAMPLES
@given(route=st.sampled_from(WITH_BODY), length=st.one_of(
    st.sampled_from(BAD_LENGTHS), st.integers(min_value=2 ** 50 + 1, max_value=10 ** 30).map(str)))
def test_malformed_negative_or_absurd_content_length(hostile, route, length):
    service, method, path = route
    target = path.replace("{n}", "78").encode()
    answer = send(hostile, service, method, target, {**credentials(hostile, service), "Content-Length": length,
                                                     "Content-Type": "application/json"})
    check(hostile, answer, method, f"{method} {target!r} on {service} with Content-Length {length[:40]!r}")


@EXAMPLES
@given(route=st.sampled_from(GUARDED), length=st.integers(min_value=10 ** 9, max_value=2 ** 50))
def test_a_huge_body_from_a_stranger_is_refused_at_once_and_never_read(hostile, route, length):
    service, method, path = route
    target = path.replace("{n}", "79").encode()
    # No body follows the headers: an answer within the second means nothing waited for it.
    answer = send(hostile, service, method, target, {"Content-Length": str(length),
                                                     "Content-Type": "application/octet-stream"})
    check(hostile, answer, method, f"{method} {target!r} on {service} without credentials")
    assert answer[0] == 401, answer
