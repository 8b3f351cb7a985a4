"""T+1 payouts: what each party is owed for a business day, paid by SEPA credit transfer, CSV or Stripe Connect. No Flask here.

**A batch** pays the revenue of one business day ``T`` (a UTC calendar day)
in one currency; it is unique per ``(day, currency)``, so building it twice
returns the first batch and pays nothing twice.

**What a party is paid** in the batch of day ``T``::

    owed_at_cutoff = Σ its allocation lines booked before the cut-off (00:00 UTC of T+1)
                   − Σ its payouts already made in this currency (any earlier batch; not returned, not failed)
    amount         = min(owed_at_cutoff, its PARTY_PAYABLE balance now)

Allocation lines carry the revenue's own time (``Allocation.booked_at``), so
a capture allocated late still falls into its day, and revenue of T+1 is
left for the next batch. Subtracting every payout made so far (not just
earlier days') means batches built out of order or twice never pay the same
money twice; a returned or failed payout drops out of that sum and its
reversal credits the payable again, so the next batch pays it. The ``min``
with the ledger balance keeps a refund booked after the cut-off from making
us pay out money the party already owes back. An amount below the party's
``min_payout_minor`` (or not positive) makes no payout: it stays owed and
carries over. Building takes the parties' row locks in id order, so two
batches of the same currency (say yesterday's and a catch-up of the day
before) cannot both count the same money.

**Rails**, per payout: ``stripe_connect`` when the party has a connected
account (a Stripe Transfer, idempotency key ``payout:<id>``); otherwise
``sepa`` for EUR to an IBAN in the SEPA zone, ``csv`` for any other bank
account. A party with neither a connected account nor an IBAN is not paid
(it carries over) until its bank details are filled in. No currency
conversion: a payable is paid in its own currency.

**Ledger** (``A → B``: A debited, B credited, as in ``payments.settlement``):

* built:    ``PARTY_PAYABLE(party) → PAYOUTS_IN_TRANSIT``      key ``payout:<id>``
* paid:     ``PAYOUTS_IN_TRANSIT → PROVIDER_CLEARING``         key ``payout:<id>:paid``
  — a Connect transfer leaves our Stripe balance (the clearing account,
  owner ``""``); a bank transfer leaves our payout bank account, kept as
  the clearing account with owner ``"bank"`` (``BANK_OWNER``) so the Stripe
  clearing account still matches Stripe's balance for reconciliation.
* returned or failed: the money comes back to the party's payable, from
  wherever it was: ``PAYOUTS_IN_TRANSIT → PARTY_PAYABLE`` (not yet paid) or
  ``PROVIDER_CLEARING → PARTY_PAYABLE`` (paid, then returned by the bank),
  key ``payout:<id>:returned``; the next batch pays it again.

**States.** Batch: ``draft`` (built, booked in transit) → ``sent`` (files
handed to the bank / transfers made) → ``settled`` (every payout paid) or
``partly_returned`` (some payout returned or failed). Payout: ``pending`` →
``sent`` → ``paid``, or ``returned`` / ``failed``.

**Files.** ``pain001`` writes an ISO 20022 pain.001.001.09 credit transfer
(``sepaxml``) and validates it against the XSD that ``sepaxml`` ships (with
``xmlschema``); ``payouts_csv`` writes the bank payouts as CSV. Both are
deterministic (message id, creation time and end-to-end ids come from the
batch), so a file downloaded twice is the same file and a bank recognises a
duplicate upload by its message id. Each payout keeps a snapshot of the
beneficiary's name and bank details at build time.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import BigInteger, Date, Enum, ForeignKey, String, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, object_session, relationship

from payments.base import Base, UTCDateTime, utcnow
from payments.ledger import AccountKind, LedgerAccount, Posting, get_account, post_many, transfer
from payments.money import Money, check_currency, exponent
from payments.settlement import Allocation, AllocationLine, Party, payable

log = logging.getLogger("voltpay.payouts")

__all__ = [
    "BankDetailsError", "PayoutError", "PayoutFileError", "BatchState", "PayoutState", "Rail", "PayoutBatch", "Payout",
    "Debtor", "validate_bank", "cutoff_of", "build_batch", "mark_sent", "mark_paid", "return_payout", "fail_payout",
    "send_transfer", "pain001", "validate_pain001", "payouts_csv", "batch_files", "BANK_OWNER", "PAIN_SCHEMA",
]

BANK_OWNER = "bank"  # owner of the clearing account that stands for our payout bank account
PAIN_SCHEMA = "pain.001.001.09"
CSV_HEADER = ("party_id", "beneficiary", "iban", "bic", "amount", "currency", "reference")


class PayoutError(ValueError):
    """A payout action that does not fit the payout's state."""


