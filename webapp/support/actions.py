"""What support staff do from the console: refund, release a hold, stop, unlock, resend a receipt, goodwill credit, review, approvals.

Two layers. The **service functions** (``refund``, ``release_hold``,
``stop_session``, ``unlock_connector``, ``resend_receipt``,
``goodwill_credit``, ``resolve_review``, ``approve``, ``reject``) take the
database session and the acting staff member first, do the action through
the existing services (``webapp.charging.service.refund_session``, ``release``,
``request_stop``, ``resolve_review``, the charger gateway client, the email
outbox, the ledger), write its audit entry, commit, and return ``Done`` or
raise ``ActionRefused`` (an HTTP status and a message for the person). The
**views** below are thin: load the object, check the scope, read the form,
call a service, redirect to the object's console page (post/redirect/get).

Rules every action keeps:

* **Scope first.** Another operator's session, document, meter or approval
  answers 404 before the form is even read (``require_visible``); customers
  get 403 from the blueprint.
* **A reason, always.** Every action form has a reason, kept in the audit log.
* **Audited in the action's transaction.** The entry (who, what, why, the
  state before and after: state, amounts) is added before the commit that
  makes the action happen, so an action never exists without its entry and a
  rolled-back action leaves none. Actions that talk to the outside world take
  several transactions by nature (a card refund is reserved, then sent; a
  charger command row is committed before the network call); their entry goes
  with the first commit that moves money, or with the one that records the
  charger's answer. A refused attempt (wrong state, too much) is recorded in
  its own transaction with outcome ``refused``; one that failed on the way
  (the provider or the charger said no) with ``failed``.
* **Double clicks do it once.** Each action form carries a one-time key made
  when the page is drawn. The first POST with a key claims it (an
  ``IdempotencyRecord`` of scope ``support``, committed before anything
  moves); the same form sent again (a double click, a reload, a second
  browser tab) waits for the first to finish and answers with its outcome,
  doing nothing. The key also names the money the action moves (the refund's
  key in ``refund_session``, the goodwill credit's ledger entry), so even an
  action carried out twice books once. A refused or failed form is drawn
  again with a new key; when the provider did not answer, the claim is freed
  and the key kept, so sending the form again finishes the same refund.
* **Approvals.** A refund or goodwill credit above the operator's limit
  (``Operator.support_approval_limit_minor``, else the
  ``SUPPORT_APPROVAL_LIMIT_MINOR`` setting) moves nothing: it becomes an
  ``ApprovalRequest`` (pending; audit outcome ``requested``). Another staff
  member in scope approves it (the action runs then, with the requester's
  reason and key; the request ends ``approved`` or ``failed`` with the
  result) or rejects it with a reason. The requester cannot approve their
  own request (they may withdraw it by rejecting it). The decision is taken
  by one conditional UPDATE, so two people clicking at once decide once.

Goodwill credits are booked ``goodwill (operator:<id>) → meter wallet``:
``AccountKind.GOODWILL`` is an expense account per operator, added for this.
A credit that brings the balance above zero reconnects a meter cut for lack
of money, as a paid top-up does (``webapp.meters.relay.balance_changed``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import abort, current_app, flash, g, make_response, redirect, render_template, render_template_string, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from wtforms import HiddenField, RadioField, SelectChoice, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, Length, Optional, Regexp

from payments import cards
from payments.cards import CardRefund
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, get_account, transfer
from payments.money import Money, MoneyError, exponent
from payments.money import format as format_money
from payments.money import parse as parse_money
from payments.providers.base import InvalidRequest, ProviderError
from webapp.charging import service as charging
from webapp.charging.models import ACTIVE_STATES, ChargingSession, CommandStatus, PaymentKind, SessionState
from webapp.db import db_session, read_only, utcnow
from webapp.models import IdempotencyRecord, Meter, Operator
from webapp.support import bp, require_visible, staff_scope
from webapp.support.audit import record
from webapp.support.models import ApprovalRequest, ApprovalState

CLAIM_SCOPE = "support"
CLAIM_KEEP = dt.timedelta(days=1)  # how long a form's outcome is kept for a repeated POST
CLAIM_WAIT_S = 15.0  # how long a repeated form waits for the first one to finish before saying "still running"
KEY_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
HOLD_OPEN = (cards.State.CREATED, cards.State.REQUIRES_ACTION, cards.State.PROCESSING, cards.State.AUTHORIZED)


# --------------------------------------------------------------------------- results and refusals


class ActionRefused(Exception):
    """An action not carried out: the HTTP ``status`` to answer, a stable ``code`` and a message for the person.

    ``retry``: the action started and may be finished by sending the same
    form again (the provider did not answer): its one-time key is kept.
    """

    def __init__(self, status: int, code: str, message: str, *, retry: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry = retry


@dataclass
class Done:
    """An action carried out (or, with ``approval``, waiting for a second person)."""

    message: str
    approval: ApprovalRequest | None = None
    category: str = "message"


def new_key() -> str:
    """A one-time key for an action form (drawn with the page)."""
    return secrets.token_urlsafe(18)


def _now() -> dt.datetime:
    return utcnow()


def _locale() -> str:
    return str(get_locale() or "en")


def _fmt(money: Money) -> str:
    return format_money(money, _locale())


# --------------------------------------------------------------------------- whose object it is, and the limit


def session_operator(cs: ChargingSession) -> int:
    """The operator of a charging session's site."""
    return cs.connector.charger.site.operator_id


def document_operator(doc: Document) -> int | None:
    """The operator who issued a document; None for the platform's own (wallet top-up receipts)."""
    kind, _sep, ident = (doc.scope or "").partition(":")
    return int(ident) if kind == "operator" and ident.isdigit() else None


def meter_operator(meter: Meter) -> int:
    """The operator of a meter's building."""
    return meter.site.operator_id


def approval_limit(s: Session, operator_id: int | None) -> int:
    """Minor units a refund or goodwill credit may reach without a second person (the operator's, else the setting)."""
    op = s.get(Operator, operator_id) if operator_id is not None else None
    if op is not None and op.support_approval_limit_minor is not None:
        return op.support_approval_limit_minor
    return int(current_app.config.get("SUPPORT_APPROVAL_LIMIT_MINOR", 10000))


def session_snapshot(cs: ChargingSession) -> dict[str, Any]:
    """What the audit log keeps of a session before and after an action (money in minor units)."""
    return {
        "state": cs.state.value, "currency": cs.currency, "hold": cs.hold_minor, "captured": cs.captured_minor,
        "refunded": cs.refunded_minor, "failure_code": cs.failure_code,
        "card": cs.card_payment.state.value if cs.payment_kind is PaymentKind.CARD and cs.card_payment is not None else None,
    }


