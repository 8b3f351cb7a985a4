"""Charging sessions: the state machine, the hold, what chargers report, billing and capture.

Flask-free: every function takes the SQLAlchemy session (and the payment
provider or charger gateway where it needs one); the web views, the API, the
OCPP gateway and the worker all call the same functions.

State machine (DESIGN.md)::

    pending → authorized → start_requested → charging → finishing → completed
        ↘ failed    ↘ cancelled / start_failed / start_timeout          ↘ review

* **Hold first.** A session claims its connector (``active_connector_id``,
  unique) before any money moves, so two drivers racing for one connector get
  one session and one clear "in use". Then the hold: wallet money moved to the
  hold account, or a card authorisation (manual capture). Only a session whose
  hold is in place is started (RemoteStartTransaction with the session's own
  idTag, so the StartTransaction that follows is matched without doubt).
* **Released on every path that does not charge**: the driver cancels, the
  charger refuses or is offline, no StartTransaction within the site's start
  window, the card's 3-D Secure is abandoned, a session below the site's
  minimum billable energy or time.
* **Stopped before the hold is spent.** Each meter reading re-prices the
  session with the same engine as the final bill; at the hold (or the
  driver's cap), the session's energy limit or its time limit the gateway
  sends RemoteStopTransaction. The capture is ``min(cost, hold)`` all the same.
* **Idle time.** After StopTransaction the car may stay plugged in: the
  session is ``finishing`` until the connector reports Available (or the
  hold's idle allowance runs out), and that time is PARKING_TIME for the
  tariff, so an idle fee after the tariff's grace period is billed.
* **Billed once.** ``settle`` runs in the worker: one settler at a time
  (``settle_claimed_at``), the capture with the card payment's idempotency key,
  the ledger with keys derived from the session. A charger that replays its
  offline queue finds every message answered and applied once: samples are
  unique per session and instant, a second StopTransaction changes nothing.
* **Never lost.** What cannot be settled automatically (the meter went
  backwards, the capture failed for good, the charger never reported a stop)
  goes to ``review`` with the reason, the hold kept for a person to decide.

Ledger: a wallet session's hold moves ``customer wallet → wallet hold`` and its
settlement ``wallet hold → revenue + VAT payable (+ the rest back to the wallet)``;
a card session's capture books ``provider clearing → revenue + VAT payable``
(``_book_card_capture``). When the capture is less than the priced cost (the
hold was reached), the VAT is the captured amount's share of the bill's VAT
rate mix: ``vat × captured / cost`` rounded half up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from decimal import ROUND_DOWN, ROUND_HALF_UP, ROUND_UP, Decimal, InvalidOperation

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from payments import cards
from payments import wallet as wallet_mod
from payments.cards import CardPayment, CardRefund, Purpose
from payments.ledger import AccountKind, InsufficientFunds, JournalEntry, get_account, post
from payments.money import Money, MoneyError, to_minor
from payments.price_display import DEFAULT_HOLD_POLICY, HoldPolicy, default_hold
from payments.providers.base import CardDeclined, InvalidRequest, PaymentProvider, ProviderError, ProviderUnavailable
from payments.tariff_store import TariffVersion, connector_owner, tariff_in_force
from payments.tariffs import MeterSample, PricingError, TariffNotActive, bill, cdr_from_samples, limits_for_cap, price
from webapp.charging.models import (
    ACTIVE_STATES,
    BEFORE_CHARGING,
    ChargerConnection,
    ChargingSession,
    CommandStatus,
    PaymentKind,
    RfidTag,
    SessionSample,
    SessionState,
)
from webapp.db import utcnow
from webapp.models import Charger, Connector, Site, User
from webapp.receipts import service as receipts
from webapp.settlement import service as settlement

log = logging.getLogger("voltpay.charging")

PENDING_TIMEOUT = dt.timedelta(minutes=15)  # a card hold still waiting for 3-D Secure after this is given up
STOP_RETRY = dt.timedelta(seconds=30)  # a limit's RemoteStop is asked for again after this while readings keep coming
SETTLE_CLAIM = dt.timedelta(minutes=2)  # a settler that died frees its claim after this
MAX_SETTLE_ATTEMPTS = 6  # capture attempts before a person looks at it
SILENCE_TIMEOUT = dt.timedelta(hours=24)  # a charging session with no word from the charger this long goes to review
FINISHING_NO_FEE = dt.timedelta(0)  # idle time is not waited for when the tariff has no idle fee
MIN_CAPPED_CHARGING = dt.timedelta(minutes=1)  # a cap must allow at least this much charging at full power
CHARGING_STATUSES = {"Charging"}
FAULT_STATUSES = {"Faulted", "Unavailable"}
FREE_STATUSES = {"Available"}
NOT_CHARGED = (SessionState.CANCELLED, SessionState.START_FAILED, SessionState.START_TIMEOUT, SessionState.FAILED)


class ChargingError(Exception):
    """A request about a session that cannot be done; ``code`` is stable (API, messages), ``params`` fill the message."""

    def __init__(self, code: str, message: str, **params):
        super().__init__(message)
        self.code = code
        self.params = params


# --------------------------------------------------------------------------- connector state and the quote


def charger_connected(s: Session, charger_id: int) -> bool:
    """Whether a gateway holds the charger's websocket now."""
    return s.get(ChargerConnection, charger_id) is not None


def availability(s: Session, connector: Connector) -> str:
    """What a driver is told about a connector: available, in_use, faulted, offline or unavailable."""
    if not charger_connected(s, connector.charger_id):
        return "offline"
    busy = s.scalar(select(ChargingSession.id).where(ChargingSession.active_connector_id == connector.id))
    if busy is not None:
        return "in_use"
    status = connector.status
    if status in FAULT_STATUSES or connector.charger.status in FAULT_STATUSES:
        return "faulted" if "Faulted" in (status, connector.charger.status) else "unavailable"
    if status in (None, "Available", "Preparing"):
        return "available"  # Preparing: a cable is plugged in, waiting for an authorisation (ours)
    return "in_use"  # Charging, SuspendedEV/EVSE, Finishing, Reserved: someone else's car


@dataclass(frozen=True)
class Quote:
    """The hold of a session about to start and the limits at which it stops."""

    tariff_version: TariffVersion
    currency: str
    hold: Money
    cap: Money | None
    max_energy_wh: int
    max_charging_s: int
    max_idle_s: int


def hold_policy(site: Site) -> HoldPolicy:
    """The site's default-hold limits (its own where set, else the defaults)."""
    d = DEFAULT_HOLD_POLICY
    return HoldPolicy(
        max_energy_kwh=Decimal(site.hold_max_energy_kwh) if site.hold_max_energy_kwh else d.max_energy_kwh,
        max_duration=dt.timedelta(seconds=site.hold_max_charging_s) if site.hold_max_charging_s else d.max_duration,
        max_idle=dt.timedelta(seconds=site.hold_max_idle_s) if site.hold_max_idle_s is not None else d.max_idle,
    )


def quote(s: Session, connector: Connector, *, now: dt.datetime, cap: Money | None = None, max_energy_kwh: Decimal | None = None) -> Quote:
    """The hold for a session starting ``now`` at ``connector``: the default one, or lowered to the driver's cap.

    ``max_energy_kwh`` lowers the energy limit; ``cap`` (VAT included) lowers the
    hold itself and with it the time and energy at which the session stops.
    Raises ChargingError ``no_tariff`` (nothing can be sold here now),
    ``cap_currency`` or ``cap_too_low``.
    """
    site = connector.charger.site
    version = tariff_in_force(s, connector_owner(connector.id), now)
    if version is None:
        raise ChargingError("no_tariff", "this connector has no price yet and cannot be used")
    policy = hold_policy(site)
    if max_energy_kwh is not None:
        if max_energy_kwh <= 0:
            raise ChargingError("energy_cap_invalid", "the energy limit must be more than zero")
        policy = HoldPolicy(min(policy.max_energy_kwh, max_energy_kwh), policy.max_duration, policy.max_idle)
    try:
        dh = default_hold(version, currency=site.currency, max_power_kw=connector.max_power_kw, start=now, time_zone=site.time_zone, policy=policy)
    except TariffNotActive:
        raise ChargingError("no_tariff", "this connector's price is not valid now") from None
    except (PricingError, MoneyError) as e:
        log.warning("no hold for connector %s: %s", connector.connector_code, e)
        raise ChargingError("no_tariff", "this connector's price cannot be used now") from None
    hold, energy, duration = dh.amount, dh.max_energy_kwh, dh.max_duration
    if cap is not None:
        if cap.currency != site.currency:
            raise ChargingError("cap_currency", f"the cap must be in {site.currency}", currency=site.currency)
        if cap < hold:
            try:
                lim = limits_for_cap(version.compiled, cap, max_power_kw=Decimal(connector.max_power_kw), max_idle=policy.max_idle,
                                     time_zone=site.time_zone, start=now, max_duration=policy.max_duration)
            except PricingError:
                raise ChargingError("cap_too_low", "the cap is below the least this session can cost",
                                    minimum=hold_minimum(version, connector, now, policy)) from None
            hold, duration = lim["hold"], lim["max_duration"]
            energy = min(energy, lim["max_energy_kwh"])
            if duration.total_seconds() < MIN_CAPPED_CHARGING.total_seconds() or energy <= 0:
                raise ChargingError("cap_too_low", "the cap is too low to charge", minimum=hold_minimum(version, connector, now, policy))
        else:
            cap = None  # a cap above the default hold changes nothing
    return Quote(
        tariff_version=version, currency=site.currency, hold=hold, cap=cap,
        max_energy_wh=int(energy * 1000), max_charging_s=int(duration.total_seconds()), max_idle_s=int(policy.max_idle.total_seconds()),
    )


