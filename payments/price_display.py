"""What a driver sees before starting: the price components of a tariff, EU AFIR style, and the hold.

``price_display(tariff)`` takes an OCPI 2.2.1 tariff (dict, ``CompiledTariff`` or a
``TariffVersion``) and returns a ``PriceDisplay``: structured data, no text, no
Flask; ``webapp.pricing`` renders it in the user's language.

Rules
-----
* **Order**: per kWh (ENERGY), per minute (TIME), per session (FLAT), idle fee
  (PARKING_TIME). Within a dimension, components keep the tariff's priority
  order (the engine takes the first element that applies), so restricted prices
  come first and an unrestricted one after them is marked ``otherwise`` ("at
  other times"). Components after the first unrestricted one of their dimension
  can never apply and are not shown. Reservation elements are not shown (the
  scan-to-pay flow does not reserve).
* **Units**: OCPI prices TIME and PARKING_TIME per hour; drivers see per
  minute. The per-minute price is the hourly one divided by 60 in Decimal:
  exact when it terminates (6.00/h → 0.10/min), otherwise rounded half-even to
  12 decimal places with ``exact`` False (5.00/h → 0.083333333333/min); the
  hourly price is kept as given in ``price_per_hour_excl_vat``.
* **VAT**: every price is given excl. and incl. VAT (``incl = excl × (1 + vat/100)``,
  exact, as the engine bills). ``vat_rate`` None means no VAT applies to that
  component (OCPI: "not providing a VAT is different from 0 %"). Drivers are
  shown prices incl. VAT with the rate stated.
* **Grace period** (idle fee): recognised when the tariff expresses one in
  either of OCPI's two ways: a free PARKING_TIME component restricted only by
  ``max_duration`` = G before the paid ones, or paid PARKING_TIME components all
  restricted by ``min_duration`` = G with nothing pricing parking before G.
  ``grace_period_s`` is then G and the free component / the ``min_duration`` is
  folded into it. Note that OCPI 2.2.1 durations count from the **start of
  the session**, not from the end of charging (the engine's choice 6; OCPI
  issue #434): idle time within the first G seconds of the session is free.
  A free window of another kind (free parking 20:00-08:00) stays a component
  with price 0 and its conditions.
* **min/max price** per session as in the tariff; when the bound has no
  ``incl_vat`` and every component has the same VAT rate, incl. VAT is derived
  from it, otherwise it is None (shown excl. VAT).

``default_hold(...)`` sizes the card hold of a session started now with
``hold_for`` under a ``HoldPolicy`` (60 kWh, 4 h of charging, 2 h idle by
default, the energy capped by what the connector can deliver in that time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import date, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Context, Decimal, Inexact, localcontext

from payments.money import Money
from payments.tariffs import DAYS, ENERGY, FLAT, PARKING_TIME, TIME, CompiledTariff, Restrictions, compile_tariff, hold_for

__all__ = [
    "DEFAULT_HOLD_POLICY",
    "Conditions",
    "DefaultHold",
    "DisplayComponent",
    "HoldPolicy",
    "PriceDisplay",
    "decimal_text",
    "default_hold",
    "price_display",
]

ORDER = (ENERGY, TIME, FLAT, PARKING_TIME)
UNITS = {ENERGY: "kWh", TIME: "min", FLAT: "session", PARKING_TIME: "min"}
_CTX = Context(prec=34, rounding=ROUND_HALF_EVEN)
_D60 = Decimal(60)
_D100 = Decimal(100)
_E12 = Decimal("1e-12")


def decimal_text(d: Decimal | None) -> str | None:
    """A Decimal as plain text without exponent or trailing zeros ("0.242", "10", "0.083333333333")."""
    if d is None:
        return None
    n = d.normalize()
    if n == 0:
        return "0"
    return format(n, "f")


def _hhmm(seconds: int | None) -> str | None:
    return None if seconds is None else f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@dataclass(frozen=True, slots=True)
class Conditions:
    """When a component applies, spelled out from the element's restrictions (None: no such restriction).

    Times are local wall-clock "HH:MM" in the site's time zone; ``end_time`` and
    ``end_date`` are exclusive; ``wraps_midnight`` when ``end_time < start_time``
    (22:00-08:00). ``days`` are OCPI day names, Monday first. kWh and durations
    count from the start of the session.
    """

    days: tuple[str, ...] | None = None
    start_time: str | None = None
    end_time: str | None = None
    wraps_midnight: bool = False
    start_date: str | None = None
    end_date: str | None = None
    min_kwh: Decimal | None = None
    max_kwh: Decimal | None = None
    min_power_kw: Decimal | None = None
    max_power_kw: Decimal | None = None
    min_current_a: Decimal | None = None
    max_current_a: Decimal | None = None
    min_duration_s: int | None = None
    max_duration_s: int | None = None

    @classmethod
    def of(cls, r: Restrictions) -> Conditions:
        """The conditions of parsed OCPI restrictions."""
        whole_day = r.start_time is not None and r.start_time == r.end_time  # the engine: start == end is the whole day
        return cls(
            days=tuple(DAYS[d] for d in sorted(r.days)) if r.days is not None else None,
            start_time=None if whole_day else _hhmm(r.start_time),
            end_time=None if whole_day else _hhmm(r.end_time),
            wraps_midnight=(not whole_day and r.start_time is not None and r.end_time is not None and r.end_time < r.start_time),
            start_date=date.fromordinal(r.start_date).isoformat() if r.start_date is not None else None,
            end_date=date.fromordinal(r.end_date).isoformat() if r.end_date is not None else None,
            min_kwh=r.min_kwh or None,  # min_kwh 0 restricts nothing
            max_kwh=r.max_kwh,
            min_power_kw=r.min_power,
            max_power_kw=r.max_power,
            min_current_a=r.min_current,
            max_current_a=r.max_current,
            min_duration_s=r.min_duration or None,  # min_duration 0 restricts nothing
            max_duration_s=r.max_duration,
        )

    @property
    def restricted(self) -> bool:
        """Whether any condition is set."""
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name != "wraps_midnight")

    def replace(self, **changes) -> Conditions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def as_json(self) -> dict:
        """The API's shape: every field, numbers as Decimal strings."""
        return {
            "days_of_week": list(self.days) if self.days is not None else None,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "wraps_midnight": self.wraps_midnight,
            "start_date": self.start_date,
            "end_date": self.end_date,
            "min_kwh": decimal_text(self.min_kwh),
            "max_kwh": decimal_text(self.max_kwh),
            "min_power_kw": decimal_text(self.min_power_kw),
            "max_power_kw": decimal_text(self.max_power_kw),
            "min_current_a": decimal_text(self.min_current_a),
            "max_current_a": decimal_text(self.max_current_a),
            "min_duration_s": self.min_duration_s,
            "max_duration_s": self.max_duration_s,
        }


