"""Tenant pages: the page behind a meter's QR code (``/m/<meter_code>``), meter top-ups, and the account's meters.

Views stay thin: they read the form, call ``webapp.meters.topup`` (and
``payments``) with the request's session and the provider, commit, and
redirect (post/redirect/get). The card element, saved cards and 3-D Secure
are the shared card flow's (``webapp/cardflow.py``, ``templates/_card_flow.html``,
``static/js/cardflow.js``).

Who sees what on ``/m/<code>`` (anyone may scan or type a code, and codes
are short, so they can be guessed):

* **Anyone** (a stranger, a relative paying the meter, a signed-in account
  that is not the tenant): the meter code, the building (name and address)
  and the unit, so a payer can check it is the right meter; the price in
  force now and the next window; and the top-up form. Nothing else: no
  balance, no readings, no usage, no relay state (a cut meter says the
  tenant has not paid), no serial, no tenant name, no history.
* **The tenant's signed-in account**: also the serial, the balance (prepaid)
  or this month's usage and open bills (post-paid), the last reading and
  its time (in the building's time zone), the estimated days of credit
  left, the relay state, and the usage per day for the last 30 days.

The account area (``/account/meters``) lists only the account's own meters;
another tenant's meter is 404 there, like one that does not exist.

Guests pay in two steps: the amount and an email for the receipt first
(checked before any card is typed), then the card element on a second page.
The guest's card is saved to a payment-provider customer of this browser
(``meter_guest_customer`` in the Flask session); the browser remembers
which guest top-ups it made, so their result pages open only there.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_decimal
from flask import Blueprint, abort, current_app, flash, jsonify, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from sqlalchemy import select

from payments import ledger
from payments import wallet as wallet_mod
from payments.cards import CardPayment, Purpose, State
from payments.metering import MeterTariffError, band_at, compile_tariff, next_change
from payments.money import Money, MoneyError, check_currency
from payments.money import format as format_money
from payments.money import parse as parse_money
from payments.providers.base import Card, ProviderError
from payments.tariff_store import loads
from webapp import cardflow
from webapp.auth.forms import normalize_email
from webapp.db import db_session, utcnow
from webapp.errors import problem_response
from webapp.extensions import limiter
from webapp.meters import topup
from webapp.meters.models import Bill, BillState, Billing, MeterInterval, MeterReading, MeterTariffVersion, Tenant
from webapp.models import Meter
from webapp.pricing import unit_amount

log = logging.getLogger("voltpay.meters")

bp = Blueprint("meters", __name__)

CODE = re.compile(r"[A-Za-z0-9_-]{1,16}")
GUEST_CUSTOMER = "meter_guest_customer"  # Flask session: this browser's guest customer at the payment provider
GUEST_TOP_UPS = "meter_guest_top_ups"  # Flask session: ids of the guest top-ups made in this browser
MAX_REMEMBERED = 20
TOP_UP_LIMIT = "30 per hour"  # per address: card-testing fraud tries many cards quickly
GUEST_CARD_LIMIT = "20 per hour"
CHART_DAYS = 30
ESTIMATE_DAYS = 14  # days-left estimate: the average daily cost of this many days
HISTORY_PAGE = 20
INTERVALS_SHOWN = 50

# The ledger stores English descriptions; people read them in their language.
ENTRY_LABELS = {
    topup.DESCRIPTION_CARD: _l("Top-up by card"),
    topup.DESCRIPTION_WALLET: _l("Top-up from a Voltpay wallet"),
    "Meter top-up refund": _l("Refund to the card"),
    "Meter top-up refunded": _l("Refunded to the card"),
    "Meter top-up refund failed": _l("Refund to the card failed: money back on the meter"),
    "Electricity consumption": _l("Electricity used"),
    "Electricity consumption corrected (late reading)": _l("Electricity used, corrected by a late reading"),
    "Meter balance owed by bank transfer": _l("Balance to be paid back by bank transfer"),
}
BAND_LABELS = {
    "peak": _l("Peak"), "flat": _l("Standard"), "valley": _l("Off-peak"),
}
RELAY = {  # Meter.relay_state → (key, what the tenant reads)
    "connected": ("on", _l("Power on")),
    "disconnecting": ("cut", _l("Power cut: top up to restore")),
    "disconnected": ("cut", _l("Power cut: top up to restore")),
    "reconnecting": ("reconnecting", _l("Reconnecting")),
}


# -- helpers ---------------------------------------------------------------------------------------


def _locale() -> str:
    return str(get_locale() or "en")


def _user():
    """The signed-in account, or None for a guest."""
    return current_user if current_user.is_authenticated else None


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def find_meter(typed: str) -> Meter | None:
    """The meter with this code (as printed, any case), or None."""
    code = (typed or "").strip()
    if not CODE.fullmatch(code):
        return None
    s = db_session()
    meter = s.scalar(select(Meter).where(Meter.meter_code == code))
    if meter is None and code != code.upper():
        meter = s.scalar(select(Meter).where(Meter.meter_code == code.upper()))
    return meter


def money_text(money: Money) -> str:
    """An amount for the request's language."""
    return format_money(money, _locale())


