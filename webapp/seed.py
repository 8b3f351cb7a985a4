"""Demo data for ``make run``: an operator, a site with two chargers of two connectors each,
a building with four prepaid meters, a driver and a tenant."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from webapp.auth.passwords import hash_password
from webapp.db import utcnow
from webapp.models import Charger, Connector, Meter, MeterKind, Operator, Role, Site, User

DEMO_OPERATOR = "Voltpay Demo Energy"


def seed(s: Session, password_factory: Callable[[], str]) -> dict | None:
    """Insert the demo data unless it is already there; return what was created (with passwords)."""
    if s.scalar(select(Operator).where(Operator.name == DEMO_OPERATOR)) is not None:
        return None
    op = Operator(name=DEMO_OPERATOR, legal_name="Voltpay Demo Energy S.L.", address="Calle Mayor 1, 28013 Madrid, Spain", vat_id="ESB12345678")
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
    for role, email, user_role, op_id in (
        ("driver", "driver@voltpay.test", Role.CUSTOMER, None),
        ("tenant", "tenant@voltpay.test", Role.CUSTOMER, None),
        ("operator", "operator@voltpay.test", Role.OPERATOR_STAFF, op.id),
        ("support", "support@voltpay.test", Role.SUPPORT, None),
    ):
        password = password_factory()
        u = User(email=email, password_hash=hash_password(password), role=user_role, operator_id=op_id, email_verified_at=utcnow(), locale="en")
        s.add(u)
        users[role] = u
        accounts.append((role, email, password))
    s.flush()
    meters = []
    s.add(Meter(site_id=building.id, meter_code="M0000", serial="SN-MASTER-0", kind=MeterKind.MASTER, prepaid=False))
    for i in range(1, 5):
        code = f"M{i:04d}"
        s.add(Meter(site_id=building.id, meter_code=code, serial=f"SN-2026-{i:04d}", kind=MeterKind.TENANT, prepaid=True, tenant_id=users["tenant"].id if i == 1 else None))
        meters.append(code)
    s.flush()
    return {"accounts": accounts, "connectors": connectors, "meters": meters}
