"""The operator console's setup pages: sites, chargers and their passwords, meters, tenants and CSV imports, tariffs.

What an operator notices: bad input answers 400 with the reason at the field
and stores nothing; a charger's password is shown once and opens the real
gateway; a tariff preview is what a real session is then billed, to the cent;
another operator's objects answer 404 and are never listed. Forms are sent as
a browser sends them, with CSRF tokens (``csrf_client``).
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import re
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from payments import wallet
from payments.base import utcnow
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from payments.tariff_store import add_version, connector_owner, versions
from tests.charging_helpers import gateway, simulators, wait_for  # noqa: F401  (fixtures)
from webapp.auth.passwords import hash_password, verify_password
from webapp.chargers.simulator import Refused
from webapp.charging import jobs, service
from webapp.charging.models import ChargeCommand, ChargerConnection, ChargingSession, CommandStatus, PaymentKind, SessionState
from webapp.charging.service import Reading, StartRequest
from webapp.console.setup_common import CODE_ALPHABET
from webapp.meters.models import Billing, MeterCollector, MeterTariff, MeterTariffVersion, Tenant
from webapp.models import Charger, Connector, Meter, MeterKind, Operator, Role, Site, User
from webapp.notifications.models import NotificationPreferences

PASSWORD = "correct horse staple"
SITE = {"name": "Garage Norte", "address": "Calle Norte 1, Madrid", "time_zone": "Europe/Madrid", "currency": "EUR",
        "start_window_s": "180", "min_billable_wh": "0", "min_billable_s": "0", "meter_sample_interval_s": "10",
        "hold_max_energy_kwh": "", "hold_max_charging_min": "", "hold_max_idle_min": ""}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def sm(app):
    return app.extensions["db_sessionmaker"]


def token(client) -> str:
    """The CSRF token of the signed-in browser session (one per session, good for every form)."""
    page = client.get("/operator/").get_data(as_text=True)
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)


def post(client, url: str, data: dict | None = None, **kw):
    """POST a form as the browser does: with the session's CSRF token."""
    return client.post(url, data={"csrf_token": token(client), **(data or {})}, **kw)


def field_error(page: str, name: str) -> str:
    """The error text shown at the field ``name`` ("" when none)."""
    m = re.search(rf'id="{re.escape(name)}-error">(.*?)</p>', page, re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def sign_in(client, make_user, email: str, **fields) -> None:
    make_user(email, **fields)
    page = client.get("/auth/sign-in").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    r = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD, "csrf_token": csrf})
    assert r.status_code in (302, 303), r.status_code


@pytest.fixture
def world(sm):
    """Operator A (empty) and operator B with a site, a charger, a meter, a tenant, a meter tariff and a collector."""
    with sm.begin() as s:
        a, b = Operator(name="Alpha Charging", legal_name="Alpha SL"), Operator(name="Beta Energie", legal_name="Beta GmbH")
        s.add_all([a, b])
        s.flush()
        sb = Site(operator_id=b.id, name="Beta Hof", time_zone="Europe/Berlin", currency="EUR")
        s.add(sb)
        s.flush()
        ch = Charger(site_id=sb.id, charge_point_id="BETA-CP-1", password_hash=hash_password("beta-secret-0123456"))
        s.add(ch)
        s.flush()
        conn = Connector(charger_id=ch.id, number=1, connector_code="BETA01")
        s.add(conn)
        collector = MeterCollector(operator_id=b.id, name="Beta concentrator", client_id="vpc_beta", client_secret_hash="x")
        tariff = MeterTariff(site_id=sb.id, name="Beta flat")
        s.add_all([collector, tariff])
        s.flush()
        s.add(MeterTariffVersion(tariff_id=tariff.id, number=1, effective_from=utcnow(), currency="EUR", created_by="test",
                                 tariff_json='{"currency": "EUR", "vat": 19, "kind": "flat", "energy_price": 0.2}'))
        tenant = Tenant(site_id=sb.id, name="Beta Mieter", contact_email="mieter@beta.example", currency="EUR")
        s.add(tenant)
        s.flush()
        meter = Meter(site_id=sb.id, meter_code="BETAM1", serial="SN-BETA-1", kind=MeterKind.TENANT, tenant_id=tenant.id)
        s.add(meter)
        s.flush()
        return {"a": a.id, "b": b.id, "site_b": sb.id, "charger_b": ch.id, "connector_b": conn.id, "collector_b": collector.id,
                "meter_tariff_b": tariff.id, "tenant_b": tenant.id, "meter_b": meter.id}


@pytest.fixture
def staff(csrf_client, make_user, world):
    """Operator A's staff, signed in."""
    sign_in(csrf_client, make_user, "staff@alpha.example", role=Role.OPERATOR_STAFF, operator_id=world["a"])
    return csrf_client


def create_site(client, **fields) -> int:
    r = post(client, "/operator/sites/new", {**SITE, **fields})
    assert r.status_code == 303, field_errors_of(r)
    return int(r.headers["Location"].rstrip("/").rsplit("/", 1)[1])


def field_errors_of(r) -> str:
    return " | ".join(html.unescape(x) for x in re.findall(r'<p class="error" id="[^"]+">(.*?)</p>', r.get_data(as_text=True), re.S))


def create_charger(client, site_id: int, cp_id: str = "CP-NEW-1", connectors: int = 2) -> tuple[int, str]:
    """Add a charger through the console; (its id, the password the answer page showed)."""
    r = post(client, f"/operator/sites/{site_id}/chargers/new",
             {"charge_point_id": cp_id, "connectors": str(connectors), "standard": "IEC_62196_T2", "max_power_kw": "22"})
    assert r.status_code == 201, field_errors_of(r)
    page = r.get_data(as_text=True)
    password = re.search(r'data-testid="charger-password">([^<]+)<', page).group(1)
    charger_id = int(re.search(r'action="/operator/chargers/(\d+)/password"', page).group(1))
    return charger_id, password


def count(sm, model) -> int:
    with sm() as s:
        return s.scalar(select(func.count()).select_from(model))


# --------------------------------------------------------------------------- who may come in


def test_strangers_and_customers_are_kept_out(client, make_user, world):
    r = client.get("/operator/sites")
    assert r.status_code == 302 and "/auth/sign-in" in r.headers["Location"]
    make_user("driver@example.com")
    client.post("/auth/sign-in", data={"email": "driver@example.com", "password": PASSWORD})
    assert client.get("/operator/").status_code == 403
    assert client.get(f"/operator/sites/{world['site_b']}").status_code == 403


