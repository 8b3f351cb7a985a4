"""The OpenAPI 3.1 document of /api/v1 tells the truth about the running API.

Schemathesis generates requests for every documented operation, valid and
invalid ones, and sends them to the real app in-process (WSGI). Every answer
must be: no 5xx, a documented status code, a documented content type, a body
matching the documented schema, the documented headers; plus auth enforced
where it is declared, 405 for undocumented methods and invalid data refused.

Requests carry a valid bearer token of a seeded account, re-issued whenever a
generated case has revoked it, so the authenticated paths stay exercised. Each
operation is its own test item on its own (function-scoped) app.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from sqlalchemy import select

from webapp.auth.tokens import digest, new_secret
from webapp.db import utcnow
from webapp.models import ApiToken

SPEC = "/api/v1/openapi.json"
EMAIL = "ana@example.com"
PASSWORD = "correct horse staple"

# Does each answer match the document?
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# ... and does the API behave as the document implies? (These need generated cases.)
CHECKS = [*CONFORMANCE, ignored_auth, unsupported_method, missing_required_header, negative_data_rejection, positive_data_acceptance]

# Fixed seed and derandomized Hypothesis: the same cases on every run, so a failure reproduces.
# VOLTPAY_SCHEMATHESIS_SEED explores other cases locally (CI keeps the fixed one).
SEED = int(os.environ.get("VOLTPAY_SCHEMATHESIS_SEED", "20261122"))
MAX_EXAMPLES = 40
CONFIG = {
    "seed": SEED,
    "generation": {"mode": "all", "deterministic": True, "max-examples": MAX_EXAMPLES},
    # Generated requests often carry the seeded account's credentials and the id of its first token,
    # so successful answers (201, 204) and what follows a right password are exercised, not only refusals.
    # Connector look-ups often name the seeded demo connector, so its prices are exercised, not only the 404.
    # Wallet operations often name the seeded account's saved card, its confirmed card setup, its top-up (id 1)
    # and an amount within the EUR limits, so top-ups are really charged and cards really saved (see seed_wallet).
    "dictionaries": {"email": {"values": [EMAIL]}, "password": {"values": [PASSWORD]}, "token-id": {"values": [1]},
                     "connector-code": {"values": ["D101", "D201"]},
                     "card-id": {"values": ["pm_seeded_card"]}, "setup-id": {"values": ["seti_seeded_setup"]}, "top-up-id": {"values": [1]},
                     "top-up-cents": {"values": [500, 2500, 50000]}, "wallet-currency": {"values": ["EUR"]},
                     "session-id": {"values": [1]}, "payment-type": {"values": ["wallet", "card"]}, "cap-cents": {"values": [800, 1500]}},
    "parameters": {
        "body.email": {"dictionary": "email", "probability": 0.5},
        "body.password": {"dictionary": "password", "probability": 0.5},
        "path.token_id": {"dictionary": "token-id", "probability": 0.3},
        "path.connector_code": {"dictionary": "connector-code", "probability": 0.5},
        "path.payment_method_id": {"dictionary": "card-id", "probability": 0.5},
        "body.payment_method_id": {"dictionary": "card-id", "probability": 0.6},
        "body.setup_id": {"dictionary": "setup-id", "probability": 0.5},
        "path.top_up_id": {"dictionary": "top-up-id", "probability": 0.5},
        "body.amount.amount": {"dictionary": "top-up-cents", "probability": 0.6},
        "body.amount.currency": {"dictionary": "wallet-currency", "probability": 0.8},
        # Session starts often name a demo connector of the online charger, the seeded card, and a cap the seeded wallet can
        # hold, so sessions really start (against the charger stand-in); session operations often name the seeded session.
        "body.connector_code": {"dictionary": "connector-code", "probability": 0.6},
        "body.payment.type": {"dictionary": "payment-type", "probability": 0.6},
        "body.payment.payment_method_id": {"dictionary": "card-id", "probability": 0.6},
        "body.cap.amount": {"dictionary": "cap-cents", "probability": 0.6},
        "body.cap.currency": {"dictionary": "wallet-currency", "probability": 0.8},
        "path.session_id": {"dictionary": "session-id", "probability": 0.5},
    },
    "operations": [
        {
            # A well-formed top-up may still be refused for what no schema can say: the card must be one of the
            # account's saved cards (422), the amount within the limits of the wallet's currency (422, see
            # GET /wallet), and the bank may decline (402). The other positive-data statuses stay as they are.
            "include-operation-id": "createTopUp",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "402", "403", "404", "409", "422", "429", "5xx"]}},
        },
        {
            # A well-formed start may be refused for what no schema can say: the email must be deliverable-looking, the card one
            # of the account's (422), a guest cannot pay from a wallet (401), the cap within what a session costs (422), the
            # wallet must hold the hold and the bank may decline (402).
            "include-operation-id": "createSession",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "402", "403", "404", "409", "422", "429", "5xx"]}},
        },
        {
            # Confirming answers like the start: 402 when the bank refused the hold.
            "include-operation-id": "confirmSession",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "402", "403", "404", "409", "429", "5xx"]}},
        },
    ],
}


def built_document() -> dict:
    """The document as ``webapp.api.openapi`` builds it for the test BASE_URL (no database needed)."""
    from flask import Flask

    from webapp.api.openapi import document

    holder = Flask(__name__)
    holder.config["BASE_URL"] = "http://localhost"
    with holder.app_context():
        return document()


class RunningApp:
    """A WSGI app that hands each request to the app of the running test."""

    current = None

    def __call__(self, environ, start_response):
        assert self.current is not None, "use the `account` fixture"
        return self.current(environ, start_response)


RUNNING_APP = RunningApp()

# Loaded at import so that every operation is its own test item;
# test_served_document_is_the_fuzzed_one proves it is the very document the app serves.
schema = schemathesis.openapi.from_dict(built_document(), config=SchemathesisConfig.from_dict(CONFIG))
schema.app = RUNNING_APP


class SeededAccount:
    """A verified account and a bearer token for it, re-issued when a case has revoked it."""

    def __init__(self, app, user_id: int) -> None:
        self.app = app
        self.user_id = user_id
        self.secret: str | None = None
        self.issued = 0
        self.statuses: Counter[int] = Counter()
        self.ids: dict[str, str] = {}  # placeholder in generated cases → the seeded object's real id

    def fill(self, case) -> None:
        """Put the real ids of the seeded card and card setup where a case names their placeholders."""
        if case.path_parameters:
            case.path_parameters = {k: self.ids.get(v, v) if isinstance(v, str) else v for k, v in case.path_parameters.items()}
        if isinstance(case.body, dict):
            case.body = self._filled(case.body)

    def _filled(self, body: dict) -> dict:
        """``body`` with the placeholders replaced, in nested objects too (a session's ``payment``)."""
        return {k: self.ids.get(v, v) if isinstance(v, str) else self._filled(v) if isinstance(v, dict) else v for k, v in body.items()}

    def collector_token(self) -> str:
        """A meter data collector of the demo operator and an access token of its own (the `collector` scheme)."""
        from webapp.meters.models import CollectorToken
        from webapp.meters.oauth import create_collector
        from webapp.models import Operator

        if getattr(self, "collector_secret", None) is None:
            with self.app.extensions["db_sessionmaker"].begin() as s:
                collector, _secret = create_collector(s, s.scalar(select(Operator.id).order_by(Operator.id).limit(1)), "fuzz")
                self.collector_secret = "fuzz_" + new_secret()
                s.add(CollectorToken(collector_id=collector.id, token_hash=digest(self.collector_secret),
                                     expires_at=utcnow() + dt.timedelta(hours=1)))
        return self.collector_secret

    def token(self) -> str:
        with self.app.extensions["db_sessionmaker"].begin() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == digest(self.secret))) if self.secret else None
            if row is None or not row.is_valid(utcnow()):
                self.secret = "vp_" + new_secret()
                s.add(ApiToken(user_id=self.user_id, token_hash=digest(self.secret), name="seeded", expires_at=utcnow() + dt.timedelta(days=1)))
                self.issued += 1
        return self.secret


