"""Closing a tenant's account: final readings, final bill, the prepaid balance back to the cards (or by bank transfer), a statement.

``close_tenant(s, provider, tenant, final_readings, now)`` — the steps, each
idempotent so that calling it again (after a provider outage, a crash)
finishes the job and never does a step twice:

1. The tenant is locked and marked ``closing``; ``closed_at`` is fixed at
   the first call and is the instant of the final readings on every retry.
2. The final readings are ingested (``webapp.meters.readings.ingest``,
   source ``final``) at ``closed_at``; a rejected reading stops the closing
   (nothing is written), a duplicate (a retry) is fine.
3. Post-paid: the final bill of the month is computed
   (``bills.generate_bills(..., tenant=)``): energy and demand up to the
   final reading, fees prorated to ``closed_at``. Its public-area and
   line-loss shares can only be known once the building's shared meters are
   read at the end of the month (a share of the month "so far" would need
   every meter read at the instant of closing, which collectors do not do),
   so it stays a ``draft`` and the monthly job issues it with the
   building's other bills; its weight is prorated (area, equal and custom
   by the part of the month it held the lease; consumption is its own).
   The meters it had are kept on the draft, so a meter given to the next
   tenant meanwhile still bills the leaver's part to the leaver.
   Prepaid: the consumption invoice of the intervals that ended in the
   month so far (the last one ends at the final reading).
4. Prepaid: each meter's remaining balance goes back to the cards it came
   from, newest top-up first (``webapp.meters.topup.refund_meter_balance``),
   but only to card payments younger than ``CARD_REFUND_MAX_AGE`` (card
   networks refuse refunds of old payments, and the card may be gone).
   Whatever no card takes back (wallet-paid credit, old payments, refunds the
   provider refused) is recorded for a **bank transfer**: meter wallet →
   refunds payable owned by ``tenant:<id>`` (a liability: we owe it), shown
   to the operator on ``/operator/tenant-refunds``. A negative balance (used
   emergency credit) is a debt the statement shows; nothing is refunded.
   ``refund_meter_balance`` commits its reservations before asking the
   provider, so this function commits too; a provider outage leaves the
   tenant ``closing`` (the reserved refund pending) and raises
   ``ClosingError("provider_unavailable")``: call again later.
5. The tenant is ``closed`` and each prepaid meter's relay is told
   (``webapp.meters.relay.balance_changed``: a closed account's empty meter
   is switched off).

The **closing statement** is a page (``/tenancies/<id>/statement``), not a
document: it is not a tax document (the final bill and the prepaid invoice
are), it gathers them. ``statement_of`` reads it from rows that never change
after closing (the final readings, the final bill, the refunds and the bank
transfer entry), so it always says the same.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from sqlalchemy import String, select
from sqlalchemy.orm import Session

from payments.cards import CardPayment, CardRefund, Purpose, State
from payments.invoicing import Document
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, balance, get_account, transfer
from payments.money import Money
from payments.providers.base import PaymentProvider, ProviderError
from webapp.meters import bills
from webapp.meters.models import Bill, Billing, MeterReading, Tenant, TenantState
from webapp.models import Meter, Site

CARD_REFUND_MAX_AGE = dt.timedelta(days=180)  # older card payments are refunded by bank transfer instead


class ClosingError(Exception):
    """The account cannot be closed as asked (yet); ``code`` is stable, ``details`` say why."""

    def __init__(self, message: str, code: str, details: list | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or []


def bank_owner(tenant: Tenant) -> str:
    """The owner of the refunds-payable account holding what a closed tenant is owed by bank transfer."""
    return f"tenant:{tenant.id}"


def _key(tenant: Tenant, meter: Meter) -> str:
    return f"tenant:{tenant.id}:close:meter:{meter.id}"


def _prepaid_meters(tenant: Tenant) -> list[Meter]:
    return bills.meters_of(tenant) if tenant.billing is Billing.PREPAID else []


def _card_refundable(s: Session, meter: Meter, now: dt.datetime) -> int:
    """What recent card top-ups of ``meter`` can still take back (refunds go newest first, so only these are used)."""
    from webapp.meters.topup import meter_ref

    rows = s.scalars(select(CardPayment).where(
        CardPayment.purpose == Purpose.METER_TOP_UP, CardPayment.reference == meter_ref(meter), CardPayment.state == State.SUCCEEDED,
        CardPayment.created_at > now - CARD_REFUND_MAX_AGE,
    )).all()
    return sum(max(r.captured_minor - r.refunded_minor, 0) for r in rows)


def close_tenant(s: Session, provider: PaymentProvider | None, tenant: Tenant, final_readings: Sequence[Mapping],
                 now: dt.datetime) -> dict:
    """Close ``tenant``'s account (module docstring); returns the statement. Commits."""
    from webapp.meters import readings, relay
    from webapp.meters.topup import meter_balance, meter_wallet, refund_meter_balance

    tenant = s.scalar(select(Tenant).where(Tenant.id == tenant.id).with_for_update().execution_options(populate_existing=True))
    if tenant.state is TenantState.CLOSED:
        return statement_of(s, tenant)
    site = s.get(Site, tenant.site_id)
    if tenant.closed_at is None:
        tenant.closed_at = now
    tenant.state = TenantState.CLOSING
    at = tenant.closed_at
    own = {m.meter_code for m in bills.meters_of(tenant, kind=None)}
    rows = []
    for r in final_readings:
        if r.get("meter_code") not in own:
            raise ClosingError("a final reading names a meter of another tenant", "not_tenant_meter", [r.get("meter_code")])
        rows.append({"meter_code": r["meter_code"], "at": at.isoformat(), "register_kwh": r["register_kwh"],
                     **({"demand_kw": r["demand_kw"]} if r.get("demand_kw") is not None else {})})
    if rows:
        report = readings.ingest(s, operator_id=site.operator_id, rows=rows, source="final", now=max(now, at))
        rejected = [r.as_json() for r in report.results if r.status == "rejected"]
        if rejected:
            s.rollback()
            raise ClosingError("a final reading was rejected", "reading_rejected", rejected)
    period = bills.period_of(at, site.time_zone or "UTC")
    if tenant.billing is Billing.POSTPAID:
        bills.generate_bills(s, site, period, now, tenant=tenant)
    else:
        start, _end = bills.period_bounds(period, site.time_zone or "UTC")
        bills.prepaid_invoice(s, tenant, site, period, start, at, now)
    s.commit()  # the closing's facts stand before any money moves

    meters = _prepaid_meters(tenant)
    for meter in meters:
        left = meter_balance(s, meter)
        card_part = min(left.amount, _card_refundable(s, meter, now))
        already = s.scalar(select(CardRefund.id).where(CardRefund.idempotency_key.like(f"{_key(tenant, meter)}:%")).limit(1))
        if (card_part > 0 or already is not None) and provider is not None:
            # On a retry the reservations exist (found by the key's prefix): the amount is not looked at, the pending ones are sent.
            amount = Money(card_part if already is None else max(card_part, 1), left.currency)
            try:
                refund_meter_balance(s, provider, meter, amount, reason="account_closed", key=_key(tenant, meter))
            except ProviderError as e:
                s.commit()
                raise ClosingError("the card processor did not answer; the refund is reserved and will be sent on retry",
                                   "provider_unavailable") from e
            s.commit()
        rest = meter_balance(s, meter)
        if rest.amount > 0:
            transfer(s, idempotency_key=f"{_key(tenant, meter)}:bank", description="Meter balance owed by bank transfer",
                     reference=f"tenant:{tenant.id}", debit=meter_wallet(s, meter),
                     credit=get_account(s, AccountKind.REFUNDS_PAYABLE, rest.currency, bank_owner(tenant)), amount=rest)
    tenant = s.scalar(select(Tenant).where(Tenant.id == tenant.id).with_for_update().execution_options(populate_existing=True))
    tenant.state = TenantState.CLOSED
    s.flush()
    for meter in meters:
        relay.balance_changed(s, meter, now)
    s.commit()
    return statement_of(s, tenant)


