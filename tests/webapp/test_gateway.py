"""The OCPP 1.6J gateway over real websockets, with simulated chargers built with the same library.

What a charger, the web app and a driver notice: who may connect, what a
boot and a status leave in the database, the connection table, commands
through the internal endpoint and GatewayClient, and a charge from
RemoteStart to the captured money, replays included.
"""

from __future__ import annotations

import base64
from decimal import Decimal

import pytest
import requests
import websockets
from ocpp.v16 import call
from sqlalchemy import func, select
from websockets.sync.client import connect as ws_connect

from payments import wallet
from payments.base import utcnow
from payments.ledger import JournalEntry
from payments.money import Money
from payments.tariff_store import connector_owner, tariff_in_force
from tests.charging_helpers import (  # noqa: F401  (fixtures)
    CHARGER_PASSWORD,
    charger_row,
    charging_site,
    connection_row,
    fund_wallet,
    gateway,
    session_row,
    simulators,
    wait_for,
)
from webapp import create_app
from webapp.chargers.client import SECRET_HEADER
from webapp.chargers.simulator import Refused
from webapp.charging import service
from webapp.charging.models import (
    ChargeCommand,
    ChargerConnection,
    ChargingSession,
    CommandStatus,
    OcppMessage,
    PaymentKind,
    SessionSample,
    SessionState,
)
from webapp.config import ConfigError
from webapp.models import Charger, Connector


@pytest.fixture
def app_config(app_config):
    """A short command timeout, so a charger that never answers fails the test quickly."""
    return {**app_config, "GATEWAY_TIMEOUT": 1.0}


def db(app):
    return app.extensions["db_sessionmaker"]()


def commands(app, **where) -> list[ChargeCommand]:
    with db(app) as s:
        q = select(ChargeCommand).order_by(ChargeCommand.id)
        for k, v in where.items():
            q = q.where(getattr(ChargeCommand, k) == v)
        return list(s.scalars(q))


def messages(app, **where) -> list[OcppMessage]:
    with db(app) as s:
        q = select(OcppMessage).order_by(OcppMessage.id)
        for k, v in where.items():
            q = q.where(getattr(OcppMessage, k) == v)
        return list(s.scalars(q))


def samples(app, session_id: int) -> list[SessionSample]:
    with db(app) as s:
        return list(s.scalars(select(SessionSample).where(SessionSample.session_id == session_id).order_by(SessionSample.at)))


def journal_entries(app, session_id: int) -> int:
    with db(app) as s:
        return s.scalar(select(func.count()).select_from(JournalEntry).where(JournalEntry.reference == f"session:{session_id}:wallet"))


def balance(app, owner: str) -> Money:
    with db(app) as s:
        return wallet.wallet_balance(s, owner, "EUR")


def held(app, owner: str) -> Money:
    with db(app) as s:
        return wallet.held(s, owner, "EUR")


def internal(gateway, path: str, body=None, *, secret: str | None = "default", method: str = "POST", data=None):
    headers = {}
    if secret == "default":
        secret = gateway.secret
    if secret is not None:
        headers[SECRET_HEADER] = secret
    return requests.request(method, gateway.internal_url + path, json=body, data=data, headers=headers, timeout=10)


def answered(sim, action: str):
    """The charger's last ``action`` once it has the answer: the gateway commits (and may bill) before it answers."""
    wait_for(lambda: action in {name for name, _ in sim.sent}, what=f"the charger to have its {action} answered")
    return sim.last_sent(action)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def handshake_status(url: str, **kwargs) -> int:
    """The HTTP status with which the gateway refuses a websocket handshake."""
    with pytest.raises(websockets.InvalidStatus) as e:
        ws_connect(url, open_timeout=5, **kwargs).close()
    return e.value.response.status_code


