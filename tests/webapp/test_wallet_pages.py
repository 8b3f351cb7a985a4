"""Wallet pages against localstripe through the official SDK: top-ups (card, decline, 3-D Secure,
provider down), amount checks, saved cards, history, and who may see what."""

from __future__ import annotations

import pytest

from payments.cards import State
from payments.money import Money
from payments.providers import make_provider
from tests.conftest import free_port
from tests.stripe_browser import DECLINED_AT_CHARGE, MASTERCARD, THREE_D_SECURE, VISA, pass_3ds
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config and ana are fixtures)
    ana,
    app_config,
    JSON,
    card_payments,
    data_attribute,
    payment_id_of,
    save_card,
    sign_in,
    text,
    top_up,
    top_up_entries,
    wallet_balance,
)



def eur(cents: int) -> Money:
    return Money(cents, "EUR")


# -- top-ups ---------------------------------------------------------------------------------------


def test_top_up_with_a_new_card_is_credited_once_and_shown_everywhere(app, client, ana, stripe_config):
    page = client.get("/wallet")
    assert page.status_code == 200
    assert "Balance €0.00" in text(page) and "From €5.00 to €500.00." in text(page)
    assert data_attribute(page, "stripe-key") == "pk_test_voltpay"
    assert f'src="{stripe_config["STRIPE_JS_URL"]}"' in page.get_data(as_text=True)

    card = save_card(client, stripe_config, VISA)
    payment_id = payment_id_of(top_up(client, card, preset="2000", new_card=True))

    result = client.get(f"/wallet/top-ups/{payment_id}")
    assert result.status_code == 200
    assert "€20.00 was added to your wallet." in text(result)
    assert "Visa •••• 4242" in text(result) and "Wallet balance €20.00" in text(result)
    assert "Balance €20.00" in text(client.get("/wallet"))
    history = text(client.get("/wallet/history"))
    assert "Wallet top-up €20.00" in history and "Balance €20.00" in history

    # Asking the provider again (the "check again" button, a reload) books nothing more.
    assert client.post(f"/wallet/top-ups/{payment_id}/confirm").status_code == 302
    [row] = card_payments(app)
    assert (row.state, row.captured_minor, row.card_last4) == (State.SUCCEEDED, 2000, "4242")
    assert top_up_entries(app) == [f"card_payment:{payment_id}"]
    assert wallet_balance(app, ana.owner) == eur(2000)


def test_saved_default_card_is_preselected_and_pays_a_typed_amount(app, client, ana, stripe_config):
    first = save_card(client, stripe_config, VISA)
    save_card(client, stripe_config, MASTERCARD)
    page = client.get("/wallet")
    assert f'value="{first}" checked' in page.get_data(as_text=True)  # the default card
    assert "Visa •••• 4242 expires 12/2034 Default" in text(page)

    payment_id = payment_id_of(top_up(client, first, preset="other", amount="12.5"))
    assert "€12.50 was added to your wallet." in text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert wallet_balance(app, ana.owner) == eur(1250)


def test_declined_card_books_nothing_and_another_card_can_be_tried(app, client, ana, stripe_config):
    declined = save_card(client, stripe_config, DECLINED_AT_CHARGE)  # localstripe declines it at charge time
    payment_id = payment_id_of(top_up(client, declined, preset="2000"))

    result = client.get(f"/wallet/top-ups/{payment_id}")
    assert "Your card was declined. Try another card, or contact your bank." in text(result)
    assert "Nothing was added to your wallet." in text(result)
    assert f'href="/wallet?retry={payment_id}"' in result.get_data(as_text=True)
    [row] = card_payments(app)
    assert (row.state, row.failure_code) == (State.FAILED, "card_declined")
    assert top_up_entries(app) == [] and wallet_balance(app, ana.owner) == eur(0)

    # "Try another card": the same amount is chosen again, and a good card pays it.
    retry = client.get(f"/wallet?retry={payment_id}")
    assert 'value="2000" checked' in retry.get_data(as_text=True)
    assert 'value="new" data-new-card-choice checked' in retry.get_data(as_text=True)  # not the card that failed
    good = save_card(client, stripe_config, VISA)
    second = payment_id_of(top_up(client, good, preset="2000", new_card=True))
    assert "€20.00 was added to your wallet." in text(client.get(f"/wallet/top-ups/{second}"))
    assert top_up_entries(app) == [f"card_payment:{second}"]
    assert wallet_balance(app, ana.owner) == eur(2000)


