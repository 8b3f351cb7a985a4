"""Tariff versions in the database (payments.tariff_store), the price display (payments.price_display)
and the default hold, on the demo tariffs and on tariffs made for one rule each."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from payments.money import Money
from payments.price_display import HoldPolicy, default_hold, price_display
from payments.tariff_store import (
    BACKDATE_TOLERANCE,
    Tariff,
    TariffVersion,
    add_version,
    connector_owner,
    dumps,
    meter_owner,
    tariff_in_force,
    versions,
)
from payments.tariffs import TariffError, bill, cdr_from_samples, price
from webapp.seed import DEMO_SIMPLE_TARIFF, DEMO_TOU_TARIFF

UTC = dt.UTC
MADRID = ZoneInfo("Europe/Madrid")
T0 = dt.datetime(2031, 3, 3, 9, 0, tzinfo=UTC)  # a Monday
OWNER = connector_owner(1)


def energy_tariff(price_excl: str = "0.30", currency: str = "EUR", **extra) -> dict:
    return {"currency": currency, "elements": [{"price_components": [{"type": "ENERGY", "price": D(price_excl), "vat": D(21), "step_size": 1}]}],
            **extra}


def add(s, tariff, effective_from=None, *, now=T0, owner=OWNER, site_currency="EUR"):
    return add_version(s, owner, tariff, site_currency=site_currency, created_by="user:1", effective_from=effective_from, now=now)


def count(s, model) -> int:
    return s.scalar(select(func.count()).select_from(model))


def local(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=MADRID).astimezone(UTC)


# --------------------------------------------------------------------------- versions


def test_the_version_in_force_is_the_latest_that_took_effect(Session):
    with Session.begin() as s:
        v1 = add(s, energy_tariff("0.30"))
        v2 = add(s, energy_tariff("0.40"), T0 + dt.timedelta(days=1))
        # scheduled later, taking effect earlier: future versions may be added in any order
        v3 = add(s, energy_tariff("0.35"), T0 + dt.timedelta(hours=2), now=T0 + dt.timedelta(minutes=5))
        ids = (v1.id, v2.id, v3.id)
    with Session() as s:
        def at(t):
            v = tariff_in_force(s, OWNER, t)
            return None if v is None else v.id

        assert at(T0 - dt.timedelta(microseconds=1)) is None
        assert at(T0) == ids[0]
        assert at(T0 + dt.timedelta(hours=2) - dt.timedelta(microseconds=1)) == ids[0]
        assert at(T0 + dt.timedelta(hours=2)) == ids[2]
        assert at(T0 + dt.timedelta(days=1) - dt.timedelta(microseconds=1)) == ids[2]
        assert at(T0 + dt.timedelta(days=30)) == ids[1]
        assert [(v.number, v.effective_from) for v in versions(s, OWNER)] == [
            (1, T0), (3, T0 + dt.timedelta(hours=2)), (2, T0 + dt.timedelta(days=1))]
        assert tariff_in_force(s, connector_owner(2), T0 + dt.timedelta(days=2)) is None  # per owner
        v = tariff_in_force(s, OWNER, T0 + dt.timedelta(days=2))
        assert v.ocpi["elements"][0]["price_components"][0]["price"] == D("0.40")
        assert (v.currency, v.created_by, v.owner) == ("EUR", "user:1", OWNER)


def test_a_session_is_priced_by_the_version_in_force_when_it_started(Session):
    with Session.begin() as s:
        add(s, energy_tariff("0.30"))
        add(s, energy_tariff("0.40"), T0 + dt.timedelta(hours=1))
    with Session() as s:
        start = T0 + dt.timedelta(minutes=30)  # starts under 0.30, ends after 0.40 took effect
        version = tariff_in_force(s, OWNER, start)
        cdr = cdr_from_samples(start, [{"at": start + dt.timedelta(hours=1), "energy_wh": 10_000}], start + dt.timedelta(hours=1),
                               tariff=version.compiled, meter_start_wh=D(0))
        assert bill(price(version.compiled, cdr))["incl_vat"] == Money(363, "EUR")  # 10 kWh × 0.30 × 1.21


def test_a_version_cannot_take_effect_in_the_past(Session):
    with Session.begin() as s:
        add(s, energy_tariff("0.30"))
    with Session() as s:
        with pytest.raises(TariffError) as e:
            add(s, energy_tariff("0.10"), T0 + dt.timedelta(hours=1) - BACKDATE_TOLERANCE - dt.timedelta(seconds=1), now=T0 + dt.timedelta(hours=1))
        assert e.value.path == "effective_from" and "past" in e.value.reason
        with pytest.raises(TariffError) as e:
            add(s, energy_tariff("0.10"), dt.datetime(2031, 3, 3, 12, 0), now=T0)  # no time zone
        assert e.value.path == "effective_from"
        s.rollback()
    with Session.begin() as s:
        # a few seconds late (a form sent a moment ago) is taken as "now": it still never precedes its creation
        later = T0 + dt.timedelta(hours=1)
        v = add(s, energy_tariff("0.10"), later - dt.timedelta(seconds=20), now=later)
        assert (v.effective_from, v.created_at, v.number) == (later, later, 2)
    with Session() as s:
        assert tariff_in_force(s, OWNER, T0 + dt.timedelta(minutes=59)).number == 1  # history unchanged


def test_two_versions_cannot_take_effect_at_the_same_instant(Session):
    with Session.begin() as s:
        add(s, energy_tariff("0.30"), T0 + dt.timedelta(days=1))
    with Session() as s:
        with pytest.raises(TariffError) as e:
            add(s, energy_tariff("0.40"), T0 + dt.timedelta(days=1))
        assert e.value.path == "effective_from"


def test_versions_are_never_edited(Session):
    with Session.begin() as s:
        version_id = add(s, energy_tariff("0.30")).id
    with Session() as s:
        v = s.get(TariffVersion, version_id)
        v.tariff_json = dumps(energy_tariff("0.01"))
        with pytest.raises(TariffError, match="cannot be changed"):
            s.flush()
        s.rollback()
    with Session() as s:
        assert s.get(TariffVersion, version_id).ocpi == energy_tariff("0.30")


@pytest.mark.parametrize(
    ("tariff", "path", "reason"),
    [
        ('{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": -0.30, "step_size": 1}]}]}',
         "elements/0/price_components/0/price", "must be ≥ 0"),
        ('{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": 0.30, "step_size": 1}],'
         ' "restrictions": {"start_time": "25:00"}}]}', "elements/0/restrictions/start_time", 'must be a time "HH:MM" (24h, leading zeros)'),
        ('{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": 0.30}]}]}',
         "elements/0/price_components/0/step_size", "is required (a positive integer)"),
        ('{"currency": "EUR", "elements": []}', "elements", "must be a non-empty list of tariff elements"),
        ('{"currency": "EUR", "elements": [', "", "not valid JSON: Expecting value (line 1, column 34)"),
        ('{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": NaN, "step_size": 1}]}]}',
         "", "not valid JSON: NaN is not a number"),
        ('{"currency": "EUR", "currency": "USD", "elements": []}', "", 'not valid: the key "currency" appears twice in one JSON object'),
        ("[1, 2]", "", "a tariff must be a JSON object"),
        ('{"currency": "EUR", "end_date_time": "2031-03-03T08:00:00Z", '
         '"elements": [{"price_components": [{"type": "ENERGY", "price": 0.3, "step_size": 1}]}]}',
         "end_date_time", "the tariff ends before this version takes effect, so it could never price a session"),
    ],
)
def test_an_invalid_tariff_is_refused_with_the_field_and_the_reason_and_nothing_is_stored(Session, tariff, path, reason):
    with Session() as s:
        with pytest.raises(TariffError) as e:
            add(s, tariff)
        assert (e.value.path, e.value.reason) == (path, reason)
        s.commit()
    with Session() as s:
        assert (count(s, Tariff), count(s, TariffVersion)) == (0, 0)


def test_a_currency_other_than_the_sites_is_refused(Session):
    with Session() as s:
        with pytest.raises(TariffError) as e:
            add(s, energy_tariff("0.30", currency="USD"))
        assert e.value.path == "currency"
        assert e.value.reason == "must be EUR, the site's currency (the tariff is in USD)"
        s.commit()
    with Session() as s:
        assert count(s, TariffVersion) == 0


def test_numbers_are_stored_exactly_and_owners_can_be_meters(Session):
    text = '{"currency": "EUR", "elements": [{"price_components": [{"type": "ENERGY", "price": 0.1234567890123456789, "step_size": 1}]}]}'
    with Session.begin() as s:
        v = add(s, text, owner=meter_owner(7))
        assert "0.1234567890123456789" in v.tariff_json
    with Session() as s:
        v = tariff_in_force(s, meter_owner(7), T0)
        assert v.ocpi["elements"][0]["price_components"][0]["price"] == D("0.1234567890123456789")
        assert json.loads(v.tariff_json)["currency"] == "EUR"
    with pytest.raises(ValueError):
        add_version(None, "site:1", text, site_currency="EUR", created_by="x")


# --------------------------------------------------------------------------- price display


def rows(display) -> list[tuple]:
    return [(c.dimension, c.unit, c.price_excl_vat, c.price_incl_vat, c.vat_rate, c.otherwise, c.grace_period_s) for c in display.components]


def test_the_simple_demo_tariff_is_one_price_per_kwh():
    d = price_display(json.loads(DEMO_SIMPLE_TARIFF, parse_float=D))
    assert rows(d) == [("ENERGY", "kWh", D("0.35"), D("0.4235"), D(21), False, None)]
    assert (d.currency, d.vat_rates, d.no_vat_components, d.min_price, d.max_price) == ("EUR", (D(21),), False, None, None)


def test_the_time_of_use_demo_tariff_shows_kwh_then_session_then_idle_fee_with_its_grace_period():
    d = price_display(json.loads(DEMO_TOU_TARIFF, parse_float=D))
    assert rows(d) == [
        ("ENERGY", "kWh", D("0.20"), D("0.242"), D(21), False, None),  # night
        ("ENERGY", "kWh", D("0.45"), D("0.5445"), D(21), False, None),  # weekday evenings
        ("ENERGY", "kWh", D("0.30"), D("0.363"), D(21), True, None),  # at other times
        ("FLAT", "session", D("1.00"), D("1.21"), D(21), False, None),
        ("PARKING_TIME", "min", D("0.1"), D("0.121"), D(21), False, 900),  # 6.00/h; free for the first 15 min
    ]
    night, evening, other, flat, idle = d.components
    assert (night.conditions.start_time, night.conditions.end_time, night.conditions.wraps_midnight, night.conditions.days) == (
        "22:00", "08:00", True, None)
    assert (evening.conditions.start_time, evening.conditions.end_time, evening.conditions.wraps_midnight) == ("18:00", "22:00", False)
    assert evening.conditions.days == ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY")
    assert not other.conditions.restricted and not flat.conditions.restricted
    assert not idle.conditions.restricted and idle.step_size == 60 and idle.price_per_hour_excl_vat == D("6.00")
    assert d.grace_period_s == 900
    as_json = d.as_json()
    assert as_json["components"][1]["restrictions"]["days_of_week"] == ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]
    assert as_json["components"][0]["price_incl_vat"] == "0.242"
    assert as_json["components"][4]["grace_period"] == {"seconds": 900, "counted_from": "session_start"}
    assert as_json["vat"] == {"rates": ["21"], "some_prices_without_vat": False, "prices_shown_include_vat": True}


def test_what_the_display_says_is_what_the_engine_bills():
    tariff = json.loads(DEMO_TOU_TARIFF, parse_float=D)
    d = price_display(tariff)
    night, evening, other, flat, idle = d.components

    def cost(start: str, kwh: int, charging_min: int, idle_min: int) -> D:
        t0 = local(start)
        end = t0 + dt.timedelta(minutes=charging_min + idle_min)
        samples = [{"at": t0 + dt.timedelta(minutes=charging_min), "energy_wh": kwh * 1000}]
        if idle_min:
            samples.append({"at": end, "energy_wh": kwh * 1000, "charging": False})
        cdr = cdr_from_samples(t0, samples, end, tariff=tariff, time_zone="Europe/Madrid", meter_start_wh=D(0))
        return price(tariff, cdr, time_zone="Europe/Madrid")["total_cost"]["incl_vat"]

    # Tuesday 23:00-01:00, 10 kWh at night, then 20 min idle (the grace period is long over)
    assert cost("2031-03-04T23:00", 10, 120, 20) == flat.price_incl_vat + 10 * night.price_incl_vat + 20 * idle.price_incl_vat
    # Friday 18:30, 5 kWh in 30 min at the evening price; idle within the first 15 min of the session is free
    assert cost("2031-03-07T18:30", 5, 10, 5) == flat.price_incl_vat + 5 * evening.price_incl_vat
    # Saturday 18:30: not a weekday, so the "other times" price
    assert cost("2031-03-08T18:30", 5, 30, 0) == flat.price_incl_vat + 5 * other.price_incl_vat


def test_per_minute_prices_min_max_price_no_vat_and_unreachable_components():
    d = price_display({
        "currency": "EUR",
        "min_price": {"excl_vat": D("1.00")},
        "max_price": {"excl_vat": D("40.00"), "incl_vat": D("48.40")},
        "elements": [
            {"price_components": [{"type": "TIME", "price": D("5.00"), "vat": D(10), "step_size": 60}], "restrictions": {"min_power": D(50)}},
            {"price_components": [{"type": "TIME", "price": D("1.20"), "vat": D(10), "step_size": 1}]},
            {"price_components": [{"type": "TIME", "price": D("9.99"), "vat": D(10), "step_size": 1}], "restrictions": {"start_time": "10:00"}},
            {"price_components": [{"type": "TIME", "price": D("7.00"), "step_size": 300}], "restrictions": {"reservation": "RESERVATION"}},
        ],
    })
    fast, slow = d.components  # the element after the unrestricted one can never apply; reservations are not shown
    assert (fast.unit, fast.exact, fast.price_per_hour_excl_vat, fast.conditions.min_power_kw) == ("min", False, D("5.00"), D(50))
    assert fast.price_excl_vat == D("0.083333333333") and fast.price_incl_vat == D("0.091666666667")
    assert (slow.price_excl_vat, slow.price_incl_vat, slow.exact, slow.otherwise) == (D("0.02"), D("0.022"), True, True)
    assert d.min_price == (D("1.00"), D("1.1000")) and d.max_price == (D("40.00"), D("48.40"))

    free = price_display({"currency": "EUR", "elements": [{"price_components": [{"type": "FLAT", "price": 2, "step_size": 1}]}]})
    assert rows(free) == [("FLAT", "session", D(2), D(2), None, False, None)]  # no VAT given: none applies
    assert (free.vat_rates, free.no_vat_components) == ((), True)


def test_grace_period_written_as_min_duration_and_a_free_parking_window():
    by_min_duration = price_display({"currency": "EUR", "elements": [
        {"price_components": [{"type": "PARKING_TIME", "price": D("3.00"), "vat": D(21), "step_size": 60}], "restrictions": {"min_duration": 1200}},
    ]})
    (idle,) = by_min_duration.components
    assert (idle.grace_period_s, idle.conditions.restricted, idle.price_excl_vat) == (1200, False, D("0.05"))

    night_free = price_display({"currency": "EUR", "elements": [
        {"price_components": [{"type": "PARKING_TIME", "price": 0, "vat": D(21), "step_size": 60}],
         "restrictions": {"start_time": "20:00", "end_time": "08:00"}},
        {"price_components": [{"type": "PARKING_TIME", "price": D("3.00"), "vat": D(21), "step_size": 60}]},
    ]})
    free, paid = night_free.components
    assert (free.price_incl_vat, free.conditions.wraps_midnight, free.grace_period_s) == (0, True, None)
    assert (paid.price_incl_vat, paid.otherwise) == (D("0.0605"), True)


# --------------------------------------------------------------------------- the default hold


@pytest.mark.parametrize(
    ("start", "power_kw", "cents", "energy"),
    [
        # 1.21 session fee + 60 kWh × 0.5445 (the weekday evening price is reachable) + 120 min × 0.121 = 48.40
        ("2031-03-03T17:00", 22, 4840, D(60)),
        # Saturday night: 1.21 + 60 × 0.363 (the dearest price the next 6 h can have) + 14.52 = 37.51
        ("2031-03-08T23:00", 22, 3751, D(60)),
        # a 3.7 kW plug delivers at most 14.8 kWh in 4 h: 1.21 + 14.8 × 0.5445 + 14.52 = 23.7886 → 23.79
        ("2031-03-03T17:00", D("3.7"), 2379, D("14.800")),
    ],
)
def test_the_default_hold_of_the_time_of_use_demo_tariff(start, power_kw, cents, energy):
    hold = default_hold(json.loads(DEMO_TOU_TARIFF, parse_float=D), currency="EUR", max_power_kw=power_kw, start=local(start),
                        time_zone="Europe/Madrid")
    assert hold.amount == Money(cents, "EUR")
    assert (hold.max_energy_kwh, hold.max_duration, hold.max_idle) == (energy, dt.timedelta(hours=4), dt.timedelta(hours=2))


def test_the_default_hold_of_the_simple_demo_tariff_and_another_policy():
    tariff = json.loads(DEMO_SIMPLE_TARIFF, parse_float=D)
    assert default_hold(tariff, currency="EUR", max_power_kw=22, start=T0, time_zone="Europe/Madrid").amount == Money(2541, "EUR")
    small = HoldPolicy(max_energy_kwh=D(20), max_duration=dt.timedelta(hours=1), max_idle=dt.timedelta(0))
    hold = default_hold(tariff, currency="EUR", max_power_kw=11, start=T0, time_zone="Europe/Madrid", policy=small)
    assert (hold.amount, hold.max_energy_kwh) == (Money(466, "EUR"), D("11.000"))  # 11 kWh × 0.4235 = 4.6585 → 4.66
