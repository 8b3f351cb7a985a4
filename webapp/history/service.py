"""What one account did in one month, read from the system of record; no Flask here.

Each function takes the database session, the account (``user_id`` and its
``owner`` string ``user:<id>``) and a ``Month``, and returns plain
dataclasses the page, the CSV and the statement PDF all render, so the three
always show the same rows.

The wallet part sums the ledger's postings itself (by the entries' booking
time) rather than paging ``payments.ledger.statement`` (which pages by entry
id): a month needs the balance at its first instant, every movement inside
it, and a closing balance that is the opening plus the movements, exactly.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from payments.cards import CardPayment, Purpose
from payments.cards import State as CardState
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting
from payments.money import Money
from webapp.charging.models import ChargingSession
from webapp.models import Charger, Connector

MONTH_RE = re.compile(r"^([0-9]{4})-([0-9]{2})$")
FIRST_YEAR, LAST_YEAR = 2000, 9998  # anything outside is a typo, not a month with data (and 9999-12 has no next month)


class BadMonth(ValueError):
    """The month parameter is not a month we can show."""


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month, ``YYYY-MM``."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """``"2026-03"`` → Month(2026, 3); BadMonth for anything else (``2026-3``, ``2026-13``, ``march``)."""
        match = MONTH_RE.match(text or "")
        if not match:
            raise BadMonth(text)
        year, month = int(match.group(1)), int(match.group(2))
        if not (1 <= month <= 12 and FIRST_YEAR <= year <= LAST_YEAR):
            raise BadMonth(text)
        return cls(year, month)

    @classmethod
    def of(cls, instant: dt.datetime, tz: dt.tzinfo) -> Month:
        """The month ``instant`` falls in, in zone ``tz``."""
        local = instant.astimezone(tz)
        return cls(local.year, local.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def first_day(self) -> dt.date:
        """Its first day."""
        return dt.date(self.year, self.month, 1)

    def next(self) -> Month:
        """The month after."""
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Month:
        """The month before."""
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def bounds(self, tz: dt.tzinfo) -> tuple[dt.datetime, dt.datetime]:
        """[start, end) as aware UTC instants: midnight of the 1st in ``tz`` to midnight of the next 1st."""
        nxt = self.next()
        start = dt.datetime(self.year, self.month, 1, tzinfo=tz)
        end = dt.datetime(nxt.year, nxt.month, 1, tzinfo=tz)
        return start.astimezone(dt.UTC), end.astimezone(dt.UTC)


def zone(name: str | dt.tzinfo | None) -> dt.tzinfo:
    """A tzinfo from a zone name (UTC when unknown)."""
    if isinstance(name, dt.tzinfo):
        return name
    try:
        return ZoneInfo(str(name or "UTC"))
    except (KeyError, ValueError):
        return dt.UTC


# -- rows ------------------------------------------------------------------------------------------


@dataclass
class SessionRow:
    """One charging session of the month."""

    id: int
    at: dt.datetime
    site: str
    connector_code: str
    energy_kwh: Decimal
    paid: Money | None  # captured; None while not billed yet
    refunded: Money
    state: str  # SessionState value
    document_number: str | None  # its invoice (the latest, when reissued)


@dataclass
class TopUpRow:
    """One wallet top-up attempt of the month (failed ones too: the person tried to pay)."""

    id: int
    at: dt.datetime
    amount: Money  # captured when it succeeded, else what was asked
    refunded: Money
    card_brand: str | None
    card_last4: str | None
    state: str  # payments.cards.State value
    document_number: str | None


@dataclass
class DocumentRow:
    """One document issued in the month; a credit note's total is negative."""

    number: str
    kind: str  # DocumentKind value
    at: dt.datetime
    total: Money  # signed
    original_number: str | None


@dataclass
class WalletMovement:
    """One journal entry's effect on the wallet."""

    entry_id: int
    at: dt.datetime
    description: str  # as booked (English); the views translate
    reference: str | None
    amount: Money  # + in, − out
    balance_after: Money


