"""Analytics of the operator console: ``GET /operator/analytics`` and its exports ``/operator/analytics.csv|.xlsx?table=``.

What is counted, and when (the rules the figures follow):

* **Money comes from the ledger.** A charging session's revenue is what its
  capture booked (``REVENUE`` + ``VAT_PAYABLE`` credits of the entry whose
  reference is ``session:<id>`` for a card, ``session:<id>:wallet`` for the
  wallet) minus what its refunds booked back (debits of the same accounts,
  reference ``session:<id>``); settlement's own entries (keys
  ``allocation:…``) only move revenue on to the parties and are left out.
  An amount belongs to the day its entry was booked: a refund lowers the day
  it was given, not the day of the charge. So "revenue" here equals the
  ledger for the same period: captured − refunded, VAT included, the VAT
  also shown on its own, and revenue excluding VAT equals what the site's
  parties were allocated.
* **Sessions and energy come from the sessions** whose charging started
  (StartTransaction) in the period; energy is what they delivered.
* **Paid sessions** are the captures booked in the period; the **average
  session value** is what they captured divided by their number (before
  refunds), rounded half up to the minor unit.
* **Utilization** = charging time (StartTransaction to StopTransaction, a
  running session until now) ÷ available connector time (connectors × the
  period up to now), per charger, site and in all.
* **Busiest hours**: session starts in the period by weekday and hour in the
  site's own time zone.
* **Meters**: top-ups credited to meter wallets (by card: provider clearing →
  meter wallet; from a customer wallet) and bill payments (entries of
  ``bill:<id>`` booking revenue and VAT) in the period.

The period is ``from``–``to`` (inclusive days; the last 30 days by default,
at most 366) in the time zone of the sites shown: the chosen site's, the one
all the operator's sites share, else UTC (the page says which). Grouping is
per day, ISO week (Monday first) or month in that zone. Site and charger
filters list only the operator's own; another operator's (or an unknown) id
answers 404. Bad input (a date that is not a date, a period that ends before
it starts or is too long, an unknown granularity) answers 400 with the reason
at the field. An admin sees every operator.

Money is integer minor units per currency (a table has a row per currency
when sites differ); kWh and percentages are Decimals. Charts are server-drawn
SVG (no script), each with a title, a description and the table holding the
same numbers.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import get_day_names
from flask import Response, abort, render_template, request
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_babel import ngettext
from flask_login import login_required
from flask_wtf import FlaskForm
from sqlalchemy import String, and_, case, cast, func, literal, literal_column, select, union_all
from sqlalchemy.orm import aliased
from wtforms import SelectChoice, SelectField, StringField

from payments.cards import CardPayment
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting
from payments.money import Money
from webapp.charging.models import ACTIVE_STATES, ChargingSession
from webapp.console import bp, operator_scope
from webapp.console.exports import Column, Table, export, template_helpers, text
from webapp.db import db_session, utcnow
from webapp.meters.models import Bill, Tenant
from webapp.models import Charger, Connector, Meter, Operator, Site, User

MAX_PERIOD_DAYS = 366
DEFAULT_DAYS = 30
GRANULARITIES = ("day", "week", "month")
TABLES = ("summary", "periods", "sites", "chargers", "hours", "meters")
UTC = dt.UTC


# --------------------------------------------------------------------------- filters shared with the orders page


def ref(prefix: str, column, suffix: str = ""):
    """SQL for ``'<prefix><column>[suffix]'``: how ledger entries and payments name what they are about."""
    expr = literal(prefix, String) + cast(column, String)
    return expr + literal(suffix, String) if suffix else expr


def zone(name: str | None) -> ZoneInfo:
    """The time zone ``name`` (UTC when unknown)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


@dataclass
class Scope:
    """What the current person looks at: an operator (None: every one), maybe one site or one charger, and the time zone of its days."""

    operator_id: int | None
    sites: list[Site]  # the sites in view (all the operator's, or the chosen one)
    site: Site | None = None
    charger: Charger | None = None
    tz: str = "UTC"

    def on_sites(self) -> list:
        """Conditions on ``Site`` for queries that join it."""
        conds = []
        if self.operator_id is not None:
            conds.append(Site.operator_id == self.operator_id)
        if self.site is not None:
            conds.append(Site.id == self.site.id)
        return conds

    def on_chargers(self) -> list:
        """Conditions on ``Site`` and ``Charger`` for charging queries."""
        return self.on_sites() + ([Charger.id == self.charger.id] if self.charger is not None else [])

    @property
    def currencies(self) -> list[str]:
        """The currencies of the sites in view."""
        return sorted({s.currency for s in self.sites}) or ["EUR"]

    @property
    def currency(self) -> str:
        """The one currency amounts typed in filters are read in: the site's, the sites' common one, else the first site's."""
        return self.sites[0].currency if self.sites else "EUR"


def visible_sites(operator_id: int | None) -> list[Site]:
    """The sites the person may see, by name."""
    q = select(Site).order_by(Site.name, Site.id)
    if operator_id is not None:
        q = q.where(Site.operator_id == operator_id)
    return list(db_session().scalars(q))


