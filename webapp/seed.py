"""Demo data for ``make run``: an operator, a site with two chargers of two connectors each,
a building with four prepaid meters, a driver and a tenant, and the connectors' tariffs.

Tariffs (OCPI 2.2.1 JSON, added through ``payments.tariff_store.add_version``; Spanish VAT 21 %):

* ``DEMO-CP-1`` (D101, D102), **simple**: €0.35/kWh excl. VAT (€0.4235 incl.).
* ``DEMO-CP-2`` (D201, D202), **time of use**: a €1.00 session fee; energy €0.20/kWh
  22:00-08:00 every night, €0.45/kWh Monday to Friday 18:00-22:00, €0.30/kWh at other
  times; an idle fee of €6.00/h (€0.10/min, per started minute) after a 15-minute grace
  period (counted from the session start, as OCPI 2.2.1 counts durations).
"""

from __future__ import annotations

from decimal import Decimal

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from payments.tariff_store import add_version, connector_owner, tariff_in_force
from webapp.auth.passwords import hash_password
from webapp.db import utcnow
from webapp.meters.models import Tenant
from webapp.models import Charger, Connector, Meter, MeterKind, Operator, Role, Site, User

DEMO_OPERATOR = "Voltpay Demo Energy"
DEMO_SIMPLE_TARIFF = """{
  "id": "DEMO-SIMPLE", "currency": "EUR", "type": "AD_HOC_PAYMENT",
  "elements": [
    {"price_components": [{"type": "ENERGY", "price": 0.35, "vat": 21.0, "step_size": 1}]}
  ]
}"""
DEMO_TOU_TARIFF = """{
  "id": "DEMO-TOU", "currency": "EUR", "type": "AD_HOC_PAYMENT",
  "elements": [
    {"price_components": [{"type": "ENERGY", "price": 0.20, "vat": 21.0, "step_size": 1}],
     "restrictions": {"start_time": "22:00", "end_time": "08:00"}},
    {"price_components": [{"type": "ENERGY", "price": 0.45, "vat": 21.0, "step_size": 1}],
     "restrictions": {"start_time": "18:00", "end_time": "22:00",
                      "day_of_week": ["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY"]}},
    {"price_components": [{"type": "PARKING_TIME", "price": 0.00, "vat": 21.0, "step_size": 60}],
     "restrictions": {"max_duration": 900}},
    {"price_components": [{"type": "FLAT", "price": 1.00, "vat": 21.0, "step_size": 1},
                          {"type": "ENERGY", "price": 0.30, "vat": 21.0, "step_size": 1},
                          {"type": "PARKING_TIME", "price": 6.00, "vat": 21.0, "step_size": 60}]}
  ]
}"""
# charge point id → its connectors' tariff
DEMO_TARIFFS = {"DEMO-CP-1": DEMO_SIMPLE_TARIFF, "DEMO-CP-2": DEMO_TOU_TARIFF}

DEMO_ACCOUNTS = (  # (label, email, role)
    ("driver", "driver@example.com", Role.CUSTOMER),
    ("tenant", "tenant@example.com", Role.CUSTOMER),
    ("operator", "operator@example.com", Role.OPERATOR_STAFF),
    ("support", "support@example.com", Role.SUPPORT),
)


