"""The wallet and payment-method JSON API as a client meets it, against localstripe through the official SDK.

What the client does with stripe.js or the mobile SDK (confirm a card setup,
pass 3-D Secure) is done by ``tests/stripe_browser.py``. The test client keeps
CSRF protection on, as in production: bearer tokens alone must do.
"""

from __future__ import annotations

import datetime as dt
import socket

import pytest
from sqlalchemy import func, select

from payments.cards import CardPayment, State
from payments.ledger import JournalEntry
from payments.providers import make_provider
from tests.stripe_browser import DECLINED_AT_CHARGE, MASTERCARD, THREE_D_SECURE, VISA, confirm_card_setup, pass_3ds
from webapp.auth.tokens import digest
from webapp.db import utcnow
from webapp.models import ApiToken, IdempotencyRecord
from tests.webapp.problems import assert_problem




def eur(cents: int) -> dict:
    return {"amount": cents, "currency": "EUR"}


class Client:
    """A signed-in API client: ``get``/``post``/``delete`` with the bearer token, JSON bodies."""

    def __init__(self, app, user, secret: str) -> None:
        self.app = app
        self.user = user
        self.http = app.test_client()
        self.headers = {"Authorization": f"Bearer {secret}"}

    def get(self, path: str, **kw):
        return self.http.get("/api/v1" + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, json=None, **kw):
        return self.http.post("/api/v1" + path, json=json, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw):
        return self.http.delete("/api/v1" + path, headers={**self.headers, **kw.pop("headers", {})}, **kw)


@pytest.fixture
def unpaid():
    """Ask for this to get an app without card payments configured."""


@pytest.fixture(autouse=True)
def paying(request, app_config):
    """Card payments on (localstripe) for every test's app, unless it asks for ``unpaid``."""
    if "unpaid" not in request.fixturenames:
        app_config.update(request.getfixturevalue("stripe_config"))


@pytest.fixture
def signed_in(app, make_user):
    """``signed_in(email)``: a verified account and an API client with a fresh token."""
    counter = iter(range(1, 100))

    def make(email: str = "ana@example.com", **fields) -> Client:
        user = make_user(email=email, **fields)
        secret = f"vp_test-token-{next(counter)}-{user.id}"
        with app.extensions["db_sessionmaker"].begin() as s:
            s.add(ApiToken(user_id=user.id, token_hash=digest(secret), name="tests", expires_at=utcnow() + dt.timedelta(days=1)))
        return Client(app, user, secret)

    return make


@pytest.fixture
def ana(signed_in) -> Client:
    return signed_in("ana@example.com")


@pytest.fixture
def ben(signed_in) -> Client:
    return signed_in("ben@example.com")


@pytest.fixture
def add_card(stripe_config):
    """Save a card through the API: setup → stripe.js confirms → POST the setup id. Returns the card JSON."""

    def add(client: Client, number: str = VISA) -> dict:
        setup = client.post("/payment-methods/setup")
        assert setup.status_code == 201, setup.json
        confirm_card_setup(stripe_config, setup.json["setup_id"], number)
        saved = client.post("/payment-methods", json={"setup_id": setup.json["setup_id"]})
        assert saved.status_code == 201, saved.json
        return saved.json

    return add


def count(app, model) -> int:
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(func.count()).select_from(model))


def card_payments(app) -> list[CardPayment]:
    with app.extensions["db_sessionmaker"]() as s:
        return list(s.scalars(select(CardPayment).order_by(CardPayment.id)))


# --- the wallet ----------------------------------------------------------------------------------


def test_empty_wallet_shows_zero_and_the_top_up_limits(ana):
    resp = ana.get("/wallet")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.json == {
        "balance": eur(0),
        "held": eur(0),
        "currency": "EUR",
        "top_up": {"minimum": eur(500), "maximum": eur(50000), "presets": [eur(1000), eur(2000), eur(5000)]},
    }


def test_a_yen_wallet_has_yen_limits(signed_in):
    taro = signed_in("taro@example.com", currency="JPY")
    body = taro.get("/wallet").json
    assert body["currency"] == "JPY" and body["balance"] == {"amount": 0, "currency": "JPY"}
    assert body["top_up"]["minimum"] == {"amount": 500, "currency": "JPY"}


