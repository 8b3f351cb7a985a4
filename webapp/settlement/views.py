"""The operator's settlement pages, under ``/operator/settlement``.

* **Parties** — list, create, edit. The IBAN/BIC are checked with schwifty
  (``payments.payouts.validate_bank``) and only ever shown masked; on edit an
  empty IBAN field keeps the stored one.
* **Split rules** per site — the versions, and a new version as JSON
  (``payments.settlement`` documents the shape), checked by ``validate_rule``
  with the reason shown at the field.
* **Statements** per party and period — HTML, CSV and XLSX (openpyxl) with
  the same rows and totals: the party's allocation lines (revenue, refund
  reversals) by the revenue's day, and its payouts.
* **Revenue** per day and site — from the allocations (refund reversals
  count negative).
* **Payout batches** — their state and payouts; an admin downloads the bank
  files (pain.001 / CSV: they hold every party's bank details).
* **Reconciliation** (admin only: the provider account is the platform's) —
  runs, their differences, the resolve form, booking the provider's fee,
  and importing the provider's balance-transaction CSV export.

Who sees what: operator staff see their own operator's sites, parties,
statements and payouts; an admin sees all. Anything else — another
operator's party or site, an unknown id — answers 404, never 403, so ids
reveal nothing. Forms carry a CSRF token; bad input answers 400 with the
message at the field.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from sqlalchemy import or_, select
from wtforms import BooleanField, DateField, SelectChoice, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, Length, Optional

from payments import reconcile as rec
from payments import settlement
from payments.base import utcnow
from payments.money import Money, check_currency, exponent
from payments.providers.base import ProviderError
from payments.settlement import Allocation, AllocationLine, Party, PartyKind, RuleError, SplitRule
from webapp.db import db_session
from webapp.models import Operator, Role, Site

bp = Blueprint("settlement", __name__, url_prefix="/operator/settlement")

MAX_PERIOD_DAYS = 366
MAX_CSV_BYTES = 5 * 1024 * 1024


# --------------------------------------------------------------------------- who sees what


def _scope() -> int | None:
    """The operator id the current person works for; None for an admin (everything). Others: 403."""
    if current_user.role == Role.ADMIN:
        return None
    if current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        return current_user.operator_id
    abort(403)


def _admin_only() -> None:
    if current_user.role != Role.ADMIN:
        abort(403)


def _parties_query(op_id: int | None):
    q = select(Party).order_by(Party.legal_name, Party.id)
    return q if op_id is None else q.where(Party.operator_id == op_id)


def _party(party_id: int) -> Party:
    """A party the current person may see (404 otherwise)."""
    op_id = _scope()
    party = db_session().get(Party, party_id)
    if party is None or (op_id is not None and party.operator_id != op_id):
        abort(404)
    return party


def _site(site_id: int) -> Site:
    op_id = _scope()
    site = db_session().get(Site, site_id)
    if site is None or (op_id is not None and site.operator_id != op_id):
        abort(404)
    return site


def _no_store(resp) -> Response:
    resp = resp if isinstance(resp, Response) else Response(resp)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _page(template: str, status: int = 200, **ctx) -> Response:
    return _no_store(Response(render_template(template, **ctx), status=status))


def _minor_text(minor: int | None, currency: str) -> str:
    """Minor units as a plain decimal in major units ("12.34"), for tables and files."""
    if minor is None:
        return ""
    return str(Money(minor, currency).to_decimal())


@bp.app_template_filter("settlement_minor")
def _minor_filter(minor, currency="EUR"):
    return _minor_text(minor, currency)


@bp.route("/")
@login_required
def index():
    """The settlement area's start page."""
    op_id = _scope()
    sites = db_session().scalars(select(Site).order_by(Site.name) if op_id is None else select(Site).where(Site.operator_id == op_id).order_by(Site.name)).all()
    return _page("settlement/index.html", sites=sites, is_admin=op_id is None)


# --------------------------------------------------------------------------- parties


