"""Email notifications through real flows and a real SMTP server (aiosmtpd): receipts with their PDF,
session started/completed, payment failed, low wallet balance, the outbox and the preferences page.

Jobs run in immediate mode (the conftest's default): a job queued after a
commit runs in the committing thread, so the message is in the mailbox when
the flow returns; retries are driven from Huey's schedule, never by waiting.
"""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal as D

import pytest
from sqlalchemy import select, update

from payments import wallet
from payments.base import utcnow
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from tests.conftest import free_port
from tests.stripe_browser import DECLINED_AT_CHARGE, browser_card
from tests.webapp.test_charging_service import charge, db, driver, make_site, session, start
from tests.webapp.wallet_helpers import payment_id_of, save_card, sign_in, text, top_up
from webapp.charging import service
from webapp.charging.models import PaymentKind, SessionState
from webapp.notifications import outbox
from webapp.notifications.models import NotificationPreferences, SentEmail
from webapp.tasks import huey

ANA = "ana@example.com"
GUEST = "guest@example.com"


@pytest.fixture
def site(app):
    return make_site(app)


@pytest.fixture
def card_site(app_config, stripe_config):
    """The site, in an app with localstripe as its payment provider."""
    from tests.conftest import _truncate
    from webapp import create_app

    app_config.update(stripe_config)
    application = create_app(app_config)
    _truncate(application)
    make_site(application)
    yield application
    application.extensions["db_engine"].dispose()


def subjects(mailbox, to: str) -> list[str]:
    return [str(m["Subject"]) for m in mailbox.to(to)]


def body(msg) -> str:
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")


def sent_emails(app, to: str | None = None) -> list[SentEmail]:
    with db(app) as s:
        q = select(SentEmail).order_by(SentEmail.id)
        if to:
            q = q.where(SentEmail.to == to)
        return list(s.scalars(q))


def set_preferences(app, user, **choices) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        s.merge(NotificationPreferences(user_id=user.id, **{"receipts": True, "session_started": True, "session_completed": True,
                                                           "payment_failed": True, "low_balance": True,
                                                           "low_balance_threshold_minor": 500, **choices}))


def wallet_session(app, user, kwh: int = 7):
    """A whole wallet session: start, charge ``kwh`` in ten minutes, stop, settle."""
    cs = start(app, user).session
    charge(app, cs, utcnow(), kwh_at=[(300, kwh * 500)], stop_s=600, stop_wh=kwh * 1000)
    done = session(app, cs.id)
    assert done.state == SessionState.COMPLETED
    return done


def pdf_text(data: bytes) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


# --- charging sessions: started, completed, receipt ---------------------------------------------------


def test_a_wallet_session_sends_started_completed_and_the_receipt_with_its_pdf(site, mailbox):
    ana = driver(site)
    done = wallet_session(site, ana)

    msgs = mailbox.wait_for(ANA, 3)
    by_subject = {str(m["Subject"]): m for m in msgs}
    assert set(by_subject) == {"Charging started at Car park", "Charging ended at Car park", f"Your invoice {number_of(site, done)}"}

    started = body(by_subject["Charging started at Car park"])
    assert "connector A101" in started and f"http://localhost/s/{done.id}" in started
    ended = body(by_subject["Charging ended at Car park"])
    assert "7.00 kWh for €2.96" in ended and "Charging time: 10 minutes" in ended

    number = number_of(site, done)
    receipt = by_subject[f"Your invoice {number}"]
    assert "7.00 kWh, €2.96" in body(receipt)
    assert f"http://localhost/documents/{number}" in body(receipt).splitlines()  # an account's document: behind its sign-in
    assert "http://localhost/account/notifications" in body(receipt)
    [pdf] = list(receipt.iter_attachments())
    assert pdf.get_filename() == f"{number}.pdf" and pdf.get_content_type() == "application/pdf"
    data = pdf.get_content()
    assert data.startswith(b"%PDF")
    assert number in pdf_text(data)

    rows = sent_emails(site, ANA)
    assert [(r.template, r.status, r.attempts) for r in rows] == [
        ("session_started", "sent", 1), ("receipt", "sent", 1), ("session_completed", "sent", 1)]
    assert {r.idempotency_key for r in rows} == {f"session:{done.id}:started", f"session:{done.id}:completed",
                                                 f"document:{doc_id(site, done)}:receipt"}
    assert all(r.sent_at is not None and r.subject and r.error is None for r in rows)


