"""Tables of the operator console and their exports: one ``Table``, shown as HTML, CSV and XLSX with the same rows.

A table holds typed cells, never pre-formatted text:

* ``Money`` — integer minor units and a currency. The page shows it for the
  reader's language (``payments.money.format``: "€12.34", "12,34 €"); the CSV
  writes the plain decimal in the currency's exponent ("12.34", "-2.96",
  "1234" for JPY) and every table that has money has a ``currency`` column;
  the XLSX writes a number (``Decimal``, never a float) with the currency's
  decimals as number format.
* ``Decimal`` quantities (kWh, percent) — shown with the reader's decimal
  mark, written as plain decimals.
* ``int`` counts, ``date`` (ISO), ``datetime`` (already in the place's local
  time: "YYYY-MM-DD HH:MM"), text, and ``Coded`` (a stable code with a label:
  the page shows the label, the files the code).

The HTML cells carry their export value in ``data-value`` so the page, the
CSV and the workbook can be compared row by row. CSV: UTF-8, CRLF, a header
of stable English column keys; a text cell a spreadsheet would run as a
formula (starting with ``=``, ``+``, ``-``, ``@``, tab or CR) gets a leading
``'`` — our own numbers ("-2.96") stay numbers. Exports answer
``Cache-Control: no-store`` (they hold customers' emails).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from babel.numbers import format_decimal
from flask import Response

from payments.money import Money, exponent
from payments.money import format as format_money

XLSX_MIMETYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_NUMBER = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# How a Decimal column is shown and written: its decimals.
DECIMALS = {"kwh": 3, "percent": 1, "hours": 2}


@dataclass(frozen=True)
class Coded:
    """A stable code shown to a person as a label (a state, a kind): the files keep the code."""

    code: str
    label: str

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Column:
    """A column: its stable key (the files' header), its label (the page's header) and the kind of its cells."""

    key: str
    label: str
    kind: str = "text"  # text (ids too: never grouped), int, money, kwh, percent, hours, date, datetime, coded

    @property
    def numeric(self) -> bool:
        """Whether the page aligns the column to the right."""
        return self.kind in ("int", "money", "kwh", "percent", "hours")


@dataclass
class Table:
    """Rows of typed cells under ``columns``; ``links`` (optional) gives a URL per row for its first cell."""

    key: str
    title: str
    columns: list[Column]
    rows: list[list[object]] = field(default_factory=list)
    links: list[str | None] = field(default_factory=list)
    empty: str = ""  # what the page says when there are no rows

    def link(self, index: int) -> str | None:
        """The URL of row ``index``, if any."""
        return self.links[index] if index < len(self.links) else None

    def header(self) -> list[str]:
        """The files' header row: the column keys."""
        return [c.key for c in self.columns]

    def plain_rows(self) -> list[list[str]]:
        """The rows as the CSV writes them (before the formula guard)."""
        return [[plain(v, c.kind) for v, c in zip(row, self.columns, strict=True)] for row in self.rows]


def _decimal(value: Decimal, kind: str) -> Decimal:
    places = DECIMALS.get(kind)
    return value.quantize(Decimal(1).scaleb(-places)) if places is not None else value


def money_plain(money: Money) -> str:
    """Minor units as a decimal string in the currency's exponent: 1234 EUR → "12.34", 0 → "0.00", −296 → "-2.96"."""
    return f"{money.to_decimal():.{exponent(money.currency)}f}"


def plain(value: object, kind: str = "text") -> str:
    """A cell as the CSV (and the page's ``data-value``) has it: plain, language-neutral."""
    if value is None:
        return ""
    if isinstance(value, Money):
        return money_plain(value)
    if isinstance(value, Coded):
        return value.code
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        return f"{_decimal(value, kind):f}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def text(value: object, kind: str, locale: str) -> str:
    """A cell as the page shows it, for ``locale``."""
    if value is None:
        return ""
    if isinstance(value, Money):
        return format_money(value, locale)
    if isinstance(value, Decimal):
        places = DECIMALS.get(kind, 2)
        shown = format_decimal(_decimal(value, kind), format="#,##0." + "0" * places, locale=locale)
        return shown + "\u00a0%" if kind == "percent" else shown
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, int) and kind == "int":
        return format_decimal(value, locale=locale)
    if isinstance(value, Coded):
        return value.label
    return plain(value, kind)


