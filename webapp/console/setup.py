"""Setup in the operator console: the overview, operator settings, sites, chargers and connectors.

Pages (all under ``/operator``, operator staff of their own operator, or an admin):

* ``/`` (``console.index``): counts and a link to every section of the console
  and to the operator pages that live elsewhere (settlement, branding,
  collectors, readings upload).
* ``/settings``: the operator's support approval limit and monitoring alarm
  settings (an admin picks the operator with ``?operator=``).
* ``/sites``, ``/sites/new``, ``/sites/<id>``, ``/sites/<id>/edit``: a site's
  name, address, time zone (an IANA name), currency (ISO 4217) and charging
  rules. Rules: the currency cannot change once the site has chargers, meters
  or meter tariffs (their prices and balances are in it); hold limits left
  empty take the platform defaults (``payments.price_display.HoldPolicy``);
  a change of the meter sample interval reaches a charger at its next boot.
* ``/sites/<id>/chargers/new`` and ``/chargers/<id>``: a charger with its OCPP
  charge point id and connectors. The id follows OCPP 1.6's CiString rules
  (printable ASCII, at most 48 characters, compared case-insensitively, so
  ``cp-1`` and ``CP-1`` are one id and cannot both exist), limited to the
  characters that travel unchanged in the URL path ``/ocpp/<id>`` and in an
  HTTP Basic user name: letters, digits and ``* - _ = + | @ .`` (no ``:``,
  which ends a Basic user name, no ``/``). Its password is generated here,
  shown once on the answer page (never stored in the clear: an Argon2 hash
  that the gateway checks with ``verify_password``), and can be replaced by a
  new one (shown once again); a charger already connected keeps its socket
  until it reconnects, then needs the new password.
* Connectors get a ``connector_code`` of six upper-case letters and digits
  without look-alikes (``setup_common.new_code``), unique among all
  connectors; it is what the QR code and the printed sticker carry, so it
  never changes.

Meters, tenants and CSV imports are in ``setup_meters``; tariffs in
``setup_tariffs`` (both imported at the end of this module so their views
register on the blueprint).
"""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlsplit

from flask import abort, current_app, flash, redirect, request, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from wtforms import SelectChoice, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Email, InputRequired, Length, NumberRange, Optional, ValidationError

from payments.money import Money, MoneyError, check_currency
from payments.money import parse as parse_money
from payments.tariff_store import Tariff, TariffVersion, connector_owner
from webapp.auth.passwords import hash_password
from webapp.charging.models import ChargerConnection
from webapp.console import bp
from webapp.console.models import Alarm
from webapp.console.setup_common import (
    Printable,
    WholeNumber,
    check_zone,
    code_taken,
    new_charger_password,
    new_code,
    operators_for_admin,
    own_charger,
    own_connector,
    own_site,
    page,
    scope,
    sites_query,
)
from webapp.db import db_session, utcnow
from webapp.meters.models import MeterTariff, Tenant
from webapp.models import Charger, Connector, Meter, Operator, Site

CHARGE_POINT_ID = re.compile(r"[A-Za-z0-9*\-_=+|@.]{1,48}")
MAX_CONNECTORS = 10
# OCPI 2.2.1 ConnectorType values for the plugs found on public chargers.
STANDARD_LABELS = {
    "IEC_62196_T2": _l("Type 2 (socket or cable)"),
    "IEC_62196_T2_COMBO": _l("CCS2 (Combo 2)"),
    "CHADEMO": _l("CHAdeMO"),
    "IEC_62196_T1": _l("Type 1 (J1772)"),
    "IEC_62196_T1_COMBO": _l("CCS1 (Combo 1)"),
    "GBT_AC": _l("GB/T AC"),
    "GBT_DC": _l("GB/T DC"),
    "TESLA_S": _l("Tesla"),
    "DOMESTIC_F": _l("Schuko (domestic type F)"),
    "IEC_60309_2_single_16": _l("Blue CEE 16 A"),
}
STANDARDS = [SelectChoice(value, label) for value, label in STANDARD_LABELS.items()]


