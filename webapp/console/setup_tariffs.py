"""Tariffs in the operator console: charging tariffs per connector, with a preview, and meter tariffs of buildings.

Charging tariffs (``payments.tariff_store``: one versioned OCPI 2.2.1 tariff
per connector) are set per site on ``/operator/sites/<id>/tariff``, for the
connectors ticked (all of them by default): each gets a version with the same
tariff and the same ``effective_from``, all or none. The tariff comes either
from the **common form** (energy per kWh, time per hour or minute, a session
fee, an idle fee after a grace period, one VAT rate; ``common_tariff`` turns
it into OCPI) or from the **OCPI JSON** typed in full. Errors come from the
validators that price real sessions (``payments.tariffs.compile_tariff``,
``tariff_store.add_version``) and are shown at the field they concern, the
JSON path named (``elements/0/price_components/1/price: ...``).

The common form's choices, stated to the operator on the page: energy is
billed per Wh; charging time and idle time per started minute; the idle
grace period counts from the start of the session (as OCPI 2.2.1 counts
durations), so "15 minutes free" means idling is free until the session is 15
minutes old; the one VAT rate applies to every price.

**Preview** (``preview_session``): before saving, the draft tariff prices an
example session (energy, charging minutes, idle minutes, local start time)
through the very functions that bill real sessions (``cdr_from_samples``,
``price``, ``bill`` as in ``webapp.charging.service.price_session`` and
``settle``): constant power while charging, then idle with the cable in. As a
real session, idle time counts only up to the hold's idle allowance, a
session below the site's minimum energy or time is free, and the capture is
never more than the hold a driver's card is asked for (shown too).

Meter tariffs (``payments.metering`` schema) are named per building; each
change is a new version from ``effective_from``
(``webapp.meters.readings.add_meter_tariff_version``: not before what is
already billed, in the building's currency).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal

from flask import flash, redirect, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from wtforms import RadioField, SelectChoice, SelectField, SelectMultipleField, StringField, TextAreaField
from wtforms.validators import InputRequired, Length, NumberRange, Optional

from payments import metering
from payments.money import Money, MoneyError, check_currency
from payments.money import format as format_money
from payments.price_display import default_hold, price_display
from payments.tariff_store import MAX_TARIFF_JSON_CHARS, Tariff, TariffVersion, add_version, connector_owner, dumps, loads
from payments.tariffs import CompiledTariff, MeterSample, PricingError, TariffError, bill, cdr_from_samples, compile_tariff, price
from webapp.charging.service import hold_policy
from webapp.console import bp
from webapp.console.setup_common import (
    Printable,
    DecimalRange,
    WholeNumber,
    decimal_or_none,
    local_to_utc,
    own_meter_tariff,
    own_site,
    page,
    sites_query,
    utc_to_local_text,
)
from webapp.db import db_session, utcnow
from webapp.meters.models import MeterTariff, MeterTariffVersion
from webapp.meters.readings import add_meter_tariff_version
from webapp.models import Charger, Connector, Meter, Site
from webapp.pricing import render_prices, unit_amount

PER = [SelectChoice("hour", _l("per hour")), SelectChoice("minute", _l("per minute"))]
DEFAULT_POWER_KW = 22  # the preview's connector when the site has none yet
PREVIEW_FIELDS = ("preview_energy_kwh", "preview_charging_min", "preview_idle_min", "preview_start")


# --------------------------------------------------------------------------- the common form as OCPI


def common_tariff(*, currency: str, tariff_id: str, energy: Decimal | None, time: Decimal | None, time_per: str,
                  session_fee: Decimal | None, idle: Decimal | None, idle_per: str, grace_min: int, vat: Decimal
                  ) -> tuple[dict, dict[str, str]]:
    """The OCPI tariff of the common form, and which form field each price component came from (by JSON path)."""
    per_hour = lambda value, per: value * 60 if per == "minute" else value  # noqa: E731  (OCPI TIME prices are per hour)
    elements: list[dict] = []
    fields: dict[str, str] = {}
    if idle is not None and idle > 0 and grace_min > 0:
        # Idle time is free while the session is younger than the grace period (OCPI counts durations from the start).
        fields[f"elements/{len(elements)}"] = "idle_grace_min"
        elements.append({"price_components": [{"type": "PARKING_TIME", "price": Decimal(0), "vat": vat, "step_size": 60}],
                         "restrictions": {"max_duration": grace_min * 60}})
    components = []
    main = len(elements)
    for value, ctype, step, name in ((session_fee, "FLAT", 1, "session_fee"), (energy, "ENERGY", 1, "energy_price"),
                                     (None if time is None else per_hour(time, time_per), "TIME", 60, "time_price"),
                                     (None if idle is None else per_hour(idle, idle_per), "PARKING_TIME", 60, "idle_price")):
        if value is not None:
            fields[f"elements/{main}/price_components/{len(components)}"] = name
            components.append({"type": ctype, "price": value, "vat": vat, "step_size": step})
    elements.append({"price_components": components})
    return {"id": tariff_id, "currency": currency, "type": "AD_HOC_PAYMENT", "elements": elements}, fields


def pretty_json(value: object, indent: int = 0) -> str:
    """JSON text indented for reading, numbers written exactly as stored (``tariff_store.dumps``, never through float)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        return "{\n" + ",\n".join(f"{inner}{json.dumps(str(k))}: {pretty_json(v, indent + 2)}" for k, v in value.items()) + f"\n{pad}}}"
    if isinstance(value, list) and value:
        return "[\n" + ",\n".join(f"{inner}{pretty_json(v, indent + 2)}" for v in value) + f"\n{pad}]"
    return dumps(value)


