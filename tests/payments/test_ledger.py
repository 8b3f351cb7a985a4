"""The double-entry ledger: balanced entries, idempotency, wallets never below zero, even under races."""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from payments.ledger import (
    AccountKind,
    IdempotencyConflict,
    InsufficientFunds,
    JournalEntry,
    LedgerAccount,
    Posting,
    Unbalanced,
    balance,
    get_account,
    post,
    posted_sum,
    statement,
    transfer,
)
from payments.money import CurrencyMismatch, Money


def eur(cents: int) -> Money:
    return Money(cents, "EUR")


def top_up(s, wallet, cents: int, key: str):
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, wallet.currency)
    return transfer(s, idempotency_key=key, description="top-up", debit=clearing, credit=wallet, amount=Money(cents, wallet.currency))


def spend(s, wallet, cents: int, key: str):
    revenue = get_account(s, AccountKind.REVENUE, wallet.currency)
    return transfer(s, idempotency_key=key, description="charging", debit=wallet, credit=revenue, amount=Money(cents, wallet.currency))


def test_top_up_and_spend_move_the_wallet_balance(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 2000, "topup:1")
        spend(s, wallet, 750, "session:1:capture")
    with Session() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        assert balance(s, wallet) == eur(1250)
        assert posted_sum(s, wallet) == eur(1250)
        assert balance(s, get_account(s, AccountKind.PROVIDER_CLEARING, "EUR")) == eur(2000)
        assert balance(s, get_account(s, AccountKind.REVENUE, "EUR")) == eur(750)


def test_a_wallet_cannot_go_below_zero(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 500, "topup:1")
    with Session() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        with pytest.raises(InsufficientFunds) as e:
            spend(s, wallet, 501, "session:1")
        assert e.value.needed == eur(1)
        s.commit()
    with Session() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        assert balance(s, wallet) == eur(500)
        assert s.scalar(select(func.count()).select_from(JournalEntry)) == 1  # the refused spend left nothing


def test_emergency_credit_allows_a_limited_overdraft(Session):
    with Session.begin() as s:
        meter = get_account(s, AccountKind.METER_WALLET, "EUR", "meter:7", overdraft_limit_minor=1000)
        spend(s, meter, 800, "reading:1")
        with pytest.raises(InsufficientFunds):
            spend(s, meter, 300, "reading:2")
        assert balance(s, meter) == eur(-800)


def test_same_key_books_once(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        first = top_up(s, wallet, 1000, "stripe:evt_1")
        again = top_up(s, wallet, 1000, "stripe:evt_1")
        assert first == again
        assert balance(s, wallet) == eur(1000)


def test_replaying_a_debit_after_the_money_was_spent_returns_the_first_entry(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 1000, "topup:1")
        first = spend(s, wallet, 800, "session:1:capture")
        spend(s, wallet, 200, "session:2:capture")
        assert spend(s, wallet, 800, "session:1:capture") == first  # retried, not refused
        assert balance(s, wallet) == eur(0)


def test_same_key_with_other_postings_is_a_conflict(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 1000, "topup:9")
        with pytest.raises(IdempotencyConflict):
            top_up(s, wallet, 999, "topup:9")
        assert balance(s, wallet) == eur(1000)


def test_an_entry_of_many_postings_books_once_and_a_replay_returns_it(Session):
    """A split among many parties (past the one-statement size on PostgreSQL) books as any entry does."""
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 10_000, "topup:1")
        parties = [get_account(s, AccountKind.PARTY_PAYABLE, "EUR", f"party:{i}") for i in range(20)]
        split = [(wallet, eur(2000))] + [(p, eur(-100)) for p in parties]
        first = post(s, idempotency_key="session:1:split", description="split", postings=split)
        assert post(s, idempotency_key="session:1:split", description="again", postings=split) == first
        with pytest.raises(IdempotencyConflict):
            post(s, idempotency_key="session:1:split", description="other", postings=[(wallet, eur(2000)), (parties[0], eur(-2000))])
        assert balance(s, wallet) == eur(8000)
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Posting).where(Posting.entry_id == first)) == 21
        assert [balance(s, get_account(s, AccountKind.PARTY_PAYABLE, "EUR", f"party:{i}")) for i in (0, 19)] == [eur(100), eur(100)]
        assert balance(s, get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")) == eur(8000)


def test_a_refused_debit_and_a_replay_leave_nothing_for_the_low_balance_check(Session):
    """Only entries booked now are handed on after the commit (with whether each account was debited)."""
    from payments.ledger import POSTED

    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 500, "topup:1")
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 500, "topup:1")  # a replay
        with pytest.raises(InsufficientFunds):
            spend(s, wallet, 501, "session:1")
        assert s.connection().info.get(POSTED, {}) == {}
        spend(s, wallet, 200, "session:2")
        revenue = get_account(s, AccountKind.REVENUE, "EUR")
        assert s.connection().info[POSTED] == {wallet.id: True, revenue.id: False}


