"""Monitoring in the operator console: alarms raised and cleared by the check (chargers over real OCPP websockets,
connector faults, sessions in review, silent and disconnected meters), the alarm list and acknowledge, the live status
board, and the alarm email (real SMTP) sent once per new alarm."""

from __future__ import annotations

import datetime as dt
import re
import threading
from decimal import Decimal

import pytest
from ocpp.v16 import call
from sqlalchemy import func, select

from payments.base import utcnow
from payments.tariff_store import connector_owner, tariff_in_force
from tests.charging_helpers import (  # noqa: F401  (fixtures)
    charging_site,
    connection_row,
    gateway,
    seed_site,
    simulators,
    wait_for,
)
from webapp.charging.models import ChargingSession, PaymentKind, SessionState
from webapp.console import monitoring
from webapp.console.models import Alarm, AlarmKind
from webapp.meters import readings
from webapp.meters.models import MeterCollector, MeterTariff, RelayAction, RelayCommand
from webapp.models import Meter, MeterKind, Operator, Role, Site
from webapp.notifications.models import SentEmail

PASSWORD = "correct horse staple"
FLAT = {"currency": "EUR", "vat": Decimal(21), "kind": "flat", "energy_price": Decimal("0.2000")}


@pytest.fixture
def sm(app):
    return app.extensions["db_sessionmaker"]


def open_alarms(sm, kind: AlarmKind | None = None) -> list[Alarm]:
    with sm() as s:
        q = select(Alarm).where(Alarm.cleared_at.is_(None)).order_by(Alarm.id)
        return list(s.scalars(q if kind is None else q.where(Alarm.kind == kind)))


def alarm(sm, alarm_id: int) -> Alarm:
    with sm() as s:
        return s.get(Alarm, alarm_id)


def check(app, now: dt.datetime) -> monitoring.Summary:
    with app.app_context():
        return monitoring.run_check(now)


def csrf_token(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def sign_in(client, make_user, email: str, **fields) -> None:
    make_user(email, **fields)
    page = client.get("/auth/sign-in").get_data(as_text=True)
    r = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD, "csrf_token": csrf_token(page)})
    assert r.status_code in (302, 303), r.status_code


def operator_of(sm, site_id: int) -> int:
    with sm() as s:
        return s.get(Site, site_id).operator_id


def add_meter(sm, site_id: int, code: str, **fields) -> int:
    with sm.begin() as s:
        tariff = s.scalar(select(MeterTariff).where(MeterTariff.site_id == site_id))
        if tariff is None:
            tariff = MeterTariff(site_id=site_id, name="Flat")
            s.add(tariff)
            s.flush()
            readings.add_meter_tariff_version(s, tariff, FLAT, utcnow() - dt.timedelta(days=30), "test")
        meter = Meter(site_id=site_id, meter_code=code, serial=f"SN-{code}", prepaid=False, kind=MeterKind.MASTER, tariff_id=tariff.id,
                      **fields)
        s.add(meter)
        s.flush()
        return meter.id


def switch_off(sm, meter_id: int, reason: str = "balance_exhausted") -> None:
    """The meter's relay as the collector confirmed a disconnect (webapp.meters.jobs records it this way)."""
    with sm.begin() as s:
        s.add(RelayCommand(meter_id=meter_id, action=RelayAction.DISCONNECT, reason=reason, idempotency_key=f"test:{meter_id}:off",
                           status="delivered", delivered_at=utcnow()))
        s.get(Meter, meter_id).relay_state = "disconnected"


def switch_on(sm, meter_id: int) -> None:
    with sm.begin() as s:
        s.get(Meter, meter_id).relay_state = "connected"


# --------------------------------------------------------------------------- chargers over OCPP


def test_offline_alarm_raised_when_a_charger_disconnects_and_cleared_when_it_returns(app, sm, gateway, charging_site, simulators):
    sim = simulators.start()
    assert check(app, utcnow()).raised == []

    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the connection row to go")
    assert check(app, utcnow()).raised == []  # a short drop is no alarm: the threshold is 10 minutes

    later = utcnow() + dt.timedelta(minutes=11)
    first = check(app, later)
    [offline] = open_alarms(sm, AlarmKind.CHARGER_OFFLINE)
    assert first.raised == [offline.id]
    assert (offline.object_type, offline.object_id, offline.site_id) == ("charger", charging_site.charger_id, charging_site.site_id)
    assert offline.operator_id == operator_of(sm, charging_site.site_id) and offline.raised_at == later
    assert check(app, later + dt.timedelta(minutes=1)).raised == []  # still offline: the same alarm, not a second one
    assert [a.id for a in open_alarms(sm)] == [offline.id]

    simulators.run(sim.reconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id), what="the connection row to come back")
    back = utcnow()
    summary = check(app, back)
    assert summary.cleared == [offline.id] and summary.open == 0
    assert alarm(sm, offline.id).cleared_at == back
    assert check(app, utcnow()).cleared == []