class PartyForm(FlaskForm):
    kind = SelectField(_l("Kind"), choices=[SelectChoice(k.value, k.value.replace("_", " ")) for k in PartyKind])
    legal_name = StringField(_l("Legal name"), validators=[DataRequired(), Length(max=200)])
    email = StringField(_l("Email for statements"), validators=[Optional(), Email(), Length(max=254)])
    payout_currency = StringField(_l("Payout currency"), default="EUR", validators=[DataRequired(), Length(min=3, max=3)])
    iban = StringField(_l("IBAN"), validators=[Optional(), Length(max=42)], description=_l("Checked before it is stored; shown masked."))
    bic = StringField(_l("BIC"), validators=[Optional(), Length(max=11)])
    stripe_account_id = StringField(_l("Stripe connected account"), validators=[Optional(), Length(max=64)],
                                    description=_l("acct_…: paid by Stripe Connect transfer instead of a bank transfer."))
    min_payout = StringField(_l("Minimum payout"), default="0", description=_l("In the payout currency; below it the amount carries over."))
    parent_party_id = SelectField(_l("Agency of"), coerce=str, choices=[], validators=[Optional()])
    active = BooleanField(_l("Active"), default=True)


def _validate_bank(iban: str, bic: str | None) -> tuple[str, str | None]:
    try:
        from payments.payouts import BankDetailsError, validate_bank
    except ImportError:  # pragma: no cover - payouts not installed
        validate_bank = None
    if validate_bank is not None:
        try:
            return validate_bank(iban, bic)
        except BankDetailsError as e:
            raise RuleError(e.field, e.reason) from None
    from schwifty import BIC, IBAN
    from schwifty.exceptions import SchwiftyException

    try:
        i = IBAN(iban)
    except SchwiftyException as e:
        raise RuleError("iban", f"not a valid IBAN ({e})") from None
    try:
        b = BIC(bic) if bic else None
    except SchwiftyException as e:
        raise RuleError("bic", f"not a valid BIC ({e})") from None
    return str(i.compact), (str(b.compact) if b else None)


def _party_form_choices(form: PartyForm, op_id: int | None, party: Party | None) -> None:
    parents = [p for p in db_session().scalars(_parties_query(op_id)) if p.kind == PartyKind.OPERATOR and (party is None or p.id != party.id)]
    form.parent_party_id.choices = [SelectChoice("", _("—"))] + [SelectChoice(str(p.id), p.legal_name) for p in parents]


def _apply_party_form(form: PartyForm, party: Party, op_id: int | None) -> bool:
    """Copy a valid form onto ``party``; False (errors at the fields) when something is wrong."""
    ok = True
    try:
        currency = check_currency(form.payout_currency.data.strip().upper())
    except ValueError:
        form.payout_currency.errors.append(_("Not a currency code (e.g. EUR)."))
        currency, ok = None, False
    min_minor = 0
    try:
        scaled = Decimal((form.min_payout.data or "0").strip().replace(",", ".")).scaleb(exponent(currency or "EUR"))
        if not scaled.is_finite() or scaled < 0 or scaled != scaled.to_integral_value():
            raise InvalidOperation
        min_minor = int(scaled)
    except InvalidOperation:
        form.min_payout.errors.append(_("An amount of at least 0, e.g. 25.00."))
        ok = False
    # An empty IBAN keeps the stored account (never shown in full); a BIC alone is checked against the stored IBAN.
    iban_in, bic_in = (form.iban.data or "").strip(), (form.bic.data or "").strip() or None
    iban = bic = None
    if iban_in or bic_in:
        if not iban_in and not party.iban:
            form.iban.errors.append(_("Enter the IBAN of this BIC."))
            ok = False
        else:
            try:
                iban, bic = _validate_bank(iban_in or party.iban, bic_in)
            except RuleError as e:
                (form.bic if e.field == "bic" else form.iban).errors.append(e.reason)
                ok = False
    parent = None
    if form.parent_party_id.data:
        parent = _party(int(form.parent_party_id.data)) if form.parent_party_id.data.isdigit() else None
        if parent is None:
            form.parent_party_id.errors.append(_("No such party."))
            ok = False
    acct = (form.stripe_account_id.data or "").strip() or None
    if acct and not acct.startswith("acct_"):
        form.stripe_account_id.errors.append(_("A connected account id starts with acct_."))
        ok = False
    if not ok:
        return False
    party.kind = PartyKind(form.kind.data)
    party.legal_name = form.legal_name.data.strip()
    party.email = (form.email.data or "").strip()
    party.payout_currency = currency
    if iban:
        party.iban, party.bic = iban, bic
    party.stripe_account_id = acct
    party.min_payout_minor = min_minor
    party.parent_party_id = parent.id if parent else None
    party.active = bool(form.active.data)
    if party.operator_id is None and op_id is not None:
        party.operator_id = op_id
    return True