def open_wallet_session(app, site, user, *, hold: int = 2000, id_tag: str = "VPTEST00000000000001") -> int:
    """A session created directly in the database, authorized, its hold taken from the user's wallet."""
    with app.extensions["db_sessionmaker"].begin() as s:
        version = tariff_in_force(s, connector_owner(site.connector_ids[1]), utcnow())
        cs = ChargingSession(
            connector_id=site.connector_ids[1], active_connector_id=site.connector_ids[1], user_id=user.id, owner=user.owner, email=user.email,
            state=SessionState.AUTHORIZED, id_tag=id_tag, payment_kind=PaymentKind.WALLET, currency="EUR", hold_minor=hold,
            max_energy_wh=50_000, max_charging_s=3600, max_idle_s=600, tariff_version_id=version.id, time_zone="Europe/Madrid",
            min_billable_wh=0, min_billable_s=0,
        )
        s.add(cs)
        s.flush()
        wallet.hold(s, owner=user.owner, amount=Money(hold, "EUR"), key=cs.key("wallet"))
        return cs.id


# --------------------------------------------------------------------------- who may connect


def test_unknown_chargers_wrong_passwords_and_other_paths_are_refused(app, gateway, charging_site, simulators):
    url = gateway.ws_url
    with pytest.raises(Refused) as e:
        simulators.start("CP-1", "not-the-password")
    assert e.value.status == 401
    with pytest.raises(Refused) as e:
        simulators.start("CP-UNKNOWN", CHARGER_PASSWORD)
    assert e.value.status == 401
    assert handshake_status(f"{url}/CP-1", subprotocols=["ocpp1.6"]) == 401  # no credentials
    assert handshake_status(f"{url}/CP-1", subprotocols=["ocpp1.6"], additional_headers=basic("CP-2", CHARGER_PASSWORD)) == 401
    assert handshake_status(url.replace("/ocpp", "/other/CP-1"), subprotocols=["ocpp1.6"], additional_headers=basic("CP-1", CHARGER_PASSWORD)) == 404
    assert connection_row(app, charging_site.charger_id) is None
    assert messages(app) == []


def test_a_charger_must_speak_ocpp_16(app, gateway, charging_site):
    auth = basic("CP-1", CHARGER_PASSWORD)
    assert handshake_status(f"{gateway.ws_url}/CP-1", subprotocols=["ocpp2.0.1"], additional_headers=auth) == 400
    assert handshake_status(f"{gateway.ws_url}/CP-1", additional_headers=auth) == 400
    with ws_connect(f"{gateway.ws_url}/CP-1", subprotocols=["ocpp2.0.1", "ocpp1.6"], additional_headers=auth, open_timeout=5) as ws:
        assert ws.subprotocol == "ocpp1.6"


# --------------------------------------------------------------------------- boot, status, connection table


def test_boot_is_stored_and_the_meter_values_are_configured(app, gateway, charging_site, simulators):
    sim = simulators.start(vendor="Acme", model="Wallbox-22", firmware="4.2.1", serial="SN-0042")
    charger = charger_row(app, "CP-1")
    assert (charger.vendor, charger.model, charger.firmware_version, charger.serial_number) == ("Acme", "Wallbox-22", "4.2.1", "SN-0042")
    assert charger.last_boot_at is not None and charger.last_seen_at is not None

    rows = wait_for(lambda: [c for c in commands(app, action="ChangeConfiguration") if c.answered_at], what="ChangeConfiguration")
    wait_for(lambda: len(commands(app, action="ChangeConfiguration", status=CommandStatus.ACCEPTED)) == 2, what="both settings")
    assert sim.configuration["MeterValueSampleInterval"] == "10"  # the site's interval
    assert sim.configuration["MeterValuesSampledData"] == "Energy.Active.Import.Register,Power.Active.Import,Current.Import"
    assert all(r.charger_id == charging_site.charger_id and r.requested_by == "gateway" for r in rows)

    boot = messages(app, action="BootNotification")
    assert [m.direction for m in boot] == ["in", "out"]
    assert '"chargePointVendor":"Acme"' in boot[0].payload and '"status":"Accepted"' in boot[1].payload
    assert '"interval":300' in boot[1].payload


