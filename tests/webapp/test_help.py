"""The help center: articles in English, Spanish and Chinese, search, and help one tap away from every step of the flows.

What a person would notice: every article opens in their language (the
language chosen as everywhere else: Accept-Language, the picker, the
account); a word from an article's text finds it, in every language; a
search that finds nothing says what to try; a wrong link says so and offers
the search; nothing typed into the search can put markup on the page; each
charger error code has its own section; and the pages of the flows — the
connector, the session, the receipt, the meter, the bill, the wallet, the
card-declined message, the error pages — each link to the article that
explains them, carrying the session, document or meter to the contact form.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from decimal import Decimal as D

import pytest
from sqlalchemy import select

from payments.cards import CardPayment, Purpose, State
from payments.invoicing import Document
from payments.tariff_store import dumps
from tests.stripe_browser import DECLINED_AT_CHARGE
from tests.webapp.test_charging_pages import (  # noqa: F401  (charger and site are fixtures)
    charger,
    charger_event,
    get_session,
    guest_start,
    plug_in_and_charge,
    session_id_of,
    set_connector,
    site,
)
from tests.webapp.wallet_helpers import sign_in, text
from webapp.charging import service
from webapp.charging.models import ChargingSession, SessionState
from webapp.help import articles
from webapp.meters.models import Bill, BillState, MeterTariff, MeterTariffVersion, Tenant
from webapp.models import Charger, Meter, Operator, Site, User

LANGS = {"en": ("en", "en"), "es": ("es", "es"), "zh": ("zh-CN", "zh-Hans")}  # our code → (Accept-Language, <html lang>)
LIB = articles.load()
SLUGS = [a.slug for a in LIB.all("en")]


def page(client, path: str, lang: str = "en"):
    """GET ``path`` in ``lang`` (our code), as a browser of that language asks."""
    return client.get(path, headers={"Accept-Language": LANGS[lang][0]})


def hrefs(response) -> list[str]:
    """Every link target of the page, entities decoded."""
    return [html.unescape(h) for h in re.findall(r'href="([^"]*)"', response.get_data(as_text=True))]


def help_links(response) -> list[str]:
    """The page's links into the help center."""
    return [h for h in hrefs(response) if h.startswith("/help")]


# -- the articles themselves ------------------------------------------------------------------------


def test_there_are_articles_for_drivers_tenants_and_everyone_and_each_is_translated():
    assert len(SLUGS) >= 12
    assert {a.audience for a in LIB.all("en")} == set(articles.AUDIENCES)
    for lang in ("es", "zh"):
        for a in LIB.all(lang):
            english = LIB.get(a.slug, "en")
            assert not a.fallback, f"{lang}/{a.slug}.md is missing"
            assert a.title != english.title and a.summary != english.summary, f"{lang}/{a.slug}.md is not translated"
            assert a.anchors == english.anchors, f"{lang}/{a.slug}.md: the sections' ids differ from English"
            assert sorted(a.links) == sorted(english.links), f"{lang}/{a.slug}.md: the links differ from English"


@pytest.mark.parametrize("lang", list(LANGS))
def test_the_index_lists_every_article_in_the_language_with_a_search_box(client, lang):
    resp = page(client, "/help", lang)
    assert resp.status_code == 200
    body = resp.get_data(as_text=True)
    assert f'<html lang="{LANGS[lang][1]}">' in body
    assert 'action="/help/search"' in body and 'name="q"' in body
    for a in LIB.all(lang):
        assert f'href="/help/{a.slug}"' in body and html.escape(a.title, quote=False) in body
    assert [m for m in re.findall(r'data-audience="(\w+)"', body)] == ["driver", "tenant", "all"]


