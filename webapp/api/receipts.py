"""JSON API of the account's receipts, invoices and credit notes: list, one document, its PDF.

Only the account's own documents (``owner`` ``user:<id>``); another account's
number is answered 404 like a number that does not exist. Amounts are
``{"amount", "currency"}`` in minor units and positive, also on a credit
note (``kind`` says it gives money back). Descriptions are in the request's
language; the PDF is in the document's own language.
"""

from __future__ import annotations

import datetime as dt
import re

from flask import Response, g, jsonify, request
from flask_babel import gettext as _
from sqlalchemy import select

from payments.invoicing import Document
from payments.tariff_store import loads
from webapp.api import bp, invalid, token_required
from webapp.db import db_session
from webapp.errors import Problem
from webapp.receipts import render
from webapp.receipts.views import NUMBER, DocumentNumberConverter

MONTH = re.compile(r"(19|20|21)[0-9]{2}-(0[1-9]|1[0-2])")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_ID = 2147483647

# Registered before the routes below are added to the app's URL map (this blueprint is registered before the pages').
bp.record_once(lambda state: state.app.url_map.converters.setdefault("docnumber", DocumentNumberConverter))


def _money(minor: int | None, currency: str) -> dict | None:
    return None if minor is None else {"amount": int(minor), "currency": currency}


def _own(number: str) -> Document:
    doc = db_session().scalar(select(Document).where(Document.number == number))
    if doc is None or doc.owner != g.api_user.owner:
        raise Problem(404, "not_found", _("We could not find that."))
    return doc


def _links(doc: Document) -> dict:
    return {"html": render.absolute_url("receipts.document_page", number=doc.number),
            "pdf": render.absolute_url("api.receipt_pdf", number=doc.number),
            "check": render.check_url(doc)}


def summary_json(doc: Document) -> dict:
    """A document in a list: what it is, when, how much, where to get it."""
    return {"number": doc.number, "kind": doc.kind.value, "issued_at": doc.issued_at.isoformat(), "source": doc.source,
            "total": _money(doc.total_minor, doc.currency), "links": _links(doc)}


def document_json(doc: Document) -> dict:
    """One document in full: parties, lines, VAT per rate, totals, payment, session facts, status and links."""
    c = loads(doc.content)
    cur = doc.currency
    status = render.status_of(db_session(), doc)
    pay = c.get("payment") or None
    sess = c.get("session") or None
    return {
        **summary_json(doc),
        "locale": doc.locale,
        "status": status["code"],
        "replaced_by": status["replaced_by"],
        "seller": {k: (c.get("seller") or {}).get(k) or "" for k in ("name", "legal_name", "address", "vat_id")},
        "buyer": {k: (c.get("buyer") or {}).get(k) or "" for k in ("email", "company_name", "address", "vat_id")},
        "lines": [{"kind": ln["kind"], "description": render.line_label(ln, c.get("reason")), "quantity": ln.get("quantity"),
                   "unit": ln.get("unit"), "unit_price": ln.get("unit_price"), "vat_rate": ln.get("vat_rate"), "note": ln.get("note"),
                   "amount": _money(ln.get("net"), cur)} for ln in c.get("lines") or []],
        "vat": [{"rate": v.get("rate"), "net": _money(v["net"], cur), "vat": _money(v["vat"], cur), "gross": _money(v["gross"], cur)}
                for v in c.get("vat") or []],
        "totals": {"net": _money(doc.net_minor, cur), "vat": _money(doc.vat_minor, cur), "total": _money(doc.total_minor, cur)},
        "payment": None if not pay else {
            "method": pay.get("method"), "brand": pay.get("brand"), "last4": pay.get("last4"),
            "held": _money(pay.get("held"), cur), "captured": _money(pay.get("captured"), cur),
            "released": _money(pay.get("released"), cur), "refunded": _money(pay.get("refunded"), cur),
        },
        "session": None if not sess else {
            "id": sess.get("id"), "site": sess.get("site") or "", "connector_code": sess.get("connector_code") or "",
            "started_at": sess.get("started_at"), "ended_at": sess.get("ended_at") or sess.get("stopped_at"),
            "time_zone": sess.get("time_zone") or "UTC", "energy_kwh": sess.get("energy_kwh"),
            "meter_start_wh": sess.get("meter_start_wh"), "meter_stop_wh": sess.get("meter_stop_wh"),
        },
        "original": None if not c.get("original") else {"number": c["original"]["number"]},
        "replaces": None if not c.get("replaces") else {"number": c["replaces"]["number"], "credit_note": c["replaces"]["credit_note"]},
        "reason": c.get("reason"),
    }


def _int_arg(name: str, lo: int, hi: int, errors: dict, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 10 or not lo <= int(raw) <= hi:
        errors[name] = _("Send a whole number from %(lo)s to %(hi)s.", lo=lo, hi=hi)
        return default
    return int(raw)


@bp.route("/receipts", methods=["GET"])
@token_required
def list_receipts():
    """The account's documents, newest first; ``month=YYYY-MM`` (UTC) filters, ``before=next_before`` pages."""
    errors: dict[str, str] = {}
    limit = _int_arg("limit", 1, MAX_LIMIT, errors, default=DEFAULT_LIMIT)
    before = _int_arg("before", 1, MAX_ID, errors)
    month = request.args.get("month")
    if month is not None and not MONTH.fullmatch(month):
        errors["month"] = _("Send a month as YYYY-MM, for example 2026-03.")
    if errors:
        raise invalid(errors)
    q = select(Document).where(Document.owner == g.api_user.owner).order_by(Document.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(Document.id < before)
    if month is not None:
        year, mon = int(month[:4]), int(month[5:])
        start = dt.datetime(year, mon, 1, tzinfo=dt.UTC)
        end = dt.datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=dt.UTC)
        q = q.where(Document.issued_at >= start, Document.issued_at < end)
    rows = list(db_session().scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    resp = jsonify(data=[summary_json(d) for d in rows], next_before=rows[-1].id if more else None)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/receipts/<docnumber:number>", methods=["GET"])
@token_required
def get_receipt(number: str):
    """One of the account's documents as JSON."""
    resp = jsonify(document_json(_own(number)))
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/receipts/<docnumber:number>.pdf", methods=["GET"])
@token_required
def receipt_pdf(number: str):
    """One of the account's documents as a PDF, in the document's language."""
    doc = _own(number)
    resp = Response(render.render_pdf(db_session(), doc), mimetype="application/pdf")
    resp.headers["Content-Disposition"] = f'inline; filename="{doc.number}.pdf"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


__all__ = ["NUMBER", "document_json", "summary_json"]
