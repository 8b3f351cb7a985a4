"""The support console's read side: search, the object pages (session timeline, document, meter), the queue, the audit log.

Who sees what (``webapp.support``): platform support and admins see every
operator's objects; an operator's support or staff see only their own
operator's. An object of another operator answers 404, and never appears in a
search, the queue or the audit log, so an id reveals nothing. Whose object is
what:

* a charging session: the operator of its connector's charger's site;
* a document: its seller (``scope`` ``operator:<id>``); a platform document
  (a wallet top-up's receipt) is platform support's only;
* a meter: the operator of its site; a card payment: the operator of what it
  pays for (session, meter, bill); a wallet top-up is the platform's;
* a ticket: its ``operator_id``; an audit entry: its ``operator_id``.

**Search** (``GET /support/?q=…&day=YYYY-MM-DD``) takes one box and tries
every reading of it at once: an email address (sessions, documents, card
payments, tickets, accounts, tenants; exact, case-insensitive), a session id
(``123`` or ``#123``), a document number, a connector code, a meter code, a
ticket reference, a provider payment id (``pi_…``), and four digits as a
card's last four. The optional day narrows sessions, card payments and
documents to that calendar day in the site's time zone (a session's own
``time_zone``; documents: the zone frozen in them). An account is shown to an
operator's staff only when it has a session, tenancy or document there.

**The session page** merges everything known about a session into one
timeline sorted by time: its own timestamps (created, start requested,
started, stop requested and by whom, stopped, car left, settled), its card
payment, refunds and the provider's webhook events about its PaymentIntent,
the OCPP messages logged for it (meter readings thinned to the first and last
``OCPP_READINGS_SHOWN`` when there are more), the charge commands, the ledger
entries that concern it (reference ``session:<id>`` — the card capture and
refund bookings and the settlement allocation — or ``session:<id>:…``: the
wallet hold and its settlement, wallet refunds), its documents (invoice,
reissues, credit notes: ``source`` ``session:<id>``), the emails about it or
its documents (``SentEmail.reference`` ``session:<id>`` / ``document:<id>`` /
``card_payment:<id>``), its tickets and the audit entries of staff actions on
it.

**The queue** lists what a person must look at, oldest first, with its age:
see ``abnormal_sessions`` and ``failed_payments`` for the exact rules.

**The audit log** is filtered by object, actor, action and UTC dates, newest
first, 50 a page; ``/support/audit.csv`` exports the same rows (formula-like
cells are prefixed with ``'`` so a spreadsheet shows them as text).

The action forms (refund, release, stop, …) are another module's: the pages
include ``support/_session_actions.html`` (variables ``cs``, ``session`` —
the same ChargingSession —, ``payment``, ``invoice``, ``operator_id``),
``support/_document_actions.html`` (``doc``, ``document``, ``operator_id``)
and ``support/_meter_actions.html`` (``meter``, ``tenant``, ``balance``,
``operator_id``) when they exist.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import Response, abort, current_app, render_template, request, url_for
from flask_babel import format_timedelta, get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import String, cast, exists, func, literal, or_, select
from sqlalchemy.orm import Session
from werkzeug.routing import BuildError

from payments import money as money_mod
from payments.base import utcnow
from payments.cards import CardPayment, Purpose
from payments.cards import State as CardState
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting
from payments.ledger import statement as ledger_statement
from payments.money import Money
from payments.webhooks import ProviderEvent
from webapp.charging import service as charging
from webapp.charging.models import (
    ACTIVE_STATES,
    ENDED_STATES,
    ChargeCommand,
    ChargingSession,
    OcppMessage,
    PaymentKind,
    SessionState,
)
from webapp.db import db_session
from webapp.meters.models import Bill, BillState, MeterReading, RelayCommand, Tenant
from webapp.models import Charger, Connector, Meter, Site, User
from webapp.notifications.models import SentEmail
from webapp.support import bp, require_visible, staff_scope
from webapp.support.models import ApprovalRequest, AuditEntry, Ticket, TicketState

MAX_ID = 2_147_483_647
RESULTS_LIMIT = 50  # per kind of result
OCPP_READINGS_SHOWN = 20  # meter-reading messages shown from each end of a long session
AUDIT_PAGE = 50
AUDIT_CSV_MAX = 50_000
QUEUE_LIMIT = 500

# The queue's clocks (see ``abnormal_sessions``).
WATCHDOG_GRACE = dt.timedelta(minutes=2)  # the watchdog runs every minute: a deadline missed by more than this was missed
STOP_STUCK = dt.timedelta(minutes=5)  # a session still charging this long after the first RemoteStop
SETTLE_STUCK = dt.timedelta(minutes=15)  # a session ended (car left) this long ago and still not billed
HOLD_RELEASE_GRACE = dt.timedelta(minutes=5)  # a session ended without charging this long ago whose hold is still there
FAILED_PAYMENT_DAYS = 7  # failed card payments of this many days are listed (?days=1..90)

SESSION_ID = re.compile(r"#?(\d{1,10})")
LAST4 = re.compile(r"\d{4}")
PROVIDER_PAYMENT = re.compile(r"pi_[A-Za-z0-9_]{4,250}")
CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")  # document numbers, connector and meter codes, ticket references
DAY_WINDOW = dt.timedelta(hours=14)  # the widest UTC offset: a local day lies within [day − 14 h, day + 24 h + 14 h) UTC


# --------------------------------------------------------------------------- scoping


def operator_of_session(cs: ChargingSession) -> int:
    """The operator a session belongs to: its connector's charger's site's."""
    return cs.connector.charger.site.operator_id


def operator_of_document(doc: Document) -> int | None:
    """The seller of a document (None: the platform)."""
    kind, _sep, ident = doc.scope.partition(":")
    return int(ident) if kind == "operator" and ident.isdigit() else None


def _sessions_in_scope(q, scope: int | None):
    """Restrict a query over ChargingSession to the operator ``scope`` (None: no restriction)."""
    if scope is None:
        return q
    return (q.join(Connector, Connector.id == ChargingSession.connector_id).join(Charger, Charger.id == Connector.charger_id)
            .join(Site, Site.id == Charger.site_id).where(Site.operator_id == scope))


def _documents_in_scope(q, scope: int | None):
    return q if scope is None else q.where(Document.scope == f"operator:{scope}")


def _visible_to(scope: int | None, operator_id: int | None) -> bool:
    return scope is None or operator_id == scope


@dataclass
class PaymentTarget:
    """What a card payment pays for, as the console shows it."""

    label: str
    url: str | None
    operator_id: int | None
    time_zone: str
    session: ChargingSession | None = None
    meter: Meter | None = None
    bill: Bill | None = None


