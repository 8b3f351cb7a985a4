"""Meter top-ups: by card (new or saved, 3-D Secure as for the wallet), from the customer wallet, and refunds of what is unspent.

Anyone may top up a meter by its code (paying a relative's or a colleague's
prepaid meter); only the tenant's account sees the balance. The money lands
in the meter's wallet (``AccountKind.METER_WALLET``, owner ``meter:<id>``).

Ledger entries (debit first):

* card top-up captured:    provider clearing  →  meter wallet   (``card_payment:<id>:credit``)
* wallet-paid top-up:      customer wallet    →  meter wallet   (guarded: the customer wallet never goes negative)
* refund prepared:         meter wallet       →  refunds payable (guarded: only what is unspent)
* refund sent:             refunds payable    →  provider clearing
* refund refused:          refunds payable    →  meter wallet

Who owns what: the card payment's ``owner`` is the payer (``user:<id>``
when signed in, ``guest:meter:<meter id>`` for a guest), its ``reference``
the meter (``meter:<id>``). The receipt belongs to the payer too: a
stranger's card and email are not shown to the tenant. The tenant sees
every top-up of the meter in its history (amount and date) and the receipts
of the top-ups it paid itself.

Receipt: a RECEIPT of the building's operator in a series of its own
(prefix ``<operator prefix>-R``: its invoices already count from 1 under the
plain prefix, and a number names one document), no
VAT at top-up: the credit is a prepayment, and VAT is charged on the
electricity as it is used (consumption is invoiced monthly). It is issued
in the capture's transaction, right after the meter wallet is credited, and
then the relay is told the balance changed (a top-up that brings the
balance above zero reconnects a cut meter), all in one transaction.

Every step is idempotent by a key derived from its cause: the result page,
"check again", the webhook and the reconciliation job may all report the
same success, and the meter is credited once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from payments import cards, wallet
from payments.cards import CardPayment, CardRefund, Purpose, State
from payments.invoicing import Document, DocumentKind, Line, VatGroup
from payments import invoicing
from payments.ledger import AccountKind, InsufficientFunds, LedgerAccount, get_account, transfer
from payments.money import Money
from payments.providers.base import PaymentProvider, ProviderError
from webapp.db import utcnow
from webapp.meters.models import Billing, Tenant, TenantState
from webapp.models import Meter, MeterKind, User

GUEST_OWNER = "guest:meter:{id}"  # a guest payer: the meter's own guest owner (see module docstring)
DESCRIPTION_CARD = "Meter top-up"
DESCRIPTION_WALLET = "Meter top-up from wallet"


def meter_ref(meter: Meter) -> str:
    """The reference of a meter's payments and ledger entries."""
    return f"meter:{meter.id}"


def guest_owner(meter: Meter) -> str:
    """Who owns a guest's top-up of ``meter``."""
    return GUEST_OWNER.format(id=meter.id)


# -- the meter wallet and the relay (webapp/meters/readings.py and relay.py) -----------------------


def meter_wallet(s: Session, meter: Meter) -> LedgerAccount:
    """The meter's wallet account, created on first use with the tenant's emergency credit as its overdraft limit."""
    try:
        from webapp.meters.readings import meter_wallet as readings_wallet
    except ImportError:  # readings.py not installed: the relay module keeps the same account
        from webapp.meters import relay

        return relay.meter_wallet(s, meter, meter_currency(meter))
    return readings_wallet(s, meter)


def meter_balance(s: Session, meter: Meter) -> Money:
    """What the meter has left (negative while it runs on emergency credit; zero before its first top-up)."""
    try:
        from webapp.meters.readings import meter_balance as readings_balance
    except ImportError:
        from webapp.meters import relay

        return relay.meter_balance(s, meter, meter_currency(meter))
    return readings_balance(s, meter)


def _balance_changed(s: Session, meter: Meter, now: dt.datetime) -> None:
    from webapp.meters import relay

    relay.balance_changed(s, meter, now)


def meter_currency(meter: Meter) -> str:
    """The currency a meter is topped up in: its tenant's, else its building's."""
    tenant = meter.tenant
    return tenant.currency if tenant is not None else meter.site.currency


# -- rules -------------------------------------------------------------------------------------


class MeterTopUpError(Exception):
    """A top-up that cannot be made; ``code`` is stable (messages are chosen by the views and the API)."""

    def __init__(self, message: str, code: str, **params):
        super().__init__(message)
        self.code = code
        self.params = params


