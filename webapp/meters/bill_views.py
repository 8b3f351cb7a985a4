"""Tenant pages of post-paid bills (list, one bill, paying it), the closing statement, and the operator's bank-transfer list.

A bill is seen only by the account of its tenant (``Tenant.user_id``);
anyone else, signed in or not, gets 404 as for a bill that does not exist.
Bills still being prepared (draft, review) are not shown to the tenant.
Paying reuses the wallet's card element (``static/js/card.js``: a new card is
saved first, then the form is sent with its id) and its 3-D Secure page
flow; the bill emails (``bill_issued``, ``bill_reminder``) are written here
for the outbox's worker.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from email.message import EmailMessage

from babel.dates import format_date
from babel.numbers import format_decimal
from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.orm import Session

from payments import wallet
from payments.cards import CardPayment, Purpose, State
from payments.invoicing import Document
from payments.ledger import InsufficientFunds
from payments.money import Money
from payments.money import format as format_money
from payments.providers.base import ProviderUnavailable
from webapp import cardflow
from webapp.db import db_session, utcnow
from webapp.extensions import limiter
from webapp.meters import bills as service
from webapp.meters import closing
from webapp.meters.models import Bill, BillState, Tenant
from webapp.models import Meter, Operator, Role, Site, User
from webapp.notifications.models import SentEmail

log = logging.getLogger("voltpay.meters.bills")

bp = Blueprint("bills", __name__)

PAY_LIMIT = "30 per hour"
SHOWN = (BillState.ISSUED, BillState.PAID)

STATE_LABELS = {
    BillState.ISSUED: _l("Due"),
    BillState.PAID: _l("Paid"),
    BillState.VOID: _l("Cancelled"),
    BillState.DRAFT: _l("Being prepared"),
    BillState.REVIEW: _l("Being checked"),
}
SHARE_METHODS = {
    "consumption": _l("in proportion to each tenant's consumption"),
    "area": _l("in proportion to each tenant's leased area"),
    "equal": _l("in equal parts"),
    "custom": _l("by the ratio agreed with each tenant"),
}
LINE_LABELS = {
    "energy": _l("Electricity"),
    "demand": _l("Demand charge (maximum demand)"),
    "public_area": _l("Share of the public areas"),
    "line_loss": _l("Share of the line loss"),
    "fee": _l("Monthly fee"),
}


def _locale() -> str:
    return str(get_locale() or "en")


def _money(minor: int, currency: str) -> str:
    return format_money(Money(int(minor), currency), _locale())


def _kwh(value) -> str:
    return format_decimal(Decimal(str(value)), format="#,##0.###", locale=_locale())


def _date(day: dt.date | str | None) -> str:
    if not day:
        return ""
    return format_date(dt.date.fromisoformat(day) if isinstance(day, str) else day, "long", locale=_locale())


def _month(period: str) -> str:
    return format_date(dt.date(int(period[:4]), int(period[5:7]), 1), "MMMM y", locale=_locale())


def _own_bill(bill_id: int) -> tuple[Bill, Tenant]:
    """The signed-in tenant's issued or paid bill, or 404."""
    s = db_session()
    bill = s.get(Bill, bill_id)
    tenant = service.tenant_of_user(s, bill, current_user) if bill is not None else None
    if bill is None or tenant is None or bill.state not in SHOWN:
        abort(404)
    return bill, tenant


def _overdue(bill: Bill, tenant: Tenant) -> bool:
    if bill.state is not BillState.ISSUED or bill.due_date is None:
        return False
    site = db_session().get(Site, tenant.site_id)
    return service._local_date(utcnow(), site.time_zone) > bill.due_date


def _summary(bill: Bill, tenant: Tenant) -> dict:
    return {"bill": bill, "period": _month(bill.period), "total": _money(bill.total_minor, bill.currency),
            "due": _date(bill.due_date), "state_label": STATE_LABELS[bill.state], "overdue": _overdue(bill, tenant),
            "url": url_for("bills.bill_page", bill_id=bill.id)}


