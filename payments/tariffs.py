"""OCPI 2.2.1 tariff pricing: a pure engine, from tariff + CDR to the CDR's totals.

Public functions
----------------
* ``validate_tariff(tariff)`` / ``compile_tariff(tariff)``: check a Tariff object
  (JSON, as a dict) and turn it into an immutable, pre-parsed ``CompiledTariff``.
  Errors are ``TariffError(path, reason)`` with a JSON-pointer-like ``path``
  ("elements/0/price_components/1/price") so the web layer can point at the field.
* ``validate_cdr(cdr)``: the minimal checks on a CDR (``CdrError(path, reason)``).
* ``price(tariff, cdr, *, time_zone=None)``: the CDR's totals (``total_cost``,
  ``total_energy_cost``, ... as ``{"excl_vat": Decimal, "incl_vat": Decimal}``,
  ``total_energy`` kWh, ``total_time`` / ``total_parking_time`` hours) plus a
  ``breakdown`` by period and dimension for receipts. Exact Decimals, never
  rounded to the currency: rounding happens once, in ``bill``.
* ``bill(priced, currency)``: total cost in ``Money`` (net, VAT, gross).
* ``cdr_from_samples(start, samples, end, *, tariff, time_zone)``: the CDR of a
  live or finished session, built from its meter samples and split wherever
  another tariff element may start to apply, so live and final cost come from
  the same engine.
* ``hold_for(...)`` and ``limits_for_cap(...)``: card-hold sizing.

Nothing here imports Flask or touches a database; money is Decimal (prices) and
``payments.money.Money`` (billed amounts), never float. A float given in a JSON
document is read through ``Decimal(str(x))``, i.e. as the number it prints as.

Interpretations of the specification (each one is tested)
---------------------------------------------------------
OCPI 2.2.1 leaves some points open and contradicts itself on others; these are
the choices made here.

1. **Which element prices a dimension.** For every charging period and every
   dimension (FLAT, ENERGY, TIME, PARKING_TIME) the price component comes from
   the *first* element, in list order, that has a component of that dimension
   and whose restrictions *all* hold. No such element: that dimension is free
   in that period.
2. **When restrictions are evaluated.** At the start of each charging period,
   with the state at that instant: local wall-clock time and date (in
   ``time_zone``), the session's energy so far (sum of ENERGY of the earlier
   periods), the session's duration so far, and the period's current and
   power dimensions. The CDR module makes the CPO start a new period whenever
   another element becomes active; ``cdr_from_samples`` does exactly that.
3. **Comparisons.** Every "min" bound is inclusive and every "max" bound
   exclusive: ``start_time <= t < end_time``, ``start_date <= d < end_date``
   (the spec says end_date is exclusive), ``min_kwh <= kWh < max_kwh``,
   ``min_duration <= s < max_duration`` (the spec's own words), and likewise
   ``min_current <= A``, ``A < max_current``, ``min_power <= kW``,
   ``kW < max_power`` so that "below 32 A" and "above 32 A" elements leave no
   gap at exactly 32 A.
4. **Time windows.** ``end_time < start_time`` wraps past midnight (22:00-06:00
   holds at 23:00 and at 05:00). ``start_time == end_time`` means the whole day.
   Only ``start_time``: until midnight; only ``end_time``: from midnight. Each
   restriction is judged on its own at the instant, so ``day_of_week`` is the
   weekday of the instant: ``FRIDAY`` with 22:00-06:00 holds on Friday
   00:00-06:00 and Friday 22:00-24:00, not on Saturday 02:00. Times are local
   wall-clock times: on the night the clocks go back, a 02:00-03:00 window holds
   for two real hours; on the night they go forward it does not occur.
5. **Current and power.** ``min_current``/``min_power`` are compared with the
   period's ``MIN_CURRENT``/``MIN_POWER`` dimension (so the element holds
   only if the current never dropped below the bound in that period), and
   ``max_current``/``max_power`` with ``MAX_CURRENT``/``MAX_POWER``. When a
   period carries only one of the pair, that one is used for both. When it
   carries neither, a current (power) restriction does *not* hold: an element
   is never chosen on data the CDR does not have.
6. **Durations and time.** ``min_duration``/``max_duration`` count from the
   start of the charging session (not from the start of parking: the spec's
   "First hour free" example text counts parking from its own start, which
   contradicts the restriction's definition -- OCPI issue #434; see the test).
   TIME is charging time and PARKING_TIME is time not charging, taken from the
   period's TIME/PARKING_TIME dimensions; a period with neither counts its
   whole length (timestamps) as TIME. Time is billed in whole seconds (the
   step_size unit): hours are turned into seconds rounded half up, so 1/3 h
   written with 28 digits is 1200 s, and 10 min written 0.166667 h is 600 s,
   not 600.0012 s billed as one step more.
7. **FLAT** is charged once per session: the FLAT component of the first
   element that applies, taken from the earliest period that has one. It is
   reported in ``total_fixed_cost`` (a reservation's FLAT in
   ``total_reservation_cost``).
8. **step_size** (CDR module, "step_size" note): rounding happens once per
   session for ENERGY and once for TIME and PARKING_TIME *combined*. The
   session total of the dimension (over the periods where a component priced
   it: amounts no element prices are free and do not count, or free energy
   would shrink the rounding of paid energy) is rounded up to a multiple of the
   step_size of the *last* component that priced it (the component of the
   latest period with a positive amount of it), and the extra amount is
   billed at that component's price, on that period's line. When both TIME
   and PARKING_TIME are priced in the session, only the parking total is
   rounded and the charging time is billed exactly ("step_size is only taken
   into account for the total parking duration"); PARKING_TIME without a
   price component (free parking) does not count as priced.
   The Tariffs module's worked examples disagree with this rule in places
   (its step-size example #1 and its "Complex Tariff" bill the rounded TIME;
   OCPI issue #396); the normative CDR text wins here, and the tests show the
   difference with numbers. A consequence of the rule, kept deliberately: as
   the extra is billed at the *last* price, adding energy to an earlier,
   cheaper period can lower the rounded extra by more than it adds.
9. **VAT** is per component: ``incl = excl * (1 + vat/100)``. An absent
   ``vat`` means no VAT is applicable (``incl == excl``), as the spec says
   ("not providing a VAT is different from 0 %").
10. **min_price / max_price** apply to ``total_cost`` only (excl. and incl.
    VAT each against its own bound, as the spec's note requires); the
    per-dimension totals stay as computed and the difference is reported as
    ``price_adjustment``. ``total_cost`` includes reservation costs, so the
    bounds do too. When the bound has no ``incl_vat``, the incl. VAT
    total is scaled by the same factor as the excl. VAT total.
11. **Validity.** ``start_date_time <= session start < end_date_time`` of the
    tariff; the session start decides ("a driver accepts the tariff which is
    valid when they start"), otherwise ``TariffNotActive``.
12. **Reservation.** Periods carrying a ``RESERVATION_TIME`` dimension are the
    reservation; they must come before the charging periods. They are priced
    only by elements with ``reservation: RESERVATION``, whose TIME component
    prices the reserved time (rounded on its own total) and whose FLAT is a
    reservation fee. A CDR made only of reservation periods is an expired
    reservation: ``RESERVATION_EXPIRES`` elements come first, then the
    ``RESERVATION`` ones. Charging periods are priced only by elements without
    a ``reservation`` restriction. Reservation costs go to
    ``total_reservation_cost`` and count in ``total_cost``; reservation time is
    not part of ``total_time``.
13. **Live sessions.** ``cdr_from_samples`` attributes the energy of a meter
    interval linearly in time when it splits the interval at a boundary, and
    splits at every instant where an element may start or stop applying, so
    the engine's "judge each period at its start" is exact for the CDRs it
    builds; pricing the CDR of the samples so far gives the live cost.
14. **Precision.** Arithmetic runs in a local Decimal context of 34 digits.
    Prices × kWh and FLAT fees are exact. A cost per hour × seconds / 3600 (and
    a min/max bound scaled by a VAT ratio) can be a repeating decimal: it is
    rounded half-even to 12 decimal places (10⁻¹² of the currency unit), and
    from there on everything is exact, so the breakdown lines add up to the
    totals to the last digit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_HALF_EVEN, ROUND_HALF_UP, ROUND_UP, Context, Decimal, InvalidOperation, localcontext
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from payments.money import Money, MoneyError, check_currency, to_minor

__all__ = [
    "CdrError",
    "CompiledTariff",
    "MeterSample",
    "PricingError",
    "TariffError",
    "TariffNotActive",
    "bill",
    "cdr_from_samples",
    "compile_tariff",
    "hold_for",
    "limits_for_cap",
    "price",
    "validate_cdr",
    "validate_tariff",
]

ENERGY, FLAT, TIME, PARKING_TIME = "ENERGY", "FLAT", "TIME", "PARKING_TIME"
COMPONENT_TYPES = frozenset({ENERGY, FLAT, TIME, PARKING_TIME})
RESERVATION, RESERVATION_EXPIRES = "RESERVATION", "RESERVATION_EXPIRES"
DAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")  # index == date.weekday()
TARIFF_TYPES = frozenset({"AD_HOC_PAYMENT", "PROFILE_CHEAP", "PROFILE_FAST", "PROFILE_GREEN", "REGULAR"})
# CdrDimensionType of OCPI 2.2.1; the ones without a meaning for the price are accepted and ignored.
CDR_DIMENSIONS = frozenset(
    {"CURRENT", "ENERGY", "ENERGY_EXPORT", "ENERGY_IMPORT", "MAX_CURRENT", "MIN_CURRENT", "MAX_POWER", "MIN_POWER",
     "PARKING_TIME", "POWER", "RESERVATION_TIME", "STATE_OF_CHARGE", "TIME"}
)
_RESTRICTION_KEYS = frozenset(
    {"start_time", "end_time", "start_date", "end_date", "min_kwh", "max_kwh", "min_current", "max_current",
     "min_power", "max_power", "min_duration", "max_duration", "day_of_week", "reservation"}
)
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_DATE_RE = re.compile(r"([12][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")

_UTC = timezone.utc
_CTX = Context(prec=34, rounding=ROUND_HALF_EVEN)
_D0 = Decimal(0)
_D1 = Decimal(1)
_D100 = Decimal(100)
_D1000 = Decimal(1000)
_D3600 = Decimal(3600)
_THOUSANDTH = Decimal("0.001")
_E12 = Decimal("1e-12")
_US = 1_000_000
_NUMERIC = re.compile(r"\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")


# --------------------------------------------------------------------------- errors


class PricingError(ValueError):
    """A tariff or CDR that cannot be priced. ``path`` points at the field, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class TariffError(PricingError):
    """Invalid tariff JSON, e.g. ``TariffError("elements/0/price_components/1/price", "must be ≥ 0")``."""


