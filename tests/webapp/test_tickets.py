"""Contact and tickets as people meet them: the contact form (guest or signed in), what it attaches, the emailed ticket
link, answers on both sides, the support console's queue and actions with their audit entries, operator scoping,
rate limits and CSRF.

Emails go through the outbox to a real SMTP server (``mailbox``); sessions are started and charged through the
charging service (helpers of test_charging_service.py); guest card sessions hold and capture at localstripe.
"""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from payments import wallet
from payments.base import utcnow
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from tests.stripe_browser import browser_card
from tests.webapp.test_charging_service import card_site, charge, make_site, start  # noqa: F401  (card_site: a fixture)
from webapp.charging.models import PaymentKind
from webapp.models import Meter, Operator, Role, Site, User
from webapp.notifications.models import NotificationPreferences, SentEmail
from webapp.receipts import service as receipts
from webapp.support.models import AuditEntry, Ticket, TicketMessage, TicketState
from webapp.support.tickets import tickets_for

PASSWORD = "correct horse staple"


def db(app):
    return app.extensions["db_sessionmaker"]()


def sign_in(client, email: str) -> None:
    resp = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302, resp.get_data(as_text=True)


def account(app, make_user, email: str, euros: int = 50, **fields) -> User:
    """A verified account with money in its wallet (to start wallet sessions)."""
    user = make_user(email, PASSWORD, **fields)
    if euros:
        with app.extensions["db_sessionmaker"].begin() as s:
            transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                     credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(euros * 100, "EUR"))
    return user


def staff_client(app, make_user, email: str, role: Role = Role.SUPPORT, operator_id: int | None = None):
    """A browser signed in as a staff member."""
    make_user(email, PASSWORD, role=role, operator_id=operator_id)
    c = app.test_client()
    sign_in(c, email)
    return c


def contact(client, query: str = "", **fields):
    data = {"name": "Ana", "email": "guest@example.com", "category": "payment", "subject": "Hold not released",
            "message": "My card still shows the hold.", **fields}
    return client.post("/contact" + query, data=data)


def tickets(app) -> list[Ticket]:
    with db(app) as s:
        return list(s.scalars(select(Ticket).order_by(Ticket.id)))


def ticket_row(app, ticket_id: int) -> Ticket:
    with db(app) as s:
        t = s.get(Ticket, ticket_id)
        t.messages  # noqa: B018 - loaded before the session closes
        return t


def link_path(link: str) -> str:
    parts = urlsplit(link)
    return parts.path + "?" + parts.query if parts.query else parts.path


def text(resp) -> str:
    return resp.get_data(as_text=True)


def meter_at(app, site_id: int, code: str) -> int:
    with app.extensions["db_sessionmaker"].begin() as s:
        m = Meter(site_id=site_id, meter_code=code, serial=f"SN-{code}")
        s.add(m)
        s.flush()
        return m.id


def operator_with_site(app, name: str) -> tuple[int, int]:
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name=name, legal_name=f"{name} S.L.")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name=f"{name} tower", time_zone="Europe/Madrid", currency="EUR")
        s.add(site)
        s.flush()
        return op.id, site.id


# --- a guest writes to us ---------------------------------------------------------------------------


