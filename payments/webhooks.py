"""Provider webhook deliveries: stored once per event id, processed idempotently, in any order.

A delivery is recorded under a unique constraint on the provider's event
id, so two deliveries of one event racing each other store it once; the
loser sees the winner's row. Processing never trusts the order of events:
it asks the provider for the payment's state now and applies it with
``cards.apply``, which only moves forward and books each success once.

An event for a payment we have no provider id for is matched through the
metadata we sent (``voltpay_payment``): that is the payment whose answer was
lost when the process died between the provider's reply and our commit.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from payments import cards
from payments.base import Base, UTCDateTime, utcnow
from payments.cards import CardPayment
from payments.providers.base import Payment, PaymentProvider, WebhookEvent


class ProviderEvent(Base):
    """A webhook event received from the provider."""

    __tablename__ = "provider_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    provider_payment_id: Mapped[str | None] = mapped_column(String(255), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))


def receive(s: Session, provider: PaymentProvider, event: WebhookEvent) -> str:
    """Store and process ``event`` once; returns ``processed``, ``duplicate`` or ``ignored``. The caller commits."""
    payment_id = event.payment.id if event.payment else (event.refund.payment_id if event.refund else None)
    try:
        with s.begin_nested():
            row = ProviderEvent(event_id=event.id, type=event.type, provider_payment_id=payment_id)
            s.add(row)
    except IntegrityError:
        row = s.scalar(select(ProviderEvent).where(ProviderEvent.event_id == event.id))
        assert row is not None
        if row.processed_at is not None:
            return "duplicate"
    outcome = "ignored"
    if payment_id:
        payment = s.scalar(select(CardPayment).where(CardPayment.provider_payment_id == payment_id).with_for_update())
        if payment is None and event.payment is not None:
            payment = _unrecorded(s, event.payment)
        if payment is not None:
            # The provider's state now, not the event's snapshot.
            cards.apply(s, payment, provider.retrieve(payment_id=payment_id))
            outcome = "processed"
    row.processed_at = utcnow()
    row.outcome = outcome
    s.flush()
    return outcome


def _unrecorded(s: Session, p: Payment) -> CardPayment | None:
    """Our record of a payment whose provider answer we never stored (the process died before its commit).

    The payment's metadata names our record (``voltpay_payment``, signed with
    the event). The amount and the card must match too, so a test-mode
    account shared by two installations cannot credit the wrong record.
    """
    ours = p.metadata.get("voltpay_payment", "")
    if not ours.isdigit():
        return None
    row = s.scalar(select(CardPayment).where(CardPayment.id == int(ours), CardPayment.provider_payment_id.is_(None)).with_for_update())
    if row is None or row.amount != p.amount or row.payment_method_id != p.payment_method_id:
        return None
    return row
