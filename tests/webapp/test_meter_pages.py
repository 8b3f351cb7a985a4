"""Tenant pages and meter top-ups, through the test client with localstripe behind the app.

The QR page (``/m/<code>``): what the tenant sees and what a stranger does
not, prices now and next of a time-of-use tariff, days of credit left, the
usage chart; top-ups by new card, saved card, wallet and as a guest, each
credited once however often the result is reported; receipts; the account
area; refunds of the unspent balance.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import pytest
from sqlalchemy import select

from payments.cards import CardPayment, CardRefund
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry
from payments.money import Money
from payments.tariff_store import dumps, loads
from tests.stripe_browser import THREE_D_SECURE, VISA, confirm_card_setup, pass_3ds
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config is a fixture)
    JSON,
    app_config,
    data_attribute,
    deliver,
    event,
    intent,
    save_card,
    sign_in,
    text,
)
from webapp.meters import topup
from webapp.meters.models import Billing, MeterInterval, MeterReading, MeterTariff, MeterTariffVersion, Tenant
from webapp.models import Meter, Operator, Site, User

UTC = dt.UTC
MADRID = "Europe/Madrid"
TOU = {
    "currency": "EUR", "vat": 21, "kind": "tou",
    "tou": {"seasons": [{"months": list(range(1, 13)), "windows": [
        {"days": [1, 2, 3, 4, 5], "start": "18:00", "end": "22:00", "band": "peak"},
        {"days": [1, 2, 3, 4, 5, 6, 7], "start": "22:00", "end": "08:00", "band": "valley"},
    ]}], "prices": {"peak": Decimal("0.25"), "flat": Decimal("0.15"), "valley": Decimal("0.08")}},
}
# Wednesday 4 March 2026, 17:30 in Madrid (UTC+1): the standard price until 18:00, then peak until 22:00.
FIXED_NOW = dt.datetime(2026, 3, 4, 16, 30, tzinfo=UTC)


def eur(cents: int) -> Money:
    return Money(cents, "EUR")


@pytest.fixture
def building(app, make_user):
    """A building in Madrid with a TOU tariff, its tenant Tess (signed-in account) and meter M0001, and Olga's meter M0002."""
    tess = make_user("tess@example.com")
    olga = make_user("olga@example.com")
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Casa Energía", legal_name="Casa Energía S.L.", address="Calle Mayor 1, Madrid", vat_id="ESB12345678",
                      document_prefix="CE")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Residencia Sol", address="Calle del Sol 5, Madrid", time_zone=MADRID, currency="EUR")
        s.add(site)
        s.flush()
        tariff = MeterTariff(site_id=site.id, name="Tarifa 2.0TD")
        s.add(tariff)
        s.flush()
        s.add(MeterTariffVersion(tariff_id=tariff.id, number=1, effective_from=dt.datetime(2026, 1, 1, tzinfo=UTC), currency="EUR",
                                 tariff_json=dumps(TOU), created_by="test"))
        t1 = Tenant(site_id=site.id, user_id=tess.id, name="Tess Tenant", contact_email=tess.email, unit="3B")
        t2 = Tenant(site_id=site.id, user_id=olga.id, name="Olga Other", contact_email=olga.email, unit="4A")
        s.add_all([t1, t2])
        s.flush()
        s.add(Meter(site_id=site.id, meter_code="M0001", serial="SN-SECRET-1", tenant_id=t1.id, tariff_id=tariff.id))
        s.add(Meter(site_id=site.id, meter_code="M0002", serial="SN-SECRET-2", tenant_id=t2.id, tariff_id=tariff.id))
    return {"tess": tess, "olga": olga}


def meter(app, code: str = "M0001") -> Meter:
    with app.extensions["db_sessionmaker"]() as s:
        m = s.scalar(select(Meter).where(Meter.meter_code == code))
        s.expunge(m)
        return m


def meter_balance(app, code: str = "M0001") -> Money:
    with app.extensions["db_sessionmaker"]() as s:
        return topup.meter_balance(s, s.scalar(select(Meter).where(Meter.meter_code == code)))


