"""An operator sets up a site in real headless Chromium on a phone: site → charger (its one-time password) → tariff
(previewed, then saved) → the printable QR sheet → the charger, simulated over real OCPP, comes online on its page.

Everything is real: the app on a live port with CSRF on, the OCPP gateway in a
thread and a simulated charger (tests/charging_helpers.py) that connects with
the charge point id and the password the page showed.
"""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect
from sqlalchemy import select

from tests.charging_helpers import gateway, simulators, wait_for  # noqa: F401  (fixtures)
from webapp.models import Charger, Operator, Role

EMAIL = "ops@alpha.example"
PASSWORD = "correct horse staple"
CP_ID = "ALPHA-E2E-1"


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{page.url} is {width}px wide: the page scrolls sideways on a 360px phone"


def test_an_operator_sets_up_a_site_charger_and_tariff_prints_the_qr_sheet_and_sees_the_charger_come_online(
    page: Page, live_server, make_user, simulators, console,  # noqa: F811
):
    app = live_server.app
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Alpha Charging", legal_name="Alpha Charging S.L.")
        s.add(op)
        s.flush()
        operator_id = op.id
    make_user(EMAIL, PASSWORD, role=Role.OPERATOR_STAFF, operator_id=operator_id)

    # Sign in and open the console.
    page.goto(live_server("/auth/sign-in?next=/operator/"))
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.goto(live_server("/operator/"))
    expect(page.get_by_role("heading", name="Operator console")).to_be_visible()
    no_horizontal_scroll(page)

    # A site.
    page.get_by_role("navigation", name="Operator console").get_by_role("link", name="Sites and chargers").click()
    page.get_by_role("link", name="Add a site").click()
    page.get_by_label("Name", exact=True).fill("Garage Norte")
    page.get_by_label("Address").fill("Calle Norte 1, 28001 Madrid")
    page.get_by_label("Time zone").fill("Europe/Madrid")
    page.get_by_label("Currency").fill("EUR")
    page.get_by_role("button", name="Create the site").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Garage Norte")
    expect(page.locator("main")).to_contain_text("Site Garage Norte created")
    site_url = page.url

    # A charger: its password is on this page only.
    page.get_by_role("link", name="Add a charger").click()
    page.get_by_label("OCPP charge point id").fill(CP_ID)
    page.get_by_label("Number of connectors").fill("2")
    page.get_by_role("button", name="Add the charger").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Charger {CP_ID}")
    password = page.get_by_test_id("charger-password").inner_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9]{24}", password)
    expect(page.get_by_test_id("charger-online")).to_have_text("Offline")
    codes = [c.strip() for c in page.get_by_test_id("connector-code").all_inner_texts()]
    assert len(codes) == 2 and len(set(codes)) == 2
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-operator-charger-created.png", full_page=True)
    page.get_by_role("link", name="I have copied it").click()  # shown once: the charger's own page does not show it
    expect(page).to_have_url(re.compile(r"/operator/chargers/\d+$"))
    charger_url = page.url
    expect(page.get_by_test_id("charger-secret")).to_have_count(0)
    assert password not in page.content()

    # A tariff: previewed on an example session, then saved for both connectors.
    page.goto(site_url)
    page.get_by_role("link", name="Tariff", exact=True).click()
    page.get_by_label("Energy, per kWh (excl. VAT)").fill("0.30")
    page.get_by_label("Session fee (excl. VAT)").fill("1.00")
    page.get_by_label("VAT rate (%)").fill("21")
    page.get_by_label("Example: energy (kWh)").fill("20")
    page.get_by_label("Example: charging time (minutes)").fill("60")
    page.get_by_role("button", name="Preview").click()
    expect(page.get_by_test_id("preview-total")).to_have_text("€8.47")  # (20 × 0.30 + 1.00) × 1.21
    expect(page.get_by_test_id("tariff-version")).to_have_count(0)  # nothing saved by a preview
    page.screenshot(path="/tmp/e2e-operator-tariff-preview.png", full_page=True)
    page.get_by_role("button", name="Save the tariff").click()
    expect(page.locator("main")).to_contain_text("Tariff saved for 2 connectors")
    expect(page.get_by_test_id("tariff-version")).to_have_count(1)
    expect(page.get_by_test_id("tariff-version")).to_contain_text("€0.363 per kWh")
    no_horizontal_scroll(page)

    # The printable QR sheet: one label per connector, with its code written out.
    page.goto(site_url)
    page.get_by_test_id("qr-sheet-link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("QR codes for Garage Norte")
    labels = page.locator("article.qr-label")
    expect(labels).to_have_count(2)
    assert sorted(labels.evaluate_all("els => els.map(e => e.dataset.connectorCode)")) == sorted(codes)
    expect(labels.first.locator("svg")).to_be_visible()

    # The charger connects with that id and password; its page shows it online (and its connectors' status).
    simulators.start(CP_ID, password)
    page.goto(charger_url)

    def online() -> bool:
        page.reload()
        return page.get_by_test_id("charger-online").inner_text() == "Online"

    wait_for(online, timeout=15, interval=0.3, what="the charger page to show the charger online")
    wait_for(lambda: page.reload() or page.get_by_test_id("connector-status").all_inner_texts() == ["Available", "Available"],
             timeout=15, interval=0.3, what="both connectors to show Available")
    with app.extensions["db_sessionmaker"]() as s:
        charger = s.scalar(select(Charger).where(Charger.charge_point_id == CP_ID))
        assert charger.last_boot_at is not None
    page.screenshot(path="/tmp/e2e-operator-charger-online.png", full_page=True)
    assert console.unexpected() == []
    assert live_server.errors == []