def kwh_text(kwh: Decimal, places: str = "#,##0.0") -> str:
    """kWh for the request's language ("12.3 kWh")."""
    return _("%(kwh)s kWh", kwh=format_decimal(kwh, format=places, locale=_locale()))


def local_text(value: dt.datetime | None, tz: ZoneInfo, fmt: str = "medium") -> str:
    """A UTC instant in the building's time zone, for the request's language."""
    if value is None:
        return ""
    if fmt == "clock":
        return format_time(value, "short", tzinfo=tz, locale=_locale())
    return format_datetime(value, fmt, tzinfo=tz, locale=_locale())


def price_text(price_incl: Decimal, currency: str) -> str:
    """A unit price incl. VAT per kWh ("€0.3025/kWh"), to at most 4 decimals."""
    return _("%(price)s/kWh", price=unit_amount(price_incl.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP), currency, _locale()))


def band_text(band: str) -> str:
    """The band's name as a tenant reads it ("Peak", "Tier 2")."""
    if band.startswith("tier") and band[4:].isdigit():
        return _("Tier %(number)s", number=band[4:])
    label = BAND_LABELS.get(band)
    return str(label) if label is not None else band


@bp.app_template_filter("meter_money")
def meter_money_filter(minor, currency: str) -> str:
    """``{{ amount_minor|meter_money(currency) }}``: minor units as money for the page's language."""
    return money_text(Money(int(minor), currency))


@bp.app_template_filter("date_text")
def date_text_filter(day: dt.date) -> str:
    """``{{ day|date_text }}``: a calendar date for the page's language."""
    return format_date(day, "medium", locale=_locale())


def _json_problem(status: int, code: str, detail: str):
    return problem_response(status, code, detail)


# -- what the meter shows ------------------------------------------------------------------------


def tariff_in_force(meter: Meter, at: dt.datetime):
    """The meter's tariff version in force at ``at`` and its compiled form, or (None, None)."""
    if meter.tariff_id is None:
        return None, None
    v = db_session().scalar(
        select(MeterTariffVersion)
        .where(MeterTariffVersion.tariff_id == meter.tariff_id, MeterTariffVersion.effective_from <= at)
        .order_by(MeterTariffVersion.effective_from.desc())
        .limit(1)
    )
    if v is None:
        return None, None
    try:
        return v, compile_tariff(loads(v.tariff_json))
    except (MeterTariffError, ValueError):
        log.warning("meter tariff version %s does not compile", v.id, exc_info=True)
        return v, None


@dataclass
class PriceWindow:
    """A price band in force from ``start`` (None: now) until ``end`` (None: no change known)."""

    band: str
    price_incl: Decimal  # per kWh, incl. VAT, exact
    vat: Decimal
    currency: str
    start: dt.datetime | None = None
    end: dt.datetime | None = None


def prices_now_next(meter: Meter, now: dt.datetime, month_kwh: Decimal) -> tuple[PriceWindow | None, PriceWindow | None, str | None]:
    """The price in force now, the next window (time-of-use), and the tariff kind; Nones when the meter has no price."""
    _version, t = tariff_in_force(meter, now)
    if t is None:
        return None, None, None
    tz = meter.site.time_zone or "UTC"
    band, price, vat = band_at(t, now, tz, month_kwh=month_kwh)
    change = next_change(t, now, tz)
    current = PriceWindow(band, price * t.vat_factor, vat, t.currency, None, change)
    nxt = None
    if change is not None:
        band2, price2, vat2 = band_at(t, change, tz, month_kwh=month_kwh)
        nxt = PriceWindow(band2, price2 * t.vat_factor, vat2, t.currency, change, next_change(t, change, tz))
    return current, nxt, t.kind


@dataclass
class Usage:
    """Consumption of a meter over the last days: per local day, and the cost rate for the estimate."""

    days: list[tuple[dt.date, Decimal, int]]  # oldest first: (local date, kWh, amount minor)
    month_kwh: Decimal
    month_amount_minor: int
    daily_cost_minor: Decimal | None  # average of the last ESTIMATE_DAYS days (None: not enough data)
    covered_days: Decimal