@pytest.mark.parametrize("lang", list(LANGS))
def test_every_article_renders_in_every_language(client, lang):
    """One app per language, every article in it (an app per article would cost more than the pages)."""
    for slug in SLUGS:
        resp = page(client, f"/help/{slug}", lang)
        assert resp.status_code == 200, slug
        body = resp.get_data(as_text=True)
        article = LIB.get(slug, lang)
        assert f'<html lang="{LANGS[lang][1]}">' in body, slug
        assert f"<h1>{html.escape(article.title, quote=False)}</h1>" in body, slug
        assert 'data-testid="fallback"' not in body, slug
        for related in article.related:
            assert f'href="/help/{related}"' in body, (slug, related)
        assert 'data-testid="contact-link"' in body, slug


def test_the_language_picker_and_the_account_choose_the_articles_language(client, make_user):
    client.post("/language", data={"locale": "zh", "next": "/help/holds"})
    assert LIB.get("holds", "zh").title in text(page(client, "/help/holds", "en"))
    make_user("ana@example.com", locale="es")
    sign_in(client, "ana@example.com")
    resp = page(client, "/help/holds", "zh")
    assert '<html lang="es">' in resp.get_data(as_text=True) and LIB.get("holds", "es").title in text(resp)


def test_an_article_without_a_translation_is_shown_in_english_with_a_note(client, tmp_path, monkeypatch):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "only-english.md").write_text(
        "---\ntitle: Only in English\naudience: all\nsummary: Not translated yet.\nkeywords: test\norder: 1\n---\n\nHello.\n")
    lib = articles.load(tmp_path)
    assert lib.get("only-english", "zh").fallback and lib.get("only-english", "en").fallback is False
    monkeypatch.setattr(articles, "library", lambda: lib)
    body = page(client, "/help/only-english", "zh").get_data(as_text=True)
    assert 'data-testid="fallback"' in body and 'lang="en"' in body and "Only in English" in body


def test_article_html_is_sanitised_even_though_the_files_are_ours(tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "bad.md").write_text(
        "---\ntitle: Bad\naudience: all\nsummary: s\nkeywords: k\norder: 1\n---\n\n"
        "## Section {#section}\n\n<script>alert(1)</script>\n\n[click](javascript:alert(2)) <img src=x onerror=alert(3)>\n"
        "<a href=\"/help/holds\" onclick=\"alert(4)\">ok</a>\n")
    out = articles.load(tmp_path).get("bad", "en").html
    assert "<script" not in out and "javascript:" not in out and "onerror" not in out and "onclick" not in out and "<img" not in out
    assert '<h2 id="section">Section</h2>' in out and 'href="/help/holds"' in out


@pytest.mark.parametrize("front_matter", [
    "title: T\naudience: pets\nsummary: s\nkeywords: k\norder: 1",  # unknown audience
    "title: T\naudience: all\nsummary: s\nkeywords: k\norder: first",  # order not a number
    "title: T\naudience: all\nkeywords: k\norder: 1",  # no summary
    "title: T\naudience: all\nsummary: s\nkeywords: k\norder: 1\nrelated: nowhere",  # related article missing
])
def test_a_bad_article_file_is_refused_with_where_it_is(tmp_path, front_matter):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "x.md").write_text(f"---\n{front_matter}\n---\nBody\n")
    with pytest.raises(articles.ArticleError, match="en/x.md"):
        articles.load(tmp_path)


def test_every_link_inside_every_article_resolves(app):
    """/help/<slug>#<anchor> to an existing article and section (in the same language); other paths to one of our pages."""
    urls = app.url_map.bind("localhost")
    for lang in LANGS:
        for a in LIB.all(lang):
            for href in a.links:
                where = f"{lang}/{a.slug}.md: {href}"
                assert href.startswith("/") and not href.startswith("//"), f"{where}: only links to our own pages"
                path, _, anchor = href.partition("#")
                if path.startswith("/help/"):
                    target = LIB.get(path.removeprefix("/help/"), lang)
                    assert target is not None, f"{where}: no such article"
                    assert not anchor or anchor in target.anchors, f"{where}: no such section"
                else:
                    assert not anchor, where
                    urls.match(path, method="GET")  # raises NotFound for a page we do not have


