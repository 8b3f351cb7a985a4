"""Card payments: our record of every provider payment (hold or charge), captures, releases, refunds.

Exactly-once, whatever the provider does with idempotency keys:

1. Our ``CardPayment`` row is written and committed (status ``created``)
   before the provider is called, with an idempotency key derived from the
   row (``card_payment:<id>:create``). Should the process die between the
   provider's answer and our commit, the reconciliation job asks again with
   the same key (Stripe replays its first answer for 24 hours) and applies it.
2. Every change of state goes through ``apply()``, which only moves forward
   (a ``succeeded`` payment never goes back to ``requires_action``, whatever
   order the webhook and the browser arrive in) and books the ledger with
   keys derived from the payment, so the webhook, the browser and the
   reconciliation job can all report the same success and money is booked
   once.
3. Captures and refunds are checked against our own record first (a refund
   beyond what was captured is refused here, not left to the provider), and
   the record's row is locked while doing so.

What the money is *for* is the caller's business: ``apply`` calls the
``on_succeeded`` hook registered for the payment's purpose (wallet top-up,
charging session, meter top-up, bill) inside the same transaction.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable

from sqlalchemy import BigInteger, Enum, ForeignKey, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.attributes import set_committed_value

from payments.base import Base, UTCDateTime, utcnow
from payments.money import Money
from payments.providers.base import Payment, PaymentProvider, PaymentStatus, ProviderError


class Purpose(enum.StrEnum):
    """What a card payment pays for."""

    WALLET_TOP_UP = "wallet_top_up"
    CHARGING_SESSION = "charging_session"
    METER_TOP_UP = "meter_top_up"
    BILL = "bill"


class State(enum.StrEnum):
    """Our view of a card payment; moves only forward (see ``_RANK``)."""

    CREATED = "created"  # our row exists; the provider may not know it yet
    REQUIRES_ACTION = "requires_action"  # 3-D Secure in the browser
    PROCESSING = "processing"
    AUTHORIZED = "authorized"  # a hold: waiting for capture or release
    SUCCEEDED = "succeeded"  # captured (fully or partly)
    FAILED = "failed"  # declined, 3-D Secure failed, or never reached the provider
    CANCELED = "canceled"  # hold released, or abandoned before capture


_RANK = {
    State.CREATED: 0,
    State.REQUIRES_ACTION: 1,
    State.PROCESSING: 2,
    State.FAILED: 3,  # a failed attempt may still be retried by the browser (new card, 3DS again)
    State.AUTHORIZED: 4,  # above FAILED: a late "payment failed" of an earlier attempt never undoes a hold
    State.SUCCEEDED: 9,
    State.CANCELED: 9,
}
FINAL = {State.SUCCEEDED, State.CANCELED}


def _enum(cls):
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class CardPayment(Base):
    """A payment by card at the provider, and what we know of it."""

    __tablename__ = "card_payments"

    id: Mapped[int] = mapped_column(primary_key=True)
    purpose: Mapped[Purpose] = mapped_column(_enum(Purpose))
    reference: Mapped[str] = mapped_column(String(64), index=True)  # what it pays for: "user:42", "session:7"
    owner: Mapped[str] = mapped_column(String(64), index=True)  # who may see it: "user:42" or "guest:<email>"
    email: Mapped[str | None] = mapped_column(String(254))
    currency: Mapped[str] = mapped_column(String(3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)  # requested or held
    captured_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    manual_capture: Mapped[bool] = mapped_column(default=False)
    state: Mapped[State] = mapped_column(_enum(State), default=State.CREATED, index=True)
    provider_payment_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    provider_customer_id: Mapped[str | None] = mapped_column(String(255))
    payment_method_id: Mapped[str | None] = mapped_column(String(255))
    card_brand: Mapped[str | None] = mapped_column(String(32))
    card_last4: Mapped[str | None] = mapped_column(String(4))
    failure_code: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    refunds: Mapped[list[CardRefund]] = relationship(back_populates="payment", order_by="CardRefund.id")

    @property
    def amount(self) -> Money:
        """Requested or held amount."""
        return Money(self.amount_minor, self.currency)

    @property
    def captured(self) -> Money:
        """Amount actually taken."""
        return Money(self.captured_minor, self.currency)

    @property
    def refundable(self) -> Money:
        """What may still be refunded."""
        return Money(self.captured_minor - self.refunded_minor, self.currency)

    def key(self, action: str) -> str:
        """Idempotency key of ``action`` on this payment, for the provider and the ledger."""
        return f"card_payment:{self.id}:{action}"


class CardRefund(Base):
    """A refund of (part of) a captured card payment."""

    __tablename__ = "card_refunds"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[int] = mapped_column(ForeignKey("card_payments.id"), index=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(200), default="")
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    provider_refund_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    payment: Mapped[CardPayment] = relationship(back_populates="refunds")

    @property
    def amount(self) -> Money:
        """Refunded amount."""
        return Money(self.amount_minor, self.payment.currency)


class PaymentError(Exception):
    """A card payment rule was broken (nothing was sent to the provider)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