def hold_minimum(version: TariffVersion, connector: Connector, now: dt.datetime, policy: HoldPolicy) -> Money:
    """The smallest cap ``quote`` accepts: the hold of ``MIN_CAPPED_CHARGING`` at the connector's full power (for the "cap too low" message)."""
    from payments.tariffs import hold_for

    site = connector.charger.site
    seconds = int(MIN_CAPPED_CHARGING.total_seconds())
    energy = (Decimal(connector.max_power_kw) * seconds / 3600).quantize(Decimal("0.001"), rounding=ROUND_DOWN)
    return hold_for(version.compiled, currency=site.currency, max_energy_kwh=energy, max_duration=MIN_CAPPED_CHARGING,
                    max_idle=policy.max_idle, time_zone=site.time_zone, start=now)


# --------------------------------------------------------------------------- opening a session and its hold


def _new_id_tag(s: Session) -> str:
    """A fresh idTag (OCPP 1.6: at most 20 characters): one per session, never reused."""
    return "VP" + secrets.token_hex(9).upper()  # 2 + 18 = 20


def token_hash(token: str) -> str:
    """How a guest's link token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(
    s: Session, *, connector: Connector, user: User | None, email: str | None, payment_kind: PaymentKind, q: Quote, now: dt.datetime,
    locale: str | None = None,
) -> tuple[ChargingSession, str | None]:
    """Claim the connector for a new session (flushes; the caller commits). Returns the session and a guest's link token.

    Raises ChargingError ``connector_busy`` when another session holds the
    connector (the unique index decides, so a race has one winner).
    """
    if user is None and not email:
        raise ChargingError("email_required", "a guest needs an email address for the receipt")
    if payment_kind is PaymentKind.WALLET and user is None:
        raise ChargingError("wallet_needs_account", "sign in to pay from your wallet")
    site = connector.charger.site
    token = secrets.token_urlsafe(24) if user is None else None
    cs = ChargingSession(
        connector_id=connector.id, active_connector_id=connector.id, user_id=user.id if user else None,
        owner=user.owner if user else "guest:pending", email=(user.email if user else (email or "").strip().lower()),
        locale=locale or (user.locale if user else None),
        access_token_hash=token_hash(token) if token else None, state=SessionState.PENDING, id_tag=_new_id_tag(s),
        payment_kind=payment_kind, currency=q.currency, hold_minor=q.hold.amount, cap_minor=q.cap.amount if q.cap else None,
        max_energy_wh=q.max_energy_wh, max_charging_s=q.max_charging_s, max_idle_s=q.max_idle_s,
        tariff_version_id=q.tariff_version.id, time_zone=site.time_zone,
        min_billable_wh=site.min_billable_wh, min_billable_s=site.min_billable_s, created_at=now, updated_at=now,
    )
    try:
        with s.begin_nested():
            s.add(cs)
            s.flush()
    except IntegrityError:
        raise ChargingError("connector_busy", "someone else is using this connector") from None
    if user is None:
        cs.owner = f"guest:{cs.id}"
    s.flush()
    return cs, token


def _free_connector(cs: ChargingSession) -> None:
    cs.active_connector_id = None


def _end(cs: ChargingSession, state: SessionState, code: str | None, now: dt.datetime) -> None:
    cs.state = state
    if code:
        cs.failure_code = code
    _free_connector(cs)
    cs.updated_at = now


def place_wallet_hold(s: Session, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """Reserve the hold from the account's wallet (flushes). Too little money: the session fails, nothing reserved."""
    if cs.state != SessionState.PENDING:
        return cs
    try:
        with s.begin_nested():
            wallet_mod.hold(s, owner=cs.owner, amount=cs.hold, key=cs.key("wallet"))
    except InsufficientFunds:
        _end(cs, SessionState.FAILED, "wallet_insufficient", now)
        s.flush()
        return cs
    cs.state = SessionState.AUTHORIZED
    cs.updated_at = now
    s.flush()
    return cs


def create_card_hold(
    s: Session, cs: ChargingSession, *, payment_method_id: str, customer_id: str | None, card_brand: str | None, card_last4: str | None,
) -> CardPayment:
    """Write the card authorisation record of the session (flushes; the caller commits, then ``submit_card_hold``)."""
    row = cards.create(
        s, purpose=Purpose.CHARGING_SESSION, reference=f"session:{cs.id}", owner=cs.owner, email=cs.email, amount=cs.hold,
        manual_capture=True, payment_method_id=payment_method_id, customer_id=customer_id,
    )
    row.card_brand, row.card_last4 = card_brand, card_last4
    cs.card_payment_id = row.id
    cs.card_payment = row  # loaded now: no lazy load (and no transaction) right before the provider call
    s.flush()
    return row


