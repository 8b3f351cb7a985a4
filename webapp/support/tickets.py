"""Contact and tickets: the contact form, the customer's ticket page, and the tickets of the support console.

**The contact form** (``/contact``, anyone, signed in or guest) opens a
ticket. Started from a page, it carries what that page was about, from the
query string: ``session=<id>`` (a charging session), ``document=<number>``
(a receipt, invoice or credit note), ``meter=<meter_code>`` and
``topic=<category>`` (the category picked in advance). An object is attached
only if this person may see it — their own session or document, or a
guest's whose access this browser holds (the session's link token remembered
by the charging pages, or a document opened with its emailed ``?k=`` link);
a meter's public page is anyone's, so any existing meter is. Anything else is
silently left out, exactly like an id that does not exist. The ticket's
operator is the operator of the attached object's site (session first, then
document, then meter); without one it is a general question that only
platform support sees. The references stay in the form's address, so they are
checked again when it is sent.

One address (IP) may open ``CONTACT_RATE_LIMIT`` tickets (only opened
tickets count, not a form sent back with a mistake); past that it gets a
page saying its earlier messages reached us and when it can write again.

**The ticket page** (``/tickets/<reference>``) opens with the ticket's link
(``?k=``, emailed to the customer: see ``webapp.support.ticket_emails``), in
the browser that wrote it or opened that link (it remembers the ticket in its
Flask session, and the key leaves the address bar, as with a guest's session
link), or for the signed-in account that opened it; anyone else, and a wrong
key, gets 404. The customer
reads the thread there and answers: an answer moves a ``waiting`` ticket back
to ``open`` and reopens a ``closed`` one. Answers are limited per ticket by
the same setting. ``/account/tickets`` lists a signed-in customer's tickets.

**The console** (``/support/tickets``): the queue (open tickets, the customer
who has waited longest first; or waiting, closed, all), one ticket with its
thread, customer and attached objects, and the staff actions: answer (emails
the customer the answer and the ticket's link; the ticket then waits for
the customer), close and reopen with a reason. Each action writes its audit
entry (``ticket_reply``, ``ticket_close``, ``ticket_reopen``, with the state
before and after) in the action's own transaction. Staff see the tickets of
their own operator only (``staff_scope``); another operator's ticket is 404.

A form sent twice (a double click, a retried request) adds its message once:
a message identical to the thread's last one from the same side within
``DUPLICATE_WINDOW`` is taken as the same message.

``tickets_for`` finds the tickets about a session, a document, a meter or
from an email address, for the support timeline.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from babel.dates import format_datetime
from flask import abort, current_app, flash, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from werkzeug.routing import BuildError
from wtforms import EmailField, SelectChoice, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, Length, Optional

from payments.invoicing import Document, DocumentKind
from webapp.auth.forms import normalize_email
from webapp.charging import service as charging
from webapp.charging.models import ChargingSession
from webapp.db import db_session, utcnow
from webapp.errors import problem_response, wants_json
from webapp.extensions import limiter
from webapp.models import Meter, Operator, User
from webapp.support import audit, bp, contact_bp, require_visible, staff_scope
from webapp.support.models import AuditEntry, Ticket, TicketCategory, TicketMessage, TicketState
from webapp.support.ticket_emails import new_link_token, schedule_opened, schedule_reply, token_hash, token_matches

GUEST_TOKENS = "charging_guest_tokens"  # the charging pages' remembered guest link tokens (webapp.charging.views)
SENT = "contact_sent"  # Flask session: the ticket just opened in this browser, for the confirmation page
LINKED = "tickets_by_link"  # Flask session: ids of the tickets this browser opened (or opened with their link)
MAX_REMEMBERED = 20  # tickets remembered per browser (the cookie stays small)
REFERENCE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: read aloud or typed from an email
REFERENCE = re.compile(r"T-[2-9A-HJ-NP-Z]{8}")
SESSION_ID = re.compile(r"[0-9]{1,10}")
DOCUMENT_NUMBER = re.compile(r"[A-Z0-9]{1,24}(?:-[A-Z0-9]{1,24}){1,4}")  # as webapp.receipts.views.NUMBER
METER_CODE = re.compile(r"[A-Za-z0-9_-]{1,16}")  # as webapp.meters.views.CODE
MAX_ID = 2**31 - 1
NAME_MAX = 120
SUBJECT_MAX = 200
MESSAGE_MAX = 5000
REASON_MAX = 500
QUEUE_PAGE = 200
DUPLICATE_WINDOW = dt.timedelta(minutes=2)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # a NUL cannot even be stored in PostgreSQL text

CATEGORY_LABELS = {
    TicketCategory.CHARGING: _l("Charging: did not start, stopped, or cost more than expected"),
    TicketCategory.PAYMENT: _l("Payment: card declined, hold not released, refund"),
    TicketCategory.RECEIPT: _l("Receipt or invoice"),
    TicketCategory.METER: _l("Prepaid meter: balance, top-up, power cut"),
    TicketCategory.BILL: _l("Electricity bill"),
    TicketCategory.ACCOUNT: _l("My account"),
    TicketCategory.OTHER: _l("Something else"),
}
CATEGORY_SHORT = {
    TicketCategory.CHARGING: _l("Charging"), TicketCategory.PAYMENT: _l("Payment"), TicketCategory.RECEIPT: _l("Receipt or invoice"),
    TicketCategory.METER: _l("Prepaid meter"), TicketCategory.BILL: _l("Electricity bill"), TicketCategory.ACCOUNT: _l("Account"),
    TicketCategory.OTHER: _l("Other"),
}
# The state as the customer reads it, and as staff read it.
CUSTOMER_STATE = {
    TicketState.OPEN: _l("Waiting for our answer"),
    TicketState.WAITING: _l("Answered: waiting for you"),
    TicketState.CLOSED: _l("Closed"),
}
STAFF_STATE = {
    TicketState.OPEN: _l("Open"),
    TicketState.WAITING: _l("Waiting for the customer"),
    TicketState.CLOSED: _l("Closed"),
}
QUEUE_FILTERS = ("open", "waiting", "closed", "all")
AUDIT_ACTIONS = {"ticket_reply": _l("Answered"), "ticket_close": _l("Closed"), "ticket_reopen": _l("Reopened")}


# --------------------------------------------------------------------------- forms


def clean_line(value: str | None) -> str:
    """One line of text: control characters dropped, runs of whitespace (newlines too) made one space."""
    return " ".join(_CONTROL.sub("", value or "").split())


def clean_text(value: str | None) -> str:
    """A message: Windows and old Mac line ends made ``\\n``, control characters dropped, outer blank space trimmed."""
    text = (value or "").replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def _message_field(label, required_message):
    return TextAreaField(label, filters=[clean_text],
                         validators=[DataRequired(message=required_message),
                                     Length(max=MESSAGE_MAX, message=_l("At most %(max)d characters.", max=MESSAGE_MAX))],
                         render_kw={"rows": 8, "maxlength": MESSAGE_MAX})


class ContactForm(FlaskForm):
    """A new ticket: who writes, about what, and the message."""

    name = StringField(_l("Your name"), filters=[clean_line],
                       validators=[Optional(), Length(max=NAME_MAX, message=_l("At most %(max)d characters.", max=NAME_MAX))],
                       description=_l("Optional."), render_kw={"autocomplete": "name", "maxlength": NAME_MAX})
    email = EmailField(_l("Your email"), filters=[normalize_email],
                       validators=[DataRequired(message=_l("Enter your email address: we answer there.")),
                                   Email(message=_l("Enter an email address like name@example.com.")),
                                   Length(max=254, message=_l("At most %(max)d characters.", max=254))],
                       description=_l("We send our answers and the link to your ticket here."),
                       render_kw={"autocomplete": "email"})
    category = SelectField(_l("What is it about?"), choices=[SelectChoice(c.value, label) for c, label in CATEGORY_LABELS.items()],
                           validators=[DataRequired(message=_l("Choose what your message is about."))])
    subject = StringField(_l("Subject"), filters=[clean_line],
                          validators=[DataRequired(message=_l("Give your message a short subject.")),
                                      Length(max=SUBJECT_MAX, message=_l("At most %(max)d characters.", max=SUBJECT_MAX))],
                          render_kw={"maxlength": SUBJECT_MAX})
    message = _message_field(_l("Your message"), _l("Write your message: what happened, and what you expected."))


class ReplyForm(FlaskForm):
    """A customer's answer on their ticket's page."""

    message = _message_field(_l("Your answer"), _l("Write your answer."))


class StaffReplyForm(FlaskForm):
    """Support's answer: emailed to the customer."""

    message = _message_field(_l("Answer to the customer"), _l("Write the answer."))


