"""Electricity meter tariffs: a small documented schema, validation, and exact pricing of intervals.

OCPI tariffs (``payments.tariffs``) price a charging session; they have no
monthly tiers and no demand charge, so meters use this schema instead.

The tariff document, version "1"
--------------------------------
All prices are per kWh (per kW for demand) in major units **excluding VAT**,
written as JSON numbers read as ``Decimal`` (``payments.tariff_store.loads``),
numeric strings, ints or Decimals. Floats are refused: a price must be exact.

.. code-block:: json

    {
      "version": "1",                  # optional; "1" if present
      "currency": "EUR",               # ISO 4217
      "vat": 21,                       # percent, 0..100
      "kind": "flat" | "tou" | "tiered",
      "energy_price": 0.15,            # kind "flat": per kWh
      "tou": {                         # kind "tou"
        "seasons": [{"months": [6, 7, 8, 9],
                     "windows": [{"days": [1, 2, 3, 4, 5], "start": "10:00",
                                  "end": "14:00", "band": "peak"},
                                 {"days": [1, 2, 3, 4, 5, 6, 7], "start": "22:00",
                                  "end": "06:00", "band": "valley"}]}],
        "prices": {"peak": 0.25, "flat": 0.15, "valley": 0.08}
      },
      "tiers": [{"up_to_kwh": 150, "price": 0.10},   # kind "tiered": per billing month
                {"up_to_kwh": null, "price": 0.20}],
      "demand_charge_per_kw": 4.5      # optional, any kind: per kW of the month's maximum demand
    }

Time-of-use rules
-----------------
* Times are the building's local wall-clock time (``tz``), to the minute;
  ``days`` are ISO weekdays (1 = Monday … 7 = Sunday); ``end`` may be "24:00".
* A window is ``[start, end)``. A window whose ``end`` is before its ``start``
  crosses midnight: it starts on the listed day and ends on the next.
  ``start == end`` is refused (write "00:00"–"24:00" for a whole day).
  Windows of one season may not overlap; a month belongs to at most one season.
* Any time no window covers — and every day of a month in no season — is "flat".
* The band of an instant is looked up in the season of the instant's local
  date (so at a season change a window that crosses midnight stops there).
* Across a DST change the wall clock decides: in Europe/Madrid a 01:00–03:00
  window on the last Sunday of March lasts one real hour, of October three.

Pricing an interval (``price_interval``)
----------------------------------------
A reading interval ``[start, end)`` of ``kwh`` is assumed to be consumed at a
constant rate, so:

* **TOU**: the interval is cut at every instant its band may change (window
  edges, local midnights, DST transitions). Each piece gets the share of the
  kWh proportional to its real duration (microseconds, not wall-clock), by the
  largest remainder method in steps of 0.000001 kWh (or finer, when ``kwh``
  itself has more decimals): the pieces' kWh add up to ``kwh`` exactly, and a
  tie goes to the earlier piece. Pieces of the same band are summed.
* **Tiers** count the kWh of a billing month (local calendar month).
  ``month_kwh_before`` is what the meter used in the month of ``start`` before
  ``start``. An interval that crosses the start of a month is first split
  there in proportion to time (same rule as above); the part in the new month
  starts the new month's count at 0. Within a month, a part that crosses a
  tier's ``up_to_kwh`` is split exactly there.
* **Flat**: one band, "flat".

Amounts: each band's ``excl = kwh × unit_price`` and ``incl = excl × (1 +
vat/100)``, exact Decimals in major units; nothing is rounded here. Callers
round once per interval with ``IntervalPrice.amount()`` (``to_minor`` of the
exact total incl. VAT, half up); the VAT of the interval is
``amount() − net()``, so the net and the VAT always add up to the amount.

No Flask, no database here.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from payments import money
from payments.money import Money, MoneyError, check_currency, to_minor

__all__ = [
    "BANDS",
    "BandLine",
    "CompiledMeterTariff",
    "IntervalPrice",
    "MeterTariffError",
    "band_at",
    "compile_tariff",
    "demand_charge",
    "month_start",
    "next_change",
    "price_interval",
    "split_by_month",
    "validate_tariff",
]

BANDS = ("peak", "flat", "valley")
KINDS = ("flat", "tou", "tiered")
SCHEMA_VERSION = "1"
_UTC = dt.UTC
_WEEK_MIN = 7 * 1440
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")
_NUMERIC = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*$")
_QUANTUM_EXP = -6  # kWh shares are allocated in steps of 0.000001 kWh (1 mWh)
_NEXT_CHANGE_HORIZON = dt.timedelta(days=8)
_FLAT, _PEAK, _VALLEY = 1, 0, 2  # indices into BANDS
_ONE = Decimal(1)
_ZERO = Decimal(0)


class MeterTariffError(ValueError):
    """A meter tariff document that cannot be used: ``field`` is its path, ``reason`` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- parsing


