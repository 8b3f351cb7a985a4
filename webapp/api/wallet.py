"""JSON API for the wallet and saved cards: balance, card top-ups (3-D Secure included), statement, payment methods.

Views stay thin: validate, call ``payments.wallet`` / ``payments.cards`` with
the request's session and the provider, commit, answer JSON. Money is always
``{"amount": <int minor units>, "currency": "EUR"}``; errors are problem+json
with a stable ``code`` and a translated ``detail``.

A card top-up is written and committed before the provider is asked (see
``payments.cards``), then sent with an idempotency key derived from our
record. From that commit on the request has an effect: with an
``Idempotency-Key`` header its answer is kept and replayed whatever it is
(``effect_started``), so even a retried 503 never charges twice; the top-up
named in the answer (``top_up_id``) is settled later by the reconciliation
job, and ``GET /wallet/top-ups/{id}`` shows where it stands.

Provider calls are made outside any open database transaction of the
request: a card network round trip must not hold the SQLite write lock or
leave a PostgreSQL connection idle in a transaction.

Another customer's top-up or card is answered 404, never 403: ids of other
people's things are not confirmed to exist.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app, g, jsonify, request
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.routing import BaseConverter

from payments import cards
from payments import money as money_mod
from payments import wallet
from payments.cards import CardPayment, Purpose, State
from payments.ledger import AccountKind, LedgerAccount, statement
from payments.money import Money, MoneyError
from payments.providers.base import Card, CardDeclined, InvalidRequest, Payment, PaymentProvider, ProviderError, ProviderUnavailable
from webapp.api import bp, invalid, is_text, json_body, no_content, token_required
from webapp.api.idempotency import effect_started, idempotent
from webapp.db import db_session
from webapp.errors import Problem

# Used with fullmatch (a "$" would also match before a trailing newline); the OpenAPI document says the same.
PAYMENT_METHOD_ID = re.compile(r"pm_[A-Za-z0-9_]{1,252}")
SETUP_ID = re.compile(r"seti_[A-Za-z0-9_]{1,250}")
CURRENCY = re.compile(r"[A-Z]{3}")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_ID = 2147483647  # the database integer range: larger ids cannot exist

# What the ledger writes (English, stored) and what a person reads (translated at display).
DESCRIPTIONS = {
    "Wallet top-up": _l("Wallet top-up"),
    "Top-up refund": _l("Top-up refund"),
    "Top-up refunded": _l("Top-up refunded"),
    "Top-up refund failed": _l("Top-up refund failed"),
    "Reserved for charging": _l("Reserved for charging"),
    "Charging paid from wallet": _l("Charging paid from wallet"),
    "Reservation released": _l("Reservation released"),
}


class PaymentMethodIdConverter(BaseConverter):
    """``pm_...`` path segments only: anything else is no card (404), and ``/payment-methods/setup`` stays its own route."""

    regex = PAYMENT_METHOD_ID.pattern


# Registered before the routes below are added to the app's URL map (deferred functions run in order).
bp.record_once(lambda state: state.app.url_map.converters.setdefault("payment_method", PaymentMethodIdConverter))

# Setup statuses that mean "not finished yet" (the client has not confirmed, or 3-D Secure is pending).
UNFINISHED_SETUP = {"requires_payment_method", "requires_confirmation", "requires_action", "processing", "canceled"}


# --- helpers ------------------------------------------------------------------------------------


def _scope() -> str:
    return f"user:{g.api_user.id}"


def _provider() -> PaymentProvider:
    provider = current_app.extensions.get("payment_provider")
    if provider is None:
        raise Problem(503, "payments_unavailable", _("Card payments are not available at the moment."))
    return provider


def _fmt(m: Money) -> str:
    return money_mod.format(m, str(get_locale() or "en"))


def _not_found() -> Problem:
    return Problem(404, "not_found", _("We could not find that."))


def _unavailable(**extra) -> Problem:
    return Problem(503, "provider_unavailable", _("The card payment service did not answer. Please try again in a minute."), extra=extra)


@contextmanager
def _calling_provider(**extra) -> Iterator[None]:
    """Provider outages as problems: 503 when it did not answer, 502 when it refused to work.

    ``CardDeclined`` and ``InvalidRequest`` pass through: what they mean depends on the call.
    """
    try:
        yield
    except (CardDeclined, InvalidRequest):
        raise
    except ProviderUnavailable:
        raise _unavailable(**extra) from None
    except ProviderError:
        raise Problem(502, "provider_error", _("The card payment service could not do this. Please try again later."), extra=extra) from None


def _end_transaction() -> None:
    """Close the request's read transaction before talking to the provider (no lock held over the network)."""
    s = db_session()
    if s.in_transaction():
        s.commit()


