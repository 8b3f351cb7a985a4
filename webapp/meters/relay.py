"""A prepaid meter's relay (power off when the credit is used up, back on after a top-up) and the tenant's alerts.

Call ``balance_changed(s, meter, now)`` in the transaction of every movement
on a meter wallet (a consumption debit, a top-up, a refund, a change of
emergency credit), *after* the ledger posting. The posting's UPDATE of the
wallet row holds that row's lock until the commit (PostgreSQL), or the
transaction is BEGIN IMMEDIATE (SQLite), so the decisions for one meter are
taken one transaction at a time and each sees what the previous one did.
Lock order: wallet account, then meter, then tenant; code that also writes
the meter row (a reading ingest) should post to the wallet first.

The rules (balance = the meter wallet's balance, E = the tenant's emergency
credit, T = the tenant's low-balance threshold):

* **Disconnect** when balance ≤ −E (at zero or below without emergency
  credit): one ``disconnect`` command, ``relay_state`` → ``disconnecting``;
  nothing more while the meter is already disconnecting or disconnected.
* **Reconnect** when balance > 0 while the meter is disconnecting or
  disconnected: one ``reconnect`` command, ``relay_state`` → ``reconnecting``.
  The reconnect point is zero, not −E: emergency credit is a loan, repaid by
  the next top-up before the power comes back (as prepaid meters do), and
  the gap between the two points keeps a tiny top-up from switching the
  relay on and off again at the next reading. Only our own balance
  disconnects are undone this way (reason ``balance_exhausted``); a meter an
  operator switched off stays off.
* A **closed** account's meters are disconnected whatever their balance
  (reason ``account_closed``; ``webapp.meters.closing`` calls this after
  the refund), without an email: the tenant has left.
* A new command **supersedes** the meter's pending one (status
  ``superseded``, never sent again). Commands of a meter are numbered in
  order (their ids); the collector applies the newest (see
  docs/collector-webhooks.md), so an old command that arrives late changes
  nothing.
* The collector answering 2xx confirms a command: ``disconnecting`` →
  ``disconnected``, ``reconnecting`` → ``connected``, and the tenant is
  emailed (``meter_disconnected``: the power is off and how to top up;
  ``meter_reconnected``). A command the collector never accepts ends
  ``failed`` (``webapp.meters.jobs``), the state stays ``disconnecting`` or
  ``reconnecting`` and ``relay_status`` shows it.
* **Low balance**: balance < T sends one ``meter_low_balance`` email to the
  tenant's contact address, and ``Tenant.low_balance_alerted_at`` is set. No
  other until every prepaid meter of the tenant is back at or above T (the
  alert is re-armed, ``low_balance_alerted_at`` cleared), and never more
  than one per ``LOW_BALANCE_EVERY`` (24 h) per tenant whatever happens
  (counted from the emails recorded in ``SentEmail``). The tenant's
  contact address always gets it: it is the tenant's electricity, not an
  account notification a signed-in person turned off.

Emails go through the outbox (``webapp.notifications.outbox.schedule``):
recorded in the transaction, sent by the worker after the commit. Commands
are handed to the worker after the commit too (``webapp.meters.jobs``), so
neither a page nor a reading ingest ever waits for SMTP or a collector.

Emergency credit (``set_emergency_credit``) is the wallet account's
``overdraft_limit_minor`` in the ledger, which refuses any debit past it.
When an operator lowers it below what the tenant already uses, the limit
stays at the amount used (the ledger's CHECK holds, no further debit
passes) and the meter is disconnected; the next top-up brings the limit
down to the tenant's setting again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from email.message import EmailMessage

from flask import current_app, has_app_context
from flask_babel import lazy_gettext as _l
from sqlalchemy import and_, event, func, select, update
from sqlalchemy.orm import Session, SessionTransaction, object_session
from sqlalchemy.orm.attributes import set_committed_value

from payments.ledger import AccountKind, LedgerAccount, get_account
from payments.money import Money, MoneyError
from payments.money import format as format_money
from payments.money import parse as parse_money
from webapp.db import utcnow
from webapp.meters.models import RelayAction, RelayCommand, Tenant, TenantState
from webapp.models import Meter
from webapp.notifications.models import SentEmail
from webapp.notifications.outbox import schedule

log = logging.getLogger("voltpay.meters.relay")

CONNECTED = "connected"
DISCONNECTING = "disconnecting"
DISCONNECTED = "disconnected"
RECONNECTING = "reconnecting"
OFF_STATES = (DISCONNECTING, DISCONNECTED)  # we asked for the power to be off

BALANCE_EXHAUSTED = "balance_exhausted"
TOPPED_UP = "topped_up"
ACCOUNT_CLOSED = "account_closed"

LOW_BALANCE_EVERY = dt.timedelta(hours=24)
EMERGENCY_CREDIT_MAX_MINOR = 2000  # default of the METER_EMERGENCY_CREDIT_MAX_MINOR setting (20.00 in the currency)
QUEUED = "voltpay.relay_commands"  # session.info: ids of commands to hand to the worker after the commit

STATE_LABELS = {
    CONNECTED: _l("Power on"),
    DISCONNECTING: _l("Switching the power off"),
    DISCONNECTED: _l("Power off"),
    RECONNECTING: _l("Switching the power back on"),
}


def wallet_owner(meter_id: int) -> str:
    """The ledger owner of a meter's wallet."""
    return f"meter:{meter_id}"


