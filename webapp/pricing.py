"""Prices in the user's language: a ``payments.price_display.PriceDisplay`` rendered as lines of text.

``render_prices(display, locale=None)`` gives ``{"locale", "lines", "notes"}``:
one line per price component (label, price incl. VAT per unit, when it applies,
and how it is billed), then notes on VAT and the session's minimum and
maximum price. Numbers and currency amounts are formatted by babel for the
locale (``€0.4235`` in en, ``0,4235 €`` in es), weekday names and times too
(``Monday–Friday, 6:00 PM–10:00 PM`` in en, ``lunes–viernes, 18:00–22:00`` in es);
every word goes through gettext. Templates use the ``price_table`` macro of
``templates/_price.html`` with the same data.

Unit prices are shown exactly, with at least the currency's decimals and at
most ``MAX_UNIT_DECIMALS`` (a longer one, such as a per-minute price of
5.00/h = 0.08333.../min, is rounded half up there for display only; the API
keeps the exact figure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, time
from decimal import ROUND_HALF_UP, Decimal

from babel.dates import format_date, format_time, get_day_names
from babel.lists import format_list
from babel.numbers import format_currency, format_decimal, format_percent
from flask_babel import force_locale, get_locale
from flask_babel import gettext as _
from flask_babel import ngettext

from payments.price_display import Conditions, DisplayComponent, PriceDisplay
from payments.tariffs import DAYS, ENERGY, FLAT, PARKING_TIME, TIME

MAX_UNIT_DECIMALS = 6


@dataclass(frozen=True)
class PriceLine:
    """One component as text: ``label`` ("Energy"), ``price`` ("€0.242 per kWh"), ``conditions``, ``billing``."""

    dimension: str
    label: str
    price: str
    conditions: str  # "" when it always applies
    billing: str  # "" when nothing to say (per Wh, per second)

    def as_json(self) -> dict:
        """The API's shape."""
        return asdict(self)


def _locale() -> str:
    return str(get_locale() or "en")


def unit_amount(value: Decimal, currency: str, locale: str | None = None) -> str:
    """A unit price with all its decimals (at least the currency's, at most ``MAX_UNIT_DECIMALS``): "€0.4235"."""
    quantum = Decimal(1).scaleb(-MAX_UNIT_DECIMALS)
    if value != value.quantize(quantum, rounding=ROUND_HALF_UP):
        value = value.quantize(quantum, rounding=ROUND_HALF_UP)
    return format_currency(value.normalize(), currency, locale=locale or _locale(), currency_digits=True, decimal_quantization=False)


def _number(value: Decimal, locale: str) -> str:
    return format_decimal(value.normalize(), locale=locale, decimal_quantization=False)


def _time(hhmm: str, locale: str) -> str:
    h, m = hhmm.split(":")
    return format_time(time(int(h), int(m)), format="short", locale=locale)


def _minutes(seconds: int, locale: str) -> str:
    return _number(Decimal(seconds) / 60, locale)


def _days(days: tuple[str, ...], locale: str) -> str:
    """ "Monday–Friday", "Saturday and Sunday", "Monday, Wednesday and Friday" in ``locale``."""
    names = get_day_names("wide", locale=locale)
    nums = sorted(DAYS.index(d) for d in days)
    runs: list[list[int]] = []
    for n in nums:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(_("%(first)s–%(last)s", first=names[run[0]], last=names[run[-1]]))
        else:
            parts.extend(names[n] for n in run)
    return format_list(parts, locale=locale)


def _join(parts: list[str]) -> str:
    """Conditions one after the other ("Monday–Friday, 18:00–22:00"), with the language's punctuation."""
    out = parts[0] if parts else ""
    for part in parts[1:]:
        # TRANSLATORS: joins two conditions of a price, e.g. "Monday–Friday" and "18:00–22:00".
        out = _("%(first)s, %(second)s", first=out, second=part)
    return out


def _time_window(c: Conditions, locale: str) -> str | None:
    start = _time(c.start_time, locale) if c.start_time else None
    end = _time(c.end_time, locale) if c.end_time else None
    if start and end:
        if not c.wraps_midnight:
            return _("%(start)s–%(end)s", start=start, end=end)
        if c.days is not None:
            # The engine judges each restriction at the instant: a weekday with 22:00-06:00 holds on that
            # weekday's early morning and its late evening, not on the next day's early morning.
            return _("until %(end)s and from %(start)s", start=start, end=end)
        return _("%(start)s–%(end)s (overnight)", start=start, end=end)
    if start:
        return _("from %(time)s", time=start)
    if end:
        return _("until %(time)s", time=end)
    return None


