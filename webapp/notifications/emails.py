"""Which events send which email, to whom, and how each email is written.

Causes (each recorded through the outbox in the transaction of its event,
so an event that rolls back sends nothing, and one key per cause, so a
replayed event sends nothing twice):

============================  ===================================  ==================  ======
email (template)              cause                                key                 guests
============================  ===================================  ==================  ======
``receipt``                   a document is issued (invoice,       document:<id>:      always
                              receipt, credit note) with an        receipt
                              email address (``on_issued``)
``session_started``           a charging session goes to           session:<id>:       yes
                              ``charging``                         started
``session_completed``         a charging session goes to           session:<id>:       only when nothing
                              ``completed``                        completed           was charged
``payment_failed``            a card top-up (or meter top-up,      card_payment:<id>:  yes
                              bill) goes to ``failed``; a          failed /
                              session's capture is refused         session:<id>:
                              (``review``, ``capture_failed``)     payment_failed
``low_balance``               the wallet fell below the            wallet:user:<id>:   —
                              threshold (see ``check_low_balance``) <cur>:low:<time>
============================  ===================================  ==================  ======

Signed-in people choose each kind on ``/account/notifications``
(``NotificationPreferences``; no row means everything on); their choice at
the time of the event counts. Guests have no preferences: they gave an
email address for this one session, so they get what that session needs and
no more — it started, its receipt (which carries the energy and cost, so no
separate "completed" email unless nothing was charged and there is no
receipt), and a refused capture.

A card that is declined when a charging session's hold is placed sends
nothing: the driver is looking at the page that says so, and no money moved.
A declined top-up does send one (the person may have closed the page while
their bank decided, and a saved card that keeps failing needs replacing).

Links: a signed-in person's links open pages behind their sign-in. A guest
cannot sign in, and their session's link token exists only as a hash (the
token itself is in the email sent when they paid, ``session_link``), so no
later email can carry it: a guest's emails link to ``/s/<id>`` and
``/documents/<number>``, which open in the browser that paid (it remembers
the token) or after opening the first email's link, and say so; the receipt
has the PDF attached in any case.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from email.message import EmailMessage
from itertools import chain
from zoneinfo import ZoneInfo

from babel.dates import format_datetime
from babel.numbers import format_decimal
from flask import current_app, render_template
from flask_babel import force_locale
from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session

from payments import invoicing
from payments.cards import CardPayment, Purpose, State
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, LedgerAccount
from payments.money import Money
from payments.money import format as format_money
from payments.tariff_store import loads
from webapp.charging.models import ChargingSession, SessionState
from webapp.db import session_factory, utcnow
from webapp.i18n import supported
from webapp.models import User
from webapp.notifications.models import NotificationPreferences, SentEmail
from webapp.notifications.outbox import schedule
from webapp.tasks import task

log = logging.getLogger("voltpay.notifications")

KINDS = ("receipts", "session_started", "session_completed", "payment_failed", "low_balance")
DEFAULT_THRESHOLD_MINOR = 500  # 5.00 in the wallet's currency (¥500 in a zero-decimal currency)
LOW_BALANCE_EVERY = dt.timedelta(hours=24)  # at most one low-balance email per wallet in this period


# --------------------------------------------------------------------------- who wants what


def preferences(s: Session, user_id: int) -> dict:
    """A user's choices as a dict (the defaults when they never chose); safe inside a flush."""
    row = s.connection().execute(
        select(NotificationPreferences.__table__).where(NotificationPreferences.user_id == user_id)
    ).mappings().first()
    if row is None:
        return {**{k: True for k in KINDS}, "low_balance_threshold_minor": DEFAULT_THRESHOLD_MINOR, "low_balance_sent_at": None}
    return dict(row)


def _user_email(s: Session, user_id: int) -> str | None:
    """An account's email address (a Core query: safe inside a flush)."""
    return s.connection().execute(select(User.email).where(User.id == user_id)).scalar_one_or_none()


def _recipient(s: Session, *, user_id: int | None, email: str | None, kind: str) -> str | None:
    """Where an email of ``kind`` goes: the account's address if it wants this kind, the guest's address, or None."""
    if user_id is None:
        return email or None
    if not preferences(s, user_id)[kind]:
        return None
    return _user_email(s, user_id) or email


def _retry_link(s: Session, payment: CardPayment) -> str:
    """Where to try again: the bill, the meter, or the wallet."""
    kind, _, ident = payment.reference.partition(":")
    if kind == "bill" and ident.isdigit():
        return f"{_base()}/bills/{ident}"
    if kind == "meter" and ident.isdigit():
        from webapp.models import Meter

        meter = s.get(Meter, int(ident))
        if meter is not None:
            return f"{_base()}/m/{meter.meter_code}"
    return f"{_base()}/wallet"


