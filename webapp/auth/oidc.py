"""Sign in with an OpenID Connect provider (Google or any standard issuer) through authlib.

Configured by ``VOLTPAY_OIDC_ISSUER``, ``VOLTPAY_OIDC_CLIENT_ID`` and
``VOLTPAY_OIDC_CLIENT_SECRET``; the provider's endpoints and keys come from
its discovery document. authlib keeps ``state``, ``nonce`` and the PKCE
``code_verifier`` (S256) in the session and checks them on the way back,
together with the ID token's signature, issuer, audience and expiry.

Accounts are linked by (issuer, subject). A first sign-in attaches to an
existing account with the same email only when the provider says the email
is verified; otherwise nothing is linked and the person is told why. An
account with two-factor sign-in still has to enter its code. Linking to an
account whose email was never confirmed drops that account's password: whoever
chose it never proved they own the mailbox (account pre-hijacking).

Each app gets its own authlib registry (``app.extensions``): authlib caches a
client per registry, so a shared one would keep the first app's settings.
"""

from __future__ import annotations

import logging

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from flask import Flask, abort, current_app, flash, redirect, session, url_for
from flask_babel import gettext as _
from joserfc.errors import JoseError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from webapp.auth import bp
from webapp.db import db_session, utcnow
from webapp.extensions import limiter
from webapp.models import OidcIdentity, User

log = logging.getLogger("voltpay.oidc")

EXTENSION = "voltpay.oidc"
# What a refused or broken round trip raises: the provider's error or a state mismatch (authlib's
# OAuthError and OAuth2Error), an ID token that fails its signature, nonce, issuer, audience or expiry
# checks (joserfc's JoseError), or the provider being unreachable or answering garbage
# (RequestException, ValueError). Anything else is a bug and should still be a 500.
SIGN_IN_ERRORS = (AuthlibBaseError, JoseError, requests.RequestException, ValueError)


def init_app(app: Flask) -> None:
    """Register the provider when the issuer is configured."""
    issuer = app.config.get("OIDC_ISSUER")
    if not issuer:
        return
    if not (app.config.get("OIDC_CLIENT_ID") and app.config.get("OIDC_CLIENT_SECRET")):
        from webapp.config import ConfigError

        raise ConfigError("VOLTPAY_OIDC_ISSUER is set: VOLTPAY_OIDC_CLIENT_ID and VOLTPAY_OIDC_CLIENT_SECRET are needed too")
    registry = OAuth(app)
    registry.register(
        "oidc",
        client_id=app.config["OIDC_CLIENT_ID"],
        client_secret=app.config["OIDC_CLIENT_SECRET"],
        server_metadata_url=issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={"scope": "openid email profile", "code_challenge_method": "S256"},
        overwrite=True,
    )
    app.extensions[EXTENSION] = registry


def enabled() -> bool:
    """Whether sign-in with the provider is offered."""
    return bool(current_app.config.get("OIDC_ISSUER"))


def _client():
    return current_app.extensions[EXTENSION].create_client("oidc")


def _not_completed():
    flash(_("Sign-in with %(name)s did not complete. Please try again.", name=current_app.config["OIDC_NAME"]), "error")
    return redirect(url_for("auth.sign_in"))


def _find_identity(s: Session, issuer: str, subject: str) -> OidcIdentity | None:
    return s.scalar(select(OidcIdentity).where(OidcIdentity.issuer == issuer, OidcIdentity.subject == subject))


def _find_user(s: Session, email: str) -> User | None:
    return s.scalar(select(User).where(User.email == email))


def _account_for(s: Session, issuer: str, subject: str, claims: dict) -> User | None:
    """The account of this identity, linked or created on first sign-in; None when the email cannot be used.

    Flushes, so a concurrent first sign-in that got there first shows up here as IntegrityError.
    """
    identity = _find_identity(s, issuer, subject)
    if identity is not None:
        return identity.user
    email = claims.get("email")
    email = email.strip().lower() if isinstance(email, str) else ""
    if not email or claims.get("email_verified") is not True:
        return None
    user = _find_user(s, email)
    if user is None:
        locale = claims.get("locale", "")[:2] if isinstance(claims.get("locale"), str) else None
        user = User(email=email, password_hash=None, email_verified_at=utcnow(), locale=locale if locale in ("en", "es", "zh") else None)
        s.add(user)
        s.flush()
    elif user.email_verified_at is None:
        # Nobody ever proved they own this mailbox, so whoever set the password may be a stranger
        # waiting for the owner to arrive (pre-hijacking): the owner gets the account, not its password.
        user.email_verified_at = utcnow()
        user.password_hash = None
        user.session_version += 1
    s.add(OidcIdentity(user_id=user.id, issuer=issuer, subject=subject))
    s.flush()
    return user


@bp.route("/oidc/start", methods=["POST"])
@limiter.limit("20 per minute")
def oidc_start():
    """Send the browser to the provider (POST, so a link on another site cannot start it)."""
    if not enabled():
        abort(404)
    try:
        return _client().authorize_redirect(url_for("auth.oidc_callback", _external=True))
    except (requests.RequestException, ValueError) as e:  # discovery document unreachable or unreadable
        log.warning("oidc provider unavailable", extra={"error": repr(e)})
        flash(_("Sign-in with %(name)s is not available right now. Please try again later.", name=current_app.config["OIDC_NAME"]), "error")
        return redirect(url_for("auth.sign_in"))


@bp.route("/oidc/callback")
@limiter.limit("20 per minute")
def oidc_callback():
    """Come back from the provider: check state, nonce and PKCE, then sign in or create the account."""
    from webapp.auth.views import PENDING_2FA, finish_sign_in

    if not enabled():
        abort(404)
    client = _client()
    try:
        token = client.authorize_access_token()
    except SIGN_IN_ERRORS as e:
        log.warning("oidc sign-in refused", extra={"error": getattr(e, "error", type(e).__name__), "description": getattr(e, "description", str(e))})
        return _not_completed()
    claims = token.get("userinfo") or {}
    issuer = str(claims.get("iss") or current_app.config["OIDC_ISSUER"])
    subject = str(claims.get("sub") or "")
    if not subject:
        return _not_completed()
    s = db_session()
    try:
        user = _account_for(s, issuer, subject, claims)
    except IntegrityError:
        # A concurrent first sign-in for the same person committed the identity (or the account)
        # between our lookups and our insert: start over, and find theirs this time.
        s.rollback()
        user = _account_for(s, issuer, subject, claims)
    if user is None:
        s.rollback()
        flash(_("%(name)s did not confirm your email address, so we cannot use it to sign you in. Sign up with your email instead.", name=current_app.config["OIDC_NAME"]), "error")
        return redirect(url_for("auth.sign_up"))
    if not user.is_active:
        s.rollback()
        flash(_("This account is closed. Contact support if you think this is a mistake."), "error")
        return redirect(url_for("auth.sign_in"))
    s.commit()
    if user.two_factor_enabled:
        session[PENDING_2FA] = {"user": user.get_id(), "remember": False, "next": url_for("main.home")}
        return redirect(url_for("auth.two_factor"))
    finish_sign_in(user, remember=False)
    flash(_("Signed in with %(name)s.", name=current_app.config["OIDC_NAME"]), "success")
    return redirect(url_for("main.home"))