def number_of(app, cs) -> str:
    from webapp.receipts.service import document_for

    with db(app) as s:
        return document_for(s, f"session:{cs.id}").number


def doc_id(app, cs) -> int:
    from webapp.receipts.service import document_for

    with db(app) as s:
        return document_for(s, f"session:{cs.id}").id


def test_an_account_that_turned_emails_off_gets_only_what_it_kept(site, mailbox):
    ana = driver(site)
    set_preferences(site, ana, receipts=False, session_started=False)
    wallet_session(site, ana)
    [msg] = mailbox.wait_for(ANA)
    assert msg["Subject"] == "Charging ended at Car park"
    assert [r.template for r in sent_emails(site)] == ["session_completed"]  # nothing recorded for what was turned off


def test_emails_are_in_the_drivers_language(site, mailbox):
    ana = driver(site)
    with site.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(type(ana)).where(type(ana).id == ana.id).values(locale="es"))
    set_preferences(site, ana, receipts=False, session_started=False)
    wallet_session(site, ana)
    [msg] = mailbox.wait_for(ANA)
    # Until the Spanish catalogue has these strings, the text falls back to English; the figures are Spanish already.
    assert "7,00 kWh" in body(msg) and "2,96" in body(msg) and "€2.96" not in body(msg)


def test_a_session_below_the_minimum_says_nothing_was_charged_and_has_no_receipt(site, mailbox):
    ana = driver(site)
    set_preferences(site, ana, session_started=False)
    cs = start(site, ana).session
    charge(site, cs, utcnow(), kwh_at=[], stop_s=30, stop_wh=50)
    [msg] = mailbox.wait_for(ANA)
    assert "Nothing was charged" in body(msg) and "was released" in body(msg)


def test_a_refund_emails_the_credit_note(site, mailbox):
    ana = driver(site)
    set_preferences(site, ana, session_started=False, session_completed=False)
    done = wallet_session(site, ana)
    invoice = number_of(site, done)
    with site.app_context(), db(site) as s:
        service.refund_session(s, None, done.id, Money(100, "EUR"), reason="goodwill", key="r1", now=utcnow())
    msgs = mailbox.wait_for(ANA, 2)
    [note] = [m for m in msgs if str(m["Subject"]).startswith("Credit note ")]
    number = str(note["Subject"]).removeprefix("Credit note ")
    assert f"for €1.00 against {invoice}" in body(note)
    [pdf] = list(note.iter_attachments())
    assert pdf.get_filename() == f"{number}.pdf" and pdf.get_content().startswith(b"%PDF")