# --------------------------------------------------------------------------- forms


def _hold_minutes():
    return [Optional(), NumberRange(min=1, max=24 * 60, message=_l("Between 1 and 1440 minutes (24 hours)."))]


class SiteForm(FlaskForm):
    """A site: where it is, its time zone and currency, and its charging rules."""

    operator_id = SelectField(_l("Operator"), choices=[], validate_choice=False)
    name = StringField(_l("Name"), validators=[Printable(), DataRequired(message=_l("Give the site a name.")), Length(max=200)])
    address = TextAreaField(_l("Address"), validators=[Printable(), Optional(), Length(max=1000)], render_kw={"rows": 3})
    time_zone = StringField(_l("Time zone"), default="Europe/Madrid", validators=[Printable(), DataRequired(message=_l("Enter a time zone."))],
                            description=_l("An IANA name such as Europe/Madrid: time-of-use prices and receipts use it."))
    currency = StringField(_l("Currency"), default="EUR", validators=[Printable(), DataRequired(message=_l("Enter a currency code."))],
                           description=_l("ISO 4217 code such as EUR. It cannot change once the site has chargers or meters."))
    start_window_s = WholeNumber(_l("Start window (seconds)"), default=180,
                                  validators=[InputRequired(message=_l("Enter a number of seconds.")),
                                              NumberRange(min=30, max=3600, message=_l("Between 30 and 3600 seconds."))],
                                  description=_l("A car not plugged in within this time: the start is given up and the hold released."))
    min_billable_wh = WholeNumber(_l("Minimum billable energy (Wh)"), default=100,
                                   validators=[InputRequired(message=_l("Enter a number of Wh.")),
                                               NumberRange(min=0, max=100_000, message=_l("Between 0 and 100000 Wh."))],
                                   description=_l("A session with less energy is free."))
    min_billable_s = WholeNumber(_l("Minimum billable charging time (seconds)"), default=60,
                                  validators=[InputRequired(message=_l("Enter a number of seconds.")),
                                              NumberRange(min=0, max=3600, message=_l("Between 0 and 3600 seconds."))],
                                  description=_l("A shorter session is free."))
    hold_max_energy_kwh = WholeNumber(_l("Hold: energy covered (kWh)"),
                                       validators=[Optional(), NumberRange(min=1, max=1000, message=_l("Between 1 and 1000 kWh."))],
                                       description=_l("Empty: 60 kWh. The session stops at this much energy."))
    hold_max_charging_min = WholeNumber(_l("Hold: charging time covered (minutes)"), validators=_hold_minutes(),
                                         description=_l("Empty: 240 minutes. The session stops after this much charging."))
    hold_max_idle_min = WholeNumber(_l("Hold: idle time covered (minutes)"),
                                     validators=[Optional(), NumberRange(min=0, max=24 * 60, message=_l("Between 0 and 1440 minutes."))],
                                     description=_l("Empty: 120 minutes. Idle fees are billed at most this long after the stop."))
    meter_sample_interval_s = WholeNumber(_l("Meter values every (seconds)"), default=10,
                                           validators=[InputRequired(message=_l("Enter a number of seconds.")),
                                                       NumberRange(min=5, max=900, message=_l("Between 5 and 900 seconds."))],
                                           description=_l("Asked of each charger when it boots; the live cost moves this often."))

    def validate_time_zone(self, field) -> None:
        try:
            field.data = check_zone(field.data)
        except ValueError as e:
            raise ValidationError(str(e)) from None

    def validate_currency(self, field) -> None:
        try:
            field.data = check_currency((field.data or "").strip().upper())
        except MoneyError:
            raise ValidationError(_("Not an ISO 4217 currency code (such as EUR, GBP, USD).")) from None


