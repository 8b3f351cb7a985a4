"""The card-payment flow the wallet, meter top-up, bill and charging pages share.

One flow, four pages: the person picks a saved card (or saves a new one with
``static/js/cardflow.js`` first), the view records the payment and commits
before the provider hears of it (see ``payments/cards.py``), sends it, and
redirects to a result page; there 3-D Secure runs in the browser with the
PaymentIntent's client secret, and "confirm" asks the provider for the answer.

What differs between the pages (wording, where an error shows, the logger a
line goes to) stays with the page: callers pass their logger so every log
line keeps its logger's name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from babel.numbers import format_decimal
from flask import Response, abort, current_app, flash, redirect, request
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from sqlalchemy.orm import Session

from payments import cards, wallet
from payments.cards import CardPayment, State
from payments.money import Money, exponent
from payments.money import format as format_money
from payments.providers.base import Card, InvalidRequest, PaymentProvider, PaymentStatus, ProviderError
from webapp.db import db_session
from webapp.errors import problem_response

# Why the saved cards are missing from a form: where a new card is the only other way, and where the wallet is one too.
CARDS_NOT_LOADED = _l("We cannot load your saved cards right now. Please try again in a minute.")
CARDS_NOT_LOADED_OTHER_WAYS = _l("We cannot load your saved cards right now. You can still pay with a new card or your wallet.")

EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")


def payment_provider() -> PaymentProvider | None:
    """The configured payment provider, or None when card payments are off."""
    return current_app.extensions.get("payment_provider")


def card_entry_context(provider: PaymentProvider | None) -> dict:
    """What the card element and 3-D Secure need in the page (data-* attributes read by static/js/cardflow.js)."""
    return {"stripe_js_url": current_app.config.get("STRIPE_JS_URL", ""), "publishable_key": provider.publishable_key if provider else ""}


def _locale() -> str:
    return str(get_locale() or "en")


def major_units_text(money: Money) -> str:
    """``money`` as a person would type it in this language ("12.50", "12,50"), without symbol or grouping."""
    digits = exponent(money.currency)
    return format_decimal(money.to_decimal(), format="0." + "0" * digits if digits else "0", locale=_locale())


def amount_message(code: str, params: dict, example_currency: str) -> str:
    """The message next to a top-up's amount field for a MoneyError or top-up error ``code`` (the caller words currency errors)."""
    if code == "empty":
        return _("Choose an amount or enter one.")
    if code == "negative":
        return _("The amount cannot be negative.")
    if code == "too_many_decimals":
        return _("Use at most %(decimals)s decimals.", decimals=params.get("decimals", 2))
    if code == "not_a_number":
        return _("Enter the amount as a number, for example %(example)s.", example=major_units_text(Money(1250, example_currency)))
    if code == "amount_out_of_range":
        return _("Top-ups are between %(minimum)s and %(maximum)s.", minimum=format_money(params["minimum"], _locale()),
                 maximum=format_money(params["maximum"], _locale()))
    if code == "not_a_preset":
        return _("Choose one of the amounts shown, or enter another amount.")
    return _("Enter a valid amount.")


def email_problem(email: str, missing: str) -> str | None:
    """Why a guest's email cannot be used (``missing`` when there is none), or None."""
    if not email:
        return missing
    if len(email) > 254 or not EMAIL_RE.fullmatch(email):
        return _("Enter an email address like name@example.com.")
    return None


def failure_message(code: str | None) -> str:
    """Why a card payment failed, in words a person can act on."""
    if code == "payment_intent_authentication_failure":
        return _("The security check with your bank (3-D Secure) was not completed. Try again, or use another card.")
    if code == "not_submitted":
        return _("We could not reach our card processor, so this top-up was cancelled and your card was not charged. Please try again.")
    if code == "invalid_request":
        return _("This card cannot be used for this payment. Try another card.")
    if code == "expired_card":
        return _("Your card has expired. Try another card.")
    if code in ("insufficient_funds", "card_velocity_exceeded"):
        return _("Your card was declined for insufficient funds. Try another card.")
    return _("Your card was declined. Try another card, or contact your bank.")


# -- choosing a card -------------------------------------------------------------------------------


@dataclass
class SavedCards:
    """An account's saved cards (default first), its provider customer id, and why the cards could not be loaded."""

    cards: list[Card] = field(default_factory=list)
    customer_id: str | None = None
    notice: str | None = None

    @property
    def ids(self) -> set[str]:
        """The payment method ids of the cards."""
        return {c.id for c in self.cards}


def saved_cards(provider: PaymentProvider | None, owner: str | None, log: logging.Logger, notice=CARDS_NOT_LOADED) -> SavedCards:
    """The saved cards of ``owner`` (None: a guest, who has none); ``notice`` when the provider did not list them."""
    if provider is None or owner is None:
        return SavedCards()
    customer_id = wallet.known_customer_id(db_session(), owner)
    if customer_id is None:
        return SavedCards()
    try:
        return SavedCards(provider.list_cards(customer_id=customer_id), customer_id)
    except ProviderError:
        log.warning("could not list cards", exc_info=True)
        return SavedCards([], customer_id, str(notice))


