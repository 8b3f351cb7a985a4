"""Sharing public-area and line-loss pools: every method adds up exactly (hypothesis), to the cent and to the Wh."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payments.allocation import AllocationError, Basis, Method, allocate_shares, largest_remainder, weights

areas = st.decimals(min_value=0, max_value=10_000, places=2, allow_nan=False, allow_infinity=False)
ratios = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
bases = st.lists(
    st.builds(Basis, key=st.integers(), consumption_kwh=st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False), area_m2=areas, custom_share=ratios),
    min_size=1, max_size=30,
)
methods = st.sampled_from(list(Method))


@given(total=st.integers(0, 10**12), method=methods, tenants=bases)
def test_money_shares_add_up_exactly_and_stay_within_a_cent_of_the_exact_share(total, method, tenants):
    parts = allocate_shares(total, method, tenants)
    assert sum(parts) == total
    assert all(isinstance(p, int) and p >= 0 for p in parts)
    ws = [Fraction(w) for w in weights(method, tenants)]
    for part, w in zip(parts, ws, strict=True):
        exact = total * w / sum(ws)
        assert abs(part - exact) < 1


@given(units=st.integers(0, 10**12), decimals=st.sampled_from([0, 3, 6]), method=methods, tenants=bases)
def test_energy_shares_add_up_to_the_wh_or_finer(units, decimals, method, tenants):
    total = Decimal(units).scaleb(-decimals)
    parts = allocate_shares(total, method, tenants)
    assert sum(parts) == total
    step = min(-3, total.normalize().as_tuple().exponent) if total else -3
    assert all(p.as_tuple().exponent == step for p in parts)


@given(total=st.integers(0, 10**9), tenants=bases)
def test_equal_shares_differ_by_at_most_one_unit(total, tenants):
    parts = allocate_shares(total, Method.EQUAL, tenants)
    assert max(parts) - min(parts) <= 1


@given(total=st.integers(0, 10**9), tenants=bases)
def test_a_tenant_with_no_weight_pays_nothing_while_others_have_weight(total, tenants):
    tenants = [*tenants, Basis(key="idle")]
    parts = allocate_shares(total, Method.CONSUMPTION, tenants)
    if any(t.consumption_kwh for t in tenants):
        assert parts[-1] == 0


def test_remainder_goes_to_the_largest_fractions_then_the_earlier_tenant():
    assert largest_remainder(100, [1, 1, 1]) == [34, 33, 33]
    assert largest_remainder(10, [Decimal("0.5"), Decimal("0.3"), Decimal("0.2")]) == [5, 3, 2]
    assert largest_remainder(2, [Decimal(1), Decimal(2), Decimal(2)]) == [0, 1, 1]


def test_no_weight_at_all_is_shared_equally():
    ts = [Basis(key=i) for i in range(3)]
    assert allocate_shares(10, Method.CONSUMPTION, ts) == [4, 3, 3]
    assert allocate_shares(10, Method.AREA, ts) == [4, 3, 3]


def test_refusals():
    with pytest.raises(AllocationError) as e:
        allocate_shares(-5, Method.EQUAL, [Basis(key=1)])
    assert e.value.code == "negative_total"
    with pytest.raises(AllocationError) as e:
        allocate_shares(5, Method.CUSTOM, [Basis(key=1, custom_share=Decimal(1)), Basis(key=2)])
    assert e.value.code == "custom_share_missing"
    with pytest.raises(AllocationError) as e:
        allocate_shares(Decimal("1.0000000005"), Method.EQUAL, [Basis(key=1)])
    assert e.value.code == "too_precise"
    with pytest.raises(AllocationError):
        allocate_shares(Decimal("-1"), Method.EQUAL, [Basis(key=1)])