@bp.route("/parties")
@login_required
def parties():
    """The parties the person may see, bank details masked."""
    op_id = _scope()
    rows = db_session().scalars(_parties_query(op_id)).all()
    return _page("settlement/parties.html", parties=rows, is_admin=op_id is None)


@bp.route("/parties/new", methods=["GET", "POST"])
@login_required
def party_new():
    """Create a party of the person's operator (an admin picks the operator)."""
    op_id = _scope()
    form = PartyForm()
    _party_form_choices(form, op_id, None)
    operators = db_session().scalars(select(Operator).order_by(Operator.name)).all() if op_id is None else []
    if request.method == "GET":
        return _page("settlement/party_form.html", form=form, party=None, operators=operators)
    party = Party(operator_id=op_id)
    if op_id is None:
        wanted = request.form.get("operator_id", "")
        party.operator_id = int(wanted) if wanted.isdigit() and db_session().get(Operator, int(wanted)) else None
    if not form.validate_on_submit() or not _apply_party_form(form, party, op_id):
        return _page("settlement/party_form.html", status=400, form=form, party=None, operators=operators)
    s = db_session()
    s.add(party)
    s.commit()
    flash(_("Party %(name)s created.", name=party.legal_name))
    return redirect(url_for(".parties"), 303)


@bp.route("/parties/<int(max=2147483647):party_id>/edit", methods=["GET", "POST"])
@login_required
def party_edit(party_id: int):
    """Change a party; an empty IBAN keeps the stored account."""
    op_id = _scope()
    party = _party(party_id)
    form = PartyForm(obj=party) if request.method == "GET" else PartyForm()
    _party_form_choices(form, op_id, party)
    if request.method == "GET":
        form.kind.data = party.kind.value
        form.iban.data = form.bic.data = ""
        form.min_payout.data = _minor_text(party.min_payout_minor, party.payout_currency)
        form.parent_party_id.data = str(party.parent_party_id or "")
        return _page("settlement/party_form.html", form=form, party=party, operators=[])
    if not form.validate_on_submit() or not _apply_party_form(form, party, op_id):
        db_session().rollback()
        return _page("settlement/party_form.html", status=400, form=form, party=party, operators=[])
    db_session().commit()
    flash(_("Party %(name)s saved.", name=party.legal_name))
    return redirect(url_for(".parties"), 303)


# --------------------------------------------------------------------------- split rules


class RuleForm(FlaskForm):
    rule = TextAreaField(_l("Rule (JSON)"), validators=[DataRequired()],
                         description=_l('E.g. {"shares": [{"party_id": 2, "bps": 2000}], "merchant_of_record": 1}'))
    effective_from = StringField(_l("In force from (UTC)"), validators=[Optional()],
                                 description=_l("YYYY-MM-DD HH:MM; empty: now."))


def _allowed_rule_parties(op_id: int | None) -> set[int]:
    """Parties a rule of this operator may pay: its own active parties and the platform's."""
    q = select(Party.id).where(Party.active.is_(True))
    if op_id is not None:
        q = q.where(or_(Party.operator_id == op_id, Party.kind == PartyKind.PLATFORM))
    return set(db_session().scalars(q))