def refusal(meter: Meter) -> str | None:
    """Why ``meter`` cannot be topped up (a stable code), or None when it can."""
    if meter.kind != MeterKind.TENANT:
        return "not_a_tenant_meter"
    tenant: Tenant | None = meter.tenant
    if tenant is None or tenant.state != TenantState.ACTIVE:
        return "no_tenant"
    if not meter.prepaid or tenant.billing != Billing.PREPAID:
        return "postpaid"
    return None


def check_amount(meter: Meter, amount: Money) -> None:
    """Refuse a meter that takes no top-ups, and an amount in the wrong currency or outside the wallet's limits."""
    code = refusal(meter)
    if code is not None:
        raise MeterTopUpError(f"meter {meter.meter_code} cannot be topped up", code)
    try:
        wallet.check_top_up_amount(amount, meter_currency(meter))
    except wallet.TopUpError as e:
        raise MeterTopUpError(str(e), e.code, **e.params) from None


def is_tenant(meter: Meter, user: User | None) -> bool:
    """Whether ``user`` is the signed-in account of the meter's tenant (who may see balance, readings and history)."""
    tenant = meter.tenant
    return user is not None and tenant is not None and tenant.user_id is not None and tenant.user_id == user.id


# -- card top-ups ------------------------------------------------------------------------------


def start_meter_top_up(
    s: Session, *, meter: Meter, owner: str, email: str | None, amount: Money, payment_method_id: str, customer_id: str,
) -> CardPayment:
    """Write the top-up record (the caller commits, then calls ``cards.submit``, as for the wallet)."""
    check_amount(meter, amount)
    return cards.create(
        s, purpose=Purpose.METER_TOP_UP, reference=meter_ref(meter), owner=owner, email=email, amount=amount,
        manual_capture=False, payment_method_id=payment_method_id, customer_id=customer_id,
    )


def meter_of(s: Session, row: CardPayment) -> Meter:
    """The meter a top-up pays for."""
    kind, _sep, ref = row.reference.partition(":")
    meter = s.get(Meter, int(ref)) if kind == "meter" and ref.isdigit() else None
    if meter is None:
        raise cards.PaymentError(f"top-up {row.id} names no meter ({row.reference!r})", "no_meter")
    return meter


@cards.on_succeeded(Purpose.METER_TOP_UP)
def _credit_meter_top_up(s: Session, row: CardPayment) -> None:
    """Credit the meter once, issue the receipt, and tell the relay, in the capture's transaction."""
    meter = meter_of(s, row)
    clearing = get_account(s, AccountKind.PROVIDER_CLEARING, row.currency)
    transfer(
        s, idempotency_key=row.key("credit"), description=DESCRIPTION_CARD, reference=f"card_payment:{row.id}",
        debit=clearing, credit=meter_wallet(s, meter), amount=row.captured,
    )
    now = utcnow()
    meter_top_up_document(s, row, meter, now)
    _balance_changed(s, meter, now)


# -- wallet-paid top-ups -------------------------------------------------------------------------


@dataclass(frozen=True)
class WalletTopUp:
    """A top-up paid from the customer wallet: its journal entry and its receipt."""

    entry_id: int
    amount: Money
    document: Document


def top_up_from_wallet(s: Session, *, meter: Meter, user: User, amount: Money, key: str) -> WalletTopUp:
    """Move ``amount`` from the person's wallet to the meter, in the caller's transaction, once per ``key``.

    The customer wallet is guarded: the debit and the balance check are one
    statement under the row lock, so it can never go below zero (raises
    ``MeterTopUpError("wallet_insufficient")``, nothing booked). The same
    ``key`` books nothing the second time and returns the first top-up.
    """
    check_amount(meter, amount)
    if user.currency != amount.currency:
        raise MeterTopUpError(f"the wallet is in {user.currency}", "wallet_currency", currency=user.currency)
    ledger_key = f"meter_top_up:{key}"[:200]
    try:
        entry_id = transfer(
            s, idempotency_key=ledger_key, description=DESCRIPTION_WALLET, reference=meter_ref(meter),
            debit=wallet.wallet(s, user.owner, amount.currency), credit=meter_wallet(s, meter), amount=amount,
        )
    except InsufficientFunds:
        raise MeterTopUpError("the wallet does not hold this amount", "wallet_insufficient",
                              balance=wallet.wallet_balance(s, user.owner, amount.currency)) from None
    now = utcnow()
    doc = _wallet_top_up_document(s, meter=meter, user=user, amount=amount, entry_id=entry_id, now=now)
    _balance_changed(s, meter, now)
    s.flush()
    return WalletTopUp(entry_id=entry_id, amount=amount, document=doc)


