"""What a signed-in person does on the wallet pages, through the test client, with localstripe behind the app.

The browser's part (stripe.js confirming a card setup, the bank's 3-D Secure
page) comes from tests/stripe_browser.py; everything else goes through our
pages, as a person's phone would send it.
"""

from __future__ import annotations

import pytest

import contextlib
import datetime as dt
import html
import re
import threading
import time
import uuid

import stripe
from sqlalchemy import select, update
from werkzeug.serving import make_server

from payments import wallet
from payments.base import utcnow
from payments.cards import CardPayment
from payments.ledger import JournalEntry
from payments.money import Money
from payments.webhooks import ProviderEvent
from tests.stripe_browser import THREE_D_SECURE, confirm_card_setup, pass_3ds, signed_event

PASSWORD = "correct horse staple"
JSON = {"Accept": "application/json"}


def sign_in(client, email: str, password: str = PASSWORD) -> None:
    """Sign in with email and password (CSRF off in the ``client`` fixture)."""
    response = client.post("/auth/sign-in", data={"email": email, "password": password})
    assert response.status_code == 302, response.get_data(as_text=True)[-2000:]


def save_card(client, config: dict, number: str) -> str:
    """The card element's flow: setup on our server, confirm with Stripe in the browser, finish on our server."""
    setup = client.post("/wallet/cards/setup", json={}, headers=JSON)
    assert setup.status_code == 200, setup.get_data(as_text=True)
    setup_id = setup.get_json()["setup_id"]
    confirm_card_setup(config, setup_id, number)
    finish = client.post("/wallet/cards/finish", json={"setup_id": setup_id}, headers=JSON)
    assert finish.status_code == 200, finish.get_data(as_text=True)
    return finish.get_json()["payment_method_id"]


def top_up(client, payment_method_id: str = "", *, preset: str = "2000", amount: str = "", currency: str = "EUR", new_card: bool = False):
    """Submit the top-up form: a preset (minor units) or ``preset="other"`` with a typed amount, paid with a card."""
    data = {"preset": preset, "amount": amount, "currency": currency}
    if new_card:
        data.update(payment_method="new", new_payment_method_id=payment_method_id)
    else:
        data["payment_method"] = payment_method_id
    return client.post("/wallet/top-ups", data=data)


def payment_id_of(response) -> int:
    """The top-up id in the redirect to its result page."""
    assert response.status_code == 302, response.get_data(as_text=True)[-3000:]
    match = re.fullmatch(r"/wallet/top-ups/(\d+)", response.headers["Location"])
    assert match, response.headers["Location"]
    return int(match.group(1))


def text(response) -> str:
    """The page as a person reads it: tags removed, entities decoded, whitespace collapsed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", response.get_data(as_text=True), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def card_payments(app) -> list[CardPayment]:
    """Every card payment, oldest first."""
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(CardPayment).order_by(CardPayment.id)))


def top_up_entries(app) -> list[str]:
    """The references of the journal entries that credited a top-up (one per credited payment)."""
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(JournalEntry.reference).where(JournalEntry.description == "Wallet top-up").order_by(JournalEntry.id)))


def wallet_balance(app, owner: str, currency: str = "EUR") -> Money:
    """What the wallet holds, read from the ledger."""
    with app.extensions["db_sessionmaker"]() as s:
        return wallet.wallet_balance(s, owner, currency)


def data_attribute(response, name: str) -> str | None:
    """The value of the first ``data-<name>`` attribute in the page."""
    match = re.search(rf'data-{name}="([^"]*)"', response.get_data(as_text=True))
    return html.unescape(match.group(1)) if match else None


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every 50 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.05)


@contextlib.contextmanager
def serving(app):
    """Serve ``app`` on a free local port in a thread (for localstripe's webhook deliveries); yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def intent(config: dict, payment_id: str) -> dict:
    """The PaymentIntent as localstripe has it now (what an event's data.object carries)."""
    sdk = stripe.StripeClient(config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=0)
    return sdk.v1.payment_intents.retrieve(payment_id).to_dict()


def event(event_type: str, obj: dict, event_id: str | None = None) -> dict:
    """A Stripe event around ``obj``."""
    return {"id": event_id or f"evt_{uuid.uuid4().hex[:14]}", "object": "event", "type": event_type, "created": int(time.time()), "data": {"object": obj}}


def deliver(client, config: dict, payload: dict):
    """POST ``payload`` to our webhook endpoint, signed with the endpoint's secret as Stripe does."""
    body, signature = signed_event(config, payload)
    return client.post("/webhooks/stripe", data=body, headers={"Stripe-Signature": signature, "Content-Type": "application/json"})


def backdate(app, payment_id: int, age: dt.timedelta) -> None:
    """Make a card payment look ``age`` old (created and last changed then), as if time had passed."""
    when = utcnow() - age
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(CardPayment).where(CardPayment.id == payment_id).values(created_at=when, updated_at=when))


def provider_events(app) -> list[tuple[str, str, str | None]]:
    """Stored webhook events: (event id, type, outcome)."""
    with app.extensions["db_sessionmaker"]() as s:
        return [(e.event_id, e.type, e.outcome) for e in s.scalars(select(ProviderEvent).order_by(ProviderEvent.id))]


def top_up_left_at_3ds(app, client, config: dict, *, preset: str = "2000", passed: bool | None = True) -> tuple[int, str, dict]:
    """A top-up whose card asked for 3-D Secure, passed (or failed, or not done) with the bank, and whose
    browser then closed: our confirm endpoint is never called. Returns our id, the provider's id and the
    PaymentIntent as it was while waiting for 3-D Secure."""
    payment_id = payment_id_of(top_up(client, save_card(client, config, THREE_D_SECURE), preset=preset))
    [row] = [p for p in card_payments(app) if p.id == payment_id]
    waiting = intent(config, row.provider_payment_id)
    assert waiting["status"] == "requires_action"
    if passed is not None:
        pass_3ds(config, row.provider_payment_id, waiting["client_secret"], success=passed)
    return payment_id, row.provider_payment_id, waiting


# Fixtures shared by the wallet test modules (import them by name into a module to use them).


@pytest.fixture
def app_config(app_config, stripe_config):
    """The app talks to localstripe (emptied for each test)."""
    return {**app_config, **stripe_config}


@pytest.fixture
def ana(client, make_user):
    """Ana, signed in on ``client``; her wallet is in euros."""
    user = make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    return user
