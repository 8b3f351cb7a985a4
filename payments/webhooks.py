"""Provider webhook deliveries: stored once per event id, processed idempotently, in any order.

A delivery is recorded under a unique constraint on the provider's event
id, so two deliveries of one event racing each other store it once; the
loser sees the winner's row. Processing never trusts the order of events:
it asks the provider for the payment's state now and applies it with
``cards.apply``, which only moves forward and books each success once.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from payments import cards
from payments.base import Base, UTCDateTime, utcnow
from payments.cards import CardPayment
from payments.providers.base import PaymentProvider, WebhookEvent


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
        if payment is not None:
            cards.refresh(s, provider, payment)  # the provider's state now, not the event's snapshot
            outcome = "processed"
    row.processed_at = utcnow()
    row.outcome = outcome
    s.flush()
    return outcome