def _explain(share: dict, currency: str) -> str:
    """How a share was computed, in one sentence."""
    method = SHARE_METHODS.get(share.get("method"), share.get("method"))
    if share["kind"] == "line_loss":
        return _("The master meter measured %(master)s kWh and the meters behind it %(subs)s kWh: %(loss)s kWh were lost on the "
                 "building's wires. Shared %(method)s among %(n)s tenants: your basis %(mine)s of %(total)s, %(share)s kWh, %(amount)s.",
                 master=_kwh(share["master_kwh"]), subs=_kwh(share["sub_meters_kwh"]), loss=_kwh(share["loss_kwh"]), method=method,
                 n=share["tenants"], mine=share["tenant_basis"], total=share["basis"], share=_kwh(share["share_kwh"]),
                 amount=_money(share["amount"], currency))
    return _("The public areas used %(kwh)s kWh costing %(cost)s. Shared %(method)s among %(n)s tenants: your basis %(mine)s of "
             "%(total)s, %(share)s kWh, %(amount)s.", kwh=_kwh(share["shared_kwh"]), cost=_money(share["shared_amount"], currency),
             method=method, n=share["tenants"], mine=share["tenant_basis"], total=share["basis"], share=_kwh(share["share_kwh"]),
             amount=_money(share["amount"], currency))


def _bill_page(bill: Bill, tenant: Tenant, *, error: str | None = None, choice: str = "", status: int = 200):
    s = db_session()
    provider = cardflow.payment_provider()
    facts = service.bill_facts(bill)
    doc = s.get(Document, bill.document_id) if bill.document_id else None
    saved = cardflow.saved_cards(provider, current_user.owner, log) if bill.state is BillState.ISSUED else cardflow.SavedCards()
    balance = wallet.wallet_balance(s, current_user.owner, bill.currency) if bill.state is BillState.ISSUED else None
    payment = service.bill_payment(s, bill)
    choice = choice or (saved.cards[0].id if saved.cards else ("wallet" if balance and balance.amount >= bill.total_minor else "new"))
    lines = [{**ln, "label": str(LINE_LABELS.get(ln["kind"], ln["kind"])), "amount": _money(ln["net"], bill.currency),
              "quantity_text": _kwh(ln["quantity"]) if ln.get("quantity") else ""} for ln in facts.get("lines", [])]
    return render_template(
        "bills/bill.html", **_summary(bill, tenant), tenant=tenant, facts=facts, lines=lines, document=doc,
        shares=[{**sh, "text": _explain(sh, bill.currency)} for sh in facts.get("shares", [])],
        net=_money(bill.total_minor - bill.vat_minor, bill.currency), vat=_money(bill.vat_minor, bill.currency),
        paid_at=bill.paid_at, payment=payment if payment is not None and payment.state is State.SUCCEEDED else None,
        saved_cards=saved.cards, wallet_balance=balance, choice=choice, provider=provider, error=error, notice=saved.notice,
        **cardflow.card_entry_context(provider),
    ), status


# --------------------------------------------------------------------------- pages


@bp.route("/account/bills")
@login_required
def bills_list():
    """The signed-in tenant's bills, newest first, and the monthly invoices of prepaid meters."""
    return _list(None)


@bp.route("/account/meters/<meter_code>/bills")
@login_required
def meter_bills(meter_code: str):
    """The bills of the tenant of one meter (the signed-in account's meter only)."""
    meter = db_session().scalar(select(Meter).where(Meter.meter_code == meter_code[:16]))
    if meter is None or meter.tenant is None or meter.tenant.user_id != current_user.id:
        abort(404)
    return _list(meter.tenant_id)


def _list(tenant_id: int | None):
    s = db_session()
    tenants = s.scalars(select(Tenant).where(Tenant.user_id == current_user.id).order_by(Tenant.id)).all()
    if tenant_id is not None:
        tenants = [t for t in tenants if t.id == tenant_id]
    by_id = {t.id: t for t in tenants}
    rows = s.scalars(select(Bill).where(Bill.tenant_id.in_(list(by_id)), Bill.state.in_(SHOWN))
                     .order_by(Bill.period.desc(), Bill.id.desc())).all() if by_id else []
    invoices = s.scalars(select(Document).where(Document.owner == current_user.owner, Document.source.like("tenant:%:prepaid:%"))
                         .order_by(Document.id.desc()).limit(24)).all()
    return render_template("bills/list.html", bills=[{**_summary(b, by_id[b.tenant_id]), "tenant": by_id[b.tenant_id]} for b in rows],
                           invoices=[{"doc": d, "total": _money(d.total_minor, d.currency), "period": _month(d.source.rsplit(":", 1)[1])}
                                     for d in invoices if tenant_id is None or d.source.startswith(f"tenant:{tenant_id}:")],
                           statements=[t for t in tenants if t.closed_at is not None])


