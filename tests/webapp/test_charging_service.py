"""The session state machine and its money, event by event (``webapp.charging.service``).

These tests drive the service the way the gateway does (the same calls, with
chosen timestamps, so the bill is known to the cent) and answer the web
app's commands with ``Charger``, a recorder that stands in for the gateway
process. The same journeys over real OCPP websockets, with the simulated
chargers, are in test_charging_journeys.py; card holds and captures here go
to localstripe through the official SDK.
"""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select

from payments import wallet
from payments.base import utcnow
from payments.cards import CardPayment, State
from payments.ledger import AccountKind, JournalEntry, balance, get_account, transfer
from payments.money import Money
from payments.tariff_store import add_version, connector_owner
from tests.stripe_browser import browser_card
from webapp.charging import jobs, service
from webapp.charging.models import ChargeCommand, ChargerConnection, ChargingSession, CommandStatus, PaymentKind, SessionState
from webapp.charging.service import ChargingError, Reading, StartRequest
from webapp.models import Charger, Connector, Operator, Site, User

SIMPLE = {"id": "T-SIMPLE", "currency": "EUR", "type": "AD_HOC_PAYMENT",
          "elements": [{"price_components": [{"type": "ENERGY", "price": D("0.35"), "vat": D("21.0"), "step_size": 1}]}]}
# 0.30/kWh; idle time free for the first 15 minutes of the session, then 6.00/h per started minute (VAT 21 %)
IDLE_FEE = {"id": "T-IDLE", "currency": "EUR", "type": "AD_HOC_PAYMENT", "elements": [
    {"price_components": [{"type": "PARKING_TIME", "price": D("0.00"), "vat": D("21.0"), "step_size": 60}], "restrictions": {"max_duration": 900}},
    {"price_components": [{"type": "ENERGY", "price": D("0.30"), "vat": D("21.0"), "step_size": 1},
                          {"type": "PARKING_TIME", "price": D("6.00"), "vat": D("21.0"), "step_size": 60}]},
]}


class Charger_:
    """Stands in for the gateway process: records each command and answers it as told."""

    def __init__(self, answer: CommandStatus = CommandStatus.ACCEPTED):
        self.answer = answer
        self.calls: list[tuple[str, dict]] = []

    def call(self, s, charger, action, payload, *, key, session_id=None, requested_by="system"):
        self.calls.append((action, payload))
        s.add(ChargeCommand(charger_id=charger.id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                            idempotency_key=key, requested_by=requested_by, status=self.answer))
        s.commit()
        return service.CommandResult(self.answer, {"status": "Accepted"} if self.answer is CommandStatus.ACCEPTED else None)


@pytest.fixture
def site(app):
    """A site (Madrid) with one online charger of two 22 kW connectors, both on the simple tariff."""
    return make_site(app)


def make_site(app):
    """Create the site of the ``site`` fixture in ``app``'s database."""
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Op", legal_name="Op S.L.")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Car park", time_zone="Europe/Madrid", currency="EUR", min_billable_wh=100, min_billable_s=60)
        s.add(site)
        s.flush()
        ch = Charger(site_id=site.id, charge_point_id="CP-1", password_hash="x")
        s.add(ch)
        s.flush()
        for n in (1, 2):
            c = Connector(charger_id=ch.id, number=n, connector_code=f"A10{n}", max_power_kw=22, status="Available")
            s.add(c)
            s.flush()
            add_version(s, connector_owner(c.id), SIMPLE, site_currency="EUR", created_by="test")
        s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id="c1"))
    return app


def use_tariff(app, code: str, tariff: dict) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        c = s.scalar(select(Connector).where(Connector.connector_code == code))
        add_version(s, connector_owner(c.id), tariff, site_currency="EUR", created_by="test", effective_from=utcnow() + dt.timedelta(milliseconds=5))
    threading.Event().wait(0.01)


