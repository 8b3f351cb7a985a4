"""The driver's charging pages: the page behind the QR code, the start, the live session page, stop, and finding sessions again.

Views stay thin: they read the form, call ``webapp.charging.service`` with the
request's database session, the payment provider and the charger gateway,
commit, and redirect (post/redirect/get). Every message a driver reads is
translated here from the service's stable error and failure codes.

Who may see a session: its account (signed in), or whoever holds its guest
link token (``?t=`` in the emailed link, or remembered in this browser's
Flask session after a guest started it here or opened the link once). Anyone
else gets the same 404 as for a session that does not exist.

Guest cards (EU AFIR: no account needed): ``POST /c/<code>/guest-card``
creates a payment-provider customer for this browser's guest and a
SetupIntent; the browser confirms it with stripe.js (the card number goes to
Stripe only) and the start form sends the SetupIntent's id, from which the
server learns the card's id, brand and last four. Signed-in drivers add a card
through the wallet's own setup endpoints and then start with it like with any
saved card.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from babel.dates import format_datetime as babel_datetime
from babel.dates import format_time as babel_time
from babel.numbers import NumberFormatError, format_decimal, format_percent, parse_decimal
from flask import abort, current_app, flash, jsonify, redirect, render_template, request, session, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.csrf import generate_csrf
from sqlalchemy import select
from wtforms import DateField, EmailField, StringField
from wtforms.validators import DataRequired, Email, Length, Regexp

from payments import wallet as wallet_mod
from payments.money import Money, MoneyError, to_minor
from payments.money import format as format_money
from payments.money import parse as parse_money
from payments.price_display import price_display
from payments.providers.base import Card, InvalidRequest, PaymentProvider, ProviderError
from payments.tariff_store import loads
from webapp.api.connectors import CODE, find_connector
from webapp import cardflow
from webapp.auth.forms import normalize_email
from webapp.charging import bp, notify, page_cache, service
from webapp.charging.models import ENDED_STATES, ChargingSession, PaymentKind, SessionState
from webapp.charging.service import ChargingError, StartRequest
from webapp.db import db_session, utcnow
from webapp.errors import problem_response
from webapp.extensions import limiter
from webapp.models import Connector
from webapp.pricing import render_prices

log = logging.getLogger("voltpay.charging")

GUEST_TOKENS = "charging_guest_tokens"  # Flask session: {session id: link token} of the guest sessions this browser may see
GUEST_CUSTOMER = "charging_guest_customer"  # Flask session: this browser's guest customer at the payment provider
MAX_REMEMBERED = 20  # guest sessions remembered per browser (the cookie stays small)
SESSIONS_PAGE = 30
GUEST_CARD_LIMIT = "20 per hour"  # card-testing fraud tries many cards quickly; a driver enters one or two
START_LIMIT = "60 per hour"  # per address: drivers behind one mobile network share it
FIND_LIMIT = "5 per minute;20 per hour"
POLL_SECONDS = 3

# OCPI connector standards as drivers know them (the names printed on the plugs; not translated).
STANDARDS = {
    "IEC_62196_T1": "Type 1", "IEC_62196_T1_COMBO": "CCS (Combo 1)", "IEC_62196_T2": "Type 2", "IEC_62196_T2_COMBO": "CCS (Combo 2)",
    "IEC_62196_T3A": "Type 3A", "IEC_62196_T3C": "Type 3C", "CHADEMO": "CHAdeMO", "CHAOJI": "ChaoJi", "DOMESTIC_F": "Schuko (CEE 7/4)",
    "GBT_AC": "GB/T AC", "GBT_DC": "GB/T DC", "TESLA_S": "Tesla", "TESLA_R": "Tesla Roadster", "NEMA_5_20": "NEMA 5-20",
}

# Where the service's start errors are shown (a field of the form, else the top of the page) and with which status.
FIELD_OF = {
    "cap_too_low": "cap", "cap_currency": "cap", "energy_cap_invalid": "energy_cap", "email_required": "email",
    "payment_method_required": "payment", "wallet_currency": "payment", "wallet_needs_account": "payment", "wallet_insufficient": "payment",
}
STATUS_OF = {"connector_busy": 409, "charger_offline": 409, "connector_faulted": 409, "no_tariff": 409, "payments_unavailable": 503,
             "gateway_unavailable": 503}


# -- helpers ---------------------------------------------------------------------------------------


def _gateway() -> service.Gateway | None:
    """The charger gateway client (``webapp.chargers.client.GatewayClient``), or None when charging is off."""
    return current_app.extensions.get("charger_gateway")


def _locale() -> str:
    return str(get_locale() or "en")


def _user():
    """The signed-in account, or None for a guest."""
    return current_user if current_user.is_authenticated else None


def money_text(money: Money) -> str:
    """An amount formatted for the request's language."""
    return format_money(money, _locale())


def energy_text(kwh: Decimal) -> str:
    """kWh with two decimals in the request's language ("12.35 kWh", "12,35 kWh")."""
    return _("%(kwh)s kWh", kwh=format_decimal(kwh, format="#,##0.00", locale=_locale()))


