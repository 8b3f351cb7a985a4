"""Receipts, invoices and credit notes as people get them: the page, the PDF (read back with pypdf), the check page,
the business reissue, billing details, the operator's branding and the JSON API.

Sessions are charged through the charging service as the gateway drives it
(helpers of test_charging_service.py); card sessions hold and capture at
localstripe. PDFs are real WeasyPrint output; their text is extracted and read.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import secrets

import pytest
from pypdf import PdfReader
from sqlalchemy import select

from payments import wallet
from payments.base import utcnow
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from payments.tariff_store import loads
from tests.stripe_browser import browser_card
from tests.webapp.test_charging_service import card_site, charge, make_site, start  # noqa: F401  (card_site: a fixture)
from webapp.auth.tokens import digest
from webapp.charging import service
from webapp.charging.models import PaymentKind
from webapp.models import ApiToken, Operator, Role, User
from webapp.receipts import service as receipts

PASSWORD = "correct horse staple"


def png_logo() -> bytes:
    """A small real PNG (a red square), as an operator would upload."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (170, 51, 0)).save(buf, "PNG")
    return buf.getvalue()


PNG_LOGO = png_logo()


def pdf_text(data: bytes) -> str:
    """All the text of a PDF, page after page, whitespace collapsed."""
    assert data.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(data))
    return re.sub(r"\s+", " ", " ".join(page.extract_text() or "" for page in reader.pages))


def db(app):
    return app.extensions["db_sessionmaker"]()


@pytest.fixture
def site(app):
    return make_site(app)


@pytest.fixture
def account(app, make_user):
    """``account(email, locale=None, euros=50)``: a verified account with money in its wallet."""

    def make(email: str = "ana@example.com", locale: str | None = None, euros: int = 50, **fields) -> User:
        user = make_user(email, PASSWORD, locale=locale, **fields)
        if euros:
            with app.extensions["db_sessionmaker"].begin() as s:
                transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                         credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(euros * 100, "EUR"))
        return user

    return make


def sign_in(client, email: str) -> None:
    resp = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302, resp.get_data(as_text=True)