def _split_by_day(start: dt.datetime, end: dt.datetime, tz: ZoneInfo) -> list[tuple[dt.date, Decimal]]:
    """The local days an interval touches and the share of its duration in each (in proportion to real time)."""
    total = (end - start).total_seconds()
    if total <= 0:
        return [(end.astimezone(tz).date(), Decimal(1))]
    out = []
    cur = start
    while cur < end:
        local = cur.astimezone(tz)
        next_midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tzinfo=tz).astimezone(dt.UTC)
        piece_end = min(end, next_midnight)
        out.append((local.date(), Decimal(str((piece_end - cur).total_seconds())) / Decimal(str(total))))
        cur = piece_end
    return out


def usage_of(meter: Meter, now: dt.datetime) -> Usage:
    """Usage per local day for the last CHART_DAYS days, this month's total, and the average daily cost of the last ESTIMATE_DAYS.

    An interval's kWh and cost are spread over the days it spans in
    proportion to time (consumption at a constant rate, as billing assumes).
    """
    tz = _zone(meter.site.time_zone)
    today = now.astimezone(tz).date()
    first_day = today - dt.timedelta(days=CHART_DAYS - 1)
    month_first = today.replace(day=1)
    since_local = min(first_day, month_first)
    since = dt.datetime.combine(since_local, dt.time(), tzinfo=tz).astimezone(dt.UTC)
    rows = db_session().execute(
        select(MeterInterval.start_at, MeterInterval.end_at, MeterInterval.kwh, MeterInterval.amount_minor)
        .where(MeterInterval.meter_id == meter.id, MeterInterval.superseded.is_(False), MeterInterval.end_at > since,
               MeterInterval.start_at < now)
        .order_by(MeterInterval.start_at)
    ).all()
    per_day: dict[dt.date, list[Decimal]] = {}
    est_from = now - dt.timedelta(days=ESTIMATE_DAYS)
    est_cost = Decimal(0)
    first_start = None
    last_end = None
    for start, end, kwh, amount in rows:
        for day, share in _split_by_day(start, end, tz):
            acc = per_day.setdefault(day, [Decimal(0), Decimal(0)])
            acc[0] += Decimal(kwh) * share
            acc[1] += Decimal(amount) * share
        # The estimate: the cost of the part of each interval inside the last ESTIMATE_DAYS days.
        lo, hi = max(start, est_from), min(end, now)
        if hi > lo and end > start:
            est_cost += Decimal(amount) * Decimal(str((hi - lo).total_seconds())) / Decimal(str((end - start).total_seconds()))
            first_start = lo if first_start is None or lo < first_start else first_start
            last_end = hi if last_end is None or hi > last_end else last_end
    days = []
    for i in range(CHART_DAYS):
        day = first_day + dt.timedelta(days=i)
        kwh, amount = per_day.get(day, [Decimal(0), Decimal(0)])
        days.append((day, kwh, int(amount.to_integral_value(ROUND_HALF_UP))))
    month = [v for d, v in per_day.items() if d >= month_first]
    covered = Decimal(str((last_end - first_start).total_seconds())) / 86400 if first_start and last_end else Decimal(0)
    daily = est_cost / covered if covered >= 1 and est_cost > 0 else None
    return Usage(days=days, month_kwh=sum((v[0] for v in month), Decimal(0)),
                 month_amount_minor=int(sum((v[1] for v in month), Decimal(0)).to_integral_value(ROUND_HALF_UP)),
                 daily_cost_minor=daily, covered_days=covered)


def days_left(balance: Money, usage: Usage) -> int | None:
    """Whole days the balance lasts at the recent average daily cost (None: no estimate)."""
    if usage.daily_cost_minor is None:
        return None
    if balance.amount <= 0:
        return 0
    return int(Decimal(balance.amount) / usage.daily_cost_minor)


def relay_view(meter: Meter) -> tuple[str, str]:
    """The relay as the tenant reads it: (key, text)."""
    from webapp.meters import relay

    state = relay.relay_status(meter, db_session())["state"] or "connected"
    key, text = RELAY.get(state, RELAY["connected"])
    return key, str(text)


def last_reading(meter: Meter) -> MeterReading | None:
    """The meter's newest reading."""
    return db_session().scalar(select(MeterReading).where(MeterReading.meter_id == meter.id).order_by(MeterReading.at.desc()).limit(1))


def open_bills(tenant: Tenant) -> list[Bill]:
    """A post-paid tenant's issued, unpaid bills, oldest first."""
    return list(db_session().scalars(select(Bill).where(Bill.tenant_id == tenant.id, Bill.state == BillState.ISSUED).order_by(Bill.period)))