class TariffNotActive(TariffError):
    """The session started outside the tariff's ``start_date_time``/``end_date_time``."""


class CdrError(PricingError):
    """Invalid CDR (or meter samples) for pricing."""


# --------------------------------------------------------------------------- parsing helpers


def _number(value: object, path: str, err: type[PricingError] = TariffError) -> Decimal:
    """A non-negative finite Decimal from a JSON number or numeric string (floats via ``str``)."""
    t = type(value)
    if t is Decimal:
        d = value
    elif t is int:
        d = Decimal(value)
    elif t is float:
        d = Decimal(repr(value))
    elif t is str:
        if not _NUMERIC.fullmatch(value):
            raise err(path, "must be a number")
        try:
            d = Decimal(value.strip())
        except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
            raise err(path, "must be a number") from None
    elif isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        d = Decimal(value)
    else:
        raise err(path, "must be a number")
    if not d.is_finite():
        raise err(path, "must be a finite number")
    if d < 0:
        raise err(path, "must be ≥ 0")
    return d


def _integer(value: object, path: str, *, minimum: int) -> int:
    """A JSON integer (300 or 300.0), at least ``minimum``."""
    if isinstance(value, bool):
        raise TariffError(path, "must be an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, (float, Decimal)) and Decimal(str(value)).is_finite() and Decimal(str(value)) == int(value):
        n = int(value)
    else:
        raise TariffError(path, "must be an integer")
    if n < minimum:
        raise TariffError(path, "must be a positive integer" if minimum == 1 else f"must be ≥ {minimum}")
    return n


def _datetime(value: object, path: str, err: type[PricingError]) -> datetime:
    """An aware UTC datetime from an RFC 3339 string (no offset means UTC, as OCPI says) or a datetime."""
    if isinstance(value, str):
        if len(value) < 19 or value[10] not in "Tt ":
            raise err(path, "must be an RFC 3339 date-time, e.g. 2024-05-01T12:00:00Z")
        try:
            d = datetime.fromisoformat(value)
        except ValueError:
            raise err(path, "must be an RFC 3339 date-time, e.g. 2024-05-01T12:00:00Z") from None
    elif isinstance(value, datetime):
        d = value
    else:
        raise err(path, "must be an RFC 3339 date-time, e.g. 2024-05-01T12:00:00Z")
    tz = d.tzinfo
    if tz is None:
        return d.replace(tzinfo=_UTC)
    if tz is _UTC:
        return d
    return d.astimezone(_UTC)


def _utc_fast(value: object) -> datetime | None:
    """The common "2024-05-01T12:00:00Z" quickly; None for anything else (use ``_datetime``)."""
    if type(value) is str and len(value) > 19 and value[10] == "T":
        try:
            d = datetime.fromisoformat(value)
        except ValueError:
            return None
        if d.tzinfo is _UTC:
            return d
    return None


def _iso(d: datetime) -> str:
    """RFC 3339 in UTC with a "Z" (microseconds only when there are some)."""
    return d.astimezone(_UTC).replace(tzinfo=None).isoformat() + "Z"


def _micros(td: timedelta) -> int:
    return (td.days * 86400 + td.seconds) * _US + td.microseconds


@lru_cache(maxsize=256)
def _zone(name: str | None):
    """The tzinfo for an IANA name (cached); UTC when None."""
    if name is None or name in ("UTC", "Etc/UTC", "Z"):
        return _UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise PricingError("time_zone", f"unknown IANA time zone: {name!r}") from None


# --------------------------------------------------------------------------- compiled tariff


@dataclass(frozen=True, slots=True)
class Component:
    """One price component, parsed: ``price`` per unit excl. VAT, ``vat`` percent or None."""

    type: str
    price: Decimal
    vat: Decimal | None
    step_size: int
    element: int
    factor: Decimal  # 1 + vat/100 (1 when there is no VAT)

    @property
    def price_incl_vat(self) -> Decimal:
        return self.price * self.factor


@dataclass(frozen=True, slots=True)
class Restrictions:
    """Parsed restrictions of an element (None: not restricted on that field)."""

    start_time: int | None = None  # seconds after local midnight
    end_time: int | None = None
    start_date: int | None = None  # proleptic ordinal of the local date
    end_date: int | None = None
    min_kwh: Decimal | None = None
    max_kwh: Decimal | None = None
    min_current: Decimal | None = None
    max_current: Decimal | None = None
    min_power: Decimal | None = None
    max_power: Decimal | None = None
    min_duration: int | None = None  # seconds
    max_duration: int | None = None
    days: frozenset[int] | None = None  # date.weekday() numbers
    reservation: str | None = None

    @property
    def local(self) -> bool:
        return self.start_time is not None or self.end_time is not None or self.start_date is not None or self.end_date is not None or self.days is not None


@dataclass(frozen=True, slots=True)
class Element:
    """A tariff element: its components by dimension, its restrictions, and their compiled checks."""

    index: int
    components: Mapping[str, Component]
    restrictions: Restrictions
    check: object  # callable(state) -> bool, or None when unrestricted
    window_check: object  # the same on time/date/day/duration only (hold sizing), or None


# The state a period starts in, as a tuple for speed:
# (local seconds of day, local date ordinal, weekday, energy so far kWh, duration so far µs,
#  current for min_current, current for max_current, power for min_power, power for max_power)


def _predicates(r: Restrictions, *, window_only: bool) -> list:
    preds: list = []
    a, b = r.start_time, r.end_time
    if a is not None and b is not None:
        if a < b:
            preds.append(lambda s, a=a, b=b: a <= s[0] < b)
        elif a > b:
            preds.append(lambda s, a=a, b=b: s[0] >= a or s[0] < b)
        # a == b: the whole day
    elif a is not None:
        preds.append(lambda s, a=a: s[0] >= a)
    elif b is not None:
        preds.append(lambda s, b=b: s[0] < b)
    if r.start_date is not None:
        preds.append(lambda s, v=r.start_date: s[1] >= v)
    if r.end_date is not None:
        preds.append(lambda s, v=r.end_date: s[1] < v)
    if r.days is not None:
        preds.append(lambda s, v=r.days: s[2] in v)
    if r.min_duration is not None:
        preds.append(lambda s, v=r.min_duration * _US: s[4] >= v)
    if r.max_duration is not None:
        preds.append(lambda s, v=r.max_duration * _US: s[4] < v)
    if window_only:
        return preds
    if r.min_kwh is not None:
        preds.append(lambda s, v=r.min_kwh: s[3] >= v)
    if r.max_kwh is not None:
        preds.append(lambda s, v=r.max_kwh: s[3] < v)
    if r.min_current is not None:
        preds.append(lambda s, v=r.min_current: s[5] is not None and s[5] >= v)
    if r.max_current is not None:
        preds.append(lambda s, v=r.max_current: s[6] is not None and s[6] < v)
    if r.min_power is not None:
        preds.append(lambda s, v=r.min_power: s[7] is not None and s[7] >= v)
    if r.max_power is not None:
        preds.append(lambda s, v=r.max_power: s[8] is not None and s[8] < v)
    return preds


def _make_check(preds: list):
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        p, q = preds
        return lambda s: p(s) and q(s)
    ps = tuple(preds)

    def check(s):
        for p in ps:
            if not p(s):
                return False
        return True

    return check


_SESSION, _RESERVED, _EXPIRED = "session", "reservation", "expired"


@dataclass(frozen=True, slots=True, eq=False)
class CompiledTariff:
    """A validated tariff with its restrictions parsed once; price many CDRs with ``.price(cdr)``.

    ``candidates[phase][dimension]`` lists ``(element index, check, component)`` in the
    order the elements are tried for that phase ("session", "reservation", "expired").
    """

    id: str | None
    currency: str
    elements: tuple[Element, ...]
    min_price: tuple[Decimal, Decimal | None] | None
    max_price: tuple[Decimal, Decimal | None] | None
    valid_from: datetime | None
    valid_until: datetime | None
    local: bool
    candidates: Mapping[str, Mapping[str, tuple]]
    time_points: tuple[int, ...]  # local seconds of day where a time window opens or closes (with 0)
    needs_midnight: bool
    duration_points: tuple[int, ...]  # seconds after session start
    kwh_points: tuple[Decimal, ...]
    source: Mapping

    def price(self, cdr: Mapping, *, time_zone: str | None = None) -> dict:
        """Price ``cdr`` (see the module-level ``price``)."""
        tz = _zone(time_zone)
        with localcontext(_CTX):
            return _price(self, cdr, tz)

    def check_active(self, at: datetime) -> None:
        """Raise ``TariffNotActive`` unless the tariff is valid at ``at`` (the session start)."""
        if self.valid_from is not None and at < self.valid_from:
            raise TariffNotActive("start_date_time", f"the tariff is valid from {_iso(self.valid_from)}; the session started at {_iso(at)}")
        if self.valid_until is not None and at >= self.valid_until:
            raise TariffNotActive("end_date_time", f"the tariff ended at {_iso(self.valid_until)}; the session started at {_iso(at)}")


def _price_pair(value: object, path: str) -> tuple[Decimal, Decimal | None]:
    if not isinstance(value, Mapping):
        raise TariffError(path, 'must be an object {"excl_vat": number, "incl_vat": number}')
    unknown = set(value) - {"excl_vat", "incl_vat"}
    if unknown:
        raise TariffError(f"{path}/{sorted(unknown)[0]}", "unknown field")
    if "excl_vat" not in value:
        raise TariffError(f"{path}/excl_vat", "is required")
    excl = _number(value["excl_vat"], f"{path}/excl_vat")
    incl = None
    if value.get("incl_vat") is not None:
        incl = _number(value["incl_vat"], f"{path}/incl_vat")
        if incl < excl:
            raise TariffError(f"{path}/incl_vat", "must be ≥ excl_vat")
    return excl, incl


def _restrictions(raw: object, path: str) -> Restrictions:
    if raw is None:
        return Restrictions()
    if not isinstance(raw, Mapping):
        raise TariffError(path, "must be an object")
    for key in raw:
        if key not in _RESTRICTION_KEYS:
            raise TariffError(f"{path}/{key}", "unknown restriction")
    kw: dict = {}
    for key in ("start_time", "end_time"):
        v = raw.get(key)
        if v is not None:
            m = _TIME_RE.fullmatch(v) if isinstance(v, str) else None
            if not m:
                raise TariffError(f"{path}/{key}", 'must be a time "HH:MM" (24h, leading zeros)')
            kw[key] = int(m.group(1)) * 3600 + int(m.group(2)) * 60
    for key in ("start_date", "end_date"):
        v = raw.get(key)
        if v is not None:
            if not isinstance(v, str) or not _DATE_RE.fullmatch(v):
                raise TariffError(f"{path}/{key}", 'must be a date "YYYY-MM-DD"')
            try:
                kw[key] = date.fromisoformat(v).toordinal()
            except ValueError:
                raise TariffError(f"{path}/{key}", "is not a calendar date") from None
    for key in ("min_kwh", "max_kwh", "min_current", "max_current", "min_power", "max_power"):
        v = raw.get(key)
        if v is not None:
            kw[key] = _number(v, f"{path}/{key}")
    for key in ("min_duration", "max_duration"):
        v = raw.get(key)
        if v is not None:
            kw[key] = _integer(v, f"{path}/{key}", minimum=0)
    for lo, hi in (("min_kwh", "max_kwh"), ("min_current", "max_current"), ("min_power", "max_power"),
                   ("min_duration", "max_duration"), ("start_date", "end_date")):
        if lo in kw and hi in kw and kw[lo] >= kw[hi]:
            raise TariffError(f"{path}/{hi}", f"must be greater than {lo}")
    days = raw.get("day_of_week")
    if days is not None:
        if not isinstance(days, list):
            raise TariffError(f"{path}/day_of_week", "must be a list of days (MONDAY ... SUNDAY)")
        nums = set()
        for i, d in enumerate(days):
            if d not in DAYS:
                raise TariffError(f"{path}/day_of_week/{i}", "must be one of MONDAY, TUESDAY, WEDNESDAY, THURSDAY, FRIDAY, SATURDAY, SUNDAY")
            nums.add(DAYS.index(d))
        if nums:  # an empty list restricts nothing (cardinality *)
            kw["days"] = frozenset(nums)
    res = raw.get("reservation")
    if res is not None:
        if res not in (RESERVATION, RESERVATION_EXPIRES):
            raise TariffError(f"{path}/reservation", "must be RESERVATION or RESERVATION_EXPIRES")
        kw["reservation"] = res
    return Restrictions(**kw)


def compile_tariff(tariff: Mapping) -> CompiledTariff:
    """Validate ``tariff`` (OCPI 2.2.1 Tariff object as parsed JSON) and pre-compile it.

    Raises ``TariffError(path, reason)`` on the first problem. Unknown fields inside
    elements, price components and restrictions are errors (a misspelt restriction
    would silently change prices); unknown top-level fields are ignored.
    """
    if isinstance(tariff, CompiledTariff):
        return tariff
    if not isinstance(tariff, Mapping):
        raise TariffError("", "a tariff must be a JSON object")
    for key in ("id", "country_code", "party_id"):
        v = tariff.get(key)
        if v is not None and not isinstance(v, str):
            raise TariffError(key, "must be a string")
    cur = tariff.get("currency")
    if not isinstance(cur, str):
        raise TariffError("currency", "is required: an ISO 4217 code")
    try:
        currency = check_currency(cur)
    except MoneyError:
        raise TariffError("currency", f"not an ISO 4217 currency: {cur!r}") from None
    if cur != currency:
        raise TariffError("currency", "must be upper case")
    ttype = tariff.get("type")
    if ttype is not None and ttype not in TARIFF_TYPES:
        raise TariffError("type", "must be one of " + ", ".join(sorted(TARIFF_TYPES)))
    min_price = _price_pair(tariff["min_price"], "min_price") if tariff.get("min_price") is not None else None
    max_price = _price_pair(tariff["max_price"], "max_price") if tariff.get("max_price") is not None else None
    if min_price and max_price:
        if min_price[0] > max_price[0]:
            raise TariffError("max_price/excl_vat", "must be ≥ min_price")
        if min_price[1] is not None and max_price[1] is not None and min_price[1] > max_price[1]:
            raise TariffError("max_price/incl_vat", "must be ≥ min_price")
    valid_from = _datetime(tariff["start_date_time"], "start_date_time", TariffError) if tariff.get("start_date_time") is not None else None
    valid_until = _datetime(tariff["end_date_time"], "end_date_time", TariffError) if tariff.get("end_date_time") is not None else None
    if valid_from and valid_until and valid_until <= valid_from:
        raise TariffError("end_date_time", "must be after start_date_time")
    if tariff.get("last_updated") is not None:
        _datetime(tariff["last_updated"], "last_updated", TariffError)

    raw_elements = tariff.get("elements")
    if not isinstance(raw_elements, list) or not raw_elements:
        raise TariffError("elements", "must be a non-empty list of tariff elements")
    elements = []
    for ei, el in enumerate(raw_elements):
        path = f"elements/{ei}"
        if not isinstance(el, Mapping):
            raise TariffError(path, "must be an object")
        for key in el:
            if key not in ("price_components", "restrictions"):
                raise TariffError(f"{path}/{key}", "unknown field (expected price_components, restrictions)")
        comps = el.get("price_components")
        if not isinstance(comps, list) or not comps:
            raise TariffError(f"{path}/price_components", "must be a non-empty list")
        restr = _restrictions(el.get("restrictions"), f"{path}/restrictions")
        by_type: dict[str, Component] = {}
        for ci, c in enumerate(comps):
            cpath = f"{path}/price_components/{ci}"
            if not isinstance(c, Mapping):
                raise TariffError(cpath, "must be an object")
            for key in c:
                if key not in ("type", "price", "vat", "step_size"):
                    raise TariffError(f"{cpath}/{key}", "unknown field")
            ctype = c.get("type")
            if ctype not in COMPONENT_TYPES:
                raise TariffError(f"{cpath}/type", "must be one of ENERGY, FLAT, PARKING_TIME, TIME")
            if ctype in by_type:
                raise TariffError(f"{cpath}/type", f"{ctype} appears twice in this element")
            if restr.reservation is not None and ctype not in (FLAT, TIME):
                raise TariffError(f"{cpath}/type", "a reservation element can only have FLAT and TIME components")
            if "price" not in c:
                raise TariffError(f"{cpath}/price", "is required")
            p = _number(c["price"], f"{cpath}/price")
            vat = _number(c["vat"], f"{cpath}/vat") if c.get("vat") is not None else None
            if vat is not None and vat > _D100:
                raise TariffError(f"{cpath}/vat", "must be a percentage between 0 and 100")
            if "step_size" not in c:
                raise TariffError(f"{cpath}/step_size", "is required (a positive integer)")
            step = _integer(c["step_size"], f"{cpath}/step_size", minimum=1)
            factor = _D1 + vat / _D100 if vat is not None else _D1
            by_type[ctype] = Component(ctype, p, vat, step, ei, factor)
        elements.append(
            Element(ei, by_type, restr, _make_check(_predicates(restr, window_only=False)), _make_check(_predicates(restr, window_only=True)))
        )

    def cands(order: list[Element]) -> dict[str, tuple]:
        return {dim: tuple((e.index, e.check, e.components[dim]) for e in order if dim in e.components) for dim in (FLAT, ENERGY, TIME, PARKING_TIME)}

    session = [e for e in elements if e.restrictions.reservation is None]
    reserved = [e for e in elements if e.restrictions.reservation == RESERVATION]
    expired = [e for e in elements if e.restrictions.reservation == RESERVATION_EXPIRES] + reserved
    candidates = {_SESSION: cands(session), _RESERVED: cands(reserved), _EXPIRED: cands(expired)}

    time_points: set[int] = set()
    needs_midnight = False
    durations: set[int] = set()
    kwhs: set[Decimal] = set()
    for e in session:
        r = e.restrictions
        for v in (r.start_time, r.end_time):
            if v is not None:
                time_points.update((v, 0))
        if r.days is not None or r.start_date is not None or r.end_date is not None:
            needs_midnight = True
        for v in (r.min_duration, r.max_duration):
            if v:
                durations.add(v)
        for v in (r.min_kwh, r.max_kwh):
            if v:
                kwhs.add(v)
    if needs_midnight:
        time_points.add(0)
    return CompiledTariff(
        id=tariff.get("id"),
        currency=currency,
        elements=tuple(elements),
        min_price=min_price,
        max_price=max_price,
        valid_from=valid_from,
        valid_until=valid_until,
        local=any(e.restrictions.local for e in elements),
        candidates=candidates,
        time_points=tuple(sorted(time_points)),
        needs_midnight=needs_midnight,
        duration_points=tuple(sorted(durations)),
        kwh_points=tuple(sorted(kwhs)),
        source=tariff,
    )


def validate_tariff(tariff: Mapping) -> None:
    """Raise ``TariffError(path, reason)`` if ``tariff`` is not a valid OCPI 2.2.1 Tariff for pricing.

    Checks types; prices, VAT and bounds are numbers (JSON numbers or numeric
    strings, read with ``Decimal(str(x))``) and ≥ 0; VAT ≤ 100; component types are
    ENERGY/FLAT/TIME/PARKING_TIME, at most one of each per element; ``step_size``
    is a positive integer; times are "HH:MM", dates "YYYY-MM-DD", days MONDAY..SUNDAY;
    min < max for every restriction pair; reservation elements only have FLAT and
    TIME; min_price ≤ max_price; a validity window that is not empty.
    """
    compile_tariff(tariff)


# --------------------------------------------------------------------------- CDR parsing


def _volume(v: object, i: int, j: int) -> Decimal:
    t = type(v)
    if t is Decimal:
        d = v
    elif t is int:
        d = Decimal(v)
    elif t is float:
        d = Decimal(repr(v))
    else:
        return _number(v, f"charging_periods/{i}/dimensions/{j}/volume", CdrError)
    if not d.is_finite() or d < 0:
        raise CdrError(f"charging_periods/{i}/dimensions/{j}/volume", "must be a finite number ≥ 0")
    return d


# Hours are read as whole seconds (half up): the step_size unit, and what makes 1/3 h written
# with 28 digits, or 10 min written 0.166667 h, bill as 1200 s and 600 s, not as one step more.
_SECOND = Decimal(1)


_DIM_SLOT = {"ENERGY": 1, "TIME": 2, "PARKING_TIME": 3, "RESERVATION_TIME": 4,
             "MIN_CURRENT": 5, "MAX_CURRENT": 6, "MIN_POWER": 7, "MAX_POWER": 8}


def _parse_cdr(t: CompiledTariff | None, cdr: Mapping):
    """(start, end, periods) with periods as lists:
    [start, energy kWh, time s, parking s, reservation s, min_cur, max_cur, min_pow, max_pow, length µs]."""
    if type(cdr) is not dict and not isinstance(cdr, Mapping):
        raise CdrError("", "a CDR must be a JSON object")
    start = _utc_fast(cdr.get("start_date_time")) or _datetime(cdr.get("start_date_time"), "start_date_time", CdrError)
    end = _utc_fast(cdr.get("end_date_time")) or _datetime(cdr.get("end_date_time"), "end_date_time", CdrError)
    if end < start:
        raise CdrError("end_date_time", "must not be before start_date_time")
    if t is not None:
        cur = cdr.get("currency")
        if cur is not None and cur != t.currency:
            raise CdrError("currency", f"the CDR is in {cur}, the tariff in {t.currency}")
    raw = cdr.get("charging_periods")
    if type(raw) is not list or not raw:
        raise CdrError("charging_periods", "must be a non-empty list of charging periods")
    tid = t.id if t is not None else None
    slots = _DIM_SLOT
    periods = []
    prev = start
    for i, p in enumerate(raw):
        if type(p) is not dict and not isinstance(p, Mapping):
            raise CdrError(f"charging_periods/{i}", "must be an object")
        ps = _utc_fast(p.get("start_date_time")) or _datetime(p.get("start_date_time"), f"charging_periods/{i}/start_date_time", CdrError)
        if ps < prev or ps > end:
            raise CdrError(f"charging_periods/{i}/start_date_time", "periods must be in chronological order, within the session")
        if tid is not None:
            ptid = p.get("tariff_id")
            if ptid is not None and ptid != tid:
                raise CdrError(f"charging_periods/{i}/tariff_id", f"this period is priced by tariff {ptid!r}, not {tid!r}")
        dims = p.get("dimensions")
        if type(dims) is not list or not dims:
            raise CdrError(f"charging_periods/{i}/dimensions", "must be a non-empty list")
        rec = [ps, None, None, None, None, None, None, None, None, 0]
        for j, d in enumerate(dims):
            if type(d) is not dict and not isinstance(d, Mapping):
                raise CdrError(f"charging_periods/{i}/dimensions/{j}", "must be an object")
            typ = d.get("type")
            k = slots.get(typ)
            v = d.get("volume")
            vt = type(v)
            if vt is Decimal and v.is_finite() and v >= 0:
                pass
            elif vt is int and v >= 0:
                v = Decimal(v)
            else:
                v = _volume(v, i, j)
            if k is None:
                if typ not in CDR_DIMENSIONS:
                    raise CdrError(f"charging_periods/{i}/dimensions/{j}/type", "unknown CDR dimension type")
                continue
            if rec[k] is not None:
                raise CdrError(f"charging_periods/{i}/dimensions/{j}/type", f"{typ} appears twice in this period")
            rec[k] = (v * _D3600).quantize(_SECOND, rounding=ROUND_HALF_UP) if 2 <= k <= 4 else v
        periods.append(rec)
        prev = ps
    for i in range(len(periods) - 1):
        periods[i][9] = _micros(periods[i + 1][0] - periods[i][0])
    periods[-1][9] = _micros(end - periods[-1][0])
    return start, end, periods


def validate_cdr(cdr: Mapping) -> None:
    """Raise ``CdrError(path, reason)`` unless ``cdr`` can be priced.

    Minimal checks: start/end date-times (RFC 3339; no offset means UTC) with end ≥ start;
    a non-empty list of periods in chronological order within the session, each with a
    non-empty list of known 2.2.1 dimension types whose volumes are numbers ≥ 0, no
    dimension twice; reservation periods (RESERVATION_TIME) only before the charging
    periods. Identity, location and token fields are not checked here.
    """
    with localcontext(_CTX):
        _, _, periods = _parse_cdr(None, cdr)
    _split_phases(periods)


def _split_phases(periods: list) -> int:
    k = 0
    while k < len(periods) and periods[k][4] is not None:
        k += 1
    for i in range(k, len(periods)):
        if periods[i][4] is not None:
            raise CdrError(f"charging_periods/{i}/dimensions", "RESERVATION_TIME periods must come before the charging periods")
    return k


# --------------------------------------------------------------------------- pricing


def _state(t: CompiledTariff, at: datetime, tz, energy: Decimal, dur_us: int, mnc, mxc, mnp, mxp) -> tuple:
    if t.local:
        lt = at if tz is _UTC else at.astimezone(tz)
        sod = lt.hour * 3600 + lt.minute * 60 + lt.second
        ordinal = lt.toordinal()
        wd = lt.weekday()
    else:
        sod = ordinal = wd = 0
    return (sod, ordinal, wd, energy, dur_us,
            mnc if mnc is not None else mxc, mxc if mxc is not None else mnc,
            mnp if mnp is not None else mxp, mxp if mxp is not None else mnp)


def _choose(cands: tuple, state: tuple, cache: dict):
    for idx, check, comp in cands:
        if check is None:
            return comp
        ok = cache.get(idx)
        if ok is None:
            ok = cache[idx] = check(state)
        if ok:
            return comp
    return None


def _ceil_to(x: Decimal, step: int) -> Decimal:
    return (x / step).to_integral_value(ROUND_CEILING) * step


def _price(t: CompiledTariff, cdr: Mapping, tz) -> dict:
    start, end, periods = _parse_cdr(t, cdr)
    t.check_active(start)
    k = _split_phases(periods)
    n = len(periods)
    lines: list[list] = []  # [period index, start, phase, dim, component, qty (kWh or s), extra]
    totals = {}
    phases = []
    if k:
        phases.append((_EXPIRED if k == n else _RESERVED, 0, k, start))
    if k < n:
        phases.append((_SESSION, k, n, start if k == 0 else periods[k][0]))
    local = t.local
    offset = None  # one UTC offset for the whole session: local = utc + offset (cheap)
    if local:
        if tz is _UTC:
            offset = _NO_OFFSET
        elif end - start < _SAME_OFFSET_SPAN:
            o = start.astimezone(tz).utcoffset()
            if end.astimezone(tz).utcoffset() == o:
                offset = o

    for phase, lo, hi, phase_start in phases:
        cands = t.candidates[phase]
        c_flat, c_energy, c_time, c_park = cands[FLAT], cands[ENERGY], cands[TIME], cands[PARKING_TIME]
        session = phase == _SESSION
        energy_so_far = t_total = p_total = _D0
        e_priced = t_priced = p_priced = _D0  # amounts some component priced: what step_size rounds
        flat_done = not c_flat
        last_e = last_t = last_p = None
        for i in range(lo, hi):
            ps, e, ts, pk, rs, mnc, mxc, mnp, mxp, length = periods[i]
            if session:
                if ts is None and pk is None:
                    ts = (Decimal(length) / _US).quantize(_SECOND, rounding=ROUND_HALF_UP)
                if e is None:
                    e = _D0
                if ts is None:
                    ts = _D0
                if pk is None:
                    pk = _D0
            else:
                e, pk, ts = _D0, _D0, rs
            if not flat_done or e or ts or pk:
                if local:
                    lt = ps + offset if offset is not None else ps.astimezone(tz)
                    sod = lt.hour * 3600 + lt.minute * 60 + lt.second
                    ordinal = lt.toordinal()
                    wd = (ordinal + 6) % 7  # == lt.weekday()
                else:
                    sod = ordinal = wd = 0
                state = (sod, ordinal, wd, energy_so_far, _micros(ps - phase_start),
                         mnc if mnc is not None else mxc, mxc if mxc is not None else mnc,
                         mnp if mnp is not None else mxp, mxp if mxp is not None else mnp)
                cache: dict = {}
                if not flat_done:
                    comp = _choose(c_flat, state, cache)
                    if comp is not None:
                        lines.append([i, ps, phase, FLAT, comp, _D1, _D0])
                        flat_done = True
                if e:
                    comp = _choose(c_energy, state, cache)
                    if comp is not None:
                        last_e = len(lines)
                        lines.append([i, ps, phase, ENERGY, comp, e, _D0])
                        e_priced += e
                if ts:
                    comp = _choose(c_time, state, cache)
                    if comp is not None:
                        last_t = len(lines)
                        lines.append([i, ps, phase, TIME, comp, ts, _D0])
                        t_priced += ts
                if pk:
                    comp = _choose(c_park, state, cache)
                    if comp is not None:
                        last_p = len(lines)
                        lines.append([i, ps, phase, PARKING_TIME, comp, pk, _D0])
                        p_priced += pk
            energy_so_far += e
            t_total += ts
            p_total += pk
        # step_size: once per session for ENERGY, once for TIME and PARKING_TIME together.
        if last_e is not None:
            line = lines[last_e]
            wh = e_priced * _D1000
            line[6] = (_ceil_to(wh, line[4].step_size) - wh) / _D1000
        if last_p is not None:
            line = lines[last_p]
            line[6] = _ceil_to(p_priced, line[4].step_size) - p_priced
        elif last_t is not None:
            line = lines[last_t]
            line[6] = _ceil_to(t_priced, line[4].step_size) - t_priced
        totals[phase] = (energy_so_far, t_total, p_total)

    f_x = f_i = e_x = e_i = ti_x = ti_i = pa_x = pa_i = r_x = r_i = _D0
    breakdown = []
    for i, ps, phase, dim, comp, qty, extra in lines:
        billed = qty + extra if extra else qty
        if dim is ENERGY or dim is FLAT:
            excl = comp.price * billed
            q, bq = qty, billed
        else:
            excl = (comp.price * billed / _D3600).quantize(_E12)
            q = qty / _D3600
            bq = billed / _D3600 if extra else q
        incl = excl * comp.factor if comp.vat is not None else excl
        if phase is not _SESSION:
            r_x += excl
            r_i += incl
        elif dim is ENERGY:
            e_x += excl
            e_i += incl
        elif dim is TIME:
            ti_x += excl
            ti_i += incl
        elif dim is PARKING_TIME:
            pa_x += excl
            pa_i += incl
        else:
            f_x += excl
            f_i += incl
        breakdown.append({
            "period": i, "start": ps, "phase": _SESSION if phase is _SESSION else _RESERVED, "dimension": dim,
            "element": comp.element, "quantity": q, "billed_quantity": bq, "unit": _UNITS[dim],
            "unit_price": comp.price, "vat": comp.vat, "cost": {"excl_vat": excl, "incl_vat": incl},
        })
    excl = f_x + e_x + ti_x + pa_x + r_x
    incl = f_i + e_i + ti_i + pa_i + r_i
    adj = None
    if t.min_price is not None or t.max_price is not None:
        new_excl, new_incl, reason = _bounded(t, excl, incl)
        if reason:
            adj = {"reason": reason, "excl_vat": new_excl - excl, "incl_vat": new_incl - incl}
            excl, incl = new_excl, new_incl
    e_tot, t_tot, p_tot = totals.get(_SESSION, _ZEROS)
    r_tot = totals.get(_RESERVED, totals.get(_EXPIRED, _ZEROS))[1]
    return {
        "currency": t.currency,
        "total_cost": {"excl_vat": excl, "incl_vat": incl},
        "total_fixed_cost": {"excl_vat": f_x, "incl_vat": f_i},
        "total_energy_cost": {"excl_vat": e_x, "incl_vat": e_i},
        "total_time_cost": {"excl_vat": ti_x, "incl_vat": ti_i},
        "total_parking_cost": {"excl_vat": pa_x, "incl_vat": pa_i},
        "total_reservation_cost": {"excl_vat": r_x, "incl_vat": r_i},
        "total_energy": e_tot,
        "total_time": (t_tot + p_tot) / _D3600,
        "total_parking_time": p_tot / _D3600,
        "total_reservation_time": r_tot / _D3600,
        "price_adjustment": adj,
        "reservation_expired": 0 < k == n,
        "breakdown": breakdown,
    }


_UNITS = {ENERGY: "kWh", FLAT: "session", TIME: "h", PARKING_TIME: "h"}
_NO_OFFSET = timedelta(0)
# Zones change their UTC offset at most twice a year, months apart: a session shorter
# than this with the same offset at both ends has that offset throughout.
_SAME_OFFSET_SPAN = timedelta(days=7)
_ZEROS = (_D0, _D0, _D0)


def _bounded(t: CompiledTariff, excl: Decimal, incl: Decimal) -> tuple[Decimal, Decimal, str | None]:
    """Apply min_price then max_price to (excl, incl); the reason is None when nothing changed."""
    reason = None
    for bound, name, low in ((t.min_price, "min_price", True), (t.max_price, "max_price", False)):
        if bound is None:
            continue
        b_excl, b_incl = bound
        n_excl = max(excl, b_excl) if low else min(excl, b_excl)
        if b_incl is not None:
            n_incl = max(incl, b_incl) if low else min(incl, b_incl)
        elif n_excl == excl:
            n_incl = incl
        elif excl:
            n_incl = (incl * n_excl / excl).quantize(_E12)  # keep the session's VAT ratio
        else:
            n_incl = n_excl  # nothing to take a VAT ratio from
        if n_excl != excl or n_incl != incl:
            reason = name
        excl, incl = n_excl, n_incl
    return excl, incl, reason


_COMPILED: dict[str, CompiledTariff] = {}
_COMPILED_MAX = 256


def _compiled(tariff: Mapping | CompiledTariff) -> CompiledTariff:
    """``compile_tariff`` behind a small cache keyed by the tariff's canonical JSON.

    The key is the content, not the object, so a tariff dict edited in place is
    recompiled; anything ``json`` cannot serialise is simply compiled afresh.
    """
    if isinstance(tariff, CompiledTariff):
        return tariff
    try:
        key = json.dumps(tariff, sort_keys=True, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        return compile_tariff(tariff)
    hit = _COMPILED.get(key)
    if hit is None:
        hit = compile_tariff(tariff)
        if len(_COMPILED) >= _COMPILED_MAX:
            try:  # drop the oldest entry; another thread may be doing the same
                _COMPILED.pop(next(iter(_COMPILED)), None)
            except (RuntimeError, StopIteration):
                pass
        _COMPILED[key] = hit
    return hit


def price(tariff: Mapping | CompiledTariff, cdr: Mapping, *, time_zone: str | None = None) -> dict:
    """Price an OCPI 2.2.1 CDR against a tariff; exact Decimals, not rounded to the currency.

    ``tariff`` is a Tariff object (validated and compiled, then cached by its
    content) or a ``CompiledTariff`` from ``compile_tariff``.
    ``cdr`` needs ``start_date_time``, ``end_date_time`` and ``charging_periods``
    (``start_date_time`` and ``dimensions`` each); ``currency`` and the periods'
    ``tariff_id`` are checked when present. ``time_zone`` is the location's IANA
    zone, for time-of-day, date and weekday restrictions (UTC when None).

    Returns ``total_cost``, ``total_fixed_cost``, ``total_energy_cost``,
    ``total_time_cost``, ``total_parking_cost``, ``total_reservation_cost`` (each
    ``{"excl_vat", "incl_vat"}``), ``total_energy`` (kWh), ``total_time`` (hours,
    charging and parking), ``total_parking_time`` and ``total_reservation_time``
    (hours), ``price_adjustment`` (min/max price, or None), ``reservation_expired``,
    ``currency`` and ``breakdown``: one line per period and priced dimension with
    ``period``, ``start``, ``phase``, ``dimension``, ``element``, ``quantity``,
    ``billed_quantity`` (after step_size), ``unit``, ``unit_price``, ``vat`` and
    ``cost``. The lines of a category add up to its total exactly.
    Raises ``TariffError``, ``TariffNotActive`` or ``CdrError``.
    """
    return _compiled(tariff).price(cdr, time_zone=time_zone)


def bill(priced: Mapping, currency: str | None = None) -> dict:
    """Turn a priced CDR's ``total_cost`` into Money: ``{"excl_vat", "vat", "incl_vat"}``.

    Rounding rule: ``excl_vat`` and ``incl_vat`` are each rounded once, half up, to
    the currency's minor unit with ``payments.money.to_minor``; the VAT amount is
    their difference (``incl - excl``) and is never rounded on its own, so
    net + VAT = total on every receipt. ``currency`` defaults to the tariff's and
    must match it.
    """
    cur = priced.get("currency")
    if currency is None:
        currency = cur
    currency = check_currency(currency)
    if cur is not None and cur != currency:
        raise MoneyError(f"the priced CDR is in {cur}, not {currency}", "currency_mismatch", expected=currency, got=cur)
    excl = to_minor(priced["total_cost"]["excl_vat"], currency)
    incl = to_minor(priced["total_cost"]["incl_vat"], currency)
    return {"excl_vat": excl, "vat": incl - excl, "incl_vat": incl}


# --------------------------------------------------------------------------- boundaries in time


def _transitions(tz, t0: datetime, t1: datetime) -> list[datetime]:
    """Instants in (t0, t1) where the zone's UTC offset changes (to the second)."""
    if tz is _UTC:
        return []
    out = []
    step = timedelta(hours=12)  # real zones change offset at most once in 12 hours
    a = t0
    off_a = a.astimezone(tz).utcoffset()
    while a < t1:
        b = min(a + step, t1)
        off_b = b.astimezone(tz).utcoffset()
        if off_b != off_a:
            lo, hi = 0, int((b - a).total_seconds())
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if (a + timedelta(seconds=mid)).astimezone(tz).utcoffset() == off_a:
                    lo = mid
                else:
                    hi = mid
            x = a + timedelta(seconds=hi)
            if t0 < x < t1:
                out.append(x)
        a, off_a = b, off_b
    return out


def _boundaries(t: CompiledTariff, t0: datetime, t1: datetime, tz, origin: datetime) -> list[datetime]:
    """Instants in (t0, t1) where a session element's time, date, weekday or duration
    restriction may change its outcome; ``origin`` is the session start for durations.
    Spurious extra instants are harmless (periods with the same elements are merged)."""
    points: set[datetime] = set()
    if t.time_points:
        if tz is _UTC:
            d0, d1 = t0.date() - timedelta(days=1), t1.date() + timedelta(days=1)
        else:
            d0, d1 = t0.astimezone(tz).date() - timedelta(days=1), t1.astimezone(tz).date() + timedelta(days=1)
        times = [time(s // 3600, s % 3600 // 60) for s in t.time_points]
        d = d0
        while d <= d1:
            for tm in times:
                if tz is _UTC:
                    u = datetime.combine(d, tm, tzinfo=_UTC)
                    if t0 < u < t1:
                        points.add(u)
                else:
                    for fold in (0, 1):
                        u = datetime.combine(d, tm, tzinfo=tz).replace(fold=fold).astimezone(_UTC)
                        if t0 < u < t1:
                            points.add(u)
            d += timedelta(days=1)
        points.update(_transitions(tz, t0, t1))
    for s in t.duration_points:
        u = origin + timedelta(seconds=s)
        if t0 < u < t1:
            points.add(u)
    return sorted(points)


# --------------------------------------------------------------------------- CDR from meter samples


@dataclass(frozen=True, slots=True)
class MeterSample:
    """One meter reading: ``at`` (aware datetime), ``energy_wh`` the cumulative import
    register in Wh, ``power_w`` and ``current_a`` (sum over phases) and whether the car
    was ``charging`` (False: connected but parked or idle). A sample describes the
    interval since the previous sample (see ``cdr_from_samples``)."""

    at: datetime
    energy_wh: Decimal
    power_w: Decimal | None = None
    current_a: Decimal | None = None
    charging: bool = True

    @classmethod
    def coerce(cls, value: MeterSample | Mapping, index: int) -> MeterSample:
        if isinstance(value, MeterSample):
            s = value
            at, energy, power, current, charging = s.at, s.energy_wh, s.power_w, s.current_a, s.charging
        elif isinstance(value, Mapping):
            at = value.get("at", value.get("timestamp"))
            energy, power, current = value.get("energy_wh"), value.get("power_w"), value.get("current_a")
            charging = value.get("charging", True)
        else:
            raise CdrError(f"samples/{index}", "must be a MeterSample or an object")
        if not isinstance(charging, bool):
            raise CdrError(f"samples/{index}/charging", "must be true or false")
        return cls(
            _datetime(at, f"samples/{index}/at", CdrError),
            _number(energy, f"samples/{index}/energy_wh", CdrError),
            None if power is None else _number(power, f"samples/{index}/power_w", CdrError),
            None if current is None else _number(current, f"samples/{index}/current_a", CdrError),
            charging,
        )


_WH_Q = Decimal("0.001")  # interpolated register values are kept to 1 mWh


def cdr_from_samples(
    start: datetime | str,
    samples: Iterable[MeterSample | Mapping],
    end: datetime | str,
    *,
    tariff: Mapping | CompiledTariff,
    time_zone: str | None = None,
    meter_start_wh: Decimal | None = None,
) -> dict:
    """Build the OCPI CDR (without totals) of a session from its meter samples.

    Price it with ``price(tariff, cdr, time_zone=...)``: during the session with
    ``end`` = now (the live cost), at the end with ``end`` = the stop time (the final
    cost). Both use this function and the same engine, so they agree to the cent.

    Rules:

    * Sample ``i`` describes the interval from the previous sample (or ``start``) to
      ``samples[i].at``: the register rose from the previous reading to its
      ``energy_wh``, at its ``power_w`` and ``current_a``, charging or not as its
      ``charging`` flag says. Time in a charging interval is TIME, otherwise
      PARKING_TIME. After the last sample up to ``end`` the last state holds with no
      energy (the next sample brings it). With no sample at all, the session counts as
      charging with no energy.
    * The register at ``start`` is ``meter_start_wh`` (OCPP meterStart); when not
      given, a sample at exactly ``start`` gives it, otherwise the first sample's
      reading (the first interval then has no energy).
    * An interval is split wherever a tariff element may start or stop applying:
      local times where a time window opens or closes, local midnights (weekday and
      date restrictions), clock changes, the instants ``min_duration``/``max_duration``
      seconds after ``start``, and the instant the session's energy reaches a
      ``min_kwh``/``max_kwh`` threshold. **Energy is attributed linearly in time
      within an interval** (register values at split points are interpolated and
      kept to 1 mWh; at a kWh threshold the register is set to the threshold exactly,
      at the interpolated instant rounded to the millisecond).
    * Consecutive pieces are merged into one charging period when they are in the same
      state (charging or not) and the same set of elements applies; a period carries
      ENERGY (kWh), TIME or PARKING_TIME (hours), and MIN/MAX_CURRENT (A) and
      MIN/MAX_POWER (kW) when the samples have them.

    Samples must be in strictly increasing time within [start, end], with a register
    that never decreases (``CdrError`` otherwise). Reservation periods are not built
    here.
    """
    t = _compiled(tariff)
    tz = _zone(time_zone)
    start = _datetime(start, "start", CdrError)
    end = _datetime(end, "end", CdrError)
    if end < start:
        raise CdrError("end", "must not be before start")
    ss = [MeterSample.coerce(s, i) for i, s in enumerate(samples)]
    prev_at = None
    for i, s in enumerate(ss):
        if s.at < start or s.at > end:
            raise CdrError(f"samples/{i}/at", "must be within the session (start ≤ at ≤ end)")
        if prev_at is not None and s.at <= prev_at:
            raise CdrError(f"samples/{i}/at", "samples must be in strictly increasing time")
        prev_at = s.at
    with localcontext(_CTX):
        if meter_start_wh is not None:
            e_start = _number(meter_start_wh, "meter_start_wh", CdrError)
            if ss and ss[0].at == start and ss[0].energy_wh != e_start:
                raise CdrError("samples/0/energy_wh", "a sample at the start must read meter_start_wh")
        elif ss:
            e_start = ss[0].energy_wh
        else:
            e_start = _D0
        # intervals: (t0, t1, e0, e1, charging, power kW, current A)
        intervals = []
        t_prev, e_prev = start, e_start
        last = None
        for i, s in enumerate(ss):
            if s.energy_wh < e_prev:
                raise CdrError(f"samples/{i}/energy_wh", "the energy register must not decrease")
            if s.at > t_prev:
                intervals.append((t_prev, s.at, e_prev, s.energy_wh, s.charging,
                                  None if s.power_w is None else s.power_w / _D1000, s.current_a))
            t_prev, e_prev, last = s.at, s.energy_wh, s
        if end > t_prev or not intervals:
            if last is None:
                intervals.append((t_prev, end, e_prev, e_prev, True, None, None))
            else:
                intervals.append((t_prev, end, e_prev, e_prev, last.charging,
                                  None if last.power_w is None else last.power_w / _D1000, last.current_a))
        bounds = _boundaries(t, start, end, tz, start)
        elements = [e for e in t.elements if e.restrictions.reservation is None and e.check is not None]
        kwh_wh = [k * _D1000 for k in t.kwh_points]
        periods: list[list] = []  # [start, end, e0, e1, charging, key, mins/maxes...]
        bi = 0
        for (a, b, e0, e1, charging, pw, cur) in intervals:
            span = _micros(b - a)
            # split points inside (a, b): time boundaries and kWh thresholds
            while bi < len(bounds) and bounds[bi] <= a:
                bi += 1
            cuts: dict[datetime, Decimal | None] = {}
            j = bi
            while j < len(bounds) and bounds[j] < b:
                cuts[bounds[j]] = None
                j += 1
            if e1 > e0 and span:
                for k in kwh_wh:
                    target = e_start + k
                    if e0 < target < e1:
                        ms = (target - e0) * span / (e1 - e0) / _D1000
                        at = a + timedelta(milliseconds=int(ms.to_integral_value(ROUND_HALF_EVEN)))
                        if a < at < b:
                            cuts[at] = target
            pts = [(a, e0)]
            lo_e = e0
            for at in sorted(cuts):
                fixed = cuts[at]
                if fixed is None:
                    val = e0 + ((e1 - e0) * _micros(at - a) / span).quantize(_WH_Q) if span else e0
                else:
                    val = fixed
                val = min(max(val, lo_e), e1)
                pts.append((at, val))
                lo_e = val
            pts.append((b, e1))
            for (pa, ea), (pb, eb) in zip(pts, pts[1:]):
                if pb <= pa and periods:
                    continue
                energy_before = (ea - e_start) / _D1000
                state = _state(t, pa, tz, energy_before, _micros(pa - start), cur, cur, pw, pw)
                applicable = tuple(el.index for el in elements if el.check(state))
                key = (charging, applicable, cur is None, pw is None)
                if periods and periods[-1][5] == key:
                    p = periods[-1]
                    p[1], p[3] = pb, eb
                    if cur is not None:
                        p[6], p[7] = min(p[6], cur), max(p[7], cur)
                    if pw is not None:
                        p[8], p[9] = min(p[8], pw), max(p[9], pw)
                else:
                    periods.append([pa, pb, ea, eb, charging, key, cur, cur, pw, pw])
        out = []
        for pa, pb, ea, eb, charging, key, cmin, cmax, pmin, pmax in periods:
            secs = Decimal(_micros(pb - pa)) / _US
            dims = [{"type": "ENERGY", "volume": (eb - ea) / _D1000},
                    {"type": "TIME" if charging else "PARKING_TIME", "volume": secs / _D3600}]
            if cmin is not None:
                dims += [{"type": "MIN_CURRENT", "volume": cmin}, {"type": "MAX_CURRENT", "volume": cmax}]
            if pmin is not None:
                dims += [{"type": "MIN_POWER", "volume": pmin}, {"type": "MAX_POWER", "volume": pmax}]
            period = {"start_date_time": _iso(pa), "dimensions": dims}
            if t.id is not None:
                period["tariff_id"] = t.id
            out.append(period)
        cdr = {
            "start_date_time": _iso(start),
            "end_date_time": _iso(end),
            "currency": t.currency,
            "charging_periods": out,
            "total_energy": (intervals[-1][3] - e_start) / _D1000 if intervals else _D0,
        }
        if isinstance(t.source, dict):
            cdr["tariffs"] = [t.source]
        return cdr


# --------------------------------------------------------------------------- hold sizing


def _window_candidates(t: CompiledTariff, start: datetime, length: timedelta, tz, max_energy_kwh: Decimal) -> list[Element]:
    """Session elements that could apply at some moment of [start, start + length]:
    time, date, weekday and duration restrictions judged exactly over the window,
    energy thresholds against the energy cap, current and power assumed possible."""
    end = start + length
    instants = [start] + _boundaries(t, start, end, tz, start)
    out = []
    for el in t.elements:
        r = el.restrictions
        if r.reservation is not None:
            continue
        if r.min_kwh is not None and r.min_kwh > max_energy_kwh:
            continue
        if r.max_kwh is not None and r.max_kwh <= 0:
            continue
        if el.window_check is None or any(
            el.window_check(_state(t, at, tz, _D0, _micros(at - start), None, None, None, None)) for at in instants
        ):
            out.append(el)
    return out


def _worst_case(t: CompiledTariff, start: datetime, tz, energy_kwh: Decimal, charging_s: int, idle_s: int) -> Decimal:
    cands = _window_candidates(t, start, timedelta(seconds=charging_s + idle_s), tz, energy_kwh)
    total = _D0
    max_factor = _D1
    for dim, qty in ((FLAT, None), (ENERGY, energy_kwh * _D1000), (TIME, Decimal(charging_s)), (PARKING_TIME, Decimal(idle_s))):
        comps = [e.components[dim] for e in cands if dim in e.components]
        if not comps:
            continue
        top = max(c.price_incl_vat for c in comps)
        max_factor = max([max_factor] + [c.factor for c in comps])
        if dim == FLAT:
            total += top
            continue
        billed = max(_ceil_to(qty, c.step_size) for c in comps)
        total += top * billed / (_D1000 if dim == ENERGY else _D3600)
    if t.min_price is not None:
        b_excl, b_incl = t.min_price
        total = max(total, b_incl if b_incl is not None else b_excl * max_factor)
    if t.max_price is not None and t.max_price[1] is not None:
        total = min(total, t.max_price[1])
    return total


def hold_for(
    tariff: Mapping | CompiledTariff,
    *,
    currency: str,
    max_energy_kwh: Decimal,
    max_duration: timedelta,
    max_idle: timedelta,
    time_zone: str | None = None,
    start: datetime,
) -> Money:
    """The card hold for a session starting at ``start``: the worst case, VAT included.

    Worst-case rule (an upper bound of what ``price`` can return for any session
    that starts at ``start``, charges at most ``max_energy_kwh`` during at most
    ``max_duration`` of charging time and stays at most ``max_idle`` connected
    without charging):

        highest FLAT fee
      + energy cap × highest ENERGY price
      + charging-time cap × highest TIME price
      + idle cap × highest PARKING_TIME price

    each price incl. VAT, taken over the session elements that could apply at any
    moment of the window [start, start + max_duration + max_idle] (time, date,
    weekday and duration restrictions checked over the window in the location's
    ``time_zone``; kWh thresholds against the cap; current and power assumed
    possible), and each cap first rounded up to the largest step_size among those
    components. Then at least ``min_price`` and at most ``max_price`` (incl. VAT),
    and rounded *up* to the minor unit, so a capture of the rounded cost never
    exceeds it. Reservation costs are not included.
    """
    t = _compiled(tariff)
    currency = check_currency(currency)
    if currency != t.currency:
        raise MoneyError(f"the tariff is in {t.currency}, not {currency}", "currency_mismatch", expected=t.currency, got=currency)
    start = _datetime(start, "start", CdrError)
    t.check_active(start)
    tz = _zone(time_zone)
    with localcontext(_CTX):
        energy = _number(max_energy_kwh, "max_energy_kwh", PricingError)
        c_s = _micros(max_duration) // _US + (1 if _micros(max_duration) % _US else 0)
        i_s = _micros(max_idle) // _US + (1 if _micros(max_idle) % _US else 0)
        if c_s < 0 or i_s < 0:
            raise PricingError("max_duration", "durations must not be negative")
        total = _worst_case(t, start, tz, energy, c_s, i_s)
        return to_minor(total, currency, rounding=ROUND_UP)


def limits_for_cap(
    tariff: Mapping | CompiledTariff,
    cap: Money,
    *,
    max_power_kw: Decimal,
    max_idle: timedelta = timedelta(0),
    time_zone: str | None = None,
    start: datetime,
    max_duration: timedelta = timedelta(hours=24),
) -> dict:
    """Where to stop a session so its cost stays within a driver-chosen ``cap`` (VAT incl.).

    Returns ``{"max_duration": timedelta, "max_energy_kwh": Decimal, "hold": Money}``:
    the longest charging time (whole seconds, at most ``max_duration``) such that
    ``hold_for`` with that time, the energy the charger can deliver in it at
    ``max_power_kw`` (rounded down to the Wh), and ``max_idle`` of idle time is
    within ``cap``; ``hold`` is that hold (≤ cap). Stopping the session at either
    limit keeps every possible cost within the cap, because ``hold_for`` is a worst
    case and it grows with each limit. Raises ``PricingError`` when even a session
    of zero length (session fee, idle allowance, min_price) would exceed the cap.
    """
    t = _compiled(tariff)
    if not isinstance(cap, Money):
        raise PricingError("cap", "must be Money")
    power = _number(max_power_kw, "max_power_kw", PricingError)

    def limits(seconds: int) -> tuple[Decimal, Money]:
        with localcontext(_CTX):
            kwh = (power * seconds / _D3600).quantize(_THOUSANDTH, rounding=ROUND_DOWN)
        return kwh, hold_for(t, currency=cap.currency, max_energy_kwh=kwh, max_duration=timedelta(seconds=seconds),
                             max_idle=max_idle, time_zone=time_zone, start=start)

    kwh0, hold0 = limits(0)
    if hold0 > cap:
        raise PricingError("cap", f"the cap {cap} is below the least this session can cost ({hold0})")
    lo, hi = 0, _micros(max_duration) // _US
    kwh_hi, hold_hi = limits(hi)
    if hold_hi <= cap:
        return {"max_duration": timedelta(seconds=hi), "max_energy_kwh": kwh_hi, "hold": hold_hi}
    best = (kwh0, hold0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        kwh, hold = limits(mid)
        if hold <= cap:
            lo, best = mid, (kwh, hold)
        else:
            hi = mid
    return {"max_duration": timedelta(seconds=lo), "max_energy_kwh": best[0], "hold": best[1]}
