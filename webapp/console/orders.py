"""Orders of the operator console: ``GET /operator/orders`` and its exports ``/operator/orders.csv|.xlsx``.

Tabs (``?tab=``):

* ``realtime`` — sessions under way (pending, authorized, start requested,
  charging, finishing);
* ``historical`` — sessions that ended, whatever the outcome;
* ``abnormal`` — sessions that need or needed a person: in ``review``,
  ``failed`` (the hold was refused) or ``start_failed``, refunded (in part or
  in full), or written off (an entry on a ``WRITE_OFF`` account whose
  reference is the session: ``session:<id>`` or ``session:<id>:…``);
* ``meters`` — meter payments: top-ups and bill payments, as the ledger
  booked them (``analytics.meter_payments``).

Filters: site and charger (only the operator's; another operator's or an
unknown id answers 404), the user's email (part of it, any case), a date
range (``from``/``to``, days in the sites' time zone as on the analytics
page; a session's day is the day it was opened, a meter payment's the day it
was booked), the state (per tab), and an amount range (``min``/``max``, typed
as money in the page's language: "12,50" or "12.50"; a session's amount is
what was captured, or its cost so far while it runs). Bad input answers 400
with the reason at the field. Rows are newest first, ``PAGE_SIZE`` a page;
each session links to the support console's page of the session when that
page exists. The CSV and XLSX exports have exactly the rows of the filtered
table, every page of it (at most ``EXPORT_MAX_ROWS``: more answers 400 and
asks for narrower filters). An admin sees every operator.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal

from flask import Response, abort, current_app, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import login_required
from flask_wtf import FlaskForm
from sqlalchemy import and_, exists, func, or_, select
from wtforms import HiddenField, SelectChoice, SelectField, StringField

from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting
from payments.money import Money, MoneyError
from payments.money import parse as parse_money
from webapp.charging.models import ACTIVE_STATES, ENDED_STATES, ChargingSession, SessionState
from webapp.console import bp, operator_scope
from webapp.console.analytics import (
    Scope,
    charger_choices,
    check_period,
    local_bounds,
    locale,
    meter_payments,
    parse_day,
    parse_scope,
    ref,
    site_choices,
    visible_chargers,
    visible_sites,
    zone,
)
from webapp.console.exports import Coded, Column, Table, export, template_helpers
from webapp.db import db_session
from webapp.models import Charger, Connector, Site

TABS = ("realtime", "historical", "abnormal", "meters")
PAGE_SIZE = 50
EXPORT_MAX_ROWS = 50_000
ABNORMAL_STATES = (SessionState.REVIEW, SessionState.FAILED, SessionState.START_FAILED)

STATE_LABELS = {
    SessionState.PENDING: _l("Pending"), SessionState.AUTHORIZED: _l("Authorized"), SessionState.START_REQUESTED: _l("Start requested"),
    SessionState.CHARGING: _l("Charging"), SessionState.FINISHING: _l("Finishing"), SessionState.COMPLETED: _l("Completed"),
    SessionState.CANCELLED: _l("Cancelled"), SessionState.START_FAILED: _l("Start failed"), SessionState.START_TIMEOUT: _l("Start timed out"),
    SessionState.FAILED: _l("Failed"), SessionState.REVIEW: _l("Review"),
}
KIND_LABELS = {"top_up": _l("Top-up"), "bill": _l("Bill payment")}
METHOD_LABELS = {"card": _l("Card"), "wallet": _l("Wallet")}
TAB_LABELS = {"realtime": _l("Real time"), "historical": _l("Historical"), "abnormal": _l("Abnormal"), "meters": _l("Meter payments")}
MONEY_MESSAGES = {
    "negative": _l("The amount cannot be negative."),
    "too_many_decimals": _l("Too many decimals for this currency."),
}


def state_choices(tab: str) -> list[tuple[str, str]]:
    """The states the ``state`` filter offers on ``tab``."""
    if tab == "realtime":
        states = [s for s in SessionState if s in ACTIVE_STATES]
    elif tab == "historical":
        states = [s for s in SessionState if s in ENDED_STATES]
    elif tab == "abnormal":
        return ([(s.value, str(STATE_LABELS[s])) for s in ABNORMAL_STATES]
                + [("refunded", _("Refunded")), ("written_off", _("Written off"))])
    else:
        return [(k, str(v)) for k, v in KIND_LABELS.items()]
    return [(s.value, str(STATE_LABELS[s])) for s in states]


class OrdersForm(FlaskForm):
    """The filters (a GET form: nothing changes, no CSRF token)."""

    class Meta:
        csrf = False

    tab = HiddenField(default="realtime")
    site = SelectField(_l("Site"), choices=[], validate_choice=False)
    charger = SelectField(_l("Charger"), choices=[], validate_choice=False)
    user = StringField(_l("User (email)"), description=_l("All or part of the address."))
    start = StringField(_l("From"), name="from", render_kw={"type": "date"})
    end = StringField(_l("To"), name="to", render_kw={"type": "date"})
    state = SelectField(_l("State"), choices=[], validate_choice=False)
    min_amount = StringField(_l("Amount from"), name="min", render_kw={"inputmode": "decimal"})
    max_amount = StringField(_l("Amount up to"), name="max", render_kw={"inputmode": "decimal"})


@dataclass
class Asked:
    """Valid filters of the orders page."""

    tab: str
    scope: Scope
    start: dt.date | None = None
    end: dt.date | None = None
    user: str = ""
    state: str = ""
    min_minor: int | None = None
    max_minor: int | None = None
    page: int = 1
    args: dict[str, str] = field(default_factory=dict)

    def about(self) -> list[tuple[str, str]]:
        """What was asked, for the workbook's second sheet."""
        return [("tab", self.tab)] + sorted(self.args.items()) + [("time_zone", self.scope.tz)]


