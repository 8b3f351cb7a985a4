"""Meter tariffs (payments.metering): validation paths, TOU splits, tiers, demand, DST, properties."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payments.metering import (
    MeterTariffError,
    band_at,
    compile_tariff,
    demand_charge,
    next_change,
    price_interval,
    split_by_month,
    validate_tariff,
)
from payments.money import Money

UTC = timezone.utc
MADRID = "Europe/Madrid"
ALL_DAYS = [1, 2, 3, 4, 5, 6, 7]

TOU = {
    "version": "1",
    "currency": "EUR",
    "vat": D("21"),
    "kind": "tou",
    "tou": {
        "seasons": [
            {
                "months": list(range(1, 13)),
                "windows": [
                    {"days": [1, 2, 3, 4, 5], "start": "10:00", "end": "14:00", "band": "peak"},
                    {"days": ALL_DAYS, "start": "22:00", "end": "06:00", "band": "valley"},
                ],
            }
        ],
        "prices": {"peak": D("0.30"), "flat": D("0.20"), "valley": D("0.10")},
    },
    "demand_charge_per_kw": D("4.50"),
}
TIERED = {
    "currency": "EUR",
    "vat": D("10"),
    "kind": "tiered",
    "tiers": [{"up_to_kwh": D(100), "price": D("0.10")}, {"up_to_kwh": D(300), "price": D("0.15")}, {"up_to_kwh": None, "price": D("0.25")}],
}
FLAT = {"currency": "EUR", "vat": D(21), "kind": "flat", "energy_price": D("0.1875")}


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def bands(p) -> dict:
    return {b.band: b.kwh for b in p.bands}


# --------------------------------------------------------------------------- TOU


def test_tou_interval_across_a_window_boundary_is_split_in_proportion_to_time():
    t = compile_tariff(TOU)
    # Monday 2024-01-15, Madrid is UTC+1: 09:30–10:30 local straddles the 10:00 peak start.
    p = price_interval(t, utc(2024, 1, 15, 8, 30), utc(2024, 1, 15, 9, 30), D("3.000"), tz=MADRID)
    assert bands(p) == {"peak": D("1.5"), "flat": D("1.5")}
    assert p.excl == D("1.5") * D("0.30") + D("1.5") * D("0.20") == D("0.75")
    assert p.incl == D("0.9075")
    assert p.amount() == Money(91, "EUR") and p.net() == Money(75, "EUR") and p.vat_amount() == Money(16, "EUR")


def test_tou_unequal_split_adds_up_exactly():
    t = compile_tariff(TOU)
    # 09:40–10:00 flat (20 min), 10:00–10:30 peak (30 min) local; 1 kWh → 0.4 / 0.6.
    p = price_interval(t, utc(2024, 1, 15, 8, 40), utc(2024, 1, 15, 9, 30), D("1"), tz=MADRID)
    assert bands(p) == {"flat": D("0.4"), "peak": D("0.6")}
    # Thirds cannot be exact: the largest remainder (0.67 of a step) gets the extra 0.000001 kWh.
    p = price_interval(t, utc(2024, 1, 15, 8, 50), utc(2024, 1, 15, 9, 20), D("1"), tz=MADRID)
    assert bands(p) == {"flat": D("0.333333"), "peak": D("0.666667")}
    # Two equal remainders: the tie goes to the earlier piece.
    p = price_interval(t, utc(2024, 1, 15, 8, 30), utc(2024, 1, 15, 9, 30), D("0.000001"), tz=MADRID)
    assert bands(p) == {"flat": D("0.000001")}  # a band that gets nothing is left out


def test_tou_window_crossing_midnight_and_weekend():
    t = compile_tariff(TOU)
    # Saturday 2024-01-20 21:00 → Sunday 07:00 local: 1 h flat, 8 h valley, 1 h flat.
    p = price_interval(t, utc(2024, 1, 20, 20), utc(2024, 1, 21, 6), D("10"), tz=MADRID)
    assert bands(p) == {"flat": D("2"), "valley": D("8")}
    # Saturday has no peak window.
    assert band_at(t, utc(2024, 1, 20, 11), MADRID) == ("flat", D("0.20"), D("21"))
    assert band_at(t, utc(2024, 1, 22, 11), MADRID) == ("peak", D("0.30"), D("21"))


def test_dst_spring_forward_in_madrid():
    t = compile_tariff(TOU)
    # Sunday 2024-03-31: clocks jump 02:00 CET → 03:00 CEST. Valley 22:00–06:00 local lasts 7 real hours.
    # 21:00 UTC Sat (22:00 CET) → 05:00 UTC Sun (07:00 CEST): 7 h valley then 1 h flat.
    p = price_interval(t, utc(2024, 3, 30, 21), utc(2024, 3, 31, 5), D("8"), tz=MADRID)
    assert bands(p) == {"valley": D("7"), "flat": D("1")}
    assert next_change(t, utc(2024, 3, 30, 21), MADRID) == utc(2024, 3, 31, 4)  # 06:00 CEST


def test_dst_fall_back_in_madrid():
    t = compile_tariff(TOU)
    # Sunday 2024-10-27: 03:00 CEST → 02:00 CET. 22:00 CEST Sat (20:00 UTC) → 06:00 CET (05:00 UTC): 9 real hours.
    p = price_interval(t, utc(2024, 10, 26, 20), utc(2024, 10, 27, 6), D("10"), tz=MADRID)
    assert bands(p) == {"valley": D("9"), "flat": D("1")}


def test_dst_window_inside_the_repeated_hour():
    doc = copy.deepcopy(TOU)
    doc["tou"]["seasons"][0]["windows"] = [{"days": ALL_DAYS, "start": "02:15", "end": "02:45", "band": "peak"}]
    t = compile_tariff(doc)
    # 02:15–02:45 happens twice on 2024-10-27 (00:15–00:45 and 01:15–01:45 UTC).
    p = price_interval(t, utc(2024, 10, 27, 0), utc(2024, 10, 27, 2), D("12"), tz=MADRID)
    assert bands(p) == {"peak": D("6"), "flat": D("6")}
    # ... and never on 2024-03-31 (02:00–03:00 does not exist).
    p = price_interval(t, utc(2024, 3, 31, 0), utc(2024, 3, 31, 2), D("12"), tz=MADRID)
    assert bands(p) == {"flat": D("12")}


def test_seasons_and_next_change():
    doc = copy.deepcopy(TOU)
    doc["tou"]["seasons"] = [{"months": [6, 7, 8], "windows": [{"days": ALL_DAYS, "start": "12:00", "end": "18:00", "band": "peak"}]}]
    t = compile_tariff(doc)
    assert band_at(t, utc(2024, 7, 1, 11), MADRID)[0] == "peak"  # 13:00 CEST
    assert band_at(t, utc(2024, 1, 1, 12), MADRID)[0] == "flat"  # January is in no season
    assert next_change(t, utc(2024, 7, 1, 11), MADRID) == utc(2024, 7, 1, 16)
    assert next_change(t, utc(2024, 1, 1, 12), MADRID) is None  # nothing in the next 8 days
    assert next_change(t, utc(2024, 5, 30, 12), MADRID) == utc(2024, 6, 1, 10)


def test_same_price_is_not_a_change():
    doc = copy.deepcopy(TOU)
    doc["tou"]["prices"]["peak"] = D("0.20")
    t = compile_tariff(doc)
    assert next_change(t, utc(2024, 1, 15, 8), MADRID) == utc(2024, 1, 15, 21)  # 22:00 valley


# --------------------------------------------------------------------------- tiers


def test_tiers_crossing_within_a_month():
    t = compile_tariff(TIERED)
    p = price_interval(t, utc(2024, 5, 10), utc(2024, 5, 11), D("30"), tz=MADRID, month_kwh_before=D(90))
    assert bands(p) == {"tier1": D(10), "tier2": D(20)}
    assert p.excl == D("1.0") + D("3.0")
    assert p.incl == D("4.4")
    # Crossing two boundaries at once.
    p = price_interval(t, utc(2024, 5, 10), utc(2024, 5, 11), D("300"), tz=MADRID, month_kwh_before=D(50))
    assert bands(p) == {"tier1": D(50), "tier2": D(200), "tier3": D(50)}
    assert band_at(t, utc(2024, 5, 10), MADRID, month_kwh=D(100)) == ("tier2", D("0.15"), D("10"))


def test_tiers_restart_at_the_month_boundary_split_by_time():
    t = compile_tariff(TIERED)
    # 2024-05-31 23:00 → 2024-06-01 01:00 Madrid (CEST): 21:00–23:00 UTC, half in each month.
    p = price_interval(t, utc(2024, 5, 31, 21), utc(2024, 5, 31, 23), D("40"), tz=MADRID, month_kwh_before=D(290))
    # May: 20 kWh after 290 → 10 at tier2, 10 at tier3; June: 20 kWh from 0 → tier1.
    assert bands(p) == {"tier1": D(20), "tier2": D(10), "tier3": D(10)}
    parts = split_by_month(utc(2024, 5, 31, 21), utc(2024, 5, 31, 23), D("40"), MADRID)
    assert [(m, k) for m, _a, _b, k in parts] == [("2024-05", D(20)), ("2024-06", D(20))]


# --------------------------------------------------------------------------- demand, flat


def test_demand_charge():
    t = compile_tariff(TOU)
    assert demand_charge(t, D("12.5")) == (D("56.25"), D("68.0625"))
    assert demand_charge(compile_tariff(FLAT), D("12.5")) == (D(0), D(0))


def test_flat():
    t = compile_tariff(FLAT)
    p = price_interval(t, utc(2024, 1, 1), utc(2024, 1, 1, 0, 15), D("0.123"), tz="UTC")
    assert p.excl == D("0.123") * D("0.1875")
    assert p.bands[0]["band"] == "flat"
    assert next_change(t, utc(2024, 1, 1), "UTC") is None
    assert p.as_json()["bands"][0]["kwh"] == "0.123"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(currency="XXQ"), "currency"),
        (lambda d: d.update(vat=D(101)), "vat"),
        (lambda d: d.update(vat=21.0), "vat"),
        (lambda d: d.update(kind="spot"), "kind"),
        (lambda d: d.update(version="2"), "version"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(energy_price=D(1)), "energy_price"),
        (lambda d: d["tou"]["seasons"][0]["windows"][1].update(start="24:00"), "tou.seasons[0].windows[1].start"),
        (lambda d: d["tou"]["seasons"][0]["windows"][1].update(start="7:00"), "tou.seasons[0].windows[1].start"),
        (lambda d: d["tou"]["seasons"][0]["windows"][1].update(end="22:00"), "tou.seasons[0].windows[1].end"),
        (lambda d: d["tou"]["seasons"][0]["windows"][0].update(days=[0]), "tou.seasons[0].windows[0].days[0]"),
        (lambda d: d["tou"]["seasons"][0]["windows"][0].update(band="shoulder"), "tou.seasons[0].windows[0].band"),
        (lambda d: d["tou"]["seasons"][0]["windows"][1].update(start="13:00"), "tou.seasons[0].windows[1]"),  # overlaps peak
        (lambda d: d["tou"]["seasons"].append({"months": [3], "windows": []}), "tou.seasons[1].months[0]"),
        (lambda d: d["tou"]["prices"].pop("valley"), "tou.prices.valley"),
        (lambda d: d["tou"]["prices"].update(peak=D(-1)), "tou.prices.peak"),
        (lambda d: d.update(demand_charge_per_kw="abc"), "demand_charge_per_kw"),
    ],
)
def test_validation_names_the_field(mutate, field):
    doc = copy.deepcopy(TOU)
    mutate(doc)
    with pytest.raises(MeterTariffError) as e:
        validate_tariff(doc)
    assert e.value.field == field, e.value


@pytest.mark.parametrize(
    ("tiers", "field"),
    [
        ([], "tiers"),
        ([{"up_to_kwh": None, "price": 1}, {"up_to_kwh": None, "price": 1}], "tiers[0].up_to_kwh"),
        ([{"up_to_kwh": 100, "price": 1}], "tiers[0].up_to_kwh"),
        ([{"up_to_kwh": 100, "price": 1}, {"up_to_kwh": 50, "price": 1}, {"up_to_kwh": None, "price": 1}], "tiers[1].up_to_kwh"),
        ([{"up_to_kwh": 100}, {"up_to_kwh": None, "price": 1}], "tiers[0].price"),
    ],
)
def test_tier_validation(tiers, field):
    with pytest.raises(MeterTariffError) as e:
        validate_tariff({**TIERED, "tiers": tiers})
    assert e.value.field == field


def test_strings_are_exact_numbers():
    validate_tariff({"currency": "eur", "vat": "21", "kind": "flat", "energy_price": "0.15"})


# --------------------------------------------------------------------------- properties

instants = st.datetimes(min_value=datetime(2023, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC))
durations = st.integers(min_value=1, max_value=3 * 86400 * 1000).map(lambda ms: timedelta(milliseconds=ms))
kwhs = st.decimals(min_value=0, max_value=100000, places=3)


@settings(max_examples=200, deadline=None)
@given(start=instants, length=durations, kwh=kwhs)
def test_tou_shares_add_up_and_match_a_minute_by_minute_count(start, length, kwh):
    t = compile_tariff(TOU)
    p = price_interval(t, start, start + length, kwh, tz=MADRID)
    assert sum(b.kwh for b in p.bands) == kwh
    assert p.excl == sum(b.kwh * b.unit_price for b in p.bands)
    assert p.incl == p.excl * D("1.21")
    assert p.amount() == p.net() + p.vat_amount()
    assert min(t.prices) * kwh <= p.excl <= max(t.prices) * kwh


@settings(max_examples=200, deadline=None)
@given(start=instants, length=durations, kwh=kwhs, before=st.decimals(min_value=0, max_value=1000, places=3))
def test_tiers_shares_add_up(start, length, kwh, before):
    t = compile_tariff(TIERED)
    p = price_interval(t, start, start + length, kwh, tz=MADRID, month_kwh_before=before)
    assert sum(b.kwh for b in p.bands) == kwh
    assert D("0.10") * kwh <= p.excl <= D("0.25") * kwh


@settings(max_examples=100, deadline=None)
@given(start=instants, cut=st.integers(min_value=1, max_value=10**6), rest=st.integers(min_value=1, max_value=10**6))
def test_splitting_an_interval_at_its_band_edges_changes_nothing(start, cut, rest):
    """Pricing two halves separately equals pricing the whole when each half keeps its share of time."""
    t = compile_tariff(TOU)
    mid = start + timedelta(seconds=cut)
    end = mid + timedelta(seconds=rest)
    whole = price_interval(t, start, end, D(cut + rest), tz=MADRID)
    a = price_interval(t, start, mid, D(cut), tz=MADRID)
    b = price_interval(t, mid, end, D(rest), tz=MADRID)
    assert whole.excl == a.excl + b.excl


@settings(max_examples=100, deadline=None)
@given(start=instants, length=durations, kwh=kwhs)
def test_minor_units_are_to_minor(start, length, kwh):
    p = price_interval(compile_tariff(TOU), start, start + length, kwh, tz=MADRID)
    assert p.amount_minor == p.amount().amount and p.net_minor == p.net().amount
