"""Post-paid bills and monthly prepaid consumption invoices of a building's tenants; paying a bill; overdue reminders.

Services ``flush()``; the caller commits (the jobs at the end use their own
transactions). Amounts are integers in minor units.

The bill of a post-paid tenant for a month (``generate_bills``)
---------------------------------------------------------------
The month is the building's local calendar month (``Site.time_zone``):
``[first day 00:00, first day of the next month 00:00)``. Consumption comes
from the ``MeterInterval`` rows (not superseded) of each meter: an interval
that crosses a month start is cut there in proportion to time
(``payments.metering.split_by_month``, the rule tiers use), so each month
bills its own part and no kWh is billed twice.

Lines, each a net amount (excl. VAT) rounded half up **once per line** from
its exact Decimal:

* ``energy``: per meter and band/tier, the month's intervals priced by
  ``payments.metering.price_interval`` with the tariff version each interval
  was read under (else the version in force at its start); tiers count the
  meter's kWh of the month in reading order (``month_kwh_before``).
* ``demand``: per meter, the month's maximum ``demand_kw`` (of the intervals
  billed this month) × the tariff's ``demand_charge_per_kw``
  (``payments.metering.demand_charge``).
* ``public_area``: the tenant's share of the building's public-area meters
  (see ``payments.allocation``: the pool is priced once by the public-area
  meters' own tariffs, then its cost is shared to the cent and its kWh to the
  Wh, by the building's method).
* ``line_loss``: the tenant's share, **by consumption**, of each master
  meter's loss = master kWh − Σ kWh of its sub-meters (all kinds, prepaid
  ones included: they are on the same wire). The loss is priced at the
  master meter's average price of the month (its own priced cost ÷ its kWh):
  it is energy the building bought and nobody metered. A **negative** loss
  (sub-meters above the master) means a meter is wrong: every bill of the
  building for that month goes to ``review`` with the reason, and nothing of
  the loss is shared.
* ``fee``: each of ``BuildingBilling.fixed_fees_json`` (``[{"name",
  "amount_minor", "vat"}]``, ``vat`` defaulting to the building's rate),
  prorated by time for a tenant who moved in or out during the month.

Shared pools are divided among the post-paid tenants only (prepaid tenants
pay their own energy as they go and get no bill). A tenant who moved in or
out during the month takes part with its own meters' consumption within its
lease, and with its area, equal or custom weight prorated by the part of the
month it held the lease (``payments.allocation.Basis.presence``). A pool is
shared among the tenants billed *now*, after subtracting what issued bills
of the same month already took (a bill issued earlier, say before a review
of another tenant's bill was settled): so however many runs a month needs,
the building's pool is recovered exactly, never twice.

**VAT** per rate: ``vat = round_half_up(Σ net of that rate × rate / 100)``,
``total = Σ net + Σ vat`` (the bill is built from net prices, so VAT is
computed on the net, as on a business invoice). Exact to the cent by
construction.

**Readiness.** A bill waits (``draft``) until every meter of the building
has a reading at or after the end of the month; after ``READING_GRACE`` it
goes to ``review`` ("no reading at the end of the month"). A missing tariff,
a custom share missing for a tenant, or a negative line loss also send the
bills to ``review``. Draft and review bills are computed again by every run
of the job, and issued as soon as nothing is in the way.

**Issuing** a bill issues its invoice (``payments.invoicing.issue``, kind
``invoice``, the operator's series) with the frozen content the document
pages and the PDF render (``seller``, ``buyer``, ``lines``, ``vat``,
``payment``, ``branding``, ``time_zone`` and a ``bill`` block: period, due
date, each share and how it was computed). The invoice's own email (with the
PDF) goes through ``webapp.notifications`` (``on_issued``); the bill email
(``bill_issued``) adds the due date and the link to pay. Due date = the
local issue date + ``BuildingBilling.due_days``.

**Idempotent.** One bill per tenant and month (a unique constraint); the
building's ``BuildingBilling`` row is locked while its bills are computed,
so two workers never share one pool twice; an issued bill is never
computed again. Running the job twice makes no second bill.

The monthly prepaid invoice (``prepaid_invoices``)
--------------------------------------------------
Per prepaid tenant and month, an ``invoice`` documenting the electricity
already paid from the meter wallets: the intervals **ending** in the month
(each interval's money was debited once, so each lands on exactly one
invoice), lines per band and unit price, VAT per rate as each interval was
rounded (``IntervalPrice``: net = round(excl), VAT = amount − net, summed).
No payment is asked for: the content's ``payment`` block says
``{"method": "meter_wallet", "captured": total}``.

Paying a bill
-------------
By card (``cards.create`` with ``Purpose.BILL``, reference ``bill:<id>``,
then the same 3-D Secure flow as a top-up) or from the customer wallet. On
success, once per payment (``cards.on_succeeded``): provider clearing →
revenue (net) + VAT payable, and the bill is ``paid``. A second payment that
succeeds for a bill already paid (two tabs) is credited to the payer's
wallet, never booked as revenue twice. The invoice is not edited; the bill
page says it is paid.

Overdue reminders (``send_reminders``)
--------------------------------------
Reminder *n* of an unpaid bill is due ``n × reminder_days`` days after the
due date (local dates). A daily run sends the newest one due, at most one
per run, with the key ``bill:<id>:reminder:<n>`` (a second run the same day
sends nothing), counts it (``reminders_sent``) and stops after
``MAX_REMINDERS``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from huey import crontab
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from payments import cards, invoicing
from payments import wallet as wallet_mod
from payments.allocation import AllocationError, Basis, Method, allocate_shares
from payments.cards import CardPayment, Purpose, State
from payments.invoicing import Document, DocumentKind, Line, VatGroup
from payments.ledger import AccountKind, get_account, post
from payments.metering import compile_tariff, demand_charge, price_interval, split_by_month
from payments.money import Money, to_minor
from payments.tariff_store import loads
from webapp.db import utcnow
from webapp.meters.models import (
    Bill,
    Billing,
    BillState,
    BuildingBilling,
    MeterInterval,
    MeterReading,
    MeterTariffVersion,
    Tenant,
)
from webapp.models import Meter, MeterKind, Site, User
from webapp.tasks import periodic_task

log = logging.getLogger("voltpay.meters.bills")

READING_GRACE = dt.timedelta(days=2)  # a bill waits this long for the end-of-month readings, then goes to review
MAX_REMINDERS = 6
PAYABLE = (BillState.ISSUED,)
BILLED = (BillState.ISSUED, BillState.PAID)  # bills whose shares count as taken from the month's pools
FINAL = (BillState.ISSUED, BillState.PAID, BillState.VOID)  # never computed again
_MICRO = Decimal("0.000001")


class BillError(Exception):
    """A bill cannot be paid or changed as asked; ``code`` is stable for messages."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- periods