def _refuse(s: Session, actor, audit: dict, status: int, code: str, message: str, *, outcome: str = "refused",
            after: dict | None = None, retry: bool = False) -> ActionRefused:
    """Roll back what the attempt left, record it (``refused`` or ``failed``) in its own transaction, and return the error to raise."""
    s.rollback()
    record(s, **audit, after={**(after or {}), "error": code}, outcome=outcome, actor=actor)
    s.commit()
    return ActionRefused(status, code, message, retry=retry)


def _request_approval(s: Session, actor, *, audit: dict, amount: Money, params: dict, limit: int) -> Done:
    """Keep a money action over the limit for a second person: the request and its audit entry (``requested``), committed."""
    req = ApprovalRequest(
        operator_id=audit["operator_id"], action=audit["action"], object_type=audit["object_type"], object_id=str(audit["object_id"]),
        params_json=json.dumps(params, sort_keys=True), amount_minor=amount.amount, currency=amount.currency, reason=audit["reason"],
        state=ApprovalState.PENDING, requested_by_id=actor.id, requested_at=_now(),
    )
    s.add(req)
    s.flush()
    record(s, **audit, after={"approval_id": req.id, "amount": amount.amount, "currency": amount.currency, "limit": limit},
           outcome="requested", actor=actor)
    s.commit()
    values = dict(amount=_fmt(amount), limit=_fmt(Money(limit, amount.currency)), id=req.id)
    if req.action == "refund":
        message = _("A refund of %(amount)s is above the limit of %(limit)s: request #%(id)s waits for a second person's approval.", **values)
    else:
        message = _("A goodwill credit of %(amount)s is above the limit of %(limit)s: request #%(id)s waits for a second person's approval.",
                    **values)
    return Done(message, approval=req)


# --------------------------------------------------------------------------- 1. refunds


def refundable(cs: ChargingSession) -> Money | None:
    """What can still be given back of a session's payment; None when it is not a paid, completed session."""
    if cs.state is not SessionState.COMPLETED or not cs.captured_minor:
        return None
    return Money(cs.captured_minor - cs.refunded_minor, cs.currency)


def _refund_state(s: Session, cs: ChargingSession, refund_key: str) -> str | None:
    """What became of the refund of this key: None (never made), ``done``, ``pending`` (reserved, not sent yet) or ``failed``."""
    full = f"session:{cs.id}:refund:{refund_key}"
    if s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == f"{full}:book")) is not None:
        return "done"  # a wallet refund is booked at once
    rf = s.scalar(select(CardRefund).where(CardRefund.idempotency_key == full))
    if rf is None:
        return None
    return rf.status if rf.status in ("pending", "failed") else "done"


def _refunded(s: Session, cs: ChargingSession, amount: Money) -> str:
    """What the person is told after a refund: the credit note, and where it was emailed."""
    from webapp.notifications.models import SentEmail

    note = s.scalar(select(Document).where(Document.source == f"session:{cs.id}", Document.kind == DocumentKind.CREDIT_NOTE)
                    .order_by(Document.id.desc()).limit(1))
    if note is None:
        return _("%(amount)s refunded.", amount=_fmt(amount))
    to = s.scalar(select(SentEmail.to).where(SentEmail.reference == f"document:{note.id}").limit(1))
    if to:
        return _("%(amount)s refunded; credit note %(number)s is emailed to %(email)s.", amount=_fmt(amount), number=note.number, email=to)
    return _("%(amount)s refunded; credit note %(number)s was issued (the customer has turned receipt emails off).",
             amount=_fmt(amount), number=note.number)


def refund(s: Session, actor, provider, cs: ChargingSession, amount: Money, *, reason: str, key: str, now: dt.datetime,
           approval: ApprovalRequest | None = None) -> Done:
    """Give back ``amount`` of a completed session (credit note, settlement reversal, wallet or card refund, the credit-note email).

    Over the operator's limit (and not already approved) it becomes an
    approval request instead. ``key`` (the form's) names the refund in
    ``refund_session``: the same key never refunds twice, and a card refund
    reserved while the provider did not answer is sent by the same key
    again. The customer's credit-note email is sent by the credit note
    itself (``webapp.notifications.emails``: every issued document with an
    address is emailed with its PDF, unless the account turned receipts off).
    """
    op_id = session_operator(cs)
    before = session_snapshot(cs)
    audit = dict(action="refund", object_type="session", object_id=cs.id, operator_id=op_id, reason=reason, before=before)
    refund_key = f"support:{key}"
    state = _refund_state(s, cs, refund_key)
    if state == "done":
        s.commit()
        return Done(_("This refund was already made."))
    if state == "failed":
        raise _refuse(s, actor, audit, 409, "provider_refused", _("The payment provider refused this refund. Reload the page to try again."))
    if state is None:
        left = refundable(cs)
        if left is None:
            raise _refuse(s, actor, audit, 409, "not_refundable", _("Only a paid, completed session can be refunded."))
        if amount.currency != cs.currency:
            raise _refuse(s, actor, audit, 400, "wrong_currency", _("The refund must be in %(currency)s.", currency=cs.currency))
        if amount.amount <= 0:
            raise _refuse(s, actor, audit, 400, "not_positive", _("The amount to refund must be more than zero."))
        if amount > left:
            raise _refuse(s, actor, audit, 400, "exceeds_refundable", _("At most %(left)s can still be refunded.", left=_fmt(left)))
        limit = approval_limit(s, op_id)
        if approval is None and amount.amount > limit:
            return _request_approval(s, actor, audit=audit, amount=amount, params={"key": key, "amount": amount.amount}, limit=limit)
        after = {**before, "refunded": cs.refunded_minor + amount.amount, "refund": amount.amount}
        if approval is not None:
            after["approval_id"] = approval.id
        # Added now, committed by refund_session's first commit: with the wallet's booking, or with the card refund's reservation.
        record(s, **audit, after=after, actor=actor)
    session_id = cs.id
    try:
        charging.refund_session(s, provider, session_id, amount, reason=reason, key=refund_key, now=now)
    except charging.ChargingError as e:  # refund_session rolled back (the entry with it)
        status = 409 if e.code == "not_refundable" else 400
        msg = _("At most %(left)s can still be refunded.", left=_fmt(e.params["left"])) if e.code == "refund_exceeds_captured" \
            else _("This session cannot be refunded (%(code)s).", code=e.code)
        raise _refuse(s, actor, audit, status, e.code, msg) from None
    except InvalidRequest:  # the provider refused the card refund: marked failed, its reservation given back (to commit)
        s.commit()
        raise _refuse(s, actor, audit, 502, "provider_refused",
                      _("The payment provider refused this refund; nothing was refunded."), outcome="failed") from None
    except ProviderError:  # no answer: the refund stays reserved; sending the same form again sends it
        s.rollback()
        raise _refuse(s, actor, audit, 503, "provider_unavailable",
                      _("The payment provider did not answer. The refund is reserved: send the form again in a minute to finish it."),
                      outcome="failed", retry=True) from None
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    if state == "pending":  # the reserved refund went out now
        record(s, **audit, after={**session_snapshot(cs), "refund": amount.amount, "sent_again": True}, actor=actor)
        s.commit()
    return Done(_refunded(s, cs, amount))


