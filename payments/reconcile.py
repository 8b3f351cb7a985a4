"""Reconciliation: our ledger against the provider's balance transactions, one day and currency at a time. No Flask.

**What is compared.** Our side is what the ledger booked on the provider
clearing account during the day (UTC), recognised by the entries'
idempotency keys:

* ``card_payment:<id>:…`` — a card capture (wallet or meter top-up, charging
  session, bill), matched by the payment's ``provider_payment_id`` (``pi_``)
  against the provider's ``charge`` transaction;
* ``card_refund:<id>:…`` — a card refund, matched by ``provider_refund_id``
  (``re_``) against the provider's ``refund`` transaction;
* ``payout:<id>:paid`` — a party paid by Stripe Connect transfer
  (``payments.payouts``; bank payouts use the clearing account of owner
  ``"bank"`` and are not Stripe's), matched by ``provider_transfer_id``
  (``tr_``) against the provider's ``transfer`` transaction;
* ``provider_fee:…`` — fees, booked by this module (below); our fee of a
  payment or refund is the sum of its fee entries (entry ``reference``
  ``card_payment:<id>`` / ``card_refund:<id>``), whatever day they were booked.

Other clearing entries (manual corrections, tests' fixtures) are not card
money and are not compared. The provider's ``payout`` transactions move our
balance to our own bank: we book no such movement, so they are counted, not
compared. Every other provider type (disputes, adjustments, transfers, …)
is a difference until an operator explains it.

**Differences** (``ReconciliationItem.kind``), each with its cause in words:
``missing_in_provider`` (we booked it, the provider does not list it),
``missing_in_ledger`` (the provider moved money we did not book: a refund made
in the provider's dashboard, a capture whose booking failed, a dispute),
``amount_differs``, ``fee_differs``.

**Day boundaries.** The caller passes the provider's transactions of the day
with a margin on both sides (``fetch_window``): one of our bookings at
23:59:59 matches a provider transaction at 00:00:01 the next day. A provider
transaction of the day that we booked on another day is that day's business,
not a difference of this one.

**Fees (decision).** Stripe tells the fee only in the balance transaction, so
a fee we have not booked at all is booked here, automatically: provider fees
(debit) ← provider clearing (credit), key ``provider_fee:<source>:<fee>``,
reference ``card_payment:<id>``/``card_refund:<id>``; the item is recorded
as resolved by ``reconciliation`` with the entry's id. The fee is the
merchant's expense: allocations made at capture are not changed (a fee known
at capture is passed to ``settlement.allocate`` instead, which recovers it
from the parties). A fee that *differs* from one we booked is left open for
an operator, who may book the provider's figure (``book_provider_fee``: the
difference, same key scheme) or resolve the item with a note.

**Re-running** a day is idempotent: items are keyed (``run_id``, ``key``);
an open item whose difference has gone is resolved by ``reconciliation``; a
resolved item whose amounts changed since is opened again; nothing is
duplicated. A day is ``reconciled`` only when no item is open.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation

from sqlalchemy import BigInteger, Date, Enum, ForeignKey, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from payments.base import Base, UTCDateTime, utcnow
from payments.cards import CardPayment, CardRefund
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting, get_account, post
from payments.money import Money, check_currency, exponent
from payments.providers.base import BALANCE_TXN_TYPES, BalanceTxn

__all__ = [
    "RunState", "ItemKind", "ReconciliationRun", "ReconciliationItem", "ReconcileError", "CsvError",
    "day_bounds", "fetch_window", "reconcile_day", "resolve_item", "book_provider_fee", "parse_balance_csv",
    "resolve_charge_sources", "SYSTEM",
]

SYSTEM = "reconciliation"  # resolved_by of what this module resolves itself
MARGIN = dt.timedelta(days=1)  # provider transactions fetched either side of the day


class RunState(enum.StrEnum):
    OPEN = "open"  # at least one difference is not resolved
    RECONCILED = "reconciled"


class ItemKind(enum.StrEnum):
    MISSING_IN_PROVIDER = "missing_in_provider"
    MISSING_IN_LEDGER = "missing_in_ledger"
    AMOUNT_DIFFERS = "amount_differs"
    FEE_DIFFERS = "fee_differs"


def _enum(cls, name: str):
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class ReconciliationRun(Base):
    """One day and currency compared with the provider; re-run in place."""

    __tablename__ = "reconciliation_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, index=True)
    currency: Mapped[str] = mapped_column(String(3))
    state: Mapped[RunState] = mapped_column(_enum(RunState, "reconciliation_run_state"), default=RunState.OPEN)
    source: Mapped[str] = mapped_column(String(16), default="api")  # "api" or "csv": where the provider's side came from
    provider_count: Mapped[int] = mapped_column(Integer, default=0)  # provider transactions of the day
    ledger_count: Mapped[int] = mapped_column(Integer, default=0)  # our captures and refunds of the day
    matched_count: Mapped[int] = mapped_column(Integer, default=0)  # found on both sides with the same amount
    payout_count: Mapped[int] = mapped_column(Integer, default=0)  # provider payouts to our bank (not compared)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    open_count: Mapped[int] = mapped_column(Integer, default=0)
    fees_booked_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # by this run's automatic fee bookings
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_run_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    reconciled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    items: Mapped[list[ReconciliationItem]] = relationship(back_populates="run", order_by="ReconciliationItem.id")

    __table_args__ = (UniqueConstraint("day", "currency", name="uq_reconciliation_runs_day_currency"),)


class ReconciliationItem(Base):
    """One difference between our ledger and the provider, with its cause, and who resolved it (audit)."""

    __tablename__ = "reconciliation_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_runs.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(200))  # what the difference is about, stable across re-runs
    kind: Mapped[ItemKind] = mapped_column(_enum(ItemKind, "reconciliation_item_kind"))
    our_ref: Mapped[str | None] = mapped_column(String(100))  # "card_payment:12", "card_refund:3"
    provider_ref: Mapped[str | None] = mapped_column(String(255))  # pi_, re_ (or the txn_ of an adjustment)
    our_amount_minor: Mapped[int | None] = mapped_column(BigInteger)  # fee_differs: the fees
    provider_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    cause: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    resolved_by: Mapped[str | None] = mapped_column(String(64))  # "user:7" or "reconciliation"
    note: Mapped[str | None] = mapped_column(Text)
    fee_entry_id: Mapped[int | None] = mapped_column(ForeignKey("journal_entries.id"))  # the fee booked for it, if any

    run: Mapped[ReconciliationRun] = relationship(back_populates="items")

    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_reconciliation_items_run_key"),)

    @property
    def is_open(self) -> bool:
        """Not resolved yet."""
        return self.resolved_at is None


class ReconcileError(ValueError):
    """A reconciliation request that cannot be done (bad day, resolved item, missing note)."""

    def __init__(self, message: str, code: str, field: str = ""):
        super().__init__(message)
        self.code = code
        self.field = field


# --------------------------------------------------------------------------- our side


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The day's [start, end) in UTC."""
    start = dt.datetime.combine(day, dt.time(0), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def fetch_window(day: dt.date) -> tuple[int, int]:
    """The Unix-time range of provider transactions to fetch for ``day`` (the day with its margins)."""
    start, end = day_bounds(day)
    return int((start - MARGIN).timestamp()), int((end + MARGIN).timestamp())


@dataclass
class _Ours:
    kind: str  # charge | refund
    our_ref: str  # card_payment:12 | card_refund:3
    provider_ref: str | None
    amount: int  # on the clearing account: captures positive, refunds negative
    fee: int = 0


_KEY = re.compile(r"^(card_payment|card_refund):(\d+):|^payout:(\d+):paid$")


def _clearing(s: Session, currency: str) -> LedgerAccount | None:
    return s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.PROVIDER_CLEARING, LedgerAccount.owner == "",
                                                LedgerAccount.currency == currency))