# Hooks per purpose, called inside the transaction that records the change.
OnChange = Callable[[Session, CardPayment], None]
OnRefund = Callable[[Session, CardPayment, "CardRefund"], None]
# Several hooks may listen to one purpose (the ledger booking, then the receipt); they run in registration order.
_on_succeeded: dict[Purpose, list[OnChange]] = {}
_on_refund_prepared: dict[Purpose, list[OnRefund]] = {}
_on_refunded: dict[Purpose, list[OnRefund]] = {}
_on_refund_failed: dict[Purpose, list[OnRefund]] = {}


def _run(hooks: dict, purpose: Purpose, *args) -> None:
    for fn in hooks.get(purpose, ()):
        fn(*args)


def on_succeeded(purpose: Purpose):
    """Register what to book when a payment of ``purpose`` is captured (once per payment)."""

    def register(fn: OnChange) -> OnChange:
        _on_succeeded.setdefault(purpose, []).append(fn)
        return fn

    return register


def on_refunded(purpose: Purpose):
    """Register what to book when a refund of a payment of ``purpose`` succeeds (once per refund)."""

    def register(fn):
        _on_refunded.setdefault(purpose, []).append(fn)
        return fn

    return register


def on_refund_prepared(purpose: Purpose):
    """Register what to reserve when a refund of ``purpose`` is prepared (before the provider is asked).

    Raising refuses the refund: nothing of it is left behind (a wallet top-up
    whose money was spent cannot be refunded).
    """

    def register(fn):
        _on_refund_prepared.setdefault(purpose, []).append(fn)
        return fn

    return register


def on_refund_failed(purpose: Purpose):
    """Register what to give back when the provider refuses a prepared refund of ``purpose``."""

    def register(fn):
        _on_refund_failed.setdefault(purpose, []).append(fn)
        return fn

    return register


def lock(s: Session, payment_id: int) -> CardPayment:
    """The payment row, locked for update (PostgreSQL; SQLite transactions are already exclusive)."""
    row = s.scalar(select(CardPayment).where(CardPayment.id == payment_id).with_for_update())
    if row is None:
        raise PaymentError("no such payment", "not_found")
    s.refresh(row)
    return row


def _state_of(p: Payment) -> State:
    return {
        PaymentStatus.REQUIRES_PAYMENT_METHOD: State.FAILED,
        PaymentStatus.REQUIRES_CONFIRMATION: State.CREATED,
        PaymentStatus.REQUIRES_ACTION: State.REQUIRES_ACTION,
        PaymentStatus.PROCESSING: State.PROCESSING,
        PaymentStatus.REQUIRES_CAPTURE: State.AUTHORIZED,
        PaymentStatus.SUCCEEDED: State.SUCCEEDED,
        PaymentStatus.CANCELED: State.CANCELED,
    }[p.status]


def apply(s: Session, row: CardPayment, p: Payment) -> CardPayment:
    """Bring our record up to the provider's state ``p`` (forward only) and book a success once."""
    if row.provider_payment_id is None:
        row.provider_payment_id = p.id
    elif row.provider_payment_id != p.id:
        raise PaymentError("provider payment does not belong to this record", "mismatch")
    new = _state_of(p)
    old = row.state
    if old in FINAL or _RANK[new] < _RANK[old]:
        return row  # late or out-of-order news: nothing moves backwards (not even the failure reason)
    if new == State.SUCCEEDED and row.manual_capture and not p.amount_captured:
        # A snapshot that does not say how much of the hold was taken: booking the whole hold could book
        # money never captured. Leave the record as it is; ``refresh`` (the provider's truth) settles it.
        return row
    row.payment_method_id = p.payment_method_id or row.payment_method_id
    row.card_brand = p.card_brand or row.card_brand
    row.card_last4 = p.card_last4 or row.card_last4
    if new == State.FAILED:
        row.failure_code = p.failure_code or row.failure_code or "payment_failed"
        row.failure_message = p.failure_message or row.failure_message
    elif new == State.SUCCEEDED:
        row.failure_code = row.failure_message = None  # an earlier failed attempt of this payment is history
    row.state = new
    if new == State.SUCCEEDED and old != State.SUCCEEDED:
        row.captured_minor = p.amount_captured.amount or p.amount.amount
        _run(_on_succeeded, row.purpose, s, row)
    s.flush()
    return row


