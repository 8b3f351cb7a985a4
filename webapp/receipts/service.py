"""Issuing documents for what was paid: charging sessions, wallet top-ups, refunds, business reissues.

Each function runs inside the transaction that books the money (the caller
commits) and is idempotent: the cause's key names the document. The content
is a frozen copy of what the document shows (see ``payments.invoicing``).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from zoneinfo import ZoneInfo

from flask import current_app, has_app_context
from sqlalchemy import select
from sqlalchemy.orm import Session

from payments import invoicing
from payments import cards
from payments.cards import CardPayment, CardRefund, Purpose
from payments.invoicing import Document, DocumentKind, InvoiceError, Line, VatGroup
from payments.money import Money
from payments.tariff_store import loads
from webapp.db import utcnow
from webapp.models import Operator, User
from webapp.receipts.models import BillingDetails

PLATFORM_SCOPE = "platform"


def _platform() -> dict:
    cfg = current_app.config if has_app_context() else {}
    return {
        "name": cfg.get("PLATFORM_NAME", "Voltpay"),
        "legal_name": cfg.get("PLATFORM_LEGAL_NAME", "Voltpay"),
        "address": cfg.get("PLATFORM_ADDRESS", ""),
        "vat_id": cfg.get("PLATFORM_VAT_ID", ""),
        "prefix": cfg.get("PLATFORM_DOCUMENT_PREFIX", "VPW"),
    }


def seller_of(op: Operator) -> dict:
    """The seller block of a document (a copy: the operator may change later; the document does not)."""
    return {"name": op.name, "legal_name": op.legal_name, "address": op.address, "vat_id": op.vat_id or ""}


def branding_of(op: Operator | None) -> dict:
    """The branding copied into a document (the logo is shown from the operator, by id)."""
    if op is None:
        return {"color": "#0b6e4f", "footer": "", "legal": "", "operator_id": None}
    return {"color": op.brand_color, "footer": op.receipt_footer, "legal": op.receipt_legal, "operator_id": op.id}


def buyer_of(s: Session, *, user_id: int | None, email: str | None) -> dict:
    """The buyer block: email, and the account's business details when it has some."""
    out: dict = {"email": email or ""}
    if user_id is not None:
        bd = s.get(BillingDetails, user_id)
        if bd is not None:
            out.update(bd.as_buyer())
    return out


def _year(at: dt.datetime, tz: str) -> int:
    return at.astimezone(ZoneInfo(tz)).year


def _iso(v: dt.datetime | None) -> str | None:
    return None if v is None else v.astimezone(dt.UTC).isoformat()


def _payment_block(kind: str, *, held: int, captured: int, currency: str, card: CardPayment | None) -> dict:
    return {"method": kind, "brand": card.card_brand if card else None, "last4": card.card_last4 if card else None,
            "held": held, "captured": captured, "released": max(0, held - captured), "currency": currency}


def session_document(s: Session, cs, *, captured_minor: int, card: CardPayment | None, now: dt.datetime) -> Document | None:
    """The invoice of a charging session, issued with its capture (None when nothing was captured)."""
    if not captured_minor:
        return None
    connector = cs.connector
    site = connector.charger.site
    op = site.operator
    priced = loads(cs.priced_json) if cs.priced_json else {"breakdown": [], "total_cost": {"excl_vat": 0, "incl_vat": 0}}
    lines, vat = invoicing.charging_lines(priced, cs.currency, captured_minor)
    user = s.get(User, cs.user_id) if cs.user_id else None
    content = {
        "seller": seller_of(op),
        "buyer": buyer_of(s, user_id=cs.user_id, email=cs.email),
        "lines": [ln.as_json() for ln in lines],
        "payment": _payment_block("card" if card else "wallet", held=cs.hold_minor, captured=captured_minor, currency=cs.currency, card=card),
        "session": {
            "id": cs.id, "site": site.name, "site_address": site.address, "connector_code": connector.connector_code,
            "charge_point_id": connector.charger.charge_point_id, "connector": connector.number, "time_zone": cs.time_zone,
            "started_at": _iso(cs.started_at), "stopped_at": _iso(cs.stopped_at), "ended_at": _iso(cs.ended_at),
            "energy_kwh": str((Decimal(cs.energy_wh) / 1000).quantize(Decimal("0.001"))),
            "meter_start_wh": None if cs.meter_start_wh is None else str(cs.meter_start_wh),
            "meter_stop_wh": None if cs.meter_stop_wh is None else str(cs.meter_stop_wh),
            "cost": cs.final_incl_vat_minor,
        },
        "branding": branding_of(op),
        "time_zone": cs.time_zone,
    }
    return invoicing.issue(
        s, key=f"session:{cs.id}:invoice", kind=DocumentKind.INVOICE, scope=f"operator:{op.id}", prefix=op.prefix,
        issued_at=now, year=_year(now, cs.time_zone), currency=cs.currency, owner=cs.owner, user_id=cs.user_id,
        email=cs.email, locale=cs.locale or (user.locale if user else None), source=f"session:{cs.id}", vat=vat, content=content,
    )