def _booked(s: Session, clearing: LedgerAccount, start: dt.datetime | None = None, end: dt.datetime | None = None,
            like: str | None = None) -> list[tuple[str, int]]:
    """(idempotency key, sum on clearing) of the entries booked on the clearing account (in [start, end))."""
    q = (select(JournalEntry.idempotency_key, func.sum(Posting.amount_minor)).join(Posting, Posting.entry_id == JournalEntry.id)
         .where(Posting.account_id == clearing.id).group_by(JournalEntry.id, JournalEntry.idempotency_key).order_by(JournalEntry.id))
    if start is not None:
        q = q.where(JournalEntry.created_at >= start, JournalEntry.created_at < end)
    if like is not None:
        q = q.where(JournalEntry.idempotency_key.like(like))
    return [(k, int(a)) for k, a in s.execute(q)]


def _fees(s: Session, currency: str, refs: Iterable[str]) -> dict[str, int]:
    """Our booked provider fees per reference (``card_payment:<id>``), from the ``provider_fee:`` entries."""
    refs = list(refs)
    if not refs:
        return {}
    fees_acct = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.PROVIDER_FEES, LedgerAccount.owner == "",
                                                     LedgerAccount.currency == currency))
    if fees_acct is None:
        return {}
    out: dict[str, int] = {}
    for i in range(0, len(refs), 500):
        q = (select(JournalEntry.reference, func.sum(Posting.amount_minor)).join(Posting, Posting.entry_id == JournalEntry.id)
             .where(Posting.account_id == fees_acct.id, JournalEntry.idempotency_key.like("provider_fee:%"),
                    JournalEntry.reference.in_(refs[i:i + 500])).group_by(JournalEntry.reference))
        out.update({r: int(a) for r, a in s.execute(q)})
    return out


