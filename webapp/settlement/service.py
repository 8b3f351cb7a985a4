"""Allocating what a site earned among its parties, at capture and at refund (the rules: ``payments.settlement``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from payments import settlement
from payments.settlement import Allocation, Party, PartyKind
from webapp.models import Operator


def merchant_party(s: Session, op: Operator, currency: str) -> Party:
    """The operator's own party (the merchant of record of its sites), created on first use."""
    q = (select(Party).where(Party.operator_id == op.id, Party.kind == PartyKind.OPERATOR, Party.parent_party_id.is_(None))
         .order_by(Party.id).limit(1))
    party = s.scalar(q)
    if party is None:  # first capture of this operator: create it once (concurrent captures wait on the operator's row)
        s.execute(select(Operator.id).where(Operator.id == op.id).with_for_update())
        party = s.scalar(q.execution_options(populate_existing=True))
        if party is None:
            party = Party(operator_id=op.id, kind=PartyKind.OPERATOR, legal_name=op.legal_name, payout_currency=currency)
            s.add(party)
            s.flush()
    return party


def allocate_session(s: Session, cs, *, gross: int, vat: int, fee: int = 0, at: dt.datetime) -> Allocation:
    """A charging session's captured payment, divided by its site's rule in force when it was captured; once."""
    site = cs.connector.charger.site
    mor = merchant_party(s, site.operator, cs.currency)
    kwh = (Decimal(cs.energy_wh) / 1000).quantize(Decimal("0.001"))
    return settlement.allocate(s, key=f"session:{cs.id}", source=f"session:{cs.id}", site_id=site.id, currency=cs.currency,
                               gross=gross, vat=vat, fee=fee, kwh=kwh, merchant_of_record=mor.id, at=at)


def reverse_session(s: Session, cs, *, key: str, gross: int, vat: int, at: dt.datetime) -> Allocation | None:
    """A refund of a session: the parties give back their proportion of the net refunded; once per ``key``."""
    original = s.scalar(select(Allocation).where(Allocation.idempotency_key == f"session:{cs.id}"))
    if original is None:
        return None
    return settlement.reverse(s, original, key=f"{key}:reversal", gross=gross, vat=vat, at=at)
