"""What support staff do from the console (``webapp.support.actions``), through the test client, as a person would.

Sessions are driven through the charging service as the gateway drives them
(helpers of test_charging_service.py); card payments go to localstripe
through the Stripe SDK; emails to the real SMTP server of the conftest;
stop and unlock to a simulated charger over real OCPP websockets; relay
commands of a meter to a real local webhook receiver (test_meter_relay.py).
Forms are the ones the console page draws (the partials), so each POST
carries the one-time key the page made.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import threading
from decimal import Decimal as D

import pytest
import stripe
from flask import render_template
from sqlalchemy import func, select, update

from payments.base import utcnow
from payments.cards import CardPayment, CardRefund
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, balance
from payments.money import Money
from payments.settlement import Allocation
from tests.charging_helpers import (  # noqa: F401  (fixtures)
    charging_site,
    gateway,
    session_row,
    simulators,
    wait_for,
)
from tests.stripe_browser import browser_card
from tests.webapp.test_charging_service import card_site, charge, db, driver, make_site, money, start  # noqa: F401  (card_site: fixture)
from tests.webapp.test_meter_relay import commands as relay_commands
from tests.webapp.test_meter_relay import meter, move, receiver  # noqa: F401  (fixtures)
from tests.webapp.wallet_helpers import sign_in
from webapp.charging import service
from webapp.meters import topup
from webapp.charging.models import ChargerConnection, ChargingSession, PaymentKind, SessionState
from webapp.models import Charger, Meter, Operator, Role
from webapp.support.actions import new_key
from webapp.support.models import ApprovalRequest, ApprovalState, AuditEntry

GUEST = "guest@example.com"


# --------------------------------------------------------------------------- people and pages


def operator_id(app, name: str = "Op") -> int:
    with db(app) as s:
        return s.scalar(select(Operator.id).where(Operator.name == name))


def agent(app, email: str, *, op: int | None, role: Role = Role.SUPPORT):
    """A signed-in staff member's own browser (test client) and account."""
    from webapp.auth.passwords import hash_password
    from webapp.models import User

    with app.extensions["db_sessionmaker"].begin() as s:
        user = User(email=email, password_hash=hash_password("correct horse staple"), email_verified_at=utcnow(), role=role, operator_id=op)
        s.add(user)
    client = app.test_client()
    sign_in(client, email)
    return client, user


@pytest.fixture
def staff(site):
    """Two support agents of the site's operator (``ana``, ``ben``) and one of another operator (``zoe``)."""
    with site.extensions["db_sessionmaker"].begin() as s:
        other = Operator(name="Other", legal_name="Other S.A.")
        s.add(other)
    op = operator_id(site)
    return {
        "ana": agent(site, "ana.support@example.com", op=op),
        "ben": agent(site, "ben.support@example.com", op=op),
        "zoe": agent(site, "zoe.support@example.org", op=operator_id(site, "Other")),
    }


@pytest.fixture
def site(app):
    """The charging site of test_charging_service (Madrid, CP-1 with A101 and A102 at €0.35/kWh + 21 % VAT)."""
    app.config["WTF_CSRF_ENABLED"] = False
    make_site(app)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.scalar(select(Operator)).document_prefix = "VP"
    return app


def page_form(app, partial: str, var: str, obj_of, prefix: str) -> dict[str, str]:
    """The fields of one action form as the console page draws it (the partial, in a request): ``{"amount": "2.96", "key": ...}``."""
    with app.test_request_context("/support/"):
        from webapp.db import db_session

        obj = obj_of(db_session())
        markup = render_template(partial, **{var: obj})
    fields = {}
    for tag in re.findall(r"<(?:input|textarea)[^>]*>", markup):
        name = re.search(r'name="([^"]+)"', tag)
        if name and name.group(1).startswith(prefix + "-"):
            value = re.search(r'value="([^"]*)"', tag)
            fields[name.group(1)[len(prefix) + 1:]] = html.unescape(value.group(1)) if value else ""
    return fields


def session_form(app, session_id: int, prefix: str) -> dict[str, str]:
    return page_form(app, "support/_session_actions.html", "cs", lambda s: s.get(ChargingSession, session_id), prefix)


def post(client, url: str, prefix: str, **fields):
    return client.post(url, data={f"{prefix}-{k}": v for k, v in fields.items()})


def text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def audit(app, action: str | None = None) -> list[AuditEntry]:
    with db(app) as s:
        q = select(AuditEntry).order_by(AuditEntry.id)
        return list(s.scalars(q.where(AuditEntry.action == action) if action else q))


def count(app, model, *where) -> int:
    with db(app) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def customer(app, email: str = "eve@example.com", euros: int = 50):
    """A driver with ``euros`` in the wallet who turned receipt emails off (no PDF to render: the tests that read emails use guests)."""
    from webapp.notifications.models import NotificationPreferences

    user = driver(app, email, euros)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.merge(NotificationPreferences(user_id=user.id, receipts=False, session_started=False, session_completed=False))
    return user