def driver(app, email="ana@example.com", euros=50) -> User:
    """An account with ``euros`` in its wallet."""
    with app.extensions["db_sessionmaker"].begin() as s:
        u = User(email=email, password_hash="x")
        s.add(u)
        s.flush()
        if euros:
            transfer(s, idempotency_key=f"gift:{u.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                     credit=wallet.wallet(s, u.owner, "EUR"), amount=Money(euros * 100, "EUR"))
    return u


def db(app):
    return app.extensions["db_sessionmaker"]()


def start(app, user, code="A101", gateway=None, **kw) -> service.StartResult:
    with app.app_context(), db(app) as s:
        connector = s.scalar(select(Connector).where(Connector.connector_code == code))
        req = StartRequest(connector=connector, user=s.get(User, user.id) if user else None, email=kw.pop("email", None),
                           payment_kind=kw.pop("payment_kind", PaymentKind.WALLET), **kw)
        return service.start_session(s, app.extensions.get("payment_provider"), gateway or Charger_(), req, now=utcnow())


def event(app, fn, **kw) -> service.Answer:
    """A charger message as the gateway applies it: one transaction, then the settlements it asks for."""
    with app.app_context():
        with db(app) as s:
            charger = s.scalar(select(Charger).where(Charger.charge_point_id == "CP-1"))
            ans = fn(s, charger, now=kw.pop("now", utcnow()), **kw)
            s.commit()
        jobs.enqueue_settlements(ans.settle if isinstance(ans, service.Answer) else [])
        return ans


def session(app, sid) -> ChargingSession:
    with db(app) as s:
        return s.get(ChargingSession, sid)


def payment_of(app, cs) -> CardPayment:
    with db(app) as s:
        return s.get(CardPayment, cs.card_payment_id)


def money(app, owner="", kind=AccountKind.CUSTOMER_WALLET) -> int:
    with db(app) as s:
        return balance(s, get_account(s, kind, "EUR", owner)).amount


def earned(app) -> int:
    """What the parties of the sites are owed (the revenue, allocated at capture: nothing stays in REVENUE)."""
    from payments.ledger import LedgerAccount

    with db(app) as s:
        assert balance(s, get_account(s, AccountKind.REVENUE, "EUR")).amount == 0
        accts = s.scalars(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.PARTY_PAYABLE)).all()
        return sum(balance(s, a).amount for a in accts)


def charge(app, cs, t0, *, kwh_at: list[tuple[int, int]], stop_s: int, stop_wh: int, power_w=11000, reason="Remote", meter_start=1000):
    """StartTransaction at t0, MeterValues (seconds after t0, Wh delivered), StopTransaction."""
    ans = event(app, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(meter_start), timestamp=t0, now=t0)
    assert ans.id_tag_status == "Accepted"
    answers = []
    for sec, wh in kwh_at:
        at = t0 + dt.timedelta(seconds=sec)
        answers.append(event(app, service.meter_values, connector_number=1, transaction_id=ans.transaction_id,
                             readings=[Reading(at, D(meter_start + wh), D(power_w))], now=at))
    at = t0 + dt.timedelta(seconds=stop_s)
    answers.append(event(app, service.stop_transaction, transaction_id=ans.transaction_id, meter_stop_wh=D(meter_start + stop_wh),
                         timestamp=at, reason=reason, readings=[], now=at))
    return ans.transaction_id, answers


def test_a_wallet_session_is_held_started_charged_and_billed_to_the_cent(site):
    ana = driver(site)
    gw = Charger_()
    res = start(site, ana, gateway=gw)
    cs = res.session
    assert cs.state == SessionState.START_REQUESTED and gw.calls == [("RemoteStartTransaction", {"connector_id": 1, "id_tag": cs.id_tag})]
    hold = cs.hold_minor
    assert money(site, ana.owner) == 5000 - hold and money(site, ana.owner, AccountKind.WALLET_HOLD) == hold

    t0 = utcnow()
    tx, answers = charge(site, cs, t0, kwh_at=[(300, 3000), (600, 6000)], stop_s=700, stop_wh=7000)
    assert tx == cs.id and all(a.stop_transaction_id is None for a in answers)
    done = session(site, cs.id)
    # 7 kWh × 0.35 = 2.45 excl. VAT; × 1.21 = 2.9645 → 2.96; VAT 0.51
    assert done.state == SessionState.COMPLETED
    assert (done.final_excl_vat_minor, done.final_vat_minor, done.final_incl_vat_minor, done.captured_minor) == (245, 51, 296, 296)
    assert money(site, ana.owner) == 5000 - 296 and money(site, ana.owner, AccountKind.WALLET_HOLD) == 0
    assert earned(site) == 245 and money(site, kind=AccountKind.VAT_PAYABLE) == 51
    assert done.active_connector_id is None


