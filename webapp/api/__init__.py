"""JSON API under ``/api/v1``: bearer tokens, problem+json errors, the OpenAPI document.

Authentication is by first-party bearer tokens only (never the session
cookie), which is why the blueprint needs no CSRF token. Every error is an
RFC 9457 problem document with a stable ``code``.
"""

from __future__ import annotations

import datetime as dt
import functools

from flask import Blueprint, current_app, g, jsonify, request
from flask_babel import gettext as _
from sqlalchemy import select

from webapp.auth import twofactor
from webapp.auth.passwords import verify_password
from webapp.auth.tokens import digest, new_secret
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.extensions import limiter
from webapp.models import ApiToken, User

bp = Blueprint("api", __name__, url_prefix="/api/v1")

TOKEN_PREFIX = "vp_"


_NO_JSON = object()


def request_json() -> object:
    """The request body parsed as JSON (cached), or ``None`` when it is not JSON at all.

    Parsing never raises for odd input: a body nested so deeply that the parser
    gives up (``[[[[...``) counts as not JSON, like any other malformed body. A
    body over ``MAX_CONTENT_LENGTH`` still raises 413.
    """
    cached = g.get("api_json", _NO_JSON)
    if cached is not _NO_JSON:
        return cached
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    g.api_json = body
    return body


def is_text(value: object) -> bool:
    """Whether ``value`` is a string that can be stored and hashed: UTF-8 encodable, without NUL."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which JSON's \ud800 escapes can smuggle in
        return False
    return True


def json_body(required: tuple[str, ...] = ()) -> dict:
    """The request's JSON object, or a 415/422 problem a client can act on."""
    if not request.is_json:
        raise Problem(415, "unsupported_media_type", _("Send a JSON object with Content-Type: application/json."))
    body = request_json()
    if not isinstance(body, dict):
        raise Problem(422, "invalid_json", _("The body must be a JSON object."))
    errors = {}
    for field in required:
        if not isinstance(body.get(field), str) or not body.get(field):
            errors[field] = _("This field is required and must be a string.")
        elif not is_text(body[field]):
            errors[field] = _("Some of the data is not valid.")
    if errors:
        raise invalid(errors)
    return body


def invalid(errors: dict[str, str]) -> Problem:
    """A 422 problem naming the fields that are missing or not valid."""
    return Problem(422, "invalid_request", _("Some fields are missing or not valid."), errors=errors)


def no_content():
    """An empty 204 answer (without the default text/html Content-Type)."""
    resp = current_app.response_class(status=204)
    del resp.headers["Content-Type"]
    return resp


def _unauthenticated(detail: str, code: str = "unauthenticated") -> Problem:
    return Problem(401, code, detail, headers={"WWW-Authenticate": 'Bearer realm="voltpay"'})


def current_token() -> ApiToken:
    """The valid token of this request, or a 401 problem."""
    header = request.headers.get("Authorization", "")
    scheme, _sep, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise _unauthenticated(_("Send an API token in the Authorization header: Bearer <token>."))
    token = db_session().scalar(select(ApiToken).where(ApiToken.token_hash == digest(value.strip())))
    now = utcnow()
    if token is None or not token.is_valid(now) or not token.user.is_active:
        raise _unauthenticated(_("This API token is not valid: it is unknown, revoked or expired."), "invalid_token")
    # Written at most once a minute per token, so reads stay cheap.
    if token.last_used_at is None or now - token.last_used_at > dt.timedelta(minutes=1):
        token.last_used_at = now
        db_session().commit()
    return token


def token_required(view):
    """Require a valid bearer token; the user is ``g.api_user``."""

    @functools.wraps(view)
    def wrapper(*a, **kw):
        token = current_token()
        g.api_token = token
        g.api_user = token.user
        return view(*a, **kw)

    return wrapper


def token_json(token: ApiToken, secret: str | None = None) -> dict:
    """A token as the API shows it (the secret only once, at creation)."""
    out = {
        "id": token.id,
        "name": token.name,
        "created_at": token.created_at.isoformat(),
        "expires_at": token.expires_at.isoformat(),
        "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
    }
    if secret is not None:
        out.update(access_token=secret, token_type="Bearer")
    return out


def _email_key() -> str:
    body = request_json()
    email = body.get("email") if isinstance(body, dict) else None
    return "api-email:" + (email.strip().lower() if isinstance(email, str) else "")


