"""What we ask of a payment provider, in our own types.

The rest of the code never sees a provider SDK object or exception: a
provider returns these small frozen dataclasses and raises these errors.
Every call that creates or moves money takes an ``idempotency_key`` derived
from our own record and the action (for example ``topup:42:authorize``);
our own records still guarantee exactly-once when a provider ignores the key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from payments.money import Money


class PaymentStatus(enum.StrEnum):
    """Where a payment (a Stripe PaymentIntent) stands."""

    REQUIRES_PAYMENT_METHOD = "requires_payment_method"  # declined or not yet given a card
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"  # 3-D Secure in the browser
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"  # a hold: authorized, not captured
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class Card:
    """A saved card as people recognise it; no number, only brand and last four."""

    id: str  # provider payment method id (pm_...)
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    is_default: bool = False


@dataclass(frozen=True, slots=True)
class CardSetup:
    """A started card setup: the browser confirms it with ``client_secret``."""

    id: str  # seti_...
    client_secret: str


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment or hold as the provider sees it now."""

    id: str  # pi_...
    status: PaymentStatus
    amount: Money  # authorized or requested amount
    amount_captured: Money  # 0 until captured
    amount_refunded: Money
    client_secret: str | None = None
    payment_method_id: str | None = None
    card_brand: str | None = None
    card_last4: str | None = None
    charge_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_held(self) -> bool:
        """Authorized and waiting for capture or release."""
        return self.status == PaymentStatus.REQUIRES_CAPTURE


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund of part or all of a captured payment."""

    id: str
    payment_id: str
    amount: Money
    status: str  # succeeded, pending, failed


#: Provider balance transaction types → ours (anything else is an ``adjustment``: disputes, transfers, fees, ...).
BALANCE_TXN_TYPES = {"charge": "charge", "payment": "charge", "refund": "refund", "payment_refund": "refund", "payout": "payout"}


@dataclass(frozen=True, slots=True)
class BalanceTxn:
    """One movement of our balance at the provider (a Stripe balance transaction), amounts in minor units.

    ``type`` is ours: ``charge``, ``refund``, ``payout`` or ``adjustment`` (every
    other provider type, named in ``raw_type``). ``source`` is the provider id of
    what moved the money: ``pi_`` of a charge when known, else ``ch_``; ``re_``
    of a refund; ``po_`` of a payout. ``payment_id`` is the ``pi_`` the charge or
    refund belongs to, when the provider says. ``amount`` is signed (a refund is
    negative), ``fee`` is what the provider kept, ``net = amount − fee``.
    """

    id: str  # txn_...
    type: str
    source: str
    amount: int
    fee: int
    net: int
    currency: str  # ISO 4217, upper case
    created: int  # Unix time (UTC)
    payment_id: str | None = None
    raw_type: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event: what happened to which payment."""

    id: str
    type: str  # e.g. payment_intent.succeeded
    created: int
    payment: Payment | None = None
    refund: Refund | None = None


@dataclass(frozen=True, slots=True)
class TransferResult:
    """Money moved from our provider balance to a party's connected account (Stripe Connect ``tr_...``)."""

    id: str  # tr_...
    destination: str  # acct_...
    amount: Money
    reversed: bool = False


class ProviderError(Exception):
    """Base of every provider failure; ``code`` is ours and stable, ``message`` is safe to log."""

    code = "provider_error"

    def __init__(self, message: str, *, payment: Payment | None = None, provider_code: str | None = None):
        super().__init__(message)
        self.message = message
        self.payment = payment
        self.provider_code = provider_code


class CardDeclined(ProviderError):
    """The bank said no; ``reason`` is the decline code when the provider gives one."""

    code = "card_declined"

    def __init__(self, message: str, *, reason: str | None = None, **kw):
        super().__init__(message, **kw)
        self.reason = reason or "generic_decline"


class AuthenticationRequired(ProviderError):
    """3-D Secure is needed: the customer must confirm in the browser (``payment.client_secret``)."""

    code = "authentication_required"


