"""A buyer's business details for invoices (company, address, VAT id)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from webapp.db import Base, UTCDateTime, utcnow


class BillingDetails(Base):
    """What a signed-in customer wants on their invoices; copied into each document when it is issued."""

    __tablename__ = "billing_details"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    company_name: Mapped[str] = mapped_column(String(200), default="")
    address: Mapped[str] = mapped_column(Text, default="")
    vat_id: Mapped[str] = mapped_column(String(32), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    def as_buyer(self) -> dict:
        """The buyer block of a document (empty fields left out)."""
        return {k: v for k, v in (("company_name", self.company_name), ("address", self.address), ("vat_id", self.vat_id)) if v}
