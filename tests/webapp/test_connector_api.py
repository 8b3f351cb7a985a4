"""GET /api/v1/connectors/{connector_code}: what a driver sees after scanning, for the seeded demo connectors;
the price lines rendered in en, es and zh (numbers, money, weekdays and times in the locale's own way)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from flask import render_template_string
from sqlalchemy import select

from payments.price_display import price_display
from payments.tariff_store import add_version, connector_owner, tariff_in_force
from webapp.models import Charger, Connector
from webapp.pricing import render_prices
from webapp.seed import DEMO_TOU_TARIFF, seed

MADRID = ZoneInfo("Europe/Madrid")


@pytest.fixture
def demo(app):
    """The demo data, as `flask seed-demo` makes it."""
    with app.extensions["db_sessionmaker"].begin() as s:
        seed(s, password_factory=lambda: "a demo password 123")
    return app


def next_weekday_at(weekday: int, hh: int, days_ahead: int = 7) -> dt.datetime:
    """A wall-clock time in Madrid on the given weekday (0 = Monday), at least ``days_ahead`` days from now, as UTC."""
    day = dt.datetime.now(MADRID).date() + dt.timedelta(days=days_ahead)
    day += dt.timedelta(days=(weekday - day.weekday()) % 7)
    return dt.datetime(day.year, day.month, day.day, hh, tzinfo=MADRID).astimezone(dt.UTC)


@pytest.fixture
def clock(monkeypatch):
    """Set the instant the connector API takes as now (the hold depends on the time-of-use windows ahead)."""

    def set_now(at: dt.datetime) -> None:
        monkeypatch.setattr("webapp.api.connectors.utcnow", lambda: at)

    return set_now


def get(client, code: str, lang: str = "en"):
    return client.get(f"/api/v1/connectors/{code}", headers={"Accept-Language": lang})


def test_the_time_of_use_demo_connector(demo, client, clock):
    clock(next_weekday_at(0, 17))  # a Monday, 17:00 in Madrid: the weekday evening price is an hour away
    r = get(client, "D201")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.headers["Content-Language"] == "en" and r.headers["Cache-Control"] == "no-cache"
    body = r.json
    assert {k: body[k] for k in ("connector_code", "number", "standard", "max_power_kw", "charger", "site", "currency")} == {
        "connector_code": "D201",
        "number": 1,
        "standard": "IEC_62196_T2",
        "max_power_kw": 22,
        "charger": {"vendor": "Voltpay", "model": "Sim-22"},
        "site": {"name": "Plaza Mayor car park", "address": "Plaza Mayor 3, 28012 Madrid", "time_zone": "Europe/Madrid"},
        "currency": "EUR",
    }
    assert body["available_for_payment"] is True
    # 1.21 session fee + 60 kWh × 0.5445 + 2 h idle × 7.26 = 48.40, VAT included
    assert body["default_hold"] == {"amount": 4840, "currency": "EUR"}
    assert body["hold_limits"] == {"max_energy_kwh": "60", "max_charging_seconds": 14400, "max_idle_seconds": 7200}

    prices = body["prices"]
    assert [(c["dimension"], c["unit"], c["price_excl_vat"], c["price_incl_vat"], c["vat_rate"]) for c in prices["components"]] == [
        ("ENERGY", "kWh", "0.2", "0.242", "21"),
        ("ENERGY", "kWh", "0.45", "0.5445", "21"),
        ("ENERGY", "kWh", "0.3", "0.363", "21"),
        ("FLAT", "session", "1", "1.21", "21"),
        ("PARKING_TIME", "min", "0.1", "0.121", "21"),
    ]
    night, evening, other, _flat, idle = prices["components"]
    assert {k: v for k, v in night["restrictions"].items() if v not in (None, False)} == {
        "start_time": "22:00", "end_time": "08:00", "wraps_midnight": True}
    assert {k: v for k, v in evening["restrictions"].items() if v not in (None, False)} == {
        "start_time": "18:00", "end_time": "22:00", "days_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]}
    assert other["otherwise"] is True
    assert idle["grace_period"] == {"seconds": 900, "counted_from": "session_start"}
    assert idle["price_per_hour_excl_vat"] == "6" and idle["step_size"] == 60
    assert prices["vat"] == {"rates": ["21"], "some_prices_without_vat": False, "prices_shown_include_vat": True}

    # the raw OCPI tariff in force, with its prices as exact JSON numbers, and its version
    raw = json.loads(r.get_data(as_text=True), parse_float=D)
    assert raw["tariff"]["ocpi"] == json.loads(DEMO_TOU_TARIFF, parse_float=D)
    assert '"price":0.45,' in r.get_data(as_text=True)
    with demo.extensions["db_sessionmaker"]() as s:
        connector = s.scalar(select(Connector).where(Connector.connector_code == "D201"))
        version = tariff_in_force(s, connector_owner(connector.id), dt.datetime.now(dt.UTC))
        assert body["tariff"]["version_id"] == version.id and body["tariff"]["version"] == 1
        assert dt.datetime.fromisoformat(body["tariff"]["effective_from"]) == version.effective_from

    assert [(line["label"], line["price"], line["conditions"], line["billing"]) for line in body["display"]["lines"]] == [
        ("Energy", "€0.242 per kWh", "10:00\u202fPM–8:00\u202fAM (overnight)", ""),  # CLDR puts a narrow no-break space before PM
        ("Energy", "€0.5445 per kWh", "Monday–Friday, 6:00\u202fPM–10:00\u202fPM", ""),
        ("Energy", "€0.363 per kWh", "at other times", ""),
        ("Session fee", "€1.21 per session", "", ""),
        ("Idle fee (connected, not charging)", "€0.121 per minute", "", "free for the first 15 minutes of the session; billed per started minute"),
    ]
    assert body["display"]["notes"] == ["Prices include 21% VAT."]


def test_the_hold_follows_the_time_of_use_windows_ahead(demo, client, clock):
    clock(next_weekday_at(5, 23))  # Saturday 23:00: no weekday evening price in the next 6 h
    assert get(client, "D202").json["default_hold"] == {"amount": 3751, "currency": "EUR"}


def test_the_simple_demo_connector_and_a_code_typed_in_lower_case(demo, client):
    body = get(client, "d101").json
    assert body["connector_code"] == "D101"
    assert [(c["dimension"], c["price_incl_vat"]) for c in body["prices"]["components"]] == [("ENERGY", "0.4235")]
    assert body["default_hold"] == {"amount": 2541, "currency": "EUR"}  # 60 kWh × 0.4235
    assert [line["price"] for line in body["display"]["lines"]] == ["€0.4235 per kWh"]


@pytest.mark.parametrize("code", ["NOPE", "D999", "x" * 17, "D1%2001", "%00", "D101'--"])
def test_an_unknown_code_is_a_helpful_404(demo, client, code):
    r = client.get(f"/api/v1/connectors/{code}")
    assert r.status_code == 404 and r.mimetype == "application/problem+json"
    assert r.json["code"] == "connector_not_found"
    assert "code printed next to the QR code" in r.json["detail"]


def test_a_connector_without_a_tariff_cannot_be_paid_for(demo, client):
    with demo.extensions["db_sessionmaker"].begin() as s:
        charger = s.scalar(select(Charger).where(Charger.charge_point_id == "DEMO-CP-1"))
        s.add(Connector(charger_id=charger.id, number=3, connector_code="D103", max_power_kw=11))
    body = get(client, "D103").json
    assert body["available_for_payment"] is False
    assert (body["prices"], body["display"], body["tariff"], body["default_hold"], body["hold_limits"]) == (None,) * 5


def test_a_scheduled_price_change_shows_once_it_takes_effect(demo, client, clock):
    now = dt.datetime.now(dt.UTC)
    with demo.extensions["db_sessionmaker"].begin() as s:
        connector = s.scalar(select(Connector).where(Connector.connector_code == "D101"))
        new = {"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": D("0.40"), "vat": D(21), "step_size": 1}]}]}
        version_id = add_version(s, connector_owner(connector.id), new, site_currency="EUR", created_by="user:1",
                                 effective_from=now + dt.timedelta(hours=1)).id
    clock(now + dt.timedelta(minutes=59))
    assert get(client, "D101").json["prices"]["components"][0]["price_incl_vat"] == "0.4235"
    clock(now + dt.timedelta(hours=1))
    body = get(client, "D101").json
    assert body["prices"]["components"][0]["price_incl_vat"] == "0.484"
    assert (body["tariff"]["version_id"], body["tariff"]["version"]) == (version_id, 2)
    assert body["default_hold"] == {"amount": 2904, "currency": "EUR"}


# --------------------------------------------------------------------------- the renderer in three languages


def test_the_prices_in_spanish(demo, client, clock):
    clock(next_weekday_at(0, 17))
    display = get(client, "D201", "es").json["display"]
    assert display["locale"] == "es"
    prices = [line["price"] for line in display["lines"]]
    amounts = ["0,242\xa0€", "0,5445\xa0€", "0,363\xa0€", "1,21\xa0€", "0,121\xa0€"]  # decimal comma, € after a no-break space
    assert [p[: len(a)] for p, a in zip(prices, amounts, strict=True)] == amounts
    conditions = [line["conditions"] for line in display["lines"]]
    assert "22:00–8:00" in conditions[0]  # Spanish short times: H:mm
    assert "lunes" in conditions[1] and "viernes" in conditions[1] and "18:00" in conditions[1] and "22:00" in conditions[1]
    assert "21\xa0%" in display["notes"][0]


def test_the_prices_in_chinese(demo, client):
    display = get(client, "D201", "zh").json["display"]
    assert display["locale"] == "zh"
    amounts = ["€0.242", "€0.5445", "€0.363", "€1.21", "€0.121"]
    assert [line["price"][: len(a)] for line, a in zip(display["lines"], amounts, strict=True)] == amounts
    assert "星期一" in display["lines"][1]["conditions"] and "星期五" in display["lines"][1]["conditions"]
    assert "18:00" in display["lines"][1]["conditions"] and "22:00" in display["lines"][1]["conditions"]
    assert "22:00" in display["lines"][0]["conditions"] and "08:00" in display["lines"][0]["conditions"]
    assert "21%" in display["notes"][0]


def test_the_renderer_formats_unit_prices_weekdays_and_times_for_each_locale(app):
    display = price_display({
        "currency": "EUR",
        "min_price": {"excl_vat": D("2.00"), "incl_vat": D("2.42")},
        "elements": [
            {"price_components": [{"type": "ENERGY", "price": D("1234.5"), "vat": D(21), "step_size": 1}],
             "restrictions": {"day_of_week": ["SATURDAY", "SUNDAY"], "start_time": "22:00", "end_time": "06:00"}},
            {"price_components": [{"type": "TIME", "price": D("5.00"), "vat": D(21), "step_size": 60}]},
        ],
    })
    with app.test_request_context():
        en, es, zh = (render_prices(display, loc) for loc in ("en", "es", "zh"))
    assert en["lines"][0].price == "€1,493.745 per kWh"
    # a weekday with a window past midnight: that weekday's early morning and late evening (the engine's rule)
    assert en["lines"][0].conditions == "Saturday and Sunday, until 6:00\u202fAM and from 10:00\u202fPM"
    assert en["lines"][1].price == "€0.100833 per minute"  # 5.00/h × 1.21 / 60, shown to 6 decimals
    assert en["notes"] == ["Prices include 21% VAT.", "Minimum price per session: €2.42."]
    assert es["lines"][0].price.startswith("1.493,745\xa0€")
    assert "sábado" in es["lines"][0].conditions and "domingo" in es["lines"][0].conditions and "6:00" in es["lines"][0].conditions
    assert es["lines"][1].price.startswith("0,100833\xa0€")
    assert "2,42\xa0€" in es["notes"][1]
    assert zh["lines"][0].price.startswith("€1,493.745")
    assert "星期六" in zh["lines"][0].conditions and "星期日" in zh["lines"][0].conditions
    assert "€2.42" in zh["notes"][1]


def test_the_price_macro_renders_the_lines(demo, client, clock):
    clock(next_weekday_at(0, 17))
    from payments.tariff_store import loads

    with demo.test_request_context(headers={"Accept-Language": "es"}):
        prices = render_prices(price_display(loads(DEMO_TOU_TARIFF)))
        html = render_template_string('{% from "_price.html" import price_table %}{{ price_table(prices) }}', prices=prices)
    assert html.count('<div class="price-line') == 5
    assert "0,5445\xa0€" in html and "lunes" in html


def test_the_status_says_whether_a_session_can_start_now(demo, client):
    from webapp.charging.models import ChargerConnection

    assert {get(client, code).json["status"] for code in ("D101", "D201")} == {"offline"}  # no gateway holds the demo chargers
    with demo.extensions["db_sessionmaker"].begin() as s:
        charger = s.scalar(select(Charger).where(Charger.charge_point_id == "DEMO-CP-1"))
        s.add(ChargerConnection(charger_id=charger.id, gateway_url="http://gateway.invalid", connection_id="c1"))
    assert (get(client, "D101").json["status"], get(client, "D201").json["status"]) == ("available", "offline")

    def report(code: str, status: str) -> None:
        with demo.extensions["db_sessionmaker"].begin() as s:
            s.scalar(select(Connector).where(Connector.connector_code == code)).status = status

    report("D101", "Faulted")
    report("D102", "Charging")  # another car, started without us (an RFID card, the charger's own button)
    assert (get(client, "D101").json["status"], get(client, "D102").json["status"]) == ("faulted", "in_use")
    report("D101", "Preparing")  # a cable plugged in, waiting for an authorisation: ours to give
    assert get(client, "D101").json["status"] == "available"
