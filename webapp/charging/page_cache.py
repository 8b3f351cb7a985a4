"""The connector page as anonymous visitors see it: a few seconds' cache, served without the full request cycle.

Everyone who scans a pile's QR code without being signed in gets the same
page, except for their CSRF token; during busy minutes (a car park opening,
a bench) rendering it again for each of them costs five queries and a
template. The page is kept for ``PAGE_CACHE_SECONDS`` (0 turns this off),
per process and language, with the token replaced by a placeholder.

Two ways out of the cache:

* the view (``webapp.charging.views.connector``) puts each visitor's own
  token back, for a visitor Flask has already given a request context
  (a session cookie, a query string);
* ``AnonymousPages``, a WSGI middleware in front of Flask, answers a
  first-time visitor — a GET of ``/c/<code>`` with no cookie of ours and no
  query string (no cookie at all: not a returning visitor, not a signed-in
  user), whose language therefore comes from Accept-Language alone —
  straight from the cache. It does what Flask, Flask-WTF and our hooks do for
  such a request, and nothing else: a new session holding only a CSRF token
  (signed with the app's own session serializer, so Flask reads it back),
  the token signed as Flask-WTF signs it, the response headers that Flask
  sent with that very page (learnt when the page was cached: security
  headers and all), a request id and the JSON request log line. The saving
  is the request context, session handling, login, locale and hooks:
  ``bench/http_load.py`` measures it.

A status a few seconds old is harmless: starting checks the connector, the
price and the hold again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass

from flask import Flask
from itsdangerous import URLSafeTimedSerializer

from webapp.i18n import _best_match
from webapp.logs import _REQUEST_ID

log = logging.getLogger("voltpay.http")

PLACEHOLDER = "\x00csrf\x00"
LEARN = "voltpay.page_cache.learn"  # environ: the cache key of the page the view has just cached
_PATH = re.compile(r"/c/([A-Za-z0-9_-]{1,16})")  # webapp.api.connectors.CODE
_DROPPED = {"content-length", "set-cookie", "x-request-id"}  # per response, made again for each visitor


@dataclass
class Page:
    """One cached page: its body with the token placeholder, and the response headers Flask sent with it."""

    expires: float
    body: str
    headers: list[tuple[str, str]] | None = None  # learnt from Flask's response; None: not yet
    cookie_attributes: str = ""  # what follows the session cookie's value in Flask's Set-Cookie


class PageCache:
    """Pages by (connector code, language), each for a few seconds; bounded, per process."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._pages: dict[tuple[str, str], Page] = {}

    def page(self, key: tuple[str, str]) -> Page | None:
        """The page for ``key`` while it is fresh."""
        hit = self._pages.get(key)
        return hit if hit is not None and hit.expires >= time.monotonic() else None

    def put(self, key: tuple[str, str], body: str, token: str, seconds: float) -> None:
        """Keep ``body`` for ``seconds``, with the visitor's ``token`` replaced by the placeholder."""
        if len(self._pages) >= self.MAX_ENTRIES:
            self._pages.clear()
        self._pages[key] = Page(time.monotonic() + seconds, body.replace(token, PLACEHOLDER))

    def learn(self, key: tuple[str, str], headers: list[tuple[str, str]], app: Flask) -> None:
        """Remember the headers of Flask's response to a first-time visitor, for ``AnonymousPages``.

        Learnt only from a response that set exactly one cookie, the session's,
        holding nothing but the CSRF token; otherwise the page stays with the view.
        """
        page = self._pages.get(key)
        name = app.config["SESSION_COOKIE_NAME"]
        cookies = [v for k, v in headers if k.lower() == "set-cookie"]
        if page is None or len(cookies) != 1 or not cookies[0].startswith(name + "="):
            return
        value, sep, attributes = cookies[0].partition(";")
        try:
            content = app.session_interface.get_signing_serializer(app).loads(value[len(name) + 1:])
        except Exception:  # noqa: BLE001 - not a session we can read: leave the page to the view
            return
        if set(content) != {app.config.get("WTF_CSRF_FIELD_NAME") or "csrf_token"}:
            return
        page.cookie_attributes = sep + attributes
        page.headers = [(k, v) for k, v in headers if k.lower() not in _DROPPED]


class AnonymousPages:
    """WSGI middleware: first-time visitors of a cached connector page get it without the full request cycle."""

    def __init__(self, app: Flask, wsgi_app, cache: PageCache) -> None:
        self.app, self.wsgi_app, self.cache = app, wsgi_app, cache
        self._signers: tuple[object, URLSafeTimedSerializer] | None = None

    def _key(self, environ) -> tuple[str, str] | None:
        """The cache key when the request is a first-time visitor's GET of a connector page; else None."""
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING"):
            return None
        match = _PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match is None:
            return None
        cookies = environ.get("HTTP_COOKIE")
        if cookies:  # ours or not, a returning visitor goes through Flask (a signed-in user, a chosen language)
            return None
        return match.group(1), _best_match(environ.get("HTTP_ACCEPT_LANGUAGE", ""))

    def __call__(self, environ, start_response):
        key = self._key(environ) if self.app.config.get("PAGE_CACHE_SECONDS") else None
        if key is None:
            return self.wsgi_app(environ, start_response)
        page = self.cache.page(key)
        if page is not None and page.headers is not None:
            return self._serve(environ, start_response, page)

        def learning_start_response(status, headers, exc_info=None):
            if environ.get(LEARN) == key and status.startswith("200 "):
                self.cache.learn(key, headers, self.app)
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, learning_start_response)

    def _csrf_signer(self) -> URLSafeTimedSerializer:
        """Flask-WTF's token serializer (``flask_wtf.csrf.generate_csrf``), built once per secret."""
        secret = self.app.config.get("WTF_CSRF_SECRET_KEY") or self.app.secret_key
        cached = self._signers
        if cached is None or cached[0] != secret:
            cached = self._signers = (secret, URLSafeTimedSerializer(secret, salt="wtf-csrf-token"))
        return cached[1]

    def _serve(self, environ, start_response, page: Page):
        started = time.perf_counter()
        raw = hashlib.sha1(os.urandom(64)).hexdigest()  # as Flask-WTF makes the session's token  # noqa: S324
        field = self.app.config.get("WTF_CSRF_FIELD_NAME") or "csrf_token"
        session_value = self.app.session_interface.get_signing_serializer(self.app).dumps({field: raw})
        body = page.body.replace(PLACEHOLDER, self._csrf_signer().dumps(raw)).encode()
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        start_response("200 OK", [
            *page.headers,
            ("Content-Length", str(len(body))),
            ("Set-Cookie", f"{self.app.config['SESSION_COOKIE_NAME']}={session_value}{page.cookie_attributes}"),
            ("X-Request-ID", request_id),
        ])
        log.info("request", extra={"request_id": request_id, "method": "GET", "path": environ.get("PATH_INFO", ""), "status": 200,
                                   "ms": round((time.perf_counter() - started) * 1000, 1), "cached": True})
        return [body]


def init_app(app: Flask) -> None:
    """Give ``app`` its page cache and put ``AnonymousPages`` in front of it."""
    cache = PageCache()
    app.extensions["page_cache"] = cache
    app.wsgi_app = AnonymousPages(app, app.wsgi_app, cache)