def test_a_guest_without_an_account_opens_a_ticket_and_the_emailed_link_opens_it(client, app, mailbox):
    form = client.get("/contact")
    assert form.status_code == 200 and 'name="message"' in text(form) and "Contact us" in text(form)

    resp = contact(client, message="Line one\nLine <b>two</b>")
    assert resp.status_code == 302 and resp.headers["Location"] == "/contact/sent"
    sent = text(client.get("/contact/sent"))
    (ticket,) = tickets(app)
    assert ticket.reference in sent and "guest@example.com" in sent and "What happens next" in sent
    assert re.fullmatch(r"T-[2-9A-HJ-NP-Z]{8}", ticket.reference)
    assert ticket.state is TicketState.OPEN and ticket.user_id is None and ticket.operator_id is None and ticket.locale == "en"

    (mail,) = mailbox.wait_for("guest@example.com")
    assert ticket.reference in mail["Subject"]
    body = mail.get_body(("plain",)).get_content()
    assert "Hold not released" in body and "Line <b>two</b>" in body
    link = mailbox.last_link("guest@example.com", "/tickets/")
    assert link.startswith(f"http://localhost/tickets/{ticket.reference}?k=")
    token = link.split("?k=", 1)[1]
    # only the token's hash is kept; the outbox row does not hold it either
    assert ticket.access_token_hash != token and len(ticket.access_token_hash) == 64
    with db(app) as s:
        row = s.scalar(select(SentEmail).where(SentEmail.to == "guest@example.com"))
        assert row.status == "sent" and token not in (row.reference + row.idempotency_key)

    other_device = app.test_client()
    first = other_device.get(link_path(link))
    assert first.status_code == 302 and first.headers["Location"] == f"/tickets/{ticket.reference}"  # the key leaves the address bar
    page = other_device.get(f"/tickets/{ticket.reference}")  # this browser remembers the ticket
    html = text(page)
    assert page.status_code == 200 and ticket.reference in html and "Waiting for our answer" in html
    assert "Line one<br>Line &lt;b&gt;two&lt;/b&gt;" in html  # escaped, line breaks kept
    assert client.get(f"/tickets/{ticket.reference}").status_code == 200  # and so does the one that wrote it
    assert f'href="/tickets/{ticket.reference}"' in sent


def test_the_ticket_link_with_a_wrong_or_missing_key_is_not_found(client, app, mailbox, make_user):
    contact(client)
    link = link_path(mailbox.last_link("guest@example.com", "/tickets/"))
    reference = tickets(app)[0].reference
    stranger = app.test_client()
    assert stranger.get(f"/tickets/{reference}").status_code == 404
    assert stranger.get(f"/tickets/{reference}?k=not-the-key").status_code == 404
    assert stranger.get(f"/tickets/{reference}?k=").status_code == 404
    assert stranger.post(f"/tickets/{reference}?k=wrong", data={"message": "hi"}).status_code == 404
    assert stranger.get("/tickets/T-ZZZZZZZZ" + link[link.index("?"):]).status_code == 404  # the key of another ticket
    assert stranger.get("/tickets/nonsense").status_code == 404
    account(app, make_user, "ben@example.com", euros=0)
    sign_in(stranger, "ben@example.com")  # an account that did not open it
    assert stranger.get(f"/tickets/{reference}").status_code == 404
    assert stranger.get(link).status_code == 302  # the link itself works for whoever holds it
    assert stranger.get(f"/tickets/{reference}").status_code == 200
    assert stranger.get(f"/tickets/{reference}?k=not-the-key").status_code == 404  # a wrong key is wrong, whatever else holds
    assert client.get(f"/tickets/{reference}?k=wrong").status_code == 404
    assert len(ticket_row(app, tickets(app)[0].id).messages) == 1


def test_a_signed_in_customer_gets_their_address_filled_in_and_finds_the_ticket_in_the_account(client, app, mailbox, make_user):
    account(app, make_user, "ana@example.com", euros=0, locale="es")
    sign_in(client, "ana@example.com")
    assert 'value="ana@example.com"' in text(client.get("/contact"))
    assert contact(client, email="ana@example.com", subject="Mi cuenta", category="account").status_code == 302
    (ticket,) = tickets(app)
    assert ticket.user_id is not None and ticket.locale == "es"
    mailbox.wait_for("ana@example.com")
    assert client.get(f"/tickets/{ticket.reference}").status_code == 200  # the owner needs no key
    listing = text(client.get("/account/tickets"))
    assert ticket.reference in listing and "Mi cuenta" in listing
    assert app.test_client().get("/account/tickets").status_code == 302  # guests are sent to sign in


# --- what a ticket is about -------------------------------------------------------------------------


@pytest.fixture
def site(app):
    return make_site(app)


