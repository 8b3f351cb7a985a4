"""Connector QR codes: the SVG and PNG images decode to ``{BASE_URL}/c/{code}`` with a real QR decoder
(zxing-cpp), and the printable sheet of a site shows every code to the staff of its operator only."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest
import zxingcpp
from PIL import Image, ImageDraw

from webapp.models import Charger, Connector, Operator, Role, Site

PASSWORD = "correct horse staple"
SITE_A_CODES = ["A101", "A102", "A201", "A202", "A301", "A302", "A401"]  # seven labels: two printed pages


@pytest.fixture
def app_config(app_config):
    """A production-like public URL, written with a trailing slash as people do."""
    return {**app_config, "BASE_URL": "https://pay.example.com/"}


@pytest.fixture
def sites(app):
    """Two operators: Plaza (seven connectors on four chargers) and another operator's Harbour (one connector)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        plaza_op = Operator(name="Plaza Energy", legal_name="Plaza Energy S.L.")
        harbour_op = Operator(name="Harbour Power", legal_name="Harbour Power Ltd")
        s.add_all([plaza_op, harbour_op])
        s.flush()
        plaza = Site(operator_id=plaza_op.id, name="Plaza Mayor car park")
        harbour = Site(operator_id=harbour_op.id, name="Harbour front")
        s.add_all([plaza, harbour])
        s.flush()
        chargers: dict[str, Charger] = {}
        for code in SITE_A_CODES:
            if code[1] not in chargers:
                chargers[code[1]] = Charger(site_id=plaza.id, charge_point_id=f"PLAZA-CP-{code[1]}", password_hash="x")
                s.add(chargers[code[1]])
                s.flush()
            s.add(Connector(charger_id=chargers[code[1]].id, number=int(code[2:]), connector_code=code))
        harbour_cp = Charger(site_id=harbour.id, charge_point_id="HARBOUR-CP-1", password_hash="x")
        s.add(harbour_cp)
        s.flush()
        s.add(Connector(charger_id=harbour_cp.id, number=1, connector_code="H101"))
        return {"plaza": plaza.id, "harbour": harbour.id, "plaza_op": plaza_op.id, "harbour_op": harbour_op.id}


def decode(img: Image.Image) -> list[str]:
    """The texts of the QR codes a real decoder finds in ``img``."""
    return [r.text for r in zxingcpp.read_barcodes(img.convert("L"))]


def rasterize(svg: bytes, scale: int = 8) -> Image.Image:
    """Draw the dark modules of one of our SVG codes (a single path of unit squares) onto a white image."""
    root = ET.fromstring(svg)
    _x, _y, width, height = (float(v) for v in root.get("viewBox").split())
    img = Image.new("L", (int(width * scale), int(height * scale)), 255)
    draw = ImageDraw.Draw(img)
    squares = re.findall(r"M([\d.]+),([\d.]+)H([\d.]+)V([\d.]+)H[\d.]+z", root.find("{http://www.w3.org/2000/svg}path").get("d"))
    assert len(squares) > 100, "the SVG path is not drawn as squares any more: update rasterize()"
    for x, y, x2, y2 in squares:
        draw.rectangle([float(x) * scale, float(y) * scale, float(x2) * scale - 1, float(y2) * scale - 1], fill=0)
    return img


def sign_in(client, email: str) -> None:
    resp = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302, resp.get_data(as_text=True)


# --- the images ---------------------------------------------------------------------------


def test_png_decodes_to_the_connector_url(client, sites):
    resp = client.get("/c/A101/qr.png")
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    assert decode(Image.open(io.BytesIO(resp.data))) == ["https://pay.example.com/c/A101"]


def test_png_size_sets_the_pixels_per_module(client, sites):
    small = Image.open(io.BytesIO(client.get("/c/A101/qr.png?size=4").data))
    large = Image.open(io.BytesIO(client.get("/c/A101/qr.png?size=20").data))
    assert large.width == large.height == 5 * small.width
    assert decode(small) == decode(large) == ["https://pay.example.com/c/A101"]


@pytest.mark.parametrize("size", ["0", "1", "41", "1000000", "-5", "abc", "", "4.5", "²"])
def test_a_bad_png_size_is_a_clear_400(client, sites, size):
    page = client.get("/c/A101/qr.png", query_string={"size": size})
    assert page.status_code == 400 and page.mimetype == "text/html"
    assert "whole number from 2 to 40" in page.get_data(as_text=True)
    problem = client.get("/c/A101/qr.png", query_string={"size": size}, headers={"Accept": "application/json"})
    assert problem.status_code == 400 and problem.mimetype == "application/problem+json"
    assert problem.json["code"] == "invalid_size" and "2 to 40" in problem.json["detail"]


def test_svg_is_well_formed_and_decodes_to_the_connector_url(client, sites):
    resp = client.get("/c/H101/qr.svg")
    assert resp.status_code == 200 and resp.mimetype == "image/svg+xml"
    root = ET.fromstring(resp.data)  # raises on malformed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert decode(rasterize(resp.data)) == ["https://pay.example.com/c/H101"]


def test_a_code_typed_in_lower_case_encodes_the_stored_code(client, sites):
    resp = client.get("/c/a101/qr.png")
    assert resp.status_code == 200
    assert decode(Image.open(io.BytesIO(resp.data))) == ["https://pay.example.com/c/A101"]


@pytest.mark.parametrize("path", ["/c/NOPE/qr.svg", "/c/NOPE/qr.png", "/c/NOPE/qr.png?size=abc", "/c/bad%20code!/qr.svg"])
def test_an_unknown_code_is_the_404_page(client, sites, path):
    resp = client.get(path)
    assert resp.status_code == 404 and resp.mimetype == "text/html"
    assert "check it and try again" in resp.get_data(as_text=True)


