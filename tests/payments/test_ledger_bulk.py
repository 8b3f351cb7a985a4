"""``payments.ledger.post_many``: many entries in a few statements, under the rules ``post`` keeps for one."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from payments.ledger import (
    AccountKind,
    InsufficientFunds,
    JournalEntry,
    LedgerError,
    Posting,
    Unbalanced,
    balance,
    get_account,
    post_many,
    posted_sum,
    transfer,
)
from payments.money import CurrencyMismatch, Money


def accounts(s, wallet_limit: int = 0):
    """A meter wallet holding 10.00 (and ``wallet_limit`` of overdraft), revenue and VAT payable, in EUR."""
    wallet = get_account(s, AccountKind.METER_WALLET, "EUR", "meter:1", overdraft_limit_minor=wallet_limit)
    transfer(s, idempotency_key="top-up", description="top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"), credit=wallet,
             amount=Money(1000, "EUR"))
    return wallet, get_account(s, AccountKind.REVENUE, "EUR"), get_account(s, AccountKind.VAT_PAYABLE, "EUR")


def debit(key: str, wallet, revenue, vat, cents: int, vat_cents: int = 0):
    postings = [(wallet.id, cents, "EUR"), (revenue.id, -(cents - vat_cents), "EUR"), (vat.id, -vat_cents, "EUR")]
    return (key, "Electricity consumption", "meter:1", postings)


def test_entries_are_booked_once_with_their_postings_and_the_wallet_balance(Session):
    with Session.begin() as s:
        wallet, revenue, vat = accounts(s)
        ids, balances = post_many(s, [debit("a", wallet, revenue, vat, 121, 21), debit("b", wallet, revenue, vat, 100)])
        assert set(ids) == {"a", "b"} and balances == {wallet.id: (221 - 1000, 0)}
        # A replay books nothing: the keys exist; a new key in the same call is booked.
        ids, _ = post_many(s, [debit("a", wallet, revenue, vat, 121, 21), debit("c", wallet, revenue, vat, 50)])
        assert set(ids) == {"c"}
    with Session() as s:
        wallet = get_account(s, AccountKind.METER_WALLET, "EUR", "meter:1")
        assert balance(s, wallet) == Money(1000 - 271, "EUR") == posted_sum(s, wallet)
        entry = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == "a"))
        # Zero postings are left out; the postings in the order given.
        assert [(p.account_id, p.amount_minor) for p in entry.postings] == [(wallet.id, 121), (revenue.id, -100), (vat.id, -21)]
        assert entry.description == "Electricity consumption" and entry.reference == "meter:1"


def test_a_debit_past_the_limit_is_refused_and_nothing_is_written(Session):
    with Session.begin() as s:
        wallet, revenue, vat = accounts(s)
        with pytest.raises(InsufficientFunds):
            post_many(s, [debit("a", wallet, revenue, vat, 600), debit("b", wallet, revenue, vat, 600)])
        assert s.scalar(select(func.count()).select_from(JournalEntry).where(JournalEntry.idempotency_key.in_(["a", "b"]))) == 0
        assert balance(s, wallet) == Money(1000, "EUR")
        # raise_limit books it (consumption that happened) and the limit follows the debt.
        _ids, balances = post_many(s, [debit("a", wallet, revenue, vat, 600), debit("b", wallet, revenue, vat, 600)], past_limit="raise_limit")
        assert balances == {wallet.id: (200, 200)}
    with Session() as s:
        wallet = get_account(s, AccountKind.METER_WALLET, "EUR", "meter:1")
        assert balance(s, wallet) == Money(-200, "EUR") == posted_sum(s, wallet)
        assert wallet.overdraft_limit_minor == 200


def test_bad_entries_are_refused_before_anything_is_written(Session):
    with Session.begin() as s:
        wallet, revenue, vat = accounts(s)
        count = s.scalar(select(func.count()).select_from(Posting))
        unbalanced = ("u", "x", None, [(wallet.id, 100, "EUR"), (revenue.id, -90, "EUR")])
        with pytest.raises(Unbalanced):
            post_many(s, [debit("ok", wallet, revenue, vat, 10), unbalanced])
        with pytest.raises(Unbalanced):
            post_many(s, [("z", "x", None, [(wallet.id, 0, "EUR")])])
        with pytest.raises(CurrencyMismatch):
            post_many(s, [("c", "x", None, [(wallet.id, 100, "USD"), (revenue.id, -100, "USD")])])
        with pytest.raises(LedgerError):
            post_many(s, [debit("d", wallet, revenue, vat, 10), debit("d", wallet, revenue, vat, 10)])
        assert s.scalar(select(func.count()).select_from(Posting)) == count
        assert balance(s, wallet) == Money(1000, "EUR")


def test_booked_fail_writes_new_keys_and_refuses_a_key_booked_before(Session):
    from sqlalchemy.exc import IntegrityError

    with Session.begin() as s:
        wallet, revenue, vat = accounts(s)
        ids, _ = post_many(s, [debit("a", wallet, revenue, vat, 100)], booked="fail")
        assert set(ids) == {"a"}
    with Session() as s, pytest.raises(IntegrityError):
        wallet, revenue, vat = (get_account(s, k, "EUR", o) for k, o in
                                ((AccountKind.METER_WALLET, "meter:1"), (AccountKind.REVENUE, ""), (AccountKind.VAT_PAYABLE, "")))
        post_many(s, [debit("a", wallet, revenue, vat, 100)], booked="fail")
        s.flush()
