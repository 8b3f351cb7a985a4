"""Double-entry ledger: accounts, journal entries of balanced postings, balances, wallet holds.

Sign convention: a posting's ``amount_minor`` is positive for a debit and
negative for a credit; the postings of one entry sum to zero per currency.
Each account kind has a normal side: wallets, holds, payables and VAT are
liabilities (credit-normal), so what a person sees as "balance" is
``-sum(postings)``; provider clearing and fees are debit-normal.

Balances: accounts that must never go below zero (wallets) keep a cached
``balance_minor`` updated in the same transaction as their postings, by a
single conditional UPDATE. On PostgreSQL that statement takes the row lock
and checks the limit atomically, so two concurrent debits can never both
pass; on SQLite the transaction is BEGIN IMMEDIATE (see webapp/db.py), which
serialises writers. A CHECK constraint backs the rule up. System accounts
(provider clearing, VAT, fees) are written by every payment; they keep no
cached balance, so they are never a hot row, and their balance is the sum of
their postings.

Entries are never edited or deleted: a correction is a new entry. Every
entry has a unique idempotency key derived from its cause; posting the same
key twice returns the first entry and books nothing (different postings
under the same key raise ``IdempotencyConflict``).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.attributes import set_committed_value

from payments.base import Base, UTCDateTime, utcnow
from payments.money import CurrencyMismatch, Money, check_currency


class AccountKind(enum.StrEnum):
    """What an account holds; each kind has a normal side."""

    CUSTOMER_WALLET = "customer_wallet"  # a person's prepaid money (liability)
    METER_WALLET = "meter_wallet"  # a meter's prepaid electricity credit (liability)
    WALLET_HOLD = "wallet_hold"  # wallet money reserved for a charging session (liability)
    PROVIDER_CLEARING = "provider_clearing"  # money the card provider owes us (asset)
    PARTY_PAYABLE = "party_payable"  # what we owe a party of a site (liability)
    REVENUE = "revenue"  # captured revenue waiting for settlement (liability until allocated)
    VAT_PAYABLE = "vat_payable"  # VAT owed to the tax office (liability)
    PROVIDER_FEES = "provider_fees"  # fees the provider keeps (expense)
    PAYOUTS_IN_TRANSIT = "payouts_in_transit"  # payouts sent, not yet confirmed (asset)
    REFUNDS_PAYABLE = "refunds_payable"  # refunds owed to a card, not yet sent (liability)
    WRITE_OFF = "write_off"  # losses written off by an operator (expense)
    GOODWILL = "goodwill"  # credits given to customers as goodwill by support, owner "operator:<id>" (expense)


CREDIT_NORMAL = {
    AccountKind.CUSTOMER_WALLET,
    AccountKind.METER_WALLET,
    AccountKind.WALLET_HOLD,
    AccountKind.PARTY_PAYABLE,
    AccountKind.REVENUE,
    AccountKind.VAT_PAYABLE,
    AccountKind.REFUNDS_PAYABLE,
}
# Kinds whose natural balance may never go below -overdraft_limit, with a cached balance.
GUARDED = {AccountKind.CUSTOMER_WALLET, AccountKind.METER_WALLET, AccountKind.WALLET_HOLD}


class LedgerError(Exception):
    """A ledger rule was broken; nothing was booked."""


class Unbalanced(LedgerError):
    """The postings of an entry do not sum to zero per currency."""


class InsufficientFunds(LedgerError):
    """A guarded account (a wallet) would go below zero (or below its overdraft limit)."""

    def __init__(self, account: LedgerAccount, needed: Money):
        super().__init__(f"account {account.id} ({account.kind}) lacks {needed}")
        self.account_id = account.id
        self.needed = needed


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before for different postings."""


class LedgerAccount(Base):
    """An account of the ledger: a kind, a currency and an owner (``user:42``, ``meter:7``, ``party:3``)."""

    __tablename__ = "ledger_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[AccountKind] = mapped_column(Enum(AccountKind, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e]))
    currency: Mapped[str] = mapped_column(String(3))
    owner: Mapped[str] = mapped_column(String(64), default="")  # "" for system accounts
    # Debit-positive sum of postings, kept only for guarded accounts (see module docstring).
    balance_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    guarded: Mapped[bool] = mapped_column(Boolean, default=False)
    overdraft_limit_minor: Mapped[int] = mapped_column(BigInteger, default=0)  # e.g. a meter's emergency credit
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("kind", "owner", "currency", name="uq_ledger_accounts_kind_owner_currency"),
        # Guarded (credit-normal) accounts: natural balance = -balance_minor >= -overdraft_limit.
        CheckConstraint("NOT guarded OR balance_minor <= overdraft_limit_minor", name="guarded_not_overdrawn"),
        CheckConstraint("overdraft_limit_minor >= 0", name="overdraft_limit_not_negative"),
    )

    @property
    def credit_normal(self) -> bool:
        """Whether a credit increases what this account shows."""
        return self.kind in CREDIT_NORMAL