def _find_account(kind: AccountKind, owner: str, currency: str) -> LedgerAccount | None:
    """An account if it exists (reads never create one)."""
    return db_session().scalar(
        select(LedgerAccount).where(LedgerAccount.kind == kind, LedgerAccount.owner == owner, LedgerAccount.currency == currency)
    )


def _shown(kind: AccountKind, owner: str, currency: str) -> Money:
    acct = _find_account(kind, owner, currency)
    return Money(-acct.balance_minor if acct is not None else 0, currency)  # both kinds are guarded, credit-normal


def card_json(card: Card) -> dict:
    """A saved card as the API shows it."""
    return {"id": card.id, "brand": card.brand, "last4": card.last4, "exp_month": card.exp_month, "exp_year": card.exp_year, "is_default": card.is_default}


def top_up_json(row: CardPayment, client_secret: str | None = None) -> dict:
    """A top-up as the API shows it; the client secret only while 3-D Secure is pending."""
    out = {
        "id": row.id,
        "state": row.state.value,
        "amount": row.amount.as_json(),
        "card": {"brand": row.card_brand, "last4": row.card_last4} if row.card_brand or row.card_last4 else None,
        "created_at": row.created_at.isoformat(),
    }
    if row.state == State.REQUIRES_ACTION and client_secret:
        out["client_secret"] = client_secret
    if row.state == State.FAILED:
        out["failure_code"] = row.failure_code or "payment_failed"
    return out


def _retrieve(provider: PaymentProvider, row: CardPayment) -> Payment:
    """Where the provider says the card payment stands (a payment it does not know is its error: 502)."""
    with _calling_provider(top_up_id=row.id):
        try:
            return provider.retrieve(payment_id=row.provider_payment_id)
        except InvalidRequest:
            raise ProviderError("the provider does not know this payment") from None


def _client_secret(provider: PaymentProvider, row: CardPayment, *, required: bool) -> str | None:
    """The secret the client needs for 3-D Secure (asked from the provider: we do not store it).

    When the provider does not answer: 503 if ``required``, else None (the
    client gets it later from ``GET /wallet/top-ups/{id}``).
    """
    if row.state != State.REQUIRES_ACTION or row.provider_payment_id is None:
        return None
    try:
        return _retrieve(provider, row).client_secret
    except Problem:
        if required:
            raise
        return None


def _pending_client_secret(row: CardPayment) -> str | None:
    """While 3-D Secure is pending, the client secret (503 when the provider does not answer); else None."""
    if row.state != State.REQUIRES_ACTION:
        return None
    _end_transaction()
    return _client_secret(_provider(), row, required=True)


def _saved_card(provider: PaymentProvider, payment_method_id: str) -> Card:
    """One of the signed-in person's saved cards, else a 422 problem."""
    card = next((c for c in _customer_cards(provider) if c.id == payment_method_id), None)
    if card is None:
        raise Problem(422, "unknown_payment_method", _("That card is not one of your saved cards. Add it first, or choose another."))
    return card