def test_the_overview_links_every_section(staff):
    page = staff.get("/operator/").get_data(as_text=True)
    for href in ("/operator/sites", "/operator/buildings", "/operator/tariffs", "/operator/settings", "/operator/settlement/",
                 "/operator/branding", "/operator/collectors"):
        assert f'href="{href}"' in page, href


def test_another_operators_objects_answer_404_and_are_never_listed(staff, world):
    for url in (f"/operator/sites/{world['site_b']}", f"/operator/sites/{world['site_b']}/edit", f"/operator/sites/{world['site_b']}/tariff",
                f"/operator/sites/{world['site_b']}/chargers/new", f"/operator/chargers/{world['charger_b']}",
                f"/operator/connectors/{world['connector_b']}/edit", f"/operator/buildings/{world['site_b']}",
                f"/operator/buildings/{world['site_b']}/meters/new", f"/operator/buildings/{world['site_b']}/tenants/new",
                f"/operator/buildings/{world['site_b']}/meter-tariffs/new", f"/operator/meters/{world['meter_b']}/edit",
                f"/operator/tenants/{world['tenant_b']}/edit", f"/operator/meter-tariffs/{world['meter_tariff_b']}",
                "/operator/sites/999999", "/operator/chargers/999999"):
        assert staff.get(url).status_code == 404, url
    for url, data in ((f"/operator/chargers/{world['charger_b']}/password", {}),
                      (f"/operator/sites/{world['site_b']}/chargers/new", {"charge_point_id": "X-1", "connectors": "1", "max_power_kw": "22"}),
                      (f"/operator/sites/{world['site_b']}/edit", SITE),
                      (f"/operator/chargers/{world['charger_b']}/connectors", {"number": "5", "max_power_kw": "22"})):
        assert post(staff, url, data).status_code == 404, url
    r = post(staff, f"/operator/buildings/{world['site_b']}/import/meters",
             {"meters-file": (io.BytesIO(b"serial,kind\nX,tenant\n"), "m.csv")}, content_type="multipart/form-data")
    assert r.status_code == 404
    site_a = create_site(staff, name="Alpha Garage")
    for url in ("/operator/", "/operator/sites", "/operator/buildings", "/operator/tariffs", f"/operator/sites/{site_a}",
                f"/operator/buildings/{site_a}", f"/operator/buildings/{site_a}/meters/new", f"/operator/buildings/{site_a}/tenants/new"):
        page = staff.get(url).get_data(as_text=True)
        for secret in ("Beta Hof", "BETA-CP-1", "Beta concentrator", "Beta flat", "Beta Mieter", "BETAM1"):
            assert secret not in page, (url, secret)
    # Naming B's objects in A's building finds nothing.
    r = post(staff, f"/operator/buildings/{site_a}/meters/new", {"serial": "S1", "kind": "tenant", "ct_multiplier": "1", "prepaid": "y",
                                                                  "collector": "Beta concentrator", "tariff": f"#{world['meter_tariff_b']}"})
    assert r.status_code == 400
    assert "No collector Beta concentrator" in field_error(r.get_data(as_text=True), "collector")
    assert "No meter tariff" in field_error(r.get_data(as_text=True), "tariff")
    r = post(staff, f"/operator/buildings/{site_a}/tenants/new", {"name": "T", "contact_email": "t@example.com", "billing": "prepaid",
                                                                   "meters": "BETAM1"})
    assert r.status_code == 400 and "not a meter of this building" in field_error(r.get_data(as_text=True), "meters")


def test_an_admin_sees_every_operators_sites(csrf_client, make_user, world):
    sign_in(csrf_client, make_user, "admin@example.com", role=Role.ADMIN)
    assert "Beta Hof" in csrf_client.get("/operator/sites").get_data(as_text=True)
    assert csrf_client.get(f"/operator/chargers/{world['charger_b']}").status_code == 200
    r = post(csrf_client, "/operator/sites/new", {**SITE, "name": "Admin-made"})
    assert r.status_code == 400 and "Choose an operator" in r.get_data(as_text=True)
    r = post(csrf_client, "/operator/sites/new", {**SITE, "name": "Admin-made", "operator_id": str(world["a"])})
    assert r.status_code == 303


# --------------------------------------------------------------------------- sites and operator settings


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("time_zone", "Mars/Olympus_Mons", "Not a time zone"),
    ("time_zone", "../../etc/passwd", "Not a time zone"),
    ("currency", "EUR1", "Not an ISO 4217 currency"),
    ("currency", "XQQ", "Not an ISO 4217 currency"),
    ("name", "", "Give the site a name"),
    ("name", "Garage\x00Norte", "control characters"),  # PostgreSQL cannot even store a NUL
    ("start_window_s", "0", "Between 30 and 3600"),
    ("start_window_s", "ten", "Not a valid integer"),
    ("min_billable_wh", "-1", "Between 0 and 100000"),
    ("min_billable_s", "-5", "Between 0 and 3600"),
    ("hold_max_energy_kwh", "0", "Between 1 and 1000"),
    ("hold_max_charging_min", "0", "Between 1 and 1440"),
    ("hold_max_idle_min", "-1", "Between 0 and 1440"),
    ("meter_sample_interval_s", "0", "Between 5 and 900"),
])
def test_site_form_refuses_bad_input_at_the_field(staff, sm, field, value, reason):
    r = post(staff, "/operator/sites/new", {**SITE, field: value})
    assert r.status_code == 400
    assert reason in field_error(r.get_data(as_text=True), field)
    assert count(sm, Site) == 1  # only operator B's