@dataclass
class WalletMonth:
    """One wallet (one currency) over the month: opening + Σ movements = closing."""

    currency: str
    opening: Money
    closing: Money
    movements: list[WalletMovement] = field(default_factory=list)

    @property
    def money_in(self) -> Money:
        """What came in during the month."""
        return Money(sum(m.amount.amount for m in self.movements if m.amount.amount > 0), self.currency)

    @property
    def money_out(self) -> Money:
        """What went out during the month (negative)."""
        return Money(sum(m.amount.amount for m in self.movements if m.amount.amount < 0), self.currency)


@dataclass
class MonthHistory:
    """Everything of one account in one month."""

    month: Month
    sessions: list[SessionRow]
    top_ups: list[TopUpRow]
    documents: list[DocumentRow]
    wallets: list[WalletMonth]

    def totals(self) -> list[dict]:
        """Per currency: paid for charging, refunded, energy, topped up, documents' net total."""
        out: dict[str, dict] = {}

        def of(cur: str) -> dict:
            return out.setdefault(cur, {"currency": cur, "charging_paid": 0, "charging_refunded": 0, "energy_kwh": Decimal("0"),
                                        "sessions": 0, "top_ups": 0, "documents": 0})

        for r in self.sessions:
            if r.paid is not None:
                t = of(r.paid.currency)
                t["charging_paid"] += r.paid.amount
                t["charging_refunded"] += r.refunded.amount
                t["energy_kwh"] += r.energy_kwh
                t["sessions"] += 1
        for r in self.top_ups:
            if r.state == CardState.SUCCEEDED.value:
                of(r.amount.currency)["top_ups"] += r.amount.amount
        for r in self.documents:
            of(r.total.currency)["documents"] += r.total.amount
        result = []
        for cur in sorted(out):
            t = out[cur]
            result.append({"currency": cur, "sessions": t["sessions"], "energy_kwh": t["energy_kwh"],
                           **{k: Money(t[k], cur) for k in ("charging_paid", "charging_refunded", "top_ups", "documents")}})
        return result


# -- queries ---------------------------------------------------------------------------------------


def _latest_documents(s: Session, owner: str, sources: list[str]) -> dict[str, str]:
    """source → number of its latest invoice or receipt (a reissue replaces the first), of ``owner`` only."""
    if not sources:
        return {}
    rows = s.execute(
        select(Document.source, Document.number)
        .where(Document.owner == owner, Document.source.in_(sources), Document.kind != DocumentKind.CREDIT_NOTE)
        .order_by(Document.id)
    ).all()
    return {source: number for source, number in rows}  # later ids overwrite earlier ones


def charging_sessions(s: Session, *, user_id: int, owner: str, start: dt.datetime, end: dt.datetime) -> list[SessionRow]:
    """The account's sessions created in [start, end), oldest first."""
    q = (
        select(ChargingSession)
        .where(ChargingSession.user_id == user_id, ChargingSession.created_at >= start, ChargingSession.created_at < end)
        .options(joinedload(ChargingSession.connector).joinedload(Connector.charger).joinedload(Charger.site))
        .order_by(ChargingSession.created_at, ChargingSession.id)
    )
    sessions = list(s.scalars(q).unique())
    docs = _latest_documents(s, owner, [f"session:{cs.id}" for cs in sessions])
    rows = []
    for cs in sessions:
        connector = cs.connector
        rows.append(SessionRow(
            id=cs.id,
            at=cs.created_at,
            site=connector.charger.site.name,
            connector_code=connector.connector_code,
            energy_kwh=(Decimal(cs.energy_wh or 0) / 1000).quantize(Decimal("0.001")),
            paid=Money(cs.captured_minor, cs.currency) if cs.captured_minor is not None else None,
            refunded=Money(cs.refunded_minor or 0, cs.currency),
            state=cs.state.value,
            document_number=docs.get(f"session:{cs.id}"),
        ))
    return rows


