"""The Stripe provider through the official SDK against localstripe (fixtures in tests/conftest.py).

What the browser does with stripe.js (turn a typed card number into a ``pm_...``,
pass 3-D Secure) is simulated by calling localstripe directly (tests/stripe_browser.py):
raw test card numbers exist only in the tests, never in our provider.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import stripe

from payments.money import Money
from payments.providers import make_provider
from payments.providers.base import (
    AuthenticationRequired,
    CardDeclined,
    InvalidRequest,
    PaymentStatus,
    ProviderError,
    ProviderUnavailable,
    SignatureError,
)
from tests.stripe_browser import DECLINED_AT_CHARGE, MASTERCARD, THREE_D_SECURE, VISA, browser_card, pass_3ds
from tests.stripe_browser import post_form as _post


@pytest.fixture
def sdk(stripe_config):
    """The official SDK, for what the browser does with a client secret (confirm a SetupIntent)."""
    return stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]}, max_network_retries=0)


@pytest.fixture
def customer(stripe_provider) -> str:
    return stripe_provider.ensure_customer(email="ana@example.com", existing_id=None, idempotency_key="user:1:customer")


@pytest.fixture
def save_card(stripe_provider, stripe_config, sdk, customer):
    """Save a card for ``customer`` the way the card page does: start, confirm in the browser, finish."""

    def save(number: str = VISA, customer_id: str = customer):
        setup = stripe_provider.start_card_setup(customer_id=customer_id, idempotency_key=f"setup:{customer_id}:{number}")
        confirmed = sdk.v1.setup_intents.confirm(setup.id, params={"payment_method": browser_card(stripe_config, number)})
        if confirmed.status == "requires_action":  # the customer passes 3-D Secure (localstripe: confirm again)
            sdk.v1.setup_intents.confirm(setup.id)
        return stripe_provider.finish_card_setup(setup_id=setup.id, customer_id=customer_id)

    return save


def eur(cents: int) -> Money:
    return Money(cents, "EUR")


# -- customers and cards ----------------------------------------------------------------------------


def test_ensure_customer_creates_one_then_keeps_it(stripe_provider):
    customer_id = stripe_provider.ensure_customer(email="ana@example.com", existing_id=None, idempotency_key="user:1:customer")
    assert customer_id.startswith("cus_")
    assert stripe_provider.ensure_customer(email="ana@example.com", existing_id=customer_id, idempotency_key="user:1:customer") == customer_id


def test_card_setup_saves_the_card_as_default(stripe_provider, save_card, customer):
    setup = stripe_provider.start_card_setup(customer_id=customer, idempotency_key="setup:1")
    assert setup.id.startswith("seti_") and setup.client_secret.startswith(setup.id + "_secret_")

    card = save_card(VISA)

    assert (card.brand, card.last4, card.exp_month, card.exp_year, card.is_default) == ("visa", "4242", 12, 2034, True)
    assert stripe_provider.list_cards(customer_id=customer) == [card]
    assert stripe_provider.card_of(payment_method_id=card.id).last4 == "4242"


def test_unfinished_or_foreign_card_setup_is_refused(stripe_provider, customer):
    setup = stripe_provider.start_card_setup(customer_id=customer, idempotency_key="setup:1")
    with pytest.raises(InvalidRequest, match="not complete"):
        stripe_provider.finish_card_setup(setup_id=setup.id, customer_id=customer)
    other = stripe_provider.ensure_customer(email="bo@example.com", existing_id=None, idempotency_key="user:2:customer")
    with pytest.raises(InvalidRequest, match="another customer"):
        stripe_provider.finish_card_setup(setup_id=setup.id, customer_id=other)


def test_list_set_default_and_remove_cards(stripe_provider, save_card, customer):
    visa = save_card(VISA)
    mastercard = save_card(MASTERCARD)
    assert not mastercard.is_default  # the first card stays the default

    stripe_provider.set_default_card(customer_id=customer, payment_method_id=mastercard.id)
    cards = stripe_provider.list_cards(customer_id=customer)
    assert [(c.id, c.last4, c.is_default) for c in cards] == [(mastercard.id, "4444", True), (visa.id, "4242", False)]

    stripe_provider.remove_card(customer_id=customer, payment_method_id=mastercard.id)
    assert [(c.id, c.is_default) for c in stripe_provider.list_cards(customer_id=customer)] == [(visa.id, False)]


def test_another_customers_card_cannot_be_removed_or_made_default(stripe_provider, save_card, customer):
    anas_card = save_card(VISA)
    bo = stripe_provider.ensure_customer(email="bo@example.com", existing_id=None, idempotency_key="user:2:customer")
    with pytest.raises(InvalidRequest):
        stripe_provider.remove_card(customer_id=bo, payment_method_id=anas_card.id)
    with pytest.raises(InvalidRequest):
        stripe_provider.set_default_card(customer_id=bo, payment_method_id=anas_card.id)
    assert stripe_provider.list_cards(customer_id=customer) == [anas_card]


# -- holds, captures, charges -----------------------------------------------------------------------


def test_hold_then_partial_capture(stripe_provider, stripe_config, save_card, customer):
    card = save_card(VISA)
    hold = stripe_provider.authorize(
        amount=eur(3000), payment_method_id=card.id, customer_id=customer, idempotency_key="session:7:authorize",
        metadata={"charging_session": "7"}, description="Voltpay charging session 7",
    )
    assert hold.status == PaymentStatus.REQUIRES_CAPTURE and hold.is_held
    assert (hold.amount, hold.amount_captured, hold.amount_refunded) == (eur(3000), eur(0), eur(0))
    assert (hold.card_brand, hold.card_last4, hold.payment_method_id) == ("visa", "4242", card.id)
    assert hold.charge_id.startswith("ch_") and hold.metadata == {"charging_session": "7"}

    captured = stripe_provider.capture(payment_id=hold.id, amount=eur(1234), idempotency_key="session:7:capture")
    assert captured.status == PaymentStatus.SUCCEEDED
    assert (captured.amount_captured, captured.amount_refunded) == (eur(1234), eur(0))
    assert stripe_provider.retrieve(payment_id=hold.id) == captured
    # A retry after a lost answer gets the same capture, not a second one or an error.
    assert stripe_provider.capture(payment_id=hold.id, amount=eur(1234), idempotency_key="session:7:capture") == captured


def test_capture_more_than_the_hold_or_in_another_currency_is_refused(stripe_provider, stripe_config):
    hold = stripe_provider.authorize(amount=eur(1000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="h")
    with pytest.raises(InvalidRequest):
        stripe_provider.capture(payment_id=hold.id, amount=eur(1001), idempotency_key="c")
    with pytest.raises(InvalidRequest, match="EUR"):
        stripe_provider.capture(payment_id=hold.id, amount=Money(500, "USD"), idempotency_key="c")
    assert stripe_provider.retrieve(payment_id=hold.id).status == PaymentStatus.REQUIRES_CAPTURE


def test_release_cancels_the_hold(stripe_provider, stripe_config):
    hold = stripe_provider.authorize(amount=eur(2500), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="h")
    released = stripe_provider.release(payment_id=hold.id, idempotency_key="session:8:release")
    assert released.status == PaymentStatus.CANCELED and released.amount_captured == eur(0)
    assert stripe_provider.release(payment_id=hold.id, idempotency_key="session:8:release").status == PaymentStatus.CANCELED
    with pytest.raises(InvalidRequest):
        stripe_provider.capture(payment_id=hold.id, amount=eur(100), idempotency_key="c")


def test_charge_now_for_a_guest_and_off_session_for_a_saved_card(stripe_provider, stripe_config, save_card, customer):
    guest = stripe_provider.charge(amount=eur(1500), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="topup:1:charge")
    assert guest.status == PaymentStatus.SUCCEEDED and guest.amount_captured == eur(1500)

    card = save_card(MASTERCARD)
    later = stripe_provider.charge(amount=Money(900, "usd"), payment_method_id=card.id, customer_id=customer, idempotency_key="bill:3:charge", off_session=True)
    assert later.status == PaymentStatus.SUCCEEDED
    assert (later.amount, later.amount_captured, later.card_last4) == (Money(900, "USD"), Money(900, "USD"), "4444")


def test_declined_card(stripe_provider, stripe_config):
    with pytest.raises(CardDeclined) as declined:
        stripe_provider.authorize(amount=eur(2000), payment_method_id=browser_card(stripe_config, DECLINED_AT_CHARGE), customer_id=None, idempotency_key="h")
    assert declined.value.code == "card_declined" and declined.value.reason == "card_declined"
    assert "declined" in declined.value.message


def test_unknown_payment_is_an_invalid_request(stripe_provider):
    with pytest.raises(InvalidRequest):
        stripe_provider.retrieve(payment_id="pi_doesnotexist")


# -- 3-D Secure -------------------------------------------------------------------------------------


def test_3ds_hold_completed_in_the_browser(stripe_provider, stripe_config):
    pending = stripe_provider.authorize(amount=eur(4000), payment_method_id=browser_card(stripe_config, THREE_D_SECURE), customer_id=None, idempotency_key="h")
    assert pending.status == PaymentStatus.REQUIRES_ACTION and pending.client_secret

    pass_3ds(stripe_config, pending.id, pending.client_secret)

    assert stripe_provider.retrieve(payment_id=pending.id).status == PaymentStatus.REQUIRES_CAPTURE


def test_3ds_charge_completed_in_the_browser(stripe_provider, stripe_config):
    pending = stripe_provider.charge(amount=eur(700), payment_method_id=browser_card(stripe_config, THREE_D_SECURE), customer_id=None, idempotency_key="c")
    assert pending.status == PaymentStatus.REQUIRES_ACTION
    pass_3ds(stripe_config, pending.id, pending.client_secret)
    done = stripe_provider.retrieve(payment_id=pending.id)
    assert done.status == PaymentStatus.SUCCEEDED and done.amount_captured == eur(700)


def test_3ds_failed_in_the_browser(stripe_provider, stripe_config):
    pending = stripe_provider.authorize(amount=eur(4000), payment_method_id=browser_card(stripe_config, THREE_D_SECURE), customer_id=None, idempotency_key="h")
    pass_3ds(stripe_config, pending.id, pending.client_secret, success=False)
    failed = stripe_provider.retrieve(payment_id=pending.id)
    assert failed.status == PaymentStatus.REQUIRES_PAYMENT_METHOD
    assert failed.failure_code == "payment_intent_authentication_failure" and failed.failure_message


def test_3ds_off_session_needs_the_customer(stripe_provider, save_card, customer):
    card = save_card(THREE_D_SECURE)
    with pytest.raises(AuthenticationRequired) as needed:
        stripe_provider.charge(amount=eur(500), payment_method_id=card.id, customer_id=customer, idempotency_key="bill:4:charge", off_session=True)
    assert needed.value.payment.status == PaymentStatus.REQUIRES_ACTION and needed.value.payment.client_secret


# -- refunds ----------------------------------------------------------------------------------------


def test_partial_then_full_refund(stripe_provider, stripe_config):
    paid = stripe_provider.charge(amount=eur(2000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="c")

    first = stripe_provider.refund(payment_id=paid.id, amount=eur(500), idempotency_key="refund:1", reason="requested_by_customer")
    assert (first.payment_id, first.amount, first.status) == (paid.id, eur(500), "succeeded")
    assert stripe_provider.retrieve(payment_id=paid.id).amount_refunded == eur(500)

    rest = stripe_provider.refund(payment_id=paid.id, amount=eur(1500), idempotency_key="refund:2", reason="charger fault")
    assert rest.amount == eur(1500) and rest.id != first.id
    assert stripe_provider.retrieve(payment_id=paid.id).amount_refunded == eur(2000)

    with pytest.raises(InvalidRequest, match="left to refund"):
        stripe_provider.refund(payment_id=paid.id, amount=eur(1), idempotency_key="refund:3")


def test_refund_after_a_partial_capture_is_bounded_by_the_capture(stripe_provider, stripe_config):
    hold = stripe_provider.authorize(amount=eur(3000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="h")
    stripe_provider.capture(payment_id=hold.id, amount=eur(1200), idempotency_key="c")
    with pytest.raises(InvalidRequest):
        stripe_provider.refund(payment_id=hold.id, amount=eur(1201), idempotency_key="r")
    stripe_provider.refund(payment_id=hold.id, amount=eur(1200), idempotency_key="r")
    after = stripe_provider.retrieve(payment_id=hold.id)
    assert (after.status, after.amount_captured, after.amount_refunded) == (PaymentStatus.SUCCEEDED, eur(1200), eur(1200))


def test_refund_of_a_hold_or_in_another_currency_is_refused(stripe_provider, stripe_config):
    hold = stripe_provider.authorize(amount=eur(1000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="h")
    with pytest.raises(InvalidRequest):
        stripe_provider.refund(payment_id=hold.id, amount=eur(100), idempotency_key="r")
    paid = stripe_provider.charge(amount=eur(1000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="c")
    with pytest.raises(InvalidRequest, match="EUR"):
        stripe_provider.refund(payment_id=paid.id, amount=Money(100, "GBP"), idempotency_key="r")


# -- webhooks ---------------------------------------------------------------------------------------


class _Deliveries:
    """Webhook deliveries received by the test receiver: (raw body, Stripe-Signature header)."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, str | None]] = []
        self.cond = threading.Condition()

    def add(self, body: bytes, signature: str | None) -> None:
        with self.cond:
            self.items.append((body, signature))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> tuple[bytes, str | None]:
        """The first delivery whose parsed JSON satisfies ``predicate``, waiting at most ``timeout`` seconds."""

        def found():
            return next((item for item in self.items if predicate(json.loads(item[0]))), None)

        with self.cond:
            item = self.cond.wait_for(found, timeout=timeout)
        assert item, f"no matching webhook within {timeout} s; got {[json.loads(b)['type'] for b, _ in self.items]}"
        return item