@pytest.fixture(autouse=True)
def card_payments(app_config, stripe_config):
    """Card payments on (localstripe, emptied per test) for the app of every test here: without a provider the
    wallet and payment-method operations could only answer 503."""
    app_config.update(stripe_config)


def seed_wallet(app, user, config: dict) -> dict[str, str]:
    """The seeded account's saved card, a card setup confirmed in the client but not saved yet, and a top-up (id 1)."""
    from payments import cards, wallet
    from payments.cards import CardPayment
    from payments.money import Money
    from tests.stripe_browser import MASTERCARD, VISA, confirm_card_setup

    provider = app.extensions["payment_provider"]
    with app.extensions["db_sessionmaker"]() as s:
        customer = wallet.customer_id(s, provider, owner=user.owner, email=user.email)
        s.commit()
        saved = provider.start_card_setup(customer_id=customer, idempotency_key="seed:saved")
        confirm_card_setup(config, saved.id, VISA)
        card = provider.finish_card_setup(setup_id=saved.id, customer_id=customer)
        confirmed = provider.start_card_setup(customer_id=customer, idempotency_key="seed:confirmed")
        confirm_card_setup(config, confirmed.id, MASTERCARD)
        row = wallet.start_top_up(s, provider, owner=user.owner, email=user.email, amount=Money(2000, "EUR"), payment_method_id=card.id, currency="EUR")
        s.commit()
        cards.submit(s, provider, row)
        s.commit()
        assert s.scalars(select(CardPayment.id)).all() == [1], "top-up ids must start at 1 on empty tables"
    return {"pm_seeded_card": card.id, "seti_seeded_setup": confirmed.id}