def test_unbalanced_and_mixed_currency_entries_are_refused(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        clearing = get_account(s, AccountKind.PROVIDER_CLEARING, "EUR")
        usd = get_account(s, AccountKind.PROVIDER_CLEARING, "USD")
        with pytest.raises(Unbalanced):
            post(s, idempotency_key="x", description="bad", postings=[(clearing, eur(100)), (wallet, eur(-99))])
        with pytest.raises(CurrencyMismatch):
            post(s, idempotency_key="y", description="bad", postings=[(usd, eur(100)), (wallet, eur(-100))])
        with pytest.raises(Unbalanced):
            post(s, idempotency_key="z", description="bad", postings=[])
        assert s.scalar(select(func.count()).select_from(JournalEntry)) == 0


def test_statement_has_running_balances(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 2000, "t1")
        spend(s, wallet, 300, "s1")
        top_up(s, wallet, 500, "t2")
        lines = statement(s, wallet)
    assert [(line["amount"].amount, line["balance_after"].amount) for line in lines] == [(500, 2200), (-300, 1700), (2000, 2000)]
    with Session() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        older = statement(s, wallet, before_entry_id=lines[0]["entry_id"], limit=1)
    assert [(line["amount"].amount, line["balance_after"].amount) for line in older] == [(-300, 1700)]


# --- properties -----------------------------------------------------------------------------

_runs = itertools.count()
ops = st.lists(
    st.tuples(st.sampled_from(["top_up", "spend", "hold", "release", "replay"]), st.integers(min_value=0, max_value=2), st.integers(min_value=1, max_value=5000)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_random_operations_keep_every_entry_balanced_and_every_wallet_non_negative(Session, operations):
    run = next(_runs)  # each example gets its own accounts and keys: no truncation between examples
    with Session.begin() as s:
        wallets = [get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", f"user:{run}:{i}") for i in range(3)]
        holds = [get_account(s, AccountKind.WALLET_HOLD, "EUR", f"user:{run}:{i}") for i in range(3)]
        clearing = get_account(s, AccountKind.PROVIDER_CLEARING, "EUR")
        revenue = get_account(s, AccountKind.REVENUE, "EUR")
        expected = {w.id: 0 for w in wallets + holds}
        last_key = None
        for n, (op, who, cents) in enumerate(operations):
            key = f"run:{run}:op:{n}"
            src, dst = {
                "top_up": (clearing, wallets[who]),
                "spend": (wallets[who], revenue),
                "hold": (wallets[who], holds[who]),
                "release": (holds[who], wallets[who]),
                "replay": (None, None),
            }[op]
            if op == "replay":
                if last_key:
                    post(s, idempotency_key=last_key[0], description="again", postings=last_key[1])
                continue
            postings = [(src, eur(cents)), (dst, eur(-cents))]
            try:
                post(s, idempotency_key=key, description=op, postings=postings)
            except InsufficientFunds:
                assert expected.get(src.id, 10**9) < cents
                continue
            last_key = (key, postings)
            if src.id in expected:
                expected[src.id] -= cents
            if dst.id in expected:
                expected[dst.id] += cents
    with Session() as s:
        for entry_sum in s.execute(select(func.sum(Posting.amount_minor)).group_by(Posting.entry_id)).scalars():
            assert entry_sum == 0
        for acct in s.scalars(select(LedgerAccount).where(LedgerAccount.guarded, LedgerAccount.owner.like(f"user:{run}:%"))):
            shown = balance(s, acct)
            assert shown.amount >= 0
            assert shown == posted_sum(s, acct)
            assert shown.amount == expected[acct.id]


# --- concurrency (PostgreSQL: real row locks; SQLite: BEGIN IMMEDIATE) ----------------------


def test_twenty_concurrent_debits_never_overspend(Session):
    with Session.begin() as s:
        wallet = get_account(s, AccountKind.CUSTOMER_WALLET, "EUR", "user:1")
        top_up(s, wallet, 1000, "topup:1")
        wallet_id = wallet.id
    barrier = threading.Barrier(20)
    results: list[str] = []
    lock = threading.Lock()

    def debit(n: int) -> None:
        barrier.wait()
        with Session() as s:
            try:
                with s.begin():
                    wallet = s.get(LedgerAccount, wallet_id)
                    spend(s, wallet, 100, f"session:{n}")
                outcome = "ok"
            except InsufficientFunds:
                outcome = "refused"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=debit, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["ok"] * 10 + ["refused"] * 10
    with Session() as s:
        wallet = s.get(LedgerAccount, wallet_id)
        assert balance(s, wallet) == eur(0)
        assert posted_sum(s, wallet) == eur(0)
