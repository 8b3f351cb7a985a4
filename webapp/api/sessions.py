"""JSON API for charging sessions: start (wallet, saved card or a guest's card), follow, stop, 3-D Secure, list.

Views stay thin: validate, call ``webapp.charging.service`` with the request's
session, the payment provider and the charger gateway
(``app.extensions["charger_gateway"]``), answer JSON. Errors are problem+json
with a stable ``code`` and a translated ``detail``.

**Who may see a session.** The account that started it (bearer token), or
the guest who holds its session token (header ``X-Session-Token``). Anyone
else gets 404, never 403: the ids of other people's sessions are not
confirmed to exist. A malformed ``X-Session-Token`` matches no session (404).

**Starting** (``POST /sessions``). The bearer token is optional: with one,
the account pays from its wallet or with one of its saved cards; without
one, a guest pays with a card from the card element (an unattached
``pm_...``) and gives an email address for the receipt and the link.

Status rule: **2xx means the session is under way** (``start_requested``,
or ``pending`` while the bank's 3-D Secure waits: ``client_secret``). A
session that was created but ended at once is a problem naming it in
``session_id``, with nothing left held: **402** when the hold was refused
(``card_declined`` with ``decline_reason``, ``payment_failed``,
``wallet_insufficient``), **409** when the charger refused or could not be
reached at the start (``charger_rejected``, ``charger_offline``). Refusals
before anything is written: 404 ``connector_not_found``; 409
``connector_busy``, ``charger_offline`` (the connection table says no
gateway holds the charger: a state of the connector, not an outage of ours,
so 409 like "busy"), ``connector_faulted``, ``no_tariff``; 422 for what the
driver sent (``cap_too_low`` with ``minimum``, ``cap_currency`` and
``wallet_currency`` with ``currency``, ``energy_cap_invalid``,
``email_required``, ``unknown_payment_method``, ``invalid_request``); 401
``wallet_needs_account`` (sign in to pay from a wallet); 503
``payments_unavailable`` / ``chargers_unavailable``. The provider not
answering once the session exists is 503 ``provider_unavailable`` with
``session_id`` (the session stays pending; the watchdog settles it).

**Idempotency-Key.** Scoped per caller: ``user:<id>`` with a token, and
``guest:<sha256 of the lower-cased email>`` without (a replay must also
repeat the body exactly, ``payment_method_id`` included, which only the
client that created the card knows). From the moment the session is
committed the answer is kept and replayed, whatever it is.

**The guest's session token** is shown in the answer that created the
session (201, and the 402/409/503 problems naming it) and stored nowhere but
as its hash: the stored answer that ``Idempotency-Key`` replays does not
hold it. With a key, the token is derived from the app's secret key, the
caller's scope, the key and the session id (HMAC-SHA256), so a replay can
hand the same token again without it ever being written down; without a
key it is the service's random token. The emailed link carries the same
token. (Rotating ``SECRET_KEY`` makes replays of the last 24 hours hand a
token that no longer matches; the emailed link still works.)

**3-D Secure** (``POST /sessions/{id}/confirm``, after the client confirmed
``client_secret``) answers like the start: 200 with the session under way
(or still ``pending``), 402 or 409 naming it when it ended.
``GET /sessions`` lists the account's own, newest first (``limit``,
``before``, ``state``).

**Stopping** (``POST /sessions/{id}/stop``) answers 202 with the session:
before charging it is cancelled and the hold released at once; while
charging RemoteStopTransaction is sent and billing follows the charger's
StopTransaction. 409 ``charger_offline`` (unplugging the cable stops it),
``stop_rejected``, ``not_stoppable``; 504 ``charger_not_answering``.

Provider and charger calls are made outside any open database transaction
of the request (a network round trip must not hold the SQLite write lock),
with one exception: a stop reads the session under its row lock and keeps it
until the service commits, so that a cancel can never overwrite a session the
charger has just started; cancelling a card session before it charges thus
releases the card hold under that lock.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
from decimal import Decimal

from email_validator import EmailNotValidError, validate_email
from flask import current_app, g, jsonify, make_response, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from payments import wallet
from payments.cards import State
from payments.money import Money
from payments.providers.base import InvalidRequest, PaymentProvider, ProviderError, ProviderUnavailable
from webapp.api import bp, current_token, invalid, is_text, json_body, request_json, token_required
from webapp.api.connectors import find_connector
from webapp.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from webapp.api.idempotency import effect_started, idempotent
from webapp.api.wallet import (
    MAX_ID,
    MAX_LIMIT,
    PAYMENT_METHOD_ID,
    _calling_provider,
    _client_secret,
    _customer_cards,
    _end_transaction,
    _fmt,
    _int_arg,
    _money_field,
    _not_found,
    _provider,
    _unavailable,
)
from webapp.charging import notify, service
from webapp.charging.models import ChargingSession, PaymentKind, SessionState
from webapp.charging.service import ChargingError, StartRequest
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.extensions import limiter
from webapp.models import Charger, Connector

log = logging.getLogger("voltpay.api.sessions")

SESSION_TOKEN_HEADER = "X-Session-Token"
# What a session token can look like (token_urlsafe(24) and our derived tokens are 32 characters); anything else matches nothing.
SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")
MAX_ENERGY_KWH = re.compile(r"[0-9]{1,4}(\.[0-9]{1,3})?")  # the OpenAPI document says the same
MAX_EMAIL = 254
DEFAULT_LIMIT = 20
STATES = [st.value for st in SessionState]


# --- who is asking ------------------------------------------------------------------------------


def optional_token(view):
    """A bearer token when one is sent (an invalid one is 401, as everywhere); ``g.api_user`` is None without one."""

    @functools.wraps(view)
    def wrapper(*a, **kw):
        g.api_user = None
        if "Authorization" in request.headers:
            token = current_token()
            g.api_token = token
            g.api_user = token.user
        return view(*a, **kw)

    return wrapper


def _guest_email() -> str | None:
    """The email of a guest's start request, as the idempotency scope reads it (None when there is none)."""
    body = request_json()
    email = body.get("email") if isinstance(body, dict) else None
    return email.strip().lower() if isinstance(email, str) and is_text(email) else None