def _money_field(f, currency: str) -> int | None:
    raw = (f.data or "").strip()
    if not raw:
        return None
    try:
        return parse_money(raw, currency, locale()).amount
    except MoneyError as e:
        f.errors.append(str(MONEY_MESSAGES.get(e.code, _l("An amount like 12.50."))))
        return None


def _parse(form: OrdersForm) -> Asked | None:
    """Valid filters, or None with the reasons at the fields. Another operator's site or charger: 404."""
    form.validate()  # no validators: it makes each field's error list, which the checks below fill
    op_id = operator_scope()
    tab = (form.tab.data or "realtime").strip()
    if tab not in TABS:
        abort(400, description=_("Choose one of the tabs: %(tabs)s.", tabs=", ".join(TABS)))
    form.tab.data = tab
    site_choices(form.site, visible_sites(op_id), admin=op_id is None)
    charger_choices(form.charger, visible_chargers(op_id))
    form.state.choices = [SelectChoice("", _("Any"))] + [SelectChoice(k, v) for k, v in state_choices(tab)]
    page_raw = request.args.get("page", "1")
    if not page_raw.isdigit() or not 1 <= int(page_raw) <= 100_000:
        abort(400, description=_("The page is a number from 1."))
    scope = parse_scope(form.site, form.charger if tab != "meters" else None)
    start, end = parse_day(form.start), parse_day(form.end)
    state = (form.state.data or "").strip()
    if state and state not in {k for k, _v in state_choices(tab)}:
        form.state.errors.append(_("Choose a state from the list."))
    user = (form.user.data or "").strip().lower()
    if len(user) > 254:
        form.user.errors.append(_("At most 254 characters."))
    currency = scope.currency if scope is not None else "EUR"
    lo_amount, hi_amount = _money_field(form.min_amount, currency), _money_field(form.max_amount, currency)
    if lo_amount is not None and hi_amount is not None and hi_amount < lo_amount:
        form.max_amount.errors.append(_("The largest amount must be at least the smallest."))
    if not check_period(form.start, form.end, start, end) or scope is None or any(f.errors for f in form):
        return None
    args = {k: v for k, v in {"tab": tab, "site": form.site.data or "", "charger": (form.charger.data or "") if tab != "meters" else "",
                              "user": user, "from": start.isoformat() if start else "", "to": end.isoformat() if end else "",
                              "state": state, "min": (form.min_amount.data or "").strip(), "max": (form.max_amount.data or "").strip()}.items() if v}
    return Asked(tab, scope, start, end, user, state, lo_amount, hi_amount, int(page_raw), args)


# --------------------------------------------------------------------------- sessions


def _written_off():
    """SQL: the session has an entry on a write-off account."""
    S = ChargingSession
    return exists(select(Posting.id).join(LedgerAccount, LedgerAccount.id == Posting.account_id)
                  .join(JournalEntry, JournalEntry.id == Posting.entry_id)
                  .where(LedgerAccount.kind == AccountKind.WRITE_OFF,
                         or_(JournalEntry.reference == ref("session:", S.id), JournalEntry.reference.like(ref("session:", S.id, ":%")))))