def test_a_site_is_created_and_edited_with_its_charging_rules(staff, sm):
    site_id = create_site(staff, currency="eur", hold_max_energy_kwh="40", hold_max_charging_min="90", hold_max_idle_min="0",
                          min_billable_wh="250")
    with sm() as s:
        site = s.get(Site, site_id)
        assert (site.currency, site.time_zone, site.hold_max_energy_kwh, site.hold_max_charging_s, site.hold_max_idle_s,
                site.min_billable_wh) == ("EUR", "Europe/Madrid", 40, 5400, 0, 250)
    page = staff.get(f"/operator/sites/{site_id}").get_data(as_text=True)
    assert f'href="/sites/{site_id}/qr-sheet"' in page and f'href="/operator/settlement/sites/{site_id}/rules"' in page
    r = post(staff, f"/operator/sites/{site_id}/edit", {**SITE, "name": "Garage Sur", "time_zone": "Atlantic/Canary", "currency": "GBP"})
    assert r.status_code == 303
    with sm() as s:
        site = s.get(Site, site_id)
        assert (site.name, site.time_zone, site.currency, site.hold_max_energy_kwh) == ("Garage Sur", "Atlantic/Canary", "GBP", None)
    # With a charger, the prices are in the site's currency: it can no longer change.
    create_charger(staff, site_id)
    r = post(staff, f"/operator/sites/{site_id}/edit", {**SITE, "currency": "EUR"})
    assert r.status_code == 400 and "cannot change" in field_error(r.get_data(as_text=True), "currency")


def test_operator_settings_are_checked_and_saved(staff, sm, world):
    good = {"support_approval_limit": "250.00", "alarm_offline_minutes": "15", "alarm_meter_silence_hours": "48",
            "alarm_email": "Ops@Alpha.example"}
    for field, value, reason in (("support_approval_limit", "-5", "at least 0"), ("support_approval_limit", "1.234", "at least 0"),
                                 ("alarm_offline_minutes", "0", "Between 1 and 10080"), ("alarm_meter_silence_hours", "9999", "Between 1 and 720"),
                                 ("alarm_email", "not-an-email", "email address")):
        r = post(staff, "/operator/settings", {**good, field: value})
        assert r.status_code == 400, field
        assert reason in field_error(r.get_data(as_text=True), field), field
    assert post(staff, "/operator/settings", good).status_code == 303
    with sm() as s:
        op = s.get(Operator, world["a"])
        assert (op.support_approval_limit_minor, op.alarm_offline_minutes, op.alarm_meter_silence_hours, op.alarm_email) == (
            25000, 15, 48, "ops@alpha.example")
    assert 'value="250.00"' in staff.get("/operator/settings").get_data(as_text=True)
    assert post(staff, "/operator/settings", {**good, "support_approval_limit": ""}).status_code == 303
    with sm() as s:
        assert s.get(Operator, world["a"]).support_approval_limit_minor is None  # back to the platform default


# --------------------------------------------------------------------------- chargers and connectors


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"charge_point_id": "BETA-CP-1"}, "charge_point_id", "already exists"),
    ({"charge_point_id": "beta-cp-1"}, "charge_point_id", "already exists"),  # CiString: case-insensitive
    ({"charge_point_id": "C" * 49}, "charge_point_id", "At most 48"),
    ({"charge_point_id": "CP:1"}, "charge_point_id", "no spaces, colons or slashes"),
    ({"charge_point_id": "CP 1"}, "charge_point_id", "no spaces, colons or slashes"),
    ({"charge_point_id": "CP/1"}, "charge_point_id", "no spaces, colons or slashes"),
    ({"charge_point_id": "CPé1"}, "charge_point_id", "no spaces, colons or slashes"),
    ({"charge_point_id": ""}, "charge_point_id", "Enter the charger"),
    ({"connectors": "0"}, "connectors", "Between 1 and 10"),
    ({"max_power_kw": "0"}, "max_power_kw", "Between 1 and 1000"),
    ({"max_power_kw": "-22"}, "max_power_kw", "Between 1 and 1000"),
])
def test_charger_form_refuses_bad_input_at_the_field(staff, sm, data, field, reason):
    site_id = create_site(staff)
    r = post(staff, f"/operator/sites/{site_id}/chargers/new",
             {"charge_point_id": "CP-OK", "connectors": "2", "standard": "IEC_62196_T2", "max_power_kw": "22", **data})
    assert r.status_code == 400
    assert reason in field_error(r.get_data(as_text=True), field)
    assert count(sm, Charger) == 1


def test_the_password_is_shown_once_and_opens_the_gateway(app, staff, sm, gateway, simulators):  # noqa: F811
    site_id = create_site(staff)
    charger_id, password = create_charger(staff, site_id, cp_id="CP-CONSOLE-1")
    assert len(password) == 24
    with sm() as s:
        charger = s.get(Charger, charger_id)
        assert charger.password_hash != password and verify_password(charger.password_hash, password)  # what the gateway checks
        codes = [c.connector_code for c in charger.connectors]
    assert len(set(codes)) == 2 and all(len(c) == 6 and set(c) <= set(CODE_ALPHABET) for c in codes)
    again = staff.get(f"/operator/chargers/{charger_id}")
    assert again.status_code == 200 and password not in again.get_data(as_text=True)
    assert "no-store" in again.headers["Cache-Control"]
    assert 'data-testid="charger-online">Offline' in again.get_data(as_text=True)

    # The real gateway lets the charger in with that password, and only with it.
    with pytest.raises(Refused) as e:
        simulators.start("CP-CONSOLE-1", "not-the-password")
    assert e.value.status == 401
    sim = simulators.start("CP-CONSOLE-1", password)
    wait_for(lambda: 'data-testid="charger-online">Online' in staff.get(f"/operator/chargers/{charger_id}").get_data(as_text=True),
             what="the charger page to show it online")
    wait_for(lambda: staff.get(f"/operator/chargers/{charger_id}").get_data(as_text=True).count('data-testid="connector-status">Available') == 2,
             what="both connectors to show Available")

    # A new password: shown once; the old one no longer opens the gateway.
    r = post(staff, f"/operator/chargers/{charger_id}/password")
    assert r.status_code == 200
    new = re.search(r'data-testid="charger-password">([^<]+)<', r.get_data(as_text=True)).group(1)
    assert new != password
    simulators.run(sim.close())
    with pytest.raises(Refused):
        simulators.start("CP-CONSOLE-1", password)
    simulators.start("CP-CONSOLE-1", new)


