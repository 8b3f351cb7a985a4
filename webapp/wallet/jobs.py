"""Reconciliation of card payments that are still waiting for an answer (a Huey periodic job, every minute).

A card payment can stop half-way: the browser closed during 3-D Secure, the
webhook was lost, or the process died between writing our record and
hearing the provider's answer. Every minute, for each payment waiting longer
than ``STALE_AFTER`` (``payments.cards.stale``):

* it has a provider id: ask the provider for its state now and apply it
  (``cards.refresh``), under the payment's row lock, in its own transaction.
  A success books the ledger once, whether the webhook, the result page or
  this job records it first (the entry's key is derived from the payment).
* it has no provider id and is older than ``RESUBMIT_AFTER``: the provider
  may or may not have received it.

  - Against real Stripe we send it again with the same idempotency key
    (``cards.submit``): Stripe replays its first answer if it got the first
    call, so the card is never charged twice, and creates the payment if it
    did not. Stripe keeps keys for 24 hours, so after ``GIVE_UP_AFTER`` a
    resend could charge twice: such a payment is marked failed instead. A
    replay needs the very same parameters, so only purposes whose first call
    we know are resent (``RESUBMIT``: wallet top-ups).
  - Against localstripe (``STRIPE_LOCALSTRIPE``, the demo and the tests) a
    resend would create a second payment, because localstripe ignores
    idempotency keys: the payment is marked failed with ``not_submitted``.
    If localstripe did charge it, its ``payment_intent.succeeded`` webhook
    still finds the record through the payment's metadata and credits it
    (``payments.webhooks``).
* a payment still waiting for 3-D Secure after ``GIVE_UP_AFTER`` is
  cancelled at the provider, so abandoned attempts do not pile up in the
  list this job works through.

Each step is idempotent: after a payment's state changed, running the job
again finds nothing to do for it; two workers running it at once serialise
on the row lock and the second one sees the new state.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import current_app
from huey import crontab

from payments import cards
from payments.base import utcnow
from payments.cards import Purpose, State
from payments.providers.base import CardDeclined, InvalidRequest, PaymentProvider, ProviderError
from webapp.db import session_factory
from webapp.tasks import periodic_task

log = logging.getLogger("voltpay.reconcile")

STALE_AFTER = dt.timedelta(minutes=2)  # the browser and the webhook usually answer within seconds
RESUBMIT_AFTER = dt.timedelta(minutes=10)  # a request in flight has long timed out by then
GIVE_UP_AFTER = dt.timedelta(hours=23)  # inside Stripe's 24 h idempotency window
WAITING = (State.CREATED, State.REQUIRES_ACTION, State.PROCESSING)
# Purposes whose first call we can repeat exactly: Stripe replays an idempotency key only for the
# same parameters, and a wallet top-up is always submitted with the customer present (off_session=False).
RESUBMIT = {Purpose.WALLET_TOP_UP}


def reconcile_card_payments(provider: PaymentProvider, *, localstripe: bool, now: dt.datetime | None = None) -> dict[str, int]:
    """Bring every stale card payment up to date, each in its own transaction; returns counts per outcome."""
    factory = session_factory()
    now = now or utcnow()
    with factory() as s:
        ids = [row.id for row in cards.stale(s, older_than=STALE_AFTER)]
    counts: dict[str, int] = {}
    for payment_id in ids:
        try:
            with factory.begin() as s:
                outcome = _reconcile_one(s, provider, payment_id, localstripe=localstripe, now=now)
        except ProviderError as e:  # provider down: the next run tries again
            outcome = "unavailable"
            log.warning("card payment not reconciled", extra={"card_payment": payment_id, "reason": e.code})
        counts[outcome] = counts.get(outcome, 0) + 1
    if ids:
        log.info("card payments reconciled", extra={"outcomes": counts})
    return counts


def _reconcile_one(s, provider: PaymentProvider, payment_id: int, *, localstripe: bool, now: dt.datetime) -> str:
    row = cards.lock(s, payment_id)
    if row.state not in WAITING:
        return "unchanged"  # settled meanwhile by the webhook, the browser or another worker
    age = now - row.created_at
    if row.provider_payment_id is not None:
        cards.refresh(s, provider, row)
        if row.state == State.REQUIRES_ACTION and age > GIVE_UP_AFTER:
            cards.release(s, provider, row)  # 3-D Secure abandoned
            return "abandoned"
        return row.state.value
    if age < RESUBMIT_AFTER:
        return "unchanged"
    if localstripe or age > GIVE_UP_AFTER:
        _not_submitted(s, row)
        return "not_submitted"
    if row.purpose not in RESUBMIT:
        return "unchanged"  # its first call's parameters are not ours to repeat; given up after GIVE_UP_AFTER
    try:
        cards.submit(s, provider, row)  # same idempotency key as the first call: Stripe replays its answer
    except (CardDeclined, InvalidRequest):
        pass  # recorded as failed by submit, and committed with it
    return row.state.value


def _not_submitted(s, row) -> None:
    row.state = State.FAILED
    row.failure_code = "not_submitted"
    row.failure_message = "the provider never confirmed receiving this payment"
    s.flush()


@periodic_task(crontab(minute="*"))
def reconcile_card_payments_job() -> None:
    """Every minute: reconcile stale card payments (nothing to do without a payment provider)."""
    provider = current_app.extensions.get("payment_provider")
    if provider is None:
        return
    reconcile_card_payments(provider, localstripe=bool(current_app.config.get("STRIPE_LOCALSTRIPE")))
