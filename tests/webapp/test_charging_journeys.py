"""Charging journeys end to end: a driver's phone on the JSON API, the real OCPP gateway over websockets,
simulated chargers, and localstripe behind the app.

Each test starts a session as a phone does (``POST /api/v1/sessions``: a guest's card from the card
element, an account's wallet or one of its saved cards), lets a simulated charger do what real ones
do (start, send meter values, drop offline and replay its queue, refuse, never see a car, stay plugged
in), and checks what people notice: the session through the API, the amounts captured and released at
localstripe, wallet balances, the journal, the emailed link and the final page.

Expected bills are computed here, independently of the app, from the simulator's own meter register
(the meterStart and meterStop it sent) with Decimal and ROUND_HALF_UP. The same scenarios at the
service level with chosen timestamps are in test_charging_service.py; the gateway's protocol
behaviour (authentication, connection table, commands, wallet replays) in test_gateway.py.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

import pytest
import stripe
from sqlalchemy import func, select

from payments.base import utcnow
from payments.cards import CardPayment, State
from payments.ledger import JournalEntry
from payments.webhooks import ProviderEvent
from tests.charging_helpers import (  # noqa: F401  (fixtures)
    charging_site,
    connection_row,
    fund_wallet,
    gateway,
    seed_site,
    session_row,
    simulators,
    wait_for,
)
from tests.stripe_browser import DECLINED_AT_CHARGE, VISA, browser_card, confirm_card_setup
from tests.webapp.problems import assert_problem
from tests.webapp.wallet_helpers import serving, text
from webapp.auth.tokens import digest
from webapp.charging import jobs
from webapp.charging.models import ChargerConnection, ChargingSession, SessionSample
from webapp.devtools.localstripe_server import register_webhook
from webapp.models import ApiToken

# Energy grows visibly within a few meter values: 150 kW × 10 ≈ 83 Wh per 0.2 s reading (≈ 3.5 cents at 0.4235 €/kWh).
FAST = {"power_kw": 150, "time_scale": 10}
GUEST = "gus@example.com"
ENERGY_PRICE = Decimal("0.35")  # SIMPLE_TARIFF of tests/charging_helpers.py: €/kWh excl. VAT
VAT = Decimal("1.21")

# Idle fee: parking is free during the first GRACE_S seconds of the session (counted from its start), then
# €360/h excl. VAT billed per second (step_size 1): €0.10 per second, so a few idle seconds cost a visible amount.
GRACE_S = 1
IDLE_PER_HOUR = Decimal("360.00")
IDLE_ENERGY_PRICE = Decimal("0.30")
IDLE_TARIFF = {"id": "T-IDLE-FAST", "currency": "EUR", "type": "AD_HOC_PAYMENT", "elements": [
    {"price_components": [{"type": "PARKING_TIME", "price": Decimal("0.00"), "vat": Decimal("21.0"), "step_size": 1}],
     "restrictions": {"max_duration": GRACE_S}},
    {"price_components": [{"type": "ENERGY", "price": IDLE_ENERGY_PRICE, "vat": Decimal("21.0"), "step_size": 1},
                          {"type": "PARKING_TIME", "price": IDLE_PER_HOUR, "vat": Decimal("21.0"), "step_size": 1}]},
]}


@pytest.fixture
def app_config(app_config, stripe_config):
    """Card payments at localstripe (emptied per test); a short charger command timeout."""
    return {**app_config, **stripe_config, "GATEWAY_TIMEOUT": 2.0}


# --------------------------------------------------------------------------- the phone


def eur(minor: int) -> dict:
    return {"amount": minor, "currency": "EUR"}


def euros(minor: int) -> str:
    """An amount as the English pages write it."""
    return f"€{Decimal(minor) / 100:.2f}"


class Phone:
    """What a driver's phone sends to the JSON API: the account's bearer token when signed in; a guest's session token once it has one."""

    def __init__(self, app, user=None, bearer: str | None = None):
        self.http = app.test_client()
        self.user = user
        self.headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        self.session_token: str | None = None

    def _headers(self) -> dict:
        return {**self.headers, **({"X-Session-Token": self.session_token} if self.session_token else {})}

    def get(self, path: str):
        return self.http.get("/api/v1" + path, headers=self._headers())

    def post(self, path: str, json=None):
        return self.http.post("/api/v1" + path, json=json, headers=self._headers())

    def start(self, code: str, payment: dict, **extra):
        """``POST /sessions``; a guest keeps the session token it is handed (in a 201 or in a problem naming the session)."""
        resp = self.post("/sessions", {"connector_code": code, "payment": payment, **extra})
        body = resp.get_json(silent=True) or {}
        if body.get("session_token"):
            self.session_token = body["session_token"]
        return resp

    def follow(self, session_id: int) -> dict:
        resp = self.get(f"/sessions/{session_id}")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp.json

    def wait_state(self, session_id: int, *states: str, timeout: float = 15.0) -> dict:
        """Poll the session as the live page does until it is in one of ``states``."""
        return wait_for(lambda: (body := self.follow(session_id))["state"] in states and body, timeout, what=f"the session to be {'/'.join(states)}")

    def watch_rising(self, session_id: int, rises: int = 3) -> list[dict]:
        """Poll while charging until the energy has risen ``rises`` times; the cost shown rises with it, never falls."""
        seen: list[dict] = []

        def risen():
            body = self.follow(session_id)
            if body["state"] == "charging" and (not seen or Decimal(body["energy_kwh"]) > Decimal(seen[-1]["energy_kwh"])):
                seen.append(body)
            return len(seen) > rises

        wait_for(risen, 15, what="the energy to rise")
        costs = [b["cost"]["amount"] for b in seen]
        assert costs == sorted(costs) and costs[-1] > costs[0], costs
        assert seen[-1]["power_kw"] is not None and Decimal(seen[-1]["power_kw"]) > 0
        return seen