class StateChangeForm(FlaskForm):
    """Closing or reopening a ticket, with the reason (for the audit log)."""

    reason = StringField(_l("Reason"), filters=[clean_line],
                         validators=[DataRequired(message=_l("Say why: it goes into the audit log.")),
                                     Length(max=REASON_MAX, message=_l("At most %(max)d characters.", max=REASON_MAX))],
                         render_kw={"maxlength": REASON_MAX})


# --------------------------------------------------------------------------- what a ticket is about


@dataclass
class About:
    """The objects a ticket is about (each one checked, or None)."""

    session: ChargingSession | None = None
    document: Document | None = None
    meter: Meter | None = None

    @property
    def operator_id(self) -> int | None:
        """The operator of the attached object's site (session, then document, then meter); None: nothing attached."""
        if self.session is not None:
            return self.session.connector.charger.site.operator_id
        if self.document is not None:
            return document_operator_id(self.document)
        if self.meter is not None:
            return self.meter.site.operator_id
        return None

    def __bool__(self) -> bool:
        return self.session is not None or self.document is not None or self.meter is not None


def document_operator_id(doc: Document) -> int | None:
    """The operator that issued a document (its seller scope ``operator:<id>``); None for the platform's own."""
    kind, _sep, ident = doc.scope.partition(":")
    return int(ident) if kind == "operator" and ident.isdigit() else None


