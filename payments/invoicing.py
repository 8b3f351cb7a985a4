"""Receipts, invoices and credit notes: gapless numbering, lines and VAT per rate. No Flask here.

A **document** is issued for every captured payment, in the transaction that
books the capture, and never changes afterwards: it keeps a frozen copy of
everything it shows (``content``), so renaming a site or changing a tariff
later cannot alter an issued invoice. A refund or a correction issues a
**credit note** in its own series, referencing the original.

**Numbering.** One series per seller (``scope``: ``"operator:<id>"`` or
``"platform"``), kind and calendar year, e.g. ``VP-2026-000123`` and
``VP-CN-2026-000004``. The next number is taken from the series row under a
row lock (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite transactions are
already exclusive) in the capture's own transaction: a capture that rolls back
gives its number back, so a series has no gap and no duplicate.

**VAT.** Prices shown to drivers include VAT; the captured amount is what the
card or wallet paid. The rule, so that every figure adds up to the cent:

1. the captured amount is divided among the VAT rates of the priced lines by
   the largest remainder method, weighted by each rate's exact price incl. VAT
   (``gross`` per rate; the grosses add up to the captured amount exactly);
2. per rate, ``net = round_half_up(gross × 100 / (100 + rate))`` and
   ``vat = gross − net`` (VAT computed from the VAT-inclusive amount, as on a
   retail receipt);
3. each rate's net is divided among its lines, largest remainder weighted by
   each line's exact price excl. VAT. When something was not charged (the
   cost passed the amount held, or the tariff's minimum/maximum price moved
   the total), the lines show the full price and one adjustment line per rate
   shows the difference, so ``Σ lines = Σ net`` always.

A credit note divides its amount over the original's rates the same way,
weighted by what is still uncredited per rate; the credit that brings a rate
to zero takes exactly the remaining net and VAT, so a full refund cancels the
original to the cent however it was split.
"""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import BigInteger, Enum, ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from payments.base import Base, UTCDateTime, utcnow
from payments.money import Money, MoneyError, exponent, to_minor

__all__ = [
    "DocumentKind", "DocumentSeries", "Document", "Line", "VatGroup", "InvoiceError",
    "allocate", "largest_remainder", "vat_groups", "charging_lines", "credit_split",
    "issue", "credited", "on_issued", "number_of",
]


class InvoiceError(ValueError):
    """A document cannot be issued as asked (nothing left to credit, a mismatch, ...)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class DocumentKind(enum.StrEnum):
    """What a document is."""

    INVOICE = "invoice"  # a sale with VAT (a charging session, a bill, metered electricity)
    RECEIPT = "receipt"  # a prepayment without VAT (wallet credit: VAT is due when the credit is spent)
    CREDIT_NOTE = "credit_note"  # a refund or a correction of an invoice or a receipt


def _enum(cls):
    return Enum(cls, name=cls.__name__.lower(), native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class DocumentSeries(Base):
    """The counter of one gapless series: one per seller, kind and year."""

    __tablename__ = "document_series"

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))  # "operator:<id>" or "platform": the seller
    kind: Mapped[DocumentKind] = mapped_column(_enum(DocumentKind))
    year: Mapped[int] = mapped_column(Integer)
    prefix: Mapped[str] = mapped_column(String(24))  # e.g. "VP" or "VP-CN"
    next_number: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (UniqueConstraint("scope", "kind", "year", name="uq_document_series_scope_kind_year"),)


class Document(Base):
    """An issued receipt, invoice or credit note: frozen, never edited."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[DocumentKind] = mapped_column(_enum(DocumentKind), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("document_series.id"))
    sequence: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)  # what caused it: one document per cause
    scope: Mapped[str] = mapped_column(String(64), index=True)  # the seller
    owner: Mapped[str] = mapped_column(String(64), index=True)  # who may see it: "user:42" or "guest:…"
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)  # the buyer's account, if any
    email: Mapped[str | None] = mapped_column(String(254), index=True)  # where it is sent
    locale: Mapped[str] = mapped_column(String(8), default="en")  # the buyer's language: the document's language
    source: Mapped[str] = mapped_column(String(64), index=True)  # "session:7", "card_payment:12", "meter_top_up:3", ...
    original_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id"), index=True)  # a credit note's invoice
    replaces_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id"))  # reissued with the buyer's company details
    currency: Mapped[str] = mapped_column(String(3))
    net_minor: Mapped[int] = mapped_column(BigInteger)  # credit notes: positive amounts (they are shown as negative)
    vat_minor: Mapped[int] = mapped_column(BigInteger)
    total_minor: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    verify_token: Mapped[str] = mapped_column(String(32), unique=True)  # in the QR code: the public check page
    content: Mapped[str] = mapped_column(Text)  # JSON: seller, buyer, lines, VAT, payment, session facts, branding

    original: Mapped[Document | None] = relationship(remote_side="Document.id", foreign_keys=[original_id])

    @property
    def total(self) -> Money:
        """The document's total (a credit note's is what it gives back)."""
        return Money(self.total_minor, self.currency)


