"""Wallet views: thin, they validate, call ``payments`` with the session and the provider, commit, redirect or render."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from flask import abort, flash, jsonify, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required

from payments import ledger, wallet
from payments.cards import CardPayment, Purpose
from payments.money import Money, MoneyError, check_currency
from payments.money import format as format_money
from payments.money import parse as parse_money
from payments.providers.base import Card, InvalidRequest, PaymentProvider, ProviderError, ProviderUnavailable
from webapp import cardflow
from webapp.db import db_session
from webapp.errors import problem_response
from webapp.extensions import limiter
from webapp.wallet import bp

log = logging.getLogger("voltpay.wallet")

HISTORY_PAGE = 20
CARD_SETUP_LIMIT = "30 per hour"  # card-testing fraud tries many cards quickly; a person adds a few
TOP_UP_LIMIT = "30 per hour"

# The ledger stores English descriptions (payments/wallet.py); people read them in their language.
ENTRY_LABELS = {
    "Wallet top-up": _l("Wallet top-up"),
    "Top-up refund": _l("Top-up refunded to your card"),
    "Top-up refund failed": _l("Refund to your card failed: money back in the wallet"),
    "Top-up refunded": _l("Top-up refunded"),
    "Reserved for charging": _l("Reserved for charging"),
    "Charging paid from wallet": _l("Charging paid from wallet"),
    "Reservation released": _l("Reservation released"),
    "Meter top-up from wallet": _l("Electricity meter topped up"),
    "Bill paid from wallet": _l("Electricity bill paid"),
    "Bill overpayment to wallet": _l("Electricity bill: overpayment returned"),
    "Charging refunded": _l("Charging refunded"),
}


# -- helpers ---------------------------------------------------------------------------------------


def _locale() -> str:
    return str(get_locale() or "en")


@bp.app_template_filter("money")
def money_filter(money: Money) -> str:
    """``{{ amount|money }}``: an amount formatted for the page's language."""
    return format_money(money, _locale())


def _entry_label(description: str) -> str:
    label = ENTRY_LABELS.get(description)
    return str(label) if label is not None else description


def amount_message(code: str, params: dict) -> str:
    """The message shown next to the amount field for a MoneyError or TopUpError ``code``."""
    if code == "unknown_currency":
        return _("This currency is not supported.")
    if code in ("wrong_currency", "currency_mismatch"):
        return _("Your wallet is in %(currency)s. Reload the page and top up in %(currency)s.", currency=current_user.currency)
    return cardflow.amount_message(code, params, "EUR")


def _saved_cards(provider: PaymentProvider | None) -> cardflow.SavedCards:
    """The signed-in person's saved cards (default first) and, when they could not be loaded, why."""
    return cardflow.saved_cards(provider, current_user.owner, log)


def _own_top_up(payment_id: int) -> CardPayment:
    """The signed-in person's top-up, or 404 (someone else's is not found either)."""
    row = db_session().get(CardPayment, payment_id)
    if row is None or row.owner != current_user.owner or row.purpose != Purpose.WALLET_TOP_UP:
        abort(404)
    return row


# -- wallet and top-ups ----------------------------------------------------------------------------


@dataclass
class TopUpForm:
    """What the top-up form holds: a preset (minor units) or "other" with a typed amount, and a card."""

    preset: str = ""
    amount: str = ""
    payment_method: str = ""
    new_payment_method_id: str = ""
    currency: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    not_card: str | None = None  # after a failure, do not preselect the card that failed

    @classmethod
    def from_request(cls) -> TopUpForm:
        """The posted form, each value cut to a sane length."""
        f = request.form
        return cls(
            preset=f.get("preset", "")[:20], amount=f.get("amount", "")[:40], payment_method=f.get("payment_method", "")[:255],
            new_payment_method_id=f.get("new_payment_method_id", "")[:255], currency=f.get("currency", "")[:8],
        )

    def read_amount(self, wallet_currency: str, presets: list[Money]) -> Money | None:
        """The chosen amount, checked against the wallet's currency and limits; None with ``errors["amount"]`` set."""
        try:
            currency = check_currency(self.currency or wallet_currency)
            if currency != wallet_currency:  # a page from before the wallet's currency changed, or a forged form
                raise wallet.TopUpError(f"the wallet is in {wallet_currency}", "wrong_currency", currency=wallet_currency)
            if self.preset and self.preset != "other":
                chosen = next((p for p in presets if str(p.amount) == self.preset), None)
                if chosen is None:
                    raise MoneyError("not one of the presets", "not_a_preset")
                amount = chosen
            else:
                amount = parse_money(self.amount, currency, _locale())
            wallet.check_top_up_amount(amount, wallet_currency)
        except (MoneyError, wallet.TopUpError) as e:
            self.errors["amount"] = amount_message(e.code, e.params)
            return None
        return amount

    def chosen_card(self) -> str:
        """The payment method id: a saved card's, or the one the browser just saved."""
        return self.new_payment_method_id if self.payment_method == "new" else self.payment_method