def top_up_document(s: Session, row: CardPayment, now: dt.datetime) -> Document:
    """The receipt of a wallet top-up: credit for later charging, VAT due when it is spent (a multi-purpose voucher)."""
    p = _platform()
    user_id = int(row.owner.split(":", 1)[1]) if row.owner.startswith("user:") else None
    user = s.get(User, user_id) if user_id else None
    content = {
        "seller": {k: p[k] for k in ("name", "legal_name", "address", "vat_id")},
        "buyer": buyer_of(s, user_id=user_id, email=row.email),
        "lines": [Line("wallet_credit", Decimal(1), None, None, None, row.captured.amount).as_json()],
        "payment": _payment_block("card", held=row.captured.amount, captured=row.captured.amount, currency=row.currency, card=row),
        "notes": ["vat_on_use"],
        "branding": branding_of(None),
        "time_zone": "UTC",
    }
    return invoicing.issue(
        s, key=f"card_payment:{row.id}:receipt", kind=DocumentKind.RECEIPT, scope=PLATFORM_SCOPE, prefix=p["prefix"],
        issued_at=now, year=now.year, currency=row.currency, owner=row.owner, user_id=user_id, email=row.email,
        locale=user.locale if user else None, source=f"card_payment:{row.id}",
        vat=[VatGroup(None, row.captured.amount, 0)], content=content,
    )


def document_for(s: Session, source: str) -> Document | None:
    """The latest invoice or receipt (not credit note) issued for ``source`` (a reissue replaces the first)."""
    return s.scalar(select(Document).where(Document.source == source, Document.kind != DocumentKind.CREDIT_NOTE)
                    .order_by(Document.id.desc()).limit(1))


def credit_note(s: Session, original: Document, amount: Money, *, key: str, reason: str, now: dt.datetime,
                refund: CardRefund | None = None) -> tuple[Document, list[VatGroup]]:
    """A credit note of ``amount`` against ``original`` (what is refunded or corrected); idempotent by ``key``."""
    existing = s.scalar(select(Document).where(Document.idempotency_key == key))
    if existing is not None:
        return existing, invoicing.groups_of(existing)
    groups = invoicing.credit_groups(s, original, amount)
    orig = loads(original.content)
    tz = orig.get("time_zone") or "UTC"
    content = {
        "seller": orig["seller"], "buyer": orig["buyer"], "branding": orig.get("branding", {}), "time_zone": tz,
        "lines": [Line("credit", None, None, None, g.rate, g.net_minor).as_json() for g in groups],
        "original": {"number": original.number, "issued_at": _iso(original.issued_at), "total": original.total_minor},
        "reason": reason[:200],
        "payment": {**orig.get("payment", {}), "refunded": amount.amount} if refund is not None else orig.get("payment", {}),
    }
    if "session" in orig:
        content["session"] = orig["session"]
    doc = invoicing.issue(
        s, key=key, kind=DocumentKind.CREDIT_NOTE, scope=original.scope,
        prefix=_prefix_of(original), issued_at=now, year=_year(now, tz), currency=original.currency, owner=original.owner,
        user_id=original.user_id, email=original.email, locale=original.locale, source=original.source, vat=groups,
        content=content, original=original,
    )
    return doc, groups


def _prefix_of(doc: Document) -> str:
    """The seller's prefix, read back from a number (``VP-2026-000123`` and ``VP-CN-2026-000004`` → ``VP``)."""
    prefix = doc.number.rsplit("-", 2)[0]
    return prefix[: -len("-CN")] if doc.kind is DocumentKind.CREDIT_NOTE else prefix


def reissue_for_business(s: Session, original: Document, buyer: dict, *, now: dt.datetime) -> tuple[Document, Document]:
    """The buyer asks for their company on an invoice after payment: credit the original in full, issue it again.

    The original is never edited. Returns (credit note, new invoice). Raises
    ``InvoiceError`` when the original is a credit note or was already
    credited (partly refunded documents are reissued for what is left).
    """
    if original.kind is DocumentKind.CREDIT_NOTE:
        raise InvoiceError("a credit note cannot be reissued", "not_reissuable")
    if s.scalar(select(Document.id).where(Document.replaces_id == original.id)) is not None:
        raise InvoiceError("this document was already reissued", "already_reissued")
    credits = invoicing.credited(s, original)
    left_groups = invoicing.credit_split(invoicing.groups_of(original), [invoicing.groups_of(c) for c in credits],
                                         original.total_minor - sum(c.total_minor for c in credits)) \
        if original.total_minor - sum(c.total_minor for c in credits) > 0 else []
    if not left_groups:
        raise InvoiceError("nothing is left of this document to reissue", "fully_credited")
    left = sum(g.gross_minor for g in left_groups)
    cn, _ = credit_note(s, original, Money(left, original.currency), key=f"document:{original.id}:reissue-credit",
                        reason="reissued_with_business_details", now=now)
    orig = loads(original.content)
    content = {**{k: v for k, v in orig.items() if k != "vat"}, "buyer": {"email": original.email or "", **buyer},
               "replaces": {"number": original.number, "credit_note": cn.number}}
    if left != original.total_minor:  # partly refunded before: the new invoice is for what was kept
        content["lines"] = [Line("credit_balance", None, None, None, g.rate, g.net_minor).as_json() for g in left_groups]
    tz = orig.get("time_zone") or "UTC"
    new = invoicing.issue(
        s, key=f"document:{original.id}:reissue", kind=original.kind, scope=original.scope, prefix=_prefix_of(original),
        issued_at=now, year=_year(now, tz), currency=original.currency, owner=original.owner, user_id=original.user_id,
        email=original.email, locale=original.locale, source=original.source, vat=left_groups, content=content, replaces=original,
    )
    return cn, new


@cards.on_succeeded(Purpose.WALLET_TOP_UP)
def _top_up_receipt(s: Session, row: CardPayment) -> None:
    """Every captured top-up gets its receipt in the capture's transaction (after the wallet is credited)."""
    top_up_document(s, row, utcnow())
