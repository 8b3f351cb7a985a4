"""Sign-up, verification, sign-in, two-factor, reset, CSRF and rate limits, through the pages."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

import pyotp
import pytest
from sqlalchemy import select, update

from webapp.auth.passwords import password_problems
from webapp.db import utcnow
from webapp.models import EmailToken, Role, User

PASSWORD = "correct horse staple"


def path_of(url: str) -> str:
    """The path (and query) of an emailed link, for the test client."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def session_db(app):
    return app.extensions["db_sessionmaker"]()


def user_by_email(app, email):
    with session_db(app) as s:
        return s.scalar(select(User).where(User.email == email))


def sign_in(client, email, password=PASSWORD, **extra):
    return client.post("/auth/sign-in", data={"email": email, "password": password, **extra})


def signed_in(client) -> bool:
    return client.get("/account/").status_code == 200


# --- sign-up and verification -------------------------------------------------------------


def test_sign_up_verify_and_sign_in(client, mailbox, app):
    resp = client.post("/auth/sign-up", data={"email": "  Lucia@Example.com ", "password": PASSWORD})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/auth/check-email")
    assert "lucia@example.com" in client.get("/auth/check-email").get_data(as_text=True)
    user = user_by_email(app, "lucia@example.com")
    assert user is not None and not user.is_verified
    assert user.password_hash.startswith("$argon2id$")

    # Not verified yet: the right password does not sign in.
    assert sign_in(client, "lucia@example.com").headers["Location"].endswith("/auth/check-email")
    assert not signed_in(client)

    link = mailbox.last_link("lucia@example.com", "/auth/verify/")
    resp = client.get(path_of(link))
    assert resp.status_code == 302
    assert user_by_email(app, "lucia@example.com").is_verified

    resp = sign_in(client, "lucia@example.com")
    assert resp.status_code == 302
    assert signed_in(client)


def test_sign_up_with_a_taken_email_looks_the_same_and_warns_the_owner(client, mailbox, make_user, app):
    make_user("taken@example.com")
    new = client.post("/auth/sign-up", data={"email": "fresh@example.com", "password": PASSWORD})
    taken = client.post("/auth/sign-up", data={"email": "taken@example.com", "password": PASSWORD})
    assert new.status_code == taken.status_code == 302
    assert new.headers["Location"] == taken.headers["Location"]
    owner_mail = mailbox.wait_for("taken@example.com")[-1]
    assert "already have" in owner_mail["Subject"]
    with session_db(app) as s:
        assert len(s.scalars(select(User).where(User.email == "taken@example.com")).all()) == 1


@pytest.mark.parametrize(
    "password, reason",
    [
        ("short1", "at least 10"),
        ("password123!", "leaked"),
        ("1234567890", "leaked"),
        ("aaaaaaaaaaaa", "repeated"),
        ("lucia-rocks-2026", "email"),
    ],
)
def test_sign_up_explains_a_refused_password(client, app, password, reason):
    resp = client.post("/auth/sign-up", data={"email": "lucia@example.com", "password": password})
    assert resp.status_code == 400
    page = resp.get_data(as_text=True)
    assert reason in page
    assert 'aria-describedby="password-help password-error"' in page
    assert user_by_email(app, "lucia@example.com") is None


def test_password_rules_accept_a_passphrase():
    assert password_problems("purple tractor on the moon", "ana@example.com") == []


def test_expired_verification_link_offers_a_new_one(client, mailbox, app):
    client.post("/auth/sign-up", data={"email": "late@example.com", "password": PASSWORD})
    link = mailbox.last_link("late@example.com", "/auth/verify/")
    with session_db(app) as s, s.begin():
        s.execute(update(EmailToken).values(expires_at=utcnow() - dt.timedelta(minutes=1)))
    resp = client.get(path_of(link))
    assert resp.status_code == 400
    assert "does not work any more" in resp.get_data(as_text=True)
    assert not user_by_email(app, "late@example.com").is_verified

    mailbox.clear()
    client.post("/auth/verify/resend", data={"email": "late@example.com"})
    client.get(path_of(mailbox.last_link("late@example.com", "/auth/verify/")))
    assert user_by_email(app, "late@example.com").is_verified