def payment_target(s: Session, row: CardPayment) -> PaymentTarget:
    """The session, meter or bill a card payment is for, with its operator (None: the platform's wallet top-up)."""
    kind, _sep, ident = row.reference.partition(":")
    if row.purpose == Purpose.CHARGING_SESSION and kind == "session" and ident.isdigit():
        cs = s.get(ChargingSession, int(ident))
        if cs is not None:
            return PaymentTarget(_("Session #%(id)s", id=cs.id), url_for("support.session", session_id=cs.id), operator_of_session(cs),
                                 cs.time_zone, session=cs)
    if row.purpose == Purpose.METER_TOP_UP and kind == "meter" and ident.isdigit():
        meter = s.get(Meter, int(ident))
        if meter is not None:
            return PaymentTarget(_("Meter %(code)s", code=meter.meter_code), url_for("support.meter", meter_code=meter.meter_code),
                                 meter.site.operator_id, meter.site.time_zone, meter=meter)
    if row.purpose == Purpose.BILL and kind == "bill" and ident.isdigit():
        bill = s.get(Bill, int(ident))
        tenant = s.get(Tenant, bill.tenant_id) if bill is not None else None
        if bill is not None and tenant is not None:
            site = s.get(Site, tenant.site_id)
            meter = tenant.meters[0] if tenant.meters else None
            url = url_for("support.meter", meter_code=meter.meter_code) if meter is not None else None
            return PaymentTarget(_("Bill %(period)s of %(tenant)s", period=bill.period, tenant=tenant.name), url, site.operator_id,
                                 site.time_zone, meter=meter, bill=bill)
    if row.purpose == Purpose.WALLET_TOP_UP:
        return PaymentTarget(_("Wallet top-up of %(owner)s", owner=row.owner), None, None, "UTC")
    return PaymentTarget(row.reference, None, None, "UTC")


# --------------------------------------------------------------------------- small helpers


def _zone(name: str | None) -> dt.tzinfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def local_day(at: dt.datetime, tz: str | None) -> dt.date:
    """The calendar day of ``at`` in the time zone ``tz``."""
    return at.astimezone(_zone(tz)).date()