@pytest.mark.parametrize("lang", list(LANGS))
def test_each_charger_error_code_has_its_own_section(client, lang):
    body = page(client, "/help/charger-error-codes", lang).get_data(as_text=True)
    for code in articles.OCPP_ERROR_CODES:
        assert f'id="{code}"' in body, code
    assert len(articles.OCPP_ERROR_CODES) == 16


@pytest.mark.parametrize("lang", list(LANGS))
def test_card_problems_has_a_section_for_every_failure_the_pages_show(lang):
    anchors = LIB.get("card-problems", lang).anchors
    for code in (*articles.CARD_PROBLEM_ANCHORS, None, "something_new"):
        assert articles.card_problem_anchor(code) in anchors


def test_the_contact_link_carries_the_references_the_article_was_opened_with(client):
    resp = client.get("/help/refunds?session=42&document=VP-2026-000123&meter=M0001&topic=payment&next=//evil.example")
    contact = [h for h in hrefs(resp) if h.startswith("/contact?")]
    assert contact == ["/contact?session=42&document=VP-2026-000123&meter=M0001&topic=payment"]
    assert not any("evil.example" in h for h in hrefs(resp))  # only the four references travel
    assert "/help/holds?session=42&document=VP-2026-000123&meter=M0001&topic=payment" in hrefs(resp)  # related keep them too
    plain = client.get("/help/refunds")
    assert "/contact" in hrefs(plain) and not any(h.startswith("/contact?") for h in hrefs(plain))


# -- search --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lang", "word", "slug"), [
    ("en", "sticker", "how-scan-to-pay-works"),
    ("es", "pegatina", "how-scan-to-pay-works"),
    ("zh", "贴纸", "how-scan-to-pay-works"),
    ("en", "breakers", "troubleshooting"),
    ("es", "diferenciales", "troubleshooting"),
    ("zh", "空气开关", "troubleshooting"),
])
def test_a_word_only_in_an_articles_text_finds_it(client, lang, word, slug):
    article = LIB.get(slug, lang)
    folded = articles.fold(word)[0]
    assert folded in articles.fold(article.text)[0]
    assert folded not in articles.fold(article.title + " ".join(article.keywords))[0], "pick a word from the body only"
    resp = page(client, f"/help/search?q={word}", lang)
    assert resp.status_code == 200
    body = resp.get_data(as_text=True)
    assert f'data-result="{slug}"' in body
    assert f"<mark>{word}</mark>" in body  # the snippet shows the match


def test_search_ignores_case_and_accents_in_spanish(client):
    for q in ("OCUPACION", "ocupación", "Ocupacion"):
        body = page(client, f"/help/search?q={q}", "es").get_data(as_text=True)
        assert re.findall(r'data-result="([^"]+)"', body)[0] == "prices-and-idle-fees", q
    assert "<mark>ocupación</mark>" in page(client, "/help/search?q=ocupacion", "es").get_data(as_text=True).lower()


def test_search_ranks_title_above_keywords_above_text():
    hits = articles.search("refunds", "en", LIB)
    assert hits[0].article.slug == "refunds"  # in its title
    kw = articles.search("chargeback", "en", LIB)  # a keyword of refunds, in no title
    assert kw[0].article.slug == "refunds" and kw[0].score == 10
    body_only = articles.search("sticker", "en", LIB)
    assert body_only[0].score < 10
    two_words = articles.search("idle fee", "en", LIB)
    assert two_words[0].article.slug == "prices-and-idle-fees"
    assert [h.article.slug for h in articles.search("declined card", "en", LIB)][0] == "card-problems"


def test_search_is_in_the_pages_language_only(client):
    assert 'data-result="holds"' not in page(client, "/help/search?q=预授权", "en").get_data(as_text=True)
    assert 'data-result="holds"' in page(client, "/help/search?q=预授权", "zh").get_data(as_text=True)


