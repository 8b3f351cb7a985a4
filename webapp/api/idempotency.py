"""``Idempotency-Key`` on API POSTs that move money (the Stripe convention).

Same key and same body → the first response again, without a second
effect. Same key with another body (or another endpoint) → 422. A second
request while the first is still running → 409. Keys are scoped per caller,
kept 24 hours, and may be at most 255 characters. The first request's row
is committed before the work starts, so a crash leaves a row that a retry
reports as still running until it expires instead of paying twice.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json

from flask import Response, make_response, request
from flask_babel import gettext as _
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from webapp.db import session_factory, utcnow
from webapp.errors import Problem, problem_response
from webapp.models import IdempotencyRecord

HEADER = "Idempotency-Key"
KEEP = dt.timedelta(hours=24)


def _fingerprint() -> str:
    body = request.get_data(cache=True) or b""
    try:  # the same JSON with other spacing or key order is the same request
        body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        pass
    return hashlib.sha256(request.method.encode() + b" " + request.path.encode() + b"\n" + body).hexdigest()


def _forget(factory, scope: str, key: str) -> None:
    with factory.begin() as s:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key))


def idempotent(scope_of):
    """Decorate a POST view; ``scope_of()`` names the caller (e.g. ``user:42``)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*a, **kw):
            key = request.headers.get(HEADER)
            if key is None:
                return view(*a, **kw)
            key = key.strip()
            if not key or len(key) > 255:
                raise Problem(400, "invalid_idempotency_key", _("The Idempotency-Key header must be 1 to 255 characters."))
            scope = scope_of()
            fingerprint = _fingerprint()
            factory = session_factory()
            with factory.begin() as s:
                s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < utcnow() - KEEP, IdempotencyRecord.scope == scope))
            try:
                with factory.begin() as s:
                    s.add(IdempotencyRecord(scope=scope, key=key, method=request.method, path=request.path, request_hash=fingerprint))
            except IntegrityError:
                with factory() as s:
                    rec = s.scalar(select(IdempotencyRecord).where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key))
                if rec is None:  # expired and removed in between: treat as new
                    return view(*a, **kw)
                if rec.request_hash != fingerprint:
                    raise Problem(422, "idempotency_key_reused", _("This Idempotency-Key was used for a different request. Use a new key for a new request."))
                if rec.status_code is None:
                    raise Problem(409, "request_in_progress", _("A request with this Idempotency-Key is still being processed. Try again in a moment."), headers={"Retry-After": "1"})
                resp = Response(rec.response_body, status=rec.status_code, mimetype="application/problem+json" if rec.status_code >= 400 else "application/json")
                resp.headers["Idempotent-Replayed"] = "true"
                return resp
            try:
                resp = view(*a, **kw)
            except Problem as e:
                resp, problem = None, e
            except Exception:
                _forget(factory, scope, key)  # an unexpected failure: the key may be retried
                raise
            else:
                problem = None
            if problem is not None:
                resp = problem_response(problem.status, problem.code, problem.detail, errors=problem.errors, headers=problem.headers)
            resp = make_response(resp)
            with factory.begin() as s:
                rec = s.scalar(select(IdempotencyRecord).where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key))
                if rec is not None:
                    if resp.status_code >= 500 or resp.status_code in (409, 429):
                        s.delete(rec)  # a failure worth retrying: the key may be used again
                    else:
                        rec.status_code = resp.status_code
                        rec.response_body = resp.get_data(as_text=True)
            return resp

        return wrapper

    return decorate