def period_bounds(period: str, tz: str) -> tuple[dt.datetime, dt.datetime]:
    """The UTC instants where the local month ``YYYY-MM`` starts and ends."""
    zone = ZoneInfo(tz or "UTC")
    year, month = int(period[:4]), int(period[5:7])
    start = dt.datetime(year, month, 1, tzinfo=zone)
    end = dt.datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=zone)
    return start.astimezone(dt.UTC), end.astimezone(dt.UTC)


def period_of(at: dt.datetime, tz: str) -> str:
    """The local month of ``at``, ``YYYY-MM``."""
    local = at.astimezone(ZoneInfo(tz or "UTC"))
    return f"{local.year:04d}-{local.month:02d}"


def previous_period(at: dt.datetime, tz: str) -> str:
    """The local month before the one of ``at``."""
    local = at.astimezone(ZoneInfo(tz or "UTC"))
    year, month = (local.year, local.month - 1) if local.month > 1 else (local.year - 1, 12)
    return f"{year:04d}-{month:02d}"


def _local_date(at: dt.datetime, tz: str) -> dt.date:
    return at.astimezone(ZoneInfo(tz or "UTC")).date()


# --------------------------------------------------------------------------- usage of one meter


class _Tariffs:
    """Compiled tariff versions, cached for one computation."""

    def __init__(self, s: Session):
        self.s = s
        self.by_version: dict[int, tuple] = {}

    def version_at(self, meter: Meter, at: dt.datetime) -> int | None:
        if meter.tariff_id is None:
            return None
        return self.s.scalar(select(MeterTariffVersion.id).where(
            MeterTariffVersion.tariff_id == meter.tariff_id, MeterTariffVersion.effective_from <= at,
        ).order_by(MeterTariffVersion.effective_from.desc()).limit(1))

    def compiled(self, version_id: int):
        if version_id not in self.by_version:
            v = self.s.get(MeterTariffVersion, version_id)
            self.by_version[version_id] = compile_tariff(loads(v.tariff_json))
        return self.by_version[version_id]


@dataclass
class Usage:
    """What one meter consumed in a window, priced (exact Decimals, major units, excl. VAT)."""

    meter: Meter
    kwh: Decimal = Decimal(0)
    lines: dict[tuple[str, Decimal, Decimal], list[Decimal]] = field(default_factory=dict)  # (band, unit price, vat) → [kWh, excl]
    unpriced_kwh: Decimal = Decimal(0)  # consumed with no tariff to price it
    max_kw: Decimal | None = None
    demand: tuple[Decimal, Decimal, Decimal] | None = None  # (max kW, price per kW, excl), at ``demand_vat``
    demand_vat: Decimal | None = None
    last_reading_at: dt.datetime | None = None

    def excl_by_rate(self) -> dict[Decimal, Decimal]:
        """Exact energy cost excl. VAT per VAT rate."""
        out: dict[Decimal, Decimal] = defaultdict(Decimal)
        for (_band, _price, vat), (_kwh, excl) in self.lines.items():
            out[vat] += excl
        return dict(out)


def meter_usage(s: Session, meter: Meter, start: dt.datetime, end: dt.datetime, tz: str, tariffs: _Tariffs | None = None) -> Usage:
    """``meter``'s consumption in ``[start, end)`` (``start`` a local month start), priced by its tariff versions."""
    tariffs = tariffs or _Tariffs(s)
    u = Usage(meter=meter)
    rows = s.scalars(select(MeterInterval).where(
        MeterInterval.meter_id == meter.id, MeterInterval.superseded.is_(False),
        MeterInterval.end_at > start, MeterInterval.start_at < end,
    ).order_by(MeterInterval.start_at)).all()
    month_kwh = Decimal(0)
    last_t = None
    for iv in rows:
        for _period, a, b, k in split_by_month(iv.start_at, iv.end_at, Decimal(iv.kwh), tz):
            if b <= start or a >= end:
                continue
            if a < start or b > end:  # only for a window ending mid-month (a final bill): the part inside, by time
                lo, hi = max(a, start), min(b, end)
                k = (k * Decimal((hi - lo) / dt.timedelta(microseconds=1)) / Decimal((b - a) / dt.timedelta(microseconds=1))
                     ).quantize(_MICRO, rounding=ROUND_HALF_UP)
                a, b = lo, hi
            version_id = iv.tariff_version_id or tariffs.version_at(meter, a)
            if iv.demand_kw is not None:
                u.max_kw = max(u.max_kw or Decimal(0), Decimal(iv.demand_kw))
            u.kwh += k
            if version_id is None:
                u.unpriced_kwh += k
                month_kwh += k
                continue
            t = tariffs.compiled(version_id)
            last_t = t
            p = price_interval(t, a, b, k, tz=tz, month_kwh_before=month_kwh)
            month_kwh += k
            for bl in p.bands:
                acc = u.lines.setdefault((bl.band, bl.unit_price, p.vat), [Decimal(0), Decimal(0)])
                acc[0] += bl.kwh
                acc[1] += bl.excl
    if last_t is not None and u.max_kw is not None and last_t.demand_charge_per_kw is not None:
        excl, _incl = demand_charge(last_t, u.max_kw)
        u.demand = (u.max_kw, last_t.demand_charge_per_kw, excl)
        u.demand_vat = last_t.vat
    u.last_reading_at = s.scalar(select(func.max(MeterReading.at)).where(MeterReading.meter_id == meter.id))
    return u