# --------------------------------------------------------------------------- the preview


@dataclass
class Preview:
    """An example session priced by the billing engine."""

    currency: str
    start_local: str
    energy_kwh: Decimal
    charging_min: int
    idle_min: int
    idle_billed_min: Decimal
    lines: list[tuple[str, str]]  # (label, amount incl. VAT, exact)
    excl_vat: Money
    vat: Money
    incl_vat: Money
    hold: Money
    captured: Money
    below_minimum: bool


def preview_session(tariff: CompiledTariff, site: Site, *, start: dt.datetime, energy_kwh: Decimal, charging_s: int, idle_s: int,
                    max_power_kw: int) -> Preview:
    """Price an example session at ``site`` exactly as a real one is billed; raises ``PricingError`` when it cannot be priced."""
    tariff.check_active(start)
    policy = hold_policy(site)
    idle_billed = min(idle_s, int(policy.max_idle.total_seconds()))  # the session's idle allowance, as _car_left caps it
    stop = start + dt.timedelta(seconds=charging_s)
    end = stop + dt.timedelta(seconds=idle_billed)
    wh = energy_kwh * 1000
    samples = [MeterSample(at=stop, energy_wh=wh, power_w=(wh * 3600 / charging_s).quantize(Decimal("0.001")), charging=True)]
    if end > stop:
        samples.append(MeterSample(at=end, energy_wh=wh, power_w=Decimal(0), charging=False))
    cdr = cdr_from_samples(start, samples, end, tariff=tariff, time_zone=site.time_zone, meter_start_wh=Decimal(0))
    priced = price(tariff, cdr, time_zone=site.time_zone)
    total = bill(priced, site.currency)
    hold = default_hold(tariff, currency=site.currency, max_power_kw=max_power_kw, start=start, time_zone=site.time_zone,
                        policy=policy).amount
    below = wh < site.min_billable_wh or charging_s < site.min_billable_s
    captured = Money(0, site.currency) if below else total["incl_vat"].min(hold)
    lines = []
    for key, label in (("total_fixed_cost", _("Session fee")), ("total_energy_cost", _("Energy")),
                       ("total_time_cost", _("Charging time")), ("total_parking_cost", _("Idle fee"))):
        amount = priced[key]["incl_vat"]
        if amount:
            lines.append((label, unit_amount(amount, site.currency)))
    return Preview(
        currency=site.currency, start_local=utc_to_local_text(start, site.time_zone), energy_kwh=energy_kwh,
        charging_min=charging_s // 60, idle_min=idle_s // 60, idle_billed_min=Decimal(idle_billed) / 60, lines=lines,
        excl_vat=total["excl_vat"], vat=total["vat"], incl_vat=total["incl_vat"], hold=hold, captured=captured, below_minimum=below,
    )