# --------------------------------------------------------------------------- causes


@invoicing.on_issued
def _document_issued(s: Session, doc: Document) -> None:
    """Every issued document with an address is emailed with its PDF (unless the account turned receipts off).

    A post-paid bill's invoice is not: the bill email (webapp.meters.bills)
    announces it with its due date and how to pay, which a "thank you" would
    contradict.
    """
    if doc.source.startswith("bill:"):
        return
    to = _recipient(s, user_id=doc.user_id, email=doc.email, kind="receipts")
    if to:
        schedule(s, to=to, template="receipt", reference=f"document:{doc.id}", key=f"document:{doc.id}:receipt")


def _changed_to(obj, name: str):
    """The new value of attribute ``name`` if this flush changed it, else None."""
    hist = inspect(obj).attrs[name].history
    if not hist.added:
        return None
    new = hist.added[-1]
    return None if hist.deleted and hist.deleted[0] == new else new


@event.listens_for(Session, "after_flush")
def _state_changes(s: Session, _ctx) -> None:
    """Charging sessions and card payments that changed state in this flush (ids known, history not reset yet)."""
    for obj in chain(s.new, s.dirty):
        if isinstance(obj, ChargingSession):
            new = _changed_to(obj, "state")
            if new is not None:
                _session_changed(s, obj, SessionState(new))
        elif isinstance(obj, CardPayment):
            if _changed_to(obj, "state") == State.FAILED:
                _card_payment_failed(s, obj)


def _session_changed(s: Session, cs: ChargingSession, new: SessionState) -> None:
    if new is SessionState.CHARGING:
        to = _recipient(s, user_id=cs.user_id, email=cs.email, kind="session_started")
        if to:
            schedule(s, to=to, template="session_started", reference=f"session:{cs.id}", key=f"session:{cs.id}:started")
    elif new is SessionState.COMPLETED:
        if cs.user_id is None and cs.captured_minor:
            return  # a guest's receipt says it all (see the module docstring)
        to = _recipient(s, user_id=cs.user_id, email=cs.email, kind="session_completed")
        if to:
            schedule(s, to=to, template="session_completed", reference=f"session:{cs.id}", key=f"session:{cs.id}:completed")
    elif new is SessionState.REVIEW and cs.failure_code == "capture_failed":
        to = _recipient(s, user_id=cs.user_id, email=cs.email, kind="payment_failed")
        if to:
            schedule(s, to=to, template="payment_failed", reference=f"session:{cs.id}", key=f"session:{cs.id}:payment_failed")


def _card_payment_failed(s: Session, row: CardPayment) -> None:
    if row.purpose is Purpose.CHARGING_SESSION:
        return  # a hold declined at the start: the driver sees it on the page (a refused capture is the session's REVIEW)
    user_id = int(row.owner.split(":", 1)[1]) if row.owner.startswith("user:") else None
    to = _recipient(s, user_id=user_id, email=row.email, kind="payment_failed")
    if to:
        schedule(s, to=to, template="payment_failed", reference=f"card_payment:{row.id}", key=f"card_payment:{row.id}:failed")


# --------------------------------------------------------------------------- low wallet balance


@task(retries=3, retry_delay=10)
def check_low_balance_job(account_ids: list[int], debited_ids: list[int] = ()) -> None:
    """Job: after money moved on these ledger accounts, check the balance of every customer wallet among them.

    Only a debit of the wallet or of its hold (a hold placed, captured or
    released) may send the email; a wallet that was only credited (a top-up)
    is checked to re-arm the alert, never warned: nobody wants "your balance
    is low" as the answer to a top-up.
    """
    factory = session_factory()
    with factory() as s:
        rows = s.execute(
            select(LedgerAccount.id, LedgerAccount.owner, LedgerAccount.currency)
            .where(LedgerAccount.id.in_(account_ids), LedgerAccount.kind.in_([AccountKind.CUSTOMER_WALLET, AccountKind.WALLET_HOLD]),
                   LedgerAccount.owner.like("user:%"))
        ).all()
    wallets: dict[tuple[str, str], bool] = {}
    for acct_id, owner, currency in rows:
        wallets[(owner, currency)] = wallets.get((owner, currency), False) or acct_id in set(debited_ids)
    for (owner, currency), spent in sorted(wallets.items()):
        with factory() as s:
            check_low_balance(s, int(owner.split(":", 1)[1]), currency, utcnow(), may_send=spent)
            s.commit()


