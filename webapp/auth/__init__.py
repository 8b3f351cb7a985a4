"""Accounts and sign-in: email and password, email verification, reset, TOTP, OpenID Connect, roles."""

from __future__ import annotations

import functools

from flask import Blueprint, Flask, abort, redirect, request, url_for
from flask_babel import lazy_gettext as _l
from flask_login import current_user

from webapp.db import db_session
from webapp.extensions import login_manager
from webapp.models import Role, User

bp = Blueprint("auth", __name__, url_prefix="/auth")


def init_login(app: Flask) -> None:
    """Wire flask-login: sessions carry ``id:session_version`` so a password change signs out other devices."""
    login_manager.init_app(app)
    login_manager.login_view = "auth.sign_in"
    login_manager.login_message = _l("Please sign in to continue.")
    login_manager.login_message_category = "info"
    login_manager.session_protection = "basic"

    @login_manager.user_loader
    def _load(identity: str) -> User | None:
        try:
            uid, version = (int(x) for x in identity.split(":", 1))
        except ValueError:
            return None
        user = db_session().get(User, uid)
        if user is None or user.session_version != version or not user.is_active:
            return None
        return user

    from webapp.auth import oidc

    oidc.init_app(app)


def role_required(*roles: Role):
    """Allow only signed-in users with one of ``roles`` (admins always); others get 403, guests the sign-in page."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*a, **kw):
            if not current_user.is_authenticated:
                return redirect(url_for("auth.sign_in", next=request.full_path))
            if not current_user.has_role(*roles):
                abort(403)
            return view(*a, **kw)

        return wrapper

    return decorate


from webapp.auth import views  # noqa: E402,F401  (routes register on bp)
