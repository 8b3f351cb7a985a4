"""The JSON API under /api/v1 as a client meets it: bearer tokens, two-factor, problem+json errors, limits.

The client here keeps CSRF checks on, as in production: the API must work
with bearer tokens alone.
"""

from __future__ import annotations

import datetime as dt

import pyotp
import pytest
from sqlalchemy import select

from webapp.auth import twofactor
from webapp.auth.tokens import digest
from webapp.db import utcnow
from webapp.models import ApiToken, User
from tests.webapp.problems import assert_problem

PASSWORD = "correct horse staple"


@pytest.fixture
def api(app):
    """A test client with CSRF protection on, as in production (the API must not need a CSRF token)."""
    app.config["WTF_CSRF_ENABLED"] = True
    return app.test_client()


def issue(api, email="ana@example.com", password=PASSWORD, **fields):
    return api.post("/api/v1/auth/token", json={"email": email, "password": password, **fields})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}



def rows(app, stmt):
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalars(stmt).all()


def add_token(app, user_id: int, secret: str, **fields) -> int:
    """Put a token for ``secret`` straight into the database; return its id."""
    fields.setdefault("expires_at", utcnow() + dt.timedelta(days=1))
    with app.extensions["db_sessionmaker"].begin() as s:
        token = ApiToken(user_id=user_id, token_hash=digest(secret), **fields)
        s.add(token)
        s.flush()
        return token.id


# --- Issuing and using tokens -------------------------------------------------------------------


def test_issue_token_and_use_it(app, api, make_user):
    user = make_user()
    resp = issue(api, name="my laptop")
    assert resp.status_code == 201, resp.json
    assert resp.mimetype == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.json
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("vp_") and len(body["access_token"]) > 40
    assert body["name"] == "my laptop"
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert expires.tzinfo is not None
    assert dt.timedelta(days=29) < expires - utcnow() <= dt.timedelta(days=30)

    me = api.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json["id"] == user.id
    assert me.json["email"] == "ana@example.com"
    assert me.json["role"] == "customer"
    assert me.json["email_verified"] is True and me.json["two_factor_enabled"] is False


def test_email_is_matched_without_case_or_spaces(api, make_user):
    make_user()
    assert issue(api, email="  Ana@Example.COM ").status_code == 201


def test_token_is_stored_only_as_a_hash(app, api, make_user):
    make_user()
    secret = issue(api).json["access_token"]
    (row,) = rows(app, select(ApiToken))
    assert row.token_hash != secret and secret not in row.token_hash
    assert row.token_hash == digest(secret)


def test_use_records_last_used(app, api, make_user):
    make_user()
    secret = issue(api).json["access_token"]
    assert rows(app, select(ApiToken))[0].last_used_at is None
    api.get("/api/v1/me", headers=bearer(secret))
    assert rows(app, select(ApiToken))[0].last_used_at is not None


def test_revoke_current_token(app, api, make_user):
    make_user()
    secret = issue(api).json["access_token"]
    resp = api.delete("/api/v1/auth/token", headers=bearer(secret))
    assert resp.status_code == 204 and resp.data == b""
    assert rows(app, select(ApiToken))[0].revoked_at is not None
    again = api.get("/api/v1/me", headers=bearer(secret))
    assert_problem(again, 401, "invalid_token")
    assert again.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(api.delete("/api/v1/auth/token", headers=bearer(secret)), 401, "invalid_token")


def test_list_tokens_shows_active_ones_without_secrets(app, api, make_user):
    user = make_user()
    first = issue(api, name="phone").json
    second = issue(api, name="laptop").json
    api.delete("/api/v1/auth/token", headers=bearer(second["access_token"]))
    add_token(app, user.id, "vp_expired", name="old", expires_at=utcnow() - dt.timedelta(seconds=1))

    resp = api.get("/api/v1/auth/tokens", headers=bearer(first["access_token"]))
    assert resp.status_code == 200
    data = resp.json["data"]
    assert [t["name"] for t in data] == ["phone"]
    assert set(data[0]) == {"id", "name", "created_at", "expires_at", "last_used_at"}
    assert data[0]["id"] == first["id"]
    text = resp.get_data(as_text=True)
    assert first["access_token"] not in text and digest(first["access_token"]) not in text


