"""Meter readings in, priced intervals and prepaid wallet debits out: ``ingest``, ``declare_event``, tariff versions.

Readings
--------
A reading is a meter's register (kWh on its display) at an instant, plus
optionally the maximum demand (kW) since the previous reading. ``ingest``
takes a batch (at most ``MAX_BATCH`` rows) and answers each row
``accepted``, ``duplicate`` or ``rejected`` with a stable ``code`` and a
reason; one bad row never spoils the others.

* **Duplicates**: the same meter and instant with the same register (and
  demand) is ignored; with another value it is rejected (``conflict``): a
  register does not have two values at one instant.
* **Order**: rows are placed by their timestamp, whatever order they arrive
  in. A reading later than every other extends the meter's history; a late
  one lands between two readings, whose billed interval is then
  *superseded*: marked so, its debit reversed by a correction entry, and the
  two new intervals priced and debited. Readings are never deleted, so a
  superseded span never comes back, and each interval is billed once.
* **Monotonic register**: a reading below the previous one (or above the
  next one) of its segment is rejected (``below_previous`` /
  ``above_next``) unless a rollover or replacement was declared
  (``declare_event``) between them.
* Also rejected: an unknown meter or one of another operator
  (``unknown_meter``, the same answer, so a collector learns nothing of
  other operators), a bad number or timestamp, a timestamp without an offset
  or more than ``FUTURE_TOLERANCE`` in the future, a register above the
  meter's ``register_max_kwh``, and — for a prepaid meter — an instant with
  no tariff version in force (``no_tariff``: the collector may send it
  again once the operator set a tariff).

Segments and consumption
------------------------
A declared event (rollover or replacement) at instant E starts a new
segment: a reading's segment is the number of the meter's events at or
before its instant. Events may only be declared after the meter's last
reading. Energy between consecutive readings p and r is the register
difference × ``ct_multiplier``; across events it is ``(old_final − p) +
(r − new_start)`` (with every whole segment in between added).

Pricing and the ledger
----------------------
An interval ``[p.at, r.at)`` is priced (``payments.metering.price_interval``)
with the meter's tariff version in force at the interval's *start*, in the
building's time zone; tiers count the kWh of the meter's non-superseded
intervals earlier in the month. Rounding: once per interval, ``amount =
to_minor(incl)``, ``net = to_minor(excl)``, ``vat = amount − net``.

* **Prepaid tenant meters** are debited once per interval: the interval
  row (unique per meter and span) is the record of what was billed, and
  the batch books it in one balanced entry per currency — each meter's
  wallet debited with its new intervals' ``amount``, revenue credited with
  their ``net``, VAT payable with their ``vat``; key
  ``meter-intervals:<sha-256 of the intervals' keys>:<currency>`` (an
  interval's key is ``meter:<id>:interval:<start>/<end>``), reference
  ``meter:<id>`` when the batch is one meter's. A superseded interval's
  debit is reversed from its own amount and net by a correction entry of
  the same shape (``…:reversal``). One entry per batch, not per interval:
  the ledger work of a 1,000-reading batch is one entry and about 1,000
  postings instead of 1,000 entries and 3,000 postings.
* **Consumption is never refused.** The electricity was used, so the debit
  is booked even past the tenant's emergency credit: under the wallet's row
  lock the wallet's ``overdraft_limit_minor`` is raised to what is used (the
  ledger's CHECK still holds), the balance shows the true debt, and
  ``webapp.meters.relay`` disconnects the meter and lowers the limit back to
  the emergency credit as top-ups repay it.
* **Post-paid, master and public-area meters**: intervals are stored with
  ``amount_minor`` 0 and no breakdown; the monthly bill prices them.

Batches are booked in bulk (a few statements per batch, not per row) with
the ledger's rules (``payments.ledger.post_many``): each entry balanced, its
key unique (a key that exists fails the batch, which books nothing), the wallets' cached balances
changed by one UPDATE under their row locks, in account-id order. The reads
are few too: the batch's meters by code, their wallets, the meters locked
together with their last readings, their events and tariff versions.
Locks: meter wallets (id order), then meters (id order), then whatever
``relay.balance_changed`` takes (tenant) — the order ``webapp.meters.relay``
asks for, so a top-up running at the same time waits, never deadlocks.

Services ``flush()``; the caller commits.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from operator import itemgetter

from sqlalchemy import Enum, and_, bindparam, func, select, update
from sqlalchemy.orm import Session

from payments import metering
from payments.ledger import AccountKind, LedgerAccount, _copy, get_account, post_many
from payments.money import Money
from payments.tariff_store import dumps, loads
from webapp.db import utcnow
from webapp.meters.models import (
    Billing,
    MeterCollector,
    MeterEvent,
    MeterEventKind,
    MeterInterval,
    MeterReading,
    MeterTariff,
    MeterTariffVersion,
    Tenant,
)
from webapp.models import Meter, MeterKind, Site

__all__ = [
    "FUTURE_TOLERANCE",
    "MAX_BATCH",
    "BatchTooLarge",
    "IngestReport",
    "MeterEventError",
    "RowResult",
    "add_meter_tariff_version",
    "declare_event",
    "ingest",
    "interval_key",
    "meter_balance",
    "meter_wallet",
    "tariff_version_at",
]

MAX_BATCH = 1000
FUTURE_TOLERANCE = dt.timedelta(minutes=5)  # collector clocks drift a little
MAX_REGISTER = Decimal("999999999999999.999")  # Numeric(18, 3)
MAX_DEMAND = Decimal("999999999.999")  # Numeric(12, 3)
SOURCES = ("api", "csv", "manual", "final")
ACCEPTED, DUPLICATE, REJECTED = "accepted", "duplicate", "rejected"
DESCRIPTION = "Electricity consumption"
DESCRIPTION_REVERSAL = "Electricity consumption corrected (late reading)"
_THOUSANDTH = Decimal("0.001")


class BatchTooLarge(ValueError):
    """More than ``MAX_BATCH`` rows in one call."""


class MeterEventError(ValueError):
    """A rollover or replacement that cannot be declared; ``code`` is stable."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class RowResult:
    """What became of one row: ``status`` accepted/duplicate/rejected; ``code`` and ``reason`` when rejected."""

    index: int
    meter_code: str | None
    at: str | None
    status: str
    code: str | None = None
    reason: str | None = None

    def as_json(self) -> dict:
        """The API's shape."""
        out = {"index": self.index, "meter_code": self.meter_code, "at": self.at, "status": self.status}
        if self.status == REJECTED:
            out["code"] = self.code
            out["reason"] = self.reason
        return out


