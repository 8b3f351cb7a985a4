"""Meter data collectors as OAuth2 clients: the client-credentials token endpoint and the bearer check.

* A collector (``MeterCollector``) belongs to an operator; it has a
  ``client_id`` and a secret shown once at creation or rotation and stored
  only as an Argon2 hash (``create_collector``, ``rotate_secret``).
* ``POST /oauth/token`` is an authlib authorization server with the
  ``client_credentials`` grant only; the client authenticates with HTTP
  Basic (``client_secret_basic``) or form fields (``client_secret_post``).
  The answer is a bearer token valid ``TOKEN_SECONDS`` (scope
  ``meters:write``); only its SHA-256 is stored (``CollectorToken``).
  Errors are RFC 6749 JSON (``{"error": "invalid_client"}``, 401), as OAuth
  client libraries expect.
* ``require_collector`` protects an API view (authlib's resource protector
  with our validator); a missing, unknown, expired or revoked token, or a
  deactivated collector, is a 401 problem+json with ``WWW-Authenticate:
  Bearer``. The collector is ``g.collector``.

Rotating a secret revokes the collector's tokens, so a leaked secret and
whatever it obtained stop working at once.
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets

from authlib.integrations.flask_oauth2 import AuthorizationServer, ResourceProtector
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenValidator
from flask import Blueprint, Flask, current_app, g
from flask_babel import gettext as _
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from webapp.auth.passwords import hash_password, verify_password
from webapp.auth.tokens import digest, new_secret
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.extensions import limiter
from webapp.meters.models import CollectorToken, MeterCollector

SCOPE = "meters:write"
TOKEN_SECONDS = 3600
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
SECRET_PREFIX = "vpcs_"

bp = Blueprint("meters_oauth", __name__)


# --------------------------------------------------------------------------- collectors


def create_collector(s: Session, operator_id: int, name: str, webhook_url: str | None = None) -> tuple[MeterCollector, str]:
    """Create a collector of ``operator_id``; returns it and its client secret (shown once, stored hashed)."""
    secret = SECRET_PREFIX + new_secret()
    c = MeterCollector(operator_id=operator_id, name=name.strip()[:120], client_id="vpc_" + secrets.token_hex(8),
                       client_secret_hash=hash_password(secret), webhook_url=(webhook_url or None),
                       webhook_secret="whsec_" + new_secret(24), active=True)
    s.add(c)
    s.flush()
    return c, secret


def rotate_secret(s: Session, collector: MeterCollector) -> str:
    """Give the collector a new client secret (returned once) and revoke every token it holds."""
    secret = SECRET_PREFIX + new_secret()
    collector.client_secret_hash = hash_password(secret)
    s.execute(update(CollectorToken).where(CollectorToken.collector_id == collector.id).values(revoked=True))
    s.flush()
    return secret


# --------------------------------------------------------------------------- authlib adapters


class CollectorClient(ClientMixin):
    """A collector as authlib sees an OAuth2 client."""

    def __init__(self, collector: MeterCollector):
        self.collector = collector

    def get_client_id(self):
        return self.collector.client_id

    def get_default_redirect_uri(self):  # pragma: no cover - no redirects in client credentials
        return None

    def get_allowed_scope(self, scope):
        return SCOPE

    def check_redirect_uri(self, redirect_uri):  # pragma: no cover
        return False

    def check_client_secret(self, client_secret):
        return isinstance(client_secret, str) and verify_password(self.collector.client_secret_hash, client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        return endpoint == "token" and method in AUTH_METHODS

    def check_response_type(self, response_type):  # pragma: no cover
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials"


class _ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = list(AUTH_METHODS)


def _query_client(client_id: str):
    c = db_session().scalar(select(MeterCollector).where(MeterCollector.client_id == client_id))
    return CollectorClient(c) if c is not None and c.active else None


def _save_token(token: dict, request) -> None:
    client: CollectorClient = request.client
    s = db_session()
    now = utcnow()
    s.add(CollectorToken(collector_id=client.collector.id, token_hash=digest(token["access_token"]), scope=token.get("scope") or SCOPE,
                         issued_at=now, expires_at=now + dt.timedelta(seconds=int(token.get("expires_in") or TOKEN_SECONDS))))
    s.commit()


class _Token(TokenMixin):
    def __init__(self, row: CollectorToken, collector: MeterCollector):
        self.row, self.collector = row, collector

    def check_client(self, client):  # pragma: no cover
        return client.get_client_id() == self.collector.client_id

    def get_scope(self):
        return self.row.scope

    def get_expires_in(self):
        return int((self.row.expires_at - self.row.issued_at).total_seconds())

    def is_expired(self):
        return self.row.expires_at <= utcnow()

    def is_revoked(self):
        return self.row.revoked or not self.collector.active

    def get_user(self):  # pragma: no cover
        return None

    def get_client(self):
        return CollectorClient(self.collector)


class _Validator(BearerTokenValidator):
    def authenticate_token(self, token_string):
        row = db_session().execute(select(CollectorToken, MeterCollector).join(MeterCollector, MeterCollector.id == CollectorToken.collector_id)
                                   .where(CollectorToken.token_hash == digest(token_string))).first()
        return _Token(row[0], row[1]) if row is not None else None


class _Protector(ResourceProtector):
    def raise_error_response(self, error):
        """Answer problem+json (our API's errors) with an RFC 6750 ``WWW-Authenticate`` header."""
        realm = 'Bearer realm="voltpay"'
        if error.status_code == 403:
            raise Problem(403, "insufficient_scope", _("This token may not post meter readings."),
                          headers={"WWW-Authenticate": f'{realm}, error="insufficient_scope", scope="{SCOPE}"'})
        if error.error == "missing_authorization":
            raise Problem(401, "unauthenticated", _("Send a collector access token: Authorization: Bearer <token> (get one at /oauth/token)."),
                          headers={"WWW-Authenticate": realm})
        raise Problem(401, "invalid_token", _("This access token is not valid: it is unknown, revoked or expired."),
                      headers={"WWW-Authenticate": f'{realm}, error="invalid_token"'})


protector = _Protector()
protector.register_token_validator(_Validator())


def require_collector(view):
    """Require a collector's bearer token with scope ``meters:write``; the collector is ``g.collector``."""

    @functools.wraps(view)
    def wrapper(*a, **kw):
        try:
            token = protector.acquire_token([SCOPE])
        except OAuth2Error as error:
            protector.raise_error_response(error)
        g.collector = token.collector
        return view(*a, **kw)

    return wrapper


# --------------------------------------------------------------------------- the token endpoint


def init_app(app: Flask) -> None:
    """Create the authorization server for ``app`` and register ``/oauth/token``."""
    app.config.setdefault("OAUTH2_TOKEN_EXPIRES_IN", {"client_credentials": TOKEN_SECONDS})
    server = AuthorizationServer(app, query_client=_query_client, save_token=_save_token)
    server.register_grant(_ClientCredentials)
    app.extensions["meters_oauth_server"] = server
    from webapp.extensions import csrf

    csrf.exempt(bp)  # client credentials in the request, no cookies: nothing for a forged form to ride on
    app.register_blueprint(bp)


@bp.route("/oauth/token", methods=["POST"])
@limiter.limit("30 per minute")
def token():
    """OAuth2 token endpoint (client credentials) for meter data collectors."""
    resp = current_app.extensions["meters_oauth_server"].create_token_response()
    resp.headers["Cache-Control"] = "no-store"
    return resp
