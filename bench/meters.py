"""Meter readings ingested and billed per second on PostgreSQL, against a bare INSERT of the same rows.

The building: 10,000 prepaid tenant meters (Europe/Madrid, a time-of-use
tariff with a peak and a crossing-midnight valley window, so intervals are
really split across bands), each wallet topped up. A collector posts each
meter's reading every 15 minutes, in batches of 1,000 rows (1,000 meters at
one instant), one transaction per batch, as ``POST /api/v1/meters/readings``
would (``webapp.meters.readings.ingest`` — the request's JSON and HTTP are
not counted), from ``--workers`` processes side by side (one per CPU by
default, as several web processes take the collectors' requests; each
posts its own groups of 1,000 meters). 100 readings per meter: 1,000,000
readings, 990,000 intervals priced, stored and debited from the wallets
(each batch one balanced journal entry: ``webapp.meters.readings``).

The baseline, measured in the same run on the same server by as many
processes: the same rows, same batches, one transaction per batch, inserted
with a bare executemany ``INSERT`` into a table shaped like
``meter_readings`` (no checks, no pricing, no ledger) — the floor any
ingest has to pay.

Afterwards every invariant is checked: each wallet's cached balance equals
the sum of its postings and equals the top-up minus the sum of its
intervals; each entry sums to zero; one interval per consecutive pair.

    .venv/bin/python bench/meters.py [--readings 1000000] [--workers 2] [--database-url postgresql+psycopg://…/bench_meters]

The database is dropped and created again (default ``bench_meters``).
Goal (issue 7): ≥ 20,000 readings/s ingested and billed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, insert, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench_meters"
PER_METER = 100
BATCH = 1000
STEP = dt.timedelta(minutes=15)
T0 = dt.datetime(2025, 3, 28, 0, 0, tzinfo=dt.UTC)  # across the spring DST change in Madrid
TOU = {
    "version": "1", "currency": "EUR", "vat": Decimal(21), "kind": "tou",
    "tou": {"seasons": [{"months": list(range(1, 13)), "windows": [
        {"days": [1, 2, 3, 4, 5], "start": "10:00", "end": "14:00", "band": "peak"},
        {"days": [1, 2, 3, 4, 5, 6, 7], "start": "22:00", "end": "06:00", "band": "valley"}]}],
        "prices": {"peak": Decimal("0.2450"), "flat": Decimal("0.1550"), "valley": Decimal("0.0850")}},
}


def prepare(url: str, meters: int) -> dict:
    """A fresh database at the head migration, the building, its meters, their wallets topped up."""
    from payments.ledger import AccountKind, LedgerAccount, get_account
    from webapp.cli import migrate_to_head
    from webapp.meters import readings
    from webapp.meters.models import MeterTariff, Tenant
    from webapp.models import Meter, MeterKind, Operator, Site

    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    dbname = url.rsplit("/", 1)[1]
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    admin.dispose()
    migrate_to_head(url)
    eng = create_engine(url)
    with Session(eng) as s, s.begin():
        op = Operator(name="Bench", legal_name="Bench S.L.")
        s.add(op)
        s.flush()
        operator_id = op.id
        site = Site(operator_id=op.id, name="Tower", time_zone="Europe/Madrid", currency="EUR")
        s.add(site)
        s.flush()
        tariff = MeterTariff(site_id=site.id, name="TOU")
        s.add(tariff)
        s.flush()
        readings.add_meter_tariff_version(s, tariff, TOU, T0 - dt.timedelta(days=1), "bench")
        s.execute(insert(Tenant.__table__), [
            {"site_id": site.id, "name": f"T{i}", "contact_email": f"t{i}@example.com", "contact_phone": "", "unit": str(i),
             "leased_area_m2": Decimal(50), "billing": "prepaid", "currency": "EUR", "low_balance_threshold_minor": 1000,
             "emergency_credit_minor": 0, "state": "active", "created_at": T0} for i in range(meters)])
        tenant_ids = s.scalars(select(Tenant.id).order_by(Tenant.id)).all()
        s.execute(insert(Meter.__table__), [
            {"site_id": site.id, "meter_code": f"B{i:06d}", "serial": f"SN{i}", "kind": MeterKind.TENANT.value, "prepaid": True,
             "ct_multiplier": 1, "tenant_id": tid, "tariff_id": tariff.id, "relay_state": "connected", "created_at": T0}
            for i, tid in enumerate(tenant_ids)])
        meter_ids = s.scalars(select(Meter.id).order_by(Meter.id)).all()
        # Wallets with 1,000.00 each, booked as one balanced top-up entry from provider clearing.
        clearing = get_account(s, AccountKind.PROVIDER_CLEARING, "EUR")
        s.execute(insert(LedgerAccount.__table__), [
            {"kind": AccountKind.METER_WALLET.value, "currency": "EUR", "owner": f"meter:{m}", "balance_minor": -100_000, "guarded": True,
             "overdraft_limit_minor": 0, "created_at": T0} for m in meter_ids])
        from payments.ledger import JournalEntry, Posting

        entry = JournalEntry(idempotency_key="bench:top-up", description="bench top-up", reference=None)
        s.add(entry)
        s.flush()
        wallets = s.scalars(select(LedgerAccount.id).where(LedgerAccount.kind == AccountKind.METER_WALLET)).all()
        s.execute(insert(Posting.__table__), [{"entry_id": entry.id, "account_id": w, "amount_minor": -100_000, "currency": "EUR"} for w in wallets]
                  + [{"entry_id": entry.id, "account_id": clearing.id, "amount_minor": 100_000 * len(wallets), "currency": "EUR"}])
        s.execute(text("CREATE TABLE bench_readings (id bigserial primary key, meter_id int not null, at timestamptz not null, "
                       "register_kwh numeric(18,3) not null, demand_kw numeric(12,3), segment int not null, source varchar(16) not null, "
                       "received_at timestamptz not null)"))
    eng.dispose()
    return {"operator_id": operator_id, "meter_ids": meter_ids}


def batches(meters: int, per_meter: int, worker: int = 0, workers: int = 1):
    """A worker's batches: every meter's reading at one instant, BATCH meters per batch (the worker's groups of BATCH meters:
    group g goes to worker g mod workers, as each collector posts to whichever web process takes it); 0.1–0.5 kWh per step."""
    groups = [first for g, first in enumerate(range(0, meters, BATCH)) if g % workers == worker]
    for k in range(per_meter):
        at = (T0 + k * STEP).isoformat()
        for first in groups:
            yield [{"meter_code": f"B{i:06d}", "at": at, "register_kwh": str(Decimal(k * (1 + i % 5)) / 10), "demand_kw": "2.5"}
                   for i in range(first, min(first + BATCH, meters))]


def _ingest_worker(job: tuple) -> tuple[int, float, float]:
    """One web process's share: (readings, CPU s, max RSS MiB)."""
    url, operator_id, meters, per_meter, worker, workers = job
    from webapp import create_app
    from webapp.meters import readings

    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench-" + "x" * 40, "RATELIMIT_ENABLED": False, "HUEY_IMMEDIATE": True})
    factory = app.extensions["db_sessionmaker"]
    now = T0 + (per_meter + 1) * STEP
    n = 0
    cpu0 = time.process_time()
    with app.app_context():
        for rows in batches(meters, per_meter, worker, workers):
            with factory.begin() as s:
                rep = readings.ingest(s, operator_id=operator_id, rows=rows, source="api", now=now)
            assert rep.accepted == len(rows), [r for r in rep.results if r.status != "accepted"][:3]
            n += len(rows)
    app.extensions["db_engine"].dispose()
    return n, time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline_worker(job: tuple) -> int:
    url, meter_ids, meters, per_meter, worker, workers = job
    eng = create_engine(url)
    table = text("INSERT INTO bench_readings (meter_id, at, register_kwh, demand_kw, segment, source, received_at) "
                 "VALUES (:meter_id, :at, :register_kwh, :demand_kw, 0, 'api', :received_at)")
    code_to_id = {f"B{i:06d}": m for i, m in enumerate(meter_ids)}
    now = dt.datetime.now(dt.UTC)
    n = 0
    for rows in batches(meters, per_meter, worker, workers):
        params = [{"meter_id": code_to_id[r["meter_code"]], "at": dt.datetime.fromisoformat(r["at"]), "register_kwh": Decimal(r["register_kwh"]),
                   "demand_kw": Decimal(r["demand_kw"]), "received_at": now} for r in rows]
        with eng.begin() as c:
            c.execute(table, params)
        n += len(rows)
    eng.dispose()
    return n