def credits(app) -> list[str]:
    """References of the entries that credited a meter by card (one per credited payment)."""
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(JournalEntry.reference).where(JournalEntry.description == topup.DESCRIPTION_CARD).order_by(JournalEntry.id)))


def card_payments(app) -> list[CardPayment]:
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(CardPayment).order_by(CardPayment.id)))


def documents(app) -> list[Document]:
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(Document).order_by(Document.id)))


def payment_of(response, code: str = "M0001") -> int:
    assert response.status_code == 302, text(response)[-2000:]
    match = re.fullmatch(rf"/m/{code}/top-ups/(\d+)", response.headers["Location"])
    assert match, response.headers["Location"]
    return int(match.group(1))


def pay(client, payment_method: str, *, preset: str = "2000", amount: str = "", code: str = "M0001", new_card: bool = False, **extra):
    data = {"preset": preset, "amount": amount, "currency": "EUR", **extra}
    if new_card:
        data.update(payment_method="new", new_payment_method_id=payment_method)
    else:
        data["payment_method"] = payment_method
    return client.post(f"/m/{code}/top-ups", data=data)


def add_intervals(app, code: str, *, days: int, kwh_per_day: str, cents_per_day: int, end: dt.datetime) -> None:
    """One priced interval per day for ``days`` days up to ``end`` (what the readings module writes)."""
    m = meter(app, code)
    with app.extensions["db_sessionmaker"].begin() as s:
        for i in range(days):
            stop = end - dt.timedelta(days=i)
            s.add(MeterInterval(meter_id=m.id, start_at=stop - dt.timedelta(days=1), end_at=stop, kwh=Decimal(kwh_per_day),
                                amount_minor=cents_per_day, currency="EUR",
                                breakdown_json=dumps({"bands": [{"band": "flat", "kwh": kwh_per_day}]})))
        s.add(MeterReading(meter_id=m.id, at=end, register_kwh=Decimal("1234.5")))


@pytest.fixture
def frozen(monkeypatch):
    """The meter pages' clock at FIXED_NOW."""
    monkeypatch.setattr("webapp.meters.views.utcnow", lambda: FIXED_NOW)
    monkeypatch.setattr("webapp.api.meters.utcnow", lambda: FIXED_NOW)
    return FIXED_NOW


# -- top-ups by card -------------------------------------------------------------------------------


def test_tenant_tops_up_with_a_new_card_once_whatever_reports_it_and_gets_a_receipt(app, client, building, stripe_config):
    sign_in(client, "tess@example.com")
    page = client.get("/m/M0001")
    assert page.status_code == 200
    assert "Balance €0.00" in text(page) and "From €5.00 to €500.00." in text(page)
    assert data_attribute(page, "setup-url") == "/wallet/cards/setup"  # the wallet's card element, saved to Tess

    card = save_card(client, stripe_config, VISA)
    payment_id = payment_of(pay(client, card, new_card=True))
    result = client.get(f"/m/M0001/top-ups/{payment_id}")
    assert "€20.00 was added to meter M0001." in text(result)
    assert "Meter balance €20.00" in text(result)

    # The browser's "check again", a second time, and the webhook: one credit.
    assert client.post(f"/m/M0001/top-ups/{payment_id}/confirm").status_code == 302
    assert client.post(f"/m/M0001/top-ups/{payment_id}/confirm").status_code == 302
    [row] = card_payments(app)
    delivered = deliver(client, stripe_config, event("payment_intent.succeeded", intent(stripe_config, row.provider_payment_id)))
    assert delivered.status_code == 200
    assert credits(app) == [f"card_payment:{payment_id}"]
    assert meter_balance(app) == eur(2000)
    assert (row.purpose.value, row.reference, row.owner) == ("meter_top_up", f"meter:{meter(app).id}", building["tess"].owner)

    [doc] = documents(app)
    content = loads(doc.content)
    with app.extensions["db_sessionmaker"]() as s:
        operator_id = s.scalar(select(Operator.id))
    assert (doc.kind, doc.scope, doc.owner, doc.source) == (DocumentKind.RECEIPT, f"operator:{operator_id}", building["tess"].owner,
                                                             f"card_payment:{payment_id}")
    assert doc.number.startswith("CE-R-2026-") and (doc.total_minor, doc.vat_minor) == (2000, 0)
    assert content["notes"] == ["vat_on_consumption"] and content["meter"]["code"] == "M0001"
    assert content["seller"]["name"] == "Casa Energía"
    assert f'href="/documents/{doc.number}"' in result.get_data(as_text=True)
    assert client.get(f"/documents/{doc.number}").status_code == 200  # the receipt page opens for Tess


