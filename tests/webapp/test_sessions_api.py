"""The charging-session JSON API as a client meets it: start (wallet, saved card, guest card), follow, stop, 3-D Secure, list.

Card holds go to localstripe through the official SDK; what stripe.js and the
bank's 3-D Secure page do is done by ``tests/stripe_browser.py``. The charger
side is ``ChargerStandIn``: it stands in for the gateway process and its
chargers (records each command, answers it as told), so these tests are
about the API; the real gateway is tested end to end over OCPP websockets
elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal as D

import pytest
import stripe
from sqlalchemy import select

from payments import wallet
from payments.base import utcnow
from payments.cards import CardPayment
from payments.ledger import AccountKind, JournalEntry, get_account, transfer
from payments.money import Money
from payments.tariff_store import add_version, connector_owner
from tests.stripe_browser import DECLINED_AT_CHARGE, MASTERCARD, THREE_D_SECURE, VISA, browser_card, confirm_card_setup, pass_3ds
from tests.webapp.problems import assert_problem
from webapp.auth.tokens import digest
from webapp.charging import service
from webapp.charging.models import ChargeCommand, ChargerConnection, ChargingSession, CommandStatus, SessionState
from webapp.models import ApiToken, Charger, Connector, IdempotencyRecord, Operator, Site, User

# 0.35 €/kWh excl. VAT (0.4235 incl. 21 %): the default hold is 60 kWh × 0.4235 = 25.41 €
SIMPLE = {"id": "T-SIMPLE", "currency": "EUR", "type": "AD_HOC_PAYMENT",
          "elements": [{"price_components": [{"type": "ENERGY", "price": D("0.35"), "vat": D("21.0"), "step_size": 1}]}]}
HOLD = 2541
# A 2.00 € session fee (2.42 € incl. VAT) on top: no cap below that can pay for a session
WITH_FEE = {"id": "T-FEE", "currency": "EUR", "type": "AD_HOC_PAYMENT", "elements": [{"price_components": [
    {"type": "FLAT", "price": D("2.00"), "vat": D("21.0"), "step_size": 1},
    {"type": "ENERGY", "price": D("0.35"), "vat": D("21.0"), "step_size": 1}]}]}


def eur(cents: int) -> dict:
    return {"amount": cents, "currency": "EUR"}


class ChargerStandIn:
    """Stands in for the gateway process and its chargers: records each command (as GatewayClient does) and answers as told."""

    def __init__(self) -> None:
        self.answer = CommandStatus.ACCEPTED
        self.calls: list[tuple[str, dict]] = []

    def call(self, s, charger, action, payload, *, key, session_id=None, requested_by="system"):
        """``service.Gateway.call``: the command row, then the charger's answer."""
        self.calls.append((action, payload))
        s.add(ChargeCommand(charger_id=charger.id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                            idempotency_key=key, requested_by=requested_by[:64], status=self.answer))
        s.commit()
        return service.CommandResult(self.answer, {"status": "Accepted"} if self.answer is CommandStatus.ACCEPTED else None)

    def actions(self) -> list[str]:
        return [action for action, _payload in self.calls]


class Client:
    """An API client: the bearer token of an account, or none (a guest); JSON bodies."""

    def __init__(self, app, user: User | None = None, secret: str | None = None) -> None:
        self.app = app
        self.user = user
        self.http = app.test_client()
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def get(self, path: str, **kw):
        return self.http.get("/api/v1" + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, json=None, **kw):
        return self.http.post("/api/v1" + path, json=json, headers={**self.headers, **kw.pop("headers", {})}, **kw)


@pytest.fixture(autouse=True)
def paying(app_config, stripe_config):
    """Card payments on (localstripe, emptied per test)."""
    app_config.update(stripe_config)


@pytest.fixture
def charger(app) -> ChargerStandIn:
    """The charger side of every command of this test's app."""
    stand_in = ChargerStandIn()
    app.extensions["charger_gateway"] = stand_in
    return stand_in


