"""Charging over real websockets: a gateway in a thread, a seeded site, simulated chargers, a funded wallet.

Import the fixtures by name into a test module to use them::

    from tests.charging_helpers import charging_site, gateway, simulators  # noqa: F401

``wait_for`` polls a condition briefly instead of sleeping a fixed time.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from sqlalchemy import select

from payments import wallet
from payments.base import utcnow
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from payments.tariff_store import add_version, connector_owner
from webapp.auth.passwords import hash_password
from webapp.chargers.gateway import GatewayServer
from webapp.chargers.simulator import SimulatedCharger, SimulatorThread
from webapp.charging.models import ChargerConnection, ChargingSession
from webapp.models import Charger, Connector, Operator, Site

CHARGER_PASSWORD = "charger-secret-0123"
# €0.35/kWh excl. VAT (21 %), no fee for time or idling: the bill is the energy.
SIMPLE_TARIFF = {
    "id": "TEST-SIMPLE", "currency": "EUR", "type": "AD_HOC_PAYMENT",
    "elements": [{"price_components": [{"type": "ENERGY", "price": 0.35, "vat": 21.0, "step_size": 1}]}],
}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(interval)


@dataclass
class ChargingSite:
    """What ``seed_site`` created."""

    site_id: int
    charger_id: int
    cp_id: str
    password: str
    connector_ids: dict[int, int] = field(default_factory=dict)  # connector number → id
    connector_codes: dict[int, str] = field(default_factory=dict)


def seed_site(app, *, cp_id: str = "CP-1", password: str = CHARGER_PASSWORD, connectors: int = 2, tariff=SIMPLE_TARIFF,
              **site_fields) -> ChargingSite:
    """An operator, a site (no minimum billable energy or time unless given), one charger with its connectors, each priced by ``tariff``."""
    fields = {"name": f"Test site {cp_id}", "time_zone": "Europe/Madrid", "currency": "EUR", "min_billable_wh": 0, "min_billable_s": 0,
              "start_window_s": 60, "meter_sample_interval_s": 10, **site_fields}
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name=f"Operator {cp_id}", legal_name=f"Operator {cp_id} S.L.")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, **fields)
        s.add(site)
        s.flush()
        charger = Charger(site_id=site.id, charge_point_id=cp_id, password_hash=hash_password(password))
        s.add(charger)
        s.flush()
        out = ChargingSite(site.id, charger.id, cp_id, password)
        for n in range(1, connectors + 1):
            code = f"{cp_id.replace('-', '')[:10]}{n:02d}"
            connector = Connector(charger_id=charger.id, number=n, connector_code=code, max_power_kw=22)
            s.add(connector)
            s.flush()
            add_version(s, connector_owner(connector.id), tariff, site_currency=site.currency, created_by="test", now=utcnow())
            out.connector_ids[n], out.connector_codes[n] = connector.id, code
    return out


def fund_wallet(app, owner: str, cents: int, currency: str = "EUR") -> None:
    """Put money in ``owner``'s wallet with a ledger transfer (as a card top-up would)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        transfer(s, idempotency_key=f"test-fund:{uuid.uuid4().hex}", description="test top-up",
                 debit=get_account(s, AccountKind.PROVIDER_CLEARING, currency), credit=wallet.wallet(s, owner, currency),
                 amount=Money(cents, currency))


def session_row(app, session_id: int) -> ChargingSession:
    """The charging session as the database has it now."""
    with app.extensions["db_sessionmaker"]() as s:
        return s.get(ChargingSession, session_id)


def connection_row(app, charger_id: int) -> ChargerConnection | None:
    """The charger's row in the connection table, if any."""
    with app.extensions["db_sessionmaker"]() as s:
        return s.get(ChargerConnection, charger_id)


def charger_row(app, cp_id: str) -> Charger:
    """The charger as the database has it now."""
    with app.extensions["db_sessionmaker"]() as s:
        return s.scalar(select(Charger).where(Charger.charge_point_id == cp_id))


class Simulators:
    """Simulated chargers on a loop in a thread, pointed at the test gateway."""

    def __init__(self, url: str):
        self.url = url
        self.thread = SimulatorThread()

    def start(self, cp_id: str = "CP-1", password: str = CHARGER_PASSWORD, **options) -> SimulatedCharger:
        """Start a charger (booted on return); quick defaults: meter values every 0.2 s, plug-in after 0.1 s, unplug after 0.2 s."""
        options.setdefault("meter_interval", 0.2)
        options.setdefault("plug_in_delay", 0.1)
        options.setdefault("unplug_delay", 0.2)
        return self.thread.start(SimulatedCharger(cp_id, password, self.url, **options))

    def run(self, aw, timeout: float = 30.0):
        """Run a charger's coroutine (``sims.run(cp.plug_in(1))``) and return its result."""
        return self.thread.run(aw, timeout)

    def stop(self) -> None:
        """Close every charger."""
        self.thread.stop()


@pytest.fixture
def gateway(app):
    """The OCPP gateway of ``app`` in a thread on free ports (``ws_url``, ``internal_url``)."""
    server = GatewayServer(app, host="127.0.0.1", port=0, internal_host="127.0.0.1", internal_port=0).start_in_thread()
    yield server
    server.stop()


@pytest.fixture
def charging_site(app) -> ChargingSite:
    """A site with charger CP-1 (two connectors) priced at €0.35/kWh + 21 % VAT."""
    return seed_site(app)


@pytest.fixture
def simulators(gateway):
    """Start simulated chargers against the test gateway: ``simulators.start(cp_id, password, **options)``."""
    sims = Simulators(gateway.ws_url)
    yield sims
    sims.stop()