def test_a_guest_gets_started_and_the_receipt_and_no_completed_email(card_site, stripe_config, mailbox):
    provider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    res = start(card_site, None, email=GUEST, payment_kind=PaymentKind.CARD, payment_method_id=pm,
                card_brand=card.brand, card_last4=card.last4)
    cs = res.session
    charge(card_site, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    assert session(card_site, cs.id).state == SessionState.COMPLETED

    number = number_of(card_site, cs)
    mailbox.wait_for(GUEST, 2)
    # started and the receipt; no separate "completed" email: the receipt carries energy and cost
    assert sorted(subjects(mailbox, GUEST)) == ["Charging started at Car park", f"Your invoice {number}"]
    [receipt] = [m for m in mailbox.to(GUEST) if m["Subject"] == f"Your invoice {number}"]
    [link] = [ln for ln in body(receipt).splitlines() if ln.startswith(f"http://localhost/documents/{number}?k=")]
    # Any device opens the receipt with its link (a guest has no account); a guessed or wrong key does not.
    browser = card_site.test_client()
    assert browser.get(f"/documents/{number}").status_code == 404
    assert browser.get(f"/documents/{number}?k=not-the-key").status_code == 404
    opened = browser.get(link.removeprefix("http://localhost"))
    assert opened.status_code == 302 and opened.headers["Location"] == f"/documents/{number}"  # the key leaves the address bar
    page = browser.get(f"/documents/{number}")
    assert page.status_code == 200 and number in page.get_data(as_text=True)
    assert browser.get(f"/documents/{number}.pdf").status_code == 200
    # Reading is not reissuing: the business-invoice form needs the payer (the session's link), not a copy of the receipt.
    card_site.config["WTF_CSRF_ENABLED"] = False  # CSRF is tested elsewhere: here, who may post
    assert 'name="company_name"' not in page.get_data(as_text=True)
    assert browser.post(f"/documents/{number}/business", data={"company_name": "Someone Else S.L."}).status_code == 404
    payer = card_site.test_client()
    assert payer.get(f"/s/{cs.id}?t={res.guest_token}").status_code == 302
    assert 'name="company_name"' in payer.get(f"/documents/{number}").get_data(as_text=True)
    done = payer.post(f"/documents/{number}/business", data={"company_name": "Guest Ltd", "address": "1 High St", "vat_id": ""})
    assert done.status_code == 302  # the payer may: the same form, the same data, accepted
    assert "account/notifications" not in body(receipt)  # a guest has no preferences to change
    [pdf] = list(receipt.iter_attachments())
    assert pdf.get_content().startswith(b"%PDF")


# --- payment failed ---------------------------------------------------------------------------------


def test_a_declined_top_up_is_emailed_once_with_what_to_do(card_site, client, stripe_config, make_user, mailbox):
    make_user(ANA)
    sign_in(client, ANA)
    declined = save_card(client, stripe_config, DECLINED_AT_CHARGE)
    payment_id = payment_id_of(top_up(client, declined, preset="2000"))
    assert "declined" in text(client.get(f"/wallet/top-ups/{payment_id}"))
    client.post(f"/wallet/top-ups/{payment_id}/confirm")  # asking again changes nothing

    [msg] = mailbox.wait_for(ANA)
    assert msg["Subject"] == "Your wallet top-up did not go through"
    text_ = body(msg)
    assert "Your payment of €20.00" in text_ and "did not go through." in text_
    assert "Your bank declined the card." in text_ and "Your card was not charged" in text_
    assert "try again with another card" in text_ and "http://localhost/wallet" in text_
    [row] = sent_emails(card_site, ANA)
    assert (row.template, row.idempotency_key, row.status) == ("payment_failed", f"card_payment:{payment_id}:failed", "sent")


def test_a_refused_capture_sends_the_session_to_review_and_emails_the_driver_once(card_site, stripe_config, mailbox):
    import stripe

    provider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    cs = start(card_site, None, email=GUEST, payment_kind=PaymentKind.CARD, payment_method_id=pm).session
    with db(card_site) as s:
        from payments.cards import CardPayment

        pi = s.get(CardPayment, cs.card_payment_id).provider_payment_id
    # The bank drops the authorisation while the car charges (it expired): the capture is refused.
    sdk = stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]})
    sdk.v1.payment_intents.cancel(pi)
    charge(card_site, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    done = session(card_site, cs.id)
    assert (done.state, done.failure_code) == (SessionState.REVIEW, "capture_failed")
    assert provider is not None

    mailbox.wait_for(GUEST, 2)
    [msg] = [m for m in mailbox.to(GUEST) if m["Subject"] == "We could not take the payment for your charging session"]
    assert "Your bank refused the payment of €4.24 for your charging session at Car park" in body(msg)
    assert "Our support team will look at the session" in body(msg)
    with card_site.app_context():
        from webapp.charging import jobs

        jobs.settle_now(cs.id)  # the watchdog tries again: nothing new
    assert subjects(mailbox, GUEST).count("We could not take the payment for your charging session") == 1


# --- low wallet balance -------------------------------------------------------------------------------


def gift(app, user, cents: int, key: str) -> None:
    """Money into the wallet (as a top-up books it)."""
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        transfer(s, idempotency_key=key, description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(cents, "EUR"))


def low_balance_mails(mailbox) -> list:
    return [m for m in mailbox.to(ANA) if str(m["Subject"]).startswith("Your Voltpay wallet is running low")]


def test_low_balance_is_sent_once_rearmed_by_a_top_up_and_throttled_to_one_a_day(site, mailbox):
    ana = driver(site, euros=50)
    # Only the low-balance email, warned below 40.00; each session costs 8.47 (20 kWh × 0.4235).
    set_preferences(site, ana, receipts=False, session_started=False, session_completed=False, low_balance_threshold_minor=4000)

    wallet_session(site, ana, kwh=20)  # 41.53: above; the hold during the session did not count
    assert low_balance_mails(mailbox) == []
    wallet_session(site, ana, kwh=20)  # 33.06: below
    [first] = low_balance_mails(mailbox)
    assert first["Subject"] == "Your Voltpay wallet is running low: €33.06"
    assert "below the €40.00 you asked us to warn you about" in body(first)
    assert "http://localhost/wallet" in body(first) and "http://localhost/account/notifications" in body(first)
    wallet_session(site, ana, kwh=20)  # 24.59: still low, already told
    assert len(low_balance_mails(mailbox)) == 1

    gift(site, ana, 2000, "top-up-1")  # 44.59: above again, re-armed
    wallet_session(site, ana, kwh=20)  # 36.12: below, but within 24 hours of the last one
    assert len(low_balance_mails(mailbox)) == 1

    with site.extensions["db_sessionmaker"].begin() as s:  # a day passes
        s.execute(update(SentEmail).where(SentEmail.template == "low_balance").values(created_at=utcnow() - dt.timedelta(hours=25)))
    wallet_session(site, ana, kwh=1)  # 35.70: still below and still armed (nothing was sent since the top-up)
    mails = low_balance_mails(mailbox)
    assert len(mails) == 2 and mails[1]["Subject"] == "Your Voltpay wallet is running low: €35.70"
    assert [r.status for r in sent_emails(site, ANA)] == ["sent", "sent"]


def test_low_balance_email_respects_the_choice_to_get_none(site, mailbox):
    ana = driver(site, euros=50)
    set_preferences(site, ana, receipts=False, session_started=False, session_completed=False, low_balance=False,
                    low_balance_threshold_minor=4900)
    wallet_session(site, ana, kwh=7)  # 47.04 left
    assert sent_emails(site) == [] and mailbox.to(ANA) == []


def test_a_concurrent_second_check_sends_nothing_more(site, mailbox):
    from webapp.notifications.emails import check_low_balance

    ana = driver(site, euros=3)
    with site.app_context():
        with db(site) as s:
            assert check_low_balance(s, ana.id, "EUR", utcnow()) is True
            s.commit()
        with db(site) as s:
            assert check_low_balance(s, ana.id, "EUR", utcnow()) is False
            s.commit()
    assert len(mailbox.wait_for(ANA)) == 1


# --- the outbox -------------------------------------------------------------------------------------


def test_nothing_is_sent_for_a_transaction_that_rolls_back_and_one_key_sends_once(site, mailbox):
    ana = driver(site, euros=3)
    with site.app_context():
        with db(site) as s:
            assert outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k1") is not None
            s.rollback()
        assert sent_emails(site) == [] and mailbox.messages == []
        with db(site) as s:
            with s.begin_nested():  # a savepoint released: still nothing sent before the commit
                first = outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k1")
            assert outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k1") is None
            assert mailbox.messages == []
            s.commit()
        with db(site) as s:  # the same cause again, later
            assert outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k1") is None
            s.commit()
    [msg] = mailbox.wait_for(ANA)
    assert [(r.id, r.status) for r in sent_emails(site)] == [(first, "sent")]


@pytest.fixture
def smtp_down(app, monkeypatch):
    """The SMTP server unreachable; retries kept in Huey's schedule (immediate mode), cleared afterwards."""
    good = app.config["SMTP_PORT"]
    app.config["SMTP_PORT"] = free_port()
    yield good
    huey.flush()


def run_scheduled_retries() -> int:
    """Run every retry Huey has scheduled, whatever its time (what the consumer does when the delay is over)."""
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=1)  # Huey keeps naive UTC times
    tasks = huey.read_schedule(later)
    for t in tasks:
        huey.execute(t, timestamp=later)
    return len(tasks)