@bp.route("/sites/<int(max=2147483647):site_id>/rules", methods=["GET", "POST"])
@login_required
def rules(site_id: int):
    """A site's split rule versions; a new version from JSON (its errors shown at the field)."""
    op_id = _scope()
    site = _site(site_id)
    s = db_session()
    form = RuleForm()
    versions = s.scalars(select(SplitRule).where(SplitRule.site_id == site.id).order_by(SplitRule.number.desc())).all()
    names = {p.id: p.legal_name for p in s.scalars(_parties_query(op_id))}
    ctx = dict(site=site, versions=versions, form=form, names=names, now=utcnow())
    if request.method == "GET":
        return _page("settlement/rules.html", **ctx)
    if not form.validate_on_submit():
        return _page("settlement/rules.html", status=400, **ctx)
    try:
        rule = json.loads(form.rule.data)
    except ValueError as e:
        form.rule.errors.append(_("Not valid JSON: %(error)s", error=str(e)))
        return _page("settlement/rules.html", status=400, **ctx)
    at = utcnow()
    if form.effective_from.data and form.effective_from.data.strip():
        try:
            at = dt.datetime.fromisoformat(form.effective_from.data.strip()).replace(tzinfo=dt.UTC)
        except ValueError:
            form.effective_from.errors.append(_("A time like 2026-12-31 23:00."))
            return _page("settlement/rules.html", status=400, **ctx)
    try:
        settlement.validate_rule(rule, party_ids=_allowed_rule_parties(op_id))
        row = settlement.add_rule(s, site.id, rule, effective_from=at, created_by=f"user:{current_user.id}")
    except RuleError as e:
        target = form.effective_from if e.field == "effective_from" else form.rule
        target.errors.append(str(e) if e.field and target is form.rule else e.reason)
        s.rollback()
        return _page("settlement/rules.html", status=400, **ctx)
    s.commit()
    flash(_("Version %(n)s of the split rule saved.", n=row.number))
    return redirect(url_for(".rules", site_id=site.id), 303)


# --------------------------------------------------------------------------- statements


def _period() -> tuple[dt.date, dt.date]:
    """``?from=&to=`` (inclusive days, UTC); the current month by default; 400 when bad or too long."""
    today = utcnow().date()
    try:
        start = dt.date.fromisoformat(request.args["from"]) if request.args.get("from") else today.replace(day=1)
        end = dt.date.fromisoformat(request.args["to"]) if request.args.get("to") else today
    except ValueError:
        abort(400, description=_("Dates are YYYY-MM-DD."))
    if end < start or (end - start).days > MAX_PERIOD_DAYS:
        abort(400, description=_("The period must end after it starts and last at most a year."))
    return start, end


def _bounds(start: dt.date, end: dt.date) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.combine(start, dt.time(0), tzinfo=dt.UTC), dt.datetime.combine(end + dt.timedelta(days=1), dt.time(0), tzinfo=dt.UTC)


@dataclass
class StatementRow:
    at: dt.datetime
    kind: str  # revenue, refund, payout
    reference: str
    site: str
    role: str
    amount_minor: int


def statement_rows(party: Party, currency: str, start: dt.date, end: dt.date) -> list[StatementRow]:
    """The party's allocation lines and payouts in the period, oldest first."""
    s = db_session()
    lo, hi = _bounds(start, end)
    sites = {i: n for i, n in s.execute(select(Site.id, Site.name)).all()}
    q = (select(Allocation, AllocationLine).join(AllocationLine, AllocationLine.allocation_id == Allocation.id)
         .where(AllocationLine.party_id == party.id, Allocation.currency == currency, Allocation.booked_at >= lo, Allocation.booked_at < hi)
         .order_by(Allocation.booked_at, Allocation.id, AllocationLine.id))
    rows = [StatementRow(a.booked_at, "refund" if a.reverses_id else "revenue", a.source, sites.get(a.site_id, f"#{a.site_id}"),
                         ln.role, ln.amount_minor) for a, ln in s.execute(q)]
    try:
        from payments.payouts import Payout, PayoutState
    except ImportError:  # pragma: no cover
        Payout = None
    if Payout is not None:
        pq = select(Payout).where(Payout.party_id == party.id, Payout.currency == currency, Payout.created_at >= lo, Payout.created_at < hi,
                                  Payout.state.not_in([PayoutState.RETURNED, PayoutState.FAILED])).order_by(Payout.created_at, Payout.id)
        rows += [StatementRow(p.created_at, "payout", p.end_to_end_id, "", p.rail.value, -p.amount_minor) for p in s.scalars(pq)]
    rows.sort(key=lambda r: r.at)
    return rows


def _totals(rows: list[StatementRow]) -> dict[str, int]:
    out = {"revenue": 0, "refund": 0, "payout": 0}
    for r in rows:
        out[r.kind] += r.amount_minor
    out["total"] = sum(out.values())
    return out


STATEMENT_HEADER = ("date", "kind", "reference", "site", "role", "amount", "currency")


def _statement_table(rows, currency) -> list[list[str]]:
    return [[r.at.strftime("%Y-%m-%d %H:%M"), r.kind, r.reference, r.site, r.role, _minor_text(r.amount_minor, currency), currency] for r in rows]