def bills_url(meter_code: str) -> str | None:
    """The bills page of a meter, when the bills area is installed (another part of the app builds it)."""
    for rule in current_app.url_map.iter_rules():
        if rule.rule == "/account/meters/<meter_code>/bills" and "GET" in (rule.methods or ()):
            return url_for(rule.endpoint, meter_code=meter_code)
    return None


def chart(days: list[tuple[dt.date, Decimal, int]], currency: str) -> dict:
    """A server-drawn bar chart of kWh per day (SVG coordinates computed here; the template only places them)."""
    width, height, top = 300, 100, 12  # viewBox units; bars grow up from y = top + height
    step = width / len(days)
    peak = max((kwh for _d, kwh, _a in days), default=Decimal(0))
    bars = []
    for i, (day, kwh, amount) in enumerate(days):
        h = float(kwh / peak * height) if peak > 0 else 0.0
        if kwh > 0:
            h = max(h, 1.0)  # a small day is still visible
        label = format_date(day, "medium", locale=_locale())
        bars.append({
            "x": round(i * step + step * 0.15, 2), "y": round(top + height - h, 2), "width": round(step * 0.7, 2), "height": round(h, 2),
            "date": label, "kwh": kwh_text(kwh, "#,##0.00"), "cost": money_text(Money(amount, currency)) if amount else "",
            "title": _("%(date)s: %(kwh)s", date=label, kwh=kwh_text(kwh, "#,##0.00")),
        })
    total = sum((kwh for _d, kwh, _a in days), Decimal(0))
    return {"bars": bars, "width": width, "height": height + top + 16, "baseline": top + height, "peak": kwh_text(peak, "#,##0.0"),
            "first": bars[0]["date"] if bars else "", "last": bars[-1]["date"] if bars else "", "total": kwh_text(total, "#,##0.0")}


@dataclass
class MeterStatus:
    """Everything the meter page and the API show, as values (the caller formats)."""

    meter: Meter
    tenant_view: bool
    price_now: PriceWindow | None
    price_next: PriceWindow | None
    tariff_kind: str | None
    can_top_up: str | None  # None when it can, else the refusal code
    currency: str
    balance: Money | None = None
    usage: Usage | None = None
    days_left: int | None = None
    reading: MeterReading | None = None
    relay: tuple[str, str] | None = None
    bills: list[Bill] = field(default_factory=list)


def meter_status(meter: Meter, user, now: dt.datetime) -> MeterStatus:
    """The meter as ``user`` may see it (see the module docstring: public fields, or the tenant's view)."""
    s = db_session()
    tenant_view = topup.is_tenant(meter, user)
    usage = usage_of(meter, now) if tenant_view else None
    # A stranger sees the first tier's price: the tier in force would tell how much the tenant used this month.
    month_kwh = usage.month_kwh if usage is not None else Decimal(0)
    now_w, next_w, kind = prices_now_next(meter, now, month_kwh)
    st = MeterStatus(meter=meter, tenant_view=tenant_view, price_now=now_w, price_next=next_w, tariff_kind=kind,
                     can_top_up=topup.refusal(meter), currency=topup.meter_currency(meter))
    if not tenant_view:
        return st
    st.usage = usage
    st.reading = last_reading(meter)
    st.relay = relay_view(meter)
    if meter.prepaid and meter.tenant.billing == Billing.PREPAID:
        st.balance = topup.meter_balance(s, meter)
        st.days_left = days_left(st.balance, usage) if usage is not None else None
    else:
        st.bills = open_bills(meter.tenant)
    return st


# -- the top-up form -----------------------------------------------------------------------------


def amount_message(code: str, params: dict, currency: str) -> str:
    """The message next to the amount field for a MoneyError or top-up error ``code``."""
    if code in ("wrong_currency", "currency_mismatch", "unknown_currency"):
        return _("This meter is topped up in %(currency)s. Reload the page and top up in %(currency)s.", currency=currency)
    return cardflow.amount_message(code, params, currency)


def refusal_message(code: str) -> str:
    """Why a meter takes no top-up, for the person holding the phone."""
    if code == "postpaid":
        return _("This meter is post-paid: it is billed monthly and cannot be topped up. The tenant pays the bills from their account.")
    if code == "no_tenant":
        return _("This meter has no tenant account at the moment, so it cannot be topped up. Please contact the building's manager.")
    return _("This meter is not a tenant's meter and cannot be topped up.")


def email_problem(email: str) -> str | None:
    """Why a guest's email cannot be used, or None."""
    return cardflow.email_problem(email, _("Enter your email address: we send the receipt there."))


