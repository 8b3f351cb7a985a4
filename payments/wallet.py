"""Customer wallets: top-up by card, spending through holds, refunds of top-ups.

Ledger entries (debit first):

* top-up captured:       provider clearing  →  customer wallet
* top-up refund prepared: customer wallet   →  refunds payable (before the provider is asked)
* top-up refund sent:    refunds payable    →  provider clearing
* top-up refund refused: refunds payable    →  customer wallet (the reservation comes back)
* hold for a session:    customer wallet    →  wallet hold
* hold captured:         wallet hold        →  revenue and VAT payable (captured part) and back to the wallet (the rest)
* hold released:         wallet hold        →  customer wallet

A wallet is owned by ``user:<id>`` and has one currency. Keys are derived
from the cause (``card_payment:<id>:credit``, ``session:<id>:hold``), so no
cause books twice.

A top-up refund takes the money out of the wallet when it is prepared, under
the wallet's guarded balance (so money already spent, or being spent at the
same moment, can never be refunded to the card as well), and only then is
the provider asked. A hold is settled once: its capture and its release
share the key ``<key>:settle``, so a hold cannot be both captured and
released, and the amount settled is checked against the hold's own entry.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from payments import cards
from payments.base import Base, UTCDateTime, utcnow
from payments.cards import CardPayment, CardRefund, Purpose
from payments.ledger import (
    AccountKind,
    IdempotencyConflict,
    JournalEntry,
    LedgerAccount,
    LedgerError,
    balance,
    get_account,
    post,
    transfer,
)
from payments.money import Money, to_minor
from payments.providers.base import PaymentProvider


@dataclass(frozen=True)
class TopUpLimits:
    """What one top-up may be (major units, Decimal) and the amounts offered as buttons."""

    minimum: Decimal
    maximum: Decimal
    presets: tuple[Decimal, ...]

    def money(self, currency: str) -> tuple[Money, Money, list[Money]]:
        """Minimum, maximum and presets as Money in ``currency``."""
        return to_minor(self.minimum, currency), to_minor(self.maximum, currency), [to_minor(p, currency) for p in self.presets]


_D = Decimal
LIMITS = {
    "JPY": TopUpLimits(_D(500), _D(50000), (_D(1000), _D(3000), _D(5000))),
    "CNY": TopUpLimits(_D(10), _D(3000), (_D(50), _D(100), _D(200))),
}
DEFAULT_LIMITS = TopUpLimits(_D(5), _D(500), (_D(10), _D(20), _D(50)))


def limits_for(currency: str) -> TopUpLimits:
    """Top-up limits of ``currency`` (EUR-like defaults for the others)."""
    return LIMITS.get(currency, DEFAULT_LIMITS)


class PaymentCustomer(Base):
    """Who a person is at the payment provider (Stripe customer id)."""

    __tablename__ = "payment_customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), unique=True)
    provider_customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


def customer_id(s: Session, provider: PaymentProvider, *, owner: str, email: str) -> str:
    """The provider customer id of ``owner``, created once (a concurrent second creation is dropped)."""
    row = s.scalar(select(PaymentCustomer).where(PaymentCustomer.owner == owner))
    if row is not None:
        return row.provider_customer_id
    cid = provider.ensure_customer(email=email, existing_id=None, idempotency_key=f"customer:{owner}")
    try:
        with s.begin_nested():
            s.add(PaymentCustomer(owner=owner, provider_customer_id=cid))
    except IntegrityError:
        row = s.scalar(select(PaymentCustomer).where(PaymentCustomer.owner == owner))
        assert row is not None
        return row.provider_customer_id
    return cid


def known_customer_id(s: Session, owner: str) -> str | None:
    """The provider customer id of ``owner`` if one was created (never calls the provider)."""
    return s.scalar(select(PaymentCustomer.provider_customer_id).where(PaymentCustomer.owner == owner))


def wallet(s: Session, owner: str, currency: str) -> LedgerAccount:
    """The customer's wallet account in ``currency``."""
    return get_account(s, AccountKind.CUSTOMER_WALLET, currency, owner)


def wallet_balance(s: Session, owner: str, currency: str) -> Money:
    """What the customer has in the wallet (holds excluded)."""
    return balance(s, wallet(s, owner, currency))


def held(s: Session, owner: str, currency: str) -> Money:
    """Wallet money reserved for sessions in progress."""
    return balance(s, get_account(s, AccountKind.WALLET_HOLD, currency, owner))


class TopUpError(Exception):
    """A top-up request that cannot be made; ``code`` is stable for messages."""

    def __init__(self, message: str, code: str, **params):
        super().__init__(message)
        self.code = code
        self.params = params


def check_top_up_amount(amount: Money, currency: str) -> None:
    """Refuse a top-up in the wrong currency or outside the limits."""
    if amount.currency != currency:
        raise TopUpError(f"the wallet is in {currency}", "wrong_currency", currency=currency)
    lo, hi, _ = limits_for(currency).money(currency)
    if not lo <= amount <= hi:
        raise TopUpError(f"top-ups are between {lo} and {hi}", "amount_out_of_range", minimum=lo, maximum=hi)


def start_top_up(
    s: Session, provider: PaymentProvider, *, owner: str, email: str, amount: Money, payment_method_id: str, currency: str,
) -> CardPayment:
    """Write the top-up record (the caller commits, then calls ``cards.submit``)."""
    check_top_up_amount(amount, currency)
    cid = customer_id(s, provider, owner=owner, email=email)
    return cards.create(
        s, purpose=Purpose.WALLET_TOP_UP, reference=owner, owner=owner, email=email, amount=amount,
        manual_capture=False, payment_method_id=payment_method_id, customer_id=cid,
    )