def completed_wallet_session(app, user, code: str = "A101", wh: int = 7000) -> ChargingSession:
    """A wallet session billed €2.96 (7 kWh × €0.4235)."""
    cs = start(app, user, code=code).session
    charge(app, cs, utcnow(), kwh_at=[(300, wh // 2)], stop_s=700, stop_wh=wh)
    done = session_row(app, cs.id)
    assert done.state is SessionState.COMPLETED and done.captured_minor == 296
    return done


def set_limit(app, minor: int) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(Operator).where(Operator.name == "Op").values(support_approval_limit_minor=minor))


# --------------------------------------------------------------------------- refunds


def test_a_partial_refund_sent_twice_books_once_and_is_audited(site, staff):
    ana_client, ana = staff["ana"]
    eve = customer(site)
    cs = completed_wallet_session(site, eve)
    form = session_form(site, cs.id, "refund")
    assert form["amount"] == "2.96" and len(form["key"]) >= 16  # the page offers what is left, with a one-time key

    url = f"/support/sessions/{cs.id}/refund"
    first = post(ana_client, url, "refund", amount="1.00", reason="Charger was slow", key=form["key"])
    again = post(ana_client, url, "refund", amount="1.00", reason="Charger was slow", key=form["key"])  # the double click
    assert first.status_code == again.status_code == 303
    assert first.headers["Location"].endswith(f"/support/sessions/{cs.id}")
    page = ana_client.get(first.headers["Location"])  # the console's session page: the outcome, and the form for the rest
    assert page.status_code == 200 and "€1.00 refunded; credit note VP-CN-2026-000001 was issued (the customer has turned receipt emails off)." in text(page)
    assert 'name="refund-key"' in page.get_data(as_text=True) and 'value="1.96"' in page.get_data(as_text=True)

    assert money(site, eve.owner) == 5000 - 296 + 100  # back in the wallet, once
    assert session_row(site, cs.id).refunded_minor == 100
    refund_entries = count(site, JournalEntry, JournalEntry.idempotency_key.like(f"session:{cs.id}:refund:%"))
    assert refund_entries == 1
    assert count(site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    assert count(site, Allocation, Allocation.reverses_id.is_not(None)) == 1  # the parties gave back their part once
    [entry] = audit(site, "refund")
    assert (entry.actor_email, entry.outcome, entry.reason, entry.object_type, entry.object_id) == (
        "ana.support@example.com", "done", "Charger was slow", "session", str(cs.id))
    before, after = json.loads(entry.before_json), json.loads(entry.after_json)
    assert (before["refunded"], after["refunded"], after["refund"], before["state"]) == (0, 100, 100, "completed")
    assert entry.operator_id == operator_id(site)

    # The rest, typed the Spanish way by an agent whose console is in Spanish.
    with site.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(type(ana)).where(type(ana).id == ana.id).values(locale="es"))
    form = session_form(site, cs.id, "refund")
    assert post(ana_client, url, "refund", amount="1,96", reason="Resto", key=form["key"]).status_code == 303
    assert money(site, eve.owner) == 5000 and session_row(site, cs.id).refunded_minor == 296
    assert count(site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 2


@pytest.mark.parametrize("amount, message", [
    ("3.00", "At most €2.96 can still be refunded."),
    ("12,345.6", "At most €2.96 can still be refunded."),
    ("-1", "The amount cannot be negative."),
    ("12,34,5", "Not an amount: type it like 12.50."),
    ("abc", "Not an amount: type it like 12.50."),
    ("1.234", "EUR amounts have at most 2 decimals."),
    ("0", "The amount to refund must be more than zero."),
    ("", "Enter the amount to refund."),
])
def test_a_refund_amount_that_cannot_be_refunded_is_refused_with_a_message(site, staff, amount, message):
    ana_client, _ = staff["ana"]
    cs = completed_wallet_session(site, customer(site))
    form = session_form(site, cs.id, "refund")
    r = post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount=amount, reason="test", key=form["key"])
    assert r.status_code == 400 and message in text(r)
    assert session_row(site, cs.id).refunded_minor == 0 and count(site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 0


def test_a_refund_needs_a_reason_and_the_page_key_and_only_a_paid_session_is_refundable(site, staff):
    ana_client, _ = staff["ana"]
    eve = customer(site)
    cs = completed_wallet_session(site, eve)
    url = f"/support/sessions/{cs.id}/refund"
    key = session_form(site, cs.id, "refund")["key"]
    r = post(ana_client, url, "refund", amount="1.00", reason="   ", key=key)
    assert r.status_code == 400 and "Say why: the reason is kept in the audit log." in text(r)
    r = post(ana_client, url, "refund", amount="1.00", reason="x")
    assert r.status_code == 400 and "This form has expired: reload the page and try again." in text(r)
    assert audit(site) == []  # typing mistakes are not attempts

    live = start(site, eve, code="A102").session  # still waiting for the car
    r = post(ana_client, f"/support/sessions/{live.id}/refund", "refund", amount="1.00", reason="x", key=session_form(site, cs.id, "refund")["key"])
    assert r.status_code == 409 and "Only a paid, completed session can be refunded." in text(r)
    [refused] = audit(site, "refund")
    assert (refused.outcome, refused.object_id, json.loads(refused.before_json)["state"]) == ("refused", str(live.id), "start_requested")

    # Over what is left: refused and recorded; the corrected form (drawn again with a new key) goes through.
    r = post(ana_client, url, "refund", amount="5", reason="x", key=key)
    assert r.status_code == 400 and [e.outcome for e in audit(site, "refund")] == ["refused", "refused"]
    new_key = re.search(r'name="refund-key" type="hidden" value="([^"]+)"', r.get_data(as_text=True)).group(1)
    assert new_key != key
    assert post(ana_client, url, "refund", amount="2", reason="x", key=new_key).status_code == 303
    assert session_row(site, cs.id).refunded_minor == 200


def guest_card_session(app, config, email: str = GUEST) -> ChargingSession:
    """A guest's card session at localstripe, billed €4.24 (10 kWh), its invoice emailed to the guest."""
    make_site(app)
    provider = app.extensions["payment_provider"]
    pm = browser_card(config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    cs = start(app, None, email=email, payment_kind=PaymentKind.CARD, payment_method_id=pm, card_brand=card.brand,
               card_last4=card.last4).session
    charge(app, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    done = session_row(app, cs.id)
    assert done.state is SessionState.COMPLETED and done.captured_minor == 424
    return done


def card_session(app, config, user=None, *, complete: bool = True) -> ChargingSession:
    """A card session at localstripe of a quiet customer (``customer``): authorised and started, and billed €4.24 (10 kWh) if ``complete``."""
    provider = app.extensions["payment_provider"]
    pm = browser_card(config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    user = user or customer(app, euros=0)
    cs = start(app, user, payment_kind=PaymentKind.CARD, payment_method_id=pm, card_brand=card.brand, card_last4=card.last4).session
    if complete:
        charge(app, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
        assert session_row(app, cs.id).captured_minor == 424
    return session_row(app, cs.id)


def provider_refunds(config, app, cs) -> list:
    with db(app) as s:
        pi = s.get(CardPayment, cs.card_payment_id).provider_payment_id
    sdk = stripe.StripeClient(config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=0)
    return [r for r in sdk.v1.refunds.list(params={"limit": 100}).data if r.payment_intent == pi]


def test_a_card_refund_clicked_twice_refunds_the_card_once_and_the_guest_gets_the_credit_note(card_site, stripe_config, mailbox):
    cs = guest_card_session(card_site, stripe_config)
    mailbox.wait_for(GUEST)  # the invoice
    card_site.config["WTF_CSRF_ENABLED"] = False
    client, _ = agent(card_site, "ana.support@example.com", op=operator_id(card_site))
    key = session_form(card_site, cs.id, "refund")["key"]
    for _ in range(2):
        r = post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.24", reason="Slow charging", key=key)
        assert r.status_code == 303
    refunds = provider_refunds(stripe_config, card_site, cs)
    assert [r.amount for r in refunds] == [124]
    assert count(card_site, CardRefund) == 1 and count(card_site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    assert count(card_site, Allocation, Allocation.reverses_id.is_not(None)) == 1
    assert money(card_site, kind=AccountKind.PROVIDER_CLEARING) == 424 - 124
    wait_for(lambda: [m for m in mailbox.to(GUEST) if str(m["Subject"]).startswith("Credit note")], what="the credit note email")
    [credit] = [m for m in mailbox.to(GUEST) if str(m["Subject"]).startswith("Credit note")]
    assert [p.get_filename() for p in credit.iter_attachments()] == [f"{_credit_number(card_site)}.pdf"]
    assert len(audit(card_site, "refund")) == 1


def _credit_number(app) -> str:
    with db(app) as s:
        return s.scalar(select(Document.number).where(Document.kind == DocumentKind.CREDIT_NOTE))


def test_two_refund_posts_at_the_same_moment_refund_once(card_site, stripe_config):
    """Two browser tabs (or a double click the browser sent twice) at once: one refund at the provider, in the ledger, in the documents."""
    make_site(card_site)
    cs = card_session(card_site, stripe_config)
    card_site.config["WTF_CSRF_ENABLED"] = False
    clients = [agent(card_site, f"agent{i}@example.com", op=operator_id(card_site))[0] for i in range(2)]
    key = session_form(card_site, cs.id, "refund")["key"]
    barrier = threading.Barrier(2)
    answers: list[int] = []

    def click(client):
        barrier.wait(timeout=30)
        answers.append(post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="4.24", reason="Broken", key=key).status_code)

    threads = [threading.Thread(target=click, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [303, 303]
    assert [r.amount for r in provider_refunds(stripe_config, card_site, cs)] == [424]
    assert count(card_site, CardRefund) == 1 and count(card_site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    assert count(card_site, JournalEntry, JournalEntry.description == "Charging refunded") == 1
    assert count(card_site, Allocation, Allocation.reverses_id.is_not(None)) == 1
    assert session_row(card_site, cs.id).refunded_minor == 424
    assert len(audit(card_site, "refund")) == 1


def test_a_card_refund_the_provider_did_not_answer_is_finished_by_sending_the_form_again(card_site, stripe_config):
    from payments.providers import make_provider

    make_site(card_site)
    cs = card_session(card_site, stripe_config)
    card_site.config["WTF_CSRF_ENABLED"] = False
    client, _ = agent(card_site, "ana.support@example.com", op=operator_id(card_site))
    provider = card_site.extensions["payment_provider"]
    key = session_form(card_site, cs.id, "refund")["key"]
    card_site.extensions["payment_provider"] = make_provider({**stripe_config, "STRIPE_API_BASE": "http://127.0.0.1:9"})  # unreachable
    r = post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.00", reason="Slow", key=key)
    assert r.status_code == 503 and "The refund is reserved: send the form again" in text(r)
    assert f'value="{key}"' in r.get_data(as_text=True)  # the same form, with the same key
    assert session_row(card_site, cs.id).refunded_minor == 100 and provider_refunds(stripe_config, card_site, cs) == []
    card_site.extensions["payment_provider"] = provider
    r = post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.00", reason="Slow", key=key)
    assert r.status_code == 303
    assert [r.amount for r in provider_refunds(stripe_config, card_site, cs)] == [100]
    assert session_row(card_site, cs.id).refunded_minor == 100 and count(card_site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    assert [e.outcome for e in audit(card_site, "refund")] == ["done", "failed", "done"]  # reserved, not sent, sent


def test_a_pending_card_refund_sent_again_from_two_places_at_once_is_refunded_once(card_site, stripe_config):
    """The provider did not answer; then a support agent and a retried request send the same refund at the same moment.

    localstripe ignores idempotency keys, so only our own lock keeps the card from being refunded twice.
    """
    from payments.providers import make_provider
    from payments.providers.base import ProviderUnavailable

    make_site(card_site)
    cs = card_session(card_site, stripe_config)
    provider = card_site.extensions["payment_provider"]
    unreachable = make_provider({**stripe_config, "STRIPE_API_BASE": "http://127.0.0.1:9"})
    with card_site.app_context(), db(card_site) as s, pytest.raises(ProviderUnavailable):
        service.refund_session(s, unreachable, cs.id, Money(150, "EUR"), reason="Slow", key="k1", now=utcnow())
    assert session_row(card_site, cs.id).refunded_minor == 150 and provider_refunds(stripe_config, card_site, cs) == []
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def send_again():
        try:
            with card_site.app_context(), db(card_site) as s:
                barrier.wait(timeout=30)
                service.refund_session(s, provider, cs.id, Money(150, "EUR"), reason="Slow", key="k1", now=utcnow())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send_again) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.amount for r in provider_refunds(stripe_config, card_site, cs)] == [150]
    assert count(card_site, CardRefund) == 1 and count(card_site, CardRefund, CardRefund.status == "succeeded") == 1
    assert session_row(card_site, cs.id).refunded_minor == 150
    assert count(card_site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    assert money(card_site, kind=AccountKind.PROVIDER_CLEARING) == 424 - 150


# --------------------------------------------------------------------------- approvals


def test_a_refund_over_the_limit_waits_for_a_second_person_who_approves_it_once(site, staff):
    set_limit(site, 100)
    (ana_client, ana), (ben_client, ben) = staff["ana"], staff["ben"]
    eve = customer(site)
    cs = completed_wallet_session(site, eve)
    key = session_form(site, cs.id, "refund")["key"]
    r = post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount="2.50", reason="Charged twice", key=key)
    assert r.status_code == 303
    assert money(site, eve.owner) == 5000 - 296 and session_row(site, cs.id).refunded_minor == 0  # nothing moved yet
    [requested] = audit(site, "refund")
    assert requested.outcome == "requested" and json.loads(requested.after_json)["amount"] == 250
    assert "above the limit of €1.00: request #1 waits for a second person's approval" in text(ana_client.get("/support/approvals"))
    assert "waits for a second person's approval (request #1)" in html.unescape(page_form_html(site, cs.id))  # on the session's actions

    listing = ana_client.get("/support/approvals")
    assert listing.status_code == 200 and "€2.50" in text(listing) and "Charged twice" in text(listing)
    assert "You asked for this" in text(listing)

    own = ana_client.post("/support/approvals/1/approve", data={})
    assert own.status_code == 403 and "another person must approve it" in text(own)
    assert money(site, eve.owner) == 5000 - 296

    ok = ben_client.post("/support/approvals/1/approve", data={"approve-1-note": "Checked the charger log"})
    assert ok.status_code == 303
    again = ben_client.post("/support/approvals/1/approve", data={})
    assert again.status_code == 409 and "already decided" in text(again)
    assert money(site, eve.owner) == 5000 - 296 + 250 and session_row(site, cs.id).refunded_minor == 250
    assert count(site, Document, Document.kind == DocumentKind.CREDIT_NOTE) == 1
    with db(site) as s:
        req = s.get(ApprovalRequest, 1)
    assert (req.state, req.decided_by_id, req.requested_by_id) == (ApprovalState.APPROVED, ben.id, ana.id)
    assert "€2.50 refunded" in req.result
    refund_entries = audit(site, "refund")
    assert [(e.outcome, e.actor_email) for e in refund_entries] == [("requested", ana.email), ("done", ben.email)]
    assert json.loads(refund_entries[1].after_json)["approval_id"] == 1
    decisions = audit(site, "approve")
    assert [(e.outcome, e.actor_email) for e in decisions] == [("refused", ana.email), ("done", ben.email), ("refused", ben.email)]
    assert json.loads(decisions[1].after_json)["state"] == "approved"
    assert "€2.50" in text(ben_client.get("/support/approvals")) and "Nothing is waiting" in text(ben_client.get("/support/approvals"))


def page_form_html(app, session_id: int) -> str:
    with app.test_request_context("/support/"):
        from webapp.db import db_session

        return render_template("support/_session_actions.html", cs=db_session().get(ChargingSession, session_id))


def test_a_rejected_request_moves_nothing_and_needs_a_reason(site, staff):
    set_limit(site, 0)
    (ana_client, _), (ben_client, ben) = staff["ana"], staff["ben"]
    eve = customer(site)
    cs = completed_wallet_session(site, eve)
    post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount="0.50", reason="Goodwill",
         key=session_form(site, cs.id, "refund")["key"])
    r = ben_client.post("/support/approvals/1/reject", data={"reject-1-reason": ""})
    assert r.status_code == 400 and "Say why" in text(r)
    r = ben_client.post("/support/approvals/1/reject", data={"reject-1-reason": "Not our fault"})
    assert r.status_code == 303
    assert ben_client.post("/support/approvals/1/approve", data={}).status_code == 409
    assert money(site, eve.owner) == 5000 - 296 and session_row(site, cs.id).refunded_minor == 0
    with db(site) as s:
        req = s.get(ApprovalRequest, 1)
    assert (req.state, req.result, req.decided_by_id) == (ApprovalState.REJECTED, "Not our fault", ben.id)
    [rejected] = audit(site, "reject")
    assert (rejected.outcome, rejected.reason, json.loads(rejected.after_json)) == ("done", "Not our fault", {"state": "rejected"})


def test_an_approved_refund_that_no_longer_fits_ends_failed(site, staff):
    set_limit(site, 100)
    (ana_client, _), (ben_client, _) = staff["ana"], staff["ben"]
    cs = completed_wallet_session(site, customer(site))
    post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount="2.00", reason="a", key=session_form(site, cs.id, "refund")["key"])
    post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.00", reason="b", key=session_form(site, cs.id, "refund")["key"])
    assert session_row(site, cs.id).refunded_minor == 100  # within the limit: done at once
    r = ben_client.post("/support/approvals/1/approve", data={})
    assert r.status_code == 303
    with db(site) as s:
        req = s.get(ApprovalRequest, 1)
    assert req.state is ApprovalState.FAILED and "At most €1.96 can still be refunded." in req.result
    assert session_row(site, cs.id).refunded_minor == 100


# --------------------------------------------------------------------------- who may act


def test_another_operators_staff_get_404_and_customers_403(site, staff):
    zoe_client, _ = staff["zoe"]
    eve = customer(site)
    cs = completed_wallet_session(site, eve)
    key = session_form(site, cs.id, "refund")["key"]
    for path, prefix in (("refund", "refund"), ("release-hold", "release"), ("stop", "stop"), ("unlock", "unlock"), ("review", "review")):
        r = post(zoe_client, f"/support/sessions/{cs.id}/{path}", prefix, amount="1", reason="x", key=key, decision="release")
        assert r.status_code == 404, path
    with db(site) as s:
        number = s.scalar(select(Document.number))
    assert post(zoe_client, f"/support/documents/{number}/resend", "resend", reason="x", key=key).status_code == 404
    assert post(zoe_client, "/support/sessions/999999/refund", "refund", amount="1", reason="x", key=key).status_code == 404
    set_limit(site, 0)
    ana_client, _ = staff["ana"]
    post(ana_client, f"/support/sessions/{cs.id}/refund", "refund", amount="1", reason="x", key=key)
    assert "Nothing is waiting" in text(zoe_client.get("/support/approvals"))
    assert zoe_client.post("/support/approvals/1/approve", data={}).status_code == 404
    assert zoe_client.post("/support/approvals/1/reject", data={"reject-1-reason": "no"}).status_code == 404
    assert money(site, eve.owner) == 5000 - 296 and audit(site, "approve") == [] and audit(site, "reject") == []

    carla, _ = agent(site, "carla@example.com", op=None, role=Role.CUSTOMER)
    assert post(carla, f"/support/sessions/{cs.id}/refund", "refund", amount="1", reason="x", key=key).status_code == 403
    assert carla.get("/support/approvals").status_code == 403
    anonymous = site.test_client().post(f"/support/sessions/{cs.id}/refund", data={})
    assert anonymous.status_code == 302 and "/auth/sign-in" in anonymous.headers["Location"]
    assert session_row(site, cs.id).refunded_minor == 0

    # Platform support (no operator) and an operator's own staff may act.
    platform_client, _ = agent(site, "platform@example.com", op=None)
    key = session_form(site, cs.id, "refund")["key"]
    set_limit(site, 10000)
    assert post(platform_client, f"/support/sessions/{cs.id}/refund", "refund", amount="0.10", reason="x", key=key).status_code == 303
    staff_client, _ = agent(site, "staff@example.net", op=operator_id(site), role=Role.OPERATOR_STAFF)
    key = session_form(site, cs.id, "refund")["key"]
    assert post(staff_client, f"/support/sessions/{cs.id}/refund", "refund", amount="0.10", reason="x", key=key).status_code == 303
    assert session_row(site, cs.id).refunded_minor == 20


def test_forms_need_their_csrf_token(site, staff):
    cs = completed_wallet_session(site, customer(site))
    site.config["WTF_CSRF_ENABLED"] = True
    client = site.test_client()
    sign_in_with_csrf(client, "ana.support@example.com")
    key = session_form(site, cs.id, "refund")["key"]
    r = post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.00", reason="x", key=key)
    assert r.status_code == 400 and session_row(site, cs.id).refunded_minor == 0
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/support/approvals").get_data(as_text=True)).group(1)
    r = post(client, f"/support/sessions/{cs.id}/refund", "refund", amount="1.00", reason="x", key=key, csrf_token=token)
    assert r.status_code == 303 and session_row(site, cs.id).refunded_minor == 100


def sign_in_with_csrf(client, email: str) -> None:
    page = client.get("/auth/sign-in").get_data(as_text=True)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    r = client.post("/auth/sign-in", data={"email": email, "password": "correct horse staple", "csrf_token": token})
    assert r.status_code == 302


# --------------------------------------------------------------------------- a stuck hold


def test_a_stuck_card_hold_is_released_at_the_provider_and_only_then(card_site, stripe_config):
    make_site(card_site)
    card_site.config["WTF_CSRF_ENABLED"] = False
    client, _ = agent(card_site, "ana.support@example.com", op=operator_id(card_site))
    provider = card_site.extensions["payment_provider"]
    cs = card_session(card_site, stripe_config, complete=False)
    assert cs.state is SessionState.START_REQUESTED
    url = f"/support/sessions/{cs.id}/release-hold"
    key = session_form(card_site, cs.id, "stop")["key"]
    r = post(client, url, "release", reason="stuck", key=key)
    assert r.status_code == 409 and "still under way" in text(r)
    assert "release-key" not in page_form_html(card_site, cs.id)  # not offered either

    # The start timed out, but the release never reached the provider (it was down): the card is still held.
    with card_site.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(ChargingSession).where(ChargingSession.id == cs.id)
                  .values(state=SessionState.START_TIMEOUT, active_connector_id=None))
    form = session_form(card_site, cs.id, "release")
    r = post(client, url, "release", reason="Driver called: hold still on the card", key=form["key"])
    assert r.status_code == 303
    with db(card_site) as s:
        row = s.get(CardPayment, cs.card_payment_id)
    assert row.state.value == "canceled"
    assert provider.retrieve(payment_id=row.provider_payment_id).status.value == "canceled"
    [entry] = [e for e in audit(card_site, "release_hold") if e.outcome == "done"]
    assert json.loads(entry.before_json)["card"] == "authorized" and json.loads(entry.after_json)["card"] == "canceled"
    r = post(client, url, "release", reason="again", key=new_key())  # an old page
    assert r.status_code == 409 and "Nothing is held" in text(r)


def test_a_stuck_wallet_hold_is_given_back(site, staff):
    ana_client, _ = staff["ana"]
    eve = customer(site)
    cs = start(site, eve).session
    with site.extensions["db_sessionmaker"].begin() as s:  # ended without its release (a crash between the two, say)
        s.execute(update(ChargingSession).where(ChargingSession.id == cs.id).values(state=SessionState.CANCELLED, active_connector_id=None))
    assert money(site, eve.owner) == 5000 - cs.hold_minor
    r = post(ana_client, f"/support/sessions/{cs.id}/release-hold", "release", reason="stuck", key=session_form(site, cs.id, "release")["key"])
    assert r.status_code == 303
    assert money(site, eve.owner) == 5000 and money(site, eve.owner, AccountKind.WALLET_HOLD) == 0
    done = completed_wallet_session(site, eve)
    r = post(ana_client, f"/support/sessions/{done.id}/release-hold", "release", reason="x", key=session_form(site, done.id, "refund")["key"])
    assert r.status_code == 409 and "Nothing is held" in text(r)


# --------------------------------------------------------------------------- stop and unlock, with a charger on the line


@pytest.fixture
def app_config(app_config):
    return {**app_config, "GATEWAY_TIMEOUT": 2.0}


def test_support_stops_a_charging_session_and_unlocks_the_connector_of_a_real_charger(app, gateway, charging_site, simulators):
    from tests.webapp.test_gateway import open_wallet_session

    app.config["WTF_CSRF_ENABLED"] = False
    user = customer(app)
    session_id = open_wallet_session(app, charging_site, user, hold=2000)
    sim = simulators.start(power_kw=11, time_scale=100)
    client, _ = agent(app, "ana.support@example.com", op=operator_id(app, "Operator CP-1"))
    with db(app) as s:
        service.request_start(s, app.extensions["charger_gateway"], None, s.get(ChargingSession, session_id), utcnow())
    wait_for(lambda: session_row(app, session_id).state is SessionState.CHARGING, what="charging")
    wait_for(lambda: sim.connector(1).transaction_id is not None, what="the charger to know its transaction")

    r = post(client, f"/support/sessions/{session_id}/unlock", "unlock", reason="stuck", key=session_form(app, session_id, "stop")["key"])
    assert r.status_code == 409 and "stop the session first" in text(r)
    assert sim.count_received("UnlockConnector") == 0

    r = post(client, f"/support/sessions/{session_id}/stop", "stop", reason="Driver cannot reach the car",
             key=session_form(app, session_id, "stop")["key"])
    assert r.status_code == 303
    done = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.COMPLETED and row, what="billing")
    assert done.stop_requested_by == "support" and done.captured_minor > 0
    [stop] = audit(app, "stop_session")
    assert json.loads(stop.before_json)["state"] == "charging" and stop.outcome == "done"

    r = post(client, f"/support/sessions/{session_id}/unlock", "unlock", reason="Cable stuck", key=session_form(app, session_id, "unlock")["key"])
    assert r.status_code == 303
    assert sim.count_received("UnlockConnector") == 1
    [unlock] = [e for e in audit(app, "unlock_connector") if e.outcome == "done"]
    assert json.loads(unlock.after_json)["answer"] == "Unlocked"
    r = post(client, f"/support/sessions/{session_id}/stop", "stop", reason="again", key=session_form(app, session_id, "unlock")["key"])
    assert r.status_code == 409 and "already ended" in text(r)

    simulators.run(sim.disconnect())
    wait_for(lambda: count(app, ChargerConnection) == 0, what="the charger to be gone")
    r = post(client, f"/support/sessions/{session_id}/unlock", "unlock", reason="Cable stuck", key=session_form(app, session_id, "unlock")["key"])
    assert r.status_code == 409 and "The charger is offline" in text(r)
    assert [e.outcome for e in audit(app, "unlock_connector")] == ["refused", "done", "failed"]
    assert sim.errors == []


def test_stopping_before_charging_cancels_and_an_offline_charger_is_said_so(site, staff):
    ana_client, _ = staff["ana"]
    eve = customer(site)
    cs = start(site, eve).session  # the charger accepted the start; the car is not plugged in yet
    r = post(ana_client, f"/support/sessions/{cs.id}/stop", "stop", reason="Driver left", key=session_form(site, cs.id, "stop")["key"])
    assert r.status_code == 303
    assert session_row(site, cs.id).state is SessionState.CANCELLED and money(site, eve.owner) == 5000

    charging = start(site, eve).session
    with service_app(site) as s:  # the car plugs in; the charger's connection is the test stand-in at gateway.invalid
        service.start_transaction(s, s.scalar(select(Charger)), connector_number=1, id_tag=charging.id_tag, meter_start_wh=D(0),
                                  timestamp=utcnow(), now=utcnow())
        s.commit()
    r = post(ana_client, f"/support/sessions/{cs.id}/unlock", "unlock", reason="cable", key=session_form(site, cs.id, "unlock")["key"])
    assert r.status_code == 409 and f"Connector A101 is charging another car now (session {charging.id})" in text(r)
    r = post(ana_client, f"/support/sessions/{charging.id}/stop", "stop", reason="x", key=session_form(site, charging.id, "stop")["key"])
    assert r.status_code == 504 and "The charger did not answer in time." in text(r)  # its gateway cannot be reached
    with site.extensions["db_sessionmaker"].begin() as s:
        s.execute(ChargerConnection.__table__.delete())
    r = post(ana_client, f"/support/sessions/{charging.id}/stop", "stop", reason="x", key=session_form(site, charging.id, "stop")["key"])
    assert r.status_code == 409 and "The charger is offline and cannot be stopped remotely." in text(r)
    assert session_row(site, charging.id).state is SessionState.CHARGING


class service_app:
    """A database session inside the app's context (the charging service's calls outside a request)."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        self.ctx = self.app.app_context()
        self.ctx.push()
        self.s = db(self.app)
        return self.s

    def __exit__(self, *exc):
        self.s.close()
        self.ctx.pop()


# --------------------------------------------------------------------------- receipts


def test_a_receipt_is_sent_again_to_its_address_or_a_corrected_one(site, staff, mailbox):
    ana_client, _ = staff["ana"]
    cs = completed_wallet_session(site, customer(site))  # who turned receipt emails off: support sends it all the same
    with db(site) as s:
        number = s.scalar(select(Document.number).where(Document.source == f"session:{cs.id}"))
    assert mailbox.to("eve@example.com") == []

    def form():
        return page_form(site, "support/_document_actions.html", "doc", lambda s: s.scalar(select(Document)), "resend")

    url = f"/support/documents/{number}/resend"
    key = form()["key"]
    assert post(ana_client, url, "resend", email="", reason="Not received", key=key).status_code == 303
    assert post(ana_client, url, "resend", email="", reason="Not received", key=key).status_code == 303  # clicked twice: sent once
    [msg] = mailbox.wait_for("eve@example.com")
    assert str(msg["Subject"]) == f"Your invoice {number}" and [p.get_filename() for p in msg.iter_attachments()] == [f"{number}.pdf"]
    r = post(ana_client, url, "resend", email="not an address", reason="typo", key=form()["key"])
    assert r.status_code == 400 and "Enter an email address." in text(r)
    assert post(ana_client, url, "resend", email="Eve.Work@Example.com", reason="Typo in the address", key=form()["key"]).status_code == 303
    [msg] = mailbox.wait_for("eve.work@example.com")
    assert str(msg["Subject"]) == f"Your invoice {number}"
    assert len(mailbox.to("eve@example.com")) == 1
    entries = audit(site, "resend_receipt")
    assert [json.loads(e.after_json)["sent_to"] for e in entries] == ["eve@example.com", "eve.work@example.com"]
    assert (entries[0].object_type, entries[0].object_id, entries[0].reason) == ("document", number, "Not received")


# --------------------------------------------------------------------------- goodwill credit on a meter


def test_a_goodwill_credit_reconnects_a_cut_meter_once_and_over_the_limit_asks_first(app, meter, receiver):  # noqa: F811
    app.config["WTF_CSRF_ENABLED"] = False
    op = operator_id(app)
    ana_client, _ = agent(app, "ana.support@example.com", op=op)
    ben_client, _ = agent(app, "ben.support@example.com", op=op)
    move(app, meter.id, 500)
    move(app, meter.id, -500)  # used up: the power is cut
    assert [c.action.value for c in relay_commands(app)] == ["disconnect"]

    def form():
        return page_form(app, "support/_meter_actions.html", "meter", lambda s: s.get(Meter, meter.id), "goodwill")

    url = "/support/meters/M2B/goodwill"
    assert 'name="goodwill-key"' in ana_client.get("/support/meters/M2B").get_data(as_text=True)  # on the console's meter page
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(Operator(name="Other", legal_name="Other S.A."))
    zoe_client, _ = agent(app, "zoe.support@example.org", op=operator_id(app, "Other"))
    assert post(zoe_client, url, "goodwill", amount="5", reason="x", key=form()["key"]).status_code == 404
    for bad, message in (("-5", "cannot be negative"), ("0", "more than zero"), ("five", "Not an amount")):
        r = post(ana_client, url, "goodwill", amount=bad, reason="x", key=form()["key"])
        assert r.status_code == 400 and message in text(r)
    key = form()["key"]
    assert post(ana_client, url, "goodwill", amount="20", reason="Outage last week", key=key).status_code == 303
    assert post(ana_client, url, "goodwill", amount="20", reason="Outage last week", key=key).status_code == 303
    with db(app) as s:
        assert topup.meter_balance(s, s.get(Meter, meter.id)).amount == 2000
        goodwill = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.GOODWILL))
        assert (goodwill.owner, balance(s, goodwill).amount) == (f"operator:{op}", 2000)
    assert [c.action.value for c in relay_commands(app)] == ["disconnect", "reconnect"]  # as after a paid top-up
    assert json.loads(receiver.requests[-1]["body"])["action"] == "reconnect"
    [entry] = [e for e in audit(app, "goodwill_credit") if e.outcome == "done"]
    assert (json.loads(entry.before_json)["balance"], json.loads(entry.after_json)["balance"]) == (0, 2000)
    assert json.loads(entry.after_json)["relay"] in ("reconnecting", "connected")

    r = post(ana_client, url, "goodwill", amount="150", reason="Big outage", key=form()["key"])  # over the €100 default
    assert r.status_code == 303
    assert count(app, ApprovalRequest, ApprovalRequest.state == ApprovalState.PENDING) == 1
    assert ben_client.post("/support/approvals/1/approve", data={}).status_code == 303
    with db(app) as s:
        assert topup.meter_balance(s, s.get(Meter, meter.id)).amount == 17000
    assert [e.outcome for e in audit(app, "goodwill_credit")] == ["refused", "done", "requested", "done"]  # "0" was refused

    key = form()["key"]
    with app.extensions["db_sessionmaker"].begin() as s:  # the tenant moved to a post-paid contract meanwhile
        s.execute(update(Meter).where(Meter.id == meter.id).values(prepaid=False))
    r = post(ana_client, url, "goodwill", amount="5", reason="x", key=key)
    assert r.status_code == 409 and "This meter has no prepaid balance to credit (postpaid)." in text(r)


# --------------------------------------------------------------------------- sessions in review


def review_session(app, user, code: str = "A101") -> ChargingSession:
    """A session whose meter went backwards: in review, the hold kept."""
    cs = start(app, user, code=code).session
    charge(app, cs, utcnow(), kwh_at=[(300, 3000), (400, 2000)], stop_s=600, stop_wh=4000)
    row = session_row(app, cs.id)
    assert (row.state, row.failure_code) == (SessionState.REVIEW, "meter_backwards")
    return row


def test_a_review_session_is_settled_released_or_written_off(site, staff):
    ana_client, _ = staff["ana"]
    eve = customer(site)
    cs = review_session(site, eve)
    url = f"/support/sessions/{cs.id}/review"
    r = post(ana_client, url, "review", reason="x", key=session_form(site, cs.id, "review")["key"])
    assert r.status_code == 400 and "Choose a decision." in text(r)
    r = post(ana_client, url, "review", decision="settle", reason="Readings checked: 4 kWh", key=session_form(site, cs.id, "review")["key"])
    assert r.status_code == 303
    done = session_row(site, cs.id)
    assert done.state is SessionState.COMPLETED and done.captured_minor == done.final_incl_vat_minor > 0
    assert money(site, eve.owner) == 5000 - done.captured_minor and money(site, eve.owner, AccountKind.WALLET_HOLD) == 0
    assert count(site, Document, Document.source == f"session:{cs.id}") == 1
    [entry] = audit(site, "resolve_review")
    assert json.loads(entry.before_json)["state"] == "review" and json.loads(entry.after_json)["decision"] == "settle"
    r = post(ana_client, url, "review", decision="release", reason="again", key=session_form(site, cs.id, "refund")["key"])
    assert r.status_code == 409 and "not waiting for review" in text(r)

    released = review_session(site, eve)
    r = post(ana_client, f"/support/sessions/{released.id}/review", "review", decision="release", reason="Charger fault",
             key=session_form(site, released.id, "review")["key"])
    assert r.status_code == 303
    row = session_row(site, released.id)
    assert (row.state, row.captured_minor, row.failure_code) == (SessionState.COMPLETED, 0, "released_by_support")
    assert money(site, eve.owner) == 5000 - done.captured_minor and count(site, Document, Document.source == f"session:{released.id}") == 0

    lost = review_session(site, eve)
    r = post(ana_client, f"/support/sessions/{lost.id}/review", "review", decision="write_off", reason="Cannot be billed",
             key=session_form(site, lost.id, "review")["key"])
    assert r.status_code == 303
    row = session_row(site, lost.id)
    assert (row.state, row.captured_minor, row.failure_code) == (SessionState.COMPLETED, 0, "written_off")
    assert money(site, eve.owner, AccountKind.WALLET_HOLD) == 0
    assert [json.loads(e.after_json)["decision"] for e in audit(site, "resolve_review") if e.outcome == "done"] == ["settle", "release", "write_off"]


def test_a_session_the_charger_never_stopped_is_billed_from_its_readings(site, staff):
    ana_client, _ = staff["ana"]
    eve = customer(site)
    cs = start(site, eve).session
    t0 = utcnow() - dt.timedelta(days=2)
    with service_app(site) as s:  # charging, two readings, then silence
        charger = s.scalar(select(Charger))
        ans = service.start_transaction(s, charger, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
        for minutes, wh in ((10, 2000), (20, 4000)):
            at = t0 + dt.timedelta(minutes=minutes)
            service.meter_values(s, charger, connector_number=1, transaction_id=ans.transaction_id,
                                 readings=[service.Reading(at, D(wh), D(11000))], now=at)
        s.commit()
        service.review_silent(s, cs.id, utcnow())
    assert session_row(site, cs.id).failure_code == "no_stop"
    r = post(ana_client, f"/support/sessions/{cs.id}/review", "review", decision="settle", reason="Driver confirms 4 kWh",
             key=session_form(site, cs.id, "review")["key"])
    assert r.status_code == 303
    row = session_row(site, cs.id)
    assert (row.state, row.final_incl_vat_minor, row.captured_minor) == (SessionState.COMPLETED, 169, 169)  # 4 kWh × €0.4235
    assert row.ended_at == t0 + dt.timedelta(minutes=20) and money(site, eve.owner) == 5000 - 169


def test_a_refused_capture_sent_to_review_is_settled_again_at_the_provider(card_site, stripe_config):
    """A card capture that failed (the provider was down): a person settles it and the card is charged."""
    make_site(card_site)
    card_site.config["WTF_CSRF_ENABLED"] = False
    client, _ = agent(card_site, "ana.support@example.com", op=operator_id(card_site))
    provider = card_site.extensions["payment_provider"]
    cs = card_session(card_site, stripe_config, complete=False)
    card_site.extensions["payment_provider"] = None  # the provider "does not answer": the capture is deferred
    charge(card_site, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    assert session_row(card_site, cs.id).state is SessionState.FINISHING
    with card_site.extensions["db_sessionmaker"].begin() as s:  # ... until the attempts ran out

        s.execute(update(ChargingSession).where(ChargingSession.id == cs.id)
                  .values(state=SessionState.REVIEW, failure_code="capture_failed", settle_claimed_at=None))
    card_site.extensions["payment_provider"] = provider
    r = post(client, f"/support/sessions/{cs.id}/review", "review", decision="settle", reason="Provider back",
             key=session_form(card_site, cs.id, "review")["key"])
    assert r.status_code == 303, text(r)
    row = session_row(card_site, cs.id)
    assert row.state is SessionState.COMPLETED and row.captured_minor == 424
    with db(card_site) as s:
        assert s.get(CardPayment, cs.card_payment_id).captured_minor == 424

    # Another one in review, released: the authorisation is cancelled at the provider.
    other = card_session(card_site, stripe_config, customer(card_site, "fay@example.com", euros=0), complete=False)
    with card_site.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(ChargingSession).where(ChargingSession.id == other.id)
                  .values(state=SessionState.REVIEW, failure_code="capture_failed", active_connector_id=None))
    r = post(client, f"/support/sessions/{other.id}/review", "review", decision="release", reason="Not our customer's fault",
             key=session_form(card_site, other.id, "review")["key"])
    assert r.status_code == 303
    with db(card_site) as s:
        pi = s.get(CardPayment, other.card_payment_id).provider_payment_id
    assert provider.retrieve(payment_id=pi).status.value == "canceled"
    assert (session_row(card_site, other.id).state, session_row(card_site, other.id).captured_minor) == (SessionState.COMPLETED, 0)