def _out_of_range(params: dict) -> Problem:
    """422: a top-up amount outside the limits, which the problem carries."""
    lo, hi = params["minimum"], params["maximum"]
    return Problem(
        422, "amount_out_of_range", _("A top-up must be between %(minimum)s and %(maximum)s.", minimum=_fmt(lo), maximum=_fmt(hi)),
        extra={"minimum": lo.as_json(), "maximum": hi.as_json()},
    )


def _submit(s: Session, provider: PaymentProvider, row: CardPayment) -> None:
    """Charge a recorded and committed card top-up; a decline, refusal or outage is a problem naming the top-up."""
    effect_started()  # from here on, a retry with the same key must see this answer, never a second payment
    try:
        cards.submit(s, provider, row)
    except CardDeclined as e:
        s.commit()
        raise Problem(402, "card_declined", _("Your card was declined. Try another card or contact your bank."),
                      extra={"decline_reason": e.reason, "top_up_id": row.id}) from None
    except ProviderUnavailable:
        s.commit()
        raise _unavailable(top_up_id=row.id) from None
    except InvalidRequest:
        s.commit()  # the record is failed: the provider refused the payment itself
        raise Problem(402, "payment_failed", _("The payment could not be made with this card. Try another card."), extra={"top_up_id": row.id}) from None
    except ProviderError:
        s.commit()  # left for the reconciliation job
        raise Problem(502, "provider_error", _("The card payment service could not take the payment. Please try again later."),
                      extra={"top_up_id": row.id}) from None
    s.commit()


def _confirm(provider: PaymentProvider, row: CardPayment) -> tuple[CardPayment, str | None]:
    """After 3-D Secure in the client: record where the provider says the payment stands (once); the row and its client secret."""
    _end_transaction()
    current = _retrieve(provider, row)
    s = db_session()
    row = cards.lock(s, row.id)  # the webhook may report the same payment at the same moment
    cards.apply(s, row, current)
    s.commit()
    return row, current.client_secret


def _own_top_up(top_up_id: int) -> CardPayment:
    row = db_session().scalar(
        select(CardPayment).where(CardPayment.id == top_up_id, CardPayment.purpose == Purpose.WALLET_TOP_UP, CardPayment.owner == g.api_user.owner)
    )
    if row is None:
        raise _not_found()
    return row


def _money_field(value: object) -> tuple[Money | None, str | None]:
    """``{"amount", "currency"}`` read strictly (integer minor units, upper-case ISO 4217), or an error message."""
    shape = _("Send the amount as {\"amount\": <integer in minor units>, \"currency\": \"<ISO 4217 code>\"}.")
    if not isinstance(value, dict) or set(value) != {"amount", "currency"}:
        return None, shape
    amount, currency = value["amount"], value["currency"]
    if isinstance(amount, bool) or not isinstance(amount, int):
        return None, _("The amount must be a whole number of minor units (cents), not a decimal.")
    if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
        return None, _("The currency must be a three-letter ISO 4217 code in capitals, such as EUR.")
    try:
        return Money(amount, currency), None
    except MoneyError:
        return None, _("%(currency)s is not a currency we know.", currency=currency)


def _customer_cards(provider: PaymentProvider) -> list[Card]:
    """The signed-in person's saved cards (none without a provider customer; no customer is created here)."""
    cid = wallet.known_customer_id(db_session(), g.api_user.owner)
    _end_transaction()
    if cid is None:
        return []
    with _calling_provider():
        try:
            return provider.list_cards(customer_id=cid)
        except InvalidRequest:  # the customer was deleted at the provider: no cards
            return []


# --- wallet -------------------------------------------------------------------------------------


@bp.route("/wallet", methods=["GET"])
@token_required
def get_wallet():
    """Balance, money reserved for charging sessions, and what a top-up may be."""
    user = g.api_user
    currency = user.currency
    lo, hi, presets = wallet.limits_for(currency).money(currency)
    return jsonify(
        balance=_shown(AccountKind.CUSTOMER_WALLET, user.owner, currency).as_json(),
        held=_shown(AccountKind.WALLET_HOLD, user.owner, currency).as_json(),
        currency=currency,
        top_up={"minimum": lo.as_json(), "maximum": hi.as_json(), "presets": [p.as_json() for p in presets]},
    )


