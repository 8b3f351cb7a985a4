"""Card payments and wallets end to end: our records, the ledger, and Stripe (localstripe) through the official SDK.

No mocks: ``stripe_provider`` is the real provider against localstripe, the
database is the test database (SQLite or PostgreSQL), and what the browser
does (type a card, pass 3-D Secure) is done by ``tests/stripe_browser.py``.
Each step commits like the web app does: record → commit → provider → commit.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from payments import cards, wallet
from payments.cards import CardPayment, CardRefund, PaymentError, Purpose, State
from payments.ledger import AccountKind, IdempotencyConflict, InsufficientFunds, JournalEntry, LedgerError, balance, get_account, posted_sum
from payments.money import Money
from payments.providers.base import CardDeclined, InvalidRequest, PaymentStatus
from tests.stripe_browser import DECLINED_AT_CHARGE, THREE_D_SECURE, VISA, confirm_card_setup, pass_3ds

OWNER = "user:1"
EMAIL = "ana@example.com"


def eur(cents: int) -> Money:
    return Money(cents, "EUR")


class CallLog:
    """The real provider, with a list of the calls made through it (to prove what we refuse never reaches it)."""

    def __init__(self, provider) -> None:
        self._provider = provider
        self.calls: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._provider, name)
        if callable(attr):
            def call(*a, **kw):
                self.calls.append(name)
                return attr(*a, **kw)
            return call
        return attr


@pytest.fixture
def db(app):
    """A session of the app's database, closed after the test."""
    with app.extensions["db_sessionmaker"]() as s:
        yield s


@pytest.fixture
def save_card(db, stripe_provider, stripe_config):
    """Save a card for OWNER as the card page does: customer, SetupIntent, confirmed by stripe.js, finished."""

    def save(number: str = VISA):
        cid = wallet.customer_id(db, stripe_provider, owner=OWNER, email=EMAIL)
        db.commit()
        setup = stripe_provider.start_card_setup(customer_id=cid, idempotency_key=f"setup:{OWNER}:{number}")
        confirm_card_setup(stripe_config, setup.id, number)
        return stripe_provider.finish_card_setup(setup_id=setup.id, customer_id=cid)

    return save


def start_top_up(db, provider, card, cents: int) -> CardPayment:
    row = wallet.start_top_up(db, provider, owner=OWNER, email=EMAIL, amount=eur(cents), payment_method_id=card.id, currency="EUR")
    db.commit()
    return row


def submit(db, provider, row: CardPayment) -> CardPayment:
    """``cards.submit`` and commit whatever happened (as the views do), re-raising provider errors."""
    try:
        return cards.submit(db, provider, row)
    finally:
        db.commit()


def top_up(db, provider, card, cents: int) -> CardPayment:
    return submit(db, provider, start_top_up(db, provider, card, cents))


def entries(db, row: CardPayment) -> list[JournalEntry]:
    return list(db.scalars(select(JournalEntry).where(JournalEntry.reference == f"card_payment:{row.id}").order_by(JournalEntry.id)))


def entry_count(db) -> int:
    return db.scalar(select(func.count()).select_from(JournalEntry))


def wallet_balance(db) -> Money:
    acct = wallet.wallet(db, OWNER, "EUR")
    assert balance(db, acct) == posted_sum(db, acct)  # the cached balance agrees with the postings
    return balance(db, acct)


def held(db) -> Money:
    acct = get_account(db, AccountKind.WALLET_HOLD, "EUR", OWNER)
    assert balance(db, acct) == posted_sum(db, acct)
    return balance(db, acct)


def hold_payment(db, provider, card, cents: int, reference: str = "session:7") -> CardPayment:
    """A card hold for a charging session (manual capture), submitted."""
    cid = wallet.customer_id(db, provider, owner=OWNER, email=EMAIL)
    row = cards.create(
        db, purpose=Purpose.CHARGING_SESSION, reference=reference, owner=OWNER, email=EMAIL, amount=eur(cents),
        manual_capture=True, payment_method_id=card.id, customer_id=cid,
    )
    db.commit()
    return submit(db, provider, row)