@pytest.fixture
def webhook_deliveries(stripe_config):
    """A local HTTP receiver registered as a localstripe webhook endpoint for this test."""
    deliveries = _Deliveries()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's hook name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            deliveries.add(body, self.headers.get("Stripe-Signature"))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    receiver = f"http://127.0.0.1:{server.server_address[1]}/webhooks/stripe"
    endpoint = stripe_config["STRIPE_API_BASE"] + "/_config/webhooks/voltpay-tests"
    _post(endpoint, {"url": receiver, "secret": stripe_config["STRIPE_WEBHOOK_SECRET"]})
    yield deliveries
    # Registrations cannot be deleted: point this one at an event type that never happens.
    _post(endpoint, {"url": receiver, "secret": stripe_config["STRIPE_WEBHOOK_SECRET"], "events[]": "voltpay.never"})
    server.shutdown()
    server.server_close()


def test_signed_webhook_from_localstripe_is_accepted(stripe_provider, stripe_config, webhook_deliveries):
    paid = stripe_provider.charge(
        amount=eur(1800), payment_method_id=browser_card(stripe_config, VISA), customer_id=None,
        idempotency_key="topup:9:charge", metadata={"topup": "9"},
    )
    body, signature = webhook_deliveries.wait_for(lambda e: e["type"] == "payment_intent.succeeded" and e["data"]["object"]["id"] == paid.id)

    event = stripe_provider.parse_webhook(payload=body, signature=signature)

    assert event.id.startswith("evt_") and event.type == "payment_intent.succeeded" and event.created > 0
    assert (event.payment.id, event.payment.status, event.payment.amount, event.payment.amount_captured) == (paid.id, PaymentStatus.SUCCEEDED, eur(1800), eur(1800))
    assert event.payment.metadata == {"topup": "9"}

    altered = body.replace(b'"amount": 1800', b'"amount": 18')
    assert altered != body
    with pytest.raises(SignatureError):
        stripe_provider.parse_webhook(payload=altered, signature=signature)
    with pytest.raises(SignatureError):
        stripe_provider.parse_webhook(payload=body, signature=None)
    other_secret = make_provider({**stripe_config, "STRIPE_WEBHOOK_SECRET": "whsec_someone_else"})
    with pytest.raises(SignatureError):
        other_secret.parse_webhook(payload=body, signature=signature)