# -- receipts ------------------------------------------------------------------------------------


def _meter_block(meter: Meter) -> dict:
    site = meter.site
    return {"code": meter.meter_code, "serial": meter.serial, "site": site.name, "site_address": site.address,
            "unit": meter.tenant.unit if meter.tenant is not None else ""}


def _issue_receipt(s: Session, *, meter: Meter, key: str, source: str, owner: str, user_id: int | None, email: str | None,
                   amount: Money, payment: dict, now: dt.datetime) -> Document:
    from webapp.receipts.service import branding_of, buyer_of, seller_of

    site = meter.site
    op = site.operator
    tz = site.time_zone or "UTC"
    user = s.get(User, user_id) if user_id else None
    content = {
        "seller": seller_of(op),
        "buyer": buyer_of(s, user_id=user_id, email=email),
        "lines": [Line("meter_credit", Decimal(1), None, None, None, amount.amount).as_json()],
        "payment": payment,
        "notes": ["vat_on_consumption"],
        "meter": _meter_block(meter),
        "branding": branding_of(op),
        "time_zone": tz,
    }
    return invoicing.issue(
        s, key=key, kind=DocumentKind.RECEIPT, scope=f"operator:{op.id}", prefix=f"{op.prefix}-R", issued_at=now,
        year=now.astimezone(ZoneInfo(tz)).year, currency=amount.currency, owner=owner, user_id=user_id, email=email,
        locale=user.locale if user else None, source=source, vat=[VatGroup(None, amount.amount, 0)], content=content,
    )


def meter_top_up_document(s: Session, row: CardPayment, meter: Meter, now: dt.datetime) -> Document:
    """The receipt of a card top-up of a meter: prepaid electricity credit, VAT charged on consumption (idempotent)."""
    user_id = int(row.owner.split(":", 1)[1]) if row.owner.startswith("user:") else None
    payment = {"method": "card", "brand": row.card_brand, "last4": row.card_last4, "held": row.captured_minor,
               "captured": row.captured_minor, "released": 0, "currency": row.currency}
    return _issue_receipt(s, meter=meter, key=f"card_payment:{row.id}:receipt", source=f"card_payment:{row.id}", owner=row.owner,
                          user_id=user_id, email=row.email, amount=row.captured, payment=payment, now=now)


def _wallet_top_up_document(s: Session, *, meter: Meter, user: User, amount: Money, entry_id: int, now: dt.datetime) -> Document:
    payment = {"method": "wallet", "brand": None, "last4": None, "held": amount.amount, "captured": amount.amount, "released": 0,
               "currency": amount.currency}
    return _issue_receipt(s, meter=meter, key=f"journal_entry:{entry_id}:receipt", source=f"journal_entry:{entry_id}",
                          owner=user.owner, user_id=user.id, email=user.email, amount=amount, payment=payment, now=now)


def receipt_of(s: Session, source: str) -> Document | None:
    """The receipt issued for a top-up's ``source`` (``card_payment:<id>`` or ``journal_entry:<id>``)."""
    return s.scalar(select(Document).where(Document.source == source, Document.kind == DocumentKind.RECEIPT)
                    .order_by(Document.id.desc()).limit(1))


# -- refunds of the unspent balance ----------------------------------------------------------------


def _refunds_payable(s: Session, currency: str) -> LedgerAccount:
    return get_account(s, AccountKind.REFUNDS_PAYABLE, currency)


@cards.on_refund_prepared(Purpose.METER_TOP_UP)
def _reserve_meter_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    # Guarded: a meter that consumed the money meanwhile refuses (InsufficientFunds) and nothing is reserved.
    meter = meter_of(s, row)
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:reserve", description="Meter top-up refund", reference=f"card_payment:{row.id}",
        debit=meter_wallet(s, meter), credit=_refunds_payable(s, row.currency), amount=Money(rf.amount_minor, row.currency),
    )


@cards.on_refunded(Purpose.METER_TOP_UP)
def _book_meter_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:book", description="Meter top-up refunded", reference=f"card_payment:{row.id}",
        debit=_refunds_payable(s, row.currency), credit=get_account(s, AccountKind.PROVIDER_CLEARING, row.currency),
        amount=Money(rf.amount_minor, row.currency),
    )
    from webapp.receipts.service import credit_note

    original = receipt_of(s, f"card_payment:{row.id}")
    if original is not None:
        credit_note(s, original, Money(rf.amount_minor, row.currency), key=f"card_refund:{rf.id}:credit", reason=rf.reason or "refund",
                    now=utcnow(), refund=rf)


