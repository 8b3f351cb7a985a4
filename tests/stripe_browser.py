"""What stripe.js and the bank's 3-D Secure page do in the customer's browser, done by the tests against localstripe.

Raw test card numbers exist only here and in the browser tests: our server
only ever sees ``pm_...``, ``seti_...`` and ``pi_...`` ids. ``config`` is the
``stripe_config`` fixture (STRIPE_API_BASE, keys, webhook secret).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.parse
import urllib.request

import stripe

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"  # localstripe calls every card "visa": tell cards apart by last4
DECLINED_AT_CHARGE = "4000000000000341"
THREE_D_SECURE = "4000002500003155"


def post_form(url: str, form: dict | list, bearer: str | None = None) -> dict:
    """POST a form to localstripe and return its JSON answer."""
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else {}


def browser_card(config: dict, number: str) -> str:
    """A card payment method as stripe.js would create it from what the customer typed: its ``pm_...`` id."""
    form = {"type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2034", "card[cvc]": "123"}
    return post_form(config["STRIPE_API_BASE"] + "/v1/payment_methods", form, bearer=config["STRIPE_SECRET_KEY"])["id"]


def confirm_card_setup(config: dict, setup_id: str, number: str) -> str:
    """``stripe.confirmCardSetup``: the typed card confirms the SetupIntent (3-D Secure passed); returns the ``pm_...`` id."""
    sdk = stripe.StripeClient(config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=0)
    pm_id = browser_card(config, number)
    confirmed = sdk.v1.setup_intents.confirm(setup_id, params={"payment_method": pm_id})
    if confirmed.status == "requires_action":  # the customer passes 3-D Secure (localstripe: confirm again)
        sdk.v1.setup_intents.confirm(setup_id)
    return pm_id


def pass_3ds(config: dict, payment_id: str, client_secret: str, success: bool = True) -> None:
    """The customer completes (or fails) the 3-D Secure challenge in the browser."""
    url = f"{config['STRIPE_API_BASE']}/v1/payment_intents/{payment_id}/_authenticate?success={'true' if success else 'false'}"
    post_form(url, {"client_secret": client_secret, "key": config["STRIPE_PUBLISHABLE_KEY"]})


def signed_event(config: dict, event: dict, timestamp: int | None = None) -> tuple[bytes, str]:
    """A webhook delivery as Stripe signs it: the JSON body and its ``Stripe-Signature`` header."""
    payload = json.dumps(event).encode()
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(config["STRIPE_WEBHOOK_SECRET"].encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={t},v1={mac}"