def _our_side(s: Session, day: dt.date, currency: str) -> list[_Ours]:
    """Our captures and refunds booked on the clearing account during ``day``."""
    clearing = _clearing(s, currency)
    if clearing is None:
        return []
    start, end = day_bounds(day)
    captures: dict[int, int] = {}
    refunds: dict[int, int] = {}
    transfers: dict[int, int] = {}
    for key, amount in _booked(s, clearing, start, end):
        m = _KEY.match(key)
        if m is None:
            continue  # fees, payout returns, manual corrections: not compared
        if m.group(3):
            transfers[int(m.group(3))] = transfers.get(int(m.group(3)), 0) + amount
            continue
        bucket = captures if m.group(1) == "card_payment" else refunds
        bucket[int(m.group(2))] = bucket.get(int(m.group(2)), 0) + amount
    pis = dict(s.execute(select(CardPayment.id, CardPayment.provider_payment_id).where(CardPayment.id.in_(captures))).all()) if captures else {}
    res = dict(s.execute(select(CardRefund.id, CardRefund.provider_refund_id).where(CardRefund.id.in_(refunds))).all()) if refunds else {}
    ours = [_Ours("charge", f"card_payment:{i}", pis.get(i), a) for i, a in sorted(captures.items()) if a]
    ours += [_Ours("refund", f"card_refund:{i}", res.get(i), a) for i, a in sorted(refunds.items()) if a]
    if transfers:
        from payments.payouts import Payout  # the payouts module books these

        trs = dict(s.execute(select(Payout.id, Payout.provider_transfer_id).where(Payout.id.in_(transfers))).all())
        ours += [_Ours("transfer", f"payout:{i}", trs.get(i), a) for i, a in sorted(transfers.items()) if a]
    fees = _fees(s, currency, [o.our_ref for o in ours])
    for o in ours:
        o.fee = fees.get(o.our_ref, 0)
    return ours


def _booked_elsewhere(s: Session, txn: BalanceTxn, clearing: LedgerAccount | None) -> tuple[bool, str]:
    """Whether we booked this provider transaction on another day; else what we know of it (for the cause)."""
    if txn.type == "charge":
        row = s.scalar(select(CardPayment).where(CardPayment.provider_payment_id == txn.source))
        if row is None:
            return False, "no payment of ours has this id (a payment made outside Voltpay?)"
        if clearing is not None and _booked(s, clearing, like=f"card_payment:{row.id}:%"):
            return True, ""
        return False, f"card payment #{row.id} ({row.reference}) is {row.state} in our records, but no capture was booked"
    if txn.type == "refund":
        rf = s.scalar(select(CardRefund).where(CardRefund.provider_refund_id == txn.source))
        if rf is not None:
            if clearing is not None and _booked(s, clearing, like=f"card_refund:{rf.id}:%"):
                return True, ""
            return False, f"refund #{rf.id} of card payment #{rf.payment_id} is {rf.status} in our records, but was not booked"
        row = s.scalar(select(CardPayment).where(CardPayment.provider_payment_id == txn.payment_id)) if txn.payment_id else None
        if row is not None:
            return False, f"a refund of our card payment #{row.id} ({row.reference}) made at the provider, not through Voltpay"
        return False, "a refund of no payment of ours"
    if txn.type == "transfer":
        from payments.payouts import Payout

        payout = s.scalar(select(Payout).where(Payout.provider_transfer_id == txn.source))
        if payout is None:
            return False, "no payout of ours made this transfer"
        if clearing is not None and _booked(s, clearing, like=f"payout:{payout.id}:paid"):
            return True, ""
        return False, f"payout #{payout.id} is {payout.state} in our records, but was not booked as paid"
    return False, f"the provider's {txn.raw_type or txn.type} {txn.id}: nothing in our ledger books it"