def power_text(kw: Decimal | None) -> str:
    """kW with one decimal, or a dash when the charger has not said."""
    if kw is None:
        return "–"
    return _("%(kw)s kW", kw=format_decimal(kw, format="#,##0.0", locale=_locale()))


def duration_text(seconds: int) -> str:
    """A duration as a clock reads it: 0:05:09, 1:20:00."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def local_time(value: dt.datetime | None, time_zone: str, fmt: str = "medium") -> str:
    """A UTC instant in the site's time zone, formatted for the request's language ("" when unknown; ``clock``: the time only)."""
    if value is None:
        return ""
    try:
        tz = ZoneInfo(time_zone)
    except (KeyError, ValueError):
        tz = ZoneInfo("UTC")
    if fmt == "clock":
        return babel_time(value, "short", tzinfo=tz, locale=_locale())
    return babel_datetime(value, fmt, tzinfo=tz, locale=_locale())


def standard_text(standard: str) -> str:
    """The plug's common name."""
    return STANDARDS.get(standard, standard.replace("_", " "))


def _remembered_tokens() -> dict[str, str]:
    value = session.get(GUEST_TOKENS)
    return dict(value) if isinstance(value, dict) else {}


def remember_guest_token(session_id: int, token: str) -> None:
    """Let this browser see a guest session without its link (the newest ``MAX_REMEMBERED`` only)."""
    tokens = _remembered_tokens()
    tokens.pop(str(session_id), None)
    tokens[str(session_id)] = token
    while len(tokens) > MAX_REMEMBERED:
        tokens.pop(next(iter(tokens)))
    session[GUEST_TOKENS] = tokens


def _visible(cs: ChargingSession | None, token: str | None = None) -> bool:
    if cs is None:
        return False
    token = token or _remembered_tokens().get(str(cs.id))
    return service.visible_to(cs, user=_user(), guest_token=token)


def _own_session(session_id: int) -> ChargingSession:
    """The session if this person may see it, else 404 (someone else's is not found either)."""
    cs = db_session().get(ChargingSession, session_id)
    if not _visible(cs):
        abort(404)
    return cs


def _json_problem(status: int, code: str, detail: str, errors: dict | None = None):
    """problem+json for charging.js's fetch() calls, whatever the Accept header says."""
    return problem_response(status, code, detail, errors=errors)


# -- messages --------------------------------------------------------------------------------------

# The connector's state as a driver reads it: a title and a plain explanation.
AVAILABILITY = {
    "available": (_l("Available"), _l("The connector is free. Plug in your car after you tap Start.")),
    "in_use": (_l("In use"), _l("Someone is charging here right now. Try another connector, or come back later.")),
    "faulted": (_l("Out of order"), _l("This connector reports a fault and cannot be used. Please use another connector.")),
    "unavailable": (_l("Out of service"), _l("This connector has been taken out of service. Please use another connector.")),
    "offline": (_l("Offline"), _l("This charger is not connected to Voltpay right now, so it cannot be started from your phone. Try another charger, or come back in a few minutes.")),
}


def start_error_message(code: str, params: dict) -> str:
    """What a driver reads for a ``ChargingError`` of the start (``code`` from the service)."""
    if code == "connector_busy":
        return _("Someone else just started charging here. Please choose another connector. Nothing was charged.")
    if code == "charger_offline":
        return _("This charger is offline, so it cannot be started now. Nothing was charged. Try another charger, or try again in a few minutes.")
    if code == "connector_faulted":
        return _("This connector is out of order. Nothing was charged. Please use another connector.")
    if code == "no_tariff":
        return _("This connector has no price at the moment, so it cannot be used. Nothing was charged.")
    if code == "cap_too_low":
        minimum = params.get("minimum")
        if isinstance(minimum, Money):
            return _("This spending cap is too low to charge here. Enter at least %(minimum)s, or leave it empty.", minimum=money_text(minimum))
        return _("This spending cap is too low to charge here. Enter a higher amount, or leave it empty.")
    if code == "cap_currency":
        return _("Enter the spending cap in %(currency)s.", currency=params.get("currency", ""))
    if code == "wallet_currency":
        return _("This charger is paid in %(currency)s, but your wallet is in another currency. Pay with a card instead.", currency=params.get("currency", ""))
    if code == "wallet_needs_account":
        return _("Sign in to pay from your wallet, or pay with a card.")
    if code == "wallet_insufficient":
        return _("Your wallet balance is too low for the amount we reserve. Top up your wallet, lower the spending cap, or pay with a card.")
    if code == "payments_unavailable":
        return _("Card payments are not available right now. Please try again later, or pay from your wallet.")
    if code == "email_required":
        return _("Enter your email address: we send your receipt and the link to your session there.")
    if code == "energy_cap_invalid":
        return _("The energy limit must be more than 0 kWh.")
    if code == "payment_method_required":
        return _("Choose how to pay, or enter a card.")
    if code == "gateway_unavailable":
        return _("We cannot reach the chargers right now, so charging cannot start. Nothing was charged. Please try again in a few minutes.")
    return _("Charging could not start. Nothing was charged. Please try again.")