def _number(value: object, path: str, *, maximum: Decimal | None = None) -> Decimal:
    """A non-negative finite Decimal from a Decimal, int or numeric string; floats are refused."""
    if isinstance(value, bool):
        raise MeterTariffError(path, "must be a number")
    if isinstance(value, float):
        raise MeterTariffError(path, "must be an exact number (a JSON number read as Decimal, or a string), not a float")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str) and _NUMERIC.match(value):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
            raise MeterTariffError(path, "must be a number") from None
    else:
        raise MeterTariffError(path, "must be a number")
    if not d.is_finite():
        raise MeterTariffError(path, "must be a finite number")
    if d < 0:
        raise MeterTariffError(path, "must be ≥ 0")
    if maximum is not None and d > maximum:
        raise MeterTariffError(path, f"must be ≤ {maximum}")
    return d


def _minute(value: object, path: str, *, allow_24: bool) -> int:
    """Minutes since midnight from "HH:MM" ("24:00" only where ``allow_24``)."""
    if not isinstance(value, str) or not _HHMM.match(value):
        raise MeterTariffError(path, 'must be a time "HH:MM" (00:00 to 23:59' + (', or 24:00)' if allow_24 else ")"))
    if value == "24:00":
        if not allow_24:
            raise MeterTariffError(path, "24:00 is only allowed as an end")
        return 1440
    return int(value[:2]) * 60 + int(value[3:])