@pytest.fixture
def site(app, charger):
    """A Madrid site: charger CP-1 online with A101 (simple tariff) and A102 (a session fee); CP-2 with B101, never connected."""
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Op", legal_name="Op S.L.")
        s.add(op)
        s.flush()
        place = Site(operator_id=op.id, name="Car park", time_zone="Europe/Madrid", currency="EUR")
        s.add(place)
        s.flush()
        for cp, codes in (("CP-1", {1: ("A101", SIMPLE), 2: ("A102", WITH_FEE)}), ("CP-2", {1: ("B101", SIMPLE)})):
            ch = Charger(site_id=place.id, charge_point_id=cp, password_hash="x")
            s.add(ch)
            s.flush()
            for number, (code, tariff) in codes.items():
                c = Connector(charger_id=ch.id, number=number, connector_code=code, max_power_kw=22, status="Available")
                s.add(c)
                s.flush()
                add_version(s, connector_owner(c.id), tariff, site_currency="EUR", created_by="test")
            if cp == "CP-1":
                s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id="c1"))
    return app


@pytest.fixture
def signed_in(app, make_user):
    """``signed_in(email, euros=0)``: a verified account (with money in its wallet) and an API client with a token."""

    def make(email: str, euros: int = 0, **fields) -> Client:
        user = make_user(email=email, **fields)
        secret = f"vp_sessions-test-{user.id}"
        with app.extensions["db_sessionmaker"].begin() as s:
            s.add(ApiToken(user_id=user.id, token_hash=digest(secret), name="tests", expires_at=utcnow() + dt.timedelta(days=1)))
            if euros:
                transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                         credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(euros * 100, "EUR"))
        return Client(app, user, secret)

    return make


@pytest.fixture
def ana(site, signed_in) -> Client:
    return signed_in("ana@example.com", euros=50)


@pytest.fixture
def ben(site, signed_in) -> Client:
    return signed_in("ben@example.com", euros=50)


@pytest.fixture
def guest(site) -> Client:
    return Client(site)


@pytest.fixture
def add_card(stripe_config):
    """Save a card through the API (setup → stripe.js confirms → POST the setup id); returns its id."""

    def add(client: Client, number: str = VISA) -> str:
        setup = client.post("/payment-methods/setup").json
        confirm_card_setup(stripe_config, setup["setup_id"], number)
        saved = client.post("/payment-methods", json={"setup_id": setup["setup_id"]})
        assert saved.status_code == 201, saved.json
        return saved.json["id"]

    return add


def sdk(config: dict) -> stripe.StripeClient:
    return stripe.StripeClient(config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=0)


def db(app):
    return app.extensions["db_sessionmaker"]()


def sessions(app) -> list[ChargingSession]:
    with db(app) as s:
        return list(s.scalars(select(ChargingSession).order_by(ChargingSession.id)))


def card_payments(app) -> list[CardPayment]:
    with db(app) as s:
        return list(s.scalars(select(CardPayment).order_by(CardPayment.id)))


def start_wallet(client: Client, code: str = "A101", **extra):
    return client.post("/sessions", json={"connector_code": code, "payment": {"type": "wallet"}, **extra})


def start_card(client: Client, pm: str, code: str = "A101", **extra):
    return client.post("/sessions", json={"connector_code": code, "payment": {"type": "card", "payment_method_id": pm}, **extra})


def guest_start(guest: Client, config: dict, number: str = VISA, email: str = "gus@example.com", **kw):
    return start_card(guest, browser_card(config, number), email=email, **kw)


def plugged_in(app, session_id: int, at: dt.datetime | None = None) -> None:
    """The car is plugged in and the charger reports StartTransaction for the session (as the gateway applies it)."""
    with app.app_context(), db(app) as s:
        cs = s.get(ChargingSession, session_id)
        ch = cs.connector.charger
        at = at or utcnow()
        ans = service.start_transaction(s, ch, connector_number=cs.connector.number, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=at, now=at)
        s.commit()
    assert ans.id_tag_status == "Accepted"