def _user() -> User | None:
    return current_user if current_user.is_authenticated else None


def _session_visible(cs: ChargingSession) -> bool:
    """The session is this person's: their account's, or a guest's whose link token this browser remembers."""
    tokens = session.get(GUEST_TOKENS)
    token = tokens.get(str(cs.id)) if isinstance(tokens, dict) else None
    return charging.visible_to(cs, user=_user(), guest_token=token if isinstance(token, str) else None)


def resolve_about(s: Session, args) -> About:
    """The objects named by the query string (``session``, ``document``, ``meter``) that this person may see."""
    about = About()
    raw = (args.get("session") or "").strip()
    if SESSION_ID.fullmatch(raw) and int(raw) <= MAX_ID:
        cs = s.get(ChargingSession, int(raw))
        if cs is not None and _session_visible(cs):
            about.session = cs
    number = (args.get("document") or "").strip().upper()
    if DOCUMENT_NUMBER.fullmatch(number) and len(number) <= 40:
        from webapp.receipts.views import may_see

        doc = s.scalar(select(Document).where(Document.number == number))
        if doc is not None and may_see(doc):
            about.document = doc
    code = (args.get("meter") or "").strip()
    if METER_CODE.fullmatch(code):
        from webapp.meters.views import find_meter

        about.meter = find_meter(code)  # the meter's page is public (code, building, unit): anyone may name it
    return about


def about_params(about: About) -> dict[str, str]:
    """The query string that names ``about`` again (the form's own address)."""
    params = {}
    if about.session is not None:
        params["session"] = str(about.session.id)
    if about.document is not None:
        params["document"] = about.document.number
    if about.meter is not None:
        params["meter"] = about.meter.meter_code
    return params


def _about_of(s: Session, ticket: Ticket) -> About:
    """The objects a ticket was opened about (as stored)."""
    return About(
        session=s.get(ChargingSession, ticket.session_id) if ticket.session_id else None,
        document=s.scalar(select(Document).where(Document.number == ticket.document_number)) if ticket.document_number else None,
        meter=s.get(Meter, ticket.meter_id) if ticket.meter_id else None,
    )


def _document_label(doc: Document) -> str:
    if doc.kind is DocumentKind.INVOICE:
        return _("Invoice %(number)s", number=doc.number)
    if doc.kind is DocumentKind.CREDIT_NOTE:
        return _("Credit note %(number)s", number=doc.number)
    return _("Receipt %(number)s", number=doc.number)


def about_lines(about: About) -> list[dict]:
    """What a ticket is about, one line per object (``text``; ``kind``; ``obj``), in the current language."""
    lines = []
    if about.session is not None:
        cs = about.session
        connector = cs.connector
        lines.append({"kind": "session", "obj": cs, "text": _("Charging session #%(id)s at %(site)s, connector %(code)s", id=cs.id,
                                                              site=connector.charger.site.name, code=connector.connector_code)})
    if about.document is not None:
        lines.append({"kind": "document", "obj": about.document, "text": _document_label(about.document)})
    if about.meter is not None:
        m = about.meter
        lines.append({"kind": "meter", "obj": m, "text": _("Meter %(code)s at %(site)s", code=m.meter_code, site=m.site.name)})
    return lines


