"""The reconciliation job (webapp/wallet/jobs.py) with localstripe: a top-up whose browser closed is
credited exactly once, whether localstripe's webhook or the job gets there first; payments that never
reached the provider are resent (real Stripe) or given up (localstripe); abandoned 3-D Secure is cancelled.

Time passing is simulated by backdating the payment rows, never by waiting.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from payments import wallet
from payments.cards import State
from payments.money import Money
from payments.webhooks import ProviderEvent
from tests.stripe_browser import VISA
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config and ana are fixtures)
    ana,
    app_config,
    backdate,
    card_payments,
    deliver,
    event,
    intent,
    save_card,
    serving,
    sign_in,
    text,
    top_up_entries,
    top_up_left_at_3ds,
    wait_until,
    wallet_balance,
)
from webapp.devtools.localstripe_server import register_webhook
from webapp.tasks import huey
from webapp.wallet.jobs import reconcile_card_payments, reconcile_card_payments_job



@pytest.fixture
def localstripe_webhook(app, stripe_config):
    """localstripe sends its signed events to the app, served on a local port, during this test."""
    base, secret = stripe_config["STRIPE_API_BASE"], stripe_config["STRIPE_WEBHOOK_SECRET"]
    with serving(app) as url:
        register_webhook(base, "voltpay-wallet-tests", target=url + "/webhooks/stripe", secret=secret)
        try:
            yield
        finally:
            # Registrations cannot be deleted: point this one at an event type that never happens.
            register_webhook(base, "voltpay-wallet-tests", target=url + "/webhooks/stripe", secret=secret, events=["voltpay.never"])


def reconcile(app, *, localstripe: bool = True) -> dict[str, int]:
    """One run of the job, as the worker runs it (in an app context)."""
    with app.app_context():
        return reconcile_card_payments(app.extensions["payment_provider"], localstripe=localstripe)


def webhook_processed(app, provider_id: str) -> bool:
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(ProviderEvent).where(ProviderEvent.provider_payment_id == provider_id, ProviderEvent.processed_at.is_not(None))) is not None


def test_browser_closed_webhook_first_then_the_job_changes_nothing(app, client, ana, stripe_config, localstripe_webhook):
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config)

    # localstripe's own signed payment_intent.succeeded reaches /webhooks/stripe about a second later.
    wait_until(lambda: webhook_processed(app, provider_id), what="localstripe's webhook")
    assert card_payments(app)[0].state == State.SUCCEEDED
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]

    backdate(app, payment_id, dt.timedelta(hours=1))
    assert reconcile(app) == {}  # nothing is waiting any more
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == Money(2000, "EUR")
    assert "€20.00 was added to your wallet." in text(client.get(f"/wallet/top-ups/{payment_id}"))


def test_browser_closed_job_first_then_the_webhook_changes_nothing(app, client, ana, stripe_config):
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config)

    assert reconcile(app) == {}  # younger than two minutes: the browser or the webhook may still come
    backdate(app, payment_id, dt.timedelta(minutes=3))
    assert reconcile(app) == {"succeeded": 1}
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]

    late = deliver(client, stripe_config, event("payment_intent.succeeded", intent(stripe_config, provider_id)))
    assert late.get_json()["outcome"] == "processed"
    assert reconcile(app) == {}
    client.post(f"/wallet/top-ups/{payment_id}/confirm")  # and the browser, had it come back
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == Money(2000, "EUR")


def test_3d_secure_not_done_waits_then_is_cancelled_after_a_day(app, client, ana, stripe_config):
    payment_id, provider_id, _ = top_up_left_at_3ds(app, client, stripe_config, passed=None)
    backdate(app, payment_id, dt.timedelta(minutes=30))
    assert reconcile(app) == {"requires_action": 1}  # still the customer's turn

    backdate(app, payment_id, dt.timedelta(hours=24))
    assert reconcile(app) == {"abandoned": 1}
    assert card_payments(app)[0].state == State.CANCELED and intent(stripe_config, provider_id)["status"] == "canceled"
    assert reconcile(app) == {} and top_up_entries(app) == []


def _unsent_top_up(app, ana, card: str) -> int:
    """A top-up recorded and committed, whose provider call never happened (the process died in between)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        row = wallet.start_top_up(
            s, app.extensions["payment_provider"], owner=ana.owner, email=ana.email, amount=Money(1500, "EUR"), payment_method_id=card, currency="EUR",
        )
    return row.id


def test_unsent_payment_is_given_up_with_localstripe(app, client, ana, stripe_config):
    payment_id = _unsent_top_up(app, ana, save_card(client, stripe_config, VISA))
    backdate(app, payment_id, dt.timedelta(minutes=5))
    assert reconcile(app) == {"unchanged": 1}  # it may still be on its way

    backdate(app, payment_id, dt.timedelta(minutes=11))
    assert reconcile(app) == {"not_submitted": 1}
    [row] = card_payments(app)
    assert (row.state, row.failure_code) == (State.FAILED, "not_submitted")
    assert "this top-up was cancelled and your card was not charged" in text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert reconcile(app) == {} and top_up_entries(app) == []


def test_unsent_payment_is_resent_with_its_key_against_real_stripe(app, client, ana, stripe_config):
    # Real Stripe would replay its first answer for the same key; localstripe stands in for a call that never arrived.
    payment_id = _unsent_top_up(app, ana, save_card(client, stripe_config, VISA))
    backdate(app, payment_id, dt.timedelta(minutes=11))

    assert reconcile(app, localstripe=False) == {"succeeded": 1}
    assert reconcile(app, localstripe=False) == {}
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == Money(1500, "EUR")

    # Beyond Stripe's 24-hour idempotency window a resend could charge twice: given up instead.
    other = _unsent_top_up(app, ana, save_card(client, stripe_config, VISA))
    backdate(app, other, dt.timedelta(hours=23, minutes=5))
    assert reconcile(app, localstripe=False) == {"not_submitted": 1}


def test_provider_down_leaves_payments_for_the_next_run(app, client, ana, stripe_config):
    from payments.providers import make_provider
    from tests.conftest import free_port

    payment_id, _, _ = top_up_left_at_3ds(app, client, stripe_config)
    backdate(app, payment_id, dt.timedelta(minutes=3))
    real = app.extensions["payment_provider"]
    app.extensions["payment_provider"] = make_provider({**stripe_config, "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"})
    assert reconcile(app) == {"unavailable": 1}
    assert card_payments(app)[0].state == State.REQUIRES_ACTION

    app.extensions["payment_provider"] = real
    assert reconcile(app) == {"succeeded": 1}
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]


def test_job_runs_every_minute_in_the_worker(app, client, ana, stripe_config):
    minute = dt.datetime(2026, 11, 22, 10, 17, tzinfo=dt.UTC)
    assert "reconcile_card_payments_job" in {t.name for t in huey.read_periodic(minute)}

    payment_id, _, _ = top_up_left_at_3ds(app, client, stripe_config)
    backdate(app, payment_id, dt.timedelta(minutes=3))
    reconcile_card_payments_job()  # the test queue runs jobs at once, in the app's context
    assert card_payments(app)[0].state == State.SUCCEEDED

    app.extensions["payment_provider"] = None  # card payments switched off: nothing to do, no error
    reconcile_card_payments_job()
