"""Meter readings: ingest (idempotent, out-of-order safe, monotonic with declared events), prepaid debits exactly once,
the collector API behind OAuth2 client credentials, CSV upload, and concurrent ingest + top-up on PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select

from payments.ledger import AccountKind, JournalEntry, get_account, posted_sum, transfer
from payments.money import Money
from webapp.meters import readings
from webapp.meters.models import Billing, MeterEventKind, MeterInterval, MeterReading, MeterTariff, Tenant
from webapp.models import Meter, MeterKind, Operator, Site

UTC = dt.UTC
T0 = dt.datetime(2025, 1, 13, 0, 0, tzinfo=UTC)  # a Monday
NOW = dt.datetime(2025, 2, 1, tzinfo=UTC)
FLAT = {"currency": "EUR", "vat": D(21), "kind": "flat", "energy_price": D("0.2000")}
TOU = {
    "currency": "EUR", "vat": D(21), "kind": "tou",
    "tou": {"seasons": [{"months": list(range(1, 13)), "windows": [{"days": [1, 2, 3, 4, 5], "start": "10:00", "end": "14:00", "band": "peak"}]}],
            "prices": {"peak": D("0.30"), "flat": D("0.10")}},
}


def at(hours: float) -> str:
    return (T0 + dt.timedelta(hours=hours)).isoformat()


def row(code: str, hours: float, kwh, **extra) -> dict:
    return {"meter_code": code, "at": at(hours), "register_kwh": str(kwh), **extra}


@pytest.fixture
def sm(app):
    return app.extensions["db_sessionmaker"]


@pytest.fixture
def building(sm):
    """Operator 1's building (Madrid) with a prepaid meter P1 (CT 1, 5.00 topped up), a post-paid meter Q1, and
    operator 2 with meter X1."""
    with sm.begin() as s:
        op, other = Operator(name="Op", legal_name="Op S.L."), Operator(name="Other", legal_name="Other S.L.")
        s.add_all([op, other])
        s.flush()
        site = Site(operator_id=op.id, name="Dorm", time_zone="Europe/Madrid", currency="EUR")
        site2 = Site(operator_id=other.id, name="Elsewhere", time_zone="UTC", currency="EUR")
        s.add_all([site, site2])
        s.flush()
        tariff = MeterTariff(site_id=site.id, name="Flat")
        tariff2 = MeterTariff(site_id=site2.id, name="Flat")
        s.add_all([tariff, tariff2])
        s.flush()
        readings.add_meter_tariff_version(s, tariff, FLAT, T0 - dt.timedelta(days=30), "test")
        readings.add_meter_tariff_version(s, tariff2, FLAT, T0 - dt.timedelta(days=30), "test")
        tenant = Tenant(site_id=site.id, name="Ana", contact_email="ana@example.com", currency="EUR", low_balance_threshold_minor=0,
                        emergency_credit_minor=0)
        post = Tenant(site_id=site.id, name="Bea", contact_email="bea@example.com", currency="EUR", billing=Billing.POSTPAID)
        s.add_all([tenant, post])
        s.flush()
        p1 = Meter(site_id=site.id, meter_code="P1", serial="S1", prepaid=True, tenant_id=tenant.id, tariff_id=tariff.id)
        q1 = Meter(site_id=site.id, meter_code="Q1", serial="S2", prepaid=False, tenant_id=post.id, tariff_id=tariff.id)
        x1 = Meter(site_id=site2.id, meter_code="X1", serial="S3", prepaid=False, kind=MeterKind.MASTER, tariff_id=tariff2.id)
        s.add_all([p1, q1, x1])
        s.flush()
        top_up(s, p1, 500, "setup")
        return {"op": op.id, "other": other.id, "p1": p1.id, "q1": q1.id, "tariff": tariff.id, "site": site.id}


def top_up(s, meter, amount, key):
    wallet = readings.meter_wallet(s, meter)
    transfer(s, idempotency_key=f"test-topup:{key}", description="top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
             credit=wallet, amount=Money(amount, "EUR"))


def ingest(sm, op, rows, source="api"):
    with sm.begin() as s:
        return readings.ingest(s, operator_id=op, rows=rows, source=source, now=NOW)


def state(sm, meter_id):
    """(wallet balance, sum of non-superseded interval amounts, wallet postings sum, intervals)."""
    with sm() as s:
        m = s.get(Meter, meter_id)
        bal = readings.meter_balance(s, m)
        total = s.scalar(select(func.coalesce(func.sum(MeterInterval.amount_minor), 0)).where(
            MeterInterval.meter_id == meter_id, MeterInterval.superseded.is_(False)))
        posted = posted_sum(s, readings.meter_wallet(s, m))
        spans = [(i.start_at, i.end_at, i.kwh, i.amount_minor, i.superseded) for i in
                 s.scalars(select(MeterInterval).where(MeterInterval.meter_id == meter_id).order_by(MeterInterval.start_at, MeterInterval.end_at))]
        return bal.amount, int(total), posted.amount, spans


def statuses(report):
    return [(r.status, r.code) for r in report.results]


# --------------------------------------------------------------------------- ingest


def test_in_order_readings_are_priced_and_debited_once(sm, building):
    rep = ingest(sm, building["op"], [row("P1", 0, "100.000"), row("P1", 1, "102.500"), row("P1", 2, "105.000")])
    assert statuses(rep) == [("accepted", None)] * 3 and rep.intervals == 2
    bal, total, posted, spans = state(sm, building["p1"])
    # 2.5 kWh × 0.20 × 1.21 = 0.605 → 61 cents (half up), twice.
    assert [s[3] for s in spans] == [61, 61] and total == 122
    assert bal == 500 - 122 == posted
    # Replaying the whole batch changes nothing.
    rep = ingest(sm, building["op"], [row("P1", 0, "100.000"), row("P1", 1, "102.500"), row("P1", 2, "105.000")])
    assert statuses(rep) == [("duplicate", None)] * 3 and rep.intervals == 0
    assert state(sm, building["p1"])[:3] == (378, 122, 378)
    with sm() as s:
        m = s.get(Meter, building["p1"])
        assert m.last_register_kwh == D("105.000") and m.last_reading_at == T0 + dt.timedelta(hours=2)
        # One balanced consumption entry for the batch: the wallet debited with both intervals, revenue and VAT credited.
        entry = s.scalars(select(JournalEntry).where(JournalEntry.reference == f"meter:{m.id}")).one()
        assert entry.description == readings.DESCRIPTION and entry.idempotency_key.startswith("meter-intervals:")
        wallet = readings.meter_wallet(s, m).id
        assert sorted((p.account_id == wallet, p.amount_minor) for p in entry.postings) == [(False, -100), (False, -22), (True, 122)]  # net 2 × 0.50, VAT 2 × 0.11


def test_out_of_order_readings_supersede_and_bill_each_interval_once(sm, building):
    ingest(sm, building["op"], [row("P1", 0, "100"), row("P1", 4, "108")])
    assert state(sm, building["p1"])[0] == 500 - 194  # 8 kWh × 0.242 = 1.936
    # A late reading in the middle: [0, 4) superseded and reversed, [0, 1) and [1, 4) billed.
    rep = ingest(sm, building["op"], [row("P1", 1, "101")])
    assert statuses(rep) == [("accepted", None)] and rep.superseded == 1 and rep.intervals == 2
    bal, total, posted, spans = state(sm, building["p1"])
    assert [(s[2], s[3], s[4]) for s in spans] == [(D(1), 24, False), (D(8), 194, True), (D(7), 169, False)]
    assert total == 24 + 169 and bal == posted == 500 - total
    # Within one batch, in any order; the same late reading again is a duplicate; a different value conflicts.
    rep = ingest(sm, building["op"], [row("P1", 3, "106"), row("P1", 2, "103"), row("P1", 1, "101"), row("P1", 1, "101.5")])
    assert statuses(rep) == [("accepted", None), ("accepted", None), ("duplicate", None), ("rejected", "conflict")]
    bal, total, posted, spans = state(sm, building["p1"])
    live = [(s[0], s[1], s[2]) for s in spans if not s[4]]
    assert [k for _a, _b, k in live] == [D(1), D(2), D(3), D(2)]
    assert bal == posted == 500 - total and total == 24 + 48 + 73 + 48


def test_a_late_reading_gives_back_what_a_meter_was_debited_while_it_was_prepaid(sm, building):
    """The operator switched P1 to post-paid; a late reading then splits an interval billed while it was prepaid: the
    wallet gets that debit back (a correction entry), and the two new intervals wait for the monthly bill."""
    ingest(sm, building["op"], [row("P1", 0, "100"), row("P1", 4, "108")])
    assert state(sm, building["p1"])[0] == 500 - 194
    with sm.begin() as s:
        s.get(Meter, building["p1"]).prepaid = False
    rep = ingest(sm, building["op"], [row("P1", 1, "101")])
    assert statuses(rep) == [("accepted", None)] and rep.superseded == 1 and rep.intervals == 2
    bal, total, posted, spans = state(sm, building["p1"])
    assert [(s[2], s[3], s[4]) for s in spans] == [(D(1), 0, False), (D(8), 194, True), (D(7), 0, False)]
    assert bal == posted == 500 and total == 0
    with sm() as s:
        assert s.scalars(select(JournalEntry.description).where(JournalEntry.reference == f"meter:{building['p1']}")
                         .order_by(JournalEntry.id)).all() == [readings.DESCRIPTION, readings.DESCRIPTION_REVERSAL]


def test_reading_below_previous_is_rejected_with_reason(sm, building):
    ingest(sm, building["op"], [row("P1", 0, "100"), row("P1", 2, "110")])
    rep = ingest(sm, building["op"], [row("P1", 3, "109.5"), row("P1", 1, "111"), row("P1", 1, "99")])
    [below, above, below_first] = rep.results
    assert below.code == "below_previous" and "110" in below.reason and "rollover" in below.reason
    assert above.code == "above_next" and "110" in above.reason
    assert below_first.code == "below_previous"


def test_rollover_and_replacement(sm, building):
    with sm.begin() as s:
        s.get(Meter, building["p1"]).register_max_kwh = D("99999.9")
    ingest(sm, building["op"], [row("P1", 0, "99990")])
    with sm.begin() as s:
        m = s.get(Meter, building["p1"])
        with pytest.raises(readings.MeterEventError):
            readings.declare_event(s, m, "rollover", T0 - dt.timedelta(hours=1), D("99999.9"), D(0), "op")
        readings.declare_event(s, m, MeterEventKind.ROLLOVER, T0 + dt.timedelta(minutes=90), D("99999.9"), D(0), "op")
    # 9.9 kWh before the wrap + 5.1 after = 15 kWh.
    rep = ingest(sm, building["op"], [row("P1", 2, "5.1")])
    assert statuses(rep) == [("accepted", None)]
    spans = state(sm, building["p1"])[3]
    assert spans[-1][2] == D("15.0")
    # A replacement: the old meter ended at 20, the new one starts at 3.
    ingest(sm, building["op"], [row("P1", 3, "20")])
    with sm.begin() as s:
        readings.declare_event(s, s.get(Meter, building["p1"]), "replacement", T0 + dt.timedelta(hours=3, minutes=30), D(20), D(3), "op")
    rep = ingest(sm, building["op"], [row("P1", 4, "2"), row("P1", 4.5, "4")])
    assert statuses(rep) == [("rejected", "below_previous"), ("accepted", None)]
    assert state(sm, building["p1"])[3][-1][2] == D(1)  # (20 − 20) + (4 − 3)
    bal, total, posted, _ = state(sm, building["p1"])
    assert bal == posted == 500 - total


def test_bad_rows_and_unknown_meters(sm, building):
    rep = ingest(sm, building["op"], [
        row("X1", 0, 1),  # another operator's meter
        row("NOPE", 0, 1),
        {"meter_code": "P1", "at": "2025-01-13T00:00:00", "register_kwh": "1"},  # no offset
        {"meter_code": "P1", "at": "2030-01-01T00:00:00Z", "register_kwh": "1"},
        row("P1", 0, "abc"),
        row("P1", 0, "-1"),
        row("P1", 0, "1.0001"),
        row("P1", 0, "1", demand_kw="x"),
        "not an object",
        row("P1", 0, "1", demand_kw="3.5"),
    ])
    assert statuses(rep) == [("rejected", "unknown_meter"), ("rejected", "unknown_meter"), ("rejected", "bad_timestamp"),
                             ("rejected", "future"), ("rejected", "bad_number"), ("rejected", "bad_number"), ("rejected", "bad_number"),
                             ("rejected", "bad_number"), ("rejected", "malformed"), ("accepted", None)]
    with pytest.raises(readings.BatchTooLarge):
        ingest(sm, building["op"], [row("P1", i, i) for i in range(1001)])


def test_postpaid_intervals_are_stored_not_debited_and_ct_multiplies(sm, building):
    with sm.begin() as s:
        s.get(Meter, building["q1"]).ct_multiplier = 40
    ingest(sm, building["op"], [row("Q1", 0, "10"), row("Q1", 1, "10.5")])
    with sm() as s:
        [iv] = s.scalars(select(MeterInterval).where(MeterInterval.meter_id == building["q1"])).all()
        assert iv.kwh == D(20) and iv.amount_minor == 0 and iv.tariff_version_id is not None


def test_tou_interval_priced_by_band(sm, building):
    with sm.begin() as s:
        t = MeterTariff(site_id=building["site"], name="TOU")
        s.add(t)
        s.flush()
        readings.add_meter_tariff_version(s, t, TOU, T0 - dt.timedelta(days=1), "test")
        s.get(Meter, building["p1"]).tariff_id = t.id
    # 09:30–10:30 Madrid (08:30–09:30 UTC): half flat 0.10, half peak 0.30 → 4 kWh = 0.80 excl → 0.968 → 97.
    ingest(sm, building["op"], [row("P1", 8.5, "0"), row("P1", 9.5, "4")])
    with sm() as s:
        [iv] = s.scalars(select(MeterInterval).where(MeterInterval.meter_id == building["p1"])).all()
        assert iv.amount_minor == 97
        assert {b["band"]: b["kwh"] for b in json.loads(iv.breakdown_json)["bands"]} == {"flat": "2.000000", "peak": "2.000000"}
        # A version may not start inside billed history.
        with pytest.raises(Exception) as e:
            readings.add_meter_tariff_version(s, s.get(MeterTariff, iv.meter_id and s.get(Meter, building["p1"]).tariff_id), TOU, T0, "x")
        assert getattr(e.value, "field", None) == "effective_from"


def test_no_tariff_rejects_prepaid_rows(sm, building):
    with sm.begin() as s:
        s.get(Meter, building["p1"]).tariff_id = None
    rep = ingest(sm, building["op"], [row("P1", 0, "1"), row("P1", 1, "2")])
    assert statuses(rep) == [("accepted", None), ("rejected", "no_tariff")]


def test_consumption_past_the_credit_is_booked_and_the_wallet_shows_the_debt(sm, building):
    ingest(sm, building["op"], [row("P1", 0, "0"), row("P1", 1, "30")])  # 30 kWh × 0.242 = 7.26 > 5.00
    bal, total, posted, _ = state(sm, building["p1"])
    assert total == 726 and bal == posted == 500 - 726


# --------------------------------------------------------------------------- concurrency (PostgreSQL)


def test_concurrent_ingest_and_top_up_keep_the_balance_exact(app, sm, building):
    if app.extensions["db_engine"].dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's; SQLite serialises writers")
    n = 40
    errors = []
    barrier = threading.Barrier(2)

    def ingest_all():
        try:
            barrier.wait()
            for i in range(n):
                ingest(sm, building["op"], [row("P1", i, str(i))])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def top_ups():
        try:
            barrier.wait()
            for i in range(n):
                with sm.begin() as s:
                    top_up(s, s.get(Meter, building["p1"]), 10, f"c{i}")
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=ingest_all), threading.Thread(target=top_ups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    bal, total, posted, spans = state(sm, building["p1"])
    assert len(spans) == n - 1 and total == 24 * (n - 1)
    assert bal == posted == 500 + 10 * n - total


# --------------------------------------------------------------------------- the collector API


@pytest.fixture
def collector(sm, building):
    from webapp.meters.oauth import create_collector

    with sm.begin() as s:
        c, secret = create_collector(s, building["op"], "DCU-1")
        return c.client_id, secret


def basic(client_id, secret):
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def get_token(client, client_id, secret, how="basic"):
    if how == "basic":
        return client.post("/oauth/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret))
    return client.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret})


def test_token_endpoint_and_readings_api(client, sm, building, collector):
    client_id, secret = collector
    assert get_token(client, client_id, "wrong").status_code == 401
    assert get_token(client, client_id, "wrong", how="post").status_code == 401
    assert get_token(client, "nobody", secret).status_code == 401
    r = get_token(client, client_id, secret, how="post")
    assert r.status_code == 200 and r.json["token_type"].lower() == "bearer" and r.json["expires_in"] == 3600
    r = get_token(client, client_id, secret)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    token = r.json["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    body = {"readings": [row("P1", 0, "100"), {"meter_code": "P1", "at": at(1), "register_kwh": 101.5}, row("X1", 1, "5")]}

    r = client.post("/api/v1/meters/readings", json=body)
    assert r.status_code == 401 and r.content_type == "application/problem+json" and "Bearer" in r.headers["WWW-Authenticate"]
    r = client.post("/api/v1/meters/readings", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json["code"] == "invalid_token"

    r = client.post("/api/v1/meters/readings", json=body, headers=auth)
    assert r.status_code == 200
    assert [x["status"] for x in r.json["results"]] == ["accepted", "accepted", "rejected"]
    assert r.json["results"][2]["code"] == "unknown_meter"  # operator 2's meter
    assert r.json["intervals"] == 1
    assert state(sm, building["p1"])[0] == 500 - 36  # 1.5 kWh × 0.242 = 0.363

    r = client.post("/api/v1/meters/readings", json={"readings": [row("P1", i, i) for i in range(1001)]}, headers=auth)
    assert r.status_code == 413 and r.json["code"] == "batch_too_large"
    for bad in ({"readings": "x"}, [], {"readings": []}):
        r = client.post("/api/v1/meters/readings", json=bad, headers=auth)
        assert r.status_code == 422, bad
    r = client.post("/api/v1/meters/readings", data="{", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422

    # Rotating the secret revokes the tokens it obtained.
    from webapp.meters.models import MeterCollector
    from webapp.meters.oauth import rotate_secret

    with sm.begin() as s:
        new = rotate_secret(s, s.scalar(select(MeterCollector).where(MeterCollector.client_id == client_id)))
    assert client.post("/api/v1/meters/readings", json=body, headers=auth).status_code == 401
    assert get_token(client, client_id, secret).status_code == 401
    assert get_token(client, client_id, new).status_code == 200


def test_expired_token_is_refused(client, sm, collector):
    from webapp.meters.models import CollectorToken

    token = get_token(client, *collector).json["access_token"]
    with sm.begin() as s:
        for t in s.scalars(select(CollectorToken)):
            t.expires_at = t.issued_at
    r = client.post("/api/v1/meters/readings", json={"readings": [row("P1", 0, 1)]}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_create_collector_cli(app, sm, building):
    res = app.test_cli_runner().invoke(args=["meters", "create-collector", "--operator-id", str(building["op"]), "--name", "DCU-9",
                                             "--webhook-url", "https://collector.example/relay"])
    assert res.exit_code == 0, res.output
    lines = dict(line.split(":", 1) for line in res.output.splitlines() if line.startswith(("client_id", "client_secret")))
    client = app.test_client()
    assert get_token(client, lines["client_id"].strip(), lines["client_secret"].strip()).status_code == 200


# --------------------------------------------------------------------------- operator pages


def sign_in(client, make_user, building, email="staff@example.com"):
    from webapp.models import Role

    make_user(email, role=Role.OPERATOR_STAFF, operator_id=building["op"])
    r = client.post("/auth/sign-in", data={"email": email, "password": "correct horse staple"})
    assert r.status_code in (302, 303), r.status_code


def csrf_token(html: str) -> str:
    import re

    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def test_csv_upload_with_per_row_errors(csrf_client, make_user, sm, building):
    import io
    import re

    client = csrf_client
    sign_in_csrf(client, make_user, building)
    page = client.get("/operator/readings/upload")
    assert page.status_code == 200
    token = csrf_token(page.get_data(as_text=True))
    csv_text = ("meter_code,at,register_kwh,demand_kw\n"
                f"P1,{at(0)},100,\n"
                f"P1,{at(1)},101,2.5\n"
                f"P1,{at(2)},99,\n"
                f"X1,{at(2)},1,\n"
                f"=cmd(),{at(2)},1,\n"
                f"P1,{at(3)},abc,\n")
    r = client.post("/operator/readings/upload", data={"csrf_token": token, "file": (io.BytesIO(csv_text.encode()), "r.csv")},
                    content_type="multipart/form-data")
    html = r.get_data(as_text=True)
    assert r.status_code == 200
    assert "2 accepted, 0 already received, 4 rejected" in html
    table = html[html.index('data-testid="row-errors"'):]
    assert "Below the previous reading" in table and "Unknown meter" in table and "Not a number" in table
    assert re.search(r"<td>4</td>", table)  # line numbers of the file (the header is line 1)
    report = re.search(r'<textarea name="report" hidden>(.*?)</textarea>', html, re.S).group(1)
    import html as htmllib

    download = client.post("/operator/readings/report.csv", data={"csrf_token": csrf_token(html), "report": htmllib.unescape(report)})
    assert download.status_code == 200 and download.mimetype == "text/csv"
    lines = download.get_data(as_text=True).splitlines()
    assert lines[0] == "line,meter_code,at,register_kwh,demand_kw,status,code,reason"
    assert lines[1].startswith("2,P1,") and ",accepted," in lines[1]
    assert lines[3].startswith("4,P1,") and "below_previous" in lines[3]
    assert lines[5].startswith("6,'=cmd()")  # never a formula in a spreadsheet
    assert state(sm, building["p1"])[0] == 500 - 24
    # Without the CSRF token nothing is ingested.
    r = client.post("/operator/readings/upload", data={"file": (io.BytesIO(csv_text.encode()), "r.csv")}, content_type="multipart/form-data")
    assert r.status_code == 400


def sign_in_csrf(client, make_user, building):
    from webapp.models import Role

    make_user("staff@example.com", role=Role.OPERATOR_STAFF, operator_id=building["op"])
    page = client.get("/auth/sign-in").get_data(as_text=True)
    r = client.post("/auth/sign-in", data={"email": "staff@example.com", "password": "correct horse staple", "csrf_token": csrf_token(page)})
    assert r.status_code in (302, 303), r.status_code


def test_collectors_page_creates_and_rotates(csrf_client, make_user, sm, building):
    import re

    client = csrf_client
    sign_in_csrf(client, make_user, building)
    page = client.get("/operator/collectors").get_data(as_text=True)
    r = client.post("/operator/collectors", data={"csrf_token": csrf_token(page), "name": "Roof DCU", "webhook_url": "https://dcu.example/hook"})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    client_id = re.search(r'data-testid="client-id">([^<]+)<', html).group(1)
    secret = re.search(r'data-testid="client-secret">([^<]+)<', html).group(1)
    assert get_token(client, client_id, secret).status_code == 200
    assert secret not in client.get("/operator/collectors").get_data(as_text=True)  # shown once
    from webapp.meters.models import MeterCollector

    with sm() as s:
        cid = s.scalar(select(MeterCollector.id).where(MeterCollector.client_id == client_id))
    r = client.post(f"/operator/collectors/{cid}/rotate", data={"csrf_token": csrf_token(html)})
    new = re.search(r'data-testid="client-secret">([^<]+)<', r.get_data(as_text=True)).group(1)
    assert get_token(client, client_id, secret).status_code == 401 and get_token(client, client_id, new).status_code == 200
