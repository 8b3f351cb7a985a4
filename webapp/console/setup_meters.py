"""Buildings in the operator console: meters, tenants, and their CSV import with a per-row error report.

A building is a site with meters (``webapp.meters.models``). Pages:
``/operator/buildings`` (``console.buildings``) lists them; a building's page
lists its meters, tenants and meter tariffs, with forms to add and edit them
and to import a CSV of meters or tenants.

Rules, the same for the forms and for every CSV row (one validator each,
``check_meter`` and ``check_tenant``):

* **Meters.** ``meter_code`` is printed on the meter's QR code: letters,
  digits, ``-`` and ``_``, at most 16, stored upper-case, unique among all
  meters (case-insensitively); left empty, one is generated. It never
  changes afterwards. ``kind`` is tenant, public_area or master; a sub-meter
  names its ``master_meter_code`` (a master meter of the same building; a
  master has none). ``ct_multiplier`` 1–100000; ``register_max_kwh`` where
  the register rolls over (empty: never). ``tariff`` and ``collector`` name
  one of the building's meter tariffs and one of the operator's collectors
  (by name, or ``#<id>``).
* **Tenants.** Name and contact email are required; ``billing`` (prepaid or
  postpaid) is chosen once and cannot change later (a prepaid balance and a
  monthly bill do not convert: close the account and open another).
  ``account_email`` links the Voltpay account the tenant signs in with: it
  must be an existing customer account (empty: no sign-in yet; set it later).
  ``meters`` are tenant meters of the building (codes separated by ``;`` or
  spaces in a CSV): not held by another open tenancy, and prepaid exactly when
  the tenant is, so every kWh is either debited or billed. A meter leaves a
  tenant only with a zero balance (close the account first: its balance is
  refunded then).
* **CSV import** (UTF-8, header line naming the columns, at most
  ``MAX_IMPORT_BYTES`` and ``MAX_IMPORT_ROWS`` rows): **all or nothing**.
  Every row is checked first (also against the other rows: a code twice, a
  meter given to two tenants); when any row fails, nothing is imported and
  the answer (400) lists each problem with its line number, the field and the
  reason, downloadable as CSV. The report's cells are written so a
  spreadsheet never runs them as formulas.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from flask import Response, abort, flash, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from wtforms import BooleanField, SelectChoice, SelectField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import Length

from webapp.auth.forms import normalize_email
from webapp.console import bp
from webapp.console.setup_common import csv_cell, has_control_characters, new_code, own_meter, own_site, own_tenant, page, parse_decimal, sites_query
from webapp.db import db_session
from webapp.meters.models import Billing, MeterCollector, MeterTariff, Tenant, TenantState
from webapp.meters.readings import meter_balance
from webapp.models import Meter, MeterKind, Role, Site, User

MAX_IMPORT_BYTES = 1024 * 1024
MAX_IMPORT_ROWS = 5000
METER_CODE = re.compile(r"[A-Za-z0-9_-]{1,16}")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
METER_COLUMNS = ("meter_code", "serial", "kind", "ct_multiplier", "prepaid", "master_meter_code", "tariff", "collector", "register_max_kwh")
METER_REQUIRED = ("serial", "kind")
TENANT_COLUMNS = ("name", "contact_email", "contact_phone", "unit", "leased_area_m2", "billing", "account_email", "meters")
TENANT_REQUIRED = ("name", "contact_email", "billing")
KINDS = [SelectChoice(k.value, label) for k, label in ((MeterKind.TENANT, _l("Tenant meter")), (MeterKind.PUBLIC_AREA, _l("Public area")),
                                                     (MeterKind.MASTER, _l("Master meter")))]
BILLINGS = [SelectChoice(Billing.PREPAID.value, _l("Prepaid (top-ups)")), SelectChoice(Billing.POSTPAID.value, _l("Post-paid (monthly bill)"))]
YES = {"yes", "y", "true", "1", "prepaid"}
NO = {"no", "n", "false", "0", "postpaid", "post-paid"}


# --------------------------------------------------------------------------- the rules, one validator per kind


@dataclass
class Batch:
    """What the other rows of one import claim: codes, masters, meters given to tenants."""

    codes: dict[str, int] = field(default_factory=dict)  # meter code (upper) → line
    masters: set[str] = field(default_factory=set)  # codes of master meters in the file
    claimed: dict[str, int] = field(default_factory=dict)  # meter code → line of the tenant row that takes it


def _ref(s, model, site_or_operator_filter, text: str, *, by=("name",)):
    """The row ``text`` names (``#<id>`` or an exact name / other column), within the filter; (row, error)."""
    text = text.strip()
    if text.startswith("#") and text[1:].isdigit() and len(text) < 12:
        row = s.scalar(select(model).where(model.id == int(text[1:]), site_or_operator_filter))
        return (row, None) if row is not None else (None, "unknown")
    rows = []
    for col in by:
        rows = list(s.scalars(select(model).where(getattr(model, col) == text, site_or_operator_filter).limit(2)))
        if rows:
            break
    if not rows:
        return None, "unknown"
    if len(rows) > 1:
        return None, "ambiguous"
    return rows[0], None


def _control_characters(raw: Mapping[str, str]) -> dict[str, str]:
    """The fields holding control characters (a NUL cannot even be stored), each with the reason."""
    return {k: _("Remove the invisible control characters.") for k, v in raw.items()
            if not k.startswith("__") and isinstance(v, str) and has_control_characters(v)}


def _yes_no(text: str) -> bool | None:
    t = text.strip().lower()
    return True if t in YES else False if t in NO else None


def check_meter(s, site: Site, raw: Mapping[str, str], *, meter: Meter | None = None, batch: Batch | None = None
                ) -> tuple[dict, dict[str, str]]:
    """The values of a meter row (form or CSV) and the problems by field; ``meter`` is the one being edited."""
    v: dict = {}
    err: dict[str, str] = {}
    control = _control_characters(raw)
    get = lambda k: "" if k in control else (raw.get(k) or "").strip()  # noqa: E731

    if meter is None:
        code = get("meter_code").upper()
        if code:
            if not METER_CODE.fullmatch(code):
                err["meter_code"] = _("At most 16 letters, digits, - and _.")
            elif s.scalar(select(func.count()).select_from(Meter).where(func.upper(Meter.meter_code) == code)):
                err["meter_code"] = _("Another meter already has the code %(code)s.", code=code)
            elif batch is not None and batch.codes.get(code, 0) > 1:
                err["meter_code"] = _("The code %(code)s appears on more than one line of the file.", code=code)
        v["meter_code"] = code or None
    serial = get("serial")
    if not serial:
        err["serial"] = _("Enter the meter's serial number.")
    elif len(serial) > 64:
        err["serial"] = _("At most 64 characters.")
    v["serial"] = serial
    kind_text = get("kind").lower() or MeterKind.TENANT.value
    try:
        kind = MeterKind(kind_text)
    except ValueError:
        kind = None
        err["kind"] = _("One of tenant, public_area, master.")
    v["kind"] = kind
    ct = get("ct_multiplier") or "1"
    if not ct.isdigit() or not 1 <= int(ct[:7]) <= 100_000 or len(ct) > 7:
        err["ct_multiplier"] = _("A whole number from 1 to 100000.")
    else:
        v["ct_multiplier"] = int(ct)
    prepaid = _yes_no(get("prepaid") or "yes")
    if prepaid is None:
        err["prepaid"] = _("yes or no.")
    v["prepaid"] = prepaid
    master_code = get("master_meter_code").upper()
    v["master_meter_id"] = None
    v["master_meter_code"] = master_code or None
    if master_code:
        own_code = (meter.meter_code if meter is not None else v.get("meter_code")) or ""
        if kind == MeterKind.MASTER:
            err["master_meter_code"] = _("A master meter has no master meter upstream.")
        elif master_code == own_code.upper():
            err["master_meter_code"] = _("A meter cannot be its own master meter.")
        else:
            master = s.scalar(select(Meter).where(func.upper(Meter.meter_code) == master_code, Meter.site_id == site.id))
            if master is not None and master.kind == MeterKind.MASTER:
                v["master_meter_id"] = master.id
            elif master is None and batch is not None and master_code in batch.masters:
                pass  # a master meter of the same file: linked once it exists
            else:
                err["master_meter_code"] = _("No master meter %(code)s in this building.", code=master_code)
    v["tariff_id"] = None
    tariff_text = get("tariff")
    if tariff_text:
        row, problem = _ref(s, MeterTariff, MeterTariff.site_id == site.id, tariff_text)
        if row is None:
            err["tariff"] = (_("Two tariffs of this building have that name: write #<number> instead.") if problem == "ambiguous"
                             else _("No meter tariff %(name)s in this building.", name=tariff_text))
        else:
            v["tariff_id"] = row.id
    v["collector_id"] = None
    collector_text = get("collector")
    if collector_text:
        row, problem = _ref(s, MeterCollector, MeterCollector.operator_id == site.operator_id, collector_text, by=("name", "client_id"))
        if row is None:
            err["collector"] = (_("Two collectors have that name: write #<number> instead.") if problem == "ambiguous"
                                else _("No collector %(name)s of this operator.", name=collector_text))
        else:
            v["collector_id"] = row.id
    v["register_max_kwh"] = None
    reg = get("register_max_kwh")
    if reg:
        try:
            value = parse_decimal(reg, places=3)
            if value <= 0 or value >= Decimal("1e15"):
                raise ValueError(_("More than 0 and less than 10¹⁵ kWh."))
            v["register_max_kwh"] = value
        except ValueError as e:
            err["register_max_kwh"] = str(e)
    if meter is not None and kind is not None:
        tenant = db_session().get(Tenant, meter.tenant_id) if meter.tenant_id else None
        if tenant is not None and tenant.state != TenantState.CLOSED:
            if kind != MeterKind.TENANT:
                err["kind"] = _("The meter belongs to tenant %(name)s: it stays a tenant meter.", name=tenant.name)
            elif prepaid is not None and prepaid != (tenant.billing == Billing.PREPAID):
                err["prepaid"] = _("Tenant %(name)s is %(billing)s: the meter must be too.", name=tenant.name,
                                   billing=_("prepaid") if tenant.billing == Billing.PREPAID else _("post-paid"))
        if kind != MeterKind.MASTER and meter.kind == MeterKind.MASTER and s.scalar(
                select(func.count()).select_from(Meter).where(Meter.master_meter_id == meter.id)):
            err["kind"] = _("Other meters name this one as their master: it stays a master meter.")
    return v, {**err, **control}


def _meter_codes(text: str) -> list[str]:
    return [c.upper() for c in re.split(r"[;,\s]+", text.strip()) if c]


def check_tenant(s, site: Site, raw: Mapping[str, str], *, tenant: Tenant | None = None, batch: Batch | None = None, line: int = 0
                 ) -> tuple[dict, dict[str, str]]:
    """The values of a tenant row (form or CSV) and the problems by field; ``tenant`` is the one being edited."""
    v: dict = {}
    err: dict[str, str] = {}
    control = _control_characters(raw)
    get = lambda k: "" if k in control else (raw.get(k) or "").strip()  # noqa: E731

    name = get("name")
    if not name:
        err["name"] = _("Enter the tenant's name.")
    elif len(name) > 200:
        err["name"] = _("At most 200 characters.")
    v["name"] = name
    contact = normalize_email(get("contact_email"))
    if not contact:
        err["contact_email"] = _("Enter the address bills and alerts go to.")
    elif len(contact) > 254 or not EMAIL.fullmatch(contact):
        err["contact_email"] = _("Enter an email address like name@example.com.")
    v["contact_email"] = contact
    phone = get("contact_phone")
    if len(phone) > 40:
        err["contact_phone"] = _("At most 40 characters.")
    v["contact_phone"] = phone
    unit = get("unit")
    if len(unit) > 64:
        err["unit"] = _("At most 64 characters.")
    v["unit"] = unit
    v["leased_area_m2"] = Decimal(0)
    area = get("leased_area_m2")
    if area:
        try:
            value = parse_decimal(area, places=2)
            if value < 0 or value >= Decimal("1e10"):
                raise ValueError(_("From 0 to 9999999999.99 m²."))
            v["leased_area_m2"] = value
        except ValueError as e:
            err["leased_area_m2"] = str(e)
    if tenant is None:
        billing_text = get("billing").lower().replace("-", "")
        try:
            v["billing"] = Billing(billing_text)
        except ValueError:
            v["billing"] = None
            err["billing"] = _("prepaid or postpaid.")
    else:
        v["billing"] = tenant.billing
    v["user_id"] = None
    account = normalize_email(get("account_email"))
    if account:
        user = s.scalar(select(User).where(User.email == account))
        if user is None or user.role != Role.CUSTOMER or not user.is_active_account:
            err["account_email"] = _("No Voltpay customer account uses this address: the tenant signs up first (or leave it empty).")
        else:
            v["user_id"] = user.id
    v["meters"] = []
    codes = _meter_codes(get("meters"))
    problems = []
    for code in codes:
        m = s.scalar(select(Meter).where(func.upper(Meter.meter_code) == code, Meter.site_id == site.id))
        if m is None:
            problems.append(_("%(code)s is not a meter of this building.", code=code))
            continue
        if m.kind != MeterKind.TENANT:
            problems.append(_("%(code)s is not a tenant meter.", code=code))
            continue
        holder = s.get(Tenant, m.tenant_id) if m.tenant_id else None
        if holder is not None and (tenant is None or holder.id != tenant.id) and holder.state != TenantState.CLOSED:
            problems.append(_("%(code)s belongs to tenant %(name)s.", code=code, name=holder.name))
            continue
        if batch is not None and batch.claimed.get(code, line) != line:
            problems.append(_("%(code)s is given to another tenant on line %(line)d.", code=code, line=batch.claimed[code]))
            continue
        if v["billing"] is not None and m.prepaid != (v["billing"] == Billing.PREPAID):
            problems.append(_("%(code)s is %(kind)s, the tenant is not.", code=code,
                              kind=_("prepaid") if m.prepaid else _("post-paid")))
            continue
        if holder is not None and holder.state == TenantState.CLOSED and meter_balance(s, m).amount != 0:
            problems.append(_("%(code)s still has a balance from a closed account.", code=code))
            continue
        v["meters"].append(m)
    if tenant is not None:
        for m in tenant.meters:
            if m.meter_code.upper() not in codes and meter_balance(s, m).amount != 0:
                problems.append(_("%(code)s has a balance: close the account before taking the meter away.", code=m.meter_code))
    if problems:
        err["meters"] = " ".join(problems)
    return v, {**err, **control}


def _apply_meter(meter: Meter, v: dict) -> None:
    meter.serial = v["serial"]
    meter.kind = v["kind"]
    meter.ct_multiplier = v["ct_multiplier"]
    meter.prepaid = v["prepaid"]
    meter.master_meter_id = v["master_meter_id"]
    meter.tariff_id = v["tariff_id"]
    meter.collector_id = v["collector_id"]
    meter.register_max_kwh = v["register_max_kwh"]


def _apply_tenant(s, tenant: Tenant, v: dict) -> None:
    tenant.name = v["name"]
    tenant.contact_email = v["contact_email"]
    tenant.contact_phone = v["contact_phone"]
    tenant.unit = v["unit"]
    tenant.leased_area_m2 = v["leased_area_m2"]
    tenant.user_id = v["user_id"]
    keep = {m.id for m in v["meters"]}
    if tenant.id is not None:
        for m in s.scalars(select(Meter).where(Meter.tenant_id == tenant.id)):
            if m.id not in keep:
                m.tenant_id = None
    s.flush()
    for m in v["meters"]:
        m.tenant_id = tenant.id


# --------------------------------------------------------------------------- forms


class MeterForm(FlaskForm):
    """A meter of a building (the fields have the names of the CSV columns)."""

    meter_code = StringField(_l("Meter code"), validators=[Length(max=16)],
                             description=_l("On the meter's QR code; empty: one is made. It cannot change later."))
    serial = StringField(_l("Serial number"), validators=[Length(max=64)])
    kind = SelectField(_l("Kind"), choices=KINDS, default=MeterKind.TENANT.value, validate_choice=False)
    ct_multiplier = StringField(_l("CT multiplier"), default="1", description=_l("Energy = register difference × this."))
    prepaid = BooleanField(_l("Prepaid (debited as electricity is used)"), default=True)
    master_meter_code = SelectField(_l("Master meter upstream"), choices=[], validate_choice=False)
    tariff = SelectField(_l("Tariff"), choices=[], validate_choice=False)
    collector = SelectField(_l("Data collector"), choices=[], validate_choice=False)
    register_max_kwh = StringField(_l("Register rolls over after (kWh)"), description=_l("E.g. 99999.9; empty: never."))


class TenantForm(FlaskForm):
    """A tenant of a building (the fields have the names of the CSV columns)."""

    name = StringField(_l("Name (person or company)"), validators=[Length(max=200)])
    contact_email = StringField(_l("Contact email"), validators=[Length(max=254)], description=_l("Bills and alerts go here."))
    contact_phone = StringField(_l("Phone"), validators=[Length(max=40)])
    unit = StringField(_l("Unit (flat, shop, room)"), validators=[Length(max=64)])
    leased_area_m2 = StringField(_l("Leased area (m²)"), default="0", description=_l("Shares public-area electricity when billed by area."))
    billing = SelectField(_l("Billing"), choices=BILLINGS, default=Billing.PREPAID.value, description=_l("It cannot change later."))
    account_email = StringField(_l("Voltpay account email"), validators=[Length(max=254)],
                                description=_l("The account the tenant signs in with; empty: none yet."))
    meters = SelectMultipleField(_l("Meters"), choices=[], validate_choice=False)


class ImportForm(FlaskForm):
    file = FileField(_l("CSV file"))


class ReportForm(FlaskForm):
    report = TextAreaField()


def _meter_choices(s, site: Site, form: MeterForm, meter: Meter | None) -> None:
    masters = s.scalars(select(Meter).where(Meter.site_id == site.id, Meter.kind == MeterKind.MASTER).order_by(Meter.meter_code))
    form.master_meter_code.choices = [SelectChoice("", _("None"))] + [SelectChoice(m.meter_code, f"{m.meter_code} ({m.serial})")
                                                                       for m in masters if meter is None or m.id != meter.id]
    tariffs = s.scalars(select(MeterTariff).where(MeterTariff.site_id == site.id).order_by(MeterTariff.name))
    form.tariff.choices = [SelectChoice("", _("None"))] + [SelectChoice(f"#{t.id}", t.name) for t in tariffs]
    collectors = s.scalars(select(MeterCollector).where(MeterCollector.operator_id == site.operator_id).order_by(MeterCollector.name))
    form.collector.choices = [SelectChoice("", _("None"))] + [SelectChoice(f"#{c.id}", c.name) for c in collectors]


def _tenant_choices(s, site: Site, form: TenantForm, tenant: Tenant | None) -> None:
    rows = s.scalars(select(Meter).where(Meter.site_id == site.id, Meter.kind == MeterKind.TENANT).order_by(Meter.meter_code))
    choices = []
    for m in rows:
        holder = s.get(Tenant, m.tenant_id) if m.tenant_id else None
        if holder is None or holder.state == TenantState.CLOSED or (tenant is not None and holder.id == tenant.id):
            choices.append(SelectChoice(m.meter_code, f"{m.meter_code} ({_('prepaid') if m.prepaid else _('post-paid')})"))
    form.meters.choices = choices


def _form_errors(form: FlaskForm, errors: dict[str, str]) -> None:
    for name, reason in errors.items():
        form[name].errors = [*form[name].errors, reason] if isinstance(form[name].errors, list) else [reason]


def _meter_raw(form: MeterForm) -> dict[str, str]:
    raw = {name: form[name].data or "" for name in METER_COLUMNS if name != "prepaid"}
    raw["prepaid"] = "yes" if form.prepaid.data else "no"
    return raw


def _tenant_raw(form: TenantForm) -> dict[str, str]:
    raw = {name: form[name].data or "" for name in TENANT_COLUMNS if name != "meters"}
    raw["meters"] = " ".join(form.meters.data or [])
    return raw


# --------------------------------------------------------------------------- pages


@bp.route("/buildings")
def buildings():
    """The sites with meters and tenants (any site can become a building)."""
    s = db_session()
    rows = list(s.scalars(sites_query()))
    ids = [x.id for x in rows]
    meters = dict(s.execute(select(Meter.site_id, func.count()).where(Meter.site_id.in_(ids)).group_by(Meter.site_id)).all()) if ids else {}
    tenants = dict(s.execute(select(Tenant.site_id, func.count()).where(Tenant.site_id.in_(ids)).group_by(Tenant.site_id)).all()) if ids else {}
    return page("console/buildings.html", sites=rows, meters=meters, tenants=tenants)


def _building_page(site: Site, *, status: int = 200, import_kind: str | None = None, report: list | None = None,
                   report_csv: str | None = None, imported: int | None = None, import_error: str | None = None):
    s = db_session()
    meters = list(s.scalars(select(Meter).where(Meter.site_id == site.id).order_by(Meter.meter_code)))
    tenants = list(s.scalars(select(Tenant).where(Tenant.site_id == site.id).order_by(Tenant.name, Tenant.id)))
    tariffs = list(s.scalars(select(MeterTariff).where(MeterTariff.site_id == site.id).order_by(MeterTariff.name)))
    by_id = {m.id: m for m in meters}
    names = {
        "tariff": {t.id: t.name for t in tariffs},
        "collector": dict(s.execute(select(MeterCollector.id, MeterCollector.name).where(MeterCollector.operator_id == site.operator_id)).all()),
        "tenant": {t.id: t.name for t in tenants},
    }
    meter_form, tenant_form = ImportForm(formdata=None, prefix="meters"), ImportForm(formdata=None, prefix="tenants")
    if import_error:
        (meter_form if import_kind == "meters" else tenant_form).file.errors = [import_error]
    return page("console/building.html", status=status, site=site, meters=meters, tenants=tenants, tariffs=tariffs, by_id=by_id,
                names=names, meter_import=meter_form, tenant_import=tenant_form, import_kind=import_kind, report=report,
                report_form=ReportForm(formdata=None, data={"report": report_csv}) if report_csv else None, imported=imported,
                meter_columns=METER_COLUMNS, tenant_columns=TENANT_COLUMNS)


@bp.route("/buildings/<int(max=2147483647):site_id>")
def building(site_id: int):
    """A building: its meters, tenants and meter tariffs; add or import more."""
    return _building_page(own_site(site_id))


@bp.route("/buildings/<int(max=2147483647):site_id>/meters/new", methods=["GET", "POST"])
def meter_new(site_id: int):
    """Add a meter to a building."""
    site = own_site(site_id)
    s = db_session()
    form = MeterForm()
    _meter_choices(s, site, form, None)
    if request.method == "GET":
        return page("console/meter_form.html", form=form, site=site, meter=None)
    values, errors = check_meter(s, site, _meter_raw(form)) if form.validate_on_submit() else ({}, {})
    if errors or form.errors:
        _form_errors(form, errors)
        return page("console/meter_form.html", status=400, form=form, site=site, meter=None)
    meter = Meter(site_id=site.id, meter_code=values["meter_code"] or new_code(s, Meter.meter_code))
    _apply_meter(meter, values)
    try:
        with s.begin_nested():
            s.add(meter)
            s.flush()
    except IntegrityError:
        form.meter_code.errors = [_("Another meter already has the code %(code)s.", code=meter.meter_code)]
        return page("console/meter_form.html", status=400, form=form, site=site, meter=None)
    s.commit()
    flash(_("Meter %(code)s added.", code=meter.meter_code))
    return redirect(url_for(".building", site_id=site.id), 303)


@bp.route("/meters/<int(max=2147483647):meter_id>/edit", methods=["GET", "POST"])
def meter_edit(meter_id: int):
    """Change a meter (its code stays: it is on the QR sticker)."""
    meter = own_meter(meter_id)
    site = meter.site
    s = db_session()
    form = MeterForm() if request.method == "POST" else MeterForm(formdata=None, data={
        "meter_code": meter.meter_code, "serial": meter.serial, "kind": meter.kind.value, "ct_multiplier": str(meter.ct_multiplier),
        "prepaid": meter.prepaid, "master_meter_code": s.get(Meter, meter.master_meter_id).meter_code if meter.master_meter_id else "",
        "tariff": f"#{meter.tariff_id}" if meter.tariff_id else "", "collector": f"#{meter.collector_id}" if meter.collector_id else "",
        "register_max_kwh": "" if meter.register_max_kwh is None else str(meter.register_max_kwh)})
    _meter_choices(s, site, form, meter)
    form.meter_code.data = meter.meter_code
    if request.method == "GET":
        return page("console/meter_form.html", form=form, site=site, meter=meter)
    values, errors = check_meter(s, site, _meter_raw(form), meter=meter) if form.validate_on_submit() else ({}, {})
    if errors or form.errors:
        _form_errors(form, errors)
        return page("console/meter_form.html", status=400, form=form, site=site, meter=meter)
    _apply_meter(meter, values)
    s.commit()
    flash(_("Meter %(code)s saved.", code=meter.meter_code))
    return redirect(url_for(".building", site_id=site.id), 303)


@bp.route("/buildings/<int(max=2147483647):site_id>/tenants/new", methods=["GET", "POST"])
def tenant_new(site_id: int):
    """Add a tenant to a building."""
    site = own_site(site_id)
    s = db_session()
    form = TenantForm()
    _tenant_choices(s, site, form, None)
    if request.method == "GET":
        return page("console/tenant_form.html", form=form, site=site, tenant=None)
    values, errors = check_tenant(s, site, _tenant_raw(form)) if form.validate_on_submit() else ({}, {})
    if errors or form.errors:
        _form_errors(form, errors)
        return page("console/tenant_form.html", status=400, form=form, site=site, tenant=None)
    tenant = Tenant(site_id=site.id, billing=values["billing"], currency=site.currency)
    s.add(tenant)
    _apply_tenant(s, tenant, values)
    s.commit()
    flash(_("Tenant %(name)s added.", name=tenant.name))
    return redirect(url_for(".building", site_id=site.id), 303)


@bp.route("/tenants/<int(max=2147483647):tenant_id>/edit", methods=["GET", "POST"])
def tenant_edit(tenant_id: int):
    """Change a tenant's details, account and meters (billing stays)."""
    tenant = own_tenant(tenant_id)
    s = db_session()
    site = s.get(Site, tenant.site_id)
    if tenant.state == TenantState.CLOSED:
        flash(_("The account of %(name)s is closed: it cannot change.", name=tenant.name), "error")
        return redirect(url_for(".building", site_id=site.id), 303)
    user = s.get(User, tenant.user_id) if tenant.user_id else None
    form = TenantForm() if request.method == "POST" else TenantForm(formdata=None, data={
        "name": tenant.name, "contact_email": tenant.contact_email, "contact_phone": tenant.contact_phone, "unit": tenant.unit,
        "leased_area_m2": str(tenant.leased_area_m2), "billing": tenant.billing.value, "account_email": user.email if user else "",
        "meters": [m.meter_code for m in tenant.meters]})
    _tenant_choices(s, site, form, tenant)
    form.billing.data = tenant.billing.value
    if request.method == "GET":
        return page("console/tenant_form.html", form=form, site=site, tenant=tenant)
    values, errors = check_tenant(s, site, _tenant_raw(form), tenant=tenant) if form.validate_on_submit() else ({}, {})
    if errors or form.errors:
        _form_errors(form, errors)
        return page("console/tenant_form.html", status=400, form=form, site=site, tenant=tenant)
    _apply_tenant(s, tenant, values)
    s.commit()
    flash(_("Tenant %(name)s saved.", name=tenant.name))
    return redirect(url_for(".building", site_id=site.id), 303)


# --------------------------------------------------------------------------- CSV import


@dataclass
class Problem:
    """One reason a row of an import was refused."""

    line: int
    field: str
    value: str
    reason: str


def read_csv(data: bytes, columns: tuple[str, ...], required: tuple[str, ...]) -> tuple[list[tuple[int, dict[str, str]]], str | None]:
    """The rows of an uploaded CSV with their line numbers, or the reason the file as a whole cannot be read."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], _("The file is not UTF-8 text. Save it as CSV (UTF-8) and try again.")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return [], _("The file is empty.")
    except csv.Error:
        return [], _("The file is not a valid CSV file.")
    unknown = [h for h in header if h and h not in columns]
    missing = [c for c in required if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        return [], _("The first line must name the columns, each once, from: %(cols)s (required: %(req)s).",
                     cols=", ".join(columns), req=", ".join(required))
    rows = []
    try:
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            if len(rows) >= MAX_IMPORT_ROWS:
                return [], _("At most %(n)d rows per file: split it and import each part.", n=MAX_IMPORT_ROWS)
            if len(record) > len(header):
                rows.append((reader.line_num, {"__extra__": "1", **dict(zip(header, record))}))
                continue
            rows.append((reader.line_num, {name: (record[i] if i < len(record) else "") for i, name in enumerate(header)}))
    except csv.Error:
        return [], _("The file is not a valid CSV file.")
    if not rows:
        return [], _("The file has no rows below its header.")
    return rows, None


def _report_csv(problems: list[Problem]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["line", "field", "value", "reason"])
    for p in problems:
        w.writerow([p.line, csv_cell(p.field), csv_cell(p.value), csv_cell(p.reason)])
    return out.getvalue()


def import_meters(s, site: Site, rows: list[tuple[int, dict[str, str]]]) -> tuple[int, list[Problem]]:
    """Check every meter row, then add them all (flushed) or none; (meters added, problems)."""
    batch = Batch()
    for _line, raw in rows:
        code = (raw.get("meter_code") or "").strip().upper()
        if code:
            batch.codes[code] = batch.codes.get(code, 0) + 1
            if (raw.get("kind") or "").strip().lower() == MeterKind.MASTER.value:
                batch.masters.add(code)
    problems: list[Problem] = []
    checked = []
    for line, raw in rows:
        if raw.get("__extra__"):
            problems.append(Problem(line, "", "", _("More cells than the header has columns.")))
            continue
        values, errors = check_meter(s, site, raw, batch=batch)
        problems.extend(Problem(line, f, raw.get(f, ""), reason) for f, reason in errors.items())
        checked.append(values)
    if problems:
        return 0, problems
    created: dict[str, Meter] = {}
    # Masters first, so the sub-meters of the same file can point at them.
    for values in sorted(checked, key=lambda v: v["kind"] != MeterKind.MASTER):
        meter = Meter(site_id=site.id, meter_code=values["meter_code"] or new_code(s, Meter.meter_code, avoid=set(batch.codes)))
        _apply_meter(meter, values)
        if meter.master_meter_id is None and values["master_meter_code"]:
            meter.master_meter_id = created[values["master_meter_code"]].id
        s.add(meter)
        s.flush()
        created[meter.meter_code] = meter
    return len(checked), []


def import_tenants(s, site: Site, rows: list[tuple[int, dict[str, str]]]) -> tuple[int, list[Problem]]:
    """Check every tenant row, then add them all (flushed) or none; (tenants added, problems)."""
    batch = Batch()
    for line, raw in rows:
        for code in _meter_codes(raw.get("meters") or ""):
            batch.claimed.setdefault(code, line)
    problems: list[Problem] = []
    checked = []
    for line, raw in rows:
        if raw.get("__extra__"):
            problems.append(Problem(line, "", "", _("More cells than the header has columns.")))
            continue
        values, errors = check_tenant(s, site, raw, batch=batch, line=line)
        problems.extend(Problem(line, f, raw.get(f, ""), reason) for f, reason in errors.items())
        checked.append(values)
    if problems:
        return 0, problems
    for values in checked:
        tenant = Tenant(site_id=site.id, billing=values["billing"], currency=site.currency)
        s.add(tenant)
        _apply_tenant(s, tenant, values)
        s.flush()
    return len(checked), []


@bp.route("/buildings/<int(max=2147483647):site_id>/import/<any(meters, tenants):kind>", methods=["POST"])
def building_import(site_id: int, kind: str):
    """Import a CSV of meters or tenants: all rows, or none with a report of every problem."""
    site = own_site(site_id)
    s = db_session()
    form = ImportForm(prefix=kind)
    upload = form.file.data
    if not form.validate_on_submit():
        return _building_page(site, status=400, import_kind=kind, import_error=_("The form expired. Please try again."))
    if upload is None or not getattr(upload, "filename", ""):
        return _building_page(site, status=400, import_kind=kind, import_error=_("Choose a CSV file."))
    data = upload.read(MAX_IMPORT_BYTES + 1)
    if len(data) > MAX_IMPORT_BYTES:
        return _building_page(site, status=400, import_kind=kind, import_error=_("The file is larger than 1 MB: split it and import each part."))
    columns, required = (METER_COLUMNS, METER_REQUIRED) if kind == "meters" else (TENANT_COLUMNS, TENANT_REQUIRED)
    rows, error = read_csv(data, columns, required)
    if error:
        return _building_page(site, status=400, import_kind=kind, import_error=error)
    count, problems = (import_meters if kind == "meters" else import_tenants)(s, site, rows)
    if problems:
        s.rollback()
        return _building_page(site, status=400, import_kind=kind, report=problems, report_csv=_report_csv(problems))
    try:
        s.commit()
    except IntegrityError:  # a code taken by someone else meanwhile
        s.rollback()
        return _building_page(site, status=409, import_kind=kind,
                              import_error=_("Someone changed this building at the same time. Nothing was imported: try again."))
    flash(_("%(n)d rows imported.", n=count))
    return redirect(url_for(".building", site_id=site.id), 303)


@bp.route("/import-report.csv", methods=["POST"])
def import_report():
    """The import's error report as a CSV download (the page posts back the report it showed; every cell made formula-safe again)."""
    form = ReportForm()
    if not form.validate_on_submit() or not form.report.data:
        abort(400)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    try:
        for record in csv.reader(io.StringIO(form.report.data[:MAX_IMPORT_BYTES * 2], newline="")):
            w.writerow([csv_cell(cell) if not cell.startswith("'") else cell for cell in record])
    except csv.Error:
        abort(400)
    resp = Response(out.getvalue(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = 'attachment; filename="import-report.csv"'
    resp.headers["Cache-Control"] = "no-store"
    return resp