def test_smtp_down_the_email_is_retried_and_sent_once_it_is_back(site, mailbox, smtp_down):
    ana = driver(site, euros=3)
    with site.app_context(), db(site) as s:
        outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k-retry")
        s.commit()  # the page returns; the first attempt failed in the worker
    [row] = sent_emails(site)
    assert (row.status, row.attempts) == ("queued", 1) and "ConnectionRefusedError" in row.error
    assert mailbox.messages == []

    assert run_scheduled_retries() == 1  # still down: retried again later
    assert sent_emails(site)[0].attempts == 2
    site.config["SMTP_PORT"] = smtp_down  # back
    assert run_scheduled_retries() == 1
    [msg] = mailbox.wait_for(ANA)
    [row] = sent_emails(site)
    assert (row.status, row.attempts, row.error) == ("sent", 3, None) and row.subject == str(msg["Subject"])


def test_smtp_down_for_good_the_email_is_marked_failed_after_the_last_attempt(site, mailbox, smtp_down):
    ana = driver(site, euros=3)
    with site.app_context(), db(site) as s:
        outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k-fail")
        s.commit()
    while run_scheduled_retries():
        pass
    [row] = sent_emails(site)
    assert (row.status, row.attempts) == ("failed", 1 + outbox.RETRIES) and "ConnectionRefusedError" in row.error
    assert mailbox.messages == []