# --- starting ------------------------------------------------------------------------------------


def test_a_wallet_session_holds_the_money_and_asks_the_charger_to_start(app, ana, charger):
    resp = start_wallet(ana)

    assert resp.status_code == 201, resp.json
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Location"] == f"/api/v1/sessions/{resp.json['id']}"
    body = resp.json
    assert (body["state"], body["hold"], body["cap"], body["payment"]) == ("start_requested", eur(HOLD), None, {"type": "wallet", "card": None})
    assert body["connector"] == {"connector_code": "A101", "number": 1, "site": {"name": "Car park"}}
    assert (body["energy_kwh"], body["power_kw"], body["duration_s"], body["cost"], body["final"]) == ("0.000", None, 0, eur(0), None)
    assert body["max_energy_kwh"] == "60" and body["started_at"] is None and body["failure_code"] is None
    assert "session_token" not in body and "client_secret" not in body
    [cs] = sessions(app)
    assert charger.calls == [("RemoteStartTransaction", {"connector_id": 1, "id_tag": cs.id_tag})]
    # The hold moved from the wallet to the hold account: one journal entry, keyed by the session
    shown = ana.get("/wallet").json
    assert (shown["balance"], shown["held"]) == (eur(5000 - HOLD), eur(HOLD))
    with db(app) as s:
        assert wallet.wallet_balance(s, ana.user.owner, "EUR") == Money(5000 - HOLD, "EUR")
        assert s.scalars(select(JournalEntry.reference).where(JournalEntry.reference.like("session:%"))).all() == [f"session:{cs.id}:wallet"]
    assert ana.get(f"/sessions/{body['id']}").json == body
    assert ana.get("/connectors/A101").json["status"] == "in_use"


def test_a_spending_and_an_energy_cap_lower_the_hold(app, ana):
    capped = start_wallet(ana, cap=eur(1000)).json
    assert capped["hold"]["amount"] <= 1000 and capped["cap"] == eur(1000)
    assert ana.get("/wallet").json["held"] == capped["hold"]
    ana.post(f"/sessions/{capped['id']}/stop")
    limited = start_wallet(ana, max_energy_kwh="12.5", cap=eur(3000)).json
    # 12.5 kWh × 0.4235 = 5.29375 €, rounded up to 5.30 €: below the cap, which then changes nothing
    assert (limited["hold"], limited["cap"], limited["max_energy_kwh"]) == (eur(530), None, "12.5")


def test_a_saved_card_session_is_a_card_hold_at_the_provider(app, ana, add_card, charger, stripe_config):
    pm = add_card(ana)
    resp = start_card(ana, pm)

    assert resp.status_code == 201, resp.json
    assert resp.json["state"] == "start_requested" and resp.json["payment"] == {"type": "card", "card": {"brand": "visa", "last4": "4242"}}
    [row] = card_payments(app)
    intent = sdk(stripe_config).v1.payment_intents.retrieve(row.provider_payment_id)
    assert (intent.status, intent.amount, intent.currency, intent.capture_method) == ("requires_capture", HOLD, "eur", "manual")
    with db(app) as s:
        assert row.provider_customer_id == wallet.known_customer_id(s, ana.user.owner)
    assert ana.get("/wallet").json["balance"] == eur(5000)  # the wallet is not touched
    assert charger.actions() == ["RemoteStartTransaction"]


def test_only_ones_own_saved_cards_can_pay(app, ana, ben, add_card):
    anas = add_card(ana)
    add_card(ben, MASTERCARD)
    assert "saved cards" in assert_problem(start_card(ben, anas), 422, "unknown_payment_method")["detail"]
    assert_problem(start_card(ana, "pm_doesnotexist"), 422, "unknown_payment_method")
    assert sessions(app) == [] and card_payments(app) == []


