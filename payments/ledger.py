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
from contextlib import contextmanager

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
    text,
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
    conn = s.connection()
    if len(guarded) <= 1 and len(rows) <= _PG_MAX_POSTINGS and conn.dialect.name == "postgresql":
        entry_id, booked = _post_pg(s, conn, idempotency_key, description[:200], reference, rows, guarded[0] if guarded else None)
    else:
        entry_id, booked = _post_steps(s, idempotency_key, description[:200], reference, rows, guarded)
    if booked:
        _note_posted(conn, rows)
    return entry_id


POSTED = "payments.ledger.posted"
"""``Connection.info`` key: ``{account id: debited}`` of the accounts ``post`` booked in the open transaction.

For whoever acts after the commit (``webapp.notifications.outbox`` queues a
low-balance check of the customer wallets debited); a rollback must clear it.
"""


def _note_posted(conn, rows: list[tuple[LedgerAccount, int]]) -> None:
    noted = conn.info.setdefault(POSTED, {})
    for acct, amount in rows:
        noted[acct.id] = noted.get(acct.id, False) or amount > 0


# One round trip for the common entry (PostgreSQL): the guarded account's conditional UPDATE (its
# row lock and limit check, first), then the entry claiming its key only if the UPDATE passed,
# then the postings only if the entry was inserted. Each step reads the one before, so they run
# in this order. Without a guarded account the entry is inserted unconditionally.
_PG_ENTRY = """e AS (
    INSERT INTO journal_entries (idempotency_key, description, reference, created_at)
    SELECT %(key)s, %(description)s, %(reference)s, %(now)s{cond}
    ON CONFLICT (idempotency_key) DO NOTHING RETURNING id
), p AS (
    INSERT INTO postings (entry_id, account_id, amount_minor, currency)
    SELECT e.id, x.a, x.m, x.c FROM e CROSS JOIN (VALUES {values}) AS x(a, m, c)
)"""


def _pg_post_sql(postings: int, guarded: bool) -> str:
    """The statement for an entry of ``postings`` postings, with or without a guarded account."""
    values = ", ".join(f"(%(a{i})s::integer, %(m{i})s::bigint, %(c{i})s::varchar)" for i in range(postings))
    if not guarded:
        return "WITH " + _PG_ENTRY.format(cond="", values=values) + "\nSELECT NULL, (SELECT id FROM e)"
    return ("WITH g AS (\n"
            "    UPDATE ledger_accounts SET balance_minor = balance_minor + %(delta)s::bigint\n"
            "    WHERE id = %(guarded)s::integer AND (%(delta)s::bigint <= 0 OR balance_minor + %(delta)s::bigint <= overdraft_limit_minor)\n"
            "    RETURNING balance_minor\n), " + _PG_ENTRY.format(cond=" WHERE EXISTS (SELECT FROM g)", values=values)
            + "\nSELECT (SELECT balance_minor FROM g), (SELECT id FROM e)")


_PG_SQL: dict[tuple[int, bool], str] = {}  # (postings, guarded) -> the statement; one prepared statement each
_PG_MAX_POSTINGS = 16  # a bigger entry goes statement by statement


def _post_pg(s: Session, conn, key: str, description: str, reference: str | None,
             rows: list[tuple[LedgerAccount, int]], guarded: tuple[LedgerAccount, int] | None) -> tuple[int, bool]:
    """``post`` in one statement on PostgreSQL, for an entry with at most one guarded account: (entry id, booked now)."""
    params = {"key": key, "description": description, "reference": reference, "now": utcnow()}
    for i, (a, amt) in enumerate(rows):
        params[f"a{i}"], params[f"m{i}"], params[f"c{i}"] = a.id, amt, a.currency
    sql_key = (len(rows), guarded is not None)
    sql = _PG_SQL.get(sql_key) or _PG_SQL.setdefault(sql_key, _pg_post_sql(*sql_key))
    if guarded is None:
        entry_id = conn.exec_driver_sql(sql, params).one()[1]
    else:
        acct, delta = guarded
        params.update(guarded=acct.id, delta=delta)
        new, entry_id = conn.exec_driver_sql(sql, params).one()
        if new is None:  # refused: past the limit (nothing written)
            existing = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == key))
            if existing is not None:  # a replay of a debit booked earlier, when the money was there
                return _same_or_conflict(existing, rows).id, False
            s.refresh(acct, ["balance_minor"])
            raise InsufficientFunds(acct, Money(delta + acct.balance_minor - acct.overdraft_limit_minor, acct.currency))
        if entry_id is None:  # the key was booked before (or concurrently, now committed): give the balance back
            _undo(s, [(acct, delta)])
        else:
            set_committed_value(acct, "balance_minor", new)
    if entry_id is None:
        existing = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == key))
        assert existing is not None
        return _same_or_conflict(existing, rows).id, False
    return entry_id, True


