"""Customer wallets: top-up by card, spending through holds, refunds of top-ups.

Ledger entries (debit first):

* top-up captured:       provider clearing  →  customer wallet
* top-up refunded:       customer wallet    →  provider clearing
* hold for a session:    customer wallet    →  wallet hold
* hold captured:         wallet hold        →  revenue (captured part) and back to the wallet (the rest)
* hold released:         wallet hold        →  customer wallet

A wallet is owned by ``user:<id>`` and has one currency. Keys are derived
from the cause (``card_payment:<id>:credit``, ``session:<id>:hold``), so no
cause books twice.
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
from payments.ledger import AccountKind, InsufficientFunds, LedgerAccount, balance, get_account, post, transfer
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


@cards.on_refunded(Purpose.WALLET_TOP_UP)
def _debit_refunded_top_up(s: Session, row: CardPayment, rf: CardRefund) -> None:
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, row.currency)
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:book", description="Top-up refunded", reference=f"card_payment:{row.id}",
        debit=wallet(s, row.reference, row.currency), credit=clearing, amount=rf.amount,
    )


def prepare_top_up_refund(s: Session, row: CardPayment, amount: Money, *, reason: str, idempotency_key: str) -> CardRefund:
    """Reserve a refund of a top-up; refused when the wallet no longer holds that much (it was spent)."""
    if wallet_balance(s, row.reference, row.currency) < amount:
        raise InsufficientFunds(wallet(s, row.reference, row.currency), amount - wallet_balance(s, row.reference, row.currency))
    return cards.prepare_refund(s, row, amount, reason=reason, idempotency_key=idempotency_key)


# --- holds for charging sessions --------------------------------------------------------------


def hold(s: Session, *, owner: str, amount: Money, key: str) -> None:
    """Reserve ``amount`` of the wallet (raises InsufficientFunds)."""
    transfer(
        s, idempotency_key=f"{key}:hold", description="Reserved for charging", reference=key,
        debit=wallet(s, owner, amount.currency), credit=get_account(s, AccountKind.WALLET_HOLD, amount.currency, owner), amount=amount,
    )


def capture_hold(s: Session, *, owner: str, held_amount: Money, amount: Money, key: str) -> None:
    """Take ``amount`` (≤ the hold) as revenue and give the rest back to the wallet, in one entry."""
    if not Money.zero(amount.currency) <= amount <= held_amount:
        raise ValueError("capture must be between zero and the hold")
    hold_acct = get_account(s, AccountKind.WALLET_HOLD, amount.currency, owner)
    postings = [(hold_acct, held_amount)]
    if amount.amount:
        postings.append((get_account(s, AccountKind.REVENUE, amount.currency), -amount))
    if (held_amount - amount).amount:
        postings.append((wallet(s, owner, amount.currency), -(held_amount - amount)))
    post(s, idempotency_key=f"{key}:capture", description="Charging paid from wallet", reference=key, postings=postings)


def release_hold(s: Session, *, owner: str, amount: Money, key: str) -> None:
    """Give a reserved amount back to the wallet."""
    transfer(
        s, idempotency_key=f"{key}:release", description="Reservation released", reference=key,
        debit=get_account(s, AccountKind.WALLET_HOLD, amount.currency, owner), credit=wallet(s, owner, amount.currency), amount=amount,
    )
