"""Shared fixtures: a migrated database (SQLite, or PostgreSQL via VOLTPAY_TEST_DATABASE_URL),
the app, a client, a real SMTP server (aiosmtpd) and account helpers.

Each test starts from empty tables; the schema is built once per run by the
Alembic migrations, so every run also proves the migrations reach head.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, make_url, text

from webapp import create_app
from webapp.auth.passwords import use_fast_parameters_for_tests
from webapp.cli import migrate_to_head
from webapp.db import Base

HERE = Path(__file__).resolve().parent

use_fast_parameters_for_tests()


def _reset_postgres(url: str) -> None:
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    eng.dispose()


def _worker_database(url: str, worker: str) -> str:
    """The database of one pytest-xdist worker: ``<name>_<worker>`` on the same server, created if missing.

    Workers run side by side, so each needs tables of its own; the database named by
    VOLTPAY_TEST_DATABASE_URL is the one a single-process run uses.
    """
    base = make_url(url)
    name = f"{base.database}_{worker}"
    eng = create_engine(base, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        if not c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar():
            c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory, worker_id) -> str:
    """A freshly migrated database for this test run (one per pytest-xdist worker)."""
    url = os.environ.get("VOLTPAY_TEST_DATABASE_URL")
    if url:
        if worker_id != "master":
            url = _worker_database(url, worker_id)
        _reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    migrate_to_head(url)
    return url


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mailbox:
    """Messages received by the test SMTP server."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._cond = threading.Condition()

    def add(self, raw: bytes) -> None:
        with self._cond:
            self.messages.append(message_from_bytes(raw, policy=policy.default))  # type: ignore[arg-type]
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def wait_for(self, to: str, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """Wait until ``count`` messages to ``to`` arrived; return them."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.to(to)) >= count, timeout=timeout)
        if not ok:
            raise AssertionError(f"expected {count} message(s) to {to}, got {[m['To'] + ': ' + m['Subject'] for m in self.messages]}")
        return self.to(to)

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]

    def last_link(self, to: str, path_part: str) -> str:
        """The last URL containing ``path_part`` in the newest message to ``to`` that has one (a receipt may follow)."""
        bodies = [m.get_body(("plain",)).get_content() for m in reversed(self.wait_for(to))]
        for body in bodies:
            links = [u for u in re.findall(r"https?://\S+", body) if path_part in u]
            if links:
                return links[-1]
        raise AssertionError(f"no link with {path_part!r} in: {bodies}")


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook name
        self.box.add(envelope.original_content or envelope.content)
        return "250 Message accepted for delivery"


@pytest.fixture(autouse=True)
def _no_jobs_left_over():
    """Each test starts with an empty in-memory job queue and schedule: a retry another test left is not this test's."""
    from webapp.tasks import huey

    if huey.immediate:
        huey.flush()
    yield


@pytest.fixture(scope="session")
def smtp_server():
    """A real SMTP server on a free local port."""
    box = Mailbox()
    port = free_port()
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=port)
    controller.start()
    yield "127.0.0.1", port, box
    controller.stop()


@pytest.fixture
def mailbox(smtp_server) -> Mailbox:
    """The SMTP server's inbox, emptied for this test."""
    box = smtp_server[2]
    box.clear()
    return box


def _truncate(app) -> None:
    """Empty every table (children first) and start every id sequence again at 1.

    On PostgreSQL a TRUNCATE of all ~55 tables costs about half a second per
    test (every table's files are made again), most of the suite's time; one
    query finds the few tables a test wrote to, and only those are emptied.
    """
    engine = app.extensions["db_engine"]
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            used = c.execute(text("SELECT " + ", ".join(f'EXISTS (SELECT FROM "{t}")' for t in tables))).one()
            for t, has_rows in zip(tables, used, strict=True):
                if has_rows:
                    c.execute(text(f'DELETE FROM "{t}"'))
            c.execute(text("SELECT setval(s.oid, 1, false) FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace "
                           "WHERE s.relkind = 'S' AND n.nspname = current_schema()"))
        else:
            for t in tables:
                c.execute(text(f'DELETE FROM "{t}"'))


@pytest.fixture
def app_config(database_url, smtp_server) -> dict:
    """Settings of the app under test; a test may change them before asking for ``app``."""
    host, port, _box = smtp_server
    return {
        "ENV": "test",
        "SECRET_KEY": "test-secret-key-0123456789abcdef0123456789",
        "DATABASE_URL": database_url,
        "HUEY_IMMEDIATE": True,
        "RATELIMIT_ENABLED": False,
        "SMTP_HOST": host,
        "SMTP_PORT": port,
        "SMTP_STARTTLS": False,
        "BASE_URL": "http://localhost",
        "OIDC_ISSUER": None,
        "REDIS_URL": None,
        "PAGE_CACHE_SECONDS": 0,  # tests change a connector and look again at once (test_charging_pages covers the cache)
    }


@pytest.fixture
def app(app_config):
    """The app, on empty tables."""
    application = create_app(app_config)
    _truncate(application)
    yield application
    application.extensions["db_engine"].dispose()


@pytest.fixture
def client(app):
    """A test client (no CSRF check unless a test turns it on)."""
    app.config["WTF_CSRF_ENABLED"] = False
    return app.test_client()


@pytest.fixture
def csrf_client(app):
    """A test client with CSRF checks on, as a browser would meet them."""
    app.config["WTF_CSRF_ENABLED"] = True
    return app.test_client()


@pytest.fixture
def make_user(app):
    """Create an account directly in the database: ``make_user(email, password, verified=True, **fields)``."""
    from webapp.auth.passwords import hash_password
    from webapp.db import utcnow
    from webapp.models import User

    def make(email: str = "ana@example.com", password: str = "correct horse staple", verified: bool = True, **fields) -> User:
        with app.extensions["db_sessionmaker"].begin() as s:
            user = User(email=email, password_hash=hash_password(password), email_verified_at=utcnow() if verified else None, **fields)
            s.add(user)
        return user

    return make


# --- Stripe through the official SDK against localstripe (see ../shared/notes/localstripe.md) ---

LOCALSTRIPE_CONFIG = {
    "STRIPE_SECRET_KEY": "sk_test_voltpay",
    "STRIPE_PUBLISHABLE_KEY": "pk_test_voltpay",
    "STRIPE_WEBHOOK_SECRET": "whsec_voltpay_tests",
    "STRIPE_LOCALSTRIPE": True,
}


@pytest.fixture(scope="session")
def localstripe_url():
    """localstripe for the whole run: in memory, on a free 127.0.0.1 port (webapp/devtools/localstripe_server.py, as in the demo)."""
    from webapp.devtools import localstripe_server

    proc, url = localstripe_server.start()
    try:
        yield url
    finally:
        localstripe_server.stop(proc)


@pytest.fixture
def stripe_config(localstripe_url) -> dict:
    """Our STRIPE_* settings for localstripe, after wiping its data (webhook registrations survive a wipe)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(localstripe_url + "/_config/data", method="DELETE"), timeout=10).close()
    return {**LOCALSTRIPE_CONFIG, "STRIPE_API_BASE": localstripe_url, "STRIPE_JS_URL": localstripe_url + "/js.stripe.com/v3/"}


@pytest.fixture
def stripe_provider(stripe_config):
    """The Stripe provider, built by the factory as the app builds it, on an empty localstripe."""
    from payments.providers import make_provider

    return make_provider(stripe_config)
