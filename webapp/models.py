"""Identity and site models: accounts, sign-in secrets, API tokens, operators, sites, chargers, meters.

The money domain keeps its own tables in ``payments/``; these are the
web app's. Secrets (passwords, tokens, recovery codes) are stored only as
hashes.
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

import payments.cards  # noqa: F401  (the money tables share this metadata)
import payments.ledger  # noqa: F401
import payments.tariff_store  # noqa: F401
import payments.wallet  # noqa: F401
import payments.webhooks  # noqa: F401
from webapp.db import Base, UTCDateTime, utcnow


class Role(enum.StrEnum):
    """What a person may do: customers pay; staff help and run sites."""

    CUSTOMER = "customer"  # driver or tenant
    SUPPORT = "support"
    OPERATOR_STAFF = "operator_staff"
    ADMIN = "admin"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK, so adding a member is a small migration on both databases.
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Operator(Base):
    """A charging or property operator: the seller on receipts, owner of sites."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    legal_name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str] = mapped_column(Text, default="")
    vat_id: Mapped[str | None] = mapped_column(String(32))
    # Receipts and invoices: the number prefix (VP → VP-2026-000123; credit notes VP-CN-2026-…), unique among
    # operators so a number names one document, and the branding (payments.invoicing keeps a copy in each document).
    document_prefix: Mapped[str | None] = mapped_column(String(12), unique=True)  # None: "OP<id>"
    brand_color: Mapped[str] = mapped_column(String(7), default="#0b6e4f", server_default="#0b6e4f")  # #rrggbb
    brand_logo: Mapped[bytes | None] = mapped_column(LargeBinary)  # PNG, JPEG or SVG, at most 200 kB
    brand_logo_type: Mapped[str | None] = mapped_column(String(32))  # its media type
    receipt_footer: Mapped[str] = mapped_column(Text, default="", server_default="")
    receipt_legal: Mapped[str] = mapped_column(Text, default="", server_default="")  # legal lines (registration, capital, ...)
    # Support: refunds and goodwill credits above this amount (minor units of the payment's currency) need a
    # second person's approval; NULL takes the SUPPORT_APPROVAL_LIMIT_MINOR setting.
    support_approval_limit_minor: Mapped[int | None] = mapped_column(BigInteger)
    # Monitoring (webapp.console.monitoring): a charger silent this long is offline; a meter without a reading
    # this long is an alarm; new alarms are emailed here (NULL: to no one, the alarm list still shows them).
    alarm_offline_minutes: Mapped[int] = mapped_column(Integer, default=10, server_default="10")
    alarm_meter_silence_hours: Mapped[int] = mapped_column(Integer, default=26, server_default="26")
    alarm_email: Mapped[str | None] = mapped_column(String(254))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    sites: Mapped[list[Site]] = relationship(back_populates="operator")

    @property
    def prefix(self) -> str:
        """The prefix of this operator's document numbers."""
        return self.document_prefix or f"OP{self.id}"