def test_verification_link_works_once(client, mailbox):
    client.post("/auth/sign-up", data={"email": "once@example.com", "password": PASSWORD})
    link = path_of(mailbox.last_link("once@example.com", "/auth/verify/"))
    assert client.get(link).status_code == 302
    assert client.get(link).status_code == 400


# --- sign-in ------------------------------------------------------------------------------


def test_wrong_password_and_unknown_email_get_the_same_answer(client, make_user):
    make_user("ana@example.com")
    wrong = sign_in(client, "ana@example.com", "not the password at all")
    unknown = sign_in(client, "nobody@example.com", "not the password at all")
    assert wrong.status_code == unknown.status_code == 400
    message = "The email or password is not right."
    assert message in wrong.get_data(as_text=True) and message in unknown.get_data(as_text=True)
    assert not signed_in(client)


def test_sign_in_redirects_only_within_the_site(client, make_user):
    make_user("ana@example.com")
    resp = sign_in(client, "ana@example.com", next="//evil.example/steal")
    assert resp.headers["Location"] == "/"
    client.post("/auth/sign-out")
    resp = sign_in(client, "ana@example.com", next="/account/")
    assert resp.headers["Location"] == "/account/"


def test_sign_out_ends_the_session(client, make_user):
    make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    assert signed_in(client)
    client.post("/auth/sign-out")
    assert not signed_in(client)


def test_closed_account_cannot_sign_in(client, make_user):
    make_user("gone@example.com", is_active_account=False)
    assert sign_in(client, "gone@example.com").status_code == 400


# --- password reset -----------------------------------------------------------------------


def test_reset_password_by_emailed_link(app, client, mailbox, make_user):
    make_user("ana@example.com")
    other_device = app.test_client()
    sign_in(other_device, "ana@example.com")
    assert signed_in(other_device)

    page = client.post("/auth/forgot", data={"email": "ana@example.com"}).get_data(as_text=True)
    assert "If ana@example.com has a Voltpay account" in page
    link = path_of(mailbox.last_link("ana@example.com", "/auth/reset/"))
    assert client.get(link).status_code == 200
    resp = client.post(link, data={"password": "a brand new passphrase"})
    assert resp.status_code == 302

    assert sign_in(client, "ana@example.com").status_code == 400  # old password gone
    assert sign_in(client, "ana@example.com", "a brand new passphrase").status_code == 302
    assert not signed_in(other_device)  # every other device signed out

    # The link was spent: replaying it changes nothing.
    replay = client.post(link, data={"password": "attacker chosen pass"})
    assert replay.status_code == 400
    assert "does not work any more" in replay.get_data(as_text=True)
    client.post("/auth/sign-out")
    assert sign_in(client, "ana@example.com", "attacker chosen pass").status_code == 400


def test_reset_for_unknown_email_looks_the_same_and_sends_nothing(client, mailbox, make_user):
    make_user("ana@example.com")
    known = client.post("/auth/forgot", data={"email": "ana@example.com"}).get_data(as_text=True)
    unknown = client.post("/auth/forgot", data={"email": "who@example.com"}).get_data(as_text=True)
    assert known.replace("ana@example.com", "X") == unknown.replace("who@example.com", "X")
    mailbox.wait_for("ana@example.com")
    assert mailbox.to("who@example.com") == []