def test_a_ticket_started_from_the_session_page_carries_the_session(site, client, mailbox, make_user):
    ana = account(site, make_user, "ana@example.com")
    cs = start(site, ana).session
    sign_in(client, ana.email)

    form = text(client.get(f"/contact?session={cs.id}"))
    assert f"Charging session #{cs.id} at Car park, connector A101" in form
    assert f'action="/contact?session={cs.id}"' in form
    assert '<option selected value="charging">' in form  # the category follows what it is about
    resp = contact(client, f"?session={cs.id}", email=ana.email, category="charging", subject="It stopped")
    assert resp.status_code == 302
    (ticket,) = tickets(site)
    with db(site) as s:
        op_id = s.scalar(select(Operator.id))
    assert ticket.session_id == cs.id and ticket.operator_id == op_id and ticket.user_id == ana.id

    body = mailbox.wait_for(ana.email)[0].get_body(("plain",)).get_content()
    assert f"Charging session #{cs.id}" in body
    page = text(client.get(f"/tickets/{ticket.reference}"))
    assert f'href="/s/{cs.id}"' in page
    with db(site) as s:
        assert [t.id for t in tickets_for(s, session_id=cs.id)] == [ticket.id]
        assert [t.id for t in tickets_for(s, email="ANA@example.com ")] == [ticket.id]
        assert tickets_for(s, session_id=cs.id + 1) == [] and tickets_for(s) == []


def test_someone_elses_session_is_not_attached(site, client, make_user, mailbox):
    ana = account(site, make_user, "ana@example.com")
    cs = start(site, ana).session
    account(site, make_user, "ben@example.com", euros=0)
    sign_in(client, "ben@example.com")
    for query in (f"?session={cs.id}", "?session=999999", "?session=99999999999999", "?session=abc", "?document=OP1-2026-000001",
                  "?meter=NOPE"):
        page = client.get("/contact" + query)
        assert page.status_code == 200 and 'data-testid="attached"' not in text(page), query
    assert contact(client, f"?session={cs.id}", email="ben@example.com").status_code == 302
    guest = site.test_client()
    assert 'data-testid="attached"' not in text(guest.get(f"/contact?session={cs.id}"))
    assert contact(guest, f"?session={cs.id}").status_code == 302
    assert [(t.session_id, t.operator_id) for t in tickets(site)] == [(None, None), (None, None)]


def test_a_guest_card_session_attaches_only_in_the_browser_that_holds_its_link(card_site, stripe_config, mailbox):
    make_site(card_site)
    card_site.config["WTF_CSRF_ENABLED"] = False  # test_forms_need_their_csrf_token covers CSRF
    provider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    res = start(card_site, None, email="driver@example.com", payment_kind=PaymentKind.CARD, payment_method_id=pm,
                card_brand=card.brand, card_last4=card.last4)
    cs = res.session

    driver = card_site.test_client()
    assert driver.get(f"/s/{cs.id}?t={res.guest_token}").status_code == 302  # the session's emailed link: remembered here
    assert f"Charging session #{cs.id} at Car park" in text(driver.get(f"/contact?session={cs.id}"))
    assert contact(driver, f"?session={cs.id}", email="driver@example.com").status_code == 302

    stranger = card_site.test_client()
    assert 'data-testid="attached"' not in text(stranger.get(f"/contact?session={cs.id}"))
    assert contact(stranger, f"?session={cs.id}", email="stranger@example.com").status_code == 302

    by_driver, by_stranger = tickets(card_site)
    with db(card_site) as s:
        op_id = s.scalar(select(Operator.id))
    assert (by_driver.session_id, by_driver.operator_id) == (cs.id, op_id)
    assert (by_stranger.session_id, by_stranger.operator_id) == (None, None)