class BankDetailsError(ValueError):
    """Bank details that cannot be used: ``field`` (``iban`` or ``bic``) says which, the message says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field.upper()}: {reason}")
        self.field = field
        self.reason = reason


class PayoutFileError(ValueError):
    """A payout file that does not validate against its schema (or could not be written)."""


class BatchState(enum.StrEnum):
    DRAFT = "draft"
    SENT = "sent"
    SETTLED = "settled"
    PARTLY_RETURNED = "partly_returned"


class PayoutState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    PAID = "paid"
    RETURNED = "returned"
    FAILED = "failed"


class Rail(enum.StrEnum):
    SEPA = "sepa"
    CSV = "csv"
    STRIPE_CONNECT = "stripe_connect"


#: States whose money has left (or is leaving) the party's payable.
COUNTED = (PayoutState.PENDING, PayoutState.SENT, PayoutState.PAID)
BANK_RAILS = (Rail.SEPA, Rail.CSV)


def _enum(cls):
    return Enum(cls, name=cls.__name__.lower(), native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class PayoutBatch(Base):
    """The payouts of one business day's revenue in one currency (built once)."""

    __tablename__ = "payout_batches"

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date)  # T: the business day (UTC) whose revenue it pays
    currency: Mapped[str] = mapped_column(String(3))
    cutoff: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # revenue booked before this instant is in it
    state: Mapped[BatchState] = mapped_column(_enum(BatchState), default=BatchState.DRAFT)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    settled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    payouts: Mapped[list[Payout]] = relationship(back_populates="batch", order_by="Payout.id")

    __table_args__ = (UniqueConstraint("day", "currency", name="uq_payout_batches_day_currency"),)

    @property
    def total_minor(self) -> int:
        """What the batch pays out, returned payouts included."""
        return sum(p.amount_minor for p in self.payouts)

    @property
    def reference(self) -> str:
        """``VP-20261205-EUR-7``: the message id of its SEPA file and the prefix of its payouts' references."""
        return f"VP-{self.day:%Y%m%d}-{self.currency}-{self.id}"


class Payout(Base):
    """One party's payout in a batch, with the bank details it was sent to."""

    __tablename__ = "payouts"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("payout_batches.id"), index=True)
    party_id: Mapped[int] = mapped_column(ForeignKey("parties.id"), index=True)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    rail: Mapped[Rail] = mapped_column(_enum(Rail))
    state: Mapped[PayoutState] = mapped_column(_enum(PayoutState), default=PayoutState.PENDING)
    beneficiary: Mapped[str] = mapped_column(String(200))  # snapshot of the party's legal name
    iban: Mapped[str | None] = mapped_column(String(34))  # snapshot (bank rails)
    bic: Mapped[str | None] = mapped_column(String(11))
    stripe_account_id: Mapped[str | None] = mapped_column(String(64))  # snapshot (Connect)
    provider_transfer_id: Mapped[str | None] = mapped_column(String(64), index=True)  # tr_... (Connect)
    end_to_end_id: Mapped[str] = mapped_column(String(35), unique=True)  # the reference the party sees
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    paid_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    returned_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(String(200))  # why it was returned or failed

    batch: Mapped[PayoutBatch] = relationship(back_populates="payouts")

    __table_args__ = (UniqueConstraint("batch_id", "party_id", name="uq_payouts_batch_id_party_id"),)

    @property
    def money(self) -> Money:
        """The amount as Money."""
        return Money(self.amount_minor, self.currency)

    @property
    def iban_masked(self) -> str:
        """``DE89 •••• •••• 3000``, as ``Party.iban_masked``."""
        return f"{self.iban[:4]} •••• •••• {self.iban[-4:]}" if self.iban else ""