@dataclass(frozen=True, slots=True)
class DisplayComponent:
    """One price a driver sees: per ``unit`` (kWh, min, session), excl. and incl. VAT, and when it applies."""

    dimension: str  # ENERGY, TIME, FLAT, PARKING_TIME
    unit: str
    price_excl_vat: Decimal
    price_incl_vat: Decimal
    vat_rate: Decimal | None  # percent; None: no VAT applies
    exact: bool  # False when a per-minute price was rounded to 12 decimals
    price_per_hour_excl_vat: Decimal | None  # TIME and PARKING_TIME: the tariff's own price
    step_size: int  # Wh for ENERGY, seconds for TIME/PARKING_TIME, 1 for FLAT
    element: int  # index of the OCPI tariff element
    conditions: Conditions
    otherwise: bool  # unrestricted, after restricted prices of the same dimension: "at other times"
    grace_period_s: int | None = None  # PARKING_TIME only: free idle time from the session start

    def as_json(self) -> dict:
        """The API's shape (Decimals as strings)."""
        return {
            "dimension": self.dimension,
            "unit": self.unit,
            "price_excl_vat": decimal_text(self.price_excl_vat),
            "price_incl_vat": decimal_text(self.price_incl_vat),
            "vat_rate": decimal_text(self.vat_rate),
            "exact": self.exact,
            "price_per_hour_excl_vat": decimal_text(self.price_per_hour_excl_vat),
            "step_size": self.step_size,
            "element": self.element,
            "restrictions": self.conditions.as_json(),
            "otherwise": self.otherwise,
            "grace_period": None if self.grace_period_s is None else {"seconds": self.grace_period_s, "counted_from": "session_start"},
        }


