"""History pages: the month page, its CSV export and the monthly statement PDF (signed-in only).

* ``GET /account/history?month=YYYY-MM``: charging sessions, wallet top-ups and
  documents of the month (default: the current month), with previous/next.
* ``GET /account/history.csv?month=YYYY-MM``: the same rows in one file with a
  ``type`` column (``charging_session``, ``wallet_top_up``, ``document``).
  Machine-readable on purpose: English column names and stable codes (the
  ``state`` and ``kind`` values of the API), dates ISO 8601 in UTC, amounts as
  decimal strings in the currency's exponent (``12.34``, ``1234`` for JPY) with
  a ``currency`` column, credit notes negative. UTF-8 without a byte order mark.
  Cells that a spreadsheet would run as a formula (starting with ``=``, ``+``,
  ``-``, ``@``, tab or carriage return) get a leading ``'``; the amounts and
  quantities we write ourselves are plain numbers (``-2.96``) and stay numbers.
* ``GET /account/statement/YYYY-MM.pdf``: opening wallet balance, movements,
  closing balance, the month's sessions, top-ups and documents, and totals
  per currency, in the account's language (WeasyPrint).

A month that is not ``YYYY-MM`` (or not a real month) is a 400 page that says
how to write one, never a 500.
"""

from __future__ import annotations

import csv
import io
import re

from babel.dates import format_skeleton
from flask import Response, current_app, render_template, request, url_for
from flask_babel import force_locale, format_datetime, get_locale, get_timezone
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from werkzeug.routing import BuildError

from payments.money import Money, exponent
from payments.money import format as format_money
from webapp.charging.views import energy_text, state_label
from webapp.charging.models import SessionState
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.history import bp
from webapp.history.service import BadMonth, Month, MonthHistory, month_history, zone
from webapp.i18n import supported
from webapp.wallet.views import ENTRY_LABELS

TOP_UP_STATES = {
    "created": _l("Waiting"), "requires_action": _l("Waiting for your bank"), "processing": _l("Processing"),
    "authorized": _l("Processing"), "succeeded": _l("Added"), "failed": _l("Failed"), "canceled": _l("Cancelled"),
}
DOCUMENT_KINDS = {"invoice": _l("Invoice"), "receipt": _l("Receipt"), "credit_note": _l("Credit note")}
MOVEMENT_LABELS = {**ENTRY_LABELS, "Charging refunded": _l("Charging refunded to your wallet")}

CSV_COLUMNS = ["type", "id", "date", "site", "connector", "energy_kwh", "kind", "amount", "refunded", "currency", "state",
               "card_brand", "card_last4", "document", "original_document"]
_NUMBER = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# -- helpers ---------------------------------------------------------------------------------------


def _locale() -> str:
    return str(get_locale() or "en")


def _tz():
    """The pages' time zone as a zoneinfo (flask-babel hands out pytz zones, which must not be passed to ``datetime(tzinfo=)``)."""
    return zone(str(get_timezone() or "UTC"))


def _month() -> Month:
    """``?month=`` or the current month (in the pages' time zone); a 400 page for anything else."""
    raw = request.args.get("month")
    if raw is None or raw == "":
        return Month.of(utcnow(), _tz())
    return _parse_month(raw)


def _parse_month(raw: str) -> Month:
    try:
        return Month.parse(raw)
    except BadMonth:
        raise Problem(400, "invalid_month", _("“%(month)s” is not a month. Write the month as year and month, for example %(example)s.",
                                              month=raw[:20], example=str(Month.of(utcnow(), _tz())))) from None


def _history(month: Month) -> MonthHistory:
    return month_history(db_session(), user_id=current_user.id, owner=current_user.owner, month=month, tz=_tz())


def money_text(money: Money | None) -> str:
    """An amount in the current language, or a dash."""
    return "–" if money is None else format_money(money, _locale())


def month_label(month: Month) -> str:
    """"March 2026", "marzo de 2026", "2026年3月"."""
    return format_skeleton("yMMMM", month.first_day, locale=_locale())


def document_url(number: str, pdf: bool = False) -> str:
    """The document's page (or PDF): the receipts blueprint's endpoint when it exists, else its documented path."""
    try:
        return url_for("receipts.document_pdf" if pdf else "receipts.document_page", number=number)
    except BuildError:
        return f"/documents/{number}{'.pdf' if pdf else ''}"


def card_text(brand: str | None, last4: str | None) -> str:
    """"Visa •••• 4242", or a dash."""
    if not last4:
        return "–"
    return f"{(brand or _('Card')).capitalize()} •••• {last4}"


def _session_state(value: str) -> str:
    try:
        return state_label(SessionState(value))
    except ValueError:
        return value


