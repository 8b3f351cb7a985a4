"""A guest who paid too much asks for help and gets a refund, in real headless Chromium (Playwright).

The guest's card session is charged through the charging service (as the
gateway would; the card is held and captured at localstripe), and the guest
has the emailed link to it. In the browser: the guest opens the session's
receipt, its "Refunds" help article, and "Contact us" from there (the form
carries the session); then a support agent signs in in another browser, finds
the session in the console by the guest's email (at a desk), and refunds it. The guest
gets the credit note by email (the real SMTP server of the tests), and the
card is refunded once at localstripe.
"""

from __future__ import annotations

import re

import stripe
from playwright.sync_api import Page, expect
from sqlalchemy import select

from payments.base import utcnow
from payments.cards import CardPayment
from payments.invoicing import Document, DocumentKind
from tests.charging_helpers import session_row, wait_for
from tests.e2e.conftest import ConsoleError
from tests.webapp.test_support_actions import guest_card_session
from webapp.auth.passwords import hash_password
from webapp.charging import service
from webapp.charging.models import ChargingSession, SessionState
from webapp.models import Operator, Role, User
from webapp.support.models import AuditEntry, Ticket

GUEST = "guest.refund@example.com"
AGENT = "agent@example.com"
PASSWORD = "correct horse staple"
DESK = {"width": 1280, "height": 800}


def paid_guest_session(app, config) -> tuple[int, str]:
    """A guest's card session billed €4.24 (10 kWh at €0.4235), its invoice emailed; and its link (as the payment page emails it)."""
    cs = guest_card_session(app, config, GUEST)
    with app.extensions["db_sessionmaker"].begin() as s:
        token = service.new_guest_token(s, s.get(ChargingSession, cs.id))
    return cs.id, f"/s/{cs.id}?t={token}"


def test_a_guest_asks_for_help_contacts_support_and_an_agent_refunds_from_the_console(
    page: Page, browser, live_server, stripe_config, mailbox, console,
):
    app = live_server.app
    session_id, link = paid_guest_session(app, stripe_config)
    with app.extensions["db_sessionmaker"].begin() as s:
        op = s.scalar(select(Operator))
        s.add(User(email=AGENT, password_hash=hash_password(PASSWORD), email_verified_at=utcnow(), role=Role.SUPPORT, operator_id=op.id))

    # The guest opens the link to their session: the receipt, with help about refunds one tap away.
    mailbox.wait_for(GUEST)  # the invoice
    page.goto(live_server(link))
    expect(page.get_by_test_id("amount-paid")).to_have_text("You paid €4.24")
    page.get_by_role("link", name="Refunds").click()
    expect(page).to_have_url(re.compile(r"/help/refunds"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Refunds")
    expect(page.locator("main")).to_contain_text(f"We attach session {session_id} to your message.")

    # Contact us: the form carries the session; the guest writes and sends.
    page.get_by_test_id("contact-link").click()
    expect(page).to_have_url(re.compile(rf"/contact\?.*session={session_id}"))
    expect(page.get_by_test_id("attached")).to_be_visible()
    page.get_by_label("Your email").fill(GUEST)
    page.get_by_label("Subject").fill("Charged for energy I did not get")
    page.get_by_label("Your message").fill("The car only got half of it; the charger stopped by itself. Please refund me.")
    page.get_by_role("button", name="Send").click()
    expect(page).to_have_url(re.compile(r"/contact/sent"))
    with app.extensions["db_sessionmaker"]() as s:
        ticket = s.scalar(select(Ticket))
    assert (ticket.session_id, ticket.email) == (session_id, GUEST)

    # A support agent at their desk: signs in, finds the session by the guest's email, refunds it.
    context = browser.new_context(viewport=DESK, locale="en-GB")
    context.set_default_timeout(5_000)
    agent = context.new_page()
    agent.on("console", lambda msg: console.errors.append(ConsoleError(msg.text, msg.location.get("url", ""))) if msg.type == "error" else None)
    agent.on("pageerror", lambda exc: console.errors.append(ConsoleError(f"uncaught {exc.name}: {exc.message}", agent.url)))
    try:
        agent.goto(live_server("/support/"))
        agent.get_by_label("Email").fill(AGENT)
        agent.get_by_label("Password", exact=True).fill(PASSWORD)
        agent.get_by_role("button", name="Sign in").click()
        expect(agent.get_by_role("heading", level=1)).to_have_text("Support console")
        agent.get_by_label("Search", exact=True).fill(GUEST)
        agent.get_by_role("button", name="Search").click()
        agent.get_by_test_id("result-sessions").get_by_role("link", name=f"#{session_id}").click()
        expect(agent).to_have_url(live_server(f"/support/sessions/{session_id}"))

        refund = agent.get_by_test_id("refund-form")
        expect(refund.get_by_label("Amount to refund")).to_have_value("4.24")  # all that is left, offered
        refund.get_by_label("Reason").fill(f"Ticket {ticket.reference}: charger stopped early")
        refund.get_by_role("button", name="Refund").dblclick()  # an impatient double click: refunded once
        expect(agent.get_by_role("status")).to_contain_text(re.compile(rf"€4\.24 refunded; credit note \S+-CN-\d{{4}}-000001 is emailed to {re.escape(GUEST)}\."))
        expect(agent.get_by_test_id("refund-form")).to_have_count(0)  # nothing is left to refund
        agent.screenshot(path="/tmp/e2e-support-refund.png", full_page=True)
    finally:
        context.close()

    # The guest gets the credit note, with its PDF; the card is refunded once.
    wait_for(lambda: [m for m in mailbox.to(GUEST) if str(m["Subject"]).startswith("Credit note")], what="the credit note email")
    [credit] = [m for m in mailbox.to(GUEST) if str(m["Subject"]).startswith("Credit note")]
    with app.extensions["db_sessionmaker"]() as s:
        note = s.scalar(select(Document).where(Document.kind == DocumentKind.CREDIT_NOTE))
        pi = s.scalar(select(CardPayment.provider_payment_id))
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "refund")).all()
    assert str(credit["Subject"]) == f"Credit note {note.number}" and note.total_minor == 424
    assert [p.get_filename() for p in credit.iter_attachments()] == [f"{note.number}.pdf"]
    sdk = stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]},
                              max_network_retries=0)
    assert [r.amount for r in sdk.v1.refunds.list(params={"limit": 100}).data if r.payment_intent == pi] == [424]
    row = session_row(app, session_id)
    assert row.state is SessionState.COMPLETED and row.refunded_minor == 424
    assert [(e.actor_email, e.outcome) for e in entries] == [(AGENT, "done")]
    assert console.unexpected() == []
    assert live_server.errors == []
