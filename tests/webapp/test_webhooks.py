"""POST /webhooks/stripe: signature checked before anything is stored, each event processed once,
the payment's end state independent of the order events arrive in.

Events localstripe never sends (or sends only at one moment) are built here from the real
PaymentIntent at localstripe and signed with the endpoint's secret, as Stripe signs them:
``t=<ts>,v1=<hmac_sha256(secret, "<ts>.<body>")>`` (tests/stripe_browser.py).
"""

from __future__ import annotations

import pytest
import stripe

from payments import cards, wallet
from payments.cards import CardPayment, State
from payments.money import Money
from tests.stripe_browser import VISA, browser_card, signed_event
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config and ana are fixtures)
    ana,
    app_config,
    card_payments,
    deliver,
    event,
    intent,
    provider_events,
    save_card,
    sign_in,
    top_up_entries,
    top_up_left_at_3ds,
    wallet_balance,
)



def test_forged_or_unsigned_deliveries_are_refused_and_nothing_is_stored(app, client, ana, stripe_config):
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config)
    payload = event("payment_intent.succeeded", intent(stripe_config, provider_id))

    forged_body, forged_signature = signed_event({**stripe_config, "STRIPE_WEBHOOK_SECRET": "whsec_not_ours"}, payload)
    body, signature = signed_event(stripe_config, payload)
    attempts = [
        (forged_body, {"Stripe-Signature": forged_signature}),  # signed with another secret
        (body.replace(b'"amount": 2000', b'"amount": 2'), {"Stripe-Signature": signature}),  # body altered after signing
        (body, {}),  # no signature at all
        (b"not json", {"Stripe-Signature": signature}),
    ]
    for data, headers in attempts:
        response = client.post("/webhooks/stripe", data=data, headers={"Content-Type": "application/json", **headers})
        assert response.status_code == 400
        assert response.mimetype == "application/problem+json" and response.get_json()["code"] == "bad_signature"

    assert provider_events(app) == []
    assert card_payments(app)[0].state == State.REQUIRES_ACTION and top_up_entries(app) == []


def test_duplicate_delivery_is_processed_once(app, client, ana, stripe_config):
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config)
    succeeded = event("payment_intent.succeeded", intent(stripe_config, provider_id), "evt_once")

    first = deliver(client, stripe_config, succeeded)
    again = deliver(client, stripe_config, succeeded)

    assert (first.status_code, first.get_json()) == (200, {"received": True, "outcome": "processed"})
    assert (again.status_code, again.get_json()) == (200, {"received": True, "outcome": "duplicate"})
    assert provider_events(app) == [("evt_once", "payment_intent.succeeded", "processed")]
    assert card_payments(app)[0].state == State.SUCCEEDED
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == Money(2000, "EUR")


def test_failed_then_succeeded_ends_succeeded(app, client, ana, stripe_config):
    # The bank's check fails, then the same payment is paid with another card: two events, one credit.
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config, passed=False)
    failed = event("payment_intent.payment_failed", intent(stripe_config, provider_id))
    assert deliver(client, stripe_config, failed).get_json()["outcome"] == "processed"
    assert card_payments(app)[0].state == State.FAILED and top_up_entries(app) == []

    sdk = stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]}, max_network_retries=0)
    sdk.v1.payment_intents.update(provider_id, params={"payment_method": browser_card(stripe_config, VISA)})
    sdk.v1.payment_intents.confirm(provider_id)
    succeeded = event("payment_intent.succeeded", intent(stripe_config, provider_id))
    assert deliver(client, stripe_config, succeeded).get_json()["outcome"] == "processed"
    # The failure is redelivered late, as Stripe may: nothing moves back.
    assert deliver(client, stripe_config, {**failed, "id": "evt_late_failure"}).status_code == 200

    [row] = card_payments(app)
    assert (row.state, row.failure_code, row.card_last4) == (State.SUCCEEDED, None, "4242")
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == Money(2000, "EUR")


def test_succeeded_then_a_stale_requires_action_stays_succeeded(app, client, ana, stripe_config):
    payment_id, provider_id, waiting = top_up_left_at_3ds(app, client, stripe_config)

    deliver(client, stripe_config, event("payment_intent.succeeded", intent(stripe_config, provider_id)))
    stale = deliver(client, stripe_config, event("payment_intent.requires_action", waiting))  # sent earlier, arrives later

    assert stale.status_code == 200
    assert card_payments(app)[0].state == State.SUCCEEDED
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]


def test_events_we_do_not_use_are_acknowledged_and_ignored(app, client, ana, stripe_config):
    customer = deliver(client, stripe_config, event("customer.created", {"id": "cus_x", "object": "customer"}, "evt_customer"))
    unknown = deliver(client, stripe_config, event("payment_intent.succeeded", {
        "id": "pi_not_ours", "object": "payment_intent", "amount": 500, "currency": "eur", "status": "succeeded", "metadata": {},
    }, "evt_not_ours"))  # fmt: skip

    assert customer.get_json() == unknown.get_json() == {"received": True, "outcome": "ignored"}
    assert provider_events(app) == [("evt_customer", "customer.created", "ignored"), ("evt_not_ours", "payment_intent.succeeded", "ignored")]


def test_event_for_a_payment_whose_answer_was_never_recorded_credits_it(app, client, ana, stripe_config):
    """The process died between Stripe's answer and our commit: the event finds the record by its metadata."""
    card = save_card(client, stripe_config, VISA)
    provider = app.extensions["payment_provider"]
    factory = app.extensions["db_sessionmaker"]
    with factory.begin() as s:
        row = wallet.start_top_up(s, provider, owner=ana.owner, email=ana.email, amount=Money(1000, "EUR"), payment_method_id=card, currency="EUR")
    with factory() as s:
        charged = cards.submit(s, provider, s.get(CardPayment, row.id))
        provider_id = charged.provider_payment_id
        s.rollback()  # the crash: the provider charged, our answer is lost
    assert (card_payments(app)[0].state, card_payments(app)[0].provider_payment_id) == (State.CREATED, None)

    outcome = deliver(client, stripe_config, event("payment_intent.succeeded", intent(stripe_config, provider_id)))

    assert outcome.get_json()["outcome"] == "processed"
    [row] = card_payments(app)
    assert (row.state, row.provider_payment_id) == (State.SUCCEEDED, provider_id)
    assert top_up_entries(app) == [f"card_payment:{row.id}"] and wallet_balance(app, ana.owner) == Money(1000, "EUR")


def test_provider_down_while_processing_answers_503_so_stripe_retries(app, client, ana, stripe_config):
    from payments.providers import make_provider
    from tests.conftest import free_port

    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config)
    succeeded = event("payment_intent.succeeded", intent(stripe_config, provider_id), "evt_retry_me")
    real = app.extensions["payment_provider"]
    app.extensions["payment_provider"] = make_provider({**stripe_config, "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"})

    response = deliver(client, stripe_config, succeeded)
    assert response.status_code == 503 and provider_events(app) == []

    app.extensions["payment_provider"] = real  # Stripe's next attempt
    assert deliver(client, stripe_config, succeeded).get_json()["outcome"] == "processed"
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]