def preselected(choice: str, new_payment_method_id: str, saved: SavedCards, fallback: str, others: tuple[str, ...] = ("new",)) -> str:
    """The way to pay a form shows chosen: the card typed before an error (saved now: no retyping), the one sent, else ``fallback``."""
    if choice == "new" and new_payment_method_id in saved.ids:
        return new_payment_method_id
    if not choice or (choice not in others and choice not in saved.ids):
        return fallback
    return choice


class CardChoiceError(Exception):
    """The chosen card cannot be charged: ``status`` 400 (the person chooses again) or 503 (the saved cards could not be loaded)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def choose_saved_card(provider: PaymentProvider, owner: str, chosen: str, log: logging.Logger) -> tuple[Card, str | None]:
    """The chosen card, one of ``owner``'s saved cards, and their customer id; else CardChoiceError saying why not."""
    if not chosen:
        raise CardChoiceError(400, _("Choose a card, or enter a new one."))
    saved = saved_cards(provider, owner, log)
    if saved.notice:
        raise CardChoiceError(503, _("We cannot reach our card processor right now, so nothing was charged. Please try again in a few minutes."))
    card = next((c for c in saved.cards if c.id == chosen), None)
    if card is None:
        raise CardChoiceError(400, _("That card is not one of your saved cards. Choose another card."))
    return card, saved.customer_id


# -- paying, 3-D Secure, confirming ----------------------------------------------------------------


def submit(s: Session, provider: PaymentProvider, row: CardPayment, log: logging.Logger, not_completed: str) -> None:
    """Send a recorded (and committed) card payment to the provider and commit what it answered."""
    try:
        cards.submit(s, provider, row)
    except ProviderError as e:
        # Declined and refused attempts are recorded as failed; an unanswered one stays for the reconciliation job.
        log.info(not_completed, extra={"card_payment": row.id, "reason": e.code})
    s.commit()


def pending_action(provider: PaymentProvider | None, row: CardPayment) -> tuple[str | None, str | None]:
    """While the bank asks the payer to confirm (3-D Secure): the PaymentIntent's client secret, or a notice that the provider did not answer."""
    if row.state != State.REQUIRES_ACTION or provider is None or not row.provider_payment_id:
        return None, None
    try:
        current = provider.retrieve(payment_id=row.provider_payment_id)
    except ProviderError:
        return None, _("We cannot reach our card processor right now. Please check again in a minute.")
    return (current.client_secret if current.status == PaymentStatus.REQUIRES_ACTION else None), None


def result_context(row: CardPayment) -> dict:
    """What a card payment's result page shows of the payment: its state, why it failed, and what 3-D Secure needs."""
    provider = payment_provider()
    client_secret, notice = pending_action(provider, row)
    return {
        "row": row,
        "state": row.state.value,
        "failure": failure_message(row.failure_code) if row.state == State.FAILED else None,
        "client_secret": client_secret,
        "notice": notice,
        **card_entry_context(provider),
    }


def confirm(row: CardPayment, result_url: str) -> Response:
    """After 3-D Secure in the browser (or "check again"): ask the provider, record the answer, and go back to the result page."""
    provider = payment_provider()
    if provider is None:
        abort(503)
    s = db_session()
    row = cards.lock(s, row.id)  # the webhook or the job may be recording the same answer right now
    try:
        cards.refresh(s, provider, row)
    except ProviderError:
        s.rollback()
        flash(_("We cannot reach our card processor right now. Please check again in a minute."), "warning")
    else:
        s.commit()
    return redirect(result_url)


# -- saving a card (JSON for cardflow.js) ----------------------------------------------------------


def payments_unavailable() -> Response:
    """problem+json: card payments are off."""
    return problem_response(503, "payments_unavailable", _("Card payments are not available right now."))


def invalid_setup() -> Response:
    """problem+json: the card setup the browser sent cannot be used."""
    return problem_response(400, "invalid_setup", _("Your card could not be saved. Please enter it again."))


def posted_setup_id() -> str | None:
    """The ``setup_id`` of the posted JSON when it looks like a SetupIntent's, else None."""
    body = request.get_json(silent=True)
    setup_id = body.get("setup_id") if isinstance(body, dict) else None
    if not isinstance(setup_id, str) or not setup_id.startswith("seti_") or len(setup_id) > 255:
        return None
    return setup_id


def finish_card_setup(provider: PaymentProvider, setup_id: str, customer_id: str, log: logging.Logger, log_line: str,
                      unavailable: str) -> Card | Response:
    """The card saved by the SetupIntent the browser confirmed, or the problem+json to answer (``unavailable``: the provider did not)."""
    try:
        return provider.finish_card_setup(setup_id=setup_id, customer_id=customer_id)
    except InvalidRequest:
        return invalid_setup()
    except ProviderError:
        log.warning(log_line, exc_info=True)
        return problem_response(503, "provider_unavailable", unavailable)