def test_connectors_are_added_with_unique_codes_and_edited(staff, sm):
    site_id = create_site(staff)
    charger_id, _pw = create_charger(staff, site_id, connectors=1)
    r = post(staff, f"/operator/chargers/{charger_id}/connectors", {"number": "1", "standard": "CHADEMO", "max_power_kw": "50"})
    assert r.status_code == 400 and "already has a connector 1" in field_error(r.get_data(as_text=True), "number")
    r = post(staff, f"/operator/chargers/{charger_id}/connectors", {"number": "2", "standard": "CHADEMO", "max_power_kw": "50"})
    assert r.status_code == 303
    with sm() as s:
        c2 = s.scalar(select(Connector).where(Connector.charger_id == charger_id, Connector.number == 2))
        assert (c2.standard, c2.max_power_kw) == ("CHADEMO", 50)
    r = post(staff, f"/operator/connectors/{c2.id}/edit", {"number": "7", "standard": "IEC_62196_T2_COMBO", "max_power_kw": "0"})
    assert r.status_code == 400 and "Between 1 and 1000" in field_error(r.get_data(as_text=True), "max_power_kw")
    assert post(staff, f"/operator/connectors/{c2.id}/edit", {"number": "7", "standard": "IEC_62196_T2_COMBO", "max_power_kw": "150"}).status_code == 303
    with sm() as s:
        c2 = s.get(Connector, c2.id)
        assert (c2.number, c2.standard, c2.max_power_kw) == (2, "IEC_62196_T2_COMBO", 150)  # the number is the hardware's


# --------------------------------------------------------------------------- meters and tenants


def meters_csv(*rows: str, header: str = "meter_code,serial,kind,ct_multiplier,prepaid,master_meter_code,tariff,collector,register_max_kwh") -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def upload(client, site_id: int, kind: str, data: bytes):
    return post(client, f"/operator/buildings/{site_id}/import/{kind}", {f"{kind}-file": (io.BytesIO(data), f"{kind}.csv")},
                content_type="multipart/form-data")


def report_rows(page: str) -> list[tuple[str, str, str, str]]:
    rows = re.findall(r'<tr data-testid="report-row"><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>', page, re.S)
    return [tuple(html.unescape(c) for c in row) for row in rows]


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"serial": ""}, "serial", "serial number"),
    ({"serial": "SN\x001"}, "serial", "control characters"),
    ({"kind": "attic"}, "kind", "One of tenant, public_area, master"),
    ({"ct_multiplier": "0"}, "ct_multiplier", "1 to 100000"),
    ({"ct_multiplier": "1.5"}, "ct_multiplier", "1 to 100000"),
    ({"register_max_kwh": "-1"}, "register_max_kwh", "More than 0"),
    ({"register_max_kwh": "1e9"}, "register_max_kwh", "number like"),
    ({"register_max_kwh": "99999.9999"}, "register_max_kwh", "at most 3 decimals"),
    ({"meter_code": "M 1"}, "meter_code", "At most 16 letters"),
    ({"meter_code": "betam1"}, "meter_code", "Another meter already has the code BETAM1"),
    ({"master_meter_code": "NOPE"}, "master_meter_code", "No master meter NOPE"),
    ({"master_meter_code": "BETAM1"}, "master_meter_code", "No master meter BETAM1"),  # another building's
])
def test_meter_form_refuses_bad_input_at_the_field(staff, sm, data, field, reason):
    site_id = create_site(staff)
    good = {"meter_code": "", "serial": "SN-1", "kind": "tenant", "ct_multiplier": "1", "prepaid": "y", "register_max_kwh": ""}
    r = post(staff, f"/operator/buildings/{site_id}/meters/new", {**good, **data})
    assert r.status_code == 400
    assert reason in field_error(r.get_data(as_text=True), field)
    assert count(sm, Meter) == 1


def test_a_meter_csv_with_a_bad_row_imports_nothing_and_reports_every_problem(staff, sm):
    site_id = create_site(staff)
    bad = meters_csv(
        "M-MASTER,SN-0,master,1,no,,,,",
        "M-1,SN-1,tenant,1,yes,M-MASTER,,,99999.9",
        "M-2,,tenant,0,maybe,M-NOWHERE,,,",
        "M-1,SN-3,=HYPERLINK(\"http://evil.example\"),1,yes,,,,",
        ",SN-5,public_area,2,no,,,,",
    )
    r = upload(staff, site_id, "meters", bad)
    assert r.status_code == 400
    page = r.get_data(as_text=True)
    assert "Nothing was imported" in page
    rows = report_rows(page)
    assert ("4", "serial", "", "Enter the meter's serial number.") in rows
    assert {(line, f) for line, f, _v, _r in rows} == {
        ("3", "meter_code"), ("4", "serial"), ("4", "ct_multiplier"), ("4", "prepaid"), ("4", "master_meter_code"), ("5", "meter_code"),
        ("5", "kind")}
    assert count(sm, Meter) == 1  # nothing imported

    # The downloadable report: the same problems, and nothing a spreadsheet would run as a formula.
    report = html.unescape(re.search(r'<textarea name="report" hidden>(.*?)</textarea>', page, re.S).group(1))
    r = post(staff, "/operator/import-report.csv", {"report": report})
    assert r.status_code == 200 and r.mimetype == "text/csv" and "attachment" in r.headers["Content-Disposition"]
    lines = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert lines[0] == ["line", "field", "value", "reason"] and len(lines) == 1 + len(rows)
    assert ["5", "kind", "'=HYPERLINK(\"http://evil.example\")", "One of tenant, public_area, master."] in lines
    assert not any(cell[:1] and cell[:1] in "=+-@" for line in lines for cell in line)
    # A report posted back with a formula in it comes out harmless too.
    r = post(staff, "/operator/import-report.csv", {"report": "line,field\n1,=cmd|' /C calc'!A0\n"})
    assert list(csv.reader(io.StringIO(r.get_data(as_text=True))))[1] == ["1", "'=cmd|' /C calc'!A0"]

    # The corrected file goes in whole, sub-meters linked to the master of the same file.
    with sm.begin() as s:
        s.add(MeterTariff(site_id=site_id, name="Flat 2026"))
    good = meters_csv("M-MASTER,SN-0,master,1,no,,,,", "m-1,SN-1,tenant,1,yes,M-MASTER,Flat 2026,,99999.9", ",SN-5,public_area,2,no,,,,")
    r = upload(staff, site_id, "meters", good)
    assert r.status_code == 303, report_rows(r.get_data(as_text=True))
    with sm() as s:
        rows = {m.serial: m for m in s.scalars(select(Meter).where(Meter.site_id == site_id))}
    assert set(rows) == {"SN-0", "SN-1", "SN-5"}
    assert rows["SN-1"].meter_code == "M-1" and rows["SN-1"].master_meter_id == rows["SN-0"].id and rows["SN-1"].tariff_id is not None
    assert rows["SN-1"].register_max_kwh == D("99999.9") and rows["SN-5"].ct_multiplier == 2 and not rows["SN-5"].prepaid
    assert len(rows["SN-5"].meter_code) == 6  # generated