# --------------------------------------------------------------------------- bank details


# BIC countries that legitimately serve IBANs of another country (territories using the mother country's banks).
_BIC_COUNTRY_ALIASES = {
    "FR": {"GF", "GP", "MQ", "RE", "YT", "PM", "BL", "MF", "NC", "PF", "WF", "MC"},
    "IT": {"SM", "VA"},
    "GB": {"GG", "JE", "IM"},
    "FI": {"AX"},
}


def validate_bank(iban: str, bic: str | None = None) -> tuple[str, str | None]:
    """Check an IBAN (and optional BIC) with schwifty; return them compact and upper-case, or raise BankDetailsError."""
    from schwifty import BIC, IBAN
    from schwifty.exceptions import SchwiftyException

    if not iban or not str(iban).strip():
        raise BankDetailsError("iban", "missing")
    try:
        i = IBAN(iban)
    except SchwiftyException as e:
        raise BankDetailsError("iban", f"not a valid IBAN ({e})") from None
    b = None
    if bic and str(bic).strip():
        try:
            b = BIC(bic)
        except SchwiftyException as e:
            raise BankDetailsError("bic", f"not a valid BIC ({e})") from None
        if b.country_code != i.country_code and i.country_code not in _BIC_COUNTRY_ALIASES.get(b.country_code, ()):
            raise BankDetailsError("bic", f"the BIC is of a bank in {b.country_code}, the IBAN of an account in {i.country_code}")
    return str(i.compact), (str(b.compact) if b is not None else None)


def _in_sepa_zone(iban: str) -> bool:
    from schwifty import IBAN

    return bool(IBAN(iban).in_sepa_zone)


# --------------------------------------------------------------------------- building