def test_a_charger_never_seen_raises_nothing_and_a_dead_gateways_row_counts_as_offline(app, sm, charging_site):
    assert check(app, utcnow() + dt.timedelta(days=3)).raised == []  # being installed: the board says "never seen"

    from webapp.charging.models import ChargerConnection

    seen = utcnow() - dt.timedelta(hours=1)
    with sm.begin() as s:  # what a gateway that crashed leaves behind: a row nobody updates any more
        s.add(ChargerConnection(charger_id=charging_site.charger_id, gateway_url="http://gone:1", connection_id="x", connected_at=seen,
                                last_seen=seen))
    check(app, utcnow())
    [offline] = open_alarms(sm, AlarmKind.CHARGER_OFFLINE)
    assert offline.object_id == charging_site.charger_id


def test_connector_fault_from_a_status_notification(app, sm, gateway, charging_site, simulators):
    sim = simulators.start()
    check(app, utcnow())
    assert open_alarms(sm) == []

    simulators.run(sim.send(call.StatusNotification(connector_id=2, error_code="GroundFailure", status="Faulted", info="RCD tripped",
                                                    vendor_error_code="E42")))
    simulators.run(sim.send(call.StatusNotification(connector_id=0, error_code="OtherError", status="Unavailable")))
    summary = check(app, utcnow())
    faults = open_alarms(sm, AlarmKind.CONNECTOR_FAULT)
    assert sorted(summary.raised) == [a.id for a in faults]
    by_object = {(a.object_type, a.object_id): a for a in faults}
    assert by_object[("connector", charging_site.connector_ids[2])].detail == "GroundFailure: RCD tripped (E42)"
    assert by_object[("charger", charging_site.charger_id)].detail == "OtherError"
    assert check(app, utcnow()).raised == []  # no duplicates
    simulators.run(sim.send(call.StatusNotification(connector_id=2, error_code="OverCurrentFailure", status="Faulted")))
    summary = check(app, utcnow())
    assert (summary.raised, summary.updated) == ([], 1)  # the same fault alarm, its detail follows the connector
    assert alarm(sm, by_object[("connector", charging_site.connector_ids[2])].id).detail == "OverCurrentFailure"

    simulators.run(sim.send(call.StatusNotification(connector_id=2, error_code="NoError", status="Available")))
    summary = check(app, utcnow())
    assert summary.cleared == [by_object[("connector", charging_site.connector_ids[2])].id]
    assert [a.object_type for a in open_alarms(sm)] == ["charger"]


def test_status_board_shows_each_charger_and_connector_live(app, sm, gateway, charging_site, simulators, csrf_client, make_user):
    other = seed_site(app, cp_id="CP-B")
    sign_in(csrf_client, make_user, "staff-a@example.com", role=Role.OPERATOR_STAFF, operator_id=operator_of(sm, charging_site.site_id))
    html = csrf_client.get("/operator/status").get_data(as_text=True)
    assert 'data-charger="CP-1" data-state="never_seen"' in html and "CP-B" not in html
    assert '<meta http-equiv="refresh" content="30">' in html

    sim = simulators.start()
    simulators.run(sim.send(call.StatusNotification(connector_id=2, error_code="GroundFailure", status="Faulted")))
    html = csrf_client.get("/operator/status").get_data(as_text=True)
    assert 'data-charger="CP-1" data-state="online"' in html
    assert f'data-connector="{charging_site.connector_codes[2]}" data-status="Faulted"' in html and "GroundFailure" in html
    board = csrf_client.get("/operator/status.json").get_json()
    [site] = board["sites"]
    [charger] = site["chargers"]
    assert (charger["charge_point_id"], charger["state"], charger["online"]) == ("CP-1", "online", True)
    assert [(k["number"], k["status"], k["error_code"]) for k in charger["connectors"]] == [(1, "Available", "NoError"), (2, "Faulted", "GroundFailure")]

    simulators.run(sim.disconnect())
    wait_for(lambda: connection_row(app, charging_site.charger_id) is None, what="the connection row to go")
    assert csrf_client.get("/operator/status.json").get_json()["sites"][0]["chargers"][0]["state"] == "offline"
    assert 'data-state="offline"' in csrf_client.get("/operator/status?refresh=off").get_data(as_text=True)
    assert csrf_client.get(f"/operator/status?site={other.site_id}").status_code == 404
    assert csrf_client.get(f"/operator/status.json?site={other.site_id}").status_code == 404
    assert csrf_client.get(f"/operator/status.json?site={charging_site.site_id}").status_code == 200


# --------------------------------------------------------------------------- sessions and meters