class User(UserMixin, Base):
    """A person who signs in: customer (driver or tenant), support, operator staff or admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)  # stored lower-case
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None: OIDC-only account
    email_verified_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"), default=Role.CUSTOMER)
    operator_id: Mapped[int | None] = mapped_column(ForeignKey("operators.id"))
    locale: Mapped[str | None] = mapped_column(String(8))
    currency: Mapped[str] = mapped_column(String(3), default="EUR", server_default="EUR")  # the wallet's currency
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_last_step: Mapped[int | None] = mapped_column(Integer)  # refuses a replayed code
    is_active_account: Mapped[bool] = mapped_column(Boolean, default=True)
    # Bumped on password change or "sign out everywhere": old sessions stop matching.
    session_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    operator: Mapped[Operator | None] = relationship()

    __table_args__ = (
        CheckConstraint(
            "(role IN ('operator_staff') AND operator_id IS NOT NULL) OR role NOT IN ('operator_staff')",
            name="staff_has_operator",
        ),
    )

    def get_id(self) -> str:
        """Session identity: the id plus the session version, so a password change signs out other devices."""
        return f"{self.id}:{self.session_version}"

    @property
    def is_active(self) -> bool:  # flask-login
        """Whether the account may sign in."""
        return self.is_active_account

    @property
    def is_verified(self) -> bool:
        """Whether the email address has been confirmed."""
        return self.email_verified_at is not None

    @property
    def two_factor_enabled(self) -> bool:
        """Whether sign-in asks for an authenticator code."""
        return self.totp_secret is not None

    @property
    def owner(self) -> str:
        """How the money domain names this person (wallet owner, payment owner)."""
        return f"user:{self.id}"

    def has_role(self, *roles: Role) -> bool:
        """Whether the user has one of ``roles`` (admins have every role)."""
        return self.role == Role.ADMIN or self.role in roles


class EmailTokenPurpose(enum.StrEnum):
    """What an emailed link does."""

    VERIFY = "verify"
    RESET = "reset"


class EmailToken(Base):
    """A single-use emailed link (verification or password reset); only its hash is stored."""

    __tablename__ = "email_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[EmailTokenPurpose] = mapped_column(_enum(EmailTokenPurpose, "email_token_purpose"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    user: Mapped[User] = relationship()


class RecoveryCode(Base):
    """A one-time two-factor recovery code (hashed)."""

    __tablename__ = "recovery_codes"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class OidcIdentity(Base):
    """An account at an OpenID Connect provider linked to a user, by issuer and subject."""

    __tablename__ = "oidc_identities"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    issuer: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    user: Mapped[User] = relationship()

    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_oidc_identities_issuer_subject"),)


class ApiToken(Base):
    """A first-party API bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()

    def is_valid(self, now: dt.datetime) -> bool:
        """Not revoked and not expired at ``now``."""
        return self.revoked_at is None and self.expires_at > now


class Site(Base):
    """A place with chargers and/or meters: address, time zone and currency."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str] = mapped_column(Text, default="")
    time_zone: Mapped[str] = mapped_column(String(64), default="UTC")
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    # Charging rules of the site (the operator console edits them). A start not seen within
    # start_window_s is given up and its hold released; a session below min_billable_wh of energy
    # or min_billable_s of charging time is free. The hold_* limits size the default hold
    # (payments.price_display.HoldPolicy); NULL takes the policy's defaults.
    start_window_s: Mapped[int] = mapped_column(Integer, default=180, server_default="180")
    min_billable_wh: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    min_billable_s: Mapped[int] = mapped_column(Integer, default=60, server_default="60")
    hold_max_energy_kwh: Mapped[int | None] = mapped_column(Integer)
    hold_max_charging_s: Mapped[int | None] = mapped_column(Integer)
    hold_max_idle_s: Mapped[int | None] = mapped_column(Integer)
    meter_sample_interval_s: Mapped[int] = mapped_column(Integer, default=10, server_default="10")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    operator: Mapped[Operator] = relationship(back_populates="sites")
    chargers: Mapped[list[Charger]] = relationship(back_populates="site", order_by="Charger.id")
    meters: Mapped[list[Meter]] = relationship(back_populates="site", order_by="Meter.id")


class Charger(Base):
    """A charging pile known by its OCPP charge point id; its password is stored hashed."""

    __tablename__ = "chargers"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    charge_point_id: Mapped[str] = mapped_column(String(48), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    vendor: Mapped[str | None] = mapped_column(String(50))
    model: Mapped[str | None] = mapped_column(String(50))
    serial_number: Mapped[str | None] = mapped_column(String(25))
    firmware_version: Mapped[str | None] = mapped_column(String(50))
    last_boot_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # last message of any kind
    status: Mapped[str | None] = mapped_column(String(24))  # StatusNotification of connector 0 (the charger itself)
    error_code: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    site: Mapped[Site] = relationship(back_populates="chargers")
    connectors: Mapped[list[Connector]] = relationship(back_populates="charger", order_by="Connector.number")


class Connector(Base):
    """A plug on a charger, reached by drivers through its public ``connector_code``."""

    __tablename__ = "connectors"

    id: Mapped[int] = mapped_column(primary_key=True)
    charger_id: Mapped[int] = mapped_column(ForeignKey("chargers.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # OCPP connectorId, from 1
    connector_code: Mapped[str] = mapped_column(String(16), unique=True)
    standard: Mapped[str] = mapped_column(String(32), default="IEC_62196_T2")
    max_power_kw: Mapped[int] = mapped_column(Integer, default=22)
    # The last StatusNotification (OCPP 1.6 ChargePointStatus and ChargePointErrorCode, kept as sent).
    status: Mapped[str | None] = mapped_column(String(24))  # None: never reported
    error_code: Mapped[str | None] = mapped_column(String(32))
    vendor_error_code: Mapped[str | None] = mapped_column(String(50))
    status_info: Mapped[str | None] = mapped_column(String(50))
    status_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    charger: Mapped[Charger] = relationship(back_populates="connectors")

    __table_args__ = (UniqueConstraint("charger_id", "number", name="uq_connectors_charger_number"),)


class MeterKind(enum.StrEnum):
    """Where a meter sits in a building's wiring."""

    TENANT = "tenant"
    PUBLIC_AREA = "public_area"
    MASTER = "master"


