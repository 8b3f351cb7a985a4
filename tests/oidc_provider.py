"""A small but real OpenID Connect provider for tests, built on authlib's server side.

It runs in a background thread on 127.0.0.1 (a free port) and serves discovery,
JWKS, authorization (auto-approved, no login page), token and userinfo
endpoints. Everything lives in memory. ID tokens are signed RS256 with a key
generated at start; PKCE with S256 is required on every authorization request
and the token endpoint checks the ``code_verifier`` against it.

Tests steer it through plain attributes:

* ``user``: the claims of the person who "signs in" at the provider
  (``sub``, ``email``, ``email_verified``); copied when a code is issued;
* ``wrong_nonce``: put a nonce other than the requested one in the ID token;
* ``swap_code_challenge``: bind issued codes to a different PKCE challenge, as
  if the code had been stolen and replayed by someone who does not hold the
  verifier, so the token request must be refused;

and read back what the client sent: ``last_authorize`` (the query of the last
authorization request), ``token_requests`` (form, client authentication method
and HTTP status of every token request).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

from authlib.common.security import generate_token
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    scope_to_list,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge, create_s256_code_challenge
from authlib.oidc.core import OpenIDCode, UserInfo
from joserfc.jwk import RSAKey
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

CLAIMS = ("sub", "email", "email_verified")


# --- models (plain objects) ---------------------------------------------------------------


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    scope: str = "openid email profile"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope):
        allowed = set(scope_to_list(self.scope))
        return " ".join(s for s in scope_to_list(scope or "") if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return hashlib.sha256(client_secret.encode()).digest() == hashlib.sha256(self.client_secret.encode()).digest()

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class AuthCode(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: dict
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None

    def is_expired(self) -> bool:
        return time.time() > self.auth_time + 600


# --- werkzeug glue for authlib's framework-neutral server ---------------------------------


class _Payload(OAuth2Payload):
    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def data(self):
        return self._request.values

    @cached_property
    def datalist(self):
        values = defaultdict(list)
        for k in self.data:
            values[k].extend(self.data.getlist(k))
        return values


class _OAuth2Request(OAuth2Request):
    def __init__(self, request: Request) -> None:
        super().__init__(method=request.method, uri=request.url, headers=request.headers)
        self._request = request
        self.payload = _Payload(request)

    @property
    def args(self):
        return self._request.args

    @property
    def form(self):
        return self._request.form


class _Server(AuthorizationServer):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(scopes_supported=["openid", "email", "profile"])
        self.provider = provider
        self.register_token_generator("default", BearerTokenGenerator(lambda **kw: generate_token(42)))

    def query_client(self, client_id):
        return self.provider.clients.get(client_id)

    def save_token(self, token, request):
        self.provider.access_tokens[token["access_token"]] = dict(request.user)

    def create_oauth2_request(self, request):
        return request if isinstance(request, OAuth2Request) else _OAuth2Request(request)

    def create_json_request(self, request):
        raise TypeError("this test provider serves no JSON-bodied OAuth endpoints")

    def handle_response(self, status_code, payload, headers):
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return Response(payload, status=status_code, headers=headers)

    def send_signal(self, name, *args, **kwargs):
        pass


class _CodeGrant(AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    @property
    def provider(self) -> OidcProvider:
        return self.server.provider

    def save_authorization_code(self, code, request):
        data = request.payload.data
        challenge = data.get("code_challenge")
        if self.provider.swap_code_challenge:
            challenge = create_s256_code_challenge(generate_token(48))
        self.provider.codes[code] = AuthCode(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope,
            user=dict(request.user),
            nonce=data.get("nonce"),
            code_challenge=challenge,
            code_challenge_method=data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code, client):
        item = self.provider.codes.get(code)
        if item and item.client_id == client.client_id and not item.is_expired():
            return item
        return None

    def delete_authorization_code(self, authorization_code):
        self.provider.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code):
        return authorization_code.user


class _RequireS256(CodeChallenge):
    """PKCE required for every client (not only public ones), and only with S256."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE with code_challenge_method=S256 is required.")
        super().validate_code_challenge(grant, redirect_uri)


