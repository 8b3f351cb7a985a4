"""JSON API for meters: a meter's status (public fields, or the tenant's view), and top-ups by saved card or wallet.

``GET /meters/{meter_code}`` needs no token: anyone holding the code sees
what the QR page shows a stranger (the meter, its building and unit, the
price now and next, whether and how it can be topped up). With the token of
the meter's tenant the answer also carries ``tenant``: serial, balance,
days of credit left, last reading, relay state and this month's usage
(see ``webapp.meters.views`` for why a stranger sees no more).

``POST /meters/{meter_code}/top-ups`` needs a token (the payer's account)
and an ``Idempotency-Key`` (400 without one): a top-up moves money, and a
client that retries after a timeout must not pay twice. It pays with one of
the account's saved cards (3-D Secure: ``requires_action`` with
``client_secret``, then ``POST .../confirm``) or from the account's wallet
(booked at once, in one transaction, never below zero). Anyone may top up
any tenant meter, as on the QR page.
"""

from __future__ import annotations

import functools
from decimal import Decimal

from flask import g, jsonify, request
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l

from payments import cards
from payments import wallet as wallet_mod
from payments.cards import CardPayment, Purpose, State
from webapp.api import bp, invalid, is_text, json_body, token_required
from webapp.api.idempotency import HEADER, idempotent
from webapp.api.sessions import optional_token
from webapp.api.wallet import (
    MAX_ID,
    PAYMENT_METHOD_ID,
    _client_secret,
    _confirm,
    _money_field,
    _out_of_range,
    _pending_client_secret,
    _provider,
    _saved_card,
    _submit,
)
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.meters import topup
from webapp.meters.views import PriceWindow, find_meter, meter_status

REFUSALS = {
    "postpaid": _l("This meter is post-paid: it is billed monthly and cannot be topped up."),
    "no_tenant": _l("This meter has no tenant account at the moment, so it cannot be topped up."),
    "not_a_tenant_meter": _l("This meter is not a tenant's meter and cannot be topped up."),
}


def _scope() -> str:
    return f"user:{g.api_user.id}"


def _meter_or_404(meter_code: str):
    meter = find_meter(meter_code)
    if meter is None:
        raise Problem(404, "meter_not_found", _("There is no meter with this code."))
    return meter


def _window(w: PriceWindow | None) -> dict | None:
    if w is None:
        return None
    return {"band": w.band, "price_per_kwh": str(w.price_incl.quantize(Decimal("0.0001"))),
            "vat_rate": format(w.vat.normalize(), "f"), "currency": w.currency,
            "from": w.start.isoformat() if w.start else None, "until": w.end.isoformat() if w.end else None}


def _refusal_message(code: str) -> str:
    return str(REFUSALS.get(code, REFUSALS["not_a_tenant_meter"]))


@bp.route("/meters/<meter_code>", methods=["GET"])
@optional_token
def get_meter(meter_code: str):
    """A meter as its QR page shows it; the tenant's token adds balance, readings and relay state."""
    meter = _meter_or_404(meter_code)
    st = meter_status(meter, g.api_user, utcnow())
    lo, hi, presets = wallet_mod.limits_for(st.currency).money(st.currency)
    site = meter.site
    out = {
        "meter_code": meter.meter_code,
        "building": {"name": site.name, "address": site.address or "", "time_zone": site.time_zone or "UTC"},
        "unit": meter.tenant.unit or None if meter.tenant is not None else None,
        "currency": st.currency,
        "price": {"now": _window(st.price_now), "next": _window(st.price_next), "kind": st.tariff_kind},
        "top_up": {"available": st.can_top_up is None, "refusal": st.can_top_up, "minimum": lo.as_json(), "maximum": hi.as_json(),
                   "presets": [p.as_json() for p in presets]},
        "tenant": None,
    }
    if st.tenant_view:
        out["tenant"] = {
            "serial": meter.serial,
            "billing": "prepaid" if st.balance is not None else "postpaid",
            "balance": st.balance.as_json() if st.balance is not None else None,
            "days_left": st.days_left,
            "last_reading": {"at": st.reading.at.isoformat(), "register_kwh": str(st.reading.register_kwh)} if st.reading else None,
            "relay_state": st.relay[0] if st.relay else "on",
            "month_kwh": str(st.usage.month_kwh.quantize(Decimal("0.001"))) if st.usage else "0.000",
        }
    return jsonify(out)


def idempotency_key_required(view):
    """A 400 problem when the request carries no Idempotency-Key (moving money without one is refused here)."""

    @functools.wraps(view)
    def wrapper(*a, **kw):
        if request.headers.get(HEADER) is None:
            raise Problem(400, "idempotency_key_required", _("Send an Idempotency-Key header (e.g. a new UUID) with every top-up."))
        return view(*a, **kw)

    return wrapper


def top_up_json(row: CardPayment, meter_code: str, client_secret: str | None = None) -> dict:
    """A card top-up of a meter as the API shows it."""
    doc = topup.receipt_of(db_session(), f"card_payment:{row.id}") if row.state == State.SUCCEEDED else None
    return {
        "id": row.id, "source": "card", "meter_code": meter_code, "state": row.state.value, "amount": row.amount.as_json(),
        "receipt_number": doc.number if doc is not None else None,
        "client_secret": client_secret if row.state == State.REQUIRES_ACTION else None,
        "failure_code": (row.failure_code or "payment_failed") if row.state == State.FAILED else None,
        "created_at": row.created_at.isoformat(),
    }