@dataclass
class TopUpForm:
    """What the meter top-up form holds: a preset or a typed amount, how to pay, a guest's email, and a one-time nonce."""

    preset: str = ""
    amount: str = ""
    payment_method: str = ""  # "wallet", a saved card's pm id, "new" (a card just saved)
    new_payment_method_id: str = ""
    currency: str = ""
    email: str = ""
    nonce: str = ""  # makes a wallet-paid top-up happen once per form, whatever the double taps
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_request(cls) -> TopUpForm:
        """The posted form, each value cut to a sane length."""
        f = request.form
        nonce = f.get("nonce", "")[:64]
        return cls(
            preset=f.get("preset", "")[:20], amount=f.get("amount", "")[:40], payment_method=f.get("payment_method", "")[:255],
            new_payment_method_id=f.get("new_payment_method_id", "")[:255], currency=f.get("currency", "")[:8],
            email=normalize_email(f.get("email", ""))[:254], nonce=nonce if re.fullmatch(r"[A-Za-z0-9_-]{16,64}", nonce) else "",
        )

    def read_amount(self, meter: Meter, presets: list[Money]) -> Money | None:
        """The chosen amount, checked against the meter's currency and the limits; None with ``errors["amount"]`` set."""
        currency = topup.meter_currency(meter)
        try:
            chosen_currency = check_currency(self.currency or currency)
            if chosen_currency != currency:
                raise MoneyError("another currency", "wrong_currency")
            if self.preset and self.preset != "other":
                amount = next((p for p in presets if str(p.amount) == self.preset), None)
                if amount is None:
                    raise MoneyError("not one of the presets", "not_a_preset")
            else:
                amount = parse_money(self.amount, currency, _locale())
            topup.check_amount(meter, amount)
        except (MoneyError, topup.MeterTopUpError) as e:
            self.errors["amount"] = amount_message(e.code, getattr(e, "params", {}), currency)
            return None
        return amount


def _wallet_choice(meter: Meter) -> tuple[Money | None, str | None]:
    """The signed-in person's wallet balance and why it cannot pay this meter ("currency", "empty"), or (balance, None)."""
    user = _user()
    if user is None:
        return None, "guest"
    currency = topup.meter_currency(meter)
    if user.currency != currency:
        return None, "currency"
    balance = wallet_mod.wallet_balance(db_session(), user.owner, currency)
    return balance, ("empty" if balance.amount <= 0 else None)


def _meter_page(meter: Meter, form: TopUpForm | None = None, status: int = 200, notice: str | None = None):
    """The page behind the QR code with ``form`` as sent (errors next to the fields), or as first shown."""
    form = form or TopUpForm()
    if not form.nonce:
        form.nonce = secrets.token_urlsafe(18)
    now = utcnow()
    user = _user()
    provider = cardflow.payment_provider()
    st = meter_status(meter, user, now)
    tz = _zone(meter.site.time_zone)
    lo, hi, presets = wallet_mod.limits_for(st.currency).money(st.currency)
    saved = cardflow.saved_cards(provider, user.owner if user is not None else None, log, cardflow.CARDS_NOT_LOADED_OTHER_WAYS)
    wallet_balance, wallet_state = _wallet_choice(meter)
    if user is not None:
        fallback = saved.cards[0].id if saved.cards else ("new" if provider is not None else "wallet")
        form.payment_method = cardflow.preselected(form.payment_method, form.new_payment_method_id, saved, fallback, ("wallet", "new"))
    return render_template(
        "meters/meter.html",
        meter=meter,
        site=meter.site,
        tenant=meter.tenant,
        st=st,
        tz=tz,
        chart=chart(st.usage.days, st.currency) if st.tenant_view and st.usage is not None else None,
        relay=st.relay,
        form=form,
        user=user,
        minimum=lo,
        maximum=hi,
        presets=presets,
        saved_cards=saved.cards,
        wallet_balance=wallet_balance,
        wallet_state=wallet_state,
        provider=provider,
        notice=notice or saved.notice,
        refusal=refusal_message(st.can_top_up) if st.can_top_up else None,
        bills_url=bills_url(meter.meter_code) if st.tenant_view else None,
        local=lambda value, fmt="medium": local_text(value, tz, fmt),
        price_text=price_text,
        band_text=band_text,
        kwh_text=kwh_text,
        **cardflow.card_entry_context(provider),
    ), status


def _unknown_code(code: str | None, status: int = 404, empty: bool = False):
    """The page that helps someone type the meter's code again."""
    return render_template("meters/unknown.html", code=code, empty=empty), status