class JournalEntry(Base):
    """One movement of money: balanced postings written together, never edited."""

    __tablename__ = "journal_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(String(200))
    reference: Mapped[str | None] = mapped_column(String(100), index=True)  # e.g. "topup:12", "session:7"
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    postings: Mapped[list[Posting]] = relationship(back_populates="entry", order_by="Posting.id")


class Posting(Base):
    """A debit (positive) or credit (negative) of one account within an entry."""

    __tablename__ = "postings"

    id: Mapped[int] = mapped_column(primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("journal_entries.id"))
    account_id: Mapped[int] = mapped_column(ForeignKey("ledger_accounts.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))

    entry: Mapped[JournalEntry] = relationship(back_populates="postings")
    account: Mapped[LedgerAccount] = relationship()

    __table_args__ = (
        Index("ix_postings_account_entry", "account_id", "entry_id"),
        Index("ix_postings_entry_id", "entry_id"),
        CheckConstraint("amount_minor <> 0", name="not_zero"),
    )


def get_account(s: Session, kind: AccountKind, currency: str, owner: str = "", *, overdraft_limit_minor: int = 0) -> LedgerAccount:
    """The account of ``kind``/``owner``/``currency``, created on first use (race-safe)."""
    currency = check_currency(currency)
    stmt = select(LedgerAccount).where(LedgerAccount.kind == kind, LedgerAccount.owner == owner, LedgerAccount.currency == currency)
    acct = s.scalar(stmt)
    if acct is not None:
        return acct
    try:
        with s.begin_nested():
            acct = LedgerAccount(kind=kind, currency=currency, owner=owner, guarded=kind in GUARDED, balance_minor=0, overdraft_limit_minor=overdraft_limit_minor)
            s.add(acct)
    except IntegrityError:  # created concurrently
        acct = s.scalar(stmt)
        assert acct is not None
    return acct


def _net(postings: Sequence[tuple[LedgerAccount, int]]) -> dict[int, int]:
    net: dict[int, int] = defaultdict(int)
    for acct, amount in postings:
        net[acct.id] += amount
    return net


def post(
    s: Session,
    *,
    idempotency_key: str,
    description: str,
    postings: Iterable[tuple[LedgerAccount, Money]],
    reference: str | None = None,
) -> int:
    """Book one balanced entry (debits positive, credits negative) exactly once per ``idempotency_key``.

    Returns the entry's id (the first entry's id when the key was used before).
    Raises Unbalanced, CurrencyMismatch, InsufficientFunds or IdempotencyConflict;
    in every failure case nothing is written (the caller's transaction may go on).
    """
    rows: list[tuple[LedgerAccount, int]] = []
    totals: dict[str, int] = defaultdict(int)
    for acct, money in postings:
        if money.currency != acct.currency:
            raise CurrencyMismatch(f"account {acct.id} is {acct.currency}, posting is {money.currency}", "currency_mismatch")
        if money.amount == 0:
            continue
        rows.append((acct, money.amount))
        totals[money.currency] += money.amount
    if not rows:
        raise Unbalanced("an entry needs at least one non-zero posting")
    if any(totals.values()):
        raise Unbalanced(f"postings do not sum to zero: {dict(totals)}")

    # Guarded balances first, in account-id order, so concurrent entries lock rows in one order
    # (no deadlock) and a refused debit writes nothing. Core statements on the session's
    # connection: the ORM's bulk machinery costs more than the SQL here.
    accounts = {a.id: a for a, _ in rows}
    guarded = [(accounts[i], d) for i, d in sorted(_net(rows).items()) if accounts[i].guarded and d]
    applied: list[tuple[LedgerAccount, int]] = []
    try:
        for acct, delta in guarded:
            _apply_guarded(s, acct, delta)
            applied.append((acct, delta))
    except InsufficientFunds:
        _undo(s, applied)
        existing = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == idempotency_key))
        if existing is not None:  # a replay of a debit booked earlier, when the money was there
            _same_or_conflict(existing, rows)
            return existing.id
        raise
    # Then the entry claims its key: a concurrent writer of the same key waits for ours to commit
    # and then inserts nothing, so a replay finds the first entry and gives its balances back.
    entry_id = _insert_entry(s, idempotency_key, description[:200], reference, rows)
    if entry_id is None:
        _undo(s, applied)
        existing = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == idempotency_key))
        assert existing is not None
        _same_or_conflict(existing, rows)
        return existing.id
    return entry_id


def _insert_entry(s: Session, key: str, description: str, reference: str | None, rows: list[tuple[LedgerAccount, int]]) -> int | None:
    """Insert the entry and its postings; None when the key exists already (nothing inserted)."""
    conn = s.connection()
    now = utcnow()
    entries = JournalEntry.__table__
    entry_id = conn.execute(
        _insert_for(s)(entries)
        .values(idempotency_key=key, description=description, reference=reference, created_at=now)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(entries.c.id)
    ).scalar_one_or_none()
    if entry_id is not None:
        conn.execute(insert(Posting.__table__), [{"entry_id": entry_id, "account_id": a.id, "amount_minor": amt, "currency": a.currency} for a, amt in rows])
    return entry_id


