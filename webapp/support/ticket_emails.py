"""Emails about tickets, sent through the outbox: the "we got your message" email and each staff answer.

Both go to the ticket's address in the ticket's language (``Ticket.locale``,
the customer's when they wrote to us) and carry the ticket's link
``/tickets/<reference>?k=<token>``, so a guest can read and answer from any
device.

The link token: the outbox writes an email in the worker from its row alone
(``webapp.notifications.outbox``), and the database keeps only the token's
sha256 (``Ticket.access_token_hash``), so the token is *derived*, never
stored: HMAC-SHA256 of the app's ``SECRET_KEY`` over the ticket's reference
(itself random). A copy of the database alone gives nobody a link; the worker
recomputes the same token for every later email. (The charging API derives a
guest's replayable session token the same way.) Rotating ``SECRET_KEY``: the
old keys in ``SECRET_KEY_FALLBACKS`` still rebuild the links of older
tickets; a ticket whose key is gone entirely gets its link without the token
(it opens for its signed-in owner) and the email says to use the first one.

Causes and keys: ``ticket:<id>:opened`` (the ticket was opened, reference
``ticket:<id>``) and ``ticket_message:<id>:email`` (a staff message, reference
``ticket_message:<id>``). One cause, one email.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from email.message import EmailMessage

from flask import current_app
from sqlalchemy.orm import Session

from webapp.notifications.models import SentEmail
from webapp.notifications.outbox import schedule
from webapp.support.models import Ticket, TicketMessage

OPENED = "ticket_opened"
REPLY = "ticket_reply"


def token_hash(token: str) -> str:
    """How a ticket's link token is stored: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _derive(secret: str | bytes, reference: str) -> str:
    key = secret if isinstance(secret, bytes) else str(secret).encode()
    digest = hmac.new(key, f"voltpay-ticket-link\x00{reference}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()  # 32 characters, like the other link tokens


def new_link_token(reference: str) -> str:
    """The link token of a new ticket (with the current ``SECRET_KEY``); store only ``token_hash`` of it."""
    return _derive(current_app.config["SECRET_KEY"], reference)


def link_token(ticket: Ticket) -> str | None:
    """The ticket's link token, recomputed (current key, then the fallbacks); None when no key rebuilds it."""
    keys = [current_app.config["SECRET_KEY"], *(current_app.config.get("SECRET_KEY_FALLBACKS") or [])]
    for key in keys:
        token = _derive(key, ticket.reference)
        if hmac.compare_digest(token_hash(token), ticket.access_token_hash):
            return token
    return None


def token_matches(ticket: Ticket, token: str | None) -> bool:
    """Whether ``token`` (from ``?k=``) is this ticket's link token (constant-time comparison of the hashes)."""
    if not token or not ticket.access_token_hash:
        return False
    return hmac.compare_digest(token_hash(token[:100]), ticket.access_token_hash)


def _base() -> str:
    return str(current_app.config["BASE_URL"]).rstrip("/")


def ticket_link(ticket: Ticket) -> str:
    """The absolute link to the ticket's page, with its token when it can be rebuilt."""
    token = link_token(ticket)
    return f"{_base()}/tickets/{ticket.reference}" + (f"?k={token}" if token else "")


# --------------------------------------------------------------------------- causes (in the caller's transaction)


def schedule_opened(s: Session, ticket: Ticket) -> None:
    """Record the "we got your message" email (flushed ticket); sent once the transaction commits."""
    schedule(s, to=ticket.email, template=OPENED, reference=f"ticket:{ticket.id}", key=f"ticket:{ticket.id}:opened")


def schedule_reply(s: Session, ticket: Ticket, message: TicketMessage) -> None:
    """Record the email carrying a staff answer (flushed message); sent once the transaction commits."""
    schedule(s, to=ticket.email, template=REPLY, reference=f"ticket_message:{message.id}", key=f"ticket_message:{message.id}:email")


# --------------------------------------------------------------------------- writing them (in the worker)


def about_text(s: Session, ticket: Ticket, locale: str) -> str | None:
    """What the ticket is about, in one line of the customer's language (None: nothing attached)."""
    from flask_babel import force_locale

    from webapp.support.tickets import describe_about

    with force_locale(locale):
        return describe_about(s, ticket)


def _context(s: Session, ticket: Ticket, locale: str) -> dict:
    token = link_token(ticket)
    return {
        "reference": ticket.reference, "subject": ticket.subject, "name": ticket.name or None,
        "link": f"{_base()}/tickets/{ticket.reference}" + (f"?k={token}" if token else ""), "link_has_key": token is not None,
        "about": about_text(s, ticket, locale),
    }


def _locale(ticket: Ticket) -> str:
    from webapp.notifications.emails import _locale as pick

    return pick(ticket.locale)


def _build_opened(s: Session, row: SentEmail) -> EmailMessage | None:
    from webapp.notifications.emails import _render

    ticket = s.get(Ticket, int(row.reference.split(":", 1)[1]))
    if ticket is None:
        return None
    locale = _locale(ticket)
    return _render(row.to, OPENED, locale, **_context(s, ticket, locale), message=ticket.messages[0].body if ticket.messages else "")


def _build_reply(s: Session, row: SentEmail) -> EmailMessage | None:
    from webapp.notifications.emails import _render

    message = s.get(TicketMessage, int(row.reference.split(":", 1)[1]))
    if message is None:
        return None
    ticket = message.ticket
    locale = _locale(ticket)
    return _render(row.to, REPLY, locale, **_context(s, ticket, locale), body=message.body)


def _register_builders() -> None:
    from webapp.notifications.emails import BUILDERS

    BUILDERS.setdefault(OPENED, _build_opened)
    BUILDERS.setdefault(REPLY, _build_reply)


_register_builders()