# --------------------------------------------------------------------------- the building's month


def billing_of(s: Session, site: Site, *, lock: bool = False) -> BuildingBilling:
    """The building's post-paid rules (created with the defaults on first use); ``lock`` takes its row lock."""
    q = select(BuildingBilling).where(BuildingBilling.site_id == site.id)
    row = s.scalar(q)
    if row is None:
        try:
            with s.begin_nested():
                s.add(BuildingBilling(site_id=site.id))
        except IntegrityError:
            pass  # created concurrently
    if lock:
        return s.scalar(q.with_for_update().execution_options(populate_existing=True))
    return s.scalar(q)


def fixed_fees(billing: BuildingBilling) -> list[dict]:
    """The building's monthly fees, checked: ``[{"name", "amount_minor", "vat"}]``."""
    raw = json.loads(billing.fixed_fees_json or "[]")
    out = []
    for i, fee in enumerate(raw if isinstance(raw, list) else []):
        amount = fee.get("amount_minor") if isinstance(fee, dict) else None
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise BillError(f"fixed fee {i}: amount_minor must be a whole number ≥ 0", "invalid_fee")
        vat = fee.get("vat")
        out.append({"name": str(fee.get("name") or f"fee {i + 1}")[:120], "amount_minor": amount,
                    "vat": Decimal(str(billing.vat_rate if vat is None else vat))})
    return out


@dataclass
class _Pool:
    """A shared pool: its kWh and its cost per VAT rate (minor units), what is left of it, and how it was made."""

    kind: str  # public_area | line_loss
    key: str  # "public_area" or "line_loss:<master meter id>"
    method: Method
    kwh: Decimal
    minor_by_rate: dict[Decimal, int]
    facts: dict
    tenants: set[int] | None = None  # who shares it (None: every participant)


def _billed_before(s: Session, site: Site, period: str) -> dict[str, dict]:
    """What issued bills of this month already took from each pool: {pool key: {"kwh", "minor": {rate: amount}}}."""
    out: dict[str, dict] = {}
    rows = s.scalars(select(Bill).join(Tenant, Tenant.id == Bill.tenant_id)
                     .where(Tenant.site_id == site.id, Bill.period == period, Bill.state.in_(BILLED))).all()
    for bill in rows:
        for share in bill_facts(bill).get("shares", []):
            acc = out.setdefault(share["pool"], {"kwh": Decimal(0), "minor": defaultdict(int)})
            acc["kwh"] += Decimal(share["share_kwh"])
            acc["minor"][Decimal(share["vat_rate"])] += int(share["amount"])
    return out


def _money_minor(x: Decimal, currency: str) -> int:
    return to_minor(x, currency).amount


@dataclass
class _Month:
    """Everything a bill of one building and window needs, computed once."""

    site: Site
    period: str
    start: dt.datetime
    end: dt.datetime
    billing: BuildingBilling
    currency: str
    usage: dict[int, Usage]  # meter id → usage over the whole window (the pools)
    participants: list[Tenant]
    own: dict[int, list[tuple[Meter, Usage]]]  # tenant id → its meters, used within its lease
    pools: list[_Pool]
    problems: list[str]  # building-wide reasons for review
    waiting: list[str]  # meters without their end-of-window reading


def meters_of(tenant: Tenant, *, kind: MeterKind | None = MeterKind.TENANT) -> list[Meter]:
    """The tenant's meters (by ``Meter.tenant_id``; ``Tenant.meters`` is not relied on), tenant sub-meters by default."""
    s = object_session(tenant)
    q = select(Meter).where(Meter.tenant_id == tenant.id).order_by(Meter.id)
    if kind is not None:
        q = q.where(Meter.kind == kind)
    return list(s.scalars(q))



def _eligible(t: Tenant, start: dt.datetime, end: dt.datetime) -> bool:
    return t.created_at < end and (t.closed_at is None or t.closed_at > start)


