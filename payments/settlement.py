"""Settlement: who earned each payment, to the cent. No Flask here.

**Parties** of a site (operator, site host, equipment owner, agency,
platform) are owed money in the ledger: one ``PARTY_PAYABLE`` account per
party and currency (owner ``"party:<id>"``).

**Split rules** are versioned per site (or meter building) with an
``effective_from``; the rule in force when the payment became revenue is the
one applied. A rule document::

    {"shares": [{"party_id": 1, "bps": 7000},                  # 70.00 % of what is left
                {"party_id": 2, "bps": 2000},
                {"party_id": 3, "fixed_per_session": 50},      # minor units per payment
                {"party_id": 4, "per_kwh": "0.02"}],           # per kWh delivered (major unit, Decimal)
     "platform_fee": {"party_id": 9, "bps": 150, "fixed": 10},  # the platform's fee
     "merchant_of_record": 1}                                   # takes the remainder

**Allocation** of a payment of ``gross`` (what the customer paid) with ``vat``
and the provider's ``fee``:

1. ``net = gross − vat − fee`` (VAT goes to VAT payable, the fee to provider fees);
2. the platform fee: ``round_half_up(net × bps / 10 000) + fixed``, at most ``net``;
3. fixed parts (per payment, per kWh rounded half up), in rule order; when
   they add up to more than what is left, they are scaled down together by
   the largest remainder method so they fit exactly;
4. what is left is divided among the ``bps`` shares and the merchant of
   record (whose weight is ``10 000 − Σ bps``) by the largest remainder method;
   ties favour the merchant of record, then rule order.

So ``Σ parts = net`` and ``vat + fee + Σ parts = gross`` always.

A refund reverses the allocation in proportion to what each party still holds
of it (largest remainder), and the refund that empties a payment takes
exactly what is left: several partial refunds never reverse more than was
allocated.

**The ledger.** ``allocate`` (one payment, at capture) books one balanced
entry per payment, key ``allocation:<key>``: REVENUE debited with ``gross −
vat``, PROVIDER_FEES credited with the fee, each party's payable with its
part. **Bulk allocation** (``allocate_many``: imports and backfills of
thousands of payments at a time) books the same movements as one entry per
call and currency, each account's postings summed. Per payment, the
allocation row (unique key: a payment is allocated once) and its lines are
the subsidiary ledger — what statements, refunds and payouts read — and the
journal entry is the general-ledger total of those lines, which
``bench/settlement.py`` checks to the cent (lines = payables + payouts). Per
payment that is one allocation row and its lines, not also an entry and six
postings: two workers allocate a million payments in well under a minute on
two cores.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from sqlalchemy import BigInteger, Boolean, Enum, ForeignKey, Index, Integer, Numeric, String, Text, UniqueConstraint, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from payments.base import Base, UTCDateTime, utcnow
from payments.invoicing import largest_remainder
from payments.ledger import AccountKind, get_account, post
from payments.money import Money, check_currency, to_minor

__all__ = [
    "PartyKind", "Party", "SplitRule", "Allocation", "AllocationLine", "RuleError", "Split",
    "validate_rule", "split", "reverse_split", "rule_in_force", "add_rule", "allocate", "reverse", "payable",
]

BPS = 10_000


class RuleError(ValueError):
    """A split rule that cannot be used: ``field`` says where, the message says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class PartyKind(enum.StrEnum):
    OPERATOR = "operator"
    SITE_HOST = "site_host"
    EQUIPMENT_OWNER = "equipment_owner"
    AGENCY = "agency"
    PLATFORM = "platform"


def _enum(cls):
    return Enum(cls, name=cls.__name__.lower(), native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Party(Base):
    """Someone paid out of a site's revenue."""

    __tablename__ = "parties"

    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int | None] = mapped_column(Integer, index=True)  # the operator that manages it (None: the platform)
    parent_party_id: Mapped[int | None] = mapped_column(ForeignKey("parties.id"))  # an agency under an operator
    kind: Mapped[PartyKind] = mapped_column(_enum(PartyKind))
    legal_name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254), default="")  # statements and payout notices
    payout_currency: Mapped[str] = mapped_column(String(3))
    iban: Mapped[str | None] = mapped_column(String(34))  # validated (schwifty); shown masked
    bic: Mapped[str | None] = mapped_column(String(11))
    stripe_account_id: Mapped[str | None] = mapped_column(String(64))  # Connect: paid by transfer instead of SEPA
    min_payout_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # below this the payable carries over
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def owner(self) -> str:
        """The ledger owner of this party's payable accounts."""
        return f"party:{self.id}"

    @property
    def iban_masked(self) -> str:
        """``ES91 •••• •••• 1332``: enough to recognise, not to use."""
        if not self.iban:
            return ""
        return f"{self.iban[:4]} •••• •••• {self.iban[-4:]}"