class _OpenIDCode(OpenIDCode):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(require_nonce=True)
        self.provider = provider

    def exists_nonce(self, nonce, request):
        return any(c.nonce == nonce for c in self.provider.codes.values())

    def resolve_client_private_key(self, client):
        return self.provider.key

    def get_client_algorithm(self, client):
        return "RS256"

    def get_encode_header(self, client):
        return {"alg": "RS256", "kid": self.provider.key.kid}

    def get_client_claims(self, client):
        now = int(time.time())
        return {"iss": self.provider.issuer, "aud": [client.get_client_id()], "iat": now, "exp": now + 300}

    def get_authorization_code_claims(self, authorization_code):
        claims = super().get_authorization_code_claims(authorization_code)
        if self.provider.wrong_nonce:
            claims["nonce"] = "not-the-nonce-" + generate_token(8)
        return claims

    def generate_user_info(self, user, scope):
        info = UserInfo(sub=str(user["sub"]))
        if "email" in scope_to_list(scope):
            info["email"] = user.get("email")
            info["email_verified"] = user.get("email_verified")
        return info


# --- the provider ---------------------------------------------------------------------------


class OidcProvider:
    """The provider: start() it, point the client at ``issuer``, stop() it."""

    def __init__(self, client_id: str = "voltpay-test", client_secret: str | None = None, redirect_uris: tuple[str, ...] = ("http://localhost/auth/oidc/callback",)) -> None:
        self.client_id = client_id
        self.client_secret = client_secret or generate_token(32)
        self.clients = {client_id: Client(client_id, self.client_secret, tuple(redirect_uris))}
        self.key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, private=True, auto_kid=True)
        self.server = _Server(self)
        self.server.register_grant(_CodeGrant, [_OpenIDCode(self), _RequireS256(required=True)])
        self.url_map = Map(
            [
                Rule("/.well-known/openid-configuration", endpoint="discovery"),
                Rule("/jwks", endpoint="jwks"),
                Rule("/authorize", endpoint="authorize"),
                Rule("/token", endpoint="token", methods=["POST"]),
                Rule("/userinfo", endpoint="userinfo", methods=["GET", "POST"]),
            ]
        )
        self._httpd = None
        self._thread: threading.Thread | None = None
        self.issuer = ""
        self.reset()

    # state a test may read or change
    def reset(self) -> None:
        """Forget codes, tokens and records; back to the default user and no tampering."""
        self.user: dict = {"sub": "provider-user-1", "email": "pat@example.com", "email_verified": True}
        self.wrong_nonce = False
        self.swap_code_challenge = False
        self.codes: dict[str, AuthCode] = {}
        self.access_tokens: dict[str, dict] = {}
        self.last_authorize: dict[str, str] | None = None
        self.token_requests: list[dict] = []

    def start(self) -> OidcProvider:
        self._httpd = make_server("127.0.0.1", 0, self.wsgi, threaded=True)
        self.issuer = f"http://127.0.0.1:{self._httpd.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oidc-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    # WSGI
    def wsgi(self, environ, start_response):
        request = Request(environ)
        try:
            endpoint, _args = self.url_map.bind_to_environ(environ).match()
            response = getattr(self, "_" + endpoint)(request)
        except HTTPException as e:
            response = e.get_response(environ)
        return response(environ, start_response)

    def _discovery(self, request: Request) -> Response:
        return _json(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/jwks",
                "userinfo_endpoint": self.issuer + "/userinfo",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "subject_types_supported": ["public"],
                "scopes_supported": ["openid", "email", "profile"],
                "claims_supported": ["iss", "aud", "exp", "iat", "sub", "nonce", "email", "email_verified"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    def _jwks(self, request: Request) -> Response:
        return _json({"keys": [self.key.as_dict(private=False)]})

    def _authorize(self, request: Request) -> Response:
        """No login page: the configured test user approves at once."""
        self.last_authorize = request.args.to_dict()
        user = {k: self.user.get(k) for k in CLAIMS}
        try:
            grant = self.server.get_consent_grant(request, end_user=user)
        except OAuth2Error as error:  # back to the client when its redirect_uri checked out, else a JSON error here
            return self.server.handle_error_response(request, error)
        return self.server.create_authorization_response(request, grant_user=user, grant=grant)

    def _token(self, request: Request) -> Response:
        record = {"form": request.form.to_dict(), "basic_auth": request.authorization is not None}
        response = self.server.create_token_response(request)
        record["status"] = response.status_code
        self.token_requests.append(record)
        return response

    def _userinfo(self, request: Request) -> Response:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        user = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if user is None:
            return Response("", status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return _json({k: user.get(k) for k in CLAIMS})


def _json(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json", headers={"Cache-Control": "no-store"})