def _three_d_secure_top_up(client, stripe_config) -> tuple[int, str, str]:
    card = save_card(client, stripe_config, THREE_D_SECURE)
    payment_id = payment_id_of(top_up(client, card, preset="5000"))
    page = client.get(f"/wallet/top-ups/{payment_id}")
    assert "Your bank asks you to confirm this payment." in text(page)
    client_secret = data_attribute(page, "client-secret")
    assert client_secret and client_secret.startswith("pi_")
    return payment_id, client_secret.split("_secret_")[0], client_secret


def test_3d_secure_passed_in_the_browser_credits_the_wallet(app, client, ana, stripe_config):
    payment_id, provider_id, client_secret = _three_d_secure_top_up(client, stripe_config)
    assert card_payments(app)[0].state == State.REQUIRES_ACTION and top_up_entries(app) == []

    pass_3ds(stripe_config, provider_id, client_secret)  # what stripe.confirmCardPayment does with the bank
    confirm = client.post(f"/wallet/top-ups/{payment_id}/confirm")
    assert confirm.headers["Location"] == f"/wallet/top-ups/{payment_id}"

    assert "€50.00 was added to your wallet." in text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert top_up_entries(app) == [f"card_payment:{payment_id}"] and wallet_balance(app, ana.owner) == eur(5000)


def test_3d_secure_failed_books_nothing_and_says_what_to_do(app, client, ana, stripe_config):
    payment_id, provider_id, client_secret = _three_d_secure_top_up(client, stripe_config)

    pass_3ds(stripe_config, provider_id, client_secret, success=False)
    client.post(f"/wallet/top-ups/{payment_id}/confirm")

    page = text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert "The security check with your bank (3-D Secure) was not completed. Try again, or use another card." in page
    assert "Try another card" in page
    [row] = card_payments(app)
    assert (row.state, row.failure_code) == (State.FAILED, "payment_intent_authentication_failure")
    assert top_up_entries(app) == [] and wallet_balance(app, ana.owner) == eur(0)


class _ChargesGoNowhere:
    """The real provider, except that charges go to a port where nothing listens (a real network failure)."""

    def __init__(self, real, config):
        self._real = real
        self._down = make_provider({**config, "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"})

    def __getattr__(self, name):
        return getattr(self._real, name)

    def charge(self, **kwargs):
        return self._down.charge(**kwargs)


def test_provider_unreachable_leaves_the_top_up_for_reconciliation_and_books_nothing(app, client, ana, stripe_config):
    card = save_card(client, stripe_config, VISA)
    app.extensions["payment_provider"] = _ChargesGoNowhere(app.extensions["payment_provider"], stripe_config)

    payment_id = payment_id_of(top_up(client, card, preset="1000"))

    page = text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert "We could not reach our card processor, so we do not know yet whether your card was charged." in page
    assert "You will never be charged twice for this top-up." in page
    [row] = card_payments(app)
    assert (row.state, row.provider_payment_id) == (State.CREATED, None)  # for the reconciliation job
    assert top_up_entries(app) == [] and wallet_balance(app, ana.owner) == eur(0)


def test_provider_unreachable_before_anything_is_recorded(app, client, ana, stripe_config):
    card = save_card(client, stripe_config, VISA)
    app.extensions["payment_provider"] = make_provider({**stripe_config, "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"})

    response = top_up(client, card, preset="1000")

    assert response.status_code == 503
    assert "We cannot reach our card processor right now, so nothing was charged." in text(response)
    assert card_payments(app) == []


# -- amounts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "message"), [
    ({"preset": "other", "amount": "4.99"}, "Top-ups are between €5.00 and €500.00."),
    ({"preset": "other", "amount": "500.01"}, "Top-ups are between €5.00 and €500.00."),
    ({"preset": "other", "amount": "abc"}, "Enter the amount as a number, for example 12.50."),
    ({"preset": "other", "amount": ""}, "Choose an amount or enter one."),
    ({"preset": "other", "amount": "-20"}, "The amount cannot be negative."),
    ({"preset": "other", "amount": "12.345"}, "Use at most 2 decimals."),
    ({"preset": "1234"}, "Choose one of the amounts shown, or enter another amount."),
    ({"preset": "2000", "currency": "USD"}, "Your wallet is in EUR. Reload the page and top up in EUR."),
    ({"preset": "other", "amount": "20", "currency": "XYZ"}, "This currency is not supported."),
])  # fmt: skip
def test_bad_amounts_are_refused_next_to_the_field(app, client, ana, stripe_config, form, message):
    card = save_card(client, stripe_config, VISA)
    response = client.post("/wallet/top-ups", data={"currency": "EUR", "payment_method": card, **form})

    assert response.status_code == 400
    body = response.get_data(as_text=True)
    assert f'<p class="error" id="amount-error">{message}</p>' in body.replace("&#39;", "'")
    assert f'value="{card}" checked' in body  # the card chosen stays chosen
    assert 'aria-invalid="true"' in body and "amount-error" in body
    assert card_payments(app) == []