def test_live_cost_rises_with_the_readings_and_uses_the_engine(site):
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    ans = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
    costs = []
    for i, wh in enumerate((1000, 2500, 4000), start=1):
        at = t0 + dt.timedelta(minutes=5 * i)
        event(site, service.meter_values, connector_number=1, transaction_id=ans.transaction_id, readings=[Reading(at, D(wh), D(11000))], now=at)
        costs.append(session(site, cs.id).cost_minor)
    assert costs == [42, 106, 169]  # 1, 2.5, 4 kWh × 0.4235, rounded half up
    with db(site) as s:
        live = service.live(s, s.get(ChargingSession, cs.id), t0 + dt.timedelta(minutes=15))
    assert live["energy_kwh"] == "4.000" and live["power_kw"] == "11.00" and live["cost"] == {"amount": 169, "currency": "EUR"}


def test_a_replayed_stop_and_replayed_readings_are_applied_once(site):
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    tx, _ = charge(site, cs, t0, kwh_at=[(300, 3000)], stop_s=600, stop_wh=5000)
    first = session(site, cs.id)
    # the charger comes back from an outage and sends its queue again
    event(site, service.meter_values, connector_number=1, transaction_id=tx, readings=[Reading(t0 + dt.timedelta(seconds=300), D(4000), D(11000))])
    again = event(site, service.stop_transaction, transaction_id=tx, meter_stop_wh=D(6000), timestamp=t0 + dt.timedelta(seconds=600),
                  reason="Remote", readings=[])
    assert again.settle == [] and again.transaction_id == tx
    with site.app_context():
        jobs.settle_now(cs.id)
    after = session(site, cs.id)
    assert after.captured_minor == first.captured_minor == 212  # 5 kWh × 0.4235
    with db(site) as s:
        assert s.scalar(select(func.count()).select_from(JournalEntry).where(JournalEntry.reference == f"session:{cs.id}:wallet")) == 2  # hold + settle
    assert money(site, ana.owner) == 5000 - 212


def test_a_replayed_start_gets_the_same_transaction(site):
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    a = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(10), timestamp=t0, now=t0)
    b = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(10), timestamp=t0, now=t0)
    assert (a.id_tag_status, a.transaction_id) == (b.id_tag_status, b.transaction_id) == ("Accepted", cs.id)


def test_the_spending_cap_lowers_the_hold_and_stops_the_session_there(site):
    ana = driver(site)
    cs = start(site, ana, cap=Money(500, "EUR")).session
    assert cs.hold_minor <= 500 and cs.cap_minor == 500
    t0 = utcnow()
    ans = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
    stops = []
    for i in range(1, 30):
        at = t0 + dt.timedelta(minutes=i)
        a = event(site, service.meter_values, connector_number=1, transaction_id=ans.transaction_id, readings=[Reading(at, D(1000 * i), D(60000))], now=at)
        stops.append(a.stop_transaction_id)
        if a.stop_transaction_id:
            break
    assert stops[-1] == cs.id and stops.count(cs.id) == 1  # one RemoteStop, when the cost reached the hold (or its limits)
    # the charger delivers a little more before it stops: the capture still never exceeds the hold
    at = t0 + dt.timedelta(minutes=len(stops), seconds=20)
    event(site, service.stop_transaction, transaction_id=cs.id, meter_stop_wh=D(1000 * len(stops) + 800), timestamp=at, reason="Remote", readings=[])
    done = session(site, cs.id)
    assert done.state == SessionState.COMPLETED and done.final_incl_vat_minor > done.hold_minor
    assert done.captured_minor == done.hold_minor
    assert money(site, ana.owner) == 5000 - done.hold_minor


def test_a_cap_below_the_least_a_session_costs_is_refused(site):
    use_tariff(site, "A101", {**SIMPLE, "elements": [{"price_components": [
        {"type": "FLAT", "price": D("2.00"), "vat": D("21.0"), "step_size": 1},
        {"type": "ENERGY", "price": D("0.35"), "vat": D("21.0"), "step_size": 1}]}]})
    ana = driver(site)
    with pytest.raises(ChargingError) as e:
        start(site, ana, cap=Money(200, "EUR"))
    assert e.value.code == "cap_too_low" and e.value.params["minimum"] >= Money(242, "EUR")
    assert money(site, ana.owner) == 5000
    with db(site) as s:
        assert s.scalar(select(func.count()).select_from(ChargingSession)) == 0
    at_minimum = start(site, ana, cap=e.value.params["minimum"]).session  # the minimum the message names is accepted
    assert at_minimum.state == SessionState.START_REQUESTED and at_minimum.hold_minor <= e.value.params["minimum"].amount


