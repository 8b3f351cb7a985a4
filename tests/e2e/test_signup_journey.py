"""One journey in real headless Chromium on a 360×740 phone screen:
sign up → verify by email → sign in → turn on two-factor → sign out → sign in with a code → Español.
"""

from __future__ import annotations

import re
import time

import pyotp
from playwright.sync_api import Page, expect
from sqlalchemy import select

from webapp.models import User

EMAIL = "ana.journey@example.com"
GOOD_PASSWORD = "violet kettle harbour 47"
WEAK_PASSWORD = "password2024"  # a leaked password with digits stuck on


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{page.url} is {width}px wide: the page scrolls sideways on a 360px phone"


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=f"/tmp/e2e-{name}.png", full_page=True)


def test_sign_up_verify_two_factor_and_spanish_on_a_phone(page: Page, live_server, mailbox, console):
    # Start page → sign-up.
    page.goto(live_server("/"))
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.get_by_role("link", name="Create an account").click()
    expect(page).to_have_url(live_server("/auth/sign-up"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Create an account")
    no_horizontal_scroll(page)

    # "Show password" reveals the password and says so.
    password = page.get_by_label("Password", exact=True)
    reveal = page.locator("button[data-reveal=password]")
    expect(reveal).to_have_accessible_name("Show password")
    expect(reveal).to_have_attribute("aria-controls", "password")
    password.fill(WEAK_PASSWORD)
    reveal.click()
    expect(password).to_have_attribute("type", "text")
    expect(reveal).to_have_text("Hide password")
    reveal.click()
    expect(password).to_have_attribute("type", "password")
    expect(reveal).to_have_text("Show password")

    # A weak password first: the error is shown next to the field and tied to it.
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("alert")).to_contain_text("Please check the form")
    expect(page.get_by_role("alert")).to_be_focused()
    password = page.get_by_label("Password", exact=True)
    expect(password).to_have_attribute("aria-invalid", "true")
    error = page.locator("#password-error")
    expect(error).to_contain_text("leaked passwords")
    expect(error).to_be_visible()
    described_by = (password.get_attribute("aria-describedby") or "").split()
    assert "password-error" in described_by and "password-help" in described_by
    expect(password).to_have_accessible_description(re.compile("leaked passwords"))
    # "next to the field": the error sits in the same .field block, under the input.
    expect(page.locator(".field.has-error").filter(has=page.locator("#password")).locator("#password-error")).to_have_count(1)
    assert error.bounding_box()["y"] > password.bounding_box()["y"]
    expect(page.get_by_label("Email")).to_have_value(EMAIL)  # kept, so only the password is retyped
    no_horizontal_scroll(page)
    screenshot(page, "sign-up")

    # Then a good one.
    password.fill(GOOD_PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(live_server("/auth/check-email"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your email")
    expect(page.locator("main")).to_contain_text(EMAIL)

    # The verification email, from the real SMTP server, opened in the browser.
    link = mailbox.last_link(EMAIL, "/auth/verify/")
    assert link.startswith(live_server.url + "/auth/verify/")
    page.goto(link)
    expect(page).to_have_url(re.compile(r"/auth/sign-in"))
    expect(page.get_by_role("status")).to_contain_text("Your email address is confirmed")

    # Sign in.
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password", exact=True).fill(GOOD_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("main")).to_contain_text(f"Signed in as {EMAIL}")

    # Account page → turn on two-factor sign-in.
    page.get_by_role("navigation", name="Account").get_by_role("link", name="Account").click()
    expect(page).to_have_url(live_server("/account/"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Your account")
    no_horizontal_scroll(page)
    screenshot(page, "account")

    page.get_by_role("link", name="Turn on two-factor sign-in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Turn on two-factor sign-in")
    expect(page.get_by_role("img", name="QR code for your authenticator app")).to_be_visible()
    secret = page.get_by_test_id("totp-secret").inner_text().strip()
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret), secret
    no_horizontal_scroll(page)
    screenshot(page, "two-factor-setup")
    setup_at = time.time()
    page.get_by_label("6-digit code from the app").fill(pyotp.TOTP(secret).at(setup_at))
    page.get_by_role("button", name="Turn on", exact=True).click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Your recovery codes")
    expect(page.get_by_text("Two-factor sign-in is on.")).to_be_visible()
    codes = page.get_by_test_id("recovery-codes").locator("code")
    expect(codes).to_have_count(10)
    assert all(re.fullmatch(r"[a-z2-9]{5}-[a-z2-9]{5}", c) for c in codes.all_inner_texts())
    no_horizontal_scroll(page)
    screenshot(page, "recovery-codes")
    page.get_by_role("link", name="I have saved my codes").click()
    expect(page.locator("main")).to_contain_text("On. Signing in asks for a code")

    # Sign out, then sign in again with the password and a code.
    page.get_by_role("banner").get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("You are signed out.")
    page.get_by_role("navigation", name="Account").get_by_role("link", name="Sign in").click()
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password", exact=True).fill(GOOD_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Enter your code")
    # The setup used the code of the current 30 s step and a used step cannot be replayed;
    # the next step's code is one the server accepts (±1 step for clock drift) and has not seen.
    page.get_by_label("Code from your authenticator app, or a recovery code").fill(pyotp.TOTP(secret).at(setup_at + 30))
    page.get_by_role("button", name="Continue").click()
    expect(page.locator("main")).to_contain_text(f"Signed in as {EMAIL}")
    page.get_by_role("navigation", name="Account").get_by_role("link", name="Account").click()
    expect(page).to_have_url(live_server("/account/"))

    # Español from the footer picker (it submits on change); saved on the account.
    picker = page.locator("footer").get_by_label("Language")
    picker.select_option("es")
    expect(page.locator("html")).to_have_attribute("lang", "es")
    expect(page).to_have_url(live_server("/account/"))
    picker = page.locator("#lang-select")
    expect(picker).to_have_value("es")
    expect(picker.locator("option[value=es]")).to_have_js_property("selected", True)
    expect(picker.locator("option:checked")).to_have_text("Español")
    no_horizontal_scroll(page)
    screenshot(page, "account-es")

    with live_server.app.extensions["db_sessionmaker"]() as s:
        user = s.scalar(select(User).where(User.email == EMAIL))
        assert user.locale == "es"
        assert user.two_factor_enabled and user.email_verified_at is not None

    # The refused sign-up answers 400 (Chromium logs any 4xx page load); nothing else may show up.
    assert console.unexpected(("Failed to load resource: the server responded with a status of 400", live_server("/auth/sign-up"))) == []
    assert live_server.errors == []

