"""QR codes for connectors: SVG and PNG images, and a printable sheet per site for staff.

Every code encodes ``{BASE_URL}/c/{connector_code}`` (DESIGN.md, "Interfaces that
other programs see"), the page a driver lands on after scanning. The images are
public, since the same code is printed on the pile, and cached for a day. The
sheet is for staff: an admin prints any site, operator staff and support only
the sites of their own operator; everyone else is told the site does not exist.
Meters have the same images at ``/m/<meter_code>/qr.svg`` and ``.png``,
encoding ``{BASE_URL}/m/{meter_code}`` (the tenant's page, ``webapp.meters.views``).

The codes use error correction level Q (25 % of the code may be lost) and the
four-module quiet zone of ISO/IEC 18004: a sticker outdoors gets scratched and
dirty, and the URL is short enough that the code stays small (version 3).
"""

from __future__ import annotations

import hashlib
import io
import re
from urllib.parse import quote

import qrcode
import qrcode.constants
import qrcode.image.svg
from qrcode.image.base import BaseImage
from flask import Blueprint, Response, abort, current_app, render_template, request
from flask_babel import gettext as _
from flask_login import current_user, login_required
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from webapp.api.connectors import find_connector
from webapp.db import db_session
from webapp.errors import Problem
from webapp.models import Charger, Role, Site, User

bp = Blueprint("scan", __name__)

PNG_BOX_SIZE = 10  # pixels per module by default: about 370 px square, sharp on a label printer
PNG_BOX_MIN, PNG_BOX_MAX = 2, 40  # 40 px per module is ~1,500 px square: bounded so a request cannot ask for a huge image
CACHE_SECONDS = 24 * 60 * 60
LABELS_PER_PAGE = 6  # two columns by three rows on A4 (static/css/print.css)
_RENDERING = "qr-v1"  # part of the ETag: change it when the drawing of the codes changes


def connector_url(code: str) -> str:
    """The public URL a connector's QR code encodes: ``{BASE_URL}/c/{code}`` (needs an app context)."""
    return str(current_app.config["BASE_URL"]).rstrip("/") + "/c/" + quote(code, safe="")


def meter_url(code: str) -> str:
    """The public URL a meter's QR code encodes: ``{BASE_URL}/m/{code}`` (needs an app context)."""
    return str(current_app.config["BASE_URL"]).rstrip("/") + "/m/" + quote(code, safe="")


def printed_url(url: str) -> str:
    """The URL as printed for people to type: without ``https://``, which browsers add themselves."""
    return url.removeprefix("https://")


def _qr(data: str, box_size: int, image_factory=None) -> BaseImage:
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_Q, box_size=box_size, border=4, image_factory=image_factory)
    code.add_data(data)
    code.make(fit=True)
    return code.make_image()


def qr_svg(data: str) -> bytes:
    """A standalone SVG document (white background, so it also scans on a dark screen) of ``data``."""
    buf = io.BytesIO()
    _qr(data, 10, qrcode.image.svg.SvgPathFillImage).save(buf)
    return buf.getvalue()


def qr_svg_inline(data: str) -> Markup:
    """An ``<svg>`` element of ``data`` to put inside an HTML page (no XML declaration, no style attribute for the CSP)."""
    return Markup(_qr(data, 10, qrcode.image.svg.SvgPathFillImage).to_string(encoding="unicode"))


def qr_png(data: str, box_size: int = PNG_BOX_SIZE) -> bytes:
    """A black and white PNG of ``data`` with ``box_size`` pixels per module."""
    buf = io.BytesIO()
    _qr(data, box_size).save(buf)
    return buf.getvalue()


def _box_size() -> int:
    raw = request.args.get("size")
    if raw is None:
        return PNG_BOX_SIZE
    if re.fullmatch(r"[0-9]{1,2}", raw) and PNG_BOX_MIN <= int(raw) <= PNG_BOX_MAX:
        return int(raw)
    raise Problem(
        400, "invalid_size",
        _("The size must be a whole number from %(min)d to %(max)d: the pixels per square of the code.", min=PNG_BOX_MIN, max=PNG_BOX_MAX),
    )