@bp.route("/wallet/top-ups", methods=["POST"])
@token_required
@idempotent(_scope)
def create_top_up():
    """Top up the wallet with one of the person's saved cards (201; 3-D Secure: state ``requires_action``)."""
    provider = _provider()
    body = json_body()
    errors: dict[str, str] = {}
    amount, error = _money_field(body.get("amount"))
    if error:
        errors["amount"] = error
    pm_id = body.get("payment_method_id")
    if not isinstance(pm_id, str) or not is_text(pm_id) or not PAYMENT_METHOD_ID.fullmatch(pm_id):
        errors["payment_method_id"] = _("Send the id of one of your saved cards (pm_...).")
    if errors:
        raise invalid(errors)
    assert amount is not None
    user = g.api_user
    try:
        wallet.check_top_up_amount(amount, user.currency)
    except wallet.TopUpError as e:
        if e.code == "wrong_currency":
            raise Problem(422, "wrong_currency", _("Your wallet is in %(currency)s: top up in %(currency)s.", currency=user.currency),
                          extra={"currency": user.currency}) from None
        raise _out_of_range(e.params) from None
    card = _saved_card(provider, pm_id)

    s = db_session()
    row = wallet.start_top_up(
        s, provider, owner=user.owner, email=user.email, amount=amount, payment_method_id=card.id, currency=user.currency,
    )
    row.card_brand, row.card_last4 = card.brand, card.last4
    s.commit()
    _submit(s, provider, row)
    resp = jsonify(top_up_json(row, _client_secret(provider, row, required=False)))
    resp.status_code = 201
    return resp


@bp.route(f"/wallet/top-ups/<int(max={MAX_ID}):top_up_id>", methods=["GET"])
@token_required
def get_top_up(top_up_id: int):
    """One of the person's top-ups (another person's: 404)."""
    row = _own_top_up(top_up_id)
    return jsonify(top_up_json(row, _pending_client_secret(row)))


@bp.route(f"/wallet/top-ups/<int(max={MAX_ID}):top_up_id>/confirm", methods=["POST"])
@token_required
def confirm_top_up(top_up_id: int):
    """After 3-D Secure in the client: ask the provider where the payment stands and book it (once)."""
    provider = _provider()
    row = _own_top_up(top_up_id)
    if row.provider_payment_id is None or row.state in cards.FINAL:
        return jsonify(top_up_json(row))
    row, client_secret = _confirm(provider, row)
    return jsonify(top_up_json(row, client_secret))


@bp.route("/wallet/transactions", methods=["GET"])
@token_required
def wallet_transactions():
    """The wallet's movements, newest first, with the balance after each; page with ``before=next_before``."""
    errors: dict[str, str] = {}
    limit = _int_arg("limit", 1, MAX_LIMIT, errors, default=DEFAULT_LIMIT)
    before = _int_arg("before", 1, MAX_ID, errors)
    if errors:
        raise invalid(errors)
    user = g.api_user
    acct = _find_account(AccountKind.CUSTOMER_WALLET, user.owner, user.currency)
    rows = statement(db_session(), acct, limit=limit + 1, before_entry_id=before) if acct is not None else []
    more = len(rows) > limit
    rows = rows[:limit]
    data = [
        {
            "entry_id": r["entry_id"],
            "created_at": r["created_at"].isoformat(),
            "description": str(DESCRIPTIONS.get(r["description"], r["description"])),
            "amount": r["amount"].as_json(),
            "balance_after": r["balance_after"].as_json(),
        }
        for r in rows
    ]
    return jsonify(data=data, next_before=rows[-1]["entry_id"] if more else None)


def _int_arg(name: str, lo: int, hi: int, errors: dict[str, str], default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,10}", raw) or not lo <= int(raw) <= hi:
        errors[name] = _("Send a whole number from %(minimum)s to %(maximum)s.", minimum=lo, maximum=hi)
        return default
    return int(raw)