class ChargerForm(FlaskForm):
    """A new charger of a site and its connectors."""

    charge_point_id = StringField(_l("OCPP charge point id"), validators=[DataRequired(message=_l("Enter the charger's charge point id."))],
                                  description=_l("As configured in the charger: at most 48 letters, digits and * - _ = + | @ ."))
    connectors = WholeNumber(_l("Number of connectors"), default=2,
                              validators=[InputRequired(message=_l("Enter how many connectors it has.")),
                                          NumberRange(min=1, max=MAX_CONNECTORS, message=_l("Between 1 and 10."))])
    standard = SelectField(_l("Connector type"), choices=STANDARDS, default="IEC_62196_T2")
    max_power_kw = WholeNumber(_l("Maximum power per connector (kW)"), default=22,
                                validators=[InputRequired(message=_l("Enter the power in kW.")),
                                            NumberRange(min=1, max=1000, message=_l("Between 1 and 1000 kW."))])

    def validate_charge_point_id(self, field) -> None:
        value = (field.data or "").strip()
        if len(value) > 48:
            raise ValidationError(_("At most 48 characters (OCPP 1.6)."))
        if not CHARGE_POINT_ID.fullmatch(value):
            raise ValidationError(_("Use only letters, digits and * - _ = + | @ . (no spaces, colons or slashes)."))
        field.data = value


class ConnectorForm(FlaskForm):
    """A connector's plug and power (its number is the charger's OCPP connectorId)."""

    number = WholeNumber(_l("Connector number (OCPP connectorId)"),
                          validators=[InputRequired(message=_l("Enter the connector number.")),
                                      NumberRange(min=1, max=99, message=_l("Between 1 and 99."))])
    standard = SelectField(_l("Connector type"), choices=STANDARDS, default="IEC_62196_T2")
    max_power_kw = WholeNumber(_l("Maximum power (kW)"), default=22,
                                validators=[InputRequired(message=_l("Enter the power in kW.")),
                                            NumberRange(min=1, max=1000, message=_l("Between 1 and 1000 kW."))])


class OperatorSettingsForm(FlaskForm):
    """Support and monitoring settings of an operator."""

    support_approval_limit = StringField(_l("Support approval limit"), validators=[Printable(), Optional(), Length(max=20)],
                                         description=_l("Refunds and goodwill credits above this need a second person. Empty: the platform default."))
    alarm_offline_minutes = WholeNumber(_l("Charger offline alarm after (minutes)"), default=10,
                                         validators=[InputRequired(message=_l("Enter a number of minutes.")),
                                                     NumberRange(min=1, max=7 * 24 * 60, message=_l("Between 1 and 10080 minutes."))])
    alarm_meter_silence_hours = WholeNumber(_l("Meter without readings alarm after (hours)"), default=26,
                                             validators=[InputRequired(message=_l("Enter a number of hours.")),
                                                         NumberRange(min=1, max=720, message=_l("Between 1 and 720 hours."))])
    alarm_email = StringField(_l("Email new alarms to"),
                              validators=[Printable(), Optional(), Email(message=_l("Enter an email address like name@example.com.")),
                                          Length(max=254)],
                              description=_l("Empty: alarms are only listed in the console."))


# --------------------------------------------------------------------------- overview


def _connected_ids(s, charger_ids: list[int]) -> set[int]:
    if not charger_ids:
        return set()
    return set(s.scalars(select(ChargerConnection.charger_id).where(ChargerConnection.charger_id.in_(charger_ids))))


def connectors_without_tariff(s, connector_ids: list[int], now: dt.datetime) -> set[int]:
    """Which of the connectors have no tariff version in force at ``now`` (drivers cannot start there)."""
    if not connector_ids:
        return set()
    owners = {connector_owner(i): i for i in connector_ids}
    priced = set(s.scalars(
        select(Tariff.owner).join(TariffVersion, TariffVersion.tariff_id == Tariff.id)
        .where(Tariff.owner.in_(list(owners)), TariffVersion.effective_from <= now)
    ))
    return {cid for owner, cid in owners.items() if owner not in priced}