def paid_session(app, user, *, stop_wh: int = 7000, **kw):
    """A wallet session of ``user``: 7 kWh at 0.35 + 21 % = 2.96 (net 2.45, VAT 0.51). Returns (session, its invoice)."""
    cs = start(app, user, **kw).session
    charge(app, cs, utcnow() - dt.timedelta(minutes=20), kwh_at=[(300, stop_wh // 2)], stop_s=600, stop_wh=stop_wh)
    with db(app) as s:
        doc = receipts.document_for(s, f"session:{cs.id}")
        assert doc is not None
        s.expunge(doc)
    return cs, doc


def bearer(app, user) -> dict:
    secret = f"vp_docs-{user.id}-{secrets.token_hex(4)}"
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(ApiToken(user_id=user.id, token_hash=digest(secret), name="tests", expires_at=utcnow() + dt.timedelta(days=1)))
    return {"Authorization": f"Bearer {secret}"}


# --- the invoice of a session: page and PDF ----------------------------------------------------------


def test_a_wallet_session_invoice_as_pdf_and_page_shows_every_figure(site, client, account):
    ana = account()
    cs, doc = paid_session(site, ana)
    year = utcnow().year
    assert doc.number == f"OP1-{year}-000001" and doc.kind is DocumentKind.INVOICE
    sign_in(client, ana.email)

    pdf = client.get(f"/documents/{doc.number}.pdf")
    assert pdf.status_code == 200 and pdf.mimetype == "application/pdf"
    text = pdf_text(pdf.data)
    for expected in (doc.number, "Simplified invoice", "Op S.L.", "ana@example.com", "Energy", "7.000 kWh", "€0.35 / kWh", "21%",
                     "Total excl. VAT", "€2.45", "€0.51", "€2.96", "Voltpay wallet", "Car park", "A101", "Meter at start", "1.000 kWh",
                     "Meter at end", "8.000 kWh", "Europe/Madrid"):
        assert expected in text, expected

    page = client.get(f"/documents/{doc.number}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and doc.number in html and "€2.96" in html and "€2.45" in html
    assert f'href="/documents/{doc.number}.pdf"' in html
    # the QR code (inline SVG) and the absolute link to the public check page
    assert "<svg" in html and f"http://localhost/documents/check/{doc.verify_token}" in html
    # the colour comes as a stylesheet: the CSP allows no inline style on pages
    assert 'href="/documents/theme/0b6e4f.css"' in html and "style=" not in html.split("<main", 1)[1]
    assert client.get("/documents/theme/0b6e4f.css").get_data(as_text=True).strip() == ".document { --doc-brand: #0b6e4f; }"

    # the session page links to it once completed
    session_page = client.get(f"/s/{cs.id}").get_data(as_text=True)
    assert f'href="/documents/{doc.number}"' in session_page


def test_a_guest_card_receipt_opens_with_the_session_link_and_for_nobody_else(card_site, stripe_config, app_config):
    make_site(card_site)
    provider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    res = start(card_site, None, email="guest@example.com", payment_kind=PaymentKind.CARD, payment_method_id=pm,
                card_brand=card.brand, card_last4=card.last4)
    cs = res.session
    charge(card_site, cs, utcnow() - dt.timedelta(minutes=20), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    with db(card_site) as s:
        doc = receipts.document_for(s, f"session:{cs.id}")
    assert doc.owner == f"guest:{cs.id}" and doc.total_minor == 424

    guest = card_site.test_client()
    first = guest.get(f"/documents/{doc.number}?t={res.guest_token}")
    assert first.status_code == 302 and first.headers["Location"] == f"/documents/{doc.number}"  # the token leaves the address bar
    page = guest.get(f"/documents/{doc.number}")
    assert page.status_code == 200 and "€4.24" in page.get_data(as_text=True)
    text = pdf_text(guest.get(f"/documents/{doc.number}.pdf").data)
    assert "Visa •••• 4242" in text and "guest@example.com" in text
    assert "Reserved" in text and "Released" in text  # held vs captured vs released

    stranger = card_site.test_client()
    assert stranger.get(f"/documents/{doc.number}").status_code == 404
    assert stranger.get(f"/documents/{doc.number}.pdf").status_code == 404
    assert stranger.get(f"/documents/{doc.number}?t=not-the-token").status_code == 404
    assert stranger.get(f"/documents/{doc.number}.pdf?t={res.guest_token}").status_code == 200  # the emailed link works for its holder


def test_another_accounts_receipt_is_not_found_on_the_page_the_pdf_and_the_api(site, client, account):
    ana, ben = account(), account("ben@example.com")
    _, doc = paid_session(site, ana)
    sign_in(client, ben.email)
    assert client.get(f"/documents/{doc.number}").status_code == 404
    assert client.get(f"/documents/{doc.number}.pdf").status_code == 404
    assert client.get("/documents/OP1-2099-999999").status_code == 404
    resp = client.get(f"/api/v1/receipts/{doc.number}", headers=bearer(site, ben))
    assert resp.status_code == 404 and resp.mimetype == "application/problem+json" and resp.json["code"] == "not_found"
    assert client.get(f"/api/v1/receipts/{doc.number}.pdf", headers=bearer(site, ben)).status_code == 404
    assert client.get(f"/documents/{doc.number}.pdf").status_code == 404
    # a visitor who is not signed in
    assert site.test_client().get(f"/documents/{doc.number}").status_code == 404


# --- languages --------------------------------------------------------------------------------------


def test_a_receipt_in_spanish(site, client, account):
    lucia = account("lucia@example.com", locale="es")
    _, doc = paid_session(site, lucia)
    assert doc.locale == "es"
    text = pdf_text(_pdf_as(site, lucia, doc))
    for expected in ("Energía", "Total sin IVA", "IVA", "Pagado con", "Monedero de Voltpay", "2,96 €", "2,45 €", "0,51 €", "7,000 kWh",
                     "21 %", "Punto de recarga"):
        assert expected in text, expected
    assert re.search(r"\d{1,2} de [a-z]+ de \d{4}", text)  # "5 de diciembre de 2026"


def test_a_receipt_in_chinese(site, client, account):
    wei = account("wei@example.com", locale="zh")
    _, doc = paid_session(site, wei)
    text = pdf_text(_pdf_as(site, wei, doc))
    for expected in ("电量", "不含税合计", "增值税", "合计", "支付方式", "Voltpay 钱包", "充电桩", "€2.96"):
        assert expected in text, expected
    assert re.search(r"\d{4}年\d{1,2}月\d{1,2}日", text)
    # the page too, whatever language the viewer's browser prefers: the document's own
    sign_in(client, wei.email)
    html = client.get(f"/documents/{doc.number}", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert "电量" in html and 'lang="zh-Hans"' in html


def _pdf_as(app, user, doc) -> bytes:
    c = app.test_client()
    sign_in(c, user.email)
    resp = c.get(f"/documents/{doc.number}.pdf")
    assert resp.status_code == 200
    return resp.data


# --- check page, refunds, business reissue -------------------------------------------------------------


def test_the_check_page_is_public_says_whether_the_document_stands_and_shows_nothing_personal(site, account):
    ana = account()
    cs, doc = paid_session(site, ana)
    visitor = site.test_client()
    page = visitor.get(f"/documents/check/{doc.verify_token}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and doc.number in html and "Op S.L." in html and "€2.96" in html and "Valid" in html
    assert "ana@example.com" not in html
    assert visitor.get("/documents/check/not-a-token").status_code == 404

    with db(site) as s:
        service.refund_session(s, None, cs.id, Money(100, "EUR"), reason="goodwill", key="r1", now=utcnow())
    assert "Partly credited" in visitor.get(f"/documents/check/{doc.verify_token}").get_data(as_text=True)


def test_a_partial_refund_issues_a_credit_note_that_refers_to_the_invoice(site, client, account):
    ana = account()
    cs, doc = paid_session(site, ana)
    with db(site) as s:
        service.refund_session(s, None, cs.id, Money(100, "EUR"), reason="goodwill", key="r1", now=utcnow())
        cn = s.scalar(select(Document).where(Document.kind == DocumentKind.CREDIT_NOTE))
    assert cn.number == f"OP1-CN-{utcnow().year}-000001"
    sign_in(client, ana.email)
    text = pdf_text(client.get(f"/documents/{cn.number}.pdf").data)
    assert "Credit note" in text and f"Credit note for {doc.number}" in text and "-€1.00" in text and "Refund" in text
    # the original's page says it was partly credited, and still offers the business invoice for what is left
    html = client.get(f"/documents/{doc.number}").get_data(as_text=True)
    assert "Partly credited" in html and 'data-testid="reissue"' in html


def test_a_business_invoice_after_payment_credits_the_original_and_issues_a_new_one(site, csrf_client, account):
    ana = account()
    _, doc = paid_session(site, ana)
    with db(site) as s:
        original_content = s.get(Document, doc.id).content
    client = csrf_client
    sign_in_csrf(client, ana.email)
    page = client.get(f"/documents/{doc.number}").get_data(as_text=True)
    token = csrf_of(page)

    bad = client.post(f"/documents/{doc.number}/business", data={"csrf_token": token, "company_name": "", "address": "Calle 1",
                                                                  "vat_id": "ES!!"})
    html = bad.get_data(as_text=True)
    assert bad.status_code == 400 and "Enter the company's name." in html and "Enter the VAT number as printed" in html
    assert 'id="vat_id-error"' in html
    assert client.post(f"/documents/{doc.number}/business", data={"company_name": "Acme", "address": "x"}).status_code == 400  # no CSRF

    resp = client.post(f"/documents/{doc.number}/business",
                       data={"csrf_token": token, "company_name": "Acme Fleet S.L.", "address": "Gran Via 2\n28013 Madrid",
                             "vat_id": "es b-12345678"})
    year = utcnow().year
    assert resp.status_code == 302 and resp.headers["Location"] == f"/documents/OP1-{year}-000002"
    with db(site) as s:
        docs = {d.number: d for d in s.scalars(select(Document))}
        assert s.get(Document, doc.id).content == original_content  # the original is never edited
    assert set(docs) == {f"OP1-{year}-000001", f"OP1-CN-{year}-000001", f"OP1-{year}-000002"}
    new = docs[f"OP1-{year}-000002"]
    assert loads(new.content)["buyer"]["vat_id"] == "ESB12345678" and new.total_minor == doc.total_minor
    text = pdf_text(client.get(f"/documents/{new.number}.pdf").data)
    assert "Invoice" in text and "Simplified" not in text and "Acme Fleet S.L." in text and "ESB12345678" in text
    assert f"Replaces {doc.number}, cancelled by credit note OP1-CN-{year}-000001" in text

    # once is enough: the original offers no form any more and a second request is refused with a reason
    old_page = client.get(f"/documents/{doc.number}").get_data(as_text=True)
    assert f"Replaced by {new.number}" in old_page and 'data-testid="reissue"' not in old_page
    again = client.post(f"/documents/{doc.number}/business", data={"csrf_token": csrf_of(old_page), "company_name": "Acme",
                                                                    "address": "x"})
    assert again.status_code == 409 and "already reissued" in again.get_data(as_text=True)
    cn = client.post(f"/documents/OP1-CN-{year}-000001/business", data={"csrf_token": csrf_of(old_page), "company_name": "Acme",
                                                                         "address": "x"})
    assert cn.status_code == 409 and "A credit note cannot be reissued." in cn.get_data(as_text=True)
    assert f"Replaced by {new.number}" in site.test_client().get(f"/documents/check/{doc.verify_token}").get_data(as_text=True)


def sign_in_csrf(client, email: str) -> None:
    page = client.get("/auth/sign-in").get_data(as_text=True)
    resp = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD, "csrf_token": csrf_of(page)})
    assert resp.status_code == 302


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"|name="csrf_token" value="([^"]+)"', html)
    return m.group(1) or m.group(2)


# --- billing details before payment ----------------------------------------------------------------


def test_billing_details_saved_before_paying_appear_on_the_next_invoice(site, client, account):
    ana = account()
    sign_in(client, ana.email)
    assert client.get("/account/billing").status_code == 200
    bad = client.post("/account/billing", data={"company_name": "", "address": "", "vat_id": "B1"})
    assert bad.status_code == 400 and "Enter the VAT number as printed" in bad.get_data(as_text=True)
    ok = client.post("/account/billing", data={"company_name": "Acme Fleet S.L.", "address": "Gran Via 2", "vat_id": "ESB12345678"})
    assert ok.status_code == 302
    _, doc = paid_session(site, ana)
    text = pdf_text(client.get(f"/documents/{doc.number}.pdf").data)
    assert "Invoice" in text and "Simplified" not in text and "Acme Fleet S.L." in text and "ESB12345678" in text
    assert 'href="/account/billing"' in client.get("/account/").get_data(as_text=True)


# --- the operator's branding -------------------------------------------------------------------------


def test_operator_staff_brand_their_documents_and_bad_inputs_are_refused_at_the_field(site, client, account, make_user):
    with db(site) as s:
        op_id = s.scalar(select(Operator.id))
        other = Operator(name="Other", legal_name="Other S.A.", document_prefix="OTH")
        s.add(other)
        s.commit()
    make_user("staff@example.com", PASSWORD, role=Role.OPERATOR_STAFF, operator_id=op_id)
    ana = account()
    customer = site.test_client()
    sign_in(customer, ana.email)
    assert customer.get("/operator/branding").status_code == 403
    sign_in(client, "staff@example.com")
    page = client.get("/operator/branding")
    assert page.status_code == 200 and 'data-testid="document"' in page.get_data(as_text=True)  # the preview

    def post(**fields):
        data = {"color": "#aa3300", "footer": "", "legal": "", "prefix": "", **fields}
        return client.post("/operator/branding", data=data, content_type="multipart/form-data")

    bad = post(color="red")
    assert bad.status_code == 400 and "Enter a colour as #rrggbb" in bad.get_data(as_text=True)
    big = post(logo=(io.BytesIO(PNG_LOGO + b"\0" * (200 * 1024)), "logo.png"))
    assert big.status_code == 400 and "larger than 200 kB" in big.get_data(as_text=True)
    fake = post(logo=(io.BytesIO(b"GIF89a not a png"), "logo.png"))
    assert fake.status_code == 400 and "Upload a PNG, JPEG or SVG image" in fake.get_data(as_text=True)
    script = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    assert post(logo=(io.BytesIO(script), "logo.svg")).status_code == 400
    taken = post(prefix="OTH")
    assert taken.status_code == 400 and "already used by another seller" in taken.get_data(as_text=True)
    assert post(prefix="toolongprefix").status_code == 400

    ok = post(color="#AA3300", logo=(io.BytesIO(PNG_LOGO), "logo.png"), footer="Thank you for charging with Op!",
              legal="Registered in Madrid, sheet M-123456\nShare capital 3,000 EUR", prefix="opx")
    assert ok.status_code == 302, ok.get_data(as_text=True)
    logo = client.get(f"/operators/{op_id}/logo")
    assert logo.status_code == 200 and logo.mimetype == "image/png" and logo.data == PNG_LOGO
    preview = client.get("/operator/branding/preview.pdf")
    assert preview.status_code == 200 and "Thank you for charging with Op!" in pdf_text(preview.data)

    _, doc = paid_session(site, ana)
    assert doc.number.startswith("OPX-")
    html = customer.get(f"/documents/{doc.number}").get_data(as_text=True)
    assert 'href="/documents/theme/aa3300.css"' in html and f'src="/operators/{op_id}/logo"' in html
    assert "Thank you for charging with Op!" in html and "Share capital 3,000 EUR" in html
    pdf = customer.get(f"/documents/{doc.number}.pdf").data
    text = pdf_text(pdf)
    assert "Thank you for charging with Op!" in text and "Registered in Madrid, sheet M-123456" in text
    assert any(page.images for page in PdfReader(io.BytesIO(pdf)).pages)  # the logo, embedded


# --- the API ------------------------------------------------------------------------------------------


def test_the_api_lists_the_accounts_documents_newest_first_and_gives_one_with_its_figures(site, client, account):
    ana = account()
    auth = bearer(site, ana)
    _, first = paid_session(site, ana)
    _, second = paid_session(site, ana, stop_wh=10000)
    listed = client.get("/api/v1/receipts", headers=auth)
    assert listed.status_code == 200
    assert [d["number"] for d in listed.json["data"]] == [second.number, first.number] and listed.json["next_before"] is None
    month = utcnow().strftime("%Y-%m")
    assert len(client.get(f"/api/v1/receipts?month={month}", headers=auth).json["data"]) == 2
    assert client.get("/api/v1/receipts?month=2001-01", headers=auth).json["data"] == []
    assert client.get("/api/v1/receipts?month=2001-13", headers=auth).status_code == 422
    page = client.get("/api/v1/receipts?limit=1", headers=auth).json
    assert [d["number"] for d in page["data"]] == [second.number]
    assert [d["number"] for d in client.get(f"/api/v1/receipts?limit=1&before={page['next_before']}", headers=auth).json["data"]] == [first.number]

    one = client.get(f"/api/v1/receipts/{first.number}", headers=auth).json
    assert one["kind"] == "invoice" and one["status"] == "valid" and one["locale"] == "en"
    assert one["totals"] == {"net": {"amount": 245, "currency": "EUR"}, "vat": {"amount": 51, "currency": "EUR"},
                             "total": {"amount": 296, "currency": "EUR"}}
    assert one["lines"][0]["kind"] == "energy" and one["lines"][0]["description"] == "Energy" and one["lines"][0]["quantity"] == "7.000"
    assert one["vat"] == [{"rate": "21.0", "net": {"amount": 245, "currency": "EUR"}, "vat": {"amount": 51, "currency": "EUR"},
                           "gross": {"amount": 296, "currency": "EUR"}}]
    assert one["payment"]["method"] == "wallet" and one["payment"]["captured"] == {"amount": 296, "currency": "EUR"}
    assert one["links"]["pdf"] == f"http://localhost/api/v1/receipts/{first.number}.pdf"
    pdf = client.get(f"/api/v1/receipts/{first.number}.pdf", headers=auth)
    assert pdf.status_code == 200 and first.number in pdf_text(pdf.data)
    assert client.get(f"/api/v1/receipts/{first.number}").status_code == 401


def test_the_worker_renders_the_pdf_without_a_request(site, account):
    """``render_pdf(s, doc)`` as the email job calls it: an app context only; links from BASE_URL."""
    from webapp.receipts import render

    lucia = account("lucia@example.com", locale="es")
    _, doc = paid_session(site, lucia)
    with site.app_context(), db(site) as s:
        text = pdf_text(render.render_pdf(s, s.get(Document, doc.id)))
    # the link may wrap at any character of its random token, and the PDF's text then has a line break inside it
    assert doc.number in text and "Energía" in text and f"http://localhost/documents/check/{doc.verify_token}" in "".join(text.split())