@dataclass(frozen=True)
class Line:
    """One line of a document: net amount in minor units at one VAT rate (``None``: outside the scope of VAT)."""

    kind: str  # energy, time, parking, flat, adjustment, wallet_credit, ...
    quantity: Decimal | None
    unit: str | None  # kWh, h, session
    unit_price: Decimal | None  # excl. VAT
    vat_rate: Decimal | None  # percent
    net_minor: int
    note: str | None = None  # the adjustment's reason: above_hold, min_price, max_price

    def as_json(self) -> dict:
        return {"kind": self.kind, "quantity": None if self.quantity is None else str(self.quantity), "unit": self.unit,
                "unit_price": None if self.unit_price is None else str(self.unit_price),
                "vat_rate": None if self.vat_rate is None else str(self.vat_rate), "net": self.net_minor, "note": self.note}


@dataclass(frozen=True)
class VatGroup:
    """The VAT of one rate: net + vat = gross, in minor units."""

    rate: Decimal | None
    net_minor: int
    vat_minor: int

    @property
    def gross_minor(self) -> int:
        return self.net_minor + self.vat_minor

    def as_json(self) -> dict:
        return {"rate": None if self.rate is None else str(self.rate), "net": self.net_minor, "vat": self.vat_minor,
                "gross": self.gross_minor}


# --------------------------------------------------------------------------- arithmetic