def test_status_and_error_codes_are_kept(app, gateway, charging_site, simulators):
    sim = simulators.start()
    with db(app) as s:
        assert [c.status for c in s.scalars(select(Connector).order_by(Connector.number))] == ["Available", "Available"]
    simulators.run(sim.send(call.StatusNotification(connector_id=2, error_code="GroundFailure", status="Faulted", info="RCD tripped",
                                                    vendor_error_code="E42")))
    simulators.run(sim.send(call.StatusNotification(connector_id=0, error_code="OtherError", status="Unavailable")))
    with db(app) as s:
        c2 = s.get(Connector, charging_site.connector_ids[2])
        assert (c2.status, c2.error_code, c2.status_info, c2.vendor_error_code) == ("Faulted", "GroundFailure", "RCD tripped", "E42")
        charger = s.get(Charger, charging_site.charger_id)
        assert (charger.status, charger.error_code) == ("Unavailable", "OtherError")
        assert service.availability(s, c2) == "faulted"


def test_the_connection_row_follows_the_socket(app, gateway, charging_site, simulators):
    sim = simulators.start()
    row = connection_row(app, charging_site.charger_id)
    assert row is not None and row.gateway_url == gateway.internal_url
    first = row.connection_id

    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the row to go")
    with db(app) as s:
        assert service.availability(s, s.get(Connector, charging_site.connector_ids[1])) == "offline"

    simulators.run(sim.reconnect())
    row = wait_for(lambda: connection_row(app, charging_site.charger_id), what="the row to come back")
    assert row.connection_id != first


def test_a_reconnect_before_the_old_socket_died_keeps_the_new_connection(app, gateway, charging_site, simulators):
    old = simulators.start(reconnect_delay=60)  # once the gateway closes it, it stays away
    first = connection_row(app, charging_site.charger_id).connection_id
    new = simulators.start()  # the same charger on a second socket
    row = connection_row(app, charging_site.charger_id)
    assert row.connection_id != first
    # The gateway closed the old socket; its cleanup ran and left the new row alone.
    wait_for(lambda: gateway.stats["disconnected"] >= 1, what="the old socket's cleanup")
    assert not old.online and new.online
    assert connection_row(app, charging_site.charger_id).connection_id == row.connection_id
    assert gateway.links["CP-1"].connection_id == row.connection_id


# --------------------------------------------------------------------------- the internal endpoint and GatewayClient


def test_the_internal_endpoint_checks_the_secret_and_the_request(app, gateway, charging_site, simulators):
    sim = simulators.start()
    assert internal(gateway, "/healthz", method="GET", secret=None).json() == {"status": "ok", "chargers": 1}
    body = {"action": "ChangeConfiguration", "payload": {"key": "MeterValueSampleInterval", "value": "5"}}
    assert internal(gateway, "/cp/CP-1/call", body, secret=None).status_code == 401
    assert internal(gateway, "/cp/CP-1/call", body, secret="wrong").status_code == 401
    assert internal(gateway, "/cp/CP-9/call", body).status_code == 404
    assert internal(gateway, "/cp/CP-1/call", {"action": "GetDiagnostics", "payload": {}}).status_code == 400
    assert internal(gateway, "/cp/CP-1/call", {"action": "ChangeConfiguration", "payload": {"key": "X"}}).status_code == 400
    assert internal(gateway, "/cp/CP-1/call", {"action": "UnlockConnector", "payload": {"connector_id": "one"}}).status_code == 400
    assert internal(gateway, "/cp/CP-1/call", data=b"not json").status_code == 400

    r = internal(gateway, "/cp/CP-1/call", body)
    assert r.status_code == 200 and r.json() == {"status": "Accepted", "response": {"status": "Accepted"}}
    assert sim.configuration["MeterValueSampleInterval"] == "5"
    r = internal(gateway, "/cp/CP-1/call", {"action": "UnlockConnector", "payload": {"connector_id": 2}})
    assert r.json()["status"] == "Unlocked"
    wait_for(lambda: len(messages(app, action="UnlockConnector")) == 2, what="the command in the log")
    logged = messages(app, action="UnlockConnector")
    assert [(m.direction, m.payload) for m in logged] == [("out", '{"connectorId":2}'), ("in", '{"status":"Unlocked"}')]