def card(pm: str) -> dict:
    return {"type": "card", "payment_method_id": pm}


WALLET = {"type": "wallet"}


@pytest.fixture
def signed_in(app, make_user):
    """``signed_in(email, euros=50)``: an account with money in its wallet and a phone holding an API token."""

    def make(email: str, euros: int = 50) -> Phone:
        user = make_user(email)
        bearer = f"vp_journeys-{user.id}-{secrets.token_hex(4)}"
        with app.extensions["db_sessionmaker"].begin() as s:
            s.add(ApiToken(user_id=user.id, token_hash=digest(bearer), name="tests", expires_at=utcnow() + dt.timedelta(days=1)))
        if euros:
            fund_wallet(app, user.owner, euros * 100)
        return Phone(app, user, bearer)

    return make


def save_card(phone: Phone, config: dict, number: str = VISA) -> str:
    """The wallet's card setup as the app does it: setup on our API, stripe.js confirms, the setup id comes back; the card's id."""
    setup = phone.post("/payment-methods/setup")
    assert setup.status_code == 201, setup.json
    confirm_card_setup(config, setup.json["setup_id"], number)
    saved = phone.post("/payment-methods", {"setup_id": setup.json["setup_id"]})
    assert saved.status_code == 201, saved.json
    return saved.json["id"]


# --------------------------------------------------------------------------- what to expect, computed here