def test_a_guest_pays_by_card_and_follows_the_session_with_its_token(app, guest, ana, charger, stripe_config, mailbox):
    resp = guest_start(guest, stripe_config, email="Gus@Example.com")

    assert resp.status_code == 201, resp.json
    body = resp.json
    token = body.pop("session_token")
    assert body["state"] == "start_requested" and body["payment"] == {"type": "card", "card": {"brand": "visa", "last4": "4242"}}
    [cs] = sessions(app)
    assert (cs.user_id, cs.email, cs.access_token_hash) == (None, "gus@example.com", hashlib.sha256(token.encode()).hexdigest())
    [row] = card_payments(app)
    assert row.provider_customer_id is None and row.state.value == "authorized"

    seen = guest.get(f"/sessions/{cs.id}", headers={"X-Session-Token": token})
    assert seen.status_code == 200 and seen.json == body and seen.headers["Cache-Control"] == "no-store"
    assert guest.post(f"/sessions/{cs.id}/confirm", headers={"X-Session-Token": token}).json["state"] == "start_requested"
    # Anyone else: not found (a session's existence is not confirmed)
    for other in (guest.get(f"/sessions/{cs.id}"), ana.get(f"/sessions/{cs.id}"),
                  guest.get(f"/sessions/{cs.id}", headers={"X-Session-Token": "A" * 32}),
                  guest.get(f"/sessions/{cs.id}", headers={"X-Session-Token": token + "!"}),
                  guest.post(f"/sessions/{cs.id}/stop"), ana.post(f"/sessions/{cs.id}/stop"), ana.post(f"/sessions/{cs.id}/confirm")):
        assert_problem(other, 404, "not_found")
    assert ana.get("/sessions").json["data"] == []
    # The emailed link carries the same token
    assert mailbox.last_link("gus@example.com", f"/s/{cs.id}").endswith(f"?t={token}")
    assert charger.actions() == ["RemoteStartTransaction"]


def test_a_guest_must_give_a_valid_email_and_pay_by_card(app, guest, stripe_config):
    pm = browser_card(stripe_config, VISA)
    assert "email" in assert_problem(start_card(guest, pm, email="not an email"), 422, "invalid_request")["errors"]
    assert "email" in assert_problem(start_card(guest, pm, email="ana@localhost"), 422, "invalid_request")["errors"]
    assert_problem(start_card(guest, pm), 422, "email_required")
    resp = start_wallet(guest, email="gus@example.com")
    assert_problem(resp, 401, "wallet_needs_account")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_problem(start_card(guest, "pm_doesnotexist", email="gus@example.com"), 422, "unknown_payment_method")
    assert sessions(app) == [] and card_payments(app) == []


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"connector_code", "payment"}),
        ({"connector_code": 101, "payment": {"type": "wallet"}}, {"connector_code"}),
        ({"connector_code": "A101", "payment": "wallet"}, {"payment"}),
        ({"connector_code": "A101", "payment": {"type": "bitcoin"}}, {"payment"}),
        ({"connector_code": "A101", "payment": {"type": "wallet", "payment_method_id": "pm_1"}}, {"payment"}),
        ({"connector_code": "A101", "payment": {"type": "card"}}, {"payment"}),
        ({"connector_code": "A101", "payment": {"type": "card", "payment_method_id": "card_1"}}, {"payment"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": 1000}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": {"amount": 10.5, "currency": "EUR"}}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": {"amount": "1000", "currency": "EUR"}}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": {"amount": 1000}}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": {"amount": 0, "currency": "EUR"}}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "cap": {"amount": 1000, "currency": "eur"}}, {"cap"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "max_energy_kwh": 12.5}, {"max_energy_kwh"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "max_energy_kwh": "-1"}, {"max_energy_kwh"}),
        ({"connector_code": "A101", "payment": {"type": "wallet"}, "email": "nope"}, {"email"}),
    ],
)
def test_a_malformed_start_names_the_fields(app, ana, body, fields):
    problem = assert_problem(ana.post("/sessions", json=body), 422, "invalid_request")
    assert set(problem["errors"]) == fields and all(problem["errors"].values())
    assert sessions(app) == [] and ana.get("/wallet").json["held"] == eur(0)