def _day_window(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start - DAY_WINDOW, start + dt.timedelta(days=1) + DAY_WINDOW


def _money(minor: int | None, currency: str) -> str:
    if minor is None:
        return "—"
    return money_mod.format(Money(int(minor), currency), str(get_locale() or "en"))


@bp.app_template_filter("console_money")
def console_money_filter(minor, currency: str = "EUR") -> str:
    """``{{ amount_minor|console_money(currency) }}`` (or a Money): formatted for the page's language; None: a dash."""
    if isinstance(minor, Money):
        return _money(minor.amount, minor.currency)
    return _money(minor, currency)


@bp.app_template_filter("console_time")
def console_time_filter(value: dt.datetime | None, tz: str | None = None) -> str:
    """``{{ at|console_time(tz) }}``: a timestamp to the second in ``tz`` (default UTC), with the zone's abbreviation."""
    if value is None:
        return ""
    return value.astimezone(_zone(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _age(since: dt.datetime, now: dt.datetime) -> str:
    return format_timedelta(now - since, threshold=1.1)


def _short(text: str | None, limit: int = 400) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "…"


def ticket_url(ticket: Ticket) -> str | None:
    """The console page of a ticket, when the tickets module is installed (its URL takes the reference or the id)."""
    if "support.ticket" not in current_app.view_functions:
        return None
    for kw in ({"reference": ticket.reference}, {"ticket_id": ticket.id}, {"id": ticket.id}):
        try:
            return url_for("support.ticket", **kw)
        except BuildError:
            continue
    return None


def _tickets(s: Session, scope: int | None, **about: Any) -> list[Ticket]:
    """Tickets about a session, document, meter or email address that ``scope`` may see, oldest first."""
    try:
        from webapp.support.tickets import tickets_for
    except ImportError:  # an installation without the contact form has no tickets
        return []
    return [t for t in tickets_for(s, **about) if _visible_to(scope, t.operator_id)]


def audit_for(s: Session, object_type: str, object_id: Any) -> list[AuditEntry]:
    """The audit entries of one object, oldest first; ``object_id`` may be a list of the ids it is known by (id, number)."""
    ids = [str(i) for i in object_id] if isinstance(object_id, list | tuple | set) else [str(object_id)]
    return list(s.scalars(select(AuditEntry).where(AuditEntry.object_type == object_type, AuditEntry.object_id.in_(ids))
                          .order_by(AuditEntry.at, AuditEntry.id)))


# --------------------------------------------------------------------------- search


@dataclass
class SearchResults:
    """What a search found, grouped by kind (each list already scoped and limited)."""

    query: str
    day: dt.date | None
    sessions: list[ChargingSession] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)
    payments: list[tuple[CardPayment, PaymentTarget]] = field(default_factory=list)
    connectors: list[tuple[Connector, list[ChargingSession]]] = field(default_factory=list)
    meters: list[Meter] = field(default_factory=list)
    tenants: list[Tenant] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether nothing at all was found."""
        return not any((self.sessions, self.documents, self.payments, self.connectors, self.meters, self.tenants, self.users,
                        self.tickets))


def _add_unique(target: list, items: Iterable, key=lambda x: x.id) -> None:
    seen = {key(x) for x in target}
    for x in items:
        if key(x) not in seen:
            seen.add(key(x))
            target.append(x)


def _on_day(rows: Iterable, day: dt.date | None, at, tz) -> list:
    """Rows whose time ``at(row)`` falls on ``day`` in the time zone ``tz(row)`` (all of them without a day)."""
    return [r for r in rows if day is None or local_day(at(r), tz(r)) == day]


def _document_zone(doc: Document) -> str:
    try:
        return str(json.loads(doc.content).get("time_zone") or "UTC")
    except (ValueError, AttributeError):
        return "UTC"


def search(s: Session, query: str, *, day: dt.date | None, scope: int | None) -> SearchResults:
    """Everything the query may name, visible to ``scope`` (see the module docstring for the keys)."""
    q = " ".join(query.split())
    res = SearchResults(q, day)
    if not q:
        return res
    if "@" in q:
        _search_email(s, res, q.lower(), scope)
        return res
    match = SESSION_ID.fullmatch(q)
    if match and int(match.group(1)) <= MAX_ID:
        cs = s.get(ChargingSession, int(match.group(1)))
        if cs is not None and _visible_to(scope, operator_of_session(cs)):
            res.sessions.extend(_on_day([cs], day, lambda c: c.created_at, lambda c: c.time_zone))
    if LAST4.fullmatch(q):
        _search_last4(s, res, q, scope)
    if PROVIDER_PAYMENT.fullmatch(q):
        row = s.scalar(select(CardPayment).where(CardPayment.provider_payment_id == q))
        if row is not None:
            _add_payments(s, res, [row], scope)
    if CODE.fullmatch(q):
        variants = list(dict.fromkeys([q, q.upper()]))
        docs = s.scalars(_documents_in_scope(select(Document).where(Document.number.in_(variants)), scope)).all()
        _add_unique(res.documents, _on_day(docs, day, lambda d: d.issued_at, _document_zone))
        for connector in s.scalars(select(Connector).where(Connector.connector_code.in_(variants))):
            if _visible_to(scope, connector.charger.site.operator_id):
                recent = s.scalars(select(ChargingSession).where(ChargingSession.connector_id == connector.id)
                                   .order_by(ChargingSession.id.desc()).limit(20 if day is None else 200)).all()
                res.connectors.append((connector, _on_day(recent, day, lambda c: c.created_at, lambda c: c.time_zone)[:20]))
        for meter in s.scalars(select(Meter).where(Meter.meter_code.in_(variants))):
            if _visible_to(scope, meter.site.operator_id):
                res.meters.append(meter)
        tickets = s.scalars(select(Ticket).where(Ticket.reference.in_(variants))).all()
        _add_unique(res.tickets, (t for t in tickets if _visible_to(scope, t.operator_id)))
    return res


def _add_payments(s: Session, res: SearchResults, rows: Iterable[CardPayment], scope: int | None) -> None:
    for row in rows:
        target = payment_target(s, row)
        if not _visible_to(scope, target.operator_id):
            continue
        if res.day is not None and local_day(row.created_at, target.time_zone) != res.day:
            continue
        if row.id not in {p.id for p, _t in res.payments}:
            res.payments.append((row, target))
        if target.session is not None:
            _add_unique(res.sessions, [target.session])
        if target.meter is not None:
            _add_unique(res.meters, [target.meter])


def _search_last4(s: Session, res: SearchResults, last4: str, scope: int | None) -> None:
    """Card payments with these last four digits (on the day, in the site's zone), and their sessions and meters."""
    q = select(CardPayment).where(CardPayment.card_last4 == last4)
    if res.day is not None:
        lo, hi = _day_window(res.day)
        q = q.where(CardPayment.created_at >= lo, CardPayment.created_at < hi)
    _add_payments(s, res, s.scalars(q.order_by(CardPayment.id.desc()).limit(RESULTS_LIMIT * 4)).all(), scope)
    del res.payments[RESULTS_LIMIT:]


def _search_email(s: Session, res: SearchResults, email: str, scope: int | None) -> None:
    day = res.day
    users = s.scalars(select(User).where(User.email == email)).all()  # stored lower-case
    user_ids = [u.id for u in users]

    cq = select(ChargingSession).where(or_(ChargingSession.email == email, ChargingSession.user_id.in_(user_ids)))
    dq = select(Document).where(or_(Document.email == email, Document.user_id.in_(user_ids)))
    pq = select(CardPayment).where(or_(func.lower(CardPayment.email) == email, CardPayment.owner.in_([u.owner for u in users])),
                                   CardPayment.purpose != Purpose.CHARGING_SESSION)  # a session's payment comes with the session
    if day is not None:
        lo, hi = _day_window(day)
        cq = cq.where(ChargingSession.created_at >= lo, ChargingSession.created_at < hi)
        dq = dq.where(Document.issued_at >= lo, Document.issued_at < hi)
        pq = pq.where(CardPayment.created_at >= lo, CardPayment.created_at < hi)
    sessions = s.scalars(_sessions_in_scope(cq, scope).order_by(ChargingSession.id.desc()).limit(RESULTS_LIMIT)).all()
    res.sessions.extend(_on_day(sessions, day, lambda c: c.created_at, lambda c: c.time_zone))
    docs = s.scalars(_documents_in_scope(dq, scope).order_by(Document.id.desc()).limit(RESULTS_LIMIT)).all()
    res.documents.extend(_on_day(docs, day, lambda d: d.issued_at, _document_zone))
    _add_payments(s, res, s.scalars(pq.order_by(CardPayment.id.desc()).limit(RESULTS_LIMIT)).all(), scope)

    tq = select(Tenant).join(Site, Site.id == Tenant.site_id).where(
        or_(func.lower(Tenant.contact_email) == email, Tenant.user_id.in_(user_ids)))
    if scope is not None:
        tq = tq.where(Site.operator_id == scope)
    res.tenants.extend(s.scalars(tq.order_by(Tenant.id).limit(RESULTS_LIMIT)))
    for tenant in res.tenants:
        _add_unique(res.meters, tenant.meters)
    res.tickets.extend(_tickets(s, scope, email=email))
    for user in users:
        if scope is None or _has_business_with(s, user, scope):
            res.users.append(user)


def _has_business_with(s: Session, user: User, operator_id: int) -> bool:
    """Whether an account has a session, a tenancy or a document at the operator (its staff may then see the account)."""
    sessions = _sessions_in_scope(select(ChargingSession.id).where(ChargingSession.user_id == user.id), operator_id).limit(1)
    if s.scalar(sessions) is not None:
        return True
    tenancy = select(Tenant.id).join(Site, Site.id == Tenant.site_id).where(Tenant.user_id == user.id, Site.operator_id == operator_id)
    if s.scalar(tenancy.limit(1)) is not None:
        return True
    docs = select(Document.id).where(Document.user_id == user.id, Document.scope == f"operator:{operator_id}").limit(1)
    return s.scalar(docs) is not None


class BadInput(Exception):
    """A filter a person typed that we cannot use; the message says why."""


def _parse_day(value: str | None, label: str) -> dt.date | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise BadInput(_("%(field)s: enter a date as YYYY-MM-DD.", field=label)) from None
    if not 2000 <= day.year <= 2999:  # nothing here is older; and day + 1 must still be a date
        raise BadInput(_("%(field)s: enter a date between 2000 and 2999.", field=label))
    return day


@bp.route("/", endpoint="index")
def index():
    """The console's start page: one search box and an optional day; the results grouped by kind."""
    query = (request.args.get("q") or "").strip()[:254]
    error = None
    results = None
    try:
        day = _parse_day(request.args.get("day"), _("Day"))
    except BadInput as e:
        day, error = None, str(e)
    if error is None and query:
        results = search(db_session(), query, day=day, scope=staff_scope())
    status = 400 if error else 200
    return render_template("support/index.html", query=query, day=request.args.get("day", ""), results=results, error=error,
                           ticket_url=ticket_url), status


# --------------------------------------------------------------------------- the session timeline


@dataclass
class Event:
    """One line of a timeline."""

    at: dt.datetime
    kind: str  # session, payment, provider, ocpp, command, ledger, document, email, ticket, audit
    title: str
    detail: str = ""
    url: str | None = None
    lines: list[str] = field(default_factory=list)  # postings, before/after
    code: str | None = None  # a raw payload (OCPP JSON)
    order: int = 0  # ties at the same instant: in the order the events were added


KIND_LABELS = {
    "session": _l("Session"), "payment": _l("Payment"), "provider": _l("Provider"), "ocpp": _l("OCPP"), "command": _l("Command"),
    "ledger": _l("Ledger"), "document": _l("Document"), "email": _l("Email"), "ticket": _l("Ticket"), "audit": _l("Audit"),
    "reading": _l("Reading"), "relay": _l("Relay"),
}
DOCUMENT_KINDS = {DocumentKind.INVOICE: _l("Invoice"), DocumentKind.RECEIPT: _l("Receipt"), DocumentKind.CREDIT_NOTE: _l("Credit note")}


class Timeline:
    """Events gathered from many tables, sorted by time (stable for ties)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, at: dt.datetime | None, kind: str, title: str, **kw: Any) -> None:
        """Add an event (nothing when its time is unknown)."""
        if at is not None:
            self.events.append(Event(at, kind, title, order=len(self.events), **kw))

    def sorted(self) -> list[Event]:
        """The events, oldest first."""
        return sorted(self.events, key=lambda e: (e.at, e.order))


def _account_label(acct: LedgerAccount) -> str:
    return f"{acct.kind.value} {acct.owner}".strip()


def ledger_entries(s: Session, references: Sequence[str], prefixes: Sequence[str] = ()) -> list[JournalEntry]:
    """Journal entries whose reference is one of ``references`` or starts with one of ``prefixes``, oldest first."""
    conds = [JournalEntry.reference.in_(list(references))] if references else []
    conds += [JournalEntry.reference.like(p.replace("%", r"\%").replace("_", r"\_") + "%", escape="\\") for p in prefixes]
    if not conds:
        return []
    return list(s.scalars(select(JournalEntry).where(or_(*conds)).order_by(JournalEntry.id)))


def _add_ledger(tl: Timeline, s: Session, entries: Sequence[JournalEntry]) -> None:
    if not entries:
        return
    ids = [e.id for e in entries]
    rows = s.execute(select(Posting, LedgerAccount).join(LedgerAccount, LedgerAccount.id == Posting.account_id)
                     .where(Posting.entry_id.in_(ids)).order_by(Posting.id)).all()
    postings: dict[int, list[str]] = {}
    for p, acct in rows:
        side = _("debit") if p.amount_minor > 0 else _("credit")
        postings.setdefault(p.entry_id, []).append(f"{side} {_money(abs(p.amount_minor), p.currency)} · {_account_label(acct)}")
    for e in entries:
        tl.add(e.created_at, "ledger", e.description, detail=f"{e.idempotency_key}", lines=postings.get(e.id, []))


def _document_title(doc: Document) -> str:
    return _("%(kind)s %(number)s: %(total)s", kind=DOCUMENT_KINDS.get(doc.kind, doc.kind), number=doc.number,
             total=_money(doc.total_minor, doc.currency))


def _add_emails(tl: Timeline, emails: Iterable[SentEmail], tz: str | None = None) -> None:
    for m in emails:
        detail = _("status %(status)s", status=m.status)
        if m.sent_at:
            detail += " · " + _("sent %(at)s", at=console_time_filter(m.sent_at, tz))
        if m.error:
            detail += " · " + _short(m.error, 200)
        tl.add(m.created_at, "email", _("Email “%(template)s” to %(to)s", template=m.template, to=m.to), detail=detail)


def _add_tickets(tl: Timeline, tickets: Iterable[Ticket]) -> None:
    for t in tickets:
        tl.add(t.created_at, "ticket", _("Ticket %(reference)s: %(subject)s", reference=t.reference, subject=t.subject),
               detail=_("state %(state)s · from %(email)s", state=t.state.value, email=t.email), url=ticket_url(t))


def _add_audit(tl: Timeline, entries: Iterable[AuditEntry]) -> None:
    for a in entries:
        lines = []
        if a.before_json:
            lines.append(_("before: %(json)s", json=_short(a.before_json, 300)))
        if a.after_json:
            lines.append(_("after: %(json)s", json=_short(a.after_json, 300)))
        detail = _("by %(actor)s (%(role)s) · %(outcome)s", actor=a.actor_email, role=a.actor_role, outcome=a.outcome)
        if a.reason:
            detail += " · " + _("reason: %(reason)s", reason=a.reason)
        tl.add(a.at, "audit", a.action, detail=detail, lines=lines)


def _add_approvals(tl: Timeline, s: Session, object_type: str, object_ids: Sequence[Any]) -> None:
    """Requests for a second person's approval about the object, and the audit entries of each request."""
    ids = [str(i) for i in object_ids]
    requests = list(s.scalars(select(ApprovalRequest).where(ApprovalRequest.object_type == object_type, ApprovalRequest.object_id.in_(ids))
                              .order_by(ApprovalRequest.id)))
    for r in requests:
        tl.add(r.requested_at, "audit", _("Approval asked for %(action)s of %(amount)s: %(state)s", action=r.action,
                                          amount=_money(r.amount_minor, r.currency), state=r.state.value),
               detail=_("reason: %(reason)s", reason=r.reason) + (f" · {r.result}" if r.result else ""),
               url=url_for("support.approvals") if "support.approvals" in current_app.view_functions else None)
    if requests:
        _add_audit(tl, audit_for(s, "approval", [r.id for r in requests]))


def ocpp_messages(s: Session, session_id: int) -> tuple[list[OcppMessage], int]:
    """The OCPP messages logged for a session, meter readings thinned to the first and last few; and how many were left out."""
    base = select(OcppMessage).where(OcppMessage.session_id == session_id)
    readings = OcppMessage.action == "MeterValues"
    rows = list(s.scalars(base.where(~readings)))
    n = s.scalar(select(func.count()).select_from(OcppMessage).where(OcppMessage.session_id == session_id, readings)) or 0
    keep = OCPP_READINGS_SHOWN * 2  # a reading is two rows: the charger's call and our answer
    if n <= keep * 2:
        rows += list(s.scalars(base.where(readings)))
        left_out = 0
    else:
        rows += list(s.scalars(base.where(readings).order_by(OcppMessage.at, OcppMessage.id).limit(keep)))
        rows += list(s.scalars(base.where(readings).order_by(OcppMessage.at.desc(), OcppMessage.id.desc()).limit(keep)))
        left_out = n - 2 * keep
    rows.sort(key=lambda m: (m.at, m.id))
    return rows, left_out


def session_timeline(s: Session, cs: ChargingSession, scope: int | None) -> tuple[list[Event], dict[str, Any]]:
    """Everything known about a session, oldest first, and the related rows the page lists beside it."""
    tl = Timeline()
    cur = cs.currency
    tl.add(cs.created_at, "session", _("Session created"),
           detail=_("%(kind)s, hold %(hold)s", kind=cs.payment_kind.value, hold=_money(cs.hold_minor, cur)))
    tl.add(cs.requested_at, "session", _("Start requested"),
           detail=_("deadline %(at)s", at=console_time_filter(cs.start_deadline, cs.time_zone)) if cs.start_deadline else "")
    tl.add(cs.started_at, "session", _("Charging started"),
           detail=_("meter %(wh)s Wh", wh=cs.meter_start_wh) if cs.meter_start_wh is not None else "")
    tl.add(cs.stop_requested_at, "session", _("Stop requested by %(who)s", who=cs.stop_requested_by or "?"))
    tl.add(cs.stopped_at, "session", _("Charging stopped"),
           detail=_("reason %(reason)s, meter %(wh)s Wh", reason=cs.stop_reason or "?", wh=cs.meter_stop_wh))
    tl.add(cs.ended_at, "session", _("Car left"), detail=_("energy %(wh)s Wh", wh=cs.energy_wh))
    tl.add(cs.settled_at, "session", _("Settled"),
           detail=_("priced %(cost)s, captured %(captured)s", cost=_money(cs.final_incl_vat_minor, cur),
                    captured=_money(cs.captured_minor, cur)))
    if cs.state not in ACTIVE_STATES and cs.state not in (SessionState.COMPLETED,):
        tl.add(cs.updated_at, "session", _("Ended as %(state)s", state=cs.state.value), detail=cs.failure_code or cs.anomaly or "")

    payment: CardPayment | None = cs.card_payment
    email_refs = [f"session:{cs.id}"]
    if payment is not None:
        card = f"{payment.card_brand or ''} •••• {payment.card_last4}" if payment.card_last4 else ""
        tl.add(payment.created_at, "payment", _("Card hold of %(amount)s created", amount=_money(payment.amount_minor, payment.currency)),
               detail=" · ".join(x for x in (card, payment.provider_payment_id or "") if x))
        outcome = _("Card payment now %(state)s", state=payment.state.value)
        detail = _("captured %(captured)s, refunded %(refunded)s", captured=_money(payment.captured_minor, payment.currency),
                   refunded=_money(payment.refunded_minor, payment.currency))
        if payment.failure_code:
            detail += f" · {payment.failure_code}: {payment.failure_message or ''}"
        tl.add(payment.updated_at, "payment", outcome, detail=detail)
        for rf in payment.refunds:
            tl.add(rf.created_at, "payment", _("Card refund of %(amount)s: %(status)s", amount=_money(rf.amount_minor, payment.currency),
                                                status=rf.status), detail=rf.reason)
        if payment.provider_payment_id:
            for ev in s.scalars(select(ProviderEvent).where(ProviderEvent.provider_payment_id == payment.provider_payment_id)
                                .order_by(ProviderEvent.id)):
                tl.add(ev.received_at, "provider", _("Webhook %(type)s", type=ev.type), detail=f"{ev.event_id} · {ev.outcome or ''}")
        email_refs.append(f"card_payment:{payment.id}")

    messages, left_out = ocpp_messages(s, cs.id)
    for m in messages:
        arrow = "→" if m.direction == "out" else "←"
        tl.add(m.at, "ocpp", f"{arrow} {m.action}", code=_short(m.payload))
    for c in s.scalars(select(ChargeCommand).where(ChargeCommand.session_id == cs.id).order_by(ChargeCommand.id)):
        tl.add(c.created_at, "command", _("%(action)s: %(status)s", action=c.action, status=c.status.value),
               detail=_("by %(who)s", who=c.requested_by) + (f" · {_short(c.response, 200)}" if c.response else ""))

    _add_ledger(tl, s, ledger_entries(s, [f"session:{cs.id}"], [f"session:{cs.id}:"]))

    docs = list(s.scalars(select(Document).where(Document.source == f"session:{cs.id}").order_by(Document.id)))
    for d in docs:
        tl.add(d.issued_at, "document", _document_title(d), url=url_for("support.document", number=d.number))
        email_refs.append(f"document:{d.id}")
    emails = list(s.scalars(select(SentEmail).where(SentEmail.reference.in_(email_refs)).order_by(SentEmail.id)))
    _add_emails(tl, emails, cs.time_zone)
    tickets = _tickets(s, scope, session_id=cs.id)
    _add_tickets(tl, tickets)
    _add_audit(tl, audit_for(s, "session", cs.id))
    _add_approvals(tl, s, "session", [cs.id])
    invoice = next((d for d in reversed(docs) if d.kind != DocumentKind.CREDIT_NOTE), None)
    return tl.sorted(), {"payment": payment, "documents": docs, "invoice": invoice, "emails": emails, "tickets": tickets,
                         "ocpp_left_out": left_out}


@bp.route("/sessions/<int(max=2147483647):session_id>", endpoint="session")
def session_page(session_id: int):
    """A session's header (site, connector, driver, state, amounts) and its whole timeline; another operator's: 404."""
    s = db_session()
    cs = s.get(ChargingSession, session_id)
    if cs is None:
        abort(404)
    operator_id = operator_of_session(cs)
    require_visible(operator_id)
    events, related = session_timeline(s, cs, staff_scope())
    connector = cs.connector
    site = connector.charger.site
    return render_template(
        "support/session.html", cs=cs, connector=connector, charger=connector.charger, site=site, operator=site.operator,
        operator_id=operator_id, driver=cs.user, events=events, kind_labels=KIND_LABELS, ticket_url=ticket_url, **related,
    )


# --------------------------------------------------------------------------- documents


def document_relations(s: Session, doc: Document) -> dict[str, Any]:
    """What a document belongs to (session, meter, bill, card payment) and its related documents."""
    rel: dict[str, Any] = {"session": None, "meter": None, "bill": None, "payment": None, "tenant": None}
    kind, _sep, ident = doc.source.partition(":")
    if kind == "session" and ident.isdigit():
        rel["session"] = s.get(ChargingSession, int(ident))
    elif kind == "card_payment" and ident.isdigit():
        row = s.get(CardPayment, int(ident))
        rel["payment"] = row
        if row is not None:
            target = payment_target(s, row)
            rel["meter"], rel["bill"] = target.meter, target.bill
    elif kind == "bill" and ident.isdigit():
        rel["bill"] = s.get(Bill, int(ident))
    elif kind == "tenant" and ident.isdigit():  # a prepaid meter's monthly invoice: tenant:<id>:prepaid:<period>
        rel["tenant"] = s.get(Tenant, int(ident))
    if rel["bill"] is not None and rel["tenant"] is None:
        rel["tenant"] = s.get(Tenant, rel["bill"].tenant_id)
    if rel["meter"] is None:
        code = (_content(doc).get("meter") or {}).get("code")
        if code:
            rel["meter"] = s.scalar(select(Meter).where(Meter.meter_code == code))
        elif rel["tenant"] is not None and rel["tenant"].meters:
            rel["meter"] = rel["tenant"].meters[0]
    rel["credit_notes"] = list(s.scalars(select(Document).where(Document.original_id == doc.id).order_by(Document.id)))
    rel["original"] = s.get(Document, doc.original_id) if doc.original_id else None
    rel["replaces"] = s.get(Document, doc.replaces_id) if doc.replaces_id else None
    rel["replaced_by"] = list(s.scalars(select(Document).where(Document.replaces_id == doc.id).order_by(Document.id)))
    return rel


def _content(doc: Document) -> dict:
    try:
        data = json.loads(doc.content)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@bp.route("/documents/<string(maxlength=40):number>", endpoint="document")
def document_page(number: str):
    """A document: lines, VAT, totals, credit notes, emails, what it belongs to; another operator's: 404."""
    s = db_session()
    doc = s.scalar(select(Document).where(Document.number == number.upper()))
    if doc is None:
        abort(404)
    operator_id = operator_of_document(doc)
    require_visible(operator_id)
    scope = staff_scope()
    rel = document_relations(s, doc)
    content = _content(doc)
    related_ids = [doc.id] + [d.id for d in rel["credit_notes"]]
    emails = list(s.scalars(select(SentEmail).where(SentEmail.reference.in_([f"document:{i}" for i in related_ids]))
                            .order_by(SentEmail.id)))
    tl = Timeline()
    tl.add(doc.issued_at, "document", _document_title(doc))
    for d in rel["credit_notes"] + rel["replaced_by"]:
        tl.add(d.issued_at, "document", _document_title(d), url=url_for("support.document", number=d.number))
    _add_emails(tl, emails, _document_zone(doc))
    tickets = _tickets(s, scope, document_number=doc.number)
    _add_tickets(tl, tickets)
    _add_audit(tl, audit_for(s, "document", [doc.number, doc.id]))
    _add_approvals(tl, s, "document", [doc.number, doc.id])
    return render_template(
        "support/document.html", doc=doc, operator_id=operator_id, content=content, lines=content.get("lines") or [],
        vat=content.get("vat") or [], events=tl.sorted(), kind_labels=KIND_LABELS, kind_label=DOCUMENT_KINDS.get(doc.kind, doc.kind),
        tickets=tickets, emails=emails, ticket_url=ticket_url, **rel,
    )


# --------------------------------------------------------------------------- meters


@bp.route("/meters/<string(maxlength=16):meter_code>", endpoint="meter")
def meter_page(meter_code: str):
    """A meter: tenant, balance, relay, readings, top-ups, bills, relay commands, documents, emails, tickets; another operator's: 404."""
    from webapp.meters import topup

    s = db_session()
    meter = s.scalar(select(Meter).where(Meter.meter_code.in_(list(dict.fromkeys([meter_code, meter_code.upper()])))))
    if meter is None:
        abort(404)
    operator_id = meter.site.operator_id
    require_visible(operator_id)
    scope = staff_scope()
    tenant = meter.tenant
    balance = topup.meter_balance(s, meter)
    ref = topup.meter_ref(meter)
    readings = list(s.scalars(select(MeterReading).where(MeterReading.meter_id == meter.id)
                              .order_by(MeterReading.at.desc()).limit(10)))
    top_ups = list(s.scalars(select(CardPayment).where(CardPayment.purpose == Purpose.METER_TOP_UP, CardPayment.reference == ref)
                             .order_by(CardPayment.id.desc()).limit(30)))
    wallet_acct = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.METER_WALLET, LedgerAccount.owner == ref))
    movements = ledger_statement(s, wallet_acct, limit=30) if wallet_acct is not None else []
    bills = list(s.scalars(select(Bill).where(Bill.tenant_id == tenant.id).order_by(Bill.period.desc()).limit(12))) if tenant else []
    relay = list(s.scalars(select(RelayCommand).where(RelayCommand.meter_id == meter.id).order_by(RelayCommand.id.desc()).limit(20)))

    sources = [f"card_payment:{p.id}" for p in top_ups]
    sources += [f"journal_entry:{i}" for i in s.scalars(select(JournalEntry.id).where(JournalEntry.reference == ref))]
    sources += [f"bill:{b.id}" for b in bills]
    doc_q = Document.source.in_(sources)
    if tenant is not None:  # its prepaid consumption invoices: tenant:<id>:prepaid:<period>
        doc_q = or_(doc_q, Document.source.like(f"tenant:{tenant.id}:prepaid:%"))
    documents = list(s.scalars(select(Document).where(doc_q).order_by(Document.id.desc()).limit(30)))

    refs = [f"relay_command:{c.id}" for c in relay] + [f"bill:{b.id}" for b in bills] + [f"document:{d.id}" for d in documents]
    refs += [f"card_payment:{p.id}" for p in top_ups]
    if tenant is not None:
        refs.append(f"tenant:{tenant.id}:meter:{meter.id}")
    emails = list(s.scalars(select(SentEmail).where(SentEmail.reference.in_(refs)).order_by(SentEmail.id.desc()).limit(30)))
    tickets = _tickets(s, scope, meter_id=meter.id)
    audit = audit_for(s, "meter", [meter.meter_code, meter.id])
    return render_template(
        "support/meter.html", meter=meter, site=meter.site, tenant=tenant, operator_id=operator_id, balance=balance,
        readings=readings, top_ups=top_ups, movements=movements, bills=bills, relay=relay, documents=documents, emails=emails,
        tickets=tickets, audit=audit, ticket_url=ticket_url, document_kinds=DOCUMENT_KINDS,
    )


# --------------------------------------------------------------------------- the queue


@dataclass
class QueueItem:
    """Something a person must look at: since when, why, and where."""

    since: dt.datetime
    reason: str  # a stable code: review, hold_not_released, start_stuck, pending_stuck, stop_stuck, idle_stuck, settle_stuck, silent
    label: str
    detail: str = ""
    url: str | None = None
    title: str = ""
    amount: str = ""
    age: str = ""


def _first_stop_commands(s: Session, session_ids: Sequence[int]) -> dict[int, dt.datetime]:
    if not session_ids:
        return {}
    rows = s.execute(select(ChargeCommand.session_id, func.min(ChargeCommand.created_at))
                     .where(ChargeCommand.session_id.in_(list(session_ids)), ChargeCommand.action == "RemoteStopTransaction")
                     .group_by(ChargeCommand.session_id)).all()
    return {sid: at if at.tzinfo else at.replace(tzinfo=dt.UTC) for sid, at in rows}


def stuck_reason(cs: ChargingSession, now: dt.datetime, first_stop: dt.datetime | None = None) -> tuple[str, dt.datetime] | None:
    """Why an active session is stuck, and since when; None while it is on its way (see ``abnormal_sessions``)."""
    st = cs.state
    if st == SessionState.START_REQUESTED and cs.start_deadline is not None and cs.start_deadline < now - WATCHDOG_GRACE:
        return "start_stuck", cs.start_deadline
    if st in (SessionState.PENDING, SessionState.AUTHORIZED):
        deadline = cs.updated_at + charging.PENDING_TIMEOUT
        if deadline < now - WATCHDOG_GRACE:
            return "pending_stuck", deadline
    if st == SessionState.CHARGING:
        asked = first_stop or cs.stop_requested_at
        if cs.stop_requested_at is not None and asked is not None and asked < now - STOP_STUCK:
            return "stop_stuck", asked
        if cs.last_message_at is not None and cs.last_message_at + charging.SILENCE_TIMEOUT < now - WATCHDOG_GRACE:
            return "silent", cs.last_message_at + charging.SILENCE_TIMEOUT
    if st == SessionState.FINISHING:
        if cs.ended_at is None and cs.stopped_at is not None:
            limit = cs.stopped_at + dt.timedelta(seconds=cs.max_idle_s)
            if limit < now - WATCHDOG_GRACE:
                return "idle_stuck", limit
        if cs.ended_at is not None and cs.ended_at < now - SETTLE_STUCK:
            return "settle_stuck", cs.ended_at
    return None


QUEUE_LABELS = {
    "review": _l("In review"),
    "hold_not_released": _l("Hold not released after the session ended"),
    "start_stuck": _l("Start requested; no start by the deadline"),
    "pending_stuck": _l("Payment not confirmed in time"),
    "stop_stuck": _l("Stop requested; still charging"),
    "idle_stuck": _l("Car idle past the hold's allowance"),
    "settle_stuck": _l("Car left; not billed yet"),
    "silent": _l("Charger silent for too long"),
}


def abnormal_sessions(s: Session, scope: int | None, now: dt.datetime) -> list[tuple[QueueItem, ChargingSession]]:
    """Sessions a person must look at, oldest first. The rules (``since`` is when it became abnormal):

    * ``review``: the session is in ``review`` (the reason is its ``failure_code``:
      capture_failed, meter_backwards, no_stop, pricing_failed, ...); since its last change.
    * ``hold_not_released``: ended without a capture pending (any ended state but
      ``review``, which keeps its hold on purpose) more than ``HOLD_RELEASE_GRACE``
      ago, and still holding money: its card payment still ``authorized``,
      ``requires_action`` or ``processing``, or its wallet hold entry
      (``session:<id>:wallet:hold``) without the settling entry; since it ended.
    * stuck past a deadline by more than ``WATCHDOG_GRACE`` (the watchdog,
      ``webapp.charging.jobs``, acts on each of these every minute, so a session
      still there was missed, or its step keeps failing):
      ``start_stuck`` — ``start_requested`` past its ``start_deadline``;
      ``pending_stuck`` — ``pending``/``authorized`` not moved for ``PENDING_TIMEOUT``;
      ``idle_stuck`` — ``finishing``, car not gone, past ``stopped_at + max_idle_s``;
      ``silent`` — ``charging`` with no word from the charger for ``SILENCE_TIMEOUT``.
    * ``stop_stuck``: ``charging`` more than ``STOP_STUCK`` after the first
      RemoteStopTransaction sent for it (the gateway asks again every 30 s while
      readings come; ``stop_requested_at`` moves with each ask, the first command does not).
    * ``settle_stuck``: ``finishing`` with the car gone more than ``SETTLE_STUCK``
      ago and not billed (the provider keeps failing; after the last retry it goes to review).
    """
    items: list[tuple[QueueItem, ChargingSession]] = []

    def add(cs: ChargingSession, reason: str, since: dt.datetime, detail: str = "") -> None:
        item = QueueItem(since, reason, str(QUEUE_LABELS[reason]), detail=detail, url=url_for("support.session", session_id=cs.id),
                         title=_("Session #%(id)s", id=cs.id), amount=_money(cs.hold_minor, cs.currency))
        items.append((item, cs))

    S = ChargingSession
    review_q = select(S).where(S.state == SessionState.REVIEW)
    for cs in s.scalars(_sessions_in_scope(review_q, scope).order_by(S.updated_at).limit(QUEUE_LIMIT)):
        add(cs, "review", cs.updated_at, cs.failure_code or cs.anomaly or "")

    ended = [st for st in ENDED_STATES if st != SessionState.REVIEW]
    cutoff = now - HOLD_RELEASE_GRACE
    card_q = (select(S).join(CardPayment, CardPayment.id == S.card_payment_id)
              .where(S.state.in_(ended), S.updated_at < cutoff,
                     CardPayment.state.in_([CardState.AUTHORIZED, CardState.REQUIRES_ACTION, CardState.PROCESSING])))
    for cs in s.scalars(_sessions_in_scope(card_q, scope).order_by(S.updated_at).limit(QUEUE_LIMIT)):
        add(cs, "hold_not_released", cs.updated_at, _("card payment %(state)s", state=cs.card_payment.state.value))
    # Wallet holds: only owners whose hold account holds something can have one left (the account's cached balance).
    holding = select(LedgerAccount.owner).where(LedgerAccount.kind == AccountKind.WALLET_HOLD, LedgerAccount.balance_minor != 0)
    key = literal("session:", String) + cast(S.id, String)
    hold_entry = exists().where(JournalEntry.idempotency_key == key + literal(":wallet:hold", String))
    settle_entry = exists().where(JournalEntry.idempotency_key == key + literal(":wallet:settle", String))
    wallet_q = select(S).where(S.payment_kind == PaymentKind.WALLET, S.state.in_(ended), S.updated_at < cutoff,
                               S.owner.in_(holding), hold_entry, ~settle_entry)
    for cs in s.scalars(_sessions_in_scope(wallet_q, scope).order_by(S.updated_at).limit(QUEUE_LIMIT)):
        add(cs, "hold_not_released", cs.updated_at, _("wallet hold"))

    active = list(s.scalars(_sessions_in_scope(select(S).where(S.state.in_(list(ACTIVE_STATES))), scope)))
    charging_ids = [cs.id for cs in active if cs.state == SessionState.CHARGING and cs.stop_requested_at is not None]
    first_stops = _first_stop_commands(s, charging_ids)
    for cs in active:
        found = stuck_reason(cs, now, first_stops.get(cs.id))
        if found is not None:
            reason, since = found
            add(cs, reason, since, cs.state.value)
    items.sort(key=lambda pair: (pair[0].since, pair[1].id))
    for item, _cs in items:
        item.age = _age(item.since, now)
    return items


def failed_payments(s: Session, scope: int | None, now: dt.datetime,
                    days: int = FAILED_PAYMENT_DAYS) -> list[tuple[QueueItem, CardPayment]]:
    """Card payments that failed in the last ``days`` days, oldest first, visible to ``scope``.

    Every purpose: a session's card hold refused, a meter top-up declined, a
    bill's payment failed (unless the bill was paid since), a wallet top-up
    (the platform's: platform support only). ``since`` is the payment's last
    change (when it failed). A later successful attempt of the same payment
    (a new card after 3-D Secure failed) takes it off the list.
    """
    since = now - dt.timedelta(days=days)
    rows = s.scalars(select(CardPayment).where(CardPayment.state == CardState.FAILED, CardPayment.updated_at >= since)
                     .order_by(CardPayment.updated_at, CardPayment.id).limit(QUEUE_LIMIT * 4)).all()
    out: list[tuple[QueueItem, CardPayment]] = []
    for row in rows:
        target = payment_target(s, row)
        if not _visible_to(scope, target.operator_id):
            continue
        if target.bill is not None and target.bill.state == BillState.PAID:
            continue
        card = f"{row.card_brand or ''} •••• {row.card_last4}" if row.card_last4 else ""
        detail = " · ".join(x for x in (row.failure_code or "", _short(row.failure_message, 120), card, row.email or "") if x)
        item = QueueItem(row.updated_at, row.purpose.value, target.label, detail=detail, url=target.url, title=row.purpose.value,
                         amount=_money(row.amount_minor, row.currency), age=_age(row.updated_at, now))
        out.append((item, row))
        if len(out) >= QUEUE_LIMIT:
            break
    return out


PURPOSE_LABELS = {
    Purpose.CHARGING_SESSION.value: _l("Charging hold"), Purpose.METER_TOP_UP.value: _l("Meter top-up"),
    Purpose.BILL.value: _l("Bill"), Purpose.WALLET_TOP_UP.value: _l("Wallet top-up"),
}


@bp.route("/queue", endpoint="queue")
def queue():
    """Abnormal sessions and failed payments, oldest first, with their age; the count of open tickets."""
    s = db_session()
    scope = staff_scope()
    now = utcnow()
    raw = (request.args.get("days") or "").strip()
    error = None
    days = FAILED_PAYMENT_DAYS
    if raw:
        if raw.isdigit() and 1 <= int(raw) <= 90:
            days = int(raw)
        else:
            error = _("Days: enter a whole number from 1 to 90.")
    open_q = select(func.count(Ticket.id), func.min(Ticket.created_at)).where(Ticket.state == TicketState.OPEN)
    if scope is not None:
        open_q = open_q.where(Ticket.operator_id == scope)
    open_tickets, oldest = s.execute(open_q).one()
    if oldest is not None and oldest.tzinfo is None:  # an aggregate over SQLite's naive UTC text
        oldest = oldest.replace(tzinfo=dt.UTC)
    return render_template(
        "support/queue.html", sessions=abnormal_sessions(s, scope, now), payments=failed_payments(s, scope, now, days), days=days,
        open_tickets=open_tickets or 0, oldest_ticket_age=_age(oldest, now) if oldest is not None else None,
        purpose_labels=PURPOSE_LABELS, error=error,
    ), 400 if error else 200


# --------------------------------------------------------------------------- the audit log


@dataclass
class AuditFilters:
    """The audit log's filters as typed (strings) and as parsed."""

    object_type: str = ""
    object_id: str = ""
    actor: str = ""
    action: str = ""
    start: dt.date | None = None
    end: dt.date | None = None
    page: int = 1

    def args(self) -> dict[str, str]:
        """The filters as query arguments (for links to other pages and the CSV)."""
        out = {"object_type": self.object_type, "object_id": self.object_id, "actor": self.actor, "action": self.action,
               "from": self.start.isoformat() if self.start else "", "to": self.end.isoformat() if self.end else ""}
        return {k: v for k, v in out.items() if v}


def parse_audit_filters(args) -> AuditFilters:
    """Read the filters from the query string; raises BadInput with a message a person understands."""
    f = AuditFilters(
        object_type=(args.get("object_type") or "").strip()[:32], object_id=(args.get("object_id") or "").strip()[:64],
        actor=(args.get("actor") or "").strip()[:254], action=(args.get("action") or "").strip()[:64],
    )
    f.start = _parse_day(args.get("from"), _("From"))
    f.end = _parse_day(args.get("to"), _("To"))
    if f.start and f.end and f.end < f.start:
        raise BadInput(_("The end date is before the start date."))
    page = (args.get("page") or "1").strip()
    if not page.isdigit() or not 1 <= int(page) <= 100_000:
        raise BadInput(_("Page: enter a whole number from 1."))
    f.page = int(page)
    return f


def audit_query(f: AuditFilters, scope: int | None):
    """The audit entries matching ``f`` that ``scope`` may see, newest first."""
    q = select(AuditEntry)
    if scope is not None:
        q = q.where(AuditEntry.operator_id == scope)
    if f.object_type:
        q = q.where(AuditEntry.object_type == f.object_type)
    if f.object_id:
        q = q.where(AuditEntry.object_id == f.object_id)
    if f.actor:
        q = q.where(func.lower(AuditEntry.actor_email).contains(f.actor.lower(), autoescape=True))
    if f.action:
        q = q.where(AuditEntry.action == f.action)
    if f.start:
        q = q.where(AuditEntry.at >= dt.datetime.combine(f.start, dt.time(), tzinfo=dt.UTC))
    if f.end:
        q = q.where(AuditEntry.at < dt.datetime.combine(f.end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC))
    return q.order_by(AuditEntry.at.desc(), AuditEntry.id.desc())


@bp.route("/audit", endpoint="audit")
def audit():
    """The audit log, filtered, newest first, a page at a time."""
    s = db_session()
    try:
        f = parse_audit_filters(request.args)
    except BadInput as e:
        return render_template("support/audit.html", filters=AuditFilters(), entries=[], error=str(e), has_next=False,
                               object_links=_object_links), 400
    rows = list(s.scalars(audit_query(f, staff_scope()).offset((f.page - 1) * AUDIT_PAGE).limit(AUDIT_PAGE + 1)))
    return render_template("support/audit.html", filters=f, entries=rows[:AUDIT_PAGE], has_next=len(rows) > AUDIT_PAGE, error=None,
                           object_links=_object_links)


def _object_links(entry: AuditEntry) -> str | None:
    """The console page of an audit entry's object, when it has one."""
    t, ident = entry.object_type, entry.object_id
    if t == "session" and ident.isdigit() and int(ident) <= MAX_ID:
        return url_for("support.session", session_id=int(ident))
    if t == "document" and ident and not ident.isdigit():
        return url_for("support.document", number=ident)
    if t == "meter" and ident and not ident.isdigit():
        return url_for("support.meter", meter_code=ident)
    if t == "ticket" and ident.isdigit() and "support.ticket" in current_app.view_functions:
        try:
            return url_for("support.ticket", ticket_id=int(ident))
        except BuildError:
            return None
    if t == "approval" and "support.approvals" in current_app.view_functions:
        return url_for("support.approvals")
    return None


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula gets a leading apostrophe."""
    text = "" if value is None else (value.isoformat() if isinstance(value, dt.datetime) else str(value))
    return "'" + text if text.startswith(_FORMULA_START) else text


AUDIT_COLUMNS = ("id", "at", "actor_email", "actor_role", "operator_id", "action", "object_type", "object_id", "reason", "outcome",
                 "before", "after", "request_id")


@bp.route("/audit.csv", endpoint="audit_csv")
def audit_csv():
    """The audit log's rows for the same filters, as CSV (every page, newest first)."""
    try:
        f = parse_audit_filters(request.args)
    except BadInput as e:
        return Response(str(e) + "\n", status=400, mimetype="text/plain")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(AUDIT_COLUMNS)
    for a in db_session().scalars(audit_query(f, staff_scope()).limit(AUDIT_CSV_MAX)):
        w.writerow([csv_cell(v) for v in (a.id, a.at, a.actor_email, a.actor_role, a.operator_id, a.action, a.object_type, a.object_id,
                                           a.reason, a.outcome, a.before_json, a.after_json, a.request_id)])
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return Response(buf.getvalue().encode("utf-8"), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.csv"', "Cache-Control": "no-store"})


__all__ = [
    "AuditFilters", "BadInput", "Event", "PaymentTarget", "QueueItem", "SearchResults", "abnormal_sessions", "audit_for", "audit_query",
    "csv_cell", "document_relations", "failed_payments", "ledger_entries", "ocpp_messages", "operator_of_document",
    "operator_of_session", "parse_audit_filters", "payment_target", "search", "session_timeline", "stuck_reason", "ticket_url",
]
