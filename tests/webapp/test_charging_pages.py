"""The driver's charging pages through the test client, with localstripe behind the app.

What the phone sends is what these tests send: the connector page behind the
QR code, the guest card setup (the browser's stripe.js part done by
tests/stripe_browser.py), the start form, the session page and its live
numbers, the stop button, the list of sessions and the guest's "find my
session" form.

The charger's side of these tests is ``ChargerSide``: it stands in for the
gateway process (``webapp.chargers.client.GatewayClient``) and answers each
command as a test tells it (accepted, rejected, not connected, timeout), and
the charger's messages (StartTransaction, MeterValues, StopTransaction) are
applied with the service calls the gateway makes. The same journeys over real
OCPP websockets with simulated chargers are tested elsewhere; here it is the
pages that are under test.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal as D

import pytest
from sqlalchemy import func, select

from payments import wallet
from payments.base import utcnow
from payments.cards import CardPayment
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from payments.providers import make_provider
from payments.tariff_store import add_version, connector_owner
from tests.conftest import free_port
from tests.stripe_browser import DECLINED_AT_CHARGE, THREE_D_SECURE, VISA, confirm_card_setup, pass_3ds
from tests.webapp.wallet_helpers import (  # noqa: F401  (app_config is a fixture)
    JSON,
    app_config,
    data_attribute,
    intent,
    save_card,
    sign_in,
    text,
)
from webapp.charging import jobs, service
from webapp.charging.models import ChargeCommand, ChargerConnection, ChargingSession, CommandStatus, SessionState
from webapp.charging.service import Reading
from webapp.models import Charger, Connector, Operator, Site, User

# 0.35/kWh + 0.50 per session, VAT 21 %: 0.4235/kWh and 0.605 per session to the driver.
TARIFF = {"id": "T-PAGES", "currency": "EUR", "type": "AD_HOC_PAYMENT", "elements": [{"price_components": [
    {"type": "FLAT", "price": D("0.50"), "vat": D("21.0"), "step_size": 1},
    {"type": "ENERGY", "price": D("0.35"), "vat": D("21.0"), "step_size": 1},
]}]}
GUEST = "guest.driver@example.com"


class ChargerSide:
    """The charger's side of the page tests: stands in for the gateway, records each command, answers as told."""

    def __init__(self, answer: CommandStatus = CommandStatus.ACCEPTED):
        self.answer = answer
        self.calls: list[tuple[str, dict]] = []

    def call(self, s, charger, action, payload, *, key, session_id=None, requested_by="system"):
        """``service.Gateway.call``: record the command as the real client does, and answer ``self.answer``."""
        self.calls.append((action, payload))
        s.add(ChargeCommand(charger_id=charger.id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                            idempotency_key=key, requested_by=requested_by, status=self.answer))
        s.commit()
        return service.CommandResult(self.answer, {"status": "Accepted"} if self.answer is CommandStatus.ACCEPTED else None)

    def actions(self) -> list[str]:
        return [action for action, _ in self.calls]


@pytest.fixture
def charger(app):
    """The charger's side, installed as the app's gateway."""
    side = ChargerSide()
    app.extensions["charger_gateway"] = side
    return side


@pytest.fixture
def site(app, charger):
    """A car park in Madrid with one online charger (CP-1) and its two 22 kW Type 2 connectors A101 and A102."""
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Volt Op", legal_name="Volt Op S.L.", vat_id="ESB12345678")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Plaza Mayor car park", address="Calle Mayor 1, Madrid", time_zone="Europe/Madrid",
                    currency="EUR", min_billable_wh=100, min_billable_s=60)
        s.add(site)
        s.flush()
        ch = Charger(site_id=site.id, charge_point_id="CP-1", password_hash="x")
        s.add(ch)
        s.flush()
        for n in (1, 2):
            c = Connector(charger_id=ch.id, number=n, connector_code=f"A10{n}", max_power_kw=22, status="Available")
            s.add(c)
            s.flush()
            add_version(s, connector_owner(c.id), TARIFF, site_currency="EUR", created_by="test")
        s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id="c1"))
    return app


def db(app):
    return app.extensions["db_sessionmaker"]()


def fund(app, user: User, euros: int = 50) -> None:
    """Put ``euros`` into the user's wallet (as a top-up would)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(euros * 100, "EUR"))


def balance(app, owner: str, kind=AccountKind.CUSTOMER_WALLET) -> int:
    with db(app) as s:
        return wallet.wallet_balance(s, owner, "EUR").amount if kind is AccountKind.CUSTOMER_WALLET else wallet.held(s, owner, "EUR").amount


def sessions(app) -> list[ChargingSession]:
    with db(app) as s:
        return list(s.scalars(select(ChargingSession).order_by(ChargingSession.id)))


def get_session(app, session_id: int) -> ChargingSession:
    with db(app) as s:
        return s.get(ChargingSession, session_id)


def payment_of(app, cs: ChargingSession) -> CardPayment:
    with db(app) as s:
        return s.get(CardPayment, cs.card_payment_id)


def session_id_of(response) -> int:
    """The session id in the redirect to its page."""
    assert response.status_code == 302, text(response)[-1500:]
    match = re.fullmatch(r"/s/(\d+)", response.headers["Location"])
    assert match, response.headers["Location"]
    return int(match.group(1))


def set_connector(app, code: str, **fields) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        c = s.scalar(select(Connector).where(Connector.connector_code == code))
        for k, v in fields.items():
            setattr(c, k, v)


def take_offline(app) -> None:
    """The charger's websocket is gone: no gateway holds it."""
    with app.extensions["db_sessionmaker"].begin() as s:
        s.query(ChargerConnection).delete()