def cents(amount_eur: Decimal) -> int:
    """Euros to cents, half up (the bill's rounding)."""
    return int((amount_eur * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def energy_bill(wh: int, price: Decimal = ENERGY_PRICE) -> int:
    """What ``wh`` watt-hours cost incl. 21 % VAT, in cents."""
    return cents(Decimal(wh) / 1000 * price * VAT)


def kwh(wh: int) -> str:
    """Energy as the API shows it."""
    return f"{Decimal(wh) / 1000:.3f}"


def registers(sim, connector: int = 1) -> tuple[int, int]:
    """The meterStart and meterStop the simulated charger sent for its last transaction (its own register).

    The gateway bills a session before it answers the StopTransaction, so the session can be completed a moment
    before the charger has the answer (and lists the message as sent): wait for it."""
    wait_for(lambda: sim.connector(connector).transaction_id is None and "StopTransaction" in {name for name, _ in sim.sent},
             what="the charger to have its StopTransaction answered")
    meter_start = sim.last_sent("StartTransaction").meter_start
    meter_stop = sim.last_sent("StopTransaction").meter_stop
    assert meter_stop == int(sim.connector(connector).register_wh)
    return meter_start, meter_stop


# --------------------------------------------------------------------------- what the database and localstripe say


def db(app):
    return app.extensions["db_sessionmaker"]()


def sessions(app) -> list[ChargingSession]:
    with db(app) as s:
        return list(s.scalars(select(ChargingSession).order_by(ChargingSession.id)))


def card_payment(app, session_id: int) -> CardPayment:
    with db(app) as s:
        return s.get(CardPayment, s.get(ChargingSession, session_id).card_payment_id)


def journal_entries(app, reference: str) -> int:
    """Entries booked for ``reference``, not counting the settlement's allocation of the revenue (one more, once)."""
    with db(app) as s:
        return s.scalar(select(func.count()).select_from(JournalEntry).where(
            JournalEntry.reference == reference, JournalEntry.idempotency_key.not_like("allocation:%")))


def samples(app, session_id: int, source: str | None = None) -> list[SessionSample]:
    with db(app) as s:
        q = select(SessionSample).where(SessionSample.session_id == session_id).order_by(SessionSample.at)
        if source:
            q = q.where(SessionSample.source == source)
        return list(s.scalars(q))


def sdk(config: dict) -> stripe.StripeClient:
    return stripe.StripeClient(config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=0)


def at_provider(config: dict, payment_id: str) -> dict:
    """The PaymentIntent as localstripe has it: status, the hold, what was captured and released, and how many captures.

    localstripe has no ``amount_captured``: a capture of less than the hold shows as the charge's
    ``amount_refunded`` (a refund with no payment intent: the released rest). Every capture emits one
    ``payment_intent.succeeded`` event; a second capture of the same intent is refused.
    """
    client = sdk(config)
    pi = client.v1.payment_intents.retrieve(payment_id).to_dict()
    charges = (pi.get("charges") or {}).get("data") or []
    captured = sum(c["amount"] - (c.get("amount_refunded") or 0) for c in charges if c.get("captured"))
    refunds = [r for c in charges for r in ((c.get("refunds") or {}).get("data") or []) if r.get("payment_intent")]
    events = [e for e in client.v1.events.list(params={"limit": 100}).data
              if e.type == "payment_intent.succeeded" and e.data.object.id == payment_id]
    return {
        "status": pi["status"], "amount": pi["amount"], "customer": pi.get("customer"), "charges": len(charges), "captured": captured,
        "released": pi["amount"] - captured if pi["status"] in ("succeeded", "canceled") else 0, "refunds": len(refunds), "captures": len(events),
    }


def payment_intents(config: dict) -> list:
    return sdk(config).v1.payment_intents.list(params={"limit": 100}).data


# --------------------------------------------------------------------------- journeys billed exactly


def test_a_guest_pays_by_card_stops_from_the_phone_and_pays_exactly_the_energy(app, gateway, charging_site, simulators, stripe_config, mailbox):
    sim = simulators.start(**FAST)
    code = charging_site.connector_codes[1]
    phone = Phone(app)
    assert phone.get(f"/connectors/{code}").json["status"] == "available"

    created = phone.start(code, card(browser_card(stripe_config, VISA)), email=GUEST)
    assert created.status_code == 201, created.json
    body = created.json
    session_id, hold = body["id"], body["hold"]["amount"]
    # start_requested, or already charging when the simulated car (plugged in 0.3 s after the RemoteStart) beat a slow response
    assert body["state"] in ("start_requested", "charging") and body["payment"] == {"type": "card", "card": {"brand": "visa", "last4": "4242"}}
    assert phone.session_token and hold > 0
    payment_id = card_payment(app, session_id).provider_payment_id
    held = at_provider(stripe_config, payment_id)
    assert (held["status"], held["amount"], held["captured"], held["customer"]) == ("requires_capture", hold, 0, None)

    phone.watch_rising(session_id)  # the car is plugged in: the live page shows kWh and cost rising
    assert phone.get(f"/connectors/{code}").json["status"] == "in_use"
    stopped = phone.post(f"/sessions/{session_id}/stop")
    assert stopped.status_code == 202, stopped.json
    assert stopped.json["stop_requested"] is True and stopped.json["state"] in ("charging", "finishing", "completed")

    done = phone.wait_state(session_id, "completed")
    meter_start, meter_stop = registers(sim)
    expected = energy_bill(meter_stop - meter_start)
    assert expected > 0
    assert done["energy_kwh"] == kwh(meter_stop - meter_start)
    assert done["final"]["incl_vat"] == done["final"]["captured"] == done["cost"] == eur(expected)
    cs = session_row(app, session_id)
    assert (cs.stop_reason, cs.captured_minor, cs.meter_start_wh, cs.meter_stop_wh) == ("Remote", expected, meter_start, meter_stop)

    # At the card processor: one capture of exactly the bill, the rest of the hold released.
    paid = at_provider(stripe_config, payment_id)
    assert paid == {"status": "succeeded", "amount": hold, "customer": None, "charges": 1, "captured": expected,
                    "released": hold - expected, "refunds": 0, "captures": 1}
    row = card_payment(app, session_id)
    assert (row.state, row.captured_minor) == (State.SUCCEEDED, expected)
    assert journal_entries(app, f"session:{session_id}") == 1  # revenue + VAT, once
    # The car leaves (the simulator unplugs after 0.2 s): the connector is free for the next driver.
    wait_for(lambda: phone.get(f"/connectors/{code}").json["status"] == "available", what="the connector to be free")

    # The emailed link opens the final page on another device, with the amount paid.
    link = mailbox.last_link(GUEST, f"/s/{session_id}?t=")  # the link email's (later emails link without the token)
    other = app.test_client()
    assert other.get(link.removeprefix("http://localhost")).status_code == 302
    words = text(other.get(f"/s/{session_id}"))
    assert "Charging complete" in words and f"You paid {euros(expected)}" in words
    assert sim.errors == []


def test_a_signed_in_driver_pays_from_the_wallet_exactly_and_nothing_stays_held(app, gateway, charging_site, simulators, signed_in):
    sim = simulators.start(**FAST)
    ana = signed_in("ana@example.com", euros=50)
    created = ana.start(charging_site.connector_codes[1], WALLET)
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]
    wallet = ana.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(5000 - hold), eur(hold))

    ana.watch_rising(session_id)
    assert ana.post(f"/sessions/{session_id}/stop").status_code == 202
    done = ana.wait_state(session_id, "completed")

    meter_start, meter_stop = registers(sim)
    expected = energy_bill(meter_stop - meter_start)
    assert done["final"]["captured"] == done["final"]["incl_vat"] == eur(expected) and done["energy_kwh"] == kwh(meter_stop - meter_start)
    wallet = ana.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(5000 - expected), eur(0))
    assert journal_entries(app, f"session:{session_id}:wallet") == 2  # the hold, then its settlement
    assert [(x["id"], x["state"]) for x in ana.get("/sessions").json["data"]] == [(session_id, "completed")]
    assert sim.errors == []