def test_wallet_endpoints_need_a_token(app):
    http = app.test_client()
    for method, path in (("get", "/wallet"), ("post", "/wallet/top-ups"), ("get", "/wallet/transactions"), ("get", "/payment-methods"),
                         ("post", "/payment-methods/setup"), ("delete", "/payment-methods/pm_123"), ("get", "/wallet/top-ups/1")):
        assert_problem(getattr(http, method)("/api/v1" + path), 401, "unauthenticated")


def test_without_card_payments_configured_the_wallet_shows_but_cannot_be_topped_up(unpaid, signed_in):
    ana = signed_in("ana@example.com")
    assert ana.get("/wallet").status_code == 200
    assert ana.get("/wallet/transactions").json == {"data": [], "next_before": None}
    assert_problem(ana.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": "pm_1"}), 503, "payments_unavailable")
    assert_problem(ana.get("/payment-methods"), 503, "payments_unavailable")
    assert_problem(ana.post("/payment-methods/setup"), 503, "payments_unavailable")


# --- payment methods -----------------------------------------------------------------------------


def test_save_list_default_and_remove_cards(ana, add_card, stripe_config):
    assert ana.get("/payment-methods").json == {"data": []}
    setup = ana.post("/payment-methods/setup")
    assert setup.status_code == 201 and setup.headers["Cache-Control"] == "no-store"
    assert setup.json["setup_id"].startswith("seti_") and setup.json["client_secret"].startswith(setup.json["setup_id"])
    assert setup.json["publishable_key"] == stripe_config["STRIPE_PUBLISHABLE_KEY"]

    visa = add_card(ana, VISA)
    assert {k: visa[k] for k in ("brand", "last4", "exp_month", "exp_year", "is_default")} == {
        "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2034, "is_default": True,
    }
    assert visa["id"].startswith("pm_")
    mastercard = add_card(ana, MASTERCARD)
    assert mastercard["is_default"] is False
    assert [(c["last4"], c["is_default"]) for c in ana.get("/payment-methods").json["data"]] == [("4242", True), ("4444", False)]

    made = ana.post(f"/payment-methods/{mastercard['id']}/default")
    assert made.status_code == 200 and made.json["id"] == mastercard["id"] and made.json["is_default"] is True
    assert [(c["last4"], c["is_default"]) for c in ana.get("/payment-methods").json["data"]] == [("4444", True), ("4242", False)]

    removed = ana.delete(f"/payment-methods/{mastercard['id']}")
    assert removed.status_code == 204 and removed.data == b""
    assert [c["id"] for c in ana.get("/payment-methods").json["data"]] == [visa["id"]]
    assert_problem(ana.delete(f"/payment-methods/{mastercard['id']}"), 404, "not_found")


def test_another_persons_card_is_not_found(ana, ben, add_card):
    anas = add_card(ana, VISA)
    add_card(ben, MASTERCARD)
    assert_problem(ben.delete(f"/payment-methods/{anas['id']}"), 404, "not_found")
    assert_problem(ben.post(f"/payment-methods/{anas['id']}/default"), 404, "not_found")
    assert [c["id"] for c in ana.get("/payment-methods").json["data"]] == [anas["id"]]
    for bad in ("pm_doesnotexist", "not-a-card", "pm_" + "x" * 300):
        assert_problem(ana.delete(f"/payment-methods/{bad}"), 404, "not_found")
        assert_problem(ana.post(f"/payment-methods/{bad}/default"), 404, "not_found")


def test_a_card_setup_must_be_confirmed_and_ones_own(ana, ben, stripe_config):
    assert_problem(ana.post("/payment-methods", json={"setup_id": "seti_unknown"}), 404, "setup_not_found")  # no customer yet
    setup = ana.post("/payment-methods/setup").json
    assert_problem(ana.post("/payment-methods", json={"setup_id": setup["setup_id"]}), 409, "setup_incomplete")
    assert_problem(ana.post("/payment-methods", json={"setup_id": "seti_unknown"}), 404, "setup_not_found")
    confirm_card_setup(stripe_config, setup["setup_id"], VISA)
    ben.post("/payment-methods/setup")
    assert_problem(ben.post("/payment-methods", json={"setup_id": setup["setup_id"]}), 404, "setup_not_found")
    assert ana.post("/payment-methods", json={"setup_id": setup["setup_id"]}).status_code == 201
    assert ben.get("/payment-methods").json == {"data": []}


@pytest.mark.parametrize("body", [{}, {"setup_id": ""}, {"setup_id": 7}, {"setup_id": "pm_123"}, {"setup_id": "seti_\u0000"}, ["seti_1"]])
def test_a_malformed_setup_id_is_refused(ana, body):
    resp = ana.post("/payment-methods", json=body)
    if isinstance(body, list):
        assert_problem(resp, 422, "invalid_json")
    else:
        assert "setup_id" in assert_problem(resp, 422, "invalid_request")["errors"]


# --- top-ups -------------------------------------------------------------------------------------


def test_top_up_credits_the_wallet(app, ana, add_card):
    card = add_card(ana)
    resp = ana.post("/wallet/top-ups", json={"amount": eur(2500), "payment_method_id": card["id"]})

    assert resp.status_code == 201, resp.json
    body = resp.json
    assert set(body) == {"id", "state", "amount", "card", "created_at"}  # no client secret without 3-D Secure
    assert (body["state"], body["amount"], body["card"]) == ("succeeded", eur(2500), {"brand": "visa", "last4": "4242"})
    assert dt.datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert ana.get("/wallet").json["balance"] == eur(2500)
    assert ana.get(f"/wallet/top-ups/{body['id']}").json == body
    [row] = card_payments(app)
    assert (row.owner, row.reference, row.provider_customer_id is not None) == (ana.user.owner, ana.user.owner, True)

    tx = ana.get("/wallet/transactions").json
    assert tx["next_before"] is None
    [entry] = tx["data"]
    assert (entry["description"], entry["amount"], entry["balance_after"]) == ("Wallet top-up", eur(2500), eur(2500))
    assert isinstance(entry["entry_id"], int) and dt.datetime.fromisoformat(entry["created_at"])


def test_transaction_descriptions_are_translated(app, ana, add_card):
    with app.extensions["db_sessionmaker"].begin() as s:
        from webapp.models import User

        s.get(User, ana.user.id).locale = "es"
    card = add_card(ana)
    ana.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": card["id"]})
    [entry] = ana.get("/wallet/transactions", headers={"Accept-Language": "es"}).json["data"]
    assert entry["description"]  # the Spanish catalogue may not have it yet; never empty, never a key


def test_another_persons_top_up_is_not_found(ana, ben, add_card):
    card = add_card(ana)
    top_up = ana.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": card["id"]}).json
    assert_problem(ben.get(f"/wallet/top-ups/{top_up['id']}"), 404, "not_found")
    assert_problem(ben.post(f"/wallet/top-ups/{top_up['id']}/confirm"), 404, "not_found")
    for missing in ("999999", "2147483648", "-1", "abc"):
        assert_problem(ana.get(f"/wallet/top-ups/{missing}"), 404, "not_found")


def test_another_persons_card_cannot_top_up(app, ana, ben, add_card):
    anas = add_card(ana)
    add_card(ben)
    body = assert_problem(ben.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": anas["id"]}), 422, "unknown_payment_method")
    assert "card" in body["detail"]
    assert_problem(ana.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": "pm_unknown"}), 422, "unknown_payment_method")
    assert card_payments(app) == []


def test_top_up_amount_limits_and_currency(app, ana, add_card):
    card = add_card(ana)
    low = assert_problem(ana.post("/wallet/top-ups", json={"amount": eur(499), "payment_method_id": card["id"]}), 422, "amount_out_of_range")
    assert (low["minimum"], low["maximum"]) == (eur(500), eur(50000))
    assert "€5.00" in low["detail"] and "€500.00" in low["detail"]
    for cents in (50001, 0, -100, 10**30):
        assert_problem(ana.post("/wallet/top-ups", json={"amount": eur(cents), "payment_method_id": card["id"]}), 422, "amount_out_of_range")
    wrong = assert_problem(
        ana.post("/wallet/top-ups", json={"amount": {"amount": 1000, "currency": "USD"}, "payment_method_id": card["id"]}), 422, "wrong_currency",
    )
    assert wrong["currency"] == "EUR"
    assert card_payments(app) == []


GOOD_AMOUNT = eur(1000)


@pytest.mark.parametrize(
    ("amount", "pm", "fields"),
    [
        (None, "pm_1", {"amount"}),
        (1000, "pm_1", {"amount"}),
        ("10.00", "pm_1", {"amount"}),
        ({"amount": 10.5, "currency": "EUR"}, "pm_1", {"amount"}),
        ({"amount": 1000.0, "currency": "EUR"}, "pm_1", {"amount"}),  # minor units are integers, never floats
        ({"amount": True, "currency": "EUR"}, "pm_1", {"amount"}),
        ({"amount": "1000", "currency": "EUR"}, "pm_1", {"amount"}),
        ({"amount": 1000}, "pm_1", {"amount"}),
        ({"amount": 1000, "currency": "eur"}, "pm_1", {"amount"}),
        ({"amount": 1000, "currency": "XYZ"}, "pm_1", {"amount"}),
        ({"amount": 1000, "currency": "EUR", "extra": 1}, "pm_1", {"amount"}),
        (GOOD_AMOUNT, None, {"payment_method_id"}),
        (GOOD_AMOUNT, "", {"payment_method_id"}),
        (GOOD_AMOUNT, 42, {"payment_method_id"}),
        (GOOD_AMOUNT, "card_1", {"payment_method_id"}),
        (GOOD_AMOUNT, "pm_\u0000", {"payment_method_id"}),
        (None, None, {"amount", "payment_method_id"}),
    ],
)
def test_malformed_top_up_is_refused_with_errors(app, ana, amount, pm, fields):
    body = {}
    if amount is not None:
        body["amount"] = amount
    if pm is not None:
        body["payment_method_id"] = pm
    problem = assert_problem(ana.post("/wallet/top-ups", json=body), 422, "invalid_request")
    assert set(problem["errors"]) == fields and all(problem["errors"].values())
    assert card_payments(app) == []


def test_top_up_needs_a_json_object(ana):
    assert_problem(ana.post("/wallet/top-ups", data="amount=1000", content_type="application/x-www-form-urlencoded"), 415, "unsupported_media_type")
    assert_problem(ana.post("/wallet/top-ups", json=[1, 2]), 422, "invalid_json")


def test_declined_card_is_402_and_books_nothing(app, ana, add_card):
    card = add_card(ana, DECLINED_AT_CHARGE)
    resp = ana.post("/wallet/top-ups", json={"amount": eur(2000), "payment_method_id": card["id"]})

    body = assert_problem(resp, 402, "card_declined")
    assert body["decline_reason"] == "card_declined"
    assert ana.get(f"/wallet/top-ups/{body['top_up_id']}").json["state"] == "failed"
    assert ana.get(f"/wallet/top-ups/{body['top_up_id']}").json["failure_code"] == "card_declined"
    assert count(app, JournalEntry) == 0 and ana.get("/wallet").json["balance"] == eur(0)


def test_3ds_top_up_is_confirmed_after_the_challenge(app, ana, add_card, stripe_config):
    card = add_card(ana, THREE_D_SECURE)
    resp = ana.post("/wallet/top-ups", json={"amount": eur(3000), "payment_method_id": card["id"]})
    assert resp.status_code == 201
    pending = resp.json
    assert pending["state"] == "requires_action" and pending["client_secret"]
    assert ana.get(f"/wallet/top-ups/{pending['id']}").json["client_secret"] == pending["client_secret"]
    assert ana.get("/wallet").json["balance"] == eur(0)

    [row] = card_payments(app)
    pass_3ds(stripe_config, row.provider_payment_id, pending["client_secret"])
    confirmed = ana.post(f"/wallet/top-ups/{pending['id']}/confirm")

    assert confirmed.status_code == 200 and confirmed.json["state"] == "succeeded"
    assert "client_secret" not in confirmed.json
    assert ana.get("/wallet").json["balance"] == eur(3000)
    assert ana.post(f"/wallet/top-ups/{pending['id']}/confirm").json["state"] == "succeeded"  # again: nothing more
    assert count(app, JournalEntry) == 1 and ana.get("/wallet").json["balance"] == eur(3000)


def test_3ds_failure_fails_the_top_up(app, ana, add_card, stripe_config):
    card = add_card(ana, THREE_D_SECURE)
    pending = ana.post("/wallet/top-ups", json={"amount": eur(3000), "payment_method_id": card["id"]}).json
    confirmed_too_early = ana.post(f"/wallet/top-ups/{pending['id']}/confirm").json
    assert confirmed_too_early["state"] == "requires_action" and confirmed_too_early["client_secret"] == pending["client_secret"]

    [row] = card_payments(app)
    pass_3ds(stripe_config, row.provider_payment_id, pending["client_secret"], success=False)
    failed = ana.post(f"/wallet/top-ups/{pending['id']}/confirm").json

    assert failed["state"] == "failed" and failed["failure_code"] == "payment_intent_authentication_failure"
    assert count(app, JournalEntry) == 0


def test_transactions_are_paged_newest_first(ana, add_card):
    card = add_card(ana)
    for cents in (1000, 2000, 3000):
        assert ana.post("/wallet/top-ups", json={"amount": eur(cents), "payment_method_id": card["id"]}).status_code == 201

    first = ana.get("/wallet/transactions?limit=2").json
    assert [(e["amount"]["amount"], e["balance_after"]["amount"]) for e in first["data"]] == [(3000, 6000), (2000, 3000)]
    assert first["next_before"] == first["data"][-1]["entry_id"]
    second = ana.get(f"/wallet/transactions?limit=2&before={first['next_before']}").json
    assert [(e["amount"]["amount"], e["balance_after"]["amount"]) for e in second["data"]] == [(1000, 1000)]
    assert second["next_before"] is None
    assert len(ana.get("/wallet/transactions?limit=3").json["data"]) == 3
    assert ana.get("/wallet/transactions?limit=3").json["next_before"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit=1.5", "before=0", "before=abc", "before=99999999999"])
def test_bad_transaction_paging_is_refused(ana, query):
    problem = assert_problem(ana.get(f"/wallet/transactions?{query}"), 422, "invalid_request")
    assert set(problem["errors"]) == {query.split("=")[0]}


def test_another_persons_transactions_are_not_shown(ana, ben, add_card):
    card = add_card(ana)
    ana.post("/wallet/top-ups", json={"amount": eur(1000), "payment_method_id": card["id"]})
    assert ben.get("/wallet/transactions").json == {"data": [], "next_before": None}
    assert ben.get("/wallet").json["balance"] == eur(0)


# --- Idempotency-Key -----------------------------------------------------------------------------


def test_same_key_same_body_replays_without_a_second_charge(app, ana, add_card, stripe_config):
    import stripe

    card = add_card(ana)
    body = {"amount": eur(2000), "payment_method_id": card["id"]}
    key = {"Idempotency-Key": "top-up-2026-11-22-a"}

    first = ana.post("/wallet/top-ups", json=body, headers=key)
    again = ana.post("/wallet/top-ups", json={"payment_method_id": card["id"], "amount": eur(2000)}, headers=key)  # same JSON, other order

    assert first.status_code == again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    rows = card_payments(app)
    assert len(rows) == 1
    sdk = stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]}, max_network_retries=0)
    assert [pi.id for pi in sdk.v1.payment_intents.list().data] == [rows[0].provider_payment_id]
    assert ana.get("/wallet").json["balance"] == eur(2000)
    # Keys are per person: Ben may use the same key for his own request.
    assert_problem(app.test_client().post("/api/v1/wallet/top-ups", json=body, headers=key), 401, "unauthenticated")


def test_same_key_other_body_is_refused(app, ana, add_card):
    card = add_card(ana)
    key = {"Idempotency-Key": "k-1"}
    assert ana.post("/wallet/top-ups", json={"amount": eur(2000), "payment_method_id": card["id"]}, headers=key).status_code == 201
    other = ana.post("/wallet/top-ups", json={"amount": eur(3000), "payment_method_id": card["id"]}, headers=key)
    assert_problem(other, 422, "idempotency_key_reused")
    assert len(card_payments(app)) == 1 and ana.get("/wallet").json["balance"] == eur(2000)


def test_a_declined_answer_is_replayed_too(app, ana, add_card):
    card = add_card(ana, DECLINED_AT_CHARGE)
    body, key = {"amount": eur(2000), "payment_method_id": card["id"]}, {"Idempotency-Key": "k-declined"}
    first = ana.post("/wallet/top-ups", json=body, headers=key)
    again = ana.post("/wallet/top-ups", json=body, headers=key)
    assert_problem(first, 402, "card_declined")
    assert_problem(again, 402, "card_declined")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["top_up_id"] == first.get_json()["top_up_id"]
    assert len(card_payments(app)) == 1


def test_a_request_still_running_is_409(app, ana, add_card):
    from webapp.api.idempotency import _fingerprint

    card = add_card(ana)
    body = {"amount": eur(2000), "payment_method_id": card["id"]}
    with app.test_request_context("/api/v1/wallet/top-ups", method="POST", json=body):
        fingerprint = _fingerprint()
    with app.extensions["db_sessionmaker"].begin() as s:  # the first request is still being processed
        s.add(IdempotencyRecord(scope=f"user:{ana.user.id}", key="k-running", method="POST", path="/api/v1/wallet/top-ups", request_hash=fingerprint))

    resp = ana.post("/wallet/top-ups", json=body, headers={"Idempotency-Key": "k-running"})

    assert_problem(resp, 409, "request_in_progress")
    assert resp.headers["Retry-After"] == "1"
    assert card_payments(app) == []


def test_an_idempotency_key_must_be_1_to_255_characters(app, ana, add_card):
    card = add_card(ana)
    body = {"amount": eur(2000), "payment_method_id": card["id"]}
    for bad in (" ", "k" * 256):
        assert_problem(ana.post("/wallet/top-ups", json=body, headers={"Idempotency-Key": bad}), 400, "invalid_idempotency_key")
    assert card_payments(app) == []


# --- the provider does not answer ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChargesGoNowhere:
    """The real provider for cards, and a real provider pointed at a closed port for the payment itself."""

    def __init__(self, working, unreachable) -> None:
        self._working = working
        self._unreachable = unreachable

    def __getattr__(self, name):
        return getattr(self._unreachable if name in ("charge", "authorize", "retrieve") else self._working, name)


def closed_provider(stripe_config: dict):
    """The real provider, configured with an address where nothing listens."""
    return make_provider({**stripe_config, "STRIPE_API_BASE": f"http://127.0.0.1:{_closed_port()}"})


def test_an_unreachable_provider_is_503_and_the_top_up_stays_for_reconciliation(app, ana, add_card, stripe_config):
    card = add_card(ana)
    working = app.extensions["payment_provider"]
    app.extensions["payment_provider"] = ChargesGoNowhere(working, closed_provider(stripe_config))
    body, key = {"amount": eur(2000), "payment_method_id": card["id"]}, {"Idempotency-Key": "k-outage"}

    first = ana.post("/wallet/top-ups", json=body, headers=key)
    problem = assert_problem(first, 503, "provider_unavailable")
    again = ana.post("/wallet/top-ups", json=body, headers=key)

    # The retry with the same key gets the same answer: running the request again could charge twice.
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_data() == first.get_data()
    [row] = card_payments(app)
    assert (row.id, row.state, row.provider_payment_id) == (problem["top_up_id"], State.CREATED, None)
    app.extensions["payment_provider"] = working
    shown = ana.get(f"/wallet/top-ups/{row.id}").json
    assert shown["state"] == "created" and ana.get("/wallet").json["balance"] == eur(0)


def test_an_unreachable_provider_before_anything_is_written_frees_the_key(app, ana, add_card, stripe_config):
    card = add_card(ana)
    working = app.extensions["payment_provider"]
    app.extensions["payment_provider"] = closed_provider(stripe_config)
    body, key = {"amount": eur(2000), "payment_method_id": card["id"]}, {"Idempotency-Key": "k-early-outage"}

    assert_problem(ana.post("/wallet/top-ups", json=body, headers=key), 503, "provider_unavailable")
    assert card_payments(app) == [] and count(app, IdempotencyRecord) == 0
    app.extensions["payment_provider"] = working
    assert ana.post("/wallet/top-ups", json=body, headers=key).status_code == 201