def test_saved_card_is_preselected_and_pays_a_typed_amount(app, client, building, stripe_config):
    sign_in(client, "tess@example.com")
    card = save_card(client, stripe_config, VISA)
    assert f'value="{card}" checked' in client.get("/m/M0001").get_data(as_text=True)
    payment_id = payment_of(pay(client, card, preset="other", amount="12,5"))
    assert "€12.50 was added to meter M0001." in text(client.get(f"/m/M0001/top-ups/{payment_id}"))
    assert meter_balance(app) == eur(1250) and credits(app) == [f"card_payment:{payment_id}"]


def test_3d_secure_passed_then_confirmed_credits_once(app, client, building, stripe_config):
    sign_in(client, "tess@example.com")
    payment_id = payment_of(pay(client, save_card(client, stripe_config, THREE_D_SECURE), preset="5000"))
    page = client.get(f"/m/M0001/top-ups/{payment_id}")
    assert "Your bank asks you to confirm this payment." in text(page)
    secret = data_attribute(page, "client-secret")
    assert credits(app) == []
    pass_3ds(stripe_config, secret.split("_secret_")[0], secret)
    client.post(f"/m/M0001/top-ups/{payment_id}/confirm")
    client.post(f"/m/M0001/top-ups/{payment_id}/confirm")
    assert "€50.00 was added to meter M0001." in text(client.get(f"/m/M0001/top-ups/{payment_id}"))
    assert credits(app) == [f"card_payment:{payment_id}"] and meter_balance(app) == eur(5000)


def test_a_guest_pays_someones_meter_in_two_steps_and_sees_no_balance(app, client, building, stripe_config):
    first = client.post("/m/M0001/top-ups", data={"preset": "1000", "currency": "EUR", "email": "mum@example.com"})
    assert first.status_code == 200
    assert "Top up €10.00" in text(first) and data_attribute(first, "setup-url") == "/m/M0001/guest-card/setup"
    setup = client.post("/m/M0001/guest-card/setup", json={}, headers=JSON)
    assert setup.status_code == 200
    confirm_card_setup(stripe_config, setup.get_json()["setup_id"], VISA)
    finish = client.post("/m/M0001/guest-card/finish", json={"setup_id": setup.get_json()["setup_id"]}, headers=JSON)
    pm = finish.get_json()["payment_method_id"]
    payment_id = payment_of(client.post("/m/M0001/top-ups", data={
        "preset": "other", "amount": "10.00", "currency": "EUR", "email": "mum@example.com", "payment_method": "new",
        "new_payment_method_id": pm}))
    result = client.get(f"/m/M0001/top-ups/{payment_id}")
    assert "€10.00 was added to meter M0001." in text(result)
    assert "Meter balance" not in text(result)  # the guest is not the tenant
    [row] = card_payments(app)
    assert (row.owner, row.email) == (f"guest:meter:{meter(app).id}", "mum@example.com")
    [doc] = documents(app)
    assert (doc.owner, doc.email) == (f"guest:meter:{meter(app).id}", "mum@example.com")
    assert meter_balance(app) == eur(1000)
    # Another browser cannot open the guest's result page.
    assert app.test_client().get(f"/m/M0001/top-ups/{payment_id}").status_code == 404