def test_a_saved_card_pays_exactly_when_the_driver_unplugs(app, gateway, charging_site, simulators, signed_in, stripe_config):
    sim = simulators.start(**FAST)
    ana = signed_in("ana@example.com", euros=0)
    pm = save_card(ana, stripe_config)
    created = ana.start(charging_site.connector_codes[1], card(pm))
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]
    assert created.json["payment"] == {"type": "card", "card": {"brand": "visa", "last4": "4242"}}
    row = card_payment(app, session_id)
    assert row.provider_customer_id and row.payment_method_id == pm
    held = at_provider(stripe_config, row.provider_payment_id)
    assert (held["status"], held["amount"], held["customer"]) == ("requires_capture", hold, row.provider_customer_id)

    ana.watch_rising(session_id)
    simulators.run(sim.unplug(1))  # the driver pulls the cable: the charger stops (EVDisconnected)
    done = ana.wait_state(session_id, "completed")

    meter_start, meter_stop = registers(sim)
    expected = energy_bill(meter_stop - meter_start)
    assert done["final"]["captured"] == eur(expected) and session_row(app, session_id).stop_reason == "EVDisconnected"
    paid = at_provider(stripe_config, row.provider_payment_id)
    assert (paid["status"], paid["captured"], paid["released"], paid["charges"], paid["captures"]) == ("succeeded", expected, hold - expected, 1, 1)
    wallet = ana.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(0), eur(0))  # the wallet is not touched
    assert journal_entries(app, f"session:{session_id}") == 1
    assert sim.errors == []


# --------------------------------------------------------------------------- starts that do not charge release the hold


@pytest.mark.parametrize("payer", ["guest_card", "wallet"])
def test_a_start_the_charger_rejects_is_a_409_and_the_hold_is_released(app, gateway, charging_site, simulators, signed_in, stripe_config, payer):
    sim = simulators.start(faults={"reject_start"})
    code = charging_site.connector_codes[1]
    if payer == "wallet":
        phone = signed_in("ana@example.com", euros=50)
        answer = phone.start(code, WALLET)
    else:
        phone = Phone(app)
        answer = phone.start(code, card(browser_card(stripe_config, VISA)), email=GUEST)

    problem = assert_problem(answer, 409, "charger_rejected")
    session_id = problem["session_id"]
    shown = phone.follow(session_id)  # a guest follows it with the token the problem handed over
    assert (shown["state"], shown["failure_code"]) == ("start_failed", "charger_rejected")
    if payer == "wallet":
        wallet = phone.get("/wallet").json
        assert (wallet["balance"], wallet["held"]) == (eur(5000), eur(0))
    else:
        assert problem["session_token"] == phone.session_token
        released = at_provider(stripe_config, card_payment(app, session_id).provider_payment_id)
        assert (released["status"], released["captured"], released["captures"]) == ("canceled", 0, 0)
        assert card_payment(app, session_id).state == State.CANCELED
    assert sim.count_received("RemoteStartTransaction") == 1 and "StartTransaction" not in {name for name, _ in sim.sent}
    assert phone.get(f"/connectors/{code}").json["status"] == "available"  # the next driver can try


