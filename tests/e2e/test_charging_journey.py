"""A guest charges in real headless Chromium on a 360×740 phone: scan page → card → live page with rising kWh → stop → final page.

Everything is real: the app on a live port (CSRF on), localstripe's stripe.js
and card element, the OCPP gateway in a thread and a simulated charger talking
OCPP 1.6J to it over websockets (tests/charging_helpers.py). The simulated
car draws 11 kW at 100× speed so the kWh visibly rise within seconds.
"""

from __future__ import annotations

import re
import urllib.request
from decimal import Decimal

from playwright.sync_api import Page, expect
from sqlalchemy import select

from payments.cards import CardPayment
from tests.charging_helpers import charging_site, gateway, session_row, simulators, wait_for  # noqa: F401  (fixtures)
from tests.webapp.wallet_helpers import intent
from webapp.charging.models import ChargerConnection, SessionState
from webapp.models import Connector

EMAIL = "guest.e2e@example.com"
CARD = "4242424242424242"


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


def kwh(page: Page) -> Decimal:
    """The energy the live page shows now ("1.23 kWh" → 1.23)."""
    return Decimal(page.get_by_test_id("energy").inner_text().replace("kWh", "").replace(",", "").strip())


def test_a_guest_scans_pays_by_card_watches_the_charge_stops_it_and_sees_the_bill(
    page: Page, live_server, charging_site, simulators, stripe_config, mailbox, console, caplog,  # noqa: F811
):
    app = live_server.app
    sim = simulators.start(charging_site.cp_id, power_kw=11, time_scale=100, meter_interval=0.3, plug_in_delay=0.5, unplug_delay=0.3)
    code = charging_site.connector_codes[1]
    with app.extensions["db_sessionmaker"]() as s:
        wait_for(lambda: s.get(ChargerConnection, charging_site.charger_id, populate_existing=True), what="the charger to connect")
        wait_for(lambda: s.scalar(select(Connector.status).where(Connector.connector_code == code).execution_options(populate_existing=True))
                 == "Available", what="the connector to report Available")
    sent: list[tuple[str, str, bytes]] = []
    page.on("request", lambda r: sent.append((r.method, r.url, r.post_data_buffer or b"")))

    # The page behind the QR code: place, status, price and what is reserved. Someone scanned it a moment
    # ago, so this first-time visitor gets it from the page cache, in front of Flask, with a session of their own.
    app.config["PAGE_CACHE_SECONDS"] = 30
    urllib.request.urlopen(live_server(f"/c/{code}")).read()
    caplog.clear()
    with caplog.at_level("INFO", logger="voltpay.http"):
        page.goto(live_server(f"/c/{code}"))
    app.config["PAGE_CACHE_SECONDS"] = 0  # what follows must see the connector as it is
    assert [r.__dict__.get("cached") for r in caplog.records if r.getMessage() == "request" and r.__dict__.get("path") == f"/c/{code}"] == [True]
    expect(page.get_by_test_id("status")).to_have_text("Available")
    expect(page.locator("main")).to_contain_text("€0.4235 per kWh")
    expect(page.get_by_test_id("hold-explained")).to_contain_text("We reserve up to €")
    expect(page.get_by_placeholder("number")).to_be_visible()  # localstripe's card element is drawn
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-charging-connector.png", full_page=True)

    # A guest: email and card, one tap.
    page.get_by_label("Email for your receipt").fill(EMAIL)
    type_card(page, CARD)
    page.get_by_role("button", name="Start charging").click()
    expect(page).to_have_url(re.compile(r"/s/\d+$"), timeout=15_000)
    session_id = int(page.url.rsplit("/", 1)[1])

    # The car plugs in: the page turns to the live view by itself, and the kWh rise while we watch.
    expect(page.get_by_test_id("session-title")).to_have_text("Charging", timeout=15_000)
    first = kwh(page)
    wait_for(lambda: kwh(page) > first, timeout=15, what="the kWh on the page to rise")
    expect(page.get_by_test_id("cost")).to_have_text(re.compile(r"€\d+\.\d\d"))
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-charging-live.png", full_page=True)

    # Stop from the phone: the charger stops, the car leaves, the session is billed, the page shows the amount.
    page.get_by_role("button", name="Stop charging").click()
    expect(page.get_by_test_id("session-title")).to_have_text("Charging complete", timeout=20_000)
    cs = session_row(app, session_id)
    assert cs.state is SessionState.COMPLETED and cs.captured_minor == cs.final_incl_vat_minor > 0
    paid = f"€{cs.captured_minor // 100}.{cs.captured_minor % 100:02d}"
    expect(page.get_by_test_id("amount-paid")).to_have_text(f"You paid {paid}")
    expect(page.get_by_test_id("total")).to_have_text(paid)
    expect(page.locator("main")).to_contain_text("Visa •••• 4242")
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-charging-final.png", full_page=True)

    # The money: the card hold was captured for exactly the bill, the rest released.
    with app.extensions["db_sessionmaker"]() as s:
        row = s.scalar(select(CardPayment).where(CardPayment.id == cs.card_payment_id))
    captured = intent(stripe_config, row.provider_payment_id)
    assert captured["status"] == "succeeded" and captured["amount"] == cs.hold_minor
    assert row.captured_minor == cs.captured_minor
    # The guest got the link to the session by email.
    assert mailbox.last_link(EMAIL, "/s/").startswith(live_server(f"/s/{session_id}"))
    assert mailbox.last_link(EMAIL, "?t=").startswith(live_server(f"/s/{session_id}?t="))  # the link email, with its token
    # The card number went to localstripe only.
    ours = [body for _, url, body in sent if url.startswith(live_server.url + "/")]
    assert ours and not [b for b in ours if CARD.encode() in b]
    assert sim.errors == []
    assert console.unexpected() == []
    assert live_server.errors == []
