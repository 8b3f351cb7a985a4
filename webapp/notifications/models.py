"""Who wants which email, and every email we sent (for the support timeline)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from webapp.db import Base, UTCDateTime, utcnow


class NotificationPreferences(Base):
    """A signed-in user's choice of emails; no row means the defaults (all on; low balance below 5.00)."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    receipts: Mapped[bool] = mapped_column(Boolean, default=True)
    session_started: Mapped[bool] = mapped_column(Boolean, default=True)
    session_completed: Mapped[bool] = mapped_column(Boolean, default=True)
    payment_failed: Mapped[bool] = mapped_column(Boolean, default=True)
    low_balance: Mapped[bool] = mapped_column(Boolean, default=True)
    low_balance_threshold_minor: Mapped[int] = mapped_column(BigInteger, default=500)  # in the wallet's currency
    low_balance_sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # throttle: at most one per period
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class SentEmail(Base):
    """One email we queued: to whom, what about, and whether it went out."""

    __tablename__ = "sent_emails"

    id: Mapped[int] = mapped_column(primary_key=True)
    to: Mapped[str] = mapped_column(String(254), index=True)
    template: Mapped[str] = mapped_column(String(64))  # receipt, session_started, low_balance, ...
    subject: Mapped[str] = mapped_column(String(255))
    reference: Mapped[str | None] = mapped_column(String(64), index=True)  # "session:7", "document:12"
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)  # one email per cause
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued, sent, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