def test_a_guest_whose_card_is_declined_gets_no_you_started_email(app, gateway, charging_site, simulators, stripe_config, mailbox):
    simulators.start(**FAST)
    code = charging_site.connector_codes[1]
    declined = Phone(app)
    problem = assert_problem(declined.start(code, card(browser_card(stripe_config, DECLINED_AT_CHARGE)), email="dee@example.com"),
                             402, "card_declined")
    assert declined.follow(problem["session_id"])["state"] == "failed"
    assert all(p.status != "requires_capture" for p in payment_intents(stripe_config))  # nothing held
    # The next guest's start (a good card) mails its link: every mail of the declined attempt went before it.
    started = Phone(app)
    created = started.start(code, card(browser_card(stripe_config, VISA)), email=GUEST)
    assert created.status_code == 201, created.json
    mailbox.wait_for(GUEST)
    stopped = started.post(f"/sessions/{created.json['id']}/stop")
    assert stopped.status_code == 202, stopped.json  # cancelled, or stopped if the car was quicker
    assert [m["Subject"] for m in mailbox.to("dee@example.com")] == []


def test_an_offline_charger_is_refused_before_any_money_is_held(app, gateway, charging_site, simulators, signed_in, stripe_config):
    code = charging_site.connector_codes[1]
    guest = Phone(app)
    assert guest.get(f"/connectors/{code}").json["status"] == "offline"
    refused = assert_problem(guest.start(code, card(browser_card(stripe_config, VISA)), email=GUEST), 409, "charger_offline")
    assert "offline" in refused["detail"] and "session_id" not in refused
    assert sessions(app) == [] and payment_intents(stripe_config) == []

    # A charger that was online and lost its connection: the same answer, the wallet untouched.
    sim = simulators.start()
    assert guest.get(f"/connectors/{code}").json["status"] == "available"
    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the gateway to notice")
    ana = signed_in("ana@example.com", euros=50)
    assert_problem(ana.start(code, WALLET), 409, "charger_offline")
    wallet = ana.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(5000), eur(0)) and sessions(app) == []
    assert ana.get(f"/connectors/{code}").json["status"] == "offline"


def test_a_charger_its_gateway_no_longer_holds_ends_the_session_and_cancels_the_card_hold(app, gateway, charging_site, stripe_config):
    # The connection table still names our gateway (it missed the socket's end), but no charger is connected to it.
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(ChargerConnection(charger_id=charging_site.charger_id, gateway_url=gateway.internal_url, connection_id="gone"))
    guest = Phone(app)
    problem = assert_problem(guest.start(charging_site.connector_codes[1], card(browser_card(stripe_config, VISA)), email=GUEST),
                             409, "charger_offline")
    shown = guest.follow(problem["session_id"])
    assert (shown["state"], shown["failure_code"]) == ("start_failed", "charger_offline")
    released = at_provider(stripe_config, card_payment(app, problem["session_id"]).provider_payment_id)
    assert (released["status"], released["captured"]) == ("canceled", 0)


def test_a_car_never_plugged_in_times_out_and_the_card_hold_is_released(app, gateway, charging_site, simulators, stripe_config):
    sim = simulators.start(faults={"never_start"}, never_start_timeout=0.3)
    code = charging_site.connector_codes[1]
    phone = Phone(app)
    created = phone.start(code, card(browser_card(stripe_config, VISA)), email=GUEST)
    assert created.status_code == 201 and created.json["state"] == "start_requested", created.json
    session_id = created.json["id"]
    payment_id = card_payment(app, session_id).provider_payment_id

    # The charger accepted, waited for a car that never came, and is Available again: no StartTransaction.
    wait_for(lambda: sim.connector(1).status == "Preparing", what="Preparing")
    wait_for(lambda: sim.connector(1).status == "Available", what="the charger to give up")
    assert "StartTransaction" not in {name for name, _ in sim.sent}
    assert phone.follow(session_id)["state"] == "start_requested"
    assert at_provider(stripe_config, payment_id)["status"] == "requires_capture"

    deadline = session_row(app, session_id).start_deadline
    with app.app_context():
        assert jobs.run_watchdog(now=deadline - dt.timedelta(seconds=1))["start_timeout"] == 0
        assert jobs.run_watchdog(now=deadline + dt.timedelta(seconds=1))["start_timeout"] == 1
    shown = phone.follow(session_id)
    assert (shown["state"], shown["failure_code"], shown["final"]) == ("start_timeout", "start_timeout", None)
    released = at_provider(stripe_config, payment_id)
    assert (released["status"], released["captured"], released["captures"]) == ("canceled", 0, 0)
    assert phone.get(f"/connectors/{code}").json["status"] == "available"


# --------------------------------------------------------------------------- a charger that drops, a cap, idle time


