"""Money: integer minor units plus an ISO 4217 currency. Never a float.

* ``Money(amount, currency)`` holds an ``int`` number of minor units (cents
  for EUR, yen for JPY). Arithmetic between two amounts refuses to mix
  currencies.
* Unit prices (per kWh, per hour) are ``Decimal``; ``to_minor`` is the one
  place where a Decimal amount in major units becomes minor units. Its
  rounding rule is ROUND_HALF_UP (half a cent goes up), the rule customers
  and tax offices expect on a receipt; callers round once, at billing.
* ``parse`` reads what a person typed ("12,50", "12.5", "1.234,56" in
  Spanish) for a locale, with a clear error; ``format`` writes an amount for a
  locale with babel.
"""

from __future__ import annotations

import functools

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from babel import Locale
from babel.numbers import format_currency, get_currency_name, get_currency_precision, get_currency_symbol, get_group_symbol

ROUNDING = ROUND_HALF_UP
_PLAIN_NUMBER = re.compile(r"^[0-9]{1,15}(\.[0-9]{1,15})?$")


class MoneyError(ValueError):
    """An amount that cannot be used: unknown currency, mixed currencies, or bad input.

    ``code`` is stable (``empty``, ``negative``, ``too_many_decimals``,
    ``not_a_number``, ``unknown_currency``, ``currency_mismatch``, ``invalid``)
    so the web layer can show a translated message; ``params`` fill it in.
    """

    def __init__(self, message: str, code: str = "invalid", **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


class CurrencyMismatch(MoneyError):
    """Two amounts in different currencies were combined."""


def check_currency(code: str) -> str:
    """Return the upper-case ISO 4217 code, or raise MoneyError for an unknown one."""
    if not isinstance(code, str) or len(code) != 3 or not code.isalpha():
        raise MoneyError(f"not an ISO 4217 currency code: {code!r}", "unknown_currency", currency=str(code))
    return _known(code.upper())


@functools.lru_cache(maxsize=512)
def _known(code: str) -> str:
    # CLDR lookups cost tens of microseconds; the answer for a code never changes in a process.
    if get_currency_name(code, locale="en") == code:
        raise MoneyError(f"unknown currency: {code}", "unknown_currency", currency=code)
    return code


def exponent(currency: str) -> int:
    """Number of minor-unit digits of ``currency`` (EUR 2, JPY 0, KWD 3)."""
    return _exponent(check_currency(currency))


@functools.lru_cache(maxsize=512)
def _exponent(code: str) -> int:
    # CLDR's "digits" (not its cash rounding) equal the ISO 4217 exponent providers use.
    return get_currency_precision(code)


@dataclass(frozen=True, order=False, slots=True)
class Money:
    """An amount of ``currency`` in integer minor units."""

    amount: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int):
            raise MoneyError(f"amount must be an int number of minor units, not {type(self.amount).__name__}")
        object.__setattr__(self, "currency", check_currency(self.currency))

    @classmethod
    def zero(cls, currency: str) -> Money:
        """Nothing, in ``currency``."""
        return cls(0, currency)

    def _same(self, other: object) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot combine Money with {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}", "currency_mismatch", expected=self.currency, got=other.currency)
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.amount + self._same(other).amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.amount - self._same(other).amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same(other).amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same(other).amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same(other).amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same(other).amount

    def __bool__(self) -> bool:
        return self.amount != 0

    def min(self, other: Money) -> Money:
        """The smaller of two amounts of the same currency."""
        return self if self <= other else other

    def to_decimal(self) -> Decimal:
        """The amount in major units, exactly (12.34 for 1234 EUR cents)."""
        return Decimal(self.amount).scaleb(-exponent(self.currency))

    def as_json(self) -> dict:
        """``{"amount": 1234, "currency": "EUR"}``, the API's shape."""
        return {"amount": self.amount, "currency": self.currency}

    @classmethod
    def from_json(cls, data: object) -> Money:
        """Read the API's ``{"amount", "currency"}`` shape, with a clear error."""
        if not isinstance(data, dict) or set(data) != {"amount", "currency"}:
            raise MoneyError('expected {"amount": <integer minor units>, "currency": "<ISO 4217>"}')
        return cls(data["amount"], data["currency"])

    def __str__(self) -> str:
        return f"{self.to_decimal()} {self.currency}"