# --------------------------------------------------------------------------- the charging tariff form


class TariffForm(FlaskForm):
    """A charging tariff for some connectors of a site: the common prices or OCPI JSON, a preview, when it takes effect."""

    mode = RadioField(_l("How to give the prices"), default="common",
                      choices=[SelectChoice("common", _l("Common prices")), SelectChoice("json", _l("Full OCPI tariff (JSON)"))])
    currency = StringField(_l("Currency"), validators=[Printable(), Length(max=3)], description=_l("The site's currency."))
    energy_price = StringField(_l("Energy, per kWh (excl. VAT)"), validators=[Printable(), DecimalRange(0, 1000, places=6)],
                               description=_l("Billed per Wh. Empty: energy is free."))
    time_price = StringField(_l("Charging time (excl. VAT)"), validators=[Printable(), DecimalRange(0, 10_000, places=6)],
                             description=_l("Billed per started minute. Empty: no time price."))
    time_per = SelectField(_l("Time price unit"), choices=PER, default="hour")
    session_fee = StringField(_l("Session fee (excl. VAT)"), validators=[Printable(), DecimalRange(0, 10_000, places=4)],
                              description=_l("Once per session. Empty: none."))
    idle_price = StringField(_l("Idle fee, connected but not charging (excl. VAT)"), validators=[Printable(), DecimalRange(0, 10_000, places=6)],
                             description=_l("Billed per started minute. Empty: idling is free."))
    idle_per = SelectField(_l("Idle fee unit"), choices=PER, default="hour")
    idle_grace_min = WholeNumber(_l("Idle fee grace period (minutes from the session start)"), default=0,
                                  validators=[Optional(), NumberRange(min=0, max=1440, message=_l("Between 0 and 1440 minutes."))],
                                  description=_l("Idling is free until the session is this old."))
    vat = StringField(_l("VAT rate (%)"), default="21", validators=[Printable(), DecimalRange(0, 100, places=2)])
    tariff_json = TextAreaField(_l("OCPI 2.2.1 tariff (JSON)"), validators=[Printable(), Length(max=MAX_TARIFF_JSON_CHARS)], render_kw={"rows": 14},
                                description=_l("The full Tariff object: currency, elements with price_components and restrictions."))
    connectors = SelectMultipleField(_l("Connectors"), choices=[], validate_choice=False)
    effective_from = StringField(_l("Takes effect at (the site's local time)"), validators=[Printable(), Length(max=20)],
                                 description=_l("YYYY-MM-DD HH:MM. Empty: now. Sessions already started keep their price."))
    preview_energy_kwh = StringField(_l("Example: energy (kWh)"), default="20",
                                     validators=[Printable(), DecimalRange(0, 1000, places=3, above_minimum=True)])
    preview_charging_min = WholeNumber(_l("Example: charging time (minutes)"), default=60,
                                        validators=[InputRequired(message=_l("Enter a number of minutes.")),
                                                    NumberRange(min=1, max=1440, message=_l("Between 1 and 1440 minutes."))])
    preview_idle_min = WholeNumber(_l("Example: idle after charging (minutes)"), default=0,
                                    validators=[InputRequired(message=_l("Enter a number of minutes.")),
                                                NumberRange(min=0, max=1440, message=_l("Between 0 and 1440 minutes."))])
    preview_start = StringField(_l("Example: start (the site's local time)"), validators=[Printable(), Length(max=20)],
                                description=_l("YYYY-MM-DD HH:MM. Empty: now."))