def _locked_preferences(s: Session, user_id: int) -> NotificationPreferences:
    """The user's preferences row, created with the defaults if missing, locked until the transaction ends."""
    from webapp.notifications.outbox import _insert

    s.execute(_insert(s, NotificationPreferences.__table__).values(
        user_id=user_id, receipts=True, session_started=True, session_completed=True, payment_failed=True, low_balance=True,
        low_balance_threshold_minor=DEFAULT_THRESHOLD_MINOR, updated_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["user_id"]))
    return s.scalar(select(NotificationPreferences).where(NotificationPreferences.user_id == user_id)
                    .with_for_update().execution_options(populate_existing=True))


def check_low_balance(s: Session, user_id: int, currency: str, now: dt.datetime, *, may_send: bool = True) -> bool:
    """Email the user once if their wallet is below their threshold; True when an email was scheduled. Caller commits.

    Rules, so that nobody gets spammed:

    * only once the money has settled: while a session holds wallet money the
      check waits (the capture gives part of the hold back and checks again);
    * one email per low spell: ``low_balance_sent_at`` is set when it is sent
      and cleared (re-armed) only when a check finds the balance back at or
      above the threshold (a top-up);
    * and at most one per ``LOW_BALANCE_EVERY`` (24 h) per wallet whatever
      happens, counted from the emails recorded in ``SentEmail``;
    * ``may_send=False`` (the wallet was only credited) re-arms but never sends.

    Runs under the preferences row's lock, so two concurrent checks send one.
    """
    from payments import wallet

    user = s.get(User, user_id)
    if user is None or currency != user.currency:
        return False  # only the wallet in the account's currency has a threshold
    owner = user.owner
    if wallet.held(s, owner, currency).amount > 0:
        return False
    prefs = _locked_preferences(s, user_id)
    balance = wallet.wallet_balance(s, owner, currency)
    if balance.amount >= prefs.low_balance_threshold_minor:
        if prefs.low_balance_sent_at is not None:
            prefs.low_balance_sent_at = None  # re-armed: the next drop below the threshold is news again
        return False
    if not may_send or not prefs.low_balance or prefs.low_balance_sent_at is not None:
        return False
    reference = f"wallet:{owner}:{currency}"
    recent = s.scalar(select(SentEmail.id).where(SentEmail.template == "low_balance", SentEmail.reference == reference,
                                                 SentEmail.created_at > now - LOW_BALANCE_EVERY).limit(1))
    if recent is not None:
        return False
    prefs.low_balance_sent_at = now
    s.flush()
    schedule(s, to=user.email, template="low_balance", reference=reference, key=f"{reference}:low:{now.isoformat()}")
    return True


# --------------------------------------------------------------------------- writing the emails (in the worker)


def _locale(*candidates: str | None) -> str:
    for c in candidates:
        if c and supported(c):
            return c
    return "en"


def _base() -> str:
    return str(current_app.config["BASE_URL"]).rstrip("/")


def document_link(doc: Document) -> str:
    """The document's page: an account's behind its sign-in; a guest's with the document's own key, so it opens on any device.

    The key (``?k=``) lets a browser read that one document (as its paper copy
    would), never reissue it: that takes the account or the session's link.
    """
    if doc.owner.startswith("guest:"):
        return f"{_base()}/documents/{doc.number}?k={doc.verify_token}"
    return f"{_base()}/documents/{doc.number}"


def _when(value: dt.datetime | None, tz: str | None, locale: str) -> str:
    if value is None:
        return ""
    return format_datetime(value, "medium", tzinfo=ZoneInfo(tz or "UTC"), locale=locale)


def _kwh(wh: Decimal | int | None, locale: str) -> str:
    return format_decimal(Decimal(wh or 0) / 1000, format="#,##0.00", locale=locale)


def _render(to: str, template: str, locale: str, attachments=None, **context) -> EmailMessage:
    from webapp.mail import build_message

    with force_locale(locale):
        subject = render_template(f"email/{template}.subject.txt", **context).strip()
        text = render_template(f"email/{template}.txt", **context)
    return build_message(to, subject, text, attachments=attachments)


def _prefs_link() -> str:
    return f"{_base()}/account/notifications"


def _build_receipt(s: Session, row: SentEmail) -> EmailMessage | None:
    from webapp.receipts.render import render_pdf

    doc = s.get(Document, int(row.reference.split(":", 1)[1]))
    if doc is None:
        return None
    locale = _locale(doc.locale)
    content = loads(doc.content)
    session = content.get("session") or {}
    original = content.get("original") or {}
    pdf = render_pdf(s, doc)
    return _render(
        row.to, "receipt", locale, attachments=[(f"{doc.number}.pdf", "application/pdf", pdf)],
        number=doc.number, kind=doc.kind.value, is_credit_note=doc.kind is DocumentKind.CREDIT_NOTE,
        total=format_money(doc.total, locale), link=document_link(doc), original_number=original.get("number"),
        site=session.get("site"), energy=_kwh(Decimal(session["energy_kwh"]) * 1000, locale) if session.get("energy_kwh") else None,
        prefs_link=_prefs_link() if doc.user_id is not None else None, guest=doc.user_id is None,
    )