def charger_event(app, fn, **kw):
    """A charger message as the gateway applies it: one transaction, then the settlements it asks for."""
    with app.app_context():
        with db(app) as s:
            ch = s.scalar(select(Charger).where(Charger.charge_point_id == "CP-1"))
            ans = fn(s, ch, now=kw.pop("now", utcnow()), **kw)
            s.commit()
        jobs.enqueue_settlements(ans.settle)
        return ans


def plug_in_and_charge(app, cs: ChargingSession, t0: dt.datetime, readings: list[tuple[int, int]], power_w: int = 11000) -> int:
    """The car is plugged in (StartTransaction at ``t0``) and the charger reports (seconds after t0, Wh delivered)."""
    ans = charger_event(app, service.start_transaction, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(1000), timestamp=t0, now=t0)
    assert ans.id_tag_status == "Accepted"
    for sec, wh in readings:
        at = t0 + dt.timedelta(seconds=sec)
        charger_event(app, service.meter_values, connector_number=1, transaction_id=ans.transaction_id,
                      readings=[Reading(at, D(1000 + wh), D(power_w))], now=at)
    return ans.transaction_id


def guest_card_setup(client, stripe_config, number: str = VISA, email: str = GUEST, code: str = "A101") -> str:
    """What charging.js does for a guest's card: a SetupIntent from our page, confirmed by stripe.js; returns its id."""
    setup = client.post(f"/c/{code}/guest-card", json={"email": email}, headers=JSON)
    assert setup.status_code == 200, setup.get_data(as_text=True)
    body = setup.get_json()
    assert body["client_secret"].startswith(body["setup_id"])
    confirm_card_setup(stripe_config, body["setup_id"], number)
    return body["setup_id"]


def guest_start(client, stripe_config, number: str = VISA, code: str = "A101", **form):
    """A guest's whole start: card through the card element, then the start form."""
    setup_id = guest_card_setup(client, stripe_config, number, code=code)
    return client.post(f"/c/{code}/start", data={"payment": "card", "email": GUEST, "setup_id": setup_id, **form})


@pytest.fixture
def ana(app, client, make_user, site):
    """Ana, signed in on ``client``, with €50 in her euro wallet."""
    user = make_user("ana@example.com")
    with db(app) as s:
        user = s.scalar(select(User).where(User.email == "ana@example.com"))
    fund(app, user)
    sign_in(client, "ana@example.com")
    return user


# -- the page behind the QR code -------------------------------------------------------------------


def test_the_connector_page_shows_the_place_the_plug_the_full_price_and_the_hold(app, client, site):
    page = client.get("/c/A101")
    assert page.status_code == 200
    words = text(page)
    assert "Plaza Mayor car park" in words and "Calle Mayor 1, Madrid" in words
    assert "Code A101" in words and "Number 1" in words and "Plug Type 2" in words and "Maximum power 22 kW" in words
    assert "Available" in words and "The connector is free." in words
    # the full price before the start (VAT included), then the hold and what it means
    assert "Energy €0.4235 per kWh" in words and "Session fee €0.605 per session" in words and "Prices include 21% VAT." in words
    [cs_hold] = re.findall(r'data-testid="hold">([^<]+)<', page.get_data(as_text=True))
    with db(app) as s:
        q = service.quote(s, s.scalar(select(Connector).where(Connector.connector_code == "A101")), now=utcnow())
    assert cs_hold == "€26.02" == f"€{q.hold.amount / 100:.2f}"  # 60 kWh × 0.4235 + 0.605
    assert ("We reserve up to €26.02 on your card or wallet when you start. You pay only for what you use; "
            "the rest is released when the session ends.") in words
    assert "Charging stops by itself at 60.00 kWh, after 4 h, or when the cost reaches the reserved amount." in words
    # a guest: email for the receipt and the card element, no account needed; the card fields have no name
    assert 'name="email"' in page.get_data(as_text=True) and "data-card-entry" in page.get_data(as_text=True)
    assert data_attribute(page, "setup-url") == "/c/A101/guest-card"
    assert "Start charging" in words and "Sign in to pay from your wallet or a saved card" in words
    assert '<link rel="stylesheet" href="/static/css/charging.css">' in page.get_data(as_text=True)


def test_the_connector_page_in_spanish_formats_money_for_the_locale(client, site):
    page = client.get("/c/A101", headers={"Accept-Language": "es"})
    assert page.status_code == 200
    assert "26,02 €" in text(page) and "0,4235 €" in text(page)  # text() turns the no-break space into a space