def test_a_charger_that_drops_mid_session_and_replays_its_stop_is_billed_once(app, gateway, charging_site, simulators, stripe_config):
    sim = simulators.start(**FAST, faults={"drop_mid_session"}, drop_after=3, offline_s=1.5)
    phone = Phone(app)
    created = phone.start(charging_site.connector_codes[1], card(browser_card(stripe_config, VISA)), email=GUEST)
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]

    # After three readings the connection drops; the charger keeps charging and queues its readings.
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None and not sim.online, what="the connection to drop")
    wait_for(lambda: sim.connector(1).meter_values_sent >= 5, what="readings queued offline")
    refused = assert_problem(phone.post(f"/sessions/{session_id}/stop"), 409, "charger_offline")
    assert "unplug" in refused["detail"]
    simulators.run(sim.unplug(1))  # so the driver unplugs: the charger stops and queues StopTransaction too
    assert phone.follow(session_id)["state"] == "charging"  # nothing of it has arrived yet

    done = phone.wait_state(session_id, "completed")  # it reconnects and replays its queue in order
    assert sim.boots == 1  # it did not restart: the same transaction went on offline
    meter_start, meter_stop = registers(sim)
    expected = energy_bill(meter_stop - meter_start)
    assert done["final"]["captured"] == eur(expected) and done["energy_kwh"] == kwh(meter_stop - meter_start)
    assert session_row(app, session_id).stop_reason == "EVDisconnected"
    periodic = samples(app, session_id, "meter_values")
    assert len(periodic) == sim.connector(1).meter_values_sent  # every reading arrived once, those sent offline too

    # The charger sends its stop and last reading again (a lost answer): answered, nothing applied twice.
    answer = simulators.run(sim.send(sim.last_sent("StopTransaction")))
    assert answer.id_tag_info == {"status": "Accepted"}
    simulators.run(sim.send(sim.last_sent("MeterValues")))
    with app.app_context():
        jobs.run_watchdog()
    assert [(x.at, x.energy_wh) for x in samples(app, session_id, "meter_values")] == [(x.at, x.energy_wh) for x in periodic]
    paid = at_provider(stripe_config, card_payment(app, session_id).provider_payment_id)
    assert (paid["captured"], paid["released"], paid["charges"], paid["captures"]) == (expected, hold - expected, 1, 1)
    assert journal_entries(app, f"session:{session_id}") == 1
    assert session_row(app, session_id).captured_minor == expected
    assert sim.errors == []


def test_a_card_session_stops_itself_at_the_drivers_cap_and_never_captures_more_than_the_hold(
        app, gateway, charging_site, simulators, stripe_config):
    sim = simulators.start(power_kw=150, time_scale=60)  # ≈ 500 Wh (≈ 21 cents) per reading
    phone = Phone(app)
    created = phone.start(charging_site.connector_codes[1], card(browser_card(stripe_config, VISA)), email=GUEST, cap=eur(100))
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]
    assert created.json["cap"] == eur(100) and 0 < hold <= 100
    payment_id = card_payment(app, session_id).provider_payment_id
    assert at_provider(stripe_config, payment_id)["amount"] == hold  # the card is held for the cap, not the default hold

    done = phone.wait_state(session_id, "completed")  # nobody presses stop: the gateway does
    cs = session_row(app, session_id)
    assert cs.stop_requested_by in ("cost_limit", "energy_limit") and cs.stop_reason == "Remote"
    assert sim.count_received("RemoteStopTransaction") >= 1
    meter_start, meter_stop = registers(sim)
    priced = energy_bill(meter_stop - meter_start)
    assert done["final"]["incl_vat"] == eur(priced)  # the reading that reached the cap overshoots it a little...
    assert done["final"]["captured"] == eur(min(priced, hold)) and min(priced, hold) <= hold <= 100  # ...the capture never does
    paid = at_provider(stripe_config, payment_id)
    assert (paid["status"], paid["captured"], paid["released"], paid["captures"]) == ("succeeded", min(priced, hold), hold - min(priced, hold), 1)
    assert sim.errors == []