def test_idle_fee_after_the_grace_period_until_the_car_leaves(site):
    use_tariff(site, "A101", IDLE_FEE)
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    event(site, service.status_changed, connector_number=1, status="Charging", error_code="NoError", timestamp=t0)
    tx, _ = charge(site, cs, t0, kwh_at=[(300, 2500)], stop_s=600, stop_wh=5000)
    event(site, service.status_changed, connector_number=1, status="Finishing", error_code="NoError", timestamp=t0 + dt.timedelta(seconds=600))
    assert session(site, cs.id).state == SessionState.FINISHING  # the car is still plugged in: idle time runs
    left = t0 + dt.timedelta(minutes=40)
    event(site, service.status_changed, connector_number=1, status="Available", error_code="NoError", timestamp=left, now=left)
    done = session(site, cs.id)
    # energy 5 kWh × 0.30 = 1.50; idle 10:00 → 40:00, free until 15:00, then 25 min × 0.10 = 2.50; 4.00 excl. → 4.84 incl.
    assert done.state == SessionState.COMPLETED
    assert (done.final_excl_vat_minor, done.final_incl_vat_minor, done.captured_minor) == (400, 484, 484)
    assert done.ended_at == left


def test_an_idle_car_that_never_leaves_is_billed_up_to_the_hold_allowance(site):
    use_tariff(site, "A101", IDLE_FEE)
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    event(site, service.status_changed, connector_number=1, status="Finishing", error_code="NoError", timestamp=t0)
    charge(site, cs, t0, kwh_at=[], stop_s=600, stop_wh=5000)
    assert session(site, cs.id).state == SessionState.FINISHING
    limit = t0 + dt.timedelta(seconds=600 + cs.max_idle_s)
    with db(site) as s:  # the phone, before the watchdog ends the idle time: the cost stops growing at the allowance
        at_limit = service.live(s, s.get(ChargingSession, cs.id), limit)["cost"]
        assert service.live(s, s.get(ChargingSession, cs.id), limit + dt.timedelta(hours=3))["cost"] == at_limit
        assert service.live(s, s.get(ChargingSession, cs.id), limit - dt.timedelta(minutes=10))["cost"]["amount"] < at_limit["amount"]
    with site.app_context():
        counts = jobs.run_watchdog(now=t0 + dt.timedelta(seconds=600 + cs.max_idle_s + 5))
    assert counts["idle_over"] == 1
    done = session(site, cs.id)
    assert done.state == SessionState.COMPLETED and done.ended_at == t0 + dt.timedelta(seconds=600 + cs.max_idle_s)
    assert done.captured_minor == min(done.final_incl_vat_minor, done.hold_minor) and done.captured_minor > 0
    assert done.final_incl_vat_minor == at_limit["amount"]  # what the phone showed is what was billed


def test_a_session_below_the_minimum_is_free_and_released(site):
    ana = driver(site)
    cs = start(site, ana).session
    charge(site, cs, utcnow(), kwh_at=[], stop_s=30, stop_wh=50)
    done = session(site, cs.id)
    assert done.state == SessionState.COMPLETED and done.captured_minor == 0 and done.final_incl_vat_minor == 2
    assert money(site, ana.owner) == 5000 and money(site, ana.owner, AccountKind.WALLET_HOLD) == 0


def test_a_meter_going_backwards_sends_the_session_to_review_with_the_hold_kept(site):
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    charge(site, cs, t0, kwh_at=[(300, 3000), (400, 2000)], stop_s=600, stop_wh=4000)
    done = session(site, cs.id)
    assert done.state == SessionState.REVIEW and done.failure_code == "meter_backwards"
    assert money(site, ana.owner, AccountKind.WALLET_HOLD) == cs.hold_minor  # a person decides; nothing captured or lost
    assert done.active_connector_id is None  # the next driver can charge