def test_revoke_one_token_by_id(app, api, make_user):
    make_user()
    keep = issue(api, name="keep").json
    drop = issue(api, name="drop").json
    resp = api.delete(f"/api/v1/auth/tokens/{drop['id']}", headers=bearer(keep["access_token"]))
    assert resp.status_code == 204
    assert_problem(api.get("/api/v1/me", headers=bearer(drop["access_token"])), 401, "invalid_token")
    assert api.get("/api/v1/me", headers=bearer(keep["access_token"])).status_code == 200
    # Revoking an already revoked token of one's own is fine (idempotent).
    assert api.delete(f"/api/v1/auth/tokens/{drop['id']}", headers=bearer(keep["access_token"])).status_code == 204


def test_another_users_token_is_not_found(app, api, make_user):
    make_user()
    other = make_user(email="ben@example.com")
    mine = issue(api).json["access_token"]
    theirs_id = add_token(app, other.id, "vp_bens-token")
    resp = api.delete(f"/api/v1/auth/tokens/{theirs_id}", headers=bearer(mine))
    not_found = assert_problem(resp, 404, "not_found")
    missing = assert_problem(api.delete("/api/v1/auth/tokens/999999", headers=bearer(mine)), 404, "not_found")
    # Same answer as for a token that does not exist: nothing to learn about other accounts.
    assert {k: v for k, v in not_found.items() if k != "request_id"} == {k: v for k, v in missing.items() if k != "request_id"}
    assert api.get("/api/v1/me", headers=bearer("vp_bens-token")).status_code == 200
    (row,) = rows(app, select(ApiToken).where(ApiToken.id == theirs_id))
    assert row.revoked_at is None


def test_token_id_out_of_range_is_not_found(api, make_user):
    make_user()
    mine = issue(api).json["access_token"]
    for raw in ("2147483648", "99999999999999999999999", "-1", "abc"):
        assert_problem(api.delete(f"/api/v1/auth/tokens/{raw}", headers=bearer(mine)), 404, "not_found")


def test_expired_token_is_refused(app, api, make_user):
    user = make_user()
    add_token(app, user.id, "vp_stale", expires_at=utcnow() - dt.timedelta(minutes=1))
    resp = api.get("/api/v1/me", headers=bearer("vp_stale"))
    assert_problem(resp, 401, "invalid_token")
    assert "WWW-Authenticate" in resp.headers


def test_token_of_a_deactivated_account_is_refused(app, api, make_user):
    user = make_user()
    secret = issue(api).json["access_token"]
    with app.extensions["db_sessionmaker"].begin() as s:
        s.get(User, user.id).is_active_account = False
    assert_problem(api.get("/api/v1/me", headers=bearer(secret)), 401, "invalid_token")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Bearer    ", "Basic YW5hOnB3", "Token abc", "bearer", "Bearer vp_unknown", "Bearer vp_a b"],
)
def test_missing_or_malformed_authorization(api, header):
    headers = {} if header is None else {"Authorization": header}
    resp = api.get("/api/v1/me", headers=headers)
    body = assert_problem(resp, 401, "invalid_token" if header in ("Bearer vp_unknown", "Bearer vp_a b") else "unauthenticated")
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="voltpay"'
    assert "errors" not in body


def test_session_cookie_is_not_an_api_credential(app, make_user):
    """Signed in on the web is not signed in on the API."""
    make_user()
    browser = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    browser.post("/sign-in", data={"email": "ana@example.com", "password": PASSWORD})
    assert_problem(browser.get("/api/v1/me"), 401, "unauthenticated")


# --- Credentials and two-factor -----------------------------------------------------------------


