"""Stripe behind our PaymentProvider protocol: the only module in Voltpay that imports ``stripe``.

Each ``StripeProvider`` owns a ``stripe.StripeClient`` (never the SDK's global
``stripe.api_key``), so several configurations can live in one process.
Nothing leaves this module as an SDK object or an SDK exception: calls return
our frozen dataclasses and raise our ``ProviderError`` family (see base.py).
Error messages carry Stripe's message, code and request id, never the secret
key (it is redacted should Stripe ever echo it), never a card number.

How we talk to Stripe:

* Every call that creates or moves money (customer, SetupIntent, PaymentIntent
  create, capture, cancel, refund) sends the caller's ``idempotency_key``.
* Holds are PaymentIntents with ``capture_method="manual"``; both holds and
  immediate charges are created with ``confirm=True`` and the payment method
  already set, and ``off_session=True`` when the customer is not present.
  ``payment_method_types=["card"]`` keeps server-side confirmation free of
  redirect-based methods (so no ``return_url`` is needed).
* PaymentIntents are read with ``expand=["latest_charge", "payment_method"]``:
  the charge gives the captured and refunded amounts and the charge id, the
  payment method gives brand and last four.
* Amounts follow the SDK's pinned API version (basil or later): a partial
  capture or a cancellation creates no Refund, so ``charge.amount_captured``
  and ``charge.amount_refunded`` are what they say. Configure the webhook
  endpoint with the same API version so event payloads have the same shape.
* Payouts to parties with a connected account are Transfers
  (``transfer``) with the payout's idempotency key; localstripe has no
  Connect, so our localstripe runner (webapp/devtools/localstripe_server.py)
  adds a minimal ``/v1/transfers`` for the demo and the tests.
* ``parse_webhook`` reads only the verified payload (no API call); a Payment
  in an event is a snapshot at the time of the event, ``retrieve`` is the
  truth. Events we do not map come back with ``payment=None`` for the caller
  to acknowledge and ignore.

Protocol rules enforced here whatever the backend does (they cost little on
real Stripe and make localstripe behave):

* An off-session payment that needs 3-D Secure raises AuthenticationRequired
  (real Stripe answers 402 ``authentication_required``; localstripe returns
  ``requires_action``).
* ``finish_card_setup`` attaches the card when the SetupIntent did not.
* ``refund`` always sends an explicit amount and first checks it against what
  is left to refund and the payment's currency; ``capture`` checks the
  currency and the hold first. Both return the current state when the same
  action already happened (a retry after a lost answer).

``localstripe_compat=True`` (demo and tests only) switches on the few
adjustments for localstripe's gaps, all in this module, all named ``compat``
below; see ../shared/notes/localstripe.md:

* no network retries (localstripe ignores Idempotency-Key, so a retry would
  duplicate a payment);
* PaymentIntent/Refund create params that localstripe rejects are dropped
  (``LOCALSTRIPE_UNSUPPORTED_PARAMS``);
* captured and refunded amounts are derived from the charge, because
  localstripe has no ``amount_captured`` and books the released remainder of a
  partial capture as a Refund without a ``payment_intent``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import stripe

from payments.money import Money
from payments.providers.base import (
    BALANCE_TXN_TYPES,
    AuthenticationRequired,
    BalanceTxn,
    Card,
    CardDeclined,
    CardSetup,
    InvalidRequest,
    Payment,
    PaymentStatus,
    ProviderError,
    ProviderUnavailable,
    Refund,
    SignatureError,
    TransferResult,
    WebhookEvent,
)

#: Create params localstripe 1.15 answers with 400 "Unexpected ...", dropped in compat mode only.
LOCALSTRIPE_UNSUPPORTED_PARAMS = {
    "payment_intent": frozenset({
        "description", "receipt_email", "statement_descriptor", "statement_descriptor_suffix",
        "setup_future_usage", "automatic_payment_methods", "return_url", "error_on_requires_action",
        "mandate_data", "on_behalf_of", "transfer_data", "transfer_group", "application_fee_amount",
    }),
    "refund": frozenset({"reason", "instructions_email", "refund_application_fee", "reverse_transfer"}),
}

#: The webhook events we turn into a WebhookEvent with a Payment.
PAYMENT_INTENT_EVENTS = frozenset({
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "payment_intent.amount_capturable_updated",
    "payment_intent.requires_action",
})
CHARGE_REFUNDED = "charge.refunded"

#: Refund reasons Stripe knows; any other reason we are given travels in metadata only.
STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

_EXPAND_PAYMENT = ["latest_charge", "payment_method"]
_LEGACY_STATUS = {  # API versions before 2019-02-11, as localstripe's webhook events claim to be
    "requires_source": PaymentStatus.REQUIRES_PAYMENT_METHOD,
    "requires_source_action": PaymentStatus.REQUIRES_ACTION,
}
_CONNECTED_ACCOUNT = re.compile(r"acct_[A-Za-z0-9]+")
_SECRET_LOOKING = re.compile(r"\b(sk|rk)_(live|test)_[A-Za-z0-9]+")


def _plain(obj: Any) -> Any:
    """A StripeObject as plain dicts and lists (webhook data may come either way); anything else unchanged."""
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    return obj


def _id_and_object(value: Any) -> tuple[str | None, dict | None]:
    """An expandable field: (id, the object when expanded)."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, Mapping):
        return value.get("id"), dict(value)
    return None, None