def failure_message(code: str | None) -> str:
    """Why a session ended without charging (or failed to start), in words a driver can act on."""
    if code == "card_declined" or code in ("insufficient_funds", "card_velocity_exceeded", "generic_decline", "do_not_honor"):
        return _("Your card was declined, so charging did not start. Nothing was taken from your card.")
    if code == "expired_card":
        return _("Your card has expired, so charging did not start. Nothing was taken from your card.")
    if code == "payment_intent_authentication_failure":
        return _("The security check with your bank (3-D Secure) was not completed, so charging did not start. Nothing was taken from your card.")
    if code in ("payment_failed", "invalid_request"):
        return _("This card cannot be used for this payment, so charging did not start. Nothing was taken from your card.")
    if code == "wallet_insufficient":
        return _("Your wallet balance was too low for the amount we reserve, so charging did not start. Nothing was taken from your wallet.")
    if code == "charger_rejected":
        return _("The charger refused to start. The reserved amount was released: you pay nothing.")
    if code == "charger_offline":
        return _("The charger was offline and could not be started. The reserved amount was released: you pay nothing.")
    if code == "start_timeout":
        return _("No car was plugged in within the time allowed, so the session ended. The reserved amount was released: you pay nothing.")
    if code == "abandoned":
        return _("The payment was not confirmed in time, so the session was cancelled. The reserved amount was released: you pay nothing.")
    if code == "cancelled_by_driver":
        return _("You cancelled this session before charging started. The reserved amount was released: you pay nothing.")
    if code and code.startswith("cancelled_by_"):
        return _("This session was cancelled before charging started. The reserved amount was released: you pay nothing.")
    return _("This session ended before charging started. The reserved amount was released: you pay nothing.")


def stop_error_message(code: str) -> str:
    """What a driver reads when the stop button could not stop the charge."""
    if code == "charger_offline":
        return _("The charger is offline, so we cannot stop it from here. Unplug the cable to stop charging; you pay only for the energy up to then.")
    if code == "stop_rejected":
        return _("The charger refused to stop. Unplug the cable to stop charging; you pay only for the energy up to then.")
    if code == "charger_not_answering":
        return _("The charger did not answer. Try again, or unplug the cable to stop charging.")
    if code == "not_stoppable":
        return _("This session has already ended.")
    return _("The charge could not be stopped. Try again, or unplug the cable.")


DECLINE_HELP = _l("Card declined — what can I do? Check that the card details are right, try another card, or ask your bank why it refused the payment. Nothing was taken from your card, and charging did not start.")


# -- the page behind the QR code -------------------------------------------------------------------


@dataclass
class StartForm:
    """What the start form holds: how to pay, a guest's email and card setup, and the driver's caps."""

    payment: str = ""  # "wallet", a saved card's pm id, "new" (a card just saved), or "card" (a guest's card)
    new_payment_method_id: str = ""
    setup_id: str = ""  # a guest's confirmed SetupIntent (seti_...)
    email: str = ""
    cap: str = ""
    energy_cap: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_request(cls) -> StartForm:
        """The posted form, each value cut to a sane length."""
        f = request.form
        return cls(
            payment=f.get("payment", "")[:255], new_payment_method_id=f.get("new_payment_method_id", "")[:255],
            setup_id=f.get("setup_id", "")[:255], email=normalize_email(f.get("email", ""))[:254], cap=f.get("cap", "")[:40],
            energy_cap=f.get("energy_cap", "")[:20],
        )

    def read_cap(self, currency: str) -> Money | None:
        """The spending cap (None when empty); sets ``errors["cap"]`` when it is not an amount."""
        if not self.cap.strip():
            return None
        try:
            return parse_money(self.cap, currency, _locale())
        except MoneyError as e:
            self.errors["cap"] = cap_message(e.code, e.params, currency)
            return None

    def read_energy_cap(self) -> Decimal | None:
        """The energy limit in kWh (None when empty); sets ``errors["energy_cap"]`` when it is not a number."""
        raw = self.energy_cap.strip().replace("kWh", "").replace("kwh", "").strip()
        if not raw:
            return None
        try:
            value = parse_decimal(raw, locale=_locale(), strict=False)
        except (NumberFormatError, InvalidOperation):
            try:
                value = Decimal(raw.replace(",", "."))
            except InvalidOperation:
                self.errors["energy_cap"] = _("Enter the energy as a number of kWh, for example 20.")
                return None
        if not value.is_finite() or value <= 0:
            self.errors["energy_cap"] = _("The energy limit must be more than 0 kWh.")
            return None
        if value > 1000:
            self.errors["energy_cap"] = _("Enter at most 1000 kWh.")
            return None
        return value


def cap_message(code: str, params: dict, currency: str) -> str:
    """The message next to the spending cap for a MoneyError ``code``."""
    if code == "negative":
        return _("The spending cap cannot be negative.")
    if code == "too_many_decimals":
        return _("Use at most %(decimals)s decimals.", decimals=params.get("decimals", 2))
    example = format_decimal(Decimal("25.00"), format="0.00", locale=_locale())
    return _("Enter the spending cap as an amount in %(currency)s, for example %(example)s.", currency=currency, example=example)


