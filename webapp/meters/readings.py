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

* **Prepaid tenant meters** are debited once per interval: entry
  ``meter:<id>:interval:<start>/<end>`` — meter wallet (debit ``amount``),
  revenue (credit ``net``), VAT payable (credit ``vat``). A superseded
  interval is reversed by ``…:reversal`` (its postings negated).
* **Consumption is never refused.** The electricity was used, so the debit
  is booked even past the tenant's emergency credit: under the wallet's row
  lock the wallet's ``overdraft_limit_minor`` is raised to what is used (the
  ledger's CHECK still holds), the balance shows the true debt, and
  ``webapp.meters.relay`` disconnects the meter and lowers the limit back to
  the emergency credit as top-ups repay it.
* **Post-paid, master and public-area meters**: intervals are stored with
  ``amount_minor`` 0 and no breakdown; the monthly bill prices them.

Batches are booked in bulk (a few statements per batch, not per row) with
the ledger's rules: each entry balanced, its key unique (``ON CONFLICT DO
NOTHING``; a key that exists books nothing), the wallet's cached balance
changed by one conditional UPDATE under its row lock, in account-id order.
Locks: meter wallets (id order), then meters (id order), then whatever
``relay.balance_changed`` takes (tenant) — the order ``webapp.meters.relay``
asks for, so a top-up running at the same time waits, never deadlocks.

Services ``flush()``; the caller commits.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from sqlalchemy import bindparam, case, func, select, update
from sqlalchemy.orm import Session

from payments import metering
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting, get_account
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
        raw = s.connection().connection.dbapi_connection
        with raw.cursor() as cur, cur.copy(f'COPY {table.name} ({", ".join(cols)}) FROM STDIN') as cp:
            for r in rows:
                cp.write_row([_bind(table.c[c], r[c]) for c in cols])
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
    """Run ``sql`` on the session's own connection (same transaction) with psycopg's binary parameters.

    Arrays of text sent in psycopg's text format are escaped element by
    element with a regular expression, which costs more than the statement;
    the binary format sends them as they are.
    """
    raw = s.connection().connection.dbapi_connection
    with raw.cursor() as cur:
        cur.execute(sql, params, binary=True)
        return [tuple(r) for r in cur.fetchall()] if fetch else []


def _any(s: Session, col, values) -> object:
    """``col IN values`` as ``col = ANY(array)`` on PostgreSQL: one statement text whatever the number of values."""
    values = list(values)
    if _pg(s):
        from sqlalchemy import any_
        from sqlalchemy.dialects.postgresql import ARRAY

        return col == any_(bindparam(None, values, type_=ARRAY(col.type)))
    return col.in_(values)


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


def _iso(d: dt.datetime) -> str:
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
        at = _timestamp(raw_at)
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
    q = (
        select(Meter.id, Meter.meter_code, Meter.site_id, Meter.kind, Meter.prepaid, Meter.ct_multiplier, Meter.tenant_id, Meter.tariff_id,
               Meter.register_max_kwh, Meter.last_reading_at, Site.time_zone, Site.currency, Tenant.currency, Tenant.billing,
               Tenant.emergency_credit_minor, Tenant.low_balance_threshold_minor, Tenant.low_balance_alerted_at, Meter.relay_state)
        .join(Site, Site.id == Meter.site_id)
        .outerjoin(Tenant, Tenant.id == Meter.tenant_id)
        .where(_any(s, Meter.meter_code, codes), Site.operator_id == operator_id)
    )
    out = {}
    for r in s.execute(q):
        out[r[1]] = _MeterState(r[0], r[1], r[2], r[3], bool(r[4]), int(r[5] or 1), r[6], r[7], r[8], r[9], r[10] or "UTC", r[11], r[12],
                                r[13], int(r[14] or 0), int(r[15] or 0), r[16], r[17])
    return out