@bp.route("/")
def index():
    """The console's start page: what the operator has set up, and a link to every section."""
    s = db_session()
    sites = list(s.scalars(sites_query()))
    site_ids = [x.id for x in sites]
    chargers = list(s.scalars(select(Charger).where(Charger.site_id.in_(site_ids)))) if site_ids else []
    connector_ids = list(s.scalars(select(Connector.id).where(Connector.charger_id.in_([c.id for c in chargers])))) if chargers else []
    counts = {
        "sites": len(sites),
        "chargers": len(chargers),
        "online": len(_connected_ids(s, [c.id for c in chargers])),
        "connectors": len(connector_ids),
        "unpriced": len(connectors_without_tariff(s, connector_ids, utcnow())),
        "meters": s.scalar(select(func.count()).select_from(Meter).where(Meter.site_id.in_(site_ids))) if site_ids else 0,
        "tenants": s.scalar(select(func.count()).select_from(Tenant).where(Tenant.site_id.in_(site_ids))) if site_ids else 0,
    }
    op_id = scope()
    alarms = select(func.count()).select_from(Alarm).where(Alarm.cleared_at.is_(None))
    counts["alarms"] = s.scalar(alarms if op_id is None else alarms.where(Alarm.operator_id == op_id))
    operator = s.get(Operator, op_id) if op_id is not None else None
    return page("console/index.html", counts=counts, operator=operator)


# --------------------------------------------------------------------------- operator settings


def _settings_currency(s, operator: Operator) -> str:
    """The currency the support approval limit is typed in: the operator's sites' (the first one), else EUR."""
    return s.scalar(select(Site.currency).where(Site.operator_id == operator.id).order_by(Site.id).limit(1)) or "EUR"


@bp.route("/settings", methods=["GET", "POST"])
def settings():
    """The operator's support approval limit and alarm settings."""
    s = db_session()
    op_id = scope()
    if op_id is None:  # an admin: ?operator=<id>, else the list to pick from
        wanted = request.args.get("operator", "")
        if not wanted:
            return page("console/settings.html", operator=None, operators=operators_for_admin(), form=None)
        operator = s.get(Operator, int(wanted)) if wanted.isdigit() and len(wanted) < 10 else None
    else:
        operator = s.get(Operator, op_id)
    if operator is None:
        abort(404)
    currency = _settings_currency(s, operator)
    form = OperatorSettingsForm(obj=operator) if request.method == "GET" else OperatorSettingsForm()
    ctx = dict(operator=operator, operators=[], form=form, currency=currency,
               default_limit=current_app.config.get("SUPPORT_APPROVAL_LIMIT_MINOR"))
    if request.method == "GET":
        if operator.support_approval_limit_minor is not None:
            form.support_approval_limit.data = _minor_text(operator.support_approval_limit_minor, currency)
        return page("console/settings.html", **ctx)
    limit = None
    ok = form.validate_on_submit()
    if ok and (form.support_approval_limit.data or "").strip():
        try:
            limit = parse_money(form.support_approval_limit.data, currency, "en").amount
        except MoneyError:
            form.support_approval_limit.errors.append(_("Enter an amount in %(currency)s of at least 0, like 100.00.", currency=currency))
            ok = False
    if not ok:
        return page("console/settings.html", status=400, **ctx)
    operator.support_approval_limit_minor = limit
    operator.alarm_offline_minutes = form.alarm_offline_minutes.data
    operator.alarm_meter_silence_hours = form.alarm_meter_silence_hours.data
    operator.alarm_email = (form.alarm_email.data or "").strip().lower() or None
    s.commit()
    flash(_("Settings saved."))
    return redirect(url_for(".settings", **({"operator": operator.id} if op_id is None else {})), 303)