@bp.route("/bills/<int(max=2147483647):bill_id>")
@login_required
def bill_page(bill_id: int):
    """One bill: what it is made of and how each share was computed, its invoice, and paying it."""
    bill, tenant = _own_bill(bill_id)
    return _bill_page(bill, tenant)


@bp.route("/bills/<int(max=2147483647):bill_id>/pay", methods=["POST"])
@login_required
@limiter.limit(PAY_LIMIT)
def pay(bill_id: int):
    """Pay from the wallet, with a saved card, or with a new card (saved by card.js first); then the result page."""
    bill, tenant = _own_bill(bill_id)
    s = db_session()
    choice = request.form.get("payment_method", "")[:255]
    if choice == "wallet":
        try:
            service.pay_from_wallet(s, bill.id, current_user, utcnow())
        except InsufficientFunds:
            s.rollback()
            return _bill_page(bill, tenant, error=_("Your wallet does not hold enough for this bill. Top it up, or pay by card."),
                              choice=choice, status=400)
        except service.BillError as e:
            s.rollback()
            return _bill_page(bill, tenant, error=_refusal(e.code), choice=choice, status=409)
        s.commit()
        flash(_("Thank you: the bill is paid from your wallet."), "success")
        return redirect(url_for("bills.bill_page", bill_id=bill.id))
    provider = cardflow.payment_provider()
    if provider is None:
        return _bill_page(bill, tenant, error=_("Card payments are not available right now. Please try again later."), status=503)
    payment_method_id = request.form.get("new_payment_method_id", "")[:255] if choice == "new" else choice
    try:
        card, _customer_id = cardflow.choose_saved_card(provider, current_user.owner, payment_method_id, log)
    except cardflow.CardChoiceError as e:
        # The form keeps its choice only when no card was chosen; a refused card is not preselected again.
        return _bill_page(bill, tenant, error=e.message, choice=choice if not payment_method_id else "", status=e.status)
    try:
        row = service.start_card_payment(s, provider, bill.id, current_user, card.id)
    except service.BillError as e:
        s.rollback()
        return _bill_page(bill, tenant, error=_refusal(e.code), status=409)
    except ProviderUnavailable:
        s.rollback()
        return _bill_page(bill, tenant, error=_("We cannot reach our card processor right now, so nothing was charged. "
                                                "Please try again in a few minutes."), status=503)
    s.commit()  # our record exists before the provider hears of it (payments/cards.py)
    cardflow.submit(s, provider, row, log, "bill payment not completed")
    return redirect(url_for("bills.payment_status", bill_id=bill.id, payment_id=row.id))


def _refusal(code: str) -> str:
    if code == "already_paid":
        return _("This bill is already paid.")
    if code == "payment_in_progress":
        return _("A payment of this bill is already in progress. Wait a minute and reload the page.")
    return _("This bill cannot be paid online. Please contact your building's operator.")


def _own_payment(bill: Bill, payment_id: int) -> CardPayment:
    row = db_session().get(CardPayment, payment_id)
    if row is None or row.purpose is not Purpose.BILL or row.reference != f"bill:{bill.id}" or row.owner != current_user.owner:
        abort(404)
    return row


@bp.route("/bills/<int(max=2147483647):bill_id>/payments/<int(max=2147483647):payment_id>")
@login_required
def payment_status(bill_id: int, payment_id: int):
    """A card payment of the bill: paid, failed (and why), or waiting (3-D Secure runs here)."""
    bill, tenant = _own_bill(bill_id)
    row = _own_payment(bill, payment_id)
    return render_template("bills/payment.html", **_summary(bill, tenant), **cardflow.result_context(row))


@bp.route("/bills/<int(max=2147483647):bill_id>/payments/<int(max=2147483647):payment_id>/confirm", methods=["POST"])
@login_required
def confirm_payment(bill_id: int, payment_id: int):
    """After 3-D Secure in the browser (or "check again"): ask the provider and record the answer."""
    bill, _tenant = _own_bill(bill_id)
    row = _own_payment(bill, payment_id)
    return cardflow.confirm(row, url_for("bills.payment_status", bill_id=bill_id, payment_id=payment_id))