def test_amounts_in_spanish_are_parsed_and_shown_the_spanish_way(app, client, ana, stripe_config):
    client.post("/language", data={"locale": "es", "next": "/wallet"})
    card = save_card(client, stripe_config, VISA)
    response = top_up(client, card, preset="other", amount="600", new_card=True)  # a card just typed in
    assert response.status_code == 400
    assert f'value="{card}" checked' in response.get_data(as_text=True)  # now saved: no need to type it again
    page = text(response)  # text() turns the no-break spaces into plain ones
    assert "5,00 €" in page and "500,00 €" in page and "€5.00" not in page

    payment_id = payment_id_of(top_up(client, card, preset="other", amount="12,50"))
    assert "12,50 €" in text(client.get(f"/wallet/top-ups/{payment_id}"))
    assert wallet_balance(app, ana.owner) == eur(1250)


def test_no_card_chosen_or_someone_elses_card_is_refused(app, client, ana, stripe_config, make_user):
    mine = save_card(client, stripe_config, VISA)
    missing = top_up(client, "", new_card=True)
    assert missing.status_code == 400 and "Choose a card, or enter a new one." in text(missing)

    other = app.test_client()
    make_user("bo@example.com")
    sign_in(other, "bo@example.com")
    bos_card = save_card(other, stripe_config, MASTERCARD)
    stolen = top_up(client, bos_card)
    assert stolen.status_code == 400 and "That card is not one of your saved cards." in text(stolen)
    assert card_payments(app) == [] and mine != bos_card


# -- who may see what ------------------------------------------------------------------------------


def test_another_persons_top_up_is_not_found(app, client, ana, stripe_config, make_user):
    payment_id = payment_id_of(top_up(client, save_card(client, stripe_config, VISA)))
    other = app.test_client()
    make_user("bo@example.com")
    sign_in(other, "bo@example.com")

    assert other.get(f"/wallet/top-ups/{payment_id}").status_code == 404
    assert other.post(f"/wallet/top-ups/{payment_id}/confirm").status_code == 404
    assert other.get(f"/wallet?retry={payment_id}").status_code == 404
    assert other.get("/wallet/top-ups/999999").status_code == 404


def test_wallet_pages_need_sign_in(client):
    for path in ("/wallet", "/wallet/cards", "/wallet/history", "/wallet/top-ups/1"):
        response = client.get(path)
        assert response.status_code == 302 and "/auth/sign-in" in response.headers["Location"]


def test_without_a_payment_provider_the_wallet_says_card_payments_are_off(app_config, make_user):
    from tests.conftest import _truncate
    from webapp import create_app

    bare = create_app({**app_config, "STRIPE_SECRET_KEY": None})
    _truncate(bare)
    bare.config["WTF_CSRF_ENABLED"] = False
    make_user("ana@example.com")
    client = bare.test_client()
    sign_in(client, "ana@example.com")

    page = client.get("/wallet")
    assert page.status_code == 200 and "Card payments are not available right now" in text(page)
    assert "js.stripe.com" not in page.get_data(as_text=True)
    assert client.post("/wallet/top-ups", data={"preset": "2000", "payment_method": "pm_x"}).status_code == 503
    assert client.post("/wallet/cards/setup", json={}, headers=JSON).status_code == 503
    assert "Card payments are not available right now" in text(client.get("/wallet/cards"))
    assert client.post("/webhooks/stripe", data=b"{}").status_code == 404
    bare.extensions["db_engine"].dispose()


# -- saved cards -----------------------------------------------------------------------------------


def test_cards_page_adds_makes_default_and_removes_cards(app, client, ana, stripe_config):
    assert "No saved cards yet." in text(client.get("/wallet/cards"))
    visa = save_card(client, stripe_config, VISA)
    mastercard = save_card(client, stripe_config, MASTERCARD)

    page = text(client.get("/wallet/cards"))
    assert "Visa •••• 4242 expires 12/2034 Default Remove" in page  # the first card is the default
    assert "Visa •••• 4444 expires 12/2034 Make default Remove" in page

    response = client.post(f"/wallet/cards/{mastercard}/default", follow_redirects=True)
    assert "Default card changed." in text(response)
    assert "Visa •••• 4444 expires 12/2034 Default Remove" in text(response)

    response = client.post(f"/wallet/cards/{visa}/remove", follow_redirects=True)
    assert "Card removed." in text(response)
    assert "4242" not in text(response) and "4444" in text(response)