def _csv_safe(text: str) -> str:
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not text.lstrip("-").replace(".", "").isdigit() else text


@bp.route("/parties/<int(max=2147483647):party_id>/statement")
@bp.route("/parties/<int(max=2147483647):party_id>/statement.<any(csv, xlsx):fmt>")
@login_required
def statement(party_id: int, fmt: str = "html"):
    """A party's statement for ``?from=&to=`` (and ``?currency=``) as HTML, CSV or XLSX: the same rows and totals."""
    party = _party(party_id)
    start, end = _period()
    try:
        currency = check_currency((request.args.get("currency") or party.payout_currency).upper())
    except ValueError:
        abort(400, description=_("Not a currency code."))
    rows = statement_rows(party, currency, start, end)
    totals = _totals(rows)
    table = _statement_table(rows, currency)
    total_rows = [[_("Total %(kind)s", kind=k) if k != "total" else _("Total"), _minor_text(v, currency)] for k, v in totals.items()]
    name = f"statement-{party.id}-{start}-{end}-{currency}"
    if fmt == "csv":
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(STATEMENT_HEADER)
        w.writerows([[_csv_safe(c) for c in row] for row in table])
        w.writerow([])
        for label, value in total_rows:
            w.writerow([label, "", "", "", "", value, currency])
        return _no_store(Response(buf.getvalue().encode("utf-8"), mimetype="text/csv",
                                  headers={"Content-Disposition": f'attachment; filename="{name}.csv"'}))
    if fmt == "xlsx":
        return _no_store(Response(_xlsx(party, currency, start, end, rows, totals), mimetype="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                                  headers={"Content-Disposition": f'attachment; filename="{name}.xlsx"'}))
    return _page("settlement/statement.html", party=party, currency=currency, start=start, end=end, rows=rows, totals=totals)


def _xlsx(party: Party, currency: str, start: dt.date, end: dt.date, rows: list[StatementRow], totals: dict[str, int]) -> bytes:
    """The statement as a workbook: amounts as numbers in the currency's format, the same rows and totals as the CSV."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Statement"
    ws.append([party.legal_name, f"{start} – {end}", currency])
    ws.append(list(STATEMENT_HEADER))
    fmt = "0." + "0" * exponent(currency) if exponent(currency) else "0"
    for r in rows:
        ws.append([r.at.replace(tzinfo=None), r.kind, r.reference, r.site, r.role, Money(r.amount_minor, currency).to_decimal(), currency])
        ws.cell(ws.max_row, 1).number_format = "yyyy-mm-dd hh:mm"
        ws.cell(ws.max_row, 6).number_format = fmt
    ws.append([])
    for k, v in totals.items():
        ws.append([_("Total %(kind)s", kind=k) if k != "total" else _("Total"), None, None, None, None, Money(v, currency).to_decimal(), currency])
        ws.cell(ws.max_row, 6).number_format = fmt
    for col, width in zip("ABCDEFG", (18, 10, 28, 24, 14, 14, 9), strict=True):
        ws.column_dimensions[col].width = width
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- revenue


@bp.route("/revenue")
@login_required
def revenue():
    """Revenue per day and site for ``?from=&to=``: gross, VAT, fee and net, refunds counted negative."""
    op_id = _scope()
    start, end = _period()
    lo, hi = _bounds(start, end)
    s = db_session()
    sites = {i: n for i, n in s.execute(select(Site.id, Site.name).where(Site.operator_id == op_id) if op_id is not None else select(Site.id, Site.name)).all()}
    q = select(Allocation).where(Allocation.booked_at >= lo, Allocation.booked_at < hi).order_by(Allocation.booked_at)
    if op_id is not None:
        q = q.where(Allocation.site_id.in_(list(sites) or [-1]))
    days: dict[tuple, dict] = {}
    for a in s.scalars(q):
        key = (a.booked_at.date(), a.site_id, a.currency)
        row = days.setdefault(key, {"day": key[0], "site": sites.get(a.site_id, f"#{a.site_id}"), "currency": a.currency,
                                    "payments": 0, "refunds": 0, "gross": 0, "vat": 0, "fee": 0, "net": 0})
        row["refunds" if a.reverses_id else "payments"] += 1
        for f in ("gross", "vat", "fee", "net"):
            row[f] += getattr(a, f"{f}_minor")
    rows = sorted(days.values(), key=lambda r: (r["day"], r["site"], r["currency"]))
    return _page("settlement/revenue.html", rows=rows, start=start, end=end)


# --------------------------------------------------------------------------- payout batches


def _payouts_module():
    try:
        from payments import payouts
    except ImportError:  # pragma: no cover - built in parallel
        return None
    return payouts


@bp.route("/payouts")
@login_required
def batches():
    """Payout batches and their state (staff: only their parties' payouts)."""
    op_id = _scope()
    payouts = _payouts_module()
    if payouts is None:
        return _page("settlement/batches.html", batches=[], mine={})
    s = db_session()
    rows = s.scalars(select(payouts.PayoutBatch).order_by(payouts.PayoutBatch.day.desc(), payouts.PayoutBatch.id.desc()).limit(200)).all()
    own = None if op_id is None else set(s.scalars(select(Party.id).where(Party.operator_id == op_id)))
    mine = {b.id: [p for p in b.payouts if own is None or p.party_id in own] for b in rows}
    if own is not None:
        rows = [b for b in rows if mine[b.id]]
    return _page("settlement/batches.html", batches=rows, mine=mine, is_admin=op_id is None)


@bp.route("/payouts/<int(max=2147483647):batch_id>")
@login_required
def batch(batch_id: int):
    """One batch: its payouts (staff: only their parties'), and for an admin the bank files."""
    op_id = _scope()
    payouts = _payouts_module()
    b = db_session().get(payouts.PayoutBatch, batch_id) if payouts else None
    if b is None:
        abort(404)
    own = None if op_id is None else set(db_session().scalars(select(Party.id).where(Party.operator_id == op_id)))
    rows = [p for p in b.payouts if own is None or p.party_id in own]
    if own is not None and not rows:
        abort(404)
    names = {p.id: p.legal_name for p in db_session().scalars(select(Party).where(Party.id.in_([p.party_id for p in rows] or [-1])))}
    files = sorted(_batch_files(b)) if op_id is None else []
    return _page("settlement/batch.html", batch=b, payouts=rows, names=names, files=files)


def _batch_files(b) -> dict[str, bytes]:
    from webapp.settlement import jobs

    return jobs.batch_files(b)


@bp.route("/payouts/<int(max=2147483647):batch_id>/files/<any('pain.001.xml', 'payouts.csv'):name>")
@login_required
def batch_file(batch_id: int, name: str):
    """Download a batch's pain.001 or CSV (admin only: it holds every party's bank details)."""
    _admin_only()
    payouts = _payouts_module()
    b = db_session().get(payouts.PayoutBatch, batch_id) if payouts else None
    files = _batch_files(b) if b is not None else {}
    if name not in files:
        abort(404)
    mimetype = "application/xml" if name.endswith(".xml") else "text/csv"
    return _no_store(Response(files[name], mimetype=mimetype,
                              headers={"Content-Disposition": f'attachment; filename="{b.day}-{b.currency}-{b.id}-{name}"'}))


# --------------------------------------------------------------------------- reconciliation


class ResolveForm(FlaskForm):
    note = TextAreaField(_l("Why this difference is fine"), validators=[Length(max=2000)])


class ImportForm(FlaskForm):
    day = DateField(_l("Day (UTC)"), validators=[DataRequired()])
    file = FileField(_l("Balance transactions export (CSV)"),
                     description=_l("Stripe Dashboard → Balance → Export: id, Type, Source, Amount, Fee, Net, Currency, Created (UTC)."))


@bp.route("/reconciliation")
@login_required
def reconciliation():
    """Reconciliation runs, newest first (admin only)."""
    _admin_only()
    runs = db_session().scalars(select(rec.ReconciliationRun).order_by(rec.ReconciliationRun.day.desc(), rec.ReconciliationRun.currency).limit(400)).all()
    return _page("settlement/reconciliation.html", runs=runs, form=ImportForm(formdata=None))


def _run(run_id: int) -> rec.ReconciliationRun:
    _admin_only()
    run = db_session().get(rec.ReconciliationRun, run_id)
    if run is None:
        abort(404)
    return run


@bp.route("/reconciliation/<int(max=2147483647):run_id>")
@login_required
def run(run_id: int):
    """One run: its differences, open first, each with its cause and a resolve form."""
    r = _run(run_id)
    items = sorted(r.items, key=lambda i: (not i.is_open, i.id))
    return _page("settlement/run.html", run=r, items=items, form=ResolveForm(formdata=None), errors={})


def _item(run_id: int, item_id: int) -> rec.ReconciliationItem:
    r = _run(run_id)
    item = db_session().get(rec.ReconciliationItem, item_id)
    if item is None or item.run_id != r.id:
        abort(404)
    return item


@bp.route("/reconciliation/<int(max=2147483647):run_id>/items/<int(max=2147483647):item_id>/resolve", methods=["POST"])
@login_required
def resolve(run_id: int, item_id: int):
    """Resolve a difference with a note (who and when are kept)."""
    item = _item(run_id, item_id)
    form = ResolveForm()
    s = db_session()
    if not form.validate_on_submit():
        return _page("settlement/run.html", status=400, run=item.run, items=sorted(item.run.items, key=lambda i: (not i.is_open, i.id)),
                     form=form, errors={item.id: "; ".join(sum(form.errors.values(), []))})
    try:
        rec.resolve_item(s, item, by=f"user:{current_user.id}", note=form.note.data, now=utcnow())
    except rec.ReconcileError as e:
        s.rollback()
        messages = {"note_required": _("Say why this difference is fine."), "already_resolved": _("This difference is already resolved.")}
        return _page("settlement/run.html", status=400 if e.code != "already_resolved" else 409, run=item.run,
                     items=sorted(item.run.items, key=lambda i: (not i.is_open, i.id)), form=form, errors={item.id: messages.get(e.code, str(e))})
    s.commit()
    return redirect(url_for(".run", run_id=run_id), 303)


@bp.route("/reconciliation/<int(max=2147483647):run_id>/items/<int(max=2147483647):item_id>/book-fee", methods=["POST"])
@login_required
def book_fee(run_id: int, item_id: int):
    """Accept the provider's fee of a fee difference: book it (once) and resolve the item."""
    item = _item(run_id, item_id)
    form = ResolveForm()
    s = db_session()
    if not form.validate_on_submit():
        abort(400)
    try:
        rec.book_provider_fee(s, item, by=f"user:{current_user.id}", now=utcnow(), note=form.note.data or "")
    except rec.ReconcileError:
        s.rollback()
        abort(409)
    s.commit()
    return redirect(url_for(".run", run_id=run_id), 303)


@bp.route("/reconciliation/import", methods=["POST"])
@login_required
def import_csv():
    """Reconcile a day from the provider's balance-transaction CSV export (when the API is not used)."""
    _admin_only()
    form = ImportForm()
    s = db_session()

    def again(status=400):
        runs = s.scalars(select(rec.ReconciliationRun).order_by(rec.ReconciliationRun.day.desc()).limit(400)).all()
        return _page("settlement/reconciliation.html", status=status, runs=runs, form=form)

    if not form.validate_on_submit():
        return again()
    upload = form.file.data
    data = upload.read(MAX_CSV_BYTES + 1) if upload else b""
    if not data:
        form.file.errors.append(_("Choose the exported CSV file."))
        return again()
    if len(data) > MAX_CSV_BYTES:
        form.file.errors.append(_("The file is larger than 5 MB: export one day at a time."))
        return again()
    try:
        txns = rec.parse_balance_csv(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        form.file.errors.append(_("The file is not UTF-8 text."))
        return again()
    except rec.CsvError as e:
        form.file.errors.append(_("Line %(line)s: %(message)s", line=e.line, message=e.message) if e.line else e.message)
        return again()
    provider = current_app.extensions.get("payment_provider")
    if provider is not None:
        def lookup(charge_id):
            try:
                return provider.charge_payment_id(charge_id=charge_id)
            except ProviderError:
                return None  # left as ch_: listed as a difference with its cause
        txns = rec.resolve_charge_sources(txns, lookup)
    currencies = sorted({t.currency for t in txns}) or ["EUR"]
    last = None
    for currency in currencies:
        last = rec.reconcile_day(s, form.day.data, currency, txns, utcnow(), source="csv")
    s.commit()
    return redirect(url_for(".run", run_id=last.id), 303)