def seed_session(app, user) -> None:
    """The demo charger DEMO-CP-1 online (D101, D102), answered by the charger stand-in, and a session of the seeded account (id 1)."""
    from payments.money import Money
    from tests.webapp.test_sessions_api import ChargerStandIn
    from webapp.charging import service
    from webapp.charging.models import ChargerConnection, PaymentKind
    from webapp.models import Charger, Connector, User

    app.extensions["charger_gateway"] = ChargerStandIn()
    with app.extensions["db_sessionmaker"]() as s:
        charger = s.scalar(select(Charger).where(Charger.charge_point_id == "DEMO-CP-1"))
        s.add(ChargerConnection(charger_id=charger.id, gateway_url="http://gateway.invalid", connection_id="seeded"))
        s.commit()
        connector = s.scalar(select(Connector).where(Connector.connector_code == "D102"))
        request = service.StartRequest(connector=connector, user=s.get(User, user.id), email=None, payment_kind=PaymentKind.WALLET,
                                       cap=Money(1000, "EUR"))
        with app.app_context():
            started = service.start_session(s, None, app.extensions["charger_gateway"], request, now=utcnow())
        assert (started.session.id, started.session.state.value) == (1, "start_requested"), "the seeded session must be id 1 and started"


@pytest.fixture
def account(app, make_user, stripe_config):
    """The seeded account, with its first token (id 1); generated requests go to this test's app."""
    user = make_user(email=EMAIL, password=PASSWORD)
    from webapp.seed import seed

    with app.extensions["db_sessionmaker"].begin() as s:  # the demo site, its connectors and their tariffs
        seed(s, password_factory=lambda: PASSWORD)
    acc = SeededAccount(app, user.id)
    acc.token()
    with app.extensions["db_sessionmaker"]() as s:
        assert s.scalars(select(ApiToken.id)).all() == [1], "token ids must start at 1 on empty tables"
    acc.ids = seed_wallet(app, user, stripe_config)
    seed_session(app, user)
    RUNNING_APP.current = app
    yield acc
    RUNNING_APP.current = None


# Schemathesis builds some cases (the coverage phase) while collecting, before any database exists,
# so the provider only marks where the seeded account's token goes and the test puts a valid one
# there right before sending. Cases that test a missing or wrong credential never get the mark.
SEEDED = "Bearer <seeded account token>"


@schema.auth(refresh_interval=None)
class SeededBearer:
    def get(self, case, context):
        return SEEDED

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": data}


@pytest.fixture
def fuzzed(account):
    """After all of an operation's cases: the seeded token got valid requests past authentication."""
    yield account
    if account.statuses:
        assert set(account.statuses) != {401}, f"the seeded token was refused on every valid request: {dict(account.statuses)}"