def _session(s: Session, row: SentEmail) -> ChargingSession | None:
    return s.get(ChargingSession, int(row.reference.split(":", 1)[1]))


def _session_context(cs: ChargingSession, locale: str) -> dict:
    connector = cs.connector
    return {
        "site": connector.charger.site.name, "connector_code": connector.connector_code, "session_id": cs.id,
        "link": f"{_base()}/s/{cs.id}", "guest": cs.user_id is None,
        "prefs_link": _prefs_link() if cs.user_id is not None else None,
        "started_at": _when(cs.started_at, cs.time_zone, locale), "hold": format_money(cs.hold, locale),
    }


def _session_locale(cs: ChargingSession) -> str:
    return _locale(cs.locale, cs.user.locale if cs.user is not None else None)


def _build_session_started(s: Session, row: SentEmail) -> EmailMessage | None:
    cs = _session(s, row)
    if cs is None:
        return None
    locale = _session_locale(cs)
    return _render(row.to, "session_started", locale, **_session_context(cs, locale))


def _build_session_completed(s: Session, row: SentEmail) -> EmailMessage | None:
    cs = _session(s, row)
    if cs is None:
        return None
    locale = _session_locale(cs)
    end = cs.stopped_at or cs.ended_at
    minutes = int((end - cs.started_at).total_seconds() // 60) if end and cs.started_at else None
    return _render(
        row.to, "session_completed", locale, **_session_context(cs, locale), energy=_kwh(cs.energy_wh, locale),
        cost=format_money(Money(cs.captured_minor or 0, cs.currency), locale), charged=bool(cs.captured_minor),
        stopped_at=_when(end, cs.time_zone, locale), minutes=minutes,
    )


def _build_payment_failed(s: Session, row: SentEmail) -> EmailMessage | None:
    kind, ident = row.reference.split(":", 1)
    if kind == "session":
        cs = s.get(ChargingSession, int(ident))
        if cs is None:
            return None
        locale = _session_locale(cs)
        return _render(row.to, "payment_failed", locale, **_session_context(cs, locale), what="session",
                       amount=format_money(Money(cs.captured_minor or cs.cost_minor, cs.currency), locale))
    payment = s.get(CardPayment, int(ident))
    if payment is None:
        return None
    user = s.get(User, int(payment.owner.split(":", 1)[1])) if payment.owner.startswith("user:") else None
    locale = _locale(user.locale if user else None)
    card = f"{(payment.card_brand or '').title()} •••• {payment.card_last4}" if payment.card_last4 else None
    return _render(row.to, "payment_failed", locale, what=payment.purpose.value, amount=format_money(payment.amount, locale),
                   card=card, link=_retry_link(s, payment), prefs_link=_prefs_link() if user else None,
                   declined=payment.failure_code in ("card_declined", "insufficient_funds", "expired_card", "incorrect_cvc"),
                   three_d_secure=payment.failure_code == "payment_intent_authentication_failure")


def _build_low_balance(s: Session, row: SentEmail) -> EmailMessage | None:
    from payments import wallet

    _, owner_kind, uid, currency = row.reference.split(":")
    user = s.get(User, int(uid))
    if user is None:
        return None
    prefs = preferences(s, user.id)
    if not prefs["low_balance"]:
        return None  # turned off since: say nothing
    locale = _locale(user.locale)
    balance = wallet.wallet_balance(s, f"{owner_kind}:{uid}", currency)
    return _render(row.to, "low_balance", locale, balance=format_money(balance, locale),
                   threshold=format_money(Money(prefs["low_balance_threshold_minor"], currency), locale),
                   link=f"{_base()}/wallet", prefs_link=_prefs_link())


BUILDERS = {
    "receipt": _build_receipt,
    "session_started": _build_session_started,
    "session_completed": _build_session_completed,
    "payment_failed": _build_payment_failed,
    "low_balance": _build_low_balance,
}


def build(s: Session, row: SentEmail) -> EmailMessage | None:
    """The message of a recorded email, written now in the recipient's language (None: nothing to send any more)."""
    builder = BUILDERS.get(row.template)
    if builder is None:
        raise LookupError(f"no email template {row.template!r}")
    return builder(s, row)