def email_problem(email: str) -> str | None:
    """Why a guest's email cannot be used, or None."""
    return cardflow.email_problem(email, _("Enter your email address: we send your receipt and the link to your session there."))


def _hold_limits_text(q: service.Quote) -> str:
    """When a session with this hold stops by itself."""
    hours = Decimal(q.max_charging_s) / 3600
    return _("Charging stops by itself at %(kwh)s, after %(hours)s h, or when the cost reaches the reserved amount.",
             kwh=energy_text(Decimal(q.max_energy_wh) / 1000), hours=format_decimal(hours, format="#,##0.#", locale=_locale()))


def _connector_page(connector: Connector, form: StartForm | None = None, status: int = 200, notice: str | None = None,
                    decline_help: bool = False, failure_code: str | None = None):
    """The connector page: place, status, prices, the hold, and the start form with ``form`` as sent."""
    s = db_session()
    form = form or StartForm()
    now = utcnow()
    user = _user()
    provider = cardflow.payment_provider()
    site = connector.charger.site
    state = service.availability(s, connector)
    q = None
    prices = None
    try:
        q = service.quote(s, connector, now=now)
    except ChargingError as e:
        log.info("no quote for connector %s: %s", connector.connector_code, e.code)
    if q is not None:
        prices = render_prices(price_display(q.tariff_version))
    balance = None
    wallet_state = None  # why the wallet cannot be chosen: "currency", "empty", or "low" (a cap may still fit)
    if user is not None:
        if user.currency != site.currency:
            wallet_state = "currency"
        else:
            balance = wallet_mod.wallet_balance(s, user.owner, user.currency)
            if balance.amount <= 0:
                wallet_state = "empty"
            elif q is not None and balance < q.hold:
                wallet_state = "low"
    saved = cardflow.saved_cards(provider, user.owner if user is not None else None, log, cardflow.CARDS_NOT_LOADED_OTHER_WAYS)
    if user is not None:
        fallback = "wallet" if wallet_state is None else (saved.cards[0].id if saved.cards else ("new" if provider is not None else "wallet"))
        form.payment = cardflow.preselected(form.payment, form.new_payment_method_id, saved, fallback, ("wallet", "new"))
    else:
        form.payment = "card"
    can_start = state == "available" and q is not None and _gateway() is not None
    return render_template(
        "charging/connector.html",
        connector=connector,
        site=site,
        standard=standard_text(connector.standard),
        state=state,
        state_title=AVAILABILITY.get(state, AVAILABILITY["unavailable"])[0],
        state_help=AVAILABILITY.get(state, AVAILABILITY["unavailable"])[1],
        quote=q,
        prices=prices,
        hold_limits=_hold_limits_text(q) if q else None,
        can_start=can_start,
        form=form,
        user=user,
        balance=balance,
        wallet_state=wallet_state,
        saved_cards=saved.cards,
        provider=provider,
        notice=notice or saved.notice,
        decline_help=DECLINE_HELP if decline_help else None,
        failure_code=failure_code,  # the help link's section of card-problems
        **cardflow.card_entry_context(provider),
    ), status


def _unknown_code(code: str, status: int = 404):
    """The page that helps someone type the charger's code again."""
    return render_template("charging/unknown.html", code=code), status


@bp.route("/c")
def find_connector_form():
    """Type the charger's code (``?code=`` goes to its page)."""
    typed = request.args.get("code", "")[:64]
    if "code" not in request.args:
        return render_template("charging/unknown.html", code=None)
    code = re.sub(r"[\s]+", "", typed)
    if not code:
        return render_template("charging/unknown.html", code="", empty=True), 400
    if not CODE.fullmatch(code):
        return _unknown_code(typed)
    return redirect(url_for("charging.connector", connector_code=code.upper()))


@bp.route("/c/<connector_code>")
def connector(connector_code: str):
    """The page behind the QR code: where, what, status, price, the hold, and the start form."""
    seconds = float(current_app.config.get("PAGE_CACHE_SECONDS") or 0)
    key = (connector_code, str(get_locale()))
    cache = current_app.extensions["page_cache"]  # webapp.charging.page_cache
    cacheable = seconds > 0 and not current_user.is_authenticated and "_flashes" not in session and not request.query_string
    if cacheable:
        page = cache.page(key)
        if page is not None:
            return page.body.replace(page_cache.PLACEHOLDER, generate_csrf())
    found = find_connector(connector_code)
    if found is None:
        return _unknown_code(connector_code[:64])
    body, status = _connector_page(found)
    if cacheable and status == 200:
        cache.put(key, body, generate_csrf(), seconds)
        request.environ[page_cache.LEARN] = key  # AnonymousPages learns this response's headers
    return body, status


