"""``Idempotency-Key`` on API POSTs that move money (the Stripe convention).

Same key and same body → the first response again, without a second
effect. Same key with another body (or another endpoint) → 422. A second
request while the first is still running → 409. Keys are scoped per caller,
kept 24 hours, and may be at most 255 characters. The first request's row
is committed before the work starts, so a crash leaves a row that a retry
reports as still running until it expires instead of paying twice.

A 5xx answer (or 409/429) normally frees the key for a retry, because
nothing happened. Once a view has committed an effect (a payment record that
was, or may have been, sent to the provider) it calls ``effect_started()``:
from then on every answer is kept and replayed, even a 503 or an unexpected
error, because running the view again would create a second payment; the
outcome is then found through the resource the answer names (and settled by
the reconciliation job).

The records are written in sessions of their own. The request's session
must not hold a transaction meanwhile (on SQLite every transaction takes the
write lock at BEGIN), so the decorator ends it before its own writes: it is
committed before the view (only sign-in bookkeeping can be in it) and rolled
back after it (a view commits what it means to keep; the teardown would drop
the rest anyway).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json

from flask import Response, g, make_response, request
from flask_babel import gettext as _
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from webapp.db import session_factory, utcnow
from webapp.errors import STATUS_CODES, Problem, problem_response
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


def _remember(factory, scope: str, key: str, resp: Response, *, keep_failure: bool) -> None:
    """Store the answer for replay, or free the key when the failure is worth retrying and nothing happened."""
    with factory.begin() as s:
        rec = s.scalar(select(IdempotencyRecord).where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key))
        if rec is None:
            return
        if not keep_failure and (resp.status_code >= 500 or resp.status_code in (409, 429)):
            s.delete(rec)  # a failure worth retrying: the key may be used again
        else:
            rec.status_code = resp.status_code
            rec.response_body = resp.get_data(as_text=True)


def _forget(factory, scope: str, key: str) -> None:
    with factory.begin() as s:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key))


def effect_started() -> None:
    """Tell ``idempotent`` that this request has committed an effect: keep its answer, whatever it is."""
    g.idempotency_effect_started = True


def _end_request_transaction(*, commit: bool) -> None:
    """End the request session's transaction (if any) so our own sessions never wait for its lock."""
    s = g.get("db_session")
    if s is not None and s.in_transaction():
        if commit:
            s.commit()
        else:
            s.rollback()


def idempotent(scope_of):
    """Decorate a POST view; ``scope_of()`` names the caller (e.g. ``user:42``)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*a, **kw):
            key = request.headers.get(HEADER)
            if key is None:
                return view(*a, **kw)
            if len(key) > 255:  # checked before stripping, as the OpenAPI document's maxLength counts
                raise Problem(400, "invalid_idempotency_key", _("The Idempotency-Key header must be 1 to 255 characters."))
            key = key.strip()
            if not key:
                raise Problem(400, "invalid_idempotency_key", _("The Idempotency-Key header must be 1 to 255 characters."))
            scope = scope_of()
            fingerprint = _fingerprint()
            factory = session_factory()
            _end_request_transaction(commit=True)
            g.idempotency_effect_started = False
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
                _end_request_transaction(commit=False)
                if g.get("idempotency_effect_started"):
                    # The effect is committed: a retry must not repeat it. Keep a 500 for this key.
                    code, _title = STATUS_CODES[500]
                    detail = _("Something went wrong on our side. Please try again in a minute; if it keeps happening, contact support.")
                    _remember(factory, scope, key, problem_response(500, code, detail), keep_failure=True)
                else:
                    _forget(factory, scope, key)  # an unexpected failure before any effect: the key may be retried
                raise
            else:
                problem = None
            _end_request_transaction(commit=False)
            if problem is not None:
                resp = problem_response(problem.status, problem.code, problem.detail, errors=problem.errors, headers=problem.headers, extra=problem.extra)
            resp = make_response(resp)
            _remember(factory, scope, key, resp, keep_failure=bool(g.get("idempotency_effect_started")))
            return resp

        return wrapper

    return decorate