def test_wrong_password_and_unknown_email_answer_the_same(api, make_user):
    make_user()
    wrong = issue(api, password="not the password")
    unknown = issue(api, email="nobody@example.com")
    a = assert_problem(wrong, 401, "invalid_credentials")
    b = assert_problem(unknown, 401, "invalid_credentials")
    a.pop("request_id"), b.pop("request_id")
    assert a == b
    assert wrong.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]


def test_account_without_password_cannot_get_a_token(api, make_user):
    """An OIDC-only account has no password to send."""
    user = make_user(email="oidc@example.com")
    user_id = user.id
    with api.application.extensions["db_sessionmaker"].begin() as s:
        s.get(User, user_id).password_hash = None
    assert_problem(issue(api, email="oidc@example.com"), 401, "invalid_credentials")


def test_deactivated_account_gets_no_token(api, make_user):
    make_user(is_active_account=False)
    assert_problem(issue(api), 401, "invalid_credentials")


def test_unverified_email_is_refused(api, make_user):
    make_user(verified=False)
    body = assert_problem(issue(api), 403, "email_unverified")
    assert "email" in body["detail"].lower()


@pytest.fixture
def totp_user(app, make_user):
    """A verified account with two-factor sign-in on; returns (secret, recovery codes)."""
    secret = pyotp.random_base32()
    user = make_user(totp_secret=secret)
    with app.extensions["db_sessionmaker"].begin() as s:
        codes = twofactor.new_recovery_codes(s, s.get(User, user.id))
    return secret, codes


def a_wrong_code(secret: str) -> str:
    """A six-digit code that is valid at no step the server accepts."""
    totp = pyotp.TOTP(secret)
    now = utcnow().timestamp()
    valid = {totp.at(now + k * totp.interval) for k in (-2, -1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(0, 1_000_000, 7919)) if c not in valid)


def test_two_factor_account_needs_a_code(api, totp_user):
    secret, _codes = totp_user
    assert_problem(issue(api), 401, "totp_required")
    assert_problem(issue(api, totp_code=""), 401, "totp_required")
    assert_problem(issue(api, totp_code=a_wrong_code(secret)), 401, "totp_invalid")
    code = pyotp.TOTP(secret).now()
    ok = issue(api, totp_code=code)
    assert ok.status_code == 201, ok.json
    assert ok.json["token_type"] == "Bearer"
    me = api.get("/api/v1/me", headers=bearer(ok.json["access_token"]))
    assert me.json["two_factor_enabled"] is True
    # A code works once, even within its 30 seconds.
    assert_problem(issue(api, totp_code=code), 401, "totp_invalid")


def test_two_factor_wrong_password_does_not_reveal_two_factor(api, totp_user):
    assert_problem(issue(api, password="not the password"), 401, "invalid_credentials")


def test_recovery_code_works_once(api, totp_user):
    _secret, codes = totp_user
    first = issue(api, totp_code=codes[0].upper())  # typed from paper: case and dash do not matter
    assert first.status_code == 201, first.json
    assert_problem(issue(api, totp_code=codes[0]), 401, "totp_invalid")
    assert issue(api, totp_code=codes[1].replace("-", " ")).status_code == 201


FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@pytest.mark.parametrize(
    "odd",
    [
        lambda wrong: wrong.translate(FULLWIDTH),
        lambda wrong: wrong.translate(ARABIC_INDIC),
        lambda wrong: wrong.translate(SUPERSCRIPT),
        lambda wrong: wrong[:3] + " " + wrong[3:],
        lambda wrong: "1" * 10_000,
        lambda wrong: "🔑🔑🔑",
    ],
    ids=["fullwidth", "arabic-indic", "superscript", "spaced", "long", "emoji"],
)
def test_odd_two_factor_codes_are_just_wrong(api, totp_user, odd):
    secret, _codes = totp_user
    assert_problem(issue(api, totp_code=odd(a_wrong_code(secret))), 401, "totp_invalid")