def _site_connectors(s, site: Site) -> list[tuple[Connector, Charger]]:
    return list(s.execute(select(Connector, Charger).join(Charger, Connector.charger_id == Charger.id)
                          .where(Charger.site_id == site.id).order_by(Charger.charge_point_id, Connector.number)).all())


def _version_groups(s, connectors: list[tuple[Connector, Charger]], now: dt.datetime) -> list[dict]:
    """The site's tariff versions, one row per (effective_from, tariff) with the connectors that have it."""
    owners = {connector_owner(c.id): c for c, _ch in connectors}
    if not owners:
        return []
    rows = s.execute(select(TariffVersion, Tariff.owner).join(Tariff, Tariff.id == TariffVersion.tariff_id)
                     .where(Tariff.owner.in_(list(owners))).order_by(TariffVersion.effective_from.desc(), TariffVersion.id)).all()
    in_force: dict[str, int] = {}
    for v, owner in sorted(rows, key=lambda r: r[0].effective_from):
        if v.effective_from <= now:
            in_force[owner] = v.id
    groups: dict[tuple, dict] = {}
    for v, owner in rows:
        key = (v.effective_from, v.tariff_json)
        g = groups.setdefault(key, {"effective_from": v.effective_from, "created_by": v.created_by, "created_at": v.created_at,
                                    "json": v.tariff_json, "codes": [], "in_force": False, "future": v.effective_from > now,
                                    "prices": _prices_or_none(v.tariff_json)})
        g["codes"].append(owners[owner].connector_code)
        g["in_force"] = g["in_force"] or in_force.get(owner) == v.id
    return list(groups.values())


def _prices_or_none(text: str):
    try:
        return render_prices(price_display(loads(text)))
    except (PricingError, ValueError):
        return None