def seed(s: Session, password_factory: Callable[[], str]) -> dict | None:
    """Insert the demo data unless it is already there; return what was created (with passwords)."""
    if s.scalar(select(Operator).where(Operator.name == DEMO_OPERATOR)) is not None:
        return None
    op = Operator(name=DEMO_OPERATOR, legal_name="Voltpay Demo Energy S.L.", address="Calle Mayor 1, 28013 Madrid, Spain", vat_id="ESB12345678",
                  document_prefix="VP")
    s.add(op)
    s.flush()
    site = Site(operator_id=op.id, name="Plaza Mayor car park", address="Plaza Mayor 3, 28012 Madrid", time_zone="Europe/Madrid", currency="EUR")
    building = Site(operator_id=op.id, name="Residencia Sol", address="Calle del Sol 12, 28012 Madrid", time_zone="Europe/Madrid", currency="EUR")
    s.add_all([site, building])
    s.flush()
    connectors = []
    for n in (1, 2):
        charger = Charger(site_id=site.id, charge_point_id=f"DEMO-CP-{n}", password_hash=hash_password(f"demo-charger-{n}-secret"), vendor="Voltpay", model="Sim-22")
        s.add(charger)
        s.flush()
        for c in (1, 2):
            code = f"D{n}{c:02d}"
            s.add(Connector(charger_id=charger.id, number=c, connector_code=code, max_power_kw=22))
            connectors.append(code)
    accounts = []
    users = {}
    for role, email, user_role in DEMO_ACCOUNTS:
        op_id = op.id if user_role is Role.OPERATOR_STAFF else None
        password = password_factory()
        u = User(email=email, password_hash=hash_password(password), role=user_role, operator_id=op_id, email_verified_at=utcnow(), locale="en")
        s.add(u)
        users[role] = u
        accounts.append((role, email, password))
    s.flush()
    meters = []
    tenant = Tenant(site_id=building.id, user_id=users["tenant"].id, name="Demo Tenant", contact_email=users["tenant"].email,
                    unit="Shop 1", leased_area_m2=Decimal("48.00"), currency=building.currency)
    s.add(tenant)
    master = Meter(site_id=building.id, meter_code="M0000", serial="SN-MASTER-0", kind=MeterKind.MASTER, prepaid=False)
    s.add(master)
    s.flush()
    for i in range(1, 5):
        code = f"M{i:04d}"
        s.add(Meter(site_id=building.id, meter_code=code, serial=f"SN-2026-{i:04d}", kind=MeterKind.TENANT, prepaid=True,
                    tenant_id=tenant.id if i == 1 else None, master_meter_id=master.id))
        meters.append(code)
    s.flush()
    seed_demo_tariffs(s)
    return {"accounts": accounts, "connectors": connectors, "meters": meters}


def seed_demo_tariffs(s: Session) -> int:
    """Give every demo connector without a tariff in force its demo tariff; return how many were added."""
    now = utcnow()
    added = 0
    rows = s.execute(
        select(Connector, Charger, Site).join(Charger, Connector.charger_id == Charger.id).join(Site, Charger.site_id == Site.id)
        .join(Operator, Site.operator_id == Operator.id)
        .where(Operator.name == DEMO_OPERATOR, Charger.charge_point_id.in_(list(DEMO_TARIFFS)))
        .order_by(Connector.id)
    ).all()
    for connector, charger, site in rows:
        owner = connector_owner(connector.id)
        if tariff_in_force(s, owner, now) is None:
            add_version(s, owner, DEMO_TARIFFS[charger.charge_point_id], site_currency=site.currency, created_by="seed", now=now)
            added += 1
    return added


def reset_demo_passwords(s: Session, password_factory: Callable[[], str]) -> dict | None:
    """Give the seeded demo accounts new passwords (signing out their sessions), for a demo started again.

    Returns the same shape as ``seed()``, or None when the demo data is not there.
    """
    op = s.scalar(select(Operator).where(Operator.name == DEMO_OPERATOR))
    if op is None:
        return None
    accounts = []
    for label, email, _role in DEMO_ACCOUNTS:
        user = s.scalar(select(User).where(User.email == email))
        if user is None:
            continue
        password = password_factory()
        user.password_hash = hash_password(password)
        user.session_version += 1
        accounts.append((label, email, password))
    seed_demo_tariffs(s)  # a demo database from before the tariffs existed gets them now
    site_ids = select(Site.id).where(Site.operator_id == op.id)
    connectors = s.scalars(
        select(Connector.connector_code).join(Charger).where(Charger.site_id.in_(site_ids)).order_by(Connector.connector_code)
    ).all()
    meters = s.scalars(
        select(Meter.meter_code).where(Meter.site_id.in_(site_ids), Meter.kind == MeterKind.TENANT).order_by(Meter.meter_code)
    ).all()
    return {"accounts": accounts, "connectors": list(connectors), "meters": list(meters)}