class ProviderUnavailable(ProviderError):
    """The provider did not answer or answered with a server error; the call may be retried."""

    code = "provider_unavailable"


class InvalidRequest(ProviderError):
    """We asked for something the provider refuses (bad amount, unknown id, wrong state)."""

    code = "invalid_request"


class SignatureError(ProviderError):
    """A webhook whose signature does not verify."""

    code = "bad_signature"


class PaymentProvider(Protocol):
    """The calls Voltpay makes to a card payment provider."""

    publishable_key: str

    def ensure_customer(self, *, email: str, existing_id: str | None, idempotency_key: str) -> str:
        """Return the provider customer id for this person, creating one when ``existing_id`` is None."""

    def start_card_setup(self, *, customer_id: str, idempotency_key: str) -> CardSetup:
        """Start saving a card (a SetupIntent); the browser confirms it with the card element."""

    def finish_card_setup(self, *, setup_id: str, customer_id: str) -> Card:
        """After the browser confirmed the setup: make sure the card is attached to the customer and return it."""

    def list_cards(self, *, customer_id: str) -> list[Card]:
        """The customer's saved cards, the default first."""

    def set_default_card(self, *, customer_id: str, payment_method_id: str) -> None:
        """Make this card the one used when none is chosen."""

    def remove_card(self, *, customer_id: str, payment_method_id: str) -> None:
        """Detach a saved card; raise InvalidRequest if it is not this customer's."""

    def card_of(self, *, payment_method_id: str) -> Card:
        """Brand, last four and expiry of a payment method (for a guest's card)."""

    def authorize(
        self, *, amount: Money, payment_method_id: str, customer_id: str | None, idempotency_key: str,
        off_session: bool = False, metadata: dict[str, str] | None = None, description: str | None = None,
    ) -> Payment:
        """Place a hold (manual capture). Returns status REQUIRES_CAPTURE, or REQUIRES_ACTION for 3-D Secure;
        raises CardDeclined, AuthenticationRequired (off-session), ProviderUnavailable or InvalidRequest.
        ``description`` is what support sees in the provider's dashboard (no personal data)."""

    def charge(
        self, *, amount: Money, payment_method_id: str, customer_id: str | None, idempotency_key: str,
        off_session: bool = False, metadata: dict[str, str] | None = None, description: str | None = None,
    ) -> Payment:
        """Take a payment now (automatic capture). Returns SUCCEEDED or REQUIRES_ACTION; raises as authorize."""

    def capture(self, *, payment_id: str, amount: Money, idempotency_key: str) -> Payment:
        """Capture ``amount`` (≤ the hold) of a held payment; the rest of the hold is released."""

    def release(self, *, payment_id: str, idempotency_key: str) -> Payment:
        """Cancel a hold that will not be captured (status CANCELED)."""

    def refund(self, *, payment_id: str, amount: Money, idempotency_key: str, reason: str | None = None) -> Refund:
        """Refund ``amount`` of a captured payment (we check it does not exceed what is left to refund)."""

    def retrieve(self, *, payment_id: str) -> Payment:
        """The payment as the provider sees it now."""

    def parse_webhook(self, *, payload: bytes, signature: str | None) -> WebhookEvent:
        """Verify the signature of a webhook delivery and return the event; raise SignatureError if it fails."""

    def transfer(self, *, destination: str, amount: Money, idempotency_key: str, description: str | None = None) -> TransferResult:
        """Pay ``amount`` (> 0) from our balance to the connected account ``destination`` (``acct_...``), once per key.
        Raises InvalidRequest when refused (unknown account, bad amount): the payout will not happen; ProviderUnavailable
        when it may be retried with the same key."""

    def balance_transactions(self, *, created_from: int, created_to: int) -> list[BalanceTxn]:
        """Every balance transaction created in ``[created_from, created_to)`` (Unix seconds), all pages, oldest first."""

    def charge_payment_id(self, *, charge_id: str) -> str | None:
        """The payment (``pi_``) a charge (``ch_``) belongs to; None when it belongs to none. For imported exports."""