def _int_list(value: object, path: str, lo: int, hi: int, what: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise MeterTariffError(path, f"must be a non-empty list of {what} ({lo} to {hi})")
    out = []
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise MeterTariffError(f"{path}[{k}]", f"must be an integer from {lo} to {hi}")
        if v in out:
            raise MeterTariffError(f"{path}[{k}]", f"{v} is listed twice")
        out.append(v)
    return out


def _zone(tz: object) -> dt.tzinfo:
    """A tzinfo from an IANA name or a tzinfo."""
    if isinstance(tz, dt.tzinfo):
        return tz
    return _zone_named(tz)


@lru_cache(maxsize=256)
def _zone_named(name: object) -> dt.tzinfo:
    if name in (None, "UTC", "Etc/UTC", "Z"):
        return _UTC
    try:
        return ZoneInfo(name)  # type: ignore[arg-type]
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise MeterTariffError("tz", f"unknown IANA time zone: {name!r}") from None


def _aware(d: object, path: str) -> dt.datetime:
    if not isinstance(d, dt.datetime) or d.tzinfo is None:
        raise MeterTariffError(path, "must be a timezone-aware datetime")
    return d


# --------------------------------------------------------------------------- compiled tariff


@dataclass(frozen=True, slots=True)
class Season:
    """One TOU season, compiled: the band of every minute of the week, and where it changes."""

    grid: bytes  # 7 × 1440 band indices, Monday 00:00 first
    changes_by_weekday: tuple[tuple[int, ...], ...]  # per ISO weekday - 1: minutes of that day where the band changes


@dataclass(frozen=True, slots=True)
class Tier:
    up_to_kwh: Decimal | None  # cumulative kWh of the month; None = no upper bound
    price: Decimal


@dataclass(frozen=True, eq=False)
class CompiledMeterTariff:
    """A validated meter tariff ready for pricing (immutable; build it with ``compile_tariff``)."""

    currency: str
    vat: Decimal  # percent
    kind: str
    energy_price: Decimal | None = None
    prices: tuple[Decimal, Decimal, Decimal] | None = None  # peak, flat, valley
    season_of_month: tuple[int, ...] = ()  # 13 entries (index 0 unused): season index or -1
    seasons: tuple[Season, ...] = ()
    tiers: tuple[Tier, ...] = ()
    demand_charge_per_kw: Decimal | None = None
    doc: Mapping = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def vat_factor(self) -> Decimal:
        """1 + vat/100, exact."""
        return 1 + self.vat / 100


def compile_tariff(doc: Mapping) -> CompiledMeterTariff:
    """Validate a tariff document and compile it, or raise ``MeterTariffError(field, reason)``."""
    if not isinstance(doc, Mapping):
        raise MeterTariffError("", "a tariff must be a JSON object")
    known = {"version", "currency", "vat", "kind", "energy_price", "tou", "tiers", "demand_charge_per_kw", "name", "description"}
    for key in doc:
        if key not in known:
            raise MeterTariffError(str(key), "unknown field")
    if "version" in doc and doc["version"] != SCHEMA_VERSION:
        raise MeterTariffError("version", f'must be "{SCHEMA_VERSION}"')
    try:
        currency = check_currency(doc.get("currency"))  # type: ignore[arg-type]
    except MoneyError:
        raise MeterTariffError("currency", "must be an ISO 4217 currency code such as EUR") from None
    if "vat" not in doc:
        raise MeterTariffError("vat", "is required (percent, e.g. 21)")
    vat = _number(doc["vat"], "vat", maximum=Decimal(100))
    kind = doc.get("kind")
    if kind not in KINDS:
        raise MeterTariffError("kind", 'must be "flat", "tou" or "tiered"')
    for other, owner in (("energy_price", "flat"), ("tou", "tou"), ("tiers", "tiered")):
        if other in doc and kind != owner:
            raise MeterTariffError(other, f'is only allowed when kind is "{owner}"')
    demand = None
    if doc.get("demand_charge_per_kw") is not None:
        demand = _number(doc["demand_charge_per_kw"], "demand_charge_per_kw")
    common = dict(currency=currency, vat=vat, kind=kind, demand_charge_per_kw=demand, doc=doc)
    if kind == "flat":
        if "energy_price" not in doc:
            raise MeterTariffError("energy_price", 'is required when kind is "flat"')
        return CompiledMeterTariff(energy_price=_number(doc["energy_price"], "energy_price"), **common)
    if kind == "tiered":
        return CompiledMeterTariff(tiers=_tiers(doc.get("tiers")), **common)
    prices, season_of_month, seasons = _tou(doc.get("tou"))
    return CompiledMeterTariff(prices=prices, season_of_month=season_of_month, seasons=seasons, **common)


def validate_tariff(doc: Mapping) -> None:
    """Raise ``MeterTariffError(field, reason)`` if ``doc`` is not a valid meter tariff; return None if it is."""
    compile_tariff(doc)


def _tiers(raw: object) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise MeterTariffError("tiers", 'must be a non-empty list of {"up_to_kwh", "price"} when kind is "tiered"')
    out: list[Tier] = []
    for i, tier in enumerate(raw):
        path = f"tiers[{i}]"
        if not isinstance(tier, Mapping):
            raise MeterTariffError(path, "must be an object")
        for key in tier:
            if key not in ("up_to_kwh", "price"):
                raise MeterTariffError(f"{path}.{key}", "unknown field")
        if "price" not in tier:
            raise MeterTariffError(f"{path}.price", "is required")
        price = _number(tier["price"], f"{path}.price")
        up = tier.get("up_to_kwh")
        last = i == len(raw) - 1
        if up is None:
            if not last:
                raise MeterTariffError(f"{path}.up_to_kwh", "only the last tier may be unbounded (null)")
            out.append(Tier(None, price))
            continue
        if last:
            raise MeterTariffError(f"{path}.up_to_kwh", "the last tier must be unbounded (null)")
        upper = _number(up, f"{path}.up_to_kwh")
        if upper <= 0 or (out and upper <= out[-1].up_to_kwh):  # type: ignore[operator]
            raise MeterTariffError(f"{path}.up_to_kwh", "must be greater than the previous tier's")
        out.append(Tier(upper, price))
    return tuple(out)


def _tou(raw: object) -> tuple[tuple[Decimal, Decimal, Decimal], tuple[int, ...], tuple[Season, ...]]:
    if not isinstance(raw, Mapping):
        raise MeterTariffError("tou", 'must be an object with "seasons" and "prices" when kind is "tou"')
    for key in raw:
        if key not in ("seasons", "prices"):
            raise MeterTariffError(f"tou.{key}", "unknown field")
    prices_raw = raw.get("prices")
    if not isinstance(prices_raw, Mapping):
        raise MeterTariffError("tou.prices", 'must be an object {"peak", "flat", "valley"}')
    for key in prices_raw:
        if key not in BANDS:
            raise MeterTariffError(f"tou.prices.{key}", 'unknown band (use "peak", "flat" or "valley")')
    if "flat" not in prices_raw:
        raise MeterTariffError("tou.prices.flat", "is required (times no window covers are flat)")
    seasons_raw = raw.get("seasons")
    if not isinstance(seasons_raw, list):
        raise MeterTariffError("tou.seasons", "must be a list")
    used_bands = set()
    season_of_month = [-1] * 13
    seasons: list[Season] = []
    for i, season in enumerate(seasons_raw):
        spath = f"tou.seasons[{i}]"
        if not isinstance(season, Mapping):
            raise MeterTariffError(spath, "must be an object")
        for key in season:
            if key not in ("months", "windows", "name"):
                raise MeterTariffError(f"{spath}.{key}", "unknown field")
        months = _int_list(season.get("months"), f"{spath}.months", 1, 12, "months")
        for k, m in enumerate(months):
            if season_of_month[m] != -1:
                raise MeterTariffError(f"{spath}.months[{k}]", f"month {m} is already in season {season_of_month[m]}")
            season_of_month[m] = i
        windows = season.get("windows")
        if not isinstance(windows, list):
            raise MeterTariffError(f"{spath}.windows", "must be a list")
        grid = bytearray([_FLAT] * _WEEK_MIN)
        owner = [-1] * _WEEK_MIN
        for j, w in enumerate(windows):
            wpath = f"{spath}.windows[{j}]"
            if not isinstance(w, Mapping):
                raise MeterTariffError(wpath, "must be an object")
            for key in w:
                if key not in ("days", "start", "end", "band"):
                    raise MeterTariffError(f"{wpath}.{key}", "unknown field")
            days = _int_list(w.get("days"), f"{wpath}.days", 1, 7, "ISO weekdays")
            start = _minute(w.get("start"), f"{wpath}.start", allow_24=False)
            end = _minute(w.get("end"), f"{wpath}.end", allow_24=True)
            if start == end:
                raise MeterTariffError(f"{wpath}.end", 'must differ from start (use "00:00" to "24:00" for a whole day)')
            band = w.get("band")
            if band not in BANDS:
                raise MeterTariffError(f"{wpath}.band", 'must be "peak", "flat" or "valley"')
            used_bands.add(band)
            length = end - start if end > start else 1440 - start + end
            for d in days:
                base = (d - 1) * 1440 + start
                for k in range(length):
                    m = (base + k) % _WEEK_MIN
                    if owner[m] != -1:
                        raise MeterTariffError(wpath, f"overlaps window {owner[m]} of this season")
                    owner[m] = j
                    grid[m] = BANDS.index(band)
        changes = tuple(
            tuple(m for m in range(day * 1440, (day + 1) * 1440) if grid[m] != grid[m - 1]) for day in range(7)
        )
        seasons.append(Season(bytes(grid), tuple(tuple(m - day * 1440 for m in changes[day]) for day in range(7))))
    for band in used_bands:
        if band not in prices_raw:
            raise MeterTariffError(f"tou.prices.{band}", "is required: a window uses this band")
    prices = tuple(_number(prices_raw[b], f"tou.prices.{b}") if b in prices_raw else Decimal(0) for b in BANDS)
    return prices, tuple(season_of_month), tuple(seasons)  # type: ignore[return-value]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class BandLine:
    """The part of an interval priced at one band (or tier): kWh, unit price excl. VAT, amounts exact.

    Reads as an object (``line.kwh``) or a mapping (``line["kwh"]``).
    """

    band: str  # "peak" | "flat" | "valley" | "tier1" | "tier2" …
    kwh: Decimal
    unit_price: Decimal
    excl: Decimal
    incl: Decimal

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_json(self) -> dict:
        """Strings for the Decimals, for ``breakdown_json``."""
        return {"band": self.band, "kwh": str(self.kwh), "unit_price": str(self.unit_price), "excl": str(self.excl), "incl": str(self.incl)}


@dataclass(frozen=True, slots=True)
class IntervalPrice:
    """An interval priced: its band lines and exact totals in major units (not rounded)."""

    currency: str
    vat: Decimal  # percent
    kwh: Decimal
    bands: tuple[BandLine, ...]
    excl: Decimal
    incl: Decimal

    def amount(self) -> Money:
        """The interval's amount incl. VAT in minor units (half up, once)."""
        return to_minor(self.incl, self.currency)

    def net(self) -> Money:
        """The amount excl. VAT in minor units (half up)."""
        return to_minor(self.excl, self.currency)

    @property
    def amount_minor(self) -> int:
        """``amount().amount`` without building Money (the same rule: ``to_minor``'s rounding and exponent)."""
        return _minor(self.incl, self.currency)

    @property
    def net_minor(self) -> int:
        """``net().amount`` without building Money."""
        return _minor(self.excl, self.currency)

    def vat_amount(self) -> Money:
        """``amount() − net()``: so net + VAT = amount, always."""
        return self.amount() - self.net()

    def as_json(self) -> dict:
        """The breakdown as JSON-safe values (Decimals as strings)."""
        return {
            "currency": self.currency,
            "vat": str(self.vat),
            "kwh": str(self.kwh),
            "bands": [b.as_json() for b in self.bands],
            "excl": str(self.excl),
            "incl": str(self.incl),
        }

    def as_json_text(self) -> str:
        """``json.dumps(self.as_json(), separators=(",", ":"))``, the same text, written directly (an ingest stores one per interval)."""
        # A Decimal's str is digits, ".", "-", "E" and "+": nothing to escape; the band and currency are checked.
        bands = ",".join(
            f'{{"band":{_js(b.band)},"kwh":"{b.kwh}","unit_price":"{b.unit_price}","excl":"{b.excl}","incl":"{b.incl}"}}' for b in self.bands)
        return (f'{{"currency":{_js(self.currency)},"vat":"{self.vat}","kwh":"{self.kwh}","bands":[{bands}],'
                f'"excl":"{self.excl}","incl":"{self.incl}"}}')


_JSON_PLAIN = re.compile(r"^[A-Za-z0-9.+\-]*$")


def _js(text: str) -> str:
    """A JSON string literal of ``text``, as ``json.dumps`` writes it (quoted as is when nothing needs escaping)."""
    return f'"{text}"' if _JSON_PLAIN.match(text) else json.dumps(text)


@lru_cache(maxsize=64)
def _exponent(currency: str) -> int:
    return money.exponent(currency)


def _minor(amount: Decimal, currency: str) -> int:
    """``to_minor(amount, currency).amount`` with the currency's exponent cached (to_minor asks CLDR on every call,
    which costs more than pricing an interval); same rounding (``payments.money.ROUNDING``, half up)."""
    return int(amount.scaleb(_exponent(currency)).quantize(_ONE, rounding=money.ROUNDING))


# --------------------------------------------------------------------------- time helpers


def _to_utc(local_date: dt.date, minute: int, tz: dt.tzinfo, fold: int) -> dt.datetime:
    """The UTC instant of a local wall-clock time (``fold`` picks the first or second of a repeated hour)."""
    h, m = divmod(minute, 60)
    return dt.datetime(local_date.year, local_date.month, local_date.day, h, m, tzinfo=tz, fold=fold).astimezone(_UTC)


def _transitions(tz: dt.tzinfo, t0: dt.datetime, t1: dt.datetime) -> list[dt.datetime]:
    """Instants in (t0, t1) where the zone's UTC offset changes (to the second)."""
    if tz is _UTC:
        return []
    out = []
    step = dt.timedelta(hours=12)  # real zones change offset at most once in 12 hours
    a = t0
    off_a = a.astimezone(tz).utcoffset()
    while a < t1:
        b = min(a + step, t1)
        off_b = b.astimezone(tz).utcoffset()
        if off_b != off_a:
            lo, hi = 0, int((b - a).total_seconds())
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if (a + dt.timedelta(seconds=mid)).astimezone(tz).utcoffset() == off_a:
                    lo = mid
                else:
                    hi = mid
            x = a + dt.timedelta(seconds=hi)
            if t0 < x < t1:
                out.append(x)
        a, off_a = b, off_b
    return out


def _day_edges(t: CompiledMeterTariff, tz: dt.tzinfo, day: dt.date) -> tuple[dt.datetime, ...]:
    """UTC instants of ``day``'s local midnight and band changes (both folds), cached per tariff."""
    key = ("edges", tz, day)
    hit = t._cache.get(key)
    if hit is not None:
        return hit
    minutes = [0]
    season = t.season_of_month[day.month]
    if season >= 0:
        minutes += t.seasons[season].changes_by_weekday[day.isoweekday() - 1]
    out = set()
    for m in minutes:
        for fold in (0, 1):
            out.add(_to_utc(day, m, tz, fold))
    # The zone's offset changes during this local day (a DST transition is a cut too).
    out.update(_transitions(tz, _to_utc(day, 0, tz, 0), _to_utc(day + dt.timedelta(days=1), 0, tz, 1)))
    edges = tuple(sorted(out))
    if len(t._cache) > 4096:
        t._cache.clear()
    t._cache[key] = edges
    return edges


def _band_index(t: CompiledMeterTariff, at: dt.datetime, tz: dt.tzinfo) -> int:
    local = at.astimezone(tz)
    season = t.season_of_month[local.month]
    if season < 0:
        return _FLAT
    return t.seasons[season].grid[(local.isoweekday() - 1) * 1440 + local.hour * 60 + local.minute]


def _cuts(t: CompiledMeterTariff, start: dt.datetime, end: dt.datetime, tz: dt.tzinfo) -> list[dt.datetime]:
    """Instants in (start, end) where the TOU band may change."""
    d0 = start.astimezone(tz).date() - dt.timedelta(days=1)
    d1 = end.astimezone(tz).date() + dt.timedelta(days=1)
    cuts: set[dt.datetime] = set()
    day = d0
    while day <= d1:
        edges = _day_edges(t, tz, day)
        i = bisect.bisect_right(edges, start)
        while i < len(edges) and edges[i] < end:
            cuts.add(edges[i])
            i += 1
        day += dt.timedelta(days=1)
    return sorted(cuts)


def _us(td: dt.timedelta) -> int:
    return (td.days * 86400 + td.seconds) * 1_000_000 + td.microseconds


def _allocate(kwh: Decimal, weights: list[int]) -> list[Decimal]:
    """Split ``kwh`` in proportion to integer ``weights``, exactly (largest remainder; ties to the earlier)."""
    if len(weights) == 1:
        return [kwh]
    exp = min(_QUANTUM_EXP, kwh.as_tuple().exponent)  # type: ignore[arg-type]
    quanta = int(kwh.scaleb(-exp))
    total = sum(weights)
    shares = [quanta * w // total for w in weights]
    left = quanta - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(quanta * weights[i] % total), i))
    for i in order[:left]:
        shares[i] += 1
    return [Decimal(q).scaleb(exp) for q in shares]