def meter_wallet(s: Session, meter: Meter, currency: str) -> LedgerAccount:
    """The meter's wallet account in ``currency`` (created on first use with the tenant's emergency credit)."""
    tenant = s.get(Tenant, meter.tenant_id) if meter.tenant_id else None
    limit = tenant.emergency_credit_minor if tenant is not None else 0
    return get_account(s, AccountKind.METER_WALLET, currency, wallet_owner(meter.id), overdraft_limit_minor=limit)


def meter_balance(s: Session, meter: Meter, currency: str | None = None) -> Money:
    """The meter wallet's balance (negative while emergency credit is used); zero when it has no wallet yet."""
    if currency is None:
        tenant = s.get(Tenant, meter.tenant_id) if meter.tenant_id else None
        currency = tenant.currency if tenant is not None else meter.site.currency
    raw = s.scalar(select(LedgerAccount.balance_minor).where(
        LedgerAccount.kind == AccountKind.METER_WALLET, LedgerAccount.owner == wallet_owner(meter.id),
        LedgerAccount.currency == currency))
    return Money(-(raw or 0), currency)  # credit-normal: the cached balance is debit-positive


# --------------------------------------------------------------------------- the rules


def balance_changed(s: Session, meter: Meter, now: dt.datetime) -> None:
    """Apply the relay and alert rules (module docstring) after a movement on ``meter``'s wallet; caller commits.

    Cheap when nothing changes (one query, no write), so a reading ingest may
    call it for every debit.
    """
    w = LedgerAccount
    row = s.execute(
        select(Meter.relay_state, Meter.prepaid, Tenant.id, Tenant.currency, Tenant.state, Tenant.low_balance_threshold_minor,
               Tenant.low_balance_alerted_at, Tenant.emergency_credit_minor, w.id, w.balance_minor, w.overdraft_limit_minor)
        .select_from(Meter).join(Tenant, Tenant.id == Meter.tenant_id)
        .outerjoin(w, and_(w.kind == AccountKind.METER_WALLET, w.owner == wallet_owner(meter.id), w.currency == Tenant.currency))
        .where(Meter.id == meter.id)
    ).one_or_none()
    if row is None:
        return  # no tenant: a vacant meter, a public-area or master meter
    (relay_state, prepaid, tenant_id, currency, tenant_state, threshold, alerted_at, emergency,
     account_id, raw, overdraft) = row
    if not prepaid:
        return
    balance = -(raw or 0)

    if account_id is not None:
        wanted = emergency if raw <= emergency else raw  # never below what is already used (see module docstring)
        if overdraft != wanted:
            _sync_overdraft(s, account_id, emergency)

    closed = tenant_state == TenantState.CLOSED
    if balance <= -emergency or closed:
        if relay_state not in OFF_STATES:
            _issue(s, meter, RelayAction.DISCONNECT, ACCOUNT_CLOSED if closed else BALANCE_EXHAUSTED, now)
    elif balance > 0 and relay_state in OFF_STATES:
        last = _latest(s, meter.id)
        if last is None or last.reason == BALANCE_EXHAUSTED:  # never undo an operator's disconnect
            _issue(s, meter, RelayAction.RECONNECT, TOPPED_UP, now)

    if tenant_state != TenantState.ACTIVE:
        return
    if balance < threshold and alerted_at is None:
        _alert_low_balance(s, meter, tenant_id, now)
    elif balance >= threshold and alerted_at is not None and _lowest_balance(s, tenant_id, currency) >= threshold:
        s.execute(update(Tenant).where(Tenant.id == tenant_id).values(low_balance_alerted_at=None)
                  .execution_options(synchronize_session="fetch"))