def _post_steps(s: Session, idempotency_key: str, description: str, reference: str | None,
                rows: list[tuple[LedgerAccount, int]], guarded: list[tuple[LedgerAccount, int]]) -> tuple[int, bool]:
    """``post`` statement by statement (SQLite, or several guarded accounts): (entry id, booked now)."""
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
            return existing.id, False
        raise
    # Then the entry claims its key: a concurrent writer of the same key waits for ours to commit
    # and then inserts nothing, so a replay finds the first entry and gives its balances back.
    entry_id = _insert_entry(s, idempotency_key, description, reference, rows)
    if entry_id is None:
        _undo(s, applied)
        existing = s.scalar(select(JournalEntry).where(JournalEntry.idempotency_key == idempotency_key))
        assert existing is not None
        _same_or_conflict(existing, rows)
        return existing.id, False
    return entry_id, True


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


def post_many(
    s: Session,
    entries: Sequence[tuple[str, str, str | None, Sequence[tuple[int, int, str]]]],
    *,
    past_limit: str = "refuse",
    booked: str = "skip",
) -> tuple[dict[str, int], dict[int, tuple[int, int]]]:
    """Book many balanced entries with a few statements, under the rules ``post`` keeps for one.

    ``entries``: ``(idempotency_key, description, reference, postings)`` with
    postings ``(account_id, amount_minor, currency)``, debits positive. The
    rules, as ``post``'s:

    * each entry's non-zero postings sum to zero per currency and there is at
      least one (``Unbalanced``); its currency is its account's
      (``CurrencyMismatch``); keys are unique in the call (``LedgerError``).
      All checked before anything is written.
    * a key books once: ``booked="skip"`` leaves out an entry whose key exists
      (it books nothing, as a replay of ``post`` does — the postings are not
      compared); ``booked="fail"`` writes every entry without looking (with
      COPY on PostgreSQL) and a key that exists fails the statement (an
      IntegrityError: the caller's transaction rolls back). Use "fail" where the caller knows its
      keys are new (it checked under a lock), for speed.
    * guarded accounts (wallets) get their cached balance changed by the net of
      the entries booked, in one UPDATE, their rows locked first in account-id
      order (one order for every writer, as ``post`` takes them: no deadlock). ``past_limit="refuse"``: a debit past an
      account's overdraft limit raises ``InsufficientFunds`` and nothing is
      written; ``"raise_limit"``: the debit is booked and the account's
      ``overdraft_limit_minor`` raised to what it now uses (the CHECK
      constraint holds) — for consumption that happened and must be billed
      whatever the balance (``webapp.meters.readings``).

    Returns ``({key: entry id}`` of the entries booked by this call, ``{account
    id: (balance_minor, overdraft_limit_minor)}`` after the call for the
    guarded accounts it changed). Postings go in with COPY on PostgreSQL, which
    SQLAlchemy's execute events do not see (a customer wallet's low-balance
    check is queued from them): book customer wallets with ``post``.
    """
    if past_limit not in ("refuse", "raise_limit") or booked not in ("skip", "fail"):
        raise ValueError("past_limit is 'refuse' or 'raise_limit'; booked is 'skip' or 'fail'")
    todo: list[tuple[str, str, str | None, list[tuple[int, int, str]]]] = []
    keys: set[str] = set()
    account_ids: set[int] = set()
    for key, description, reference, postings in entries:
        if key in keys:
            raise LedgerError(f"idempotency key {key!r} twice in one call")
        keys.add(key)
        rows = [(a, amt, cur) for a, amt, cur in postings if amt]
        if not rows:
            raise Unbalanced(f"entry {key!r} needs at least one non-zero posting")
        totals: dict[str, int] = defaultdict(int)
        for a, amt, cur in rows:
            totals[cur] += amt
            account_ids.add(a)
        if any(totals.values()):
            raise Unbalanced(f"entry {key!r}: postings do not sum to zero: {dict(totals)}")
        todo.append((key, description[:200], reference, rows))
    if not todo:
        return {}, {}
    pg = s.get_bind().dialect.name == "postgresql"
    t = LedgerAccount.__table__
    info = {r[0]: (r[1], bool(r[2])) for r in s.execute(select(t.c.id, t.c.currency, t.c.guarded).where(_in(s, t.c.id, account_ids)))}
    for key, _d, _r, rows in todo:
        for a, _amt, cur in rows:
            if a not in info:
                raise LedgerError(f"entry {key!r}: no ledger account {a}")
            if info[a][0] != cur:
                raise CurrencyMismatch(f"account {a} is {info[a][0]}, posting is {cur}", "currency_mismatch")

    if booked == "skip":  # leave out the keys booked before; one booked concurrently from now on is caught at its insert
        je = JournalEntry.__table__
        done = set(s.scalars(select(je.c.idempotency_key).where(_in(s, je.c.idempotency_key, keys))))
        if done:
            todo = [e for e in todo if e[0] not in done]
            if not todo:
                return {}, {}

    deltas: dict[int, int] = defaultdict(int)
    for _k, _d, _r, rows in todo:
        for a, amt, _c in rows:
            if info[a][1]:
                deltas[a] += amt
    balances = _apply_guarded_many(s, {a: d for a, d in sorted(deltas.items()) if d}, past_limit, pg)

    now = utcnow()
    entry_ids: dict[str, int] = {}
    if pg and booked == "fail":
        ids = next_ids(s, "journal_entries", len(todo))
        _copy(s, "journal_entries", ("id", "idempotency_key", "description", "reference", "created_at"),
              [(i, k, d, r, now) for i, (k, d, r, _p) in zip(ids, todo, strict=True)])
        entry_ids = {e[0]: i for i, e in zip(ids, todo, strict=True)}
    else:
        je = JournalEntry.__table__
        stmt = insert(je) if booked == "fail" else _insert_for(s)(je).on_conflict_do_nothing(index_elements=["idempotency_key"])
        for i in range(0, len(todo), 5000):
            part = todo[i:i + 5000]
            entry_ids.update({k: i_ for i_, k in s.execute(stmt.returning(je.c.id, je.c.idempotency_key), [
                {"idempotency_key": k, "description": d, "reference": r, "created_at": now} for k, d, r, _p in part])})
        missing = [e for e in todo if e[0] not in entry_ids]
        if missing:  # booked concurrently after our look-up: book nothing of those (their balances given back)
            back: dict[int, int] = defaultdict(int)
            for _k, _d, _r, rows in missing:
                for a, amt, _c in rows:
                    if info[a][1]:
                        back[a] -= amt
            balances.update(_apply_guarded_many(s, {a: d for a, d in sorted(back.items()) if d}, "refuse", pg, check=False))
    posting_rows = [(entry_ids[k], a, amt, cur) for k, _d, _r, rows in todo if k in entry_ids for a, amt, cur in rows]
    if pg:
        _copy(s, "postings", ("entry_id", "account_id", "amount_minor", "currency"), posting_rows)
    elif posting_rows:
        s.connection().execute(insert(Posting.__table__), [{"entry_id": e, "account_id": a, "amount_minor": amt, "currency": c}
                                                           for e, a, amt, c in posting_rows])
    if balances:  # objects the caller holds must not write an old balance back
        for key in [k for k in s.identity_map.keys() if k[0] is LedgerAccount and k[1][0] in balances]:
            obj = s.identity_map.get(key)
            if obj is not None:
                set_committed_value(obj, "balance_minor", balances[key[1][0]][0])
                set_committed_value(obj, "overdraft_limit_minor", balances[key[1][0]][1])
    return entry_ids, balances