def meter_required(view):
    """404 for an unknown meter before the Idempotency-Key is recorded (nothing can move for a meter that does not exist)."""

    @functools.wraps(view)
    def wrapper(meter_code: str, *a, **kw):
        _meter_or_404(meter_code)
        return view(meter_code, *a, **kw)

    return wrapper


@bp.route("/meters/<meter_code>/top-ups", methods=["POST"])
@token_required
@idempotency_key_required
@meter_required
@idempotent(_scope)
def create_meter_top_up(meter_code: str):
    """Top up a meter with a saved card or the wallet (201; 3-D Secure: ``requires_action``)."""
    meter = _meter_or_404(meter_code)
    body = json_body()
    errors: dict[str, str] = {}
    amount, error = _money_field(body.get("amount"))
    if error:
        errors["amount"] = error
    payment = body.get("payment")
    kind = payment.get("type") if isinstance(payment, dict) else None
    pm_id = payment.get("payment_method_id") if isinstance(payment, dict) else None
    if kind not in ("wallet", "card"):
        errors["payment"] = _('Send "payment": {"type": "wallet"} or {"type": "card", "payment_method_id": "pm_..."}.')
    elif kind == "card" and (not isinstance(pm_id, str) or not is_text(pm_id) or not PAYMENT_METHOD_ID.fullmatch(pm_id)):
        errors["payment.payment_method_id"] = _("Send the id of one of your saved cards (pm_...).")
    if errors:
        raise invalid(errors)
    assert amount is not None
    refusal = topup.refusal(meter)
    if refusal is not None:
        raise Problem(409, "meter_not_payable", _refusal_message(refusal), extra={"refusal": refusal})
    try:
        topup.check_amount(meter, amount)
    except topup.MeterTopUpError as e:
        currency = topup.meter_currency(meter)
        if e.code == "wrong_currency":
            raise Problem(422, "wrong_currency", _("This meter is topped up in %(currency)s.", currency=currency), extra={"currency": currency}) from None
        raise _out_of_range(e.params) from None
    user = g.api_user
    s = db_session()
    if kind == "wallet":
        try:
            done = topup.top_up_from_wallet(s, meter=meter, user=user, amount=amount, key=f"api:{user.id}:{request.headers[HEADER].strip()[:150]}")
        except topup.MeterTopUpError as e:
            s.rollback()
            if e.code == "wallet_insufficient":
                raise Problem(402, "wallet_insufficient", _("Your wallet holds less than this top-up."), extra={"balance": e.params["balance"].as_json()}) from None
            raise Problem(422, "wallet_currency", _("Your wallet is in %(currency)s: pay this meter with a card.", currency=user.currency),
                          extra={"currency": user.currency}) from None
        s.commit()
        resp = jsonify({"id": None, "source": "wallet", "meter_code": meter.meter_code, "state": "succeeded", "amount": done.amount.as_json(),
                        "receipt_number": done.document.number, "client_secret": None, "failure_code": None,
                        "created_at": done.document.issued_at.isoformat()})
        resp.status_code = 201
        return resp

    provider = _provider()
    card = _saved_card(provider, pm_id)
    s = db_session()
    meter = _meter_or_404(meter_code)  # the transaction was ended for the provider call
    row = topup.start_meter_top_up(s, meter=meter, owner=user.owner, email=user.email, amount=amount, payment_method_id=card.id,
                                   customer_id=wallet_mod.known_customer_id(s, user.owner))
    row.card_brand, row.card_last4 = card.brand, card.last4
    s.commit()
    _submit(s, provider, row)
    resp = jsonify(top_up_json(row, meter.meter_code, _client_secret(provider, row, required=False)))
    resp.status_code = 201
    return resp


def _own_top_up(meter_code: str, top_up_id: int) -> CardPayment:
    meter = _meter_or_404(meter_code)
    row = db_session().get(CardPayment, top_up_id)
    if row is None or row.purpose != Purpose.METER_TOP_UP or row.reference != topup.meter_ref(meter) or row.owner != g.api_user.owner:
        raise Problem(404, "not_found", _("We could not find that."))
    return row


@bp.route(f"/meters/<meter_code>/top-ups/<int(max={MAX_ID}):top_up_id>", methods=["GET"])
@token_required
def get_meter_top_up(meter_code: str, top_up_id: int):
    """One of the account's card top-ups of this meter."""
    row = _own_top_up(meter_code, top_up_id)
    secret = _pending_client_secret(row)
    return jsonify(top_up_json(row, _meter_or_404(meter_code).meter_code, secret))


@bp.route(f"/meters/<meter_code>/top-ups/<int(max={MAX_ID}):top_up_id>/confirm", methods=["POST"])
@token_required
def confirm_meter_top_up(meter_code: str, top_up_id: int):
    """After 3-D Secure in the client: ask the provider where the payment stands and credit the meter (once)."""
    provider = _provider()
    row = _own_top_up(meter_code, top_up_id)
    code = _meter_or_404(meter_code).meter_code
    if row.provider_payment_id is None or row.state in cards.FINAL:
        return jsonify(top_up_json(row, code))
    row, client_secret = _confirm(provider, row)
    return jsonify(top_up_json(row, code, client_secret))
