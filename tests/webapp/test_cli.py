"""``flask migrate``, ``flask seed-demo`` and ``flask create-admin``, run through the app's CLI runner."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import inspect, select

from webapp import create_app
from webapp.auth.passwords import verify_password
from webapp.db import Base
from webapp.meters.models import Tenant
from webapp.models import Charger, Connector, Meter, MeterKind, Operator, Role, Site, User

GOOD_PASSWORD = "purple elephant orbit 42"


def _session(app):
    return app.extensions["db_sessionmaker"]()


def _snapshot(app) -> dict[str, list[tuple]]:
    """Every row of every table, to prove a command changed nothing."""
    with app.extensions["db_engine"].connect() as c:
        return {t.name: sorted(map(tuple, c.execute(t.select()).all()), key=repr) for t in Base.metadata.sorted_tables}


@pytest.fixture
def fresh_app(app_config, tmp_path):
    """An app on a new, empty SQLite file (not migrated)."""
    application = create_app(dict(app_config, DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.db'}"))
    yield application
    application.extensions["db_engine"].dispose()


def test_migrate_builds_an_empty_database_and_is_repeatable(fresh_app):
    runner = fresh_app.test_cli_runner()
    engine = fresh_app.extensions["db_engine"]
    assert inspect(engine).get_table_names() == []

    result = runner.invoke(args=["migrate", "--revision", "0001"])
    assert result.exit_code == 0, result.output
    assert "database at 0001" in result.output

    result = runner.invoke(args=["migrate"])
    assert result.exit_code == 0, result.output
    assert "database at head" in result.output
    assert set(Base.metadata.tables) | {"alembic_version"} == set(inspect(engine).get_table_names())

    again = runner.invoke(args=["migrate"])  # already at head: nothing to do, no error
    assert again.exit_code == 0, again.output


def test_seed_demo_creates_the_demo_and_prints_the_passwords(app):
    result = app.test_cli_runner().invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    printed = dict(re.findall(r"^\s+\w+\s+(\S+@example\.com)\s+(\S+)$", result.output, re.MULTILINE))
    assert {"driver@example.com", "tenant@example.com", "operator@example.com"} <= set(printed)
    assert "Connector codes: D101, D102, D201, D202" in result.output
    assert "Meter codes:     M0001, M0002, M0003, M0004" in result.output

    with _session(app) as s:
        [operator] = s.scalars(select(Operator)).all()
        sites = {site.name: site for site in s.scalars(select(Site)).all()}
        assert len(sites) == 2 and all(site.operator_id == operator.id for site in sites.values())
        [car_park] = [site for site in sites.values() if site.chargers]
        [building] = [site for site in sites.values() if site.meters]
        assert len(car_park.chargers) == 2
        assert [len(charger.connectors) for charger in car_park.chargers] == [2, 2]
        assert s.scalar(select(Connector).where(Connector.connector_code == "D101")) is not None
        meters = building.meters
        assert sorted(m.kind for m in meters) == sorted([MeterKind.MASTER] + [MeterKind.TENANT] * 4)
        assert all(m.prepaid for m in meters if m.kind == MeterKind.TENANT)
        assert not any(m.prepaid for m in meters if m.kind == MeterKind.MASTER)
        assert s.scalar(select(Charger).where(Charger.site_id == building.id)) is None

        users = {u.email: u for u in s.scalars(select(User)).all()}
        assert set(users) == set(printed)
        for email, password in printed.items():
            user = users[email]
            assert verify_password(user.password_hash, password), email  # the printed password signs in
            assert user.email_verified_at is not None
        assert users["driver@example.com"].role == Role.CUSTOMER
        assert users["tenant@example.com"].role == Role.CUSTOMER
        assert users["operator@example.com"].role == Role.OPERATOR_STAFF
        assert users["operator@example.com"].operator_id == operator.id
        tenant_meter = s.scalar(select(Meter).join(Tenant, Tenant.id == Meter.tenant_id).where(Tenant.user_id == users["tenant@example.com"].id))
        assert tenant_meter is not None and tenant_meter.site_id == building.id


def test_seed_demo_twice_changes_nothing(app):
    runner = app.test_cli_runner()
    assert runner.invoke(args=["seed-demo"]).exit_code == 0
    before = _snapshot(app)

    second = runner.invoke(args=["seed-demo"])
    assert second.exit_code == 0, second.output
    assert "already present; nothing changed" in second.output
    assert "@example.com" not in second.output  # no new passwords
    assert _snapshot(app) == before


def test_a_restarted_demo_gets_new_passwords_to_print(app):
    """``flask demo`` on an already seeded database cannot show the old (hashed) passwords: it sets new ones."""
    from webapp.seed import reset_demo_passwords, seed

    with app.extensions["db_sessionmaker"].begin() as s:
        assert reset_demo_passwords(s, lambda: "unused") is None  # nothing seeded yet
        seed(s, password_factory=lambda: "first demo password")
    with app.extensions["db_sessionmaker"].begin() as s:
        renewed = reset_demo_passwords(s, password_factory=lambda: "second demo password")
    assert renewed["connectors"] == ["D101", "D102", "D201", "D202"]
    assert renewed["meters"] == ["M0001", "M0002", "M0003", "M0004"]
    assert {email for _, email, _ in renewed["accounts"]} >= {"driver@example.com", "tenant@example.com"}
    with _session(app) as s:
        for _, email, password in renewed["accounts"]:
            user = s.scalar(select(User).where(User.email == email))
            assert password == "second demo password" and verify_password(user.password_hash, password)
            assert user.session_version == 2  # signed-in demo sessions end


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short", "Use at least 10 characters."),
        ("password123", "appears in lists of leaked passwords"),
        ("1234567890", "leaked passwords"),
        ("bossbossboss1", "Do not use your email address"),
    ],
)
def test_create_admin_refuses_a_weak_password_with_the_reason(app, password, reason):
    result = app.test_cli_runner().invoke(args=["create-admin", "boss@example.com", "--password", password])
    assert result.exit_code != 0
    assert reason in result.output
    with _session(app) as s:
        assert s.scalar(select(User)) is None


def test_create_admin_refuses_a_non_address(app):
    result = app.test_cli_runner().invoke(args=["create-admin", "not-an-address", "--password", GOOD_PASSWORD])
    assert result.exit_code != 0
    assert "is not an email address" in result.output


def test_create_admin_creates_a_verified_admin(app):
    # The password is prompted for twice (hidden), as an operator would type it.
    result = app.test_cli_runner().invoke(args=["create-admin", " Boss@Example.com "], input=f"{GOOD_PASSWORD}\n{GOOD_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert "admin boss@example.com ready" in result.output
    assert GOOD_PASSWORD not in result.output  # hidden input
    with _session(app) as s:
        [user] = s.scalars(select(User)).all()
    assert user.email == "boss@example.com"
    assert user.role == Role.ADMIN
    assert user.email_verified_at is not None
    assert verify_password(user.password_hash, GOOD_PASSWORD)


def test_create_admin_promotes_an_existing_account_and_signs_it_out(app, make_user):
    make_user("ana@example.com", verified=False)
    result = app.test_cli_runner().invoke(args=["create-admin", "ana@example.com", "--password", GOOD_PASSWORD])
    assert result.exit_code == 0, result.output
    with _session(app) as s:
        [user] = s.scalars(select(User)).all()
    assert user.role == Role.ADMIN and user.email_verified_at is not None
    assert verify_password(user.password_hash, GOOD_PASSWORD)
    assert user.session_version == 2  # sessions made with the old password no longer count