def next_ids(s: Session, table: str, n: int) -> list[int]:
    """``n`` ids drawn from ``table``'s ``id`` sequence (PostgreSQL), for rows a COPY will write with their ids.

    The sequence's name is looked up once, not once per id, and the ids come
    back in one array: a row per id cost more to fetch than to draw.
    """
    seq = s.scalar(select(func.pg_get_serial_sequence(table, "id")))
    return list(s.scalar(text("SELECT array_agg(nextval(CAST(:seq AS regclass))) FROM generate_series(1, :n)"), {"seq": seq, "n": n}))


def _in(s: Session, col, values):
    """``col IN values``; on PostgreSQL ``col = ANY(array)``: one statement text whatever the number of values."""
    values = list(values)
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy import any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        return col == any_(bindparam(None, values, type_=ARRAY(col.type)))
    return col.in_(values)


def _apply_guarded_many(s: Session, deltas: dict[int, int], past_limit: str, pg: bool, *, check: bool = True) -> dict[int, tuple[int, int]]:
    """Add each delta to its guarded account's cached balance in one statement (account-id order); ``post_many``'s limit rule."""
    if not deltas:
        return {}
    t = LedgerAccount.__table__
    ids, ds = list(deltas), [deltas[a] for a in deltas]
    raise_limit = past_limit == "raise_limit"
    if pg:
        # The rows locked in id order first: an UPDATE … FROM takes its rows in whatever order its plan visits them.
        s.connection().execute(text("SELECT id FROM ledger_accounts WHERE id = ANY(CAST(:ids AS INTEGER[])) ORDER BY id FOR UPDATE"),
                               {"ids": sorted(ids)}).all()
        new = "a.balance_minor + v.d"
        sql = f"UPDATE ledger_accounts AS a SET balance_minor = {new}"
        if raise_limit:
            sql += f", overdraft_limit_minor = GREATEST(a.overdraft_limit_minor, {new})"
        sql += " FROM unnest(CAST(:ids AS INTEGER[]), CAST(:ds AS BIGINT[])) AS v(id, d) WHERE a.id = v.id"
        if check and not raise_limit:
            sql += f" AND (v.d <= 0 OR {new} <= a.overdraft_limit_minor)"
        sql += " RETURNING a.id, a.balance_minor, a.overdraft_limit_minor"
        got = {r[0]: (int(r[1]), int(r[2])) for r in s.connection().execute(text(sql), {"ids": ids, "ds": ds})}
    else:
        got = {}
        for a, d in zip(ids, ds):
            new = t.c.balance_minor + d
            stmt = update(t).where(t.c.id == a).values(balance_minor=new)
            if raise_limit:
                stmt = stmt.values(overdraft_limit_minor=func.max(t.c.overdraft_limit_minor, new))
            elif check and d > 0:
                stmt = stmt.where(new <= t.c.overdraft_limit_minor)
            r = s.connection().execute(stmt.returning(t.c.balance_minor, t.c.overdraft_limit_minor)).first()
            if r is not None:
                got[a] = (int(r[0]), int(r[1]))
    refused = [a for a in ids if a not in got]
    if refused:
        undo = {a: -deltas[a] for a in got}
        if undo:
            _apply_guarded_many(s, undo, "refuse", pg, check=False)
        acct = s.get(LedgerAccount, refused[0])
        s.refresh(acct, ["balance_minor", "overdraft_limit_minor"])
        raise InsufficientFunds(acct, Money(deltas[refused[0]] + acct.balance_minor - acct.overdraft_limit_minor, acct.currency))
    return got