def month_start(at: dt.datetime, tz: object) -> dt.datetime:
    """The UTC instant the local calendar month of ``at`` began (a billing month)."""
    zone = _zone(tz)
    local = at.astimezone(zone)
    return dt.datetime(local.year, local.month, 1, tzinfo=zone).astimezone(_UTC)


def _next_month(d: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    local = d.astimezone(zone)
    y, m = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return dt.datetime(y, m, 1, tzinfo=zone).astimezone(_UTC)


def split_by_month(start: dt.datetime, end: dt.datetime, kwh: Decimal, tz: object) -> list[tuple[str, dt.datetime, dt.datetime, Decimal]]:
    """``[(\"YYYY-MM\", part_start, part_end, part_kwh)]``: an interval cut at local month starts, kWh by time.

    The same rule ``price_interval`` uses for tiers (largest remainder in
    0.000001 kWh steps), so a monthly bill can attribute an interval that
    crosses a month start exactly as it was priced.
    """
    zone = _zone(tz)
    points = [start]
    nxt = _next_month(start, zone)
    while nxt < end:
        points.append(nxt)
        nxt = _next_month(nxt, zone)
    points.append(end)
    parts = _allocate(kwh, [_us(b - a) for a, b in zip(points, points[1:])]) if len(points) > 2 else [kwh]
    out = []
    for (a, b), k in zip(zip(points, points[1:]), parts):
        local = a.astimezone(zone)
        out.append((f"{local.year:04d}-{local.month:02d}", a, b, k))
    return out


# --------------------------------------------------------------------------- pricing


def _line(band: str, kwh: Decimal, unit: Decimal, vat_factor: Decimal) -> BandLine:
    excl = kwh * unit
    return BandLine(band, kwh, unit, excl, excl * vat_factor)


def price_interval(
    t: CompiledMeterTariff,
    start: dt.datetime,
    end: dt.datetime,
    kwh: Decimal,
    *,
    tz: object,
    month_kwh_before: Decimal = Decimal(0),
) -> IntervalPrice:
    """Price ``kwh`` consumed in ``[start, end)`` (see the module docstring for the split rules).

    ``tz`` is the building's IANA zone (or a tzinfo); ``month_kwh_before`` is
    the kWh the meter used in ``start``'s billing month before ``start`` (tiers
    only). Returns exact Decimals; nothing is rounded.
    """
    _aware(start, "start")
    _aware(end, "end")
    if not isinstance(kwh, Decimal) or not kwh.is_finite() or kwh < 0:
        raise MeterTariffError("kwh", "must be a finite Decimal ≥ 0")
    if end <= start:
        raise MeterTariffError("end", "must be after start")
    with localcontext() as ctx:
        ctx.prec = 60  # products of 18-digit kWh and prices stay exact
        vf = t.vat_factor
        if t.kind == "flat":
            lines = [_line("flat", kwh, t.energy_price, vf)]  # type: ignore[arg-type]
        elif t.kind == "tou":
            lines = _price_tou(t, start, end, kwh, _zone(tz), vf)
        else:
            lines = _price_tiers(t, start, end, kwh, _zone(tz), month_kwh_before, vf)
        excl = sum((b.excl for b in lines), Decimal(0))
        incl = sum((b.incl for b in lines), Decimal(0))
    return IntervalPrice(t.currency, t.vat, kwh, tuple(lines), excl, incl)


def _tou_pieces(t: CompiledMeterTariff, start: dt.datetime, end: dt.datetime, zone: dt.tzinfo) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(bands, weights)`` of ``[start, end)``'s pieces (weights None: one band throughout), cached per tariff.

    Depends on the span only, not on the kWh, and a collector reads its
    meters at the same instants: one batch of a building asks the same spans
    again and again.
    """
    key = ("pieces", zone, start, end)
    hit = t._cache.get(key)
    if hit is not None:
        return hit
    points = [start, *_cuts(t, start, end, zone), end]
    bands = tuple(_band_index(t, a, zone) for a in points[:-1])
    if len(set(bands)) == 1:
        hit = (bands[:1], None)
    else:
        hit = (bands, tuple(_us(b - a) for a, b in zip(points, points[1:])))
    if len(t._cache) > 4096:
        t._cache.clear()
    t._cache[key] = hit
    return hit


def _price_tou(t: CompiledMeterTariff, start: dt.datetime, end: dt.datetime, kwh: Decimal, zone: dt.tzinfo, vf: Decimal) -> list[BandLine]:
    bands, weights = _tou_pieces(t, start, end, zone)
    if weights is None:
        return [_line(BANDS[bands[0]], _ZERO + kwh, t.prices[bands[0]], vf)]  # type: ignore[index]  # as the sum below writes it
    shares = _allocate(kwh, list(weights))
    per_band: dict[int, Decimal] = {}
    for b, k in zip(bands, shares):
        per_band[b] = per_band.get(b, Decimal(0)) + k
    if kwh:  # a band that gets no kWh is left out
        per_band = {b: k for b, k in per_band.items() if k}
    return [_line(BANDS[b], per_band[b], t.prices[b], vf) for b in sorted(per_band)]  # type: ignore[index]


def _tier_split(tiers: tuple[Tier, ...], used: Decimal, kwh: Decimal) -> list[tuple[int, Decimal]]:
    """``[(tier index, kWh)]`` for ``kwh`` consumed after ``used`` kWh of the month."""
    out = []
    left = kwh
    for i, tier in enumerate(tiers):
        if left <= 0:
            break
        if tier.up_to_kwh is None:
            out.append((i, left))
            break
        room = tier.up_to_kwh - used
        if room <= 0:
            continue
        take = min(room, left)
        out.append((i, take))
        used += take
        left -= take
    return out


def _price_tiers(
    t: CompiledMeterTariff, start: dt.datetime, end: dt.datetime, kwh: Decimal, zone: dt.tzinfo, before: Decimal, vf: Decimal
) -> list[BandLine]:
    if not isinstance(before, Decimal) or before < 0:
        raise MeterTariffError("month_kwh_before", "must be a Decimal ≥ 0")
    per_tier: dict[int, Decimal] = {}
    for n, (_month, _a, _b, part) in enumerate(split_by_month(start, end, kwh, zone)):
        for i, k in _tier_split(t.tiers, before if n == 0 else Decimal(0), part):
            if k:
                per_tier[i] = per_tier.get(i, Decimal(0)) + k
    if not per_tier:
        per_tier[0 if before <= 0 else _tier_at(t.tiers, before)] = Decimal(0)
    return [_line(f"tier{i + 1}", per_tier[i], t.tiers[i].price, vf) for i in sorted(per_tier)]


def _tier_at(tiers: tuple[Tier, ...], used: Decimal) -> int:
    """The tier the next kWh falls in after ``used`` kWh of the month."""
    for i, tier in enumerate(tiers):
        if tier.up_to_kwh is None or used < tier.up_to_kwh:
            return i
    return len(tiers) - 1  # pragma: no cover - the last tier is unbounded


def demand_charge(t: CompiledMeterTariff, max_kw: Decimal) -> tuple[Decimal, Decimal]:
    """``(excl, incl)`` of the month's demand charge: ``max_kw × demand_charge_per_kw`` (0 without one)."""
    if not isinstance(max_kw, Decimal) or not max_kw.is_finite() or max_kw < 0:
        raise MeterTariffError("max_kw", "must be a finite Decimal ≥ 0")
    if t.demand_charge_per_kw is None:
        return Decimal(0), Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 60
        excl = max_kw * t.demand_charge_per_kw
        return excl, excl * t.vat_factor


def band_at(t: CompiledMeterTariff, at: dt.datetime, tz: object, *, month_kwh: Decimal = Decimal(0)) -> tuple[str, Decimal, Decimal]:
    """``(band, unit price excl. VAT, vat percent)`` in force at ``at``.

    For a tiered tariff the band is the tier the next kWh falls in after
    ``month_kwh`` kWh of the month ("tier1" by default).
    """
    _aware(at, "at")
    if t.kind == "flat":
        return "flat", t.energy_price, t.vat  # type: ignore[return-value]
    if t.kind == "tiered":
        i = _tier_at(t.tiers, month_kwh)
        return f"tier{i + 1}", t.tiers[i].price, t.vat
    b = _band_index(t, at, _zone(tz))
    return BANDS[b], t.prices[b], t.vat  # type: ignore[index]


def next_change(t: CompiledMeterTariff, at: dt.datetime, tz: object) -> dt.datetime | None:
    """The next instant after ``at`` when the unit price changes, within 8 days; None if none.

    Flat and tiered tariffs do not change with time (tiers change with
    consumption), so they answer None. A change of band at the same price is
    not a change.
    """
    _aware(at, "at")
    if t.kind != "tou":
        return None
    zone = _zone(tz)
    now_price = t.prices[_band_index(t, at, zone)]  # type: ignore[index]
    for c in _cuts(t, at, at + _NEXT_CHANGE_HORIZON, zone):
        if t.prices[_band_index(t, c, zone)] != now_price:  # type: ignore[index]
            return c
    return None