def idle_bills(cs: ChargingSession) -> set[int]:
    """What the idle-fee session costs incl. VAT, from its stored times and energy, by the tariff's rules.

    Energy at €0.30/kWh; parking free until GRACE_S after the session's start, then €360/h per second
    (the parking seconds of the priced period rounded to a whole second, half up). When the idle time is
    exactly half a second off a whole one, both neighbours are accepted (the engine counts periods in
    hours, and 1/3600 is not a finite decimal)."""
    idle_from = max(cs.stopped_at, cs.started_at + dt.timedelta(seconds=GRACE_S))
    idle = Decimal((cs.ended_at - idle_from) // dt.timedelta(microseconds=1)) / 1_000_000
    whole = {idle.quantize(Decimal(1), rounding=ROUND_HALF_UP)}
    if idle % 1 == Decimal("0.5"):
        whole.add(idle.quantize(Decimal(1), rounding=ROUND_FLOOR))
    energy = Decimal(int(cs.meter_stop_wh - cs.meter_start_wh)) / 1000 * IDLE_ENERGY_PRICE
    return {cents((energy + IDLE_PER_HOUR * s / 3600) * VAT) for s in whole}


def stopped_and_idling(app, simulators, signed_in) -> tuple[Phone, object, int, int]:
    """A wallet session on the idle-fee tariff, charged past the grace period, stopped from the phone, the car
    still plugged in (the simulator does not unplug on its own) and idle for two seconds: (phone, sim, id, hold)."""
    site = seed_site(app, tariff=IDLE_TARIFF, hold_max_idle_s=60)
    sim = simulators.start(**FAST, unplug_delay=None)
    ana = signed_in("ana@example.com", euros=100)
    created = ana.start(site.connector_codes[1], WALLET)
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]

    ana.watch_rising(session_id)
    started = session_row(app, session_id).started_at
    wait_for(lambda: samples(app, session_id) and samples(app, session_id)[-1].at > started + dt.timedelta(seconds=GRACE_S),
             what="charging past the grace period")
    assert ana.post(f"/sessions/{session_id}/stop").status_code == 202
    finishing = ana.wait_state(session_id, "finishing")  # stopped, the car still plugged in: idle time runs
    assert finishing["final"] is None
    # the charger marks its connector Finishing once the server has answered its StopTransaction: a moment later, sometimes
    wait_for(lambda: sim.connector(1).status == "Finishing", what="the charger to show Finishing")
    stopped = session_row(app, session_id).stopped_at
    assert stopped > started + dt.timedelta(seconds=GRACE_S)
    wait_for(lambda: utcnow() > stopped + dt.timedelta(seconds=2), what="two idle seconds", interval=0.05)
    assert ana.follow(session_id)["state"] == "finishing"
    return ana, sim, session_id, hold


def test_an_idle_fee_is_billed_after_the_grace_until_the_car_leaves(app, gateway, simulators, signed_in):
    ana, sim, session_id, hold = stopped_and_idling(app, simulators, signed_in)

    simulators.run(sim.unplug(1))  # the car leaves: Available ends the idle time
    done = ana.wait_state(session_id, "completed")
    cs = session_row(app, session_id)
    assert cs.ended_at - cs.stopped_at >= dt.timedelta(seconds=2)
    meter_start, meter_stop = registers(sim)
    assert (cs.meter_start_wh, cs.meter_stop_wh) == (meter_start, meter_stop)
    energy_only = cents(Decimal(meter_stop - meter_start) / 1000 * IDLE_ENERGY_PRICE * VAT)
    assert done["final"]["incl_vat"]["amount"] in idle_bills(cs)
    assert done["final"]["incl_vat"]["amount"] - energy_only >= 24  # at least 2 idle seconds at €0.121
    captured = done["final"]["captured"]["amount"]
    assert captured == done["final"]["incl_vat"]["amount"] <= hold
    wallet = ana.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(10000 - captured), eur(0))
    assert sim.errors == []


def test_the_cost_so_far_while_the_car_idles_includes_the_idle_fee(app, gateway, simulators, signed_in):
    ana, sim, session_id, _hold = stopped_and_idling(app, simulators, signed_in)
    cs = session_row(app, session_id)
    asked_at = utcnow()
    shown = ana.follow(session_id)["cost"]["amount"]
    meter_start, meter_stop = registers(sim)
    idle_s = int((asked_at - max(cs.stopped_at, cs.started_at + dt.timedelta(seconds=GRACE_S))).total_seconds())
    at_least = cents((Decimal(meter_stop - meter_start) / 1000 * IDLE_ENERGY_PRICE + IDLE_PER_HOUR * idle_s / 3600) * VAT)
    simulators.run(sim.unplug(1))
    final = ana.wait_state(session_id, "completed")["final"]["incl_vat"]["amount"]
    assert idle_s >= 2 and final >= at_least
    assert shown >= at_least, f"the phone showed {euros(shown)} after {idle_s} idle seconds; at least {euros(at_least)} was owed then"


# --------------------------------------------------------------------------- races