@pytest.mark.parametrize(
    ("setup", "title", "explained"),
    [
        ("in_use", "In use", "Someone is charging here right now."),
        ("charging_status", "In use", "Someone is charging here right now."),
        ("faulted", "Out of order", "This connector reports a fault and cannot be used."),
        ("offline", "Offline", "This charger is not connected to Voltpay right now"),
    ],
)
def test_the_connector_page_says_why_it_cannot_start(app, client, site, make_user, setup, title, explained):
    if setup == "in_use":  # another driver's session holds the connector
        other = make_user("other@example.com")
        with db(app) as s:
            other = s.scalar(select(User).where(User.email == "other@example.com"))
        fund(app, other)
        other_client = app.test_client()
        sign_in(other_client, "other@example.com")
        session_id_of(other_client.post("/c/A101/start", data={"payment": "wallet"}))
    elif setup == "charging_status":
        set_connector(app, "A101", status="Charging")
    elif setup == "faulted":
        set_connector(app, "A101", status="Faulted", error_code="GroundFailure")
    else:
        take_offline(app)
    page = client.get("/c/A101")
    assert page.status_code == 200
    words = text(page)
    assert re.search(rf'data-testid="status">{title}<', page.get_data(as_text=True))
    assert explained in words
    assert "Energy €0.4235 per kWh" in words and "€26.02" in words  # the price is shown all the same
    assert "data-start-form" not in page.get_data(as_text=True)  # but no start form


def test_an_unknown_code_helps_to_type_it_again(client, site):
    page = client.get("/c/ZZ999")
    assert page.status_code == 404
    words = text(page)
    assert "We could not find this charger" in words and "There is no charging point with the code “ZZ999”." in words
    assert 'action="/c"' in page.get_data(as_text=True) and 'value="ZZ999"' in page.get_data(as_text=True)

    typed = client.get("/c?code=+a101+")
    assert typed.status_code == 302 and typed.headers["Location"] == "/c/A101"
    assert client.get(typed.headers["Location"]).status_code == 200
    assert client.get("/c/a101").status_code == 200  # typed in lower case

    form = client.get("/c")
    assert form.status_code == 200 and "Type the charger code" in text(form)
    assert client.get("/c?code=").status_code == 400
    weird = client.get("/c?code=%3Cscript%3E")
    assert weird.status_code == 404 and "<script>" not in weird.get_data(as_text=True)
    assert "Type the charger code" in text(client.get("/"))  # the home page has the box too


# -- starting ------------------------------------------------------------------------------------


def test_a_signed_in_driver_starts_with_the_wallet_and_the_money_is_held(app, client, ana, charger):
    page = client.get("/c/A101")
    assert "Voltpay wallet balance €50.00" in text(page)
    assert 'value="wallet" checked' in page.get_data(as_text=True)

    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    cs = get_session(app, session_id)
    assert cs.state == SessionState.START_REQUESTED and cs.user_id == ana.id
    assert charger.calls == [("RemoteStartTransaction", {"connector_id": 1, "id_tag": cs.id_tag})]
    assert balance(app, ana.owner) == 5000 - cs.hold_minor and balance(app, ana.owner, AccountKind.WALLET_HOLD) == cs.hold_minor == 2602

    page = client.get(f"/s/{session_id}")
    assert page.status_code == 200
    assert "Plug in your car" in text(page) and re.search(r"Time left to plug in: (3:00|2:5\d) \(until \d{1,2}:\d\d", text(page))
    assert 'data-testid="cancel"' in page.get_data(as_text=True)

    # a second tap (or a reload of the form) leads to the same session, never a second one
    assert session_id_of(client.post("/c/A101/start", data={"payment": "wallet"})) == session_id
    assert len(sessions(app)) == 1 and len(charger.calls) == 1


def test_a_signed_in_driver_starts_with_a_saved_card(app, client, ana, charger, stripe_config):
    card = save_card(client, stripe_config, VISA)
    page = client.get("/c/A101")
    assert "Visa •••• 4242" in text(page)
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": card}))
    cs = get_session(app, session_id)
    row = payment_of(app, cs)
    assert cs.state == SessionState.START_REQUESTED and row.card_last4 == "4242"
    held = intent(stripe_config, row.provider_payment_id)
    assert (held["status"], held["amount"], held["capture_method"]) == ("requires_capture", cs.hold_minor, "manual")
    assert balance(app, ana.owner) == 5000  # the wallet is untouched

    # someone else's card id is refused at the field
    refused = client.post("/c/A102/start", data={"payment": "pm_not_mine"})
    assert refused.status_code == 400 and "That card is not one of your saved cards." in text(refused)


def test_a_signed_in_driver_adds_a_new_card_on_the_connector_page(app, client, ana, stripe_config):
    page = client.get("/c/A101")
    assert data_attribute(page, "setup-url") == "/wallet/cards/setup" and data_attribute(page, "finish-url") == "/wallet/cards/finish"
    new_card = save_card(client, stripe_config, VISA)  # what charging.js does with the wallet's setup endpoints
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "new", "new_payment_method_id": new_card}))
    cs = get_session(app, session_id)
    assert cs.state == SessionState.START_REQUESTED and payment_of(app, cs).payment_method_id == new_card
    assert "Visa •••• 4242" in text(client.get("/c/A102"))  # saved for next time


def test_a_wallet_below_the_hold_asks_for_a_cap_or_a_top_up(app, client, make_user, site):
    make_user("low@example.com")
    with db(app) as s:
        low = s.scalar(select(User).where(User.email == "low@example.com"))
    fund(app, low, 10)
    sign_in(client, "low@example.com")
    page = client.get("/c/A101")
    assert "Your balance is below the amount we reserve: set a spending cap of at most €10.00 below, or top up." in text(page)
    refused = client.post("/c/A101/start", data={"payment": "wallet"})
    assert refused.status_code == 400 and "Your wallet balance is too low for the amount we reserve." in text(refused)
    assert sessions(app) == [] and balance(app, low.owner) == 1000
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet", "cap": "10"}))
    assert get_session(app, session_id).hold_minor == 1000 and balance(app, low.owner) == 0