def test_a_charger_that_never_answers_times_out(app, gateway, charging_site, simulators):
    simulators.start(faults={"mute"})
    r = internal(gateway, "/cp/CP-1/call", {"action": "RemoteStartTransaction", "payload": {"id_tag": "TAG1", "connector_id": 1}})
    assert r.status_code == 504
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        result = client.call(s, s.get(Charger, charging_site.charger_id), "RemoteStartTransaction", {"id_tag": "TAG2", "connector_id": 1},
                             key="test:mute:start")
    assert result.status is CommandStatus.TIMEOUT
    [row] = commands(app, idempotency_key="test:mute:start")
    assert row.status is CommandStatus.TIMEOUT and row.answered_at is not None
    # The boot configuration was not answered either, and says so.
    wait_for(lambda: {c.status for c in commands(app, action="ChangeConfiguration")} == {CommandStatus.TIMEOUT}, what="boot commands")


def test_gateway_client_records_each_command_and_its_outcome(app, gateway, charging_site, simulators):
    sim = simulators.start()
    client = app.extensions["charger_gateway"]
    wait_for(lambda: len([c for c in commands(app) if c.answered_at]) == 2, what="the boot commands")
    with db(app) as s:
        charger = s.get(Charger, charging_site.charger_id)
        accepted = client.call(s, charger, "ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "7"}, key="t:1",
                               requested_by="support:1")
        again = client.call(s, charger, "ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "7"}, key="t:1")
        refused = client.call(s, charger, "ChangeConfiguration", {"key": "NoSuchKey", "value": "1"}, key="t:2")
        bad = client.call(s, charger, "ChangeConfiguration", {"key": "MeterValueSampleInterval"}, key="t:3")
    assert (accepted.status, accepted.response) == (CommandStatus.ACCEPTED, {"status": "Accepted"})
    assert again == accepted
    assert sim.count_received("ChangeConfiguration") == 2 + 2  # two at boot, t:1 once (its repeat was not sent again), t:2
    assert refused.status is CommandStatus.REJECTED and refused.response == {"status": "NotSupported"}
    assert bad.status is CommandStatus.ERROR

    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the row to go")
    with db(app) as s:
        offline = client.call(s, s.get(Charger, charging_site.charger_id), "UnlockConnector", {"connector_id": 1}, key="t:4")
    assert offline.status is CommandStatus.NOT_CONNECTED

    # A stale row pointing at a gateway that is gone.
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(ChargerConnection(charger_id=charging_site.charger_id, gateway_url="http://127.0.0.1:9", connection_id="stale"))
    with db(app) as s:
        unreachable = client.call(s, s.get(Charger, charging_site.charger_id), "UnlockConnector", {"connector_id": 1}, key="t:5")
    assert unreachable.status is CommandStatus.ERROR

    rows = {c.idempotency_key: c for c in commands(app) if c.idempotency_key.startswith("t:")}
    assert {k: r.status for k, r in rows.items()} == {
        "t:1": CommandStatus.ACCEPTED, "t:2": CommandStatus.REJECTED, "t:3": CommandStatus.ERROR,
        "t:4": CommandStatus.NOT_CONNECTED, "t:5": CommandStatus.ERROR,
    }
    assert rows["t:1"].requested_by == "support:1" and rows["t:1"].payload == '{"key":"MeterValueSampleInterval","value":"7"}'
    assert all(r.answered_at is not None for r in rows.values())


# --------------------------------------------------------------------------- a charge, end to end


def test_remote_start_to_stop_updates_and_bills_the_session(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    session_id = open_wallet_session(app, charging_site, user, hold=2000)
    sim = simulators.start(power_kw=11, time_scale=100)
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        cs = service.request_start(s, client, None, s.get(ChargingSession, session_id), utcnow())
        # start_requested, or charging already when the simulated car (at 100× speed) beat the RemoteStart's answer
        assert cs.state in (SessionState.START_REQUESTED, SessionState.CHARGING)

    cs = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.CHARGING and row, what="StartTransaction")
    wait_for(lambda: sim.connector(1).transaction_id is not None, what="the charger to read the answer")
    assert cs.transaction_id == sim.connector(1).transaction_id == session_id
    assert cs.meter_start_wh == sim.connector(1).meter_start_wh
    wait_for(lambda: len(samples(app, session_id)) >= 3, what="meter values")
    live = session_row(app, session_id)
    assert live.energy_wh > 0 and live.power_w == Decimal("11000.0") and live.cost_minor > 0

    with db(app) as s:
        cs = service.request_stop(s, client, None, s.get(ChargingSession, session_id), by="driver", now=utcnow())
    cs = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.COMPLETED and row, what="billing")
    c = sim.connector(1)
    assert cs.meter_stop_wh == int(c.register_wh) and cs.energy_wh == cs.meter_stop_wh - cs.meter_start_wh
    assert cs.stop_reason == "Remote"
    assert cs.captured_minor == cs.final_incl_vat_minor > 0
    # €0.35 + 21 % VAT per kWh, to the cent.
    assert abs(cs.final_incl_vat_minor - float(cs.energy_wh) / 1000 * 35 * 1.21) <= 1
    assert balance(app, user.owner) == Money(5000 - cs.captured_minor, "EUR")
    logged = {"RemoteStartTransaction", "Authorize", "StartTransaction", "MeterValues", "RemoteStopTransaction", "StopTransaction"}
    wait_for(lambda: logged <= {m.action for m in messages(app, session_id=session_id)}, what="the session's messages in the log")
    wait_for(lambda: sim.connector(1).status == "Available", what="the car to leave")
    assert sim.errors == []