def test_a_guest_must_give_an_email_before_the_card(client, building):
    page = client.post("/m/M0001/top-ups", data={"preset": "1000", "currency": "EUR", "email": "not-an-email"})
    assert page.status_code == 400
    assert 'id="email-error">Enter an email address like name@example.com.' in page.get_data(as_text=True)
    no_customer = client.post("/m/M0001/guest-card/setup", json={}, headers=JSON)
    assert no_customer.status_code == 400 and no_customer.get_json()["code"] == "email_first"


# -- top-ups from the wallet -----------------------------------------------------------------------


def fund_wallet(app, user: User, cents: int) -> None:
    from payments.ledger import get_account, transfer
    from payments import wallet

    with app.extensions["db_sessionmaker"].begin() as s:
        transfer(s, idempotency_key=f"test:fund:{user.id}:{cents}", description="Wallet top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=eur(cents))


def wallet_balance(app, user: User) -> Money:
    from payments import wallet

    with app.extensions["db_sessionmaker"]() as s:
        return wallet.wallet_balance(s, user.owner, "EUR")


def test_wallet_pays_the_meter_once_per_form_and_never_goes_negative(app, client, building):
    fund_wallet(app, building["tess"], 3000)
    sign_in(client, "tess@example.com")
    nonce = re.search(r'name="nonce" value="([^"]+)"', client.get("/m/M0001").get_data(as_text=True)).group(1)

    first = pay(client, "wallet", preset="2000", nonce=nonce)
    assert first.status_code == 302 and first.headers["Location"] == "/m/M0001"
    again = pay(client, "wallet", preset="2000", nonce=nonce)  # a double tap sends the same form twice
    assert again.status_code == 302
    page = text(client.get("/m/M0001"))
    assert "€20.00 was added to meter M0001 from your wallet." in page and "Balance €20.00" in page
    assert meter_balance(app) == eur(2000) and wallet_balance(app, building["tess"]) == eur(1000)
    [doc] = documents(app)
    assert doc.kind == DocumentKind.RECEIPT and doc.total_minor == 2000 and loads(doc.content)["payment"]["method"] == "wallet"

    # €10 left in the wallet: €20 more is refused at the "Pay with" field, and nothing moves.
    short = pay(client, "wallet", preset="2000")
    assert short.status_code == 402
    assert 'id="payment-method-error">Your wallet holds €10.00' in short.get_data(as_text=True)
    assert meter_balance(app) == eur(2000) and wallet_balance(app, building["tess"]) == eur(1000)


# -- who sees what -------------------------------------------------------------------------------------


def test_a_stranger_sees_the_meter_price_and_form_but_no_balance_or_history(app, client, building, frozen):
    add_intervals(app, "M0001", days=14, kwh_per_day="5", cents_per_day=100, end=FIXED_NOW - dt.timedelta(hours=1))
    page = client.get("/m/M0001")
    body = text(page)
    assert page.status_code == 200
    assert "M0001" in body and "Residencia Sol" in body and "3B" in body and "Top up this meter" in body
    assert "Now Standard €0.1815/kWh" in body
    for private in ("Balance", "SN-SECRET-1", "Last reading", "Usage per day", "Power on", "days of credit", "Tess"):
        assert private not in body, private
    assert 'data-testid="usage-chart"' not in page.get_data(as_text=True)

    sign_in(client, "olga@example.com")  # signed in, but not this meter's tenant
    other = text(client.get("/m/M0001"))
    assert "Only the tenant's account sees this meter's balance and usage." in other and "Balance" not in other
    assert client.get("/account/meters/M0001").status_code == 404  # another tenant's history
    assert client.get("/account/meters/NOPE1").status_code == 404
    assert "M0002" in text(client.get("/account/meters")) and "M0001" not in text(client.get("/account/meters"))


def test_unknown_code_is_a_page_to_type_it_again(client, building):
    page = client.get("/m/ZZ999")
    assert page.status_code == 404
    assert "There is no meter with the code “ZZ999”." in text(page) and 'name="code"' in page.get_data(as_text=True)
    assert client.get("/m/bad code!").status_code == 404
    assert client.get("/m?code=m0001").headers["Location"] == "/m/M0001"
    assert client.get("/m/m0001").headers["Location"] == "/m/M0001"
    assert client.get("/m?code=").status_code == 400


@pytest.mark.parametrize(("preset", "amount", "message"), [
    ("other", "2", "Top-ups are between €5.00 and €500.00."),
    ("other", "1000", "Top-ups are between €5.00 and €500.00."),
    ("other", "abc", "Enter the amount as a number, for example 12.50."),
    ("other", "12.345", "Use at most 2 decimals."),
    ("other", "", "Choose an amount or enter one."),
    ("777", "", "Choose one of the amounts shown, or enter another amount."),
])
def test_bad_amounts_are_400_with_the_message_at_the_field(app, client, building, preset, amount, message):
    sign_in(client, "tess@example.com")
    page = pay(client, "wallet", preset=preset, amount=amount)
    assert page.status_code == 400
    assert f'<p class="error" id="amount-error">{message}</p>' in page.get_data(as_text=True)
    assert 'aria-invalid="true"' in page.get_data(as_text=True)
    assert card_payments(app) == [] and meter_balance(app) == eur(0)


# -- what the tenant sees ------------------------------------------------------------------------


def test_price_now_and_next_window_of_a_time_of_use_tariff(client, building, frozen):
    body = text(client.get("/m/M0001"))
    assert re.search(r"Now Standard €0\.1815/kWh until 3/4/26, 6:00\W?PM", body), body
    assert re.search(r"Next Peak €0\.3025/kWh 3/4/26, 6:00\s?PM to 3/4/26, 10:00\s?PM", body), body
    assert "Prices per kWh include 21% VAT. Times are the building's local time (Europe/Madrid)." in body


def test_days_left_chart_and_last_reading_for_the_tenant(app, client, building, frozen):
    # €1.00 a day for the last 14 days (and more before, which the estimate ignores); €20.00 on the meter.
    add_intervals(app, "M0001", days=20, kwh_per_day="4.5", cents_per_day=100, end=FIXED_NOW - dt.timedelta(hours=2))
    fund_wallet(app, building["tess"], 2000)
    sign_in(client, "tess@example.com")
    assert pay(client, "wallet", preset="2000").status_code == 302
    page = client.get("/m/M0001")
    body = text(page)
    assert "About 20 days of credit left" in body
    assert "At your average cost per day over the last 14 days (€1.00 a day)." in body
    assert "Power on" in body and "SN-SECRET-1" in body
    assert re.search(r"Last reading 1,234\.5 kWh · Mar 4, 2026, 3:30:00\W?PM", body)  # 14:30 UTC in Madrid
    html = page.get_data(as_text=True)
    svg = re.search(r"<svg class=\"usage-chart\".*?</svg>", html, re.S).group(0)
    assert len(re.findall(r'<rect class="bar"', svg)) == 30
    assert 'role="img"' in svg and "<title" in svg
    assert html.count("<tr><th scope=\"row\">") == 30  # the table alternative
    assert "4.50 kWh" in body


def test_account_area_lists_meters_history_receipts_and_priced_intervals(app, client, building, stripe_config, frozen):
    add_intervals(app, "M0001", days=2, kwh_per_day="3", cents_per_day=55, end=FIXED_NOW)
    sign_in(client, "tess@example.com")
    card = save_card(client, stripe_config, VISA)
    payment_id = payment_of(pay(client, card, new_card=True))
    overview = text(client.get("/account/meters"))
    assert "Meter M0001" in overview and "€20.00" in overview and "M0002" not in overview
    page = client.get("/account/meters/M0001")
    body = text(page)
    [doc] = documents(app)
    assert "Top-up by card €20.00" in body and f"Receipt {doc.number}" in body
    assert f'href="/documents/{doc.number}"' in page.get_data(as_text=True)
    assert "3.00 kWh" in body and "€0.55" in body and "Standard 3.00 kWh" in body
    assert payment_id


# -- refunds of the unspent balance ------------------------------------------------------------------


def test_refund_of_the_unspent_balance_goes_back_to_the_card(app, client, building, stripe_config):
    sign_in(client, "tess@example.com")
    payment_of(pay(client, save_card(client, stripe_config, VISA), preset="2000"))
    fund_wallet(app, building["tess"], 1000)
    assert pay(client, "wallet", preset="1000").status_code == 302
    assert meter_balance(app) == eur(3000)
    provider = app.extensions["payment_provider"]
    with app.app_context(), app.extensions["db_sessionmaker"]() as s:
        m = s.scalar(select(Meter).where(Meter.meter_code == "M0001"))
        with pytest.raises(topup.MeterTopUpError):
            topup.refund_meter_balance(s, provider, m, eur(3001), "account closed", "close:1")
        s.rollback()
        done = topup.refund_meter_balance(s, provider, m, eur(2500), "account closed", "close:1")
        s.commit()
        assert [r.amount_minor for r in done.refunds] == [2000] and done.not_refunded == eur(500)
        again = topup.refund_meter_balance(s, provider, m, eur(2500), "account closed", "close:1")  # a retry: nothing new
        s.commit()
        assert [r.id for r in again.refunds] == [r.id for r in done.refunds]
    assert meter_balance(app) == eur(1000)
    with app.extensions["db_sessionmaker"]() as s:
        [rf] = s.scalars(select(CardRefund)).all()
        assert rf.status == "succeeded"
        kinds = [d.kind for d in s.scalars(select(Document).order_by(Document.id))]
        assert kinds == [DocumentKind.RECEIPT, DocumentKind.RECEIPT, DocumentKind.CREDIT_NOTE]


def test_a_post_paid_meter_shows_usage_and_takes_no_top_up(app, client, building, frozen):
    with app.extensions["db_sessionmaker"].begin() as s:
        m = s.scalar(select(Meter).where(Meter.meter_code == "M0001"))
        m.prepaid = False
        s.get(Tenant, m.tenant_id).billing = Billing.POSTPAID
    add_intervals(app, "M0001", days=2, kwh_per_day="3", cents_per_day=0, end=FIXED_NOW)
    sign_in(client, "tess@example.com")
    body = text(client.get("/m/M0001"))
    assert "Used this month 6.0 kWh" in body and "No bills to pay." in body
    assert "This meter is post-paid" in body
    assert pay(client, "wallet").status_code == 409
    refused = client.post("/api/v1/meters/M0001/top-ups", json={"amount": {"amount": 1000, "currency": "EUR"}, "payment": {"type": "wallet"}},
                          headers={**bearer(app, building["tess"]), "Idempotency-Key": "pp-1"})
    assert refused.status_code == 409 and refused.get_json()["refusal"] == "postpaid"


# -- the API ---------------------------------------------------------------------------------------


def bearer(app, user: User) -> dict:
    from webapp.auth.tokens import digest, new_secret
    from webapp.db import utcnow
    from webapp.models import ApiToken

    secret = "vp_" + new_secret()
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(ApiToken(user_id=user.id, token_hash=digest(secret), name="t", expires_at=utcnow() + dt.timedelta(days=1)))
    return {"Authorization": f"Bearer {secret}"}


def test_api_meter_status_is_public_without_the_tenants_details(app, client, building, frozen):
    add_intervals(app, "M0001", days=14, kwh_per_day="5", cents_per_day=100, end=FIXED_NOW - dt.timedelta(hours=1))
    public = client.get("/api/v1/meters/M0001")
    assert public.status_code == 200
    body = public.get_json()
    assert body["tenant"] is None and body["unit"] == "3B" and body["building"]["time_zone"] == MADRID
    assert body["price"]["now"] == {"band": "flat", "price_per_kwh": "0.1815", "vat_rate": "21", "currency": "EUR", "from": None,
                                    "until": "2026-03-04T17:00:00+00:00"}
    assert body["price"]["next"]["band"] == "peak" and body["price"]["next"]["price_per_kwh"] == "0.3025"
    assert body["top_up"]["available"] is True and body["top_up"]["minimum"] == {"amount": 500, "currency": "EUR"}
    assert client.get("/api/v1/meters/M0001", headers=bearer(app, building["olga"])).get_json()["tenant"] is None
    mine = client.get("/api/v1/meters/M0001", headers=bearer(app, building["tess"])).get_json()["tenant"]
    assert mine["balance"] == {"amount": 0, "currency": "EUR"} and mine["relay_state"] == "on" and mine["days_left"] == 0
    assert mine["last_reading"]["register_kwh"] == "1234.500" and mine["serial"] == "SN-SECRET-1"
    missing = client.get("/api/v1/meters/NOPE1")
    assert missing.status_code == 404 and missing.get_json()["code"] == "meter_not_found"


def test_api_top_up_needs_an_idempotency_key_and_pays_once(app, client, building, stripe_config):
    fund_wallet(app, building["olga"], 5000)  # Olga pays Tess's meter from her wallet
    auth = bearer(app, building["olga"])
    body = {"amount": {"amount": 1500, "currency": "EUR"}, "payment": {"type": "wallet"}}
    no_key = client.post("/api/v1/meters/M0001/top-ups", json=body, headers=auth)
    assert no_key.status_code == 400 and no_key.get_json()["code"] == "idempotency_key_required"
    first = client.post("/api/v1/meters/M0001/top-ups", json=body, headers={**auth, "Idempotency-Key": "k-1"})
    again = client.post("/api/v1/meters/M0001/top-ups", json=body, headers={**auth, "Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert first.get_json()["source"] == "wallet" and first.get_json()["receipt_number"].startswith("CE-")
    assert meter_balance(app) == eur(1500) and wallet_balance(app, building["olga"]) == eur(3500)
    [doc] = documents(app)
    assert doc.owner == building["olga"].owner  # the payer's receipt: the tenant does not see Olga's details

    too_much = client.post("/api/v1/meters/M0001/top-ups", json={**body, "amount": {"amount": 50000, "currency": "EUR"}},
                           headers={**auth, "Idempotency-Key": "k-2"})
    assert too_much.status_code == 402 and too_much.get_json()["code"] == "wallet_insufficient"
    small = client.post("/api/v1/meters/M0001/top-ups", json={**body, "amount": {"amount": 100, "currency": "EUR"}},
                        headers={**auth, "Idempotency-Key": "k-3"})
    assert small.status_code == 422 and small.get_json()["code"] == "amount_out_of_range"

    # A saved card: Olga saves one through the API, then pays with it.
    setup = client.post("/api/v1/payment-methods/setup", headers=auth).get_json()
    confirm_card_setup(stripe_config, setup["setup_id"], VISA)
    pm = client.post("/api/v1/payment-methods", json={"setup_id": setup["setup_id"]}, headers=auth).get_json()["id"]
    paid = client.post("/api/v1/meters/M0001/top-ups", json={"amount": {"amount": 2000, "currency": "EUR"},
                                                             "payment": {"type": "card", "payment_method_id": pm}},
                       headers={**auth, "Idempotency-Key": "k-4"})
    assert paid.status_code == 201, paid.get_json()
    top_up_id = paid.get_json()["id"]
    assert paid.get_json()["state"] == "succeeded" and paid.get_json()["receipt_number"]
    confirmed = client.post(f"/api/v1/meters/M0001/top-ups/{top_up_id}/confirm", headers=auth)
    assert confirmed.status_code == 200 and confirmed.get_json()["state"] == "succeeded"
    assert credits(app) == [f"card_payment:{top_up_id}"] and meter_balance(app) == eur(3500)
    assert client.get(f"/api/v1/meters/M0001/top-ups/{top_up_id}", headers=bearer(app, building["tess"])).status_code == 404


def test_meter_qr_code_encodes_the_meter_page(client, building):
    svg = client.get("/m/m0001/qr.svg")
    assert svg.status_code == 200 and svg.mimetype == "image/svg+xml"
    assert 'filename="meter-M0001.svg"' in svg.headers["Content-Disposition"]
    assert client.get("/m/M0001/qr.png?size=4").mimetype == "image/png"
    assert client.get("/m/NOPE1/qr.svg").status_code == 404
    from webapp.scan import meter_url

    with client.application.app_context():
        assert meter_url("M0001") == "http://localhost/m/M0001"