def create(
    s: Session, *, purpose: Purpose, reference: str, owner: str, email: str | None, amount: Money,
    manual_capture: bool, payment_method_id: str, customer_id: str | None,
) -> CardPayment:
    """Write our record of a payment about to be made (the caller commits before calling ``submit``)."""
    if amount.amount <= 0:
        raise PaymentError("the amount must be positive", "amount_not_positive")
    row = CardPayment(
        purpose=purpose, reference=reference, owner=owner, email=email, currency=amount.currency, amount_minor=amount.amount,
        manual_capture=manual_capture, payment_method_id=payment_method_id, provider_customer_id=customer_id,
    )
    s.add(row)
    s.flush()
    return row


def submit(s: Session, provider: PaymentProvider, row: CardPayment, *, off_session: bool = False) -> CardPayment:
    """Send a created payment to the provider (hold or charge) and record the answer.

    Provider errors propagate after the record is marked failed (declined, or
    refused as invalid so nothing was created) or left as is (unavailable: the
    reconciliation job will ask again).
    """
    from payments.providers.base import CardDeclined, InvalidRequest

    if row.provider_payment_id is not None:
        # Sent before: ask, never create again (localstripe ignores idempotency keys: a second create is a second payment).
        return refresh(s, provider, row)
    if row.state != State.CREATED:
        return row  # failed before reaching the provider, or released: nothing to send
    call = provider.authorize if row.manual_capture else provider.charge
    metadata = {"voltpay_payment": str(row.id), "purpose": row.purpose.value, "reference": row.reference}
    try:
        p = call(
            amount=row.amount, payment_method_id=row.payment_method_id or "", customer_id=row.provider_customer_id,
            idempotency_key=row.key("create"), off_session=off_session, metadata=metadata,
        )
    except CardDeclined as e:
        if e.payment is not None:
            apply(s, row, e.payment)
        row.state = State.FAILED if row.state not in FINAL else row.state
        row.failure_code = e.reason
        row.failure_message = e.message
        s.flush()
        raise
    except InvalidRequest as e:
        if e.payment is not None:
            apply(s, row, e.payment)
        elif row.provider_payment_id is None and row.state == State.CREATED:
            # The provider refused the request itself (unknown card, bad amount): asking again
            # with the same parameters gets the same answer, so this attempt is over.
            row.state = State.FAILED
            row.failure_code = e.code
            row.failure_message = e.message
            s.flush()
        raise
    except ProviderError as e:
        if e.payment is not None:
            apply(s, row, e.payment)
        raise
    return apply(s, row, p)


def refresh(s: Session, provider: PaymentProvider, row: CardPayment) -> CardPayment:
    """Ask the provider for the payment's state now and apply it (browser return, webhook, reconciliation)."""
    if row.provider_payment_id is None:
        return row
    return apply(s, row, provider.retrieve(payment_id=row.provider_payment_id))


def capture(s: Session, provider: PaymentProvider, row: CardPayment, amount: Money) -> CardPayment:
    """Capture ``amount`` (at most the hold; zero releases the hold instead). Idempotent."""
    if row.state == State.SUCCEEDED:
        return row
    if row.state != State.AUTHORIZED:
        raise PaymentError(f"cannot capture a payment in state {row.state}", "not_authorized")
    if amount.currency != row.currency or not 0 <= amount.amount <= row.amount_minor:
        raise PaymentError(f"capture must be between 0 and {row.amount}", "capture_out_of_range")
    if amount.amount == 0:
        return release(s, provider, row)
    p = provider.capture(payment_id=row.provider_payment_id or "", amount=amount, idempotency_key=row.key("capture"))
    return apply(s, row, p)