def test_refusals_before_anything_is_held(app, ana):
    assert "code printed next to the QR code" in assert_problem(start_wallet(ana, "NOPE"), 404, "connector_not_found")["detail"]
    assert_problem(start_wallet(ana, "x" * 40), 404, "connector_not_found")
    low = assert_problem(start_wallet(ana, "A102", cap=eur(100)), 422, "cap_too_low")
    assert low["minimum"]["currency"] == "EUR" and low["minimum"]["amount"] >= 242  # the 2.42 € session fee at least
    assert "€" in low["detail"]
    tiny = assert_problem(start_wallet(ana, cap=eur(1)), 422, "cap_too_low")  # one cent buys no minute of charging at A101
    assert tiny.get("minimum", {"amount": 1})["amount"] > 0  # never "at least €0.00"
    assert assert_problem(start_wallet(ana, cap={"amount": 1000, "currency": "USD"}), 422, "cap_currency")["currency"] == "EUR"
    assert_problem(start_wallet(ana, max_energy_kwh="0"), 422, "energy_cap_invalid")
    assert_problem(start_wallet(ana, "B101"), 409, "charger_offline")  # no gateway holds CP-2
    shown = ana.get("/wallet").json
    assert sessions(app) == [] and (shown["balance"], shown["held"]) == (eur(5000), eur(0))
    bad = Client(app, secret="vp_not-a-token")
    assert_problem(start_wallet(bad), 401, "invalid_token")


def test_a_wallet_in_another_currency_is_refused(app, site, signed_in):
    taro = signed_in("taro@example.com", currency="JPY")
    assert assert_problem(start_wallet(taro), 422, "wallet_currency")["currency"] == "EUR"


def test_a_busy_connector_is_409_and_the_second_driver_pays_nothing(app, ana, ben, charger):
    assert start_wallet(ana).status_code == 201
    assert "someone else" in assert_problem(start_wallet(ben), 409, "connector_busy")["detail"].lower()
    assert len(sessions(app)) == 1 and ben.get("/wallet").json["held"] == eur(0)
    assert ben.get("/connectors/A101").json["status"] == "in_use" and ben.get("/connectors/A102").json["status"] == "available"
    assert start_wallet(ben, "A102").status_code == 201  # the other connector of the same charger is free
    assert charger.actions() == ["RemoteStartTransaction"] * 2


def test_too_little_in_the_wallet_is_402_naming_the_failed_session(app, site, signed_in):
    poor = signed_in("poor@example.com", euros=10)
    problem = assert_problem(start_wallet(poor), 402, "wallet_insufficient")
    [cs] = sessions(app)
    assert problem["session_id"] == cs.id and cs.state == SessionState.FAILED and cs.active_connector_id is None
    assert poor.get("/wallet").json["balance"] == eur(1000) and poor.get("/wallet").json["held"] == eur(0)
    assert start_wallet(poor, cap=eur(800)).status_code == 201  # a cap within the balance does


def test_a_declined_card_is_402_and_frees_the_connector(app, guest, charger, stripe_config):
    problem = assert_problem(guest_start(guest, stripe_config, DECLINED_AT_CHARGE), 402, "card_declined")
    assert problem["decline_reason"] == "card_declined" and problem["session_token"]
    shown = guest.get(f"/sessions/{problem['session_id']}", headers={"X-Session-Token": problem["session_token"]}).json
    assert (shown["state"], shown["failure_code"]) == ("failed", "card_declined")
    assert charger.calls == []
    assert guest_start(guest, stripe_config).status_code == 201