# --------------------------------------------------------------------------- fees


def _book_fee(s: Session, *, currency: str, our_ref: str, source: str, ours: int, theirs: int) -> int:
    """Bring our booked fee of ``our_ref`` to the provider's figure; the entry's id (once per source and figure)."""
    delta = theirs - ours
    fees, clearing = get_account(s, AccountKind.PROVIDER_FEES, currency), get_account(s, AccountKind.PROVIDER_CLEARING, currency)
    return post(s, idempotency_key=f"provider_fee:{source}:{theirs}", description="Provider fee (reconciliation)", reference=our_ref,
                postings=[(fees, Money(delta, currency)), (clearing, Money(-delta, currency))])


# --------------------------------------------------------------------------- the run


@dataclass
class _Diff:
    key: str
    kind: ItemKind
    our_ref: str | None
    provider_ref: str | None
    our_amount: int | None
    provider_amount: int | None
    cause: str
    auto_fee: tuple[str, int, int] | None = None  # (source, ours, theirs): book it, then the item is resolved


def _money(minor: int | None, currency: str) -> str:
    return "—" if minor is None else str(Money(minor, currency))


def reconcile_day(s: Session, day: dt.date, currency: str, provider_txns: Iterable[BalanceTxn], now: dt.datetime,
                  *, source: str = "api") -> ReconciliationRun:
    """Compare ``day`` in ``currency``: record every difference, book missing fees, set the run's state. Flushes only.

    ``provider_txns`` are the provider's transactions of the day and its
    margins (``fetch_window``); other currencies are ignored. Idempotent: a
    re-run updates the same run and items (see the module docstring).
    """
    currency = check_currency(currency)
    start, end = day_bounds(day)
    lo, hi = int(start.timestamp()), int(end.timestamp())
    txns = [t for t in provider_txns if t.currency.upper() == currency]
    run = s.scalar(select(ReconciliationRun).where(ReconciliationRun.day == day, ReconciliationRun.currency == currency).with_for_update())
    if run is None:
        run = ReconciliationRun(day=day, currency=currency, state=RunState.OPEN, created_at=now, last_run_at=now, fees_booked_minor=0)
        s.add(run)
        s.flush()

    ours = _our_side(s, day, currency)
    theirs: dict[tuple[str, str], list[BalanceTxn]] = {}
    for t in txns:
        kind = "transfer" if t.raw_type == "transfer" else t.type
        if kind in ("charge", "refund", "transfer"):
            theirs.setdefault((kind, t.source), []).append(t)
    diffs: list[_Diff] = []
    matched = 0
    what = {"charge": "capture", "refund": "refund", "transfer": "Connect payout"}
    for o in ours:
        found = theirs.pop((o.kind, o.provider_ref), None) if o.provider_ref else None
        if not found:
            why = "it has no provider id in our records" if not o.provider_ref else f"the provider lists no {o.kind} {o.provider_ref} around {day}"
            diffs.append(_Diff(f"missing_in_provider:{o.our_ref}", ItemKind.MISSING_IN_PROVIDER, o.our_ref, o.provider_ref, o.amount, None,
                               f"We booked a {what[o.kind]} of {_money(abs(o.amount), currency)} ({o.our_ref}), but {why}."))
            continue
        amount, fee = sum(t.amount for t in found), sum(t.fee for t in found)
        if amount != o.amount:
            diffs.append(_Diff(f"amount_differs:{o.our_ref}", ItemKind.AMOUNT_DIFFERS, o.our_ref, o.provider_ref, o.amount, amount,
                               f"The {what[o.kind]} {o.provider_ref} is {_money(amount, currency)} at the provider and "
                               f"{_money(o.amount, currency)} in our ledger ({o.our_ref})."))
        else:
            matched += 1
        if fee != o.fee:
            auto = (o.provider_ref, o.fee, fee) if o.fee == 0 else None
            cause = (f"The provider kept a fee of {_money(fee, currency)} on {o.provider_ref}; "
                     + ("none was booked yet." if o.fee == 0 else f"we booked {_money(o.fee, currency)}."))
            diffs.append(_Diff(f"fee_differs:{o.our_ref}", ItemKind.FEE_DIFFERS, o.our_ref, o.provider_ref, o.fee, fee, cause, auto))

    clearing = _clearing(s, currency)
    in_day = [t for t in txns if lo <= t.created < hi]
    payouts = sum(1 for t in in_day if t.type == "payout")
    leftover = [t for group in theirs.values() for t in group if lo <= t.created < hi]
    leftover += [t for t in in_day if t.type not in ("charge", "refund", "payout") and t.raw_type != "transfer"]
    for t in sorted(leftover, key=lambda t: (t.created, t.id)):
        elsewhere, why = _booked_elsewhere(s, replace(t, type="transfer") if t.raw_type == "transfer" else t, clearing)
        if elsewhere:
            continue  # booked on another day: matched by that day's run
        ref = t.source if (t.type in ("charge", "refund") or t.raw_type == "transfer") and t.source else t.id
        diffs.append(_Diff(f"missing_in_ledger:{ref}", ItemKind.MISSING_IN_LEDGER, None, ref, None, t.amount,
                           f"The provider's {t.raw_type or t.type} {ref} of {_money(t.amount, currency)} is not in our ledger: {why}."))

    _store(s, run, diffs, now)
    run.source = source
    run.provider_count = len(in_day)
    run.ledger_count = len(ours)
    run.matched_count = matched
    run.payout_count = payouts
    run.last_run_at = now
    _update_state(s, run, now)
    return run