@bp.route("/c/<connector_code>/guest-card", methods=["POST"])
@limiter.limit(GUEST_CARD_LIMIT)
def guest_card(connector_code: str):
    """JSON for charging.js: a SetupIntent for a guest's card (the browser hands the card to Stripe with it)."""
    if find_connector(connector_code) is None:
        return _json_problem(404, "connector_not_found", _("There is no charging point with this code."))
    provider = cardflow.payment_provider()
    if provider is None:
        return _json_problem(503, "payments_unavailable", start_error_message("payments_unavailable", {}))
    body = request.get_json(silent=True)
    email = normalize_email(body.get("email") if isinstance(body, dict) and isinstance(body.get("email"), str) else "")
    problem = email_problem(email)
    if problem:
        return _json_problem(400, "invalid_email", problem, errors={"email": problem})
    try:
        customer_id = provider.ensure_customer(email=email, existing_id=session.get(GUEST_CUSTOMER),
                                               idempotency_key=f"guest-customer:{secrets.token_hex(12)}")
        session[GUEST_CUSTOMER] = customer_id
        # Each attempt is its own SetupIntent: a retried fetch after an error must not reuse a failed one.
        setup = provider.start_card_setup(customer_id=customer_id, idempotency_key=f"guest-card-setup:{secrets.token_hex(12)}")
    except ProviderError:
        log.warning("guest card setup could not start", exc_info=True)
        return _json_problem(503, "provider_unavailable", _("We cannot reach our card processor right now. Please try again in a few minutes."))
    return jsonify(setup_id=setup.id, client_secret=setup.client_secret)


def _guest_card(provider: PaymentProvider, form: StartForm) -> tuple[Card | None, str | None]:
    """The guest's card from the confirmed SetupIntent, and its customer (``errors["payment"]`` when there is none)."""
    customer_id = session.get(GUEST_CUSTOMER)
    if not form.setup_id.startswith("seti_") or not customer_id:
        form.errors["payment"] = _("Enter your card to start.")
        return None, None
    try:
        return provider.finish_card_setup(setup_id=form.setup_id, customer_id=customer_id), customer_id
    except InvalidRequest:
        form.setup_id = ""
        form.errors["payment"] = _("Your card could not be used. Please enter it again.")
        return None, None


def _already_mine(connector: Connector) -> ChargingSession | None:
    """This driver's own session on the connector (a second tap on Start, or a reload of the form)."""
    s = db_session()
    cs = s.scalar(select(ChargingSession).where(ChargingSession.active_connector_id == connector.id))
    return cs if _visible(cs) else None


class _GuestLink:
    """``on_opened`` of the start: this browser remembers a guest's session at once; the link email waits for the outcome.

    The email says "you started a charging session", so it goes only for a
    session under way: not for a declined card, nor a charger that refused the
    start or was offline (those end at once and the page says so).
    """

    def __init__(self, locale: str):
        self.locale = locale
        self.token: str | None = None

    def __call__(self, cs: ChargingSession, token: str | None) -> None:
        if token is not None:
            self.token = token
            remember_guest_token(cs.id, token)

    def send(self, cs: ChargingSession | None) -> None:
        """Email the guest the link to the session (nothing for an account's session or a failed hold)."""
        if cs is None or self.token is None or cs.state in service.NOT_CHARGED:  # ended at once: the page says so
            return
        try:
            notify.send_guest_link(cs, self.token, self.locale)
        except Exception:  # the session has started; a mail problem must not turn it into an error page
            log.exception("guest link email failed", extra={"session": cs.id})


def _provider_down_page(connector: Connector, session_id: int | None = None):
    """503: the card processor did not answer; say what happened to the money and what to do."""
    retry_url = url_for("charging.connector", connector_code=connector.connector_code)
    return render_template("charging/unavailable.html", session_id=session_id, retry_url=retry_url), 503