def _minor_text(minor: int, currency: str) -> str:
    """Minor units as the plain amount a person types ("100.00")."""
    return str(Money(minor, currency).to_decimal())


# --------------------------------------------------------------------------- sites


def _site_choices(form: SiteForm) -> list[Operator]:
    operators = operators_for_admin()
    form.operator_id.choices = [SelectChoice(str(o.id), o.name) for o in operators]
    return operators


def _site_in_use(s, site: Site) -> bool:
    """Whether the site has anything priced in its currency (chargers, meters, meter tariffs)."""
    if site.id is None:
        return False
    for model in (Charger, Meter, MeterTariff):
        if s.scalar(select(func.count()).select_from(model).where(model.site_id == site.id)):
            return True
    return False


def _apply_site_form(s, form: SiteForm, site: Site) -> bool:
    """Copy a validated form onto ``site``; False with the reasons at the fields when a rule refuses it."""
    ok = True
    if site.id is not None and form.currency.data != site.currency and _site_in_use(s, site):
        form.currency.errors.append(_("The site has chargers or meters priced in %(currency)s: its currency cannot change.",
                                      currency=site.currency))
        ok = False
    if not ok:
        return False
    site.name = form.name.data.strip()
    site.address = (form.address.data or "").strip()
    site.time_zone = form.time_zone.data
    site.currency = form.currency.data
    site.start_window_s = form.start_window_s.data
    site.min_billable_wh = form.min_billable_wh.data
    site.min_billable_s = form.min_billable_s.data
    site.hold_max_energy_kwh = form.hold_max_energy_kwh.data
    site.hold_max_charging_s = form.hold_max_charging_min.data * 60 if form.hold_max_charging_min.data else None
    site.hold_max_idle_s = form.hold_max_idle_min.data * 60 if form.hold_max_idle_min.data is not None else None
    site.meter_sample_interval_s = form.meter_sample_interval_s.data
    return True


@bp.route("/sites")
def sites():
    """The person's sites with their chargers and meters."""
    s = db_session()
    rows = list(s.scalars(sites_query()))
    ids = [x.id for x in rows]
    chargers = dict(s.execute(select(Charger.site_id, func.count()).where(Charger.site_id.in_(ids)).group_by(Charger.site_id)).all()) if ids else {}
    connectors = dict(s.execute(select(Charger.site_id, func.count(Connector.id)).join(Connector, Connector.charger_id == Charger.id)
                                .where(Charger.site_id.in_(ids)).group_by(Charger.site_id)).all()) if ids else {}
    meters = dict(s.execute(select(Meter.site_id, func.count()).where(Meter.site_id.in_(ids)).group_by(Meter.site_id)).all()) if ids else {}
    return page("console/sites.html", sites=rows, chargers=chargers, connectors=connectors, meters=meters, is_admin=scope() is None)


@bp.route("/sites/new", methods=["GET", "POST"])
def site_new():
    """Create a site of the person's operator (an admin picks the operator)."""
    s = db_session()
    form = SiteForm()
    operators = _site_choices(form)
    if request.method == "GET":
        return page("console/site_form.html", form=form, site=None, operators=operators)
    op_id = scope()
    valid = form.validate_on_submit()
    if op_id is None:
        wanted = form.operator_id.data or ""
        op_id = int(wanted) if wanted.isdigit() and len(wanted) < 10 and s.get(Operator, int(wanted)) else None
        if op_id is None:
            form.operator_id.errors.append(_("Choose an operator."))
            valid = False
    site = Site(operator_id=op_id)
    if not valid or not _apply_site_form(s, form, site):
        return page("console/site_form.html", status=400, form=form, site=None, operators=operators)
    s.add(site)
    s.commit()
    flash(_("Site %(name)s created. Add its chargers next.", name=site.name))
    return redirect(url_for(".site", site_id=site.id), 303)


