"""Identity on the ingest service: token mode and proxy mode, with real servers and a worker."""
import base64

import pytest
import requests

from tests.helpers import Stack, fixture_bundle, seeded, wait_for


@pytest.fixture(scope="module")
def token_stack(tmp_path_factory):
    with seeded(Stack(tmp_path_factory.mktemp("token"), auth={"mode": "token"})) as stack:
        stack.tokens = {user: stack.cli("token", "create", "--user", str(user)).stdout.strip()
                        for user in (10, 11)}
        yield stack


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def post(stack, raw: bytes, headers: dict) -> requests.Response:
    return requests.post(stack.url("ingest") + "/ingest", data=raw, timeout=60,
                         headers={"Content-Type": "application/octet-stream", **headers})


def state(stack, job_id: int, headers: dict) -> requests.Response:
    return requests.get(stack.url("ingest") + "/get_state", params={"job_id": job_id}, headers=headers, timeout=10)


def wait_final(stack, job_id: int, headers: dict) -> dict:
    return wait_for(lambda: (lambda s: s if s.get("complete") else None)(state(stack, job_id, headers).json()),
                    timeout=90, message=f"job {job_id}")


def test_no_token_is_401_and_creates_no_job(token_stack):
    before = requests.get(f"{token_stack.url('metadata')}/getid", params={"mode": "upload_job", "range": 1}, timeout=10).json()
    for headers in ({}, bearer("lv_not-a-token"), {"Authorization": "Basic !!"}):
        response = post(token_stack, fixture_bundle("good-md.json"), headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
        assert "Bearer" in response.headers.get("WWW-Authenticate", "")
    after = requests.get(f"{token_stack.url('metadata')}/getid", params={"mode": "upload_job", "range": 1}, timeout=10).json()
    assert after["startIndex"] == before["startIndex"] + 1  # no job id was taken in between
    assert state(token_stack, 1, {}).status_code == 401


def test_a_user_uploads_as_themselves_and_sees_only_their_jobs(token_stack):
    own = bearer(token_stack.tokens[10])
    response = post(token_stack, fixture_bundle("good-md.json"), own)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    final = wait_final(token_stack, job_id, own)
    assert (final["state"], final["task"]) == ("OK", "ingest metadata")
    # User 11 is not an admin: user 10's job does not exist for them.
    other = state(token_stack, job_id, bearer(token_stack.tokens[11]))
    assert other.status_code == 404 and other.json()["code"] == "job_not_found"
    assert state(token_stack, job_id, {}).status_code == 401


def test_a_token_of_user_11_uploading_as_submitter_10_is_rejected(token_stack):
    theirs = bearer(token_stack.tokens[11])
    response = post(token_stack, fixture_bundle("good-md.json"), theirs)
    assert response.status_code == 200, response.text
    final = wait_final(token_stack, response.json()["job_id"], theirs)
    assert (final["state"], final["task"]) == ("FAILED", "Policy Validation")
    assert final["exception"].startswith("policy_denied: ")
    assert "not the authenticated uploader 11" in final["exception"]


def test_idempotency_keys_are_per_uploader(token_stack):
    """User 11 sending user 10's key makes their own job: a key never reveals another user's job."""
    mine, theirs = bearer(token_stack.tokens[10]), bearer(token_stack.tokens[11])
    raw = fixture_bundle("good-md.json")
    first = post(token_stack, raw, {**mine, "Idempotency-Key": "shared-key"})
    again = post(token_stack, raw, {**mine, "Idempotency-Key": "shared-key"})
    other = post(token_stack, raw, {**theirs, "Idempotency-Key": "shared-key"})
    assert [r.status_code for r in (first, again, other)] == [200, 200, 200], other.text
    assert again.json()["job_id"] == first.json()["job_id"] != other.json()["job_id"]
    wait_final(token_stack, first.json()["job_id"], mine)
    wait_final(token_stack, other.json()["job_id"], theirs)


def test_basic_auth_with_the_token_as_password_works(token_stack):
    """How Pacifica clients authenticate: requests' auth=(user, password)."""
    basic = "Basic " + base64.b64encode(f"dmlb2001:{token_stack.tokens[10]}".encode()).decode()
    response = post(token_stack, fixture_bundle("good-md.json"), {"Authorization": basic})
    assert response.status_code == 200, response.text
    assert wait_final(token_stack, response.json()["job_id"], {"Authorization": basic})["state"] == "OK"


def test_revoked_token_is_refused(token_stack):
    extra = token_stack.cli("token", "create", "--user", "11", "--label", "spare").stdout.strip()
    assert post(token_stack, b"", bearer(extra)).status_code != 401
    token_id = next(line.split()[0] for line in token_stack.cli("token", "list", "--user", "11").stdout.splitlines()
                    if line.rstrip().endswith("spare"))
    token_stack.cli("token", "revoke", token_id)
    assert post(token_stack, b"", bearer(extra)).status_code == 401


def test_a_forged_proxy_header_from_elsewhere_is_ignored(tmp_path):
    # The configured proxy is an address this test never comes from.
    with seeded(Stack(tmp_path / "p1", auth={"mode": "proxy", "proxy_addresses": "192.0.2.10"})) as stack:
        response = post(stack, fixture_bundle("good-md.json"), {"X-Remote-User": "dmlb2001"})
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"


def test_the_proxy_names_the_user(tmp_path):
    with seeded(Stack(tmp_path / "p2", auth={"mode": "proxy", "proxy_addresses": "127.0.0.1"})) as stack:
        headers = {"X-Remote-User": "bjohn"}  # user 11, not admin, not a member of 1234a
        response = post(stack, fixture_bundle("good-md.json"), headers)
        assert response.status_code == 200, response.text
        final = wait_final(stack, response.json()["job_id"], headers)
        assert (final["state"], final["task"]) == ("FAILED", "Policy Validation")
        assert state(stack, final["job_id"], {"X-Remote-User": "dmlb2001"}).status_code == 200  # admin
        assert state(stack, final["job_id"], {}).status_code == 401