def describe_about(s: Session, ticket: Ticket) -> str | None:
    """What a ticket is about in one line of the current language (None: nothing attached)."""
    lines = about_lines(_about_of(s, ticket))
    return "; ".join(line["text"] for line in lines) or None


# --------------------------------------------------------------------------- the ticket's life (callers commit)


def new_reference(s: Session) -> str:
    """A fresh ticket reference, ``T-`` and eight letters or digits (not 0/O/1/I), unused so far."""
    while True:
        reference = "T-" + "".join(secrets.choice(REFERENCE_ALPHABET) for _i in range(8))
        if s.scalar(select(Ticket.id).where(Ticket.reference == reference)) is None:
            return reference


def open_ticket(
    s: Session, *, email: str, category: TicketCategory, subject: str, message: str, about: About, name: str = "",
    user: User | None = None, locale: str | None = None, now: dt.datetime | None = None,
) -> Ticket:
    """Open a ticket with its first message and schedule the customer's email with the ticket's link. Flushes."""
    now = now or utcnow()
    reference = new_reference(s)
    ticket = Ticket(
        reference=reference, access_token_hash=token_hash(new_link_token(reference)), operator_id=about.operator_id,
        user_id=user.id if user is not None else None, name=name or "", email=email, locale=locale, category=category,
        subject=subject, state=TicketState.OPEN, session_id=about.session.id if about.session is not None else None,
        document_number=about.document.number if about.document is not None else None,
        meter_id=about.meter.id if about.meter is not None else None, created_at=now, updated_at=now, last_customer_message_at=now,
    )
    s.add(ticket)
    s.flush()
    s.add(TicketMessage(ticket_id=ticket.id, from_staff=False, author_id=ticket.user_id, body=message, created_at=now))
    s.flush()
    schedule_opened(s, ticket)
    return ticket


def _locked(s: Session, ticket_id: int) -> Ticket | None:
    """The ticket, locked until the transaction ends (two answers at once change its state one after the other)."""
    return s.scalar(select(Ticket).where(Ticket.id == ticket_id).with_for_update().execution_options(populate_existing=True))


def _repeated(s: Session, ticket: Ticket, *, from_staff: bool, body: str, now: dt.datetime) -> TicketMessage | None:
    """The thread's last message if it is this one again (same side, same text, just now): a form sent twice."""
    last = s.scalar(select(TicketMessage).where(TicketMessage.ticket_id == ticket.id).order_by(TicketMessage.id.desc()).limit(1))
    if last is not None and last.from_staff == from_staff and last.body == body and last.created_at >= now - DUPLICATE_WINDOW:
        return last
    return None


def customer_reply(s: Session, ticket: Ticket, body: str, *, user: User | None = None, now: dt.datetime | None = None) -> TicketMessage:
    """The customer answers: the ticket is support's turn again (``open``; a closed one reopens). Flushes."""
    now = now or utcnow()
    ticket = _locked(s, ticket.id) or ticket
    same = _repeated(s, ticket, from_staff=False, body=body, now=now)
    if same is not None:
        return same
    message = TicketMessage(ticket_id=ticket.id, from_staff=False, author_id=user.id if user is not None and ticket.user_id == user.id else None,
                            body=body, created_at=now)
    s.add(message)
    ticket.state = TicketState.OPEN
    ticket.closed_at = None
    ticket.last_customer_message_at = now
    ticket.updated_at = now
    s.flush()
    return message


def staff_reply(s: Session, ticket: Ticket, body: str, *, staff: User, now: dt.datetime | None = None) -> TicketMessage:
    """Support answers: the message, the email to the customer, the audit entry; the ticket then waits for the customer. Flushes."""
    now = now or utcnow()
    ticket = _locked(s, ticket.id) or ticket
    same = _repeated(s, ticket, from_staff=True, body=body, now=now)
    if same is not None:
        return same
    before = ticket.state
    message = TicketMessage(ticket_id=ticket.id, from_staff=True, author_id=staff.id, body=body, created_at=now)
    s.add(message)
    ticket.state = TicketState.WAITING
    ticket.closed_at = None
    ticket.updated_at = now
    if ticket.assignee_id is None:
        ticket.assignee_id = staff.id  # who answered first looks after it
    s.flush()
    schedule_reply(s, ticket, message)
    audit.record(s, action="ticket_reply", object_type="ticket", object_id=ticket.id, operator_id=ticket.operator_id, actor=staff,
                 before={"state": before.value}, after={"state": ticket.state.value, "message_id": message.id})
    s.flush()
    return message