def test_images_are_cached_for_a_day_and_revalidated_by_etag(client, sites):
    first = client.get("/c/A101/qr.svg")
    assert first.cache_control.public and first.cache_control.max_age == 86400
    etag = first.headers["ETag"]
    again = client.get("/c/A101/qr.svg", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
    assert again.cache_control.public and again.cache_control.max_age == 86400
    # Each format, size and connector is its own image.
    etags = {client.get(p).headers["ETag"] for p in ("/c/A101/qr.svg", "/c/A101/qr.png", "/c/A101/qr.png?size=20", "/c/A102/qr.svg")}
    assert len(etags) == 4


def test_connector_url_joins_base_url_and_code(app):
    from webapp.scan import connector_url

    with app.app_context():
        assert connector_url("D201") == "https://pay.example.com/c/D201"
        app.config["BASE_URL"] = "http://127.0.0.1:8000"
        assert connector_url("D201") == "http://127.0.0.1:8000/c/D201"


# --- the printable sheet ------------------------------------------------------------------


def test_operator_staff_print_every_code_of_their_site(client, sites, make_user):
    make_user("staff@plaza.example", role=Role.OPERATOR_STAFF, operator_id=sites["plaza_op"])
    sign_in(client, "staff@plaza.example")
    resp = client.get(f"/sites/{sites['plaza']}/qr-sheet")
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    page = resp.get_data(as_text=True)
    assert "Plaza Mayor car park" in page
    for code in SITE_A_CODES:
        assert f'<p class="qr-label-typed">{code}</p>' in page
        assert f'Scan or open <span class="url">pay.example.com/c/{code}</span>' in page
    assert "H101" not in page
    assert "Charger PLAZA-CP-2 · connector 1" in page
    assert page.count("<svg") == len(SITE_A_CODES) and page.count('class="qr-sheet-page"') == 2  # six labels a page
    assert "css/print.css" in page
    # Everything is inline and nothing breaks the CSP (no <img>, no style attributes, no other origin).
    assert "<img" not in page and " style=" not in page and "<?xml" not in page
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)


def test_each_inline_code_on_the_sheet_decodes_to_its_connector(client, sites, make_user):
    make_user("boss@example.com", role=Role.ADMIN)
    sign_in(client, "boss@example.com")
    page = client.get(f"/sites/{sites['plaza']}/qr-sheet").get_data(as_text=True)
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert [decode(rasterize(svg.encode())) for svg in svgs] == [[f"https://pay.example.com/c/{c}"] for c in SITE_A_CODES]


@pytest.mark.parametrize(
    ("role", "operator", "site", "status"),
    [
        (Role.ADMIN, None, "harbour", 200),
        (Role.OPERATOR_STAFF, "harbour_op", "harbour", 200),
        (Role.SUPPORT, "harbour_op", "harbour", 200),
        (Role.OPERATOR_STAFF, "plaza_op", "harbour", 404),  # another operator's staff
        (Role.SUPPORT, "plaza_op", "harbour", 404),
        (Role.SUPPORT, None, "harbour", 404),
        (Role.CUSTOMER, None, "harbour", 404),
        (Role.CUSTOMER, "harbour_op", "harbour", 404),  # an operator id does not make a customer staff
    ],
)
def test_the_sheet_is_only_for_the_sites_own_staff(client, sites, make_user, role, operator, site, status):
    make_user("someone@example.com", role=role, operator_id=sites[operator] if operator else None)
    sign_in(client, "someone@example.com")
    resp = client.get(f"/sites/{sites[site]}/qr-sheet")
    assert resp.status_code == status
    if status == 404:  # the same answer as a site that does not exist
        assert "Harbour" not in resp.get_data(as_text=True)


def test_an_unknown_site_is_404_even_for_an_admin(client, sites, make_user):
    make_user("boss@example.com", role=Role.ADMIN)
    sign_in(client, "boss@example.com")
    assert client.get(f"/sites/{sites['harbour'] + 1000}/qr-sheet").status_code == 404


def test_signed_out_visitors_are_sent_to_sign_in(client, sites):
    resp = client.get(f"/sites/{sites['plaza']}/qr-sheet")
    assert resp.status_code == 302
    assert resp.headers["Location"].startswith("/auth/sign-in?next=") and "qr-sheet" in resp.headers["Location"]


def test_a_site_without_connectors_says_so(app, client, sites, make_user):
    with app.extensions["db_sessionmaker"].begin() as s:
        empty = Site(operator_id=sites["plaza_op"], name="Empty lot")
        s.add(empty)
        s.flush()
        empty_id = empty.id
    make_user("boss@example.com", role=Role.ADMIN)
    sign_in(client, "boss@example.com")
    page = client.get(f"/sites/{empty_id}/qr-sheet").get_data(as_text=True)
    assert "This site has no connectors yet." in page and "<svg" not in page


@pytest.mark.parametrize(("locale", "text"), [("es", "Escanea o abre <span class=\"url\">pay.example.com/c/H101</span>"), ("zh", "扫码或打开 <span class=\"url\">pay.example.com/c/H101</span>")])
def test_the_sheet_is_translated(client, sites, make_user, locale, text):
    make_user("boss@example.com", role=Role.ADMIN)
    sign_in(client, "boss@example.com")
    page = client.get(f"/sites/{sites['harbour']}/qr-sheet", headers={"Accept-Language": locale}).get_data(as_text=True)
    assert text in page and "Scan or open" not in page