def _scope() -> str:
    """The caller's idempotency scope: the account, or a guest known by the hash of their email."""
    if g.api_user is not None:
        return f"user:{g.api_user.id}"
    return "guest:" + hashlib.sha256((_guest_email() or "").encode()).hexdigest()


def _replayable_token(scope: str, key: str, session_id: int) -> str:
    """The guest's session token for a start sent with an Idempotency-Key: recomputed on replay, never stored."""
    msg = f"voltpay-guest-session\x00{scope}\x00{key}\x00{session_id}".encode()
    digest = hmac.new(str(current_app.config["SECRET_KEY"]).encode(), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()  # 32 characters, like the service's own tokens


def _idempotency_key() -> str | None:
    """The request's Idempotency-Key as ``idempotent`` reads it (stripped)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    return key.strip() if key is not None else None


def hands_guest_token(view):
    """Put the guest's ``session_token`` into the answer after ``idempotent`` has stored it (so the stored copy never holds it)."""

    @functools.wraps(view)
    def wrapper(*a, **kw):
        g.guest_session_token = None
        try:
            resp = make_response(view(*a, **kw))
        except Problem as e:  # raised without an Idempotency-Key: the problem goes out as it is, plus the token
            if g.guest_session_token and "session_id" in e.extra:
                e.extra["session_token"] = g.guest_session_token
            e.headers.setdefault("Cache-Control", "no-store")
            raise
        resp.headers["Cache-Control"] = "no-store"
        if g.api_user is not None or not resp.is_json:
            return resp
        body = resp.get_json(silent=True)
        if not isinstance(body, dict):
            return resp
        session_id = body.get("id") if resp.status_code == 201 else body.get("session_id")
        token = g.guest_session_token
        if token is None and resp.headers.get("Idempotent-Replayed") == "true" and isinstance(session_id, int):
            token = _replayable_token(_scope(), _idempotency_key() or "", session_id)
        if token is not None and isinstance(session_id, int):
            body["session_token"] = token
            resp.set_data(current_app.json.dumps(body))
        return resp

    return wrapper


def _gateway() -> service.Gateway:
    """The charger gateway client, or a 503 when this process has none."""
    gateway = current_app.extensions.get("charger_gateway")
    if gateway is None:
        raise Problem(503, "chargers_unavailable", _("Chargers cannot be started or stopped at the moment. Please try again in a few minutes."))
    return gateway


def _visible_session(session_id: int, *, lock: bool = False) -> ChargingSession:
    """The session if the caller may see it (the account's own, or a guest's with its token); else 404. ``lock``: FOR UPDATE."""
    token = request.headers.get(SESSION_TOKEN_HEADER)
    if token is not None and not SESSION_TOKEN.fullmatch(token):
        raise _not_found()
    q = select(ChargingSession).where(ChargingSession.id == session_id)
    if lock:
        q = q.with_for_update(of=ChargingSession)
    cs = db_session().scalar(
        q.options(joinedload(ChargingSession.connector).joinedload(Connector.charger).joinedload(Charger.site),
                  joinedload(ChargingSession.card_payment))
    )
    if cs is None or not service.visible_to(cs, user=g.api_user, guest_token=token):
        raise _not_found()
    return cs


# --- what a session looks like ------------------------------------------------------------------


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def session_json(cs: ChargingSession, *, client_secret: str | None = None) -> dict:
    """A session as the API shows it: where, how it is paid, the hold and limits, the live figures, the final bill."""
    live = service.live(db_session(), cs, utcnow())
    connector = cs.connector
    row = cs.card_payment
    card = {"brand": row.card_brand, "last4": row.card_last4} if row is not None and (row.card_brand or row.card_last4) else None
    final = None
    if cs.state == SessionState.COMPLETED and cs.final_incl_vat_minor is not None:
        m = lambda minor: Money(minor or 0, cs.currency).as_json()  # noqa: E731
        final = {"excl_vat": m(cs.final_excl_vat_minor), "vat": m(cs.final_vat_minor), "incl_vat": m(cs.final_incl_vat_minor),
                 "captured": m(cs.captured_minor)}
    links = {"self": url_for("api.get_session", session_id=cs.id), "stop": url_for("api.stop_session", session_id=cs.id)}
    if cs.state == SessionState.PENDING and cs.payment_kind is PaymentKind.CARD:
        links["confirm"] = url_for("api.confirm_session", session_id=cs.id)
    out = {
        "id": cs.id,
        "state": cs.state.value,
        "connector": {"connector_code": connector.connector_code, "number": connector.number, "site": {"name": connector.charger.site.name}},
        "payment": {"type": cs.payment_kind.value, "card": card},
        "hold": live["hold"],
        "cap": live["cap"],
        "max_energy_kwh": live["max_energy_kwh"],
        "energy_kwh": live["energy_kwh"],
        "power_kw": live["power_kw"],
        "duration_s": live["duration_s"],
        "cost": live["cost"],
        "final": final,
        "stop_requested": live["stop_requested"],
        "created_at": cs.created_at.isoformat(),
        "started_at": _iso(cs.started_at),
        "stopped_at": _iso(cs.stopped_at),
        "ended_at": _iso(cs.ended_at),
        "failure_code": cs.failure_code,
        "links": links,
    }
    if client_secret and cs.state == SessionState.PENDING:
        out["client_secret"] = client_secret
    return out


def _session_response(cs: ChargingSession, status: int = 200, client_secret: str | None = None):
    """The session as JSON, never cached."""
    resp = jsonify(session_json(cs, client_secret=client_secret))
    resp.status_code = status
    resp.headers["Cache-Control"] = "no-store"  # live figures, and a guest's token or a 3-D Secure secret
    return resp


def _pending_secret(cs: ChargingSession) -> str | None:
    """The 3-D Secure client secret of a pending card session (asked from the provider; None if it does not answer)."""
    row = cs.card_payment
    if cs.state != SessionState.PENDING or row is None or row.state != State.REQUIRES_ACTION:
        return None
    provider = current_app.extensions.get("payment_provider")
    if provider is None:
        return None
    _end_transaction()
    return _client_secret(provider, row, required=False)


# --- errors -------------------------------------------------------------------------------------


def charging_problem(e: ChargingError, *, stopping: bool = False) -> Problem:
    """A service refusal as the problem a client can act on (status by who can fix it: 422 the driver, 409 the connector)."""
    code, params = e.code, e.params
    messages = {
        "connector_busy": (409, _("Someone else is using this connector. Choose another one or try again later.")),
        "charger_offline": (409, _("This charger is offline at the moment. Choose another one or try again later.")),
        "connector_faulted": (409, _("This connector is out of order. Choose another one.")),
        "no_tariff": (409, _("This connector has no price at the moment and cannot be used.")),
        "energy_cap_invalid": (422, _("The energy limit must be more than zero.")),
        "email_required": (422, _("Give an email address for the receipt.")),
        "payment_method_required": (422, _("Choose a card.")),
        "payments_unavailable": (503, _("Card payments are not available at the moment.")),
        "not_stoppable": (409, _("This session has already ended.")),
        "stop_rejected": (409, _("The charger refused to stop. Unplug the cable to stop charging.")),
        "charger_not_answering": (504, _("The charger did not answer. Try again, or unplug the cable to stop charging.")),
    }
    if code == "cap_too_low":
        minimum = params["minimum"]
        if minimum.amount <= 0:  # the service cannot name a minimum for some tariffs (energy only): no "at least €0.00"
            return Problem(422, code, _("The cap is too low to charge at this connector. Raise it, or charge without a cap."))
        return Problem(422, code, _("The cap is below the minimum this session can cost: at least %(minimum)s.", minimum=_fmt(minimum)),
                       extra={"minimum": minimum.as_json()})
    if code in ("cap_currency", "wallet_currency"):
        currency = params["currency"]
        detail = (_("The cap must be in %(currency)s, the currency of this charger.", currency=currency) if code == "cap_currency"
                  else _("This charger is paid in %(currency)s, and your wallet is in another currency. Pay with a card.", currency=currency))
        return Problem(422, code, detail, extra={"currency": currency})
    if code == "wallet_needs_account":
        return Problem(401, code, _("Sign in to pay from your wallet, or pay with a card."), headers={"WWW-Authenticate": 'Bearer realm="voltpay"'})
    if code == "charger_offline" and stopping:  # the session is charging and the charger cannot be told to stop
        return Problem(409, code, _("The charger is offline, so it cannot be told to stop. Charging stops when you unplug the cable."))
    status, detail = messages.get(code, (409, _("This cannot be done now.")))
    return Problem(status, code, detail)


def _ended_at_once(cs: ChargingSession) -> None:
    """A session that ended at its start is a problem naming it (402: no hold; 409: the charger did not start); nothing stays held."""
    extra = {"session_id": cs.id}
    if cs.state == SessionState.FAILED:
        if cs.failure_code == "wallet_insufficient":
            raise Problem(402, "wallet_insufficient", _("There is not enough money in your wallet for the hold of %(hold)s. Top up, "
                                                        "lower the cap, or pay with a card.", hold=_fmt(cs.hold)), extra=extra)
        if cs.failure_code == "card_declined":
            reason = (cs.card_payment.failure_code if cs.card_payment is not None else None) or "generic_decline"
            raise Problem(402, "card_declined", _("Your card was declined. Try another card or contact your bank."),
                          extra={**extra, "decline_reason": reason})
        raise Problem(402, "payment_failed", _("The payment could not be made with this card. Try another card."), extra=extra)
    if cs.state == SessionState.START_FAILED:
        if cs.failure_code == "charger_rejected":
            raise Problem(409, "charger_rejected", _("The charger refused to start. Nothing was charged; try again or choose another charger."),
                          extra=extra)
        raise Problem(409, "charger_offline", _("The charger could not be reached. Nothing was charged; try again or choose another charger."),
                      extra=extra)


# --- starting -----------------------------------------------------------------------------------


def _read_start(body: dict, guest: bool) -> dict:
    """The start request's fields, checked as the OpenAPI document describes them; a 422 naming every bad field."""
    errors: dict[str, str] = {}
    code = body.get("connector_code")
    if not isinstance(code, str) or not is_text(code) or not code:
        errors["connector_code"] = _("Send the code printed under the QR code, e.g. D101.")
    payment = body.get("payment")
    kind = pm_id = None
    if isinstance(payment, dict) and payment.get("type") == "wallet" and set(payment) == {"type"}:
        kind = PaymentKind.WALLET
    elif isinstance(payment, dict) and payment.get("type") == "card" and set(payment) == {"type", "payment_method_id"}:
        pm_id = payment["payment_method_id"]
        if isinstance(pm_id, str) and is_text(pm_id) and PAYMENT_METHOD_ID.fullmatch(pm_id):
            kind = PaymentKind.CARD
        else:
            errors["payment"] = _("Send the card's id (pm_...).")
    else:
        errors["payment"] = _('Send {"type": "wallet"} or {"type": "card", "payment_method_id": "pm_..."}.')
    email = body.get("email")
    if email is not None:
        if not isinstance(email, str) or not is_text(email) or len(email) > MAX_EMAIL:
            errors["email"] = _("Enter an email address like name@example.com.")
        else:
            try:
                email = validate_email(email.strip(), check_deliverability=False).normalized.lower()
            except EmailNotValidError:
                errors["email"] = _("Enter an email address like name@example.com.")
            else:
                if len(email) > MAX_EMAIL:
                    errors["email"] = _("Enter an email address like name@example.com.")
    cap = None
    if body.get("cap") is not None:
        cap, error = _money_field(body["cap"])
        if error:
            errors["cap"] = error
        elif cap is not None and cap.amount <= 0:
            errors["cap"] = _("The cap must be more than zero.")
    energy = None
    raw_energy = body.get("max_energy_kwh")
    if raw_energy is not None:
        if isinstance(raw_energy, str) and MAX_ENERGY_KWH.fullmatch(raw_energy):
            energy = Decimal(raw_energy)
        else:
            errors["max_energy_kwh"] = _('Send the energy limit in kWh as a decimal string, e.g. "12.5".')
    if errors:
        raise invalid(errors)
    if guest and kind is PaymentKind.WALLET:
        raise charging_problem(ChargingError("wallet_needs_account", "sign in to pay from your wallet"))
    if guest and not email:
        raise Problem(422, "email_required", _("Give an email address for the receipt, or sign in."))
    return {"code": code, "kind": kind, "payment_method_id": pm_id, "email": email, "cap": cap, "max_energy_kwh": energy}


def _card_for(provider: PaymentProvider, pm_id: str, guest: bool) -> tuple[str | None, str, str]:
    """The card to hold: (customer id, brand, last4). An account's must be one of its saved cards; a guest's must exist."""
    if not guest:
        card = next((c for c in _customer_cards(provider) if c.id == pm_id), None)
        if card is None:
            raise Problem(422, "unknown_payment_method", _("That card is not one of your saved cards. Add it first, or choose another."))
        return wallet.known_customer_id(db_session(), g.api_user.owner), card.brand, card.last4
    _end_transaction()
    try:
        with _calling_provider():
            card = provider.card_of(payment_method_id=pm_id)
    except InvalidRequest:
        raise Problem(422, "unknown_payment_method", _("We could not use that card. Enter it again, or choose another.")) from None
    return None, card.brand, card.last4


@bp.route("/sessions", methods=["POST"])
@limiter.limit("20 per minute;120 per hour")  # guests may send any card: this is also a brake on card testing
@optional_token
@hands_guest_token
@idempotent(_scope)
def create_session():
    """Start charging: hold the money (wallet or card), then ask the charger to start (201; 3-D Secure: ``pending``)."""
    body = json_body()
    user = g.api_user
    guest = user is None
    fields = _read_start(body, guest)
    connector = find_connector(fields["code"])
    if connector is None:
        raise Problem(
            404,
            "connector_not_found",
            _("There is no charging point with this code. Check the code printed next to the QR code on the charger, or scan the QR code again."),
        )
    gateway = _gateway()
    provider = current_app.extensions.get("payment_provider")
    customer_id = brand = last4 = None
    if fields["kind"] is PaymentKind.CARD:
        provider = _provider()
        customer_id, brand, last4 = _card_for(provider, fields["payment_method_id"], guest)
    s = db_session()
    key = _idempotency_key()
    scope = _scope()
    locale = str(get_locale() or "en")

    def on_opened(cs: ChargingSession, token: str | None) -> None:
        """The session is committed: from here on a retry must see this answer; a guest gets the link by email."""
        effect_started()
        g.api_session_id = cs.id
        if token is not None and key:
            token = _replayable_token(scope, key, cs.id)
            cs.access_token_hash = service.token_hash(token)
        g.guest_session_token = token
        _loaded(cs.card_payment, cs.connector.charger.site)  # read now: the card hold that follows is sent with no transaction open
        s.commit()

    req = StartRequest(
        connector=connector, user=user, email=fields["email"], payment_kind=fields["kind"], payment_method_id=fields["payment_method_id"],
        customer_id=customer_id, card_brand=brand, card_last4=last4, cap=fields["cap"], max_energy_kwh=fields["max_energy_kwh"],
        locale=str(get_locale() or "en"),
    )
    try:
        result = service.start_session(s, provider, gateway, req, now=utcnow(), on_opened=on_opened)
    except ChargingError as e:
        raise charging_problem(e) from None
    except ProviderError as e:  # the session exists; the provider's answer is not known
        s.rollback()
        session_id = getattr(e, "session_id", None) or g.get("api_session_id")
        if isinstance(e, ProviderUnavailable):
            raise _unavailable(session_id=session_id) from None
        raise Problem(502, "provider_error", _("The card payment service could not do this. Please try again later."),
                      extra={"session_id": session_id}) from None
    cs = result.session
    token = g.get("guest_session_token")
    if token is not None and cs.state not in service.NOT_CHARGED:
        # Only for a session under way (hold in place or waiting for 3-D Secure): a declined card, a charger that
        # refused or was offline, ended it at once and released the hold; the response says so, no "you started" email.
        try:
            notify.send_guest_link(cs, token, locale)
        except Exception:  # the link is a convenience (the answer carries the token): never lose a paid start over it
            log.exception("guest link for session %s not sent", cs.id)
        _end_transaction()
    _ended_at_once(cs)
    resp = _session_response(cs, 201, client_secret=result.client_secret)
    resp.headers["Location"] = url_for("api.get_session", session_id=cs.id)
    return resp


# --- following, stopping, 3-D Secure, listing ---------------------------------------------------


@bp.route(f"/sessions/<int(max={MAX_ID}):session_id>", methods=["GET"])
@optional_token
def get_session(session_id: int):
    """One session as it stands now: state, energy, power, duration, cost so far, the final bill when done."""
    cs = _visible_session(session_id)
    return _session_response(cs, client_secret=_pending_secret(cs))


def _loaded(*_objects: object) -> None:
    """Nothing: its arguments (relationships) were read to call it, so the service later finds them without a query."""


def _before_network(cs: ChargingSession) -> None:
    """Load what the service will read, then end the read transaction: its provider and charger calls then hold no lock."""
    _loaded(cs.card_payment, cs.connector.charger.site)
    _end_transaction()


@bp.route(f"/sessions/<int(max={MAX_ID}):session_id>/stop", methods=["POST"])
@optional_token
def stop_session(session_id: int):
    """Stop charging (202): before the car charges the session is cancelled and released; while charging the charger is told to stop."""
    gateway = _gateway()
    provider = current_app.extensions.get("payment_provider")
    s = db_session()
    # Read under the row lock (SQLite: the write lock) and kept until the service commits: a StartTransaction arriving
    # meanwhile waits, so a cancel is never written over a session that has just started charging (free energy). The
    # price: releasing a card hold before charging asks the provider under that lock.
    cs = _visible_session(session_id, lock=True)
    try:
        with _calling_provider(session_id=cs.id):  # releasing a card hold asks the provider
            cs = service.request_stop(s, gateway, provider, cs, by="driver", now=utcnow())
    except ChargingError as e:
        s.rollback()
        raise charging_problem(e, stopping=True) from None
    return _session_response(cs, 202)


@bp.route(f"/sessions/<int(max={MAX_ID}):session_id>/confirm", methods=["POST"])
@optional_token
def confirm_session(session_id: int):
    """After 3-D Secure in the client: check the card hold, then start the charger (answers like the start itself)."""
    cs = _visible_session(session_id)
    if cs.state == SessionState.PENDING and cs.payment_kind is PaymentKind.CARD:
        provider = _provider()
        gateway = _gateway()
        s = db_session()
        _before_network(cs)
        with _calling_provider(session_id=cs.id):
            try:
                cs = service.continue_after_confirmation(s, provider, gateway, cs, utcnow())
            except InvalidRequest:
                s.rollback()
                raise ProviderError("the provider does not know this payment") from None
    _ended_at_once(cs)
    return _session_response(cs, client_secret=_pending_secret(cs))


@bp.route("/sessions", methods=["GET"])
@token_required
def list_sessions():
    """The account's sessions, newest first; page with ``before=next_before``, filter with ``state``."""
    errors: dict[str, str] = {}
    limit = _int_arg("limit", 1, MAX_LIMIT, errors, default=DEFAULT_LIMIT)
    before = _int_arg("before", 1, MAX_ID, errors)
    state = request.args.get("state")
    if state is not None and state not in STATES:
        errors["state"] = _("Send one of: %(states)s.", states=", ".join(STATES))
    if errors:
        raise invalid(errors)
    q = (
        select(ChargingSession).where(ChargingSession.user_id == g.api_user.id)
        .options(joinedload(ChargingSession.connector).joinedload(Connector.charger).joinedload(Charger.site),
                 joinedload(ChargingSession.card_payment))
        .order_by(ChargingSession.id.desc()).limit(limit + 1)
    )
    if before is not None:
        q = q.where(ChargingSession.id < before)
    if state is not None:
        q = q.where(ChargingSession.state == SessionState(state))
    rows = list(db_session().scalars(q).unique())
    more = len(rows) > limit
    rows = rows[:limit]
    resp = jsonify(data=[session_json(cs) for cs in rows], next_before=rows[-1].id if more else None)
    resp.headers["Cache-Control"] = "no-store"
    return resp


__all__ = ["charging_problem", "session_json"]
