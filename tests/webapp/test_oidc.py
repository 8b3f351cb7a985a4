"""Sign in with an OpenID Connect provider, against a real provider running locally.

The provider (tests/oidc_provider.py) is built on authlib's server side: it
signs RS256 ID tokens, requires PKCE with S256 and checks the verifier, and
auto-approves as ``provider.user``. The browser's part is played by the Flask
test client (for Voltpay) and ``requests`` (for the provider); Voltpay talks
to the provider's token and JWKS endpoints over real HTTP.
"""

from __future__ import annotations

import secrets
import socket
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
import requests
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from sqlalchemy import func, select

from tests.oidc_provider import OidcProvider
from webapp import create_app
from webapp.models import OidcIdentity, User

CALLBACK = "http://localhost/auth/oidc/callback"
NOT_COMPLETED = "Sign-in with TestID did not complete. Please try again."
NOT_CONFIRMED = "TestID did not confirm your email address, so we cannot use it to sign you in. Sign up with your email instead."


@pytest.fixture(scope="module")
def oidc_provider():
    """The provider, started once for this module."""
    provider = OidcProvider(redirect_uris=(CALLBACK,)).start()
    yield provider
    provider.stop()


@pytest.fixture
def provider(oidc_provider):
    """The provider with the default user, no tampering and nothing recorded."""
    oidc_provider.reset()
    return oidc_provider


@pytest.fixture
def app_config(app_config, provider):
    """The shared settings, pointed at the local provider."""
    return {
        **app_config,
        "OIDC_ISSUER": provider.issuer,
        "OIDC_CLIENT_ID": provider.client_id,
        "OIDC_CLIENT_SECRET": provider.client_secret,
        "OIDC_NAME": "TestID",
    }


# --- the browser's part ---------------------------------------------------------------------


def start(client, provider) -> str:
    """Press "Continue with TestID": the URL of the provider's authorization page."""
    resp = client.post("/auth/oidc/start")
    assert resp.status_code == 302, resp.get_data(as_text=True)
    location = resp.headers["Location"]
    assert location.startswith(provider.issuer + "/authorize?")
    return location


def at_provider(location: str) -> str:
    """Visit the provider's authorization page; it approves and sends the browser back."""
    resp = requests.get(location, allow_redirects=False, timeout=5)
    assert resp.status_code == 302, resp.text
    back = resp.headers["Location"]
    assert back.startswith(CALLBACK + "?"), back
    return back


def sign_in_with_provider(client, provider):
    """The whole round trip; the response of Voltpay's callback."""
    return client.get(at_provider(start(client, provider)))


def follow(client, resp) -> str:
    """The page a redirect leads to (where flashed messages show)."""
    assert resp.status_code == 302, resp.get_data(as_text=True)
    page = client.get(resp.headers["Location"])
    assert page.status_code == 200
    return page.get_data(as_text=True)


def signed_in(client) -> bool:
    resp = client.get("/account/")
    assert resp.status_code in (200, 302)
    return resp.status_code == 200


def counts(app) -> tuple[int, int]:
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(func.count()).select_from(User)), s.scalar(select(func.count()).select_from(OidcIdentity))


def identities(app) -> list[tuple[int, str, str, str]]:
    with app.extensions["db_sessionmaker"]() as s:
        rows = s.execute(select(OidcIdentity.user_id, User.email, OidcIdentity.issuer, OidcIdentity.subject).join(User, User.id == OidcIdentity.user_id))
        return [tuple(r) for r in rows]


def get_user(app, email: str) -> User | None:
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(User).where(User.email == email))


# --- the tests ------------------------------------------------------------------------------


