"""Tables of the charging journey: sessions and their meter samples, charger connections, commands, RFID tags.

The database is the system of record for every process (web, worker,
gateway): the gateway writes what chargers report, the web app writes what
drivers ask, and neither keeps state the other needs in memory.

One active session per connector is enforced by the database, not by a
check in Python: ``ChargingSession.active_connector_id`` holds the
connector's id while the session occupies it (from the moment a driver asks
to start until the car leaves) and NULL afterwards, under a unique index.
NULLs are distinct in both SQLite and PostgreSQL, so ended sessions never
collide while two live ones always do.
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal

from sqlalchemy import BigInteger, Boolean, Enum, ForeignKey, Index, Integer, Numeric, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from payments.base import Base, UTCDateTime, utcnow
from payments.money import Money


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class SessionState(enum.StrEnum):
    """Where a charging session stands (DESIGN.md's state machine)."""

    PENDING = "pending"  # the session exists; its hold is not in place yet (card being authorised, 3-D Secure)
    AUTHORIZED = "authorized"  # the hold is in place; the start command is about to be sent
    START_REQUESTED = "start_requested"  # the charger accepted RemoteStart; waiting for the car (StartTransaction)
    CHARGING = "charging"  # StartTransaction received: energy flows (or the car idles) until StopTransaction
    FINISHING = "finishing"  # StopTransaction received: idle time until the car leaves, then billing and capture
    COMPLETED = "completed"  # billed: the cost captured (or nothing, below the minimum) and the rest released
    CANCELLED = "cancelled"  # the driver or a timeout ended it before charging; hold released
    START_FAILED = "start_failed"  # the charger refused the start or was offline; hold released
    START_TIMEOUT = "start_timeout"  # no StartTransaction within the start window; hold released
    FAILED = "failed"  # the hold could not be placed (card declined, wallet too low)
    REVIEW = "review"  # could not be settled automatically; the hold is kept for a person to decide


ACTIVE_STATES = frozenset({
    SessionState.PENDING, SessionState.AUTHORIZED, SessionState.START_REQUESTED, SessionState.CHARGING, SessionState.FINISHING,
})
BEFORE_CHARGING = frozenset({SessionState.PENDING, SessionState.AUTHORIZED, SessionState.START_REQUESTED})
ENDED_STATES = frozenset(set(SessionState) - ACTIVE_STATES)


class PaymentKind(enum.StrEnum):
    """How the session's hold is placed."""

    WALLET = "wallet"  # a hold on the account's wallet balance (QR with wallet, or an RFID tag)
    CARD = "card"  # a card authorisation (manual capture) at the provider, saved card or guest card


class ChargingSession(Base):
    """One driver's charge at one connector, from the tap on "Start" to the captured payment."""

    __tablename__ = "charging_sessions"
    __table_args__ = (Index("ix_charging_sessions_state_updated", "state", "updated_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    connector_id: Mapped[int] = mapped_column(ForeignKey("connectors.id"), index=True)
    # The connector's id while this session occupies it, NULL once the car has left: unique, so one live session per connector.
    active_connector_id: Mapped[int | None] = mapped_column(ForeignKey("connectors.id"), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)  # "user:<id>" or "guest:<session id>"
    email: Mapped[str | None] = mapped_column(String(254), index=True)  # where the receipt goes (guests: required)
    locale: Mapped[str | None] = mapped_column(String(8))  # the driver's language when paying: the receipt's language
    access_token_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of a guest's link token
    state: Mapped[SessionState] = mapped_column(_enum(SessionState), default=SessionState.PENDING, index=True)
    id_tag: Mapped[str] = mapped_column(String(20), unique=True)  # OCPP idTag: one per session (or the RFID tag's)
    transaction_id: Mapped[int | None] = mapped_column(Integer, unique=True)  # OCPP transactionId (we allocate: the session id)
    via_rfid: Mapped[bool] = mapped_column(Boolean, default=False)

    payment_kind: Mapped[PaymentKind] = mapped_column(_enum(PaymentKind))
    card_payment_id: Mapped[int | None] = mapped_column(ForeignKey("card_payments.id"), unique=True)
    currency: Mapped[str] = mapped_column(String(3))
    hold_minor: Mapped[int] = mapped_column(BigInteger)  # reserved: the session stops before its cost passes this
    cap_minor: Mapped[int | None] = mapped_column(BigInteger)  # the driver's own spending cap, if lower than the default hold
    max_energy_wh: Mapped[int] = mapped_column(BigInteger)  # the session stops at this much energy ...
    max_charging_s: Mapped[int] = mapped_column(Integer)  # ... or after this much time since the start ...
    max_idle_s: Mapped[int] = mapped_column(Integer)  # idle fees are covered by the hold up to this long
    tariff_version_id: Mapped[int] = mapped_column(ForeignKey("tariff_versions.id"))
    time_zone: Mapped[str] = mapped_column(String(64))  # the site's, for the tariff's time restrictions
    min_billable_wh: Mapped[int] = mapped_column(Integer, default=0)  # below this energy the session is free
    min_billable_s: Mapped[int] = mapped_column(Integer, default=0)  # below this charging time the session is free

    meter_start_wh: Mapped[Decimal | None] = mapped_column(Numeric(18, 3))
    meter_stop_wh: Mapped[Decimal | None] = mapped_column(Numeric(18, 3))
    energy_wh: Mapped[Decimal] = mapped_column(Numeric(18, 3), default=Decimal(0))  # delivered so far (register − meterStart)
    power_w: Mapped[Decimal | None] = mapped_column(Numeric(12, 1))  # last reported power
    cost_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # cost so far, VAT included (the engine's, live)

    requested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # RemoteStart accepted
    start_deadline: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # no StartTransaction by then: released
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # StartTransaction's timestamp
    stop_requested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    stop_requested_by: Mapped[str | None] = mapped_column(String(32))  # driver, cost_limit, energy_limit, time_limit, support
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # StopTransaction's timestamp
    stop_reason: Mapped[str | None] = mapped_column(String(32))  # OCPP Reason
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # the car left (connector available): idle time ends
    last_message_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # last thing the charger said about it

    final_excl_vat_minor: Mapped[int | None] = mapped_column(BigInteger)
    final_vat_minor: Mapped[int | None] = mapped_column(BigInteger)
    final_incl_vat_minor: Mapped[int | None] = mapped_column(BigInteger)  # the priced cost (may exceed the hold)
    captured_minor: Mapped[int | None] = mapped_column(BigInteger)  # what was taken: min(cost, hold), or 0
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # given back since (credit notes)
    priced_json: Mapped[str | None] = mapped_column(Text)  # the priced CDR (totals and breakdown) for the receipt
    anomaly: Mapped[str | None] = mapped_column(String(64))  # something that forbids automatic billing (meter went backwards, ...)
    failure_code: Mapped[str | None] = mapped_column(String(64))  # why it failed, was refused or went to review
    settle_claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # one settler at a time
    settle_attempts: Mapped[int] = mapped_column(Integer, default=0)
    settled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    connector = relationship("Connector", foreign_keys=[connector_id])
    user = relationship("User")
    card_payment = relationship("CardPayment")
    tariff_version = relationship("TariffVersion")
    samples: Mapped[list[SessionSample]] = relationship(back_populates="session", order_by="SessionSample.at")

    @property
    def hold(self) -> Money:
        """The amount reserved for this session."""
        return Money(self.hold_minor, self.currency)

    @property
    def cost(self) -> Money:
        """The cost so far (live), VAT included."""
        return Money(self.cost_minor, self.currency)

    @property
    def is_active(self) -> bool:
        """Whether the session is still under way (not ended)."""
        return self.state in ACTIVE_STATES

    def key(self, action: str) -> str:
        """Idempotency key of ``action`` on this session (ledger, provider, commands)."""
        return f"session:{self.id}:{action}"


class SessionSample(Base):
    """One meter reading of a session (MeterValues, StopTransaction's transactionData, or the stop itself).

    A sample describes the interval since the previous one (see
    ``payments.tariffs.cdr_from_samples``). ``(session_id, at)`` is unique, so a
    reading a charger sends again after being offline is stored once.
    """

    __tablename__ = "session_samples"
    __table_args__ = (UniqueConstraint("session_id", "at", name="uq_session_samples_session_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("charging_sessions.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    energy_wh: Mapped[Decimal] = mapped_column(Numeric(18, 3))  # the import register, Wh
    power_w: Mapped[Decimal | None] = mapped_column(Numeric(12, 1))
    current_a: Mapped[Decimal | None] = mapped_column(Numeric(9, 2))
    charging: Mapped[bool] = mapped_column(Boolean, default=True)  # False: plugged in, not charging (idle)
    source: Mapped[str] = mapped_column(String(16), default="meter_values")

    session: Mapped[ChargingSession] = relationship(back_populates="samples")


class ChargerConnection(Base):
    """Which gateway holds a charger's websocket now (the routing table for commands)."""

    __tablename__ = "charger_connections"

    charger_id: Mapped[int] = mapped_column(ForeignKey("chargers.id", ondelete="CASCADE"), primary_key=True)
    gateway_url: Mapped[str] = mapped_column(String(255))  # the gateway's internal HTTP endpoint
    connection_id: Mapped[str] = mapped_column(String(64))  # this websocket; a reconnect replaces it
    connected_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CommandStatus(enum.StrEnum):
    """What became of a command to a charger."""

    SENDING = "sending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    NOT_CONNECTED = "not_connected"
    TIMEOUT = "timeout"
    ERROR = "error"  # the charger answered with a CallError, or the gateway failed


class ChargeCommand(Base):
    """A command sent (or about to be sent) to a charger: the audit trail and its idempotency key."""

    __tablename__ = "charge_commands"

    id: Mapped[int] = mapped_column(primary_key=True)
    charger_id: Mapped[int] = mapped_column(ForeignKey("chargers.id"), index=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("charging_sessions.id"), index=True)
    action: Mapped[str] = mapped_column(String(48))  # OCPP action, e.g. RemoteStartTransaction
    payload: Mapped[str] = mapped_column(Text)  # JSON, OCPP field names
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    requested_by: Mapped[str] = mapped_column(String(64), default="system")
    status: Mapped[CommandStatus] = mapped_column(_enum(CommandStatus), default=CommandStatus.SENDING)
    response: Mapped[str | None] = mapped_column(Text)  # JSON answer of the charger, or the error
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    answered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class RfidTag(Base):
    """An RFID card linked to an account: Authorize/StartTransaction with it charges the account's wallet."""

    __tablename__ = "rfid_tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    id_tag: Mapped[str] = mapped_column(String(20), unique=True)  # as the charger reads it (upper case hex, usually)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class OcppMessage(Base):
    """A message exchanged with a charger, kept for the support timeline and for diagnosing chargers."""

    __tablename__ = "ocpp_messages"
    __table_args__ = (Index("ix_ocpp_messages_charger_at", "charger_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    charger_id: Mapped[int] = mapped_column(ForeignKey("chargers.id", ondelete="CASCADE"))
    session_id: Mapped[int | None] = mapped_column(ForeignKey("charging_sessions.id", ondelete="SET NULL"), index=True)
    direction: Mapped[str] = mapped_column(String(3))  # "in" (charger → us) or "out"
    action: Mapped[str] = mapped_column(String(48))
    payload: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
