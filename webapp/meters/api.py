"""``POST /api/v1/meters/readings``: a meter data collector posts a batch of register readings.

Authenticated as the collector (OAuth2 client credentials, ``webapp.meters.oauth``).
The body is ``{"readings": [{"meter_code", "at", "register_kwh", "demand_kw"?}, …]}``
with at most ``MAX_BATCH`` rows; numbers are read exactly (JSON numbers as
Decimal, or strings). The answer is 200 with a result per row, in the order
sent, even when some rows were rejected; 413 for a larger batch, 422 for a
body that is not such an object. A meter of another operator is answered
like an unknown one.
"""

from __future__ import annotations

import json
from decimal import Decimal

from flask import g, jsonify, request
from flask_babel import gettext as _

from webapp.api import bp
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.extensions import limiter
from webapp.meters import readings
from webapp.meters.oauth import require_collector


def _collector_key() -> str:
    c = g.get("collector")
    return f"collector:{c.id}" if c is not None else request.remote_addr or ""


def _body() -> list:
    if not request.is_json:
        raise Problem(415, "unsupported_media_type", _("Send a JSON object with Content-Type: application/json."))
    try:
        body = json.loads(request.get_data(), parse_float=Decimal)
    except (ValueError, RecursionError):
        raise Problem(422, "invalid_json", _("The body must be a JSON object.")) from None
    rows = body.get("readings") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise Problem(422, "invalid_request", _("Some fields are missing or not valid."),
                      errors={"readings": _("Send a list of readings.")})
    if len(rows) > readings.MAX_BATCH:
        raise Problem(413, "batch_too_large", _("Send at most %(n)d readings per request.", n=readings.MAX_BATCH))
    if not rows:
        raise Problem(422, "invalid_request", _("Some fields are missing or not valid."),
                      errors={"readings": _("Send at least one reading.")})
    return rows


@bp.route("/meters/readings", methods=["POST"])
@require_collector
@limiter.limit("600 per minute", key_func=_collector_key)
def post_meter_readings():
    """Store a batch of readings of the collector's operator; answer per row (accepted, duplicate, rejected)."""
    rows = _body()
    s = db_session()
    report = readings.ingest(s, operator_id=g.collector.operator_id, rows=rows, source="api", now=utcnow(), collector=g.collector)
    s.commit()
    return jsonify(report.as_json())