def close_ticket(s: Session, ticket: Ticket, *, reason: str, staff: User, now: dt.datetime | None = None) -> bool:
    """Close the ticket with the reason (audited); False when it was closed already. Flushes."""
    now = now or utcnow()
    ticket = _locked(s, ticket.id) or ticket
    if ticket.state is TicketState.CLOSED:
        return False
    before = ticket.state
    ticket.state, ticket.closed_at, ticket.updated_at = TicketState.CLOSED, now, now
    audit.record(s, action="ticket_close", object_type="ticket", object_id=ticket.id, operator_id=ticket.operator_id, actor=staff,
                 reason=reason, before={"state": before.value}, after={"state": ticket.state.value})
    s.flush()
    return True


def reopen_ticket(s: Session, ticket: Ticket, *, reason: str, staff: User, now: dt.datetime | None = None) -> bool:
    """Reopen a closed ticket (support's turn again) with the reason (audited); False when it was not closed. Flushes."""
    now = now or utcnow()
    ticket = _locked(s, ticket.id) or ticket
    if ticket.state is not TicketState.CLOSED:
        return False
    ticket.state, ticket.closed_at, ticket.updated_at = TicketState.OPEN, None, now
    audit.record(s, action="ticket_reopen", object_type="ticket", object_id=ticket.id, operator_id=ticket.operator_id, actor=staff,
                 reason=reason, before={"state": TicketState.CLOSED.value}, after={"state": ticket.state.value})
    s.flush()
    return True


def tickets_for(
    s: Session, *, session_id: int | None = None, document_number: str | None = None, meter_id: int | None = None,
    email: str | None = None,
) -> list[Ticket]:
    """The tickets about any of these (oldest first); none given: none. Not scoped: the caller checks who may see them.

    A session's tickets include those opened about one of its documents
    (receipt, invoice, credit notes), which is the same purchase.
    """
    conditions = []
    if session_id is not None:
        conditions.append(Ticket.session_id == session_id)
        numbers = select(Document.number).where(Document.source == f"session:{session_id}")
        conditions.append(Ticket.document_number.in_(numbers))
    if document_number:
        conditions.append(Ticket.document_number == document_number.strip().upper())
    if meter_id is not None:
        conditions.append(Ticket.meter_id == meter_id)
    if email:
        conditions.append(Ticket.email == normalize_email(email))
    if not conditions:
        return []
    return list(s.scalars(select(Ticket).where(or_(*conditions)).order_by(Ticket.created_at, Ticket.id)))


# --------------------------------------------------------------------------- page helpers


def _zone_of(s: Session, ticket: Ticket) -> str:
    """The time zone to show a ticket's times in: its site's, else UTC."""
    about = _about_of(s, ticket)
    if about.session is not None:
        return about.session.time_zone or "UTC"
    if about.meter is not None:
        return about.meter.site.time_zone or "UTC"
    return "UTC"


def when_text(value: dt.datetime | None, time_zone: str = "UTC", *, name_zone: bool = False) -> str:
    """A UTC instant in ``time_zone`` for the request's language (UTC says so; ``name_zone``: any zone says which)."""
    if value is None:
        return ""
    try:
        tz = ZoneInfo(time_zone)
    except (KeyError, ValueError):
        tz, time_zone = ZoneInfo("UTC"), "UTC"
    text = format_datetime(value, "medium", tzinfo=tz, locale=str(get_locale() or "en"))
    if time_zone == "UTC":
        return f"{text} UTC"
    return f"{text} ({time_zone})" if name_zone else text


def _locale() -> str:
    return str(get_locale() or "en")


def _contact_limit() -> str:
    return current_app.config["CONTACT_RATE_LIMIT"]


def _opened(response) -> bool:
    """Only what went through counts against the limit (a form sent back with a mistake does not)."""
    return response.status_code in (302, 303)


def _reply_key() -> str:
    return "ticket-reply:" + str((request.view_args or {}).get("reference", "")).upper()


@contact_bp.errorhandler(429)
def _too_many(e):
    """Past the limit: say that the earlier messages reached us, and when to write again."""
    from webapp.errors import _retry_after

    retry = _retry_after()
    detail = _("You have sent us several messages in a short time. Please wait a little before sending another one.")
    if wants_json():
        return problem_response(429, "rate_limited", detail)
    minutes = (retry + 59) // 60 if retry else None
    return render_template("contact/too_many.html", minutes=minutes, detail=detail), 429


# --------------------------------------------------------------------------- the contact form