def test_a_guest_starts_with_a_card_gets_the_link_by_email_and_sees_the_session(app, client, site, charger, stripe_config, mailbox):
    response = guest_start(client, stripe_config)
    session_id = session_id_of(response)
    cs = get_session(app, session_id)
    assert cs.state == SessionState.START_REQUESTED and cs.user_id is None and cs.email == GUEST
    row = payment_of(app, cs)
    assert (row.card_brand, row.card_last4) == ("visa", "4242")
    held = intent(stripe_config, row.provider_payment_id)
    assert (held["status"], held["amount"], held["currency"]) == ("requires_capture", cs.hold_minor, "eur")
    assert charger.actions() == ["RemoteStartTransaction"]

    # the same phone sees the session without the link
    assert "Plug in your car" in text(client.get(f"/s/{session_id}"))
    # the emailed link works on another device, and then leaves the address bar
    link = mailbox.last_link(GUEST, "/s/")
    assert link.startswith(f"http://localhost/s/{session_id}?t=")
    other = app.test_client()
    assert other.get(f"/s/{session_id}").status_code == 404
    opened = other.get(link.removeprefix("http://localhost"))
    assert opened.status_code == 302 and opened.headers["Location"] == f"/s/{session_id}"
    assert "Plug in your car" in text(other.get(f"/s/{session_id}"))
    assert other.get(f"/s/{session_id}?t=not-the-token").status_code == 404


def test_a_spending_cap_lowers_the_hold(app, client, ana):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet", "cap": "10"}))
    cs = get_session(app, session_id)
    assert (cs.hold_minor, cs.cap_minor) == (1000, 1000)
    assert balance(app, ana.owner) == 4000
    page = client.get(f"/s/{session_id}")
    assert page.status_code == 200


def test_a_guest_cap_lowers_the_card_hold(app, client, site, stripe_config):
    session_id = session_id_of(guest_start(client, stripe_config, cap="12,50"))
    cs = get_session(app, session_id)
    assert (cs.hold_minor, cs.cap_minor) == (1250, 1250)
    assert intent(stripe_config, payment_of(app, cs).provider_payment_id)["amount"] == 1250


def test_an_energy_limit_lowers_the_hold(app, client, ana):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet", "energy_cap": "20"}))
    cs = get_session(app, session_id)
    assert (cs.hold_minor, cs.max_energy_wh) == (908, 20000)  # 20 kWh × 0.4235 + 0.605 = 9.075 → 9.08
    assert balance(app, ana.owner) == 5000 - 908


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"cap": "ten euros"}, "Enter the spending cap as an amount in EUR, for example 25.00."),
        ({"cap": "-5"}, "The spending cap cannot be negative."),
        ({"cap": "1.234"}, "Use at most 2 decimals."),
        ({"cap": "0.50"}, "This spending cap is too low to charge here. Enter at least €0.77, or leave it empty."),
        ({"energy_cap": "lots"}, "Enter the energy as a number of kWh, for example 20."),
        ({"energy_cap": "0"}, "The energy limit must be more than 0 kWh."),
    ],
)
def test_bad_limits_are_explained_at_their_fields(app, client, ana, form, message):
    response = client.post("/c/A101/start", data={"payment": "wallet", **form})
    assert response.status_code == 400
    assert message in text(response)
    assert 'aria-invalid="true"' in response.get_data(as_text=True)
    assert sessions(app) == [] and balance(app, ana.owner) == 5000


def test_a_guest_needs_an_email_and_a_card(app, client, site, stripe_config):
    no_email = client.post("/c/A101/start", data={"payment": "card", "email": "", "setup_id": ""})
    assert no_email.status_code == 400 and "Enter your email address: we send your receipt" in text(no_email)
    bad_email = client.post("/c/A101/start", data={"payment": "card", "email": "not-an-email", "setup_id": ""})
    assert bad_email.status_code == 400 and "Enter an email address like name@example.com." in text(bad_email)
    assert 'value="not-an-email"' in bad_email.get_data(as_text=True)  # what was typed stays
    no_card = client.post("/c/A101/start", data={"payment": "card", "email": GUEST, "setup_id": ""})
    assert no_card.status_code == 400 and "Enter your card to start." in text(no_card)
    # the card setup endpoint checks the email before anything reaches the card processor
    problem = client.post("/c/A101/guest-card", json={"email": "nope"}, headers=JSON)
    assert problem.status_code == 400 and problem.get_json()["errors"]["email"] == "Enter an email address like name@example.com."
    # a card setup of another browser's guest is not accepted
    setup_id = guest_card_setup(app.test_client(), stripe_config)
    stolen = client.post("/c/A101/start", data={"payment": "card", "email": GUEST, "setup_id": setup_id})
    assert stolen.status_code == 400 and "Enter your card to start." in text(stolen)
    assert sessions(app) == []