def test_a_wallet_session_stops_itself_at_its_cap_and_replays_are_applied_once(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    sim = simulators.start(power_kw=11, time_scale=100)
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        req = service.StartRequest(connector=s.get(Connector, charging_site.connector_ids[1]), user=s.get(type(user), user.id), email=None,
                                   payment_kind=PaymentKind.WALLET, max_energy_kwh=Decimal("0.3"))
        started = service.start_session(s, None, client, req, now=utcnow())
        session_id, hold = started.session.id, started.session.hold_minor
        assert started.session.state in (SessionState.START_REQUESTED, SessionState.CHARGING)  # the fast car may have started already

    cs = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.COMPLETED and row, what="auto-stop and billing")
    # The hold is sized from the energy cap, so the cost reaches the hold at the same reading (checked first).
    assert cs.stop_requested_by in ("cost_limit", "energy_limit") and cs.stop_reason == "Remote"
    assert cs.energy_wh >= 280
    prefix = f"session:{session_id}:remote_stop:{cs.stop_requested_by}:"
    # The charger may stop (and the session be billed) before the gateway has written the command's answer.
    [stop] = wait_for(lambda: [c for c in commands(app, session_id=session_id, action="RemoteStopTransaction")
                               if c.answered_at and c.idempotency_key.startswith(prefix)], what="the auto-stop command's outcome")
    assert stop.status is CommandStatus.ACCEPTED and stop.requested_by == cs.stop_requested_by
    # The reading that reached the limit may overshoot it a little: the capture never passes the hold.
    assert cs.captured_minor == min(cs.final_incl_vat_minor, hold) and 0 < cs.captured_minor <= hold
    assert balance(app, user.owner) == Money(5000 - cs.captured_minor, "EUR")
    assert held(app, user.owner) == Money(0, "EUR")

    # The charger sends its last MeterValues and its StopTransaction again (as after a lost answer): answered, applied once.
    before = [(x.at, x.energy_wh) for x in samples(app, session_id)]
    entries = journal_entries(app, session_id)
    answer = simulators.run(sim.send(answered(sim, "StopTransaction")))
    assert answer.id_tag_info == {"status": "Accepted"}
    simulators.run(sim.send(sim.last_sent("MeterValues")))
    assert [(x.at, x.energy_wh) for x in samples(app, session_id)] == before
    again = session_row(app, session_id)
    assert (again.state, again.captured_minor, again.energy_wh) == (SessionState.COMPLETED, cs.captured_minor, cs.energy_wh)
    assert journal_entries(app, session_id) == entries
    assert len(commands(app, session_id=session_id, action="RemoteStopTransaction")) == 1
    assert sim.errors == []