# --------------------------------------------------------------------------- 2. a stuck hold


def hold_stuck(s: Session, cs: ChargingSession) -> bool:
    """Whether a session that never charged still holds money (its release did not reach the provider, or never ran)."""
    if cs.state not in charging.NOT_CHARGED:
        return False
    if cs.payment_kind is PaymentKind.CARD:
        return cs.card_payment is not None and cs.card_payment.state in HOLD_OPEN
    placed = s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == f"{cs.key('wallet')}:hold"))
    settled = s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == f"{cs.key('wallet')}:settle"))
    return placed is not None and settled is None


def release_hold(s: Session, actor, provider, cs: ChargingSession, *, reason: str, now: dt.datetime) -> Done:
    """Give back the hold of a session that ended without charging but still holds money (``release`` / ``release_leftover``)."""
    before = session_snapshot(cs)
    audit = dict(action="release_hold", object_type="session", object_id=cs.id, operator_id=session_operator(cs), reason=reason, before=before)
    if cs.state in ACTIVE_STATES:
        raise _refuse(s, actor, audit, 409, "session_active",
                      _("This session is still under way: stop it instead; its hold is released when it ends."))
    if cs.state is SessionState.REVIEW:
        raise _refuse(s, actor, audit, 409, "in_review", _("This session is waiting for review: settle, release or write it off there."))
    if not hold_stuck(s, cs):
        raise _refuse(s, actor, audit, 409, "nothing_held",
                      _("Nothing is held for this session any more: billing or the end of the session released it."))
    session_id = cs.id
    try:
        if cs.payment_kind is PaymentKind.CARD:
            charging.release_leftover(s, provider, session_id)  # commits around the provider call
        else:
            charging.release(s, provider, cs)
    except ProviderError:
        raise _refuse(s, actor, audit, 503, "provider_unavailable",
                      _("The payment provider did not answer; nothing was released. Try again in a minute."), outcome="failed") from None
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    record(s, **audit, after=session_snapshot(cs), actor=actor)
    s.commit()
    return Done(_("The hold of %(amount)s was released.", amount=_fmt(cs.hold)))


# --------------------------------------------------------------------------- 3. stop and unlock


def stop_session(s: Session, actor, gateway, provider, cs: ChargingSession, *, reason: str, now: dt.datetime) -> Done:
    """Stop a session remotely (``request_stop(by="support")``): before charging it is cancelled and released, while charging RemoteStop."""
    before = session_snapshot(cs)
    audit = dict(action="stop_session", object_type="session", object_id=cs.id, operator_id=session_operator(cs), reason=reason, before=before)
    if cs.state is SessionState.FINISHING:
        raise _refuse(s, actor, audit, 409, "already_stopped", _("Charging has already stopped; the session is billed when the car leaves."))
    if cs.state not in ACTIVE_STATES:
        raise _refuse(s, actor, audit, 409, "not_stoppable", _("This session has already ended."))
    session_id = cs.id
    try:
        cs = charging.request_stop(s, gateway, provider, cs, by="support", now=now)
    except charging.ChargingError as e:
        cs = s.get(ChargingSession, session_id, populate_existing=True)
        messages = {
            "charger_offline": (409, _("The charger is offline and cannot be stopped remotely. Charging stops when the cable is "
                                       "unplugged; the session is billed from the charger's report.")),
            "stop_rejected": (409, _("The charger refused to stop. Ask the driver to end charging from the car or unplug the cable.")),
            "charger_not_answering": (504, _("The charger did not answer in time. Try again, or ask the driver to unplug the cable.")),
            "not_stoppable": (409, _("This session has already ended.")),
        }
        status, msg = messages.get(e.code, (409, _("The session could not be stopped (%(code)s).", code=e.code)))
        raise _refuse(s, actor, audit, status, e.code, msg, outcome="refused" if e.code == "not_stoppable" else "failed",
                      after=session_snapshot(cs)) from None
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    record(s, **audit, after={**session_snapshot(cs), "stop_requested_by": cs.stop_requested_by}, actor=actor)
    s.commit()
    if cs.state is SessionState.CANCELLED:
        return Done(_("The session was cancelled before charging; its hold was released."))
    return Done(_("The charger was told to stop; the session is billed when it reports the stop."))


def unlock_connector(s: Session, actor, gateway, cs: ChargingSession, *, reason: str, key: str) -> Done:
    """Send OCPP UnlockConnector for the session's connector (a cable stuck after charging); once per form key."""
    connector = cs.connector
    before = {**session_snapshot(cs), "connector": connector.connector_code, "connector_status": connector.status}
    audit = dict(action="unlock_connector", object_type="session", object_id=cs.id, operator_id=session_operator(cs), reason=reason,
                 before=before)
    if cs.state is SessionState.CHARGING:
        raise _refuse(s, actor, audit, 409, "charging", _("The car is charging: stop the session first, then unlock the connector."))
    other = s.scalar(select(ChargingSession.id).where(ChargingSession.active_connector_id == connector.id, ChargingSession.id != cs.id,
                                                      ChargingSession.state == SessionState.CHARGING))
    if other is not None:  # unlocking would cut another driver's charge
        raise _refuse(s, actor, audit, 409, "connector_in_use",
                      _("Connector %(code)s is charging another car now (session %(id)s): it cannot be unlocked.",
                        code=connector.connector_code, id=other))
    result = gateway.call(s, connector.charger, "UnlockConnector", {"connector_id": connector.number}, key=f"support:unlock:{key}",
                          session_id=cs.id, requested_by=f"support:{actor.id}")
    answer = (result.response or {}).get("status") if isinstance(result.response, dict) else None
    after = {"connector": connector.connector_code, "command": result.status.value, "answer": answer}
    if result.status is CommandStatus.ACCEPTED:
        record(s, **audit, after=after, actor=actor)
        s.commit()
        return Done(_("Connector %(code)s was unlocked.", code=connector.connector_code))
    failures = {
        CommandStatus.NOT_CONNECTED: (409, _("The charger is offline: the connector cannot be unlocked remotely. Someone on site must "
                                             "release it (or the charger must come back online).")),
        CommandStatus.REJECTED: (409, _("The charger refused to unlock the connector (answer: %(answer)s).", answer=answer or "—")),
        CommandStatus.TIMEOUT: (504, _("The charger did not answer in time. Try again in a moment.")),
    }
    status, msg = failures.get(result.status, (502, _("The charger or its gateway reported an error. Try again in a moment.")))
    raise _refuse(s, actor, audit, status, f"unlock_{result.status.value}", msg, outcome="failed", after=after)