def test_a_declined_card_goes_back_to_the_form_with_what_to_do(app, client, site, charger, stripe_config, mailbox):
    response = guest_start(client, stripe_config, DECLINED_AT_CHARGE)
    assert response.status_code == 402
    words = text(response)
    assert "Your card was declined, so charging did not start." in words
    assert "Card declined — what can I do?" in words
    assert "data-start-form" in response.get_data(as_text=True) and 'value="guest.driver@example.com"' in response.get_data(as_text=True)
    [cs] = sessions(app)
    assert (cs.state, cs.failure_code, cs.active_connector_id) == (SessionState.FAILED, "card_declined", None)
    assert charger.calls == [] and mailbox.to(GUEST) == []  # no "you started a session" email for a declined card
    # another card works right away at the same connector
    session_id = session_id_of(guest_start(client, stripe_config, VISA))
    assert get_session(app, session_id).state == SessionState.START_REQUESTED
    assert mailbox.last_link(GUEST, "/s/").startswith(f"http://localhost/s/{session_id}?t=")


def test_3d_secure_runs_on_the_session_page_then_the_charger_starts(app, client, site, charger, stripe_config):
    session_id = session_id_of(guest_start(client, stripe_config, THREE_D_SECURE))
    assert get_session(app, session_id).state == SessionState.PENDING and charger.calls == []
    page = client.get(f"/s/{session_id}")
    assert "Your bank asks you to confirm the amount we reserve." in text(page)
    client_secret = data_attribute(page, "client-secret")
    assert client_secret and client_secret.startswith("pi_")
    pass_3ds(stripe_config, client_secret.split("_secret_")[0], client_secret)  # stripe.confirmCardPayment with the bank
    confirmed = client.post(f"/s/{session_id}/confirm")
    assert confirmed.status_code == 302 and confirmed.headers["Location"] == f"/s/{session_id}"
    assert get_session(app, session_id).state == SessionState.START_REQUESTED
    assert charger.actions() == ["RemoteStartTransaction"]


# -- the charger says no ---------------------------------------------------------------------------


def test_a_start_the_charger_rejects_releases_the_wallet_hold(app, client, ana, charger):
    charger.answer = CommandStatus.REJECTED
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    cs = get_session(app, session_id)
    assert (cs.state, cs.failure_code) == (SessionState.START_FAILED, "charger_rejected")
    assert balance(app, ana.owner) == 5000 and balance(app, ana.owner, AccountKind.WALLET_HOLD) == 0
    page = client.get(f"/s/{session_id}")
    words = text(page)
    assert "Charging did not start" in words and "The charger refused to start. The reserved amount was released: you pay nothing." in words
    assert 'href="/c/A101"' in page.get_data(as_text=True)


def test_a_start_the_charger_rejects_cancels_the_card_hold(app, client, site, charger, stripe_config, mailbox):
    charger.answer = CommandStatus.REJECTED
    session_id = session_id_of(guest_start(client, stripe_config))
    cs = get_session(app, session_id)
    assert cs.state == SessionState.START_FAILED
    assert intent(stripe_config, payment_of(app, cs).provider_payment_id)["status"] == "canceled"
    assert "The charger refused to start." in text(client.get(f"/s/{session_id}"))
    # Nothing started: no "you started a charging session" email (emails go out synchronously in the tests).
    assert [m["Subject"] for m in mailbox.to(GUEST)] == []


def test_an_offline_charger_is_refused_before_anything_is_held(app, client, ana, charger):
    take_offline(app)
    response = client.post("/c/A101/start", data={"payment": "wallet"})
    assert response.status_code == 409
    assert "This charger is offline, so it cannot be started now. Nothing was charged." in text(response)
    assert sessions(app) == [] and balance(app, ana.owner) == 5000 and charger.calls == []


def test_a_charger_the_gateway_cannot_reach_ends_the_session_with_the_hold_released(app, client, ana, charger):
    charger.answer = CommandStatus.NOT_CONNECTED  # it dropped between the page and the tap
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    assert get_session(app, session_id).failure_code == "charger_offline"
    assert balance(app, ana.owner) == 5000 and balance(app, ana.owner, AccountKind.WALLET_HOLD) == 0
    assert "The charger was offline and could not be started." in text(client.get(f"/s/{session_id}"))


def test_a_busy_connector_says_someone_else_started(app, client, ana, make_user, site):
    set_connector(app, "A101", status="Available")
    other = app.test_client()
    make_user("bo@example.com")
    with db(app) as s:
        bo = s.scalar(select(User).where(User.email == "bo@example.com"))
    fund(app, bo)
    sign_in(other, "bo@example.com")
    session_id_of(other.post("/c/A101/start", data={"payment": "wallet"}))
    response = client.post("/c/A101/start", data={"payment": "wallet"})
    assert response.status_code == 409
    assert "Someone else just started charging here." in text(response)
    assert balance(app, ana.owner) == 5000


def test_card_processor_down_gives_a_503_page_with_a_retry(app, client, site, stripe_config):
    setup_id = guest_card_setup(client, stripe_config)
    app.extensions["payment_provider"] = make_provider({**stripe_config, "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"})
    response = client.post("/c/A101/start", data={"payment": "card", "email": GUEST, "setup_id": setup_id})
    assert response.status_code == 503
    assert "We cannot reach our card processor" in text(response) and "Nothing was charged" in text(response)
    assert 'href="/c/A101"' in response.get_data(as_text=True)
    setup = client.post("/c/A101/guest-card", json={"email": GUEST}, headers=JSON)
    assert setup.status_code == 503 and setup.get_json()["code"] == "provider_unavailable"
    assert sessions(app) == []