def test_a_stop_sent_late_after_reconnecting_is_billed_once(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    session_id = open_wallet_session(app, charging_site, user, hold=3000)
    sim = simulators.start(power_kw=11, time_scale=50)
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        service.request_start(s, client, None, s.get(ChargingSession, session_id), utcnow())
    wait_for(lambda: len(samples(app, session_id)) >= 2, what="charging")

    # The connection drops; charging goes on, the charger queues its meter values, then the driver stops at the charger.
    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the gateway to notice")
    wait_for(lambda: len(sim._queue) >= 3, what="meter values queued offline")
    simulators.run(sim.stop_locally(1))
    assert session_row(app, session_id).state is SessionState.CHARGING  # nothing arrived yet

    simulators.run(sim.reconnect())
    cs = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.COMPLETED and row, what="the late stop")
    c = sim.connector(1)
    assert cs.stop_reason == "Local" and cs.meter_stop_wh == int(c.register_wh)
    assert cs.energy_wh == cs.meter_stop_wh - cs.meter_start_wh
    periodic = [x for x in samples(app, session_id) if x.source == "meter_values"]
    assert len(periodic) == c.meter_values_sent  # every reading sent offline arrived, once
    assert cs.captured_minor == cs.final_incl_vat_minor
    entries = journal_entries(app, session_id)
    simulators.run(sim.send(answered(sim, "StopTransaction")))
    assert journal_entries(app, session_id) == entries
    assert balance(app, user.owner) == Money(5000 - cs.captured_minor, "EUR")


@pytest.mark.parametrize("fault, reason", [("drop_mid_session", "Remote"), ("reboot", "Reboot")])
def test_a_charger_that_drops_or_reboots_mid_session_is_billed_once(app, gateway, charging_site, simulators, make_user, fault, reason):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    session_id = open_wallet_session(app, charging_site, user, hold=3000)
    sim = simulators.start(power_kw=11, time_scale=50, faults={fault}, drop_after=2, offline_s=0.5)
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        service.request_start(s, client, None, s.get(ChargingSession, session_id), utcnow())
    wait_for(lambda: gateway.stats["disconnected"] >= 1, what="the connection to drop")
    if fault == "drop_mid_session":
        wait_for(lambda: sim.online and sim.connector(1).meter_values_sent >= 4, what="the charger to come back")
        assert sim.boots == 1 and sim.connector(1).transaction_id == session_id  # charging went on
        with db(app) as s:
            service.request_stop(s, client, None, s.get(ChargingSession, session_id), by="driver", now=utcnow())
    else:  # the reboot ended the transaction; its StopTransaction follows the new BootNotification
        wait_for(lambda: sim.online and sim.boots == 2, what="the charger to boot again")
    cs = wait_for(lambda: (row := session_row(app, session_id)).state is SessionState.COMPLETED and row, what="billing")
    assert cs.stop_reason == reason and cs.meter_stop_wh == int(sim.connector(1).register_wh)
    periodic = [x for x in samples(app, session_id) if x.source == "meter_values"]
    assert len(periodic) == sim.connector(1).meter_values_sent
    assert cs.captured_minor == cs.final_incl_vat_minor and journal_entries(app, session_id) == 2  # the hold, its settlement
    assert sim.errors == []