@contextmanager
def _copying(s: Session, table: str, cols: Sequence[str]):
    """A COPY into ``table`` on the session's own connection (PostgreSQL): yields psycopg's Copy object.

    A row that breaks a constraint fails the whole COPY (nothing of it is
    written), raised as SQLAlchemy's exception for it (an ``IntegrityError``
    for a duplicate key), as a statement would be. While it is open, a
    statement through SQLAlchemy raises ``RuntimeError`` rather than waiting
    for ever on the busy connection.
    """
    import psycopg
    from sqlalchemy import event
    from sqlalchemy.exc import DBAPIError

    def busy(*_args, **_kw):
        raise RuntimeError(f"a statement while rows are copied into {table}: the connection is busy with the COPY")

    sql = f'COPY {table} ({", ".join(cols)}) FROM STDIN'
    conn = s.connection()
    raw = conn.connection.dbapi_connection
    event.listen(conn, "before_cursor_execute", busy)
    try:
        with raw.cursor() as cur, cur.copy(sql) as cp:
            yield cp
    except psycopg.Error as e:
        raise DBAPIError.instance(sql, None, e, psycopg.Error, dialect=s.get_bind().dialect) from e
    finally:
        event.remove(conn, "before_cursor_execute", busy)


def _copy(s: Session, table: str, cols: Sequence[str], rows: Iterable[Sequence]) -> None:
    """COPY ``rows`` (sequences in ``cols`` order) into ``table`` (PostgreSQL; ``_copying`` says what fails how).

    ``rows`` may be a generator doing the caller's work while the database
    stores the rows already sent; it must not run a statement: the
    connection is in the COPY.
    """
    with _copying(s, table, cols) as cp:
        write = cp.write_row
        for r in rows:
            write(r)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """``value`` as a field of COPY's text format (backslash, tab, newline and carriage return escaped)."""
    return value.translate(_COPY_ESCAPES) if ("\\" in value or "\t" in value or "\n" in value or "\r" in value) else value


def _copy_lines(s: Session, table: str, cols: Sequence[str], lines: Iterable[str], *, block: int = 2000) -> None:
    """``_copy`` for rows the caller formats itself: each item one line of COPY's text format, ``\\n`` included.

    Cheaper than ``_copy`` for wide batches (psycopg formats a row value by
    value); the caller escapes text with ``copy_text`` and writes NULL as
    ``\\N``. Lines go out ``block`` at a time, so the database stores the
    first while the generator makes the next; no statement inside the
    generator.
    """
    with _copying(s, table, cols) as cp:
        buf: list[str] = []
        for line in lines:
            buf.append(line)
            if len(buf) >= block:
                cp.write("".join(buf))
                buf.clear()
        if buf:
            cp.write("".join(buf))


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
    "post_many",
    "posted_sum",
    "statement",
    "transfer",
]
