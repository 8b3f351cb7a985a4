"""Receipts, invoices and credit notes as a page and as a PDF, from one template (``documents/document.html``).

The document is shown in its own language (``Document.locale``, the buyer's
language when it was issued), whoever looks at it, and its times in its own
time zone; every figure comes from its frozen ``content`` (see
``payments.invoicing``), never from the live rows.

The PDF is drawn by WeasyPrint from the same template with the print layout.
It never fetches anything: the stylesheet is read from ``static/``, the
operator's logo is embedded as a ``data:`` URI and the QR code is inline SVG
(WeasyPrint's fetcher only accepts ``data:``). Chinese text needs a CJK font
installed for fontconfig (Debian ``fonts-wqy-microhei``), named as a fallback
in ``static/css/document.css``.

Links printed on a document (the QR code to its check page) are absolute,
built from ``BASE_URL`` so that a PDF rendered by the worker, outside any
request, links to the public site.
"""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, format_decimal, format_percent
from flask import current_app, render_template
from flask_babel import force_locale
from flask_babel import gettext as _
from markupsafe import Markup
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from payments.invoicing import Document, DocumentKind
from payments.money import Money
from payments.money import format as format_money
from payments.tariff_store import loads
from webapp.i18n import LANGUAGES

CSS_FILE = Path(__file__).resolve().parents[2] / "static" / "css" / "document.css"
DEFAULT_COLOR = "#0b6e4f"


# --------------------------------------------------------------------------- URLs


def absolute_url(endpoint: str, **values) -> str:
    """An absolute URL on the public site (``BASE_URL``), built with or without a request (the worker renders PDFs)."""
    path = current_app.url_map.bind("localhost").build(endpoint, values)
    return str(current_app.config["BASE_URL"]).rstrip("/") + path


def check_url(doc: Document) -> str:
    """The public check page of ``doc``: what its QR code encodes."""
    return absolute_url("receipts.check", verify_token=doc.verify_token)


# --------------------------------------------------------------------------- status


def status_of(s: Session, doc: Document) -> dict:
    """Where a document stands: ``valid``, ``partly_credited``, ``credited`` or ``replaced`` (with the new number)."""
    if doc.kind is not DocumentKind.CREDIT_NOTE:
        new = s.scalar(select(Document.number).where(Document.replaces_id == doc.id).limit(1))
        if new is not None:
            return {"code": "replaced", "replaced_by": new, "credited_minor": doc.total_minor}
        credited = s.scalar(select(func.coalesce(func.sum(Document.total_minor), 0))
                            .where(Document.original_id == doc.id, Document.kind == DocumentKind.CREDIT_NOTE)) or 0
        if credited >= doc.total_minor and doc.total_minor:
            return {"code": "credited", "replaced_by": None, "credited_minor": int(credited)}
        if credited:
            return {"code": "partly_credited", "replaced_by": None, "credited_minor": int(credited)}
    return {"code": "valid", "replaced_by": None, "credited_minor": 0}


def status_text(status: dict) -> str:
    """A status as a person reads it (in the current locale)."""
    code = status["code"]
    if code == "replaced":
        return _("Replaced by %(number)s", number=status["replaced_by"])
    if code == "credited":
        return _("Cancelled by a credit note")
    if code == "partly_credited":
        return _("Partly credited")
    return _("Valid")


# --------------------------------------------------------------------------- formatting (current locale)


def _locale(doc: Document) -> str:
    return doc.locale if doc.locale in LANGUAGES else "en"


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def _when(value: str | dt.datetime | None, tz: ZoneInfo, locale: str) -> str:
    if not value:
        return ""
    at = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return format_datetime(at, "medium", tzinfo=tz, locale=locale)


def day(value: dt.datetime, tz: ZoneInfo, locale: str) -> str:
    at = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return format_date(at.astimezone(tz).date(), "long", locale=locale)


def _kwh(value: Decimal, locale: str) -> str:
    return _("%(kwh)s kWh", kwh=format_decimal(value, format="#,##0.000", locale=locale))


def _duration(hours: Decimal) -> str:
    seconds = int((hours * 3600).to_integral_value())
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _percent(rate: str | None, locale: str) -> str:
    if rate is None:
        return "–"
    return format_percent(Decimal(rate) / 100, locale=locale, decimal_quantization=False)