# --------------------------------------------------------------------------- 4. resend a receipt


def resend_receipt(s: Session, actor, doc: Document, *, to: str | None, reason: str, key: str) -> Done:
    """Email a document again (its PDF attached) through the outbox, to its own address or a corrected one; once per form key."""
    from webapp.notifications.outbox import schedule

    address = (to or "").strip().lower() or (doc.email or "").strip().lower()
    audit = dict(action="resend_receipt", object_type="document", object_id=doc.number, operator_id=document_operator(doc),
                 reason=reason, before={"email": doc.email, "kind": doc.kind.value, "total": doc.total_minor, "currency": doc.currency})
    if not address:
        raise _refuse(s, actor, audit, 400, "no_address", _("This document has no email address: enter the one to send it to."))
    email_id = schedule(s, to=address, template="receipt", reference=f"document:{doc.id}", key=f"document:{doc.id}:resend:{key}")
    if email_id is None:  # this form was sent before
        s.commit()
        return Done(_("%(number)s was already sent again.", number=doc.number))
    record(s, **audit, after={"sent_to": address, "email_id": email_id}, actor=actor)
    s.commit()
    return Done(_("%(number)s is on its way to %(email)s.", number=doc.number, email=address))


# --------------------------------------------------------------------------- 5. goodwill credit on a meter


def goodwill_credit(s: Session, actor, meter: Meter, amount: Money, *, reason: str, key: str, now: dt.datetime,
                    approval: ApprovalRequest | None = None) -> Done:
    """Credit a prepaid meter as goodwill: ``goodwill (operator) → meter wallet``, once per key; reconnects a meter cut for lack of money."""
    from webapp.meters import relay, topup

    op_id = meter_operator(meter)
    audit = dict(action="goodwill_credit", object_type="meter", object_id=meter.meter_code, operator_id=op_id, reason=reason)
    ledger_key = f"support:goodwill:{key}"
    if s.scalar(select(JournalEntry.id).where(JournalEntry.idempotency_key == ledger_key)) is not None:
        s.commit()
        return Done(_("This credit was already given."))
    code = topup.refusal(meter)
    if code is not None:
        raise _refuse(s, actor, {**audit, "before": {"relay": meter.relay_state}}, 409, code,
                      _("This meter has no prepaid balance to credit (%(code)s).", code=code))
    currency = topup.meter_currency(meter)
    balance = topup.meter_balance(s, meter)
    audit["before"] = {"balance": balance.amount, "currency": currency, "relay": meter.relay_state}
    if amount.currency != currency:
        raise _refuse(s, actor, audit, 400, "wrong_currency", _("The credit must be in %(currency)s.", currency=currency))
    if amount.amount <= 0:
        raise _refuse(s, actor, audit, 400, "not_positive", _("The credit must be more than zero."))
    limit = approval_limit(s, op_id)
    if approval is None and amount.amount > limit:
        return _request_approval(s, actor, audit=audit, amount=amount, params={"key": key, "amount": amount.amount}, limit=limit)
    entry_id = transfer(s, idempotency_key=ledger_key, description="Goodwill credit from support", reference=topup.meter_ref(meter),
                        debit=get_account(s, AccountKind.GOODWILL, currency, f"operator:{op_id}"), credit=topup.meter_wallet(s, meter),
                        amount=amount)
    relay.balance_changed(s, meter, now)  # above zero: a meter cut for lack of money is reconnected, as after a paid top-up
    s.flush()
    after = {"balance": topup.meter_balance(s, meter).amount, "currency": currency, "credit": amount.amount, "entry_id": entry_id,
             "relay": s.get(Meter, meter.id).relay_state}
    if approval is not None:
        after["approval_id"] = approval.id
    record(s, **audit, after=after, actor=actor)
    s.commit()
    return Done(_("%(amount)s credited to meter %(code)s.", amount=_fmt(amount), code=meter.meter_code))


# --------------------------------------------------------------------------- 6. a session in review


DECISIONS = {"settle": _l("Settle: charge it as priced"), "release": _l("Release: charge nothing, give the hold back"),
             "write_off": _l("Write off: nothing can be collected, record the cost as lost")}


def resolve_review(s: Session, actor, provider, cs: ChargingSession, decision: str, *, reason: str, now: dt.datetime) -> Done:
    """Finish a session in ``review``: settle, release or write off (``webapp.charging.service.resolve_review``)."""
    before = session_snapshot(cs)
    audit = dict(action="resolve_review", object_type="session", object_id=cs.id, operator_id=session_operator(cs), reason=reason,
                 before=before)
    if cs.state is not SessionState.REVIEW:
        raise _refuse(s, actor, audit, 409, "not_in_review", _("This session is not waiting for review."))
    session_id = cs.id
    try:
        cs = charging.resolve_review(s, provider, session_id, decision, now=now)
    except charging.ChargingError as e:
        messages = {
            "not_in_review": (409, _("This session is not waiting for review.")),
            "not_priceable": (409, _("This session cannot be priced from its readings: release it or write it off.")),
            "already_captured": (409, _("The card payment was already captured: settle the session instead.")),
            "invalid_decision": (400, _("Choose settle, release or write off.")),
        }
        status, msg = messages.get(e.code, (409, e.code))
        raise _refuse(s, actor, audit, status, e.code, msg) from None
    except ProviderError:
        s.rollback()
        cs = s.get(ChargingSession, session_id, populate_existing=True)
        retried = cs.state is SessionState.FINISHING  # settle: the worker captures it when the provider answers
        raise _refuse(s, actor, audit, 503, "provider_unavailable",
                      _("The payment provider did not answer; the capture will be tried again automatically.") if retried
                      else _("The payment provider did not answer; the session is still in review. Try again in a minute."),
                      outcome="failed", after={**session_snapshot(cs), "decision": decision}) from None
    cs = s.get(ChargingSession, session_id, populate_existing=True)
    after = {**session_snapshot(cs), "decision": decision}
    if cs.state is SessionState.REVIEW:  # the capture was refused again
        raise _refuse(s, actor, audit, 409, cs.failure_code or "capture_failed",
                      _("The capture was refused again; the session is back in review. Release it or write it off."),
                      outcome="failed", after=after)
    record(s, **audit, after=after, actor=actor)
    s.commit()
    if decision == "settle":
        if cs.state is SessionState.COMPLETED:
            return Done(_("Settled: %(amount)s charged.", amount=_fmt(Money(cs.captured_minor or 0, cs.currency))))
        return Done(_("Sent for billing; the capture is being made."))
    if decision == "write_off":
        return Done(_("Written off: nothing was charged and the hold was released."))
    return Done(_("Released: nothing was charged and the hold was given back."))