def _lease(t: Tenant, start: dt.datetime, end: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    return max(start, t.created_at), min(end, t.closed_at or end)


def _build_month(s: Session, site: Site, period: str, *, exclude: set[int], known: dict[int, set[str]]) -> _Month:
    tz = site.time_zone or "UTC"
    start, end = period_bounds(period, tz)
    billing = billing_of(s, site, lock=True)
    tenants = s.scalars(select(Tenant).where(Tenant.site_id == site.id, Tenant.billing == Billing.POSTPAID).order_by(Tenant.id)).all()
    participants = [t for t in tenants if _eligible(t, start, end) and t.id not in exclude]
    meters = s.scalars(select(Meter).where(Meter.site_id == site.id).order_by(Meter.id)).all()
    tariffs = _Tariffs(s)
    usage = {m.id: meter_usage(s, m, start, end, tz, tariffs) for m in meters}
    currency = participants[0].currency if participants else site.currency
    month = _Month(site, period, start, end, billing, currency, usage, participants, {}, [], [], [])
    by_code = {m.meter_code: m for m in meters}
    for t in participants:
        # Its meters now, and those it had when its bill was first computed (a meter given to the next tenant stays on this bill).
        mine = {m.id: m for m in meters_of(t)} | {by_code[c].id: by_code[c] for c in known.get(t.id, ()) if c in by_code}
        lo, hi = _lease(t, start, end)
        month.own[t.id] = [(m, usage[m.id] if (lo, hi) == (start, end) else meter_usage(s, m, lo, hi, tz, tariffs))
                           for m in sorted(mine.values(), key=lambda m: m.id)]
        for m, u in month.own[t.id]:
            if u.last_reading_at is None or u.last_reading_at < hi:
                month.waiting.append(m.meter_code)
    for m in meters:
        if m.kind is not MeterKind.TENANT and (usage[m.id].last_reading_at is None or usage[m.id].last_reading_at < end):
            month.waiting.append(m.meter_code)  # public-area and master meters: read at the end of the month
    billed = _billed_before(s, site, period)

    def left(key: str, kwh: Decimal, minor: dict[Decimal, int]) -> tuple[Decimal, dict[Decimal, int], dict]:
        before = billed.get(key, {"kwh": Decimal(0), "minor": {}})
        return (max(kwh - before["kwh"], Decimal(0)), {r: max(v - before["minor"].get(r, 0), 0) for r, v in minor.items()},
                {"kwh": str(before["kwh"]), "amount": sum(before["minor"].values())})

    # Public area: priced once by the public-area meters' own tariffs.
    public = [m for m in meters if m.kind is MeterKind.PUBLIC_AREA]
    if public:
        kwh = sum((usage[m.id].kwh for m in public), Decimal(0))
        excl: dict[Decimal, Decimal] = defaultdict(Decimal)
        for m in public:
            if usage[m.id].unpriced_kwh:
                month.problems.append(f"public-area meter {m.meter_code} has no tariff")
            for rate, x in usage[m.id].excl_by_rate().items():
                excl[rate] += x
        minor = {rate: _money_minor(x, currency) for rate, x in excl.items()}
        kwh_left, minor_left, before = left("public_area", kwh, minor)
        month.pools.append(_Pool("public_area", "public_area", Method(billing.public_area_method.value), kwh_left, minor_left, {
            "meters": [m.meter_code for m in public], "pool_kwh": str(kwh), "pool_amount": sum(minor.values()),
            "billed_before": before,
        }))

    # Line loss of each master meter: master − Σ its sub-meters, at the master's average price.
    for master in (m for m in meters if m.kind is MeterKind.MASTER):
        subs = [m for m in meters if m.master_meter_id == master.id]
        mu = usage[master.id]
        sub_kwh = sum((usage[m.id].kwh for m in subs), Decimal(0))
        loss = mu.kwh - sub_kwh
        facts = {"master": master.meter_code, "master_kwh": str(mu.kwh), "sub_meters_kwh": str(sub_kwh), "loss_kwh": str(loss),
                 "sub_meters": [m.meter_code for m in subs]}
        if loss < 0:
            month.problems.append(f"negative line loss at master meter {master.meter_code}: it measured {mu.kwh} kWh, "
                                  f"its sub-meters {sub_kwh} kWh")
            continue
        if loss == 0:
            continue
        if mu.unpriced_kwh or not mu.lines:
            month.problems.append(f"master meter {master.meter_code} has no tariff to price the line loss")
            continue
        minor = {rate: _money_minor(x * loss / mu.kwh, currency) for rate, x in mu.excl_by_rate().items()}
        key = f"line_loss:{master.id}"
        kwh_left, minor_left, before = left(key, loss, minor)
        tenants_under = {m.tenant_id for m in subs if m.tenant_id is not None}
        month.pools.append(_Pool("line_loss", key, Method.CONSUMPTION, kwh_left, minor_left, {
            **facts, "pool_kwh": str(loss), "pool_amount": sum(minor.values()),
            "average_price": str(sum(mu.excl_by_rate().values()) / mu.kwh), "billed_before": before,
        }, tenants=tenants_under))
    return month


def _consumption(month: _Month, tenant: Tenant) -> Decimal:
    return sum((u.kwh for _m, u in month.own[tenant.id]), Decimal(0))


def _basis_text(method: Method, tenant: Tenant, month: _Month) -> str:
    if method is Method.CONSUMPTION:
        return str(_consumption(month, tenant))
    if method is Method.AREA:
        return str(tenant.leased_area_m2)
    if method is Method.CUSTOM:
        return str(tenant.custom_share) if tenant.custom_share is not None else ""
    return "1"


@dataclass
class Draft:
    """A computed bill: lines, VAT, shares, and why it cannot be issued (if so)."""

    lines: list[dict]
    vat: list[VatGroup]
    shares: list[dict]
    meters: list[dict]
    problems: list[str]
    waiting: list[str]

    @property
    def net_minor(self) -> int:
        return sum(v.net_minor for v in self.vat)

    @property
    def vat_minor(self) -> int:
        return sum(v.vat_minor for v in self.vat)

    @property
    def total_minor(self) -> int:
        return self.net_minor + self.vat_minor


def _line(kind: str, quantity, unit, unit_price, vat_rate, net: int, note: str | None = None, **extra) -> dict:
    return {**Line(kind, None if quantity is None else Decimal(quantity), unit,
                   None if unit_price is None else Decimal(unit_price), vat_rate, net, note).as_json(), **extra}


def _vat_of(lines: Iterable[dict]) -> list[VatGroup]:
    net_by_rate: dict[Decimal, int] = defaultdict(int)
    for ln in lines:
        net_by_rate[Decimal(ln["vat_rate"])] += int(ln["net"])
    out = [VatGroup(rate, net, int((Decimal(net) * rate / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP)))
           for rate, net in net_by_rate.items()]
    return sorted(out, key=lambda v: -(v.rate or 0))


def _fraction_of_month(month: _Month, tenant: Tenant) -> Decimal:
    """The part of the month the tenant held the lease (fees and non-consumption weights are prorated by it)."""
    lo, hi = _lease(tenant, month.start, month.end)
    if (lo, hi) == (month.start, month.end):
        return Decimal(1)
    return Decimal(max(int((hi - lo).total_seconds()), 0)) / Decimal(int((month.end - month.start).total_seconds()))


def _compute(month: _Month, tenant: Tenant) -> Draft:
    cur = month.currency
    lines: list[dict] = []
    problems = list(month.problems)
    meters_facts = []
    for m, u in month.own[tenant.id]:
        meters_facts.append({"meter_code": m.meter_code, "kwh": str(u.kwh), "max_kw": None if u.max_kw is None else str(u.max_kw)})
        if u.unpriced_kwh:
            problems.append(f"meter {m.meter_code} has no tariff")
        for (band, price, vat), (kwh, excl) in sorted(u.lines.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            lines.append(_line("energy", kwh, "kWh", price, vat, _money_minor(excl, cur), band, meter=m.meter_code))
        if u.demand is not None:
            max_kw, price, excl = u.demand
            lines.append(_line("demand", max_kw, "kW", price, u.demand_vat, _money_minor(excl, cur), None, meter=m.meter_code))
    shares: list[dict] = []
    for pool in month.pools:
        sharers = [t for t in month.participants if pool.tenants is None or t.id in pool.tenants]
        if tenant not in sharers:
            continue
        try:
            bases = [Basis(key=t.id, consumption_kwh=_consumption(month, t), area_m2=Decimal(t.leased_area_m2 or 0),
                           custom_share=t.custom_share, presence=_fraction_of_month(month, t)) for t in sharers]
            i = sharers.index(tenant)
            share_kwh = allocate_shares(pool.kwh, pool.method, bases)[i]
            amounts = {rate: allocate_shares(minor, pool.method, bases)[i] for rate, minor in sorted(pool.minor_by_rate.items())}
        except AllocationError as e:
            problems.append(f"{pool.kind}: {e}")
            continue
        basis_total = {Method.CONSUMPTION: str(sum((_consumption(month, t) for t in sharers), Decimal(0))),
                       Method.AREA: str(sum((Decimal(t.leased_area_m2 or 0) for t in sharers), Decimal(0))),
                       Method.EQUAL: str(len(sharers)),
                       Method.CUSTOM: str(sum((t.custom_share or Decimal(0) for t in sharers), Decimal(0)))}[pool.method]
        for rate, amount in amounts.items():
            lines.append(_line(pool.kind, share_kwh, "kWh", None, rate, amount, pool.method.value))
            shares.append({"kind": pool.kind, "pool": pool.key, "method": pool.method.value, "basis": basis_total,
                           "tenant_basis": _basis_text(pool.method, tenant, month), "tenants": len(sharers),
                           "share_kwh": str(share_kwh), "amount": amount, "vat_rate": str(rate),
                           "shared_kwh": str(pool.kwh), "shared_amount": pool.minor_by_rate[rate], **pool.facts})
    try:
        fees = fixed_fees(month.billing)
    except BillError as e:
        problems.append(str(e))
        fees = []
    part = _fraction_of_month(month, tenant)
    for fee in fees:
        amount = fee["amount_minor"] if part == 1 else int((fee["amount_minor"] * part).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        if amount:
            lines.append(_line("fee", 1 if part == 1 else part.quantize(Decimal("0.0001")), "month",
                               Money(fee["amount_minor"], cur).to_decimal(), fee["vat"], amount, fee["name"]))
    return Draft(lines, _vat_of(lines), shares, meters_facts, problems, list(month.waiting))


# --------------------------------------------------------------------------- generating and issuing


def _owner(tenant: Tenant) -> str:
    return f"user:{tenant.user_id}" if tenant.user_id else f"tenant:{tenant.id}"


def generate_bills(s: Session, site: Site, period: str, now: dt.datetime, *, tenant: Tenant | None = None) -> list[Bill]:
    """Compute (and issue when nothing is in the way) the bills of ``site``'s post-paid tenants for ``period``.

    Idempotent: issued, paid and void bills are left alone; draft and review
    ones are computed again. ``tenant`` computes that tenant's bill only (a
    closed account's final bill, which then waits for the month's end like
    the others). Returns the bills created or recomputed.
    """
    existing = {b.tenant_id: b for b in s.scalars(select(Bill).join(Tenant, Tenant.id == Bill.tenant_id)
                                                  .where(Tenant.site_id == site.id, Bill.period == period))}
    done = {tid for tid, b in existing.items() if b.state in FINAL}
    if tenant is not None and tenant.id in done:
        return [existing[tenant.id]]
    known = {tid: {m["meter_code"] for m in bill_facts(b).get("meters", [])} for tid, b in existing.items()}
    month = _build_month(s, site, period, exclude=done, known=known)
    targets = [t for t in month.participants if tenant is None or t.id == tenant.id]
    out = []
    for t in targets:
        draft = _compute(month, t)
        bill = existing.get(t.id)
        if bill is None:
            bill = Bill(tenant_id=t.id, period=period, currency=month.currency, state=BillState.DRAFT)
            try:
                with s.begin_nested():
                    s.add(bill)
            except IntegrityError:
                continue  # another worker made it meanwhile (it holds the building lock now): its run decides
        _apply(s, bill, t, month, draft, now, final=t.closed_at is not None and t.closed_at <= month.end)
        out.append(bill)
    s.flush()
    return out


def _apply(s: Session, bill: Bill, tenant: Tenant, month: _Month, draft: Draft, now: dt.datetime, *, final: bool) -> None:
    facts = {
        "period": month.period, "period_start": month.start.isoformat(), "period_end": month.end.isoformat(), "final": final,
        "tenant": {"id": tenant.id, "name": tenant.name, "unit": tenant.unit}, "site": month.site.name,
        "meters": draft.meters, "shares": [] if draft.problems else draft.shares,
    }
    if draft.waiting and now < month.end + READING_GRACE:
        # Readings still to come: whatever looks wrong now (a negative loss) may be the missing readings.
        bill.state = BillState.DRAFT
        bill.review_reason = ("waiting for the end-of-month reading of meter " + ", ".join(draft.waiting))[:200]
        bill.total_minor = bill.vat_minor = 0
        bill.lines_json = json.dumps({**facts, "shares": [], "lines": []})
        return
    if draft.problems or draft.waiting:
        problems = draft.problems + (["no reading at the end of the month for meter " + ", ".join(draft.waiting)] if draft.waiting else [])
        bill.state = BillState.REVIEW
        bill.review_reason = "; ".join(problems)[:200]
        bill.total_minor = bill.vat_minor = 0
        bill.lines_json = json.dumps({**facts, "shares": [], "lines": []})  # nothing of a wrong pool is allocated
        return
    tz = month.site.time_zone or "UTC"
    due = _local_date(now, tz) + dt.timedelta(days=month.billing.due_days)
    bill.review_reason = None
    bill.total_minor, bill.vat_minor = draft.total_minor, draft.vat_minor
    bill.lines_json = json.dumps({**facts, "lines": draft.lines})
    bill.due_date = due
    bill.issued_at = now
    bill.state = BillState.ISSUED
    s.flush()
    bill.document_id = _issue_document(s, bill, tenant, month, draft, facts, now).id
    from webapp.notifications.outbox import schedule

    if tenant.contact_email:
        schedule(s, to=tenant.contact_email, template="bill_issued", reference=f"bill:{bill.id}", key=f"bill:{bill.id}:issued")


def _buyer(s: Session, tenant: Tenant, site: Site) -> dict:
    from webapp.receipts.service import buyer_of

    buyer = {"email": tenant.contact_email, "company_name": tenant.name,
             "address": ", ".join(x for x in (tenant.unit, site.address) if x)}
    given = buyer_of(s, user_id=tenant.user_id, email=tenant.contact_email)
    buyer.update({k: v for k, v in given.items() if v})
    return buyer


def _locale(s: Session, tenant: Tenant) -> str | None:
    user = s.get(User, tenant.user_id) if tenant.user_id else None
    return user.locale if user else None


def _issue_document(s: Session, bill: Bill, tenant: Tenant, month: _Month, draft: Draft, facts: dict, now: dt.datetime) -> Document:
    from webapp.receipts.service import branding_of, seller_of

    op = month.site.operator
    tz = month.site.time_zone or "UTC"
    content = {
        "seller": seller_of(op), "buyer": _buyer(s, tenant, month.site), "lines": draft.lines, "payment": {},
        "branding": branding_of(op), "time_zone": tz,
        "bill": {**facts, "id": bill.id, "due_date": bill.due_date.isoformat(), "pay_path": f"/bills/{bill.id}"},
    }
    return invoicing.issue(
        s, key=f"bill:{bill.id}:invoice", kind=DocumentKind.INVOICE, scope=f"operator:{op.id}", prefix=op.prefix, issued_at=now,
        year=_local_date(now, tz).year, currency=bill.currency, owner=_owner(tenant), user_id=tenant.user_id,
        email=tenant.contact_email or None, locale=_locale(s, tenant), source=f"bill:{bill.id}", vat=draft.vat, content=content,
    )


def bill_facts(bill: Bill) -> dict:
    """The bill's frozen facts: period, lines, meters, shares (see ``_apply``)."""
    data = json.loads(bill.lines_json or "{}")
    return data if isinstance(data, dict) else {"lines": data}


# --------------------------------------------------------------------------- prepaid consumption invoices


def prepaid_invoices(s: Session, site: Site, period: str, now: dt.datetime) -> list[Document]:
    """The month's consumption invoice of each prepaid tenant of ``site`` (idempotent by tenant and month)."""
    tz = site.time_zone or "UTC"
    start, end = period_bounds(period, tz)
    tenants = s.scalars(select(Tenant).where(Tenant.site_id == site.id, Tenant.billing == Billing.PREPAID).order_by(Tenant.id)).all()
    out = []
    for t in tenants:
        if not _eligible(t, start, end):
            continue
        doc = prepaid_invoice(s, t, site, period, start, end, now)
        if doc is not None:
            out.append(doc)
    return out


def prepaid_invoice(s: Session, tenant: Tenant, site: Site, period: str, start: dt.datetime, end: dt.datetime,
                    now: dt.datetime) -> Document | None:
    """One prepaid tenant's invoice of the intervals that ended in the month (None when nothing was debited)."""
    key = f"tenant:{tenant.id}:prepaid:{period}"
    existing = s.scalar(select(Document).where(Document.idempotency_key == key))
    if existing is not None:
        return existing
    meter_ids = [m.id for m in meters_of(tenant)]
    if not meter_ids:
        return None
    rows = s.scalars(select(MeterInterval).where(
        MeterInterval.meter_id.in_(meter_ids), MeterInterval.superseded.is_(False), MeterInterval.amount_minor > 0,
        MeterInterval.end_at > start, MeterInterval.end_at <= end,
    ).order_by(MeterInterval.meter_id, MeterInterval.start_at)).all()
    if not rows:
        return None
    cur = tenant.currency
    groups: dict[tuple, list] = {}  # (meter, band, unit price, vat) → [kWh, exact excl]
    net_by_rate: dict[Decimal, int] = defaultdict(int)
    gross_by_rate: dict[Decimal, int] = defaultdict(int)
    codes = {m.id: m.meter_code for m in meters_of(tenant)}
    for iv in rows:
        b = loads(iv.breakdown_json or "{}")
        vat = Decimal(str(b.get("vat", 0)))
        net = _money_minor(Decimal(str(b.get("excl", 0))), cur) if b.get("excl") is not None else iv.amount_minor
        net = min(net, iv.amount_minor)
        net_by_rate[vat] += net
        gross_by_rate[vat] += iv.amount_minor
        for band in b.get("bands") or [{"band": "energy", "kwh": iv.kwh, "unit_price": None, "excl": b.get("excl", 0)}]:
            g = groups.setdefault((codes[iv.meter_id], band.get("band"), band.get("unit_price"), vat), [Decimal(0), Decimal(0)])
            g[0] += Decimal(str(band.get("kwh", 0)))
            g[1] += Decimal(str(band.get("excl", 0)))
    vat_groups = sorted((VatGroup(r, net_by_rate[r], gross_by_rate[r] - net_by_rate[r]) for r in gross_by_rate),
                        key=lambda v: -(v.rate or 0))
    lines = []
    for rate in net_by_rate:
        keys = [k for k in sorted(groups, key=lambda k: (k[0], str(k[1]), str(k[2]))) if k[3] == rate]
        parts = invoicing.largest_remainder(net_by_rate[rate], [groups[k][1] for k in keys])  # the rate's net, by exact excl
        for k, part in zip(keys, parts, strict=True):
            lines.append(_line("energy", groups[k][0], "kWh", k[2], rate, part, k[1], meter=k[0]))
    from webapp.receipts.service import branding_of, seller_of

    op = site.operator
    tz = site.time_zone or "UTC"
    total = sum(gross_by_rate.values())
    content = {
        "seller": seller_of(op), "buyer": _buyer(s, tenant, site), "lines": lines,
        "payment": {"method": "meter_wallet", "brand": None, "last4": None, "held": total, "captured": total, "released": 0,
                    "currency": cur},
        "branding": branding_of(op), "time_zone": tz, "notes": ["prepaid_meter"],
        "prepaid": {"period": period, "period_start": start.isoformat(), "period_end": end.isoformat(),
                    "intervals": len(rows), "kwh": str(sum((Decimal(iv.kwh) for iv in rows), Decimal(0)))},
    }
    return invoicing.issue(
        s, key=key, kind=DocumentKind.INVOICE, scope=f"operator:{op.id}", prefix=op.prefix, issued_at=now,
        year=_local_date(now, tz).year, currency=cur, owner=_owner(tenant), user_id=tenant.user_id,
        email=tenant.contact_email or None, locale=_locale(s, tenant), source=key, vat=vat_groups, content=content,
    )


# --------------------------------------------------------------------------- paying


def locked_bill(s: Session, bill_id: int) -> Bill | None:
    """The bill row, locked until the transaction ends."""
    return s.scalar(select(Bill).where(Bill.id == bill_id).with_for_update().execution_options(populate_existing=True))


def tenant_of_user(s: Session, bill: Bill, user: User) -> Tenant | None:
    """The bill's tenant when ``user`` is its account, else None (a bill of someone else)."""
    tenant = s.get(Tenant, bill.tenant_id)
    return tenant if tenant is not None and tenant.user_id is not None and tenant.user_id == user.id else None


def _payable(bill: Bill) -> None:
    if bill.state is BillState.PAID:
        raise BillError("this bill is paid", "already_paid")
    if bill.state not in PAYABLE or bill.total_minor <= 0:
        raise BillError("this bill cannot be paid", "not_payable")


def _book_revenue(s: Session, bill: Bill, debit, amount: Money, *, key: str, description: str) -> None:
    vat = bill.vat_minor if amount.amount == bill.total_minor else int(
        (Decimal(bill.vat_minor) * amount.amount / bill.total_minor).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    postings = [(debit, amount)]
    if amount.amount - vat:
        postings.append((get_account(s, AccountKind.REVENUE, amount.currency), -Money(amount.amount - vat, amount.currency)))
    if vat:
        postings.append((get_account(s, AccountKind.VAT_PAYABLE, amount.currency), -Money(vat, amount.currency)))
    post(s, idempotency_key=key, description=description, reference=f"bill:{bill.id}", postings=postings)


def pay_from_wallet(s: Session, bill_id: int, user: User, now: dt.datetime) -> Bill:
    """Pay an issued bill from the customer wallet, once (raises BillError, or InsufficientFunds)."""
    bill = locked_bill(s, bill_id)
    if bill is None or tenant_of_user(s, bill, user) is None:
        raise BillError("no such bill", "not_found")
    _payable(bill)
    account = wallet_mod.wallet(s, user.owner, bill.currency)
    _book_revenue(s, bill, account, Money(bill.total_minor, bill.currency), key=f"bill:{bill.id}:wallet",
                  description="Bill paid from wallet")
    bill.state = BillState.PAID
    bill.paid_at = now
    s.flush()
    return bill


def start_card_payment(s: Session, provider, bill_id: int, user: User, payment_method_id: str) -> CardPayment:
    """Record a card payment of an issued bill (the caller commits, then ``cards.submit``); refuses a second attempt in flight."""
    bill = locked_bill(s, bill_id)
    if bill is None or tenant_of_user(s, bill, user) is None:
        raise BillError("no such bill", "not_found")
    _payable(bill)
    if bill.card_payment_id is not None:
        current = s.get(CardPayment, bill.card_payment_id)
        if current is not None and current.state in (State.CREATED, State.REQUIRES_ACTION, State.PROCESSING) \
                and current.created_at > utcnow() - dt.timedelta(minutes=15):
            raise BillError("a payment of this bill is in progress", "payment_in_progress")
    customer_id = wallet_mod.customer_id(s, provider, owner=user.owner, email=user.email)
    row = cards.create(s, purpose=Purpose.BILL, reference=f"bill:{bill.id}", owner=user.owner, email=user.email,
                       amount=Money(bill.total_minor, bill.currency), manual_capture=False,
                       payment_method_id=payment_method_id, customer_id=customer_id)
    bill.card_payment_id = row.id
    s.flush()
    return row


@cards.on_succeeded(Purpose.BILL)
def _bill_card_captured(s: Session, row: CardPayment) -> None:
    """A bill's card payment captured: clearing → revenue + VAT, the bill paid; once per payment."""
    bill = locked_bill(s, int(row.reference.split(":", 1)[1]))
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, row.currency)
    if bill is None or bill.state is not BillState.ISSUED:
        # Paid meanwhile by another payment (a second tab, the wallet): the money is the payer's, in their
        # wallet, never revenue twice.
        post(s, idempotency_key=row.key("revenue"), description="Bill overpayment to wallet", reference=row.reference,
             postings=[(clearing, row.captured), (wallet_mod.wallet(s, row.owner, row.currency), -row.captured)])
        return
    _book_revenue(s, bill, clearing, row.captured, key=row.key("revenue"), description="Bill paid by card")
    bill.state = BillState.PAID
    bill.paid_at = utcnow()
    bill.card_payment_id = row.id
    s.flush()


def bill_payment(s: Session, bill: Bill) -> CardPayment | None:
    """The card payment that paid the bill (or the latest attempt)."""
    return s.get(CardPayment, bill.card_payment_id) if bill.card_payment_id else None


# --------------------------------------------------------------------------- reminders


def send_reminders(s: Session, now: dt.datetime) -> int:
    """Schedule the overdue reminders due now (module docstring); returns how many. Caller commits."""
    from webapp.notifications.outbox import schedule

    rows = s.execute(select(Bill, Tenant, Site, BuildingBilling)
                     .join(Tenant, Tenant.id == Bill.tenant_id).join(Site, Site.id == Tenant.site_id)
                     .outerjoin(BuildingBilling, BuildingBilling.site_id == Site.id)
                     .where(Bill.state == BillState.ISSUED, Bill.due_date.is_not(None), Bill.reminders_sent < MAX_REMINDERS)
                     .order_by(Bill.id)).all()
    sent = 0
    for bill, tenant, site, billing in rows:
        every = max(int(billing.reminder_days if billing else 7), 1)
        overdue = (_local_date(now, site.time_zone) - bill.due_date).days
        n = min(overdue // every, MAX_REMINDERS) if overdue > 0 else 0
        if n <= bill.reminders_sent or not tenant.contact_email:
            continue
        if schedule(s, to=tenant.contact_email, template="bill_reminder", reference=f"bill:{bill.id}",
                    key=f"bill:{bill.id}:reminder:{n}") is not None:
            sent += 1
        bill.reminders_sent = n
        bill.last_reminder_at = now
    s.flush()
    return sent


# --------------------------------------------------------------------------- jobs


def buildings_with_tenants(s: Session) -> list[int]:
    """Ids of the sites that have tenants."""
    return list(s.scalars(select(Tenant.site_id).distinct().order_by(Tenant.site_id)))


def run_monthly(now: dt.datetime | None = None) -> dict[str, int]:
    """For each building: the bills and prepaid invoices of the previous local month, plus draft/review bills again; one transaction per building."""
    from webapp.db import session_factory

    now = now or utcnow()
    factory = session_factory()
    with factory() as s:
        site_ids = buildings_with_tenants(s)
        pending = s.execute(select(Tenant.site_id, Bill.period).join(Tenant, Tenant.id == Bill.tenant_id)
                            .where(Bill.state.in_([BillState.DRAFT, BillState.REVIEW])).distinct()).all()
    counts = {"bills": 0, "prepaid_invoices": 0}
    todo: set[tuple[int, str | None]] = {(sid, None) for sid in site_ids} | {(sid, p) for sid, p in pending}
    for site_id, period in sorted(todo, key=lambda x: (x[0], x[1] or "")):
        try:
            with factory.begin() as s:
                site = s.get(Site, site_id)
                p = period or previous_period(now, site.time_zone or "UTC")
                if p >= period_of(now, site.time_zone or "UTC"):
                    continue  # the month is not over
                counts["bills"] += len(generate_bills(s, site, p, now))
                if period is None:
                    counts["prepaid_invoices"] += len(prepaid_invoices(s, site, p, now))
        except Exception:  # one building's failure must not hold up the others; the next run tries again
            log.exception("monthly bills failed", extra={"site": site_id, "period": period})
    return counts


def run_reminders(now: dt.datetime | None = None) -> int:
    """Send the overdue reminders due now, in one transaction."""
    from webapp.db import session_factory

    with session_factory().begin() as s:
        return send_reminders(s, now or utcnow())


@periodic_task(crontab(minute="7"))
def monthly_bills_job() -> None:
    """Every hour: each building whose local month has turned gets its bills (idempotent; catches up after downtime)."""
    run_monthly()


@periodic_task(crontab(hour="8", minute="15"))
def bill_reminders_job() -> None:
    """Every day: overdue reminders."""
    run_reminders()


__all__ = [
    "BillError", "Draft", "Usage", "bill_facts", "bill_payment", "generate_bills", "locked_bill", "meter_usage", "pay_from_wallet",
    "period_bounds", "period_of", "prepaid_invoice", "prepaid_invoices", "previous_period", "run_monthly", "run_reminders",
    "send_reminders", "start_card_payment", "tenant_of_user",
]
