"""Money: minor units per currency, no mixing, one rounding rule, what people type, what they read."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payments.money import CurrencyMismatch, Money, MoneyError, exponent, format, parse, to_minor


def test_exponents_follow_iso_4217():
    assert [exponent(c) for c in ("EUR", "USD", "CNY", "JPY", "KRW", "KWD", "BHD")] == [2, 2, 2, 0, 0, 3, 3]


def test_unknown_or_malformed_currency_is_refused():
    for bad in ("XYZ", "EU", "euro", "", "12€"):
        with pytest.raises(MoneyError) as e:
            Money(100, bad)
        assert e.value.code == "unknown_currency"


def test_amount_must_be_integer_minor_units():
    for bad in (1.5, Decimal("1.5"), "150", True):
        with pytest.raises(MoneyError):
            Money(bad, "EUR")  # type: ignore[arg-type]


def test_arithmetic_refuses_to_mix_currencies():
    assert Money(150, "EUR") + Money(250, "EUR") == Money(400, "EUR")
    assert Money(150, "EUR") - Money(250, "EUR") == Money(-100, "EUR")
    with pytest.raises(CurrencyMismatch):
        Money(100, "EUR") + Money(100, "USD")
    with pytest.raises(CurrencyMismatch):
        assert Money(100, "EUR") < Money(100, "USD")


@pytest.mark.parametrize(
    "amount, currency, minor",
    [
        ("0.125", "EUR", 13),  # half a cent goes up
        ("0.124999", "EUR", 12),
        ("12.344999", "EUR", 1234),
        ("12.345", "EUR", 1235),
        ("1234.5", "JPY", 1235),
        ("0.0005", "KWD", 1),
        ("0", "EUR", 0),
    ],
)
def test_to_minor_rounds_half_up_once(amount, currency, minor):
    assert to_minor(Decimal(amount), currency) == Money(minor, currency)


def test_to_minor_refuses_floats_and_non_numbers():
    with pytest.raises(MoneyError):
        to_minor(0.1, "EUR")  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        to_minor(Decimal("NaN"), "EUR")


@pytest.mark.parametrize(
    "text, locale, cents",
    [
        ("12,50", "es", 1250),
        ("12.5", "es", 1250),  # a phone keyboard may only offer "."
        ("12.50", "en", 1250),
        ("12,5", "en", 1250),
        ("1.234,56", "es", 123456),
        ("1,234.56", "en", 123456),
        ("1.234", "es", 123400),  # Spanish groups with "."
        ("1,234", "en", 123400),
        ("€ 20", "en", 2000),
        ("20 €", "es", 2000),
        (" 7 ", "zh", 700),
    ],
)
def test_parse_what_people_type(text, locale, cents):
    assert parse(text, "EUR", locale) == Money(cents, "EUR")


@pytest.mark.parametrize(
    "text, code",
    [("", "empty"), ("   ", "empty"), ("abc", "not_a_number"), ("1e5", "not_a_number"), ("NaN", "not_a_number"),
     ("1.2.3", "not_a_number"), ("-5", "negative"), ("12,345", "too_many_decimals"), ("0.001", "too_many_decimals")],
)
def test_parse_refuses_with_a_stable_reason(text, code):
    with pytest.raises(MoneyError) as e:
        parse(text, "EUR", "en" if code != "too_many_decimals" else "es")
    assert e.value.code == code


def test_parse_knows_currencies_without_decimals():
    assert parse("1000", "JPY") == Money(1000, "JPY")
    with pytest.raises(MoneyError) as e:
        parse("10.5", "JPY")
    assert e.value.code == "too_many_decimals"


def test_format_per_locale():
    assert format(Money(123456, "EUR"), "en") == "€1,234.56"
    assert format(Money(123456, "EUR"), "es") == "1.234,56\xa0€"
    assert format(Money(1250, "CNY"), "zh") == "¥12.50"
    assert format(Money(1000, "JPY"), "en") == "¥1,000"


def test_json_shape():
    assert Money(1234, "EUR").as_json() == {"amount": 1234, "currency": "EUR"}
    assert Money.from_json({"amount": 1234, "currency": "eur"}) == Money(1234, "EUR")
    for bad in ({"amount": 12.34, "currency": "EUR"}, {"amount": 1}, [1234, "EUR"], {"amount": 1, "currency": "EUR", "x": 1}):
        with pytest.raises(MoneyError):
            Money.from_json(bad)


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["EUR", "JPY", "KWD", "CNY"]), st.sampled_from(["en", "es", "zh"]))
def test_what_we_format_we_can_parse_back(minor, currency, locale):
    money = Money(minor, currency)
    assert parse(format(money, locale), currency, locale) == money


@given(st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e9"), allow_nan=False, places=6))
def test_to_minor_is_within_half_a_minor_unit(amount):
    cents = to_minor(amount, "EUR").amount
    assert abs(Decimal(cents) / 100 - amount) <= Decimal("0.005")