def test_a_session_in_review_raises_an_alarm_until_settled(app, sm, charging_site):
    with sm.begin() as s:
        version = tariff_in_force(s, connector_owner(charging_site.connector_ids[1]), utcnow())
        cs = ChargingSession(
            connector_id=charging_site.connector_ids[1], owner="guest:test", state=SessionState.REVIEW, failure_code="meter_went_backwards",
            id_tag="VPTEST00000000000009", payment_kind=PaymentKind.WALLET, currency="EUR", hold_minor=2000, max_energy_wh=50_000,
            max_charging_s=3600, max_idle_s=600, tariff_version_id=version.id, time_zone="Europe/Madrid",
        )
        s.add(cs)
        s.flush()
        session_id = cs.id
    check(app, utcnow())
    [review] = open_alarms(sm, AlarmKind.SESSION_REVIEW)
    assert (review.object_type, review.object_id, review.detail, review.site_id) == ("session", session_id, "meter_went_backwards",
                                                                                      charging_site.site_id)
    check(app, utcnow())
    assert len(open_alarms(sm)) == 1

    with sm.begin() as s:  # a person settled it
        s.get(ChargingSession, session_id).state = SessionState.COMPLETED
    assert check(app, utcnow()).cleared == [review.id]


def test_silent_and_disconnected_meters(app, sm, charging_site):
    site = charging_site.site_id
    op = operator_of(sm, site)
    with sm.begin() as s:
        collector = MeterCollector(operator_id=op, name="Gateway", client_id="c-1", client_secret_hash="x")
        s.add(collector)
        s.flush()
        collector_id = collector.id
    read = add_meter(sm, site, "MREAD")  # sends readings
    waiting = add_meter(sm, site, "MWAIT", collector_id=collector_id)  # a collector, no reading yet
    manual = add_meter(sm, site, "MHAND")  # read by hand: never silent

    t0 = utcnow() - dt.timedelta(hours=1)
    with sm.begin() as s:
        report = readings.ingest(s, operator_id=op, rows=[{"meter_code": "MREAD", "at": t0.isoformat(), "register_kwh": "100"}],
                                 source="api", now=utcnow())
        assert [r.status for r in report.results] == ["accepted"]

    assert check(app, utcnow() + dt.timedelta(hours=24)).raised == []  # within the default 26 hours
    later = utcnow() + dt.timedelta(hours=30)
    check(app, later)
    silent = {a.object_id: a for a in open_alarms(sm, AlarmKind.METER_SILENT)}
    assert set(silent) == {read, waiting} and manual not in silent
    assert silent[read].detail == t0.isoformat(timespec="seconds") and silent[waiting].detail == ""
    assert check(app, later).raised == []

    with sm.begin() as s:  # the collector sends again
        readings.ingest(s, operator_id=op, rows=[{"meter_code": "MREAD", "at": (later - dt.timedelta(minutes=5)).isoformat(),
                                                  "register_kwh": "130"}], source="api", now=later)
    assert check(app, later).cleared == [silent[read].id]

    switch_off(sm, manual)
    check(app, later)
    [off] = open_alarms(sm, AlarmKind.METER_DISCONNECTED)
    assert (off.object_id, off.detail) == (manual, "balance_exhausted")
    assert check(app, later).raised == []
    switch_on(sm, manual)
    assert check(app, later).cleared == [off.id]


def test_concurrent_checks_raise_one_alarm(app, sm, charging_site):
    meter = add_meter(sm, charging_site.site_id, "MCONC")
    switch_off(sm, meter)
    now = utcnow()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run():
        try:
            start.wait(5)
            check(app, now)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(Alarm)) == 1


# --------------------------------------------------------------------------- the list, acknowledge, who sees what


@pytest.fixture
def two_operators(app, sm):
    """Operators A and B, each with a site and a switched-off meter (so each has an open alarm)."""
    a, b = seed_site(app, cp_id="CP-A"), seed_site(app, cp_id="CP-B")
    ma, mb = add_meter(sm, a.site_id, "MA1"), add_meter(sm, b.site_id, "MB1")
    switch_off(sm, ma)
    switch_off(sm, mb, reason="operator")
    check(app, utcnow())
    alarms = {x.object_id: x for x in open_alarms(sm)}
    return {"a": operator_of(sm, a.site_id), "b": operator_of(sm, b.site_id), "alarm_a": alarms[ma].id, "alarm_b": alarms[mb].id}


