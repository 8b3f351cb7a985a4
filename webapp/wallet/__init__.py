"""The wallet pages: balance, top-up by card, saved cards and history, plus the reconciliation job.

Card numbers never reach this server. The browser sends them to the card
processor with stripe.js (static/js/card.js): it asks us for a SetupIntent,
confirms it with Stripe, and tells us only the resulting ids. A top-up is
then paid with a saved card (``pm_...``) that we check belongs to the person.

A top-up is written and committed before the provider is called
(``payments.wallet.start_top_up``), then submitted; whatever happens next
(declined, 3-D Secure, provider down, browser closed) the ledger is credited
once, by whichever of the result page, the webhook and the reconciliation
job (``webapp/wallet/jobs.py``) learns of the success first.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("wallet", __name__, url_prefix="/wallet")

from webapp.wallet import views  # noqa: E402,F401  (routes register on bp)