def test_whole_file_problems_are_refused_before_any_row(staff, sm, monkeypatch):
    site_id = create_site(staff)
    for data, reason in ((b"", "The file is empty"), (b"serial,kind,colour\nS,tenant,red\n", "The first line must name the columns"),
                         (b"serial\nS\n", "The first line must name the columns"), (b"\xff\xfe\x00bad", "not UTF-8"),
                         (b"serial,kind\n", "no rows")):
        r = upload(staff, site_id, "meters", data)
        assert r.status_code == 400 and reason in r.get_data(as_text=True), reason
    from webapp.console import setup_meters

    monkeypatch.setattr(setup_meters, "MAX_IMPORT_BYTES", 100)
    r = upload(staff, site_id, "meters", meters_csv(*[f",SN-{i},tenant,1,yes,,,," for i in range(10)]))
    assert r.status_code == 400 and "larger than 1 MB" in r.get_data(as_text=True)
    r = post(staff, f"/operator/buildings/{site_id}/import/meters", {}, content_type="multipart/form-data")
    assert r.status_code == 400 and "Choose a CSV file" in r.get_data(as_text=True)
    assert count(sm, Meter) == 1


def test_tenants_rows_and_form_follow_the_rules(staff, sm, make_user):
    site_id = create_site(staff)
    make_user("tess@example.com")
    make_user("staffer@example.com", role=Role.SUPPORT)
    assert upload(staff, site_id, "meters", meters_csv("P-1,S1,tenant,1,yes,,,,", "P-2,S2,tenant,1,yes,,,,", "Q-1,S3,tenant,1,no,,,,",
                                                       "Q-2,S5,tenant,1,no,,,,", "PUB,S4,public_area,1,no,,,,")).status_code == 303
    header = "name,contact_email,contact_phone,unit,leased_area_m2,billing,account_email,meters"
    bad = (f"{header}\n"
           "Tess,tess@example.com,,3B,48.5,prepaid,tess@example.com,P-1\n"
           "Ulla,not-an-email,,4A,-3,monthly,nobody@example.com,P-1;Q-1\n"
           "Vic,vic@example.com,,,,postpaid,staffer@example.com,PUB BETAM1\n").encode()
    r = upload(staff, site_id, "tenants", bad)
    assert r.status_code == 400
    rows = report_rows(r.get_data(as_text=True))
    assert {(line, f) for line, f, _v, _r in rows} == {
        ("3", "contact_email"), ("3", "leased_area_m2"), ("3", "billing"), ("3", "account_email"), ("3", "meters"),
        ("4", "account_email"), ("4", "meters")}
    reasons = {(line, f): reason for line, f, _v, reason in rows}
    assert "P-1 is given to another tenant on line 2" in reasons[("3", "meters")]
    assert "PUB is not a tenant meter" in reasons[("4", "meters")] and "BETAM1 is not a meter of this building" in reasons[("4", "meters")]
    assert "No Voltpay customer account" in reasons[("4", "account_email")]
    assert count(sm, Tenant) == 1

    good = (f"{header}\n"
            "Tess,TESS@example.com,+34 600 000 000,3B,48.5,prepaid,tess@example.com,P-1 p-2\n"
            "Vic,vic@example.com,,,0,postpaid,,Q-1\n").encode()
    assert upload(staff, site_id, "tenants", good).status_code == 303
    with sm() as s:
        tess = s.scalar(select(Tenant).where(Tenant.name == "Tess"))
        user = s.scalar(select(User).where(User.email == "tess@example.com"))
        assert (tess.user_id, tess.billing, tess.leased_area_m2, tess.currency) == (user.id, Billing.PREPAID, D("48.50"), "EUR")
        assert sorted(m.meter_code for m in tess.meters) == ["P-1", "P-2"]
        vic = s.scalar(select(Tenant).where(Tenant.name == "Vic"))

    # The form: a meter held by another tenant, a post-paid meter for a prepaid tenant; billing never changes.
    r = post(staff, f"/operator/buildings/{site_id}/tenants/new", {"name": "Wes", "contact_email": "wes@example.com", "billing": "prepaid",
                                                                   "meters": ["P-1", "Q-2"], "leased_area_m2": "0"})
    assert r.status_code == 400
    error = field_error(r.get_data(as_text=True), "meters")
    assert "P-1 belongs to tenant Tess" in error and "Q-2 is post-paid, the tenant is not" in error
    r = post(staff, f"/operator/tenants/{vic.id}/edit", {"name": "Vic Ltd", "contact_email": "vic@example.com", "billing": "prepaid",
                                                         "meters": ["Q-1"], "leased_area_m2": "12"})
    assert r.status_code == 303
    with sm() as s:
        vic = s.get(Tenant, vic.id)
        assert (vic.name, vic.billing, vic.leased_area_m2) == ("Vic Ltd", Billing.POSTPAID, D("12.00"))
    # A meter with money on it does not leave its tenant.
    with sm.begin() as s:
        p2 = s.scalar(select(Meter).where(Meter.meter_code == "P-2"))
        transfer(s, idempotency_key="test:p2", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=get_account(s, AccountKind.METER_WALLET, "EUR", f"meter:{p2.id}"), amount=Money(500, "EUR"))
    r = post(staff, f"/operator/tenants/{tess.id}/edit", {"name": "Tess", "contact_email": "tess@example.com", "billing": "prepaid",
                                                          "meters": ["P-1"], "leased_area_m2": "48.5"})
    assert r.status_code == 400 and "P-2 has a balance" in field_error(r.get_data(as_text=True), "meters")
    # A meter of a prepaid tenant stays prepaid.
    r = post(staff, f"/operator/meters/{p2.id}/edit", {"serial": "S2", "kind": "tenant", "ct_multiplier": "1"})
    assert r.status_code == 400 and "Tess is prepaid: the meter must be too" in field_error(r.get_data(as_text=True), "prepaid")


# --------------------------------------------------------------------------- tariffs


COMMON = {"mode": "common", "currency": "EUR", "energy_price": "0.30", "time_price": "1.20", "time_per": "hour", "session_fee": "1.00",
          "idle_price": "0.10", "idle_per": "minute", "idle_grace_min": "15", "vat": "21", "tariff_json": "", "effective_from": "",
          "preview_energy_kwh": "7.5", "preview_charging_min": "40", "preview_idle_min": "25", "preview_start": ""}