# -- routes: the QR page -------------------------------------------------------------------------


@bp.route("/m")
def find_meter_form():
    """Type the meter's code (``?code=`` goes to its page)."""
    if "code" not in request.args:
        return _unknown_code(None, 200)
    typed = request.args.get("code", "")[:64]
    code = re.sub(r"\s+", "", typed)
    if not code:
        return _unknown_code("", 400, empty=True)
    meter = find_meter(code)
    if meter is None:
        return _unknown_code(typed)
    return redirect(url_for("meters.meter_page", meter_code=meter.meter_code))


@bp.route("/m/<meter_code>")
def meter_page(meter_code: str):
    """The page behind the meter's QR code: the meter, its price, the top-up form (and, for its tenant, balance and usage)."""
    meter = find_meter(meter_code)
    if meter is None:
        return _unknown_code(meter_code[:64])
    if meter.meter_code != meter_code:
        return redirect(url_for("meters.meter_page", meter_code=meter.meter_code))
    return _meter_page(meter)


def _remember_guest_top_up(payment_id: int) -> None:
    ids = [i for i in session.get(GUEST_TOP_UPS, []) if isinstance(i, int) and i != payment_id]
    ids.append(payment_id)
    session[GUEST_TOP_UPS] = ids[-MAX_REMEMBERED:]


def _unavailable_notice() -> str:
    return _("We cannot reach our card processor right now, so nothing was charged. Please try again in a few minutes.")


@bp.route("/m/<meter_code>/top-ups", methods=["POST"])
@limiter.limit(TOP_UP_LIMIT)
def top_up(meter_code: str):
    """Validate the amount and the way to pay, then pay (wallet: at once; card: record, commit, charge, commit) and show the result."""
    meter = find_meter(meter_code)
    if meter is None:
        return _unknown_code(meter_code[:64])
    s = db_session()
    user = _user()
    provider = cardflow.payment_provider()
    form = TopUpForm.from_request()
    currency = topup.meter_currency(meter)
    refusal = topup.refusal(meter)
    if refusal is not None:
        return _meter_page(meter, form, 409)
    presets = wallet_mod.limits_for(currency).money(currency)[2]
    amount = form.read_amount(meter, presets)
    if user is None:
        problem = email_problem(form.email)
        if problem:
            form.errors["email"] = problem
    if amount is None or form.errors:
        return _meter_page(meter, form, 400)

    if user is not None and form.payment_method == "wallet":
        try:
            done = topup.top_up_from_wallet(s, meter=meter, user=user, amount=amount, key=f"form:{user.id}:{form.nonce}")
        except topup.MeterTopUpError as e:
            s.rollback()
            if e.code == "wallet_insufficient":
                form.errors["payment_method"] = _("Your wallet holds %(balance)s: choose a smaller amount, a card, or top up your wallet first.",
                                                  balance=money_text(e.params["balance"]))
            else:
                form.errors["payment_method"] = _("Your wallet is in %(wallet)s; this meter is paid in %(currency)s. Pay with a card.",
                                                  wallet=user.currency, currency=currency)
            return _meter_page(meter, form, 402 if e.code == "wallet_insufficient" else 400)
        s.commit()
        flash(_("%(amount)s was added to meter %(code)s from your wallet. Receipt %(number)s.", amount=money_text(done.amount),
                code=meter.meter_code, number=done.document.number), "success")
        return redirect(url_for("meters.meter_page", meter_code=meter.meter_code))

    if provider is None:
        return _meter_page(meter, form, 503, notice=_("Card payments are not available right now. Please try again later."))

    if user is None:
        customer_id = session.get(GUEST_CUSTOMER)
        if not form.new_payment_method_id:
            # Step 1 done: the amount and the email are right. Now the card (a page of its own).
            try:
                customer_id = provider.ensure_customer(email=form.email, existing_id=customer_id,
                                                       idempotency_key=f"meter-guest-customer:{secrets.token_hex(12)}")
            except ProviderError:
                log.warning("guest customer could not be created", exc_info=True)
                return _meter_page(meter, form, 503, notice=_unavailable_notice())
            session[GUEST_CUSTOMER] = customer_id
            return _card_step(meter, form, amount)
        if not customer_id:
            form.errors["payment_method"] = _("Your card could not be used. Please enter it again.")
            return _meter_page(meter, form, 400)
        try:
            card = next((c for c in provider.list_cards(customer_id=customer_id) if c.id == form.new_payment_method_id), None)
        except ProviderError:
            return _card_step(meter, form, amount, 503, notice=_unavailable_notice())
        if card is None:
            form.new_payment_method_id = ""
            form.errors["payment_method"] = _("Your card could not be used. Please enter it again.")
            return _card_step(meter, form, amount, 400)
        owner, email = topup.guest_owner(meter), form.email
    else:
        chosen = form.new_payment_method_id if form.payment_method == "new" else form.payment_method
        try:
            card, customer_id = cardflow.choose_saved_card(provider, user.owner, chosen, log)
        except cardflow.CardChoiceError as e:
            if e.status == 503:
                return _meter_page(meter, form, 503, notice=e.message)
            form.errors["payment_method"] = e.message
            return _meter_page(meter, form, 400)
        owner, email = user.owner, user.email

    row = topup.start_meter_top_up(s, meter=meter, owner=owner, email=email, amount=amount, payment_method_id=card.id,
                                   customer_id=customer_id)
    row.card_brand, row.card_last4 = card.brand, card.last4
    s.commit()  # our record exists before the provider hears of it (see payments/cards.py)
    if user is None:
        _remember_guest_top_up(row.id)
    cardflow.submit(s, provider, row, log, "meter top-up not completed")
    return redirect(url_for("meters.top_up_status", meter_code=meter.meter_code, payment_id=row.id))