@dataclass(frozen=True, slots=True)
class PriceDisplay:
    """A tariff as a driver sees it: components in display order, VAT, and the session's min/max price."""

    currency: str
    components: tuple[DisplayComponent, ...]
    vat_rates: tuple[Decimal, ...]  # the distinct rates, ascending
    no_vat_components: bool  # some component has no VAT at all
    min_price: tuple[Decimal, Decimal | None] | None  # (excl, incl) per session
    max_price: tuple[Decimal, Decimal | None] | None

    @property
    def grace_period_s(self) -> int | None:
        """The idle fee's grace period, when the tariff has one."""
        return next((c.grace_period_s for c in self.components if c.grace_period_s is not None), None)

    def of(self, dimension: str) -> list[DisplayComponent]:
        """The components of one dimension, in priority order."""
        return [c for c in self.components if c.dimension == dimension]

    def as_json(self) -> dict:
        """The API's shape (Decimals as strings)."""

        def bound(b):
            return None if b is None else {"excl_vat": decimal_text(b[0]), "incl_vat": decimal_text(b[1])}

        return {
            "currency": self.currency,
            "components": [c.as_json() for c in self.components],
            "vat": {"rates": [decimal_text(r) for r in self.vat_rates], "some_prices_without_vat": self.no_vat_components,
                    "prices_shown_include_vat": True},
            "min_price": bound(self.min_price),
            "max_price": bound(self.max_price),
        }


def _compiled(tariff) -> CompiledTariff:
    if isinstance(tariff, CompiledTariff):
        return tariff
    compiled = getattr(tariff, "compiled", None)  # a TariffVersion
    if isinstance(compiled, CompiledTariff):
        return compiled
    if isinstance(tariff, Mapping):
        return compile_tariff(tariff)
    raise TypeError(f"not a tariff: {type(tariff).__name__}")


def _per_unit(dimension: str, price: Decimal) -> tuple[Decimal, bool]:
    if dimension not in (TIME, PARKING_TIME):
        return price, True
    ctx = _CTX.copy()
    per_minute = ctx.divide(price, _D60)
    if not ctx.flags[Inexact]:
        return per_minute, True
    return per_minute.quantize(_E12), False


def _grace(parking: list[tuple[int, object, Conditions]]) -> tuple[list[tuple[int, object, Conditions]], int | None]:
    """Fold a grace period out of the parking components (see the module's rules)."""
    if len(parking) >= 2:
        _idx, comp, cond = parking[0]
        only_max = cond.replace(max_duration_s=None)
        g = cond.max_duration_s
        if comp.price == 0 and g and not only_max.restricted and any(c.price > 0 for _i, c, _k in parking[1:]):
            # a min_duration within the grace period says nothing more
            rest = [(i, c, k.replace(min_duration_s=None) if k.min_duration_s and k.min_duration_s <= g else k) for i, c, k in parking[1:]]
            return rest, g
    mins = {cond.min_duration_s for _i, _c, cond in parking}
    if parking and len(mins) == 1 and None not in mins and all(c.price > 0 for _i, c, _k in parking):
        g = mins.pop()
        return [(i, c, cond.replace(min_duration_s=None)) for i, c, cond in parking], g
    return parking, None