def conformance_test(operation_id: str):
    """The generated-cases test of one operation (its own test item, named after the operation)."""
    # Excluding the others rather than including this one: with `operations` entries in the config,
    # schemathesis ORs an include with a match-all filter, and every test would run every operation.
    others = [other for other in OPERATION_IDS if other != operation_id]

    @(schema.exclude(operation_id=others) if others else schema).parametrize()
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        # One app per operation serves all of its cases; generation through dictionaries may filter a lot.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def test(case, fuzzed):
        assert case.operation.schema.get_operation_id(case.operation) == operation_id
        seeded = bool(case.headers) and case.headers.get("Authorization") == SEEDED
        if seeded:
            collector = operation_id == "postMeterReadings"  # the one operation of the `collector` (OAuth2) scheme
            case.headers["Authorization"] = f"Bearer {fuzzed.collector_token() if collector else fuzzed.token()}"
        fuzzed.fill(case)
        response = case.call_and_validate(checks=CHECKS)
        # Valid requests with the seeded token (not the probes of undocumented methods) must get past auth.
        if seeded and case.meta.generation.mode == GenerationMode.POSITIVE and case.method.upper() == case.operation.method.upper():
            fuzzed.statuses[response.status_code] += 1

    return test


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# One test per documented operation, e.g. test_get_me_conforms_to_the_document: an operation added
# to the document is fuzzed without touching this file.
OPERATION_IDS = [op["operationId"] for item in built_document()["paths"].values() for op in item.values()]
for _operation_id in OPERATION_IDS:
    globals()[f"test_{snake(_operation_id)}_conforms_to_the_document"] = conformance_test(_operation_id)


def test_served_document_is_the_fuzzed_one(app):
    assert app.test_client().get(SPEC).json == built_document()


# --- The document itself ---------------------------------------------------------------------