def cutoff_of(day: dt.date) -> dt.datetime:
    """The end of business day ``day``: 00:00 UTC of the next day (revenue booked before it is in the batch)."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=dt.UTC)


def _rail(party: Party, currency: str) -> tuple[Rail, str | None, str | None] | None:
    """How ``party`` is paid in ``currency`` and the (compact) bank details to use; None when it cannot be paid yet."""
    if party.stripe_account_id:
        return Rail.STRIPE_CONNECT, None, None
    if party.iban:
        try:
            iban, bic = validate_bank(party.iban, party.bic)
        except BankDetailsError as e:
            log.warning("party's bank details do not validate: its payout carries over", extra={"party": party.id, "reason": str(e)})
            return None
        return (Rail.SEPA if currency == "EUR" and _in_sepa_zone(iban) else Rail.CSV), iban, bic
    log.warning("party has no bank account or connected account: its payout carries over", extra={"party": party.id, "currency": currency})
    return None


def owed_at(s: Session, currency: str, cutoff: dt.datetime) -> dict[int, int]:
    """Per party: allocated before ``cutoff`` minus everything already paid out (or on its way) in ``currency``."""
    allocated = s.execute(
        select(AllocationLine.party_id, func.sum(AllocationLine.amount_minor))
        .join(Allocation, Allocation.id == AllocationLine.allocation_id)
        .where(Allocation.currency == currency, Allocation.booked_at < cutoff)
        .group_by(AllocationLine.party_id)
    ).all()
    paid = dict(s.execute(
        select(Payout.party_id, func.sum(Payout.amount_minor))
        .where(Payout.currency == currency, Payout.state.in_(COUNTED))
        .group_by(Payout.party_id)
    ).all())
    return {pid: int(total or 0) - int(paid.get(pid) or 0) for pid, total in allocated}


def payable_balances(s: Session, currency: str) -> dict[int, int]:
    """Per party: its PARTY_PAYABLE balance in ``currency`` now (what we owe it, positive).

    On PostgreSQL the postings are summed per account in one pass first (a
    materialised CTE), then joined to the payables: fetching each payable's
    postings through the account index visits the table's pages once per
    account (21 s against 0.8 s for a day of a million payments in
    ``bench/settlement.py``).
    """
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy import text

        rows = s.execute(text(
            "WITH totals AS MATERIALIZED (SELECT account_id, sum(amount_minor) AS total FROM postings GROUP BY account_id) "
            "SELECT a.owner, t.total FROM ledger_accounts AS a JOIN totals AS t ON t.account_id = a.id "
            "WHERE a.kind = :kind AND a.currency = :currency"), {"kind": AccountKind.PARTY_PAYABLE.value, "currency": currency}).all()
        return {int(owner.split(":", 1)[1]): -int(raw) for owner, raw in rows if owner.startswith("party:")}
    rows = s.execute(
        select(LedgerAccount.owner, func.coalesce(func.sum(Posting.amount_minor), 0))
        .join(Posting, Posting.account_id == LedgerAccount.id)
        .where(LedgerAccount.kind == AccountKind.PARTY_PAYABLE, LedgerAccount.currency == currency)
        .group_by(LedgerAccount.owner)
    ).all()
    return {int(owner.split(":", 1)[1]): -int(raw) for owner, raw in rows if owner.startswith("party:")}


def build_batch(s: Session, day: dt.date, currency: str, now: dt.datetime | None = None) -> PayoutBatch:
    """Build (once) the batch paying day ``day``'s revenue in ``currency``; a second call returns the first batch.

    Each party owed at least its minimum (and something) gets one payout,
    booked PARTY_PAYABLE → PAYOUTS_IN_TRANSIT; the rest carries over. Flushes, never commits.
    """
    currency = check_currency(currency)
    now = now or utcnow()
    cutoff = cutoff_of(day)
    if now < cutoff:
        raise PayoutError(f"the business day {day} is not over yet (its cut-off is {cutoff.isoformat()})")
    existing = _batch(s, day, currency)
    if existing is not None:
        return existing
    try:
        with s.begin_nested():
            batch = PayoutBatch(day=day, currency=currency, cutoff=cutoff, state=BatchState.DRAFT, created_at=now)
            s.add(batch)
    except IntegrityError:  # built concurrently: the other transaction committed it first
        existing = _batch(s, day, currency)
        assert existing is not None
        return existing
    # Serialise batch building per party (see module docstring), then read what is owed.
    # FOR NO KEY UPDATE: it excludes another batch builder, not the FOR KEY SHARE of concurrent allocations' foreign keys.
    parties = {p.id: p for p in s.scalars(select(Party).order_by(Party.id).with_for_update(key_share=True))}
    owed = owed_at(s, currency, cutoff)
    now_owed = payable_balances(s, currency)
    in_transit = get_account(s, AccountKind.PAYOUTS_IN_TRANSIT, currency).id
    rails: dict[tuple, tuple | None] = {}  # bank details checked once per (connected account, IBAN, BIC)
    made: list[Payout] = []
    for pid in sorted(owed):
        party = parties.get(pid)
        amount = min(owed[pid], now_owed.get(pid, 0))
        if party is None or amount <= 0 or amount < (party.min_payout_minor or 0):
            continue  # carries over: stays owed
        detail = (bool(party.stripe_account_id), party.iban, party.bic)
        if detail not in rails:
            rails[detail] = _rail(party, currency)
        elif rails[detail] is None:  # the same unusable details: logged for this party too
            _rail(party, currency)
        how = rails[detail]
        if how is None:
            continue
        rail, iban, bic = how
        made.append(Payout(batch_id=batch.id, party_id=pid, amount_minor=amount, currency=currency, rail=rail,
                           state=PayoutState.PENDING, beneficiary=party.legal_name[:200], iban=iban, bic=bic,
                           stripe_account_id=party.stripe_account_id if rail == Rail.STRIPE_CONNECT else None,
                           end_to_end_id=f"VP{day:%Y%m%d}{currency}B{batch.id}P{pid}"[:35], created_at=now))
    if made:
        s.add_all(made)
        s.flush()  # the payouts' ids, in a few multi-row statements
        accounts = _payables(s, currency, [p.party_id for p in made])
        post_many(s, [(f"payout:{p.id}", f"Payout {p.end_to_end_id}", f"payout:{p.id}",
                       [(accounts[p.party_id], p.amount_minor, currency), (in_transit, -p.amount_minor, currency)]) for p in made],
                  booked="fail")  # new payouts' keys: on PostgreSQL one COPY
    s.flush()
    s.refresh(batch, ["payouts"])
    return batch


def _payables(s: Session, currency: str, party_ids: list[int]) -> dict[int, int]:
    """Party id → the id of its PARTY_PAYABLE account in ``currency`` (created when missing)."""
    out: dict[int, int] = {}
    owners = {f"party:{pid}": pid for pid in party_ids}
    names = list(owners)
    for i in range(0, len(names), 5000):
        for owner, account_id in s.execute(select(LedgerAccount.owner, LedgerAccount.id).where(
                LedgerAccount.kind == AccountKind.PARTY_PAYABLE, LedgerAccount.currency == currency, LedgerAccount.owner.in_(names[i:i + 5000]))):
            out[owners[owner]] = account_id
    for pid in party_ids:
        if pid not in out:
            out[pid] = payable(s, pid, currency).id
    return out


def _batch(s: Session, day: dt.date, currency: str) -> PayoutBatch | None:
    return s.scalar(select(PayoutBatch).where(PayoutBatch.day == day, PayoutBatch.currency == currency))


# --------------------------------------------------------------------------- state changes


def _clearing(s: Session, payout: Payout) -> LedgerAccount:
    owner = "" if payout.rail == Rail.STRIPE_CONNECT else BANK_OWNER
    return get_account(s, AccountKind.PROVIDER_CLEARING, payout.currency, owner)


def _settle_batch_state(batch: PayoutBatch, now: dt.datetime) -> None:
    states = {p.state for p in batch.payouts}
    if states & {PayoutState.RETURNED, PayoutState.FAILED}:
        batch.state = BatchState.PARTLY_RETURNED
    elif states <= {PayoutState.PAID} and batch.state == BatchState.SENT:
        batch.state = BatchState.SETTLED
        batch.settled_at = batch.settled_at or now


def mark_sent(batch: PayoutBatch, now: dt.datetime | None = None) -> PayoutBatch:
    """The batch's files went to the bank (and its transfers were made): bank payouts become ``sent``. Idempotent."""
    now = now or utcnow()
    if batch.state == BatchState.DRAFT:
        batch.state = BatchState.SENT
        batch.sent_at = now
    for p in batch.payouts:
        if p.rail in BANK_RAILS and p.state == PayoutState.PENDING:
            p.state = PayoutState.SENT
            p.sent_at = now
    _settle_batch_state(batch, now)
    object_session(batch).flush()
    return batch