class SplitRule(Base):
    """One version of a site's (or building's) split rule, in force from ``effective_from``."""

    __tablename__ = "split_rules"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(Integer, index=True)
    number: Mapped[int] = mapped_column(Integer)
    effective_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    rule_json: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("site_id", "number", name="uq_split_rules_site_number"),
        UniqueConstraint("site_id", "effective_from", name="uq_split_rules_site_effective_from"),
    )


class Allocation(Base):
    """A payment (or a refund's reversal) divided among parties, booked once per ``idempotency_key``.

    Indexed for what reads it — the key, the revenue's time (statements,
    payouts), a refund's original — and nothing else: it is written once per
    payment, on the hot path of every capture.
    """

    __tablename__ = "allocations"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(64))  # "session:7", "bill:3", "meter_interval:12"
    site_id: Mapped[int] = mapped_column(Integer)
    rule_id: Mapped[int | None] = mapped_column(ForeignKey("split_rules.id"))  # None: no rule, all to the merchant of record
    reverses_id: Mapped[int | None] = mapped_column(ForeignKey("allocations.id"))  # a refund's reversal
    currency: Mapped[str] = mapped_column(String(3))
    gross_minor: Mapped[int] = mapped_column(BigInteger)  # reversals: negative amounts
    vat_minor: Mapped[int] = mapped_column(BigInteger)
    fee_minor: Mapped[int] = mapped_column(BigInteger)
    net_minor: Mapped[int] = mapped_column(BigInteger)
    kwh: Mapped[Decimal] = mapped_column(Numeric(18, 3), default=Decimal(0))
    booked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)  # the revenue's day

    __table_args__ = (
        # Only refunds' reversals have one: a partial index holds just those.
        Index("ix_allocations_reverses_id", "reverses_id", postgresql_where=text("reverses_id IS NOT NULL"),
              sqlite_where=text("reverses_id IS NOT NULL")),
    )


class AllocationLine(Base):
    """One party's part of an allocation.

    No foreign keys, deliberately: lines are append-only, written only by this
    module in the transaction that writes their allocation, and point at rows
    that are never deleted (allocations; parties are deactivated, not
    deleted). On PostgreSQL a foreign-key check is a query per row, which made
    up two thirds of writing a line (4,000,000 lines in 78 s with the checks,
    28 s without, on the benchmark's machine).
    """

    __tablename__ = "allocation_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    allocation_id: Mapped[int] = mapped_column(Integer)
    party_id: Mapped[int] = mapped_column(Integer, index=True)
    role: Mapped[str] = mapped_column(String(16))  # share, fixed, per_kwh, platform_fee, remainder
    amount_minor: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        # Lines are written in their allocation's order, right after it: on PostgreSQL a block-range (BRIN) index finds
        # an allocation's lines for a few bytes per thousand lines, where a B-tree cost a third of writing each line.
        Index("ix_allocation_lines_allocation_id", "allocation_id", postgresql_using="brin",
              postgresql_with={"pages_per_range": 16, "autosummarize": "on"}),
    )


# --------------------------------------------------------------------------- rules