# --- payment methods ----------------------------------------------------------------------------


@bp.route("/payment-methods", methods=["GET"])
@token_required
def list_payment_methods():
    """The person's saved cards, the default first."""
    return jsonify(data=[card_json(c) for c in _customer_cards(_provider())])


@bp.route("/payment-methods/setup", methods=["POST"])
@token_required
def start_payment_method_setup():
    """Start saving a card: the client confirms ``client_secret`` with stripe.js or the mobile SDK, then POSTs ``setup_id``."""
    provider = _provider()
    user = g.api_user
    s = db_session()
    with _calling_provider():
        try:
            cid = wallet.customer_id(s, provider, owner=user.owner, email=user.email)
            s.commit()
            setup = provider.start_card_setup(customer_id=cid, idempotency_key=f"card_setup:{user.owner}:{secrets.token_hex(12)}")
        except InvalidRequest:
            raise ProviderError("the provider refused to start a card setup") from None
    resp = jsonify(setup_id=setup.id, client_secret=setup.client_secret, publishable_key=provider.publishable_key)
    resp.status_code = 201
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/payment-methods", methods=["POST"])
@token_required
def add_payment_method():
    """Save the card of a setup the client has confirmed (201 with the card)."""
    provider = _provider()
    body = json_body()
    setup_id = body.get("setup_id")
    if not isinstance(setup_id, str) or not is_text(setup_id) or not SETUP_ID.fullmatch(setup_id):
        raise invalid({"setup_id": _("Send the setup_id you received from POST /payment-methods/setup (seti_...).")})
    cid = wallet.known_customer_id(db_session(), g.api_user.owner)
    _end_transaction()
    if cid is None:
        raise Problem(404, "setup_not_found", _("We could not find that card setup. Start a new one."))
    try:
        with _calling_provider():
            card = provider.finish_card_setup(setup_id=setup_id, customer_id=cid)
    except CardDeclined as e:
        raise Problem(402, "card_declined", _("Your card was declined. Try another card or contact your bank."), extra={"decline_reason": e.reason}) from None
    except InvalidRequest as e:
        if e.provider_code in UNFINISHED_SETUP:
            raise Problem(409, "setup_incomplete", _("The card has not been confirmed yet. Finish the card check, then try again.")) from None
        raise Problem(404, "setup_not_found", _("We could not find that card setup. Start a new one.")) from None
    resp = jsonify(card_json(card))
    resp.status_code = 201
    return resp


def _own_customer() -> str:
    """The person's provider customer id, the transaction ended before a provider call; none yet → 404."""
    cid = wallet.known_customer_id(db_session(), g.api_user.owner)
    _end_transaction()
    if cid is None:
        raise _not_found()
    return cid


@bp.route("/payment-methods/<payment_method:payment_method_id>/default", methods=["POST"])
@token_required
def make_default_payment_method(payment_method_id: str):
    """Make one of the person's cards the default (another person's card: 404)."""
    provider = _provider()
    cid = _own_customer()
    try:
        with _calling_provider():
            provider.set_default_card(customer_id=cid, payment_method_id=payment_method_id)
            cards_now = provider.list_cards(customer_id=cid)
    except InvalidRequest:
        raise _not_found() from None
    card = next((c for c in cards_now if c.id == payment_method_id), None)
    if card is None:
        raise _not_found()
    return jsonify(card_json(card))


@bp.route("/payment-methods/<payment_method:payment_method_id>", methods=["DELETE"])
@token_required
def remove_payment_method(payment_method_id: str):
    """Remove one of the person's saved cards (204; another person's card: 404)."""
    provider = _provider()
    cid = _own_customer()
    try:
        with _calling_provider():
            provider.remove_card(customer_id=cid, payment_method_id=payment_method_id)
    except InvalidRequest:
        raise _not_found() from None
    return no_content()