def statement_of(s: Session, tenant: Tenant) -> dict:
    """What the closing statement shows, from rows that no longer change."""
    from webapp.meters.topup import meter_balance

    site = s.get(Site, tenant.site_id)
    meters = []
    for m in bills.meters_of(tenant, kind=None):
        final = s.scalar(select(MeterReading).where(MeterReading.meter_id == m.id, MeterReading.source == "final")
                         .order_by(MeterReading.at.desc()).limit(1))
        refunds = list(s.scalars(select(CardRefund).where(CardRefund.idempotency_key.like(f"{_key(tenant, m)}:%")).order_by(CardRefund.id)))
        bank = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == f"{_key(tenant, m)}:bank"))
        bank_minor = sum(p.amount_minor for p in bank.postings if p.amount_minor > 0) if bank is not None else 0
        meters.append({
            "meter": m, "final_reading": final,
            "card_refunds": [{"amount_minor": r.amount_minor, "status": r.status, "last4": r.payment.card_last4,
                              "brand": r.payment.card_brand} for r in refunds],
            "refunded_minor": sum(r.amount_minor for r in refunds if r.status != "failed"),
            "bank_transfer_minor": bank_minor,
            "balance_minor": meter_balance(s, m).amount if tenant.billing is Billing.PREPAID else None,
        })
    period = bills.period_of(tenant.closed_at, site.time_zone or "UTC") if tenant.closed_at else None
    final_bill = s.scalar(select(Bill).where(Bill.tenant_id == tenant.id, Bill.period == period)) if period else None
    prepaid_doc = s.scalar(select(Document).where(Document.idempotency_key == f"tenant:{tenant.id}:prepaid:{period}")) if period else None
    unpaid = list(s.scalars(select(Bill).where(Bill.tenant_id == tenant.id, Bill.state == bills.BillState.ISSUED).order_by(Bill.period)))
    return {
        "tenant": tenant, "state": tenant.state.value, "closed_at": tenant.closed_at, "period": period, "meters": meters,
        "final_bill": final_bill, "final_invoice": s.get(Document, final_bill.document_id) if final_bill and final_bill.document_id else prepaid_doc,
        "unpaid_bills": unpaid, "unpaid_minor": sum(b.total_minor for b in unpaid),
        "refunded_minor": sum(m["refunded_minor"] for m in meters),
        "bank_transfer_minor": sum(m["bank_transfer_minor"] for m in meters),
        "debt_minor": sum(-m["balance_minor"] for m in meters if m["balance_minor"] is not None and m["balance_minor"] < 0),
    }


def bank_transfers_owed(s: Session, *, operator_ids: set[int] | None) -> list[tuple[LedgerAccount, Tenant, Site]]:
    """Closed tenants owed money by bank transfer (a refunds-payable account ``tenant:<id>`` with a balance)."""
    rows = s.execute(select(LedgerAccount, Tenant, Site)
                     .join(Tenant, LedgerAccount.owner == ("tenant:" + Tenant.id.cast(String)))
                     .join(Site, Site.id == Tenant.site_id)
                     .where(LedgerAccount.kind == AccountKind.REFUNDS_PAYABLE, LedgerAccount.owner.like("tenant:%"))
                     .order_by(Tenant.closed_at.desc())).all()
    out = []
    for acct, tenant, site in rows:
        if operator_ids is not None and site.operator_id not in operator_ids:
            continue
        if balance(s, acct).amount:
            out.append((acct, tenant, site))
    return out


def owed(s: Session, acct: LedgerAccount) -> Money:
    """What the refunds-payable account still owes."""
    return balance(s, acct)


__all__ = ["CARD_REFUND_MAX_AGE", "ClosingError", "bank_owner", "bank_transfers_owed", "close_tenant", "owed", "statement_of"]