@pytest.mark.parametrize("script", [FULLWIDTH, ARABIC_INDIC], ids=["fullwidth", "arabic-indic"])
def test_code_typed_in_another_digit_script_works(api, totp_user, script):
    secret, _codes = totp_user
    assert issue(api, totp_code=pyotp.TOTP(secret).now().translate(script)).status_code == 201


# --- Malformed requests -------------------------------------------------------------------------


def test_non_json_body_is_415(api, make_user):
    make_user()
    resp = api.post("/api/v1/auth/token", data={"email": "ana@example.com", "password": PASSWORD})
    assert_problem(resp, 415, "unsupported_media_type")
    resp = api.post("/api/v1/auth/token", data='{"email": "ana@example.com"}', content_type="text/plain")
    assert_problem(resp, 415, "unsupported_media_type")
    assert_problem(api.post("/api/v1/auth/token"), 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "raw",
    ['["ana@example.com", "pw"]', '"text"', "42", "null", "{not json", "", '{"email": "a"', "\xff\xfe{}", "[" * 100_000],
    ids=["array", "string", "number", "null", "broken", "empty", "truncated", "not-utf8", "deeply-nested"],
)
def test_json_that_is_not_an_object_is_422(api, raw):
    resp = api.post("/api/v1/auth/token", data=raw.encode("latin-1"), content_type="application/json")
    assert_problem(resp, 422, "invalid_json")


def test_missing_fields_are_listed(api):
    body = assert_problem(api.post("/api/v1/auth/token", json={}), 422, "invalid_request")
    assert set(body["errors"]) == {"email", "password"}
    assert all(isinstance(v, str) and v for v in body["errors"].values())
    body = assert_problem(api.post("/api/v1/auth/token", json={"email": "ana@example.com", "password": 12345}), 422, "invalid_request")
    assert set(body["errors"]) == {"password"}


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"name": "x" * 101}, "name"),
        ({"name": 7}, "name"),
        ({"name": None}, "name"),
        ({"totp_code": 123456}, "totp_code"),
        ({"email": "ana@example.com\u0000"}, "email"),
        ({"password": "pass\u0000word"}, "password"),
        ({"name": "nul\u0000"}, "name"),
        ({"totp_code": "\ud800"}, "totp_code"),
        ({"totp_code": "12\u00003456"}, "totp_code"),
        ({"email": "\udcff@example.com"}, "email"),
        ({"password": "\ud83d"}, "password"),
    ],
)
def test_invalid_fields_are_422(api, make_user, fields, bad):
    make_user()
    body = assert_problem(issue(api, **fields), 422, "invalid_request")
    assert set(body["errors"]) == {bad}


def test_huge_inputs_are_answered_without_error(api, make_user):
    make_user()
    assert_problem(issue(api, email="a" * 100_000 + "@example.com"), 401, "invalid_credentials")
    assert_problem(issue(api, password="p" * 100_000), 401, "invalid_credentials")
    name_ok = issue(api, name="ñ" * 100)
    assert name_ok.status_code == 201 and name_ok.json["name"] == "ñ" * 100


def test_body_over_the_size_limit_is_413(api):
    resp = api.post("/api/v1/auth/token", data=b'{"email": "' + b"a" * (3 * 1024 * 1024) + b'"}', content_type="application/json")
    assert_problem(resp, 413, "too_large")


def test_unknown_api_path_is_a_problem(api):
    resp = api.get("/api/v1/nope", headers={"Accept": "text/html"})
    assert_problem(resp, 404, "not_found")
    assert_problem(api.post("/api/v1/nope", json={}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("put", "/api/v1/auth/token", {"POST", "DELETE"}),
        ("get", "/api/v1/auth/token", {"POST", "DELETE"}),
        ("post", "/api/v1/me", {"GET"}),
        ("delete", "/api/v1/me", {"GET"}),
        ("patch", "/api/v1/auth/tokens/1", {"DELETE"}),
        ("post", "/api/v1/openapi.json", {"GET"}),
    ],
)
def test_wrong_method_is_405_with_allow(api, method, path, allowed):
    resp = getattr(api, method)(path, headers=bearer("vp_x"))
    assert_problem(resp, 405, "method_not_allowed")
    assert allowed <= {m.strip() for m in resp.headers["Allow"].split(",")}