def test_two_drivers_racing_for_one_connector_get_one_session_and_one_hold(app, gateway, charging_site, simulators, signed_in):
    sim = simulators.start(**FAST)
    code = charging_site.connector_codes[1]
    drivers = [signed_in("ana@example.com"), signed_in("ben@example.com")]
    barrier = threading.Barrier(len(drivers))
    answers: dict[str, object] = {}

    def tap_start(phone: Phone) -> None:
        barrier.wait()
        answers[phone.user.email] = phone.start(code, WALLET)

    threads = [threading.Thread(target=tap_start, args=(p,)) for p in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in answers.values()) == [201, 409]
    winner = next(p for p in drivers if answers[p.user.email].status_code == 201)
    loser = next(p for p in drivers if p is not winner)
    assert "someone else" in assert_problem(answers[loser.user.email], 409, "connector_busy")["detail"].lower()
    session_id, hold = answers[winner.user.email].json["id"], answers[winner.user.email].json["hold"]["amount"]
    assert [cs.id for cs in sessions(app)] == [session_id]
    assert winner.get("/wallet").json["held"] == eur(hold)
    wallet = loser.get("/wallet").json
    assert (wallet["balance"], wallet["held"]) == (eur(5000), eur(0))
    assert loser.get("/sessions").json["data"] == []

    # Only the winner's car charges; billed, then the connector is free for the other driver.
    winner.watch_rising(session_id, rises=1)
    assert sim.count_received("RemoteStartTransaction") == 1
    assert winner.post(f"/sessions/{session_id}/stop").status_code == 202
    done = winner.wait_state(session_id, "completed")
    meter_start, meter_stop = registers(sim)
    assert done["final"]["captured"] == eur(energy_bill(meter_stop - meter_start))
    wait_for(lambda: loser.get(f"/connectors/{code}").json["status"] == "available", what="the connector to be free")
    assert sim.errors == []


def webhook_processed(app, payment_id: str) -> list[tuple[str, str | None]]:
    with db(app) as s:
        rows = s.scalars(select(ProviderEvent).where(ProviderEvent.provider_payment_id == payment_id, ProviderEvent.processed_at.is_not(None)))
        return [(e.type, e.outcome) for e in rows]


@pytest.fixture
def localstripe_webhooks(app, stripe_config):
    """localstripe sends its own signed events to the app (served on a local port) during this test."""
    base, secret = stripe_config["STRIPE_API_BASE"], stripe_config["STRIPE_WEBHOOK_SECRET"]
    with serving(app) as url:
        register_webhook(base, "voltpay-journey-tests", target=url + "/webhooks/stripe", secret=secret,
                         events=["payment_intent.succeeded", "payment_intent.payment_failed"])
        try:
            yield url
        finally:  # registrations cannot be deleted: point this one at an event type that never happens
            register_webhook(base, "voltpay-journey-tests", target=url + "/webhooks/stripe", secret=secret, events=["voltpay.never"])


@pytest.mark.parametrize("first", ["webhook", "settlement"])
def test_the_webhook_and_the_settlement_racing_capture_once(app, gateway, charging_site, simulators, stripe_config, localstripe_webhooks, first):
    """localstripe sends payment_intent.succeeded about a second after the capture. ``settlement``: the worker records
    the capture's answer at once and the event comes later. ``webhook``: the worker is slow to record the answer, and
    the event is processed in between (the capture done at the provider, not yet in our books)."""
    provider = app.extensions["payment_provider"]
    real_capture = provider.capture
    captures: list[str] = []

    def capture(**kw):
        captures.append(kw["idempotency_key"])
        answer = real_capture(**kw)
        if first == "webhook":
            wait_for(lambda: webhook_processed(app, kw["payment_id"]), 10, what="localstripe's event before the capture's answer is recorded")
        return answer

    provider.capture = capture
    sim = simulators.start(**FAST)
    phone = Phone(app)
    created = phone.start(charging_site.connector_codes[1], card(browser_card(stripe_config, VISA)), email=GUEST)
    assert created.status_code == 201, created.json
    session_id, hold = created.json["id"], created.json["hold"]["amount"]
    payment_id = card_payment(app, session_id).provider_payment_id

    phone.watch_rising(session_id, rises=2)
    assert phone.post(f"/sessions/{session_id}/stop").status_code == 202
    done = phone.wait_state(session_id, "completed", "review")
    assert wait_for(lambda: webhook_processed(app, payment_id), what="localstripe's event") == [("payment_intent.succeeded", "processed")]

    meter_start, meter_stop = registers(sim)
    expected = energy_bill(meter_stop - meter_start)
    assert (done["state"], done["failure_code"], done["final"]["captured"]) == ("completed", None, eur(expected))
    assert len(captures) == 1
    paid = at_provider(stripe_config, payment_id)
    assert (paid["status"], paid["captured"], paid["released"], paid["charges"], paid["captures"]) == ("succeeded", expected, hold - expected, 1, 1)
    row = card_payment(app, session_id)
    assert (row.state, row.captured_minor) == (State.SUCCEEDED, expected)
    assert journal_entries(app, f"session:{session_id}") == 1  # one revenue entry, whoever booked it
    with app.app_context():
        assert jobs.run_watchdog()["settle"] == 0
    assert len(captures) == 1 and at_provider(stripe_config, payment_id)["captures"] == 1
    assert sim.errors == []