# -- who sees a session ----------------------------------------------------------------------------


def test_another_persons_session_is_not_found(app, client, ana, make_user, stripe_config):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    make_user("bo@example.com")
    bo = app.test_client()
    sign_in(bo, "bo@example.com")
    for path in (f"/s/{session_id}", f"/s/{session_id}/live.json"):
        assert bo.get(path).status_code == 404
        assert app.test_client().get(path).status_code == 404  # nobody signed in, no link
    assert bo.post(f"/s/{session_id}/stop").status_code == 404
    assert bo.post(f"/s/{session_id}/confirm").status_code == 404
    assert get_session(app, session_id).state == SessionState.START_REQUESTED
    assert client.get("/s/999999").status_code == 404

    # a guest's session: another guest's browser does not see it either
    guest = app.test_client()
    guest_id = session_id_of(guest_start(guest, stripe_config, code="A102"))
    assert guest.get(f"/s/{guest_id}").status_code == 200
    assert app.test_client().get(f"/s/{guest_id}").status_code == 404
    assert client.get(f"/s/{guest_id}").status_code == 404  # a signed-in stranger neither


# -- live, stop, and the end -----------------------------------------------------------------------


def test_live_numbers_while_charging(app, client, ana):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet", "cap": "20"}))
    t0 = utcnow() - dt.timedelta(minutes=10)
    plug_in_and_charge(app, get_session(app, session_id), t0, [(300, 1500), (600, 3000)])

    live = client.get(f"/s/{session_id}/live.json")
    assert live.status_code == 200 and live.headers["Cache-Control"] == "no-store"
    data = live.get_json()
    assert (data["state"], data["energy_kwh"], data["power_kw"]) == ("charging", "3.000", "11.00")
    assert data["cost"] == {"amount": 188, "currency": "EUR"}  # 0.605 + 3 × 0.4235 = 1.8755 → 1.88
    assert data["hold"] == {"amount": 2000, "currency": "EUR"} and data["cap"] == {"amount": 2000, "currency": "EUR"}
    assert data["display"]["energy"] == "3.00 kWh" and data["display"]["power"] == "11.0 kW" and data["display"]["cost"] == "€1.88"
    assert data["duration_s"] >= 600 and re.fullmatch(r"0:1\d:\d\d", data["display"]["duration"])

    page = client.get(f"/s/{session_id}")
    words = text(page)
    assert "Energy 3.00 kWh" in words and "Power 11.0 kW" in words and "Cost so far €1.88" in words
    assert "Reserved: €20.00." in words and "Your spending cap: €20.00." in words
    assert 'data-testid="stop"' in page.get_data(as_text=True) and data_attribute(page, "state") == "charging"
    assert data_attribute(page, "url") == f"/s/{session_id}/live.json"

    es = client.get(f"/s/{session_id}/live.json", headers={"Accept-Language": "es"}).get_json()
    assert es["display"]["energy"] == "3,00 kWh" and es["display"]["cost"] == "1,88\xa0€"


def test_the_stop_button_sends_remote_stop(app, client, ana, charger):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    tx = plug_in_and_charge(app, get_session(app, session_id), utcnow() - dt.timedelta(minutes=5), [(120, 1000)])
    stopped = client.post(f"/s/{session_id}/stop")
    assert stopped.status_code == 302 and stopped.headers["Location"] == f"/s/{session_id}"
    assert charger.calls[-1] == ("RemoteStopTransaction", {"transaction_id": tx})
    cs = get_session(app, session_id)
    assert cs.stop_requested_by == "driver"
    assert "Stopping… the charger has been asked to stop." in text(client.get(f"/s/{session_id}"))


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (CommandStatus.NOT_CONNECTED, "The charger is offline, so we cannot stop it from here. Unplug the cable to stop charging"),
        (CommandStatus.REJECTED, "The charger refused to stop. Unplug the cable to stop charging"),
        (CommandStatus.TIMEOUT, "The charger did not answer. Try again, or unplug the cable to stop charging."),
    ],
)
def test_a_stop_the_charger_does_not_carry_out_says_what_to_do(app, client, ana, charger, answer, message):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    plug_in_and_charge(app, get_session(app, session_id), utcnow() - dt.timedelta(minutes=5), [(120, 1000)])
    charger.answer = answer
    stopped = client.post(f"/s/{session_id}/stop")
    assert stopped.status_code == 302
    assert message in text(client.get(f"/s/{session_id}"))


def test_cancel_before_plugging_in_releases_the_hold(app, client, ana, charger):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    assert client.post(f"/s/{session_id}/stop").status_code == 302
    cs = get_session(app, session_id)
    assert (cs.state, cs.failure_code) == (SessionState.CANCELLED, "cancelled_by_driver")
    assert balance(app, ana.owner) == 5000
    assert "You cancelled this session before charging started." in text(client.get(f"/s/{session_id}"))
    assert charger.actions() == ["RemoteStartTransaction"]  # nothing to stop at the charger yet