def _default_category(about: About) -> str:
    topic = (request.args.get("topic") or "").strip().lower()
    if topic in {c.value for c in TicketCategory}:
        return topic
    if about.session is not None:
        return TicketCategory.CHARGING.value
    if about.document is not None:
        return TicketCategory.RECEIPT.value
    if about.meter is not None:
        return TicketCategory.METER.value
    return TicketCategory.OTHER.value


@contact_bp.route("/contact", methods=["GET", "POST"])
@limiter.limit(_contact_limit, methods=["POST"], deduct_when=_opened)
def contact():
    """The contact form; sent, it opens a ticket (with what the page was about) and emails its link."""
    s = db_session()
    about = resolve_about(s, request.args)
    user = _user()
    form = ContactForm()
    if request.method == "GET":
        form.category.data = _default_category(about)
        if user is not None:
            form.email.data = user.email
    if form.validate_on_submit():
        ticket = open_ticket(
            s, email=form.email.data, category=TicketCategory(form.category.data), subject=form.subject.data,
            message=form.message.data, about=about, name=form.name.data or "", user=user,
            locale=_locale(),  # the account's language, else the one this page is shown in
        )
        ticket_id, reference, email = ticket.id, ticket.reference, ticket.email
        s.commit()
        remember_ticket(ticket_id)  # the browser that wrote it may read it, as with the emailed link
        session[SENT] = {"reference": reference, "email": email}
        return redirect(url_for("contact.sent"))
    return render_template("contact/form.html", form=form, about=about_lines(about),
                           action=url_for("contact.contact", **about_params(about))), 400 if form.errors else 200


@contact_bp.route("/contact/sent")
def sent():
    """After the form: the ticket's reference, where its link went, and what happens next."""
    done = session.get(SENT)
    if not isinstance(done, dict) or not REFERENCE.fullmatch(str(done.get("reference", ""))):
        return redirect(url_for("contact.contact"))
    ticket = db_session().scalar(select(Ticket).where(Ticket.reference == done["reference"]))
    if ticket is None:
        return redirect(url_for("contact.contact"))
    return render_template("contact/sent.html", ticket=ticket, email=done.get("email") or ticket.email,
                           ticket_url=url_for("contact.ticket", reference=ticket.reference))


# --------------------------------------------------------------------------- the customer's ticket page


def remember_ticket(ticket_id: int) -> None:
    """Let this browser open a ticket without its link (the newest ``MAX_REMEMBERED`` only)."""
    ids = [i for i in session.get(LINKED, []) if isinstance(i, int) and i != ticket_id]
    session[LINKED] = [*ids, ticket_id][-MAX_REMEMBERED:]


def _customer_ticket(reference: str) -> tuple[Ticket, bool]:
    """The ticket, and whether it came with its link key (``?k=``); 404 unless the key, this browser or the account may open it.

    A key that is there but wrong is 404 whatever else holds.
    """
    reference = reference.upper()
    if not REFERENCE.fullmatch(reference):
        abort(404)
    ticket = db_session().scalar(select(Ticket).where(Ticket.reference == reference))
    if ticket is None:
        abort(404)
    key = request.args.get("k")
    if key is not None:
        if not token_matches(ticket, key):
            abort(404)
        remember_ticket(ticket.id)
        return ticket, True
    if ticket.id in session.get(LINKED, []):
        return ticket, False
    if current_user.is_authenticated and ticket.user_id is not None and ticket.user_id == current_user.id:
        return ticket, False
    abort(404)


def _customer_links(lines: list[dict]) -> list[dict]:
    """The customer's own pages of the attached objects."""
    for line in lines:
        obj = line["obj"]
        if line["kind"] == "session":
            line["url"] = url_for("charging.session_page", session_id=obj.id)
        elif line["kind"] == "document":
            line["url"] = url_for("receipts.document_page", number=obj.number)
        else:
            line["url"] = url_for("meters.meter_page", meter_code=obj.meter_code)
    return lines