def test_a_car_that_never_plugs_in_sends_no_start(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    session_id = open_wallet_session(app, charging_site, user, hold=2000)
    sim = simulators.start(faults={"never_start"}, never_start_timeout=0.3)
    client = app.extensions["charger_gateway"]
    with db(app) as s:
        cs = service.request_start(s, client, None, s.get(ChargingSession, session_id), utcnow())
        assert cs.state is SessionState.START_REQUESTED
    wait_for(lambda: sim.connector(1).status == "Preparing", what="Preparing")
    wait_for(lambda: sim.connector(1).status == "Available", what="the charger to give up")
    wait_for(lambda: len(messages(app, action="StatusNotification")) >= 6, what="the statuses in the log")
    assert "StartTransaction" not in {name for name, _ in sim.sent}
    assert session_row(app, session_id).state is SessionState.START_REQUESTED  # the watchdog releases it when the window closes


def test_a_rejected_start_and_an_offline_charger_release_the_hold(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    simulators.start(faults={"reject_start"})
    client = app.extensions["charger_gateway"]
    session_id = open_wallet_session(app, charging_site, user, hold=2000)
    with db(app) as s:
        cs = service.request_start(s, client, None, s.get(ChargingSession, session_id), utcnow())
        assert (cs.state, cs.failure_code) == (SessionState.START_FAILED, "charger_rejected")
    assert balance(app, user.owner) == Money(5000, "EUR")
    [start] = commands(app, session_id=session_id)
    assert start.status is CommandStatus.REJECTED and start.idempotency_key == f"session:{session_id}:remote_start"


# --------------------------------------------------------------------------- settings and commands


def test_production_needs_a_gateway_secret(database_url):
    base = {"ENV": "production", "SECRET_KEY": "x" * 40, "DATABASE_URL": database_url, "STRIPE_SECRET_KEY": "sk_live_x",
            "STRIPE_PUBLISHABLE_KEY": "pk_live_x", "STRIPE_WEBHOOK_SECRET": "whsec_x"}
    with pytest.raises(ConfigError, match="VOLTPAY_GATEWAY_SECRET"):
        create_app(base)
    with pytest.raises(ConfigError, match="VOLTPAY_GATEWAY_SECRET"):
        create_app({**base, "GATEWAY_SECRET": "short"})
    app = create_app({**base, "GATEWAY_SECRET": "g" * 40})
    assert app.extensions["charger_gateway"].secret == "g" * 40
    app.extensions["db_engine"].dispose()


def test_the_gateway_and_simulate_commands_are_registered(app):
    runner = app.test_cli_runner()
    assert "OCPP 1.6J charger gateway" in runner.invoke(args=["gateway", "--help"]).output
    out = runner.invoke(args=["simulate", "--help"]).output
    assert "--charger" in out and "--fault" in out
    bad = runner.invoke(args=["simulate", "--fault", "CP-1:explode"])
    assert bad.exit_code != 0 and "unknown fault" in bad.output


# --------------------------------------------------------------------------- under load: fewer writes, a simulator that backs off


def test_every_message_and_answer_is_logged_with_its_session(app, gateway, charging_site, simulators, make_user):
    user = make_user("ana@example.com")
    fund_wallet(app, user.owner, 5000)
    session_id = open_wallet_session(app, charging_site, user, hold=2000)
    simulators.start(power_kw=11, time_scale=100)
    with db(app) as s:
        service.request_start(s, app.extensions["charger_gateway"], None, s.get(ChargingSession, session_id), utcnow())
    logged = wait_for(lambda: (rows := messages(app, action="MeterValues", session_id=session_id)) and len(rows) >= 6 and rows,
                      what="meter values")
    assert [m.direction for m in logged] == ["in", "out"] * (len(logged) // 2) and len(logged) >= 6
    assert all(i.at == o.at and i.payload.startswith('{"connectorId":1') and o.payload == "{}" for i, o in zip(logged[::2], logged[1::2]))
    # The two ChangeConfigurations of the boot: recorded, answered and logged.
    wait_for(lambda: len([m for m in messages(app, action="ChangeConfiguration")]) == 4, what="the boot configuration in the log")
    assert all(c.status is CommandStatus.ACCEPTED for c in commands(app, action="ChangeConfiguration"))


def test_the_password_check_reads_without_waiting_for_a_writer(app, gateway, charging_site):
    from webapp.db import read_only

    factory = app.extensions["db_sessionmaker"]
    writer = factory()
    writer.execute(select(Charger.id)).all()  # SQLite: BEGIN IMMEDIATE, the write lock held until the end
    try:
        with factory() as s:
            assert read_only(s).scalar(select(Charger.id).where(Charger.charge_point_id == "CP-1")) == charging_site.charger_id
        assert gateway._check_password("CP-1", CHARGER_PASSWORD) == charging_site.charger_id
        assert gateway._check_password("CP-1", "wrong") is None and gateway._check_password("CP-404", "x") is None
    finally:
        writer.close()


def in_own_loop(coro):
    """Run ``coro`` in a new event loop in a thread of its own (a test before may have left a loop running in this one)."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(60)


def test_a_simulated_charger_backs_off_exponentially_with_jitter():
    from webapp.chargers.simulator import SimulatedCharger

    sim = SimulatedCharger("CP-9", "x", "ws://127.0.0.1:9/ocpp", reconnect_delay=1.0, reconnect_max=60.0)
    for n in range(12):
        top = min(60.0, 2.0 ** n)
        pauses = [sim._pause(n, 1.0) for _ in range(50)]
        assert all(top / 2 <= p <= top for p in pauses) and len(set(pauses)) > 1


def test_a_simulated_charger_reconnects_later_and_later_while_refused():
    import asyncio

    from webapp.chargers.simulator import SimulatedCharger

    async def go():
        sim = SimulatedCharger("CP-9", "x", "ws://127.0.0.1:9/ocpp", reconnect_delay=0.01, reconnect_max=0.05)
        slept = []
        real_sleep = asyncio.sleep

        async def sleep(seconds, *a):
            slept.append(seconds)
            await real_sleep(0)

        sim._connect = _refused_with(503)
        runner = asyncio.create_task(sim.run())
        asyncio.sleep = sleep
        try:
            while len(slept) < 6:
                await real_sleep(0.001)
        finally:
            asyncio.sleep = real_sleep
            runner.cancel()
        return slept

    slept = in_own_loop(go())
    assert 0.005 <= slept[0] <= 0.01 and 0.01 <= slept[1] <= 0.02 and all(0.025 <= p <= 0.05 for p in slept[3:6])


def _refused_with(status):
    from webapp.chargers.simulator import Refused

    async def connect():
        raise Refused(status)

    return connect


def test_a_start_message_that_times_out_is_sent_again_and_history_is_bounded():
    import asyncio

    from webapp.chargers.simulator import Offline, SimulatedCharger

    async def go():
        sim = SimulatedCharger("CP-9", "x", "ws://127.0.0.1:9/ocpp", reconnect_delay=0.001, start_attempts=3, history=2)
        sim._ready.set()
        tries = []

        async def flaky(request):
            tries.append(type(request).__name__)
            if len(tries) < 3:
                raise TimeoutError if len(tries) == 1 else Offline("CP-9")
            name = type(request).__name__
            sim.sent.append((name, request))
            sim._last_sent[name] = request
            return "answer"

        sim._call = flaky
        assert await sim._call_retrying(call.Authorize(id_tag="T1")) == "answer"
        assert tries == ["Authorize"] * 3
        for request in (call.Heartbeat(), call.Heartbeat(), call.Heartbeat()):
            await flaky(request)
        assert len(sim.sent) == 2 and sim.last_sent("Authorize").id_tag == "T1"  # the history keeps the last 2; the last of each action stays

        tries.clear()

        async def never(request):
            tries.append(1)
            raise TimeoutError

        sim._call = never
        with pytest.raises(TimeoutError):
            await sim._call_retrying(call.StartTransaction(connector_id=1, id_tag="T1", meter_start=0, timestamp="2026-01-01T00:00:00Z"))
        assert len(tries) == 3

    in_own_loop(go())