def _tariff_error(form: TariffForm, e: TariffError, fields: dict[str, str], common: bool) -> None:
    """Put a ``TariffError`` at the field it concerns, its JSON path named."""
    path, reason = e.path, e.reason
    if path == "effective_from":
        form.effective_from.errors.append(reason)
        return
    if common:
        if path == "currency":
            form.currency.errors.append(reason)
            return
        for prefix in sorted(fields, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                form[fields[prefix]].errors.append(reason)
                return
        form.energy_price.errors.append(f"{path}: {reason}" if path else reason)
        return
    form.tariff_json.errors.append(f"{path}: {reason}" if path else reason)


def _draft(form: TariffForm, site: Site, now: dt.datetime) -> tuple[dict | None, dict[str, str]]:
    """The tariff the form describes (None, with errors at the fields, when it does not validate)."""
    if form.mode.data == "json":
        text = (form.tariff_json.data or "").strip()
        if not text:
            form.tariff_json.errors.append(_("Paste the OCPI tariff, or choose the common prices."))
            return None, {}
        try:
            parsed = loads(text)
            if not isinstance(parsed, dict):
                raise TariffError("", "a tariff must be a JSON object")
            compile_tariff(parsed)
        except TariffError as e:
            _tariff_error(form, e, {}, common=False)
            return None, {}
        if parsed.get("currency") != site.currency:
            form.tariff_json.errors.append(_("currency: must be %(currency)s, the site's currency.", currency=site.currency))
            return None, {}
        return parsed, {}
    ok = True
    try:
        currency = check_currency((form.currency.data or site.currency).strip().upper())
        if currency != site.currency:
            form.currency.errors.append(_("Must be %(currency)s, the site's currency.", currency=site.currency))
            ok = False
    except MoneyError:
        form.currency.errors.append(_("Not an ISO 4217 currency code (such as EUR)."))
        currency, ok = site.currency, False
    values = {name: decimal_or_none(form[name].data) for name in ("energy_price", "time_price", "session_fee", "idle_price")}
    if all(v is None for v in values.values()):
        form.energy_price.errors.append(_("Give at least one price (energy, time, session fee or idle fee)."))
        ok = False
    vat = decimal_or_none(form.vat.data, places=2)
    if vat is None:
        form.vat.errors.append(_("Enter the VAT rate, e.g. 21 (0 when none applies)."))
        ok = False
    if not ok:
        return None, {}
    tariff, fields = common_tariff(
        currency=currency, tariff_id=f"S{site.id}-{now:%Y%m%d%H%M%S}", energy=values["energy_price"], time=values["time_price"],
        time_per=form.time_per.data, session_fee=values["session_fee"], idle=values["idle_price"], idle_per=form.idle_per.data,
        grace_min=form.idle_grace_min.data or 0, vat=vat)
    try:
        compile_tariff(tariff)
    except TariffError as e:
        _tariff_error(form, e, fields, common=True)
        return None, fields
    return tariff, fields


def _tariff_page(site: Site, form: TariffForm, *, status: int = 200, preview: Preview | None = None):
    s = db_session()
    connectors = _site_connectors(s, site)
    return page("console/tariff_form.html", status=status, site=site, form=form, preview=preview, connectors=connectors,
                versions=_version_groups(s, connectors, utcnow()), format_money=lambda m: format_money(m, str(get_locale() or "en")))


@bp.route("/sites/<int(max=2147483647):site_id>/tariff", methods=["GET", "POST"])
def site_tariff(site_id: int):
    """A site's charging tariff: its versions, a new one from the common form or JSON, and a preview before saving."""
    site = own_site(site_id)
    s = db_session()
    now = utcnow()
    connectors = _site_connectors(s, site)
    form = TariffForm()
    form.connectors.choices = [SelectChoice(str(c.id), f"{ch.charge_point_id} #{c.number} ({c.connector_code})") for c, ch in connectors]
    if request.method == "GET":
        form.currency.data = site.currency
        form.connectors.data = [str(c.id) for c, _ch in connectors]
        form.preview_start.data = utc_to_local_text(now, site.time_zone)
        current = next((g for g in _version_groups(s, connectors, now) if g["in_force"]), None)
        if current is not None:  # a starting point for a change written in JSON
            form.tariff_json.data = pretty_json(loads(current["json"]))
        return _tariff_page(site, form)
    action = request.form.get("action", "preview")
    form.validate_on_submit()
    if action == "save":  # the example session is not part of what is saved: its errors do not stop a save
        for name in PREVIEW_FIELDS:
            form[name].errors = []
    valid = not any(f.errors for f in form)
    tariff, _fields = _draft(form, site, now) if valid else (None, {})
    if tariff is None:
        return _tariff_page(site, form, status=400)
    compiled = compile_tariff(loads(dumps(tariff)))
    if action != "save":
        start = now
        if (form.preview_start.data or "").strip():
            try:
                start = local_to_utc(form.preview_start.data, site.time_zone)
            except ValueError as e:
                form.preview_start.errors.append(str(e))
                return _tariff_page(site, form, status=400)
        chosen = {int(x) for x in form.connectors.data or [] if x.isdigit()}
        power = max((c.max_power_kw for c, _ch in connectors if c.id in chosen or not chosen), default=DEFAULT_POWER_KW)
        try:
            preview = preview_session(compiled, site, start=start, energy_kwh=decimal_or_none(form.preview_energy_kwh.data, 3) or Decimal(20),
                                      charging_s=form.preview_charging_min.data * 60, idle_s=form.preview_idle_min.data * 60,
                                      max_power_kw=power)
        except PricingError as e:
            form.preview_start.errors.append(f"{e.path}: {e.reason}" if getattr(e, "path", "") else str(e))
            return _tariff_page(site, form, status=400)
        return _tariff_page(site, form, preview=preview)
    ids = {c.id: c for c, _ch in connectors}
    chosen = [ids[int(x)] for x in form.connectors.data or [] if x.isdigit() and int(x) in ids]
    if not chosen:
        form.connectors.errors.append(_("Choose the connectors this tariff is for."))
        return _tariff_page(site, form, status=400)
    effective = None
    if (form.effective_from.data or "").strip():
        try:
            effective = local_to_utc(form.effective_from.data, site.time_zone)
        except ValueError as e:
            form.effective_from.errors.append(str(e))
            return _tariff_page(site, form, status=400)
    try:
        for connector in chosen:
            add_version(s, connector_owner(connector.id), tariff, site_currency=site.currency, created_by=f"user:{current_user.id}",
                        effective_from=effective, now=now)
    except TariffError as e:
        s.rollback()
        _tariff_error(form, e, _fields, common=form.mode.data != "json")
        return _tariff_page(site, form, status=400)
    except IntegrityError:  # another version at the same instant, saved at the same moment
        s.rollback()
        form.effective_from.errors.append(_("Another version of this tariff takes effect at that instant."))
        return _tariff_page(site, form, status=400)
    s.commit()
    when = utc_to_local_text(effective or now, site.time_zone)
    flash(_("Tariff saved for %(n)d connectors, in force from %(when)s.", n=len(chosen), when=when))
    return redirect(url_for(".site_tariff", site_id=site.id), 303)


# --------------------------------------------------------------------------- the tariffs overview


@bp.route("/tariffs")
def tariffs():
    """Every site's charging tariffs in force and every building's meter tariffs."""
    s = db_session()
    now = utcnow()
    rows = []
    for site in s.scalars(sites_query()):
        connectors = _site_connectors(s, site)
        groups = [g for g in _version_groups(s, connectors, now) if g["in_force"] or g["future"]]
        priced = {code for g in groups if g["in_force"] for code in g["codes"]}
        meter_tariffs = list(s.scalars(select(MeterTariff).where(MeterTariff.site_id == site.id).order_by(MeterTariff.name)))
        rows.append({"site": site, "connectors": len(connectors), "unpriced": [c.connector_code for c, _ch in connectors
                                                                                  if c.connector_code not in priced],
                     "groups": groups, "meter_tariffs": meter_tariffs})
    return page("console/tariffs.html", rows=rows)


# --------------------------------------------------------------------------- meter tariffs


METER_TARIFF_EXAMPLE = '{"currency": "EUR", "vat": 21, "kind": "flat", "energy_price": 0.15}'


class MeterTariffForm(FlaskForm):
    """A meter tariff version: the document (``payments.metering``'s schema) and when it takes effect."""

    name = StringField(_l("Name"), validators=[Printable(), Length(max=120)])
    tariff_json = TextAreaField(_l("Tariff (JSON)"), validators=[Printable(), Length(max=MAX_TARIFF_JSON_CHARS)], render_kw={"rows": 12},
                                description=_l('Prices per kWh excl. VAT, e.g. {"currency": "EUR", "vat": 21, "kind": "flat", '
                                               '"energy_price": 0.15}; kinds flat, tou (peak/flat/valley windows) and tiered.'))
    effective_from = StringField(_l("Takes effect at (the building's local time)"), validators=[Printable(), Length(max=20)],
                                 description=_l("YYYY-MM-DD HH:MM. Empty: now. Not before what is already billed."))


def _meter_doc(form: MeterTariffForm, site: Site) -> dict | None:
    """The validated tariff document of the form, or None with the reason at the field."""
    text = (form.tariff_json.data or "").strip()
    if not text:
        form.tariff_json.errors.append(_("Enter the tariff as JSON."))
        return None
    try:
        doc = loads(text)
        metering.compile_tariff(doc)
    except TariffError as e:
        form.tariff_json.errors.append(e.reason)
        return None
    except metering.MeterTariffError as e:
        form.tariff_json.errors.append(f"{e.field}: {e.reason}" if e.field else e.reason)
        return None
    if doc.get("currency") != site.currency:
        form.tariff_json.errors.append(_("currency: must be %(currency)s, the building's currency.", currency=site.currency))
        return None
    return doc


def _add_meter_version(s, form: MeterTariffForm, site: Site, tariff: MeterTariff, doc: dict) -> MeterTariffVersion | None:
    """Add the version (flushed), or None with the reason at the field."""
    at = utcnow()
    if (form.effective_from.data or "").strip():
        try:
            at = local_to_utc(form.effective_from.data, site.time_zone)
        except ValueError as e:
            form.effective_from.errors.append(str(e))
            return None
    if tariff.id is not None and s.scalar(select(MeterTariffVersion.id).where(MeterTariffVersion.tariff_id == tariff.id,
                                                                               MeterTariffVersion.effective_from == at)):
        form.effective_from.errors.append(_("Another version of this tariff takes effect at that instant."))
        return None
    try:
        return add_meter_tariff_version(s, tariff, doc, at, f"user:{current_user.id}")
    except metering.MeterTariffError as e:
        target = form.effective_from if e.field == "effective_from" else form.tariff_json
        target.errors.append(e.reason if target is form.effective_from else (f"{e.field}: {e.reason}" if e.field else e.reason))
        return None


def _meter_tariff_page(site: Site, tariff: MeterTariff | None, form: MeterTariffForm, status: int = 200):
    s = db_session()
    versions, meters = [], []
    if tariff is not None:
        versions = list(s.scalars(select(MeterTariffVersion).where(MeterTariffVersion.tariff_id == tariff.id)
                                  .order_by(MeterTariffVersion.effective_from.desc())))
        meters = list(s.scalars(select(Meter.meter_code).where(Meter.tariff_id == tariff.id).order_by(Meter.meter_code)))
    now = utcnow()
    in_force = next((v.id for v in versions if v.effective_from <= now), None)
    return page("console/meter_tariff.html", status=status, site=site, tariff=tariff, form=form, versions=versions, meters=meters,
                in_force=in_force, now=now, example=METER_TARIFF_EXAMPLE)


@bp.route("/buildings/<int(max=2147483647):site_id>/meter-tariffs/new", methods=["GET", "POST"])
def meter_tariff_new(site_id: int):
    """A new named meter tariff of a building, with its first version."""
    site = own_site(site_id)
    s = db_session()
    form = MeterTariffForm()
    if request.method == "GET":
        form.tariff_json.data = METER_TARIFF_EXAMPLE.replace("EUR", site.currency)
        return _meter_tariff_page(site, None, form)
    ok = form.validate_on_submit()
    name = (form.name.data or "").strip()
    if not name:
        form.name.errors.append(_("Give the tariff a name."))
        ok = False
    doc = _meter_doc(form, site) if ok else None
    if doc is None:
        return _meter_tariff_page(site, None, form, status=400)
    tariff = MeterTariff(site_id=site.id, name=name)
    s.add(tariff)
    s.flush()
    if _add_meter_version(s, form, site, tariff, doc) is None:
        s.rollback()
        return _meter_tariff_page(site, None, form, status=400)
    s.commit()
    flash(_("Meter tariff %(name)s saved.", name=tariff.name))
    return redirect(url_for(".meter_tariff", tariff_id=tariff.id), 303)


@bp.route("/meter-tariffs/<int(max=2147483647):tariff_id>", methods=["GET", "POST"])
def meter_tariff(tariff_id: int):
    """A meter tariff's versions, and a new version."""
    tariff = own_meter_tariff(tariff_id)
    s = db_session()
    site = s.get(Site, tariff.site_id)
    form = MeterTariffForm()
    if request.method == "GET":
        latest = s.scalar(select(MeterTariffVersion).where(MeterTariffVersion.tariff_id == tariff.id)
                          .order_by(MeterTariffVersion.effective_from.desc()).limit(1))
        form.name.data = tariff.name
        if latest is not None:
            form.tariff_json.data = pretty_json(loads(latest.tariff_json))
        return _meter_tariff_page(site, tariff, form)
    doc = _meter_doc(form, site) if form.validate_on_submit() else None
    if doc is None or _add_meter_version(s, form, site, tariff, doc) is None:
        s.rollback()
        return _meter_tariff_page(site, tariff, form, status=400)
    s.commit()
    flash(_("New version of %(name)s saved.", name=tariff.name))
    return redirect(url_for(".meter_tariff", tariff_id=tariff.id), 303)