def _signed(event: dict, secret: str) -> tuple[bytes, str]:
    payload = json.dumps(event)
    return payload.encode(), stripe.WebhookSignature.generate_signature_header(payload, secret)


def test_events_localstripe_does_not_send_are_mapped(stripe_provider, stripe_config, sdk):
    """charge.refunded and payment_intent.canceled, signed here from real localstripe objects."""
    paid = stripe_provider.charge(amount=eur(1000), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="c")
    stripe_provider.refund(payment_id=paid.id, amount=eur(400), idempotency_key="r")
    charge = sdk.v1.charges.retrieve(paid.charge_id).to_dict()
    body, signature = _signed({"id": "evt_refund", "object": "event", "type": "charge.refunded", "created": 1, "data": {"object": charge}}, stripe_config["STRIPE_WEBHOOK_SECRET"])

    event = stripe_provider.parse_webhook(payload=body, signature=signature)

    assert (event.payment.id, event.payment.status, event.payment.amount_refunded, event.payment.charge_id) == (paid.id, PaymentStatus.SUCCEEDED, eur(400), paid.charge_id)
    assert (event.refund.payment_id, event.refund.amount) == (paid.id, eur(400))

    hold = stripe_provider.authorize(amount=eur(600), payment_method_id=browser_card(stripe_config, VISA), customer_id=None, idempotency_key="h")
    stripe_provider.release(payment_id=hold.id, idempotency_key="rel")
    intent = sdk.v1.payment_intents.retrieve(hold.id).to_dict()
    body, signature = _signed({"id": "evt_cancel", "object": "event", "type": "payment_intent.canceled", "created": 2, "data": {"object": intent}}, stripe_config["STRIPE_WEBHOOK_SECRET"])
    event = stripe_provider.parse_webhook(payload=body, signature=signature)
    assert (event.payment.id, event.payment.status) == (hold.id, PaymentStatus.CANCELED)

    body, signature = _signed({"id": "evt_other", "object": "event", "type": "customer.created", "created": 3, "data": {"object": {"id": "cus_1", "object": "customer"}}}, stripe_config["STRIPE_WEBHOOK_SECRET"])
    assert stripe_provider.parse_webhook(payload=body, signature=signature).payment is None