def test_staff_see_and_acknowledge_only_their_alarms(app, sm, csrf_client, make_user, two_operators):
    sign_in(csrf_client, make_user, "staff-a@example.com", role=Role.OPERATOR_STAFF, operator_id=two_operators["a"])
    page = csrf_client.get("/operator/alarms")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert f'data-alarm="{two_operators["alarm_a"]}"' in html and "MA1" in html
    assert f'data-alarm="{two_operators["alarm_b"]}"' not in html and "MB1" not in html
    assert "Meter disconnected" in html and "Power off: the credit is used up" in html
    if "support.meter" in app.view_functions:  # the meter's page, where there is one
        with app.test_request_context():
            from flask import url_for

            assert f'href="{url_for("support.meter", meter_code="MA1")}"' in html
    token = csrf_token(html)

    other = f"/operator/alarms/{two_operators['alarm_b']}/acknowledge"
    assert csrf_client.post(other, data={"csrf_token": token}).status_code == 404
    assert csrf_client.post("/operator/alarms/999999/acknowledge", data={"csrf_token": token}).status_code == 404
    own = f"/operator/alarms/{two_operators['alarm_a']}/acknowledge"
    assert csrf_client.post(own, data={}).status_code == 400  # no CSRF token
    assert alarm(sm, two_operators["alarm_a"]).acknowledged_at is None

    r = csrf_client.post(own, data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["Location"].endswith("/operator/alarms")
    html = csrf_client.get("/operator/alarms").get_data(as_text=True)
    assert "Alarm acknowledged." in html and "by staff-a@example.com" in html
    acked = alarm(sm, two_operators["alarm_a"])
    assert acked.acknowledged_at is not None and acked.cleared_at is None  # acknowledged, still open until the power is back
    assert alarm(sm, two_operators["alarm_b"]).acknowledged_at is None

    with sm() as s:
        meter_a = s.get(Alarm, two_operators["alarm_a"]).object_id
    switch_on(sm, meter_a)
    check(app, utcnow())
    assert 'data-testid="no-alarms"' in csrf_client.get("/operator/alarms").get_data(as_text=True)
    cleared = csrf_client.get("/operator/alarms?show=cleared").get_data(as_text=True)
    assert f'data-alarm="{two_operators["alarm_a"]}"' in cleared and f'data-alarm="{two_operators["alarm_b"]}"' not in cleared


def test_an_admin_sees_every_operators_alarms_and_customers_none(app, csrf_client, make_user, two_operators):
    sign_in(csrf_client, make_user, "admin@example.com", role=Role.ADMIN)
    html = csrf_client.get("/operator/alarms").get_data(as_text=True)
    assert "MA1" in html and "MB1" in html
    client = app.test_client()
    assert client.get("/operator/alarms").status_code in (302, 401)
    sign_in(client, make_user, "driver@example.com")
    assert client.get("/operator/alarms").status_code == 403
    assert client.get("/operator/status.json").status_code == 403
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)  # the footer's form
    assert client.post(f"/operator/alarms/{two_operators['alarm_a']}/acknowledge", data={"csrf_token": token}).status_code == 403


# --------------------------------------------------------------------------- the email


def test_new_alarms_are_emailed_once_to_the_alarm_address(app, sm, mailbox, charging_site):
    op = operator_of(sm, charging_site.site_id)
    with sm.begin() as s:
        s.get(Operator, op).alarm_email = "alarms@alpha.example"
    m1, m2 = add_meter(sm, charging_site.site_id, "MAIL1"), add_meter(sm, charging_site.site_id, "MAIL2")
    quiet = seed_site(app, cp_id="CP-Q")  # an operator without an alarm address
    mq = add_meter(sm, quiet.site_id, "MQUIET")
    for m in (m1, m2, mq):
        switch_off(sm, m)

    summary = check(app, utcnow())
    assert summary.emails == 1 and len(summary.raised) == 3
    [msg] = mailbox.wait_for("alarms@alpha.example")
    assert msg["Subject"] == "2 new alarms at Operator CP-1"
    body = msg.get_body(("plain",)).get_content()
    assert "MAIL1" in body and "MAIL2" in body and "MQUIET" not in body
    assert "Meter disconnected" in body and "http://localhost/operator/alarms" in body

    assert check(app, utcnow()).emails == 0  # the same alarms: not again
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(SentEmail).where(SentEmail.template == "alarms")) == 1
        assert s.scalar(select(Alarm.emailed_at).where(Alarm.object_id == mq)) is None  # nobody to tell

    switch_on(sm, m1)
    m3 = add_meter(sm, charging_site.site_id, "MAIL3")
    switch_off(sm, m3)
    summary = check(app, utcnow())
    assert summary.emails == 1 and len(summary.cleared) == 1
    second = mailbox.wait_for("alarms@alpha.example", count=2)[-1]
    assert second["Subject"] == "1 new alarm at Operator CP-1"
    body = second.get_body(("plain",)).get_content()
    assert "MAIL3" in body and "MAIL2" not in body
    assert len(mailbox.to("alarms@alpha.example")) == 2