@pytest.mark.parametrize("lang", list(LANGS))
def test_a_search_without_results_says_what_to_try(client, lang):
    resp = page(client, "/help/search?q=xyzzyqq", lang)
    assert resp.status_code == 200
    body = resp.get_data(as_text=True)
    assert 'data-testid="no-results"' in body and "xyzzyqq" in body and 'name="q"' in body
    assert 'data-testid="results"' not in body
    assert body.count('data-article="') >= 3  # popular articles to pick from instead


def test_an_empty_search_shows_the_box_and_articles(client):
    resp = client.get("/help/search?q=+++")
    assert resp.status_code == 200 and 'data-testid="no-results"' not in resp.get_data(as_text=True)
    assert 'name="q"' in resp.get_data(as_text=True)


def test_what_is_searched_for_is_escaped_everywhere(client):
    resp = client.get("/help/search", query_string={"q": '<script>alert("x")</script> idle'})
    body = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert "<script>alert" not in body and "&lt;script&gt;" in body
    assert articles.highlight('a <b>fee</b> & "x"', ["fee"]) == 'a &lt;b&gt;<mark>fee</mark>&lt;/b&gt; &amp; &#34;x&#34;'
    snippet = articles.snippet("Tom & <Jerry> pay the idle fee here", ["idle"])
    assert str(snippet) == "Tom &amp; &lt;Jerry&gt; pay the <mark>idle</mark> fee here"


def test_an_unknown_article_is_a_404_that_offers_the_search(client):
    resp = page(client, "/help/card-declined", "en")
    assert resp.status_code == 404
    body = resp.get_data(as_text=True)
    assert 'action="/help/search"' in body and 'value="card declined"' in body
    assert 'href="/help/card-problems"' in body  # the search's best guess
    weird = client.get("/help/<b>hi</b>")
    assert weird.status_code == 404 and "<b>hi</b>" not in weird.get_data(as_text=True)
    zh = page(client, "/help/nope", "zh")
    assert zh.status_code == 404 and '<html lang="zh-Hans">' in zh.get_data(as_text=True)


# -- help one tap away from the flows ---------------------------------------------------------------


def test_the_navigation_and_the_error_pages_link_to_help(app, client):
    @app.route("/help-test-boom")
    def boom():
        raise RuntimeError("kaput")

    assert "/help" in hrefs(client.get("/"))
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and missing.get_data(as_text=True).count('href="/help"') >= 2  # navigation + the page
    broken = app.test_client().get("/help-test-boom")
    assert broken.status_code == 500 and 'data-help="index"' in broken.get_data(as_text=True)


def test_the_connector_page_explains_the_price_and_the_hold(client, site):
    links = help_links(client.get("/c/A101"))
    assert "/help/holds" in links and "/help/prices-and-idle-fees" in links and "/help/how-scan-to-pay-works" in links


@pytest.mark.parametrize(("connector", "charger_code", "anchor"), [
    ("GroundFailure", None, "GroundFailure"),
    ("NoError", "HighTemperature", "HighTemperature"),  # the charger itself reports the fault
    ("ConnectorLockFailure", None, "ConnectorLockFailure"),
])
def test_a_faulted_connector_links_to_its_error_code(app, client, site, connector, charger_code, anchor):
    set_connector(app, "A101", status="Faulted", error_code=connector)
    if charger_code:
        with app.extensions["db_sessionmaker"].begin() as s:
            s.scalar(select(Charger)).error_code = charger_code
    resp = client.get("/c/A101")
    assert "Out of order" in text(resp)
    assert f"/help/charger-error-codes#{anchor}" in help_links(resp)
    assert f"The charger reports {anchor}." in text(resp)


def test_a_faulted_connector_without_a_known_code_links_to_troubleshooting(app, client, site):
    set_connector(app, "A101", status="Faulted", error_code="VendorSpecific42")
    assert "/help/troubleshooting#out-of-order" in help_links(client.get("/c/A101"))