def top_ups(s: Session, *, owner: str, start: dt.datetime, end: dt.datetime) -> list[TopUpRow]:
    """The account's wallet top-ups made in [start, end), oldest first."""
    q = (
        select(CardPayment)
        .where(CardPayment.owner == owner, CardPayment.purpose == Purpose.WALLET_TOP_UP,
               CardPayment.created_at >= start, CardPayment.created_at < end)
        .order_by(CardPayment.created_at, CardPayment.id)
    )
    payments = list(s.scalars(q))
    docs = _latest_documents(s, owner, [f"card_payment:{p.id}" for p in payments])
    return [
        TopUpRow(
            id=p.id,
            at=p.created_at,
            amount=p.captured if p.state == CardState.SUCCEEDED else p.amount,
            refunded=Money(p.refunded_minor or 0, p.currency),
            card_brand=p.card_brand,
            card_last4=p.card_last4,
            state=p.state.value,
            document_number=docs.get(f"card_payment:{p.id}"),
        )
        for p in payments
    ]


def documents(s: Session, *, owner: str, start: dt.datetime, end: dt.datetime) -> list[DocumentRow]:
    """The account's documents issued in [start, end), oldest first; credit notes negative."""
    q = (
        select(Document)
        .where(Document.owner == owner, Document.issued_at >= start, Document.issued_at < end)
        .options(joinedload(Document.original))
        .order_by(Document.issued_at, Document.id)
    )
    rows = []
    for d in s.scalars(q):
        sign = -1 if d.kind == DocumentKind.CREDIT_NOTE else 1
        rows.append(DocumentRow(number=d.number, kind=d.kind.value, at=d.issued_at, total=Money(sign * d.total_minor, d.currency),
                                original_number=d.original.number if d.original is not None else None))
    return rows


def wallet_months(s: Session, *, owner: str, start: dt.datetime, end: dt.datetime) -> list[WalletMonth]:
    """Each of the account's wallets (one per currency): balance at ``start``, the movements until ``end``, balance then.

    The wallet is a liability (credit-normal): a posting's debit-positive
    amount is negated to read as the customer's money.
    """
    accounts = list(s.scalars(
        select(LedgerAccount).where(LedgerAccount.kind == AccountKind.CUSTOMER_WALLET, LedgerAccount.owner == owner).order_by(LedgerAccount.currency)
    ))
    out = []
    for acct in accounts:
        sign = -1 if acct.credit_normal else 1
        before = s.scalar(
            select(func.coalesce(func.sum(Posting.amount_minor), 0))
            .join(JournalEntry, JournalEntry.id == Posting.entry_id)
            .where(Posting.account_id == acct.id, JournalEntry.created_at < start)
        )
        rows = s.execute(
            select(Posting.entry_id, JournalEntry.created_at, JournalEntry.description, JournalEntry.reference, func.sum(Posting.amount_minor))
            .join(JournalEntry, JournalEntry.id == Posting.entry_id)
            .where(Posting.account_id == acct.id, JournalEntry.created_at >= start, JournalEntry.created_at < end)
            .group_by(Posting.entry_id, JournalEntry.created_at, JournalEntry.description, JournalEntry.reference)
            .order_by(JournalEntry.created_at, Posting.entry_id)
        ).all()
        running = sign * int(before)  # PostgreSQL sums BIGINT as NUMERIC
        opening = Money(running, acct.currency)
        movements = []
        for entry_id, created_at, description, reference, amount in rows:
            delta = sign * int(amount)
            if delta == 0:
                continue  # an entry that moved money in and out of the wallet at once changes nothing a person sees
            running += delta
            movements.append(WalletMovement(entry_id, created_at, description, reference, Money(delta, acct.currency), Money(running, acct.currency)))
        if not movements and opening.amount == 0:
            continue  # a wallet that has never held money this early says nothing
        out.append(WalletMonth(acct.currency, opening, Money(running, acct.currency), movements))
    return out


def month_history(s: Session, *, user_id: int, owner: str, month: Month, tz: dt.tzinfo) -> MonthHistory:
    """Everything of the account in ``month`` (bounds in ``tz``)."""
    start, end = month.bounds(tz)
    return MonthHistory(
        month=month,
        sessions=charging_sessions(s, user_id=user_id, owner=owner, start=start, end=end),
        top_ups=top_ups(s, owner=owner, start=start, end=end),
        documents=documents(s, owner=owner, start=start, end=end),
        wallets=wallet_months(s, owner=owner, start=start, end=end),
    )