def _int(v, field: str, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RuleError(field, "must be a whole number")
    if v < lo or (hi is not None and v > hi):
        raise RuleError(field, f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
    return v


def _dec(v, field: str) -> Decimal:
    try:
        d = Decimal(str(v)) if not isinstance(v, (bool, float)) else None
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d < 0:
        raise RuleError(field, "must be a non-negative decimal number (as a string)")
    return d


def validate_rule(rule: Mapping, *, party_ids: set[int] | None = None) -> None:
    """Refuse a rule that cannot be applied, naming the field: shares above 100 %, unknown or repeated parties, ..."""
    if not isinstance(rule, Mapping):
        raise RuleError("", "a rule is a JSON object")
    unknown = set(rule) - {"shares", "platform_fee", "merchant_of_record"}
    if unknown:
        raise RuleError(sorted(unknown)[0], "unknown field")
    shares = rule.get("shares", [])
    if not isinstance(shares, list):
        raise RuleError("shares", "must be a list")
    total_bps = 0
    seen: set[tuple[int, str]] = set()
    for i, sh in enumerate(shares):
        f = f"shares[{i}]"
        if not isinstance(sh, Mapping):
            raise RuleError(f, "must be an object")
        pid = _int(sh.get("party_id"), f"{f}.party_id", lo=1)
        kinds = [k for k in ("bps", "fixed_per_session", "per_kwh") if k in sh]
        if len(kinds) != 1 or set(sh) - {"party_id", *kinds}:
            raise RuleError(f, "needs party_id and exactly one of bps, fixed_per_session, per_kwh")
        if (pid, kinds[0]) in seen:
            raise RuleError(f"{f}.party_id", "this party already has a share of this kind")
        seen.add((pid, kinds[0]))
        if party_ids is not None and pid not in party_ids:
            raise RuleError(f"{f}.party_id", "no such party")
        if kinds[0] == "bps":
            total_bps += _int(sh["bps"], f"{f}.bps", lo=0, hi=BPS)
        elif kinds[0] == "fixed_per_session":
            _int(sh["fixed_per_session"], f"{f}.fixed_per_session")
        else:
            _dec(sh["per_kwh"], f"{f}.per_kwh")
    if total_bps > BPS:
        raise RuleError("shares", f"the shares add up to {Decimal(total_bps) / 100}% of the net: at most 100%")
    fee = rule.get("platform_fee")
    if fee is not None:
        if not isinstance(fee, Mapping) or set(fee) - {"party_id", "bps", "fixed"} or "party_id" not in fee:
            raise RuleError("platform_fee", "needs party_id, and bps and/or fixed")
        pid = _int(fee["party_id"], "platform_fee.party_id", lo=1)
        if party_ids is not None and pid not in party_ids:
            raise RuleError("platform_fee.party_id", "no such party")
        _int(fee.get("bps", 0), "platform_fee.bps", hi=BPS)
        _int(fee.get("fixed", 0), "platform_fee.fixed")
    mor = _int(rule.get("merchant_of_record"), "merchant_of_record", lo=1)
    if party_ids is not None and mor not in party_ids:
        raise RuleError("merchant_of_record", "no such party")


@dataclass(frozen=True)
class Split:
    """What each party gets of one payment: ``parts`` as (party_id, role, minor units), in rule order."""

    net: int
    parts: tuple[tuple[int, str, int], ...]

    def by_party(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for pid, _, amt in self.parts:
            out[pid] = out.get(pid, 0) + amt
        return out


def _half_up(d: Decimal) -> int:
    return int(d.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def split(rule: Mapping, *, gross: int, vat: int, fee: int, kwh: Decimal = Decimal(0), currency: str = "EUR") -> Split:
    """Divide ``gross − vat − fee`` by ``rule`` (steps 1–4 of the module docstring). Pure; exact.

    ``per_kwh`` prices are in the currency's major unit (``"0.02"`` EUR per kWh
    is 2 cents); ``fixed`` amounts are in minor units.
    """
    net = gross - vat - fee
    if net < 0 or vat < 0 or fee < 0:
        raise RuleError("", "VAT and fee cannot exceed the payment")
    parts: list[tuple[int, str, int]] = []
    left = net
    fee_rule = rule.get("platform_fee")
    if fee_rule:
        pf = min(left, _half_up(Decimal(net) * fee_rule.get("bps", 0) / BPS) + fee_rule.get("fixed", 0))
        if pf:
            parts.append((fee_rule["party_id"], "platform_fee", pf))
            left -= pf
    shares = rule.get("shares", [])
    fixed = []
    for sh in shares:
        if "fixed_per_session" in sh:
            fixed.append((sh["party_id"], "fixed", sh["fixed_per_session"]))
        elif "per_kwh" in sh:
            fixed.append((sh["party_id"], "per_kwh", to_minor(Decimal(str(sh["per_kwh"])) * kwh, currency).amount))
    want = sum(a for _, _, a in fixed)
    if want > left:  # scaled down together to fit exactly
        got = largest_remainder(left, [a for _, _, a in fixed])
        fixed = [(p, r, g) for (p, r, _), g in zip(fixed, got, strict=True)]
    for p, r, a in fixed:
        if a:
            parts.append((p, r, a))
            left -= a
    mor = rule["merchant_of_record"]
    bps = [(sh["party_id"], sh["bps"]) for sh in shares if "bps" in sh]
    weights = [Decimal(BPS - sum(b for _, b in bps))] + [Decimal(b) for _, b in bps]
    got = largest_remainder(left, weights)  # index 0 (the merchant of record) wins ties
    for (pid, _), amt in zip(bps, got[1:], strict=True):
        if amt:
            parts.append((pid, "share", amt))
    if got[0]:
        parts.append((mor, "remainder", got[0]))
    return Split(net, tuple(parts))


def reverse_split(original: Sequence[tuple[int, str, int]], already: Sequence[Sequence[tuple[int, str, int]]], amount: int) -> list[tuple[int, str, int]]:
    """The parts to take back for a refund of ``amount`` of net, in proportion to what each part still holds."""
    left = [a for _, _, a in original]
    for rev in already:
        for i, (_, _, a) in enumerate(rev):
            left[i] -= a
    if amount < 0 or amount > sum(left):
        raise RuleError("", "a refund cannot reverse more than was allocated")
    if amount == sum(left):
        got = left
    else:
        got = largest_remainder(amount, [Decimal(x) for x in left])
    return [(p, r, g) for (p, r, _), g in zip(original, got, strict=True)]


# --------------------------------------------------------------------------- booking


def rule_in_force(s: Session, site_id: int, at: dt.datetime) -> SplitRule | None:
    """The site's rule version in force at ``at`` (None: no rule yet — everything to the merchant of record)."""
    return s.scalar(select(SplitRule).where(SplitRule.site_id == site_id, SplitRule.effective_from <= at)
                    .order_by(SplitRule.effective_from.desc()).limit(1))


def add_rule(s: Session, site_id: int, rule: Mapping, *, effective_from: dt.datetime, created_by: str) -> SplitRule:
    """Validate and store a new version (effective now or later; history is never rewritten)."""
    from payments.tariff_store import dumps

    ids = set(s.scalars(select(Party.id).where(Party.active.is_(True))))
    validate_rule(rule, party_ids=ids)
    now = utcnow()
    if effective_from < now - dt.timedelta(seconds=1):
        raise RuleError("effective_from", "a rule cannot take effect in the past")
    last = s.scalar(select(SplitRule.number).where(SplitRule.site_id == site_id).order_by(SplitRule.number.desc()).limit(1)) or 0
    row = SplitRule(site_id=site_id, number=last + 1, effective_from=effective_from, rule_json=dumps(rule), created_by=created_by)
    s.add(row)
    s.flush()
    return row


def payable(s: Session, party_id: int, currency: str):
    """The ledger account of what we owe ``party_id`` in ``currency``."""
    return get_account(s, AccountKind.PARTY_PAYABLE, currency, f"party:{party_id}")


def _rule_dict(row: SplitRule | None, merchant_of_record: int) -> dict:
    from payments.tariff_store import loads

    return loads(row.rule_json) if row is not None else {"shares": [], "merchant_of_record": merchant_of_record}


def allocate(
    s: Session, *, key: str, source: str, site_id: int, currency: str, gross: int, vat: int, fee: int = 0,
    kwh: Decimal = Decimal(0), merchant_of_record: int, at: dt.datetime,
) -> Allocation:
    """Book a payment that became revenue: REVENUE (its net of VAT) → fee recovery + each party's payable. Once per ``key``.

    The capture has already booked clearing → REVENUE (gross − VAT) + VAT
    payable, and the provider's fee (clearing → PROVIDER_FEES) when known.
    This entry moves ``gross − vat`` out of REVENUE: ``fee`` back against
    PROVIDER_FEES and the net to the parties, so REVENUE holds nothing once a
    payment is allocated.
    """
    existing = s.scalar(select(Allocation).where(Allocation.idempotency_key == key))
    if existing is not None:
        return existing
    currency = check_currency(currency)
    row = rule_in_force(s, site_id, at)
    sp = split(_rule_dict(row, merchant_of_record), gross=gross, vat=vat, fee=fee, kwh=kwh, currency=currency)
    alloc = Allocation(idempotency_key=key, source=source, site_id=site_id, rule_id=row.id if row else None, currency=currency,
                       gross_minor=gross, vat_minor=vat, fee_minor=fee, net_minor=sp.net, kwh=kwh, booked_at=at)
    s.add(alloc)
    s.flush()
    s.add_all([AllocationLine(allocation_id=alloc.id, party_id=p, role=r, amount_minor=a) for p, r, a in sp.parts])
    _book(s, alloc, [(p, a) for p, _, a in sp.parts], fee, gross - vat, description="Revenue allocated")
    return alloc


def _book(s: Session, alloc: Allocation, parts: list[tuple[int, int]], fee: int, revenue: int, *, description: str) -> None:
    cur = alloc.currency
    postings = [(get_account(s, AccountKind.REVENUE, cur), Money(revenue, cur))]
    if fee:
        postings.append((get_account(s, AccountKind.PROVIDER_FEES, cur), Money(-fee, cur)))
    by_party: dict[int, int] = {}
    for p, a in parts:
        by_party[p] = by_party.get(p, 0) + a
    postings += [(payable(s, p, cur), Money(-a, cur)) for p, a in sorted(by_party.items()) if a]
    if any(m.amount for _, m in postings):
        post(s, idempotency_key=f"allocation:{alloc.idempotency_key}", description=description, reference=alloc.source, postings=postings)


def reverse(s: Session, original: Allocation, *, key: str, gross: int, vat: int, at: dt.datetime) -> Allocation:
    """A refund of ``gross`` (of which ``vat``) of an allocated payment: each party gives back its proportion. Once per ``key``.

    The provider keeps its fee on a refund (as Stripe does), so the whole net
    refunded (``gross − vat``) comes back from the parties, in proportion to
    what each still holds of this payment.
    """
    existing = s.scalar(select(Allocation).where(Allocation.idempotency_key == key))
    if existing is not None:
        return existing
    lines = list(s.scalars(select(AllocationLine).where(AllocationLine.allocation_id == original.id).order_by(AllocationLine.id)))
    earlier = list(s.scalars(select(Allocation).where(Allocation.reverses_id == original.id).order_by(Allocation.id)))
    already = []
    for e in earlier:
        got = {(ln.party_id, ln.role): -ln.amount_minor for ln in s.scalars(select(AllocationLine).where(AllocationLine.allocation_id == e.id))}
        already.append([(ln.party_id, ln.role, got.get((ln.party_id, ln.role), 0)) for ln in lines])
    back = reverse_split([(ln.party_id, ln.role, ln.amount_minor) for ln in lines], already, gross - vat)
    rev = Allocation(idempotency_key=key, source=original.source, site_id=original.site_id, rule_id=original.rule_id,
                     reverses_id=original.id, currency=original.currency, gross_minor=-gross, vat_minor=-vat, fee_minor=0,
                     net_minor=-(gross - vat), kwh=Decimal(0), booked_at=at)
    s.add(rev)
    s.flush()
    s.add_all([AllocationLine(allocation_id=rev.id, party_id=p, role=r, amount_minor=-a) for p, r, a in back if a])
    _book(s, rev, [(p, -a) for p, _, a in back], 0, -(gross - vat), description="Refund reversed from the parties")
    return rev


# --------------------------------------------------------------------------- bulk allocation


def _compile_rule(rule: Mapping) -> tuple | None:
    """``rule`` in the shape ``_split_fast`` reads, or None when only ``split`` itself should handle it.

    ``(platform fee (party, bps, fixed) or None, fixed parts (party, role, amount or price numerator, None or price
    denominator), bps shares (party, bps), merchant of record, weights of the remainder [merchant, *bps])``.
    """
    shares = rule.get("shares", [])
    fixed = []
    for sh in shares:
        if "fixed_per_session" in sh:
            fixed.append((sh["party_id"], "fixed", int(sh["fixed_per_session"]), None))
        elif "per_kwh" in sh:
            price = Decimal(str(sh["per_kwh"]))
            if not price.is_finite() or price < 0:
                return None
            fixed.append((sh["party_id"], "per_kwh", *price.as_integer_ratio()))
    bps = [(sh["party_id"], sh["bps"]) for sh in shares if "bps" in sh]
    if sum(b for _, b in bps) > BPS or any(b < 0 for _, b in bps):
        return None
    fee = rule.get("platform_fee") or None
    fee = (fee["party_id"], fee.get("bps", 0), fee.get("fixed", 0)) if fee else None
    weights = (BPS - sum(b for _, b in bps), *(b for _, b in bps))  # they sum to 10 000, so every share is exact in Decimal too
    return fee, tuple(fixed), tuple(bps), rule["merchant_of_record"], weights


def _split_fast(compiled: tuple, gross: int, vat: int, fee: int, kwh: Decimal, exp: int) -> tuple[int, list[tuple[int, str, int]]]:
    """``split`` in integer arithmetic (the same parts, faster): for bulk allocation. Tested equal to ``split``."""
    net = gross - vat - fee
    if net < 0 or vat < 0 or fee < 0:
        raise RuleError("", "VAT and fee cannot exceed the payment")
    fee_rule, fixed_rule, bps, mor, weights = compiled
    parts: list[tuple[int, str, int]] = []
    left = net
    if fee_rule:
        pid, fbps, ffixed = fee_rule
        pf = min(left, (2 * net * fbps + BPS) // (2 * BPS) + ffixed)  # round half up of net × bps / 10 000, net ≥ 0
        if pf:
            parts.append((pid, "platform_fee", pf))
            left -= pf
    if fixed_rule:
        fixed = []
        kn = kd = 0
        for pid, role, amount, price_den in fixed_rule:
            if price_den is not None:  # price × kWh in minor units, rounded half up, in exact fractions: (pn/pd) × (kn/kd) × 10^exp
                if not kd:
                    kn, kd = kwh.as_integer_ratio()
                num, den = amount * kn * 10 ** exp, price_den * kd
                amount = (2 * num + den) // (2 * den)
            fixed.append((pid, role, amount))
        if sum(a for _, _, a in fixed) > left:
            got = largest_remainder(left, [a for _, _, a in fixed])
            fixed = [(p, r, g) for (p, r, _), g in zip(fixed, got, strict=True)]
        for p, r, a in fixed:
            if a:
                parts.append((p, r, a))
                left -= a
    # Largest remainder over the weights [10 000 − Σ bps, bps...].
    if len(weights) == 1:
        if left:
            parts.append((mor, "remainder", left))
        return net, parts
    floors = [left * w // BPS for w in weights]
    rest = left - sum(floors)
    if rest:
        for i in sorted(range(len(weights)), key=lambda i: (-(left * weights[i] % BPS), i))[:rest]:
            floors[i] += 1
    for (pid, _), amt in zip(bps, floors[1:], strict=True):
        if amt:
            parts.append((pid, "share", amt))
    if floors[0]:
        parts.append((mor, "remainder", floors[0]))
    return net, parts


def allocate_many(s: Session, payments: Sequence[Mapping]) -> list[int]:
    """``allocate`` for many payments at once (imports, backfills, ``bench/settlement.py``): set-based.

    Each payment is a mapping of ``allocate``'s keyword arguments (``key``,
    ``source``, ``site_id``, ``currency``, ``gross``, ``vat``, ``fee``, ``kwh``,
    ``merchant_of_record``, ``at``). Returns the allocation id of each, in
    order; a key booked before (or repeated in ``payments``) is booked once
    and answers its existing id. Every payment is checked before anything is
    written (one that cannot be split raises and writes nothing).

    The allocations and lines are exactly ``allocate``'s. The ledger gets one
    entry per call and currency instead of one per payment (module docstring,
    "Bulk allocation"): each account moved by the sum of what ``allocate``'s
    entries would have moved it, key ``allocations:<first allocation
    id>:<currency>``, reference ``allocations:<first id>-<last id>``.

    Rows are written with COPY on PostgreSQL — the allocations, split as they
    stream in, then their lines, summed per account meanwhile — so Python's
    work overlaps the database's; executemany elsewhere. Calls may run side
    by side (several workers): they take no lock but the payables they create
    (in one order). Unlike ``allocate`` it does not wait for a concurrent
    writer of the same key: that case ends in an IntegrityError (the caller's
    transaction rolls back and a retry finds them booked).
    """
    from sqlalchemy import func, insert

    from payments.ledger import LedgerAccount, _copy_lines, copy_text, post_many
    from payments.ledger import next_ids as ledger_next_ids
    from payments.money import exponent

    s.flush()
    pays = list(payments)
    keys = [p["key"] for p in pays]
    ids: dict[str, int] = {}
    uniq = list(dict.fromkeys(keys))
    pg = s.get_bind().dialect.name == "postgresql"
    if pg:  # one array parameter: a 50,000-item IN list costs PostgreSQL seconds to plan
        from sqlalchemy import String, any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        ids.update(s.execute(select(Allocation.idempotency_key, Allocation.id)
                             .where(Allocation.idempotency_key == any_(bindparam("keys", uniq, type_=ARRAY(String))))).all())
    else:
        for i in range(0, len(uniq), 5000):
            ids.update(s.execute(select(Allocation.idempotency_key, Allocation.id).where(Allocation.idempotency_key.in_(uniq[i:i + 5000]))).all())
    todo, seen = [], set(ids)
    for p in pays:
        if p["key"] not in seen:
            seen.add(p["key"])
            todo.append(p)
    if not todo:
        return [ids[k] for k in keys]

    # The rule in force per payment: every version of the sites involved, newest first per site.
    site_ids = sorted({p["site_id"] for p in todo})
    versions: dict[int, list[tuple[dt.datetime, int, str]]] = {}
    for i in range(0, len(site_ids), 5000):
        for row in s.execute(select(SplitRule.site_id, SplitRule.effective_from, SplitRule.id, SplitRule.rule_json)
                             .where(SplitRule.site_id.in_(site_ids[i:i + 5000])).order_by(SplitRule.effective_from.desc())):
            versions.setdefault(row[0], []).append((row[1], row[2], row[3]))
    rules: dict[tuple[int | None, int], tuple[dict, tuple | None]] = {}
    currencies: dict[str, tuple[str, int]] = {}

    # Every payment checked and its rule found first: a payment that cannot be split raises before anything is written.
    prepared = []
    for p in todo:
        cur, exp = currencies.get(p["currency"]) or currencies.setdefault(p["currency"], (check_currency(p["currency"]), exponent(p["currency"])))
        at = p["at"]
        if at.tzinfo is None:
            raise ValueError("naive datetime given as a payment's time")
        gross, vat, fee = p["gross"], p["vat"], p.get("fee", 0)
        if gross - vat - fee < 0 or vat < 0 or fee < 0:
            raise RuleError("", "VAT and fee cannot exceed the payment")
        site = p["site_id"]
        row = next((r for r in versions.get(site, ()) if r[0] <= at), None)
        mor = p["merchant_of_record"]
        rule_id = row[1] if row else None
        rk = (rule_id, mor if row is None else 0)
        if rk not in rules:
            rd = _rule_from_json(row[2]) if row else {"shares": [], "merchant_of_record": mor}
            rules[rk] = (rd, _compile_rule(rd))
        prepared.append((p, cur, exp, rule_id, rules[rk]))

    # Ids first (a sequence on PostgreSQL; after the largest id elsewhere, where the writer holds the database lock).
    def next_ids(table, n: int) -> list[int]:
        if pg:
            return ledger_next_ids(s, table.name, n)
        start = (s.scalar(select(func.max(table.c.id))) or 0) + 1
        return list(range(start, start + n))

    NULL = "\\N"  # noqa: N806 - COPY's NULL
    books: list[tuple[int, str, list[tuple[int, str, int]], int, int]] = []  # (allocation id, currency, parts, fee, revenue)
    alloc_ids = next_ids(Allocation.__table__, len(prepared))

    def split_all():
        """Split each payment; yields its allocation row (ALLOC_COLS): on PostgreSQL a line of COPY's text format, which
        feeds the COPY (the database stores the first allocations while the next are split); elsewhere a tuple.
        No statement may run in here: the connection is in the COPY."""
        for (p, cur, exp, rule_id, (rd, compiled)), i in zip(prepared, alloc_ids, strict=True):
            gross, vat, fee = p["gross"], p["vat"], p.get("fee", 0)
            kwh = p.get("kwh", Decimal(0))
            if compiled is not None and isinstance(kwh, Decimal) and kwh.is_finite() and kwh >= 0:
                net, parts = _split_fast(compiled, gross, vat, fee, kwh, exp)
            else:
                sp = split(rd, gross=gross, vat=vat, fee=fee, kwh=kwh, currency=cur)
                net, parts = sp.net, list(sp.parts)
            key = p["key"]
            ids[key] = i
            books.append((i, cur, parts, fee, gross - vat))
            if pg:
                yield (f"{i}\t{copy_text(key)}\t{copy_text(p['source'])}\t{p['site_id']}\t{NULL if rule_id is None else rule_id}\t{NULL}\t"
                       f"{cur}\t{gross}\t{vat}\t{fee}\t{net}\t{kwh}\t{p['at'].isoformat()}\n")
            else:
                yield (i, key, p["source"], p["site_id"], rule_id, None, cur, gross, vat, fee, net, kwh, p["at"])

    if pg:
        _copy_lines(s, Allocation.__tablename__, ALLOC_COLS, split_all())
    else:
        s.execute(insert(Allocation.__table__), [dict(zip(ALLOC_COLS, r, strict=True)) for r in split_all()])

    # Ledger accounts, each fetched or created once: the system accounts per currency and each party's payable.
    accounts: dict[tuple[AccountKind, str, str], int] = {}
    want_parties = {(cur, pid) for _i, cur, parts, _f, _r in books for pid, _, _ in parts}
    la = LedgerAccount.__table__

    def find_payables(cur: str, owners: list[str]) -> None:
        for i in range(0, len(owners), 5000):
            for owner, account_id in s.execute(select(la.c.owner, la.c.id).where(
                    la.c.kind == AccountKind.PARTY_PAYABLE.value, la.c.currency == cur, la.c.owner.in_(owners[i:i + 5000]))):
                accounts[(AccountKind.PARTY_PAYABLE, cur, owner)] = account_id

    for cur in {c for c, _ in want_parties}:
        owners = [f"party:{pid}" for c, pid in want_parties if c == cur]
        find_payables(cur, owners)
        missing = sorted(o for o in owners if (AccountKind.PARTY_PAYABLE, cur, o) not in accounts)  # one order for every writer: no deadlock
        if missing:  # the parties' first revenue: their payables created in one statement (one created concurrently is kept)
            from payments.ledger import _insert_for

            s.execute(_insert_for(s)(la).on_conflict_do_nothing(), [
                {"kind": AccountKind.PARTY_PAYABLE.value, "currency": cur, "owner": o, "balance_minor": 0, "guarded": False,
                 "overdraft_limit_minor": 0, "created_at": utcnow()} for o in missing])
            find_payables(cur, missing)
    for _i, cur, _p, fee, revenue in books:
        for kind, amount in ((AccountKind.REVENUE, revenue), (AccountKind.PROVIDER_FEES, fee)):
            if amount and (kind, cur, "") not in accounts:
                accounts[(kind, cur, "")] = get_account(s, kind, cur).id

    # The ledger: one entry per call and currency, each account's postings summed (module docstring, "Bulk allocation").
    totals: dict[str, dict[int, int]] = {}
    payables = {(cur, pid): accounts[(AccountKind.PARTY_PAYABLE, cur, f"party:{pid}")] for cur, pid in want_parties}

    def lines_all():
        """Each allocation's lines (LINE_COLS), summed per account meanwhile (while the database stores lines).
        No statement may run in here either: every account was found above."""
        for aid, cur, parts, fee, revenue in books:
            acc = totals.get(cur)
            if acc is None:
                acc = totals[cur] = defaultdict(int)
            if revenue:
                acc[accounts[(AccountKind.REVENUE, cur, "")]] += revenue
            if fee:
                acc[accounts[(AccountKind.PROVIDER_FEES, cur, "")]] -= fee
            for pid, role, amount in parts:
                yield f"{aid}\t{pid}\t{role}\t{amount}\n" if pg else (aid, pid, role, amount)
                acc[payables[(cur, pid)]] -= amount

    if pg:
        _copy_lines(s, AllocationLine.__tablename__, LINE_COLS, lines_all())
    else:
        line_rows = [dict(zip(LINE_COLS, r, strict=True)) for r in lines_all()]
        if line_rows:
            s.execute(insert(AllocationLine.__table__), line_rows)
    first, last = min(b[0] for b in books), max(b[0] for b in books)
    entries = [(f"allocations:{first}:{cur}", "Revenue allocated", f"allocations:{first}-{last}",
                [(a, amt, cur) for a, amt in sorted(acc.items()) if amt]) for cur, acc in sorted(totals.items())]
    entries = [e for e in entries if e[3]]
    if entries:
        post_many(s, entries, booked="fail" if pg else "skip")
    return [ids[k] for k in keys]


ALLOC_COLS = ("id", "idempotency_key", "source", "site_id", "rule_id", "reverses_id", "currency", "gross_minor", "vat_minor", "fee_minor",
              "net_minor", "kwh", "booked_at")
LINE_COLS = ("allocation_id", "party_id", "role", "amount_minor")


def _rule_from_json(text: str) -> dict:
    from payments.tariff_store import loads

    return loads(text)