def _latest(s: Session, meter_id: int) -> RelayCommand | None:
    return s.scalar(select(RelayCommand).where(RelayCommand.meter_id == meter_id).order_by(RelayCommand.id.desc()).limit(1))


def _issue(s: Session, meter: Meter, action: RelayAction, reason: str, now: dt.datetime) -> RelayCommand:
    """Record a relay command (superseding the meter's pending one) and set the relay state; sent after the commit."""
    s.execute(update(RelayCommand).where(RelayCommand.meter_id == meter.id, RelayCommand.status == "pending")
              .values(status="superseded", next_attempt_at=None).execution_options(synchronize_session="fetch"))
    n = s.scalar(select(func.count()).select_from(RelayCommand).where(RelayCommand.meter_id == meter.id)) or 0
    # The key numbers the meter's commands: two transactions deciding the same change at once (which the
    # wallet's lock prevents) would collide here instead of sending it twice.
    cmd = RelayCommand(meter_id=meter.id, action=action, reason=reason, idempotency_key=f"meter:{meter.id}:relay:{n + 1}:{action.value}",
                       status="pending", attempts=0, next_attempt_at=None, created_at=now)
    s.add(cmd)
    s.flush()
    state = DISCONNECTING if action is RelayAction.DISCONNECT else RECONNECTING
    s.execute(update(Meter.__table__).where(Meter.__table__.c.id == meter.id).values(relay_state=state, relay_changed_at=now))
    set_committed_value(meter, "relay_state", state)  # what the row holds now; the caller's object must not write it back
    set_committed_value(meter, "relay_changed_at", now)
    s.info.setdefault(QUEUED, set()).add(cmd.id)
    log.info("relay command", extra={"meter": meter.id, "command": cmd.id, "action": action.value, "reason": reason})
    return cmd


def _sync_overdraft(s: Session, account_id: int, emergency_minor: int) -> None:
    """Set the wallet's overdraft to the emergency credit, or to what is already used if that is more."""
    t = LedgerAccount.__table__
    s.execute(update(t).where(t.c.id == account_id, t.c.balance_minor <= emergency_minor).values(overdraft_limit_minor=emergency_minor))
    s.execute(update(t).where(t.c.id == account_id, t.c.balance_minor > emergency_minor).values(overdraft_limit_minor=t.c.balance_minor))
    acct = s.identity_map.get(s.identity_key(LedgerAccount, account_id))
    if acct is not None:
        s.refresh(acct, ["balance_minor", "overdraft_limit_minor"])


def _lowest_balance(s: Session, tenant_id: int, currency: str) -> int:
    """The lowest wallet balance among the tenant's prepaid meters (a meter without a wallet counts as zero)."""
    meter_ids = s.scalars(select(Meter.id).where(Meter.tenant_id == tenant_id, Meter.prepaid.is_(True))).all()
    raws = dict(s.execute(select(LedgerAccount.owner, LedgerAccount.balance_minor).where(
        LedgerAccount.kind == AccountKind.METER_WALLET, LedgerAccount.currency == currency,
        LedgerAccount.owner.in_([wallet_owner(i) for i in meter_ids]))).all())
    return min((-(raws.get(wallet_owner(i)) or 0) for i in meter_ids), default=0)


def _alert_low_balance(s: Session, meter: Meter, tenant_id: int, now: dt.datetime) -> None:
    """Schedule the low-balance email unless one went out in the last 24 h; under the tenant's row lock."""
    tenant = s.get(Tenant, tenant_id, with_for_update=True, populate_existing=True)
    if tenant is None or tenant.low_balance_alerted_at is not None:
        return  # a concurrent transaction of another meter of the tenant alerted first
    tenant.low_balance_alerted_at = now  # set even when throttled: this low spell has been dealt with
    s.flush()
    recent = s.scalar(select(SentEmail.id).where(SentEmail.template == "meter_low_balance",
                                                 SentEmail.reference.like(f"tenant:{tenant_id}:%"),
                                                 SentEmail.created_at > now - LOW_BALANCE_EVERY).limit(1))
    if recent is not None:
        return
    schedule(s, to=tenant.contact_email, template="meter_low_balance", reference=f"tenant:{tenant_id}:meter:{meter.id}",
             key=f"tenant:{tenant_id}:meter_low:{now.isoformat()}")