def to_minor(amount: Decimal, currency: str, rounding: str = ROUNDING) -> Money:
    """Convert a Decimal in major units to Money, rounding half up to the currency's minor unit.

    This is the only conversion from computed prices to money; call it once,
    on the final amount, never on intermediate terms.
    """
    if not isinstance(amount, Decimal):
        raise MoneyError(f"to_minor takes a Decimal, not {type(amount).__name__}")
    if not amount.is_finite():
        raise MoneyError("amount is not a finite number")
    exp = exponent(currency)
    minor = amount.scaleb(exp).quantize(Decimal(1), rounding=rounding)
    return Money(int(minor), currency)


def parse(text: str, currency: str, locale: str = "en") -> Money:
    """Parse what a person typed ("12,50", "12.5", "€ 1.234,56") into Money, or raise MoneyError.

    Accepts the locale's decimal and group symbols, and also a lone "." or ","
    as the decimal mark when it is followed by at most the currency's number
    of decimals (people type "12.5" on a Spanish phone keyboard). Refuses
    negative amounts and more decimals than the currency has.
    """
    currency = check_currency(currency)
    exp = exponent(currency)
    raw = (text or "").strip()
    # Currency signs people copy or type: the locale's, the English one ("CN¥", "US$"), the bare sign and the code.
    signs = {get_currency_symbol(currency, loc) for loc in (locale, "en")} | {"€", "$", "£", "¥", "￥", currency, currency.lower()}
    for sym in sorted(signs, key=len, reverse=True):
        raw = raw.replace(sym, "")
    raw = raw.replace("\u00a0", "").replace("\u202f", "").replace(" ", "").replace("'", "")
    if not raw:
        raise MoneyError("enter an amount", "empty")
    if raw.startswith("-"):
        raise MoneyError("the amount cannot be negative", "negative")
    raw = _normalise(raw, get_group_symbol(Locale.parse(locale)))
    if not _PLAIN_NUMBER.match(raw):
        raise MoneyError(f"not an amount: {text!r}", "not_a_number")
    value = Decimal(raw)
    decimals = max(0, -int(value.as_tuple().exponent))
    if decimals > exp:
        raise MoneyError(f"{currency} amounts have at most {exp} decimals", "too_many_decimals", currency=currency, decimals=exp)
    return Money(int(value.scaleb(exp)), currency)


def _normalise(raw: str, group: str) -> str:
    """Turn "1.234,56" / "1,234.56" / "12,5" into "1234.56" / "1234.56" / "12.5"; "" when malformed."""
    dec_mark: str | None = None
    grp: str | None = None
    if "." in raw and "," in raw:
        dec_mark = "." if raw.rfind(".") > raw.rfind(",") else ","
        grp = "," if dec_mark == "." else "."
    elif "," in raw or "." in raw:
        mark = "," if "," in raw else "."
        grouped = re.fullmatch(r"[1-9][0-9]{0,2}(" + re.escape(mark) + r"[0-9]{3})+", raw) is not None
        if raw.count(mark) > 1 or (grouped and mark == group):
            grp = mark  # "1.234.567" or, in a locale that groups with it, "1.234" (never "0.001")
        else:
            dec_mark = mark  # "12,5" or "12.50", whatever the locale: people type either
    int_part, _, frac = raw.partition(dec_mark) if dec_mark else (raw, "", "")
    if grp and grp in int_part:
        if not re.fullmatch(r"[1-9][0-9]{0,2}(" + re.escape(grp) + r"[0-9]{3})+", int_part):
            return ""
        int_part = int_part.replace(grp, "")
    return int_part + ("." + frac if dec_mark else "")


def format(money: Money, locale: str = "en") -> str:  # noqa: A001 - mirrors babel's name
    """Format ``money`` for ``locale`` with babel ("€12.34" in en, "12,34 €" in es, "€12.34" in zh)."""
    return format_currency(money.to_decimal(), money.currency, locale=locale, currency_digits=True)