# --------------------------------------------------------------------------- 7. approvals


def _carry_out(s: Session, actor, provider, req: ApprovalRequest, now: dt.datetime) -> Done:
    """Run the action an approval request holds, as approved (the requester's reason and key)."""
    params = json.loads(req.params_json)
    amount = Money(req.amount_minor, req.currency)
    if req.action == "refund":
        cs = s.get(ChargingSession, int(req.object_id), populate_existing=True)
        if cs is None:
            raise ActionRefused(404, "gone", _("The session is gone."))
        return refund(s, actor, provider, cs, amount, reason=req.reason, key=params["key"], now=now, approval=req)
    if req.action == "goodwill_credit":
        meter = s.scalar(select(Meter).where(Meter.meter_code == req.object_id))
        if meter is None:
            raise ActionRefused(404, "gone", _("The meter is gone."))
        return goodwill_credit(s, actor, meter, amount, reason=req.reason, key=params["key"], now=now, approval=req)
    raise ActionRefused(400, "unknown_action", _("This request cannot be carried out."))


def _decide(s: Session, req: ApprovalRequest, actor, now: dt.datetime, **values) -> bool:
    """Take the decision on a pending request (one conditional UPDATE: two people at once decide once); committed."""
    res = s.execute(
        update(ApprovalRequest)
        .where(ApprovalRequest.id == req.id, ApprovalRequest.state == ApprovalState.PENDING, ApprovalRequest.decided_by_id.is_(None))
        .values(decided_by_id=actor.id, decided_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def _approval_audit(req: ApprovalRequest, action: str, reason: str) -> dict:
    return dict(action=action, object_type="approval", object_id=req.id, operator_id=req.operator_id, reason=reason,
                before={"state": "pending", "action": req.action, "object": f"{req.object_type}:{req.object_id}",
                        "amount": req.amount_minor, "currency": req.currency, "requested_by": req.requested_by_id})


def approve(s: Session, actor, provider, req: ApprovalRequest, *, note: str, now: dt.datetime) -> Done:
    """A second person approves: the action runs now; the request ends approved (with the result) or failed (with why)."""
    audit = _approval_audit(req, "approve", note or req.reason)
    if req.requested_by_id == actor.id:
        raise _refuse(s, actor, audit, 403, "own_request", _("You asked for this yourself: another person must approve it."))
    if not _decide(s, req, actor, now):
        raise _refuse(s, actor, audit, 409, "already_decided", _("This request was already decided."))
    s.commit()
    req_id = req.id
    try:
        done = _carry_out(s, actor, provider, req, now)
        state, result = ApprovalState.APPROVED, done.message
    except ActionRefused as e:
        done, state, result = None, ApprovalState.FAILED, e.message
    except Exception:
        s.rollback()
        s.execute(update(ApprovalRequest).where(ApprovalRequest.id == req_id).values(state=ApprovalState.FAILED, result="unexpected error"))
        s.commit()
        raise
    req = s.get(ApprovalRequest, req_id, populate_existing=True)
    req.state, req.result = state, result
    record(s, **audit, after={"state": state.value, "result": result}, outcome="done" if done else "failed", actor=actor)
    s.commit()
    if done is None:
        return Done(_("Request #%(id)s approved, but it could not be carried out: %(why)s", id=req_id, why=result), category="error")
    return Done(_("Request #%(id)s approved: %(result)s", id=req_id, result=result))


def reject(s: Session, actor, req: ApprovalRequest, *, reason: str, now: dt.datetime) -> Done:
    """Turn a request down (nothing moves); the requester may withdraw their own this way."""
    audit = _approval_audit(req, "reject", reason)
    if not _decide(s, req, actor, now, state=ApprovalState.REJECTED, result=reason[:2000]):
        raise _refuse(s, actor, audit, 409, "already_decided", _("This request was already decided."))
    record(s, **audit, after={"state": ApprovalState.REJECTED.value}, actor=actor)
    s.commit()
    return Done(_("Request #%(id)s rejected; nothing was done.", id=req.id))


# =========================================================================== the web side


class ActionForm(FlaskForm):
    """Every action form: its one-time key and a reason."""

    key = HiddenField(validators=[DataRequired(message=_l("This form has expired: reload the page and try again.")),
                                  Regexp(KEY_PATTERN, message=_l("This form has expired: reload the page and try again."))])
    reason = TextAreaField(_l("Reason"), validators=[DataRequired(message=_l("Say why: the reason is kept in the audit log.")),
                                                     Length(max=500)],
                           description=_l("Kept in the audit log with your name."))


class RefundForm(ActionForm):
    amount = StringField(_l("Amount to refund"), validators=[DataRequired(message=_l("Enter the amount to refund."))])


class GoodwillForm(ActionForm):
    amount = StringField(_l("Goodwill credit"), validators=[DataRequired(message=_l("Enter the amount to credit."))])


class ReviewForm(ActionForm):
    decision = RadioField(_l("Decision"), choices=[SelectChoice(k, label) for k, label in DECISIONS.items()],
                          validators=[DataRequired(message=_l("Choose a decision."))])


class ResendForm(ActionForm):
    email = StringField(_l("Send to"), validators=[Optional(), Email(message=_l("Enter an email address.")), Length(max=254)],
                        description=_l("Empty: the address on the document."))


class ApproveForm(FlaskForm):
    note = TextAreaField(_l("Note (optional)"), validators=[Optional(), Length(max=500)])


class RejectForm(FlaskForm):
    reason = TextAreaField(_l("Why not"), validators=[DataRequired(message=_l("Say why: the reason is kept in the audit log.")),
                                                      Length(max=500)])


FORMS: dict[str, type[ActionForm]] = {
    "refund": RefundForm, "release": ActionForm, "stop": ActionForm, "unlock": ActionForm, "review": ReviewForm,
    "resend": ResendForm, "goodwill": GoodwillForm,
}


def _form(action: str, **kw) -> ActionForm:
    """The form of ``action`` (its fields prefixed by the action: several forms share a page)."""
    return FORMS[action](prefix=action, **kw)


def _fresh(action: str) -> ActionForm:
    form = _form(action, formdata=None)
    form.key.data = new_key()
    return form


def _amount_text(money: Money) -> str:
    """An amount as a person would type it in the page's language, without grouping ("12.34", "12,34")."""
    from babel.numbers import format_decimal

    exp = exponent(money.currency)
    return format_decimal(money.to_decimal(), format="0" + ("." + "0" * exp if exp else ""), locale=_locale())


def _parse_amount(form, currency: str) -> Money | None:
    """The form's amount in ``currency`` (the page's language decides the decimal mark), or None with the error at the field."""
    try:
        return parse_money(form.amount.data or "", currency, _locale())
    except MoneyError as e:
        messages = {
            "empty": _("Enter an amount."),
            "negative": _("The amount cannot be negative."),
            "too_many_decimals": _("%(currency)s amounts have at most %(n)s decimals.", currency=currency, n=exponent(currency)),
        }
        form.amount.errors = [*form.amount.errors, messages.get(e.code, _("Not an amount: type it like %(example)s.",
                                                                            example=_amount_text(Money(1250, currency))))]
        return None


# --------------------------------------------------------------------------- what the partials draw


@dataclass
class Actions:
    """What an object's action partial draws: the forms that apply now (None: not now), and an error to show."""

    forms: dict[str, ActionForm | None] = field(default_factory=dict)
    error: dict | None = None  # {"action", "message"} after a refused attempt
    pending: list[ApprovalRequest] = field(default_factory=list)
    refundable: Money | None = None
    limit: Money | None = None
    balance: Money | None = None

    def __getattr__(self, name: str):
        forms = self.__dict__.get("forms", {})
        if name in forms:
            return forms[name]
        raise AttributeError(name)


def _with_failed(actions: Actions, object_ref: str) -> Actions:
    failed = g.get("support_failed")
    if failed and failed["object"] == object_ref:
        actions.forms[failed["action"]] = failed["form"]
        if failed.get("message"):
            actions.error = {"action": failed["action"], "message": failed["message"]}
    return actions


def _pending(s: Session, object_type: str, object_id: str) -> list[ApprovalRequest]:
    return list(s.scalars(select(ApprovalRequest).where(ApprovalRequest.object_type == object_type, ApprovalRequest.object_id == object_id,
                                                        ApprovalRequest.state == ApprovalState.PENDING).order_by(ApprovalRequest.id)))


@bp.app_template_filter("support_money")
def support_money(value: tuple[int | None, str]) -> str:
    """``{{ (amount_minor, currency)|support_money }}``: minor units formatted for the page's language."""
    minor, currency = value
    return _fmt(Money(minor or 0, currency))


@bp.app_template_global("support_actions")
def support_actions(obj) -> Actions:
    """``{% set a = support_actions(cs) %}``: the action forms for a session, a document or a meter (see the partials)."""
    s = db_session()
    if isinstance(obj, ChargingSession):
        left = refundable(obj)
        forms = {
            "refund": _fresh("refund") if left and left.amount > 0 else None,
            "release": _fresh("release") if hold_stuck(s, obj) else None,
            "stop": _fresh("stop") if obj.state in ACTIVE_STATES and obj.state is not SessionState.FINISHING else None,
            "unlock": _fresh("unlock") if obj.state is not SessionState.CHARGING else None,
            "review": _fresh("review") if obj.state is SessionState.REVIEW else None,
        }
        if forms["refund"] is not None:
            forms["refund"].amount.data = _amount_text(left)
        a = Actions(forms=forms, pending=_pending(s, "session", str(obj.id)), refundable=left,
                    limit=Money(approval_limit(s, session_operator(obj)), obj.currency))
        return _with_failed(a, f"session:{obj.id}")
    if isinstance(obj, Document):
        a = Actions(forms={"resend": _fresh("resend")})
        return _with_failed(a, f"document:{obj.number}")
    if isinstance(obj, Meter):
        from webapp.meters import topup

        credit = topup.refusal(obj) is None
        a = Actions(forms={"goodwill": _fresh("goodwill") if credit else None}, pending=_pending(s, "meter", obj.meter_code),
                    limit=Money(approval_limit(s, meter_operator(obj)), topup.meter_currency(obj)),
                    balance=topup.meter_balance(s, obj) if credit else None)
        return _with_failed(a, f"meter:{obj.meter_code}")
    return Actions()


# --------------------------------------------------------------------------- one form, once


@dataclass(frozen=True)
class _Claim:
    """What the first POST of a form key left: its HTTP status (None while it runs) and its message."""

    status: int | None
    message: str | None


def _claim_key(action: str, key: str, ref: str) -> str:
    return f"{action}:{ref}:{key}"[:255]


def _claim(s: Session, action: str, key: str, ref: str) -> _Claim | None:
    """Claim the form's key for this action on this object (committed); None when claimed now, else the first claim's outcome."""
    s.commit()  # end the request's reads; the claim is a transaction of its own
    fingerprint = hashlib.sha256(f"{action}\n{ref}".encode()).hexdigest()
    t = IdempotencyRecord.__table__
    # Old claims go: a page kept open longer is still safe, as every action is idempotent by its key on its own.
    s.execute(t.delete().where(t.c.scope == CLAIM_SCOPE, t.c.created_at < utcnow() - CLAIM_KEEP))
    try:
        s.add(IdempotencyRecord(scope=CLAIM_SCOPE, key=_claim_key(action, key, ref), method="POST", path=ref[:255], request_hash=fingerprint))
        s.commit()
        return None
    except IntegrityError:
        s.rollback()
    return _first_outcome(s, _claim_key(action, key, ref))


def _first_outcome(s: Session, claim_key: str) -> _Claim | None:
    """The first POST's outcome, waiting (briefly) while it still runs: a double click shows it, not "try again"."""
    t = IdempotencyRecord.__table__
    q = select(t.c.status_code, t.c.response_body).where(t.c.scope == CLAIM_SCOPE, t.c.key == claim_key)
    pause = threading.Event()
    waited = 0.0
    while True:
        # Plain rows read in a read-only transaction, ended at once: the waiting request holds no lock the first one needs.
        row = read_only(s).execute(q).first()
        s.commit()
        if row is None or row.status_code is not None or waited >= CLAIM_WAIT_S:
            return None if row is None else _Claim(row.status_code, row.response_body)
        pause.wait(0.05)
        waited += 0.05


def _settle_claim(s: Session, action: str, key: str, ref: str, status: int, message: str, *, free: bool = False) -> None:
    """Store the outcome on the claim (a repeated form answers with it), or free the key for a retry."""
    t = IdempotencyRecord.__table__
    where = (t.c.scope == CLAIM_SCOPE, t.c.key == _claim_key(action, key, ref))
    if free:
        s.execute(t.delete().where(*where))
    else:
        s.execute(t.update().where(*where).values(status_code=status, response_body=message))
    s.commit()


def _object_path(ref: str) -> str:
    """The console page of an object reference (``session:7``, ``document:VP-2026-000001``, ``meter:M-1``)."""
    kind, _sep, ident = ref.partition(":")
    return f"{bp.url_prefix}/{ {'session': 'sessions', 'document': 'documents', 'meter': 'meters'}[kind] }/{ident}"


_FALLBACK = """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block content %}
<h1>{{ title }}</h1>
{% include "support/_nav.html" %}
{% include partial %}
{% endblock %}"""


def _object_page(ref: str, obj, status: int):
    """The object's console page again (the form with its error in place), answering ``status``.

    The page is the console's own view (``webapp.support.console``) when it
    is there; otherwise a bare page with this object's actions.
    """
    path = _object_path(ref)
    try:
        endpoint, args = current_app.url_map.bind_to_environ(request.environ).match(path, method="GET")
    except HTTPException:
        endpoint, args = None, {}
    if endpoint is not None and endpoint in current_app.view_functions:
        resp = make_response(current_app.view_functions[endpoint](**args))
    else:
        kind = ref.partition(":")[0]
        partial = {"session": "support/_session_actions.html", "document": "support/_document_actions.html",
                   "meter": "support/_meter_actions.html"}[kind]
        title = {"session": _("Session %(id)s", id=getattr(obj, "id", "")), "document": getattr(obj, "number", ""),
                 "meter": _("Meter %(code)s", code=getattr(obj, "meter_code", ""))}[kind]
        resp = make_response(render_template_string(_FALLBACK, title=title, partial=partial, cs=obj, doc=obj, meter=obj))
    resp.status_code = status
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _run(action: str, ref: str, obj, form: ActionForm, work: Callable[[Any], Done], prepare: Callable[[], Any] | None = None):
    """Validate (400 at the fields), claim the key, run ``work``, and answer: a redirect with the outcome, or the page with the refusal.

    ``prepare`` reads what the fields hold (an amount) and returns it for
    ``work``, or None with the error at the field: a typing mistake is
    answered 400 before the form's key is claimed, so the corrected form goes.
    """
    s = db_session()
    prepared = None
    if form.validate() and prepare is not None:
        prepared = prepare()
    if form.errors:
        g.support_failed = {"object": ref, "action": action, "form": form, "message": None}
        return _object_page(ref, obj, 400)
    key = form.key.data
    first = _claim(s, action, key, ref)
    if first is not None:  # the same form again: answer with the first one's outcome, do nothing
        if first.status is None:
            g.support_failed = {"object": ref, "action": action, "form": form,
                                "message": _("This is still being carried out. Reload the page in a moment to see the outcome.")}
            return _object_page(ref, obj, 409)
        if first.status >= 400:
            form.key.data = new_key()
            g.support_failed = {"object": ref, "action": action, "form": form, "message": first.message}
            return _object_page(ref, obj, first.status)
        flash(first.message or _("Done."))
        return redirect(_object_path(ref), 303)
    try:
        done = work(prepared)
    except ActionRefused as e:
        _settle_claim(s, action, key, ref, e.status, e.message, free=e.retry)
        if not e.retry:
            form.key.data = new_key()  # a corrected form is a new attempt
        g.support_failed = {"object": ref, "action": action, "form": form, "message": e.message}
        return _object_page(ref, obj, e.status)
    except Exception:
        s.rollback()
        _settle_claim(s, action, key, ref, 500, "", free=True)  # nothing known happened: the same form may be sent again
        raise
    _settle_claim(s, action, key, ref, 202 if done.approval is not None else 200, done.message)
    flash(done.message, "warning" if done.approval is not None else done.category)
    return redirect(_object_path(ref), 303)


def _actor():
    return current_user._get_current_object()


def _visible_session(session_id: int) -> ChargingSession:
    cs = db_session().get(ChargingSession, session_id)
    if cs is None:
        abort(404)
    require_visible(session_operator(cs))
    return cs


def _provider():
    return current_app.extensions.get("payment_provider")


# --------------------------------------------------------------------------- views: a session


@bp.route("/sessions/<int(max=2147483647):session_id>/refund", methods=["POST"], endpoint="action_refund")
def refund_view(session_id: int):
    """Refund all or part of a session (an amount typed in the page's language, at most what is left)."""
    cs = _visible_session(session_id)
    form = _form("refund")
    return _run("refund", f"session:{cs.id}", cs, form, prepare=lambda: _parse_amount(form, cs.currency),
                work=lambda amount: refund(db_session(), _actor(), _provider(), cs, amount, reason=form.reason.data.strip(),
                                           key=form.key.data, now=_now()))


@bp.route("/sessions/<int(max=2147483647):session_id>/release-hold", methods=["POST"], endpoint="action_release_hold")
def release_hold_view(session_id: int):
    """Release the hold of a session that ended without charging but still holds money."""
    cs = _visible_session(session_id)
    form = _form("release")
    return _run("release", f"session:{cs.id}", cs, form,
                lambda _unused: release_hold(db_session(), _actor(), _provider(), cs, reason=form.reason.data.strip(), now=_now()))


@bp.route("/sessions/<int(max=2147483647):session_id>/stop", methods=["POST"], endpoint="action_stop")
def stop_view(session_id: int):
    """Stop a session remotely (cancel it before charging)."""
    cs = _visible_session(session_id)
    form = _form("stop")
    gateway = current_app.extensions["charger_gateway"]
    return _run("stop", f"session:{cs.id}", cs, form,
                lambda _unused: stop_session(db_session(), _actor(), gateway, _provider(), cs, reason=form.reason.data.strip(), now=_now()))


@bp.route("/sessions/<int(max=2147483647):session_id>/unlock", methods=["POST"], endpoint="action_unlock")
def unlock_view(session_id: int):
    """Unlock the session's connector (OCPP UnlockConnector through the gateway)."""
    cs = _visible_session(session_id)
    form = _form("unlock")
    gateway = current_app.extensions["charger_gateway"]
    return _run("unlock", f"session:{cs.id}", cs, form,
                lambda _unused: unlock_connector(db_session(), _actor(), gateway, cs, reason=form.reason.data.strip(), key=form.key.data))


@bp.route("/sessions/<int(max=2147483647):session_id>/review", methods=["POST"], endpoint="action_review")
def review_view(session_id: int):
    """Settle, release or write off a session in review."""
    cs = _visible_session(session_id)
    form = _form("review")
    return _run("review", f"session:{cs.id}", cs, form,
                lambda _unused: resolve_review(db_session(), _actor(), _provider(), cs, form.decision.data, reason=form.reason.data.strip(),
                                       now=_now()))


# --------------------------------------------------------------------------- views: a document, a meter


@bp.route("/documents/<string(maxlength=32):number>/resend", methods=["POST"], endpoint="action_resend")
def resend_view(number: str):
    """Email a receipt, invoice or credit note again (to its address or a corrected one)."""
    doc = db_session().scalar(select(Document).where(Document.number == number))
    if doc is None:
        abort(404)
    require_visible(document_operator(doc))
    form = _form("resend")
    return _run("resend", f"document:{doc.number}", doc, form,
                lambda _unused: resend_receipt(db_session(), _actor(), doc, to=form.email.data, reason=form.reason.data.strip(), key=form.key.data))


@bp.route("/meters/<string(maxlength=16):meter_code>/goodwill", methods=["POST"], endpoint="action_goodwill")
def goodwill_view(meter_code: str):
    """Credit a prepaid meter as goodwill."""
    from webapp.meters import topup

    meter = db_session().scalar(select(Meter).where(Meter.meter_code == meter_code))
    if meter is None:
        abort(404)
    require_visible(meter_operator(meter))
    form = _form("goodwill")
    return _run("goodwill", f"meter:{meter.meter_code}", meter, form, prepare=lambda: _parse_amount(form, topup.meter_currency(meter)),
                work=lambda amount: goodwill_credit(db_session(), _actor(), meter, amount, reason=form.reason.data.strip(),
                                                    key=form.key.data, now=_now()))


# --------------------------------------------------------------------------- views: approvals


def _approvals_query(scope: int | None, state: ApprovalState | None = ApprovalState.PENDING):
    q = select(ApprovalRequest)
    if state is not None:
        q = q.where(ApprovalRequest.state == state)
    if scope is not None:
        q = q.where(ApprovalRequest.operator_id == scope)
    return q


def _approval_link(req: ApprovalRequest) -> str | None:
    if req.object_type in ("session", "meter", "document"):
        return _object_path(f"{req.object_type}:{req.object_id}")
    return None


def _approvals_page(status: int = 200, failed: dict | None = None):
    from webapp.models import User

    s = db_session()
    scope = staff_scope()
    pending = s.scalars(_approvals_query(scope).order_by(ApprovalRequest.requested_at, ApprovalRequest.id)).all()
    decided = s.scalars(_approvals_query(scope, None).where(ApprovalRequest.state != ApprovalState.PENDING)
                        .order_by(ApprovalRequest.decided_at.desc(), ApprovalRequest.id.desc()).limit(20)).all()
    ids = {r.requested_by_id for r in [*pending, *decided]} | {r.decided_by_id for r in decided if r.decided_by_id}
    people = dict(s.execute(select(User.id, User.email).where(User.id.in_(ids))).all()) if ids else {}
    forms = {}
    for req in pending:
        approve_form = ApproveForm(prefix=f"approve-{req.id}", formdata=None)
        reject_form = RejectForm(prefix=f"reject-{req.id}", formdata=None)
        if failed and failed["id"] == req.id:
            approve_form = failed.get("approve") or approve_form
            reject_form = failed.get("reject") or reject_form
        forms[req.id] = (approve_form, reject_form)
    resp = make_response(render_template(
        "support/approvals.html", pending=pending, decided=decided, people=people, forms=forms, link=_approval_link,
        me=current_user.id, error=failed,
    ), status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/approvals", endpoint="approvals")
def approvals_view():
    """Refunds and goodwill credits over the limit that wait for a second person, in the staff member's scope (and the last decided)."""
    return _approvals_page()


def _visible_request(request_id: int) -> ApprovalRequest:
    req = db_session().get(ApprovalRequest, request_id)
    if req is None:
        abort(404)
    require_visible(req.operator_id)
    return req


@bp.route("/approvals/<int(max=2147483647):request_id>/approve", methods=["POST"], endpoint="approve")
def approve_view(request_id: int):
    """Approve a request (not one's own): its action runs now."""
    req = _visible_request(request_id)
    form = ApproveForm(prefix=f"approve-{req.id}")
    if not form.validate():
        return _approvals_page(400, {"id": req.id, "approve": form, "message": None})
    try:
        done = approve(db_session(), _actor(), _provider(), req, note=(form.note.data or "").strip(), now=_now())
    except ActionRefused as e:
        return _approvals_page(e.status, {"id": req.id, "message": e.message})
    flash(done.message, done.category)
    return redirect(url_for("support.approvals"), 303)


@bp.route("/approvals/<int(max=2147483647):request_id>/reject", methods=["POST"], endpoint="reject")
def reject_view(request_id: int):
    """Reject a request with a reason: nothing moves."""
    req = _visible_request(request_id)
    form = RejectForm(prefix=f"reject-{req.id}")
    if not form.validate():
        return _approvals_page(400, {"id": req.id, "reject": form, "message": None})
    try:
        done = reject(db_session(), _actor(), req, reason=form.reason.data.strip(), now=_now())
    except ActionRefused as e:
        return _approvals_page(e.status, {"id": req.id, "message": e.message})
    flash(done.message)
    return redirect(url_for("support.approvals"), 303)


__all__ = [
    "ActionRefused", "Done", "approval_limit", "approve", "goodwill_credit", "hold_stuck", "new_key", "refund", "refundable", "reject",
    "release_hold", "resend_receipt", "resolve_review", "stop_session", "support_actions", "unlock_connector",
]
