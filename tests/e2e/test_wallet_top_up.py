"""Wallet top-up in real headless Chromium on a 360×740 phone, card typed into localstripe's card element
(stripe.js from localstripe, as in the demo): the card number goes to localstripe only, never to Voltpay."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

EMAIL = "ana.wallet@example.com"
PASSWORD = "correct horse staple"
CARD = "4242424242424242"
THREE_D_SECURE = "4000002500003155"


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{page.url} is {width}px wide: the page scrolls sideways on a 360px phone"


def sign_in(page: Page, live_server) -> None:
    page.goto(live_server("/auth/sign-in"))
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("main")).to_contain_text(f"Signed in as {EMAIL}")


def type_card(page: Page, number: str) -> None:
    """What a person types into the card element (localstripe draws five plain fields)."""
    page.get_by_placeholder("number").fill(number)
    page.get_by_placeholder("exp_month").fill("12")
    page.get_by_placeholder("exp_year").fill("30")
    page.get_by_placeholder("cvc").fill("123")
    page.get_by_placeholder("postal_code").fill("28012")


class RequestLog:
    """Every request the page makes, with its body."""

    def __init__(self, page: Page) -> None:
        self.items: list[tuple[str, str, bytes]] = []
        page.on("request", lambda r: self.items.append((r.method, r.url, r.post_data_buffer or b"")))

    def bodies_to(self, origin: str) -> list[bytes]:
        return [body for _, url, body in self.items if url.startswith(origin + "/")]

    def posts_to(self, origin: str) -> list[str]:
        return [url[len(origin):] for method, url, _ in self.items if method == "POST" and url.startswith(origin + "/")]


def test_top_up_twenty_euros_with_a_new_card_on_a_phone(page: Page, live_server, make_user, stripe_config, console):
    make_user(EMAIL, PASSWORD)
    requests = RequestLog(page)
    sign_in(page, live_server)

    page.get_by_role("navigation", name="Account").get_by_role("link", name="Wallet").click()
    expect(page).to_have_url(live_server("/wallet"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Wallet")
    expect(page.get_by_test_id("balance")).to_have_text("€0.00")
    expect(page.get_by_placeholder("number")).to_be_visible()  # localstripe's card element is drawn
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-wallet.png", full_page=True)

    page.get_by_role("radio", name="€20.00").check()
    expect(page.get_by_role("radio", name="A new card")).to_be_checked()  # no saved card yet
    type_card(page, CARD)
    page.get_by_role("button", name="Pay").click()

    expect(page).to_have_url(re.compile(r"/wallet/top-ups/\d+$"))
    expect(page.get_by_role("status")).to_have_text("€20.00 was added to your wallet.")
    expect(page.get_by_test_id("balance")).to_have_text("€20.00")
    no_horizontal_scroll(page)
    page.screenshot(path="/tmp/e2e-top-up-result.png", full_page=True)

    page.get_by_role("link", name="Back to your wallet").click()
    expect(page.get_by_test_id("balance")).to_have_text("€20.00")
    expect(page.get_by_role("radio", name=re.compile("Visa •••• 4242"))).to_be_checked()  # saved, and the default now

    # The card number went to localstripe only: no request to Voltpay carried it.
    ours = requests.bodies_to(live_server.url)
    assert ours and not [b for b in ours if CARD.encode() in b]
    assert any(CARD.encode() in b for b in requests.bodies_to(stripe_config["STRIPE_API_BASE"]))
    assert requests.posts_to(live_server.url)[-3:] == ["/wallet/cards/setup", "/wallet/cards/finish", "/wallet/top-ups"]
    assert console.unexpected() == []
    assert live_server.errors == []


def test_3d_secure_card_is_confirmed_with_the_bank_in_the_page(page: Page, live_server, make_user, console):
    make_user(EMAIL, PASSWORD)
    sign_in(page, live_server)
    page.goto(live_server("/wallet"))

    page.get_by_role("radio", name="Other", exact=True).check()
    page.get_by_label("Other amount (EUR)").fill("12.50")
    type_card(page, THREE_D_SECURE)
    page.get_by_role("button", name="Pay").click()
    # Saving the card asks the bank first (localstripe's 3-D Secure dialog) …
    page.get_by_role("button", name="Complete authentication").click()
    # … and so does the payment, on the result page.
    expect(page).to_have_url(re.compile(r"/wallet/top-ups/\d+$"))
    page.get_by_role("button", name="Complete authentication").click()

    expect(page.get_by_role("status")).to_have_text("€12.50 was added to your wallet.")
    expect(page.get_by_test_id("balance")).to_have_text("€12.50")
    no_horizontal_scroll(page)
    assert console.unexpected() == []
    assert live_server.errors == []