def conditions_text(c: Conditions, otherwise: bool, locale: str | None = None) -> str:
    """When a component applies, in words ("Monday–Friday, 18:00–22:00"); "" when always."""
    locale = locale or _locale()
    parts: list[str] = []
    if c.days is not None:
        parts.append(_days(c.days, locale))
    window = _time_window(c, locale)
    if window:
        parts.append(window)
    if c.start_date:
        parts.append(_("from %(date)s", date=format_date(date.fromisoformat(c.start_date), "medium", locale=locale)))
    if c.end_date:
        last = date.fromordinal(date.fromisoformat(c.end_date).toordinal() - 1)  # end_date is exclusive
        parts.append(_("until %(date)s", date=format_date(last, "medium", locale=locale)))
    if c.min_kwh is not None:
        parts.append(_("after the first %(kwh)s kWh", kwh=_number(c.min_kwh, locale)))
    if c.max_kwh is not None:
        parts.append(_("for the first %(kwh)s kWh", kwh=_number(c.max_kwh, locale)))
    if c.min_power_kw is not None:
        parts.append(_("at %(kw)s kW or more", kw=_number(c.min_power_kw, locale)))
    if c.max_power_kw is not None:
        parts.append(_("below %(kw)s kW", kw=_number(c.max_power_kw, locale)))
    if c.min_current_a is not None:
        parts.append(_("at %(amps)s A or more", amps=_number(c.min_current_a, locale)))
    if c.max_current_a is not None:
        parts.append(_("below %(amps)s A", amps=_number(c.max_current_a, locale)))
    if c.min_duration_s is not None:
        parts.append(_("after the first %(minutes)s min of the session", minutes=_minutes(c.min_duration_s, locale)))
    if c.max_duration_s is not None:
        parts.append(_("during the first %(minutes)s min of the session", minutes=_minutes(c.max_duration_s, locale)))
    if otherwise:
        parts.append(_("at other times"))
    return _join(parts)


def _label(dim: str) -> str:
    return {
        ENERGY: _("Energy"),
        TIME: _("Charging time"),
        FLAT: _("Session fee"),
        PARKING_TIME: _("Idle fee (connected, not charging)"),
    }[dim]


def _price(comp: DisplayComponent, currency: str, locale: str) -> str:
    amount = unit_amount(comp.price_incl_vat, currency, locale)
    if comp.dimension == ENERGY:
        return _("%(price)s per kWh", price=amount)
    if comp.dimension == FLAT:
        return _("%(price)s per session", price=amount)
    return _("%(price)s per minute", price=amount)


def _billing(comp: DisplayComponent, locale: str) -> str:
    parts = []
    if comp.grace_period_s:
        n = comp.grace_period_s // 60 if comp.grace_period_s % 60 == 0 else None
        if n is not None:
            parts.append(ngettext("free for the first %(num)d minute of the session", "free for the first %(num)d minutes of the session", n))
        else:
            parts.append(_("free for the first %(seconds)s seconds of the session", seconds=_number(Decimal(comp.grace_period_s), locale)))
    if comp.dimension == ENERGY and comp.step_size > 1:
        parts.append(_("billed in steps of %(wh)s Wh", wh=_number(Decimal(comp.step_size), locale)))
    elif comp.dimension in (TIME, PARKING_TIME) and comp.step_size > 1:
        if comp.step_size == 60:
            parts.append(_("billed per started minute"))
        else:
            parts.append(_("billed in steps of %(seconds)s seconds", seconds=_number(Decimal(comp.step_size), locale)))
    out = parts[0] if parts else ""
    for part in parts[1:]:
        # TRANSLATORS: joins two notes on how a price is billed, e.g. "free for the first 15 minutes" and "billed per started minute".
        out = _("%(first)s; %(second)s", first=out, second=part)
    return out


def _bound(bound: tuple[Decimal, Decimal | None], currency: str, locale: str) -> str:
    excl, incl = bound
    if incl is not None:
        return unit_amount(incl, currency, locale)
    return _("%(price)s excl. VAT", price=unit_amount(excl, currency, locale))


def render_prices(display: PriceDisplay, locale: str | None = None) -> dict:
    """The price display as text in ``locale`` (the request's when None): ``{"locale", "lines", "notes"}``."""
    if locale is not None:
        with force_locale(locale):
            return render_prices(display, None)
    loc = _locale()
    cur = display.currency
    lines = [
        PriceLine(
            dimension=c.dimension,
            label=_label(c.dimension),
            price=_price(c, cur, loc),
            conditions=conditions_text(c.conditions, c.otherwise, loc),
            billing=_billing(c, loc),
        )
        for c in display.components
    ]
    notes = []
    rates = [format_percent(r / 100, locale=loc, decimal_quantization=False) for r in display.vat_rates]
    if rates and not display.no_vat_components:
        notes.append(_("Prices include %(rate)s VAT.", rate=format_list(rates, locale=loc)))
    elif rates:
        notes.append(_("Prices include VAT where it applies (%(rate)s).", rate=format_list(rates, locale=loc)))
    else:
        notes.append(_("No VAT applies to these prices."))
    if display.min_price is not None:
        notes.append(_("Minimum price per session: %(price)s.", price=_bound(display.min_price, cur, loc)))
    if display.max_price is not None:
        notes.append(_("Maximum price per session: %(price)s.", price=_bound(display.max_price, cur, loc)))
    return {"locale": loc, "lines": lines, "notes": notes}