def csv_cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula (our numbers stay numbers)."""
    if _NUMBER.match(value):
        return value
    return "'" + value if value.startswith(_FORMULA_START) else value


def attachment(data: bytes, mimetype: str, filename: str) -> Response:
    """A download that no cache keeps."""
    resp = Response(data, mimetype=mimetype, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    resp.headers["Cache-Control"] = "no-store"
    return resp


def csv_bytes(table: Table) -> bytes:
    """The table as CSV: the header of column keys, then every row."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(table.header())
    w.writerows([[csv_cell(c) for c in row] for row in table.plain_rows()])
    return buf.getvalue().encode("utf-8")


def _xlsx_value(value: object, kind: str):
    if value is None:
        return None
    if isinstance(value, Money):
        return value.to_decimal()
    if isinstance(value, Decimal):
        return _decimal(value, kind)
    if isinstance(value, Coded):
        return value.code
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)  # already local: the workbook has no time zones
    if isinstance(value, (int, dt.date)):
        return value
    return str(value)


def _xlsx_format(value: object, kind: str) -> str | None:
    if isinstance(value, Money):
        places = exponent(value.currency)
        return "#,##0." + "0" * places if places else "#,##0"
    if isinstance(value, Decimal):
        return "#,##0." + "0" * DECIMALS.get(kind, 2)
    if isinstance(value, dt.datetime):
        return "yyyy-mm-dd hh:mm"
    if isinstance(value, dt.date):
        return "yyyy-mm-dd"
    return None


def _put(ws, row: int, col: int, value):
    """Write one cell; text stays text (openpyxl would store "=..." as a formula) without control characters."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    if isinstance(value, str):
        value = ILLEGAL_CHARACTERS_RE.sub("", value)
    cell = ws.cell(row, col, value)
    if isinstance(value, str):
        cell.data_type = "s"
    return cell


def xlsx_bytes(table: Table, about: Sequence[tuple[str, str]] = ()) -> bytes:
    """The table as a workbook: sheet 1 the header and the rows (numbers as numbers), sheet 2 what was asked (``about``)."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = table.key[:31]
    for i, key in enumerate(table.header(), start=1):
        _put(ws, 1, i, key)
    for r, row in enumerate(table.rows, start=2):
        for i, (value, col) in enumerate(zip(row, table.columns, strict=True), start=1):
            cell = _put(ws, r, i, _xlsx_value(value, col.kind))
            fmt = _xlsx_format(value, col.kind)
            if fmt:
                cell.number_format = fmt
    for i, col in enumerate(table.columns, start=1):
        ws.column_dimensions[ws.cell(1, i).column_letter].width = max(10, min(32, len(col.key) + 4))
    ws.freeze_panes = "A2"
    info = wb.create_sheet("about")
    for r, (k, v) in enumerate([(table.title, "")] + list(about), start=1):
        _put(info, r, 1, k)
        _put(info, r, 2, v)
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def export(table: Table, fmt: str, name: str, about: Sequence[tuple[str, str]] = ()) -> Response:
    """``table`` as a CSV or XLSX download named ``name.<fmt>``."""
    if fmt == "csv":
        return attachment(csv_bytes(table), "text/csv", f"{name}.csv")
    return attachment(xlsx_bytes(table, about), XLSX_MIMETYPE, f"{name}.xlsx")


def template_helpers() -> dict:
    """What the table macro needs: ``cell_text(value, kind, locale)`` and ``cell_plain(value, kind)``."""
    return {"cell_text": text, "cell_plain": plain}