LINE_LABELS = {
    "energy": lambda: _("Energy"),
    "time": lambda: _("Charging time"),
    "parking": lambda: _("Idle fee (connected, not charging)"),
    "flat": lambda: _("Session fee"),
    "wallet_credit": lambda: _("Wallet top-up"),
    "meter_credit": lambda: _("Electricity credit (prepaid meter)"),
    "demand": lambda: _("Demand charge (highest power of the month)"),
    "fee": lambda: _("Fixed fee"),
}

BAND_LABELS = {
    "peak": lambda: _("peak"),
    "flat": lambda: _("standard"),
    "valley": lambda: _("off-peak"),
}

SHARE_METHODS = {
    "consumption": lambda: _("by consumption"),
    "area": lambda: _("by leased area"),
    "equal": lambda: _("in equal parts"),
    "custom": lambda: _("by agreed ratio"),
    "credit_balance": lambda: _("Remaining amount after refunds"),
}

ADJUSTMENT_LABELS = {
    "above_hold": lambda: _("Not charged: above the amount reserved"),
    "min_price": lambda: _("Minimum price of the session"),
    "max_price": lambda: _("Maximum price of the session"),
    "rounding": lambda: _("Rounding"),
}


def line_label(line: dict, reason: str | None = None) -> str:
    """What a line is, in words (a credit line says why it was credited)."""
    kind = line.get("kind")
    if kind == "adjustment":
        return ADJUSTMENT_LABELS.get(line.get("note") or "", lambda: _("Price adjustment"))()
    note = line.get("note") or ""
    if kind == "energy" and note:  # a meter bill's energy per time-of-use band or tier
        band = BAND_LABELS[note]() if note in BAND_LABELS else (
            _("tier %(n)s", n=note[4:]) if note.startswith("tier") and note[4:].isdigit() else note)
        return _("Energy (%(band)s)", band=band)
    if kind in ("public_area", "line_loss"):
        how = SHARE_METHODS.get(note, lambda: note)()
        if kind == "public_area":
            return _("Share of the public areas (%(how)s)", how=how) if how else _("Share of the public areas")
        return _("Share of the line losses (%(how)s)", how=how) if how else _("Share of the line losses")
    if kind == "fee" and note:
        return note  # the operator's own name for the fee (a service fee, the rent)
    if kind == "credit":
        if reason == "reissued_with_business_details":
            return _("Cancelled: reissued with the buyer's business details")
        return _("Refund")
    return LINE_LABELS.get(kind, lambda: str(kind))()


def _quantity(line: dict, locale: str) -> str:
    q, unit = line.get("quantity"), line.get("unit")
    if q is None:
        return ""
    q = Decimal(q)
    if unit == "kWh":
        return _kwh(q, locale)
    if unit == "h":
        return _duration(q)
    return format_decimal(q, locale=locale)


def _unit_price(line: dict, currency: str, locale: str) -> str:
    price, unit = line.get("unit_price"), line.get("unit")
    if price is None:
        return ""
    text = format_currency(Decimal(price), currency, locale=locale, currency_digits=True, decimal_quantization=False)
    if unit == "kWh":
        return _("%(price)s / kWh", price=text)
    if unit == "h":
        return _("%(price)s / hour", price=text)
    return text


def payment_method_text(payment: dict) -> str:
    """How it was paid: "Visa •••• 4242", or the wallet."""
    if payment.get("method") == "wallet":
        return _("Voltpay wallet")
    if payment.get("method") == "meter_wallet":
        return _("Prepaid meter credit")
    if payment.get("last4"):
        return f"{(payment.get('brand') or _('Card')).capitalize()} •••• {payment['last4']}"
    return _("Card")


def title_of(doc: Document, content: dict) -> str:
    """Invoice (the buyer named a company or VAT id), simplified invoice, receipt or credit note."""
    if doc.kind is DocumentKind.CREDIT_NOTE:
        return _("Credit note")
    if doc.kind is DocumentKind.RECEIPT:
        return _("Receipt")
    buyer = content.get("buyer") or {}
    return _("Invoice") if buyer.get("vat_id") or buyer.get("company_name") else _("Simplified invoice")