def openapi_path(rule: str) -> str:
    """``/api/v1/auth/tokens/<int(max=...):token_id>`` → ``/auth/tokens/{token_id}``."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.removeprefix("/api/v1"))


def test_document_is_openapi_3_1_and_lists_every_route(app):
    doc = app.test_client().get(SPEC).json
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "http://localhost/api/v1"}]
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") or rule.endpoint.startswith("api."):
            routes.setdefault(openapi_path(rule.rule), set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    assert "/me" in routes and "/openapi.json" in routes
    documented = {path: set(item) & {"get", "put", "post", "delete", "patch"} for path, item in doc["paths"].items()}
    assert documented == routes, "the document and app.url_map disagree"


def test_every_operation_is_named_and_protected_ones_say_so(app):
    doc = app.test_client().get(SPEC).json
    public = {("post", "/auth/token"), ("get", "/openapi.json"), ("get", "/connectors/{connector_code}")}
    # A guest may start a session and then see, stop or confirm it with its X-Session-Token: the token is optional there.
    account_or_guest = {("post", "/sessions"), ("get", "/sessions/{session_id}"), ("post", "/sessions/{session_id}/stop"),
                        ("post", "/sessions/{session_id}/confirm"),
                        ("get", "/meters/{meter_code}")}  # a meter's public status; the tenant's token adds the balance
    ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.append(op["operationId"])
            if (method, path) in public:
                assert "security" not in op, (method, path)
            elif (method, path) == ("post", "/meters/readings"):  # meter data collectors: OAuth2 client credentials
                assert op["security"] == [{"collector": ["meters:write"]}] and "401" in op["responses"]
            elif (method, path) in account_or_guest:
                assert op["security"] == [{"bearer": []}, {}], (method, path)
                assert "401" in op["responses"], (method, path)  # a token that is sent must be valid
            else:
                assert op["security"] == [{"bearer": []}], (method, path)
                assert "401" in op["responses"], (method, path)
    assert len(ids) == len(set(ids))


def test_every_documented_error_is_a_problem(app):
    doc = app.test_client().get(SPEC).json
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    assert resp["content"] == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}, (method, path, status)
                    if status == "401":
                        assert "WWW-Authenticate" in resp["headers"], (method, path)
                    if status == "429":
                        assert "Retry-After" in resp["headers"], (method, path)


# --- Answers generation rarely reaches, checked against the document ---------------------------


def validate(loaded, method: str, path: str, **kwargs):
    """Send one hand-made request for a documented operation; check the answer against the document."""
    case = loaded[path][method].Case(**kwargs)
    response = case.call()
    case.validate_response(response, checks=CONFORMANCE)
    return response


def test_hand_made_answers_conform(app, account):
    loaded = schemathesis.openapi.from_wsgi(SPEC, app)
    bearer = {"Authorization": f"Bearer {account.token()}"}
    as_json = {"media_type": "application/json"}
    issued = validate(loaded, "POST", "/auth/token", body={"email": EMAIL, "password": PASSWORD, "name": "cli"}, **as_json)
    assert issued.status_code == 201
    assert validate(loaded, "GET", "/me", headers=bearer).status_code == 200
    assert len(validate(loaded, "GET", "/auth/tokens", headers=bearer).json()["data"]) == 2
    new_id = issued.json()["id"]
    assert validate(loaded, "DELETE", "/auth/tokens/{token_id}", path_parameters={"token_id": new_id}, headers=bearer).status_code == 204
    assert validate(loaded, "DELETE", "/auth/tokens/{token_id}", path_parameters={"token_id": 2147483647}, headers=bearer).status_code == 404
    assert validate(loaded, "DELETE", "/auth/token", headers=bearer).status_code == 204
    assert validate(loaded, "GET", "/me", headers=bearer).status_code == 401
    assert validate(loaded, "GET", "/auth/tokens", headers={"Authorization": "Bearer"}).status_code == 401
    assert validate(loaded, "POST", "/auth/token", body={"email": EMAIL, "password": "wrong password"}, **as_json).status_code == 401
    assert validate(loaded, "POST", "/auth/token", body={"email": EMAIL}, **as_json).status_code == 422
    assert validate(loaded, "POST", "/auth/token", body=[EMAIL, PASSWORD], **as_json).status_code == 422
    assert validate(loaded, "POST", "/auth/token", body="email=ana", media_type="text/plain").status_code == 415
    too_big = {"email": "a" * (3 * 1024 * 1024), "password": "x"}
    assert validate(loaded, "POST", "/auth/token", body=too_big, **as_json).status_code == 413


@pytest.fixture
def limited(app_config):
    """Rate limits on, for the app created after this fixture."""
    app_config["RATELIMIT_ENABLED"] = True


def test_unverified_and_rate_limited_answers_conform(limited, app, make_user):
    make_user(email="new@example.com", verified=False)
    loaded = schemathesis.openapi.from_wsgi(SPEC, app)
    body = {"email": "new@example.com", "password": PASSWORD}
    statuses = [validate(loaded, "POST", "/auth/token", body=body, media_type="application/json").status_code for _ in range(11)]
    assert statuses == [403] * 10 + [429]


def test_hand_made_wallet_answers_conform(app, account, stripe_config):
    """Declines, 3-D Secure, limits, replays, requests in progress and outages, checked against the document."""
    from payments import wallet
    from tests.stripe_browser import DECLINED_AT_CHARGE, THREE_D_SECURE, confirm_card_setup
    from tests.webapp.test_wallet_api import ChargesGoNowhere, closed_provider

    loaded = schemathesis.openapi.from_wsgi(SPEC, app)
    bearer = {"Authorization": f"Bearer {account.token()}"}
    provider = app.extensions["payment_provider"]
    with app.extensions["db_sessionmaker"]() as s:
        customer = wallet.known_customer_id(s, f"user:{account.user_id}")

    def card(number: str) -> str:
        setup = provider.start_card_setup(customer_id=customer, idempotency_key=f"hand-made:{number}")
        confirm_card_setup(stripe_config, setup.id, number)
        return provider.finish_card_setup(setup_id=setup.id, customer_id=customer).id

    def top_up(cents: int, pm: str, **headers):
        body = {"amount": {"amount": cents, "currency": "EUR"}, "payment_method_id": pm}
        return validate(loaded, "POST", "/wallet/top-ups", body=body, headers={**bearer, **headers}, media_type="application/json")

    def documented_outage(method: str, path: str, **kwargs):
        """Like ``validate``, for the 5xx answers an outage really gives (documented, but still server errors)."""
        case = loaded[path][method].Case(**kwargs)
        response = case.call()
        case.validate_response(response, checks=[check for check in CONFORMANCE if check is not not_a_server_error])
        return response

    declined = top_up(1000, card(DECLINED_AT_CHARGE))
    assert declined.status_code == 402 and declined.json()["decline_reason"] == "card_declined"
    pending = top_up(1000, card(THREE_D_SECURE), **{"Idempotency-Key": "hand-made-3ds"})
    assert pending.status_code == 201 and pending.json()["client_secret"]
    replayed = top_up(1000, account.ids["pm_seeded_card"], **{"Idempotency-Key": "hand-made-3ds"})
    assert replayed.status_code == 422 and replayed.json()["code"] == "idempotency_key_reused"
    top_up_id = {"top_up_id": pending.json()["id"]}
    assert validate(loaded, "GET", "/wallet/top-ups/{top_up_id}", path_parameters=top_up_id, headers=bearer).json()["client_secret"]
    assert validate(loaded, "POST", "/wallet/top-ups/{top_up_id}/confirm", path_parameters=top_up_id, headers=bearer).status_code == 200
    out_of_range = top_up(50001, account.ids["pm_seeded_card"])
    assert out_of_range.status_code == 422 and out_of_range.json()["maximum"] == {"amount": 50000, "currency": "EUR"}
    wrong = validate(loaded, "POST", "/wallet/top-ups", headers=bearer, media_type="application/json",
                     body={"amount": {"amount": 1000, "currency": "USD"}, "payment_method_id": account.ids["pm_seeded_card"]})
    assert wrong.status_code == 422 and wrong.json()["currency"] == "EUR"
    assert top_up(1000, "pm_not_mine").json()["code"] == "unknown_payment_method"
    assert top_up(1000, account.ids["pm_seeded_card"], **{"Idempotency-Key": "k" * 256}).status_code == 400
    incomplete = provider.start_card_setup(customer_id=customer, idempotency_key="hand-made:incomplete")
    added = validate(loaded, "POST", "/payment-methods", body={"setup_id": incomplete.id}, headers=bearer, media_type="application/json")
    assert added.status_code == 409

    app.extensions["payment_provider"] = ChargesGoNowhere(provider, closed_provider(stripe_config))
    outage = {"amount": {"amount": 1000, "currency": "EUR"}, "payment_method_id": account.ids["pm_seeded_card"]}
    kept = {**bearer, "Idempotency-Key": "hand-made-outage"}
    first = documented_outage("POST", "/wallet/top-ups", body=outage, headers=kept, media_type="application/json")
    assert first.status_code == 503 and first.json()["top_up_id"]
    again = documented_outage("POST", "/wallet/top-ups", body=outage, headers=kept, media_type="application/json")
    assert again.status_code == 503 and again.json() == first.json() and again.headers["idempotent-replayed"] == ["true"]
    app.extensions["payment_provider"] = closed_provider(stripe_config)
    assert documented_outage("GET", "/payment-methods", headers=bearer).status_code == 503
    app.extensions["payment_provider"] = None
    assert documented_outage("POST", "/payment-methods/setup", headers=bearer).json()["code"] == "payments_unavailable"


def test_hand_made_session_answers_conform(app, account, stripe_config):
    """Guest and account starts, 3-D Secure, declines, refusals, stops, the list and outages, checked against the document."""
    from webapp.charging.models import CommandStatus
    from tests.stripe_browser import DECLINED_AT_CHARGE, THREE_D_SECURE, VISA, browser_card, pass_3ds
    from tests.webapp.test_wallet_api import ChargesGoNowhere, closed_provider

    loaded = schemathesis.openapi.from_wsgi(SPEC, app)
    bearer = {"Authorization": f"Bearer {account.token()}"}
    as_json = {"media_type": "application/json"}
    charger = app.extensions["charger_gateway"]

    def start(body: dict, headers: dict | None = None, checks=CONFORMANCE):
        case = loaded["/sessions"]["POST"].Case(body=body, headers=headers or {}, **as_json)
        response = case.call()
        case.validate_response(response, checks=checks)
        return response

    def guest_card(number: str, code: str = "D101", **extra) -> dict:
        return {"connector_code": code, "payment": {"type": "card", "payment_method_id": browser_card(stripe_config, number)},
                "email": "gus@example.com", **extra}

    def as_guest(token: str) -> dict:
        return {"X-Session-Token": token}

    declined = start(guest_card(DECLINED_AT_CHARGE))
    assert declined.status_code == 402 and declined.json()["session_token"] and declined.json()["decline_reason"]
    pending = start(guest_card(THREE_D_SECURE))
    assert pending.status_code == 201 and pending.json()["state"] == "pending" and pending.json()["client_secret"]
    session = {"session_id": pending.json()["id"]}
    token = as_guest(pending.json()["session_token"])
    assert validate(loaded, "GET", "/sessions/{session_id}", path_parameters=session, headers=token).json()["client_secret"]
    assert start(guest_card(VISA)).json()["code"] == "connector_busy"
    pass_3ds(stripe_config, pending.json()["client_secret"].split("_secret")[0], pending.json()["client_secret"])
    confirmed = validate(loaded, "POST", "/sessions/{session_id}/confirm", path_parameters=session, headers=token)
    assert confirmed.status_code == 200 and confirmed.json()["state"] == "start_requested"
    stopped = validate(loaded, "POST", "/sessions/{session_id}/stop", path_parameters=session, headers=token)
    assert stopped.status_code == 202 and stopped.json()["state"] == "cancelled"
    assert validate(loaded, "POST", "/sessions/{session_id}/stop", path_parameters=session, headers=token).status_code == 409
    assert validate(loaded, "GET", "/sessions/{session_id}", path_parameters=session).status_code == 404
    assert validate(loaded, "GET", "/sessions/{session_id}", path_parameters=session, headers={"Authorization": "Bearer nope"}).status_code == 401

    assert start({"connector_code": "D101", "payment": {"type": "wallet"}}).json()["code"] == "wallet_needs_account"
    assert start({"connector_code": "D201", "payment": {"type": "wallet"}}, bearer).json()["code"] == "charger_offline"
    assert start({"connector_code": "NOPE", "payment": {"type": "wallet"}}, bearer).status_code == 404
    assert start({"connector_code": "D101", "payment": {"type": "wallet"}}, bearer).json()["code"] == "wallet_insufficient"
    assert start({"connector_code": "D101", "payment": {"type": "wallet"}, "cap": {"amount": 1, "currency": "USD"}}, bearer).json()["currency"] == "EUR"
    assert start({"connector_code": "D101", "payment": {"type": "card", "payment_method_id": "pm_not_mine"}}, bearer).status_code == 422
    charger.answer = CommandStatus.REJECTED
    rejected = start({"connector_code": "D101", "payment": {"type": "wallet"}, "cap": {"amount": 800, "currency": "EUR"}}, bearer)
    assert rejected.status_code == 409 and rejected.json()["code"] == "charger_rejected" and "session_token" not in rejected.json()
    charger.answer = CommandStatus.ACCEPTED
    own = start({"connector_code": "D101", "payment": {"type": "card", "payment_method_id": account.ids["pm_seeded_card"]}}, bearer)
    assert own.status_code == 201 and "session_token" not in own.json()
    listed = validate(loaded, "GET", "/sessions", headers=bearer, query={"limit": 2})
    assert [s["id"] for s in listed.json()["data"]][0] == own.json()["id"] and listed.json()["next_before"]
    assert validate(loaded, "GET", "/sessions", headers=bearer, query={"state": "nope"}).status_code == 422

    # Outages: documented, but still server errors
    without_5xx = [check for check in CONFORMANCE if check is not not_a_server_error]
    charger.answer = CommandStatus.TIMEOUT
    from webapp.charging import service
    from webapp.charging.models import ChargingSession

    with app.app_context(), app.extensions["db_sessionmaker"]() as s:
        cs = s.get(ChargingSession, own.json()["id"])
        now = utcnow()
        service.start_transaction(s, cs.connector.charger, connector_number=cs.connector.number, id_tag=cs.id_tag, meter_start_wh=0,
                                  timestamp=now, now=now)
        s.commit()
    case = loaded["/sessions/{session_id}/stop"]["POST"].Case(path_parameters={"session_id": own.json()["id"]}, headers=bearer)
    timed_out = case.call()
    case.validate_response(timed_out, checks=without_5xx)
    assert timed_out.status_code == 504 and timed_out.json()["code"] == "charger_not_answering"
    seeded = validate(loaded, "POST", "/sessions/{session_id}/stop", path_parameters={"session_id": 1}, headers=bearer)
    assert seeded.json()["state"] == "cancelled"  # D102 is free again
    app.extensions["payment_provider"] = ChargesGoNowhere(app.extensions["payment_provider"], closed_provider(stripe_config))
    outage = start(guest_card(VISA, "D102"), {"Idempotency-Key": "hand-made-outage"}, checks=without_5xx)
    assert outage.status_code == 503 and outage.json()["session_id"] and outage.json()["session_token"]
