"""A tenant scans a meter's QR code and tops the meter up with a card, in real headless Chromium on a 360×740 phone.

The card is typed into localstripe's card element (stripe.js from localstripe,
as in the demo): the number goes to localstripe only, never to Voltpay.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

from playwright.sync_api import Page, expect
from sqlalchemy import select

from payments.tariff_store import dumps
from webapp.db import utcnow
from webapp.meters.models import MeterInterval, MeterTariff, MeterTariffVersion, Tenant
from webapp.models import Meter, Operator, Site

EMAIL = "tess.tenant@example.com"
PASSWORD = "correct horse staple"
CARD = "4242424242424242"
FLAT = {"currency": "EUR", "vat": 21, "kind": "flat", "energy_price": "0.15"}


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{page.url} is {width}px wide: the page scrolls sideways on a 360px phone"


def type_card(page: Page, number: str) -> None:
    """What a person types into the card element (localstripe draws five plain fields)."""
    page.get_by_placeholder("number").fill(number)
    page.get_by_placeholder("exp_month").fill("12")
    page.get_by_placeholder("exp_year").fill("30")
    page.get_by_placeholder("cvc").fill("123")
    page.get_by_placeholder("postal_code").fill("28012")


def a_tenant_with_a_meter(app, make_user) -> None:
    user = make_user(EMAIL, PASSWORD)
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Casa Energía", legal_name="Casa Energía S.L.", document_prefix="CE")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Residencia Sol", address="Calle del Sol 5, Madrid", time_zone="Europe/Madrid")
        s.add(site)
        s.flush()
        tariff = MeterTariff(site_id=site.id, name="Flat")
        s.add(tariff)
        s.flush()
        s.add(MeterTariffVersion(tariff_id=tariff.id, number=1, effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), currency="EUR",
                                 tariff_json=dumps(FLAT), created_by="test"))
        tenant = Tenant(site_id=site.id, user_id=user.id, name="Tess", contact_email=EMAIL, unit="3B")
        s.add(tenant)
        s.flush()
        meter = Meter(site_id=site.id, meter_code="M0001", serial="SN-1", tenant_id=tenant.id, tariff_id=tariff.id)
        s.add(meter)
        s.flush()
        end = utcnow() - dt.timedelta(hours=1)
        for day in range(20):  # what the readings module wrote: a priced interval a day
            stop = end - dt.timedelta(days=day)
            s.add(MeterInterval(meter_id=meter.id, start_at=stop - dt.timedelta(days=1), end_at=stop, kwh=Decimal(3 + day % 5),
                                amount_minor=(3 + day % 5) * 18, currency="EUR"))


def test_tenant_scans_the_meter_qr_and_tops_it_up_with_a_card(page: Page, live_server, make_user, stripe_config, console):
    a_tenant_with_a_meter(live_server.app, make_user)
    requests: list[tuple[str, str, bytes]] = []
    page.on("request", lambda r: requests.append((r.method, r.url, r.post_data_buffer or b"")))

    # The QR code encodes {BASE_URL}/m/M0001: the phone opens it, the tenant signs in from there and comes back.
    page.goto(live_server("/m/M0001"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Residencia Sol")
    expect(page.get_by_test_id("meter-code")).to_have_text("M0001")
    expect(page.get_by_test_id("prices")).to_contain_text("€0.1815/kWh")
    expect(page.get_by_test_id("balance")).to_have_count(0)  # not signed in: no balance
    page.get_by_role("main").get_by_role("link", name="Sign in").click()
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(live_server("/m/M0001"))
    expect(page.get_by_test_id("balance")).to_have_text("€0.00")
    expect(page.get_by_test_id("relay")).to_have_text("Power on")
    expect(page.get_by_placeholder("number")).to_be_visible()
    no_horizontal_scroll(page)

    page.get_by_role("radio", name="€20.00").check()
    expect(page.get_by_role("radio", name="A new card")).to_be_checked()  # no saved card, empty wallet
    type_card(page, CARD)
    page.get_by_role("button", name="Pay").click()

    expect(page).to_have_url(re.compile(r"/m/M0001/top-ups/\d+$"))
    expect(page.get_by_role("status")).to_have_text("€20.00 was added to meter M0001.")
    expect(page.get_by_test_id("balance")).to_have_text("€20.00")
    expect(page.get_by_test_id("receipt")).to_contain_text("CE-")
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-meter-top-up.png", full_page=True)

    page.get_by_role("link", name="Back to the meter").click()
    expect(page.get_by_test_id("balance")).to_have_text("€20.00")
    expect(page.get_by_test_id("days-left")).to_contain_text("days of credit left")
    expect(page.get_by_test_id("usage-chart").locator("rect.bar")).to_have_count(30)
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-meter-page.png", full_page=True)

    ours = [body for _m, url, body in requests if url.startswith(live_server.url + "/")]
    assert ours and not [b for b in ours if CARD.encode() in b]
    posts = [url[len(live_server.url):] for method, url, _b in requests if method == "POST" and url.startswith(live_server.url + "/")]
    assert posts[-3:] == ["/wallet/cards/setup", "/wallet/cards/finish", "/m/M0001/top-ups"]
    with live_server.app.extensions["db_sessionmaker"]() as s:
        assert s.scalar(select(Meter.relay_state).where(Meter.meter_code == "M0001")) == "connected"
    assert console.unexpected() == []
    assert live_server.errors == []