def charge_payment(db, provider, card, cents: int, reference: str = "bill:3") -> CardPayment:
    """An immediate card payment of a bill, submitted."""
    cid = wallet.customer_id(db, provider, owner=OWNER, email=EMAIL)
    row = cards.create(
        db, purpose=Purpose.BILL, reference=reference, owner=OWNER, email=EMAIL, amount=eur(cents),
        manual_capture=False, payment_method_id=card.id, customer_id=cid,
    )
    db.commit()
    return submit(db, provider, row)


def refund(db, provider, row: CardPayment, cents: int, key: str, *, top_up: bool = False) -> CardRefund:
    """Prepare (row locked) → commit → send → commit, as a support console would."""
    locked = cards.lock(db, row.id)
    prepare = wallet.prepare_top_up_refund if top_up else cards.prepare_refund
    rf = prepare(db, locked, eur(cents), reason="requested_by_customer", idempotency_key=key)
    db.commit()
    rf = cards.send_refund(db, provider, rf)
    db.commit()
    return rf


# --- wallet top-ups ------------------------------------------------------------------------------


def test_top_up_books_one_entry_and_credits_the_wallet(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = top_up(db, stripe_provider, card, 2500)

    assert (row.state, row.captured, row.card_last4) == (State.SUCCEEDED, eur(2500), "4242")
    assert row.provider_payment_id.startswith("pi_")
    [entry] = entries(db, row)
    assert entry.idempotency_key == f"card_payment:{row.id}:credit"
    assert sorted(p.amount_minor for p in entry.postings) == [-2500, 2500]
    assert wallet_balance(db) == eur(2500)
    assert balance(db, get_account(db, AccountKind.PROVIDER_CLEARING, "EUR")) == eur(2500)

    # The webhook, the browser and the reconciliation job may all report the same success.
    cards.refresh(db, stripe_provider, row)
    cards.submit(db, stripe_provider, row)  # sent before: asks the provider, never creates a second payment
    db.commit()
    assert len(entries(db, row)) == 1 and entry_count(db) == 1
    assert wallet_balance(db) == eur(2500)


def test_declined_top_up_fails_and_books_nothing(db, stripe_provider, save_card):
    card = save_card(DECLINED_AT_CHARGE)
    row = start_top_up(db, stripe_provider, card, 2000)

    with pytest.raises(CardDeclined) as declined:
        submit(db, stripe_provider, row)

    assert declined.value.reason == "card_declined"
    db.expire_all()
    assert (row.state, row.failure_code) == (State.FAILED, "card_declined")
    assert entry_count(db) == 0 and wallet_balance(db) == eur(0)
    assert cards.submit(db, stripe_provider, row).state == State.FAILED  # a failed record is never sent again


def test_3ds_top_up_is_credited_once_after_the_challenge(db, stripe_provider, stripe_config, save_card):
    card = save_card(THREE_D_SECURE)
    row = top_up(db, stripe_provider, card, 3000)
    assert row.state == State.REQUIRES_ACTION and entry_count(db) == 0
    pending = stripe_provider.retrieve(payment_id=row.provider_payment_id)
    assert pending.status == PaymentStatus.REQUIRES_ACTION and pending.client_secret

    pass_3ds(stripe_config, pending.id, pending.client_secret)
    cards.refresh(db, stripe_provider, cards.lock(db, row.id))
    db.commit()

    assert row.state == State.SUCCEEDED and len(entries(db, row)) == 1
    assert wallet_balance(db) == eur(3000)
    cards.refresh(db, stripe_provider, cards.lock(db, row.id))  # the browser's return after the webhook
    db.commit()
    assert len(entries(db, row)) == 1 and wallet_balance(db) == eur(3000)

    # Order independence: the stale "requires_action" snapshot arriving now changes nothing.
    cards.apply(db, cards.lock(db, row.id), pending)
    db.commit()
    db.expire_all()
    assert row.state == State.SUCCEEDED and len(entries(db, row)) == 1 and wallet_balance(db) == eur(3000)


def test_3ds_failure_fails_the_top_up_and_books_nothing(db, stripe_provider, stripe_config, save_card):
    card = save_card(THREE_D_SECURE)
    row = top_up(db, stripe_provider, card, 3000)
    pending = stripe_provider.retrieve(payment_id=row.provider_payment_id)

    pass_3ds(stripe_config, pending.id, pending.client_secret, success=False)
    cards.refresh(db, stripe_provider, cards.lock(db, row.id))
    db.commit()

    assert row.state == State.FAILED and row.failure_code == "payment_intent_authentication_failure"
    assert entry_count(db) == 0 and wallet_balance(db) == eur(0)


def test_top_up_limits_are_checked_before_anything_is_written(db, stripe_provider, save_card):
    card = save_card(VISA)
    for amount, code in ((eur(499), "amount_out_of_range"), (eur(50001), "amount_out_of_range"), (Money(1000, "USD"), "wrong_currency")):
        with pytest.raises(wallet.TopUpError) as refused:
            wallet.start_top_up(db, stripe_provider, owner=OWNER, email=EMAIL, amount=amount, payment_method_id=card.id, currency="EUR")
        assert refused.value.code == code
    assert db.scalar(select(func.count()).select_from(CardPayment)) == 0


# --- card holds ----------------------------------------------------------------------------------


def test_hold_then_partial_capture_takes_the_amount_and_releases_the_rest(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = hold_payment(db, stripe_provider, card, 3000)
    assert row.state == State.AUTHORIZED and row.captured == eur(0)

    cards.capture(db, stripe_provider, cards.lock(db, row.id), eur(1234))
    db.commit()

    assert (row.state, row.captured, row.refundable) == (State.SUCCEEDED, eur(1234), eur(1234))
    at_provider = stripe_provider.retrieve(payment_id=row.provider_payment_id)
    assert (at_provider.status, at_provider.amount_captured, at_provider.amount_refunded) == (PaymentStatus.SUCCEEDED, eur(1234), eur(0))
    # A second capture (a retry) changes nothing.
    cards.capture(db, stripe_provider, cards.lock(db, row.id), eur(1234))
    db.commit()
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).amount_captured == eur(1234)


def test_release_cancels_the_hold(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = hold_payment(db, stripe_provider, card, 2500)

    cards.release(db, stripe_provider, cards.lock(db, row.id))
    db.commit()

    assert row.state == State.CANCELED and row.captured == eur(0)
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).status == PaymentStatus.CANCELED
    assert cards.release(db, stripe_provider, row).state == State.CANCELED  # idempotent
    with pytest.raises(PaymentError) as refused:
        cards.capture(db, stripe_provider, row, eur(100))
    assert refused.value.code == "not_authorized"


def test_capture_beyond_the_hold_is_refused_before_the_provider_is_called(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = hold_payment(db, stripe_provider, card, 1000)
    spy = CallLog(stripe_provider)

    for amount in (eur(1001), Money(500, "USD"), eur(-1)):
        with pytest.raises(PaymentError) as refused:
            cards.capture(db, spy, cards.lock(db, row.id), amount)
        assert refused.value.code == "capture_out_of_range"

    assert spy.calls == []
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).status == PaymentStatus.REQUIRES_CAPTURE
    assert row.state == State.AUTHORIZED


def test_a_stale_failure_never_undoes_a_hold(db, stripe_provider, stripe_config, save_card):
    card = save_card(THREE_D_SECURE)
    row = hold_payment(db, stripe_provider, card, 2000)
    pending = stripe_provider.retrieve(payment_id=row.provider_payment_id)
    pass_3ds(stripe_config, pending.id, pending.client_secret)
    cards.refresh(db, stripe_provider, cards.lock(db, row.id))
    db.commit()
    assert row.state == State.AUTHORIZED

    from dataclasses import replace

    failed_snapshot = replace(pending, status=PaymentStatus.REQUIRES_PAYMENT_METHOD, failure_code="card_declined")
    for stale in (pending, failed_snapshot):
        cards.apply(db, cards.lock(db, row.id), stale)
        db.commit()
        assert (row.state, row.failure_code) == (State.AUTHORIZED, None)


# --- refunds -------------------------------------------------------------------------------------


def test_partial_then_full_refund_and_nothing_beyond(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = charge_payment(db, stripe_provider, card, 2000)
    assert row.state == State.SUCCEEDED

    first = refund(db, stripe_provider, row, 500, "refund:1")
    assert (first.status, first.amount, first.provider_refund_id[:3]) == ("succeeded", eur(500), "re_")
    assert row.refundable == eur(1500)
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).amount_refunded == eur(500)

    spy = CallLog(stripe_provider)
    with pytest.raises(PaymentError) as refused:
        refund(db, spy, row, 1501, "refund:too-much")
    assert refused.value.code == "refund_exceeds_captured"
    db.rollback()

    rest = refund(db, stripe_provider, row, 1500, "refund:2")
    assert rest.status == "succeeded" and rest.id != first.id
    assert row.refunded_minor == 2000 and row.refundable == eur(0)
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).amount_refunded == eur(2000)

    with pytest.raises(PaymentError) as refused:
        refund(db, spy, row, 1, "refund:3")
    assert refused.value.code == "refund_exceeds_captured"
    db.rollback()
    assert spy.calls == []  # refused by us, not by the provider
    assert db.scalar(select(func.count()).select_from(CardRefund)) == 2