def test_an_email_whose_job_was_lost_is_queued_again_by_the_sweep(site, mailbox, monkeypatch):
    ana = driver(site, euros=3)
    lost = []
    monkeypatch.setattr(outbox, "_enqueue", lambda email_id, key: lost.append(email_id))  # the queue was down at the commit
    with site.app_context(), db(site) as s:
        outbox.schedule(s, to=ANA, template="low_balance", reference=f"wallet:{ana.owner}:EUR", key="k-lost")
        s.commit()
    monkeypatch.undo()
    assert len(lost) == 1 and mailbox.messages == []
    with site.app_context():
        assert outbox.resend_stuck() == 0  # too young: its job may still be on the way
        assert outbox.resend_stuck(now=utcnow() + dt.timedelta(minutes=11)) == 1
    mailbox.wait_for(ANA)
    assert sent_emails(site)[0].status == "sent"


# --- the preferences page -----------------------------------------------------------------------------


def test_preferences_page_saves_choices_and_a_threshold_typed_the_spanish_way(app, client, make_user):
    user = make_user(ANA, locale="es")
    sign_in(client, ANA)
    page = client.get("/account/notifications")
    assert page.status_code == 200 and 'value="5,00"' in page.get_data(as_text=True)
    assert 'name="receipts" type="checkbox" value="y" checked' in page.get_data(as_text=True) or "checked" in page.get_data(as_text=True)

    resp = client.post("/account/notifications", data={"receipts": "y", "low_balance": "y", "low_balance_threshold": "12,50"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/account/notifications")
    with db(app) as s:
        row = s.get(NotificationPreferences, user.id)
    assert (row.receipts, row.session_started, row.session_completed, row.payment_failed, row.low_balance) == (True, False, False, False, True)
    assert row.low_balance_threshold_minor == 1250
    assert 'value="12,50"' in client.get("/account/notifications").get_data(as_text=True)


@pytest.mark.parametrize("typed, message", [
    ("abc", "Enter the amount as a number"),
    ("5.555", "Use at most 2 decimals."),
    ("-3", "The amount cannot be negative."),
    ("", "Enter an amount"),
])
def test_a_bad_threshold_is_refused_next_to_its_field(app, client, make_user, typed, message):
    user = make_user(ANA)
    sign_in(client, ANA)
    resp = client.post("/account/notifications", data={"low_balance": "y", "low_balance_threshold": typed})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert 'id="low_balance_threshold-error"' in html and message in html
    with db(app) as s:
        assert s.get(NotificationPreferences, user.id) is None  # nothing saved


def test_preferences_need_sign_in_and_the_csrf_token(app, csrf_client, make_user):
    assert csrf_client.get("/account/notifications").status_code == 302  # to sign-in
    make_user(ANA)
    page = csrf_client.get("/auth/sign-in")
    import re

    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    assert csrf_client.post("/auth/sign-in", data={"email": ANA, "password": "correct horse staple", "csrf_token": token}).status_code == 302
    resp = csrf_client.post("/account/notifications", data={"low_balance_threshold": "5.00"})
    assert resp.status_code == 400
    with db(app) as s:
        assert s.scalar(select(NotificationPreferences)) is None


def test_account_page_links_to_the_preferences(app, client, make_user):
    make_user(ANA)
    sign_in(client, ANA)
    assert 'href="/account/notifications"' in client.get("/account/").get_data(as_text=True)