@dataclass(slots=True)
class IngestReport:
    """The per-row results of a batch and what it billed."""

    results: list[RowResult]
    intervals: int = 0  # intervals created
    superseded: int = 0  # intervals split by a late reading (and reversed)
    debited: dict[int, int] = field(default_factory=dict)  # meter id → net change of its wallet (minor units, debit +)

    def count(self, status: str) -> int:
        """How many rows ended ``status``."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def accepted(self) -> int:
        return self.count(ACCEPTED)

    @property
    def duplicates(self) -> int:
        return self.count(DUPLICATE)

    @property
    def rejected(self) -> int:
        return self.count(REJECTED)

    def as_json(self) -> dict:
        """``{"accepted", "duplicate", "rejected", "intervals", "results": [...]}``."""
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicates,
            "rejected": self.rejected,
            "intervals": self.intervals,
            "superseded": self.superseded,
            "results": [r.as_json() for r in self.results],
        }


# --------------------------------------------------------------------------- bulk statements


def _pg(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def _pg_type(s: Session, col) -> str:
    return col.type.compile(dialect=s.get_bind().dialect)


def _bulk_insert(s: Session, table, rows: list[dict], *, on_conflict_key: str | None = None, returning: tuple[str, ...] = ()) -> list:
    """Insert ``rows`` in one statement; on PostgreSQL as ``INSERT … SELECT FROM unnest(arrays)``.

    One statement text whatever the number of rows, so PostgreSQL parses and
    plans it once per connection, and one round trip carries the batch.
    Elsewhere (SQLite) an executemany. ``on_conflict_key``: skip rows whose
    key exists (``ON CONFLICT DO NOTHING``); ``returning``: columns of the
    inserted rows.
    """
    if not rows:
        return []
    cols = list(rows[0])
    if _pg(s) and not on_conflict_key and not returning:
        # COPY: the fastest way in; a row that breaks a constraint fails the whole batch (nothing is half-written).
        enums = [c for c in cols if isinstance(table.c[c].type, Enum)]
        if enums:  # enum members as their values (the only conversion COPY needs from us)
            rows = [{**r, **{c: _bind(table.c[c], r[c]) for c in enums}} for r in rows]
        _copy(s, table.name, cols, map(itemgetter(*cols), rows) if len(cols) > 1 else ((r[cols[0]],) for r in rows))
        return []
    if _pg(s):
        arrays = ", ".join(f"CAST(%({c})s AS {_pg_type(s, table.c[c])}[])" for c in cols)
        sql = f'INSERT INTO {table.name} ({", ".join(cols)}) SELECT * FROM unnest({arrays})'
        if on_conflict_key:
            sql += f" ON CONFLICT ({on_conflict_key}) DO NOTHING"
        if returning:
            sql += " RETURNING " + ", ".join(returning)
        return _pg_execute(s, sql, {c: [_bind(table.c[c], r[c]) for r in rows] for c in cols}, fetch=bool(returning))
    from payments.ledger import _insert_for  # the dialect's INSERT … ON CONFLICT

    stmt = _insert_for(s)(table)
    if on_conflict_key:
        stmt = stmt.on_conflict_do_nothing(index_elements=[on_conflict_key])
    if returning:
        return s.execute(stmt.returning(*(table.c[c] for c in returning)), rows).all()
    s.execute(stmt, rows)
    return []


def _pg_execute(s: Session, sql: str, params: dict, *, fetch: bool = False) -> list:
    """Run ``sql`` on the session's own connection (same transaction), results in psycopg's binary format.

    A parameter written ``%(x)b`` goes in binary too: for an array of
    timestamps that is several times cheaper than psycopg's text format.
    """
    raw = s.connection().connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute(sql, params, binary=True)
        return [tuple(r) for r in cur.fetchall()] if fetch else []


def _fetch(s: Session, stmt, pg_sql: str, params: dict) -> list:
    """The rows of a hot read (a thousand per batch): on PostgreSQL ``pg_sql`` straight through psycopg (one
    prepared statement, rows fetched at once, none of SQLAlchemy's per-row processing), elsewhere the same ``stmt``."""
    if _pg(s):
        return _pg_execute(s, pg_sql, params, fetch=True)
    return s.execute(stmt).all()


def _bind(col, value):
    """A value as its column type would bind it (enums as their value, UTC datetimes aware)."""
    if hasattr(value, "value") and not isinstance(value, (Decimal, dt.datetime)):
        return value.value
    return value


# --------------------------------------------------------------------------- wallet


def wallet_owner(meter_id: int) -> str:
    """The ledger owner of a meter's wallet."""
    return f"meter:{meter_id}"


def _wallet_currency(s: Session, meter: Meter) -> str:
    tenant = s.get(Tenant, meter.tenant_id) if meter.tenant_id else None
    if tenant is not None:
        return tenant.currency
    return s.get(Site, meter.site_id).currency


def meter_wallet(s: Session, meter: Meter) -> LedgerAccount:
    """The meter's wallet (``METER_WALLET``, owner ``meter:<id>``, the tenant's currency), created on first use.

    Created with the tenant's emergency credit as its overdraft limit;
    ``webapp.meters.relay`` keeps the limit in step afterwards.
    """
    tenant = s.get(Tenant, meter.tenant_id) if meter.tenant_id else None
    limit = tenant.emergency_credit_minor if tenant is not None else 0
    return get_account(s, AccountKind.METER_WALLET, _wallet_currency(s, meter), wallet_owner(meter.id), overdraft_limit_minor=limit)


def meter_balance(s: Session, meter: Meter) -> Money:
    """What the meter has left (negative while it uses emergency credit or owes); zero without a wallet yet."""
    currency = _wallet_currency(s, meter)
    raw = s.scalar(select(LedgerAccount.balance_minor).where(
        LedgerAccount.kind == AccountKind.METER_WALLET, LedgerAccount.owner == wallet_owner(meter.id), LedgerAccount.currency == currency))
    return Money(-(raw or 0), currency)  # credit-normal: the cached balance is debit-positive


# --------------------------------------------------------------------------- tariff versions

_COMPILED: dict[tuple[int, str], metering.CompiledMeterTariff] = {}


def _compiled(version_id: int, text: str) -> metering.CompiledMeterTariff:
    """The compiled tariff of a version (versions never change; cached by id and text)."""
    key = (version_id, text)
    hit = _COMPILED.get(key)
    if hit is None:
        if len(_COMPILED) > 512:
            _COMPILED.clear()
        hit = _COMPILED[key] = metering.compile_tariff(loads(text))
    return hit


def add_meter_tariff_version(s: Session, tariff: MeterTariff, doc: Mapping, effective_from: dt.datetime, created_by: str) -> MeterTariffVersion:
    """Add a version of ``tariff`` from ``effective_from``; raises ``MeterTariffError(field, reason)``.

    The document is validated (``payments.metering``). Billed history is not
    rewritten: a version may not take effect before the end of an interval
    already billed for a meter on this tariff (``effective_from``), and its
    currency must be the building's.
    """
    if effective_from.tzinfo is None:
        raise metering.MeterTariffError("effective_from", "must have a time zone")
    compiled = metering.compile_tariff(doc)
    site = s.get(Site, tariff.site_id)
    if site is not None and compiled.currency != site.currency:
        raise metering.MeterTariffError("currency", f"must be the building's currency ({site.currency})")
    billed = s.scalar(
        select(func.max(MeterInterval.end_at)).join(Meter, Meter.id == MeterInterval.meter_id)
        .where(Meter.tariff_id == tariff.id, MeterInterval.superseded.is_(False))
    )
    if billed is not None and effective_from < billed:
        raise metering.MeterTariffError("effective_from", f"intervals up to {billed.isoformat()} are already billed")
    number = (s.scalar(select(func.max(MeterTariffVersion.number)).where(MeterTariffVersion.tariff_id == tariff.id)) or 0) + 1
    v = MeterTariffVersion(tariff_id=tariff.id, number=number, effective_from=effective_from.astimezone(dt.UTC), currency=compiled.currency,
                           tariff_json=dumps(doc), created_by=created_by[:64])
    s.add(v)
    s.flush()
    return v


def tariff_version_at(s: Session, tariff_id: int, at: dt.datetime) -> MeterTariffVersion | None:
    """The version of a tariff in force at ``at`` (the latest ``effective_from <= at``)."""
    return s.scalar(select(MeterTariffVersion).where(MeterTariffVersion.tariff_id == tariff_id, MeterTariffVersion.effective_from <= at)
                    .order_by(MeterTariffVersion.effective_from.desc()).limit(1))


def compiled_version(v: MeterTariffVersion) -> metering.CompiledMeterTariff:
    """The compiled tariff of a stored version."""
    return _compiled(v.id, v.tariff_json)


# --------------------------------------------------------------------------- events


def declare_event(s: Session, meter: Meter, kind: MeterEventKind | str, at: dt.datetime, old_final_kwh: Decimal,
                  new_start_kwh: Decimal = Decimal(0), by: str = "") -> MeterEvent:
    """Declare a register rollover or a meter replacement at ``at``: readings from ``at`` on start a new segment.

    Refused (``MeterEventError``) unless ``at`` is after the meter's last
    reading and ``old_final_kwh`` is at least that reading's register (the
    old register cannot have gone backwards); a rollover starts from
    ``new_start_kwh`` (normally 0).
    """
    kind = MeterEventKind(kind)
    if at.tzinfo is None:
        raise MeterEventError("the instant needs a time zone", "naive_time")
    for name, value in (("old_final_kwh", old_final_kwh), ("new_start_kwh", new_start_kwh)):
        if not isinstance(value, Decimal) or not value.is_finite() or value < 0 or value > MAX_REGISTER or value != value.quantize(_THOUSANDTH):
            raise MeterEventError(f"{name} must be a number of kWh ≥ 0 with at most 3 decimals", "bad_number")
    s.execute(select(Meter.id).where(Meter.id == meter.id).with_for_update())
    last = s.execute(select(MeterReading.at, MeterReading.register_kwh, MeterReading.segment).where(MeterReading.meter_id == meter.id)
                     .order_by(MeterReading.at.desc()).limit(1)).first()
    last_event = s.scalar(select(func.max(MeterEvent.at)).where(MeterEvent.meter_id == meter.id))
    if last is not None and at <= last.at:
        raise MeterEventError(f"the meter has a reading at {last.at.isoformat()}: declare the event after its last reading", "not_after_last_reading")
    if last_event is not None and at <= last_event:
        raise MeterEventError("an event was already declared at or after this instant", "not_after_last_event")
    if last is not None and old_final_kwh < last.register_kwh and (last_event is None or last.at >= last_event):
        raise MeterEventError(f"the old register's final value is below its last reading ({last.register_kwh} kWh)", "below_last_reading")
    if meter.register_max_kwh is not None and kind is MeterEventKind.ROLLOVER and old_final_kwh > meter.register_max_kwh:
        raise MeterEventError(f"the register rolls over at {meter.register_max_kwh} kWh", "above_register_max")
    ev = MeterEvent(meter_id=meter.id, kind=kind, at=at.astimezone(dt.UTC), old_final_kwh=old_final_kwh, new_start_kwh=new_start_kwh,
                    declared_by=(by or "")[:64])
    s.add(ev)
    s.flush()
    return ev


# --------------------------------------------------------------------------- row parsing


def _reject(index: int, code_: str | None, at: str | None, code: str, reason: str) -> RowResult:
    return RowResult(index, code_, at, REJECTED, code, reason)


def _decimal(value: object, maximum: Decimal) -> Decimal | None:
    """A Decimal ≥ 0 with at most 3 decimals from a JSON number (read as Decimal), an int or a string; None if not."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            return None
    elif isinstance(value, float):  # from a caller that parsed JSON with floats: read the number it prints as
        d = Decimal(repr(value))
    else:
        return None
    if not d.is_finite() or d < 0 or d > maximum or d.as_tuple().exponent < -3:  # type: ignore[operator]
        return None
    return d


def _timestamp(value: object) -> dt.datetime | None:
    """An aware UTC datetime from ISO 8601 text with an offset ("Z" or "+01:00"); None if not."""
    if not isinstance(value, str) or len(value) < 19 or value[10] not in "Tt ":
        return None
    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if d.tzinfo is None:
        return None
    return d.astimezone(dt.UTC)


@dataclass(slots=True)
class _Row:
    index: int
    at: dt.datetime
    register: Decimal
    demand: Decimal | None


@dataclass(slots=True)
class _Reading:
    at: dt.datetime
    register: Decimal
    segment: int
    demand: Decimal | None
    new: bool = False


# --------------------------------------------------------------------------- ingest


@dataclass(slots=True)
class _MeterState:
    id: int
    code: str
    site_id: int
    kind: str
    prepaid: bool
    ct: int
    tenant_id: int | None
    tariff_id: int | None
    register_max: Decimal | None
    last_at: dt.datetime | None
    time_zone: str
    site_currency: str
    tenant_currency: str | None
    billing: str | None
    emergency: int
    threshold: int
    alerted_at: dt.datetime | None
    relay_state: str

    @property
    def debited(self) -> bool:
        """Whether its intervals are debited from a meter wallet as they are billed."""
        return self.kind == MeterKind.TENANT and self.prepaid and self.tenant_id is not None and self.billing == Billing.PREPAID


def interval_key(meter_id: int, start: dt.datetime, end: dt.datetime) -> str:
    """The idempotency key of an interval's debit: meter id + span (UTC, ISO 8601)."""
    return f"meter:{meter_id}:interval:{_iso(start)}/{_iso(end)}"


@lru_cache(maxsize=8192)
def _iso(d: dt.datetime) -> str:
    """``d`` in UTC, ISO 8601 with ``Z`` (microseconds only when there are some); cached: a batch's rows share instants."""
    return d.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def ingest(s: Session, *, operator_id: int, rows: Sequence[Mapping], source: str, now: dt.datetime,
           collector: MeterCollector | None = None) -> IngestReport:
    """Store a batch of readings of ``operator_id``'s meters, bill the new intervals, answer per row (module docstring).

    ``rows``: at most ``MAX_BATCH`` mappings ``{meter_code, at, register_kwh,
    demand_kw?}``. Raises ``BatchTooLarge`` for more. ``collector`` is the
    poster when it is one (the operator scope decides what it may post).
    Caller commits.
    """
    if len(rows) > MAX_BATCH:
        raise BatchTooLarge(f"at most {MAX_BATCH} readings per batch")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    results: list[RowResult | None] = [None] * len(rows)
    by_code: dict[str, list[_Row]] = defaultdict(list)
    horizon = now + FUTURE_TOLERANCE
    instants: dict[object, dt.datetime | None] = {}  # a collector's batch reads its meters at a few instants: parse each once
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            results[i] = _reject(i, None, None, "malformed", "each reading must be an object")
            continue
        code = row.get("meter_code")
        raw_at = row.get("at")
        at_text = raw_at if isinstance(raw_at, str) else None
        if not isinstance(code, str) or not code.strip() or len(code) > 16:
            results[i] = _reject(i, None, at_text, "unknown_meter", "unknown meter")
            continue
        code = code.strip()
        at = instants.get(raw_at, False) if at_text is not None else None
        if at is False:
            at = instants[raw_at] = _timestamp(raw_at)
        if at is None:
            results[i] = _reject(i, code, at_text, "bad_timestamp", "at must be an ISO 8601 date-time with an offset, e.g. 2025-01-31T12:00:00+01:00")
            continue
        if at > horizon:
            results[i] = _reject(i, code, at_text, "future", "the timestamp is in the future")
            continue
        reg = _decimal(row.get("register_kwh"), MAX_REGISTER)
        if reg is None:
            results[i] = _reject(i, code, at_text, "bad_number", "register_kwh must be a number ≥ 0 with at most 3 decimals")
            continue
        demand = None
        if row.get("demand_kw") not in (None, ""):
            demand = _decimal(row.get("demand_kw"), MAX_DEMAND)
            if demand is None:
                results[i] = _reject(i, code, at_text, "bad_number", "demand_kw must be a number ≥ 0 with at most 3 decimals")
                continue
        by_code[code].append(_Row(i, at, reg, demand))

    report = IngestReport(results=[])  # type: ignore[arg-type]
    if by_code:
        _ingest_parsed(s, operator_id, by_code, results, source, now, report)
    report.results = [r for r in results if r is not None]  # every row has a result by now
    return report


def _load_meters(s: Session, operator_id: int, codes: Iterable[str]) -> dict[str, _MeterState]:
    """The batch's meters of ``operator_id`` with their building and tenant, found by their (unique) codes."""
    codes = list(codes)
    q = (
        select(Meter.id, Meter.meter_code, Meter.site_id, Meter.kind, Meter.prepaid, Meter.ct_multiplier, Meter.tenant_id, Meter.tariff_id,
               Meter.register_max_kwh, Meter.last_reading_at, Site.time_zone, Site.currency, Tenant.currency, Tenant.billing,
               Tenant.emergency_credit_minor, Tenant.low_balance_threshold_minor, Tenant.low_balance_alerted_at, Meter.relay_state)
        # ``+ 0``: PostgreSQL may otherwise AND in the site's index, which lists every meter of the building.
        .join(Site, Site.id == Meter.site_id + 0)
        .outerjoin(Tenant, Tenant.id == Meter.tenant_id)
        .where(Meter.meter_code.in_(codes), Site.operator_id == operator_id)
    )
    rows = _fetch(s, q, "SELECT m.id, m.meter_code, m.site_id, m.kind, m.prepaid, m.ct_multiplier, m.tenant_id, m.tariff_id, m.register_max_kwh, "
                        "m.last_reading_at, s.time_zone, s.currency, t.currency, t.billing, t.emergency_credit_minor, "
                        "t.low_balance_threshold_minor, t.low_balance_alerted_at, m.relay_state "
                        "FROM meters AS m JOIN sites AS s ON s.id = m.site_id + 0 LEFT JOIN tenants AS t ON t.id = m.tenant_id "
                        "WHERE m.meter_code = ANY(%(codes)s) AND s.operator_id = %(op)s", {"codes": codes, "op": operator_id})
    out = {}
    for r in rows:
        out[r[1]] = _MeterState(r[0], r[1], r[2], r[3], bool(r[4]), int(r[5] or 1), r[6], r[7], r[8], r[9], r[10] or "UTC", r[11], r[12],
                                r[13], int(r[14] or 0), int(r[15] or 0), r[16], r[17])
    return out


def _wallet_ids(s: Session, currency: str, owners: list[str]) -> dict[str, int]:
    """Owner → id of the meter wallets in ``currency`` among ``owners``.

    On PostgreSQL each owner is looked up through the accounts' unique
    (kind, owner, currency) index by a subquery of its own: an ``owner =
    ANY(…)`` filter, or a join, may be planned (without statistics, as on a
    new building) as a scan comparing every account with every owner — 0.75 s
    per batch of 1,000 readings in a building of 10,000 meters.
    """
    if _pg(s):
        rows = _pg_execute(s, "SELECT o.owner, (SELECT w.id FROM ledger_accounts AS w WHERE w.kind = %(kind)s AND w.owner = o.owner "
                              "AND w.currency = %(currency)s) FROM unnest(CAST(%(owners)s AS TEXT[])) AS o(owner)",
                           {"owners": owners, "kind": AccountKind.METER_WALLET.value, "currency": currency}, fetch=True)
        return {owner: account_id for owner, account_id in rows if account_id is not None}
    t = LedgerAccount.__table__
    out: dict[str, int] = {}
    for i in range(0, len(owners), 500):
        out.update(s.execute(select(t.c.owner, t.c.id).where(t.c.kind == AccountKind.METER_WALLET.value, t.c.currency == currency,
                                                              t.c.owner.in_(owners[i:i + 500]))).all())
    return out


def _ensure_wallets(s: Session, meters: Iterable[_MeterState]) -> dict[int, int]:
    """Meter id → wallet account id for debited meters (accounts created in bulk on first use), and for a tenant's meter
    that is not debited now but has a wallet: it was prepaid once, and a late reading may reverse what it was debited then."""
    meters = list(meters)
    wanted = {wallet_owner(m.id): m for m in meters if m.debited}
    t = LedgerAccount.__table__
    found: dict[str, int] = {}
    earlier = defaultdict(list)
    for m in meters:
        if not m.debited and m.tenant_id is not None and m.tenant_currency:
            earlier[m.tenant_currency].append(wallet_owner(m.id))
    if earlier:
        by_owner = {wallet_owner(m.id): m for m in meters}
        for currency, owners in earlier.items():
            for owner, account_id in _wallet_ids(s, currency, owners).items():
                wanted[owner] = by_owner[owner]
                found[owner] = account_id
    if not wanted:
        return {}
    by_currency: dict[str, list[str]] = defaultdict(list)
    for owner, m in wanted.items():
        if m.debited:
            by_currency[m.tenant_currency].append(owner)  # type: ignore[index]
    for currency, owners in by_currency.items():
        found.update(_wallet_ids(s, currency, owners))
        missing = [o for o in owners if o not in found]
        if missing:
            from payments.ledger import _insert_for  # the dialect's INSERT … ON CONFLICT (PostgreSQL or SQLite)

            s.execute(_insert_for(s)(t).on_conflict_do_nothing(), [
                {"kind": AccountKind.METER_WALLET.value, "currency": currency, "owner": o, "balance_minor": 0, "guarded": True,
                 "overdraft_limit_minor": wanted[o].emergency, "created_at": utcnow()} for o in missing])
            found.update(_wallet_ids(s, currency, missing))
    return {wanted[o].id: found[o] for o in wanted}


def _ingest_parsed(s: Session, operator_id: int, by_code: dict[str, list[_Row]], results: list, source: str, now: dt.datetime,
                   report: IngestReport) -> None:
    meters = _load_meters(s, operator_id, by_code)
    for code, rows in by_code.items():
        if code not in meters:
            for r in rows:
                results[r.index] = _reject(r.index, code, _iso(r.at), "unknown_meter", "unknown meter")
    meters = {c: m for c, m in meters.items() if c in by_code}
    if not meters:
        return
    wallets = _ensure_wallets(s, meters.values())
    # Locks, in the order webapp.meters.relay documents: wallets, then meters (each in id order).
    la = LedgerAccount.__table__
    wallet_rows = {}
    if wallets:
        wids = sorted(wallets.values())
        for r in _fetch(s, select(la.c.id, la.c.balance_minor, la.c.overdraft_limit_minor).where(la.c.id.in_(wids)).order_by(la.c.id).with_for_update(),
                        "SELECT id, balance_minor, overdraft_limit_minor FROM ledger_accounts WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE",
                        {"ids": wids}):
            wallet_rows[r[0]] = [int(r[1]), int(r[2])]
    # The meters' rows locked, with each one's last reading (the row its last_reading_at points at), in one statement.
    mt, rt = Meter.__table__, MeterReading.__table__
    ids = sorted(m.id for m in meters.values())
    locked: dict[int, tuple[dt.datetime | None, _Reading | None]] = {}
    for r in _fetch(s, select(mt.c.id, mt.c.last_reading_at, rt.c.at, rt.c.register_kwh, rt.c.segment, rt.c.demand_kw)
                    .select_from(mt.outerjoin(rt, and_(rt.c.meter_id == mt.c.id, rt.c.at == mt.c.last_reading_at)))
                    .where(mt.c.id.in_(ids)).order_by(mt.c.id).with_for_update(of=mt),
                    "SELECT m.id, m.last_reading_at, r.at, r.register_kwh, r.segment, r.demand_kw FROM meters AS m "
                    "LEFT JOIN meter_readings AS r ON r.meter_id = m.id AND r.at = m.last_reading_at "
                    "WHERE m.id = ANY(%(ids)s) ORDER BY m.id FOR UPDATE OF m", {"ids": ids}):
        locked[r[0]] = (r[1], _Reading(r[2], r[3], r[4], r[5]) if r[2] is not None else None)
    for m in meters.values():
        m.last_at = locked[m.id][0]  # read again under the lock: another batch may have moved on
    by_id = {m.id: m for m in meters.values()}

    # Events and tariff versions of the batch's meters (usually few).
    events: dict[int, list] = defaultdict(list)
    for e in _fetch(s, select(MeterEvent.meter_id, MeterEvent.at, MeterEvent.old_final_kwh, MeterEvent.new_start_kwh)
                    .where(MeterEvent.meter_id.in_(ids)).order_by(MeterEvent.meter_id, MeterEvent.at),
                    "SELECT meter_id, at, old_final_kwh, new_start_kwh FROM meter_events WHERE meter_id = ANY(%(ids)s) ORDER BY meter_id, at",
                    {"ids": ids}):
        events[e[0]].append((e[1], e[2], e[3]))
    tariff_ids = {m.tariff_id for m in meters.values() if m.tariff_id is not None}
    versions: dict[int, list] = defaultdict(list)
    if tariff_ids:
        for v in s.execute(select(MeterTariffVersion.tariff_id, MeterTariffVersion.effective_from, MeterTariffVersion.id,
                                  MeterTariffVersion.tariff_json, MeterTariffVersion.currency)
                           .where(MeterTariffVersion.tariff_id.in_(tariff_ids)).order_by(MeterTariffVersion.effective_from)):
            versions[v[0]].append((v[1], v[2], v[3], v[4]))

    # The meters' history near the batch: the last reading (fast path: everything new comes after it), or,
    # for a meter with late rows, every reading from the one before its earliest new row on.
    history: dict[int, list[_Reading]] = {}
    for m in meters.values():
        if m.last_at is None:
            history[m.id] = []
            continue
        last = locked[m.id][1]
        if last is not None and min(r.at for r in by_code[m.code]) > m.last_at:
            history[m.id] = [last]  # the fast path: everything new comes after the last reading
            continue
        first_new = min(r.at for r in by_code[m.code])
        before = s.scalar(select(func.max(MeterReading.at)).where(MeterReading.meter_id == m.id, MeterReading.at < first_new))
        q = select(MeterReading.at, MeterReading.register_kwh, MeterReading.segment, MeterReading.demand_kw).where(MeterReading.meter_id == m.id)
        if before is not None:
            q = q.where(MeterReading.at >= before)
        history[m.id] = [_Reading(r[0], r[1], r[2], r[3]) for r in s.execute(q.order_by(MeterReading.at))]

    plan = _Plan(s, now, source)

    def place_all():
        """Place every meter's rows; yields the readings accepted so far, as rows for COPY."""
        for code, m in meters.items():
            done = len(plan.readings)
            _place(plan, m, sorted(by_code[code], key=lambda r: (r.at, r.index)), history[m.id], events.get(m.id, []),
                   versions.get(m.tariff_id, []) if m.tariff_id else [], results)
            for r in plan.readings[done:]:
                yield tuple(r[c] for c in _READING_COLS)

    # On PostgreSQL the accepted readings stream into their COPY while the rest are placed and priced: the database stores
    # the first ones while Python works on the next. Not with a tiered tariff in the batch: its pricing reads the month's
    # intervals, and the connection is busy with the COPY.
    tiered = any(_compiled(v[1], v[2]).kind == "tiered" for vs in versions.values() for v in vs)
    if _pg(s) and not tiered:
        _copy(s, MeterReading.__tablename__, _READING_COLS, place_all())
        plan.readings_written = True
    else:
        for _row in place_all():
            pass
    plan.write(wallets, wallet_rows, by_id, report)


_READING_COLS = ("meter_id", "at", "register_kwh", "demand_kw", "segment", "source", "received_at")


class _Plan:
    """What a batch will write, gathered first, then written with a few bulk statements."""

    def __init__(self, s: Session, now: dt.datetime, source: str):
        self.s, self.now, self.source = s, now, source
        self.readings: list[dict] = []
        self.readings_written = False  # streamed into their COPY as they were placed
        # (meter, start, end) → (interval row, debit (meter, key, currency, amount, net, vat, description) or None)
        self.planned: dict[tuple[int, dt.datetime, dt.datetime], tuple[dict, tuple | None]] = {}
        self.supersede: list[tuple[int, dt.datetime, dt.datetime]] = []  # billed spans split by a late reading
        self.reversals: list[tuple[int, str, str, int, int, int]] = []  # (meter, interval key, currency, amount, net, VAT) debited before
        self.last: dict[int, tuple[dt.datetime, Decimal]] = {}
        self.month_kwh: dict[tuple[int, str], list] = {}

    def write(self, wallets: dict[int, int], wallet_rows: dict[int, list[int]], meters: dict[int, _MeterState], report: IngestReport) -> None:
        s = self.s
        conn = s.connection()
        if self.readings and not self.readings_written:
            _bulk_insert(s, MeterReading.__table__, self.readings)
        if self.supersede:
            self._reverse(wallets)
        if self.planned:
            _bulk_insert(s, MeterInterval.__table__, [iv for iv, _d in self.planned.values()])
        report.intervals = len(self.planned)
        report.superseded = len(self.supersede)
        deltas = self._book(wallets)
        report.debited = deltas
        if self.last:
            mt = Meter.__table__
            last = sorted(self.last.items())
            if _pg(s):
                _pg_execute(s, "UPDATE meters AS m SET last_reading_at = v.at, last_register_kwh = v.reg FROM unnest("
                               "CAST(%(ids)s AS INTEGER[]), CAST(%(ats)b AS TIMESTAMP WITH TIME ZONE[]), CAST(%(regs)s AS NUMERIC(18, 3)[])) "
                               "AS v(id, at, reg) WHERE m.id = v.id",
                            {"ids": [k for k, _v in last], "ats": [v[0] for _k, v in last], "regs": [v[1] for _k, v in last]})
            else:
                conn.execute(update(mt).where(mt.c.id == bindparam("mid")).values(last_reading_at=bindparam("lat"), last_register_kwh=bindparam("lreg")),
                             [{"mid": k, "lat": at, "lreg": reg} for k, (at, reg) in last])
            for key in [k for k in s.identity_map.keys() if k[0] is Meter and k[1][0] in self.last]:
                from sqlalchemy.orm.attributes import set_committed_value

                obj = s.identity_map.get(key)  # objects the caller holds must not write the old values back
                if obj is not None:
                    at, reg = self.last[key[1][0]]
                    set_committed_value(obj, "last_reading_at", at)
                    set_committed_value(obj, "last_register_kwh", reg)
        for meter_id, delta in sorted(deltas.items()):
            before = wallet_rows[wallets[meter_id]][0]
            _after_wallet_change(s, meters[meter_id], before + delta, before + delta > wallet_rows[wallets[meter_id]][1], self.now)

    def _reverse(self, wallets: dict[int, int]) -> None:
        """Mark superseded intervals and queue the reversal of what they debited (their amount, net and VAT)."""
        s = self.s
        it = MeterInterval.__table__
        for meter_id, start, end in self.supersede:
            row = s.execute(update(it).where(it.c.meter_id == meter_id, it.c.start_at == start, it.c.end_at == end, it.c.superseded.is_(False))
                            .values(superseded=True).returning(it.c.amount_minor, it.c.currency, it.c.breakdown_json)).first()
            if row is None or not row[0] or meter_id not in wallets:
                continue  # nothing was debited (a post-paid meter, a free interval)
            amount, currency = int(row[0]), row[1]
            try:
                net = metering._minor(Decimal(loads(row[2])["excl"]), currency)
            except (ValueError, KeyError, TypeError, InvalidOperation):
                net = amount  # a breakdown without its net: all of it was revenue
            self.reversals.append((meter_id, interval_key(meter_id, start, end), currency, amount, net, amount - net))

    def _book(self, wallets: dict[int, int]) -> dict[int, int]:
        """Book the batch's debits, and the reversals of what it superseded, as balanced entries; meter id → wallet delta.

        One consumption entry per currency for the whole batch: each meter's
        wallet debited with the sum of its new intervals, revenue credited
        with their net, VAT payable with their VAT. Its key is derived from
        the intervals it bills (``meter-intervals:<sha-256 of their interval
        keys>:<currency>``): those intervals are unique rows, so an interval
        is billed once, and a batch planned twice would fail on the key. The
        reversals are a second entry of the same shape, negated
        (``…:reversal``, described as a correction). Consumption is never
        refused (module docstring): a wallet's limit follows its debt up
        (``past_limit="raise_limit"``); the relay brings it back.
        """
        s = self.s
        system: dict[tuple[AccountKind, str], int] = {}

        def acct(kind: AccountKind, currency: str) -> int:
            if (kind, currency) not in system:
                system[(kind, currency)] = get_account(s, kind, currency).id
            return system[(kind, currency)]

        # (description, sign) → currency → [interval keys, wallet → amount, net, vat]
        groups: dict[tuple[str, int], dict[str, list]] = {}
        debits = (d[:6] for _iv, d in self.planned.values() if d is not None)  # (meter, interval key, currency, amount, net, VAT)
        for what, sign, items in ((DESCRIPTION, 1, debits), (DESCRIPTION_REVERSAL, -1, self.reversals)):
            for meter_id, key, currency, amount, net, vat in items:
                g = groups.setdefault((what, sign), {}).get(currency)
                if g is None:
                    g = groups[(what, sign)][currency] = [[], defaultdict(int), 0, 0]
                g[0].append(key)
                g[1][meter_id] += amount
                g[2] += net
                g[3] += vat
        if not groups:
            return {}
        entries: list[tuple[str, str, str | None, list[tuple[int, int, str]]]] = []
        deltas: dict[int, int] = defaultdict(int)
        for (what, sign), by_currency in groups.items():
            for currency, (keys, per_meter, net, vat) in sorted(by_currency.items()):
                digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
                postings = [(wallets[m], sign * amount, currency) for m, amount in sorted(per_meter.items())]
                postings.append((acct(AccountKind.REVENUE, currency), -sign * net, currency))
                if vat:
                    postings.append((acct(AccountKind.VAT_PAYABLE, currency), -sign * vat, currency))
                reference = f"meter:{next(iter(per_meter))}" if len(per_meter) == 1 else f"meters:{len(per_meter)}"
                entries.append((f"meter-intervals:{digest}:{currency}" + (":reversal" if sign < 0 else ""), what, reference, postings))
                for m, amount in per_meter.items():
                    deltas[m] += sign * amount
        post_many(s, entries, past_limit="raise_limit", booked="fail")
        return dict(deltas)

    def month_kwh_before(self, m: _MeterState, start: dt.datetime, tz: str) -> Decimal:
        """kWh of the meter's non-superseded intervals in ``start``'s billing month before ``start``."""
        ms = metering.month_start(start, tz)
        month = start.astimezone(metering._zone(tz)).strftime("%Y-%m")
        key = (m.id, month)
        if key not in self.month_kwh:
            rows = self.s.execute(select(MeterInterval.start_at, MeterInterval.end_at, MeterInterval.kwh).where(
                MeterInterval.meter_id == m.id, MeterInterval.superseded.is_(False), MeterInterval.end_at > ms)).all()
            self.month_kwh[key] = [tuple(r) for r in rows]
        total = Decimal(0)
        gone = {(a, b) for _m, a, b in self.supersede if _m == m.id}
        spans = self.month_kwh[key] + [(a, b, iv["kwh"]) for (mid, a, b), (iv, _d) in self.planned.items() if mid == m.id]
        for a, b, kwh in spans:
            if b > start or (a, b) in gone:
                continue
            for mon, _a, _b, part in metering.split_by_month(a, b, kwh, tz):
                if mon == month:
                    total += part
        return total


def _after_wallet_change(s: Session, m: _MeterState, raw_after: int, over_limit: bool, now: dt.datetime) -> None:
    """Tell the relay (if that module is there) a wallet changed — skipped when it provably has nothing to do.

    It has nothing to do while the meter is connected, the balance is at or
    above the low-balance threshold and above the emergency credit, no alert
    is pending re-arming, and the wallet's limit was not raised past the
    emergency credit (then every rule of ``relay.balance_changed`` is a no-op).
    """
    balance = -raw_after
    if (m.relay_state == "connected" and balance >= m.threshold and balance > -m.emergency and m.alerted_at is None and not over_limit):
        return
    try:
        from webapp.meters import relay
    except ImportError:  # pragma: no cover - the relay is another module's job
        return
    meter = s.get(Meter, m.id)
    relay.balance_changed(s, meter, now)


def _segment(events: list, at: dt.datetime) -> int:
    return bisect.bisect_right([e[0] for e in events], at)


def _energy(p: _Reading, r: _Reading, events: list) -> Decimal | None:
    """Register kWh between two readings (p before r), across declared events; None if it went backwards."""
    if p.segment == r.segment:
        d = r.register - p.register
        return d if d >= 0 else None
    total = Decimal(0)
    prev = p.register
    for k in range(p.segment, r.segment):
        _at, old_final, new_start = events[k]
        if old_final < prev:
            return None
        total += old_final - prev
        prev = new_start
    if r.register < prev:
        return None
    return total + r.register - prev


def _version_at(versions: list, at: dt.datetime):
    i = bisect.bisect_right([v[0] for v in versions], at)
    return versions[i - 1] if i else None


def _place(plan: _Plan, m: _MeterState, rows: list[_Row], timeline: list[_Reading], events: list, versions: list, results: list) -> None:
    """Place a meter's new rows (sorted by time) into its timeline; plan readings, intervals and debits."""
    ats = [r.at for r in timeline]
    for row in rows:
        at_text = _iso(row.at)
        i = bisect.bisect_left(ats, row.at)
        if i < len(ats) and ats[i] == row.at:
            old = timeline[i]
            same = old.register == row.register and (row.demand is None or old.demand == row.demand)
            results[row.index] = RowResult(row.index, m.code, at_text, DUPLICATE) if same else _reject(
                row.index, m.code, at_text, "conflict", f"another reading of this meter at this instant says {old.register} kWh")
            continue
        if m.register_max is not None and row.register > m.register_max:
            results[row.index] = _reject(row.index, m.code, at_text, "above_register_max", f"the register only goes up to {m.register_max} kWh")
            continue
        new = _Reading(row.at, row.register, _segment(events, row.at), row.demand, new=True)
        prev = timeline[i - 1] if i > 0 else None
        nxt = timeline[i] if i < len(timeline) else None
        e1 = _energy(prev, new, events) if prev else Decimal(0)
        if e1 is None:
            results[row.index] = _reject(row.index, m.code, at_text, "below_previous",
                                         f"{row.register} kWh is below the previous reading ({prev.register} kWh at {_iso(prev.at)}); "
                                         "declare a register rollover or a meter replacement first")
            continue
        e2 = _energy(new, nxt, events) if nxt else Decimal(0)
        if e2 is None:
            results[row.index] = _reject(row.index, m.code, at_text, "above_next",
                                         f"{row.register} kWh is above the next reading ({nxt.register} kWh at {_iso(nxt.at)})")
            continue
        spans = []
        if prev:
            spans.append((prev, new, e1))
        if nxt:
            spans.append((new, nxt, e2))
        priced = []
        for a, b, energy in spans:
            p = _price(plan, m, a.at, b.at, energy * m.ct, versions, b.demand)
            if isinstance(p, str):
                break
            priced.append(p)
        else:
            p = None
        if isinstance(p, str):
            results[row.index] = _reject(row.index, m.code, at_text, "no_tariff", p)
            continue
        # Accepted: record it, supersede the span it splits, bill the new spans.
        timeline.insert(i, new)
        ats.insert(i, row.at)
        plan.readings.append({"meter_id": m.id, "at": row.at, "register_kwh": row.register, "demand_kw": row.demand, "segment": new.segment,
                              "source": plan.source, "received_at": plan.now})
        if prev and nxt:
            split = (m.id, prev.at, nxt.at)
            if plan.planned.pop(split, None) is None:  # planned in this batch: never written, nothing to reverse
                plan.supersede.append(split)
        for interval, debit in priced:
            plan.planned[(m.id, interval["start_at"], interval["end_at"])] = (interval, debit)
        last = plan.last.get(m.id)
        if nxt is None and (last is None or row.at > last[0]):
            plan.last[m.id] = (row.at, row.register)
        results[row.index] = RowResult(row.index, m.code, at_text, ACCEPTED)


def _price(plan: _Plan, m: _MeterState, start: dt.datetime, end: dt.datetime, kwh: Decimal, versions: list, demand: Decimal | None):
    """``(interval row, debit or None)`` for one span, or the reason it cannot be billed (a str)."""
    v = _version_at(versions, start)
    interval = {"meter_id": m.id, "start_at": start, "end_at": end, "kwh": kwh, "demand_kw": demand, "amount_minor": 0,
                "currency": m.tenant_currency or m.site_currency, "tariff_version_id": v[1] if v else None, "breakdown_json": "{}",
                "superseded": False, "created_at": plan.now}
    if not m.debited:
        return interval, None
    if v is None:
        return f"the meter has no tariff in force at {_iso(start)}"
    t = _compiled(v[1], v[2])
    if t.currency != m.tenant_currency:
        return f"the tariff is in {t.currency}, the tenant pays in {m.tenant_currency}"
    before = plan.month_kwh_before(m, start, m.time_zone) if t.kind == "tiered" else Decimal(0)
    p = metering.price_interval(t, start, end, kwh, tz=m.time_zone, month_kwh_before=before)
    amount = p.amount_minor
    net = p.net_minor
    interval["amount_minor"] = amount
    interval["breakdown_json"] = p.as_json_text()
    debit = (m.id, interval_key(m.id, start, end), t.currency, amount, net, amount - net, DESCRIPTION) if amount else None
    return interval, debit