def tariff_site(staff, sm, **site_fields) -> tuple[int, int, list[int]]:
    """A site made in the console with one charger (two connectors): (site id, charger id, connector ids)."""
    site_id = create_site(staff, **site_fields)
    charger_id, _pw = create_charger(staff, site_id, cp_id="CP-TARIFF")
    with sm() as s:
        ids = [c.id for c in s.scalars(select(Connector).where(Connector.charger_id == charger_id).order_by(Connector.number))]
    return site_id, charger_id, ids


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"mode": "json", "tariff_json": "{not json"}, "tariff_json", "not valid JSON"),
    ({"mode": "json", "tariff_json": "[1, 2]"}, "tariff_json", "must be a JSON object"),
    ({"mode": "json", "tariff_json": '{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": -0.3, '
                                     '"vat": 21, "step_size": 1}]}]}'}, "tariff_json", "elements/0/price_components/0/price"),
    ({"mode": "json", "tariff_json": '{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": 0.3, '
                                     '"vat": 21, "step_size": 1}], "restrictions": {"start_time": "25:00"}}]}'},
     "tariff_json", "elements/0/restrictions/start_time"),
    ({"mode": "json", "tariff_json": '{"currency": "USD", "elements": [{"price_components": [{"type": "ENERGY", "price": 0.3, '
                                     '"step_size": 1}]}]}'}, "tariff_json", "currency: must be EUR"),
    ({"mode": "json", "tariff_json": ""}, "tariff_json", "Paste the OCPI tariff"),
    ({"energy_price": "", "time_price": "", "session_fee": "", "idle_price": ""}, "energy_price", "Give at least one price"),
    ({"energy_price": "-0.30"}, "energy_price", "at least 0"),
    ({"energy_price": "0.3.0"}, "energy_price", "number like"),
    ({"energy_price": "NaN"}, "energy_price", "number like"),
    ({"session_fee": "1.00001"}, "session_fee", "at most 4 decimals"),
    ({"vat": "121"}, "vat", "at most 100"),
    ({"vat": ""}, "vat", "Enter the VAT rate"),
    ({"currency": "USD"}, "currency", "Must be EUR"),
    ({"idle_grace_min": "-1"}, "idle_grace_min", "Between 0 and 1440"),
    ({"preview_energy_kwh": "0"}, "preview_energy_kwh", "more than 0"),
    ({"preview_charging_min": "0"}, "preview_charging_min", "Between 1 and 1440"),
    ({"preview_start": "tomorrow"}, "preview_start", "date and time like"),
    ({"preview_start": "2030-03-31 02:30"}, "preview_start", "does not exist in Europe/Madrid"),
    ({"preview_start": "9999-12-31 23:59"}, "preview_start", "between the years 2000 and 2200"),
    ({"effective_from": "0001-01-01 00:30"}, "effective_from", "between the years 2000 and 2200"),
])
def test_tariff_form_shows_each_error_at_its_field_and_saves_nothing(staff, sm, data, field, reason):
    site_id, _charger_id, ids = tariff_site(staff, sm)
    for action in ("save",) if field == "effective_from" else ("preview", "save"):
        r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, **data, "connectors": [str(i) for i in ids], "action": action})
        assert r.status_code == 400, action
        assert reason in field_error(r.get_data(as_text=True), field), (action, field_errors_of(r))
        if field.startswith("preview_"):
            break  # the example session is not part of what is saved
    with sm() as s:
        assert all(versions(s, connector_owner(i)) == [] for i in ids)


def test_saving_a_tariff_needs_connectors_and_a_future_effective_time(staff, sm):
    site_id, _charger_id, ids = tariff_site(staff, sm)
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "action": "save"})
    assert r.status_code == 400 and "Choose the connectors" in r.get_data(as_text=True)
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "action": "save", "connectors": [str(ids[0])],
                                                          "effective_from": "2020-01-01 10:00"})
    assert r.status_code == 400 and "must not be in the past" in field_error(r.get_data(as_text=True), "effective_from")
    later = (dt.datetime.now(ZoneInfo("Europe/Madrid")) + dt.timedelta(days=3)).strftime("%Y-%m-%d %H:%M")
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "action": "save", "connectors": [str(ids[0])], "effective_from": later})
    assert r.status_code == 303
    with sm() as s:
        (v,) = versions(s, connector_owner(ids[0]))
        assert v.effective_from.astimezone(ZoneInfo("Europe/Madrid")).strftime("%Y-%m-%d %H:%M") == later
        assert versions(s, connector_owner(ids[1])) == []
    page = staff.get(f"/operator/sites/{site_id}/tariff").get_data(as_text=True)
    assert "Future" in page
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "action": "save", "connectors": [str(ids[0])], "effective_from": later})
    assert r.status_code == 400 and "takes effect at that instant" in field_error(r.get_data(as_text=True), "effective_from")


class _Gateway:
    """Stands in for the gateway process: accepts each command (as in test_charging_service.py)."""

    def call(self, s, charger, action, payload, *, key, session_id=None, requested_by="system"):
        s.add(ChargeCommand(charger_id=charger.id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                            idempotency_key=key, requested_by=requested_by, status=CommandStatus.ACCEPTED))
        s.commit()
        return service.CommandResult(CommandStatus.ACCEPTED, {"status": "Accepted"})