def _status(value: str | None) -> PaymentStatus:
    """Our status for a PaymentIntent status (also the names of API versions before 2019)."""
    try:
        return _LEGACY_STATUS.get(value or "") or PaymentStatus(value)
    except ValueError:
        raise ProviderError(f"Stripe returned an unknown payment status {value!r}") from None


class StripeProvider:
    """PaymentProvider on Stripe (or localstripe with ``localstripe_compat=True``)."""

    def __init__(
        self,
        *,
        secret_key: str,
        publishable_key: str,
        webhook_secret: str | None,
        api_base: str | None = None,
        localstripe_compat: bool = False,
        max_network_retries: int = 2,
        timeout_seconds: int = 30,
    ):
        if not secret_key or not secret_key.startswith(("sk_", "rk_")):
            raise ValueError("the Stripe secret key must be a secret (sk_...) or restricted (rk_...) key")
        host = urlsplit(api_base).hostname if api_base else None
        if host is not None and secret_key.startswith(("sk_live_", "rk_live_")) and not (host == "stripe.com" or host.endswith(".stripe.com")):
            raise ValueError(f"refusing to send a live Stripe key to {host}")
        if localstripe_compat and not api_base:
            raise ValueError("localstripe compatibility needs the localstripe URL as api_base")
        self.publishable_key = publishable_key
        self.localstripe_compat = localstripe_compat
        self._api_base = api_base
        self._secret_key = secret_key
        self._webhook_secret = webhook_secret
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base} if api_base else None,
            # compat: localstripe ignores Idempotency-Key, so an SDK retry would create a duplicate.
            max_network_retries=0 if localstripe_compat else max_network_retries,
            http_client=stripe.RequestsClient(timeout=timeout_seconds),
        )

    def __repr__(self) -> str:
        return f"StripeProvider(api_base={self._api_base!r}, localstripe_compat={self.localstripe_compat})"

    # -- customers and saved cards ---------------------------------------------------------------

    def ensure_customer(self, *, email: str, existing_id: str | None, idempotency_key: str) -> str:
        """Return ``existing_id`` as is, or create a Stripe customer for ``email``."""
        if existing_id:
            return existing_id
        with self._errors("create customer"):
            customer = self._client.v1.customers.create(params={"email": email}, options={"idempotency_key": idempotency_key})
        return customer.id

    def start_card_setup(self, *, customer_id: str, idempotency_key: str) -> CardSetup:
        """Create a SetupIntent for off-session use; the browser confirms it with stripe.js."""
        with self._errors("start card setup"):
            setup = self._client.v1.setup_intents.create(
                params={"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"]},
                options={"idempotency_key": idempotency_key},
            )
        return CardSetup(id=setup.id, client_secret=setup.client_secret)

    def finish_card_setup(self, *, setup_id: str, customer_id: str) -> Card:
        """Check the confirmed SetupIntent is this customer's, attach its card if needed, return it.

        The first card of a customer who has no default becomes the default.
        """
        with self._errors("finish card setup"):
            setup = _plain(self._client.v1.setup_intents.retrieve(setup_id, params={"expand": ["payment_method"]}))
            if setup.get("customer") != customer_id:
                raise InvalidRequest("this card setup belongs to another customer")
            if setup.get("status") != "succeeded":
                raise InvalidRequest(f"the card setup is not complete (status {setup.get('status')})", provider_code=setup.get("status"))
            pm_id, pm = _id_and_object(setup.get("payment_method"))
            if pm is None:
                raise InvalidRequest("the card setup has no card")
            if pm.get("customer") is None:
                # localstripe's SetupIntent confirm does not attach; real Stripe already has.
                pm = _plain(self._client.v1.payment_methods.attach(pm_id, params={"customer": customer_id}))
            elif pm["customer"] != customer_id:
                raise InvalidRequest("this card belongs to another customer")
            default_id = self._default_card_id(customer_id)
            if default_id is None:
                self._client.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": pm_id}})
                default_id = pm_id
        return self._card(pm, default_id)

    def list_cards(self, *, customer_id: str) -> list[Card]:
        """The customer's cards, the default first, then newest first."""
        with self._errors("list cards"):
            default_id = self._default_card_id(customer_id)
            methods = self._client.v1.payment_methods.list(params={"customer": customer_id, "type": "card", "limit": 100})
            cards = [self._card(_plain(pm), default_id) for pm in methods.data]
        return sorted(cards, key=lambda card: not card.is_default)

    def set_default_card(self, *, customer_id: str, payment_method_id: str) -> None:
        """Make one of the customer's cards the default for payments without a chosen card."""
        with self._errors("set default card"):
            self._own_card(customer_id, payment_method_id)
            self._client.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": payment_method_id}})

    def remove_card(self, *, customer_id: str, payment_method_id: str) -> None:
        """Detach one of the customer's cards (InvalidRequest for anyone else's); clear it as default."""
        with self._errors("remove card"):
            self._own_card(customer_id, payment_method_id)
            self._client.v1.payment_methods.detach(payment_method_id)
            if self._default_card_id(customer_id) == payment_method_id:  # Stripe clears it; localstripe does not
                self._client.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": ""}})

    def card_of(self, *, payment_method_id: str) -> Card:
        """Brand, last four and expiry of any payment method (a guest's card)."""
        with self._errors("read card"):
            pm = _plain(self._client.v1.payment_methods.retrieve(payment_method_id))
        return self._card(pm, None)

    # -- payments ----------------------------------------------------------------------------------

    def authorize(
        self, *, amount: Money, payment_method_id: str, customer_id: str | None, idempotency_key: str,
        off_session: bool = False, metadata: dict[str, str] | None = None, description: str | None = None,
    ) -> Payment:
        """Place a hold: a confirmed PaymentIntent with manual capture."""
        return self._create_payment("manual", amount, payment_method_id, customer_id, idempotency_key, off_session, metadata, description)

    def charge(
        self, *, amount: Money, payment_method_id: str, customer_id: str | None, idempotency_key: str,
        off_session: bool = False, metadata: dict[str, str] | None = None, description: str | None = None,
    ) -> Payment:
        """Take a payment now: a confirmed PaymentIntent with automatic capture."""
        return self._create_payment("automatic", amount, payment_method_id, customer_id, idempotency_key, off_session, metadata, description)

    def capture(self, *, payment_id: str, amount: Money, idempotency_key: str) -> Payment:
        """Capture ``amount`` of a hold; Stripe releases the rest. A repeat of a done capture returns it."""
        current = self.retrieve(payment_id=payment_id)
        self._check_currency(current, amount)
        if current.status == PaymentStatus.SUCCEEDED and current.amount_captured == amount:
            return current  # already captured for this amount: a retry after a lost answer
        if current.status != PaymentStatus.REQUIRES_CAPTURE:
            raise InvalidRequest(f"payment {payment_id} is not a hold waiting for capture (status {current.status})", payment=current)
        if not 0 < amount.amount <= current.amount.amount:
            raise InvalidRequest(f"cannot capture {amount} of a hold of {current.amount}", payment=current)
        with self._errors("capture"):
            pi = self._client.v1.payment_intents.capture(
                payment_id,
                params={"amount_to_capture": amount.amount, "expand": _EXPAND_PAYMENT},
                options={"idempotency_key": idempotency_key},
            )
        return self._payment(pi)

    def release(self, *, payment_id: str, idempotency_key: str) -> Payment:
        """Cancel a hold (or a payment still waiting for the customer). A repeat returns the canceled payment."""
        try:
            with self._errors("release"):
                pi = self._client.v1.payment_intents.cancel(
                    payment_id, params={"expand": _EXPAND_PAYMENT}, options={"idempotency_key": idempotency_key},
                )
        except InvalidRequest as exc:
            current = self.retrieve(payment_id=payment_id)
            if current.status == PaymentStatus.CANCELED:
                return current
            raise InvalidRequest(f"payment {payment_id} cannot be released (status {current.status})", payment=current, provider_code=exc.provider_code) from None
        return self._payment(pi)

    def refund(self, *, payment_id: str, amount: Money, idempotency_key: str, reason: str | None = None) -> Refund:
        """Refund ``amount`` (at most what was captured and not yet refunded) of a payment."""
        current = self.retrieve(payment_id=payment_id)
        self._check_currency(current, amount)
        refundable = current.amount_captured - current.amount_refunded
        if amount.amount <= 0 or amount > refundable:
            raise InvalidRequest(f"cannot refund {amount}: {refundable} of payment {payment_id} is left to refund", payment=current)
        params: dict[str, Any] = {"payment_intent": payment_id, "amount": amount.amount}  # never without amount: see the module doc
        if reason:
            params["metadata"] = {"reason": reason}
            if reason in STRIPE_REFUND_REASONS:
                params["reason"] = reason
        with self._errors("refund"):
            refund = _plain(self._client.v1.refunds.create(params=self._compat_params("refund", params), options={"idempotency_key": idempotency_key}))
        return Refund(id=refund["id"], payment_id=payment_id, amount=Money(refund["amount"], refund["currency"]), status=refund.get("status") or "pending")

    def retrieve(self, *, payment_id: str) -> Payment:
        """The PaymentIntent as Stripe sees it now."""
        with self._errors("retrieve payment"):
            pi = self._client.v1.payment_intents.retrieve(payment_id, params={"expand": _EXPAND_PAYMENT})
        return self._payment(pi)

    # -- Connect payouts ---------------------------------------------------------------------------

    def transfer(self, *, destination: str, amount: Money, idempotency_key: str, description: str | None = None) -> TransferResult:
        """A Stripe Transfer of ``amount`` from our balance to the connected account ``destination``, once per key."""
        if not _CONNECTED_ACCOUNT.fullmatch(destination or ""):
            raise InvalidRequest(f"not a Stripe connected account id: {destination!r}")
        if amount.amount <= 0:
            raise InvalidRequest(f"a transfer must be positive, not {amount}")
        params: dict[str, Any] = {"amount": amount.amount, "currency": amount.currency.lower(), "destination": destination}
        if description:
            params["description"] = description
        with self._errors("transfer"):
            tr = _plain(self._client.v1.transfers.create(params=params, options={"idempotency_key": idempotency_key}))
        return TransferResult(id=tr["id"], destination=_id_and_object(tr.get("destination"))[0] or destination,
                              amount=Money(tr["amount"], tr["currency"].upper()), reversed=bool(tr.get("reversed")))

    # -- balance (reconciliation) ------------------------------------------------------------------

    def balance_transactions(self, *, created_from: int, created_to: int) -> list[BalanceTxn]:
        """Balance transactions created in ``[created_from, created_to)``, every page, oldest first.

        ``data.source`` is expanded so a charge names its PaymentIntent and a
        refund its PaymentIntent without one call per transaction.
        """
        params: dict[str, Any] = {"created": {"gte": int(created_from), "lt": int(created_to)}, "limit": 100, "expand": ["data.source"]}
        with self._errors("list balance transactions"):
            page = self._client.v1.balance_transactions.list(params=params)
            txns = [self._balance_txn(_plain(t)) for t in page.auto_paging_iter()]
        return sorted(txns, key=lambda t: (t.created, t.id))

    def charge_payment_id(self, *, charge_id: str) -> str | None:
        """The PaymentIntent of a charge (the CSV export names charges, our records name PaymentIntents)."""
        with self._errors("retrieve charge"):
            charge = _plain(self._client.v1.charges.retrieve(charge_id))
        return _id_and_object(charge.get("payment_intent"))[0]

    @staticmethod
    def _balance_txn(t: dict) -> BalanceTxn:
        raw = t.get("type") or ""
        kind = BALANCE_TXN_TYPES.get(raw, "adjustment")
        source_id, source = _id_and_object(t.get("source"))
        payment_id = _id_and_object((source or {}).get("payment_intent"))[0]
        if kind == "charge" and payment_id:
            source_id = payment_id  # our records know the PaymentIntent, not the charge
        amount, fee = int(t.get("amount") or 0), int(t.get("fee") or 0)
        net = t.get("net")
        return BalanceTxn(
            id=t["id"], type=kind, source=source_id or "", amount=amount, fee=fee,
            net=int(net) if net is not None else amount - fee, currency=str(t.get("currency") or "").upper(),
            created=int(t.get("created") or 0), payment_id=payment_id, raw_type=None if raw == kind else raw,
        )

    # -- webhooks ----------------------------------------------------------------------------------

    def parse_webhook(self, *, payload: bytes, signature: str | None) -> WebhookEvent:
        """Verify a delivery with the endpoint secret and map it; SignatureError if it does not verify."""
        if not self._webhook_secret:
            raise SignatureError("no Stripe webhook secret is configured")
        if not signature:
            raise SignatureError("the webhook has no Stripe-Signature header")
        try:
            # construct_event is stripe.Webhook.construct_event bound to our client (no global api_key).
            event = self._client.construct_event(payload, signature, self._webhook_secret)
        except stripe.SignatureVerificationError:
            raise SignatureError("the webhook signature does not verify") from None
        except (ValueError, TypeError):  # signed but not JSON: cannot come from Stripe
            raise SignatureError("the webhook payload is not a Stripe event") from None
        event = _plain(event)
        event_type = event.get("type") or ""
        obj = _plain((event.get("data") or {}).get("object")) or {}
        payment = refund = None
        if event_type in PAYMENT_INTENT_EVENTS and obj.get("object") == "payment_intent":
            payment = self._payment(obj)
        elif event_type == CHARGE_REFUNDED and obj.get("object") == "charge":
            payment = self._payment_of_charge(obj)
            refund = self._latest_refund(obj, payment)
        return WebhookEvent(id=event["id"], type=event_type, created=int(event.get("created") or 0), payment=payment, refund=refund)

    # -- internals ---------------------------------------------------------------------------------

    def _create_payment(
        self, capture_method: str, amount: Money, payment_method_id: str, customer_id: str | None,
        idempotency_key: str, off_session: bool, metadata: dict[str, str] | None, description: str | None,
    ) -> Payment:
        if amount.amount <= 0:
            raise InvalidRequest(f"a payment must be positive, not {amount}")
        params: dict[str, Any] = {
            "amount": amount.amount,
            "currency": amount.currency.lower(),
            # Set at create: localstripe's confirm(payment_method=) fails, and one call is enough anyway.
            "payment_method": payment_method_id,
            "payment_method_types": ["card"],
            "capture_method": capture_method,
            "confirm": True,
            "metadata": dict(metadata or {}),
            "expand": _EXPAND_PAYMENT,
        }
        if customer_id:
            params["customer"] = customer_id
        if off_session:
            params["off_session"] = True
        if description:
            params["description"] = description
        with self._errors("create payment"):
            pi = self._client.v1.payment_intents.create(
                params=self._compat_params("payment_intent", params), options={"idempotency_key": idempotency_key},
            )
        payment = self._payment(pi)
        if off_session and payment.status == PaymentStatus.REQUIRES_ACTION:
            # The customer is not here to pass 3-D Secure: same outcome as Stripe's 402 authentication_required.
            raise AuthenticationRequired("the card needs 3-D Secure; ask the customer to confirm the payment", payment=payment, provider_code="authentication_required")
        return payment

    def _compat_params(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """compat: drop the create params localstripe rejects; unchanged against real Stripe."""
        if not self.localstripe_compat:
            return params
        unsupported = LOCALSTRIPE_UNSUPPORTED_PARAMS[kind]
        return {k: v for k, v in params.items() if k not in unsupported}

    def _payment(self, pi: Any) -> Payment:
        """Our Payment from a PaymentIntent (StripeObject or dict, charge and payment method expanded or not)."""
        pi = _plain(pi)
        currency = pi["currency"].upper()
        status = _status(pi.get("status"))
        charge_id, charge = _id_and_object(pi.get("latest_charge"))
        pm_id, pm = _id_and_object(pi.get("payment_method"))
        if self.localstripe_compat:
            captured, refunded = self._compat_amounts(charge)
        else:
            captured = pi.get("amount_received") or 0
            refunded = (charge or {}).get("amount_refunded") or 0  # a PI event carries no charge: nothing refunded yet then
        brand, last4 = self._brand_last4(pm, charge)
        error = pi.get("last_payment_error") or {}
        return Payment(
            id=pi["id"],
            status=status,
            amount=Money(pi["amount"], currency),
            amount_captured=Money(captured, currency),
            amount_refunded=Money(refunded, currency),
            client_secret=pi.get("client_secret"),
            payment_method_id=pm_id,
            card_brand=brand,
            card_last4=last4,
            charge_id=charge_id,
            failure_code=error.get("decline_code") or error.get("code"),
            failure_message=error.get("message"),
            metadata={str(k): str(v) for k, v in (pi.get("metadata") or {}).items()},
        )

    def _payment_of_charge(self, charge: dict) -> Payment | None:
        """The payment a charge belongs to, as far as the charge tells (charge.* events)."""
        pi_id, _ = _id_and_object(charge.get("payment_intent"))
        if pi_id is None:
            return None
        currency = charge["currency"].upper()
        if self.localstripe_compat:
            captured, refunded = self._compat_amounts(charge)
        else:
            captured = charge.get("amount_captured") or 0
            refunded = charge.get("amount_refunded") or 0
        if charge.get("status") == "failed":
            status = PaymentStatus.REQUIRES_PAYMENT_METHOD
        elif charge.get("captured"):
            status = PaymentStatus.SUCCEEDED
        elif charge.get("refunded"):  # an uncaptured charge refunded in full: the hold was released
            status = PaymentStatus.CANCELED
        else:
            status = PaymentStatus.REQUIRES_CAPTURE
        pm_id, pm = _id_and_object(charge.get("payment_method"))
        brand, last4 = self._brand_last4(pm, charge)
        return Payment(
            id=pi_id,
            status=status,
            amount=Money(charge["amount"], currency),
            amount_captured=Money(captured, currency),
            amount_refunded=Money(refunded, currency),
            payment_method_id=pm_id,
            card_brand=brand,
            card_last4=last4,
            charge_id=charge.get("id"),
            failure_code=charge.get("failure_code"),
            failure_message=charge.get("failure_message"),
            metadata={str(k): str(v) for k, v in (charge.get("metadata") or {}).items()},
        )

    def _latest_refund(self, charge: dict, payment: Payment | None) -> Refund | None:
        """The newest refund listed on a charge (present in older API versions or when expanded)."""
        refunds = [r for r in ((charge.get("refunds") or {}).get("data") or []) if isinstance(r, Mapping)]
        if self.localstripe_compat:
            refunds = [r for r in refunds if r.get("payment_intent")]  # compat: not a partial capture's remainder
        if not refunds or payment is None:
            return None
        newest = max(refunds, key=lambda r: r.get("created") or 0)
        return Refund(id=newest["id"], payment_id=payment.id, amount=Money(newest["amount"], newest["currency"]), status=newest.get("status") or "pending")

    @staticmethod
    def _compat_amounts(charge: dict | None) -> tuple[int, int]:
        """compat: (captured, refunded) from a localstripe charge.

        localstripe has no ``amount_captured`` and books the released rest of a
        partial capture as a Refund with no ``payment_intent`` (our refunds
        always name the payment intent), which it also counts in
        ``amount_refunded``.
        """
        if not charge or charge.get("status") != "succeeded" or not charge.get("captured"):
            return 0, 0
        released = sum(r.get("amount") or 0 for r in ((charge.get("refunds") or {}).get("data") or []) if not r.get("payment_intent"))
        return charge["amount"] - released, (charge.get("amount_refunded") or 0) - released

    @staticmethod
    def _brand_last4(pm: dict | None, charge: dict | None) -> tuple[str | None, str | None]:
        card = (pm or {}).get("card") or (((charge or {}).get("payment_method_details") or {}).get("card")) or {}
        return card.get("brand"), card.get("last4")

    @staticmethod
    def _card(pm: dict, default_id: str | None) -> Card:
        card = pm.get("card") or {}
        return Card(
            id=pm["id"],
            brand=card.get("brand") or "unknown",
            last4=card.get("last4") or "",
            exp_month=int(card.get("exp_month") or 0),
            exp_year=int(card.get("exp_year") or 0),
            is_default=pm["id"] == default_id,
        )

    def _default_card_id(self, customer_id: str) -> str | None:
        customer = _plain(self._client.v1.customers.retrieve(customer_id))
        if customer.get("deleted"):
            raise InvalidRequest(f"customer {customer_id} was deleted")
        default = (customer.get("invoice_settings") or {}).get("default_payment_method")
        return _id_and_object(default)[0]

    def _own_card(self, customer_id: str, payment_method_id: str) -> dict:
        pm = _plain(self._client.v1.payment_methods.retrieve(payment_method_id))
        if _id_and_object(pm.get("customer"))[0] != customer_id:
            raise InvalidRequest("this card is not one of this customer's cards")
        return pm

    @staticmethod
    def _check_currency(payment: Payment, amount: Money) -> None:
        if amount.currency != payment.amount.currency:
            raise InvalidRequest(f"payment {payment.id} is in {payment.amount.currency}, not {amount.currency}", payment=payment)

    def _safe(self, text: str | None) -> str:
        """Stripe's message without anything that looks like a secret key."""
        text = (text or "").replace(self._secret_key, "[redacted]")
        return _SECRET_LOOKING.sub("[redacted]", text)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SDK exceptions into ours (their cause is dropped: it may hold request details)."""
        try:
            yield
        except stripe.CardError as exc:
            raise self._card_error(exc, action) from None
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise ProviderUnavailable(self._describe(exc, action), provider_code=exc.code) from None
        except stripe.APIError as exc:
            # 409: another request with the same idempotency key is in flight; asking again later is right.
            if exc.http_status is None or exc.http_status >= 500 or exc.http_status == 409:
                raise ProviderUnavailable(self._describe(exc, action), provider_code=exc.code) from None
            raise ProviderError(self._describe(exc, action), provider_code=exc.code) from None
        except stripe.IdempotencyError as exc:
            # The key was used with other parameters: a bug of ours, and no verdict on the payment (the first
            # request's fate is unknown), so not InvalidRequest, which callers take as "refused, mark it failed".
            raise ProviderError(self._describe(exc, action), provider_code=exc.code or "idempotency_error") from None
        except stripe.InvalidRequestError as exc:
            raise InvalidRequest(self._describe(exc, action), provider_code=exc.code) from None
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            raise ProviderError(f"Stripe refused our API key on {action} (check STRIPE_SECRET_KEY)", provider_code=exc.code) from None
        except stripe.StripeError as exc:
            raise ProviderError(self._describe(exc, action), provider_code=exc.code) from None

    def _describe(self, exc: stripe.StripeError, action: str) -> str:
        parts = [f"Stripe {action} failed: {self._safe(exc.user_message) or type(exc).__name__}"]
        if exc.http_status:
            parts.append(f"HTTP {exc.http_status}")
        if exc.code:
            parts.append(f"code {exc.code}")
        if exc.request_id:
            parts.append(f"request {exc.request_id}")
        return "; ".join(parts)

    def _card_error(self, exc: stripe.CardError, action: str) -> ProviderError:
        error = _plain(exc.error) if exc.error is not None else {}
        pi = error.get("payment_intent") if isinstance(error, Mapping) else None
        payment = self._payment(pi) if isinstance(pi, Mapping) and pi.get("id") else None
        message = self._safe(exc.user_message) or "the card was declined"
        if exc.code == "authentication_required":
            return AuthenticationRequired(message, payment=payment, provider_code=exc.code)
        decline_code = error.get("decline_code") if isinstance(error, Mapping) else None
        return CardDeclined(message, reason=decline_code or exc.code, payment=payment, provider_code=exc.code)
