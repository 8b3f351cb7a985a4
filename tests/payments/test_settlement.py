"""Splitting a payment among a site's parties, exactly, and reversing refunds (``payments.settlement``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from payments import settlement
from payments.base import utcnow
from payments.ledger import AccountKind, LedgerAccount, balance, get_account, post
from payments.money import Money
from payments.settlement import AllocationLine, Party, PartyKind, RuleError, split, validate_rule

RULE = {"shares": [{"party_id": 2, "bps": 2000}, {"party_id": 3, "bps": 1000}, {"party_id": 4, "fixed_per_session": 50},
                   {"party_id": 5, "per_kwh": "0.02"}],
        "platform_fee": {"party_id": 9, "bps": 150, "fixed": 10}, "merchant_of_record": 1}


def test_a_payment_is_split_by_the_rule_and_the_merchant_of_record_takes_the_rest():
    sp = split(RULE, gross=1210, vat=210, fee=29, kwh=D("7.5"))
    # net 971; platform 1.5 % = 14.565 → 15, + 10 = 25; fixed 50; 7.5 kWh × 0.02 = 0.15 → 15; left 881:
    # 20 % = 176.2, 10 % = 88.1, the merchant of record 70 % = 616.7 → 617, 176, 88
    assert sp.net == 971
    assert list(sp.parts) == [(9, "platform_fee", 25), (4, "fixed", 50), (5, "per_kwh", 15), (2, "share", 176), (3, "share", 88),
                              (1, "remainder", 617)]


def test_fixed_parts_larger_than_the_payment_are_scaled_to_fit():
    sp = split({"shares": [{"party_id": 4, "fixed_per_session": 300}, {"party_id": 5, "fixed_per_session": 100}],
                "merchant_of_record": 1}, gross=200, vat=0, fee=0)
    assert sp.by_party() == {4: 150, 5: 50}


bps = st.integers(min_value=0, max_value=5000)
rules = st.builds(
    lambda a, b, fixed, per_kwh, fee_bps, fee_fixed: {
        "shares": [{"party_id": 2, "bps": a}, {"party_id": 3, "bps": b}, {"party_id": 4, "fixed_per_session": fixed},
                   {"party_id": 5, "per_kwh": str(per_kwh)}],
        "platform_fee": {"party_id": 9, "bps": fee_bps, "fixed": fee_fixed}, "merchant_of_record": 1},
    bps, bps, st.integers(min_value=0, max_value=10_000), st.decimals(min_value=0, max_value=1, places=4),
    st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=500))


@settings(max_examples=300, deadline=None)
@given(rule=rules, gross=st.integers(min_value=0, max_value=10**8), vat_pct=st.integers(min_value=0, max_value=27),
       fee=st.integers(min_value=0, max_value=500), kwh=st.decimals(min_value=0, max_value=500, places=3),
       refunds=st.lists(st.integers(min_value=1, max_value=10**8), max_size=4))
def test_any_rule_splits_exactly_and_refunds_never_reverse_more(rule, gross, vat_pct, fee, kwh, refunds):
    validate_rule(rule)
    vat = gross * vat_pct // (100 + vat_pct)
    fee = min(fee, gross - vat)
    sp = split(rule, gross=gross, vat=vat, fee=fee, kwh=kwh)
    assert all(a > 0 for _, _, a in sp.parts)
    assert sum(a for _, _, a in sp.parts) == sp.net and vat + fee + sp.net == gross
    original = list(sp.parts)
    done: list[list] = []
    left = sp.net
    for r in refunds:
        if r > left:
            with pytest.raises(RuleError):
                settlement.reverse_split(original, done, r)
            continue
        back = settlement.reverse_split(original, done, r)
        assert sum(a for _, _, a in back) == r and all(a >= 0 for _, _, a in back)
        done.append(back)
        left -= r
    done.append(settlement.reverse_split(original, done, left))
    for i, (_, _, a) in enumerate(original):  # everything reversed: each party gave back exactly what it got
        assert sum(rev[i][2] for rev in done) == a


@pytest.mark.parametrize("rule, field", [
    ({"shares": [{"party_id": 2, "bps": 6000}, {"party_id": 3, "bps": 5000}], "merchant_of_record": 1}, "shares"),
    ({"shares": [{"party_id": 2, "bps": -1}], "merchant_of_record": 1}, "shares[0].bps"),
    ({"shares": [{"party_id": 2, "bps": 100, "fixed_per_session": 5}], "merchant_of_record": 1}, "shares[0]"),
    ({"shares": [{"party_id": 2, "per_kwh": 0.1}], "merchant_of_record": 1}, "shares[0].per_kwh"),
    ({"shares": [{"party_id": 2, "bps": 100}, {"party_id": 2, "bps": 200}], "merchant_of_record": 1}, "shares[1].party_id"),
    ({"shares": [], "merchant_of_record": 77}, "merchant_of_record"),
    ({"shares": [], "merchant_of_record": 1, "platform_fee": {"bps": 100}}, "platform_fee"),
    ({"shares": [], "merchant_of_record": 1, "colour": "red"}, "colour"),
])
def test_bad_rules_are_refused_with_the_field(rule, field):
    with pytest.raises(RuleError) as e:
        validate_rule(rule, party_ids={1, 2, 3})
    assert e.value.field == field and e.value.reason


# --------------------------------------------------------------------------- booked in the ledger


def parties(s) -> dict[str, Party]:
    out = {}
    for name, kind in (("op", PartyKind.OPERATOR), ("host", PartyKind.SITE_HOST), ("owner", PartyKind.EQUIPMENT_OWNER),
                       ("platform", PartyKind.PLATFORM)):
        out[name] = Party(kind=kind, legal_name=name, payout_currency="EUR")
        s.add(out[name])
    s.flush()
    return out


def owed(s, party: Party) -> int:
    return balance(s, get_account(s, AccountKind.PARTY_PAYABLE, "EUR", party.owner)).amount


def capture(s, key: str, gross: int, vat: int) -> None:
    """What a capture books before allocation: clearing → revenue (net of VAT) + VAT payable."""
    post(s, idempotency_key=key, description="capture", postings=[
        (get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"), Money(gross, "EUR")),
        (get_account(s, AccountKind.REVENUE, "EUR"), Money(-(gross - vat), "EUR")),
        (get_account(s, AccountKind.VAT_PAYABLE, "EUR"), Money(-vat, "EUR"))])


def test_allocation_follows_the_rule_in_force_and_refunds_reverse_it(Session):
    with Session.begin() as s:
        p = parties(s)
        rule = {"shares": [{"party_id": p["host"].id, "bps": 2500}, {"party_id": p["owner"].id, "fixed_per_session": 30}],
                "platform_fee": {"party_id": p["platform"].id, "bps": 100}, "merchant_of_record": p["op"].id}
        settlement.add_rule(s, 1, rule, effective_from=utcnow(), created_by="test")
        with pytest.raises(RuleError):
            settlement.add_rule(s, 1, rule, effective_from=utcnow() - dt.timedelta(days=1), created_by="test")
        capture(s, "cap:1", 1210, 210)
        alloc = settlement.allocate(s, key="session:1", source="session:1", site_id=1, currency="EUR", gross=1210, vat=210,
                                    merchant_of_record=p["op"].id, at=utcnow())
        assert settlement.allocate(s, key="session:1", source="session:1", site_id=1, currency="EUR", gross=1210, vat=210,
                                   merchant_of_record=p["op"].id, at=utcnow()).id == alloc.id  # once
        # net 1000: platform 10; fixed 30; 25 % of 960 = 240 to the host; 720 to the operator
        assert (owed(s, p["platform"]), owed(s, p["owner"]), owed(s, p["host"]), owed(s, p["op"])) == (10, 30, 240, 720)
        assert balance(s, get_account(s, AccountKind.REVENUE, "EUR")).amount == 0
        settlement.reverse(s, alloc, key="refund:1", gross=605, vat=105, at=utcnow())  # half the payment back
        assert (owed(s, p["platform"]), owed(s, p["owner"]), owed(s, p["host"]), owed(s, p["op"])) == (5, 15, 120, 360)
        settlement.reverse(s, alloc, key="refund:2", gross=605, vat=105, at=utcnow())
        assert (owed(s, p["platform"]), owed(s, p["owner"]), owed(s, p["host"]), owed(s, p["op"])) == (0, 0, 0, 0)
        with pytest.raises(RuleError):
            settlement.reverse(s, alloc, key="refund:3", gross=1, vat=0, at=utcnow())
        lines = s.scalars(select(AllocationLine)).all()
        assert sum(ln.amount_minor for ln in lines) == 0


def test_without_a_rule_everything_goes_to_the_merchant_of_record(Session):
    with Session.begin() as s:
        p = parties(s)
        capture(s, "cap:2", 500, 0)
        settlement.allocate(s, key="bill:1", source="bill:1", site_id=2, currency="EUR", gross=500, vat=0,
                            merchant_of_record=p["op"].id, at=utcnow())
        assert owed(s, p["op"]) == 500
        assert s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.REVENUE)).balance_minor in (0, None)
