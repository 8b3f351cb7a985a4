"""JSON API of the account's post-paid electricity bills: list and one bill (``webapp.meters.bills``).

Only the bills of tenants whose account is the caller (``Tenant.user_id``),
and only issued or paid ones (a bill still being prepared or checked is not
the tenant's yet); any other id is 404, like an id that does not exist.
Paying happens on the bill's page (card element, 3-D Secure) — its link is
in ``links.pay``.
"""

from __future__ import annotations

from flask import g, jsonify, request
from flask_babel import gettext as _
from sqlalchemy import select

from payments.invoicing import Document
from webapp.api import bp, invalid, token_required
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.meters import bills as service
from webapp.meters.models import Bill, BillState, Tenant
from webapp.models import Site
from webapp.receipts import render

SHOWN = (BillState.ISSUED, BillState.PAID)
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_ID = 2147483647


def _money(minor: int, currency: str) -> dict:
    return {"amount": int(minor), "currency": currency}


def _summary(bill: Bill, tenant: Tenant, site: Site, doc: Document | None) -> dict:
    overdue = bill.state is BillState.ISSUED and bill.due_date is not None and \
        service._local_date(utcnow(), site.time_zone) > bill.due_date
    return {
        "id": bill.id, "period": bill.period, "state": bill.state.value, "overdue": overdue,
        "total": _money(bill.total_minor, bill.currency), "vat": _money(bill.vat_minor, bill.currency),
        "net": _money(bill.total_minor - bill.vat_minor, bill.currency),
        "due_date": bill.due_date.isoformat() if bill.due_date else None,
        "issued_at": bill.issued_at.isoformat() if bill.issued_at else None,
        "paid_at": bill.paid_at.isoformat() if bill.paid_at else None,
        "tenant": {"id": tenant.id, "name": tenant.name, "unit": tenant.unit}, "site": site.name,
        "invoice_number": doc.number if doc else None,
        "links": {"pay": render.absolute_url("bills.bill_page", bill_id=bill.id),
                  "invoice": render.absolute_url("api.get_receipt", number=doc.number) if doc else None},
    }


def bill_json(bill: Bill, tenant: Tenant, site: Site, doc: Document | None) -> dict:
    """One bill in full: its lines, the meters' consumption and how each shared cost was computed."""
    facts = service.bill_facts(bill)
    cur = bill.currency
    return {
        **_summary(bill, tenant, site, doc),
        "final": bool(facts.get("final")),
        "lines": [{"kind": ln["kind"], "quantity": ln.get("quantity"), "unit": ln.get("unit"), "unit_price": ln.get("unit_price"),
                   "vat_rate": ln.get("vat_rate"), "note": ln.get("note"), "meter": ln.get("meter"), "amount": _money(ln["net"], cur)}
                  for ln in facts.get("lines", [])],
        "meters": [{"meter_code": m["meter_code"], "kwh": m["kwh"], "max_kw": m.get("max_kw")} for m in facts.get("meters", [])],
        "shares": [{"kind": sh["kind"], "method": sh["method"], "basis": sh["basis"], "tenant_basis": sh["tenant_basis"],
                    "tenants": sh["tenants"], "share_kwh": sh["share_kwh"], "amount": _money(sh["amount"], cur), "vat_rate": sh["vat_rate"],
                    "shared_kwh": sh["shared_kwh"], "shared_amount": _money(sh["shared_amount"], cur),
                    "loss_kwh": sh.get("loss_kwh"), "master_kwh": sh.get("master_kwh"), "sub_meters_kwh": sh.get("sub_meters_kwh")}
                   for sh in facts.get("shares", [])],
    }


def _int_arg(name: str, lo: int, hi: int, errors: dict, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 10 or not lo <= int(raw) <= hi:
        errors[name] = _("Send a whole number from %(lo)s to %(hi)s.", lo=lo, hi=hi)
        return default
    return int(raw)


def _rows(q):
    s = db_session()
    return s.execute(q.join(Tenant, Tenant.id == Bill.tenant_id).join(Site, Site.id == Tenant.site_id)
                     .outerjoin(Document, Document.id == Bill.document_id)
                     .where(Tenant.user_id == g.api_user.id, Bill.state.in_(SHOWN))).all()


@bp.route("/bills", methods=["GET"])
@token_required
def list_bills():
    """The account's bills, newest first; ``state=issued|paid`` filters, ``before=next_before`` pages."""
    errors: dict[str, str] = {}
    limit = _int_arg("limit", 1, MAX_LIMIT, errors, default=DEFAULT_LIMIT)
    before = _int_arg("before", 1, MAX_ID, errors)
    state = request.args.get("state")
    if state is not None and state not in ("issued", "paid"):
        errors["state"] = _("Send issued or paid.")
    if errors:
        raise invalid(errors)
    q = select(Bill, Tenant, Site, Document).order_by(Bill.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(Bill.id < before)
    if state is not None:
        q = q.where(Bill.state == BillState(state))
    rows = _rows(q)
    more = len(rows) > limit
    rows = rows[:limit]
    resp = jsonify(data=[_summary(*r) for r in rows], next_before=rows[-1][0].id if more else None)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/bills/<int(max=2147483647):bill_id>", methods=["GET"])
@token_required
def get_bill(bill_id: int):
    """One of the account's bills."""
    rows = _rows(select(Bill, Tenant, Site, Document).where(Bill.id == bill_id))
    if not rows:
        raise Problem(404, "not_found", _("We could not find that."))
    resp = jsonify(bill_json(*rows[0]))
    resp.headers["Cache-Control"] = "no-store"
    return resp


__all__ = ["bill_json"]