def mark_paid(payout: Payout, now: dt.datetime | None = None) -> Payout:
    """The money reached the party: PAYOUTS_IN_TRANSIT → clearing (Stripe's, or our bank's). Idempotent."""
    s = object_session(payout)
    now = now or utcnow()
    if payout.state == PayoutState.PAID:
        return payout
    if payout.state not in (PayoutState.PENDING, PayoutState.SENT):
        raise PayoutError(f"payout {payout.id} is {payout.state}: it cannot be marked paid")
    transfer(s, idempotency_key=f"payout:{payout.id}:paid", description=f"Payout {payout.end_to_end_id} paid",
             reference=f"payout:{payout.id}", debit=get_account(s, AccountKind.PAYOUTS_IN_TRANSIT, payout.currency),
             credit=_clearing(s, payout), amount=payout.money)
    payout.state = PayoutState.PAID
    payout.sent_at = payout.sent_at or now
    payout.paid_at = now
    _settle_batch_state(payout.batch, now)
    s.flush()
    return payout


def _give_back(payout: Payout, state: PayoutState, reason: str, now: dt.datetime | None) -> Payout:
    s = object_session(payout)
    now = now or utcnow()
    if payout.state in (PayoutState.RETURNED, PayoutState.FAILED):
        return payout
    source = _clearing(s, payout) if payout.state == PayoutState.PAID else get_account(s, AccountKind.PAYOUTS_IN_TRANSIT, payout.currency)
    transfer(s, idempotency_key=f"payout:{payout.id}:returned", description=f"Payout {payout.end_to_end_id} {state}: {reason}"[:200],
             reference=f"payout:{payout.id}", debit=source, credit=payable(s, payout.party_id, payout.currency), amount=payout.money)
    payout.state = state
    payout.returned_at = now
    payout.reason = (reason or state.value)[:200]
    _settle_batch_state(payout.batch, now)
    s.flush()
    return payout