def test_every_error_carries_the_request_id(api):
    resp = api.get("/api/v1/me", headers={"X-Request-ID": "client-req-0001"})
    assert assert_problem(resp, 401, "unauthenticated")["request_id"] == "client-req-0001"
    assert resp.headers["X-Request-ID"] == "client-req-0001"


def test_error_text_follows_the_language_but_the_code_does_not(api):
    english = api.get("/api/v1/me").json
    spanish = api.get("/api/v1/me", headers={"Accept-Language": "es"}).json
    assert spanish["code"] == english["code"] == "unauthenticated"
    assert spanish["detail"] != english["detail"] and "Authorization" in spanish["detail"]


def test_openapi_document_is_served(api):
    resp = api.get("/api/v1/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.json["openapi"] == "3.1.0"


# --- Rate limit ---------------------------------------------------------------------------------


@pytest.fixture
def limited_app(app_config):
    app_config["RATELIMIT_ENABLED"] = True
    return app_config


def test_token_requests_are_rate_limited(limited_app, app, make_user):
    make_user()
    api = app.test_client()
    answers = [issue(api, password=f"wrong password {i}").status_code for i in range(10)]
    assert answers == [401] * 10
    resp = issue(api)  # even the right password: the limit comes first
    body = assert_problem(resp, 429, "rate_limited")
    retry = int(resp.headers["Retry-After"])
    assert 0 < retry <= 60
    assert str(retry) in body["detail"]
    # Other endpoints are not affected.
    assert api.get("/api/v1/openapi.json").status_code == 200


def test_rate_limit_per_email_holds_across_addresses(limited_app, app, make_user):
    """Spreading guesses over client addresses does not lift the per-account limit."""
    make_user()
    api = app.test_client()
    for i in range(10):
        resp = api.post(
            "/api/v1/auth/token",
            json={"email": "ana@example.com", "password": f"guess {i}"},
            environ_base={"REMOTE_ADDR": f"10.0.0.{i + 1}"},
        )
        assert resp.status_code == 401
    resp = api.post("/api/v1/auth/token", json={"email": "ANA@example.com", "password": PASSWORD}, environ_base={"REMOTE_ADDR": "10.0.1.1"})
    assert_problem(resp, 429, "rate_limited")
    assert "Retry-After" in resp.headers


@pytest.mark.parametrize("status", [400, 408, 410, 414, 416, 418, 431, 451, 501, 502, 503, 504])
def test_any_http_error_under_the_api_is_a_complete_problem(app, status):
    from flask import abort

    app.add_url_rule(f"/api/v1/test-abort-{status}", f"abort_{status}", lambda: abort(status))
    resp = app.test_client().get(f"/api/v1/test-abort-{status}")
    body = assert_problem(resp, status, body_code := resp.get_json(force=True)["code"])
    assert body_code and body_code != "error"


def test_odd_bodies_with_limits_on_get_their_own_answers(limited_app, app):
    """The per-account limit reads the email from the body before the view: odd bodies must not break it."""
    api = app.test_client()
    too_big = b'{"email": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    assert_problem(api.post("/api/v1/auth/token", data=too_big, content_type="application/json"), 413, "too_large")
    assert_problem(api.post("/api/v1/auth/token", data=b"[" * 100_000, content_type="application/json"), 422, "invalid_json")
    assert_problem(api.post("/api/v1/auth/token", data=b'{"email": 5}', content_type="application/json"), 422, "invalid_request")
    assert_problem(api.post("/api/v1/auth/token", data=b"email=a", content_type="text/plain"), 415, "unsupported_media_type")