@pytest.mark.parametrize("answer, state, code", [
    (CommandStatus.REJECTED, SessionState.START_FAILED, "charger_rejected"),
    (CommandStatus.NOT_CONNECTED, SessionState.START_FAILED, "charger_offline"),
])
def test_a_refused_start_releases_the_hold(site, answer, state, code):
    ana = driver(site)
    cs = start(site, ana, gateway=Charger_(answer)).session
    assert (cs.state, cs.failure_code) == (state, code)
    assert money(site, ana.owner) == 5000 and money(site, ana.owner, AccountKind.WALLET_HOLD) == 0
    assert start(site, ana).session.state == SessionState.START_REQUESTED  # the connector is free again


def test_a_car_never_plugged_in_times_out_and_the_hold_is_released(site):
    ana = driver(site)
    cs = start(site, ana, gateway=Charger_(CommandStatus.TIMEOUT)).session
    assert cs.state == SessionState.START_REQUESTED  # the charger may still start: wait for the window
    with site.app_context():
        assert jobs.run_watchdog(now=cs.start_deadline - dt.timedelta(seconds=1))["start_timeout"] == 0
        assert jobs.run_watchdog(now=cs.start_deadline + dt.timedelta(seconds=1))["start_timeout"] == 1
    assert session(site, cs.id).state == SessionState.START_TIMEOUT
    assert money(site, ana.owner) == 5000
    # the charger starts after all, late: told Invalid (it stops), and nothing is billed
    late = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=utcnow())
    assert late.id_tag_status == "Invalid"
    event(site, service.stop_transaction, transaction_id=late.transaction_id, meter_stop_wh=D(10), timestamp=utcnow(), reason="DeAuthorized", readings=[])
    assert session(site, cs.id).state == SessionState.START_TIMEOUT and money(site, ana.owner) == 5000


def test_a_driver_who_cancels_before_plugging_in_gets_the_hold_back(site):
    ana = driver(site)
    cs = start(site, ana).session
    with site.app_context(), db(site) as s:
        after = service.request_stop(s, Charger_(), None, s.get(ChargingSession, cs.id), by="driver", now=utcnow())
    assert after.state == SessionState.CANCELLED and money(site, ana.owner) == 5000


def test_stop_while_charging_sends_remote_stop(site):
    ana = driver(site)
    cs = start(site, ana).session
    event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=utcnow())
    gw = Charger_()
    with site.app_context(), db(site) as s:
        service.request_stop(s, gw, None, s.get(ChargingSession, cs.id), by="driver", now=utcnow())
    assert gw.calls == [("RemoteStopTransaction", {"transaction_id": cs.id})]
    offline = Charger_(CommandStatus.NOT_CONNECTED)
    with site.app_context(), db(site) as s, pytest.raises(ChargingError) as e:
        service.request_stop(s, offline, None, s.get(ChargingSession, cs.id), by="driver", now=utcnow())
    assert e.value.code == "charger_offline"


def test_the_wallet_must_cover_some_charging(site):
    ana = driver(site, euros=0)
    cs = start(site, ana).session
    assert (cs.state, cs.failure_code, cs.active_connector_id) == (SessionState.FAILED, "wallet_insufficient", None)


def test_an_offline_or_busy_connector_is_refused_before_anything_is_held(site):
    ana, ben = driver(site), driver(site, "ben@example.com")
    start(site, ana)
    with pytest.raises(ChargingError) as e:
        start(site, ben)
    assert e.value.code == "connector_busy" and money(site, ben.owner) == 5000
    with site.app_context(), db(site) as s:
        s.query(ChargerConnection).delete()
        s.commit()
    with pytest.raises(ChargingError) as e:
        start(site, ben, code="A102")
    assert e.value.code == "charger_offline"


