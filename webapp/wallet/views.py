"""Wallet views: thin, they validate, call ``payments`` with the session and the provider, commit, redirect or render."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from babel.numbers import format_decimal
from flask import abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required

from payments import cards, ledger, wallet
from payments.cards import CardPayment, Purpose, State
from payments.money import Money, MoneyError, check_currency, exponent
from payments.money import format as format_money
from payments.money import parse as parse_money
from payments.providers.base import Card, InvalidRequest, PaymentProvider, PaymentStatus, ProviderError, ProviderUnavailable
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


def _provider() -> PaymentProvider | None:
    """The configured payment provider, or None when card payments are off."""
    return current_app.extensions.get("payment_provider")


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
    if code == "empty":
        return _("Choose an amount or enter one.")
    if code == "negative":
        return _("The amount cannot be negative.")
    if code == "too_many_decimals":
        return _("Use at most %(decimals)s decimals.", decimals=params.get("decimals", 2))
    if code == "not_a_number":
        return _("Enter the amount as a number, for example %(example)s.", example=_major_units_text(Money(1250, "EUR")))
    if code == "unknown_currency":
        return _("This currency is not supported.")
    if code in ("wrong_currency", "currency_mismatch"):
        return _("Your wallet is in %(currency)s. Reload the page and top up in %(currency)s.", currency=current_user.currency)
    if code == "amount_out_of_range":
        return _("Top-ups are between %(minimum)s and %(maximum)s.", minimum=money_filter(params["minimum"]), maximum=money_filter(params["maximum"]))
    if code == "not_a_preset":
        return _("Choose one of the amounts shown, or enter another amount.")
    return _("Enter a valid amount.")


def failure_message(code: str | None) -> str:
    """Why a top-up failed, in words a person can act on."""
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


def _saved_cards(provider: PaymentProvider | None) -> tuple[list[Card], str | None]:
    """The signed-in person's saved cards (default first) and, when they could not be loaded, why."""
    if provider is None:
        return [], None
    customer_id = wallet.known_customer_id(db_session(), current_user.owner)
    if customer_id is None:
        return [], None
    try:
        return provider.list_cards(customer_id=customer_id), None
    except ProviderError:
        log.warning("could not list cards", exc_info=True)
        return [], _("We cannot load your saved cards right now. Please try again in a minute.")


def _own_top_up(payment_id: int) -> CardPayment:
    """The signed-in person's top-up, or 404 (someone else's is not found either)."""
    row = db_session().get(CardPayment, payment_id)
    if row is None or row.owner != current_user.owner or row.purpose != Purpose.WALLET_TOP_UP:
        abort(404)
    return row


def _card_entry_context(provider: PaymentProvider | None) -> dict:
    """What the card element needs in the page (data-* attributes read by static/js/card.js)."""
    return {"stripe_js_url": current_app.config["STRIPE_JS_URL"], "publishable_key": provider.publishable_key if provider else ""}


