"""Sharing a building's common costs among its tenants, exactly. No Flask here.

A post-paid bill carries two shared charges: the **public-area** consumption
(stairs, lifts, lighting: the public-area meters) and the **line loss** (what
the master meter measured minus what its sub-meters measured). Each is shared
among the tenants by weights (``weights``):

* ``consumption``: each tenant's metered energy in the period (kWh);
* ``area``: each tenant's leased area (m²);
* ``equal``: one part each;
* ``custom``: the operator's ratio per tenant (``Tenant.custom_share``);
  every tenant must have one (a missing ratio is refused, never guessed).

The line loss is always shared by consumption.

A tenant who held its lease for only part of the period (moved in or out)
weighs in proportion under ``area``, ``equal`` and ``custom``
(``Basis.presence``, the fraction of the period); under ``consumption`` its
metered energy already covers only its part.

**Exactness: the largest remainder method** (``largest_remainder``). Each
tenant first gets the floor of its exact share (computed with fractions, so
no rounding before the floor); the units left over (fewer than the number of
tenants) go one each to the largest fractional remainders, ties to the
earlier tenant in the order given (callers order tenants by id, so a rerun
gives the same answer). The parts therefore add up to the total exactly, and
each part differs from its exact share by less than one unit.

**Energy and money are each shared in their own unit** — the rule a bill
relies on: the shared energy is divided to the **Wh** (``total_kwh`` as a
``Decimal``; in steps of its own last decimal when it has more than 3, as a
month's part of an interval that crosses a month start has: see
``payments.metering.split_by_month``) and the shared cost to the **cent**
(minor units, ``int``), with the same weights. The cost is priced once for
the whole pool (the public-area meters priced by their own tariff as they
measured, time of use and monthly tiers included, rounded once to minor
units) and then divided, rather than pricing each tenant's kWh share: so
``Σ tenants' shares = the pool's cost`` to the cent and
``Σ tenants' kWh = the pool's kWh`` to the Wh, and no cent is created or
lost by rounding per tenant.

When every weight is zero (nobody consumed anything, no areas entered), the
pool is shared equally instead: a cost must land somewhere, and equal parts
are the only neutral choice. A negative total or weight is refused
(``AllocationError``): a negative line loss means a meter is wrong, and it
goes to a person (``review``), never into the bills.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

__all__ = ["AllocationError", "Basis", "Method", "allocate_shares", "largest_remainder", "weights"]

MAX_DECIMALS = 9  # kWh decimals: finer than metering's 0.000001 kWh steps, coarse enough to refuse nonsense


class AllocationError(ValueError):
    """A pool cannot be shared as asked; ``code`` is stable (negative_total, negative_weight, custom_share_missing, ...)."""

    def __init__(self, message: str, code: str, **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


class Method(enum.StrEnum):
    """How a pool is weighted among tenants (same values as ``webapp.meters.models.PublicAreaMethod``)."""

    CONSUMPTION = "consumption"
    AREA = "area"
    EQUAL = "equal"
    CUSTOM = "custom"


@dataclass(frozen=True)
class Basis:
    """What one tenant brings to the weighing: its key, metered energy (Wh), leased area, custom ratio."""

    key: object
    consumption_kwh: Decimal = Decimal(0)
    area_m2: Decimal = Decimal(0)
    custom_share: Decimal | None = None
    presence: Decimal = Decimal(1)  # the fraction of the period the tenant held its lease

    def weight(self, method: Method) -> Decimal:
        """This tenant's weight under ``method``."""
        if method is Method.CONSUMPTION:
            return Decimal(self.consumption_kwh)
        if method is Method.AREA:
            return Decimal(self.area_m2 or 0) * self.presence
        if method is Method.EQUAL:
            return self.presence
        if self.custom_share is None:
            raise AllocationError(f"tenant {self.key} has no custom share", "custom_share_missing", key=self.key)
        return Decimal(self.custom_share) * self.presence


def weights(method: Method | str, bases: Sequence[Basis]) -> list[Decimal]:
    """The weights of ``bases`` under ``method`` (all zero → equal, see the module docstring)."""
    method = Method(method)
    ws = [b.weight(method) for b in bases]
    for b, w in zip(bases, ws, strict=True):
        if not w.is_finite() or w < 0:
            raise AllocationError(f"tenant {b.key} has a negative weight", "negative_weight", key=b.key)
    if bases and sum(ws) == 0:
        return [Decimal(1)] * len(bases)
    return ws


def largest_remainder(total: int, ws: Sequence[Decimal | int]) -> list[int]:
    """Divide the non-negative integer ``total`` in proportion to ``ws`` (not all zero), exactly (module docstring)."""
    if total < 0:
        raise AllocationError("a negative amount cannot be shared", "negative_total")
    if not ws:
        if total:
            raise AllocationError("nobody to share the amount among", "no_tenants")
        return []
    fw = [Fraction(w) for w in ws]
    wsum = sum(fw)
    if wsum <= 0 or any(w < 0 for w in fw):
        raise AllocationError("the weights must be non-negative and not all zero", "invalid_weights")
    exact = [total * w / wsum for w in fw]
    parts = [e.numerator // e.denominator for e in exact]
    left = total - sum(parts)
    order = sorted(range(len(fw)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def allocate_shares(total: int | Decimal, method: Method | str, bases: Sequence[Basis]) -> list:
    """Share ``total`` among ``bases`` (same order) by ``method``: an ``int`` in minor units, or a ``Decimal`` kWh to the Wh.

    Returns ints for an int total; for a Decimal total, Decimal kWh with 3
    decimals (or the total's own number of decimals when it has more). The
    parts add up to ``total`` exactly.
    """
    ws = weights(method, bases)
    if isinstance(total, bool):
        raise AllocationError("not an amount", "invalid_total")
    if isinstance(total, int):
        return largest_remainder(total, ws)
    if not isinstance(total, Decimal) or not total.is_finite():
        raise AllocationError("not an amount", "invalid_total")
    exp = min(-3, total.normalize().as_tuple().exponent) if total else -3
    if exp < -MAX_DECIMALS:
        raise AllocationError(f"energy is shared in steps of at most {MAX_DECIMALS} decimals of kWh", "too_precise")
    quantum = Decimal(1).scaleb(exp)
    units = int(total.scaleb(-exp))
    return [Decimal(p).scaleb(exp).quantize(quantum) for p in largest_remainder(units, ws)]