def view_of(doc: Document, content: dict | None = None) -> dict:
    """Everything the template prints, formatted for the current locale (call inside ``force_locale``)."""
    c = loads(doc.content) if content is None else content
    locale = _locale(doc)
    cur = doc.currency
    sign = -1 if doc.kind is DocumentKind.CREDIT_NOTE else 1  # a credit note's amounts are given back

    def money(minor: int | None, signed: bool = True) -> str:
        return format_money(Money((sign if signed else 1) * int(minor or 0), cur), locale)

    tz = zone(c.get("time_zone"))
    lines = [{
        "kind": ln.get("kind"),
        "label": line_label(ln, c.get("reason")),
        "quantity": _quantity(ln, locale),
        "unit_price": _unit_price(ln, cur, locale),
        "vat_rate": _percent(ln.get("vat_rate"), locale),
        "net": money(ln.get("net")),
    } for ln in c.get("lines") or []]
    vat = [{"rate": _percent(v.get("rate"), locale), "net": money(v.get("net")), "vat": money(v.get("vat")),
            "gross": money(v.get("gross"))} for v in c.get("vat") or []]
    pay = c.get("payment") or {}
    payment = None
    if pay:
        payment = {
            "method": payment_method_text(pay),
            "held": money(pay.get("held"), signed=False) if pay.get("held") is not None else "",
            "captured": money(pay.get("captured"), signed=False) if pay.get("captured") is not None else "",
            "released": money(pay.get("released"), signed=False) if pay.get("released") else "",
            "refunded": money(pay.get("refunded"), signed=False) if pay.get("refunded") else "",
            "show_hold": bool(pay.get("held")) and pay.get("held") != pay.get("captured"),
        }
    sess = c.get("session")
    session = None
    if sess:
        session = {
            "id": sess.get("id"),
            "site": sess.get("site") or "",
            "site_address": sess.get("site_address") or "",
            "connector": sess.get("connector_code") or "",
            "charge_point": f"{sess.get('charge_point_id') or ''} · {sess.get('connector') or ''}".strip(" ·"),
            "started": _when(sess.get("started_at"), tz, locale),
            "ended": _when(sess.get("ended_at") or sess.get("stopped_at"), tz, locale),
            "energy": _kwh(Decimal(sess["energy_kwh"]), locale) if sess.get("energy_kwh") is not None else "",
            "meter_start": _kwh(Decimal(sess["meter_start_wh"]) / 1000, locale) if sess.get("meter_start_wh") is not None else "",
            "meter_stop": _kwh(Decimal(sess["meter_stop_wh"]) / 1000, locale) if sess.get("meter_stop_wh") is not None else "",
            "time_zone": sess.get("time_zone") or c.get("time_zone") or "UTC",
        }
    original = c.get("original")
    notes = []
    for n in c.get("notes") or []:
        if n == "vat_on_use":
            notes.append(_("Wallet credit is a prepayment: VAT is charged when the credit is spent on charging."))
        elif n == "prepaid_meter":
            notes.append(_("Already paid from the meter's prepaid credit as the electricity was used: nothing more to pay."))
        elif n == "vat_on_consumption":
            notes.append(_("Meter credit is a prepayment: VAT is charged on the electricity as it is used (monthly consumption invoice)."))
    branding = c.get("branding") or {}
    return {
        "title": title_of(doc, c),
        "number": doc.number,
        "issued": day(doc.issued_at, tz, locale),
        "issued_at": _when(doc.issued_at, tz, locale),
        "seller": c.get("seller") or {},
        "buyer": c.get("buyer") or {},
        "lines": lines,
        "vat": vat,
        "net": money(doc.net_minor),
        "vat_total": money(doc.vat_minor),
        "total": money(doc.total_minor),
        "payment": payment,
        "session": session,
        "original": {"number": original["number"], "issued": _when(original.get("issued_at"), tz, locale),
                     "total": format_money(Money(int(original.get("total") or 0), cur), locale)} if original else None,
        "replaces": c.get("replaces"),
        "notes": notes,
        "time_zone": str(tz.key),
        "brand_color": branding.get("color") or DEFAULT_COLOR,
        "footer": branding.get("footer") or "",
        "legal": [ln for ln in (branding.get("legal") or "").splitlines() if ln.strip()],
        "operator_id": branding.get("operator_id"),
        "is_credit_note": doc.kind is DocumentKind.CREDIT_NOTE,
    }


# --------------------------------------------------------------------------- rendering


def qr_svg(doc: Document) -> Markup:
    """The QR code linking to the document's public check page, as inline SVG."""
    from webapp.scan import qr_svg_inline

    return qr_svg_inline(check_url(doc))