def _ensure_wallets(s: Session, meters: Iterable[_MeterState]) -> dict[int, int]:
    """Meter id → wallet account id for debited meters (accounts created in bulk on first use)."""
    wanted = {wallet_owner(m.id): m for m in meters if m.debited}
    if not wanted:
        return {}
    t = LedgerAccount.__table__
    by_currency: dict[str, list[str]] = defaultdict(list)
    for owner, m in wanted.items():
        by_currency[m.tenant_currency].append(owner)  # type: ignore[index]
    found: dict[str, int] = {}
    for currency, owners in by_currency.items():
        q = select(t.c.owner, t.c.id).where(t.c.kind == AccountKind.METER_WALLET.value, t.c.currency == currency, _any(s, t.c.owner, owners))
        found.update(dict(s.execute(q).all()))
        missing = [o for o in owners if o not in found]
        if missing:
            from payments.ledger import _insert_for  # the dialect's INSERT … ON CONFLICT (PostgreSQL or SQLite)

            s.execute(_insert_for(s)(t).on_conflict_do_nothing(), [
                {"kind": AccountKind.METER_WALLET.value, "currency": currency, "owner": o, "balance_minor": 0, "guarded": True,
                 "overdraft_limit_minor": wanted[o].emergency, "created_at": utcnow()} for o in missing])
            found.update(dict(s.execute(select(t.c.owner, t.c.id).where(t.c.kind == AccountKind.METER_WALLET.value, t.c.currency == currency,
                                                                        _any(s, t.c.owner, missing))).all()))
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
        for r in s.execute(select(la.c.id, la.c.balance_minor, la.c.overdraft_limit_minor).where(_any(s, la.c.id, wallets.values()))
                           .order_by(la.c.id).with_for_update()):
            wallet_rows[r[0]] = [int(r[1]), int(r[2])]
    mt = Meter.__table__
    ids = sorted(m.id for m in meters.values())
    locked = {r[0]: r for r in s.execute(select(mt.c.id, mt.c.last_reading_at, mt.c.tariff_id, mt.c.prepaid).where(_any(s, mt.c.id, ids))
                                         .order_by(mt.c.id).with_for_update())}
    for m in meters.values():
        m.last_at = locked[m.id][1]  # read again under the lock: another batch may have moved on
    by_id = {m.id: m for m in meters.values()}

    # Events and tariff versions of the batch's meters (usually few).
    events: dict[int, list] = defaultdict(list)
    for e in s.execute(select(MeterEvent.meter_id, MeterEvent.at, MeterEvent.old_final_kwh, MeterEvent.new_start_kwh)
                       .where(_any(s, MeterEvent.meter_id, ids)).order_by(MeterEvent.meter_id, MeterEvent.at)):
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
    fast = [(m.id, m.last_at) for m in meters.values() if m.last_at is not None and min(r.at for r in by_code[m.code]) > m.last_at]
    if fast:
        wanted = set(fast)
        # meter_id = ANY(…) AND at = ANY(…) is a superset of the pairs (one statement text, index-friendly); keep the pairs.
        for r in s.execute(select(MeterReading.meter_id, MeterReading.at, MeterReading.register_kwh, MeterReading.segment, MeterReading.demand_kw)
                           .where(_any(s, MeterReading.meter_id, [m for m, _a in fast]), _any(s, MeterReading.at, {a for _m, a in fast}))):
            if (r[0], r[1]) in wanted:
                history[r[0]] = [_Reading(r[1], r[2], r[3], r[4])]
    for m in meters.values():
        if m.id in history or m.last_at is None:
            history.setdefault(m.id, [])
            continue
        first_new = min(r.at for r in by_code[m.code])
        before = s.scalar(select(func.max(MeterReading.at)).where(MeterReading.meter_id == m.id, MeterReading.at < first_new))
        q = select(MeterReading.at, MeterReading.register_kwh, MeterReading.segment, MeterReading.demand_kw).where(MeterReading.meter_id == m.id)
        if before is not None:
            q = q.where(MeterReading.at >= before)
        history[m.id] = [_Reading(r[0], r[1], r[2], r[3]) for r in s.execute(q.order_by(MeterReading.at))]

    plan = _Plan(s, now, source)
    for code, m in meters.items():
        _place(plan, m, sorted(by_code[code], key=lambda r: (r.at, r.index)), history[m.id], events.get(m.id, []),
               versions.get(m.tariff_id, []) if m.tariff_id else [], results)
    plan.write(wallets, wallet_rows, by_id, report)


