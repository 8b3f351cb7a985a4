"""Flask's signed-cookie sessions, with the signing serializer built once instead of twice per request.

Flask builds a new ``URLSafeTimedSerializer`` to open the session and again to
save it; building one costs about as much as signing with it. The serializer
holds only configuration (keys, salt, digest), so one per set of keys serves
every request and thread. Rotating ``SECRET_KEY`` (with the old key in
``SECRET_KEY_FALLBACKS``) gives a new set of keys and so a new serializer.
"""

from __future__ import annotations

from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer


class CookieSessions(SecureCookieSessionInterface):
    """``SecureCookieSessionInterface`` whose signing serializer is reused while the keys stay the same."""

    def __init__(self) -> None:
        self._serializer: tuple[tuple, URLSafeTimedSerializer | None] | None = None

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        """The serializer for the app's current keys (built on first use and when the keys change)."""
        keys = (app.secret_key, tuple(app.config.get("SECRET_KEY_FALLBACKS") or ()))
        cached = self._serializer
        if cached is None or cached[0] != keys:
            cached = self._serializer = (keys, super().get_signing_serializer(app))
        return cached[1]


def init_app(app: Flask) -> None:
    """Use ``CookieSessions`` for ``app``."""
    app.session_interface = CookieSessions()