def _card_step(meter: Meter, form: TopUpForm, amount: Money, status: int = 200, notice: str | None = None):
    """A guest's second step: the card element for the amount chosen."""
    return render_template(
        "meters/pay.html", meter=meter, site=meter.site, tenant=meter.tenant, form=form, amount=amount, notice=notice,
        **cardflow.card_entry_context(cardflow.payment_provider()),
    ), status


@bp.route("/m/<meter_code>/guest-card/setup", methods=["POST"])
@limiter.limit(GUEST_CARD_LIMIT)
def guest_card_setup(meter_code: str):
    """JSON for card.js: a SetupIntent for a guest's card (after step 1 made this browser's customer)."""
    if find_meter(meter_code) is None:
        return _json_problem(404, "meter_not_found", _("There is no meter with this code."))
    provider = cardflow.payment_provider()
    if provider is None:
        return cardflow.payments_unavailable()
    customer_id = session.get(GUEST_CUSTOMER)
    if not customer_id:
        return _json_problem(400, "email_first", _("Enter the amount and your email first."))
    try:
        setup = provider.start_card_setup(customer_id=customer_id, idempotency_key=f"meter-guest-setup:{secrets.token_hex(12)}")
    except ProviderError:
        log.warning("guest card setup could not start", exc_info=True)
        return _json_problem(503, "provider_unavailable", _unavailable_notice())
    return jsonify(setup_id=setup.id, client_secret=setup.client_secret)


@bp.route("/m/<meter_code>/guest-card/finish", methods=["POST"])
def guest_card_finish(meter_code: str):
    """JSON for card.js: after the browser confirmed the SetupIntent, the guest's card id."""
    provider = cardflow.payment_provider()
    if provider is None:
        return cardflow.payments_unavailable()
    setup_id = cardflow.posted_setup_id()
    customer_id = session.get(GUEST_CUSTOMER)
    if setup_id is None or not customer_id:
        return cardflow.invalid_setup()
    card = cardflow.finish_card_setup(provider, setup_id, customer_id, log, "guest card setup could not finish", _unavailable_notice())
    if not isinstance(card, Card):
        return card
    return jsonify(payment_method_id=card.id, brand=card.brand, last4=card.last4)


def _own_top_up(meter: Meter, payment_id: int) -> CardPayment:
    """A top-up of this meter made by this person (signed in) or in this browser (guest), else 404."""
    row = db_session().get(CardPayment, payment_id)
    if row is None or row.purpose != Purpose.METER_TOP_UP or row.reference != topup.meter_ref(meter):
        abort(404)
    user = _user()
    if user is not None and row.owner == user.owner:
        return row
    if row.owner == topup.guest_owner(meter) and payment_id in session.get(GUEST_TOP_UPS, []):
        return row
    abort(404)


@bp.route("/m/<meter_code>/top-ups/<int(max=2147483647):payment_id>")
def top_up_status(meter_code: str, payment_id: int):
    """The result of a card top-up: added, failed (and why), or waiting (3-D Secure runs here)."""
    meter = find_meter(meter_code)
    if meter is None:
        abort(404)
    row = _own_top_up(meter, payment_id)
    page = cardflow.result_context(row)
    s = db_session()
    user = _user()
    doc = topup.receipt_of(s, f"card_payment:{row.id}") if row.state == State.SUCCEEDED else None
    tenant_view = topup.is_tenant(meter, user)
    return render_template(
        "meters/top_up.html",
        meter=meter,
        balance=topup.meter_balance(s, meter) if tenant_view else None,
        receipt=doc if doc is not None and user is not None and doc.owner == user.owner else None,
        receipt_number=doc.number if doc is not None else None,
        local=lambda value, fmt="medium": local_text(value, _zone(meter.site.time_zone), fmt),
        **page,
    )


