"""``GET /api/v1/connectors/{connector_code}``: what a driver sees after scanning a QR code, before paying.

Public (no token): the connector, its charger and site, the prices of the tariff
version in force now (structured, and as text in the request's language), the
raw OCPI tariff with its version id, the default card hold with the limits
at which that session would stop, and whether a session can start now
(``status``: available, in_use, faulted, unavailable, offline). The body is
written with exact numbers: the OCPI tariff's prices are JSON numbers as
stored (never through float), our own prices are Decimal strings, money is
``{"amount", "currency"}``.
"""

from __future__ import annotations

import logging
import re

from flask import current_app
from flask_babel import get_locale
from flask_babel import gettext as _
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from payments.money import MoneyError
from payments.price_display import default_hold, decimal_text, price_display
from payments.tariff_store import connector_owner, dumps, tariff_in_force
from payments.tariffs import PricingError, TariffNotActive
from webapp.api import bp
from webapp.charging.service import availability
from webapp.db import db_session, utcnow
from webapp.errors import Problem
from webapp.extensions import limiter
from webapp.models import Charger, Connector
from webapp.pricing import render_prices

log = logging.getLogger("voltpay.connectors")

# What a connector code can be (the column is String(16)); anything else cannot exist and is not looked up.
CODE = re.compile(r"[A-Za-z0-9_-]{1,16}")


def find_connector(code: str) -> Connector | None:
    """The connector with ``code`` (also typed in lower case), with its charger and site loaded."""
    if not CODE.fullmatch(code):
        return None
    q = select(Connector).options(joinedload(Connector.charger).joinedload(Charger.site))
    s = db_session()
    found = s.scalar(q.where(Connector.connector_code == code))
    if found is None and code != code.upper():
        found = s.scalar(q.where(Connector.connector_code == code.upper()))
    return found


def connector_json(connector: Connector) -> dict:
    """The connector, its charger, its site, and the prices and hold of a session started now."""
    charger = connector.charger
    site = charger.site
    now = utcnow()
    out = {
        "connector_code": connector.connector_code,
        "number": connector.number,
        "standard": connector.standard,
        "max_power_kw": connector.max_power_kw,
        "charger": {"vendor": charger.vendor, "model": charger.model},
        "site": {"name": site.name, "address": site.address, "time_zone": site.time_zone},
        "currency": site.currency,
        "available_for_payment": False,
        "status": availability(db_session(), connector),
        "prices": None,
        "display": None,
        "tariff": None,
        "default_hold": None,
        "hold_limits": None,
    }
    version = tariff_in_force(db_session(), connector_owner(connector.id), now)
    if version is None:
        return out
    display = price_display(version)
    rendered = render_prices(display)
    out.update(
        prices=display.as_json(),
        display={"locale": rendered["locale"], "lines": [line.as_json() for line in rendered["lines"]], "notes": rendered["notes"]},
        tariff={"version_id": version.id, "version": version.number, "effective_from": version.effective_from.isoformat(), "ocpi": version.ocpi},
    )
    try:
        hold = default_hold(version, currency=site.currency, max_power_kw=connector.max_power_kw, start=now, time_zone=site.time_zone)
    except TariffNotActive:  # the OCPI tariff's own validity window excludes now: nothing can start
        return out
    except (PricingError, MoneyError) as e:  # a site whose time zone or currency no longer fits its tariff: an operator must fix it
        log.warning("no hold for connector %s: %s", connector.connector_code, e)
        return out
    out.update(
        available_for_payment=True,
        default_hold=hold.amount.as_json(),
        hold_limits={
            "max_energy_kwh": decimal_text(hold.max_energy_kwh),
            "max_charging_seconds": int(hold.max_duration.total_seconds()),
            "max_idle_seconds": int(hold.max_idle.total_seconds()),
        },
    )
    return out


@bp.route("/connectors/<connector_code>", methods=["GET"])
@limiter.limit("120 per minute")
def get_connector(connector_code: str):
    """A connector as a driver sees it before starting: place, prices (AFIR) and the default hold."""
    connector = find_connector(connector_code)
    if connector is None:
        raise Problem(
            404,
            "connector_not_found",
            _("There is no charging point with this code. Check the code printed next to the QR code on the charger, or scan the QR code again."),
        )
    body = connector_json(connector)
    # dumps keeps the tariff's numbers exact (jsonify would turn Decimals into strings)
    resp = current_app.response_class(dumps(body), mimetype="application/json")
    resp.headers["Content-Language"] = str(get_locale() or "en")
    resp.headers["Vary"] = "Accept-Language, Cookie"
    resp.headers["Cache-Control"] = "no-cache"  # a new tariff version or the hold's time window can change it any minute
    return resp