def _pool(fn, jobs: list):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        return pool.map(fn, jobs)


def run_ingest(url: str, operator_id: int, meters: int, per_meter: int, workers: int = 1) -> tuple[int, float, float, float]:
    """Every batch through ``readings.ingest`` in ``workers`` processes side by side; (readings, seconds, their CPU s, max RSS MiB)."""
    t = time.perf_counter()
    got = _pool(_ingest_worker, [(url, operator_id, meters, per_meter, w, workers) for w in range(workers)])
    return sum(g[0] for g in got), time.perf_counter() - t, sum(g[1] for g in got), max(g[2] for g in got)


def run_baseline(url: str, meter_ids: list[int], meters: int, per_meter: int, workers: int = 1) -> tuple[int, float]:
    """The same rows, bare executemany INSERT per batch, one transaction each, by the same number of processes."""
    t = time.perf_counter()
    got = _pool(_baseline_worker, [(url, meter_ids, meters, per_meter, w, workers) for w in range(workers)])
    return sum(got), time.perf_counter() - t


def check(url: str, meters: int, per_meter: int) -> list[str]:
    """Invariants after the run; an empty list when all hold."""
    from webapp.meters.models import MeterInterval, MeterReading

    eng = create_engine(url)
    problems = []
    with Session(eng) as s:
        n_readings = s.scalar(select(func.count()).select_from(MeterReading))
        n_intervals = s.scalar(select(func.count()).select_from(MeterInterval))
        if n_readings != meters * per_meter:
            problems.append(f"{n_readings} readings stored, expected {meters * per_meter}")
        if n_intervals != meters * (per_meter - 1):
            problems.append(f"{n_intervals} intervals, expected {meters * (per_meter - 1)}")
        unbalanced = s.scalar(text("SELECT count(*) FROM (SELECT entry_id FROM postings GROUP BY entry_id HAVING sum(amount_minor) <> 0) x"))
        if unbalanced:
            problems.append(f"{unbalanced} unbalanced entries")
        cached_vs_posted = s.scalar(text(
            "SELECT count(*) FROM ledger_accounts a WHERE a.guarded AND a.balance_minor <> "
            "(SELECT coalesce(sum(p.amount_minor), 0) FROM postings p WHERE p.account_id = a.id)"))
        if cached_vs_posted:
            problems.append(f"{cached_vs_posted} wallets whose cached balance is not the sum of their postings")
        wrong = s.scalar(text(
            "SELECT count(*) FROM meters m JOIN ledger_accounts a ON a.owner = 'meter:' || m.id AND a.kind = 'meter_wallet' "
            "WHERE -a.balance_minor <> 100000 - (SELECT coalesce(sum(i.amount_minor), 0) FROM meter_intervals i "
            "WHERE i.meter_id = m.id AND NOT i.superseded)"))
        if wrong:
            problems.append(f"{wrong} wallets whose balance is not the top-up minus their intervals")
        billed = s.scalar(select(func.sum(MeterInterval.amount_minor)))
        print(f"  stored: {n_readings:,} readings, {n_intervals:,} intervals, {int(billed or 0) / 100:,.2f} EUR billed")
    eng.dispose()
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readings", type=int, default=1_000_000, help="total readings (100 per meter; default 1,000,000)")
    p.add_argument("--database-url", default=DEFAULT_URL, help="a PostgreSQL database this bench may drop and create")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes posting batches side by side, each its own meters "
                   "(default: one per CPU, as several web processes take collectors' requests)")
    args = p.parse_args()
    meters = max(1, args.readings // PER_METER)
    print(f"meters: {meters:,} × {PER_METER} readings = {meters * PER_METER:,} readings, batches of {BATCH}, PostgreSQL {args.database_url}")
    seeded = prepare(args.database_url, meters)
    load = os.getloadavg()[0]
    n, secs, cpu, rss = run_ingest(args.database_url, seeded["operator_id"], meters, PER_METER, args.workers)
    rate = n / secs
    print(f"ingest + bill:   {n:,} readings in {secs:.1f} s = {rate:,.0f} readings/s by {args.workers} web process"
          f"{'es' if args.workers != 1 else ''} ({meters * (PER_METER - 1):,} intervals priced, stored and debited)")
    print(f"  their CPU (rows, parsing, pricing, COPY formatting): {cpu:.1f} s; the rest waiting on PostgreSQL "
          f"(load average before: {load:.2f} on {os.cpu_count()} CPUs)")
    bn, bsecs = run_baseline(args.database_url, seeded["meter_ids"], meters, PER_METER, args.workers)
    base = bn / bsecs
    print(f"baseline INSERT: {bn:,} readings in {bsecs:.1f} s = {base:,.0f} readings/s")
    print(f"ratio ingest/baseline: {rate / base:.2f}")
    print(f"peak memory (max RSS of a web process): {rss:.0f} MiB")
    problems = check(args.database_url, meters, PER_METER)
    print("invariants: " + ("all hold" if not problems else "; ".join(problems)))
    goal = rate >= 20_000
    print(f"goal ≥ 20,000 readings/s: {'met' if goal else 'NOT met'}")
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