def test_first_sign_in_creates_a_verified_account_and_the_next_one_reuses_it(app, client, provider):
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/"
    assert "Signed in with TestID." in follow(client, resp)
    assert signed_in(client)
    user = get_user(app, "pat@example.com")
    assert user is not None and user.is_verified and user.password_hash is None
    assert identities(app) == [(user.id, "pat@example.com", provider.issuer, "provider-user-1")]

    client.post("/auth/sign-out")
    assert not signed_in(client)
    provider.user["email"] = "pat.new@example.com"  # changed at the provider: same person, same subject
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/" and signed_in(client)
    assert counts(app) == (1, 1)
    assert identities(app)[0][0] == user.id


def test_a_verified_email_links_to_the_existing_password_account(app, client, provider, make_user):
    existing = make_user("pat@example.com", password="correct horse staple")
    resp = sign_in_with_provider(client, provider)
    assert "Signed in with TestID." in follow(client, resp)
    assert signed_in(client)
    assert counts(app) == (1, 1)
    assert identities(app) == [(existing.id, "pat@example.com", provider.issuer, "provider-user-1")]

    client.post("/auth/sign-out")  # the password still works too
    resp = client.post("/auth/sign-in", data={"email": "pat@example.com", "password": "correct horse staple"})
    assert resp.status_code == 302 and signed_in(client)


def test_an_unconfirmed_account_someone_else_made_with_the_address_loses_its_password(app, client, provider, make_user):
    """Pre-hijacking: a stranger signs up with Pat's address (never confirmed); Pat then uses the provider."""
    make_user("pat@example.com", password="strangers secret pw", verified=False)
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/" and signed_in(client)
    user = get_user(app, "pat@example.com")
    assert user.is_verified and user.password_hash is None
    assert counts(app) == (1, 1)

    client.post("/auth/sign-out")
    resp = client.post("/auth/sign-in", data={"email": "pat@example.com", "password": "strangers secret pw"})
    assert resp.status_code == 400 and not signed_in(client)


@pytest.mark.parametrize("account_exists", [False, True], ids=["no-account", "account-with-that-email"])
def test_an_email_the_provider_has_not_verified_is_not_used(app, client, provider, make_user, account_exists):
    if account_exists:
        make_user("pat@example.com")
    provider.user["email_verified"] = False
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/auth/sign-up"
    assert NOT_CONFIRMED in follow(client, resp)
    assert not signed_in(client)
    assert counts(app) == (1 if account_exists else 0, 0)


def test_a_tampered_state_is_refused_before_the_code_is_used(app, client, provider):
    back = at_provider(start(client, provider))
    parts = urlsplit(back)
    query = parse_qs(parts.query)
    assert query["state"] == [provider.last_authorize["state"]]
    resp = client.get(f"{CALLBACK}?code={query['code'][0]}&state=forged-{query['state'][0]}")
    assert resp.headers["Location"] == "/auth/sign-in"
    assert NOT_COMPLETED in follow(client, resp)
    assert not signed_in(client)
    assert counts(app) == (0, 0)
    assert provider.token_requests == []  # the code was never redeemed


def test_a_callback_nobody_started_is_refused(app, client, provider):
    resp = client.get(f"{CALLBACK}?code=abc&state=never-issued")
    assert NOT_COMPLETED in follow(client, resp)
    assert not signed_in(client) and counts(app) == (0, 0)


def test_an_id_token_with_the_wrong_nonce_does_not_sign_in(app, client, provider):
    provider.wrong_nonce = True
    resp = sign_in_with_provider(client, provider)
    assert provider.token_requests[-1]["status"] == 200  # the provider answered; Voltpay refused its ID token
    assert resp.headers["Location"] == "/auth/sign-in"
    assert NOT_COMPLETED in follow(client, resp)
    assert not signed_in(client)
    assert counts(app) == (0, 0)