def _major_units_text(money: Money) -> str:
    """``money`` as a person would type it in this language ("12.50", "12,50"), without symbol or grouping."""
    digits = exponent(money.currency)
    return format_decimal(money.to_decimal(), format="0." + "0" * digits if digits else "0", locale=_locale())


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
    provider = _provider()
    lo, hi, presets = wallet.limits_for(user.currency).money(user.currency)
    saved, cards_notice = _saved_cards(provider)
    if form.payment_method == "new" and form.new_payment_method_id in {c.id for c in saved}:
        form.payment_method = form.new_payment_method_id  # the card typed before the error is saved now: no retyping
    if not form.payment_method or (form.payment_method != "new" and form.payment_method not in {c.id for c in saved}):
        # list_cards puts the default first
        form.payment_method = next((c.id for c in saved if c.id != form.not_card), "new")
    return render_template(
        "wallet/index.html",
        form=form,
        currency=user.currency,
        balance=wallet.wallet_balance(s, user.owner, user.currency),
        on_hold=wallet.held(s, user.owner, user.currency),
        minimum=lo,
        maximum=hi,
        presets=presets,
        saved_cards=saved,
        provider=provider,
        notice=notice or cards_notice,
        **_card_entry_context(provider),
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
            form.preset, form.amount = "other", _major_units_text(row.amount)
    return _wallet_page(form)


@bp.route("/top-ups", methods=["POST"])
@login_required
@limiter.limit(TOP_UP_LIMIT)
def top_up():
    """Validate the amount and the card, record the top-up, commit, charge the card, commit, show the result."""
    s = db_session()
    user = current_user
    provider = _provider()
    form = TopUpForm.from_request()
    if provider is None:
        return _wallet_page(form, 503)
    presets = wallet.limits_for(user.currency).money(user.currency)[2]
    amount = form.read_amount(user.currency, presets)
    if amount is None:
        return _wallet_page(form, 400)
    payment_method_id = form.chosen_card()
    if not payment_method_id:
        form.errors["payment_method"] = _("Choose a card, or enter a new one.")
        return _wallet_page(form, 400)
    saved, cards_notice = _saved_cards(provider)
    if cards_notice:
        return _wallet_page(form, 503, notice=_("We cannot reach our card processor right now, so nothing was charged. Please try again in a few minutes."))
    if payment_method_id not in {c.id for c in saved}:
        form.errors["payment_method"] = _("That card is not one of your saved cards. Choose another card.")
        return _wallet_page(form, 400)

    try:
        row = wallet.start_top_up(s, provider, owner=user.owner, email=user.email, amount=amount, payment_method_id=payment_method_id, currency=user.currency)
    except ProviderUnavailable:
        s.rollback()
        return _wallet_page(form, 503, notice=_("We cannot reach our card processor right now, so nothing was charged. Please try again in a few minutes."))
    s.commit()  # our record exists before the provider hears of it (see payments/cards.py)
    try:
        cards.submit(s, provider, row)
    except ProviderError as e:
        # Declined and refused attempts are recorded as failed; an unanswered one stays for the reconciliation job.
        log.info("top-up not completed", extra={"card_payment": row.id, "reason": e.code})
    s.commit()
    return redirect(url_for("wallet.top_up_status", payment_id=row.id))


@bp.route("/top-ups/<int:payment_id>")
@login_required
def top_up_status(payment_id: int):
    """The result of a top-up: added, failed (and why), or waiting (3-D Secure runs here)."""
    row = _own_top_up(payment_id)
    provider = _provider()
    client_secret = None
    notice = None
    if row.state == State.REQUIRES_ACTION and provider is not None and row.provider_payment_id:
        try:
            current = provider.retrieve(payment_id=row.provider_payment_id)
        except ProviderError:
            notice = _("We cannot reach our card processor right now. Please check again in a minute.")
        else:
            if current.status == PaymentStatus.REQUIRES_ACTION:
                client_secret = current.client_secret
    s = db_session()
    return render_template(
        "wallet/top_up.html",
        row=row,
        state=row.state.value,
        failure=failure_message(row.failure_code) if row.state == State.FAILED else None,
        balance=wallet.wallet_balance(s, current_user.owner, row.currency),
        client_secret=client_secret,
        notice=notice,
        **_card_entry_context(provider),
    )


@bp.route("/top-ups/<int:payment_id>/confirm", methods=["POST"])
@login_required
def confirm_top_up(payment_id: int):
    """After 3-D Secure in the browser (or "check again"): ask the provider and record the answer."""
    row = _own_top_up(payment_id)
    provider = _provider()
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
    return redirect(url_for("wallet.top_up_status", payment_id=payment_id))


# -- saved cards -----------------------------------------------------------------------------------


def _json_problem(status: int, code: str, detail: str):
    """problem+json for the card element's fetch() calls, whatever the Accept header says."""
    return problem_response(status, code, detail)


def _unavailable_problem():
    return _json_problem(503, "provider_unavailable", _("We cannot reach our card processor right now. Please try again in a few minutes."))


@bp.route("/cards")
@login_required
def cards_page():
    """Saved cards: default badge, make default, remove, add one."""
    provider = _provider()
    saved, notice = _saved_cards(provider)
    return render_template("wallet/cards.html", saved_cards=saved, provider=provider, notice=notice, **_card_entry_context(provider)), (503 if notice else 200)


@bp.route("/cards/setup", methods=["POST"])
@login_required
@limiter.limit(CARD_SETUP_LIMIT)
def start_card_setup():
    """JSON for card.js: a SetupIntent's client secret, so the browser can hand the card to Stripe."""
    provider = _provider()
    if provider is None:
        return _json_problem(503, "payments_unavailable", _("Card payments are not available right now."))
    s = db_session()
    try:
        customer_id = wallet.customer_id(s, provider, owner=current_user.owner, email=current_user.email)
        s.commit()
        # Each attempt is its own SetupIntent: a retried fetch after an error must not reuse a failed one.
        setup = provider.start_card_setup(customer_id=customer_id, idempotency_key=f"card_setup:{current_user.owner}:{secrets.token_hex(8)}")
    except ProviderError:
        s.rollback()
        log.warning("card setup could not start", exc_info=True)
        return _unavailable_problem()
    return jsonify(setup_id=setup.id, client_secret=setup.client_secret)


@bp.route("/cards/finish", methods=["POST"])
@login_required
def finish_card_setup():
    """JSON for card.js: after the browser confirmed the SetupIntent, save the card to this person."""
    provider = _provider()
    if provider is None:
        return _json_problem(503, "payments_unavailable", _("Card payments are not available right now."))
    body = request.get_json(silent=True)
    setup_id = body.get("setup_id") if isinstance(body, dict) else None
    if not isinstance(setup_id, str) or not setup_id.startswith("seti_") or len(setup_id) > 255:
        return _json_problem(400, "invalid_setup", _("Your card could not be saved. Please enter it again."))
    customer_id = wallet.known_customer_id(db_session(), current_user.owner)
    if customer_id is None:
        return _json_problem(400, "invalid_setup", _("Your card could not be saved. Please enter it again."))
    try:
        card = provider.finish_card_setup(setup_id=setup_id, customer_id=customer_id)
    except InvalidRequest:
        return _json_problem(400, "invalid_setup", _("Your card could not be saved. Please enter it again."))
    except ProviderError:
        log.warning("card setup could not finish", exc_info=True)
        return _unavailable_problem()
    return jsonify(payment_method_id=card.id, brand=card.brand, last4=card.last4, exp_month=card.exp_month, exp_year=card.exp_year, is_default=card.is_default)


def _change_card(payment_method_id: str, change: str):
    provider = _provider()
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