def test_expired_reset_link_is_refused(app, client, mailbox, make_user):
    make_user("ana@example.com")
    client.post("/auth/forgot", data={"email": "ana@example.com"})
    link = path_of(mailbox.last_link("ana@example.com", "/auth/reset/"))
    with session_db(app) as s, s.begin():
        s.execute(update(EmailToken).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert client.get(link).status_code == 400
    assert client.post(link, data={"password": "a brand new passphrase"}).status_code == 400
    assert sign_in(client, "ana@example.com").status_code == 302


def test_a_second_reset_link_spends_the_first(client, mailbox, make_user):
    make_user("ana@example.com")
    client.post("/auth/forgot", data={"email": "ana@example.com"})
    first = path_of(mailbox.last_link("ana@example.com", "/auth/reset/"))
    mailbox.clear()
    client.post("/auth/forgot", data={"email": "ana@example.com"})
    second = path_of(mailbox.last_link("ana@example.com", "/auth/reset/"))
    assert client.post(second, data={"password": "a brand new passphrase"}).status_code == 302
    assert client.get(first).status_code == 400


# --- two-factor ---------------------------------------------------------------------------


def enable_totp(client) -> tuple[str, list[str]]:
    """Turn two-factor on through the account pages; return the secret and recovery codes."""
    page = client.get("/account/two-factor").get_data(as_text=True)
    secret = page.split('data-testid="totp-secret">')[1].split("<")[0]
    resp = client.post("/account/two-factor", data={"code": pyotp.TOTP(secret).now()})
    assert resp.status_code == 200
    codes = [c.split("</code>")[0] for c in resp.get_data(as_text=True).split('<li><code>')[1:]]
    assert len(codes) == 10
    return secret, codes


def next_code(secret: str) -> str:
    """The code of the next time step (accepted for clock drift; not yet used)."""
    totp = pyotp.TOTP(secret)
    return totp.at(utcnow().timestamp() + totp.interval)


def test_two_factor_sign_in(client, make_user):
    make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    secret, _codes = enable_totp(client)
    assert "data:image" not in client.get("/account/").get_data(as_text=True)
    client.post("/auth/sign-out")

    resp = sign_in(client, "ana@example.com")
    assert resp.headers["Location"].endswith("/auth/two-factor")
    assert not signed_in(client)  # the password alone is not enough

    wrong = client.post("/auth/two-factor", data={"code": "000000"})
    assert wrong.status_code == 400 and "not right" in wrong.get_data(as_text=True)
    assert not signed_in(client)

    code = next_code(secret)
    assert client.post("/auth/two-factor", data={"code": code}).status_code == 302
    assert signed_in(client)

    # The same code cannot be used again, by anyone.
    client.post("/auth/sign-out")
    sign_in(client, "ana@example.com")
    assert client.post("/auth/two-factor", data={"code": code}).status_code == 400
    assert not signed_in(client)


def test_recovery_code_works_once(client, make_user):
    make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    _secret, codes = enable_totp(client)
    client.post("/auth/sign-out")

    sign_in(client, "ana@example.com")
    resp = client.post("/auth/two-factor", data={"code": codes[0].upper()})
    assert resp.status_code == 302 and signed_in(client)
    client.post("/auth/sign-out")

    sign_in(client, "ana@example.com")
    assert client.post("/auth/two-factor", data={"code": codes[0]}).status_code == 400
    assert not signed_in(client)


def test_totp_setup_rejects_a_wrong_code(client, make_user, app):
    make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    client.get("/account/two-factor")
    resp = client.post("/account/two-factor", data={"code": "123456"})
    assert resp.status_code == 400
    assert not user_by_email(app, "ana@example.com").two_factor_enabled


def test_disable_two_factor_needs_password_and_code(client, make_user, app):
    make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    secret, _ = enable_totp(client)
    bad = client.post("/account/two-factor/disable", data={"password": "wrong password here", "code": next_code(secret)})
    assert bad.status_code == 400 and user_by_email(app, "ana@example.com").two_factor_enabled
    ok = client.post("/account/two-factor/disable", data={"password": PASSWORD, "code": next_code(secret)})
    assert ok.status_code == 302 and not user_by_email(app, "ana@example.com").two_factor_enabled


# --- account page -------------------------------------------------------------------------


def test_change_password_signs_out_other_devices(app, client, make_user):
    make_user("ana@example.com")
    other = app.test_client()
    sign_in(other, "ana@example.com")
    sign_in(client, "ana@example.com")
    wrong = client.post("/account/password", data={"current": "not my password", "password": "another good phrase"})
    assert wrong.status_code == 400 and "current password is not right" in wrong.get_data(as_text=True)
    resp = client.post("/account/password", data={"current": PASSWORD, "password": "another good phrase"})
    assert resp.status_code == 302
    assert signed_in(client) and not signed_in(other)


def test_revoking_someone_elses_api_token_is_404(client, make_user, app):
    from webapp.models import ApiToken

    make_user("ana@example.com")
    bob = make_user("bob@example.com")
    with session_db(app) as s, s.begin():
        s.add(ApiToken(user_id=bob.id, token_hash="x" * 64, expires_at=utcnow() + dt.timedelta(days=1)))
    with session_db(app) as s:
        token_id = s.scalar(select(ApiToken.id))
    sign_in(client, "ana@example.com")
    assert client.post(f"/account/api-tokens/{token_id}/revoke").status_code == 404


# --- roles --------------------------------------------------------------------------------


def test_role_required_guards_staff_pages(app, make_user):
    from webapp.auth import role_required

    @app.route("/_support-only")
    @role_required(Role.SUPPORT)
    def support_only():
        return "support console"

    client = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    assert client.get("/_support-only").status_code == 302  # guests: sign in first
    make_user("driver@example.com")
    make_user("agent@example.com", role=Role.SUPPORT)
    make_user("boss@example.com", role=Role.ADMIN)
    sign_in(client, "driver@example.com")
    assert client.get("/_support-only").status_code == 403
    for email in ("agent@example.com", "boss@example.com"):
        client.post("/auth/sign-out")
        sign_in(client, email)
        assert client.get("/_support-only").get_data(as_text=True) == "support console"


# --- CSRF and rate limits -----------------------------------------------------------------


def test_form_without_csrf_token_is_refused(csrf_client, make_user):
    make_user("ana@example.com")
    resp = csrf_client.post("/auth/sign-in", data={"email": "ana@example.com", "password": PASSWORD})
    assert resp.status_code == 400
    assert "This form has expired" in resp.get_data(as_text=True)
    assert csrf_client.get("/account/").status_code == 302  # not signed in


def test_form_with_csrf_token_is_accepted(csrf_client, make_user):
    make_user("ana@example.com")
    page = csrf_client.get("/auth/sign-in").get_data(as_text=True)
    token = page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
    resp = csrf_client.post("/auth/sign-in", data={"email": "ana@example.com", "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302


@pytest.fixture
def limited_client(app, app_config):
    """A client of an app with rate limits on (created after ``app``, whose tables it shares)."""
    from webapp import create_app

    # flask-limiter keeps its on/off switch on the shared Limiter: the app created last decides.
    limited = create_app(dict(app_config, RATELIMIT_ENABLED=True, WTF_CSRF_ENABLED=False))
    return limited.test_client()


def test_sign_in_is_rate_limited_with_a_page_that_says_when(limited_client):
    for _ in range(10):
        assert sign_in(limited_client, "ana@example.com", "guessing password").status_code == 400
    resp = sign_in(limited_client, "ana@example.com", "guessing password")
    assert resp.status_code == 429
    retry = int(resp.headers["Retry-After"])
    assert 0 < retry <= 60
    shown = int(resp.get_data(as_text=True).split("You can try again in ")[1].split(" ")[0])
    assert abs(shown - retry) <= 1  # computed a moment apart


def test_two_factor_codes_are_rate_limited(limited_client, make_user, app_config):
    user = make_user("ana@example.com", totp_secret=pyotp.random_base32())
    with limited_client.session_transaction() as sess:
        sess["pending_2fa"] = {"user": user.get_id(), "remember": False, "next": "/"}
    statuses = [limited_client.post("/auth/two-factor", data={"code": "000000"}).status_code for _ in range(6)]
    assert statuses[-1] == 429


def test_reset_requests_are_rate_limited_per_email(limited_client):
    statuses = [limited_client.post("/auth/forgot", data={"email": "ana@example.com"}).status_code for _ in range(6)]
    assert statuses[:5] == [200] * 5 and statuses[5] == 429