def session_conditions(asked: Asked) -> list:
    """The WHERE of the sessions table (joined to connector, charger and site)."""
    S = ChargingSession
    conds = list(asked.scope.on_chargers())
    if asked.tab == "realtime":
        conds.append(S.state.in_(list(ACTIVE_STATES)))
    elif asked.tab == "historical":
        conds.append(S.state.in_(list(ENDED_STATES)))
    else:
        conds.append(or_(S.state.in_(list(ABNORMAL_STATES)), S.refunded_minor > 0, _written_off()))
    if asked.state == "refunded":
        conds.append(S.refunded_minor > 0)
    elif asked.state == "written_off":
        conds.append(_written_off())
    elif asked.state:
        conds.append(S.state == SessionState(asked.state))
    lo, hi = local_bounds(asked.start, asked.end, asked.scope.tz)
    if lo is not None:
        conds.append(S.created_at >= lo)
    if hi is not None:
        conds.append(S.created_at < hi)
    if asked.user:
        conds.append(S.email.contains(asked.user, autoescape=True))
    amount = func.coalesce(S.captured_minor, S.cost_minor)
    if asked.min_minor is not None:
        conds.append(amount >= asked.min_minor)
    if asked.max_minor is not None:
        conds.append(amount <= asked.max_minor)
    return conds


def _joined(q):
    S = ChargingSession
    return (q.join(Connector, Connector.id == S.connector_id).join(Charger, Charger.id == Connector.charger_id)
            .join(Site, Site.id == Charger.site_id))


def support_link(endpoint: str, value: int) -> str | None:
    """The support console's page of an object when the app has it (its one URL argument takes ``value``: an id, a code)."""
    if endpoint not in current_app.view_functions:
        return None
    for rule in current_app.url_map.iter_rules(endpoint):
        if len(rule.arguments) == 1:
            return url_for(endpoint, **{next(iter(rule.arguments)): value})
    return None


def session_table(asked: Asked, *, offset: int | None, limit: int | None) -> tuple[Table, int]:
    """The sessions of the filters (a page of them, or all when ``limit`` is None) and how many there are in all."""
    s = db_session()
    S = ChargingSession
    conds = session_conditions(asked)
    total = s.scalar(_joined(select(func.count(S.id)).select_from(S)).where(*conds)) or 0
    q = (_joined(select(S, Connector.number, Charger.charge_point_id, Site.name, Site.time_zone).select_from(S)).where(*conds)
         .order_by(S.created_at.desc(), S.id.desc()))
    if offset:
        q = q.offset(offset)
    if limit is not None:
        q = q.limit(limit)
    cols = [Column("session", _("Session")), Column("opened", _("Opened (local time)"), "datetime"), Column("site", _("Site")),
            Column("charger", _("Charger")), Column("connector", _("Connector"), "int"), Column("user", _("User")),
            Column("state", _("State"), "coded"), Column("energy_kwh", _("Energy (kWh)"), "kwh"),
            Column("amount", _("Amount"), "money"), Column("refunded", _("Refunded"), "money"), Column("reason", _("Reason")),
            Column("currency", _("Currency"))]
    table = Table(asked.tab, str(TAB_LABELS[asked.tab]), cols, empty=_("No sessions match."))
    for cs, number, cp_id, site_name, tz in s.execute(q):
        amount = cs.captured_minor if cs.captured_minor is not None else cs.cost_minor
        table.rows.append([cs.id, cs.created_at.astimezone(zone(tz)), site_name, cp_id, number, cs.email or "",
                           Coded(cs.state.value, str(STATE_LABELS[cs.state])), (Decimal(cs.energy_wh or 0) / 1000),
                           Money(amount or 0, cs.currency), Money(cs.refunded_minor or 0, cs.currency), cs.failure_code or cs.anomaly or "",
                           cs.currency])
        table.links.append(support_link("support.session", cs.id))
    return table, total


# --------------------------------------------------------------------------- meter payments