def _store(s: Session, run: ReconciliationRun, diffs: list[_Diff], now: dt.datetime) -> None:
    """Upsert the run's items by key; open items that no longer differ are resolved by the system."""
    existing = {i.key: i for i in s.scalars(select(ReconciliationItem).where(ReconciliationItem.run_id == run.id))}
    seen: set[str] = set()
    for d in diffs:
        seen.add(d.key)
        item = existing.get(d.key)
        if item is None:
            item = ReconciliationItem(run_id=run.id, key=d.key, kind=d.kind, our_ref=d.our_ref, provider_ref=d.provider_ref,
                                      our_amount_minor=d.our_amount, provider_amount_minor=d.provider_amount, cause=d.cause, created_at=now)
            s.add(item)
        elif (item.our_amount_minor, item.provider_amount_minor) != (d.our_amount, d.provider_amount):
            if not item.is_open:  # resolved for other figures: look again
                item.note = ((item.note or "") + f"\nReopened {now:%Y-%m-%d %H:%M} UTC: the amounts changed.").strip()
                item.resolved_at = item.resolved_by = None
            item.our_amount_minor, item.provider_amount_minor, item.cause = d.our_amount, d.provider_amount, d.cause
        if d.auto_fee is not None and item.is_open:
            src, ours, theirs = d.auto_fee
            item.fee_entry_id = _book_fee(s, currency=run.currency, our_ref=d.our_ref, source=src, ours=ours, theirs=theirs)
            item.resolved_at, item.resolved_by = now, SYSTEM
            item.note = f"Fee of {_money(theirs, run.currency)} booked (journal entry #{item.fee_entry_id})."
            run.fees_booked_minor += theirs - ours
    for key, item in existing.items():
        if key not in seen and item.is_open:
            item.resolved_at, item.resolved_by = now, SYSTEM
            item.note = ((item.note or "") + f"\nNo longer differs on the run of {now:%Y-%m-%d %H:%M} UTC.").strip()
    s.flush()


def _update_state(s: Session, run: ReconciliationRun, now: dt.datetime) -> None:
    counts = s.execute(select(func.count(), func.count(ReconciliationItem.id).filter(ReconciliationItem.resolved_at.is_(None)))
                       .where(ReconciliationItem.run_id == run.id)).one()
    run.item_count, run.open_count = int(counts[0]), int(counts[1])
    if run.open_count:
        run.state, run.reconciled_at = RunState.OPEN, None
    elif run.state != RunState.RECONCILED:
        run.state, run.reconciled_at = RunState.RECONCILED, now
    s.flush()


def resolve_item(s: Session, item: ReconciliationItem, *, by: str, note: str, now: dt.datetime) -> ReconciliationItem:
    """An operator explains a difference (``note`` is required): who and when are kept; the day may become reconciled."""
    note = (note or "").strip()
    if not item.is_open:
        raise ReconcileError("this difference is already resolved", "already_resolved")
    if not note:
        raise ReconcileError("say why this difference is acceptable", "note_required", "note")
    if len(note) > 2000:
        raise ReconcileError("at most 2000 characters", "note_too_long", "note")
    item.resolved_at, item.resolved_by, item.note = now, by[:64], note
    _update_state(s, item.run, now)
    return item