def _wallet_page(form: TopUpForm, status: int = 200, notice: str | None = None):
    """The wallet page with ``form`` as sent (its errors next to the fields), or as first shown."""
    s = db_session()
    user = current_user
    provider = cardflow.payment_provider()
    lo, hi, presets = wallet.limits_for(user.currency).money(user.currency)
    saved = _saved_cards(provider)
    # list_cards puts the default first
    fallback = next((c.id for c in saved.cards if c.id != form.not_card), "new")
    form.payment_method = cardflow.preselected(form.payment_method, form.new_payment_method_id, saved, fallback)
    return render_template(
        "wallet/index.html",
        form=form,
        currency=user.currency,
        balance=wallet.wallet_balance(s, user.owner, user.currency),
        on_hold=wallet.held(s, user.owner, user.currency),
        minimum=lo,
        maximum=hi,
        presets=presets,
        saved_cards=saved.cards,
        provider=provider,
        notice=notice or saved.notice,
        **cardflow.card_entry_context(provider),
    ), status


@bp.route("")
@login_required
def overview():
    """Balance, money on hold, and the top-up form (``?retry=<id>`` fills in a failed top-up's amount)."""
    form = TopUpForm()
    retry = request.args.get("retry", "")
    if retry.isdigit():
        row = _own_top_up(int(retry))
        form.not_card = row.payment_method_id
        presets = wallet.limits_for(current_user.currency).money(current_user.currency)[2]
        if row.amount in presets:
            form.preset = str(row.amount_minor)
        else:
            form.preset, form.amount = "other", cardflow.major_units_text(row.amount)
    return _wallet_page(form)


@bp.route("/top-ups", methods=["POST"])
@login_required
@limiter.limit(TOP_UP_LIMIT)
def top_up():
    """Validate the amount and the card, record the top-up, commit, charge the card, commit, show the result."""
    s = db_session()
    user = current_user
    provider = cardflow.payment_provider()
    form = TopUpForm.from_request()
    if provider is None:
        return _wallet_page(form, 503)
    presets = wallet.limits_for(user.currency).money(user.currency)[2]
    amount = form.read_amount(user.currency, presets)
    if amount is None:
        return _wallet_page(form, 400)
    try:
        card, _customer_id = cardflow.choose_saved_card(provider, user.owner, form.chosen_card(), log)
    except cardflow.CardChoiceError as e:
        if e.status == 503:
            return _wallet_page(form, 503, notice=e.message)
        form.errors["payment_method"] = e.message
        return _wallet_page(form, 400)

    try:
        row = wallet.start_top_up(s, provider, owner=user.owner, email=user.email, amount=amount, payment_method_id=card.id, currency=user.currency)
    except ProviderUnavailable:
        s.rollback()
        return _wallet_page(form, 503, notice=_("We cannot reach our card processor right now, so nothing was charged. Please try again in a few minutes."))
    s.commit()  # our record exists before the provider hears of it (see payments/cards.py)
    cardflow.submit(s, provider, row, log, "top-up not completed")
    return redirect(url_for("wallet.top_up_status", payment_id=row.id))


@bp.route("/top-ups/<int:payment_id>")
@login_required
def top_up_status(payment_id: int):
    """The result of a top-up: added, failed (and why), or waiting (3-D Secure runs here)."""
    row = _own_top_up(payment_id)
    page = cardflow.result_context(row)
    return render_template("wallet/top_up.html", balance=wallet.wallet_balance(db_session(), current_user.owner, row.currency), **page)


@bp.route("/top-ups/<int:payment_id>/confirm", methods=["POST"])
@login_required
def confirm_top_up(payment_id: int):
    """After 3-D Secure in the browser (or "check again"): ask the provider and record the answer."""
    row = _own_top_up(payment_id)
    return cardflow.confirm(row, url_for("wallet.top_up_status", payment_id=payment_id))