def test_the_session_pages_help_carries_the_session(app, client, site, make_user):
    make_user("ana@example.com")
    from tests.webapp.test_charging_pages import fund

    with app.extensions["db_sessionmaker"]() as s:
        ana = s.scalar(select(User).where(User.email == "ana@example.com"))
    fund(app, ana)
    sign_in(client, "ana@example.com")
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    live = client.get(f"/s/{session_id}")
    assert f"/contact?session={session_id}" in hrefs(live)
    assert f"/help/troubleshooting?session={session_id}#charging-does-not-start" in help_links(live)

    t0 = dt.datetime(2025, 3, 14, 9, 0, tzinfo=dt.UTC)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.get(ChargingSession, session_id).start_deadline = None
    tx = plug_in_and_charge(app, get_session(app, session_id), t0, [(300, 3000)])
    charger_event(app, service.stop_transaction, transaction_id=tx, meter_stop_wh=D(1000 + 4000), timestamp=t0 + dt.timedelta(seconds=400),
                  reason="EVDisconnected", readings=[], now=t0 + dt.timedelta(seconds=400))
    assert get_session(app, session_id).state == SessionState.COMPLETED
    done = client.get(f"/s/{session_id}")
    links = help_links(done)
    assert f"/help/receipts-and-invoices?session={session_id}" in links and f"/help/refunds?session={session_id}" in links

    with app.extensions["db_sessionmaker"]() as s:
        number = s.scalar(select(Document.number).where(Document.source == f"session:{session_id}"))
    document = client.get(f"/documents/{number}")
    assert document.status_code == 200
    assert f"/help/receipts-and-invoices?document={number}#business-invoice" in help_links(document)
    assert f"/help/refunds?document={number}" in help_links(document)
    assert f"/contact?document={number}" in hrefs(document)


def test_a_declined_card_on_the_session_page_says_what_to_do(app, client, site, make_user):
    make_user("ana@example.com")
    from tests.webapp.test_charging_pages import fund

    with app.extensions["db_sessionmaker"]() as s:
        ana = s.scalar(select(User).where(User.email == "ana@example.com"))
    fund(app, ana)
    sign_in(client, "ana@example.com")
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    with app.extensions["db_sessionmaker"].begin() as s:
        cs = s.get(ChargingSession, session_id)
        cs.state, cs.failure_code, cs.active_connector_id = SessionState.FAILED, "card_declined", None
    resp = client.get(f"/s/{session_id}")
    assert "Card declined — what can I do?" in text(resp)
    assert "/help/card-problems#card-declined" in help_links(resp)
    assert f"/help/card-problems?session={session_id}#card-declined" in help_links(resp)


class TestWithStripe:
    """Pages whose failure comes from the card processor itself (localstripe behind the app)."""

    @pytest.fixture
    def app_config(self, app_config, stripe_config):
        return {**app_config, **stripe_config}

    def test_the_card_declined_message_at_the_charger_links_to_card_problems(self, app, client, site, stripe_config):
        resp = guest_start(client, stripe_config, DECLINED_AT_CHARGE)
        assert resp.status_code == 402
        assert "Card declined — what can I do?" in text(resp)
        assert "/help/card-problems#card-declined" in help_links(resp)


@pytest.fixture
def tenant(app, make_user):
    """Tess, signed in later by the test, tenant of prepaid meter M0001 in a Madrid building with a flat tariff."""
    tess = make_user("tess@example.com")
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Casa Energía", legal_name="Casa Energía S.L.", document_prefix="CE")
        s.add(op)
        s.flush()
        bld = Site(operator_id=op.id, name="Residencia Sol", time_zone="Europe/Madrid", currency="EUR")
        s.add(bld)
        s.flush()
        tariff = MeterTariff(site_id=bld.id, name="Flat")
        s.add(tariff)
        s.flush()
        s.add(MeterTariffVersion(tariff_id=tariff.id, number=1, effective_from=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), currency="EUR",
                                 tariff_json=dumps({"currency": "EUR", "vat": 21, "kind": "flat", "energy_price": D("0.15")}),
                                 created_by="test"))
        t = Tenant(site_id=bld.id, user_id=tess.id, name="Tess", contact_email=tess.email, unit="3B")
        s.add(t)
        s.flush()
        meter = Meter(site_id=bld.id, meter_code="M0001", serial="SN-1", tenant_id=t.id, tariff_id=tariff.id)
        s.add(meter)
        s.flush()
        return {"user_id": tess.id, "tenant_id": t.id, "meter_id": meter.id}