def _view(h: MonthHistory) -> dict:
    """The month's rows with their text in the current language (shared by the page and the PDF)."""
    fmt = "short"
    return {
        "sessions": [
            {"row": r, "when": format_datetime(r.at, fmt), "energy": energy_text(r.energy_kwh), "paid": money_text(r.paid),
             "refunded": money_text(r.refunded) if r.refunded.amount else "–", "state": _session_state(r.state),
             "document_url": document_url(r.document_number) if r.document_number else None}
            for r in h.sessions
        ],
        "top_ups": [
            {"row": r, "when": format_datetime(r.at, fmt), "amount": money_text(r.amount), "card": card_text(r.card_brand, r.card_last4),
             "state": str(TOP_UP_STATES.get(r.state, r.state)), "refunded": money_text(r.refunded) if r.refunded.amount else None,
             "document_url": document_url(r.document_number) if r.document_number else None}
            for r in h.top_ups
        ],
        "documents": [
            {"row": r, "when": format_datetime(r.at, fmt), "kind": str(DOCUMENT_KINDS.get(r.kind, r.kind)), "total": money_text(r.total),
             "url": document_url(r.number), "pdf_url": document_url(r.number, pdf=True)}
            for r in h.documents
        ],
        "wallets": [
            {"w": w, "opening": money_text(w.opening), "closing": money_text(w.closing), "money_in": money_text(w.money_in),
             "money_out": money_text(w.money_out),
             "movements": [{"m": m, "when": format_datetime(m.at, fmt), "label": str(MOVEMENT_LABELS.get(m.description, m.description)),
                            "amount": money_text(m.amount), "balance": money_text(m.balance_after)} for m in w.movements]}
            for w in h.wallets
        ],
        "totals": [
            {**t, "raw": t, "energy": energy_text(t["energy_kwh"]), **{k: money_text(t[k]) for k in ("charging_paid", "charging_refunded", "top_ups", "documents")}}
            for t in h.totals()
        ],
    }


# -- the page --------------------------------------------------------------------------------------


@bp.route("/history")
@login_required
def index():
    """The month's charging sessions, top-ups and documents, with the month picker, CSV and statement links."""
    month = _month()
    current = Month.of(utcnow(), _tz())
    h = _history(month)
    return render_template(
        "history/index.html",
        month=month,
        label=month_label(month),
        previous=month.previous(),
        next=month.next() if month < current else None,
        current=current,
        **_view(h),
    )


# -- CSV -------------------------------------------------------------------------------------------


def csv_cell(value) -> str:
    """A cell a spreadsheet shows as text, never runs: a formula-looking text gets a leading ``'``; our numbers stay numbers."""
    if value is None:
        return ""
    text = str(value)
    if _NUMBER.match(text):
        return text
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def decimal_text(money: Money | None) -> str:
    """Minor units as a decimal string in the currency's exponent: 1234 EUR → "12.34", 1234 JPY → "1234", −296 → "-2.96"."""
    if money is None:
        return ""
    return f"{money.to_decimal():.{exponent(money.currency)}f}"


def csv_rows(h: MonthHistory) -> list[dict]:
    """The month's rows as the CSV has them, in the page's order (sessions, top-ups, documents)."""
    rows = []
    for r in h.sessions:
        cur = r.paid.currency if r.paid is not None else r.refunded.currency
        rows.append({"type": "charging_session", "id": r.id, "date": r.at.isoformat(), "site": r.site, "connector": r.connector_code,
                     "energy_kwh": f"{r.energy_kwh:.3f}", "amount": decimal_text(r.paid), "refunded": decimal_text(r.refunded),
                     "currency": cur, "state": r.state, "document": r.document_number})
    for r in h.top_ups:
        rows.append({"type": "wallet_top_up", "id": r.id, "date": r.at.isoformat(), "amount": decimal_text(r.amount),
                     "refunded": decimal_text(r.refunded), "currency": r.amount.currency, "state": r.state, "card_brand": r.card_brand,
                     "card_last4": r.card_last4, "document": r.document_number})
    for r in h.documents:
        rows.append({"type": "document", "id": r.number, "date": r.at.isoformat(), "kind": r.kind, "amount": decimal_text(r.total),
                     "currency": r.total.currency, "document": r.number, "original_document": r.original_number})
    return rows


@bp.route("/history.csv")
@login_required
def history_csv():
    """The month's rows as one CSV file with a ``type`` column."""
    month = _month()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in csv_rows(_history(month)):
        writer.writerow([csv_cell(row.get(c)) for c in CSV_COLUMNS])
    return Response(out.getvalue().encode("utf-8"), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="voltpay-history-{month}.csv"',
        "Cache-Control": "private, no-store",
    })


# -- statement PDF ---------------------------------------------------------------------------------


def _statement_locale() -> str:
    """The account's language, else the one the pages are shown in."""
    chosen = getattr(current_user, "locale", None)
    return chosen if supported(chosen) else _locale()


@bp.route("/statement/<month_text>.pdf")
@login_required
def statement_pdf(month_text: str):
    """The month's statement as a PDF in the account's language."""
    month = _parse_month(month_text)
    from webapp.history.pdf import render_pdf  # WeasyPrint loads its native libraries on import: only when a PDF is asked for

    h = _history(month)
    with force_locale(_statement_locale()):
        html = render_template(
            "history/statement.html",
            month=month,
            label=month_label(month),
            lang=_locale(),
            email=current_user.email,
            generated=format_datetime(utcnow(), "medium"),
            platform_name=current_app.config.get("PLATFORM_NAME", "Voltpay"),
            zone=str(_tz()),
            **_view(h),
        )
    pdf = render_pdf(html)
    return Response(pdf, mimetype="application/pdf", headers={
        "Content-Disposition": f'inline; filename="voltpay-statement-{month}.pdf"',
        "Cache-Control": "private, no-store",
    })
