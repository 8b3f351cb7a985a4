"""Provider webhooks: ``POST /webhooks/stripe``, signature-verified, stored once per event, order-independent.

Stripe signs each delivery with the endpoint's secret; the raw body and the
``Stripe-Signature`` header go to ``provider.parse_webhook``. A delivery that
does not verify is refused with 400 and nothing is stored. A verified event
is handed to ``payments.webhooks.receive`` (deduplicated on the event id; it
asks the provider for the payment's state now, so the order of deliveries
does not matter) and committed; then we answer 200, also for events we do not
use, so Stripe stops sending them. When the provider cannot be reached while
processing, we answer 503 and Stripe delivers the event again later.

No cookies are involved, so the blueprint is exempt from CSRF; without a
configured provider the endpoint does not exist (404).
"""

from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, jsonify, request

from payments import webhooks
from payments.providers.base import ProviderError, SignatureError
from webapp.db import db_session
from webapp.errors import problem_response

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
log = logging.getLogger("voltpay.webhooks")


@bp.route("/stripe", methods=["POST"])
def stripe():
    """Verify, store and process one Stripe event."""
    provider = current_app.extensions.get("payment_provider")
    if provider is None:
        abort(404)
    try:
        event = provider.parse_webhook(payload=request.get_data(cache=False), signature=request.headers.get("Stripe-Signature"))
    except SignatureError as e:
        log.warning("webhook refused", extra={"reason": e.message})
        return problem_response(400, "bad_signature", "The Stripe-Signature header does not verify for this body.")
    s = db_session()
    try:
        outcome = webhooks.receive(s, provider, event)
    except ProviderError as e:
        s.rollback()  # nothing stored: Stripe retries the delivery
        log.warning("webhook not processed", extra={"event_id": event.id, "reason": e.code})
        return problem_response(503, "provider_unavailable", "The payment provider could not be reached; deliver the event again later.")
    s.commit()
    log.info("webhook received", extra={"event_id": event.id, "type": event.type, "outcome": outcome})
    return jsonify(received=True, outcome=outcome)
