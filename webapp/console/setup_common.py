"""Shared pieces of the console's setup pages: who owns what, field parsing, codes and passwords, CSV cells.

Ownership: every object is looked up through its site's ``operator_id`` and
answers 404 (``abort(404)``) when the person may not see it, exactly like an
id that does not exist. Lists are built from ``sites_query()``, which holds
only the person's own operator's sites (an admin's: every operator's).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from zoneinfo import ZoneInfo, available_timezones

from flask import Response, abort, render_template
from flask_babel import gettext as _
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from wtforms import IntegerField
from wtforms.validators import StopValidation
from wtforms.widgets import TextInput

from webapp.console import operator_scope, require_own
from webapp.db import db_session
from webapp.meters.models import MeterTariff, Tenant
from webapp.models import Charger, Connector, Meter, Operator, Site

# Codes people read off a sticker and type: upper-case letters and digits without the look-alikes (0/O, 1/I/L).
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 6
# OCPP security profile 1 (HTTP Basic): charger passwords of 16 to 40 characters; ours are 24 letters and digits
# (about 140 bits), easy to type into a charger's web setup page.
PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
PASSWORD_LENGTH = 24
_NUMBER = re.compile(r"^([+-]?)([0-9]{1,15})(?:[.,]([0-9]{1,15}))?$")


def scope() -> int | None:
    """The operator id the person works for; None for an admin (every operator)."""
    return operator_scope()


def page(template: str, status: int = 200, **ctx) -> Response:
    """A rendered page that no cache keeps (some show a secret once, all show an operator's setup)."""
    resp = Response(render_template(template, **ctx), status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def sites_query() -> Select:
    """The sites the person may see, by name."""
    op_id = scope()
    q = select(Site).order_by(Site.name, Site.id)
    return q if op_id is None else q.where(Site.operator_id == op_id)


def operators_for_admin() -> list[Operator]:
    """Every operator when an admin is signed in (they pick one); an empty list for operator staff."""
    if scope() is not None:
        return []
    return list(db_session().scalars(select(Operator).order_by(Operator.name, Operator.id)))


def own_site(site_id: int) -> Site:
    """A site the person may see, or 404."""
    site = db_session().get(Site, site_id)
    if site is None:
        abort(404)
    require_own(site.operator_id)
    return site


def own_charger(charger_id: int) -> Charger:
    """A charger (of a site) the person may see, or 404."""
    charger = db_session().get(Charger, charger_id)
    if charger is None:
        abort(404)
    require_own(charger.site.operator_id)
    return charger


def own_connector(connector_id: int) -> Connector:
    """A connector the person may see, or 404."""
    connector = db_session().get(Connector, connector_id)
    if connector is None:
        abort(404)
    require_own(connector.charger.site.operator_id)
    return connector


def own_meter(meter_id: int) -> Meter:
    """A meter the person may see, or 404."""
    meter = db_session().get(Meter, meter_id)
    if meter is None:
        abort(404)
    require_own(meter.site.operator_id)
    return meter


def own_tenant(tenant_id: int) -> Tenant:
    """A tenant the person may see, or 404."""
    tenant = db_session().get(Tenant, tenant_id)
    if tenant is None:
        abort(404)
    require_own(db_session().get(Site, tenant.site_id).operator_id)
    return tenant


def own_meter_tariff(tariff_id: int) -> MeterTariff:
    """A building's meter tariff the person may see, or 404."""
    tariff = db_session().get(MeterTariff, tariff_id)
    if tariff is None:
        abort(404)
    require_own(db_session().get(Site, tariff.site_id).operator_id)
    return tariff


# --------------------------------------------------------------------------- codes and passwords


def new_code(s: Session, column, length: int = CODE_LENGTH, avoid: set[str] | frozenset[str] = frozenset()) -> str:
    """A fresh random code for ``column`` (``Connector.connector_code``, ``Meter.meter_code``) that no row has yet (nor ``avoid``)."""
    for _attempt in range(20):
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(length))
        if code not in avoid and s.scalar(select(func.count()).where(func.upper(column) == code)) == 0:
            return code
    raise RuntimeError("no free code found: the code space is nearly full")  # 31^6 ≈ 887 million codes


def new_charger_password() -> str:
    """A random OCPP Basic-auth password, shown once and stored only as its hash."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def code_taken(s: Session, column, code: str, *, except_id: int | None = None, id_column=None) -> bool:
    """Whether another row already has ``code`` in ``column``, compared case-insensitively (codes are typed in any case)."""
    q = select(func.count()).where(func.upper(column) == code.upper())
    if except_id is not None and id_column is not None:
        q = q.where(id_column != except_id)
    return bool(s.scalar(q))


# --------------------------------------------------------------------------- numbers, zones, times


def parse_decimal(text: str, *, places: int = 6) -> Decimal:
    """A plain decimal number as people type it ("0.35", "0,35", "12"); ValueError with the reason otherwise.

    No exponents, no NaN or infinity, no thousands separators, at most
    ``places`` decimals: a price must be exactly what was typed.
    """
    raw = (text or "").strip().replace("\u00a0", "").replace(" ", "")
    m = _NUMBER.match(raw)
    if not m:
        raise ValueError(_("Enter a number like 0.35."))
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if len(frac) > places:
        raise ValueError(_("Use at most %(n)d decimals.", n=places))
    try:
        value = Decimal(f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}")
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain numbers
        raise ValueError(_("Enter a number like 0.35.")) from None
    return value


class DecimalRange:
    """Validator of a text field holding a plain decimal: ``minimum`` ≤ value (< or ≤) ``maximum``, at most ``places`` decimals."""

    def __init__(self, minimum: Decimal | int | None = 0, maximum: Decimal | int | None = None, *, places: int = 6,
                 above_minimum: bool = False):
        self.minimum = None if minimum is None else Decimal(minimum)
        self.maximum = None if maximum is None else Decimal(maximum)
        self.places = places
        self.above_minimum = above_minimum

    def __call__(self, form, field) -> None:
        if not (field.data or "").strip():
            return
        try:
            value = parse_decimal(field.data, places=self.places)
        except ValueError as e:
            raise StopValidation(str(e)) from None
        if self.minimum is not None and (value < self.minimum or (self.above_minimum and value == self.minimum)):
            if self.above_minimum:
                raise StopValidation(_("Must be more than %(n)s.", n=self.minimum))
            raise StopValidation(_("Must be at least %(n)s.", n=self.minimum))
        if self.maximum is not None and value > self.maximum:
            raise StopValidation(_("Must be at most %(n)s.", n=self.maximum))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def has_control_characters(text: str | None) -> bool:
    """Whether ``text`` holds control characters other than tab and line breaks (a NUL cannot even be stored in PostgreSQL)."""
    return bool(text) and _CONTROL.search(text) is not None


class Printable:
    """Validator: no control characters (other than tab and line breaks)."""

    def __call__(self, form, field) -> None:
        if isinstance(field.data, str) and has_control_characters(field.data):
            raise StopValidation(_("Remove the invisible control characters."))


class WholeNumber(IntegerField):
    """An integer field drawn as a text input with a numeric keyboard (styled like the other inputs, no spinner)."""

    widget = TextInput()

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("render_kw", {"inputmode": "numeric"})
        super().__init__(*args, **kwargs)


def decimal_or_none(text: str | None, places: int = 6) -> Decimal | None:
    """The value of a field ``DecimalRange`` accepted; None when it was left empty."""
    if not (text or "").strip():
        return None
    return parse_decimal(text, places=places)


@lru_cache(maxsize=1)
def zone_names() -> frozenset[str]:
    """The IANA time zone names this system knows (``Europe/Madrid``, ``UTC``, ...)."""
    return frozenset(available_timezones()) | {"UTC"}


def check_zone(name: str) -> str:
    """``name`` if it is an IANA time zone; ValueError with the reason otherwise."""
    name = (name or "").strip()
    if name not in zone_names():
        raise ValueError(_("Not a time zone we know: use a name like Europe/Madrid or America/New_York."))
    return name


def local_to_utc(text: str, zone_name: str) -> dt.datetime:
    """A local date and time typed for the site ("2026-03-01T18:00", "2026-03-01 18:00") as an aware UTC datetime.

    ValueError with the reason when it cannot be read, or when the time does
    not exist there (the hour skipped when clocks go forward). A time that
    happens twice (clocks go back) is the first of the two.
    """
    raw = (text or "").strip().replace(" ", "T", 1)
    try:
        naive = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(_("Enter a date and time like 2026-03-01 18:00.")) from None
    if naive.tzinfo is not None:
        raise ValueError(_("Enter the site's local time, without an offset."))
    if not 2000 <= naive.year <= 2200:
        raise ValueError(_("Enter a date between the years 2000 and 2200."))
    zone = ZoneInfo(zone_name)
    aware = naive.replace(tzinfo=zone, fold=0)
    back = aware.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None)
    if back != naive:
        raise ValueError(_("That time does not exist in %(zone)s (the clocks go forward then).", zone=zone_name))
    return aware.astimezone(dt.UTC)


def utc_to_local_text(at: dt.datetime, zone_name: str) -> str:
    """An instant as the site's local time, "YYYY-MM-DD HH:MM"."""
    return at.astimezone(ZoneInfo(zone_name)).strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------- CSV


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet will show as text, never run as a formula (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r", "|", "%") else text