def largest_remainder(total: int, weights: Sequence[Decimal | int]) -> list[int]:
    """Divide the integer ``total`` in proportion to ``weights`` so the parts add up to it exactly.

    Each part is the floor of its exact share; the units left over go to the
    largest fractional remainders (ties: the earlier weight). Zero or negative
    total weights put everything on the first part. Works for negative totals
    (the parts are the negated division of ``-total``).
    """
    if not weights:
        if total:
            raise InvoiceError("nothing to divide the amount over", "no_weights")
        return []
    if total < 0:
        return [-x for x in largest_remainder(-total, weights)]
    ws = [max(Decimal(w), Decimal(0)) for w in weights]
    wsum = sum(ws)
    if wsum == 0:
        return [total] + [0] * (len(ws) - 1)
    exact = [Decimal(total) * w / wsum for w in ws]
    parts = [int(e) for e in exact]  # floor: all non-negative
    left = total - sum(parts)
    order = sorted(range(len(ws)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def _net_of(gross: int, rate: Decimal | None) -> int:
    if rate is None or rate == 0:
        return gross
    return int((Decimal(gross) * 100 / (100 + rate)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def vat_groups(gross_by_rate: Mapping[Decimal | None, int]) -> list[VatGroup]:
    """Net and VAT of each rate's gross amount (rule 2 of the module docstring), highest rate first."""
    out = [VatGroup(rate, _net_of(g, rate), g - _net_of(g, rate)) for rate, g in gross_by_rate.items()]
    return sorted(out, key=lambda v: (v.rate is None, -(v.rate or 0)))


def allocate(total_minor: int, weights_by_rate: Mapping[Decimal | None, Decimal]) -> dict[Decimal | None, int]:
    """Rule 1: ``total_minor`` divided among the rates in proportion to their exact gross weights."""
    rates = list(weights_by_rate)
    return dict(zip(rates, largest_remainder(total_minor, [weights_by_rate[r] for r in rates]), strict=True))


def _rate(v) -> Decimal:
    return Decimal(0) if v is None else Decimal(str(v))


_DIMENSIONS = {"ENERGY": "energy", "TIME": "time", "PARKING_TIME": "parking", "FLAT": "flat"}
_ORDER = {"flat": 0, "energy": 1, "time": 2, "parking": 3}


def charging_lines(priced: Mapping, currency: str, captured_minor: int) -> tuple[list[Line], list[VatGroup]]:
    """Lines and VAT groups of a priced charging session of which ``captured_minor`` was paid (rules 1–3).

    ``priced`` is the tariff engine's result (``payments.tariffs.price``):
    its ``breakdown`` lines are grouped by kind, unit price and VAT rate
    (quantities summed); ``total_cost`` gives what the session cost in full.
    """
    exponent(currency)  # refuses an unknown currency
    if captured_minor < 0:
        raise InvoiceError("a captured amount cannot be negative", "negative")
    groups: dict[tuple, list] = {}
    for b in priced.get("breakdown") or ():
        kind = _DIMENSIONS.get(str(b["dimension"]), str(b["dimension"]).lower())
        rate = _rate(b.get("vat"))
        key = (kind, Decimal(str(b["unit_price"])), rate)
        g = groups.setdefault(key, [Decimal(0), Decimal(0), Decimal(0), b.get("unit")])
        g[0] += Decimal(str(b.get("billed_quantity", b.get("quantity", 0))))
        g[1] += Decimal(str(b["cost"]["excl_vat"]))
        g[2] += Decimal(str(b["cost"]["incl_vat"]))
    keys = sorted(groups, key=lambda k: (_ORDER.get(k[0], 9), k[2], k[1]))
    gross_w: dict[Decimal | None, Decimal] = {}
    for k in keys:
        gross_w[k[2]] = gross_w.get(k[2], Decimal(0)) + groups[k][2]
    if not gross_w:  # a minimum price with nothing priced: one line at the total's implied rate
        excl, incl = Decimal(str(priced["total_cost"]["excl_vat"])), Decimal(str(priced["total_cost"]["incl_vat"]))
        rate = Decimal(0) if excl == 0 else ((incl - excl) * 100 / excl).quantize(Decimal("0.01"))
        gross_w = {rate: max(incl, Decimal(1))}
    gross = allocate(captured_minor, gross_w)
    vat = vat_groups(gross)
    net_by_rate = {v.rate: v.net_minor for v in vat}
    full_incl = to_minor(Decimal(str(priced["total_cost"]["incl_vat"])), currency).amount
    adjusted = captured_minor != full_incl or bool(priced.get("price_adjustment"))
    reason = "above_hold" if captured_minor < full_incl else ((priced.get("price_adjustment") or {}).get("reason") or "rounding")
    lines: list[Line] = []
    for rate in gross_w:
        ks = [k for k in keys if k[2] == rate]
        if not ks:
            lines.append(Line("adjustment", None, None, None, rate, net_by_rate[rate], str(reason).lower()))
            continue
        excl_exact = [groups[k][1] for k in ks]
        target = net_by_rate[rate]
        shown = to_minor(sum(excl_exact), currency).amount if adjusted else target
        parts = largest_remainder(shown, excl_exact)
        for k, part in zip(ks, parts, strict=True):
            lines.append(Line(k[0], groups[k][0], groups[k][3], k[1], rate, part))
        if shown != target:
            lines.append(Line("adjustment", None, None, None, rate, target - shown, str(reason).lower()))
    return lines, vat


def credit_split(original: Sequence[VatGroup], already: Sequence[Sequence[VatGroup]], amount_minor: int) -> list[VatGroup]:
    """The VAT groups of a credit of ``amount_minor`` against ``original`` after the credits ``already`` issued.

    Weighted by what each rate has left uncredited; a rate credited to zero
    takes exactly its remaining net and VAT. Raises ``InvoiceError`` when the
    amount is more than what is left.
    """
    left: dict[Decimal | None, list[int]] = {v.rate: [v.net_minor, v.vat_minor] for v in original}
    for credit in already:
        for v in credit:
            if v.rate in left:
                left[v.rate][0] -= v.net_minor
                left[v.rate][1] -= v.vat_minor
    remaining = sum(n + t for n, t in left.values())
    if amount_minor <= 0:
        raise InvoiceError("a credit must be a positive amount", "credit_invalid")
    if amount_minor > remaining:
        raise InvoiceError("the credit is more than what is left of the original", "credit_exceeds_original")
    rates = list(left)
    grosses = largest_remainder(amount_minor, [Decimal(left[r][0] + left[r][1]) for r in rates])
    out = []
    for rate, g in zip(rates, grosses, strict=True):
        if not g:
            continue
        if g == left[rate][0] + left[rate][1]:
            out.append(VatGroup(rate, left[rate][0], left[rate][1]))
        else:
            net = min(_net_of(g, rate), left[rate][0])
            out.append(VatGroup(rate, net, g - net))
    return out


# --------------------------------------------------------------------------- issuing

OnIssued = Callable[[Session, Document], None]
_on_issued: list[OnIssued] = []


def on_issued(fn: OnIssued) -> OnIssued:
    """Register a callback run in the issuing transaction after each new document (e.g. to email it once committed)."""
    _on_issued.append(fn)
    return fn


def number_of(prefix: str, year: int, sequence: int) -> str:
    """The printed number: ``VP-2026-000123``."""
    return f"{prefix}-{year}-{sequence:06d}"


def _series(s: Session, scope: str, kind: DocumentKind, year: int, prefix: str) -> DocumentSeries:
    q = select(DocumentSeries).where(DocumentSeries.scope == scope, DocumentSeries.kind == kind,
                                     DocumentSeries.year == year).with_for_update()
    row = s.scalar(q)
    if row is not None:
        return row
    try:
        with s.begin_nested():
            s.add(DocumentSeries(scope=scope, kind=kind, year=year, prefix=prefix, next_number=1))
    except IntegrityError:
        pass  # another transaction created it first: take its row (and wait for its lock)
    return s.scalar(q.execution_options(populate_existing=True))


def issue(
    s: Session, *, key: str, kind: DocumentKind, scope: str, prefix: str, issued_at: dt.datetime, year: int,
    currency: str, owner: str, user_id: int | None, email: str | None, locale: str | None, source: str,
    vat: Iterable[VatGroup], content: Mapping, original: Document | None = None, replaces: Document | None = None,
) -> Document:
    """Issue a document in the caller's transaction (which books the payment); idempotent by ``key``.

    The number is allocated here, under the series' row lock: call this as
    late as possible in the transaction, just before its commit.
    """
    from payments.tariff_store import dumps

    existing = s.scalar(select(Document).where(Document.idempotency_key == key))
    if existing is not None:
        return existing
    vat = list(vat)
    for v in vat:
        if v.net_minor < 0 or v.vat_minor < 0:
            raise InvoiceError("a document's amounts are positive (a credit note is a credit)", "negative")
    series_prefix = f"{prefix}-CN" if kind is DocumentKind.CREDIT_NOTE else prefix
    series = _series(s, scope, kind, year, series_prefix)
    seq = series.next_number
    series.next_number = seq + 1
    doc = Document(
        number=number_of(series.prefix, year, seq), kind=kind, series_id=series.id, sequence=seq, idempotency_key=key,
        scope=scope, owner=owner, user_id=user_id, email=email, locale=locale or "en", source=source,
        original_id=original.id if original else None, replaces_id=replaces.id if replaces else None, currency=currency,
        net_minor=sum(v.net_minor for v in vat), vat_minor=sum(v.vat_minor for v in vat),
        total_minor=sum(v.gross_minor for v in vat), issued_at=issued_at, verify_token=secrets.token_urlsafe(16),
        content=dumps({**content, "vat": [v.as_json() for v in vat]}),
    )
    s.add(doc)
    s.flush()
    for fn in _on_issued:
        fn(s, doc)
    return doc


def groups_of(doc: Document) -> list[VatGroup]:
    """The VAT groups a document was issued with."""
    from payments.tariff_store import loads

    return [VatGroup(None if v["rate"] is None else Decimal(v["rate"]), int(v["net"]), int(v["vat"]))
            for v in loads(doc.content)["vat"]]


def credited(s: Session, doc: Document) -> list[Document]:
    """The credit notes issued against ``doc``, oldest first."""
    return list(s.scalars(select(Document).where(Document.original_id == doc.id, Document.kind == DocumentKind.CREDIT_NOTE)
                          .order_by(Document.id)))


def credit_groups(s: Session, original: Document, amount: Money) -> list[VatGroup]:
    """The VAT groups of a credit note of ``amount`` against ``original`` (checked against what is left)."""
    if amount.currency != original.currency:
        raise MoneyError("a credit note is in the currency of its original", "currency_mismatch",
                         expected=original.currency, got=amount.currency)
    return credit_split(groups_of(original), [groups_of(c) for c in credited(s, original)], amount.amount)