def test_pkce_s256_nonce_and_state_are_sent_and_the_verifier_matches(app, client, provider):
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/" and signed_in(client)
    sent = provider.last_authorize
    assert sent["response_type"] == "code" and sent["client_id"] == provider.client_id
    assert sent["redirect_uri"] == CALLBACK
    assert set(sent["scope"].split()) >= {"openid", "email"}
    assert sent["code_challenge_method"] == "S256"
    assert len(sent["code_challenge"]) == 43  # base64url of a SHA-256 digest
    assert len(sent["nonce"]) >= 16 and len(sent["state"]) >= 16

    [token_request] = provider.token_requests
    assert token_request["status"] == 200
    form = token_request["form"]
    assert form["grant_type"] == "authorization_code" and form["redirect_uri"] == CALLBACK
    assert create_s256_code_challenge(form["code_verifier"]) == sent["code_challenge"]
    assert token_request["basic_auth"] and "client_secret" not in form  # secret in the Authorization header only


def test_a_code_bound_to_another_pkce_challenge_is_refused(app, client, provider):
    provider.swap_code_challenge = True  # as if the code had been stolen by someone without the verifier
    resp = sign_in_with_provider(client, provider)
    [token_request] = provider.token_requests
    assert token_request["status"] == 400 and "code_verifier" in token_request["form"]
    assert resp.headers["Location"] == "/auth/sign-in"
    assert NOT_COMPLETED in follow(client, resp)
    assert not signed_in(client) and counts(app) == (0, 0)


def test_an_account_with_two_factor_still_asks_for_its_code(app, client, provider, make_user):
    secret = pyotp.random_base32()
    make_user("pat@example.com", totp_secret=secret)
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/auth/two-factor"
    assert not signed_in(client)
    assert client.get("/auth/two-factor").status_code == 200

    resp = client.post("/auth/two-factor", data={"code": pyotp.TOTP(secret).now()})
    assert resp.status_code == 302 and signed_in(client)


def test_a_closed_account_is_not_signed_in(app, client, provider, make_user):
    make_user("pat@example.com", is_active_account=False)
    resp = sign_in_with_provider(client, provider)
    assert resp.headers["Location"] == "/auth/sign-in"
    assert "This account is closed." in follow(client, resp)
    assert not signed_in(client) and counts(app) == (1, 0)


def test_a_concurrent_first_sign_in_with_the_same_subject_does_not_fail(app, client, provider, monkeypatch):
    """Two first sign-ins race; this request loses: its lookups ran before the other one committed."""
    from webapp.auth import oidc

    real_identity, real_user = oidc._find_identity, oidc._find_user
    lost = {"identity": False, "user": False}

    def find_identity(s, issuer, subject):
        if not lost["identity"]:
            lost["identity"] = True
            with app.extensions["db_sessionmaker"].begin() as other:  # the winner, in its own transaction
                winner = User(email="pat@example.com", password_hash=None)
                other.add(winner)
                other.flush()
                other.add(OidcIdentity(user_id=winner.id, issuer=issuer, subject=subject))
            return None
        return real_identity(s, issuer, subject)

    def find_user(s, email):
        if not lost["user"]:
            lost["user"] = True
            return None
        return real_user(s, email)

    monkeypatch.setattr(oidc, "_find_identity", find_identity)
    monkeypatch.setattr(oidc, "_find_user", find_user)
    resp = sign_in_with_provider(client, provider)
    assert lost == {"identity": True, "user": True}
    assert resp.headers["Location"] == "/" and signed_in(client)
    assert counts(app) == (1, 1)


def test_sign_in_page_offers_the_provider(client):
    page = client.get("/auth/sign-in").get_data(as_text=True)
    assert "Continue with TestID" in page


def test_without_an_issuer_there_is_no_button_and_no_endpoint(app_config):
    app = create_app({**app_config, "OIDC_ISSUER": None})
    try:
        client = app.test_client()
        app.config["WTF_CSRF_ENABLED"] = False
        assert client.post("/auth/oidc/start").status_code == 404
        assert client.get("/auth/oidc/callback?code=x&state=y").status_code == 404
        for path in ("/auth/sign-in", "/auth/sign-up"):
            page = client.get(path)
            assert page.status_code == 200 and "Continue with" not in page.get_data(as_text=True)
    finally:
        app.extensions["db_engine"].dispose()


