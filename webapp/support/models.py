"""Support: tickets from the contact form, the audit log of staff actions, and approvals.

* A **ticket** is opened by anyone (signed in or guest) from the contact form,
  about a charging session, a document or a meter when started from one. Its
  operator is the operator of what it is about (None: a general question, seen by
  platform support only). The customer reads and answers it through a link that
  carries the ticket's own token (only its sha256 is stored), no account needed.
* The **audit log** is append-only: every support or operator action writes one
  entry (who, when, what, on which object, why, the state before and after). The
  ORM refuses to update or delete an entry.
* An **approval request** holds an action that moves more money than the
  operator's limit (``Operator.support_approval_limit_minor``) until a second
  person (not the requester) approves it; the approver's click runs the action.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, Enum, ForeignKey, Index, String, Text, event
from sqlalchemy.orm import Mapped, mapped_column, relationship

from webapp.db import Base, UTCDateTime, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class TicketCategory(enum.StrEnum):
    """What a ticket is about, as the customer picks it on the contact form."""

    CHARGING = "charging"  # a session did not start, stopped, charged too much
    PAYMENT = "payment"  # card declined, hold not released, refund
    RECEIPT = "receipt"  # receipt or invoice missing or wrong
    METER = "meter"  # prepaid meter, top-up, disconnection
    BILL = "bill"  # post-paid bill
    ACCOUNT = "account"
    OTHER = "other"


class TicketState(enum.StrEnum):
    """Open: support owes an answer. Waiting: the customer does. Closed: done (a customer reply reopens it)."""

    OPEN = "open"
    WAITING = "waiting"
    CLOSED = "closed"


class Ticket(Base):
    """A customer's question or complaint, with its thread of messages."""

    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str] = mapped_column(String(16), unique=True)  # shown to people: "T-7K3Q9M2X"
    access_token_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the link token sent to the customer
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(120), default="")
    email: Mapped[str] = mapped_column(String(254), index=True)
    locale: Mapped[str | None] = mapped_column(String(8))  # the customer's language: emails about the ticket use it
    category: Mapped[TicketCategory] = mapped_column(_enum(TicketCategory, "ticket_category"))
    subject: Mapped[str] = mapped_column(String(200))
    state: Mapped[TicketState] = mapped_column(_enum(TicketState, "ticket_state"), default=TicketState.OPEN, index=True)
    # What it is about, attached when the form was started from a session, document or meter page.
    session_id: Mapped[int | None] = mapped_column(ForeignKey("charging_sessions.id"), index=True)
    document_number: Mapped[str | None] = mapped_column(String(32), index=True)
    meter_id: Mapped[int | None] = mapped_column(ForeignKey("meters.id"), index=True)
    assignee_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_customer_message_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    messages: Mapped[list[TicketMessage]] = relationship(back_populates="ticket", order_by="TicketMessage.id")


class TicketMessage(Base):
    """One message of a ticket's thread, from the customer or from staff."""

    __tablename__ = "ticket_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    from_staff: Mapped[bool] = mapped_column(default=False)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))  # staff member, or the signed-in customer
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    ticket: Mapped[Ticket] = relationship(back_populates="messages")


class AuditEntry(Base):
    """One staff action, as it happened. Append-only: never updated, never deleted."""

    __tablename__ = "audit_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)  # None: the system (a job)
    actor_email: Mapped[str] = mapped_column(String(254))  # kept as it was, even if the account changes later
    actor_role: Mapped[str] = mapped_column(String(32))
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id"), index=True)  # whose object it was
    action: Mapped[str] = mapped_column(String(64))  # refund, release_hold, stop_session, ticket_reply, ...
    object_type: Mapped[str] = mapped_column(String(32))  # session, document, meter, ticket, approval, ...
    object_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    before_json: Mapped[str | None] = mapped_column(Text)
    after_json: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16), default="done")  # done, refused, failed, requested (approval)
    request_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_audit_entries_object", "object_type", "object_id"),)


@event.listens_for(AuditEntry, "before_update")
def _no_update(mapper, connection, target):  # noqa: ARG001 - SQLAlchemy event signature
    raise RuntimeError("audit entries are append-only")


@event.listens_for(AuditEntry, "before_delete")
def _no_delete(mapper, connection, target):  # noqa: ARG001 - SQLAlchemy event signature
    raise RuntimeError("audit entries are append-only")


class ApprovalState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"  # and carried out (see the result)
    REJECTED = "rejected"
    FAILED = "failed"  # approved, but carrying it out failed (the result says why)


class ApprovalRequest(Base):
    """An action over the operator's limit, waiting for a second person."""

    __tablename__ = "approval_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id"), index=True)
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(64))
    params_json: Mapped[str] = mapped_column(Text)  # what the action needs to run (amount, ...)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[ApprovalState] = mapped_column(_enum(ApprovalState, "approval_state"), default=ApprovalState.PENDING, index=True)
    requested_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[str | None] = mapped_column(Text)


__all__ = [
    "ApprovalRequest",
    "ApprovalState",
    "AuditEntry",
    "Ticket",
    "TicketCategory",
    "TicketMessage",
    "TicketState",
]