def test_two_drivers_racing_for_one_connector_get_one_session(site):
    users = [driver(site, f"d{i}@example.com") for i in range(6)]
    barrier = threading.Barrier(len(users))
    outcomes: list[str] = []

    def go(u):
        barrier.wait()
        try:
            outcomes.append(start(site, u).session.state.value)
        except ChargingError as e:
            outcomes.append(e.code)

    threads = [threading.Thread(target=go, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["connector_busy"] * 5 + ["start_requested"]
    with db(site) as s:
        assert s.scalar(select(func.count()).select_from(ChargingSession)) == 1
    assert sum(money(site, u.owner) for u in users) == 6 * 5000 - session(site, 1).hold_minor


# --- card holds at the provider (localstripe) ------------------------------------------------------


@pytest.fixture
def card_site(app_config, stripe_config):
    from webapp import create_app

    app_config.update(stripe_config)
    from tests.conftest import _truncate

    application = create_app(app_config)
    _truncate(application)
    yield application
    application.extensions["db_engine"].dispose()


def test_a_guest_card_hold_is_captured_for_the_cost_and_the_rest_released(card_site, stripe_config):
    make_site(card_site)
    provider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    res = start(card_site, None, email="guest@example.com", payment_kind=PaymentKind.CARD, payment_method_id=pm,
                card_brand=card.brand, card_last4=card.last4)
    cs = res.session
    assert cs.state == SessionState.START_REQUESTED and res.guest_token and cs.owner == f"guest:{cs.id}"
    pi = payment_of(card_site, cs).provider_payment_id
    held = provider.retrieve(payment_id=pi)
    assert held.is_held and held.amount == cs.hold

    charge(card_site, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    done = session(card_site, cs.id)
    assert done.state == SessionState.COMPLETED and done.captured_minor == 424  # 10 kWh × 0.4235 = 4.235 → 4.24
    captured = provider.retrieve(payment_id=pi)
    assert captured.amount_captured == Money(424, "EUR")
    assert earned(card_site) == 350 and money(card_site, kind=AccountKind.VAT_PAYABLE) == 74


def test_settling_twice_at_once_and_the_webhook_capture_once(card_site, stripe_config):
    from tests.webapp.wallet_helpers import deliver, intent
    from tests.webapp.wallet_helpers import event as stripe_event

    make_site(card_site)
    provider = card_site.extensions["payment_provider"]
    captures = []
    real_capture = provider.capture

    def counting_capture(**kw):  # the real call, counted
        captures.append(kw["idempotency_key"])
        return real_capture(**kw)

    provider.capture = counting_capture
    pm = browser_card(stripe_config, "4242424242424242")
    cs = start(card_site, None, email="guest@example.com", payment_kind=PaymentKind.CARD, payment_method_id=pm).session
    t0 = utcnow()
    event(card_site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
    # the stop ends the session without settling it here (the queue is not immediate for a moment)
    with card_site.app_context(), db(card_site) as s:
        charger = s.scalar(select(Charger))
        service.stop_transaction(s, charger, transaction_id=cs.id, meter_stop_wh=D(3000), timestamp=t0 + dt.timedelta(minutes=10),
                                 reason="Local", readings=[], now=t0 + dt.timedelta(minutes=10))
        s.commit()
    barrier = threading.Barrier(2)

    def settle():
        barrier.wait()
        with card_site.app_context():
            jobs.settle_now(cs.id)

    threads = [threading.Thread(target=settle) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with card_site.app_context():
        jobs.run_watchdog()  # finds nothing left to settle
        client = card_site.test_client()
        pi = payment_of(card_site, cs).provider_payment_id
        assert deliver(client, stripe_config, stripe_event("payment_intent.succeeded", intent(stripe_config, pi))).status_code == 200
    assert len(captures) == 1
    done = session(card_site, cs.id)
    assert done.state == SessionState.COMPLETED and done.captured_minor == 127  # 3 kWh × 0.4235 = 1.2705 → 1.27
    with db(card_site) as s:
        row = s.get(CardPayment, done.card_payment_id)
        assert row.state == State.SUCCEEDED and row.captured_minor == 127
        entries = s.scalars(select(JournalEntry.description).where(JournalEntry.reference == f"session:{cs.id}").order_by(JournalEntry.id)).all()
        assert entries == ["Charging paid by card", "Revenue allocated"]  # booked once, allocated once


def test_a_lost_remote_stop_is_asked_for_again_while_the_charger_keeps_charging(site):
    ana = driver(site)
    cs = start(site, ana, max_energy_kwh=D(2)).session
    t0 = utcnow()
    ans = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)

    def reading(sec, wh):
        at = t0 + dt.timedelta(seconds=sec)
        return event(site, service.meter_values, connector_number=1, transaction_id=ans.transaction_id,
                     readings=[Reading(at, D(wh), D(11000))], now=at)

    assert reading(60, 1000).stop_transaction_id is None
    first = reading(120, 2000)
    assert (first.stop_transaction_id, first.stop_reason) == (cs.id, "energy_limit")  # the driver's limit, named as such
    assert reading(130, 2050).stop_transaction_id is None  # the stop is on its way
    assert reading(160, 2200).stop_transaction_id == cs.id  # 30 s later and still charging: ask again


def test_the_ocpp_log_is_kept_for_its_retention_period(site):
    from webapp.charging.models import OcppMessage

    now = utcnow()
    with site.app_context(), db(site) as s:
        charger = s.scalar(select(Charger))
        s.add_all([OcppMessage(charger_id=charger.id, direction="in", action="Heartbeat", payload="{}", at=now - dt.timedelta(days=d))
                   for d in (1, 89, 91, 400)])
        s.commit()
        assert jobs.purge_ocpp_log(now) == 2
        assert sorted((now - m.at).days for m in s.scalars(select(OcppMessage))) == [1, 89]


# --------------------------------------------------------------------------- long sessions: the live cost without re-reading the session

# 3.00/h of charging time + 21 % VAT, no energy price: the cost grows with time alone.
PER_HOUR = {"id": "T-HOUR", "currency": "EUR", "type": "AD_HOC_PAYMENT",
            "elements": [{"price_components": [{"type": "TIME", "price": D("3.00"), "vat": D("21.0"), "step_size": 1}]}]}


def exact_cents(tariff: dict, t0: dt.datetime, at: dt.datetime, wh: int) -> int:
    """What the engine charges for ``wh`` delivered from ``t0`` to ``at`` at one steady power (one period: no restrictions)."""
    from payments.tariffs import MeterSample, bill, cdr_from_samples, price

    cdr = cdr_from_samples(t0, [MeterSample(at=at, energy_wh=D(wh), power_w=D(11000))], at, tariff=tariff, time_zone="Europe/Madrid",
                           meter_start_wh=D(0))
    return bill(price(tariff, cdr, time_zone="Europe/Madrid"), "EUR")["incl_vat"].amount


def long_session(app, monkeypatch, tariff: dict, *, hold: int | None, readings: int, step_wh: int = 31):
    """A session on ``tariff`` with readings every 10 s (``step_wh`` each) until a limit asks for the stop; returns
    (the session, t0, the answers, the live cost after each reading, the ends it was priced to)."""
    if tariff is not SIMPLE:
        use_tariff(app, "A101", tariff)
    cs = start(app, driver(app)).session
    if hold is not None:
        with db(app) as s:  # this hold alone decides (no energy or time limit on the way); the session is never billed
            row = s.get(ChargingSession, cs.id)
            row.hold_minor, row.max_energy_wh, row.max_charging_s = hold, 10**9, 10**7
            s.commit()
    priced = []
    real = service._priced_total
    monkeypatch.setattr(service, "_priced_total", lambda s, cs, end: priced.append(end) or real(s, cs, end))
    t0 = utcnow()
    ans = event(app, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
    answers, costs = [], []
    for i in range(1, readings + 1):
        at = t0 + dt.timedelta(seconds=10 * i)
        answers.append(event(app, service.meter_values, connector_number=1, transaction_id=ans.transaction_id,
                             readings=[Reading(at, D(step_wh * i), D(11000))], now=at))
        costs.append(session(app, cs.id).cost_minor)
        if answers[-1].stop_transaction_id:
            break
    return cs, t0, answers, costs, priced


@pytest.mark.parametrize("tariff", [SIMPLE, PER_HOUR], ids=["energy", "time"])
def test_a_long_session_is_priced_now_and_then_and_still_stops_at_the_reading_that_reaches_the_hold(site, monkeypatch, tariff):
    hold = 300
    cs, t0, answers, costs, priced = long_session(site, monkeypatch, tariff, hold=hold, readings=400)
    exact = [exact_cents(tariff, t0, t0 + dt.timedelta(seconds=10 * i), 31 * i) for i in range(1, len(answers) + 1)]
    first_at_hold = next(i for i, c in enumerate(exact) if c >= hold)
    # The stop is asked for at the very reading whose cost reaches the hold, as if every reading were priced ...
    assert [a.stop_transaction_id for a in answers] == [None] * first_at_hold + [cs.id]
    assert (answers[-1].stop_reason, costs[-1]) == ("cost_limit", exact[first_at_hold])
    # ... though the session was priced far less often than it sent readings,
    assert len(priced) < len(answers) / 2
    # and the live cost shown is the engine's, lagging by at most 1/20 of the session's time.
    for i, cost in enumerate(costs):
        elapsed = 10 * (i + 1)
        lag = min(service.LIVE_PRICE_MAX_AGE.total_seconds(), elapsed / service.LIVE_PRICE_SHARE)
        assert cost in exact[max(0, i - int(lag // 10)):i + 1], (i, cost)


def test_a_long_session_is_billed_from_every_reading(site, monkeypatch):
    cs, t0, answers, costs, priced = long_session(site, monkeypatch, SIMPLE, hold=None, readings=300)
    assert cs.hold_minor > 400 and cs.max_energy_wh > 10_000
    assert all(a.stop_transaction_id is None for a in answers) and len(priced) < 100
    with db(site) as s:
        assert s.scalar(select(func.count()).select_from(service.SessionSample).where(service.SessionSample.session_id == cs.id)) == 300
    stop = t0 + dt.timedelta(seconds=3005)
    event(site, service.stop_transaction, transaction_id=cs.id, meter_stop_wh=D(31 * 300 + 15), timestamp=stop, reason="Remote", readings=[])
    done = session(site, cs.id)
    assert done.state == SessionState.COMPLETED
    assert done.final_incl_vat_minor == exact_cents(SIMPLE, t0, stop, 31 * 300 + 15) == 394  # 9.315 kWh × 0.4235


def test_a_late_reading_fills_its_gap_once_and_is_priced_at_once(site):
    cs = start(site, driver(site)).session
    t0 = utcnow()
    tx = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0).transaction_id

    def reading(sec, wh):
        at = t0 + dt.timedelta(seconds=sec)
        event(site, service.meter_values, connector_number=1, transaction_id=tx, readings=[Reading(at, D(wh), D(11000))], now=at)
        return session(site, cs.id)

    reading(100, 1000)
    assert reading(300, 3000).cost_minor == 127  # 3 kWh × 0.4235
    reading(200, 2000)  # sent late (an offline queue): stored between its neighbours
    reading(200, 2000)  # and again: once
    assert reading(250, 3500).anomaly == "meter_backwards"  # more than the reading after it: refused, noted
    after = reading(400, 4000)
    with db(site) as s:
        rows = s.scalars(select(service.SessionSample).where(service.SessionSample.session_id == cs.id).order_by(service.SessionSample.at))
        assert [(int((r.at - t0).total_seconds()), int(r.energy_wh)) for r in rows] == [(100, 1000), (200, 2000), (300, 3000), (400, 4000)]
    assert after.cost_minor == 169 and after.energy_wh == 4000


def test_last_seen_is_written_every_half_minute_not_on_every_message(site):
    t0 = utcnow()

    def seen():
        with db(site) as s:
            return s.scalar(select(Charger)).last_seen_at, s.scalar(select(ChargerConnection)).last_seen

    for sec in (0, 5, 29):
        event(site, lambda s, charger, now: service.charger_seen(s, charger, now), now=t0 + dt.timedelta(seconds=sec))
    assert seen() == (t0, t0)
    event(site, lambda s, charger, now: service.charger_seen(s, charger, now), now=t0 + dt.timedelta(seconds=31))
    assert seen() == (t0 + dt.timedelta(seconds=31),) * 2


def test_a_driver_stop_the_charger_refused_is_asked_for_again_while_it_keeps_charging(site):
    ana = driver(site)
    cs = start(site, ana).session
    t0 = utcnow()
    ans = event(site, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0, now=t0)
    refusing = Charger_(CommandStatus.REJECTED)
    with site.app_context(), db(site) as s, pytest.raises(ChargingError) as e:
        service.request_stop(s, refusing, None, s.get(ChargingSession, cs.id), by="driver", now=t0 + dt.timedelta(seconds=50))
    assert e.value.code == "stop_rejected"

    def reading(sec, wh):
        at = t0 + dt.timedelta(seconds=sec)
        return event(site, service.meter_values, connector_number=1, transaction_id=ans.transaction_id,
                     readings=[Reading(at, D(wh), D(11000))], now=at)

    assert reading(60, 500).stop_transaction_id is None  # just refused: not at once again
    again = reading(90, 800)  # 40 s after the driver's stop, still charging: the gateway asks the charger again
    assert (again.stop_transaction_id, again.stop_reason) == (cs.id, "driver")
    assert reading(100, 850).stop_transaction_id is None
    assert session(site, cs.id).stop_requested_by == "driver"