@bp.route("/auth/token", methods=["POST"])
@limiter.limit("10 per minute;60 per hour")
@limiter.limit("10 per minute;60 per hour", key_func=_email_key)
def issue_token():
    """Exchange email, password (and a TOTP code when enabled) for a bearer token."""
    body = json_body(required=("email", "password"))
    email = body["email"].strip().lower()
    errors = {}
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 100:
        errors["name"] = _("At most 100 characters.")
    elif not is_text(name):
        errors["name"] = _("Some of the data is not valid.")
    code = body.get("totp_code")
    if code is not None and not isinstance(code, str):
        errors["totp_code"] = _("Send the code as a string.")
    elif code is not None and not is_text(code):
        errors["totp_code"] = _("Some of the data is not valid.")
    if errors:
        raise invalid(errors)
    s = db_session()
    user = s.scalar(select(User).where(User.email == email))
    if not verify_password(user.password_hash if user else None, body["password"]) or user is None or not user.is_active:
        raise _unauthenticated(_("The email or password is not right."), "invalid_credentials")
    if not user.is_verified:
        raise Problem(403, "email_unverified", _("Confirm your email address first: open the link we sent you."))
    if user.two_factor_enabled:
        if not code:
            raise _unauthenticated(_("This account uses two-factor sign-in: send totp_code."), "totp_required")
        if not (twofactor.verify_totp(s, user, code) or twofactor.use_recovery_code(s, user, code)):
            s.rollback()
            raise _unauthenticated(_("That code is not right or was already used."), "totp_invalid")
    secret = TOKEN_PREFIX + new_secret()
    token = ApiToken(
        user_id=user.id,
        token_hash=digest(secret),
        name=name,
        expires_at=utcnow() + dt.timedelta(days=int(current_app.config["API_TOKEN_DAYS"])),
    )
    s.add(token)
    s.commit()
    resp = jsonify(token_json(token, secret))
    resp.status_code = 201
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/auth/token", methods=["DELETE"])
@token_required
def revoke_current_token():
    """Revoke the token used for this request (sign out of the API)."""
    g.api_token.revoked_at = utcnow()
    db_session().commit()
    return no_content()


@bp.route("/auth/tokens", methods=["GET"])
@token_required
def list_tokens():
    """The user's active tokens (never their secrets)."""
    rows = db_session().scalars(
        select(ApiToken)
        .where(ApiToken.user_id == g.api_user.id, ApiToken.revoked_at.is_(None), ApiToken.expires_at > utcnow())
        .order_by(ApiToken.id)
    ).all()
    return jsonify(data=[token_json(t) for t in rows])


# Ids beyond the database integer range cannot exist: the converter answers 404 before a query overflows.
@bp.route("/auth/tokens/<int(max=2147483647):token_id>", methods=["DELETE"])
@token_required
def revoke_token(token_id: int):
    """Revoke one of the user's tokens; another user's token is 404."""
    s = db_session()
    token = s.get(ApiToken, token_id)
    if token is None or token.user_id != g.api_user.id:
        raise Problem(404, "not_found", _("We could not find that."))
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        s.commit()
    return no_content()


@bp.route("/me", methods=["GET"])
@token_required
def me():
    """The signed-in account."""
    u: User = g.api_user
    return jsonify(
        id=u.id,
        email=u.email,
        role=u.role.value,
        locale=u.locale,
        email_verified=u.is_verified,
        two_factor_enabled=u.two_factor_enabled,
        created_at=u.created_at.isoformat(),
    )


@bp.route("/openapi.json", methods=["GET"])
def openapi():
    """The OpenAPI 3.1 description of this API."""
    from webapp.api.openapi import document

    return jsonify(document())


# The wallet and payment-method routes live in their own module, on this blueprint.
from webapp.api import wallet as _wallet_routes  # noqa: E402,F401
# The public connector look-up (prices before paying) too.
from webapp.api import connectors as _connector_routes  # noqa: E402,F401
# Charging sessions: start (account or guest), follow, stop, 3-D Secure, list.
from webapp.api import sessions as _session_routes  # noqa: E402,F401
# Receipts, invoices and credit notes of the account.
from webapp.api import receipts as _receipt_routes  # noqa: E402,F401
# Post-paid electricity bills of the account's tenancies.
from webapp.api import bills as _bill_routes  # noqa: E402,F401
# Meter readings posted by meter data collectors (OAuth2 client credentials).
from webapp.meters import api as _meter_reading_routes  # noqa: E402,F401
# Meters: status (public, or the tenant's view) and top-ups.
from webapp.api import meters as _meter_routes  # noqa: E402,F401