def test_refund_after_a_partial_capture_is_bounded_by_the_capture(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = hold_payment(db, stripe_provider, card, 3000)
    cards.capture(db, stripe_provider, cards.lock(db, row.id), eur(1200))
    db.commit()

    with pytest.raises(PaymentError) as refused:
        refund(db, stripe_provider, row, 1201, "refund:1")
    assert refused.value.code == "refund_exceeds_captured"
    db.rollback()
    assert refund(db, stripe_provider, row, 1200, "refund:2").status == "succeeded"


def test_the_same_refund_key_refunds_once(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = charge_payment(db, stripe_provider, card, 2000)

    first = refund(db, stripe_provider, row, 700, "support:ticket-9")
    again = refund(db, stripe_provider, row, 700, "support:ticket-9")

    assert again.id == first.id and again.provider_refund_id == first.provider_refund_id
    assert row.refunded_minor == 700
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).amount_refunded == eur(700)
    assert db.scalar(select(func.count()).select_from(CardRefund)) == 1
    with pytest.raises(PaymentError) as conflict:
        refund(db, stripe_provider, row, 800, "support:ticket-9")
    assert conflict.value.code == "idempotency_conflict"


def test_a_top_up_refund_debits_the_wallet(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = top_up(db, stripe_provider, card, 2000)

    locked = cards.lock(db, row.id)
    rf = wallet.prepare_top_up_refund(db, locked, eur(500), reason="requested_by_customer", idempotency_key="refund:1")
    db.commit()
    assert wallet_balance(db) == eur(1500)  # the money left the wallet before the provider was asked
    cards.send_refund(db, stripe_provider, rf)
    db.commit()

    assert rf.status == "succeeded" and wallet_balance(db) == eur(1500)
    assert balance(db, get_account(db, AccountKind.REFUNDS_PAYABLE, "EUR")) == eur(0)
    assert balance(db, get_account(db, AccountKind.PROVIDER_CLEARING, "EUR")) == eur(1500)
    assert stripe_provider.retrieve(payment_id=row.provider_payment_id).amount_refunded == eur(500)
    assert [e.description for e in entries(db, row)] == ["Wallet top-up", "Top-up refund", "Top-up refunded"]
    # The same refund again books nothing more.
    refund(db, stripe_provider, row, 500, "refund:1", top_up=True)
    assert wallet_balance(db) == eur(1500) and len(entries(db, row)) == 3


def test_a_top_up_refund_is_refused_when_the_money_was_spent(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = top_up(db, stripe_provider, card, 2000)
    wallet.hold(db, owner=OWNER, amount=eur(1800), key="session:1")
    db.commit()
    spy = CallLog(stripe_provider)

    with pytest.raises(InsufficientFunds):
        refund(db, spy, row, 201, "refund:1", top_up=True)
    db.rollback()

    db.expire_all()
    assert spy.calls == [] and row.refunded_minor == 0
    assert db.scalar(select(func.count()).select_from(CardRefund)) == 0
    assert wallet_balance(db) == eur(200) and held(db) == eur(1800)
    assert refund(db, stripe_provider, row, 200, "refund:2", top_up=True).status == "succeeded"
    assert wallet_balance(db) == eur(0)


def test_a_refund_the_provider_refuses_gives_the_wallet_back(db, stripe_provider, save_card):
    card = save_card(VISA)
    row = top_up(db, stripe_provider, card, 2000)
    # Refunded behind our back (the provider's dashboard): our record still thinks 2000 is refundable.
    stripe_provider.refund(payment_id=row.provider_payment_id, amount=eur(2000), idempotency_key="dashboard")

    locked = cards.lock(db, row.id)
    rf = wallet.prepare_top_up_refund(db, locked, eur(600), reason="requested_by_customer", idempotency_key="refund:1")
    db.commit()
    assert wallet_balance(db) == eur(1400)
    with pytest.raises(InvalidRequest):
        cards.send_refund(db, stripe_provider, rf)
    db.commit()

    assert rf.status == "failed" and row.refunded_minor == 0
    assert wallet_balance(db) == eur(2000)
    assert balance(db, get_account(db, AccountKind.REFUNDS_PAYABLE, "EUR")) == eur(0)


# --- wallet holds for charging -------------------------------------------------------------------


def test_wallet_holds_keep_the_balances_exact_and_refuse_overspending(db, stripe_provider, save_card):
    card = save_card(VISA)
    top_up(db, stripe_provider, card, 5000)

    wallet.hold(db, owner=OWNER, amount=eur(3000), key="session:1")
    db.commit()
    assert (wallet_balance(db), held(db)) == (eur(2000), eur(3000))

    with pytest.raises(InsufficientFunds):
        wallet.hold(db, owner=OWNER, amount=eur(2001), key="session:2")
    db.rollback()
    assert (wallet_balance(db), held(db)) == (eur(2000), eur(3000))

    wallet.hold(db, owner=OWNER, amount=eur(2000), key="session:2")
    wallet.hold(db, owner=OWNER, amount=eur(2000), key="session:2")  # the same cause books once
    db.commit()
    assert (wallet_balance(db), held(db)) == (eur(0), eur(5000))

    wallet.capture_hold(db, owner=OWNER, held_amount=eur(3000), amount=eur(1800), key="session:1")
    wallet.capture_hold(db, owner=OWNER, held_amount=eur(3000), amount=eur(1800), key="session:1")  # a retry
    db.commit()
    assert (wallet_balance(db), held(db)) == (eur(1200), eur(2000))
    assert balance(db, get_account(db, AccountKind.REVENUE, "EUR")) == eur(1800)

    # A captured hold cannot also be released, nor captured again for another amount.
    with pytest.raises(IdempotencyConflict):
        wallet.release_hold(db, owner=OWNER, amount=eur(3000), key="session:1")
    with pytest.raises(IdempotencyConflict):
        wallet.capture_hold(db, owner=OWNER, held_amount=eur(3000), amount=eur(2000), key="session:1")
    db.rollback()
    # Settling more than a hold reserved would take another session's money.
    with pytest.raises(ValueError):
        wallet.release_hold(db, owner=OWNER, amount=eur(5000), key="session:2")
    with pytest.raises(ValueError):
        wallet.capture_hold(db, owner=OWNER, held_amount=eur(2000), amount=eur(2001), key="session:2")
    with pytest.raises(LedgerError):
        wallet.release_hold(db, owner=OWNER, amount=eur(100), key="session:unknown")
    db.rollback()

    wallet.release_hold(db, owner=OWNER, amount=eur(2000), key="session:2")
    wallet.release_hold(db, owner=OWNER, amount=eur(2000), key="session:2")  # a retry
    db.commit()
    assert (wallet_balance(db), held(db)) == (eur(3200), eur(0))
    assert balance(db, get_account(db, AccountKind.PROVIDER_CLEARING, "EUR")) == eur(5000)