# --------------------------------------------------------------------------- closing statement and bank transfers


def _staff_operator_ids() -> set[int] | None:
    """The operators the signed-in staff member may see (None: all, an admin); empty for anyone else."""
    if current_user.role == Role.ADMIN:
        return None
    if current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        return {current_user.operator_id}
    return set()


@bp.route("/tenancies/<int(max=2147483647):tenant_id>/statement")
@login_required
def statement(tenant_id: int):
    """The closing statement of a tenancy: for its tenant's account and the building's operator."""
    s = db_session()
    tenant = s.get(Tenant, tenant_id)
    if tenant is None or tenant.closed_at is None:
        abort(404)
    site = s.get(Site, tenant.site_id)
    ops = _staff_operator_ids()
    if tenant.user_id != current_user.id and not (ops is None or site.operator_id in ops):
        abort(404)
    st = closing.statement_of(s, tenant)
    return render_template("bills/statement.html", tenant=tenant, site=site, st=st, money=lambda m: _money(m, tenant.currency),
                           closed=_date(service._local_date(tenant.closed_at, site.time_zone)),
                           bill_url=(url_for("bills.bill_page", bill_id=st["final_bill"].id)
                                     if st["final_bill"] is not None and tenant.user_id == current_user.id
                                     and st["final_bill"].state in SHOWN else None))


@bp.route("/operator/tenant-refunds")
@login_required
def bank_transfers():
    """Operator: prepaid balances of closed accounts owed by bank transfer (the card could not take them back)."""
    ops = _staff_operator_ids()
    if ops is not None and not ops:
        abort(403)
    s = db_session()
    rows = []
    for acct, tenant, site in closing.bank_transfers_owed(s, operator_ids=ops):
        rows.append({"tenant": tenant, "site": site, "amount": _money(closing.owed(s, acct).amount, acct.currency),
                     "url": url_for("bills.statement", tenant_id=tenant.id)})
    return render_template("bills/bank_transfers.html", rows=rows)


# --------------------------------------------------------------------------- emails (written by the outbox's worker)


def _bill_email(s: Session, row: SentEmail, template: str) -> EmailMessage | None:
    from webapp.notifications.emails import _base, _locale as pick_locale, _render

    bill = s.get(Bill, int(row.reference.split(":", 1)[1]))
    if bill is None or bill.state is not BillState.ISSUED and template == "bill_reminder":
        return None  # paid meanwhile: no reminder
    tenant = s.get(Tenant, bill.tenant_id)
    user = s.get(User, tenant.user_id) if tenant.user_id else None
    site = s.get(Site, tenant.site_id)
    doc = s.get(Document, bill.document_id) if bill.document_id else None
    locale = pick_locale(user.locale if user else None)
    from flask_babel import force_locale

    with force_locale(locale):
        period = format_date(dt.date(int(bill.period[:4]), int(bill.period[5:7]), 1), "MMMM y", locale=locale)
        due = format_date(bill.due_date, "long", locale=locale) if bill.due_date else ""
    attachments = None
    if doc is not None and template == "bill_issued":  # the invoice itself, as every document is sent
        from webapp.receipts.render import render_pdf

        attachments = [(f"{doc.number}.pdf", "application/pdf", render_pdf(s, doc))]
    return _render(row.to, template, locale, attachments=attachments, period=period, due=due,
                   total=format_money(Money(bill.total_minor, bill.currency), locale),
                   site=site.name, tenant=tenant.name, number=doc.number if doc else None, link=f"{_base()}/bills/{bill.id}",
                   reminder=bill.reminders_sent, operator=s.get(Operator, site.operator_id).name)


def _build_bill_issued(s: Session, row: SentEmail) -> EmailMessage | None:
    return _bill_email(s, row, "bill_issued")


def _build_bill_reminder(s: Session, row: SentEmail) -> EmailMessage | None:
    return _bill_email(s, row, "bill_reminder")


def _register_builders() -> None:
    from webapp.notifications.emails import BUILDERS

    BUILDERS.setdefault("bill_issued", _build_bill_issued)
    BUILDERS.setdefault("bill_reminder", _build_bill_reminder)


_register_builders()

__all__ = ["bp"]