@bp.route("/c/<connector_code>/start", methods=["POST"])
@limiter.limit(START_LIMIT)
def start(connector_code: str):
    """Validate the form, start the session with the service, commit, and go to the session page."""
    connector = find_connector(connector_code)
    if connector is None:
        return _unknown_code(connector_code[:64])
    mine = _already_mine(connector)
    if mine is not None:  # the second tap of a double tap: show the session the first one started
        return redirect(url_for("charging.session_page", session_id=mine.id))
    s = db_session()
    form = StartForm.from_request()
    provider = cardflow.payment_provider()
    gateway = _gateway()
    user = _user()
    site = connector.charger.site
    if gateway is None:
        return _connector_page(connector, form, 503, notice=start_error_message("gateway_unavailable", {}))

    cap = form.read_cap(site.currency)
    energy_cap = form.read_energy_cap()
    if user is None:
        problem = email_problem(form.email)
        if problem:
            form.errors["email"] = problem
    if form.errors:
        return _connector_page(connector, form, 400)

    req = StartRequest(connector=connector, user=user, email=form.email if user is None else None, payment_kind=PaymentKind.CARD,
                       cap=cap, max_energy_kwh=energy_cap, locale=_locale())
    link = _GuestLink(_locale())
    try:
        if user is None:
            if provider is None:
                raise ChargingError("payments_unavailable", "no provider")
            card, customer_id = _guest_card(provider, form)
            if card is None:
                return _connector_page(connector, form, 400)
            req.payment_method_id, req.customer_id, req.card_brand, req.card_last4 = card.id, customer_id, card.brand, card.last4
        elif form.payment == "wallet":
            req.payment_kind = PaymentKind.WALLET
            q = service.quote(s, connector, now=utcnow(), cap=cap, max_energy_kwh=energy_cap)
            if user.currency == q.currency and wallet_mod.wallet_balance(s, user.owner, q.currency) < q.hold:
                raise ChargingError("wallet_insufficient", "wallet balance below the hold")
        else:
            if provider is None:
                raise ChargingError("payments_unavailable", "no provider")
            chosen = form.new_payment_method_id if form.payment == "new" else form.payment
            if not chosen:
                raise ChargingError("payment_method_required", "choose a card")
            try:
                card, customer_id = cardflow.choose_saved_card(provider, user.owner, chosen, log)
            except cardflow.CardChoiceError as e:
                if e.status == 503:
                    return _provider_down_page(connector)
                form.errors["payment"] = e.message
                return _connector_page(connector, form, 400)
            req.payment_method_id, req.customer_id, req.card_brand, req.card_last4 = card.id, customer_id, card.brand, card.last4
        result = service.start_session(s, provider, gateway, req, now=utcnow(), on_opened=link)
    except ChargingError as e:
        s.rollback()
        if e.code == "connector_busy":
            mine = _already_mine(connector)
            if mine is not None:
                return redirect(url_for("charging.session_page", session_id=mine.id))
        message = start_error_message(e.code, e.params)
        if e.code in FIELD_OF:
            form.errors[FIELD_OF[e.code]] = message
            return _connector_page(connector, form, STATUS_OF.get(e.code, 400))
        return _connector_page(connector, form, STATUS_OF.get(e.code, 400), notice=message)
    except ProviderError as e:
        s.rollback()
        log.warning("card processor unavailable at start", extra={"connector": connector.connector_code, "reason": e.code})
        session_id = getattr(e, "session_id", None)
        if session_id is not None:
            link.send(s.get(ChargingSession, session_id))  # the hold may yet be confirmed: the guest needs the way back
        return _provider_down_page(connector, session_id)
    s.commit()
    cs = result.session
    link.send(cs)
    if cs.state == SessionState.FAILED and cs.payment_kind is PaymentKind.CARD:
        form.setup_id = ""
        if user is not None:
            form.payment = ""  # preselect something other than the card that failed
        return _connector_page(connector, form, 402, notice=failure_message(cs.failure_code), decline_help=True,
                               failure_code=cs.failure_code)
    if cs.state == SessionState.FAILED:
        form.errors["payment"] = start_error_message(cs.failure_code or "wallet_insufficient", {})
        return _connector_page(connector, form, 402)
    return redirect(url_for("charging.session_page", session_id=cs.id))


# -- the session page ------------------------------------------------------------------------------


def _card_line(cs: ChargingSession) -> str:
    """How the session is paid, as a driver recognises it."""
    if cs.payment_kind is PaymentKind.WALLET:
        return _("Voltpay wallet")
    row = cs.card_payment
    if row is not None and row.card_last4:
        return f"{(row.card_brand or _('Card')).capitalize()} •••• {row.card_last4}"
    return _("Card")


def _receipt(cs: ChargingSession) -> dict | None:
    """The final bill of a completed session: totals, VAT by rate, and lines by dimension."""
    if cs.final_incl_vat_minor is None:
        return None
    cur = cs.currency
    out = {
        "excl_vat": Money(cs.final_excl_vat_minor or 0, cur),
        "vat": Money(cs.final_vat_minor or 0, cur),
        "incl_vat": Money(cs.final_incl_vat_minor, cur),
        "captured": Money(cs.captured_minor or 0, cur),
        "released": Money(max(0, cs.hold_minor - (cs.captured_minor or 0)), cur),
        "lines": [],
        "vat_rates": [],
    }
    priced = loads(cs.priced_json) if cs.priced_json else {}
    if not isinstance(priced, dict):
        return out
    labels = (
        ("total_energy_cost", _("Energy"), "energy"),
        ("total_time_cost", _("Charging time"), "time"),
        ("total_parking_cost", _("Idle fee (connected, not charging)"), "parking"),
        ("total_fixed_cost", _("Session fee"), None),
    )
    for key, label, quantity in labels:
        cost = priced.get(key) or {}
        incl = cost.get("incl_vat")
        if incl is None or Decimal(str(incl)) == 0:
            continue
        amount = to_minor(Decimal(str(incl)), cur)
        detail = ""
        if quantity == "energy" and priced.get("total_energy") is not None:
            detail = energy_text(Decimal(str(priced["total_energy"])))
        elif quantity == "time":
            detail = duration_text(int(Decimal(str(priced.get("total_time") or 0)) * 3600 - Decimal(str(priced.get("total_parking_time") or 0)) * 3600))
        elif quantity == "parking":
            detail = duration_text(int(Decimal(str(priced.get("total_parking_time") or 0)) * 3600))
        out["lines"].append({"label": label, "detail": detail, "amount": amount})
    rates: dict[Decimal, list[Decimal]] = {}
    for line in priced.get("breakdown") or []:
        if not isinstance(line, dict) or line.get("vat") is None:
            continue
        cost = line.get("cost") or {}
        agg = rates.setdefault(Decimal(str(line["vat"])), [Decimal(0), Decimal(0)])
        agg[0] += Decimal(str(cost.get("excl_vat") or 0))
        agg[1] += Decimal(str(cost.get("incl_vat") or 0))
    if len(rates) > 1:  # one rate: the totals say it all
        for rate, (excl, incl) in sorted(rates.items()):
            base, total = to_minor(excl, cur), to_minor(incl, cur)
            out["vat_rates"].append({"rate": _percent(rate), "base": base, "vat": total - base})
    elif len(rates) == 1:
        out["rate"] = _percent(next(iter(rates)))
    return out