@cards.on_succeeded(Purpose.WALLET_TOP_UP)
def _credit_top_up(s: Session, row: CardPayment) -> None:
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, row.currency)
    transfer(
        s, idempotency_key=row.key("credit"), description="Wallet top-up", reference=f"card_payment:{row.id}",
        debit=clearing, credit=wallet(s, row.reference, row.currency), amount=row.captured,
    )


def _refunds_payable(s: Session, currency: str) -> LedgerAccount:
    return get_account(s, AccountKind.REFUNDS_PAYABLE, currency)


@cards.on_refund_prepared(Purpose.WALLET_TOP_UP)
def _reserve_top_up_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    # The wallet is guarded: the debit and the balance check are one statement (InsufficientFunds when spent).
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:reserve", description="Top-up refund", reference=f"card_payment:{row.id}",
        debit=wallet(s, row.reference, row.currency), credit=_refunds_payable(s, row.currency), amount=Money(rf.amount_minor, row.currency),
    )


@cards.on_refunded(Purpose.WALLET_TOP_UP)
def _book_refunded_top_up(s: Session, row: CardPayment, rf: CardRefund) -> None:
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:book", description="Top-up refunded", reference=f"card_payment:{row.id}",
        debit=_refunds_payable(s, row.currency), credit=get_account(s, AccountKind.PROVIDER_CLEARING, row.currency),
        amount=Money(rf.amount_minor, row.currency),
    )


@cards.on_refund_failed(Purpose.WALLET_TOP_UP)
def _return_refused_top_up_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:return", description="Top-up refund failed", reference=f"card_payment:{row.id}",
        debit=_refunds_payable(s, row.currency), credit=wallet(s, row.reference, row.currency), amount=Money(rf.amount_minor, row.currency),
    )


def prepare_top_up_refund(s: Session, row: CardPayment, amount: Money, *, reason: str, idempotency_key: str) -> CardRefund:
    """Reserve a refund of a top-up (row locked with ``cards.lock``); the caller commits, then ``cards.send_refund``.

    The amount leaves the wallet at once; raises InsufficientFunds (nothing
    reserved) when the wallet no longer holds it because it was spent, and
    PaymentError as ``cards.prepare_refund`` does.
    """
    if row.purpose != Purpose.WALLET_TOP_UP:
        raise cards.PaymentError("this payment is not a wallet top-up", "not_a_top_up")
    return cards.prepare_refund(s, row, amount, reason=reason, idempotency_key=idempotency_key)


# --- holds for charging sessions --------------------------------------------------------------


def hold(s: Session, *, owner: str, amount: Money, key: str) -> None:
    """Reserve ``amount`` of the wallet (raises InsufficientFunds)."""
    transfer(
        s, idempotency_key=f"{key}:hold", description="Reserved for charging", reference=key,
        debit=wallet(s, owner, amount.currency), credit=get_account(s, AccountKind.WALLET_HOLD, amount.currency, owner), amount=amount,
    )


def _check_hold(s: Session, *, owner: str, held_amount: Money, key: str) -> LedgerAccount:
    """The owner's hold account, after checking that the hold ``key`` exists and reserved exactly ``held_amount``.

    The hold account is shared by all of the owner's sessions: settling more
    than this hold reserved would take another session's money.
    """
    hold_acct = get_account(s, AccountKind.WALLET_HOLD, held_amount.currency, owner)
    entry = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == f"{key}:hold"))
    if entry is None:
        raise LedgerError(f"there is no wallet hold {key!r}")
    reserved = -sum(p.amount_minor for p in entry.postings if p.account_id == hold_acct.id)
    if reserved != held_amount.amount:
        raise ValueError(f"the hold {key!r} reserved {Money(reserved, held_amount.currency)}, not {held_amount}")
    return hold_acct


def _settle(s: Session, *, key: str, description: str, postings: list[tuple[LedgerAccount, Money]]) -> None:
    try:
        post(s, idempotency_key=f"{key}:settle", description=description, reference=key, postings=postings)
    except IdempotencyConflict:
        raise IdempotencyConflict(f"the hold {key!r} was already settled otherwise (captured or released)") from None


def capture_hold(s: Session, *, owner: str, held_amount: Money, amount: Money, key: str, vat: Money | None = None) -> None:
    """Take ``amount`` (≤ the hold) as revenue, ``vat`` of it to VAT payable, and give the rest back to the wallet, in one entry, once."""
    if not Money.zero(amount.currency) <= amount <= held_amount:
        raise ValueError("capture must be between zero and the hold")
    vat = vat if vat is not None else Money.zero(amount.currency)
    if not Money.zero(amount.currency) <= vat <= amount:
        raise ValueError("the VAT must be between zero and the amount captured")
    hold_acct = _check_hold(s, owner=owner, held_amount=held_amount, key=key)
    postings = [(hold_acct, held_amount)]
    if (amount - vat).amount:
        postings.append((get_account(s, AccountKind.REVENUE, amount.currency), -(amount - vat)))
    if vat.amount:
        postings.append((get_account(s, AccountKind.VAT_PAYABLE, amount.currency), -vat))
    if (held_amount - amount).amount:
        postings.append((wallet(s, owner, amount.currency), -(held_amount - amount)))
    _settle(s, key=key, description="Charging paid from wallet", postings=postings)


def release_hold(s: Session, *, owner: str, amount: Money, key: str) -> None:
    """Give the whole reserved ``amount`` back to the wallet, once (refused after a capture of the same hold)."""
    hold_acct = _check_hold(s, owner=owner, held_amount=amount, key=key)
    _settle(s, key=key, description="Reservation released", postings=[(hold_acct, amount), (wallet(s, owner, amount.currency), -amount)])
