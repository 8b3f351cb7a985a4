"""Settlement at scale on PostgreSQL: 1,000,000 captured payments over 1,000 sites allocated, then paid in one T+1 batch.

The sites: 1,000, each with its own split rule (a site host's share of 5–20 %,
an equipment owner's fixed fee per session or price per kWh, the platform's
fee of 1.5 % + 0.10), owned by 50 operators (the merchants of record). The
parties: the platform (Stripe Connect), 50 operators and 1,000 site hosts
(SEPA, the hosts with a 25.00 minimum payout), 20 equipment owners (a
non-SEPA bank: CSV). The payments: one business day of charging sessions
(1.00–60.00 with 21 % VAT, a card fee of 0.25 + 1.4 %, 0–80 kWh), handed to
``payments.settlement.allocate_many`` in chunks of ``--chunk`` payments, one
transaction per chunk, by ``--workers`` worker processes side by side (one
per CPU by default, as the settlement workers run in production; each makes
its own chunks). Each chunk writes the allocations, their lines and one
balanced journal entry per currency (``payments.settlement``, "Bulk
allocation"). Then ``payments.payouts.build_batch`` builds day T's batch (one
payout per party owed at least its minimum, each booked to payouts in
transit) and its pain.001 (validated against the XSD) and CSV files are made.

The baseline, measured in the same run on the same server with the same
workers: the same payment rows COPYed into a bare table (no indexes, no rule,
no ledger) — the floor any bulk allocation has to pay to get the payments
into the database.

Afterwards it checks: every journal entry sums to zero; the parties'
payables plus the payouts equal the allocated net and the sum of the lines;
each payout equals what its party was allocated.

    .venv/bin/python bench/settlement.py [--payments 1000000] [--sites 1000] [--workers 2] [--database-url postgresql+psycopg://…/bench_settlement]

The database is dropped and created again (default ``bench_settlement``).
Goal (issue 8): the whole run (allocation and batch) in ≤ 60 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import resource
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench_settlement"
DAY = dt.date(2026, 11, 2)
START = dt.datetime.combine(DAY, dt.time(0), tzinfo=dt.UTC)
RUN_AT = START + dt.timedelta(days=1, hours=6)
OPERATORS, OWNERS = 50, 20
IBANS = {"sepa": "DE89370400440532013000", "csv": "TR330006100519786457841326"}


def prepare(url: str, sites: int) -> tuple[object, dict[int, int]]:
    """A fresh database at the head migration with the parties and a split rule per site; returns (engine, site → merchant)."""
    from payments.settlement import Party, PartyKind, SplitRule
    from payments.tariff_store import dumps
    from webapp.cli import migrate_to_head

    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    dbname = url.rsplit("/", 1)[1]
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    admin.dispose()
    migrate_to_head(url)
    eng = create_engine(url)
    rng = random.Random(8)
    merchant = {}
    with Session(eng) as s, s.begin():
        platform = Party(kind=PartyKind.PLATFORM, legal_name="Voltpay Platform", payout_currency="EUR", stripe_account_id="acct_1Platform")
        ops = [Party(kind=PartyKind.OPERATOR, legal_name=f"Operator {i}", payout_currency="EUR", iban=IBANS["sepa"]) for i in range(OPERATORS)]
        owners = [Party(kind=PartyKind.EQUIPMENT_OWNER, legal_name=f"Owner {i}", payout_currency="EUR", iban=IBANS["csv"]) for i in range(OWNERS)]
        hosts = [Party(kind=PartyKind.SITE_HOST, legal_name=f"Host {i}", payout_currency="EUR", iban=IBANS["sepa"], min_payout_minor=2500)
                 for i in range(sites)]
        s.add_all([platform, *ops, *owners, *hosts])
        s.flush()
        for site in range(1, sites + 1):
            op, owner, host = ops[site % OPERATORS], owners[site % OWNERS], hosts[site - 1]
            fixed = {"fixed_per_session": rng.choice([0, 20, 50])} if site % 2 else {"per_kwh": rng.choice(["0.01", "0.015", "0.02"])}
            rule = {"shares": [{"party_id": host.id, "bps": rng.randint(500, 2000)}, {"party_id": owner.id, **fixed}],
                    "platform_fee": {"party_id": platform.id, "bps": 150, "fixed": 10}, "merchant_of_record": op.id}
            s.add(SplitRule(site_id=site, number=1, effective_from=START - dt.timedelta(days=30), rule_json=dumps(rule), created_by="bench"))
            merchant[site] = op.id
    return eng, merchant


def chunk_payments(k: int, n: int, sites: int, merchant: dict[int, int], chunk: int) -> list[dict]:
    """Chunk ``k`` of the day's ``n`` captured payments (``chunk`` of them, spread over the day in time order).

    Each chunk has its own seed, so a worker makes its chunks without the others'."""
    rng = random.Random(k + 1)
    step = 86_400 / n
    out = []
    for i in range(k * chunk, min(n, (k + 1) * chunk)):
        site = rng.randint(1, sites)
        gross = rng.randint(100, 6000)
        vat = gross * 21 // 121
        out.append({"key": f"session:{i}", "source": f"session:{i}", "site_id": site, "currency": "EUR", "gross": gross, "vat": vat,
                    "fee": min(gross - vat, 25 + gross * 14 // 1000), "kwh": Decimal(rng.randint(0, 80_000)).scaleb(-3),
                    "merchant_of_record": merchant[site], "at": START + dt.timedelta(seconds=int(i * step))})
    return out


def _worker(job: tuple) -> tuple[float, float]:
    """One worker process: its share of the chunks (k ≡ worker mod workers), one transaction each; (CPU s, max RSS MiB)."""
    what, url, n, sites, merchant, chunk, worker, workers = job
    from payments import settlement

    eng = create_engine(url)
    cpu0 = time.process_time()
    for k in range(worker, -(-n // chunk), workers):
        rows = chunk_payments(k, n, sites, merchant, chunk)
        if what == "allocate":
            with Session(eng) as s, s.begin():
                settlement.allocate_many(s, rows)
        else:
            with eng.begin() as c:
                with c.connection.driver_connection.cursor() as cur, cur.copy("COPY bench_payments FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row((r["key"], r["source"], r["site_id"], r["currency"], r["gross"], r["vat"], r["fee"], r["kwh"],
                                      r["merchant_of_record"], r["at"]))
    eng.dispose()
    return time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_workers(what: str, url: str, n: int, sites: int, merchant: dict[int, int], chunk: int, workers: int) -> tuple[float, float, float]:
    """Run ``what`` ("allocate" or "baseline") over every chunk in ``workers`` processes; (seconds, their CPU s, max RSS MiB)."""
    import multiprocessing

    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        got = pool.map(_worker, [(what, url, n, sites, merchant, chunk, w, workers) for w in range(workers)])
    return time.perf_counter() - t0, sum(c for c, _ in got), max(m for _, m in got)


def check(eng, batch_id: int) -> dict:
    """The invariants after the run (raises AssertionError when one is broken)."""
    from payments.ledger import AccountKind, LedgerAccount, Posting
    from payments.payouts import Payout
    from payments.settlement import Allocation, AllocationLine

    with Session(eng) as s:
        unbalanced = s.scalar(select(func.count()).select_from(
            select(Posting.entry_id).group_by(Posting.entry_id).having(func.sum(Posting.amount_minor) != 0).subquery()))
        assert unbalanced == 0, f"{unbalanced} unbalanced entries"
        net = int(s.scalar(select(func.sum(Allocation.net_minor))))
        lines = int(s.scalar(select(func.sum(AllocationLine.amount_minor))))
        owed = -int(s.scalar(select(func.sum(Posting.amount_minor)).join(LedgerAccount).where(LedgerAccount.kind == AccountKind.PARTY_PAYABLE)))
        paid = int(s.scalar(select(func.sum(Payout.amount_minor)).where(Payout.batch_id == batch_id)))
        assert lines == net and owed + paid == net, (net, lines, owed, paid)
        per_party = dict(s.execute(select(AllocationLine.party_id, func.sum(AllocationLine.amount_minor)).group_by(AllocationLine.party_id)).all())
        for po in s.scalars(select(Payout).where(Payout.batch_id == batch_id)):
            assert po.amount_minor == per_party[po.party_id]
        return {"net": net, "paid": paid, "carried": owed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--payments", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=50_000, help="payments per allocate_many call (one transaction)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="worker processes allocating chunks side by side "
                    "(default: one per CPU, as the production worker pool runs)")
    ap.add_argument("--database-url", default=DEFAULT_URL)
    a = ap.parse_args()
    import tempfile

    from payments import payouts, settlement
    from webapp.tasks import configure_queue

    # The ledger's post-commit hooks queue a (no-op here) low-balance check: give them a throwaway queue.
    configure_queue({"HUEY_PATH": str(Path(tempfile.mkdtemp(prefix="bench-settlement-")) / "huey.db")})

    t_setup = time.perf_counter()
    eng, merchant = prepare(a.database_url, a.sites)
    print(f"setup: {a.sites} sites, {len(set(merchant.values()))} operators, {time.perf_counter() - t_setup:.1f} s", flush=True)

    with eng.begin() as c:
        c.execute(text("CREATE TABLE bench_payments (key varchar(200), source varchar(64), site_id int, currency varchar(3), gross bigint,"
                       " vat bigint, fee bigint, kwh numeric(18,3), merchant int, at timestamptz)"))
    eng.dispose()  # the workers are forked: none may share the parent's connections
    base, _cpu, _rss = in_workers("baseline", a.database_url, a.payments, a.sites, merchant, a.chunk, a.workers)
    print(f"baseline (COPY of the same payment rows into a bare table, same workers): {base:.1f} s, {a.payments / base:,.0f} rows/s",
          flush=True)

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    t_alloc, cpu, worker_rss = in_workers("allocate", a.database_url, a.payments, a.sites, merchant, a.chunk, a.workers)
    print(f"allocated: {a.payments:,} payments in {t_alloc:.1f} s = {a.payments / t_alloc:,.0f} payments/s "
          f"({t_alloc / base:.1f}× the baseline) by {a.workers} worker process{'es' if a.workers != 1 else ''}; their CPU {cpu:.1f} s (generating, splitting, "
          f"COPY formatting), the rest waiting on PostgreSQL (load average before: {load:.2f} on {os.cpu_count()} CPUs)", flush=True)

    t1 = time.perf_counter()
    with Session(eng) as s, s.begin():
        batch = payouts.build_batch(s, DAY, "EUR", now=RUN_AT)
        n_payouts, batch_id = len(batch.payouts), batch.id
    t_batch = time.perf_counter() - t1
    t2 = time.perf_counter()
    with Session(eng) as s:
        files = payouts.batch_files(s.get(payouts.PayoutBatch, batch_id), payouts.Debtor("Voltpay Platform SL", "ES9121000418450200051332"))
    t_files = time.perf_counter() - t2
    total = time.perf_counter() - t0
    print(f"batch: {n_payouts:,} payouts in {t_batch:.1f} s; files: pain.001 {len(files['pain.001.xml']):,} bytes (schema-valid), "
          f"CSV {len(files['payouts.csv']):,} bytes in {t_files:.1f} s", flush=True)
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, worker_rss)
    print(f"whole run (allocation + batch + files): {total:.1f} s = {a.payments / total:,.0f} payments/s; peak memory {peak_mb:,.0f} MB; "
          f"goal (1,000,000 payments in ≤ 60 s): {'met' if a.payments >= 1_000_000 and total <= 60 else 'NOT met'}"
          f" (at this rate 1,000,000 payments take {total * 1_000_000 / a.payments:,.0f} s)", flush=True)
    t3 = time.perf_counter()
    print(f"checked: {check(eng, batch_id)} in {time.perf_counter() - t3:.1f} s")
    eng.dispose()


if __name__ == "__main__":
    main()
