"""Identity modes: open, token (Bearer or Basic password), proxy (header only from the proxy)."""
import base64

import pytest

from common.auth import (
    OPEN,
    Authenticator,
    Identity,
    Unauthorized,
    new_token,
    token_digest,
)
from common.settings import SettingsError

TOKEN = new_token()
TOKENS = {token_digest(TOKEN): 11}
NAMES = {"bjohn": 11, "dmlb2001": 10, "10": 10}


def authenticator(mode, **options):
    return Authenticator(mode, user_for_token=TOKENS.get, user_for_name=NAMES.get,
                         is_admin=lambda user: user == 10, **options)


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_open_mode_is_anyone():
    assert authenticator("open").identify({}, "203.0.113.9") == OPEN
    assert OPEN.may_see(10) and OPEN.may_see(None)


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer  {TOKEN}", basic("bjohn", TOKEN), basic("", TOKEN)])
def test_token_mode_accepts_bearer_and_basic_password(header):
    assert authenticator("token").identify({"Authorization": header}, "127.0.0.1") == Identity(11, False)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": basic("u", "nope")},
                                     {"Authorization": "Basic !!!"}, {"Authorization": "Digest x"}])
def test_token_mode_refuses_everything_else(headers):
    with pytest.raises(Unauthorized) as caught:
        authenticator("token").identify(headers, "127.0.0.1")
    assert caught.value.status == 401 and caught.value.code == "unauthorized"


def test_proxy_header_counts_only_from_the_proxy():
    auth = authenticator("proxy", proxy_addresses=["10.0.0.0/8", "127.0.0.1"])
    assert auth.identify({"X-Remote-User": "dmlb2001"}, "10.1.2.3") == Identity(10, True)
    assert auth.identify({"X-Remote-User": "bjohn"}, "127.0.0.1") == Identity(11, False)
    for headers, address in (({"X-Remote-User": "dmlb2001"}, "192.0.2.1"), ({}, "10.1.2.3"),
                             ({"X-Remote-User": "nobody"}, "10.1.2.3"), ({"X-Remote-User": "x"}, "not-an-ip")):
        with pytest.raises(Unauthorized):
            auth.identify(headers, address)


def test_visibility():
    user, admin = Identity(11), Identity(10, admin=True)
    assert user.may_see(11) and not user.may_see(10)
    # A job made while the deployment ran in open mode (no owner) is an admin's only.
    assert not user.may_see(None) and admin.may_see(None)
    assert admin.may_see(11)
    assert OPEN.may_see(None) and OPEN.may_see(11)


def test_bad_configuration_is_a_settings_error():
    with pytest.raises(SettingsError):
        authenticator("kerberos")
    with pytest.raises(SettingsError):
        authenticator("proxy")
    with pytest.raises(SettingsError):
        authenticator("proxy", proxy_addresses=["not/an/address"])


def test_tokens_are_random_and_stored_as_digests():
    assert new_token() != new_token() and TOKEN.startswith("lv_")
    assert len(token_digest(TOKEN)) == 64 and TOKEN not in token_digest(TOKEN)