def test_a_receipt_attaches_for_its_owner_and_in_a_browser_that_opened_its_emailed_link(site, client, make_user, mailbox):
    ana = account(site, make_user, "ana@example.com")
    with site.extensions["db_sessionmaker"].begin() as s:  # no receipt email (and its PDF) to wait for
        prefs = s.get(NotificationPreferences, ana.id) or NotificationPreferences(user_id=ana.id)
        prefs.receipts = False
        s.add(prefs)
    cs = start(site, ana).session
    charge(site, cs, utcnow() - dt.timedelta(minutes=20), kwh_at=[(300, 3500)], stop_s=600, stop_wh=7000)
    with db(site) as s:
        doc = receipts.document_for(s, f"session:{cs.id}")
        number, key = doc.number, doc.verify_token

    sign_in(client, ana.email)
    assert f"Invoice {number}" in text(client.get(f"/contact?document={number}"))
    assert contact(client, f"?document={number}", email=ana.email, category="receipt").status_code == 302

    reader = site.test_client()  # someone given the receipt's link (read-only): the receipt, not the session
    assert reader.get(f"/documents/{number}?k={key}").status_code == 302
    page = text(reader.get(f"/contact?document={number.lower()}&session={cs.id}"))
    assert f"Invoice {number}" in page and f"Charging session #{cs.id}" not in page
    assert contact(reader, f"?document={number}&session={cs.id}", email="reader@example.com").status_code == 302

    stranger = site.test_client()
    assert 'data-testid="attached"' not in text(stranger.get(f"/contact?session={cs.id}&document={number}"))

    by_owner, by_reader = tickets(site)
    assert (by_owner.session_id, by_owner.document_number) == (None, number)
    assert (by_reader.session_id, by_reader.document_number) == (None, number)
    assert by_owner.operator_id == by_reader.operator_id is not None
    with db(site) as s:  # a session's tickets include those about its documents
        assert [t.id for t in tickets_for(s, session_id=cs.id)] == [by_owner.id, by_reader.id]
        assert [t.id for t in tickets_for(s, document_number=number.lower())] == [by_owner.id, by_reader.id]
    support = staff_client(site, make_user, "agent@example.com")
    staff_page = text(support.get(f"/support/tickets/{by_reader.id}"))
    assert f'href="/support/documents/{number}"' in staff_page and f'href="/support/sessions/{cs.id}"' in staff_page


def test_a_meter_is_attached_by_its_code_and_routes_the_ticket_to_its_operator(client, app, mailbox):
    op_id, site_id = operator_with_site(app, "Volta Homes")
    meter_id = meter_at(app, site_id, "M1001")
    page = text(client.get("/contact?meter=m1001&topic=bill"))
    assert "Meter M1001 at Volta Homes tower" in page and '<option selected value="bill">' in page
    assert contact(client, "?meter=M1001", category="meter").status_code == 302
    (ticket,) = tickets(app)
    assert ticket.meter_id == meter_id and ticket.operator_id == op_id
    with db(app) as s:
        assert [t.id for t in tickets_for(s, meter_id=meter_id)] == [ticket.id]


# --- bad input, limits, CSRF ------------------------------------------------------------------------


@pytest.mark.parametrize("fields, field, message", [
    ({"message": "   "}, "message", "Write your message"),
    ({"email": "not-an-address"}, "email", "Enter an email address like name@example.com."),
    ({"email": ""}, "email", "Enter your email address"),
    ({"subject": ""}, "subject", "Give your message a short subject."),
    ({"subject": "x" * 201}, "subject", "At most 200 characters."),
    ({"message": "x" * 5001}, "message", "At most 5000 characters."),
    ({"name": "n" * 121}, "name", "At most 120 characters."),
    ({"category": "lottery"}, "category", "Not a valid choice"),
], ids=["empty message", "bad email", "no email", "no subject", "long subject", "long message", "long name", "bad category"])
def test_bad_input_is_answered_at_the_field_and_opens_nothing(client, app, fields, field, message):
    resp = contact(client, **fields)
    assert resp.status_code == 400
    html = text(resp)
    error = re.search(rf'<p class="error" id="{field}-error">(.*?)</p>', html, re.S)
    assert error and message in error.group(1), html
    assert tickets(app) == []


def test_a_customer_answer_that_is_empty_or_too_long_is_refused_at_the_field(client, app, mailbox):
    contact(client)
    link = link_path(mailbox.last_link("guest@example.com", "/tickets/"))
    for body, message in (("", "Write your answer."), ("y" * 5001, "At most 5000 characters.")):
        resp = client.post(link, data={"message": body})
        assert resp.status_code == 400 and message in text(resp)
    assert len(ticket_row(app, tickets(app)[0].id).messages) == 1