# -- saved cards -----------------------------------------------------------------------------------


def _unavailable_detail() -> str:
    return _("We cannot reach our card processor right now. Please try again in a few minutes.")


@bp.route("/cards")
@login_required
def cards_page():
    """Saved cards: default badge, make default, remove, add one."""
    provider = cardflow.payment_provider()
    saved = _saved_cards(provider)
    return (render_template("wallet/cards.html", saved_cards=saved.cards, provider=provider, notice=saved.notice,
                            **cardflow.card_entry_context(provider)), 503 if saved.notice else 200)


@bp.route("/cards/setup", methods=["POST"])
@login_required
@limiter.limit(CARD_SETUP_LIMIT)
def start_card_setup():
    """JSON for card.js: a SetupIntent's client secret, so the browser can hand the card to Stripe."""
    provider = cardflow.payment_provider()
    if provider is None:
        return cardflow.payments_unavailable()
    s = db_session()
    try:
        customer_id = wallet.customer_id(s, provider, owner=current_user.owner, email=current_user.email)
        s.commit()
        # Each attempt is its own SetupIntent: a retried fetch after an error must not reuse a failed one.
        setup = provider.start_card_setup(customer_id=customer_id, idempotency_key=f"card_setup:{current_user.owner}:{secrets.token_hex(8)}")
    except ProviderError:
        s.rollback()
        log.warning("card setup could not start", exc_info=True)
        return problem_response(503, "provider_unavailable", _unavailable_detail())
    return jsonify(setup_id=setup.id, client_secret=setup.client_secret)


@bp.route("/cards/finish", methods=["POST"])
@login_required
def finish_card_setup():
    """JSON for card.js: after the browser confirmed the SetupIntent, save the card to this person."""
    provider = cardflow.payment_provider()
    if provider is None:
        return cardflow.payments_unavailable()
    setup_id = cardflow.posted_setup_id()
    if setup_id is None:
        return cardflow.invalid_setup()
    customer_id = wallet.known_customer_id(db_session(), current_user.owner)
    if customer_id is None:
        return cardflow.invalid_setup()
    card = cardflow.finish_card_setup(provider, setup_id, customer_id, log, "card setup could not finish", _unavailable_detail())
    if not isinstance(card, Card):
        return card
    return jsonify(payment_method_id=card.id, brand=card.brand, last4=card.last4, exp_month=card.exp_month, exp_year=card.exp_year, is_default=card.is_default)


def _change_card(payment_method_id: str, change: str):
    provider = cardflow.payment_provider()
    customer_id = wallet.known_customer_id(db_session(), current_user.owner)
    if provider is None or customer_id is None:
        abort(404)
    try:
        if change == "default":
            provider.set_default_card(customer_id=customer_id, payment_method_id=payment_method_id)
            flash(_("Default card changed."), "success")
        else:
            provider.remove_card(customer_id=customer_id, payment_method_id=payment_method_id)
            flash(_("Card removed."), "success")
    except InvalidRequest:
        abort(404)  # not one of this person's cards
    except ProviderError:
        flash(_("We cannot reach our card processor right now. Please try again in a few minutes."), "error")
    return redirect(url_for("wallet.cards_page"))


@bp.route("/cards/<payment_method_id>/default", methods=["POST"])
@login_required
def make_default_card(payment_method_id: str):
    """Use this card when none is chosen."""
    return _change_card(payment_method_id, "default")


@bp.route("/cards/<payment_method_id>/remove", methods=["POST"])
@login_required
def remove_card(payment_method_id: str):
    """Forget a saved card (at the provider; we never stored it)."""
    return _change_card(payment_method_id, "remove")


# -- history ---------------------------------------------------------------------------------------


@bp.route("/history")
@login_required
def history():
    """Every movement of the wallet with the balance after it, newest first, ``before=<entry id>`` for older ones."""
    before = request.args.get("before")
    if before is not None and (not before.isdigit() or len(before) > 18):
        abort(400)
    s = db_session()
    account = wallet.wallet(s, current_user.owner, current_user.currency)
    rows = ledger.statement(s, account, limit=HISTORY_PAGE + 1, before_entry_id=int(before) if before else None)
    older = rows[HISTORY_PAGE - 1]["entry_id"] if len(rows) > HISTORY_PAGE else None
    entries = [{**r, "label": _entry_label(r["description"])} for r in rows[:HISTORY_PAGE]]
    return render_template("wallet/history.html", entries=entries, older=older, first_page=before is None)