@bp.route("/m/<meter_code>/top-ups/<int(max=2147483647):payment_id>/confirm", methods=["POST"])
def confirm_top_up(meter_code: str, payment_id: int):
    """After 3-D Secure in the browser (or "check again"): ask the provider and record the answer (credited once)."""
    meter = find_meter(meter_code)
    if meter is None:
        abort(404)
    row = _own_top_up(meter, payment_id)
    return cardflow.confirm(row, url_for("meters.top_up_status", meter_code=meter.meter_code, payment_id=payment_id))


# -- routes: the account's meters ----------------------------------------------------------------


def _my_meters() -> list[Meter]:
    return list(db_session().scalars(
        select(Meter).join(Tenant, Tenant.id == Meter.tenant_id).where(Tenant.user_id == current_user.id).order_by(Meter.meter_code)
    ))


def _my_meter(meter_code: str) -> Meter:
    """One of the signed-in tenant's meters, else 404 (another tenant's meter is not found either)."""
    meter = find_meter(meter_code)
    if meter is None or not topup.is_tenant(meter, current_user):
        abort(404)
    return meter


@bp.route("/account/meters")
@login_required
def account_meters():
    """The account's meters: balance or this month's usage, relay state, links."""
    now = utcnow()
    items = [meter_status(m, current_user, now) for m in _my_meters()]
    return render_template("meters/account.html", items=items, kwh_text=kwh_text, relay_view=relay_view)


def _entry_label(description: str) -> str:
    label = ENTRY_LABELS.get(description)
    if label is not None:
        return str(label)
    return description


def _receipt_source(reference: str | None, entry_id: int) -> str:
    return reference if reference and reference.startswith("card_payment:") else f"journal_entry:{entry_id}"


@bp.route("/account/meters/<meter_code>")
@login_required
def account_meter(meter_code: str):
    """One of the account's meters: its money movements (top-ups, electricity used, refunds) with receipts, and priced intervals."""
    meter = _my_meter(meter_code)
    before = request.args.get("before")
    if before is not None and (not before.isdigit() or len(before) > 18):
        abort(400)
    s = db_session()
    tz = _zone(meter.site.time_zone)
    st = meter_status(meter, current_user, utcnow())
    entries, older = [], None
    if meter.prepaid:
        account = topup.meter_wallet(s, meter)
        rows = ledger.statement(s, account, limit=HISTORY_PAGE + 1, before_entry_id=int(before) if before else None)
        older = rows[HISTORY_PAGE - 1]["entry_id"] if len(rows) > HISTORY_PAGE else None
        for r in rows[:HISTORY_PAGE]:
            receipt = None
            if r["amount"].amount > 0:
                doc = topup.receipt_of(s, _receipt_source(r["reference"], r["entry_id"]))
                if doc is not None and doc.owner == current_user.owner:
                    receipt = doc.number
            entries.append({**r, "label": _entry_label(r["description"]), "receipt": receipt})
    intervals = list(s.scalars(
        select(MeterInterval).where(MeterInterval.meter_id == meter.id, MeterInterval.superseded.is_(False))
        .order_by(MeterInterval.start_at.desc()).limit(INTERVALS_SHOWN)
    ))
    priced = []
    for iv in intervals:
        try:
            breakdown = loads(iv.breakdown_json or "{}")
        except ValueError:
            breakdown = {}
        bands = breakdown.get("bands") if isinstance(breakdown, dict) else breakdown if isinstance(breakdown, list) else None
        parts = []
        for b in bands or []:
            if isinstance(b, dict) and "band" in b and "kwh" in b:
                parts.append(f"{band_text(str(b['band']))} {kwh_text(Decimal(str(b['kwh'])), '#,##0.00')}")
        priced.append({"start": local_text(iv.start_at, tz, "short"), "end": local_text(iv.end_at, tz, "short"),
                       "kwh": kwh_text(Decimal(iv.kwh), "#,##0.00"), "amount": Money(iv.amount_minor, iv.currency), "bands": ", ".join(parts)})
    return render_template("meters/account_meter.html", meter=meter, site=meter.site, st=st, entries=entries, older=older,
                           first_page=before is None, intervals=priced, bills_url=bills_url(meter.meter_code),
                           local=lambda value, fmt="medium": local_text(value, tz, fmt), kwh_text=kwh_text)
