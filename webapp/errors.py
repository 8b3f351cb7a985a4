"""Errors a person can act on: HTML pages for browsers, RFC 9457 problem+json for the API.

API clients get ``application/problem+json`` with a stable ``code`` they can
branch on; browsers get a page that says what happened and what to do next.
A 500 rolls the request's session back so no half-done work is committed.
"""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, jsonify, render_template, request
from flask_babel import lazy_gettext as _l
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

log = logging.getLogger("voltpay.errors")

PROBLEM_JSON = "application/problem+json"

# Stable machine codes and human titles per HTTP status.
STATUS_CODES: dict[int, tuple[str, object]] = {
    400: ("bad_request", _l("The request could not be understood.")),
    401: ("unauthenticated", _l("Please sign in.")),
    403: ("forbidden", _l("You do not have permission to do this.")),
    404: ("not_found", _l("We could not find that.")),
    405: ("method_not_allowed", _l("This address does not accept that method.")),
    406: ("not_acceptable", _l("We cannot answer in the format you asked for.")),
    409: ("conflict", _l("That conflicts with the current state.")),
    413: ("too_large", _l("What you sent is too large.")),
    415: ("unsupported_media_type", _l("Send JSON with Content-Type: application/json.")),
    422: ("invalid_request", _l("Some of the data is not valid.")),
    429: ("rate_limited", _l("Too many attempts. Please wait and try again.")),
    500: ("server_error", _l("Something went wrong on our side.")),
    503: ("unavailable", _l("The service is temporarily unavailable.")),
}


def status_code_and_title(status: int) -> tuple[str, object]:
    """The stable code and title of ``status``; a status without its own entry gets the HTTP reason phrase."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    reason = HTTP_STATUS_CODES.get(status, "Error")
    return re.sub(r"[^a-z]+", "_", reason.lower()).strip("_") or "error", reason


class Problem(Exception):
    """An error with a stable code and a human message; rendered as problem+json or a page."""

    def __init__(
        self, status: int, code: str, detail: str, *, errors: dict[str, str] | None = None, headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = str(detail)
        self.errors = errors or {}
        self.headers = headers or {}
        # RFC 9457 extension members a client can act on (e.g. ``decline_reason``), documented per operation.
        self.extra = extra or {}


def wants_json() -> bool:
    """API paths and clients that prefer JSON get problem+json."""
    if request.path.startswith("/api/") or request.path.startswith("/webhooks/"):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json", PROBLEM_JSON])
    return best in ("application/json", PROBLEM_JSON) and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def problem_response(
    status: int, code: str, detail: str, *, errors: dict | None = None, headers: dict | None = None, extra: dict | None = None,
) -> Response:
    """Build an RFC 9457 problem+json response (``extra``: extension members, never overriding the standard ones)."""
    title = str(status_code_and_title(status)[1])
    body = {**(extra or {}), "type": f"https://voltpay.test/problems/{code}", "title": title, "status": status, "code": code, "detail": detail}
    if errors:
        body["errors"] = errors
    if getattr(g, "request_id", None):
        body["request_id"] = g.request_id
    resp = jsonify(body)
    resp.status_code = status
    resp.mimetype = PROBLEM_JSON
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _page(status: int, detail: str, headers: dict | None = None, **extra) -> Response:
    template = f"errors/{status}.html" if status in (400, 403, 404, 429, 500) else "errors/generic.html"
    title = STATUS_CODES.get(status, ("error", _l("Something went wrong.")))[1]
    resp = Response(render_template(template, status=status, title=title, detail=detail, **extra), status=status)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _retry_after() -> int | None:
    """Seconds until the breached rate limit resets (flask-limiter adds the header only later)."""
    from webapp.extensions import limiter

    current = limiter.current_limit
    if current is None:
        return None
    return max(1, int(current.reset_at - time.time()))


def init_app(app: Flask) -> None:
    """Register the handlers that turn every error into a page or a problem document."""

    @app.errorhandler(Problem)
    def _problem(e: Problem):
        if wants_json():
            return problem_response(e.status, e.code, e.detail, errors=e.errors, headers=e.headers, extra=e.extra)
        return _page(e.status, e.detail, e.headers, errors=e.errors)

    @app.errorhandler(CSRFError)
    def _csrf(e: CSRFError):
        detail = str(_l("This form has expired or was sent from another site. Go back, reload the page and try again."))
        if wants_json():
            return problem_response(400, "csrf_failed", detail)
        return _page(400, detail)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        status = e.code or 500
        code, title = status_code_and_title(status)
        headers = {}
        retry = _retry_after() if status == 429 else None  # flask-limiter sets the Retry-After header
        if status == 405 and e.get_response().headers.get("Allow"):
            headers["Allow"] = e.get_response().headers["Allow"]
        detail = str(title)
        if status == 429 and retry:
            detail = str(_l("Too many attempts. Please wait %(seconds)s seconds and try again.", seconds=retry))
        if wants_json():
            return problem_response(status, code, detail, headers=headers)
        return _page(status, detail, headers, retry_after=retry)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        s = g.pop("db_session", None)
        if s is not None:
            s.rollback()
            s.close()
        log.exception("unhandled error", extra={"path": request.path})
        detail = str(_l("Something went wrong on our side. Please try again in a minute; if it keeps happening, contact support."))
        if wants_json():
            return problem_response(500, "server_error", detail)
        return _page(500, detail)