def _percent(rate: Decimal) -> str:
    return format_percent(rate / 100, locale=_locale(), decimal_quantization=False)


def live_view(cs: ChargingSession, now: dt.datetime) -> dict:
    """``service.live`` plus the numbers as text in the request's language and the start window left."""
    data = service.live(db_session(), cs, now)
    cost = Money(data["cost"]["amount"], cs.currency)
    data["display"] = {
        "energy": energy_text(Decimal(data["energy_kwh"])),
        "power": power_text(Decimal(data["power_kw"]) if data["power_kw"] is not None else None),
        "duration": duration_text(data["duration_s"]),
        "cost": money_text(cost),
        "hold": money_text(cs.hold),
        "cap": money_text(Money(cs.cap_minor, cs.currency)) if cs.cap_minor is not None else None,
    }
    left = None
    if cs.state == SessionState.START_REQUESTED and cs.start_deadline is not None:
        left = max(0, int((cs.start_deadline - now).total_seconds()))
    data["start_seconds_left"] = left
    return data


@bp.route("/s/<int:session_id>")
def session_page(session_id: int):
    """One session, whatever its state: 3-D Secure, plug in, live, stopping, the final bill, or what went wrong."""
    token = request.args.get("t")
    if token is not None:
        cs = db_session().get(ChargingSession, session_id)
        if cs is None or not service.visible_to(cs, user=None, guest_token=token[:200]):
            abort(404)
        remember_guest_token(cs.id, token[:200])
        # The token leaves the address bar (and the history, and any Referer): the browser remembers it instead.
        args = {"print": request.args["print"]} if request.args.get("print") else {}
        return redirect(url_for("charging.session_page", session_id=session_id, **args))
    cs = _own_session(session_id)
    now = utcnow()
    provider = cardflow.payment_provider()
    client_secret = notice = None
    if cs.state == SessionState.PENDING and cs.card_payment is not None:
        client_secret, notice = cardflow.pending_action(provider, cs.card_payment)
    connector = cs.connector
    printing = bool(request.args.get("print")) and cs.state == SessionState.COMPLETED
    template = "charging/receipt.html" if printing else "charging/session.html"
    return render_template(
        template,
        cs=cs,
        printing=printing,
        state=cs.state.value,
        connector=connector,
        site=connector.charger.site,
        live=live_view(cs, now),
        ended=cs.state in ENDED_STATES,
        failure=failure_message(cs.failure_code) if cs.state in (SessionState.FAILED, SessionState.START_FAILED, SessionState.START_TIMEOUT, SessionState.CANCELLED) else None,
        declined=cs.state == SessionState.FAILED and cs.failure_code == "card_declined",
        decline_help=DECLINE_HELP,
        receipt=_receipt(cs) if cs.state == SessionState.COMPLETED else None,
        paid_with=_card_line(cs),
        started=local_time(cs.started_at, cs.time_zone),
        stopped=local_time(cs.stopped_at, cs.time_zone),
        ended_at=local_time(cs.ended_at, cs.time_zone),
        created=local_time(cs.created_at, cs.time_zone),
        deadline=local_time(cs.start_deadline, cs.time_zone, "clock"),
        client_secret=client_secret,
        notice=notice,
        poll_seconds=POLL_SECONDS,
        **cardflow.card_entry_context(provider),
    )


@bp.route("/s/<int:session_id>/live.json")
def live_json(session_id: int):
    """The live numbers for charging.js (same access rule as the page); never cached."""
    cs = _own_session(session_id)
    resp = jsonify(live_view(cs, utcnow()))
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/s/<int:session_id>/confirm", methods=["POST"])
def confirm(session_id: int):
    """After 3-D Secure in the browser (or "check again"): check the hold with the provider, then start the charger."""
    cs = _own_session(session_id)
    provider = cardflow.payment_provider()
    gateway = _gateway()
    if provider is None or gateway is None:
        flash(_("We cannot reach our card processor right now. Please check again in a minute."), "warning")
        return redirect(url_for("charging.session_page", session_id=session_id))
    s = db_session()
    try:
        service.continue_after_confirmation(s, provider, gateway, cs, utcnow())
    except ProviderError:
        s.rollback()
        flash(_("We cannot reach our card processor right now. Please check again in a minute."), "warning")
    else:
        s.commit()
    return redirect(url_for("charging.session_page", session_id=session_id))