@cards.on_refund_failed(Purpose.METER_TOP_UP)
def _return_meter_refund(s: Session, row: CardPayment, rf: CardRefund) -> None:
    meter = meter_of(s, row)
    transfer(
        s, idempotency_key=f"card_refund:{rf.id}:return", description="Meter top-up refund failed", reference=f"card_payment:{row.id}",
        debit=_refunds_payable(s, row.currency), credit=meter_wallet(s, meter), amount=Money(rf.amount_minor, row.currency),
    )
    _balance_changed(s, meter, utcnow())


@dataclass
class MeterRefund:
    """What ``refund_meter_balance`` did: the card refunds, and what could not go back to a card."""

    refunds: list[CardRefund] = field(default_factory=list)
    not_refunded: Money | None = None  # left in the meter wallet: wallet-paid credit, or cards already refunded
    failed: list[CardRefund] = field(default_factory=list)  # refused by the provider: their money is back in the meter wallet


def prepare_meter_refund(s: Session, meter: Meter, amount: Money, *, reason: str, key: str) -> tuple[list[CardRefund], Money]:
    """Reserve refunds of ``amount`` of the meter's balance to the cards it came from, newest top-up first.

    Each part leaves the meter wallet at once (guarded, like
    ``payments.wallet.prepare_top_up_refund``), on a locked payment row, with
    the idempotency key ``<key>:<payment id>`` (the same ``key`` again
    reserves nothing new). Returns the refunds and what no card can take
    back (the caller records it for a bank transfer). Raises
    ``MeterTopUpError("exceeds_balance")`` when the meter holds less.
    """
    if amount.amount <= 0:
        raise MeterTopUpError("the refund must be positive", "refund_invalid")
    existing = list(s.scalars(select(CardRefund).where(CardRefund.idempotency_key.like(f"{key}:%")).order_by(CardRefund.id)))
    if existing:  # a replay: the reservation was made (and committed) before
        done = sum(r.amount_minor for r in existing)
        return existing, Money(amount.amount - done, amount.currency)
    balance = meter_balance(s, meter)
    if amount.currency != balance.currency or amount > balance:
        raise MeterTopUpError(f"the meter holds {balance}", "exceeds_balance", balance=balance)
    payments = s.scalars(
        select(CardPayment)
        .where(CardPayment.purpose == Purpose.METER_TOP_UP, CardPayment.reference == meter_ref(meter), CardPayment.state == State.SUCCEEDED)
        .order_by(CardPayment.id.desc())
    ).all()
    left = amount.amount
    refunds = []
    for p in payments:
        if left == 0:
            break
        row = cards.lock(s, p.id)
        part = min(left, row.refundable.amount)
        if part <= 0:
            continue
        refunds.append(cards.prepare_refund(s, row, Money(part, row.currency), reason=reason, idempotency_key=f"{key}:{row.id}"))
        left -= part
    s.flush()
    return refunds, Money(left, amount.currency)


def refund_meter_balance(s: Session, provider: PaymentProvider, meter: Meter, amount: Money, reason: str, key: str) -> MeterRefund:
    """Refund ``amount`` of the unspent balance to the cards it came from (closing an account).

    The one service here that commits: the reservations must be committed
    before the provider is asked (as the wallet's refunds are, see
    ``payments.cards``), so a crash between the two leaves a reserved refund
    that a retry with the same ``key`` sends, never a second one. Each answer
    is flushed; the caller commits at the end. A provider outage leaves the
    refund ``pending`` (its money reserved) for a retry.
    """
    refunds, left = prepare_meter_refund(s, meter, amount, reason=reason, key=key)
    s.commit()
    out = MeterRefund(not_refunded=left)
    for rf in refunds:
        try:
            cards.send_refund(s, provider, rf)
        except ProviderError:
            if rf.status == "failed":
                out.failed.append(rf)
                continue
            raise
        out.refunds.append(rf)
    s.flush()
    return out


__all__ = [
    "MeterRefund", "MeterTopUpError", "WalletTopUp", "check_amount", "guest_owner", "is_tenant", "meter_balance", "meter_currency",
    "meter_of", "meter_ref", "meter_top_up_document", "meter_wallet", "prepare_meter_refund", "receipt_of", "refund_meter_balance",
    "refusal", "start_meter_top_up", "top_up_from_wallet",
]