@bp.route("/sites/<int(max=2147483647):site_id>")
def site(site_id: int):
    """A site: its charging rules, its chargers with their live status, and links to its QR sheet, tariff and split rules."""
    site = own_site(site_id)
    s = db_session()
    chargers = list(s.scalars(select(Charger).where(Charger.site_id == site.id).order_by(Charger.charge_point_id)))
    online = _connected_ids(s, [c.id for c in chargers])
    connector_ids = [c.id for ch in chargers for c in ch.connectors]
    unpriced = connectors_without_tariff(s, connector_ids, utcnow())
    meters = s.scalar(select(func.count()).select_from(Meter).where(Meter.site_id == site.id))
    return page("console/site.html", site=site, chargers=chargers, online=online, unpriced=unpriced, meters=meters,
                standard_labels=STANDARD_LABELS)


@bp.route("/sites/<int(max=2147483647):site_id>/edit", methods=["GET", "POST"])
def site_edit(site_id: int):
    """Change a site's details and charging rules."""
    site = own_site(site_id)
    s = db_session()
    form = SiteForm(obj=site) if request.method == "GET" else SiteForm()
    form.operator_id.choices = []
    if request.method == "GET":
        form.hold_max_charging_min.data = site.hold_max_charging_s // 60 if site.hold_max_charging_s else None
        form.hold_max_idle_min.data = site.hold_max_idle_s // 60 if site.hold_max_idle_s is not None else None
        return page("console/site_form.html", form=form, site=site, operators=[])
    if not form.validate_on_submit() or not _apply_site_form(s, form, site):
        s.rollback()
        return page("console/site_form.html", status=400, form=form, site=site, operators=[])
    s.commit()
    flash(_("Site %(name)s saved.", name=site.name))
    return redirect(url_for(".site", site_id=site.id), 303)


# --------------------------------------------------------------------------- chargers


def _charger_page(charger: Charger, *, password: str | None = None, rotated: bool = False, connector_form: ConnectorForm | None = None,
                  status: int = 200):
    s = db_session()
    connection = s.get(ChargerConnection, charger.id)
    unpriced = connectors_without_tariff(s, [c.id for c in charger.connectors], utcnow())
    if connector_form is None:
        connector_form = ConnectorForm(formdata=None, number=max((c.number for c in charger.connectors), default=0) + 1)
    return page("console/charger.html", status=status, charger=charger, site=charger.site, connection=connection, unpriced=unpriced,
                password=password, rotated=rotated, connector_form=connector_form, rotate_form=FlaskForm(),
                standard_labels=STANDARD_LABELS, gateway=_gateway_address(charger))


def _gateway_address(charger: Charger) -> str:
    """Where the charger connects, as this installation's gateway settings say (a wildcard address: the site's host name)."""
    cfg = current_app.config
    host = cfg.get("GATEWAY_HOST") or ""
    if host in ("", "0.0.0.0", "::"):
        host = urlsplit(cfg.get("BASE_URL") or "").hostname or "localhost"
    return f"ws://{host}:{cfg.get('GATEWAY_PORT')}/ocpp/{charger.charge_point_id}"


@bp.route("/sites/<int(max=2147483647):site_id>/chargers/new", methods=["GET", "POST"])
def charger_new(site_id: int):
    """Add a charger to a site; its password is shown once on the answer."""
    site = own_site(site_id)
    s = db_session()
    form = ChargerForm()
    if request.method == "GET":
        return page("console/charger_form.html", form=form, site=site)
    if not form.validate_on_submit():
        return page("console/charger_form.html", status=400, form=form, site=site)
    cp_id = form.charge_point_id.data
    if code_taken(s, Charger.charge_point_id, cp_id):
        form.charge_point_id.errors.append(_("A charger with this charge point id already exists (ids are not case-sensitive)."))
        return page("console/charger_form.html", status=400, form=form, site=site)
    password = new_charger_password()
    charger = Charger(site_id=site.id, charge_point_id=cp_id, password_hash=hash_password(password))
    try:
        with s.begin_nested():
            s.add(charger)
            s.flush()
    except IntegrityError:  # the same id created at the same moment by someone else
        form.charge_point_id.errors.append(_("A charger with this charge point id already exists (ids are not case-sensitive)."))
        return page("console/charger_form.html", status=400, form=form, site=site)
    for n in range(1, form.connectors.data + 1):
        s.add(Connector(charger_id=charger.id, number=n, connector_code=new_code(s, Connector.connector_code),
                        standard=form.standard.data, max_power_kw=form.max_power_kw.data))
        s.flush()
    s.commit()
    s.refresh(charger)
    return _charger_page(charger, password=password, status=201)


