"""Operator pages for meter data: collectors (OAuth2 clients) and CSV upload of readings.

* ``/operator/collectors``: the operator's collectors; create one (its client
  secret and webhook secret shown once, on the answer page, never stored in
  the clear) or rotate a secret (the old one and its tokens stop working).
* ``/operator/readings/upload``: a CSV with the header
  ``meter_code,at,register_kwh,demand_kw`` (``demand_kw`` may be empty), at
  most ``MAX_CSV_ROWS`` rows and ``MAX_CSV_BYTES``, ingested by the same
  ``readings.ingest`` as the API (in batches of ``MAX_BATCH``, one
  transaction). The answer lists every row that was not accepted, with its
  line number and reason, and offers the whole report as a CSV download.

Operator staff see their own operator; an admin picks one with ``?operator=``.
Forms carry a CSRF token.
"""

from __future__ import annotations

import csv
import io

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from sqlalchemy import select
from wtforms import StringField, TextAreaField
from wtforms.validators import URL, DataRequired, Length, Optional

from webapp.db import db_session, utcnow
from webapp.meters import readings
from webapp.meters.models import MeterCollector
from webapp.meters.oauth import create_collector, rotate_secret
from webapp.models import Operator, Role

bp = Blueprint("meters_operator", __name__)

MAX_CSV_BYTES = 2 * 1024 * 1024
MAX_CSV_ROWS = 10 * readings.MAX_BATCH
CSV_COLUMNS = ("meter_code", "at", "register_kwh", "demand_kw")

# What a person reads for each rejection code (the API gives the English reason with the code).
REASONS = {
    "unknown_meter": _l("Unknown meter (or not one of yours)."),
    "bad_timestamp": _l("The time must be ISO 8601 with an offset, e.g. 2025-01-31T12:00:00+01:00."),
    "future": _l("The time is in the future."),
    "bad_number": _l("Not a number of kWh (at least 0, at most 3 decimals)."),
    "malformed": _l("The row is not valid."),
    "conflict": _l("Another reading of this meter at this time has a different value."),
    "below_previous": _l("Below the previous reading: declare a register rollover or a meter replacement first."),
    "above_next": _l("Above the next reading of this meter."),
    "above_register_max": _l("Above the most this meter's register can show."),
    "no_tariff": _l("The meter has no tariff in force at this time."),
}
STATUS = {readings.ACCEPTED: _l("Accepted"), readings.DUPLICATE: _l("Already received"), readings.REJECTED: _l("Rejected")}


class CollectorForm(FlaskForm):
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=120)], description=_l("E.g. where the data concentrator is."))
    webhook_url = StringField(_l("Webhook URL"), validators=[Optional(), URL(require_tld=False), Length(max=500)],
                              description=_l("Where disconnect and reconnect commands are sent (optional)."))


class UploadForm(FlaskForm):
    file = FileField(_l("CSV file"), description=_l("Columns: meter_code, at, register_kwh, demand_kw (may be empty)."))


class ReportForm(FlaskForm):
    report = TextAreaField()


def _operator() -> Operator:
    """Staff: their operator; an admin: ``?operator=`` (else the first)."""
    s = db_session()
    if current_user.role == Role.ADMIN:
        wanted = request.args.get("operator", "")
        op = s.get(Operator, int(wanted)) if wanted.isdigit() and len(wanted) < 10 else s.scalar(select(Operator).order_by(Operator.id).limit(1))
    elif current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        op = s.get(Operator, current_user.operator_id)
    else:
        abort(403)
    if op is None:
        abort(404)
    return op


def _no_store(resp) -> Response:
    resp = resp if isinstance(resp, Response) else Response(resp)
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --------------------------------------------------------------------------- collectors


def _collectors_page(op: Operator, form: CollectorForm, created: dict | None = None, status: int = 200):
    rows = db_session().scalars(select(MeterCollector).where(MeterCollector.operator_id == op.id).order_by(MeterCollector.id)).all()
    resp = Response(render_template("operator/collectors.html", op=op, form=form, collectors=rows, created=created,
                                    rotate_form=FlaskForm()), status=status)
    return _no_store(resp)


@bp.route("/operator/collectors", methods=["GET", "POST"])
@login_required
def collectors():
    """List the operator's meter data collectors; create one (secrets shown once)."""
    op = _operator()
    form = CollectorForm()
    if request.method == "GET":
        return _collectors_page(op, form)
    if not form.validate_on_submit():
        return _collectors_page(op, form, status=400)
    s = db_session()
    c, secret = create_collector(s, op.id, form.name.data, form.webhook_url.data or None)
    created = {"name": c.name, "client_id": c.client_id, "client_secret": secret, "webhook_secret": c.webhook_secret}
    s.commit()
    return _collectors_page(op, CollectorForm(formdata=None), created)