# --------------------------------------------------------------------------- emergency credit


class EmergencyCreditError(ValueError):
    """The emergency credit asked for is not allowed; ``code`` is stable, the message says why."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def emergency_credit_maximum(currency: str) -> Money:
    """The most emergency credit an operator may grant (setting ``METER_EMERGENCY_CREDIT_MAX_MINOR``)."""
    cfg = current_app.config if has_app_context() else {}
    return Money(int(cfg.get("METER_EMERGENCY_CREDIT_MAX_MINOR") or EMERGENCY_CREDIT_MAX_MINOR), currency)


def set_emergency_credit(s: Session, tenant: Tenant, amount: Money, by: str, *, now: dt.datetime | None = None,
                         maximum: Money | None = None) -> None:
    """Let the tenant's prepaid meters go ``amount`` below zero before the power is cut; caller commits.

    Raises ``EmergencyCreditError`` (currency, negative, above the maximum).
    Updates each meter wallet's overdraft and applies the relay rules at once
    (raising it may reconnect nothing — reconnecting needs a positive balance —
    lowering it may disconnect).
    """
    now = now or utcnow()
    if amount.currency != tenant.currency:
        raise EmergencyCreditError(f"the tenant pays in {tenant.currency}, not {amount.currency}", "currency_mismatch")
    if amount.amount < 0:
        raise EmergencyCreditError("emergency credit cannot be negative", "negative")
    maximum = maximum or emergency_credit_maximum(tenant.currency)
    if amount > maximum:
        raise EmergencyCreditError(f"emergency credit can be at most {maximum}", "above_maximum")
    locked = s.get(Tenant, tenant.id, with_for_update=True, populate_existing=True)
    if locked is None:
        raise EmergencyCreditError(f"no tenant {tenant.id}", "not_found")
    old = locked.emergency_credit_minor
    locked.emergency_credit_minor = amount.amount
    s.flush()
    for meter in s.scalars(select(Meter).where(Meter.tenant_id == locked.id, Meter.prepaid.is_(True)).order_by(Meter.id)):
        acct = meter_wallet(s, meter, locked.currency)
        s.execute(select(LedgerAccount.id).where(LedgerAccount.id == acct.id).with_for_update())  # wallet → meter → tenant order
        _sync_overdraft(s, acct.id, amount.amount)
        balance_changed(s, meter, now)
    log.info("emergency credit set", extra={"tenant": locked.id, "old_minor": old, "new_minor": amount.amount,
                                            "currency": locked.currency, "by": by})


def parse_amount(text: str, currency: str) -> Money:
    """An amount typed by an operator ("5.00") in ``currency``, or ``EmergencyCreditError``."""
    try:
        return parse_money(text, currency)
    except MoneyError as e:
        raise EmergencyCreditError(str(e), getattr(e, "code", "invalid")) from None


# --------------------------------------------------------------------------- what the tenant sees


def relay_status(meter: Meter, s: Session | None = None) -> dict:
    """The relay as the tenant page shows it: state, since when, and the command not yet confirmed (if any).

    ``{"state": "disconnecting", "label": "Switching the power off", "since": datetime | None,
    "pending": {"id", "action", "reason", "status" ("pending" or "failed"), "attempts", "created_at"} | None}``
    """
    s = s or object_session(meter)
    last = _latest(s, meter.id) if s is not None else None
    pending = None
    if last is not None and last.status in ("pending", "failed"):
        pending = {"id": last.id, "action": last.action.value, "reason": last.reason, "status": last.status,
                   "attempts": last.attempts, "created_at": last.created_at}
    label = STATE_LABELS.get(meter.relay_state)
    return {"state": meter.relay_state, "label": str(label) if label is not None and has_app_context() else meter.relay_state,
            "since": meter.relay_changed_at, "pending": pending}


# --------------------------------------------------------------------------- the collector webhook: payload and signature

SIGNATURE_HEADER = "Voltpay-Signature"
SIGNATURE_TOLERANCE = 300  # seconds a receiver should accept between our timestamp and its clock


def payload(cmd: RelayCommand, meter: Meter) -> bytes:
    """The JSON body sent for ``cmd``: the same bytes on every attempt (the collector dedupes on ``id``)."""
    created = cmd.created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {"id": cmd.id, "meter_code": meter.meter_code, "serial": meter.serial, "action": cmd.action.value,
           "reason": cmd.reason, "created_at": created}
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Voltpay-Signature`` header value: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.

    For collector vendors: take ``t`` and every ``v1`` from the header,
    compute HMAC-SHA256 with the webhook secret as the key over the ASCII
    timestamp, a ".", and the raw request body bytes (before any JSON
    parsing), compare it in constant time with each ``v1``, and refuse a
    ``t`` more than five minutes from your clock (a replayed request).
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, body: bytes, header: str, now: int, tolerance: int = SIGNATURE_TOLERANCE) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance`` seconds of ``now`` (the receiver's check)."""
    parts: dict[str, list[str]] = {}
    for item in (header or "").split(","):
        k, _, v = item.strip().partition("=")
        parts.setdefault(k, []).append(v)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


