"""Tenants, meter tariffs, readings, billed intervals, relay commands, collectors and post-paid bills.

A site with meters is a building. Its meters (``webapp.models.Meter``) are
tenant sub-meters, public-area meters, or the master meter upstream of them
(``Meter.master_meter_id`` names a sub-meter's master). A tenant holds one or
more meters, prepaid (a meter wallet per meter in the ledger, debited as
electricity is consumed) or post-paid (a monthly bill).
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Enum,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from webapp.db import Base, UTCDateTime, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Billing(enum.StrEnum):
    """How a tenant pays for electricity."""

    PREPAID = "prepaid"
    POSTPAID = "postpaid"


class TenantState(enum.StrEnum):
    ACTIVE = "active"
    CLOSING = "closing"  # final reading asked for, final bill pending
    CLOSED = "closed"


class Tenant(Base):
    """Someone who rents space in a building and pays for the electricity of their meters."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)  # the account that signs in
    name: Mapped[str] = mapped_column(String(200))  # person or company
    contact_email: Mapped[str] = mapped_column(String(254))
    contact_phone: Mapped[str] = mapped_column(String(40), default="")
    unit: Mapped[str] = mapped_column(String(64), default="")  # flat / shop / room number
    leased_area_m2: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal(0))
    custom_share: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))  # weight for the "custom" public-area method
    billing: Mapped[Billing] = mapped_column(_enum(Billing, "tenant_billing"), default=Billing.PREPAID)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    low_balance_threshold_minor: Mapped[int] = mapped_column(BigInteger, default=1000)  # prepaid: alert below this
    low_balance_alerted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # throttle; cleared above threshold
    emergency_credit_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # prepaid: may go this far below zero
    state: Mapped[TenantState] = mapped_column(_enum(TenantState, "tenant_state"), default=TenantState.ACTIVE)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    meters: Mapped[list["Meter"]] = relationship("Meter", back_populates="tenant", order_by="Meter.id")  # noqa: F821


class MeterTariff(Base):
    """A named electricity tariff of a building; its prices live in versions."""

    __tablename__ = "meter_tariffs"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[MeterTariffVersion]] = relationship(back_populates="tariff", order_by="MeterTariffVersion.effective_from")


class MeterTariffVersion(Base):
    """One immutable version: the tariff document (``payments.metering`` validates it) from ``effective_from``."""

    __tablename__ = "meter_tariff_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    tariff_id: Mapped[int] = mapped_column(ForeignKey("meter_tariffs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    effective_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    tariff_json: Mapped[str] = mapped_column(Text)  # exact numbers (payments.tariff_store.dumps/loads)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    tariff: Mapped[MeterTariff] = relationship(back_populates="versions")

    __table_args__ = (
        UniqueConstraint("tariff_id", "number", name="uq_meter_tariff_versions_tariff_number"),
        UniqueConstraint("tariff_id", "effective_from", name="uq_meter_tariff_versions_tariff_effective_from"),
    )


class MeterCollector(Base):
    """A meter data collector of an operator: posts readings (OAuth2 client credentials), receives relay commands."""

    __tablename__ = "meter_collectors"

    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    client_id: Mapped[str] = mapped_column(String(64), unique=True)  # OAuth2 client id
    client_secret_hash: Mapped[str] = mapped_column(String(255))  # shown once at creation, stored hashed
    webhook_url: Mapped[str | None] = mapped_column(String(500))  # relay commands go here
    webhook_secret: Mapped[str | None] = mapped_column(String(128))  # HMAC key of the webhook signature
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CollectorToken(Base):
    """An access token issued to a collector (stored hashed; short-lived)."""

    __tablename__ = "collector_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    collector_id: Mapped[int] = mapped_column(ForeignKey("meter_collectors.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(200), default="meters:write")
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class MeterReading(Base):
    """A register reading (kWh on the meter's display; × ct_multiplier for the energy), kept as received."""

    __tablename__ = "meter_readings"

    id: Mapped[int] = mapped_column(primary_key=True)
    meter_id: Mapped[int] = mapped_column(ForeignKey("meters.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    register_kwh: Mapped[Decimal] = mapped_column(Numeric(18, 3))
    demand_kw: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))  # max demand since the previous reading
    segment: Mapped[int] = mapped_column(Integer, default=0)  # +1 after each declared replacement or rollover
    source: Mapped[str] = mapped_column(String(16), default="api")  # api, csv, manual, final
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("meter_id", "at", name="uq_meter_readings_meter_at"),)


class MeterEventKind(enum.StrEnum):
    REPLACEMENT = "replacement"  # a new meter: the old one's final register, the new one's start register
    ROLLOVER = "rollover"  # the register wrapped past its maximum back to zero