def test_a_charger_that_refuses_the_start_is_409_and_the_hold_is_released(app, ana, charger):
    charger.answer = CommandStatus.REJECTED
    problem = assert_problem(start_wallet(ana), 409, "charger_rejected")
    shown = ana.get(f"/sessions/{problem['session_id']}").json
    assert (shown["state"], shown["failure_code"]) == ("start_failed", "charger_rejected")
    assert ana.get("/wallet").json["balance"] == eur(5000) and ana.get("/wallet").json["held"] == eur(0)
    charger.answer = CommandStatus.NOT_CONNECTED
    assert_problem(start_wallet(ana), 409, "charger_offline")
    assert ana.get("/wallet").json["held"] == eur(0)


# --- Idempotency-Key ----------------------------------------------------------------------------


def test_the_same_key_replays_the_session_without_a_second_hold(app, ana, charger):
    key = {"Idempotency-Key": "start-2026-11-22-a"}
    first = ana.post("/sessions", json={"connector_code": "A101", "payment": {"type": "wallet"}}, headers=key)
    again = ana.post("/sessions", json={"payment": {"type": "wallet"}, "connector_code": "A101"}, headers=key)

    assert first.status_code == again.status_code == 201
    assert again.json["id"] == first.json["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(sessions(app)) == 1 and charger.actions() == ["RemoteStartTransaction"]
    assert ana.get("/wallet").json["held"] == eur(HOLD)
    assert_problem(ana.post("/sessions", json={"connector_code": "A102", "payment": {"type": "wallet"}}, headers=key), 422, "idempotency_key_reused")


def test_a_guests_replay_hands_the_same_token_which_is_stored_nowhere(app, guest, stripe_config, charger):
    pm = browser_card(stripe_config, VISA)
    body = {"connector_code": "A101", "payment": {"type": "card", "payment_method_id": pm}, "email": "gus@example.com"}
    key = {"Idempotency-Key": "guest-start-1"}
    first = guest.post("/sessions", json=body, headers=key)
    again = guest.post("/sessions", json=body, headers=key)

    assert first.status_code == again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first.json and first.json["session_token"]
    token = first.json["session_token"]
    assert len(sessions(app)) == 1 and len(card_payments(app)) == 1
    assert len(sdk(stripe_config).v1.payment_intents.list().data) == 1
    with db(app) as s:
        [record] = s.scalars(select(IdempotencyRecord)).all()
    assert record.scope == "guest:" + hashlib.sha256(b"gus@example.com").hexdigest()
    assert token not in record.response_body and "session_token" not in record.response_body
    assert guest.get(f"/sessions/{first.json['id']}", headers={"X-Session-Token": token}).status_code == 200
    # Another guest email with the same key is another caller: a session of its own (the connector is taken now)
    other = guest.post("/sessions", json={**body, "email": "eva@example.com"}, headers=key)
    assert_problem(other, 409, "connector_busy")


def test_a_provider_outage_after_the_session_exists_is_503_naming_it(app, guest, stripe_config, charger):
    from tests.webapp.test_wallet_api import ChargesGoNowhere, closed_provider

    working = app.extensions["payment_provider"]
    app.extensions["payment_provider"] = ChargesGoNowhere(working, closed_provider(stripe_config))
    pm = browser_card(stripe_config, VISA)
    body = {"connector_code": "A101", "payment": {"type": "card", "payment_method_id": pm}, "email": "gus@example.com"}
    key = {"Idempotency-Key": "outage-1"}

    first = guest.post("/sessions", json=body, headers=key)
    problem = assert_problem(first, 503, "provider_unavailable")
    again = guest.post("/sessions", json=body, headers=key)

    assert again.headers["Idempotent-Replayed"] == "true" and again.json == problem  # never a second hold
    [cs] = sessions(app)
    assert (problem["session_id"], cs.state) == (cs.id, SessionState.PENDING)
    app.extensions["payment_provider"] = working
    shown = guest.get(f"/sessions/{cs.id}", headers={"X-Session-Token": problem["session_token"]})
    assert shown.json["state"] == "pending" and charger.calls == []


# --- 3-D Secure ---------------------------------------------------------------------------------


def test_3ds_then_confirm_starts_the_charger(app, guest, charger, stripe_config):
    created = guest_start(guest, stripe_config, THREE_D_SECURE)
    assert created.status_code == 201, created.json
    body = created.json
    token = {"X-Session-Token": body["session_token"]}
    assert body["state"] == "pending" and body["client_secret"] and body["links"]["confirm"] == f"/api/v1/sessions/{body['id']}/confirm"
    assert charger.calls == []
    assert guest.get(f"/sessions/{body['id']}", headers=token).json["client_secret"] == body["client_secret"]
    early = guest.post(f"/sessions/{body['id']}/confirm", headers=token)  # before the challenge: still waiting
    assert early.status_code == 200 and early.json["state"] == "pending"

    [row] = card_payments(app)
    pass_3ds(stripe_config, row.provider_payment_id, body["client_secret"])
    confirmed = guest.post(f"/sessions/{body['id']}/confirm", headers=token)

    assert confirmed.status_code == 200 and confirmed.json["state"] == "start_requested" and "client_secret" not in confirmed.json
    assert charger.actions() == ["RemoteStartTransaction"]
    assert sdk(stripe_config).v1.payment_intents.retrieve(row.provider_payment_id).status == "requires_capture"
    assert guest.post(f"/sessions/{body['id']}/confirm", headers=token).json["state"] == "start_requested"  # again: nothing more
    assert charger.actions() == ["RemoteStartTransaction"]


def test_a_failed_3ds_is_402_and_frees_the_connector(app, ana, add_card, charger, stripe_config):
    created = start_card(ana, add_card(ana, THREE_D_SECURE)).json
    [row] = card_payments(app)
    pass_3ds(stripe_config, row.provider_payment_id, created["client_secret"], success=False)
    problem = assert_problem(ana.post(f"/sessions/{created['id']}/confirm"), 402, "payment_failed")
    assert problem["session_id"] == created["id"] and "session_token" not in problem
    assert ana.get(f"/sessions/{created['id']}").json["state"] == "failed" and charger.calls == []
    assert start_wallet(ana).status_code == 201


# --- stopping ------------------------------------------------------------------------------------


def test_stop_while_charging_sends_remote_stop(app, ana, charger):
    created = start_wallet(ana).json
    plugged_in(app, created["id"])
    assert ana.get(f"/sessions/{created['id']}").json["state"] == "charging"

    stopped = ana.post(f"/sessions/{created['id']}/stop")

    assert stopped.status_code == 202 and stopped.headers["Cache-Control"] == "no-store"
    assert (stopped.json["state"], stopped.json["stop_requested"]) == ("charging", True)  # until the charger's StopTransaction
    assert charger.calls[-1] == ("RemoteStopTransaction", {"transaction_id": created["id"]})
    assert ana.get("/wallet").json["held"] == eur(HOLD)


def test_stop_before_charging_cancels_and_releases_the_hold(app, ana, charger):
    created = start_wallet(ana).json
    stopped = ana.post(f"/sessions/{created['id']}/stop")
    assert stopped.status_code == 202 and (stopped.json["state"], stopped.json["failure_code"]) == ("cancelled", "cancelled_by_driver")
    assert ana.get("/wallet").json["held"] == eur(0) and ana.get("/wallet").json["balance"] == eur(5000)
    assert charger.actions() == ["RemoteStartTransaction"]
    assert_problem(ana.post(f"/sessions/{created['id']}/stop"), 409, "not_stoppable")


def test_a_guest_cancels_a_card_session_and_the_hold_is_released(app, guest, charger, stripe_config):
    created = guest_start(guest, stripe_config).json
    stopped = guest.post(f"/sessions/{created['id']}/stop", headers={"X-Session-Token": created["session_token"]})
    assert stopped.status_code == 202 and stopped.json["state"] == "cancelled"
    [row] = card_payments(app)
    assert sdk(stripe_config).v1.payment_intents.retrieve(row.provider_payment_id).status == "canceled"


def test_stop_when_the_charger_is_offline_says_to_unplug(app, ana, charger):
    created = start_wallet(ana).json
    plugged_in(app, created["id"])
    charger.answer = CommandStatus.NOT_CONNECTED
    assert "unplug" in assert_problem(ana.post(f"/sessions/{created['id']}/stop"), 409, "charger_offline")["detail"]
    charger.answer = CommandStatus.REJECTED
    assert_problem(ana.post(f"/sessions/{created['id']}/stop"), 409, "stop_rejected")
    charger.answer = CommandStatus.TIMEOUT
    assert_problem(ana.post(f"/sessions/{created['id']}/stop"), 504, "charger_not_answering")
    assert ana.get(f"/sessions/{created['id']}").json["stop_requested"] is True


# --- the list ------------------------------------------------------------------------------------


def test_the_list_is_newest_first_paged_and_filtered(app, ana, ben):
    ids = []
    for _ in range(3):
        created = start_wallet(ana).json
        ids.append(created["id"])
        ana.post(f"/sessions/{created['id']}/stop")
    live = start_wallet(ana).json["id"]

    first = ana.get("/sessions?limit=2")
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-store"
    assert [x["id"] for x in first.json["data"]] == [live, ids[2]] and first.json["next_before"] == ids[2]
    second = ana.get(f"/sessions?limit=2&before={first.json['next_before']}").json
    assert [x["id"] for x in second["data"]] == [ids[1], ids[0]] and second["next_before"] is None
    assert [x["id"] for x in ana.get("/sessions?state=cancelled").json["data"]] == ids[::-1]
    assert [x["id"] for x in ana.get("/sessions?state=start_requested").json["data"]] == [live]
    assert ana.get("/sessions?state=completed").json == {"data": [], "next_before": None}
    assert ben.get("/sessions").json == {"data": [], "next_before": None}
    assert_problem(ben.get(f"/sessions/{live}"), 404, "not_found")
    assert_problem(Client(app).get("/sessions"), 401, "unauthenticated")


@pytest.mark.parametrize("query", ["state=charged", "state=", "limit=0", "limit=101", "before=0", "before=abc"])
def test_bad_list_queries_are_refused(ana, query):
    problem = assert_problem(ana.get(f"/sessions?{query}"), 422, "invalid_request")
    assert set(problem["errors"]) == {query.split("=")[0]}


def test_unknown_sessions_are_not_found(ana):
    for missing in ("999999", "2147483648", "-1", "abc"):
        assert_problem(ana.get(f"/sessions/{missing}"), 404, "not_found")
        assert_problem(ana.post(f"/sessions/{missing}/stop"), 404, "not_found")


def test_a_completed_session_shows_its_bill(app, ana, charger):
    created = start_wallet(ana).json
    t0 = utcnow() - dt.timedelta(minutes=20)
    plugged_in(app, created["id"], t0)
    with app.app_context(), db(app) as s:
        cs = s.get(ChargingSession, created["id"])
        at = t0 + dt.timedelta(minutes=10)
        service.stop_transaction(s, cs.connector.charger, transaction_id=cs.id, meter_stop_wh=D(7000), timestamp=at, reason="EVDisconnected",
                                 readings=[], now=at)
        s.commit()
        service.settle(s, None, cs.id, at)
    body = ana.get(f"/sessions/{created['id']}").json
    # 7 kWh × 0.35 = 2.45 excl. VAT; × 1.21 = 2.9645 → 2.96; VAT 0.51
    assert body["state"] == "completed" and body["energy_kwh"] == "7.000" and body["duration_s"] == 600
    assert body["final"] == {"excl_vat": eur(245), "vat": eur(51), "incl_vat": eur(296), "captured": eur(296)}
    assert body["cost"] == eur(296) and body["started_at"] and body["stopped_at"] and body["ended_at"]
    assert ana.get("/wallet").json["balance"] == eur(5000 - 296)