# --------------------------------------------------------------------------- after the commit


@event.listens_for(Session, "after_commit")
def _after_commit(s: Session) -> None:
    """The outermost commit succeeded: hand its relay commands to the worker."""
    if s.in_nested_transaction():
        return
    ids = s.info.pop(QUEUED, None)
    if ids:
        from webapp.meters.jobs import enqueue

        enqueue(sorted(ids))


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(s: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended without a commit: its commands were never written."""
    if transaction.parent is None:
        s.info.pop(QUEUED, None)


# --------------------------------------------------------------------------- the emails (written by the worker)


def _email_context(s: Session, tenant: Tenant, meter: Meter) -> tuple[str, dict]:
    from webapp.models import User
    from webapp.notifications.emails import _base, _locale

    user = s.get(User, tenant.user_id) if tenant.user_id else None
    locale = _locale(user.locale if user else None)
    balance = meter_balance(s, meter, tenant.currency)
    return locale, {
        "name": tenant.name, "meter_code": meter.meter_code, "unit": tenant.unit,
        "balance": format_money(balance, locale), "owed": format_money(Money(max(0, -balance.amount), tenant.currency), locale),
        "owes": balance.amount < 0,
        "threshold": format_money(Money(tenant.low_balance_threshold_minor, tenant.currency), locale),
        "emergency_credit": format_money(Money(tenant.emergency_credit_minor, tenant.currency), locale)
        if tenant.emergency_credit_minor else None,
        "link": f"{_base()}/m/{meter.meter_code}",
    }


def _build_low_balance(s: Session, row: SentEmail) -> EmailMessage | None:
    from webapp.notifications.emails import _render

    _, tenant_id, _, meter_id = row.reference.split(":")
    tenant, meter = s.get(Tenant, int(tenant_id)), s.get(Meter, int(meter_id))
    if tenant is None or meter is None or tenant.state != TenantState.ACTIVE:
        return None
    locale, context = _email_context(s, tenant, meter)
    return _render(row.to, "meter_low_balance", locale, **context)


def _build_relay(s: Session, row: SentEmail) -> EmailMessage | None:
    from webapp.notifications.emails import _render, _when

    cmd = s.get(RelayCommand, int(row.reference.split(":", 1)[1]))
    meter = s.get(Meter, cmd.meter_id) if cmd is not None else None
    tenant = s.get(Tenant, meter.tenant_id) if meter is not None and meter.tenant_id else None
    if cmd is None or meter is None or tenant is None:
        return None
    now_state = DISCONNECTED if cmd.action is RelayAction.DISCONNECT else CONNECTED
    if meter.relay_state != now_state:
        return None  # overtaken (topped up meanwhile, or cut again): the news is stale
    locale, context = _email_context(s, tenant, meter)
    return _render(row.to, row.template, locale, **context, when=_when(cmd.delivered_at, meter.site.time_zone, locale),
                   reason=cmd.reason)


def email_for(s: Session, cmd: RelayCommand, meter: Meter) -> None:
    """Schedule the tenant's email about a confirmed command (in the transaction that records the confirmation)."""
    tenant = s.get(Tenant, meter.tenant_id) if meter.tenant_id else None
    if tenant is None or tenant.state == TenantState.CLOSED or not tenant.contact_email:
        return
    template = "meter_disconnected" if cmd.action is RelayAction.DISCONNECT else "meter_reconnected"
    schedule(s, to=tenant.contact_email, template=template, reference=f"relay_command:{cmd.id}", key=f"relay_command:{cmd.id}:email")


def _register_builders() -> None:
    from webapp.notifications.emails import BUILDERS

    BUILDERS.setdefault("meter_low_balance", _build_low_balance)
    BUILDERS.setdefault("meter_disconnected", _build_relay)
    BUILDERS.setdefault("meter_reconnected", _build_relay)


_register_builders()