def release(s: Session, provider: PaymentProvider, row: CardPayment) -> CardPayment:
    """Release a hold that will not be captured. Idempotent."""
    if row.state == State.CANCELED:
        return row
    if row.state == State.SUCCEEDED:
        raise PaymentError("the payment was already captured; refund it instead", "already_captured")
    if row.provider_payment_id is None:
        row.state = State.CANCELED
        s.flush()
        return row
    p = provider.release(payment_id=row.provider_payment_id, idempotency_key=row.key("release"))
    return apply(s, row, p)


def prepare_refund(s: Session, row: CardPayment, amount: Money, *, reason: str, idempotency_key: str) -> CardRefund:
    """Reserve a refund on our record (never more than what is left); the caller commits, then ``send_refund``.

    The payment row must be locked (``lock``): the reservation raises
    ``refunded_minor`` at once, so two concurrent refunds cannot both pass the
    check. The same idempotency key returns the same refund. The purpose's
    ``on_refund_prepared`` hook runs in one savepoint with the reservation:
    when it refuses (raises), nothing of the refund is left behind.
    """
    existing = s.scalar(select(CardRefund).where(CardRefund.idempotency_key == idempotency_key))
    if existing is not None:
        if existing.payment_id != row.id or existing.amount_minor != amount.amount:
            raise PaymentError("this idempotency key was used for another refund", "idempotency_conflict")
        return existing
    if row.state != State.SUCCEEDED:
        raise PaymentError("only a captured payment can be refunded", "not_captured")
    if amount.currency != row.currency or amount.amount <= 0:
        raise PaymentError("the refund must be a positive amount in the payment's currency", "refund_invalid")
    if amount.amount > row.refundable.amount:
        raise PaymentError(f"at most {row.refundable} can still be refunded", "refund_exceeds_captured")
    refunded_before = row.refunded_minor
    rf = CardRefund(payment_id=row.id, amount_minor=amount.amount, reason=reason[:200], idempotency_key=idempotency_key)
    try:
        with s.begin_nested():
            s.add(rf)
            row.refunded_minor = refunded_before + amount.amount
            s.flush()
            _run(_on_refund_prepared, row.purpose, s, row, rf)
    except Exception:
        # The savepoint is rolled back; make the objects say so too.
        if rf in s:
            s.expunge(rf)
        set_committed_value(row, "refunded_minor", refunded_before)
        raise
    return rf


def send_refund(s: Session, provider: PaymentProvider, rf: CardRefund) -> CardRefund:
    """Send a prepared refund to the provider and book it once; a refused refund gives its reservation back.

    The refund's row is locked first and its status read again, and the lock
    is held through the provider's answer until the caller commits: two
    requests sending the same pending refund (a double click, a retried
    request, a support agent and a job) send it once, even to a provider
    that ignores the idempotency key (localstripe); the second finds it done.
    After a crash mid-call the refund is still pending and is sent again with
    the same key, which the provider answers with the first refund.
    """
    from payments.providers.base import InvalidRequest

    s.refresh(rf, with_for_update=True)
    if rf.status in ("succeeded", "failed"):
        return rf
    row = rf.payment
    try:
        result = provider.refund(payment_id=row.provider_payment_id or "", amount=rf.amount, idempotency_key=f"card_refund:{rf.id}", reason=rf.reason)
    except InvalidRequest:
        rf.status = "failed"
        row.refunded_minor -= rf.amount_minor
        _run(_on_refund_failed, row.purpose, s, row, rf)
        s.flush()
        raise  # the caller commits: the refund stays failed and its reservation is given back
    rf.provider_refund_id = result.id
    rf.status = "succeeded" if result.status in ("succeeded", "pending") else result.status
    _run(_on_refunded, row.purpose, s, row, rf)
    s.flush()
    return rf


def stale(s: Session, older_than: dt.timedelta, limit: int = 200) -> list[CardPayment]:
    """Payments still waiting for an answer after ``older_than`` (for the reconciliation job)."""
    cutoff = utcnow() - older_than
    return list(
        s.scalars(
            select(CardPayment)
            .where(CardPayment.state.in_([State.CREATED, State.REQUIRES_ACTION, State.PROCESSING]), CardPayment.updated_at < cutoff)
            .order_by(CardPayment.id)
            .limit(limit)
        )
    )


__all__ = [
    "CardPayment", "CardRefund", "PaymentError", "Purpose", "State", "apply", "capture", "create", "lock", "on_refund_failed",
    "on_refund_prepared", "on_refunded", "on_succeeded", "prepare_refund", "refresh", "release", "send_refund", "stale", "submit",
]