@bp.route("/chargers/<int(max=2147483647):charger_id>")
def charger(charger_id: int):
    """A charger: online or not, what it reported at boot, its connectors' status and codes."""
    return _charger_page(own_charger(charger_id))


@bp.route("/chargers/<int(max=2147483647):charger_id>/password", methods=["POST"])
def charger_password(charger_id: int):
    """Give the charger a new password (shown once); the old one stops working at its next connection."""
    charger = own_charger(charger_id)
    if not FlaskForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
        return redirect(url_for(".charger", charger_id=charger.id), 303)
    password = new_charger_password()
    charger.password_hash = hash_password(password)
    db_session().commit()
    return _charger_page(charger, password=password, rotated=True)


@bp.route("/chargers/<int(max=2147483647):charger_id>/connectors", methods=["POST"])
def connector_new(charger_id: int):
    """Add a connector to a charger (a new code is made for it)."""
    charger = own_charger(charger_id)
    s = db_session()
    form = ConnectorForm()
    if not form.validate_on_submit():
        return _charger_page(charger, connector_form=form, status=400)
    if any(c.number == form.number.data for c in charger.connectors):
        form.number.errors.append(_("This charger already has a connector %(n)s.", n=form.number.data))
        return _charger_page(charger, connector_form=form, status=400)
    connector = Connector(charger_id=charger.id, number=form.number.data, connector_code=new_code(s, Connector.connector_code),
                          standard=form.standard.data, max_power_kw=form.max_power_kw.data)
    try:
        with s.begin_nested():
            s.add(connector)
            s.flush()
    except IntegrityError:
        form.number.errors.append(_("This charger already has a connector %(n)s.", n=form.number.data))
        return _charger_page(charger, connector_form=form, status=400)
    s.commit()
    flash(_("Connector %(n)s added with the code %(code)s. Set its tariff before drivers can start there.",
            n=connector.number, code=connector.connector_code))
    return redirect(url_for(".charger", charger_id=charger.id), 303)


@bp.route("/connectors/<int(max=2147483647):connector_id>/edit", methods=["GET", "POST"])
def connector_edit(connector_id: int):
    """Change a connector's plug type and power (its number and code stay)."""
    connector = own_connector(connector_id)
    form = ConnectorForm(obj=connector) if request.method == "GET" else ConnectorForm()
    if connector.standard not in STANDARD_LABELS:
        form.standard.choices = [*STANDARDS, SelectChoice(connector.standard, connector.standard)]
    form.number.data = connector.number  # not editable: the charger's hardware numbers its connectors
    if request.method == "GET":
        return page("console/connector_form.html", form=form, connector=connector, charger=connector.charger)
    if not form.validate_on_submit():
        return page("console/connector_form.html", status=400, form=form, connector=connector, charger=connector.charger)
    connector.standard = form.standard.data
    connector.max_power_kw = form.max_power_kw.data
    db_session().commit()
    flash(_("Connector %(code)s saved.", code=connector.connector_code))
    return redirect(url_for(".charger", charger_id=connector.charger_id), 303)


from webapp.console import setup_meters, setup_tariffs  # noqa: E402,F401  (their views register on the blueprint)