def visible_chargers(operator_id: int | None) -> list[tuple[Charger, Site]]:
    """The chargers the person may see, with their site."""
    q = select(Charger, Site).join(Site, Site.id == Charger.site_id).order_by(Site.name, Charger.charge_point_id)
    if operator_id is not None:
        q = q.where(Site.operator_id == operator_id)
    return [(c, s) for c, s in db_session().execute(q)]


def site_choices(field, sites: list[Site], admin: bool) -> None:
    """Fill a site select: every site the person may see (an admin also sees each site's operator)."""
    names = {}
    if admin:
        names = dict(db_session().execute(select(Operator.id, Operator.name)).all())
    field.choices = [SelectChoice("", _("All sites"))] + [
        SelectChoice(str(s.id), f"{s.name} ({names.get(s.operator_id, '')})" if admin else s.name) for s in sites]


def charger_choices(field, chargers: list[tuple[Charger, Site]]) -> None:
    """Fill a charger select: every charger the person may see, with its site."""
    field.choices = [SelectChoice("", _("All chargers"))] + [SelectChoice(str(c.id), f"{c.charge_point_id} ({s.name})") for c, s in chargers]


def _id_or_error(field) -> int | None:
    raw = (field.data or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 9:
        field.errors.append(_("Choose one from the list."))
        return None
    return int(raw)


def parse_scope(site_field, charger_field) -> Scope | None:
    """The scope of the filters; None when a field is wrong (its error set). Another operator's site or charger: 404."""
    op_id = operator_scope()
    s = db_session()
    sites = visible_sites(op_id)
    site_id = _id_or_error(site_field)
    charger_id = _id_or_error(charger_field) if charger_field is not None else None
    if site_field.errors or (charger_field is not None and charger_field.errors):
        return None
    site = charger = None
    if site_id is not None:
        site = s.get(Site, site_id)
        if site is None or (op_id is not None and site.operator_id != op_id):
            abort(404)
    if charger_id is not None:
        charger = s.get(Charger, charger_id)
        if charger is None or (op_id is not None and charger.site.operator_id != op_id):
            abort(404)
        if site is not None and charger.site_id != site.id:
            charger_field.errors.append(_("This charger is not at the chosen site."))
            return None
    shown = [charger.site] if charger is not None else [site] if site is not None else sites
    zones = {x.time_zone or "UTC" for x in shown}
    tz = zones.pop() if len(zones) == 1 else "UTC"
    return Scope(operator_id=op_id, sites=shown, site=site, charger=charger, tz=str(zone(tz)))


def parse_day(field) -> dt.date | None:
    """A ``YYYY-MM-DD`` field (None when empty; an error at the field when it is not a date)."""
    raw = (field.data or "").strip()
    if not raw:
        return None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        field.errors.append(_("A date like 2026-01-31."))
        return None


def check_period(start_field, end_field, start: dt.date | None, end: dt.date | None) -> bool:
    """Whether a period is usable: it ends on or after its start and lasts at most MAX_PERIOD_DAYS days (errors at the fields)."""
    if start_field.errors or end_field.errors:
        return False
    if start is not None and end is not None:
        if end < start:
            end_field.errors.append(_("The period must end on or after the day it starts."))
            return False
        if (end - start).days + 1 > MAX_PERIOD_DAYS:
            end_field.errors.append(_("At most %(days)s days at a time.", days=MAX_PERIOD_DAYS))
            return False
    return True


def local_bounds(start: dt.date | None, end: dt.date | None, tz: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The UTC instants of local midnight at ``start`` and after ``end`` (None for an open side)."""
    z = zone(tz)
    lo = dt.datetime.combine(start, dt.time(0), tzinfo=z).astimezone(UTC) if start else None
    hi = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(0), tzinfo=z).astimezone(UTC) if end else None
    return lo, hi


def locale() -> str:
    """The page's language."""
    return str(get_locale() or "en")


# --------------------------------------------------------------------------- meter payments (shared with the orders page)


def meter_payments(scope: Scope, lo: dt.datetime | None, hi: dt.datetime | None):
    """A subquery of the meter payments booked in ``[lo, hi)`` at the scope's sites, one row per ledger entry.

    Columns: ``entry_id``, ``at``, ``kind`` (``top_up`` / ``bill``), ``site_id``,
    ``site_name``, ``tz``, ``ref_id`` (meter / bill id), ``label`` (meter code /
    bill period), ``payer`` (email), ``method`` (``card`` / ``wallet``),
    ``amount_minor`` (VAT included), ``vat_minor``, ``currency``.

    A top-up is an entry crediting a meter wallet from provider clearing (a
    card) or from a customer wallet; a refused refund that returns money to
    the meter, or consumption corrections, are not top-ups. A bill payment is
    an entry of ``bill:<id>`` booking revenue and VAT (an overpayment sent to
    the payer's wallet books no revenue and is not one).
    """
    paying = [AccountKind.PROVIDER_CLEARING, AccountKind.CUSTOMER_WALLET]
    method = lambda acct: case((acct.kind == AccountKind.PROVIDER_CLEARING, literal_column("'card'")), else_=literal_column("'wallet'"))  # noqa: E731

    def period(q):
        if lo is not None:
            q = q.where(JournalEntry.created_at >= lo)
        if hi is not None:
            q = q.where(JournalEntry.created_at < hi)
        return q.where(*scope.on_sites())

    credit, wallet_acct, debit, payer_acct = aliased(Posting), aliased(LedgerAccount), aliased(Posting), aliased(LedgerAccount)
    payer_user = aliased(User)
    top_ups = period(
        select(JournalEntry.id.label("entry_id"), JournalEntry.created_at.label("at"), literal_column("'top_up'").label("kind"),
               Site.id.label("site_id"), Site.name.label("site_name"), Site.time_zone.label("tz"), Meter.id.label("ref_id"),
               Meter.meter_code.label("label"), func.coalesce(CardPayment.email, payer_user.email).label("payer"),
               method(payer_acct).label("method"), (-credit.amount_minor).label("amount_minor"), literal_column("0").label("vat_minor"),
               credit.currency.label("currency"))
        .select_from(credit)
        .join(wallet_acct, wallet_acct.id == credit.account_id)
        .join(JournalEntry, JournalEntry.id == credit.entry_id)
        .join(debit, and_(debit.entry_id == credit.entry_id, debit.amount_minor > 0))
        .join(payer_acct, and_(payer_acct.id == debit.account_id, payer_acct.kind.in_(paying)))
        .join(Meter, wallet_acct.owner == ref("meter:", Meter.id))
        .join(Site, Site.id == Meter.site_id)
        .outerjoin(CardPayment, JournalEntry.reference == ref("card_payment:", CardPayment.id))
        .outerjoin(payer_user, payer_acct.owner == ref("user:", payer_user.id))
        .where(wallet_acct.kind == AccountKind.METER_WALLET, credit.amount_minor < 0)
    )
    booked, booked_acct, paid, paid_acct = aliased(Posting), aliased(LedgerAccount), aliased(Posting), aliased(LedgerAccount)
    tenant_user = aliased(User)
    bills = period(
        select(JournalEntry.id, JournalEntry.created_at, literal_column("'bill'"), Site.id, Site.name, Site.time_zone, Bill.id, Bill.period,
               func.coalesce(tenant_user.email, Tenant.contact_email), method(paid_acct),
               -func.sum(booked.amount_minor), -func.sum(case((booked_acct.kind == AccountKind.VAT_PAYABLE, booked.amount_minor), else_=0)),
               booked.currency)
        .select_from(booked)
        .join(booked_acct, booked_acct.id == booked.account_id)
        .join(JournalEntry, JournalEntry.id == booked.entry_id)
        .join(paid, and_(paid.entry_id == booked.entry_id, paid.amount_minor > 0))
        .join(paid_acct, and_(paid_acct.id == paid.account_id, paid_acct.kind.in_(paying)))
        .join(Bill, JournalEntry.reference == ref("bill:", Bill.id))
        .join(Tenant, Tenant.id == Bill.tenant_id)
        .join(Site, Site.id == Tenant.site_id)
        .outerjoin(tenant_user, tenant_user.id == Tenant.user_id)
        .where(booked_acct.kind.in_([AccountKind.REVENUE, AccountKind.VAT_PAYABLE]))
        .group_by(JournalEntry.id, JournalEntry.created_at, Site.id, Site.name, Site.time_zone, Bill.id, Bill.period, tenant_user.email,
                  Tenant.contact_email, paid_acct.kind, booked.currency)
    )
    return union_all(top_ups, bills).subquery("meter_payments")


# --------------------------------------------------------------------------- what the ledger and the sessions say


@dataclass
class Booking:
    """One ledger entry of a charging session: a capture (gross > 0) or a refund (gross < 0), VAT included."""

    at: dt.datetime
    session_id: int
    charger_id: int
    site_id: int
    currency: str
    gross: int = 0
    vat: int = 0


def charging_bookings(scope: Scope, lo: dt.datetime, hi: dt.datetime) -> list[Booking]:
    """The captures and refunds of the scope's charging sessions booked in ``[lo, hi)`` (see the module docstring)."""
    s = db_session()
    S = ChargingSession
    out: dict[int, Booking] = {}
    for suffix in ("", ":wallet"):  # card captures and every refund; wallet captures (two queries: each join can use an index)
        q = (select(JournalEntry.id, JournalEntry.created_at, S.id, Charger.id, Site.id, Posting.currency, LedgerAccount.kind,
                    func.sum(Posting.amount_minor))
             .select_from(Posting)
             .join(LedgerAccount, LedgerAccount.id == Posting.account_id)
             .join(JournalEntry, JournalEntry.id == Posting.entry_id)
             .join(S, JournalEntry.reference == ref("session:", S.id, suffix))
             .join(Connector, Connector.id == S.connector_id)
             .join(Charger, Charger.id == Connector.charger_id)
             .join(Site, Site.id == Charger.site_id)
             .where(LedgerAccount.kind.in_([AccountKind.REVENUE, AccountKind.VAT_PAYABLE]), JournalEntry.created_at >= lo,
                    JournalEntry.created_at < hi, JournalEntry.idempotency_key.not_like("allocation:%"), *scope.on_chargers())
             .group_by(JournalEntry.id, JournalEntry.created_at, S.id, Charger.id, Site.id, Posting.currency, LedgerAccount.kind))
        for entry_id, at, session_id, charger_id, site_id, currency, kind, amount in s.execute(q):
            b = out.setdefault(entry_id, Booking(at, session_id, charger_id, site_id, currency))
            b.gross -= int(amount)  # credit-normal accounts: a capture credits them (negative postings)
            if kind == AccountKind.VAT_PAYABLE:
                b.vat -= int(amount)
    return [b for b in out.values() if b.gross or b.vat]


@dataclass
class Charge:
    """A charging session as far as time and energy go."""

    session_id: int
    started_at: dt.datetime
    until: dt.datetime  # when its charging stopped (now for a running one)
    energy_wh: Decimal
    currency: str
    charger_id: int
    site_id: int
    tz: str


def charges(scope: Scope, lo: dt.datetime, hi: dt.datetime, now: dt.datetime) -> list[Charge]:
    """Sessions whose charging overlaps ``[lo, hi)``: started before ``hi`` and not stopped before ``lo``."""
    S = ChargingSession
    q = (select(S.id, S.started_at, S.stopped_at, S.ended_at, S.last_message_at, S.updated_at, S.state, S.energy_wh, S.currency,
                Charger.id, Site.id, Site.time_zone)
         .join(Connector, Connector.id == S.connector_id)
         .join(Charger, Charger.id == Connector.charger_id)
         .join(Site, Site.id == Charger.site_id)
         .where(S.started_at.is_not(None), S.started_at < hi, (S.stopped_at.is_(None)) | (S.stopped_at > lo), *scope.on_chargers()))
    out = []
    for sid, started, stopped, ended, last, updated, state, wh, currency, charger_id, site_id, tz in db_session().execute(q):
        until = stopped or (now if state in ACTIVE_STATES else (ended or last or updated or started))
        out.append(Charge(sid, started, max(until, started), Decimal(wh or 0), currency, charger_id, site_id, tz or "UTC"))
    return out


# --------------------------------------------------------------------------- periods


def bucket_of(day: dt.date, granularity: str) -> dt.date:
    """The first day of the day / ISO week / month holding ``day``."""
    if granularity == "week":
        return day - dt.timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    return day


def buckets(start: dt.date, end: dt.date, granularity: str) -> list[dt.date]:
    """Every bucket of the period, in order (empty ones too: a chart shows the quiet days)."""
    out, b = [], bucket_of(start, granularity)
    while b <= end:
        out.append(b)
        if granularity == "week":
            b += dt.timedelta(days=7)
        elif granularity == "month":
            b = (b.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        else:
            b += dt.timedelta(days=1)
    return out


def bucket_label(b: dt.date, granularity: str) -> str:
    """2026-01-31, 2026-W05 or 2026-01."""
    if granularity == "week":
        year, week, _d = b.isocalendar()
        return f"{year}-W{week:02d}"
    if granularity == "month":
        return b.strftime("%Y-%m")
    return b.isoformat()


def _avg(total: int, count: int) -> int:
    return int((Decimal(total) / count).quantize(Decimal(1), rounding=ROUND_HALF_UP)) if count else 0


def _percent(part: Decimal, whole: Decimal) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


@dataclass
class Figures:
    """Counts and sums of one row (a period, a site, a charger, a currency)."""

    sessions: int = 0
    energy_wh: Decimal = Decimal(0)
    paid: int = 0
    captured: int = 0
    refunded: int = 0
    vat: int = 0
    charging_s: Decimal = Decimal(0)
    available_s: Decimal = Decimal(0)

    @property
    def revenue(self) -> int:
        """Captured minus refunded, VAT included."""
        return self.captured - self.refunded

    def kwh(self) -> Decimal:
        """Energy in kWh, to the Wh."""
        return (self.energy_wh / 1000).quantize(Decimal("0.001"))

    def utilization(self) -> Decimal | None:
        """Charging time ÷ available connector time, in percent (None when no time was available)."""
        return _percent(self.charging_s, self.available_s)

    def add_booking(self, b: Booking) -> None:
        """Count a capture or a refund."""
        if b.gross > 0:
            self.paid += 1
            self.captured += b.gross
        else:
            self.refunded -= b.gross
        self.vat += b.vat


@dataclass
class Report:
    """Everything the page shows, as tables (the charts are drawn from them)."""

    tables: dict[str, Table]
    charts: list[dict] = field(default_factory=list)
    heat: dict | None = None


def _overlap(a0: dt.datetime, a1: dt.datetime, b0: dt.datetime, b1: dt.datetime) -> Decimal:
    start, end = max(a0, b0), min(a1, b1)
    if end <= start:
        return Decimal(0)
    delta = end - start
    return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) / 1_000_000


def build_report(scope: Scope, start: dt.date, end: dt.date, granularity: str, now: dt.datetime) -> Report:
    """Compute every table of the page for the scope and period."""
    s = db_session()
    tz = zone(scope.tz)
    lo, hi = local_bounds(start, end, scope.tz)
    bookings = charging_bookings(scope, lo, hi)
    runs = charges(scope, lo, hi, now)

    charger_rows = [(c, site) for c, site in s.execute(
        select(Charger, Site).join(Site, Site.id == Charger.site_id).where(*scope.on_chargers()).order_by(Site.name, Charger.charge_point_id))]
    connectors = dict(s.execute(select(Connector.charger_id, func.count(Connector.id))
                                .where(Connector.charger_id.in_([c.id for c, _s in charger_rows] or [-1]))
                                .group_by(Connector.charger_id)).all())
    site_of = {c.id: site for c, site in charger_rows}
    sites_by_id = {site.id: site for _c, site in charger_rows}
    span = _overlap(lo, hi, lo, min(hi, now))

    by_bucket: dict[tuple[dt.date, str], Figures] = defaultdict(Figures)
    by_site: dict[tuple[int, str], Figures] = defaultdict(Figures)
    by_charger: dict[tuple[int, str], Figures] = defaultdict(Figures)
    by_currency: dict[str, Figures] = defaultdict(Figures)
    heat = [[0] * 24 for _ in range(7)]

    for c, site in charger_rows:  # available connector time, in the site's currency
        avail = span * connectors.get(c.id, 0)
        for fig in (by_charger[(c.id, site.currency)], by_site[(site.id, site.currency)], by_currency[site.currency]):
            fig.available_s += avail
    for b in bookings:
        day = b.at.astimezone(tz).date()
        for fig in (by_bucket[(bucket_of(day, granularity), b.currency)], by_site[(b.site_id, b.currency)],
                    by_charger[(b.charger_id, b.currency)], by_currency[b.currency]):
            fig.add_booking(b)
    for r in runs:
        site = site_of.get(r.charger_id)
        cur = site.currency if site is not None else r.currency
        charging = _overlap(r.started_at, r.until, lo, min(hi, now))
        for fig in (by_site[(r.site_id, cur)], by_charger[(r.charger_id, cur)], by_currency[cur]):
            fig.charging_s += charging
        if not (lo <= r.started_at < hi):
            continue  # counted for utilization only: it started before the period
        local = r.started_at.astimezone(zone(r.tz))
        heat[local.weekday()][local.hour] += 1
        for fig in (by_bucket[(bucket_of(r.started_at.astimezone(tz).date(), granularity), r.currency)], by_site[(r.site_id, r.currency)],
                    by_charger[(r.charger_id, r.currency)], by_currency[r.currency]):
            fig.sessions += 1
            fig.energy_wh += r.energy_wh

    currencies = sorted(set(scope.currencies) | {cur for _b, cur in by_bucket} | set(by_currency))
    periods = buckets(start, end, granularity)
    meters = meter_totals(scope, lo, hi)
    tables = {
        "summary": _summary_table(currencies, by_currency, meters),
        "periods": _periods_table(periods, granularity, currencies, by_bucket),
        "sites": _sites_table(scope, sites_by_id, charger_rows, connectors, by_site),
        "chargers": _chargers_table(charger_rows, connectors, by_charger),
        "hours": _hours_table(heat),
        "meters": _meters_table(scope, meters),
    }
    return Report(tables=tables, charts=_charts(tables["periods"], currencies), heat=_heat(heat))


def money_columns() -> list[Column]:
    """The money columns of the charging tables."""
    return [Column("paid_sessions", _("Paid sessions"), "int"), Column("captured", _("Captured"), "money"),
            Column("refunded", _("Refunded"), "money"), Column("revenue", _("Revenue"), "money"), Column("vat", _("of which VAT"), "money"),
            Column("revenue_excl_vat", _("Revenue excl. VAT"), "money"), Column("average_session_value", _("Average session value"), "money")]


def money_cells(f: Figures, currency: str) -> list[object]:
    """The cells of ``money_columns``."""
    m = lambda minor: Money(minor, currency)  # noqa: E731
    return [f.paid, m(f.captured), m(f.refunded), m(f.revenue), m(f.vat), m(f.revenue - f.vat), m(_avg(f.captured, f.paid))]


def _summary_table(currencies: list[str], by_currency: dict[str, Figures], meters: dict) -> Table:
    cols = ([Column("currency", _("Currency")), Column("sessions", _("Sessions"), "int"), Column("energy_kwh", _("Energy (kWh)"), "kwh")]
            + money_columns()
            + [Column("utilization_percent", _("Utilization"), "percent"), Column("top_ups", _("Meter top-ups"), "int"),
               Column("top_up_amount", _("Top-up amount"), "money"), Column("bill_payments", _("Bills paid"), "int"),
               Column("bill_amount", _("Bill payments"), "money")])
    rows = []
    for cur in currencies:
        f = by_currency.get(cur, Figures())
        top = [v for (site_id, kind, c), v in meters.items() if kind == "top_up" and c == cur]
        bill = [v for (site_id, kind, c), v in meters.items() if kind == "bill" and c == cur]
        rows.append([cur, f.sessions, f.kwh()] + money_cells(f, cur) + [
            f.utilization(), sum(v["count"] for v in top), Money(sum(v["amount"] for v in top), cur),
            sum(v["count"] for v in bill), Money(sum(v["amount"] for v in bill), cur)])
    return Table("summary", _("Totals"), cols, rows)


def _periods_table(periods: list[dt.date], granularity: str, currencies: list[str], by_bucket: dict) -> Table:
    label = {"day": _("Day"), "week": _("Week"), "month": _("Month")}[granularity]
    cols = ([Column("period", label), Column("sessions", _("Sessions"), "int"), Column("energy_kwh", _("Energy (kWh)"), "kwh")]
            + money_columns() + [Column("currency", _("Currency"))])
    rows = []
    for b in periods:
        for cur in currencies:
            f = by_bucket.get((b, cur), Figures())
            rows.append([bucket_label(b, granularity), f.sessions, f.kwh()] + money_cells(f, cur) + [cur])
    return Table("periods", _("Per %(period)s", period=label.lower()), cols, rows)


def _sites_table(scope: Scope, sites_by_id: dict[int, Site], charger_rows, connectors, by_site: dict) -> Table:
    cols = ([Column("site", _("Site")), Column("chargers", _("Chargers"), "int"), Column("connectors", _("Connectors"), "int"),
             Column("sessions", _("Sessions"), "int"), Column("energy_kwh", _("Energy (kWh)"), "kwh"),
             Column("charging_hours", _("Charging hours"), "hours"), Column("utilization_percent", _("Utilization"), "percent")]
            + money_columns() + [Column("currency", _("Currency"))])
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for c, site in charger_rows:
        counts[site.id][0] += 1
        counts[site.id][1] += connectors.get(c.id, 0)
    rows = []
    for (site_id, cur), f in sorted(by_site.items(), key=lambda kv: (sites_by_id[kv[0][0]].name if kv[0][0] in sites_by_id else "", kv[0])):
        site = sites_by_id.get(site_id)
        if site is None:
            continue
        n_chargers, n_connectors = counts[site_id]
        rows.append([site.name, n_chargers, n_connectors, f.sessions, f.kwh(), f.charging_s / 3600, f.utilization()]
                    + money_cells(f, cur) + [cur])
    return Table("sites", _("Per site"), cols, rows, empty=_("No chargers here yet."))


def _chargers_table(charger_rows, connectors, by_charger: dict) -> Table:
    cols = ([Column("site", _("Site")), Column("charger", _("Charger")), Column("connectors", _("Connectors"), "int"),
             Column("sessions", _("Sessions"), "int"), Column("energy_kwh", _("Energy (kWh)"), "kwh"),
             Column("charging_hours", _("Charging hours"), "hours"), Column("utilization_percent", _("Utilization"), "percent")]
            + money_columns() + [Column("currency", _("Currency"))])
    rows = []
    for c, site in charger_rows:
        for (charger_id, cur), f in sorted(by_charger.items(), key=lambda kv: kv[0][1]):
            if charger_id == c.id:
                rows.append([site.name, c.charge_point_id, connectors.get(c.id, 0), f.sessions, f.kwh(), f.charging_s / 3600, f.utilization()]
                            + money_cells(f, cur) + [cur])
    return Table("chargers", _("Per charger"), cols, rows, empty=_("No chargers here yet."))


def _day_names() -> list[str]:
    names = get_day_names("wide", locale=locale())
    return [names[i] for i in range(7)]


def _hours_table(heat: list[list[int]]) -> Table:
    cols = ([Column("weekday", _("Weekday (1 = Monday)"), "int"), Column("day", _("Day"))]
            + [Column(f"h{h:02d}", f"{h:02d}", "int") for h in range(24)] + [Column("total", _("Total"), "int")])
    rows = [[i + 1, name] + heat[i] + [sum(heat[i])] for i, name in enumerate(_day_names())]
    return Table("hours", _("Session starts by weekday and hour (local time of each site)"), cols, rows)


def meter_totals(scope: Scope, lo: dt.datetime, hi: dt.datetime) -> dict[tuple[int, str, str], dict]:
    """Top-ups and bill payments per (site, kind, currency): count, amount (VAT included) and VAT. None with a charger filter."""
    if scope.charger is not None:
        return {}
    mp = meter_payments(scope, lo, hi)
    q = (select(mp.c.site_id, mp.c.kind, mp.c.currency, func.count(), func.sum(mp.c.amount_minor), func.sum(mp.c.vat_minor))
         .group_by(mp.c.site_id, mp.c.kind, mp.c.currency))
    return {(site_id, kind, cur): {"count": n, "amount": int(amount or 0), "vat": int(vat or 0)}
            for site_id, kind, cur, n, amount, vat in db_session().execute(q)}


def _meters_table(scope: Scope, meters: dict) -> Table:
    cols = [Column("site", _("Site")), Column("top_ups", _("Top-ups"), "int"), Column("top_up_amount", _("Top-up amount"), "money"),
            Column("bill_payments", _("Bills paid"), "int"), Column("bill_amount", _("Bill payments"), "money"),
            Column("bill_vat", _("of which VAT"), "money"), Column("currency", _("Currency"))]
    if scope.charger is not None:
        return Table("meters", _("Meters"), cols, [], empty=_("Meter payments are counted per site: clear the charger filter to see them."))
    names = {x.id: x.name for x in scope.sites}
    with_meters = set(db_session().scalars(select(Meter.site_id).where(Meter.site_id.in_(list(names) or [-1])).distinct()))
    keys = sorted({(site_id, cur) for site_id, _k, cur in meters} | {(i, x.currency) for x in scope.sites for i in [x.id] if i in with_meters},
                  key=lambda k: (names.get(k[0], ""), k))
    rows = []
    for site_id, cur in keys:
        top = meters.get((site_id, "top_up", cur), {"count": 0, "amount": 0, "vat": 0})
        bill = meters.get((site_id, "bill", cur), {"count": 0, "amount": 0, "vat": 0})
        rows.append([names.get(site_id, f"#{site_id}"), top["count"], Money(top["amount"], cur), bill["count"], Money(bill["amount"], cur),
                     Money(bill["vat"], cur), cur])
    return Table("meters", _("Meters: top-ups and bill payments"), cols, rows, empty=_("No meters here."))


# --------------------------------------------------------------------------- charts (inline SVG, drawn here)

CHART_W, CHART_H, CHART_TOP = 600, 180, 8


def bar_chart(chart_id: str, title: str, desc: str, points: list[tuple[str, Decimal, str]]) -> dict:
    """A bar chart: ``points`` are (label, value, value as text); the heights are proportional to the largest value."""
    top = max((v for _l_, v, _t in points), default=Decimal(0))
    n = max(len(points), 1)
    slot = Decimal(CHART_W) / n
    width = max(slot * Decimal("0.8"), Decimal("0.5"))
    bars = []
    for i, (label, value, shown) in enumerate(points):
        h = (Decimal(CHART_H - CHART_TOP) * value / top) if top > 0 and value > 0 else Decimal(0)
        bars.append({"x": (slot * i + (slot - width) / 2).quantize(Decimal("0.1")), "y": (Decimal(CHART_H) - h).quantize(Decimal("0.1")),
                     "width": width.quantize(Decimal("0.1")), "height": h.quantize(Decimal("0.1")), "title": f"{label}: {shown}"})
    return {"id": chart_id, "title": title, "desc": desc, "width": CHART_W, "height": CHART_H, "bars": bars,
            "first": points[0][0] if points else "", "last": points[-1][0] if points else "",
            "peak": next((t for _l_, v, t in points if v == top), "") if points else ""}


def _charts(periods: Table, currencies: list[str]) -> list[dict]:
    loc = locale()
    keys = [c.key for c in periods.columns]
    col = {k: i for i, k in enumerate(keys)}
    per_label: dict[str, list] = {}
    for row in periods.rows:
        per_label.setdefault(row[0], []).append(row)
    labels = list(per_label)
    charts = []
    for cur in currencies:
        pts = []
        for label in labels:
            row = next((r for r in per_label[label] if r[col["currency"]] == cur), None)
            money = row[col["revenue"]] if row else Money(0, cur)
            pts.append((label, max(money.to_decimal(), Decimal(0)), text(money, "money", loc)))
        total = Money(sum(r[col["revenue"]].amount for r in periods.rows if r[col["currency"]] == cur), cur)
        charts.append(bar_chart(f"chart-revenue-{cur}", _("Revenue per period (%(currency)s)", currency=cur),
                                _("Captured minus refunded, VAT included, from %(first)s to %(last)s: %(total)s in all.",
                                  first=labels[0] if labels else "", last=labels[-1] if labels else "", total=text(total, "money", loc)),
                                pts))
    sessions = [(label, Decimal(sum(r[col["sessions"]] for r in per_label[label])), "") for label in labels]
    sessions = [(label, v, text(int(v), "int", loc)) for label, v, _t in sessions]
    charts.append(bar_chart("chart-sessions", _("Sessions per period"),
                            _("Sessions that started charging, %(total)s in all.", total=text(int(sum(v for _l_, v, _t in sessions)), "int", loc)),
                            sessions))
    energy = [(label, sum((r[col["energy_kwh"]] for r in per_label[label]), Decimal(0)), "") for label in labels]
    energy = [(label, v, text(v, "kwh", loc) + " kWh") for label, v, _t in energy]
    charts.append(bar_chart("chart-energy", _("Energy per period"),
                            _("Energy delivered by the sessions that started in each period, %(total)s kWh in all.",
                              total=text(sum((v for _l_, v, _t in energy), Decimal(0)), "kwh", loc)), energy))
    return charts


def _heat(heat: list[list[int]]) -> dict:
    """The heat map's cells: one per weekday and hour, darker for more starts."""
    top = max(max(row) for row in heat)
    names = _day_names()
    short = get_day_names("abbreviated", locale=locale())
    cell_w, cell_h, left, head = 22, 20, 48, 16
    cells = []
    for d in range(7):
        for h in range(24):
            n = heat[d][h]
            opacity = (Decimal("0.15") + Decimal("0.85") * Decimal(n) / top).quantize(Decimal("0.01")) if n and top else Decimal(0)
            cells.append({"x": left + h * cell_w, "y": head + d * cell_h, "w": cell_w - 2, "h": cell_h - 2, "count": n, "opacity": opacity,
                          "title": ngettext("%(day)s %(hour)s:00–%(next)s:00: %(num)s session started",
                                            "%(day)s %(hour)s:00–%(next)s:00: %(num)s sessions started", n,
                                            day=names[d], hour=f"{h:02d}", next=f"{(h + 1) % 24:02d}")})
    return {"cells": cells, "rows": [{"y": head + d * cell_h + cell_h - 6, "label": short[d]} for d in range(7)],
            "hours": [{"x": left + h * cell_w + 2, "label": f"{h:02d}"} for h in range(0, 24, 3)],
            "width": left + 24 * cell_w, "height": head + 7 * cell_h, "top": top}


# --------------------------------------------------------------------------- the page and its exports


class AnalyticsForm(FlaskForm):
    """The filters (a GET form: nothing changes, no CSRF token)."""

    class Meta:
        csrf = False

    start = StringField(_l("From"), name="from", render_kw={"type": "date"})
    end = StringField(_l("To"), name="to", render_kw={"type": "date"})
    granularity = SelectField(_l("Per"), default="day", validate_choice=False,
                              choices=[SelectChoice("day", _l("Day")), SelectChoice("week", _l("Week")), SelectChoice("month", _l("Month"))])
    site = SelectField(_l("Site"), choices=[], validate_choice=False)
    charger = SelectField(_l("Charger"), choices=[], validate_choice=False)


@dataclass
class Asked:
    """Valid filters of the page."""

    scope: Scope
    start: dt.date
    end: dt.date
    granularity: str

    def args(self) -> dict[str, str]:
        """The query string that asks for the same."""
        out = {"from": self.start.isoformat(), "to": self.end.isoformat(), "granularity": self.granularity}
        if self.scope.site is not None:
            out["site"] = str(self.scope.site.id)
        if self.scope.charger is not None:
            out["charger"] = str(self.scope.charger.id)
        return out

    def about(self) -> list[tuple[str, str]]:
        """What was asked, for the workbook's second sheet."""
        return [("from", self.start.isoformat()), ("to", self.end.isoformat()), ("granularity", self.granularity),
                ("time_zone", self.scope.tz), ("site", self.scope.site.name if self.scope.site else ""),
                ("charger", self.scope.charger.charge_point_id if self.scope.charger else "")]


def _parse(form: AnalyticsForm, now: dt.datetime) -> Asked | None:
    form.validate()  # no validators: it makes each field's error list, which the checks below fill
    op_id = operator_scope()
    site_choices(form.site, visible_sites(op_id), admin=op_id is None)
    charger_choices(form.charger, visible_chargers(op_id))
    granularity = (form.granularity.data or "day").strip()
    if granularity not in GRANULARITIES:
        form.granularity.errors.append(_("Choose day, week or month."))
    scope = parse_scope(form.site, form.charger)
    start, end = parse_day(form.start), parse_day(form.end)
    if scope is None or form.granularity.errors or form.start.errors or form.end.errors:
        return None
    today = now.astimezone(zone(scope.tz)).date()
    end = end or (today if start is None else min(start + dt.timedelta(days=DEFAULT_DAYS - 1), max(today, start)))
    start = start or end - dt.timedelta(days=DEFAULT_DAYS - 1)
    if not check_period(form.start, form.end, start, end):
        return None
    form.start.data, form.end.data, form.granularity.data = start.isoformat(), end.isoformat(), granularity
    return Asked(scope, start, end, granularity)


def _page(form: AnalyticsForm, status: int, **ctx) -> Response:
    resp = Response(render_template("console/analytics.html", form=form, locale=locale(), **template_helpers(), **ctx), status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/analytics")
@login_required
def analytics():
    """Revenue, energy, sessions, utilization, busiest hours and meter payments for the filters, as charts and tables."""
    form = AnalyticsForm(formdata=request.args)
    now = utcnow()
    asked = _parse(form, now)
    if asked is None:
        return _page(form, 400, report=None, asked=None)
    report = build_report(asked.scope, asked.start, asked.end, asked.granularity, now)
    return _page(form, 200, report=report, asked=asked, export_args=asked.args())


@bp.route("/analytics.<any(csv, xlsx):fmt>")
@login_required
def analytics_export(fmt: str):
    """One table of the page (``?table=``) with the same filters, as CSV or XLSX: the same rows as on the page."""
    form = AnalyticsForm(formdata=request.args)
    now = utcnow()
    key = request.args.get("table", "")
    if key not in TABLES:
        abort(400, description=_("Choose a table: %(tables)s.", tables=", ".join(TABLES)))
    asked = _parse(form, now)
    if asked is None:
        return _page(form, 400, report=None, asked=None)
    table = build_report(asked.scope, asked.start, asked.end, asked.granularity, now).tables[key]
    return export(table, fmt, f"analytics-{key}-{asked.start}-{asked.end}", asked.about())