# -- configuration and outages ----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_provider_is_unavailable_and_the_key_stays_secret(stripe_config):
    config = {**stripe_config, "STRIPE_SECRET_KEY": "sk_test_do_not_leak_me", "STRIPE_API_BASE": f"http://127.0.0.1:{_closed_port()}"}
    provider = make_provider(config)
    with pytest.raises(ProviderUnavailable) as down:
        provider.ensure_customer(email="ana@example.com", existing_id=None, idempotency_key="k")
    with pytest.raises(ProviderUnavailable):
        provider.authorize(amount=eur(100), payment_method_id="pm_x", customer_id=None, idempotency_key="k")
    assert down.value.code == "provider_unavailable"
    assert "do_not_leak_me" not in str(down.value) + repr(down.value) + repr(provider)
    assert down.value.__cause__ is None


def test_factory_reads_our_settings(stripe_config):
    provider = make_provider({**stripe_config, "STRIPE_LOCALSTRIPE": "true"})
    assert provider.publishable_key == "pk_test_voltpay" and provider.localstripe_compat
    assert not make_provider({"STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_LOCALSTRIPE": "0"}).localstripe_compat
    with pytest.raises(ValueError, match="STRIPE_SECRET_KEY"):
        make_provider({})
    with pytest.raises(ValueError):
        make_provider({"STRIPE_SECRET_KEY": "pk_test_wrong_key"})
    with pytest.raises(ValueError):
        make_provider({"STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_LOCALSTRIPE": "maybe"})
    with pytest.raises(ValueError, match="live"):
        make_provider({"STRIPE_SECRET_KEY": "sk_live_x", "STRIPE_API_BASE": "http://127.0.0.1:8420"})