@contact_bp.route("/tickets/<string(maxlength=16):reference>", methods=["GET", "POST"])
@limiter.limit(_contact_limit, methods=["POST"], key_func=_reply_key, deduct_when=_opened)
def ticket(reference: str):
    """A customer's ticket: its state, what it is about, the thread, and the form to answer."""
    ticket, with_key = _customer_ticket(reference)
    if with_key and request.method == "GET":
        # The key leaves the address bar (history, Referer, logs): this browser remembers the ticket instead.
        return redirect(url_for("contact.ticket", reference=ticket.reference))
    s = db_session()
    form = ReplyForm()
    if form.validate_on_submit():
        customer_reply(s, ticket, form.message.data, user=_user())
        s.commit()
        flash(_("Thank you. Your answer was added to the ticket; we will write back by email."), "success")
        return redirect(url_for("contact.ticket", reference=ticket.reference))
    zone = _zone_of(s, ticket)
    return render_template(
        "contact/ticket.html", ticket=ticket, form=form, about=_customer_links(about_lines(_about_of(s, ticket))),
        state_text=CUSTOMER_STATE[ticket.state], category_text=CATEGORY_SHORT[ticket.category],
        action=url_for("contact.ticket", reference=ticket.reference, **({"k": request.args["k"]} if with_key else {})),
        when=lambda value: when_text(value, zone),
    ), 400 if form.errors else 200


@contact_bp.route("/account/tickets")
@login_required
def account_tickets():
    """The signed-in customer's tickets, newest first."""
    rows = db_session().scalars(select(Ticket).where(Ticket.user_id == current_user.id).order_by(Ticket.created_at.desc(), Ticket.id.desc())
                                .limit(QUEUE_PAGE))
    return render_template("contact/account_tickets.html", tickets=list(rows), state_text=CUSTOMER_STATE, category_text=CATEGORY_SHORT,
                           when=when_text)


# --------------------------------------------------------------------------- the console


def _scoped(query, scope: int | None):
    return query if scope is None else query.where(Ticket.operator_id == scope)


def console_url(endpoint: str, **values) -> str | None:
    """A link to another console page if this app has it (built from whichever of ``values`` its route takes), else None.

    The session, document and meter pages of the console are another module's;
    their routes may name their argument ``session_id`` or ``id``, ``number``,
    ``meter_code`` or ``meter_id``: the first rule whose arguments are all
    among ``values`` is used.
    """
    for rule in current_app.url_map.iter_rules(endpoint) if endpoint in current_app.view_functions else ():
        if rule.arguments <= values.keys():
            try:
                return url_for(endpoint, **{k: values[k] for k in rule.arguments})
            except BuildError:
                continue
    return None


def _staff_links(lines: list[dict]) -> list[dict]:
    """The console's pages of the attached objects (None where the console has no such page)."""
    for line in lines:
        obj = line["obj"]
        if line["kind"] == "session":
            line["url"] = console_url("support.session", session_id=obj.id, id=obj.id)
        elif line["kind"] == "document":
            line["url"] = console_url("support.document", number=obj.number, document_number=obj.number, document_id=obj.id)
        else:
            line["url"] = console_url("support.meter", meter_code=obj.meter_code, code=obj.meter_code, meter_id=obj.id, id=obj.id)
    return lines


@bp.route("/tickets")
def tickets():
    """The ticket queue: open tickets, the customer who has waited longest first (or waiting, closed, all)."""
    scope = staff_scope()
    s = db_session()
    state = request.args.get("state", "open")
    if state not in QUEUE_FILTERS:
        state = "open"
    query = _scoped(select(Ticket), scope)
    if state == "open":
        query = query.where(Ticket.state == TicketState.OPEN).order_by(
            func.coalesce(Ticket.last_customer_message_at, Ticket.created_at), Ticket.id)
    elif state == "waiting":
        query = query.where(Ticket.state == TicketState.WAITING).order_by(Ticket.updated_at, Ticket.id)
    elif state == "closed":
        query = query.where(Ticket.state == TicketState.CLOSED).order_by(Ticket.closed_at.desc(), Ticket.id.desc())
    else:
        query = query.order_by(Ticket.created_at.desc(), Ticket.id.desc())
    rows = list(s.scalars(query.limit(QUEUE_PAGE + 1)))
    counts = dict(s.execute(_scoped(select(Ticket.state, func.count(Ticket.id)), scope).group_by(Ticket.state)).all())
    operators = {}
    if scope is None:
        ids = {t.operator_id for t in rows if t.operator_id}
        operators = dict(s.execute(select(Operator.id, Operator.name).where(Operator.id.in_(ids))).all()) if ids else {}
    return render_template(
        "support/tickets.html", tickets=rows[:QUEUE_PAGE], more=len(rows) > QUEUE_PAGE, state=state, filters=QUEUE_FILTERS,
        counts={st.value: counts.get(st, 0) for st in TicketState}, total=sum(counts.values()), state_text=STAFF_STATE,
        category_text=CATEGORY_SHORT, operators=operators, platform=scope is None, when=when_text,
    )