class _Plan:
    """What a batch will write, gathered first, then written with a few bulk statements."""

    def __init__(self, s: Session, now: dt.datetime, source: str):
        self.s, self.now, self.source = s, now, source
        self.readings: list[dict] = []
        # (meter, start, end) → (interval row, debit (meter, key, currency, amount, net, vat, description) or None)
        self.planned: dict[tuple[int, dt.datetime, dt.datetime], tuple[dict, tuple | None]] = {}
        self.supersede: list[tuple[int, dt.datetime, dt.datetime]] = []  # billed spans split by a late reading
        self.reversals: list[tuple[int, str, list[tuple[int, int, str]]]] = []
        self.last: dict[int, tuple[dt.datetime, Decimal]] = {}
        self.month_kwh: dict[tuple[int, str], list] = {}

    def write(self, wallets: dict[int, int], wallet_rows: dict[int, list[int]], meters: dict[int, _MeterState], report: IngestReport) -> None:
        s = self.s
        conn = s.connection()
        if self.readings:
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
                               "CAST(%(ids)s AS INTEGER[]), CAST(%(ats)s AS TIMESTAMP WITH TIME ZONE[]), CAST(%(regs)s AS NUMERIC(18, 3)[])) "
                               "AS v(id, at, reg) WHERE m.id = v.id",
                            {"ids": [k for k, _v in last], "ats": [v[0] for _k, v in last], "regs": [v[1] for _k, v in last]})
            else:
                conn.execute(update(mt).where(mt.c.id == bindparam("mid")).values(last_reading_at=bindparam("lat"), last_register_kwh=bindparam("lreg")),
                             [{"mid": k, "lat": at, "lreg": reg} for k, (at, reg) in last])
            for k, (at, reg) in self.last.items():  # objects the caller holds must not write the old values back
                obj = s.identity_map.get(s.identity_key(Meter, k))
                if obj is not None:
                    from sqlalchemy.orm.attributes import set_committed_value

                    set_committed_value(obj, "last_reading_at", at)
                    set_committed_value(obj, "last_register_kwh", reg)
        for meter_id, delta in sorted(deltas.items()):
            before = wallet_rows[wallets[meter_id]][0]
            _after_wallet_change(s, meters[meter_id], before + delta, before + delta > wallet_rows[wallets[meter_id]][1], self.now)

    def _reverse(self, wallets: dict[int, int]) -> None:
        """Mark superseded intervals and queue the reversal of their debits (postings negated)."""
        s = self.s
        it = MeterInterval.__table__
        keys = {}
        for meter_id, start, end in self.supersede:
            s.execute(update(it).where(it.c.meter_id == meter_id, it.c.start_at == start, it.c.end_at == end).values(superseded=True))
            keys[interval_key(meter_id, start, end)] = meter_id
        if not keys:
            return
        entries = s.execute(select(JournalEntry.id, JournalEntry.idempotency_key).where(JournalEntry.idempotency_key.in_(list(keys)))).all()
        for entry_id, key in entries:
            postings = s.execute(select(Posting.account_id, Posting.amount_minor, Posting.currency).where(Posting.entry_id == entry_id)).all()
            self.reversals.append((keys[key], key + ":reversal", [(a, -amt, c) for a, amt, c in postings]))

    def _book(self, wallets: dict[int, int]) -> dict[int, int]:
        """Book the debits and reversals as balanced entries (the ledger's rules, in bulk); meter id → wallet delta."""
        s = self.s
        entries: list[tuple[int, str, str, list[tuple[int, int, str]]]] = []  # meter, key, description, [(account, amount, currency)]
        system: dict[tuple[AccountKind, str], int] = {}

        def acct(kind: AccountKind, currency: str) -> int:
            if (kind, currency) not in system:
                system[(kind, currency)] = get_account(s, kind, currency).id
            return system[(kind, currency)]

        for meter_id, key, postings in self.reversals:
            entries.append((meter_id, key, DESCRIPTION_REVERSAL, postings))
        for meter_id, key, currency, amount, net, vat, description in (d for _iv, d in self.planned.values() if d is not None):
            postings = [(wallets[meter_id], amount, currency), (acct(AccountKind.REVENUE, currency), -net, currency)]
            if vat:
                postings.append((acct(AccountKind.VAT_PAYABLE, currency), -vat, currency))
            entries.append((meter_id, key, description, [p for p in postings if p[1]]))
        if not entries:
            return {}
        for _m, key, _d, postings in entries:  # the ledger's rule, checked before anything is written
            if sum(p[1] for p in postings) != 0:
                raise AssertionError(f"unbalanced entry {key}")
        je = JournalEntry.__table__
        stamp = utcnow()
        if _pg(s):
            # Ids drawn from the table's sequence, then one COPY: the unique key refuses a key booked before, and then the whole
            # batch fails and books nothing (under the meters' locks ingest never plans a span twice, so this is a safety net).
            ids = [r[0] for r in _pg_execute(s, "SELECT nextval(pg_get_serial_sequence('journal_entries', 'id')) FROM generate_series(1, %(n)s)",
                                             {"n": len(entries)}, fetch=True)]
            _bulk_insert(s, je, [{"id": i, "idempotency_key": key, "description": d, "reference": f"meter:{m}", "created_at": stamp}
                                 for i, (m, key, d, _p) in zip(ids, entries)])
            created = {key: i for i, (_m, key, _d, _p) in zip(ids, entries)}
        else:
            created = {k: i for i, k in _bulk_insert(
                s, je, [{"idempotency_key": key, "description": d, "reference": f"meter:{m}", "created_at": stamp} for m, key, d, _p in entries],
                on_conflict_key="idempotency_key", returning=("id", "idempotency_key"))}
        rows = []
        deltas: dict[int, int] = defaultdict(int)
        wallet_ids = {v: k for k, v in wallets.items()}
        for _m, key, _d, postings in entries:
            entry_id = created.get(key)
            if entry_id is None:
                continue  # booked before: a key books once
            for account_id, amount, currency in postings:
                rows.append({"entry_id": entry_id, "account_id": account_id, "amount_minor": amount, "currency": currency})
                if account_id in wallet_ids:
                    deltas[wallet_ids[account_id]] += amount
        _bulk_insert(s, Posting.__table__, rows)
        la = LedgerAccount.__table__
        changes = [{"aid": wallets[m], "d": d} for m, d in sorted(deltas.items(), key=lambda kv: wallets[kv[0]]) if d]
        if changes:
            # Consumption is never refused (module docstring): the limit follows the debt up; the relay brings it back.
            if _pg(s):
                _pg_execute(s, "UPDATE ledger_accounts AS a SET balance_minor = a.balance_minor + v.d, "
                               "overdraft_limit_minor = GREATEST(a.overdraft_limit_minor, a.balance_minor + v.d) "
                               "FROM unnest(CAST(%(ids)s AS INTEGER[]), CAST(%(ds)s AS BIGINT[])) AS v(id, d) WHERE a.id = v.id",
                            {"ids": [c["aid"] for c in changes], "ds": [c["d"] for c in changes]})
            else:
                new = la.c.balance_minor + bindparam("d")
                s.execute(update(la).where(la.c.id == bindparam("aid")).values(
                    balance_minor=new, overdraft_limit_minor=case((new > la.c.overdraft_limit_minor, new), else_=la.c.overdraft_limit_minor)),
                    changes)
            for ch in changes:
                obj = s.identity_map.get(s.identity_key(LedgerAccount, ch["aid"]))
                if obj is not None:
                    s.expire(obj, ["balance_minor", "overdraft_limit_minor"])
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
    interval["breakdown_json"] = json.dumps(p.as_json(), separators=(",", ":"))
    debit = (m.id, interval_key(m.id, start, end), t.currency, amount, net, amount - net, DESCRIPTION) if amount else None
    return interval, debit