def submit_card_hold(s: Session, provider: PaymentProvider, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """Ask the provider for the hold and move the session on (authorized, still pending for 3-D Secure, or failed).

    Raises ProviderUnavailable / ProviderError when the provider did not answer
    (the session stays pending; the watchdog asks again or gives up).
    """
    row = cs.card_payment
    try:
        cards.submit(s, provider, row)
    except (CardDeclined, InvalidRequest) as e:
        _end(cs, SessionState.FAILED, "card_declined" if isinstance(e, CardDeclined) else "payment_failed", now)
        s.flush()
        return cs
    return _follow_card(s, cs, now)


def _follow_card(s: Session, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """Move a pending card session along its card payment's state."""
    row = cs.card_payment
    if cs.state != SessionState.PENDING:
        return cs
    if row.state == cards.State.AUTHORIZED:
        cs.state = SessionState.AUTHORIZED
        cs.updated_at = now
    elif row.state in (cards.State.FAILED, cards.State.CANCELED):
        _end(cs, SessionState.FAILED, row.failure_code or "payment_failed", now)
    s.flush()
    return cs


def confirm_card_hold(s: Session, provider: PaymentProvider, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """After 3-D Secure in the browser: ask the provider where the hold stands and move the session on."""
    if cs.state != SessionState.PENDING or cs.card_payment is None:
        return cs
    cards.refresh(s, provider, cs.card_payment)
    return _follow_card(s, cs, now)


def _wallet_hold_placed(s: Session, cs: ChargingSession) -> bool:
    from payments.ledger import JournalEntry

    return s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == f"{cs.key('wallet')}:hold")) is not None


def release(s: Session, provider: PaymentProvider | None, cs: ChargingSession) -> None:
    """Give the whole hold back (wallet entry, or the card authorisation cancelled). Idempotent.

    A card release asks the provider: call it with no transaction open (commit first).
    """
    if cs.payment_kind is PaymentKind.WALLET:
        if _wallet_hold_placed(s, cs):
            wallet_mod.release_hold(s, owner=cs.owner, amount=cs.hold, key=cs.key("wallet"))
        return
    row = cs.card_payment
    if row is None or row.state in (cards.State.CANCELED, cards.State.FAILED):
        return
    if row.state == cards.State.SUCCEEDED:
        return  # already captured: nothing held
    if provider is None:
        raise ProviderUnavailable("no payment provider configured")
    cards.release(s, provider, row)


def _give_up(s: Session, provider: PaymentProvider | None, cs: ChargingSession, state: SessionState, code: str, now: dt.datetime) -> ChargingSession:
    """End a session that will not charge (caller holds its row lock) and release its hold. Commits.

    The state change, the freed connector and a wallet release are one
    transaction. A card release asks the provider after that commit, with no
    lock held; if the provider does not answer, the watchdog releases it later
    (``due_work``'s ``unreleased``), so the session is never left holding money.
    """
    _end(cs, state, code, now)
    if cs.payment_kind is PaymentKind.WALLET:
        release(s, provider, cs)
        s.commit()
        return cs
    s.commit()
    try:
        release(s, provider, cs)
        s.commit()
    except ProviderError as e:
        s.rollback()
        log.warning("hold not released yet", extra={"session": cs.id, "reason": e.code})
    return cs


def _locked(s: Session, session_id: int) -> ChargingSession | None:
    """The session, re-read under its row lock (what another process committed meanwhile is seen)."""
    return s.scalar(select(ChargingSession).where(ChargingSession.id == session_id).with_for_update().execution_options(populate_existing=True))


# --------------------------------------------------------------------------- commands to the charger


@dataclass(frozen=True)
class CommandResult:
    """What the gateway said about a command."""

    status: CommandStatus
    response: Mapping | None = None


class Gateway(Protocol):
    """What the web app needs from the charger gateway (``webapp.chargers.client.GatewayClient``)."""

    def call(self, s: Session, charger: Charger, action: str, payload: dict, *, key: str, session_id: int | None = None,
             requested_by: str = "system") -> CommandResult:
        """Record the command, send it through the gateway holding the charger, record and return the answer."""


def request_start(s: Session, gateway: Gateway, provider: PaymentProvider | None, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """Send RemoteStartTransaction for an authorized session and move it on (commits: the command is a network call).

    Accepted → ``start_requested`` until the site's start window closes.
    Rejected or offline → ``start_failed`` and the hold released. Timeout or a
    gateway error → stays ``start_requested``: the charger may yet start, and
    the watchdog releases the hold when the window closes without a start.
    """
    if cs.state != SessionState.AUTHORIZED:
        return cs
    connector = cs.connector
    charger = connector.charger
    cs.state = SessionState.START_REQUESTED
    cs.requested_at = now
    cs.start_deadline = now + dt.timedelta(seconds=charger.site.start_window_s)
    s.commit()
    result = gateway.call(
        s, charger, "RemoteStartTransaction", {"connector_id": connector.number, "id_tag": cs.id_tag},
        key=cs.key("remote_start"), session_id=cs.id, requested_by=cs.owner,
    )
    cs = _locked(s, cs.id)
    if cs.state != SessionState.START_REQUESTED:
        s.commit()
        return cs  # StartTransaction already arrived (fast charger), or the driver cancelled meanwhile
    if result.status in (CommandStatus.REJECTED, CommandStatus.NOT_CONNECTED):
        code = "charger_rejected" if result.status is CommandStatus.REJECTED else "charger_offline"
        return _give_up(s, provider, cs, SessionState.START_FAILED, code, now)
    s.commit()
    return cs


def request_stop(s: Session, gateway: Gateway, provider: PaymentProvider | None, cs: ChargingSession, *, by: str, now: dt.datetime) -> ChargingSession:
    """Stop a session for the driver (or support): before charging it is cancelled and released, while charging RemoteStop is sent.

    Raises ChargingError ``charger_offline`` when the charger cannot be reached
    (charging then stops when the cable is unplugged; billing follows the
    charger's StopTransaction), ``stop_rejected`` when the charger refused,
    ``not_stoppable`` when the session has already ended.
    """
    s.commit()
    cs = _locked(s, cs.id)  # a StartTransaction may be committing this very moment: decide on the latest state
    if cs.state in BEFORE_CHARGING:
        return _give_up(s, provider, cs, SessionState.CANCELLED, "cancelled_by_" + by, now)
    if cs.state != SessionState.CHARGING:
        s.commit()
        if cs.state == SessionState.FINISHING:
            return cs  # already stopped: the car is leaving
        raise ChargingError("not_stoppable", "this session has already ended")
    cs.stop_requested_at = cs.stop_requested_at or now
    cs.stop_requested_by = cs.stop_requested_by or by
    s.commit()
    result = gateway.call(
        s, cs.connector.charger, "RemoteStopTransaction", {"transaction_id": cs.transaction_id},
        key=cs.key(f"remote_stop:{by}:{secrets.token_hex(6)}"), session_id=cs.id, requested_by=by,
    )
    cs = s.get(ChargingSession, cs.id, populate_existing=True)
    if result.status is CommandStatus.NOT_CONNECTED:
        raise ChargingError("charger_offline", "the charger is offline; charging stops when you unplug the cable")
    if result.status is CommandStatus.REJECTED and cs.state == SessionState.CHARGING:
        raise ChargingError("stop_rejected", "the charger refused to stop; unplug the cable to stop charging")
    if result.status in (CommandStatus.TIMEOUT, CommandStatus.ERROR) and cs.state == SessionState.CHARGING:
        raise ChargingError("charger_not_answering", "the charger did not answer; try again, or unplug the cable")
    return cs


# --------------------------------------------------------------------------- the whole start, for views and the API


@dataclass
class StartRequest:
    """What a driver chose on the connector page (or sent to the API)."""

    connector: Connector
    user: User | None
    email: str | None
    payment_kind: PaymentKind
    payment_method_id: str | None = None  # saved card, or a guest's card from the card element
    customer_id: str | None = None  # the provider customer the card belongs to (None: a guest's unattached card)
    card_brand: str | None = None
    card_last4: str | None = None
    cap: Money | None = None
    max_energy_kwh: Decimal | None = None
    locale: str | None = None  # the page's language: the receipt's


@dataclass
class StartResult:
    """The session after the start attempt, a guest's link token, and the 3-D Secure secret when the bank asks."""

    session: ChargingSession
    guest_token: str | None = None
    client_secret: str | None = None


def start_session(
    s: Session, provider: PaymentProvider | None, gateway: Gateway, req: StartRequest, *, now: dt.datetime,
    on_opened: Callable[[ChargingSession, str | None], None] | None = None,
) -> StartResult:
    """Open, hold and start a session in one go (commits between the steps; provider and charger calls hold no lock).

    Raises ChargingError before anything is written (unavailable connector, no
    tariff, cap too low, busy connector). After that the session exists and
    its state tells the outcome: ``failed`` (hold refused), ``pending`` (3-D
    Secure: ``client_secret`` set), ``start_failed``, or ``start_requested``.
    ``on_opened`` runs right after the session is first committed, before the
    card is asked for the hold: the moment from which the request has an
    effect (an API's idempotency record must keep its answer). Anything that
    depends on the hold's outcome (the guest's email with the link) belongs
    after this function returns, on the session's state.
    ProviderUnavailable propagates with the session left pending (the
    watchdog settles it); its id is on the exception as ``session_id``.
    """
    connector = req.connector
    state = availability(s, connector)
    if state == "offline":
        raise ChargingError("charger_offline", "the charger is offline")
    if state in ("faulted", "unavailable"):
        raise ChargingError("connector_faulted", "this connector is out of order")
    if state == "in_use":
        raise ChargingError("connector_busy", "someone else is using this connector")
    if req.payment_kind is PaymentKind.CARD and provider is None:
        raise ChargingError("payments_unavailable", "card payments are not available at the moment")
    if req.payment_kind is PaymentKind.CARD and not req.payment_method_id:
        raise ChargingError("payment_method_required", "choose a card")
    q = quote(s, connector, now=now, cap=req.cap, max_energy_kwh=req.max_energy_kwh)
    if req.payment_kind is PaymentKind.WALLET and req.user is not None and q.currency != req.user.currency:
        raise ChargingError("wallet_currency", f"this charger is paid in {q.currency}; your wallet is in {req.user.currency}", currency=q.currency)
    cs, token = open_session(s, connector=connector, user=req.user, email=req.email, payment_kind=req.payment_kind, q=q, now=now,
                             locale=req.locale)
    if req.payment_kind is PaymentKind.WALLET:
        place_wallet_hold(s, cs, now)
        s.commit()
        if on_opened:
            on_opened(cs, token)
    else:
        create_card_hold(s, cs, payment_method_id=req.payment_method_id or "", customer_id=req.customer_id,
                         card_brand=req.card_brand, card_last4=req.card_last4)
        s.commit()
        if on_opened:
            on_opened(cs, token)
        try:
            submit_card_hold(s, provider, cs, now)
        except ProviderError as e:
            s.commit()
            e.session_id = cs.id  # type: ignore[attr-defined]
            raise
        s.commit()
    secret = None
    if cs.state == SessionState.PENDING and cs.card_payment is not None and cs.card_payment.state == cards.State.REQUIRES_ACTION:
        try:
            secret = provider.retrieve(payment_id=cs.card_payment.provider_payment_id or "").client_secret
        except ProviderError:
            secret = None
    if cs.state == SessionState.AUTHORIZED:
        cs = request_start(s, gateway, provider, cs, now)
    return StartResult(cs, token, secret)


def continue_after_confirmation(s: Session, provider: PaymentProvider, gateway: Gateway, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """After the browser finished 3-D Secure: check the hold, then start the charger."""
    cs = confirm_card_hold(s, provider, cs, now)
    s.commit()
    if cs.state == SessionState.AUTHORIZED:
        cs = request_start(s, gateway, provider, cs, now)
    return cs


# --------------------------------------------------------------------------- what chargers report (called by the gateway)


@dataclass(frozen=True)
class Reading:
    """One sampled instant of a MeterValue: the import register (Wh), power (W) and current (A) when reported."""

    at: dt.datetime
    energy_wh: Decimal | None = None
    power_w: Decimal | None = None
    current_a: Decimal | None = None


_UNIT_FACTOR = {"Wh": Decimal(1), "kWh": Decimal(1000), "W": Decimal(1), "kW": Decimal(1000), "A": Decimal(1)}


def _parse_time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC)


def parse_meter_values(meter_value: Iterable[Mapping]) -> list[Reading]:
    """OCPP 1.6 ``meterValue`` (snake_case keys, as the ``ocpp`` library gives them) → readings.

    Values are strings; the unit defaults to Wh; per-phase values (``phase``)
    are skipped except that per-phase currents are summed when no total is
    given. Measurands other than the import register, power and current are
    ignored, and so is anything unparsable (a charger's quirk must not stop billing).
    """
    out = []
    for mv in meter_value or ():
        at = _parse_time(mv.get("timestamp"))
        if at is None:
            continue
        energy = power = current = None
        phase_current = Decimal(0)
        has_phase_current = False
        for sv in mv.get("sampled_value") or ():
            measurand = sv.get("measurand") or "Energy.Active.Import.Register"
            unit = sv.get("unit") or ("Wh" if measurand.startswith("Energy") else "W" if measurand.startswith("Power") else "A")
            try:
                value = Decimal(str(sv.get("value"))) * _UNIT_FACTOR.get(unit, Decimal(1))
            except (InvalidOperation, TypeError):
                continue
            if not value.is_finite():
                continue
            if measurand == "Energy.Active.Import.Register" and not sv.get("phase"):
                energy = value
            elif measurand == "Power.Active.Import" and not sv.get("phase"):
                power = value
            elif measurand == "Current.Import":
                if sv.get("phase"):
                    if not str(sv["phase"]).startswith("N"):
                        phase_current += value
                        has_phase_current = True
                else:
                    current = value
        if current is None and has_phase_current:
            current = phase_current
        out.append(Reading(at, energy, power, current))
    return out


@dataclass
class Answer:
    """The gateway's answer to a charger message, and what to do after the transaction commits."""

    id_tag_status: str = "Accepted"  # OCPP AuthorizationStatus for Authorize / Start / Stop
    transaction_id: int = 0
    stop_transaction_id: int | None = None  # send RemoteStopTransaction for this transaction
    stop_reason: str | None = None
    settle: list[int] = field(default_factory=list)  # sessions to settle in the worker
    session_id: int | None = None  # the session the message was about, when known (the message log's)


SEEN_EVERY = dt.timedelta(seconds=30)  # "last seen" is written at most this often per charger (not on every message)


def _seen_recently(charger: Charger, now: dt.datetime) -> bool:
    last = charger.last_seen_at
    return last is not None and dt.timedelta(0) <= now - last < SEEN_EVERY


def _touch(charger: Charger, now: dt.datetime) -> None:
    if not _seen_recently(charger, now):
        charger.last_seen_at = now


def charger_booted(s: Session, charger: Charger, *, vendor: str | None, model: str | None, serial: str | None,
                   firmware: str | None, now: dt.datetime) -> None:
    """BootNotification: keep what the charger says it is."""
    charger.vendor = (vendor or charger.vendor or "")[:50] or None
    charger.model = (model or charger.model or "")[:50] or None
    charger.serial_number = (serial or "")[:25] or charger.serial_number
    charger.firmware_version = (firmware or "")[:50] or charger.firmware_version
    charger.last_boot_at = now
    _touch(charger, now)
    s.flush()


def charger_seen(s: Session, charger: Charger, now: dt.datetime) -> None:
    """Heartbeat or any message: the charger is alive (written at most every ``SEEN_EVERY``, with its connection row)."""
    if _seen_recently(charger, now):
        return
    _touch(charger, now)
    conn = s.get(ChargerConnection, charger.id)
    if conn is not None:
        conn.last_seen = now
    s.flush()


def _connector(s: Session, charger: Charger, number: int) -> Connector | None:
    return s.scalar(select(Connector).where(Connector.charger_id == charger.id, Connector.number == number))


def _active_on(s: Session, connector_id: int) -> ChargingSession | None:
    return s.scalar(select(ChargingSession).where(ChargingSession.active_connector_id == connector_id).with_for_update())


def status_changed(
    s: Session, charger: Charger, *, connector_number: int, status: str, error_code: str | None, info: str | None = None,
    vendor_error_code: str | None = None, timestamp: dt.datetime | None = None, now: dt.datetime,
) -> Answer:
    """StatusNotification: keep the status and error code; the car leaving ends a finishing session's idle time."""
    _touch(charger, now)
    at = timestamp or now
    ans = Answer()
    if connector_number == 0:
        charger.status, charger.error_code = status[:24], (error_code or None)
        s.flush()
        return ans
    connector = _connector(s, charger, connector_number)
    if connector is None:
        return ans
    if connector.status_at is not None and at < connector.status_at and status != connector.status:
        return ans  # an older status sent late (offline queue): the newer one stands
    old = connector.status
    connector.status, connector.error_code = status[:24], (error_code or None)
    connector.status_info, connector.vendor_error_code = (info or None), (vendor_error_code or None)
    connector.status_at = at
    cs = _active_on(s, connector.id)
    if cs is not None and cs.state == SessionState.FINISHING and status in FREE_STATUSES:
        _car_left(s, cs, at, now)
        ans.settle.append(cs.id)
    elif cs is not None and cs.state == SessionState.CHARGING and (old in CHARGING_STATUSES) != (status in CHARGING_STATUSES):
        # The car stopped (or resumed) drawing power: the time since the last reading was in the old state.
        _status_sample(s, cs, at, was_charging=old in CHARGING_STATUSES)
    s.flush()
    return ans


def _status_sample(s: Session, cs: ChargingSession, at: dt.datetime, *, was_charging: bool) -> None:
    """Mark the instant the charging state changed: the interval before it keeps the previous state."""
    last = _last_sample(s, cs)
    after = cs.started_at if last is None else last.at
    if after is None or at <= after:
        return
    energy = last.energy_wh if last is not None else (cs.meter_start_wh or Decimal(0))
    s.add(SessionSample(session_id=cs.id, at=at, energy_wh=energy, power_w=None, charging=was_charging, source="status"))
    _LIVE_PRICED.pop(cs.id, None)  # the state of an interval may have changed: the next reading re-prices


def _last_sample(s: Session, cs: ChargingSession) -> SessionSample | None:
    return s.scalar(select(SessionSample).where(SessionSample.session_id == cs.id).order_by(SessionSample.at.desc()).limit(1))


def authorize(s: Session, charger: Charger, id_tag: str, now: dt.datetime) -> str:
    """Authorize: a session's own idTag while it waits for the car, or an account's RFID tag with money in the wallet."""
    _touch(charger, now)
    cs = s.scalar(select(ChargingSession).where(ChargingSession.id_tag == id_tag))
    if cs is not None:
        return "Accepted" if cs.state in (SessionState.AUTHORIZED, SessionState.START_REQUESTED, SessionState.CHARGING) else "Expired"
    tag = s.scalar(select(RfidTag).where(RfidTag.id_tag == id_tag))
    if tag is None:
        return "Invalid"
    user = s.get(User, tag.user_id)
    if tag.blocked or user is None or not user.is_active_account:
        return "Blocked"
    if wallet_mod.wallet_balance(s, user.owner, user.currency).amount <= 0:
        return "Blocked"
    return "Accepted"


def start_transaction(
    s: Session, charger: Charger, *, connector_number: int, id_tag: str, meter_start_wh: Decimal, timestamp: dt.datetime, now: dt.datetime,
) -> Answer:
    """StartTransaction: the car is charging. Matched by the session's idTag; an RFID tag opens a wallet session here.

    Answered the same way when sent again (offline replay): the same
    transactionId, nothing applied twice. A start for a session that was
    already given up (cancelled, timed out) is answered ``Invalid`` so the
    charger stops it; its transactionId is still the session's, so its
    StopTransaction is recognised and ignored.
    """
    _touch(charger, now)
    cs = s.scalar(select(ChargingSession).where(ChargingSession.id_tag == id_tag).with_for_update())
    if cs is None:
        return _start_rfid(s, charger, connector_number=connector_number, id_tag=id_tag, meter_start_wh=meter_start_wh, timestamp=timestamp, now=now)
    if cs.transaction_id is not None:
        return Answer("Accepted" if cs.state in (SessionState.CHARGING, SessionState.FINISHING, SessionState.COMPLETED) else "Invalid",
                      cs.transaction_id)
    cs.transaction_id = cs.id
    cs.last_message_at = now
    connector = _connector(s, charger, connector_number)
    if connector is None or connector.id != cs.connector_id or cs.state not in (SessionState.AUTHORIZED, SessionState.START_REQUESTED):
        s.flush()
        return Answer("Invalid", cs.transaction_id)
    cs.state = SessionState.CHARGING
    cs.meter_start_wh = meter_start_wh
    cs.started_at = min(timestamp, now + dt.timedelta(minutes=5))  # a charger clock far ahead must not invent idle time
    cs.updated_at = now
    s.flush()
    return Answer("Accepted", cs.transaction_id)


def _start_rfid(s: Session, charger: Charger, *, connector_number: int, id_tag: str, meter_start_wh: Decimal,
                timestamp: dt.datetime, now: dt.datetime) -> Answer:
    """A start with an account's RFID tag: a wallet session with a hold of the default hold or the wallet's balance."""
    status = authorize(s, charger, id_tag, now)
    connector = _connector(s, charger, connector_number)
    if status != "Accepted" or connector is None:
        return Answer(status if status != "Accepted" else "Invalid", 0)
    tag = s.scalar(select(RfidTag).where(RfidTag.id_tag == id_tag))
    user = s.get(User, tag.user_id)
    try:
        q = quote(s, connector, now=now)
    except ChargingError:
        return Answer("Blocked", 0)
    balance = wallet_mod.wallet_balance(s, user.owner, q.currency) if q.currency == user.currency else Money.zero(q.currency)
    if balance.amount <= 0:
        return Answer("Blocked", 0)
    if balance < q.hold:
        q = quote(s, connector, now=now, cap=balance) if _cap_possible(s, connector, balance, now) else None
        if q is None:
            return Answer("Blocked", 0)
    try:
        cs, _ = open_session(s, connector=connector, user=user, email=user.email, payment_kind=PaymentKind.WALLET, q=q, now=now)
    except ChargingError:
        return Answer("ConcurrentTx", 0)
    cs.id_tag = _new_id_tag(s)  # the card's tag is reused; the session's own stays unique
    cs.via_rfid = True
    place_wallet_hold(s, cs, now)
    if cs.state != SessionState.AUTHORIZED:
        return Answer("Blocked", 0)
    cs.state = SessionState.CHARGING
    cs.transaction_id = cs.id
    cs.meter_start_wh = meter_start_wh
    cs.started_at = min(timestamp, now + dt.timedelta(minutes=5))
    cs.last_message_at = now
    s.flush()
    return Answer("Accepted", cs.transaction_id)


def _cap_possible(s: Session, connector: Connector, cap: Money, now: dt.datetime) -> bool:
    try:
        quote(s, connector, now=now, cap=cap)
    except ChargingError:
        return False
    return True


def _session_by_transaction(s: Session, transaction_id: int | None) -> ChargingSession | None:
    if transaction_id is None:
        return None
    return s.scalar(select(ChargingSession).where(ChargingSession.transaction_id == transaction_id).with_for_update())


def _add_readings(s: Session, cs: ChargingSession, readings: Iterable[Reading], *, until: dt.datetime | None,
                  source: str) -> tuple[SessionSample | None, dt.datetime | None]:
    """Store readings as samples once each; note a register going backwards as the session's anomaly.

    Returns the session's last sample afterwards and the earliest instant a sample was added at (None: none added).
    Only a reading's neighbours are read: the last sample when the reading comes after it (the usual case), else
    (an offline queue, transactionData) the samples just before and just after it.
    """
    start = cs.started_at
    last = _last_sample(s, cs)
    earliest = None
    S = SessionSample
    for r in readings:
        if r.energy_wh is None or start is None or r.at <= start or (until is not None and r.at > until):
            continue
        if last is None or r.at > last.at:
            before, after = last, None
        else:
            before = s.scalar(select(S).where(S.session_id == cs.id, S.at <= r.at).order_by(S.at.desc()).limit(1))
            if before is not None and before.at == r.at:
                continue  # stored before (a replay)
            after = s.scalar(select(S).where(S.session_id == cs.id, S.at > r.at).order_by(S.at).limit(1))
        # Charging or idle: the power says so when reported, else the connector's status (SuspendedEV: the car is full).
        charging = r.power_w > 0 if r.power_w is not None else cs.connector.status in CHARGING_STATUSES or cs.connector.status is None
        floor = before.energy_wh if before is not None else (cs.meter_start_wh or Decimal(0))
        if r.energy_wh < floor or (after is not None and r.energy_wh > after.energy_wh):
            cs.anomaly = cs.anomaly or "meter_backwards"
            continue
        row = SessionSample(session_id=cs.id, at=r.at, energy_wh=r.energy_wh, power_w=r.power_w, current_a=r.current_a,
                            charging=bool(charging), source=source)
        s.add(row)
        if last is None or row.at > last.at:
            last = row
        earliest = r.at if earliest is None else min(earliest, r.at)
    s.flush()
    return last, earliest


# The live cost is priced by the tariff engine from the whole session, which costs more the longer the session, so
# not on every reading: at the latest once 1/LIVE_PRICE_SHARE of the session's time (at most LIVE_PRICE_MAX_AGE) has
# passed since the last pricing, and whenever the cost could have reached the hold since then (an upper bound from
# the tariff's highest prices), so the stop at the hold comes at the same reading as with a pricing on every reading.
LIVE_PRICE_SHARE = 20
LIVE_PRICE_MAX_AGE = dt.timedelta(minutes=5)
_LIVE_CACHE_MAX = 50_000


@dataclass(frozen=True)
class _Priced:
    """The last live pricing of a session in this process: up to ``end``, the register then, the cost found."""

    end: dt.datetime
    register_wh: Decimal
    cost_minor: int


@dataclass(frozen=True)
class _Rates:
    """The most a tariff can add, VAT included, in major units: per Wh, per second, and once (fees, step sizes, minimum)."""

    per_wh: Decimal
    per_s: Decimal
    once: Decimal


_LIVE_PRICED: dict[int, _Priced] = {}  # session id → its last live pricing here (a miss just prices)
_RATES: dict[int, _Rates] = {}  # tariff version id → its rates (versions never change)


def _rates(cs: ChargingSession) -> _Rates:
    rates = _RATES.get(cs.tariff_version_id)
    if rates is None:
        t = cs.tariff_version.compiled
        comps = [c for el in t.elements for c in el.components.values()]

        def top(kind: str, attr: str = "price_incl_vat") -> Decimal:
            return max([Decimal(0)] + [max(Decimal(getattr(c, attr)), Decimal(0)) for c in comps if c.type == kind])

        per_wh = top("ENERGY") / 1000
        per_s = (top("TIME") + top("PARKING_TIME")) / 3600
        # step sizes round the last period up; a period's seconds are rounded (half up) once it grows
        once = top("FLAT") + per_wh * top("ENERGY", "step_size") + per_s * (max(top("TIME", "step_size"), top("PARKING_TIME", "step_size")) + 1)
        if t.min_price is not None:  # below the minimum price the mix of VAT rates still moves the total
            factor = max([Decimal(1)] + [c.factor for c in comps])
            once += max(t.min_price[1] or Decimal(0), t.min_price[0] * factor)
        if len(_RATES) >= _LIVE_CACHE_MAX:
            _RATES.clear()
        rates = _RATES[cs.tariff_version_id] = _Rates(per_wh, per_s, once)
    return rates


def _must_price(cs: ChargingSession, end: dt.datetime, register_wh: Decimal, earliest_added: dt.datetime | None) -> bool:
    """Whether the live cost must be priced again now (see ``LIVE_PRICE_SHARE``)."""
    p = _LIVE_PRICED.get(cs.id)
    if p is None or p.cost_minor != cs.cost_minor or end < p.end or register_wh < p.register_wh or cs.started_at is None:
        return True  # never priced here, priced elsewhere since, or the samples changed
    if earliest_added is not None and earliest_added <= p.end:
        return True  # a late reading changed what was priced
    since = end - p.end
    if since >= min(LIVE_PRICE_MAX_AGE, (end - cs.started_at) / LIVE_PRICE_SHARE):
        return True
    r = _rates(cs)
    rise = (register_wh - p.register_wh) * r.per_wh + Decimal(since // dt.timedelta(microseconds=1)) / 1_000_000 * r.per_s + r.once
    return cs.cost_minor + to_minor(rise, cs.currency, rounding=ROUND_UP).amount + 1 >= cs.hold_minor


def meter_values(s: Session, charger: Charger, *, connector_number: int, transaction_id: int | None, readings: list[Reading],
                 now: dt.datetime) -> Answer:
    """MeterValues: store the readings, update the live energy and cost, and say whether to stop (limits reached)."""
    _touch(charger, now)
    cs = _session_by_transaction(s, transaction_id)
    ans = Answer(transaction_id=transaction_id or 0, session_id=cs.id if cs is not None else None)
    if cs is None or cs.state != SessionState.CHARGING:
        return ans  # a reading outside a live session (connector 0, after the stop, a replay): nothing to bill
    cs.last_message_at = now
    last, earliest = _add_readings(s, cs, readings, until=None, source="meter_values")
    if last is not None:
        cs.energy_wh = last.energy_wh - (cs.meter_start_wh or Decimal(0))
        cs.power_w = last.power_w
        end = last.at
    else:
        end = max(now, cs.started_at)
    register = last.energy_wh if last is not None else (cs.meter_start_wh or Decimal(0))
    if _must_price(cs, end, register, earliest):
        try:
            cs.cost_minor = _priced_total(s, cs, end)["incl_vat"].amount
        except PricingError as e:
            log.warning("session %s cannot be priced live: %s", cs.id, e)
            _LIVE_PRICED.pop(cs.id, None)
        else:
            if len(_LIVE_PRICED) >= _LIVE_CACHE_MAX:
                _LIVE_PRICED.clear()
            _LIVE_PRICED[cs.id] = _Priced(end, register, cs.cost_minor)
    reason = _limit_reached(cs, end)
    if reason is None and cs.stop_requested_at is not None:
        # The driver (or support) asked to stop and the charger is still charging: it refused, was offline, or
        # the command was lost. Ask again while it keeps sending readings, as for a limit.
        reason = cs.stop_requested_by or "driver"
    if reason and (cs.stop_requested_at is None or now - cs.stop_requested_at >= STOP_RETRY):
        # Asked again while the charger keeps sending readings: a lost RemoteStop must not let it charge past the hold.
        cs.stop_requested_at, cs.stop_requested_by = now, cs.stop_requested_by or reason
        ans.stop_transaction_id, ans.stop_reason = cs.transaction_id, reason
    cs.updated_at = now
    s.flush()
    return ans


def _limit_reached(cs: ChargingSession, at: dt.datetime) -> str | None:
    """Why the session must stop now, if it must: the driver's energy limit and the time limit first (the hold is
    sized from them, so they are the reason a driver recognises), then the cost reaching the hold."""
    if cs.energy_wh >= cs.max_energy_wh:
        return "energy_limit"
    if cs.started_at is not None and (at - cs.started_at).total_seconds() >= cs.max_charging_s:
        return "time_limit"
    if cs.cost_minor >= cs.hold_minor:
        return "cost_limit"
    return None


def stop_transaction(
    s: Session, charger: Charger, *, transaction_id: int, meter_stop_wh: Decimal, timestamp: dt.datetime, reason: str | None,
    readings: list[Reading], now: dt.datetime,
) -> Answer:
    """StopTransaction: the last readings and the stop. Always answered (a replay or an unknown transaction too), applied once.

    The session then waits in ``finishing`` for the car to leave when the
    tariff charges for idle time and the cable is still in; otherwise it ends
    now and is settled.
    """
    _touch(charger, now)
    ans = Answer(transaction_id=transaction_id)
    cs = _session_by_transaction(s, transaction_id)
    if cs is not None:
        ans.session_id = cs.id
        _LIVE_PRICED.pop(cs.id, None)
    if cs is None or cs.stopped_at is not None:
        return ans
    cs.last_message_at = now
    if cs.state != SessionState.CHARGING:
        cs.stopped_at, cs.stop_reason = timestamp, (reason or "Local")[:32]
        s.flush()
        return ans  # a start we had refused (cancelled, timed out): nothing to bill
    stopped = max(timestamp, cs.started_at)
    _add_readings(s, cs, readings, until=stopped, source="transaction_data")
    last, _ = _add_readings(s, cs, [Reading(stopped, meter_stop_wh)], until=stopped, source="stop")
    if last is not None and last.at == stopped and last.energy_wh != meter_stop_wh:
        cs.anomaly = cs.anomaly or "meter_backwards"
    cs.meter_stop_wh = meter_stop_wh
    cs.energy_wh = meter_stop_wh - (cs.meter_start_wh or Decimal(0))
    cs.stopped_at, cs.stop_reason = stopped, (reason or "Local")[:32]
    cs.power_w = Decimal(0)
    try:
        cs.cost_minor = _priced_total(s, cs, stopped)["incl_vat"].amount  # the energy since the last reading counts too
    except PricingError as e:
        log.warning("session %s cannot be priced at its stop: %s", cs.id, e)
    cs.state = SessionState.FINISHING
    cs.updated_at = now
    connector = cs.connector
    cable_out = reason in ("EVDisconnected",) or connector.status in FREE_STATUSES
    if cable_out or not _has_idle_fee(cs):
        _car_left(s, cs, stopped, now)
        ans.settle.append(cs.id)
    s.flush()
    return ans


def _has_idle_fee(cs: ChargingSession) -> bool:
    t = cs.tariff_version.compiled
    return any("PARKING_TIME" in el.components and el.components["PARKING_TIME"].price > 0 for el in t.elements)


def _car_left(s: Session, cs: ChargingSession, at: dt.datetime, now: dt.datetime) -> None:
    """The idle time ends: record it as not charging and free the connector for the next driver."""
    end = max(at, cs.stopped_at or at)
    if cs.max_idle_s is not None and cs.stopped_at is not None:
        end = min(end, cs.stopped_at + dt.timedelta(seconds=cs.max_idle_s))
    cs.ended_at = end
    if cs.stopped_at is not None and end > cs.stopped_at:
        s.add(SessionSample(session_id=cs.id, at=end, energy_wh=cs.meter_stop_wh or Decimal(0), power_w=Decimal(0), charging=False,
                            source="idle_end"))
    _free_connector(cs)
    cs.updated_at = now
    s.flush()


# --------------------------------------------------------------------------- pricing a session


def _samples(s: Session, cs: ChargingSession) -> list[MeterSample]:
    rows = s.scalars(select(SessionSample).where(SessionSample.session_id == cs.id).order_by(SessionSample.at)).all()
    return [MeterSample(at=r.at, energy_wh=r.energy_wh, power_w=r.power_w, current_a=r.current_a, charging=r.charging) for r in rows]


def price_session(s: Session, cs: ChargingSession, end: dt.datetime) -> dict:
    """The session priced by the tariff engine from its start to ``end`` (the live cost and the final bill alike).

    A session stopped but not ended yet (the car idles, plugged in) is priced
    with the time since the stop as idle time, as its final bill will be.
    """
    version = cs.tariff_version
    samples = [x for x in _samples(s, cs) if x.at <= end]
    if cs.stopped_at is not None and cs.ended_at is None and end > cs.stopped_at and (not samples or samples[-1].at < end):
        samples.append(MeterSample(at=end, energy_wh=cs.meter_stop_wh or (samples[-1].energy_wh if samples else Decimal(0)),
                                   power_w=Decimal(0), charging=False))
    start = cs.started_at
    cdr = cdr_from_samples(start, samples, max(end, start), tariff=version.compiled, time_zone=cs.time_zone,
                           meter_start_wh=cs.meter_start_wh)
    return price(version.compiled, cdr, time_zone=cs.time_zone)


def _priced_total(s: Session, cs: ChargingSession, end: dt.datetime) -> dict:
    return bill(price_session(s, cs, end), cs.currency)


def live(s: Session, cs: ChargingSession, now: dt.datetime) -> dict:
    """What the live page shows: state, energy, power, duration, cost so far, the hold, and the limits."""
    duration = 0
    if cs.started_at is not None:
        end = cs.stopped_at or now
        duration = max(0, int((end - cs.started_at).total_seconds()))
    cost = Money(cs.captured_minor, cs.currency) if cs.state == SessionState.COMPLETED and cs.captured_minor is not None else cs.cost
    if cs.state == SessionState.FINISHING and cs.final_incl_vat_minor is None and cs.started_at is not None:
        try:  # the idle fee keeps accruing until the car leaves: the phone shows it (never more than the hold is taken)
            end = cs.ended_at or max(now, cs.stopped_at or now)
            if cs.stopped_at is not None:  # past the idle allowance the idle time is ended there (end_idle_overrun)
                end = min(end, cs.stopped_at + dt.timedelta(seconds=cs.max_idle_s))
            cost = _priced_total(s, cs, end)["incl_vat"]
        except (PricingError, MoneyError) as e:
            log.warning("session %s cannot be priced live: %s", cs.id, e)
    return {
        "id": cs.id,
        "state": cs.state.value,
        "energy_kwh": str((max(cs.energy_wh, Decimal(0)) / 1000).quantize(Decimal("0.001"))),
        "power_kw": None if cs.power_w is None else str((cs.power_w / 1000).quantize(Decimal("0.01"))),
        "duration_s": duration,
        "cost": cost.as_json(),
        "hold": cs.hold.as_json(),
        "cap": None if cs.cap_minor is None else Money(cs.cap_minor, cs.currency).as_json(),
        "max_energy_kwh": str(Decimal(cs.max_energy_wh) / 1000),
        "stop_requested": cs.stop_requested_at is not None,
        "failure_code": cs.failure_code,
    }


# --------------------------------------------------------------------------- settlement


def _claim(s: Session, session_id: int, now: dt.datetime) -> bool:
    """Take the right to settle the session (one settler at a time; a dead settler's claim expires)."""
    res = s.execute(
        update(ChargingSession)
        .where(ChargingSession.id == session_id, ChargingSession.state == SessionState.FINISHING, ChargingSession.ended_at.is_not(None),
               (ChargingSession.settle_claimed_at.is_(None)) | (ChargingSession.settle_claimed_at < now - SETTLE_CLAIM))
        .values(settle_claimed_at=now, settle_attempts=ChargingSession.settle_attempts + 1)
        .execution_options(synchronize_session=False)
    )
    s.commit()
    return res.rowcount == 1


def _vat_share(vat: int, cost: int, captured: int) -> int:
    if cost <= 0 or captured >= cost:
        return vat if captured >= cost else 0
    return int((Decimal(vat) * captured / cost).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def settle(s: Session, provider: PaymentProvider | None, session_id: int, now: dt.datetime) -> ChargingSession | None:
    """Bill an ended session: price it, capture ``min(cost, hold)`` (or release below the minimum), book it. Idempotent.

    Commits. A provider that does not answer leaves the session finishing for
    the next attempt (the worker retries; the watchdog too); after
    ``MAX_SETTLE_ATTEMPTS`` attempts, or when the capture is refused, the
    session goes to ``review``.
    """
    if not _claim(s, session_id, now):
        return s.get(ChargingSession, session_id)
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    if cs.final_incl_vat_minor is None:
        if cs.anomaly:
            cs.state, cs.failure_code, cs.settle_claimed_at = SessionState.REVIEW, cs.anomaly, None
            s.commit()
            return cs
        try:
            priced = price_session(s, cs, cs.ended_at)
            total = bill(priced, cs.currency)
        except (PricingError, MoneyError) as e:
            log.error("session %s cannot be priced: %s", cs.id, e)
            cs.state, cs.failure_code, cs.settle_claimed_at = SessionState.REVIEW, "pricing_failed", None
            s.commit()
            return cs
        from payments.tariff_store import dumps

        charging_s = int(((cs.stopped_at or cs.ended_at) - cs.started_at).total_seconds())
        below = cs.energy_wh < cs.min_billable_wh or charging_s < cs.min_billable_s
        cs.final_excl_vat_minor = total["excl_vat"].amount
        cs.final_vat_minor = total["vat"].amount
        cs.final_incl_vat_minor = total["incl_vat"].amount
        cs.cost_minor = total["incl_vat"].amount
        cs.captured_minor = 0 if below else min(total["incl_vat"].amount, cs.hold_minor)
        cs.priced_json = dumps({k: v for k, v in priced.items() if k != "tariffs"})
        s.commit()
    captured = Money(cs.captured_minor or 0, cs.currency)
    try:
        if cs.payment_kind is PaymentKind.WALLET:
            if captured.amount:
                vat = Money(_vat_share(cs.final_vat_minor or 0, cs.final_incl_vat_minor or 0, captured.amount), cs.currency)
                wallet_mod.capture_hold(s, owner=cs.owner, held_amount=cs.hold, amount=captured, key=cs.key("wallet"), vat=vat)
                receipts.session_document(s, cs, captured_minor=captured.amount, card=None, now=now)  # its number, in this transaction
                settlement.allocate_session(s, cs, gross=captured.amount, vat=vat.amount, at=now)  # the parties' parts
            else:
                wallet_mod.release_hold(s, owner=cs.owner, amount=cs.hold, key=cs.key("wallet"))
        else:
            row = cards.lock(s, cs.card_payment_id)
            s.commit()  # no lock held over the network
            if provider is None:
                raise ProviderUnavailable("no payment provider configured")
            if cs.settle_attempts > 1:
                cards.refresh(s, provider, row)  # an earlier attempt may have captured before it died
            cards.capture(s, provider, row, captured)
    except (CardDeclined, InvalidRequest, cards.PaymentError) as e:
        s.rollback()
        cs = s.get(ChargingSession, session_id, populate_existing=True)
        log.error("session %s capture refused: %s", cs.id, e)
        cs.state, cs.failure_code, cs.settle_claimed_at = SessionState.REVIEW, "capture_failed", None
        s.commit()
        return cs
    except ProviderError:
        s.rollback()
        cs = s.get(ChargingSession, session_id, populate_existing=True)
        if cs.settle_attempts >= MAX_SETTLE_ATTEMPTS:
            cs.state, cs.failure_code = SessionState.REVIEW, "capture_failed"
        cs.settle_claimed_at = None
        s.commit()
        raise
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    cs.state = SessionState.COMPLETED
    cs.settled_at = now
    cs.settle_claimed_at = None
    cs.updated_at = now
    s.commit()
    return cs


@cards.on_succeeded(Purpose.CHARGING_SESSION)
def _book_card_capture(s: Session, row: CardPayment) -> None:
    """A session's card capture: provider clearing → revenue (net) + VAT payable; once per payment."""
    session_id = int(row.reference.split(":", 1)[1])
    cs = s.get(ChargingSession, session_id)
    captured = row.captured
    vat_minor = 0
    if cs is not None and cs.final_incl_vat_minor:
        vat_minor = _vat_share(cs.final_vat_minor or 0, cs.final_incl_vat_minor, captured.amount)
    postings = [(get_account(s, AccountKind.PROVIDER_CLEARING, row.currency), captured)]
    if captured.amount - vat_minor:
        postings.append((get_account(s, AccountKind.REVENUE, row.currency), -Money(captured.amount - vat_minor, row.currency)))
    if vat_minor:
        postings.append((get_account(s, AccountKind.VAT_PAYABLE, row.currency), -Money(vat_minor, row.currency)))
    post(s, idempotency_key=row.key("revenue"), description="Charging paid by card", reference=f"session:{session_id}", postings=postings)
    if cs is not None:
        now = utcnow()
        receipts.session_document(s, cs, captured_minor=captured.amount, card=row, now=now)  # numbered in the capture's transaction
        settlement.allocate_session(s, cs, gross=captured.amount, vat=vat_minor, at=now)  # the parties' parts


# --------------------------------------------------------------------------- refunds


def _book_refund(s: Session, cs: ChargingSession, amount: Money, *, key: str, reason: str, now: dt.datetime,
                 to_account, refund: CardRefund | None = None) -> None:
    """Credit note + the reversal of the capture's booking (revenue and VAT back to ``to_account``), in one transaction."""
    original = receipts.document_for(s, f"session:{cs.id}")
    if original is None:
        raise ChargingError("not_refundable", "this session has no invoice to credit")
    _, groups = receipts.credit_note(s, original, amount, key=f"{key}:credit", reason=reason, now=now, refund=refund)
    net = sum(g.net_minor for g in groups)
    vat = sum(g.vat_minor for g in groups)
    postings = [(to_account, -amount)]
    if net:
        postings.append((get_account(s, AccountKind.REVENUE, cs.currency), Money(net, cs.currency)))
    if vat:
        postings.append((get_account(s, AccountKind.VAT_PAYABLE, cs.currency), Money(vat, cs.currency)))
    post(s, idempotency_key=f"{key}:book", description="Charging refunded", reference=f"session:{cs.id}", postings=postings)
    settlement.reverse_session(s, cs, key=key, gross=amount.amount, vat=vat, at=now)  # the parties give back their part


def refund_session(s: Session, provider: PaymentProvider | None, session_id: int, amount: Money, *, reason: str, key: str,
                   now: dt.datetime) -> ChargingSession:
    """Give back ``amount`` of a completed session's payment, with a credit note; idempotent by ``key``. Commits.

    Never more than what was captured minus what was refunded before (checked
    under the session's row lock, so two clicks cannot both pass). A wallet
    payment goes back to the wallet at once; a card refund is reserved, sent
    to the provider, then booked with its credit note
    (``_book_card_refund``). Raises ChargingError ``not_refundable`` /
    ``refund_invalid`` / ``refund_exceeds_captured``, or the provider's error
    (a refused card refund is given back: nothing stays reserved).
    """
    from payments.invoicing import InvoiceError

    refund_key = cs_key = f"session:{session_id}:refund:{key}"  # the card refund's key and the wallet booking's
    cs = _locked(s, session_id)
    if cs is None or cs.state is not SessionState.COMPLETED or not cs.captured_minor:
        s.rollback()
        raise ChargingError("not_refundable", "only a paid, completed session can be refunded")
    if cs.payment_kind is PaymentKind.WALLET:
        if s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == f"{refund_key}:book")) is not None:
            s.commit()
            return cs  # the same click again
    else:
        done = s.scalar(select(CardRefund).where(CardRefund.idempotency_key == cs_key))
        if done is not None:
            if done.status == "pending" and provider is not None:
                s.commit()
                cards.send_refund(s, provider, done)
                s.commit()
            return s.get(ChargingSession, session_id)
    if amount.currency != cs.currency or amount.amount <= 0:
        s.rollback()
        raise ChargingError("refund_invalid", "the refund must be a positive amount in the session's currency")
    left = cs.captured_minor - cs.refunded_minor
    if amount.amount > left:
        s.rollback()
        raise ChargingError("refund_exceeds_captured", "at most %(left)s can still be refunded", left=Money(left, cs.currency))
    try:
        if cs.payment_kind is PaymentKind.WALLET:
            _book_refund(s, cs, amount, key=refund_key, reason=reason, now=now, to_account=wallet_mod.wallet(s, cs.owner, cs.currency))
            cs.refunded_minor += amount.amount
            s.commit()
            return cs
        if provider is None:
            raise ProviderUnavailable("no payment provider configured")
        row = cards.lock(s, cs.card_payment_id)
        rf = cards.prepare_refund(s, row, amount, reason=reason, idempotency_key=cs_key)  # _card_refund_prepared counts it
        s.commit()
    except (InvoiceError, cards.PaymentError) as e:
        s.rollback()
        raise ChargingError("refund_invalid", str(e)) from None
    cards.send_refund(s, provider, rf)  # InvalidRequest: given back by _card_refund_failed; the caller commits
    s.commit()
    return s.get(ChargingSession, session_id)


def _session_of(s: Session, row: CardPayment) -> ChargingSession | None:
    return s.get(ChargingSession, int(row.reference.split(":", 1)[1]))


@cards.on_refund_prepared(Purpose.CHARGING_SESSION)
def _card_refund_prepared(s: Session, row: CardPayment, rf: CardRefund) -> None:
    cs = _session_of(s, row)
    if cs is not None:
        cs.refunded_minor += rf.amount_minor


@cards.on_refunded(Purpose.CHARGING_SESSION)
def _book_card_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    """A session's card refund went through: the credit note and the reversal, once per refund."""
    cs = _session_of(s, row)
    amount = Money(rf.amount_minor, row.currency)
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, row.currency)
    if cs is None or receipts.document_for(s, f"session:{cs.id}") is None:  # no invoice to credit: the money still goes back
        post(s, idempotency_key=f"card_refund:{rf.id}:book", description="Charging refunded", reference=row.reference,
             postings=[(clearing, -amount), (get_account(s, AccountKind.REVENUE, row.currency), amount)])
        return
    _book_refund(s, cs, amount, key=f"card_refund:{rf.id}", reason=rf.reason, now=utcnow(), to_account=clearing, refund=rf)


@cards.on_refund_failed(Purpose.CHARGING_SESSION)
def _card_refund_failed(s: Session, row: CardPayment, rf: CardRefund) -> None:
    cs = _session_of(s, row)
    if cs is not None:
        cs.refunded_minor -= rf.amount_minor


# --------------------------------------------------------------------------- the watchdog


def due_work(s: Session, now: dt.datetime) -> dict[str, list[int]]:
    """Sessions the watchdog must look at: starts that timed out, abandoned 3-D Secure, idle overruns, unsettled, silent."""
    ids = lambda q: list(s.scalars(q.order_by(ChargingSession.id).limit(500)))  # noqa: E731
    S = ChargingSession
    return {
        "start_timeout": ids(select(S.id).where(S.state == SessionState.START_REQUESTED, S.start_deadline < now)),
        "pending": ids(select(S.id).where(S.state.in_([SessionState.PENDING, SessionState.AUTHORIZED]), S.updated_at < now - PENDING_TIMEOUT)),
        "idle_over": ids(select(S.id).where(S.state == SessionState.FINISHING, S.ended_at.is_(None))),
        "settle": ids(select(S.id).where(S.state == SessionState.FINISHING, S.ended_at.is_not(None),
                                         (S.settle_claimed_at.is_(None)) | (S.settle_claimed_at < now - SETTLE_CLAIM))),
        "silent": ids(select(S.id).where(S.state == SessionState.CHARGING, S.last_message_at < now - SILENCE_TIMEOUT)),
        "unreleased": ids(select(S.id).join(CardPayment, CardPayment.id == S.card_payment_id).where(
            S.state.in_(NOT_CHARGED), CardPayment.state.in_([cards.State.AUTHORIZED, cards.State.REQUIRES_ACTION]),
            S.updated_at < now - dt.timedelta(minutes=1))),
    }


def expire_start(s: Session, provider: PaymentProvider | None, session_id: int, now: dt.datetime) -> ChargingSession | None:
    """No StartTransaction within the start window (the car was never plugged in): release the hold. Commits."""
    cs = _locked(s, session_id)
    if cs is None or cs.state != SessionState.START_REQUESTED or cs.start_deadline is None or cs.start_deadline >= now:
        s.commit()
        return cs
    return _give_up(s, provider, cs, SessionState.START_TIMEOUT, "start_timeout", now)


def abandon_pending(s: Session, provider: PaymentProvider | None, session_id: int, now: dt.datetime) -> ChargingSession | None:
    """A hold never confirmed (3-D Secure left open) or never started: release it. Commits."""
    cs = _locked(s, session_id)
    if cs is None or cs.state not in (SessionState.PENDING, SessionState.AUTHORIZED) or cs.updated_at >= now - PENDING_TIMEOUT:
        s.commit()
        return cs
    return _give_up(s, provider, cs, SessionState.CANCELLED, "abandoned", now)


def release_leftover(s: Session, provider: PaymentProvider | None, session_id: int) -> bool:
    """A session that ended without charging but whose card hold is still open (the provider was down): release it. Commits."""
    cs = s.get(ChargingSession, session_id)
    if cs is None or cs.state not in NOT_CHARGED or cs.card_payment is None:
        return False
    s.commit()
    release(s, provider, cs)
    s.commit()
    return True


def end_idle_overrun(s: Session, session_id: int, now: dt.datetime) -> bool:
    """A finishing session whose car stays past the hold's idle allowance: end its idle time there. Commits; True if ended."""
    cs = s.scalar(select(ChargingSession).where(ChargingSession.id == session_id).with_for_update())
    if cs is None or cs.state != SessionState.FINISHING or cs.ended_at is not None or cs.stopped_at is None:
        return False
    limit = cs.stopped_at + dt.timedelta(seconds=cs.max_idle_s)
    if now < limit:
        return False
    _car_left(s, cs, limit, now)
    s.commit()
    return True


def review_silent(s: Session, session_id: int, now: dt.datetime) -> None:
    """A charging session the charger has said nothing about for too long: a person must look. Commits."""
    cs = s.scalar(select(ChargingSession).where(ChargingSession.id == session_id).with_for_update())
    if cs is None or cs.state != SessionState.CHARGING or cs.last_message_at is None or cs.last_message_at >= now - SILENCE_TIMEOUT:
        return
    cs.state, cs.failure_code = SessionState.REVIEW, "no_stop"
    _free_connector(cs)
    cs.updated_at = now
    s.commit()


# --------------------------------------------------------------------------- a person's decision on a review


REVIEW_DECISIONS = ("settle", "release", "write_off")


def resolve_review(s: Session, provider: PaymentProvider | None, session_id: int, decision: str, *, now: dt.datetime) -> ChargingSession:
    """Finish a session in ``review`` as a person decided (the support console). Commits.

    * ``settle``: bill it as priced. A session never priced (its meter went
      backwards, the charger never reported a stop) is priced now from its
      readings up to its end, or its last reading (the person has looked at
      them), then goes through ``settle`` like any other session: capture
      ``min(cost, hold)`` (nothing below the site's minimum), invoice,
      settlement. A capture refused again sends it back to ``review``; a
      provider that does not answer leaves it ``finishing`` for the worker.
    * ``release``: nothing is charged. The whole hold goes back (wallet entry,
      or the card authorisation cancelled) and the session is ``completed``
      with nothing captured (``failure_code`` ``released_by_support``).
    * ``write_off``: the same for the money (nothing more can be collected,
      e.g. the card refused the capture), recorded as a loss of the priced
      cost (``failure_code`` ``written_off``). No ledger entry: revenue is
      booked only at capture, so nothing owed was booked that must be reversed.

    Raises ChargingError ``invalid_decision``, ``not_in_review``,
    ``not_priceable`` (settle), ``already_captured`` (the provider captured
    the card payment: settle it instead); a provider error on a card release
    leaves the session in review.
    """
    if decision not in REVIEW_DECISIONS:
        raise ChargingError("invalid_decision", "settle, release or write_off")
    cs = _locked(s, session_id)
    if cs is None or cs.state is not SessionState.REVIEW:
        s.rollback()
        raise ChargingError("not_in_review", "this session is not waiting for a decision")
    if decision == "settle":
        return _settle_reviewed(s, provider, cs, now)
    code = "written_off" if decision == "write_off" else "released_by_support"
    if cs.payment_kind is PaymentKind.CARD:
        if cs.card_payment is not None and cs.card_payment.state == cards.State.SUCCEEDED:
            s.rollback()
            raise ChargingError("already_captured", "the card payment was captured: settle the session (and refund it if needed)")
        s.commit()  # no row lock held over the network
        release(s, provider, cs)
        s.commit()
        cs = _locked(s, session_id)
        if cs.state is not SessionState.REVIEW:  # decided by someone else meanwhile
            s.commit()
            return cs
    else:
        release(s, provider, cs)
    cs.state, cs.captured_minor, cs.failure_code = SessionState.COMPLETED, 0, code
    cs.settled_at, cs.settle_claimed_at, cs.updated_at = now, None, now
    _free_connector(cs)
    s.commit()
    return cs


def _settle_reviewed(s: Session, provider: PaymentProvider | None, cs: ChargingSession, now: dt.datetime) -> ChargingSession:
    """Price a reviewed session if it never was (as ``settle`` does), put it back to ``finishing`` and settle it."""
    last = s.scalar(select(SessionSample.at).where(SessionSample.session_id == cs.id).order_by(SessionSample.at.desc()).limit(1))
    end = cs.ended_at or cs.stopped_at or last or cs.last_message_at
    if cs.started_at is None or end is None:
        s.rollback()
        raise ChargingError("not_priceable", "this session has no readings to bill")
    if cs.final_incl_vat_minor is None:
        try:
            priced = price_session(s, cs, end)
            total = bill(priced, cs.currency)
        except (PricingError, MoneyError) as e:
            s.rollback()
            raise ChargingError("not_priceable", f"this session cannot be priced from its readings ({e})") from None
        from payments.tariff_store import dumps

        charging_s = int(((cs.stopped_at or end) - cs.started_at).total_seconds())
        below = cs.energy_wh < cs.min_billable_wh or charging_s < cs.min_billable_s
        cs.final_excl_vat_minor = total["excl_vat"].amount
        cs.final_vat_minor = total["vat"].amount
        cs.final_incl_vat_minor = cs.cost_minor = total["incl_vat"].amount
        cs.captured_minor = 0 if below else min(total["incl_vat"].amount, cs.hold_minor)
        cs.priced_json = dumps({k: v for k, v in priced.items() if k != "tariffs"})
    cs.ended_at = cs.ended_at or end
    cs.state, cs.settle_claimed_at, cs.updated_at = SessionState.FINISHING, None, now
    _free_connector(cs)
    s.commit()
    return settle(s, provider, cs.id, now) or cs


# --------------------------------------------------------------------------- finding sessions


def visible_to(cs: ChargingSession, *, user: User | None, guest_token: str | None = None) -> bool:
    """Whether the signed-in user (their own session) or the holder of a guest link token may see the session."""
    if user is not None and cs.user_id == user.id:
        return True
    if guest_token and cs.access_token_hash:
        return secrets.compare_digest(cs.access_token_hash, token_hash(guest_token))
    return False


def find_guest_sessions(s: Session, *, email: str, day: dt.date, last4: str) -> list[ChargingSession]:
    """A guest's card sessions of one day (UTC ± the site's zone is close enough: a 36-hour window) by email and card last four."""
    lo = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC) - dt.timedelta(hours=14)
    hi = lo + dt.timedelta(hours=14 + 24 + 12)
    rows = s.scalars(
        select(ChargingSession).join(CardPayment, CardPayment.id == ChargingSession.card_payment_id)
        .where(ChargingSession.email == email.strip().lower(), ChargingSession.user_id.is_(None), CardPayment.card_last4 == last4,
               ChargingSession.created_at >= lo, ChargingSession.created_at < hi)
        .order_by(ChargingSession.id)
    ).all()
    return list(rows)


def new_guest_token(s: Session, cs: ChargingSession) -> str:
    """A fresh link token for a guest's session (the old link stops working). Flushes."""
    token = secrets.token_urlsafe(24)
    cs.access_token_hash = token_hash(token)
    s.flush()
    return token


def dumps_json(value: object) -> str:
    """JSON for command payloads and logs."""
    return json.dumps(value, separators=(",", ":"), default=str)


__all__ = [
    "ACTIVE_STATES", "Answer", "ChargingError", "CommandResult", "Gateway", "Quote", "Reading", "StartRequest", "StartResult",
    "authorize", "availability", "charger_booted", "charger_connected", "charger_seen", "continue_after_confirmation", "due_work",
    "expire_start", "live", "meter_values", "open_session", "parse_meter_values", "price_session", "quote", "release", "request_start",
    "request_stop", "settle", "start_session", "start_transaction", "status_changed", "stop_transaction", "visible_to",
]