def run_real_session(app, sm, *, cp_id: str, connector_id: int, t0: dt.datetime, kwh: D, charging_min: int, idle_min: int) -> ChargingSession:
    """A wallet session at the connector, driven event by event as the gateway applies a charger's messages, settled by the worker's path."""
    with sm.begin() as s:
        s.add(ChargerConnection(charger_id=s.scalar(select(Charger.id).where(Charger.charge_point_id == cp_id)),
                                gateway_url="http://gateway.invalid", connection_id="c1"))
        s.get(Connector, connector_id).status = "Available"
        user = User(email="ana@example.com", password_hash="x")
        s.add(user)
        s.flush()
        # She opted out of emails: the bill is what is compared here (receipts and their PDFs have tests of their own).
        s.add(NotificationPreferences(user_id=user.id, receipts=False, session_started=False, session_completed=False))
        transfer(s, idempotency_key="gift", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(100_00, "EUR"))
    with app.app_context(), sm() as s:
        req = StartRequest(connector=s.get(Connector, connector_id), user=s.get(User, user.id), email=None, payment_kind=PaymentKind.WALLET)
        cs = service.start_session(s, None, _Gateway(), req, now=utcnow()).session
    assert cs.state == SessionState.START_REQUESTED
    with sm() as s:
        number = s.get(Connector, connector_id).number

    def event(fn, at, **kw):
        with app.app_context():
            with sm() as s:
                charger = s.scalar(select(Charger).where(Charger.charge_point_id == cp_id))
                ans = fn(s, charger, now=at, **kw)
                s.commit()
            jobs.enqueue_settlements(ans.settle if isinstance(ans, service.Answer) else [])
            return ans

    stop = t0 + dt.timedelta(minutes=charging_min)
    wh = kwh * 1000
    event(service.status_changed, t0, connector_number=number, status="Charging", error_code="NoError", timestamp=t0)
    ans = event(service.start_transaction, t0, connector_number=number, id_tag=cs.id_tag, meter_start_wh=D(5000), timestamp=t0)
    for i in (1, 2, 3):  # readings along the way, as a charger sends them
        at = t0 + dt.timedelta(seconds=charging_min * 60 * i // 4)
        event(service.meter_values, at, connector_number=number, transaction_id=ans.transaction_id,
              readings=[Reading(at, D(5000) + (wh * i / 4).quantize(D(1)), D(11000))])
    event(service.stop_transaction, stop, transaction_id=ans.transaction_id, meter_stop_wh=D(5000) + wh, timestamp=stop, reason="Local",
          readings=[])
    event(service.status_changed, stop, connector_number=number, status="Finishing", error_code="NoError", timestamp=stop)
    left = stop + dt.timedelta(minutes=idle_min)
    event(service.status_changed, left, connector_number=number, status="Available", error_code="NoError", timestamp=left)
    with sm() as s:
        return s.get(ChargingSession, cs.id)


def preview_amounts(page: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r'data-testid="preview-(\w+)" data-minor="(-?\d+)"', page)}


def test_the_preview_of_the_common_form_is_what_a_real_session_is_billed(app, staff, sm):
    site_id, _charger_id, ids = tariff_site(staff, sm)
    zone = ZoneInfo("Europe/Madrid")
    t0 = (utcnow() + dt.timedelta(minutes=3)).astimezone(zone).replace(second=0, microsecond=0)
    example = {**COMMON, "preview_start": t0.strftime("%Y-%m-%d %H:%M"), "connectors": [str(i) for i in ids]}
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**example, "action": "preview"})
    assert r.status_code == 200
    shown = preview_amounts(r.get_data(as_text=True))
    # 7.5 kWh × 0.30 + 40 min × 1.20/h + 1.00 + idle 25 min after the 15-minute grace (already over) × 0.10 = 6.55; × 1.21 = 7.9255
    assert shown == {"excl": 655, "vat": 138, "total": 793, "hold": shown["hold"], "captured": 793} and shown["hold"] > 793
    with sm() as s:
        assert all(versions(s, connector_owner(i)) == [] for i in ids)  # a preview saves nothing

    assert post(staff, f"/operator/sites/{site_id}/tariff", {**example, "action": "save"}).status_code == 303
    done = run_real_session(app, sm, cp_id="CP-TARIFF", connector_id=ids[0], t0=t0.astimezone(dt.UTC), kwh=D("7.5"), charging_min=40,
                            idle_min=25)
    assert done.state == SessionState.COMPLETED
    assert (done.final_excl_vat_minor, done.final_vat_minor, done.final_incl_vat_minor, done.captured_minor) == (
        shown["excl"], shown["vat"], shown["total"], shown["captured"])
    assert done.hold_minor == shown["hold"]


def test_the_preview_of_an_ocpi_json_tariff_prices_time_of_use_like_a_real_session(app, staff, sm):
    from webapp.seed import DEMO_TOU_TARIFF

    site_id, _charger_id, ids = tariff_site(staff, sm)
    zone = ZoneInfo("Europe/Madrid")
    day = dt.datetime.now(zone).date() + dt.timedelta(days=1)
    while day.weekday() >= 5:  # a weekday: the 18:00-22:00 peak applies
        day += dt.timedelta(days=1)
    t0 = dt.datetime.combine(day, dt.time(17, 20), zone)  # 40 minutes at 0.30, then 50 at the 0.45 peak
    data = {**COMMON, "mode": "json", "tariff_json": DEMO_TOU_TARIFF, "preview_energy_kwh": "16.5", "preview_charging_min": "90",
            "preview_idle_min": "30", "preview_start": t0.strftime("%Y-%m-%d %H:%M"), "connectors": [str(i) for i in ids]}
    shown = preview_amounts(post(staff, f"/operator/sites/{site_id}/tariff", {**data, "action": "preview"}).get_data(as_text=True))
    assert post(staff, f"/operator/sites/{site_id}/tariff", {**data, "action": "save"}).status_code == 303
    done = run_real_session(app, sm, cp_id="CP-TARIFF", connector_id=ids[1], t0=t0.astimezone(dt.UTC), kwh=D("16.5"), charging_min=90,
                            idle_min=30)
    assert done.state == SessionState.COMPLETED, (done.state, done.failure_code, done.anomaly)
    assert (done.final_excl_vat_minor, done.final_incl_vat_minor, done.captured_minor) == (shown["excl"], shown["total"], shown["captured"])
    # €1 + 7.333 kWh × 0.30 (until 18:00) + 9.167 kWh × 0.45 + 30 idle min × 0.10 (the grace is the session's first 15 min) = 10.325
    assert (shown["excl"], shown["total"]) == (1033, 1249)


def test_the_preview_follows_the_sites_minimum_and_the_hold(staff, sm):
    site_id, _charger_id, ids = tariff_site(staff, sm, min_billable_wh="500", hold_max_energy_kwh="10", hold_max_charging_min="60")
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "preview_energy_kwh": "0.4", "action": "preview"})
    shown = preview_amounts(r.get_data(as_text=True))
    assert shown["total"] > 0 and shown["captured"] == 0 and "would be free" in r.get_data(as_text=True)
    r = post(staff, f"/operator/sites/{site_id}/tariff", {**COMMON, "preview_energy_kwh": "200", "preview_charging_min": "600",
                                                          "action": "preview"})
    shown = preview_amounts(r.get_data(as_text=True))
    assert shown["captured"] == shown["hold"] < shown["total"]