def test_someone_elses_card_cannot_be_changed(app, client, ana, stripe_config, make_user):
    visa = save_card(client, stripe_config, VISA)
    other = app.test_client()
    make_user("bo@example.com")
    sign_in(other, "bo@example.com")
    save_card(other, stripe_config, MASTERCARD)

    assert other.post(f"/wallet/cards/{visa}/default").status_code == 404
    assert other.post(f"/wallet/cards/{visa}/remove").status_code == 404
    assert "4242" in text(client.get("/wallet/cards"))


def test_card_setup_finish_refuses_foreign_or_unfinished_setups(app, client, ana, stripe_config, make_user):
    unfinished = client.post("/wallet/cards/setup", json={}, headers=JSON).get_json()["setup_id"]
    response = client.post("/wallet/cards/finish", json={"setup_id": unfinished}, headers=JSON)
    assert response.status_code == 400 and response.mimetype == "application/problem+json"
    assert response.get_json()["detail"] == "Your card could not be saved. Please enter it again."
    assert client.post("/wallet/cards/finish", json={"setup_id": 42}, headers=JSON).status_code == 400

    other = app.test_client()
    make_user("bo@example.com")
    sign_in(other, "bo@example.com")
    other.post("/wallet/cards/setup", json={}, headers=JSON)  # Bo is a customer too
    assert other.post("/wallet/cards/finish", json={"setup_id": unfinished}, headers=JSON).status_code == 400


def test_card_setup_needs_the_csrf_header(app, csrf_client, make_user):
    make_user("ana@example.com")
    token = _hidden_token(csrf_client.get("/auth/sign-in").get_data(as_text=True))
    csrf_client.post("/auth/sign-in", data={"email": "ana@example.com", "password": "correct horse staple", "csrf_token": token})

    wallet_page = csrf_client.get("/wallet")
    token = data_attribute(wallet_page, "csrf")
    refused = csrf_client.post("/wallet/cards/setup", json={}, headers=JSON)
    assert refused.status_code == 400 and refused.get_json()["code"] == "csrf_failed"
    accepted = csrf_client.post("/wallet/cards/setup", json={}, headers={**JSON, "X-CSRFToken": token})
    assert accepted.status_code == 200 and accepted.get_json()["client_secret"].startswith("seti_")


def _hidden_token(page: str) -> str:
    import re

    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)


# -- history ---------------------------------------------------------------------------------------


def test_history_lists_every_movement_newest_first_with_older_pages(app, client, ana, stripe_config, monkeypatch):
    from webapp.wallet import views

    monkeypatch.setattr(views, "HISTORY_PAGE", 2)
    card = save_card(client, stripe_config, VISA)
    for preset in ("1000", "2000", "5000"):
        payment_id_of(top_up(client, card, preset=preset))

    first = client.get("/wallet/history")
    page = text(first)
    assert page.index("Wallet top-up €50.00") < page.index("Wallet top-up €20.00")
    assert "Balance €80.00" in page and "Balance €30.00" in page and "€10.00" not in page
    older = data_href(first, "Older")
    second = text(client.get(older))
    assert "Wallet top-up €10.00" in second and "Balance €10.00" in second and "€50.00" not in second
    assert client.get("/wallet/history?before=abc").status_code == 400


def data_href(response, link_text: str) -> str:
    import re

    match = re.search(rf'<a href="([^"]+)"[^>]*>{link_text}</a>', response.get_data(as_text=True))
    assert match, f"no {link_text!r} link"
    return match.group(1).replace("&amp;", "&")


# -- the browser may load stripe.js and talk to Stripe, nothing else --------------------------------


def test_pages_allow_stripe_js_from_its_configured_origin_only(app, client, ana, stripe_config, app_config):
    from webapp import create_app

    policy = client.get("/wallet").headers["Content-Security-Policy"]
    localstripe = stripe_config["STRIPE_API_BASE"]
    assert f"script-src 'self' {localstripe};" in policy and f"connect-src 'self' {localstripe};" in policy
    assert "'unsafe-inline'" not in policy

    production_like = create_app({**app_config, "STRIPE_JS_URL": "https://js.stripe.com/v3/"})
    policy = production_like.test_client().get("/healthz").headers["Content-Security-Policy"]
    assert "script-src 'self' https://js.stripe.com;" in policy
    assert "connect-src 'self' https://js.stripe.com https://api.stripe.com;" in policy
    assert "frame-src 'self' https://js.stripe.com https://hooks.stripe.com;" in policy
    production_like.extensions["db_engine"].dispose()
