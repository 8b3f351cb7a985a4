"""Wallet debits per second on PostgreSQL with 1, 4 and 16 concurrent clients, against plain UPDATEs.

Each client is a process with its own connection. A ledger debit is one
transaction of ``payments.ledger.transfer`` from a guarded customer wallet
to revenue (idempotency key check, journal entry, two postings, the
conditional balance update: one statement on PostgreSQL), and after its
commit the low-balance check it asks for is queued on Redis, as in
production (``VOLTPAY_BENCH_REDIS_URL``, database 15 by default; the queue
is emptied at the end). The baseline, measured in the same run on the
same server, is a transaction of one plain ``UPDATE … SET n = n + 1`` on a
single-row table. Clients debit 1 cent from wallets shared by 4 clients each,
so row locks are contended as in real life (a family sharing a wallet is the
exception; many clients on one wallet is the worst case, shown last).

Afterwards every invariant is checked: each entry sums to zero, each
wallet's cached balance equals the sum of its postings and is never negative.

Each case runs three rounds, baseline and ledger alternately, and compares
the medians: a hiccup of the machine during one run does not decide the ratio.

    .venv/bin/python bench/ledger.py [seconds-per-run] [postgresql+psycopg://…]

Goal (issue 3): ≥ 0.5 of the baseline at 16 clients, zero invariant violations.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/voltpay_bench"
ROUNDS = 3  # each case runs this many times, alternating with its baseline; the medians are compared


def _engine(url: str):
    return create_engine(url, pool_size=1, max_overflow=0)


def prepare(url: str, wallets: int) -> None:
    """Fresh schema, and ``wallets`` wallets with plenty of money."""
    from payments.base import Base
    from payments.ledger import AccountKind, get_account, transfer
    from payments.money import Money

    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    dbname = url.rsplit("/", 1)[1]
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{dbname}"'))
    admin.dispose()
    eng = _engine(url)
    import webapp.models  # noqa: F401  (all tables)

    Base.metadata.create_all(eng)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE bench_counter (id int primary key, n bigint not null)"))
        c.execute(text("INSERT INTO bench_counter VALUES (1, 0)"))
    with Session(eng) as s, s.begin():
        clearing = get_account(s, AccountKind.PROVIDER_CLEARING, "EUR")
        get_account(s, AccountKind.REVENUE, "EUR")
        for w in range(wallets):
            transfer(s, idempotency_key=f"seed:{w}", description="seed", debit=clearing, credit=get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", f"user:{w}"), amount=Money(10**12, "EUR"))
    eng.dispose()


def _baseline_worker(url: str, seconds: float, go, out) -> None:
    eng = _engine(url)
    n = 0
    with eng.connect() as c:
        c.execute(text("SELECT 1")).all()  # connected before the start signal
        c.rollback()
        go.wait()
        end = time.time() + seconds
        while time.time() < end:
            with c.begin():
                c.execute(text("UPDATE bench_counter SET n = n + 1 WHERE id = 1"))
            n += 1
    eng.dispose()
    out.put(n)


def _ledger_worker(url: str, seconds: float, go, wallet: int, client: int, out) -> None:
    from payments.ledger import AccountKind, InsufficientFunds, LedgerAccount, transfer
    from payments.money import Money

    eng = _engine(url)
    factory = sessionmaker(eng, expire_on_commit=False)
    with factory() as s:
        acct_wallet = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.CUSTOMER_WALLET, LedgerAccount.owner == f"user:{wallet}"))
        revenue = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.REVENUE))
    n = 0
    go.wait()
    end = time.time() + seconds
    one = Money(1, "EUR")
    with factory() as s:
        acct_wallet, revenue = s.merge(acct_wallet, load=False), s.merge(revenue, load=False)
        s.commit()  # merge began a transaction; each debit below is its own
        while time.time() < end:
            try:
                with s.begin():
                    transfer(s, idempotency_key=f"bench:{client}:{n}", description="debit", debit=acct_wallet, credit=revenue, amount=one)
            except InsufficientFunds:
                pass
            n += 1
    eng.dispose()
    out.put(n)


def check(url: str) -> int:
    """Count invariant violations: unbalanced entries, cached ≠ posted, negative wallets."""
    from payments.ledger import JournalEntry, LedgerAccount, Posting, balance, posted_sum

    eng = _engine(url)
    bad = 0
    with Session(eng) as s:
        bad += s.scalar(select(func.count()).select_from(select(Posting.entry_id).group_by(Posting.entry_id).having(func.sum(Posting.amount_minor) != 0).subquery())) or 0
        for acct in s.scalars(select(LedgerAccount).where(LedgerAccount.guarded)):
            shown = balance(s, acct)
            if shown != posted_sum(s, acct) or shown.amount < 0:
                bad += 1
        entries = s.scalar(select(func.count()).select_from(JournalEntry))
    eng.dispose()
    print(f"checked {entries} entries: {bad} invariant violations")
    return bad


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    url = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("VOLTPAY_BENCH_DATABASE_URL", DEFAULT_URL)
    from webapp.tasks import configure_queue

    # As in production: the low-balance check that each wallet debit asks for goes to Redis, for the worker.
    configure_queue({"REDIS_URL": os.environ.get("VOLTPAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")})
    prepare(url, wallets=4)
    print(f"PostgreSQL ledger benchmark, {ROUNDS} rounds of {seconds:.0f} s per case (baseline and ledger alternately; medians), "
          f"{os.cpu_count()} cores")
    print(f"{'clients':>7} {'baseline tx/s':>14} {'debits/s':>10} {'ratio':>6}")
    ids = iter(range(10**6))  # every client of every run books its own idempotency keys: no run replays another's
    for clients in (1, 4, 16):
        bases, leds = [], []
        for _round in range(ROUNDS):
            bases.append(_timed(_baseline_worker, url, clients, seconds, lambda i: ()))
            run = [next(ids) for _ in range(clients)]
            leds.append(_timed(_ledger_worker, url, clients, seconds, lambda i, run=run: (i % 4, run[i])))
        base, led = statistics.median(bases), statistics.median(leds)
        print(f"{clients:>7} {base:>14.0f} {led:>10.0f} {led / base:>6.2f}   "
              f"(ratios of the rounds: {', '.join(f'{b and x / b:.2f}' for b, x in zip(bases, leds, strict=True))})")
    # Worst case: every client on one wallet.
    run = [next(ids) for _ in range(16)]
    led = _timed(_ledger_worker, url, 16, seconds, lambda i: (0, run[i]))
    print(f"{'16/1w':>7} {'':>14} {led:>10.0f}   (16 clients on one wallet)")
    from webapp.tasks import huey

    huey.flush()  # the low-balance checks queued by the run: nobody will run them
    sys.exit(1 if check(url) else 0)


def _timed(worker, url: str, clients: int, seconds: float, extra) -> float:
    ctx = mp.get_context("fork")
    out, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(url, seconds, go, *extra(i), out)) for i in range(clients)]
    for p in procs:
        p.start()
    go.set()  # all clients start together
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


if __name__ == "__main__":
    main()