@pytest.fixture
def limited(app_config):
    app_config.update(RATELIMIT_ENABLED=True, CONTACT_RATE_LIMIT="2 per hour")
    return app_config


def test_the_contact_form_is_rate_limited_per_address_with_a_page_a_person_understands(limited, client, app, mailbox):
    assert contact(client, email="").status_code == 400  # a form sent back with a mistake does not count
    assert contact(client, subject="One").status_code == 302
    assert contact(client, subject="Two").status_code == 302
    resp = contact(client, subject="Three")
    assert resp.status_code == 429
    html = text(resp)
    assert "several messages in a short time" in html and "reached us" in html
    assert re.search(r"You can send a new message in \d+ minutes?\.", html)
    assert [t.subject for t in tickets(app)] == ["One", "Two"]
    assert client.get("/contact").status_code == 200  # reading the form is not limited
    api = client.post("/contact", data={}, headers={"Accept": "application/json"})
    assert api.status_code == 429 and api.json["code"] == "rate_limited"


def test_forms_need_their_csrf_token(csrf_client, app, make_user, mailbox):
    assert contact(csrf_client).status_code == 400
    assert tickets(app) == []
    page = text(csrf_client.get("/contact"))
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    assert contact(csrf_client, csrf_token=token).status_code == 302
    link = link_path(mailbox.last_link("guest@example.com", "/tickets/"))
    assert csrf_client.post(link, data={"message": "more"}).status_code == 400

    ticket = tickets(app)[0]
    make_user("agent@example.com", PASSWORD, role=Role.SUPPORT)
    staff = app.test_client()
    signin = text(staff.get("/auth/sign-in"))
    staff.post("/auth/sign-in", data={"email": "agent@example.com", "password": PASSWORD,
                                      "csrf_token": re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', signin).group(1)})
    assert staff.post(f"/support/tickets/{ticket.id}/reply", data={"message": "Hello"}).status_code == 400
    assert staff.post(f"/support/tickets/{ticket.id}/close", data={"close-reason": "done"}).status_code == 400
    assert len(ticket_row(app, ticket.id).messages) == 1 and ticket_row(app, ticket.id).state is TicketState.OPEN


# --- answers on both sides --------------------------------------------------------------------------


def test_staff_answer_emails_the_customer_and_is_audited(client, app, make_user, mailbox):
    contact(client, name="Ana")
    ticket = tickets(app)[0]
    support = staff_client(app, make_user, "agent@example.com")
    page = support.get(f"/support/tickets/{ticket.id}")
    assert page.status_code == 200 and "My card still shows the hold." in text(page) and "guest@example.com" in text(page)

    assert support.post(f"/support/tickets/{ticket.id}/reply", data={"message": ""}).status_code == 400
    resp = support.post(f"/support/tickets/{ticket.id}/reply", data={"message": "We released the hold.\nIt shows within 5 days."})
    assert resp.status_code == 302 and resp.headers["Location"] == f"/support/tickets/{ticket.id}"
    support.post(f"/support/tickets/{ticket.id}/reply", data={"message": "We released the hold.\nIt shows within 5 days."})  # twice

    mails = mailbox.wait_for("guest@example.com", count=2)  # the ticket's, then the answer
    answer = mails[-1]
    assert answer["Subject"] == f"Our answer to ticket {ticket.reference}: Hold not released"
    body = answer.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert "Hello Ana," in body and "We released the hold.\nIt shows within 5 days." in body
    link = mailbox.last_link("guest@example.com", "/tickets/")
    customer_page = text(app.test_client().get(link_path(link), follow_redirects=True))
    assert "We released the hold.<br>It shows within 5 days." in customer_page and "Answered: waiting for you" in customer_page
    assert "agent@example.com" not in customer_page  # staff addresses stay inside

    done = ticket_row(app, ticket.id)
    assert done.state is TicketState.WAITING and [m.from_staff for m in done.messages] == [False, True]  # the double click: once
    with db(app) as s:
        (entry,) = s.scalars(select(AuditEntry).where(AuditEntry.object_type == "ticket"))
        staff_id = s.scalar(select(User.id).where(User.email == "agent@example.com"))
        assert (entry.action, entry.object_id, entry.actor_email, entry.actor_role) == ("ticket_reply", str(ticket.id), "agent@example.com", "support")
        assert entry.before_json == '{"state": "open"}' and '"state": "waiting"' in entry.after_json and entry.operator_id is None
        assert done.assignee_id == staff_id
    assert len(mailbox.to("guest@example.com")) == 2


def test_closing_and_reopening_need_a_reason_and_are_audited(client, app, make_user, mailbox):
    contact(client)
    ticket = tickets(app)[0]
    support = staff_client(app, make_user, "agent@example.com")
    resp = support.post(f"/support/tickets/{ticket.id}/close", data={"close-reason": " "})
    assert resp.status_code == 400 and "Say why" in text(resp)
    assert support.post(f"/support/tickets/{ticket.id}/close", data={"close-reason": "Refunded"}).status_code == 302
    assert ticket_row(app, ticket.id).state is TicketState.CLOSED and ticket_row(app, ticket.id).closed_at is not None
    assert support.post(f"/support/tickets/{ticket.id}/close", data={"close-reason": "again"}).status_code == 302  # nothing more
    assert support.post(f"/support/tickets/{ticket.id}/reopen", data={"reopen-reason": "Customer called"}).status_code == 302
    assert ticket_row(app, ticket.id).state is TicketState.OPEN
    with db(app) as s:
        entries = list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    assert [(e.action, e.reason, e.before_json, e.after_json) for e in entries] == [
        ("ticket_close", "Refunded", '{"state": "open"}', '{"state": "closed"}'),
        ("ticket_reopen", "Customer called", '{"state": "closed"}', '{"state": "open"}'),
    ]
    history = text(support.get(f"/support/tickets/{ticket.id}"))
    assert "Refunded" in history and "Customer called" in history
    assert len(mailbox.to("guest@example.com")) == 1  # closing and reopening send nothing


def test_a_customer_answer_moves_a_waiting_ticket_back_to_open_and_reopens_a_closed_one(client, app, make_user, mailbox):
    contact(client)
    ticket = tickets(app)[0]
    link = link_path(mailbox.last_link("guest@example.com", "/tickets/"))
    first_at = ticket.last_customer_message_at
    support = staff_client(app, make_user, "agent@example.com")
    support.post(f"/support/tickets/{ticket.id}/reply", data={"message": "Which card?"})
    assert ticket_row(app, ticket.id).state is TicketState.WAITING

    phone = app.test_client()  # another device, with the emailed link only
    resp = phone.post(link, data={"message": "The Visa ending 4242."})
    assert resp.status_code == 302 and resp.headers["Location"] == f"/tickets/{ticket.reference}"
    after = ticket_row(app, ticket.id)
    assert after.state is TicketState.OPEN and after.last_customer_message_at > first_at
    assert "Thank you. Your answer was added" in text(phone.get(resp.headers["Location"]))

    support.post(f"/support/tickets/{ticket.id}/close", data={"close-reason": "Solved"})
    closed = text(phone.get(f"/tickets/{ticket.reference}"))
    assert "Closed" in closed and "Writing here opens it again." in closed
    assert phone.post(f"/tickets/{ticket.reference}", data={"message": "It happened again."}).status_code == 302
    reopened = ticket_row(app, ticket.id)
    assert reopened.state is TicketState.OPEN and reopened.closed_at is None
    assert [m.body for m in reopened.messages] == ["My card still shows the hold.", "Which card?", "The Visa ending 4242.", "It happened again."]
    queue = text(support.get("/support/tickets"))
    assert ticket.reference in queue


# --- the console: scoping and the queue -------------------------------------------------------------


def test_operator_staff_see_only_their_operators_tickets_and_platform_support_sees_all(client, app, make_user, mailbox):
    a_op, a_site = operator_with_site(app, "Alpha")
    b_op, b_site = operator_with_site(app, "Beta")
    meter_at(app, a_site, "A1")
    meter_at(app, b_site, "B1")
    contact(client, "?meter=A1", subject="About A")
    contact(client, "?meter=B1", subject="About B")
    contact(client, subject="General")
    ta, tb, general = tickets(app)
    assert (ta.operator_id, tb.operator_id, general.operator_id) == (a_op, b_op, None)

    for who, role in (("staff-a@example.com", Role.OPERATOR_STAFF), ("support-a@example.com", Role.SUPPORT)):
        staff = staff_client(app, make_user, who, role=role, operator_id=a_op)
        queue = text(staff.get("/support/tickets?state=all"))
        assert ta.reference in queue and tb.reference not in queue and general.reference not in queue, who
        assert staff.get(f"/support/tickets/{ta.id}").status_code == 200
        for other in (tb, general):
            assert staff.get(f"/support/tickets/{other.id}").status_code == 404
            assert staff.post(f"/support/tickets/{other.id}/reply", data={"message": "hi"}).status_code == 404
            assert staff.post(f"/support/tickets/{other.id}/close", data={"close-reason": "x"}).status_code == 404
        assert staff.get("/support/tickets/999999").status_code == 404
    assert ticket_row(app, tb.id).messages[-1].from_staff is False  # nothing was done to B's ticket

    platform = staff_client(app, make_user, "agent@example.com")
    queue = text(platform.get("/support/tickets"))
    assert all(t.reference in queue for t in (ta, tb, general)) and "Alpha" in queue and "Beta" in queue
    assert platform.get(f"/support/tickets/{tb.id}").status_code == 200

    customer = app.test_client()
    account(app, make_user, "ana@example.com", euros=0)
    sign_in(customer, "ana@example.com")
    assert customer.get("/support/tickets").status_code == 403
    assert app.test_client().get("/support/tickets").status_code == 302  # guests: sign in first


def test_the_open_queue_puts_the_longest_waiting_customer_first(client, app, make_user, mailbox):
    for subject in ("Newest", "Oldest", "Middle", "Answered", "Done"):
        contact(client, subject=subject)
    now = utcnow()
    ages = {"Newest": 1, "Oldest": 50, "Middle": 20, "Answered": 60, "Done": 70}
    with app.extensions["db_sessionmaker"].begin() as s:
        for t in s.scalars(select(Ticket)):
            t.created_at = t.last_customer_message_at = now - dt.timedelta(minutes=ages[t.subject])
            if t.subject == "Answered":
                t.state = TicketState.WAITING
            if t.subject == "Done":
                t.state, t.closed_at = TicketState.CLOSED, now
    support = staff_client(app, make_user, "agent@example.com")
    rows = re.findall(r'data-testid="ticket-row" data-reference="(T-[A-Z0-9]{8})"', text(support.get("/support/tickets")))
    by_subject = {t.subject: t.reference for t in tickets(app)}
    assert rows == [by_subject["Oldest"], by_subject["Middle"], by_subject["Newest"]]
    waiting = text(support.get("/support/tickets?state=waiting"))
    assert by_subject["Answered"] in waiting and by_subject["Oldest"] not in waiting
    assert by_subject["Done"] in text(support.get("/support/tickets?state=closed"))
    assert len(re.findall(r'data-testid="ticket-row"', text(support.get("/support/tickets?state=all")))) == 5
    nav = text(support.get("/support/tickets?state=bogus"))
    assert 'href="/support/tickets"' in nav and "Open (3)" in nav and "All (5)" in nav


def test_the_footer_links_to_the_contact_form(client):
    assert 'href="/contact"' in text(client.get("/"))


def test_ticket_messages_are_stored_as_sent(client, app, mailbox):
    contact(client, message="  first line\r\nsecond\x00 line  ", subject="Two\nlines")
    (ticket,) = tickets(app)
    assert ticket.subject == "Two lines"
    with db(app) as s:
        assert s.scalar(select(TicketMessage.body)) == "first line\nsecond line"