def price_display(tariff) -> PriceDisplay:
    """The price components of ``tariff`` a driver sees before starting, in display order (see the module)."""
    t = _compiled(tariff)
    with localcontext(_CTX):
        by_dim: dict[str, list[tuple[int, object, Conditions]]] = {d: [] for d in ORDER}
        closed: set[str] = set()
        for el in t.elements:
            if el.restrictions.reservation is not None:
                continue
            cond = Conditions.of(el.restrictions)
            for dim in ORDER:
                comp = el.components.get(dim)
                if comp is None or dim in closed:
                    continue
                by_dim[dim].append((el.index, comp, cond))
                if not cond.restricted:
                    closed.add(dim)  # nothing after an unrestricted price can apply
        grace = None
        by_dim[PARKING_TIME], grace = _grace(by_dim[PARKING_TIME])
        out: list[DisplayComponent] = []
        for dim in ORDER:
            entries = by_dim[dim]
            for n, (idx, comp, cond) in enumerate(entries):
                excl, exact = _per_unit(dim, comp.price)
                incl = excl * comp.factor if comp.vat is not None else excl
                if not exact:
                    incl = (comp.price * comp.factor / _D60).quantize(_E12) if comp.vat is not None else excl
                out.append(DisplayComponent(
                    dimension=dim,
                    unit=UNITS[dim],
                    price_excl_vat=excl,
                    price_incl_vat=incl,
                    vat_rate=comp.vat,
                    exact=exact,
                    price_per_hour_excl_vat=comp.price if dim in (TIME, PARKING_TIME) else None,
                    step_size=comp.step_size,
                    element=idx,
                    conditions=cond,
                    otherwise=n > 0 and not cond.restricted,
                    grace_period_s=grace if dim == PARKING_TIME else None,
                ))
        rates = sorted({c.vat_rate for c in out if c.vat_rate is not None})
        no_vat = any(c.vat_rate is None for c in out)

        def bound(b):
            if b is None:
                return None
            excl, incl = b
            if incl is None and len(rates) == 1 and not no_vat:
                incl = excl * (1 + rates[0] / _D100)
            elif incl is None and not rates:
                incl = excl  # no VAT anywhere
            return excl, incl

        return PriceDisplay(
            currency=t.currency,
            components=tuple(out),
            vat_rates=tuple(rates),
            no_vat_components=no_vat,
            min_price=bound(t.min_price),
            max_price=bound(t.max_price),
        )


# --------------------------------------------------------------------------- the default hold


@dataclass(frozen=True, slots=True)
class HoldPolicy:
    """The limits a session is held for when the driver sets no cap of their own.

    60 kWh fills most car batteries from low to 80 %; 4 h of charging covers an
    AC top-up; 2 h of idle time bounds what the idle fee can add. The energy
    limit is also capped by what the connector can deliver in the charging time
    (a 3.7 kW plug cannot take 60 kWh in 4 h), so slow connectors get smaller holds.
    """

    max_energy_kwh: Decimal = Decimal(60)
    max_duration: timedelta = timedelta(hours=4)
    max_idle: timedelta = timedelta(hours=2)


DEFAULT_HOLD_POLICY = HoldPolicy()


@dataclass(frozen=True, slots=True)
class DefaultHold:
    """The card hold for a session started now, and the limits at which that session stops."""

    amount: Money
    max_energy_kwh: Decimal  # the session stops at this much energy
    max_duration: timedelta  # ... or after this much charging time
    max_idle: timedelta  # idle fees are covered up to this long


def default_hold(
    tariff,
    *,
    currency: str,
    max_power_kw: Decimal | int,
    start: datetime,
    time_zone: str | None,
    policy: HoldPolicy = DEFAULT_HOLD_POLICY,
) -> DefaultHold:
    """The hold for a session at a connector of ``max_power_kw`` starting at ``start`` (``hold_for`` under ``policy``).

    Raises ``TariffNotActive`` when the tariff's own validity excludes ``start``.
    """
    t = _compiled(tariff)
    with localcontext(_CTX):
        deliverable = (Decimal(max_power_kw) * Decimal(int(policy.max_duration.total_seconds())) / Decimal(3600)).quantize(
            Decimal("0.001"), rounding=ROUND_DOWN)
        energy = min(policy.max_energy_kwh, deliverable)
    amount = hold_for(t, currency=currency, max_energy_kwh=energy, max_duration=policy.max_duration, max_idle=policy.max_idle,
                      time_zone=time_zone, start=start)
    return DefaultHold(amount=amount, max_energy_kwh=energy, max_duration=policy.max_duration, max_idle=policy.max_idle)