@bp.route("/operator/collectors/<int(max=2147483647):collector_id>/rotate", methods=["POST"])
@login_required
def rotate(collector_id: int):
    """Give a collector a new client secret (shown once); its old secret and tokens stop working."""
    op = _operator()
    s = db_session()
    c = s.get(MeterCollector, collector_id)
    if c is None or c.operator_id != op.id:
        abort(404)
    if not FlaskForm().validate_on_submit():
        return redirect(url_for(".collectors"))
    secret = rotate_secret(s, c)
    created = {"name": c.name, "client_id": c.client_id, "client_secret": secret, "webhook_secret": None, "rotated": True}
    s.commit()
    return _collectors_page(op, CollectorForm(formdata=None), created)


# --------------------------------------------------------------------------- CSV upload


def _parse_csv(data: bytes) -> tuple[list[dict], list[int], str | None]:
    """Rows as mappings and their line numbers, or an error message for a file we cannot read at all."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [], _("The file is not UTF-8 text. Save it as CSV (UTF-8) and try again.")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return [], [], _("The file is empty.")
    except csv.Error:
        return [], [], _("The file is not a valid CSV file.")
    missing = [c for c in CSV_COLUMNS[:3] if c not in header]
    if missing:
        return [], [], _("The first line must name the columns: %(cols)s.", cols=", ".join(CSV_COLUMNS))
    rows, lines = [], []
    try:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            if len(rows) >= MAX_CSV_ROWS:
                return [], [], _("At most %(n)d readings per file: split it and upload each part.", n=MAX_CSV_ROWS)
            rows.append({name: (record[i].strip() if i < len(record) else "") for i, name in enumerate(header) if name in CSV_COLUMNS})
            lines.append(reader.line_num)
    except csv.Error:
        return [], [], _("The file is not a valid CSV file.")
    if not rows:
        return [], [], _("The file has no readings.")
    return rows, lines, None


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _report_csv(rows: list[dict], lines: list[int], results: list[readings.RowResult]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["line", *CSV_COLUMNS, "status", "code", "reason"])
    for row, line, r in zip(rows, lines, results):
        w.writerow([line, *(_cell(row.get(c, "")) for c in CSV_COLUMNS), r.status, r.code or "",
                    _cell(str(REASONS.get(r.code, r.reason or "")) if r.code else "")])
    return out.getvalue()


@bp.route("/operator/readings/upload", methods=["GET", "POST"])
@login_required
def upload_readings():
    """Upload a CSV of meter readings; answer with a per-row report (also as CSV)."""
    op = _operator()
    form = UploadForm()
    if request.method == "GET":
        return render_template("operator/readings_upload.html", op=op, form=form, report=None)
    error = None
    upload = form.file.data
    if not form.validate_on_submit():
        error = _("The form expired. Please try again.")
    elif upload is None or not getattr(upload, "filename", ""):
        error = _("Choose a CSV file.")
    else:
        data = upload.read(MAX_CSV_BYTES + 1)
        if len(data) > MAX_CSV_BYTES:
            error = _("The file is larger than 2 MB: split it and upload each part.")
        else:
            rows, lines, error = _parse_csv(data)
    if error:
        form.file.errors = [error]
        return render_template("operator/readings_upload.html", op=op, form=form, report=None), 400
    s = db_session()
    now = utcnow()
    results: list[readings.RowResult] = []
    intervals = 0
    for start in range(0, len(rows), readings.MAX_BATCH):
        rep = readings.ingest(s, operator_id=op.id, rows=rows[start:start + readings.MAX_BATCH], source="csv", now=now)
        results.extend(rep.results)
        intervals += rep.intervals
    s.commit()
    problems = [{"line": line, "row": row, "status": STATUS[r.status], "reason": REASONS.get(r.code, r.reason)}
                for row, line, r in zip(rows, lines, results) if r.status != readings.ACCEPTED]
    counts = {k: sum(1 for r in results if r.status == k) for k in (readings.ACCEPTED, readings.DUPLICATE, readings.REJECTED)}
    report_form = ReportForm(formdata=None, data={"report": _report_csv(rows, lines, results)})
    return render_template("operator/readings_upload.html", op=op, form=UploadForm(formdata=None), report=True, problems=problems,
                           counts=counts, intervals=intervals, report_form=report_form)


@bp.route("/operator/readings/report.csv", methods=["POST"])
@login_required
def readings_report():
    """The upload's report as a CSV download (the page posts back the report it showed)."""
    _operator()
    form = ReportForm()
    if not form.validate_on_submit() or not form.report.data:
        return redirect(url_for(".upload_readings"))
    body = form.report.data[:MAX_CSV_BYTES * 2]
    resp = Response(body, mimetype="text/csv")
    resp.headers["Content-Disposition"] = 'attachment; filename="readings-report.csv"'
    return _no_store(resp)