def test_the_meter_and_top_up_pages_link_to_meter_help_with_the_meter(app, client, tenant):
    guest = client.get("/m/M0001")
    assert "/help/prepaid-meters?meter=M0001" in help_links(guest) and "/contact?meter=M0001" in hrefs(guest)
    sign_in(client, "tess@example.com")
    mine = client.get("/m/M0001")
    assert "/help/low-balance-and-disconnection?meter=M0001" in help_links(mine)
    with app.extensions["db_sessionmaker"].begin() as s:
        row = CardPayment(purpose=Purpose.METER_TOP_UP, reference=f"meter:{tenant['meter_id']}", owner=f"user:{tenant['user_id']}",
                          currency="EUR", amount_minor=2000, state=State.FAILED, failure_code="expired_card")
        s.add(row)
        s.flush()
        payment_id = row.id
    failed = client.get(f"/m/M0001/top-ups/{payment_id}")
    assert failed.status_code == 200
    assert "/help/card-problems#expired-card" in help_links(failed)
    assert "/help/card-problems?meter=M0001#expired-card" in help_links(failed)
    history = client.get("/account/meters/M0001")
    assert "/help/prepaid-meters?meter=M0001#history" in help_links(history)


def test_the_bill_pages_link_to_the_bills_article(app, client, tenant):
    with app.extensions["db_sessionmaker"].begin() as s:
        s.get(Tenant, tenant["tenant_id"]).billing = "postpaid"
        bill = Bill(tenant_id=tenant["tenant_id"], period="2026-02", state=BillState.ISSUED, currency="EUR", total_minor=4200,
                    vat_minor=729, lines_json="{}", issued_at=dt.datetime(2026, 3, 2, tzinfo=dt.UTC), due_date=dt.date(2026, 3, 20))
        s.add(bill)
        s.flush()
        row = CardPayment(purpose=Purpose.BILL, reference=f"bill:{bill.id}", owner=f"user:{tenant['user_id']}", currency="EUR",
                          amount_minor=4200, state=State.FAILED, failure_code="payment_intent_authentication_failure")
        s.add(row)
        s.flush()
        bill_id, payment_id = bill.id, row.id
    sign_in(client, "tess@example.com")
    assert "/help/post-paid-bills" in help_links(client.get("/account/bills"))
    assert "/help/post-paid-bills" in help_links(client.get(f"/bills/{bill_id}"))
    failed = client.get(f"/bills/{bill_id}/payments/{payment_id}")
    assert failed.status_code == 200
    assert "/help/card-problems#authentication-required" in help_links(failed)


def test_the_wallet_pages_link_to_card_problems(app, client, make_user):
    user = make_user("ana@example.com")
    sign_in(client, "ana@example.com")
    assert "/help/card-problems" in help_links(client.get("/wallet"))
    assert "/help/card-problems#card-not-saved" in help_links(client.get("/wallet/cards"))
    with app.extensions["db_sessionmaker"].begin() as s:
        row = CardPayment(purpose=Purpose.WALLET_TOP_UP, reference=f"user:{user.id}", owner=f"user:{user.id}", currency="EUR",
                          amount_minor=2000, state=State.FAILED, failure_code="card_declined")
        s.add(row)
        s.flush()
        payment_id = row.id
    failed = client.get(f"/wallet/top-ups/{payment_id}")
    assert "Your card was declined" in text(failed)
    assert "/help/card-problems#card-declined" in help_links(failed)


@pytest.mark.parametrize("lang", list(LANGS))
def test_in_flow_help_is_in_the_pages_language(client, site, lang):
    body = page(client, "/c/A101", lang).get_data(as_text=True)
    assert html.escape(LIB.get("holds", lang).title, quote=False) in body