def book_provider_fee(s: Session, item: ReconciliationItem, *, by: str, now: dt.datetime, note: str = "") -> ReconciliationItem:
    """Accept the provider's fee of an open ``fee_differs`` item: book the difference (once), then resolve it."""
    if item.kind != ItemKind.FEE_DIFFERS or not item.is_open or item.our_ref is None or item.provider_ref is None:
        raise ReconcileError("only an open fee difference can be booked", "not_a_fee")
    item.fee_entry_id = _book_fee(s, currency=item.run.currency, our_ref=item.our_ref, source=item.provider_ref,
                                  ours=item.our_amount_minor or 0, theirs=item.provider_amount_minor or 0)
    text = f"Provider fee of {_money(item.provider_amount_minor, item.run.currency)} booked (journal entry #{item.fee_entry_id})."
    return resolve_item(s, item, by=by, note=(text + " " + note.strip()).strip(), now=now)


# --------------------------------------------------------------------------- the provider's CSV export


class CsvError(ValueError):
    """A balance-transaction export we cannot read: ``line`` says where (0: the header)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


REQUIRED_COLUMNS = ("id", "type", "source", "amount", "fee", "net", "currency", "created (utc)")
MAX_CSV_ROWS = 100_000


def _minor(text: str, currency: str, line: int, column: str) -> int:
    """``"1,234.56"`` in major units → minor units, exactly (more decimals than the currency has is an error)."""
    raw = (text or "").strip().replace(",", "")
    try:
        d = Decimal(raw)
    except InvalidOperation:
        raise CsvError(line, f"{column} {text!r} is not an amount") from None
    scaled = d.scaleb(exponent(currency))
    if not d.is_finite() or scaled != scaled.to_integral_value():
        raise CsvError(line, f"{column} {text!r} has more decimals than {currency} allows")
    return int(scaled)


def _created(text: str, line: int) -> int:
    raw = (text or "").strip().replace("T", " ").removesuffix("Z").removesuffix("+00:00")
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return int(dt.datetime.strptime(raw, fmt).replace(tzinfo=dt.UTC).timestamp())
        except ValueError:
            continue
    raise CsvError(line, f"Created (UTC) {text!r} is not a time like 2026-12-05 14:03:00")


def parse_balance_csv(text: str) -> list[BalanceTxn]:
    """The rows of Stripe's balance-transaction export (Dashboard → Balance → Export), amounts in major units.

    Columns used (others are ignored, headers case-insensitive): ``id``,
    ``Type``, ``Source``, ``Amount``, ``Fee``, ``Net``, ``Currency``,
    ``Created (UTC)``. Charges name their charge (``ch_``): map them to
    payments with ``resolve_charge_sources`` before reconciling.
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise CsvError(0, "the file is empty") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CsvError(0, "missing columns: " + ", ".join(missing))
    col = {c: header.index(c) for c in REQUIRED_COLUMNS}
    out: list[BalanceTxn] = []
    for n, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(out) >= MAX_CSV_ROWS:
            raise CsvError(n, f"more than {MAX_CSV_ROWS} rows")
        if len(row) < len(header):
            raise CsvError(n, "fewer cells than columns")
        get = lambda c: row[col[c]].strip()  # noqa: E731
        try:
            currency = check_currency(get("currency").upper())
        except ValueError:
            raise CsvError(n, f"unknown currency {get('currency')!r}") from None
        raw = get("type").lower()
        amount, fee, net = (_minor(get(c), currency, n, c.capitalize()) for c in ("amount", "fee", "net"))
        if amount - fee != net:
            raise CsvError(n, "Net is not Amount − Fee")
        if not get("id"):
            raise CsvError(n, "no id")
        kind = BALANCE_TXN_TYPES.get(raw, "adjustment")
        out.append(BalanceTxn(id=get("id"), type=kind, source=get("source"), amount=amount, fee=fee, net=net, currency=currency,
                              created=_created(get("created (utc)"), n), raw_type=None if raw == kind else raw))
    return out


def resolve_charge_sources(txns: Iterable[BalanceTxn], lookup: Callable[[str], str | None]) -> list[BalanceTxn]:
    """Charges named by their ``ch_`` id, renamed to their payment (``pi_``) with ``lookup`` (the provider's)."""
    out = []
    for t in txns:
        if t.type == "charge" and t.source.startswith(("ch_", "py_")):
            pi = lookup(t.source)
            if pi:
                t = replace(t, source=pi, payment_id=pi)
        out.append(t)
    return out