def return_payout(payout: Payout, reason: str, now: dt.datetime | None = None) -> Payout:
    """The bank returned the payout: the money is owed to the party again (paid in the next batch). Idempotent."""
    return _give_back(payout, PayoutState.RETURNED, reason, now)


def fail_payout(payout: Payout, reason: str, now: dt.datetime | None = None) -> Payout:
    """The provider refused the payout (e.g. an unknown connected account): owed again, as a return. Idempotent."""
    return _give_back(payout, PayoutState.FAILED, reason, now)


def send_transfer(payout: Payout, provider, now: dt.datetime | None = None) -> str:
    """Make a pending Connect payout's transfer through ``provider``; returns the payout's state, or ``"deferred"``.

    Refused (InvalidRequest: unknown account, ...): the payout fails and its
    money is owed again. An outage leaves it pending for the next run, which
    sends the same idempotency key (``payout:<id>``). The caller holds the
    payout's row lock, so two workers never send it twice.
    """
    from payments.providers.base import InvalidRequest, ProviderError

    if payout.rail != Rail.STRIPE_CONNECT or payout.state != PayoutState.PENDING:
        return payout.state.value
    try:
        result = provider.transfer(destination=payout.stripe_account_id, amount=payout.money, idempotency_key=f"payout:{payout.id}",
                                   description=f"Voltpay payout {payout.end_to_end_id}")
    except InvalidRequest as e:
        log.warning("Connect transfer refused: payout failed, owed again", extra={"payout": payout.id, "reason": e.code})
        return fail_payout(payout, e.message, now).state.value
    except ProviderError as e:
        log.warning("Connect transfer deferred", extra={"payout": payout.id, "reason": e.code})
        return "deferred"
    payout.provider_transfer_id = result.id
    return mark_paid(payout, now).state.value  # a Connect transfer lands in the connected account's balance at once


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Debtor:
    """Our own account the SEPA transfers are paid from."""

    name: str
    iban: str
    bic: str | None = None


def _decimal(amount_minor: int, currency: str) -> str:
    return str(Decimal(amount_minor).scaleb(-exponent(currency)))