def test_the_final_page_shows_the_bill_with_vat_the_hold_and_the_receipt(app, client, ana):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    t0 = dt.datetime(2025, 3, 14, 9, 0, tzinfo=dt.UTC)
    with app.extensions["db_sessionmaker"].begin() as s:  # the charger's clock: a known morning in Madrid
        s.get(ChargingSession, session_id).start_deadline = None
    tx = plug_in_and_charge(app, get_session(app, session_id), t0, [(300, 3000), (600, 6000)])
    charger_event(app, service.stop_transaction, transaction_id=tx, meter_stop_wh=D(1000 + 7000), timestamp=t0 + dt.timedelta(seconds=700),
                  reason="EVDisconnected", readings=[], now=t0 + dt.timedelta(seconds=700))
    cs = get_session(app, session_id)
    # 7 kWh × 0.35 + 0.50 = 2.95 excl. VAT; × 1.21 = 3.5695 → 3.57; VAT 0.62
    assert (cs.state, cs.captured_minor) == (SessionState.COMPLETED, 357)

    page = client.get(f"/s/{session_id}")
    assert page.status_code == 200
    words = text(page)
    assert "Charging complete" in words and "You paid €3.57" in words
    assert "Energy 7.00 kWh" in words and "Duration 0:11:40" in words
    assert "Reserved €26.02" in words and "Released €22.45" in words
    assert "Your receipt" in words and "Energy (7.00 kWh) €2.96" in words and "Session fee €0.61" in words
    assert "Total excl. VAT €2.95" in words and "VAT 21% €0.62" in words and "Total €3.57" in words
    assert "Paid with Voltpay wallet" in words
    assert "Started Mar 14, 2025, 10:00:00" in words and "Ended Mar 14, 2025, 10:11:40" in words  # Madrid time
    assert "Operator Volt Op S.L. · VAT number ESB12345678" in words
    assert "data-live" in page.get_data(as_text=True) and data_attribute(page, "ended") == "true"
    assert balance(app, ana.owner) == 5000 - 357

    printable = client.get(f"/s/{session_id}?print=1")
    assert printable.status_code == 200 and "Charging receipt" in text(printable) and "Total €3.57" in text(printable)
    live = client.get(f"/s/{session_id}/live.json").get_json()
    assert live["state"] == "completed" and live["cost"] == {"amount": 357, "currency": "EUR"}


def test_a_session_under_review_promises_no_more_than_the_hold(app, client, ana):
    session_id = session_id_of(client.post("/c/A101/start", data={"payment": "wallet"}))
    with app.extensions["db_sessionmaker"].begin() as s:
        cs = s.get(ChargingSession, session_id)
        cs.state, cs.failure_code, cs.active_connector_id = SessionState.REVIEW, "meter_backwards", None
    words = text(client.get(f"/s/{session_id}"))
    assert "We are checking this session" in words and "You will never be charged more than the reserved amount of €26.02." in words
    assert f"mention session number {session_id}" in words


# -- finding sessions again ------------------------------------------------------------------------


def test_the_signed_in_driver_lists_their_sessions_newest_first(app, client, ana, charger):
    first = session_id_of(client.post("/c/A101/start", data={"payment": "wallet", "cap": "5"}))
    client.post(f"/s/{first}/stop")
    second = session_id_of(client.post("/c/A102/start", data={"payment": "wallet", "cap": "6"}))
    page = client.get("/sessions")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert body.index(f'href="/s/{second}"') < body.index(f'href="/s/{first}"')
    words = text(page)
    assert "Plaza Mayor car park · A102" in words and "Waiting for your car" in words and "Cancelled" in words
    assert app.test_client().get("/sessions").status_code == 302  # sign in first


def test_a_guest_finds_their_session_again_by_email_date_and_card(app, client, site, stripe_config, mailbox):
    session_id = session_id_of(guest_start(client, stripe_config))
    old_link = mailbox.last_link(GUEST, "/s/")
    mailbox.clear()
    today = utcnow().date().isoformat()
    other = app.test_client()

    miss = other.post("/sessions/find", data={"email": GUEST, "day": today, "last4": "0000"})
    assert miss.status_code == 302 and miss.headers["Location"] == "/sessions/find/sent"
    miss_answer = text(other.get("/sessions/find/sent"))
    assert f"If we found sessions matching these details, we have emailed links to {GUEST}." in miss_answer
    assert mailbox.messages == []

    hit = other.post("/sessions/find", data={"email": GUEST.upper(), "day": today, "last4": "4242"})
    assert hit.status_code == 302 and hit.headers["Location"] == "/sessions/find/sent"
    assert text(other.get("/sessions/find/sent")) == miss_answer  # the same answer either way
    link = mailbox.last_link(GUEST, "/s/")
    assert link != old_link and link.startswith(f"http://localhost/s/{session_id}?t=")
    assert other.get(link.removeprefix("http://localhost")).status_code == 302
    assert other.get(f"/s/{session_id}").status_code == 200
    assert app.test_client().get(old_link.removeprefix("http://localhost")).status_code == 404  # the old link stopped working


def test_the_find_form_shows_errors_at_the_fields(client, site):
    response = client.post("/sessions/find", data={"email": "nope", "day": "yesterday", "last4": "12a"})
    assert response.status_code == 400
    words = text(response)
    assert "Enter an email address like name@example.com." in words and "Enter exactly four digits." in words
    assert "Not a valid date value." in words or "Enter the date you charged" in words
    assert client.get("/sessions/find").status_code == 200