class MeterEvent(Base):
    """A declared break in a meter's register: readings after it start a new segment."""

    __tablename__ = "meter_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    meter_id: Mapped[int] = mapped_column(ForeignKey("meters.id", ondelete="CASCADE"), index=True)
    kind: Mapped[MeterEventKind] = mapped_column(_enum(MeterEventKind, "meter_event_kind"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    old_final_kwh: Mapped[Decimal] = mapped_column(Numeric(18, 3))  # the register's last value before the break
    new_start_kwh: Mapped[Decimal] = mapped_column(Numeric(18, 3), default=Decimal(0))  # its first value after
    declared_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class MeterInterval(Base):
    """Consumption between two consecutive readings, priced; a prepaid meter's wallet is debited once per interval."""

    __tablename__ = "meter_intervals"

    id: Mapped[int] = mapped_column(primary_key=True)
    meter_id: Mapped[int] = mapped_column(ForeignKey("meters.id", ondelete="CASCADE"))
    start_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    end_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    kwh: Mapped[Decimal] = mapped_column(Numeric(18, 3))  # energy (register difference × CT multiplier)
    demand_kw: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    amount_minor: Mapped[int] = mapped_column(BigInteger)  # incl. VAT; 0 for post-paid (billed monthly)
    currency: Mapped[str] = mapped_column(String(3))
    tariff_version_id: Mapped[int | None] = mapped_column(ForeignKey("meter_tariff_versions.id"))
    breakdown_json: Mapped[str] = mapped_column(Text, default="{}")  # kWh and amount per band (peak/flat/valley, tier)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)  # split by a late reading; reversed by a correction
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("meter_id", "start_at", "end_at", name="uq_meter_intervals_meter_span"),)


class RelayAction(enum.StrEnum):
    DISCONNECT = "disconnect"
    RECONNECT = "reconnect"


class RelayCommand(Base):
    """A disconnect or reconnect sent to the meter's collector as a signed webhook, retried until answered."""

    __tablename__ = "relay_commands"

    id: Mapped[int] = mapped_column(primary_key=True)
    meter_id: Mapped[int] = mapped_column(ForeignKey("meters.id", ondelete="CASCADE"), index=True)
    action: Mapped[RelayAction] = mapped_column(_enum(RelayAction, "relay_action"))
    reason: Mapped[str] = mapped_column(String(64))  # balance_exhausted, topped_up, operator, account_closed
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, delivered, failed, superseded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class PublicAreaMethod(enum.StrEnum):
    """How a building's public-area consumption is shared among its post-paid tenants."""

    CONSUMPTION = "consumption"
    AREA = "area"
    EQUAL = "equal"
    CUSTOM = "custom"  # Tenant.custom_share weights


class BuildingBilling(Base):
    """A building's post-paid rules: public-area method, fixed fees, due days."""

    __tablename__ = "building_billing"

    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), primary_key=True)
    public_area_method: Mapped[PublicAreaMethod] = mapped_column(_enum(PublicAreaMethod, "public_area_method"),
                                                                 default=PublicAreaMethod.CONSUMPTION)
    fixed_fees_json: Mapped[str] = mapped_column(Text, default="[]")  # [{"name", "amount_minor", "vat"}] per tenant per month
    due_days: Mapped[int] = mapped_column(Integer, default=14)
    reminder_days: Mapped[int] = mapped_column(Integer, default=7)  # an overdue reminder every this many days
    vat_rate: Mapped[Decimal] = mapped_column(Numeric(5, 2), default=Decimal("21.00"))


class BillState(enum.StrEnum):
    DRAFT = "draft"
    ISSUED = "issued"
    PAID = "paid"
    VOID = "void"
    REVIEW = "review"  # something forbids issuing it (negative line loss, missing reading)


class Bill(Base):
    """A tenant's post-paid bill for one month."""

    __tablename__ = "bills"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    period: Mapped[str] = mapped_column(String(7))  # YYYY-MM, in the building's time zone
    state: Mapped[BillState] = mapped_column(_enum(BillState, "bill_state"), default=BillState.DRAFT, index=True)
    currency: Mapped[str] = mapped_column(String(3))
    total_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # incl. VAT
    vat_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    lines_json: Mapped[str] = mapped_column(Text, default="[]")  # each share and how it was computed
    review_reason: Mapped[str | None] = mapped_column(String(200))
    issued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    due_date: Mapped[dt.date | None] = mapped_column(Date)
    paid_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    card_payment_id: Mapped[int | None] = mapped_column(ForeignKey("card_payments.id"))
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id"))  # its invoice, numbered when the bill is issued
    reminders_sent: Mapped[int] = mapped_column(Integer, default=0)
    last_reminder_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("tenant_id", "period", name="uq_bills_tenant_period"),
        CheckConstraint("total_minor >= 0", name="total_not_negative"),
    )