def _undo(s: Session, applied: list[tuple[LedgerAccount, int]]) -> None:
    """Give back balance changes made earlier in this (uncommitted) entry."""
    for acct, delta in reversed(applied):
        _apply_guarded(s, acct, -delta, check=False)


def _insert_for(s: Session):
    """The dialect's INSERT with ON CONFLICT support (PostgreSQL or SQLite)."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - we support the two databases above
        raise LedgerError(f"unsupported database {name}")
    return dialect_insert


def _apply_guarded(s: Session, acct: LedgerAccount, delta: int, *, check: bool = True) -> None:
    """Add ``delta`` to a guarded account's cached balance, refusing to pass its limit (atomically)."""
    t = LedgerAccount.__table__
    stmt = update(t).where(t.c.id == acct.id).values(balance_minor=t.c.balance_minor + delta).returning(t.c.balance_minor)
    if check and delta > 0:  # a debit lowers a credit-normal balance: only then can the limit be passed
        stmt = stmt.where(t.c.balance_minor + delta <= t.c.overdraft_limit_minor)
    new = s.connection().execute(stmt).scalar_one_or_none()
    if new is None:
        s.refresh(acct, ["balance_minor"])
        short = delta + acct.balance_minor - acct.overdraft_limit_minor
        raise InsufficientFunds(acct, Money(short, acct.currency))
    # Record the new value without marking the object dirty: a flush must never write an absolute balance.
    set_committed_value(acct, "balance_minor", new)


def _same_or_conflict(entry: JournalEntry, rows: list[tuple[LedgerAccount, int]]) -> JournalEntry:
    mine = sorted((a.id, amt) for a, amt in rows)
    theirs = sorted((p.account_id, p.amount_minor) for p in entry.postings)
    if mine != theirs:
        raise IdempotencyConflict(f"idempotency key {entry.idempotency_key!r} was used for other postings")
    return entry


def balance(s: Session, acct: LedgerAccount) -> Money:
    """What the account shows, on its normal side (a wallet's money is positive)."""
    if acct.guarded:
        s.refresh(acct, ["balance_minor"])
        raw = acct.balance_minor
    else:
        raw = _sum_postings(s, acct.id)
    return Money(-raw if acct.credit_normal else raw, acct.currency)


def _sum_postings(s: Session, account_id: int, upto_entry_id: int | None = None) -> int:
    """Debit-positive sum of an account's postings (PostgreSQL sums BIGINT as NUMERIC: back to int)."""
    q = select(func.coalesce(func.sum(Posting.amount_minor), 0)).where(Posting.account_id == account_id)
    if upto_entry_id is not None:
        q = q.where(Posting.entry_id <= upto_entry_id)
    return int(s.scalar(q) or 0)


def posted_sum(s: Session, acct: LedgerAccount) -> Money:
    """The account's balance recomputed from its postings (audits the cached balance)."""
    raw = _sum_postings(s, acct.id)
    return Money(-raw if acct.credit_normal else raw, acct.currency)


def transfer(
    s: Session, *, idempotency_key: str, description: str, debit: LedgerAccount, credit: LedgerAccount, amount: Money, reference: str | None = None
) -> int:
    """Book ``amount`` from ``credit`` to ``debit`` (the common two-posting entry)."""
    if amount.amount <= 0:
        raise LedgerError("a transfer amount must be positive")
    return post(s, idempotency_key=idempotency_key, description=description, reference=reference, postings=[(debit, amount), (credit, -amount)])


def statement(s: Session, acct: LedgerAccount, *, limit: int = 100, before_entry_id: int | None = None) -> list[dict]:
    """The account's movements, newest first, each with the running balance after it (normal side)."""
    sign = -1 if acct.credit_normal else 1
    q = (
        select(Posting.entry_id, JournalEntry.created_at, JournalEntry.description, JournalEntry.reference, func.sum(Posting.amount_minor))
        .join(JournalEntry, JournalEntry.id == Posting.entry_id)
        .where(Posting.account_id == acct.id)
        .group_by(Posting.entry_id, JournalEntry.created_at, JournalEntry.description, JournalEntry.reference)
        .order_by(Posting.entry_id.desc())
    )
    if before_entry_id is not None:
        q = q.where(Posting.entry_id < before_entry_id)
    rows = s.execute(q.limit(limit)).all()
    if not rows:
        return []
    # Balance after the newest listed entry = sum of postings up to it.
    upto = _sum_postings(s, acct.id, upto_entry_id=rows[0][0])
    out = []
    running = sign * upto
    for entry_id, created_at, description, reference, amount in rows:
        out.append(
            {
                "entry_id": entry_id,
                "created_at": created_at,
                "description": description,
                "reference": reference,
                "amount": Money(sign * int(amount), acct.currency),
                "balance_after": Money(running, acct.currency),
            }
        )
        running -= sign * int(amount)
    return out


__all__ = [
    "AccountKind",
    "IdempotencyConflict",
    "InsufficientFunds",
    "JournalEntry",
    "LedgerAccount",
    "LedgerError",
    "Posting",
    "Unbalanced",
    "balance",
    "get_account",
    "post",
    "posted_sum",
    "statement",
    "transfer",
]