class Meter(Base):
    """An electricity meter of a site, reached by tenants through its ``meter_code``."""

    __tablename__ = "meters"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    meter_code: Mapped[str] = mapped_column(String(16), unique=True)
    serial: Mapped[str] = mapped_column(String(64))
    kind: Mapped[MeterKind] = mapped_column(_enum(MeterKind, "meter_kind"), default=MeterKind.TENANT)
    prepaid: Mapped[bool] = mapped_column(Boolean, default=True)
    ct_multiplier: Mapped[int] = mapped_column(Integer, default=1)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)  # webapp.meters.models.Tenant
    master_meter_id: Mapped[int | None] = mapped_column(ForeignKey("meters.id"))  # the master upstream of this sub-meter
    tariff_id: Mapped[int | None] = mapped_column(ForeignKey("meter_tariffs.id"))
    collector_id: Mapped[int | None] = mapped_column(ForeignKey("meter_collectors.id"), index=True)
    register_max_kwh: Mapped[Decimal | None] = mapped_column(Numeric(18, 3))  # where the register rolls over (99999.9)
    # The relay as we last commanded it (webapp.meters.models.RelayCommand): connected, disconnecting, disconnected, reconnecting
    relay_state: Mapped[str] = mapped_column(String(16), default="connected", server_default="connected")
    relay_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_reading_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_register_kwh: Mapped[Decimal | None] = mapped_column(Numeric(18, 3))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    site: Mapped[Site] = relationship(back_populates="meters")
    tenant = relationship("Tenant", back_populates="meters")


class IdempotencyRecord(Base):
    """The stored answer to a money-moving API request, replayed for the same Idempotency-Key."""

    __tablename__ = "idempotency_records"

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(80))  # "user:42" or "guest:<client>": keys are per caller
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)  # None while the first request is running
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    __table_args__ = (UniqueConstraint("scope", "key", name="uq_idempotency_records_scope_key"),)


from webapp.charging.models import (  # noqa: E402,F401  (the charging tables share this metadata)
    ChargeCommand,
    ChargerConnection,
    ChargingSession,
    OcppMessage,
    RfidTag,
    SessionSample,
)
from payments.invoicing import Document, DocumentSeries  # noqa: E402,F401
from webapp.notifications.models import NotificationPreferences, SentEmail  # noqa: E402,F401
from webapp.receipts.models import BillingDetails  # noqa: E402,F401
from webapp.meters.models import (  # noqa: E402,F401
    Bill, BuildingBilling, CollectorToken, MeterCollector, MeterEvent, MeterInterval, MeterReading, MeterTariff,
    MeterTariffVersion, RelayCommand, Tenant,
)
from payments.settlement import Allocation, AllocationLine, Party, SplitRule  # noqa: E402,F401
from payments.payouts import Payout, PayoutBatch  # noqa: E402,F401
from payments.reconcile import ReconciliationItem, ReconciliationRun  # noqa: E402,F401
from webapp.support.models import ApprovalRequest, AuditEntry, Ticket, TicketMessage  # noqa: E402,F401
from webapp.console.models import Alarm  # noqa: E402,F401