def logo_data_uri(s: Session, operator_id: int | None) -> str | None:
    """The operator's logo as a ``data:`` URI (for the PDF, which fetches nothing), or None."""
    if not operator_id:
        return None
    from webapp.models import Operator

    op = s.get(Operator, operator_id)
    if op is None or not op.brand_logo or not op.brand_logo_type:
        return None
    return f"data:{op.brand_logo_type};base64," + base64.b64encode(op.brand_logo).decode("ascii")


def _context(doc: Document, content: dict | None, *, pdf: bool, logo: str | None, **extra) -> dict:
    v = view_of(doc, content)
    return {
        "doc": doc, "v": v, "pdf": pdf, "qr": qr_svg(doc), "check_url": check_url(doc), "logo_src": logo,
        "layout": "documents/_pdf.html" if pdf else "base.html",
        "document_css": Markup(CSS_FILE.read_text(encoding="utf-8")) if pdf else None,
        **extra,
    }


def render_html(doc: Document, *, content: dict | None = None, logo_src: str | None = None, **extra) -> str:
    """The document's page (inside the site's layout), in the document's language. Needs a request context.

    ``logo_src`` defaults to the operator's logo route; ``extra`` goes to the
    template (the page's forms and links). ``content`` renders an unsaved
    document (the branding preview).
    """
    c = loads(doc.content) if content is None else content
    op_id = (c.get("branding") or {}).get("operator_id")
    if logo_src is None and op_id:
        from flask import url_for

        logo_src = url_for("receipts.operator_logo", operator_id=op_id)
    with force_locale(_locale(doc)):
        return render_template("documents/document.html", **_context(doc, c, pdf=False, logo=logo_src, **extra))


def render_pdf(s: Session, doc: Document, *, content: dict | None = None) -> bytes:
    """The document as a PDF (A4), in its language. Needs an app context (a request is not needed)."""
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    c = loads(doc.content) if content is None else content
    logo = logo_data_uri(s, (c.get("branding") or {}).get("operator_id"))
    with force_locale(_locale(doc)):
        html = render_template("documents/document.html", **_context(doc, c, pdf=True, logo=logo))
    # Only data: URIs: a document never makes the server fetch a URL (SSRF) or read a file.
    fetcher = URLFetcher(allowed_protocols=["data"])
    return HTML(string=html, base_url=str(current_app.config["BASE_URL"]), url_fetcher=fetcher).write_pdf()


def sample_document(op, locale: str, now: dt.datetime) -> tuple[Document, dict]:
    """An unsaved invoice of the operator's, with its branding, for the branding page's preview."""
    from payments.tariff_store import dumps
    from webapp.receipts.service import branding_of, seller_of

    content = {
        "seller": seller_of(op),
        "buyer": {"email": "driver@example.com"},
        "lines": [{"kind": "energy", "quantity": "12.500", "unit": "kWh", "unit_price": "0.35", "vat_rate": "21", "net": 438,
                   "note": None},
                  {"kind": "flat", "quantity": "1", "unit": "session", "unit_price": "0.50", "vat_rate": "21", "net": 50, "note": None}],
        "vat": [{"rate": "21", "net": 488, "vat": 102, "gross": 590}],
        "payment": {"method": "card", "brand": "visa", "last4": "4242", "held": 3000, "captured": 590, "released": 2410,
                    "currency": "EUR"},
        "session": {"id": 123, "site": _("Sample site"), "site_address": "", "connector_code": "A101", "charge_point_id": "CP-1",
                    "connector": 1, "time_zone": "UTC", "started_at": (now - dt.timedelta(hours=1)).isoformat(),
                    "stopped_at": now.isoformat(), "ended_at": now.isoformat(), "energy_kwh": "12.500", "meter_start_wh": "1000",
                    "meter_stop_wh": "13500", "cost": 590},
        "branding": branding_of(op),
        "time_zone": "UTC",
    }
    doc = Document(number=f"{op.prefix}-{now.year}-000123", kind=DocumentKind.INVOICE, scope=f"operator:{op.id}", owner="sample",
                   locale=locale, source="sample", currency="EUR", net_minor=488, vat_minor=102, total_minor=590, issued_at=now,
                   verify_token="sample", content=dumps(content))
    return doc, content