def _bank_payouts(batch: PayoutBatch, rail: Rail | None = None) -> list[Payout]:
    return [p for p in batch.payouts if (p.rail == rail if rail else p.rail in BANK_RAILS)]


def pain001(batch: PayoutBatch, debtor: Debtor) -> bytes | None:
    """The batch's SEPA payouts as a pain.001.001.09 credit transfer, validated against its schema (None: no SEPA payouts).

    Every SEPA payout of the batch is in it, whatever happened to it later,
    so the file is the same however often it is made.
    """
    from sepaxml import SepaTransfer

    payouts = _bank_payouts(batch, Rail.SEPA)
    if not payouts:
        return None
    if batch.currency != "EUR":
        raise PayoutFileError("a SEPA credit transfer is in EUR only")
    iban, bic = validate_bank(debtor.iban, debtor.bic)
    config = {"name": debtor.name, "IBAN": iban, "currency": "EUR", "batch": True}
    if bic:
        config["BIC"] = bic
    sepa = SepaTransfer(config, schema=PAIN_SCHEMA, clean=True)
    execution = batch.created_at.date()
    for p in payouts:
        payment = {"name": p.beneficiary, "IBAN": p.iban, "amount": p.amount_minor, "execution_date": execution,
                   "description": f"Voltpay payout {batch.day.isoformat()} {p.end_to_end_id}", "endtoend_id": p.end_to_end_id}
        if p.bic:
            payment["BIC"] = p.bic
        sepa.add_payment(payment)
    raw = sepa.export(validate=False)
    # sepaxml draws a random message id, payment information id and the current time: make them the batch's.
    ns = {"p": f"urn:iso:std:iso:20022:tech:xsd:{PAIN_SCHEMA}"}
    ET.register_namespace("", ns["p"])
    root = ET.fromstring(raw)
    root.find("p:CstmrCdtTrfInitn/p:GrpHdr/p:MsgId", ns).text = batch.reference
    root.find("p:CstmrCdtTrfInitn/p:GrpHdr/p:CreDtTm", ns).text = batch.created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    for i, node in enumerate(root.findall("p:CstmrCdtTrfInitn/p:PmtInf/p:PmtInfId", ns), 1):
        node.text = f"{batch.reference}-{i}"
    out = b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, "utf-8")
    validate_pain001(out)
    return out


def validate_pain001(xml: bytes) -> None:
    """Raise PayoutFileError unless ``xml`` is valid against the pain.001.001.09 schema shipped with sepaxml."""
    from sepaxml.validation import ValidationError, try_valid_xml

    try:
        try_valid_xml(xml, PAIN_SCHEMA)
    except ValidationError as e:
        raise PayoutFileError(f"the SEPA file does not validate against {PAIN_SCHEMA}: {e.__cause__ or e}") from None
    except Exception as e:  # not even well-formed XML
        raise PayoutFileError(f"the SEPA file is not valid XML: {e}") from None


def payouts_csv(batch: PayoutBatch) -> bytes:
    """The batch's bank payouts (SEPA and others) as CSV: party, beneficiary, IBAN, BIC, amount (decimal), currency, reference."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_HEADER)
    for p in _bank_payouts(batch):
        w.writerow((p.party_id, _csv_safe(p.beneficiary), p.iban or "", p.bic or "", _decimal(p.amount_minor, p.currency), p.currency,
                    p.end_to_end_id))
    return buf.getvalue().encode("utf-8")


def _csv_safe(text: str) -> str:
    """Keep a spreadsheet from running a name as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def batch_files(batch: PayoutBatch, debtor: Debtor | None) -> dict[str, bytes]:
    """The batch's files for the bank: ``pain.001.xml`` (when it has SEPA payouts and a debtor) and ``payouts.csv``."""
    files = {}
    if debtor is not None and _bank_payouts(batch, Rail.SEPA):
        files["pain.001.xml"] = pain001(batch, debtor)
    files["payouts.csv"] = payouts_csv(batch)
    return files