# -- answers only real Stripe gives, replayed by a stub ---------------------------------------------
# localstripe cannot produce decline codes, 402 authentication_required, 5xx/429 or
# API-version-2025+ amounts, and compat mode changes the params we send. These tests
# run the provider in real-Stripe mode against a stub that answers with Stripe's
# documented JSON shapes and records what the SDK sent.


class _StripeStub:
    """An HTTP server answering queued (status, JSON body) pairs and recording the requests."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict]] = []
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                path, _, query = self.path.partition("?")
                stub.requests.append({
                    "method": self.command, "path": path, "headers": dict(self.headers),
                    "form": urllib.parse.parse_qs(body or query, keep_blank_values=True),
                })
                status, payload = stub.answers.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Request-Id", f"req_stub{len(stub.requests)}")
                self.send_header("Stripe-Should-Retry", "false")  # keep the SDK's retries out of these tests
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def stripe_stub():
    stub = _StripeStub()
    thread = threading.Thread(target=stub.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


@pytest.fixture
def real_mode_provider(stripe_stub):
    return make_provider({"STRIPE_SECRET_KEY": "sk_test_stub_secret", "STRIPE_PUBLISHABLE_KEY": "pk_test_stub", "STRIPE_API_BASE": stripe_stub.url})


def _intent(status: str, amount: int = 2000, received: int = 0, refunded: int = 0, **extra) -> dict:
    """A PaymentIntent as Stripe (API 2025+) returns it with latest_charge and payment_method expanded."""
    charge = {
        "id": "ch_1", "object": "charge", "amount": amount, "amount_captured": received, "amount_refunded": refunded,
        "captured": received > 0, "status": "succeeded",
        "payment_method_details": {"type": "card", "card": {"brand": "mastercard", "last4": "4444"}},
    }
    return {
        "id": "pi_1", "object": "payment_intent", "amount": amount, "amount_received": received, "currency": "eur",
        "status": status, "client_secret": "pi_1_secret_abc", "capture_method": "manual", "metadata": {},
        "latest_charge": charge if status in ("requires_capture", "succeeded") else None,
        "payment_method": {"id": "pm_1", "object": "payment_method", "type": "card", "customer": None,
                           "card": {"brand": "mastercard", "last4": "4444", "exp_month": 3, "exp_year": 2031}},
        "last_payment_error": None, **extra,
    }


def test_real_mode_sends_stripes_params_and_idempotency_keys(stripe_stub, real_mode_provider):
    stripe_stub.answers += [(200, _intent("requires_capture")), (200, _intent("requires_capture")), (200, _intent("succeeded", received=1500))]

    hold = real_mode_provider.authorize(
        amount=eur(2000), payment_method_id="pm_1", customer_id="cus_1", idempotency_key="session:7:authorize",
        off_session=True, metadata={"charging_session": "7"}, description="Voltpay charging session 7",
    )
    captured = real_mode_provider.capture(payment_id=hold.id, amount=eur(1500), idempotency_key="session:7:capture")

    create, _retrieve, capture = stripe_stub.requests
    assert (create["method"], create["path"], create["headers"]["Idempotency-Key"]) == ("POST", "/v1/payment_intents", "session:7:authorize")
    assert {k: v[0] for k, v in create["form"].items() if not k.startswith("expand")} == {
        "amount": "2000", "currency": "eur", "payment_method": "pm_1", "payment_method_types[0]": "card", "capture_method": "manual",
        "confirm": "true", "off_session": "true", "customer": "cus_1", "metadata[charging_session]": "7", "description": "Voltpay charging session 7",
    }
    assert create["headers"]["Authorization"] == "Bearer sk_test_stub_secret"
    assert (capture["path"], capture["form"]["amount_to_capture"], capture["headers"]["Idempotency-Key"]) == ("/v1/payment_intents/pi_1/capture", ["1500"], "session:7:capture")
    assert (hold.status, hold.card_brand, hold.card_last4, hold.charge_id) == (PaymentStatus.REQUIRES_CAPTURE, "mastercard", "4444", "ch_1")
    assert (captured.status, captured.amount_captured, captured.amount_refunded) == (PaymentStatus.SUCCEEDED, eur(1500), eur(0))


def test_real_mode_refund_sends_an_explicit_amount_and_stripes_reason(stripe_stub, real_mode_provider):
    refund = {"id": "re_1", "object": "refund", "amount": 300, "currency": "eur", "status": "succeeded", "payment_intent": "pi_1"}
    stripe_stub.answers += [(200, _intent("succeeded", received=1500)), (200, refund)]
    result = real_mode_provider.refund(payment_id="pi_1", amount=eur(300), idempotency_key="refund:1", reason="duplicate")
    sent = stripe_stub.requests[1]
    assert (sent["path"], sent["headers"]["Idempotency-Key"]) == ("/v1/refunds", "refund:1")
    assert {k: v[0] for k, v in sent["form"].items()} == {"payment_intent": "pi_1", "amount": "300", "reason": "duplicate", "metadata[reason]": "duplicate"}
    assert (result.id, result.amount, result.status) == ("re_1", eur(300), "succeeded")


def test_real_mode_decline_code_and_authentication_required(stripe_stub, real_mode_provider):
    declined = _intent("requires_payment_method", last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds", "message": "Your card has insufficient funds."})
    stripe_stub.answers.append((402, {"error": {
        "type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
        "message": "Your card has insufficient funds.", "payment_intent": declined,
    }}))
    with pytest.raises(CardDeclined) as exc:
        real_mode_provider.charge(amount=eur(2000), payment_method_id="pm_1", customer_id="cus_1", idempotency_key="k1")
    assert (exc.value.reason, exc.value.message, exc.value.payment.failure_code) == ("insufficient_funds", "Your card has insufficient funds.", "insufficient_funds")

    needs_3ds = _intent("requires_payment_method", last_payment_error={"code": "authentication_required", "message": "This payment requires authentication."})
    stripe_stub.answers.append((402, {"error": {
        "type": "card_error", "code": "authentication_required", "message": "Your card was declined. This transaction requires authentication.",
        "payment_intent": needs_3ds,
    }}))
    with pytest.raises(AuthenticationRequired) as exc:
        real_mode_provider.charge(amount=eur(2000), payment_method_id="pm_1", customer_id="cus_1", idempotency_key="k2", off_session=True)
    assert (exc.value.payment.id, exc.value.payment.client_secret) == ("pi_1", "pi_1_secret_abc")


@pytest.mark.parametrize(("status", "error", "expected"), [
    (500, {"type": "api_error", "message": "An unknown error occurred"}, ProviderUnavailable),
    (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}, ProviderUnavailable),
    (400, {"type": "invalid_request_error", "code": "amount_too_small", "message": "Amount must be at least €0.50 eur"}, InvalidRequest),
    (401, {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_stub_secret"}, ProviderError),
    # Idempotency errors say nothing about the payment itself: never InvalidRequest (which marks a payment failed).
    (409, {"type": "idempotency_error", "message": "There is currently another in-progress request using this Idempotent Key"}, ProviderUnavailable),
    (400, {"type": "idempotency_error", "message": "Keys for idempotent requests can only be used with the same parameters"}, ProviderError),
])
def test_real_mode_errors_are_ours_and_hide_the_key(stripe_stub, real_mode_provider, status, error, expected):
    stripe_stub.answers.append((status, {"error": error}))
    with pytest.raises(expected) as exc:
        real_mode_provider.charge(amount=eur(20), payment_method_id="pm_1", customer_id=None, idempotency_key="k")
    assert type(exc.value) is expected
    assert "stub_secret" not in str(exc.value) and exc.value.__cause__ is None