# -- CSRF ------------------------------------------------------------------------------------------


def test_every_form_and_json_post_needs_the_csrf_token(app, csrf_client, site, stripe_config):
    assert csrf_client.post("/c/A101/start", data={"payment": "card", "email": GUEST}).status_code == 400
    assert csrf_client.post("/c/A101/guest-card", json={"email": GUEST}, headers=JSON).status_code == 400
    assert csrf_client.post("/sessions/find", data={"email": GUEST, "day": "2025-01-01", "last4": "4242"}).status_code == 400
    page = csrf_client.get("/c/A101")
    token = data_attribute(page, "csrf")
    setup = csrf_client.post("/c/A101/guest-card", json={"email": GUEST}, headers={**JSON, "X-CSRFToken": token})
    assert setup.status_code == 200
    setup_id = setup.get_json()["setup_id"]
    confirm_card_setup(stripe_config, setup_id, VISA)
    started = csrf_client.post("/c/A101/start", data={"csrf_token": token, "payment": "card", "email": GUEST, "setup_id": setup_id})
    assert session_id_of(started)
    with db(app) as s:
        assert s.scalar(select(func.count()).select_from(ChargingSession)) == 1


def test_anonymous_visitors_share_a_page_for_a_few_seconds_each_with_their_own_csrf_token(app, csrf_client, site, monkeypatch, caplog):
    import webapp.charging.page_cache as page_cache

    clock = [1000.0]
    monkeypatch.setattr(page_cache.time, "monotonic", lambda: clock[0])
    app.config["PAGE_CACHE_SECONDS"] = 2
    first = csrf_client.get("/c/A101")  # rendered, and cached
    other = app.test_client()  # a first-time visitor: answered from the cache, before Flask
    caplog.clear()
    with caplog.at_level("INFO", logger="voltpay.http"):
        second = other.get("/c/A101")
    assert [r.__dict__.get("cached") for r in caplog.records if r.getMessage() == "request"] == [True]
    token = lambda r: re.search(r'name="csrf_token" value="([^"]+)"', r.get_data(as_text=True)).group(1)  # noqa: E731
    assert first.status_code == second.status_code == 200 and token(first) != token(second)
    assert "\x00" not in second.get_data(as_text=True)
    assert first.get_data(as_text=True).replace(token(first), "") == second.get_data(as_text=True).replace(token(second), "")
    # the same headers as Flask's own answer (security headers, no-store, content type), each visitor their own session and request id
    per_visitor = {"Set-Cookie", "X-Request-ID", "Content-Length"}
    assert sorted((k, v) for k, v in first.headers.items() if k not in per_visitor) == \
        sorted((k, v) for k, v in second.headers.items() if k not in per_visitor)
    assert "Content-Security-Policy" in second.headers and second.headers["Cache-Control"] == "no-store"
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert first.headers["Set-Cookie"].split(";", 1)[1] == second.headers["Set-Cookie"].split(";", 1)[1]  # HttpOnly, SameSite, Path
    assert app.test_client().get("/c/A101", headers={"X-Request-ID": "support-case-123"}).headers["X-Request-ID"] == "support-case-123"
    # each visitor's token is their own and works with their session: the guest-card endpoint accepts it (and refuses the other's)
    ok = other.post("/c/A101/guest-card", json={"email": "x"}, headers={"X-CSRFToken": token(second)})
    bad = other.post("/c/A101/guest-card", json={"email": "x"}, headers={"X-CSRFToken": token(first)})
    assert ok.status_code == 400 and ok.get_json()["code"] == "invalid_email"  # past the CSRF check, to the email check
    assert bad.status_code == 400 and bad.get_json(silent=True) is None  # refused by the CSRF check itself
    # a change shows within the cache's seconds
    set_connector(app, "A101", status="Faulted", error_code="GroundFailure")
    assert "Out of order" not in text(app.test_client().get("/c/A101"))
    assert "Out of order" not in text(other.get("/c/A101"))  # a returning visitor: through Flask, from the same cache
    clock[0] += 2.5
    assert "Out of order" in text(app.test_client().get("/c/A101"))


def test_the_cached_page_is_per_language_and_never_shown_to_a_signed_in_driver(app, site, make_user, monkeypatch):
    import webapp.charging.page_cache as page_cache

    monkeypatch.setattr(page_cache.time, "monotonic", lambda: 1000.0)
    app.config["PAGE_CACHE_SECONDS"] = 2
    for _ in range(2):  # cached, then from the cache
        english = app.test_client().get("/c/A101", headers={"Accept-Language": "en-GB,en;q=0.9"})
        spanish = app.test_client().get("/c/A101", headers={"Accept-Language": "es-ES,es;q=0.9"})
        assert 'lang="en"' in english.get_data(as_text=True) and 'lang="es"' in spanish.get_data(as_text=True)
    make_user("ana@example.com")
    ana = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    sign_in(ana, "ana@example.com")
    page = text(ana.get("/c/A101"))
    assert "Have an account?" not in page  # her own page, with her wallet and cards, not the guest's
    # a query string or a cookie goes through Flask (and the page is still right)
    assert "Have an account?" in text(app.test_client().get("/c/A101?from=sticker"))
    assert "Have an account?" in text(app.test_client().get("/c/A101", headers={"Cookie": "other=1"}))