def test_each_app_uses_its_own_provider_settings(app, client, provider, app_config):
    """Two apps in one process (tests, or several workers' factories) must not share a cached client."""
    assert parse_qs(urlsplit(start(client, provider)).query)["client_id"] == [provider.client_id]
    other = create_app({**app_config, "OIDC_CLIENT_ID": "another-client", "OIDC_CLIENT_SECRET": "another-secret"})
    try:
        other.config["WTF_CSRF_ENABLED"] = False
        resp = other.test_client().post("/auth/oidc/start")
        assert parse_qs(urlsplit(resp.headers["Location"]).query)["client_id"] == ["another-client"]
    finally:
        other.extensions["db_engine"].dispose()
    assert parse_qs(urlsplit(start(client, provider)).query)["client_id"] == [provider.client_id]


def test_an_unreachable_provider_gives_a_message_not_an_error(app_config):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app({**app_config, "OIDC_ISSUER": f"http://127.0.0.1:{port}"})
    try:
        app.config["WTF_CSRF_ENABLED"] = False
        client = app.test_client()
        resp = client.post("/auth/oidc/start")
        assert resp.headers["Location"] == "/auth/sign-in"
        assert "Sign-in with TestID is not available right now." in follow(client, resp)
    finally:
        app.extensions["db_engine"].dispose()


# --- the test provider itself ---------------------------------------------------------------


def _authorize(provider, challenge_from: str | None = "v" * 50) -> str:
    params = {"response_type": "code", "client_id": provider.client_id, "redirect_uri": CALLBACK, "scope": "openid email", "state": secrets.token_urlsafe(16), "nonce": secrets.token_urlsafe(16)}
    if challenge_from is not None:
        params |= {"code_challenge": create_s256_code_challenge(challenge_from), "code_challenge_method": "S256"}
    resp = requests.get(provider.issuer + "/authorize", params=params, allow_redirects=False, timeout=5)
    assert resp.status_code == 302
    return parse_qs(urlsplit(resp.headers["Location"]).query)


def test_provider_requires_pkce_checks_the_verifier_and_accepts_both_secret_methods(provider):
    meta = requests.get(provider.issuer + "/.well-known/openid-configuration", timeout=5).json()
    assert meta["issuer"] == provider.issuer and meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
    assert requests.get(meta["jwks_uri"], timeout=5).json()["keys"][0]["kty"] == "RSA"

    assert _authorize(provider, challenge_from=None)["error"] == ["invalid_request"]  # no PKCE: refused

    token_url = meta["token_endpoint"]
    base = {"grant_type": "authorization_code", "redirect_uri": CALLBACK}
    post_auth = {"client_id": provider.client_id, "client_secret": provider.client_secret}
    basic_auth = (provider.client_id, provider.client_secret)

    code = _authorize(provider)["code"][0]
    wrong = requests.post(token_url, data={**base, **post_auth, "code": code, "code_verifier": "w" * 50}, timeout=5)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"

    code = _authorize(provider)["code"][0]
    ok = requests.post(token_url, data={**base, **post_auth, "code": code, "code_verifier": "v" * 50}, timeout=5)
    assert ok.status_code == 200 and ok.json()["id_token"].count(".") == 2

    code = _authorize(provider)["code"][0]
    ok = requests.post(token_url, data={**base, "code": code, "code_verifier": "v" * 50}, auth=basic_auth, timeout=5)
    assert ok.status_code == 200
    info = requests.get(meta["userinfo_endpoint"], headers={"Authorization": "Bearer " + ok.json()["access_token"]}, timeout=5)
    assert info.json() == {"sub": "provider-user-1", "email": "pat@example.com", "email_verified": True}
    assert requests.get(meta["userinfo_endpoint"], headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