def _connector_code_or_404(typed: str) -> str:
    connector = find_connector(typed)
    if connector is None:
        abort(404)
    return connector.connector_code  # the stored spelling, also when typed in lower case


def _image(code: str, kind: str, box_size: int, render, *, url: str | None = None, name: str = "connector") -> Response:
    url = url or connector_url(code)
    etag = hashlib.sha256(f"{_RENDERING}\n{kind}\n{box_size}\n{url}".encode()).hexdigest()[:32]
    if request.if_none_match.contains(etag):
        resp = Response(status=304)
    else:
        resp = Response(render(url), mimetype="image/svg+xml" if kind == "svg" else "image/png")
        resp.headers["Content-Disposition"] = f'inline; filename="{name}-{code}.{kind}"'
    resp.set_etag(etag)
    resp.cache_control.public = True
    resp.cache_control.max_age = CACHE_SECONDS
    return resp


@bp.route("/c/<connector_code>/qr.svg")
def qr_svg_image(connector_code: str):
    """The connector's QR code as SVG, for print shops and label software."""
    return _image(_connector_code_or_404(connector_code), "svg", 0, qr_svg)


@bp.route("/c/<connector_code>/qr.png")
def qr_png_image(connector_code: str):
    """The connector's QR code as PNG; ``?size=`` sets the pixels per module (2 to 40, default 10)."""
    code = _connector_code_or_404(connector_code)  # an unknown connector is 404 whatever the size
    box_size = _box_size()
    return _image(code, "png", box_size, lambda url: qr_png(url, box_size))


def _meter_code_or_404(typed: str) -> str:
    from webapp.meters.views import find_meter

    meter = find_meter(typed)
    if meter is None:
        abort(404)
    return meter.meter_code


@bp.route("/m/<meter_code>/qr.svg")
def meter_qr_svg_image(meter_code: str):
    """The meter's QR code (``{BASE_URL}/m/<meter_code>``) as SVG, for the sticker on the meter."""
    code = _meter_code_or_404(meter_code)
    return _image(code, "svg", 0, qr_svg, url=meter_url(code), name="meter")


@bp.route("/m/<meter_code>/qr.png")
def meter_qr_png_image(meter_code: str):
    """The meter's QR code as PNG; ``?size=`` sets the pixels per module (2 to 40, default 10)."""
    code = _meter_code_or_404(meter_code)
    box_size = _box_size()
    return _image(code, "png", box_size, lambda url: qr_png(url, box_size), url=meter_url(code), name="meter")


def may_print_site(user: User, site: Site) -> bool:
    """Admins print any site; operator staff and support only the sites of their own operator."""
    if user.role == Role.ADMIN:
        return True
    return user.role in (Role.OPERATOR_STAFF, Role.SUPPORT) and user.operator_id is not None and user.operator_id == site.operator_id


@bp.route("/sites/<int:site_id>/qr-sheet")
@login_required
def qr_sheet(site_id: int):
    """A printable A4 sheet of the site's connector QR codes, each with its code written out for people who type it."""
    site = db_session().scalar(
        select(Site).where(Site.id == site_id).options(selectinload(Site.chargers).selectinload(Charger.connectors))
    )
    # A site the user may not see answers like one that does not exist: no confirming which ids are taken.
    if site is None or not may_print_site(current_user, site):
        abort(404)
    labels = []
    for charger in site.chargers:
        for connector in charger.connectors:
            url = connector_url(connector.connector_code)
            labels.append({
                "charger": charger.charge_point_id,
                "number": connector.number,
                "code": connector.connector_code,
                # Marked up so the address wraps as a whole (print.css); escaped, as it holds BASE_URL and the code.
                "printed_url": Markup('<span class="url">%s</span>') % printed_url(url),
                "svg": qr_svg_inline(url),
            })
    pages = [labels[i:i + LABELS_PER_PAGE] for i in range(0, len(labels), LABELS_PER_PAGE)]
    return render_template("scan/qr_sheet.html", site=site, pages=pages, count=len(labels))