@bp.route("/s/<int:session_id>/stop", methods=["POST"])
def stop(session_id: int):
    """The stop button: cancel before charging (hold released), or RemoteStop while charging."""
    cs = _own_session(session_id)
    gateway = _gateway()
    s = db_session()
    if gateway is None:
        flash(stop_error_message("charger_not_answering"), "error")
        return redirect(url_for("charging.session_page", session_id=session_id))
    try:
        cs = service.request_stop(s, gateway, cardflow.payment_provider(), cs, by="driver", now=utcnow())
    except ChargingError as e:
        s.rollback()
        flash(stop_error_message(e.code), "error")
    except ProviderError:
        s.rollback()
        flash(_("We cannot reach our card processor right now, so the session was not cancelled. Please try again in a minute."), "error")
    else:
        s.commit()
        if cs.state == SessionState.CHARGING:
            flash(_("Stopping… the charger has been asked to stop."), "success")
    return redirect(url_for("charging.session_page", session_id=session_id))


# -- finding sessions again ------------------------------------------------------------------------


@bp.route("/sessions")
@login_required
def my_sessions():
    """The signed-in driver's sessions, newest first (``before=<id>`` for older ones)."""
    before = request.args.get("before")
    if before is not None and (not before.isdigit() or len(before) > 18):
        abort(400)
    q = select(ChargingSession).where(ChargingSession.user_id == current_user.id)
    if before:
        q = q.where(ChargingSession.id < int(before))
    rows = list(db_session().scalars(q.order_by(ChargingSession.id.desc()).limit(SESSIONS_PAGE + 1)))
    older = rows[SESSIONS_PAGE - 1].id if len(rows) > SESSIONS_PAGE else None
    items = []
    for cs in rows[:SESSIONS_PAGE]:
        amount = None
        if cs.state == SessionState.COMPLETED:
            amount = Money(cs.captured_minor or 0, cs.currency)
        elif cs.is_active and cs.state in (SessionState.CHARGING, SessionState.FINISHING):
            amount = cs.cost
        items.append({"cs": cs, "when": local_time(cs.created_at, cs.time_zone, "short"), "energy": energy_text(cs.energy_wh / 1000),
                      "amount": amount, "state": state_label(cs.state)})
    return render_template("charging/sessions.html", items=items, older=older, first_page=before is None)


def state_label(state: SessionState) -> str:
    """A session's state in a word or two."""
    return str({
        SessionState.PENDING: _l("Waiting for payment"), SessionState.AUTHORIZED: _l("Starting"),
        SessionState.START_REQUESTED: _l("Waiting for your car"), SessionState.CHARGING: _l("Charging"),
        SessionState.FINISHING: _l("Finishing"), SessionState.COMPLETED: _l("Paid"), SessionState.CANCELLED: _l("Cancelled"),
        SessionState.START_FAILED: _l("Did not start"), SessionState.START_TIMEOUT: _l("Not plugged in"),
        SessionState.FAILED: _l("Payment failed"), SessionState.REVIEW: _l("Being checked"),
    }[state])


class FindSessionsForm(FlaskForm):
    """A guest's details to find their sessions: the email, the day, and the card's last four digits."""

    email = EmailField(_l("Email"), validators=[DataRequired(message=_l("Enter your email address.")),
                                                 Email(message=_l("Enter an email address like name@example.com.")), Length(max=254)],
                       filters=[normalize_email], render_kw={"autocomplete": "email"})
    day = DateField(_l("Date of the charge"), validators=[DataRequired(message=_l("Enter the date you charged, for example 2025-03-14."))],
                    description=_l("The day you started charging."))
    last4 = StringField(_l("Last four digits of your card"),
                        validators=[DataRequired(message=_l("Enter the last four digits of the card you paid with.")),
                                    Regexp(r"^[0-9]{4}$", message=_l("Enter exactly four digits."))],
                        filters=[lambda v: (v or "").strip().replace(" ", "")],
                        render_kw={"inputmode": "numeric", "autocomplete": "off", "maxlength": 4})


def _find_email_key() -> str:
    return "find:" + normalize_email(request.form.get("email"))


@bp.route("/sessions/find", methods=["GET", "POST"])
@limiter.limit(FIND_LIMIT, methods=["POST"])
@limiter.limit(FIND_LIMIT, methods=["POST"], key_func=_find_email_key)
def find_sessions():
    """Guests: email + date + card last four → fresh links by email; the same answer whether anything matched or not."""
    form = FindSessionsForm()
    if form.validate_on_submit():
        s = db_session()
        today = utcnow().date()
        day = form.day.data
        found = []
        if abs((today - day).days) <= 3660:  # a date centuries away matches nothing (and would overflow the search window)
            for cs in service.find_guest_sessions(s, email=form.email.data, day=day, last4=form.last4.data):
                found.append((cs, service.new_guest_token(s, cs)))
        notify.send_found_links(form.email.data, found, _locale())
        s.commit()
        session["charging_find_email"] = form.email.data
        return redirect(url_for("charging.find_sent"))
    return render_template("charging/find.html", form=form), 400 if form.errors else 200


@bp.route("/sessions/find/sent")
def find_sent():
    """The one answer to every search: links were sent if anything matched."""
    return render_template("charging/find_sent.html", email=session.get("charging_find_email"))

