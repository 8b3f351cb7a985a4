"""Sign in with an OpenID Connect provider (Google or any standard issuer) through authlib.

Configured by ``VOLTPAY_OIDC_ISSUER``, ``VOLTPAY_OIDC_CLIENT_ID`` and
``VOLTPAY_OIDC_CLIENT_SECRET``; the provider's endpoints and keys come from
its discovery document. authlib keeps ``state``, ``nonce`` and the PKCE
``code_verifier`` (S256) in the session and checks them on the way back,
together with the ID token's signature, issuer, audience and expiry.

Accounts are linked by (issuer, subject). A first sign-in attaches to an
existing account with the same email only when the provider says the email
is verified; otherwise nothing is linked and the person is told why. An
account with two-factor sign-in still has to enter its code.
"""

from __future__ import annotations

import logging

from authlib.integrations.base_client.errors import OAuthError
from flask import Flask, abort, current_app, flash, redirect, session, url_for
from flask_babel import gettext as _
from sqlalchemy import select

from webapp.auth import bp
from webapp.db import db_session, utcnow
from webapp.extensions import limiter, oauth
from webapp.models import OidcIdentity, User

log = logging.getLogger("voltpay.oidc")


def init_app(app: Flask) -> None:
    """Register the provider when the issuer is configured."""
    oauth.init_app(app)
    issuer = app.config.get("OIDC_ISSUER")
    if not issuer:
        return
    if not (app.config.get("OIDC_CLIENT_ID") and app.config.get("OIDC_CLIENT_SECRET")):
        from webapp.config import ConfigError

        raise ConfigError("VOLTPAY_OIDC_ISSUER is set: VOLTPAY_OIDC_CLIENT_ID and VOLTPAY_OIDC_CLIENT_SECRET are needed too")
    oauth.register(
        "oidc",
        client_id=app.config["OIDC_CLIENT_ID"],
        client_secret=app.config["OIDC_CLIENT_SECRET"],
        server_metadata_url=issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={"scope": "openid email profile", "code_challenge_method": "S256"},
        overwrite=True,
    )


def enabled() -> bool:
    """Whether sign-in with the provider is offered."""
    return bool(current_app.config.get("OIDC_ISSUER"))


def _client():
    return oauth.create_client("oidc")


@bp.route("/oidc/start", methods=["POST"])
@limiter.limit("20 per minute")
def oidc_start():
    """Send the browser to the provider (POST, so a link on another site cannot start it)."""
    if not enabled():
        abort(404)
    return _client().authorize_redirect(url_for("auth.oidc_callback", _external=True))


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
    except OAuthError as e:
        log.warning("oidc sign-in refused", extra={"error": e.error, "description": e.description})
        flash(_("Sign-in with %(name)s did not complete. Please try again.", name=current_app.config["OIDC_NAME"]), "error")
        return redirect(url_for("auth.sign_in"))
    claims = token.get("userinfo") or {}
    issuer = str(claims.get("iss") or current_app.config["OIDC_ISSUER"])
    subject = str(claims.get("sub") or "")
    if not subject:
        flash(_("Sign-in with %(name)s did not complete. Please try again.", name=current_app.config["OIDC_NAME"]), "error")
        return redirect(url_for("auth.sign_in"))
    s = db_session()
    identity = s.scalar(select(OidcIdentity).where(OidcIdentity.issuer == issuer, OidcIdentity.subject == subject))
    if identity is not None:
        user = identity.user
    else:
        email = (claims.get("email") or "").strip().lower()
        if not email or claims.get("email_verified") is not True:
            flash(_("%(name)s did not confirm your email address, so we cannot use it to sign you in. Sign up with your email instead.", name=current_app.config["OIDC_NAME"]), "error")
            return redirect(url_for("auth.sign_up"))
        user = s.scalar(select(User).where(User.email == email))
        if user is None:
            locale = claims.get("locale", "")[:2] if isinstance(claims.get("locale"), str) else None
            user = User(email=email, password_hash=None, email_verified_at=utcnow(), locale=locale if locale in ("en", "es", "zh") else None)
            s.add(user)
            s.flush()
        elif user.email_verified_at is None:
            user.email_verified_at = utcnow()
        s.add(OidcIdentity(user_id=user.id, issuer=issuer, subject=subject))
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