def test_meter_tariffs_are_validated_and_versioned(staff, sm, world):
    site_id = create_site(staff)
    good = '{"currency": "EUR", "vat": 21, "kind": "flat", "energy_price": 0.15}'
    for data, field, reason in (({"name": "Flat", "tariff_json": "{oops"}, "tariff_json", "not valid JSON"),
                                ({"name": "Flat", "tariff_json": '{"currency": "EUR", "vat": 21, "kind": "flat", "energy_price": 0.15, '
                                                                 '"colour": "red"}'}, "tariff_json", "colour: unknown field"),
                                ({"name": "Flat", "tariff_json": '{"currency": "EUR", "vat": 21, "kind": "flat"}'}, "tariff_json",
                                 "energy_price: is required"),
                                ({"name": "Flat", "tariff_json": good.replace("EUR", "GBP")}, "tariff_json", "currency: must be EUR"),
                                ({"name": "", "tariff_json": good}, "name", "Give the tariff a name"),
                                ({"name": "Flat", "tariff_json": good, "effective_from": "31/12/2026"}, "effective_from", "date and time like")):
        r = post(staff, f"/operator/buildings/{site_id}/meter-tariffs/new", data)
        assert r.status_code == 400, reason
        assert reason in field_error(r.get_data(as_text=True), field), reason
    assert count(sm, MeterTariff) == 1
    r = post(staff, f"/operator/buildings/{site_id}/meter-tariffs/new", {"name": "Flat", "tariff_json": good,
                                                                         "effective_from": "2026-01-01 00:00"})
    assert r.status_code == 303
    tariff_id = int(r.headers["Location"].rsplit("/", 1)[1])
    r = post(staff, f"/operator/meter-tariffs/{tariff_id}", {"tariff_json": good.replace("0.15", "0.18"), "effective_from": "2026-01-01 00:00"})
    assert r.status_code == 400 and "takes effect at that instant" in field_error(r.get_data(as_text=True), "effective_from")
    assert post(staff, f"/operator/meter-tariffs/{tariff_id}", {"tariff_json": good.replace("0.15", "0.18"),
                                                                "effective_from": "2026-07-01 00:00"}).status_code == 303
    with sm() as s:
        rows = s.scalars(select(MeterTariffVersion).where(MeterTariffVersion.tariff_id == tariff_id).order_by(MeterTariffVersion.number)).all()
        assert [(v.number, v.effective_from) for v in rows] == [(1, dt.datetime(2025, 12, 31, 23, 0, tzinfo=dt.UTC)),
                                                                 (2, dt.datetime(2026, 6, 30, 22, 0, tzinfo=dt.UTC))]
    page = staff.get(f"/operator/meter-tariffs/{tariff_id}").get_data(as_text=True)
    assert page.count('data-testid="meter-tariff-version"') == 2


def test_the_tariffs_page_lists_connectors_without_a_tariff(staff, sm):
    site_id, _charger_id, ids = tariff_site(staff, sm)
    page = staff.get("/operator/tariffs").get_data(as_text=True)
    assert "No tariff:" in page
    with sm.begin() as s:
        for i in ids:
            add_version(s, connector_owner(i), {"currency": "EUR", "elements": [{"price_components": [
                {"type": "ENERGY", "price": D("0.35"), "vat": D(21), "step_size": 1}]}]}, site_currency="EUR", created_by="test")
    page = staff.get("/operator/tariffs").get_data(as_text=True)
    assert "No tariff:" not in page and "€0.4235 per kWh" in page
    assert "drivers cannot start" not in staff.get("/operator/").get_data(as_text=True)


def test_every_setup_page_opens_for_staff_and_for_an_admin(app, csrf_client, make_user, sm, world):
    sign_in(csrf_client, make_user, "admin@example.com", role=Role.ADMIN)
    with sm.begin() as s:
        add_version(s, connector_owner(world["connector_b"]), {"currency": "EUR", "elements": [{"price_components": [
            {"type": "ENERGY", "price": D("0.35"), "vat": D(21), "step_size": 1}]}]}, site_currency="EUR", created_by="test")
        s.get(Meter, world["meter_b"]).tariff_id = world["meter_tariff_b"]
        s.get(Meter, world["meter_b"]).collector_id = world["collector_b"]
    pages = ["/operator/", "/operator/settings", f"/operator/settings?operator={world['b']}", "/operator/sites", "/operator/sites/new",
             f"/operator/sites/{world['site_b']}", f"/operator/sites/{world['site_b']}/edit", f"/operator/sites/{world['site_b']}/tariff",
             f"/operator/sites/{world['site_b']}/chargers/new", f"/operator/chargers/{world['charger_b']}",
             f"/operator/connectors/{world['connector_b']}/edit", "/operator/buildings", f"/operator/buildings/{world['site_b']}",
             f"/operator/buildings/{world['site_b']}/meters/new", f"/operator/meters/{world['meter_b']}/edit",
             f"/operator/buildings/{world['site_b']}/tenants/new", f"/operator/tenants/{world['tenant_b']}/edit",
             f"/operator/buildings/{world['site_b']}/meter-tariffs/new", f"/operator/meter-tariffs/{world['meter_tariff_b']}", "/operator/tariffs"]
    for url in pages:
        r = csrf_client.get(url)
        assert r.status_code == 200, url
    page = html.unescape(csrf_client.get(f"/operator/sites/{world['site_b']}/tariff").get_data(as_text=True))
    assert "€0.4235 per kWh" in page and '"price": 0.35' in page  # the version, and the JSON to start a change from
    page = csrf_client.get(f"/operator/meters/{world['meter_b']}/edit").get_data(as_text=True)
    assert 'value="SN-BETA-1"' in page and f'<option selected value="#{world["meter_tariff_b"]}">' in page
    page = csrf_client.get(f"/operator/tenants/{world['tenant_b']}/edit").get_data(as_text=True)
    assert 'value="BETAM1" checked' in page
    # Operator staff: their own operator's settings, no operator to pick.
    staff_client = app.test_client()
    sign_in(staff_client, make_user, "staff@beta.example", role=Role.OPERATOR_STAFF, operator_id=world["b"])
    for url in pages:
        assert staff_client.get(url).status_code == 200, url