def _staff_ticket(ticket_id: int) -> Ticket:
    """The ticket if the current staff member may see it, else 404."""
    ticket = db_session().get(Ticket, ticket_id)
    if ticket is None:
        abort(404)
    require_visible(ticket.operator_id)
    return ticket


def _staff_page(ticket: Ticket, *, reply_form=None, close_form=None, reopen_form=None, status: int = 200):
    s = db_session()
    zone = _zone_of(s, ticket)
    about = _about_of(s, ticket)
    lines = _staff_links(about_lines(about))
    if about.document is not None and about.session is None:  # a document of a charging session: that session too
        kind, _sep, ident = about.document.source.partition(":")
        if kind == "session" and ident.isdigit():
            url = console_url("support.session", session_id=int(ident), id=int(ident))
            lines.append({"kind": "session", "obj": None, "text": _("From charging session #%(id)s", id=ident), "url": url})
    authors = {}
    author_ids = {m.author_id for m in ticket.messages if m.author_id} | ({ticket.assignee_id} if ticket.assignee_id else set())
    if author_ids:
        authors = dict(s.execute(select(User.id, User.email).where(User.id.in_(author_ids))).all())
    history = list(s.scalars(select(AuditEntry).where(AuditEntry.object_type == "ticket", AuditEntry.object_id == str(ticket.id))
                             .order_by(AuditEntry.at, AuditEntry.id)))
    operator = s.get(Operator, ticket.operator_id) if ticket.operator_id else None
    customer = s.get(User, ticket.user_id) if ticket.user_id else None
    return render_template(
        "support/ticket.html", ticket=ticket, about=lines, authors=authors, history=history, operator=operator, customer=customer,
        reply_form=reply_form or StaffReplyForm(), close_form=close_form or StateChangeForm(prefix="close"),
        reopen_form=reopen_form or StateChangeForm(prefix="reopen"), state_text=STAFF_STATE[ticket.state],
        category_text=CATEGORY_SHORT[ticket.category], audit_actions=AUDIT_ACTIONS,
        when=lambda value: when_text(value, zone, name_zone=True),
    ), status


@bp.route("/tickets/<int(max=2147483647):ticket_id>", endpoint="ticket")
def staff_ticket(ticket_id: int):
    """One ticket: the thread, the customer, what it is about, and the actions."""
    return _staff_page(_staff_ticket(ticket_id))


@bp.route("/tickets/<int(max=2147483647):ticket_id>/reply", methods=["POST"])
def ticket_reply(ticket_id: int):
    """Answer the customer (emailed with the ticket's link); the ticket then waits for them."""
    ticket = _staff_ticket(ticket_id)
    form = StaffReplyForm()
    if not form.validate_on_submit():
        return _staff_page(ticket, reply_form=form, status=400)
    s = db_session()
    staff_reply(s, ticket, form.message.data, staff=current_user)
    s.commit()
    flash(_("Your answer was sent to %(email)s.", email=ticket.email), "success")
    return redirect(url_for("support.ticket", ticket_id=ticket.id))


@bp.route("/tickets/<int(max=2147483647):ticket_id>/close", methods=["POST"])
def ticket_close(ticket_id: int):
    """Close the ticket, with the reason."""
    ticket = _staff_ticket(ticket_id)
    form = StateChangeForm(prefix="close")
    if not form.validate_on_submit():
        return _staff_page(ticket, close_form=form, status=400)
    s = db_session()
    if close_ticket(s, ticket, reason=form.reason.data, staff=current_user):
        s.commit()
        flash(_("Ticket %(reference)s is closed.", reference=ticket.reference), "success")
    else:
        s.rollback()
        flash(_("This ticket was already closed."), "warning")
    return redirect(url_for("support.ticket", ticket_id=ticket_id))


@bp.route("/tickets/<int(max=2147483647):ticket_id>/reopen", methods=["POST"])
def ticket_reopen(ticket_id: int):
    """Reopen a closed ticket, with the reason."""
    ticket = _staff_ticket(ticket_id)
    form = StateChangeForm(prefix="reopen")
    if not form.validate_on_submit():
        return _staff_page(ticket, reopen_form=form, status=400)
    s = db_session()
    if reopen_ticket(s, ticket, reason=form.reason.data, staff=current_user):
        s.commit()
        flash(_("Ticket %(reference)s is open again.", reference=ticket.reference), "success")
    else:
        s.rollback()
        flash(_("This ticket is not closed."), "warning")
    return redirect(url_for("support.ticket", ticket_id=ticket_id))