def payment_table(asked: Asked, *, offset: int | None, limit: int | None) -> tuple[Table, int]:
    """The meter payments of the filters (a page, or all) and how many there are in all."""
    s = db_session()
    lo, hi = local_bounds(asked.start, asked.end, asked.scope.tz)
    mp = meter_payments(asked.scope, lo, hi)
    conds = []
    if asked.state:
        conds.append(mp.c.kind == asked.state)
    if asked.user:
        conds.append(func.lower(mp.c.payer).contains(asked.user, autoescape=True))
    if asked.min_minor is not None:
        conds.append(mp.c.amount_minor >= asked.min_minor)
    if asked.max_minor is not None:
        conds.append(mp.c.amount_minor <= asked.max_minor)
    where = and_(*conds) if conds else None
    count_q = select(func.count()).select_from(mp)
    q = select(mp).order_by(mp.c.at.desc(), mp.c.entry_id.desc())
    if where is not None:
        count_q, q = count_q.where(where), q.where(where)
    total = s.scalar(count_q) or 0
    if offset:
        q = q.offset(offset)
    if limit is not None:
        q = q.limit(limit)
    cols = [Column("entry", _("Ledger entry")), Column("booked", _("Booked (local time)"), "datetime"), Column("kind", _("Kind"), "coded"),
            Column("site", _("Site")), Column("meter_or_bill", _("Meter or bill")), Column("payer", _("Payer")),
            Column("method", _("Paid by"), "coded"), Column("amount", _("Amount"), "money"), Column("vat", _("of which VAT"), "money"),
            Column("currency", _("Currency"))]
    table = Table("meters", str(TAB_LABELS["meters"]), cols, empty=_("No meter payments match."))
    for r in s.execute(q).mappings():
        at = r["at"] if r["at"].tzinfo else r["at"].replace(tzinfo=dt.UTC)  # a UNION's column loses the UTC type on SQLite
        label = r["label"] if r["kind"] == "top_up" else _("Bill %(period)s", period=r["label"])
        table.rows.append([r["entry_id"], at.astimezone(zone(r["tz"])), Coded(r["kind"], str(KIND_LABELS[r["kind"]])), r["site_name"], label,
                           r["payer"] or "", Coded(r["method"], str(METHOD_LABELS[r["method"]])), Money(int(r["amount_minor"]), r["currency"]),
                           Money(int(r["vat_minor"]), r["currency"]), r["currency"]])
        table.links.append(support_link("support.meter", r["label"]) if r["kind"] == "top_up" else None)  # by meter code
    return table, total


def _table(asked: Asked, *, offset: int | None, limit: int | None) -> tuple[Table, int]:
    return (payment_table if asked.tab == "meters" else session_table)(asked, offset=offset, limit=limit)


# --------------------------------------------------------------------------- views


def _page(form: OrdersForm, status: int, **ctx) -> Response:
    resp = Response(render_template("console/orders.html", form=form, locale=locale(), tabs=TAB_LABELS, **template_helpers(), **ctx),
                    status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/orders")
@login_required
def orders():
    """Sessions (real time, historical, abnormal) and meter payments, filtered and paged."""
    form = OrdersForm(formdata=request.args)
    asked = _parse(form)
    if asked is None:
        return _page(form, 400, asked=None, table=None, tab=form.tab.data if form.tab.data in TABS else "realtime")
    table, total = _table(asked, offset=(asked.page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    nav = {}
    if asked.page > 1:
        nav["previous"] = url_for("console.orders", **asked.args, page=min(asked.page - 1, pages))
    if asked.page < pages:
        nav["next"] = url_for("console.orders", **asked.args, page=asked.page + 1)
    exports = {fmt: url_for("console.orders_export", fmt=fmt, **asked.args) for fmt in ("csv", "xlsx")}
    return _page(form, 200, asked=asked, table=table, total=total, pages=pages, nav=nav, exports=exports, tab=asked.tab)


@bp.route("/orders.<any(csv, xlsx):fmt>")
@login_required
def orders_export(fmt: str):
    """The filtered table, every page of it, as CSV or XLSX (the same rows and order as the page)."""
    form = OrdersForm(formdata=request.args)
    asked = _parse(form)
    if asked is None:
        return _page(form, 400, asked=None, table=None, tab=form.tab.data if form.tab.data in TABS else "realtime")
    _probe, total = _table(asked, offset=0, limit=0)
    if total > EXPORT_MAX_ROWS:
        abort(400, description=_("%(count)s rows: narrow the filters to at most %(max)s.", count=total, max=EXPORT_MAX_ROWS))
    table, _total = _table(asked, offset=None, limit=None)
    return export(table, fmt, f"orders-{asked.tab}", asked.about())
