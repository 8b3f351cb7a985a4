"""The support console's read side as staff use it: search, the session timeline, document and meter pages, the queue,
the audit log and its CSV, and who may see what.

Two operators, Alpha and Beta, each with a charging site and a prepaid meter. Sessions are driven through the
charging service the way the gateway drives it (``webapp.charging.service``, chosen timestamps), with the OCPP
messages logged as the gateway logs them; card holds go to localstripe through the official SDK; emails go out
through the real SMTP test server. Staff sign in through the sign-in form.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from payments import wallet
from payments.base import utcnow
from payments.cards import CardPayment, State
from payments.invoicing import Document
from payments.ledger import AccountKind, get_account, transfer
from payments.money import Money
from payments.providers.base import CardDeclined
from payments.tariff_store import add_version, connector_owner
from tests.stripe_browser import DECLINED_AT_CHARGE, VISA, browser_card
from tests.webapp.test_charging_service import SIMPLE, Charger_
from tests.webapp.wallet_helpers import text
from webapp.auth.passwords import hash_password
from webapp.charging import jobs, service
from webapp.charging.models import ChargerConnection, ChargingSession, CommandStatus, OcppMessage, PaymentKind, SessionState
from webapp.charging.service import Reading, StartRequest
from webapp.meters import topup
from webapp.meters.models import Tenant
from webapp.models import Charger, Connector, Meter, Operator, Role, Site, User
from webapp.notifications.models import NotificationPreferences
from webapp.support import audit as audit_log
from webapp.support import console
from webapp.support.models import ApprovalRequest, Ticket, TicketCategory

PASSWORD = "correct horse staple"
MADRID = ZoneInfo("Europe/Madrid")


# --------------------------------------------------------------------------- the world


@dataclass
class Side:
    """One operator's things."""

    operator_id: int
    cp_id: str
    codes: tuple[str, str]
    meter_code: str
    name: str


def make_operator(app, *, name: str, prefix: str, cp_id: str, codes: tuple[str, str], meter_code: str, tenant_email: str) -> Side:
    """An operator with a site in Madrid: one online charger of two connectors (0.35/kWh + 21 % VAT) and a prepaid meter."""
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name=name, legal_name=f"{name} S.L.", document_prefix=prefix)
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name=f"{name} car park", time_zone="Europe/Madrid", currency="EUR", min_billable_wh=100,
                    min_billable_s=60)
        s.add(site)
        s.flush()
        ch = Charger(site_id=site.id, charge_point_id=cp_id, password_hash="x")
        s.add(ch)
        s.flush()
        for n, code in enumerate(codes, 1):
            c = Connector(charger_id=ch.id, number=n, connector_code=code, max_power_kw=22, status="Available")
            s.add(c)
            s.flush()
            add_version(s, connector_owner(c.id), SIMPLE, site_currency="EUR", created_by="test",
                        now=utcnow() - dt.timedelta(days=1))
        s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id=f"conn-{cp_id}"))
        tenant = Tenant(site_id=site.id, name=f"{name} tenant", contact_email=tenant_email, unit="1A")
        s.add(tenant)
        s.flush()
        s.add(Meter(site_id=site.id, meter_code=meter_code, serial=f"SN-{meter_code}", tenant_id=tenant.id))
        return Side(op.id, cp_id, codes, meter_code, name)


@pytest.fixture
def world(app):
    """Alpha (charger CP-A: AL101, AL102; meter MA0001) and Beta (charger CP-B: BE101, BE102; meter MB0001)."""
    return {
        "a": make_operator(app, name="Alpha Charge", prefix="AL", cp_id="CP-A", codes=("AL101", "AL102"), meter_code="MA0001",
                           tenant_email="tess@example.com"),
        "b": make_operator(app, name="Beta Power", prefix="BE", cp_id="CP-B", codes=("BE101", "BE102"), meter_code="MB0001",
                           tenant_email="tom@example.com"),
    }


def db(app):
    return app.extensions["db_sessionmaker"]()


def add_user(app, email: str, **fields) -> User:
    """An account with a confirmed email and the test password (as ``make_user``, for any app of the test)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        user = User(email=email, password_hash=hash_password(PASSWORD), email_verified_at=utcnow(), **fields)
        s.add(user)
    return user


def customer(app, email: str, euros: int = 50, *, receipts: bool = False) -> User:
    """A customer account with money in its wallet; receipts by email only when asked (rendering their PDF takes time)."""
    user = add_user(app, email)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.add(NotificationPreferences(user_id=user.id, receipts=receipts))
        transfer(s, idempotency_key=f"gift:{user.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user.owner, "EUR"), amount=Money(euros * 100, "EUR"))
    return user


def staff(app, email: str, role: Role = Role.SUPPORT, operator_id: int | None = None):
    """A test client signed in as a staff member (or any account)."""
    add_user(app, email, role=role, operator_id=operator_id)
    app.config["WTF_CSRF_ENABLED"] = False
    c = app.test_client()
    resp = c.post("/auth/sign-in", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302, resp.get_data(as_text=True)[-2000:]
    return c


def start(app, side: Side, user: User | None, *, at: dt.datetime, connector: int = 1, gateway=None, **kw) -> ChargingSession:
    """A session opened and started at ``at`` through the charging service (the charger accepts the start)."""
    with app.app_context(), db(app) as s:
        c = s.scalar(select(Connector).where(Connector.connector_code == side.codes[connector - 1]))
        req = StartRequest(connector=c, user=s.get(User, user.id) if user else None, email=kw.pop("email", None),
                           payment_kind=kw.pop("payment_kind", PaymentKind.WALLET), **kw)
        res = service.start_session(s, app.extensions.get("payment_provider"), gateway or Charger_(), req, now=at)
        s.expunge(res.session)
        return res.session


def ocpp(app, side: Side, fn, *, session_id: int | None, action: str, payload: dict, now: dt.datetime, **kw):
    """A charger message applied as the gateway applies it: one transaction with the message and our answer logged."""
    with app.app_context():
        with db(app) as s:
            charger = s.scalar(select(Charger).where(Charger.charge_point_id == side.cp_id))
            ans = fn(s, charger, now=now, **kw)
            s.add(OcppMessage(charger_id=charger.id, session_id=session_id, direction="in", action=action, payload=json.dumps(payload), at=now))
            s.add(OcppMessage(charger_id=charger.id, session_id=session_id, direction="out", action=action, payload="{}", at=now))
            s.commit()
        jobs.enqueue_settlements(ans.settle if isinstance(ans, service.Answer) else [])
        return ans


def charge(app, side: Side, cs: ChargingSession, t0: dt.datetime, *, readings: list[tuple[int, int]], stop_s: int, stop_wh: int) -> None:
    """StartTransaction at ``t0``, MeterValues (seconds after t0, Wh delivered), StopTransaction; the car leaves at once."""
    ocpp(app, side, service.start_transaction, session_id=cs.id, action="StartTransaction", payload={"idTag": cs.id_tag, "meterStart": 0},
         now=t0, connector_number=1, id_tag=cs.id_tag, meter_start_wh=D(0), timestamp=t0)
    for sec, wh in readings:
        at = t0 + dt.timedelta(seconds=sec)
        ocpp(app, side, service.meter_values, session_id=cs.id, action="MeterValues", payload={"transactionId": cs.id, "wh": wh}, now=at,
             connector_number=1, transaction_id=cs.id, readings=[Reading(at, D(wh), D(11000))])
    at = t0 + dt.timedelta(seconds=stop_s)
    ocpp(app, side, service.stop_transaction, session_id=cs.id, action="StopTransaction", payload={"transactionId": cs.id, "meterStop": stop_wh},
         now=at, transaction_id=cs.id, meter_stop_wh=D(stop_wh), timestamp=at, reason="Local", readings=[])


def paid_session(app, side: Side, user: User, *, t0: dt.datetime | None = None, stop_wh: int = 7000) -> tuple[ChargingSession, Document]:
    """A wallet session charged 20 minutes ago and billed: 7 kWh = 2.96 with VAT. Returns the session and its invoice."""
    t0 = t0 or utcnow() - dt.timedelta(minutes=20)
    cs = start(app, side, user, at=t0 - dt.timedelta(minutes=1))
    charge(app, side, cs, t0, readings=[(300, stop_wh // 2)], stop_s=600, stop_wh=stop_wh)
    with db(app) as s:
        cs = s.get(ChargingSession, cs.id)
        assert cs.state == SessionState.COMPLETED, (cs.state, cs.failure_code)
        doc = s.scalar(select(Document).where(Document.source == f"session:{cs.id}"))
        s.expunge_all()
    return cs, doc


def review_session(app, side: Side, user: User) -> ChargingSession:
    """A session whose meter went backwards: billed by nobody, in review with its hold kept."""
    t0 = utcnow() - dt.timedelta(minutes=30)
    cs = start(app, side, user, at=t0 - dt.timedelta(minutes=1))
    charge(app, side, cs, t0, readings=[(300, 3000), (400, 2000)], stop_s=600, stop_wh=4000)
    with db(app) as s:
        row = s.get(ChargingSession, cs.id)
        assert row.state == SessionState.REVIEW
        return row


def backdate_session(app, session_id: int, age: dt.timedelta) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(ChargingSession).where(ChargingSession.id == session_id).values(updated_at=utcnow() - age))


def leave_holding(app, session_id: int, state: SessionState, ago: dt.timedelta) -> None:
    """End a session as the service would, minus the release of its hold (what a provider outage leaves behind)."""
    with app.extensions["db_sessionmaker"].begin() as s:
        s.execute(update(ChargingSession).where(ChargingSession.id == session_id)
                  .values(state=state, active_connector_id=None, updated_at=utcnow() - ago))


def page(resp) -> str:
    assert resp.status_code == 200, resp.status_code
    return text(resp)


def rows(resp, testid: str, attr: str) -> list[str]:
    """The ``data-<attr>`` values of the rows inside the element marked ``data-testid=<testid>``, in page order."""
    html = resp.get_data(as_text=True)
    m = re.search(rf'data-testid="{testid}".*?</(table|section|ul|ol)>', html, re.S)
    return re.findall(rf'data-{attr}="([^"]*)"', m.group(0)) if m else []


# --------------------------------------------------------------------------- who may see what


def test_another_operators_session_document_and_meter_are_not_found_and_never_in_search(app, world):
    a, b = world["a"], world["b"]
    ana, ben = customer(app, "ana@example.com"), customer(app, "ben@example.com")
    a_cs, a_doc = paid_session(app, a, ana)
    b_cs, b_doc = paid_session(app, b, ben)
    assert a_doc.number.startswith("AL-") and b_doc.number.startswith("BE-")

    for who, role in (("agent@alpha.example", Role.SUPPORT), ("staff@alpha.example", Role.OPERATOR_STAFF)):
        c = staff(app, who, role, a.operator_id)
        assert c.get(f"/support/sessions/{a_cs.id}").status_code == 200
        assert c.get(f"/support/documents/{a_doc.number}").status_code == 200
        assert c.get(f"/support/meters/{a.meter_code}").status_code == 200
        for url in (f"/support/sessions/{b_cs.id}", f"/support/documents/{b_doc.number}", f"/support/meters/{b.meter_code}"):
            resp = c.get(url)
            assert resp.status_code == 404, url  # the same answer as something that does not exist
            assert "Beta" not in resp.get_data(as_text=True)
        assert c.get("/support/sessions/999999").status_code == 404
        assert c.get("/support/documents/AL-2000-000001").status_code == 404
        for q in ("ben@example.com", b_doc.number, str(b_cs.id), b.codes[0], b.meter_code, "tom@example.com"):
            resp = c.get("/support/", query_string={"q": q})
            assert "data-testid=\"no-results\"" in resp.get_data(as_text=True), q
            assert "Beta" not in text(resp) and f"#{b_cs.id}" not in text(resp)

    platform = staff(app, "agent@voltpay.example")  # platform support: no operator
    for url in (f"/support/sessions/{a_cs.id}", f"/support/sessions/{b_cs.id}", f"/support/documents/{b_doc.number}",
                f"/support/meters/{b.meter_code}"):
        assert platform.get(url).status_code == 200, url
    both = platform.get("/support/", query_string={"q": "example.com"})  # not an email: nothing
    assert rows(both, "result-sessions", "session") == []
    assert rows(platform.get("/support/", query_string={"q": str(b_cs.id)}), "result-sessions", "session") == [str(b_cs.id)]
    assert rows(platform.get("/support/", query_string={"q": "ben@example.com"}), "result-sessions", "session") == [str(b_cs.id)]


def test_a_customer_is_refused_and_a_guest_is_sent_to_sign_in(app, world):
    ana = customer(app, "ana@example.com")
    cs, _doc = paid_session(app, world["a"], ana)
    signed_in = staff(app, "carla@example.com", Role.CUSTOMER)
    for url in ("/support/", f"/support/sessions/{cs.id}", "/support/queue", "/support/audit", "/support/audit.csv"):
        assert signed_in.get(url).status_code == 403, url
        guest = app.test_client().get(url)
        assert guest.status_code == 302 and "/auth/sign-in" in guest.headers["Location"], url


# --------------------------------------------------------------------------- search


def test_search_finds_each_kind_of_key(app, world):
    a = world["a"]
    ana = customer(app, "ana@example.com")
    cs, doc = paid_session(app, a, ana)
    agent = staff(app, "agent@alpha.example", Role.SUPPORT, a.operator_id)

    def search(q, **extra):
        resp = agent.get("/support/", query_string={"q": q, **extra})
        assert resp.status_code == 200
        return resp

    by_email = search("  ANA@example.com ")
    assert rows(by_email, "result-sessions", "session") == [str(cs.id)]
    assert rows(by_email, "result-documents", "document") == [doc.number]
    assert rows(by_email, "result-users", "user") == [str(ana.id)]
    assert rows(search(doc.number), "result-documents", "document") == [doc.number]
    assert rows(search(doc.number.lower()), "result-documents", "document") == [doc.number]
    assert rows(search(str(cs.id)), "result-sessions", "session") == [str(cs.id)]
    assert rows(search(f"#{cs.id}"), "result-sessions", "session") == [str(cs.id)]
    by_connector = search("al101")
    assert rows(by_connector, "result-connectors", "connector") == ["AL101"]
    assert f'href="/support/sessions/{cs.id}"' in by_connector.get_data(as_text=True)
    assert rows(search(a.meter_code), "result-meters", "meter") == [a.meter_code]
    by_tenant = search("tess@example.com")
    assert rows(by_tenant, "result-meters", "meter") == [a.meter_code] and "Alpha Charge tenant" in text(by_tenant)
    # the day narrows to sessions of that day in the site's time zone
    today = cs.created_at.astimezone(MADRID).date()
    assert rows(search("ana@example.com", day=today.isoformat()), "result-sessions", "session") == [str(cs.id)]
    assert rows(search("ana@example.com", day=(today - dt.timedelta(days=1)).isoformat()), "result-sessions", "session") == []
    assert "data-testid=\"no-results\"" in search("nobody@example.com").get_data(as_text=True)
    bad = agent.get("/support/", query_string={"q": "ana@example.com", "day": "31/12/2026"})
    assert bad.status_code == 400 and "YYYY-MM-DD" in text(bad)
    assert agent.get("/support/", query_string={"q": "9" * 40}).status_code == 200  # too long for an id: nothing, no error
    assert agent.get("/support/", query_string={"q": "4242", "day": "9999-12-31"}).status_code == 400


@pytest.fixture
def card_app(app_config, stripe_config):
    """The app with card payments at localstripe."""
    from tests.conftest import _truncate
    from webapp import create_app

    application = create_app({**app_config, **stripe_config})
    _truncate(application)
    yield application
    application.extensions["db_engine"].dispose()


def card_session(app, side: Side, number: str, *, email: str, at: dt.datetime) -> ChargingSession:
    provider = app.extensions["payment_provider"]
    pm = browser_card(app.config, number)
    card = provider.card_of(payment_method_id=pm)
    return start(app, side, None, at=at, email=email, payment_kind=PaymentKind.CARD, payment_method_id=pm, card_brand=card.brand,
                 card_last4=card.last4)


def test_search_by_card_last_four_and_the_day_in_the_sites_time_zone(card_app):
    a = make_operator(card_app, name="Alpha Charge", prefix="AL", cp_id="CP-A", codes=("AL101", "AL102"), meter_code="MA0001",
                      tenant_email="tess@example.com")
    b = make_operator(card_app, name="Beta Power", prefix="BE", cp_id="CP-B", codes=("BE101", "BE102"), meter_code="MB0001",
                      tenant_email="tom@example.com")
    late = dt.datetime(2026, 3, 4, 23, 30, tzinfo=dt.UTC)  # still 4 March in UTC, already 00:30 on 5 March in Madrid
    mine = card_session(card_app, a, VISA, email="guest@example.com", at=utcnow())
    theirs = card_session(card_app, b, VISA, email="other@example.com", at=utcnow())
    with card_app.extensions["db_sessionmaker"].begin() as s:  # as if paid just after midnight in Madrid
        s.execute(update(ChargingSession).where(ChargingSession.id == mine.id).values(created_at=late))
        s.execute(update(CardPayment).where(CardPayment.id == mine.card_payment_id).values(created_at=late))
    agent = staff(card_app, "agent@alpha.example", Role.SUPPORT, a.operator_id)

    found = agent.get("/support/", query_string={"q": "4242", "day": "2026-03-05"})
    assert rows(found, "result-sessions", "session") == [str(mine.id)]
    assert rows(found, "result-payments", "payment") == [str(mine.card_payment_id)]
    assert "•••• 4242" in text(found)
    assert rows(agent.get("/support/", query_string={"q": "4242", "day": "2026-03-04"}), "result-sessions", "session") == []  # UTC's day
    assert rows(agent.get("/support/", query_string={"q": "4242"}), "result-sessions", "session") == [str(mine.id)]  # B's never
    platform = staff(card_app, "agent@voltpay.example")
    today = utcnow().astimezone(MADRID).date().isoformat()
    assert rows(platform.get("/support/", query_string={"q": "4242", "day": today}), "result-sessions", "session") == [str(theirs.id)]


# --------------------------------------------------------------------------- the session page


def test_the_session_timeline_shows_ocpp_messages_ledger_entries_documents_and_emails_in_time_order(app, world, mailbox):
    a = world["a"]
    ana = customer(app, "ana@example.com", receipts=True)
    cs, doc = paid_session(app, a, ana)
    mailbox.wait_for("ana@example.com", count=3)  # started, the invoice, completed
    agent = staff(app, "agent@alpha.example", Role.SUPPORT, a.operator_id)
    with app.app_context(), db(app) as s:
        me = s.scalar(select(User).where(User.email == "agent@alpha.example"))
        audit_log.record(s, action="resend_receipt", object_type="session", object_id=cs.id, operator_id=a.operator_id, reason="lost",
                         before={"sent": 1}, after={"sent": 2}, actor=me)
        s.add(ApprovalRequest(operator_id=a.operator_id, action="refund", object_type="session", object_id=str(cs.id), params_json="{}",
                              amount_minor=250, currency="EUR", reason="charged twice", requested_by_id=me.id))
        s.commit()

    resp = agent.get(f"/support/sessions/{cs.id}")
    body = page(resp)
    html = resp.get_data(as_text=True)
    # the header
    for expected in ("Alpha Charge car park", "AL101", "ana@example.com", "completed", "€2.96", "€0.00"):
        assert expected in body, expected
    assert re.search(r'data-testid="hold">[^<]*€', html)
    # every kind of thing
    events = re.findall(r'<li class="entry" data-kind="(\w+)" data-at="([^"]+)"', html)
    kinds = [k for k, _at in events]
    for kind in ("session", "ocpp", "command", "ledger", "document", "email", "audit"):
        assert kind in kinds, kind
    times = [dt.datetime.fromisoformat(at) for _k, at in events]
    assert times == sorted(times)  # oldest first
    assert re.search(r"← StartTransaction.*← MeterValues.*← StopTransaction", body)
    assert body.count("← StartTransaction") == 1 and "RemoteStartTransaction: accepted" in body
    assert re.search(r"Charging started.*Charging stopped.*Car left.*Settled", body)
    hold = f"€{cs.hold_minor // 100}.{cs.hold_minor % 100:02d}"
    assert f"Reserved for charging session:{cs.id}:wallet:hold debit {hold} · customer_wallet user:{ana.id} credit {hold} · wallet_hold" in body
    assert "Charging paid from wallet" in body and "credit €2.45 · revenue" in body and "Revenue allocated" in body
    assert f"Invoice {doc.number}: €2.96" in body and f'href="/support/documents/{doc.number}"' in html
    for template in ("session_started", "receipt", "session_completed"):
        assert f"Email “{template}” to ana@example.com" in body, template
    assert body.index("Settled priced") < body.index(f"Invoice {doc.number}: ")
    assert "resend_receipt" in body and "by agent@alpha.example" in body and "reason: lost" in body
    assert "Approval asked for refund of €2.50: pending" in body and "reason: charged twice" in body


def test_the_document_and_meter_pages(app, world):
    a, b = world["a"], world["b"]
    ana = customer(app, "ana@example.com")
    tom = customer(app, "tom@example.com")
    cs, doc = paid_session(app, a, ana)
    with app.app_context(), db(app) as s:
        service.refund_session(s, None, cs.id, Money(50, "EUR"), reason="late start", key="t2", now=utcnow())
        meter = s.scalar(select(Meter).where(Meter.meter_code == b.meter_code))
        s.get(Tenant, meter.tenant_id).user_id = tom.id
        top = topup.top_up_from_wallet(s, meter=meter, user=s.get(User, tom.id), amount=Money(2000, "EUR"), key="k1")
        receipt = top.document.number
        s.add(Ticket(reference="T-METER001", access_token_hash="0" * 64, operator_id=b.operator_id, email="tom@example.com",
                     category=TicketCategory.METER, subject="My meter", meter_id=meter.id))
        s.commit()
    agent = staff(app, "staff@alpha.example", Role.OPERATOR_STAFF, a.operator_id)

    resp = agent.get(f"/support/documents/{doc.number}")
    body = page(resp)
    for expected in (doc.number, "€2.96", "€2.45", "€0.51", "energy", "21", "ana@example.com", f"Session #{cs.id}"):
        assert expected in body, expected
    assert re.search(r"AL-CN-\d{4}-000001 · €0\.50", body)
    assert f'href="/support/sessions/{cs.id}"' in resp.get_data(as_text=True)
    timeline = page(agent.get(f"/support/sessions/{cs.id}"))  # the credit note, its booking, the refunded amount
    assert re.search(r"Credit note AL-CN-\d{4}-000001: €0\.50", timeline) and "Charging refunded" in timeline
    assert re.search(r'data-testid="refunded">€0\.50', agent.get(f"/support/sessions/{cs.id}").get_data(as_text=True))

    beta = staff(app, "staff@beta.example", Role.OPERATOR_STAFF, b.operator_id)
    resp = beta.get(f"/support/meters/{b.meter_code.lower()}")
    body = page(resp)
    for expected in ("Beta Power tenant", "tom@example.com", "€20.00", "connected", "Meter top-up from wallet", receipt, "T-METER001"):
        assert expected in body, expected
    assert f'href="/support/documents/{receipt}"' in resp.get_data(as_text=True)
    receipt_page = page(beta.get(f"/support/documents/{receipt}"))
    assert f"Meter {b.meter_code}" in receipt_page and "€20.00" in receipt_page


# --------------------------------------------------------------------------- the queue


def test_the_queue_lists_review_sessions_and_failed_payments_oldest_first(card_app):
    app = card_app
    a = make_operator(app, name="Alpha Charge", prefix="AL", cp_id="CP-A", codes=("AL101", "AL102"), meter_code="MA0001",
                      tenant_email="tess@example.com")
    b = make_operator(app, name="Beta Power", prefix="BE", cp_id="CP-B", codes=("BE101", "BE102"), meter_code="MB0001",
                      tenant_email="tom@example.com")
    ana, ben = customer(app, "ana@example.com", euros=500), customer(app, "ben@example.com")
    first = review_session(app, a, ana)
    second = review_session(app, a, ana)
    theirs = review_session(app, b, ben)
    backdate_session(app, second.id, dt.timedelta(hours=3))  # the second went to review first
    backdate_session(app, first.id, dt.timedelta(hours=1))
    stuck = start(app, a, ana, at=utcnow() - dt.timedelta(minutes=30), connector=2, gateway=Charger_(CommandStatus.TIMEOUT))
    assert stuck.state == SessionState.START_REQUESTED  # its start window closed 27 minutes ago: the watchdog missed it

    declined_hold = card_session(app, a, DECLINED_AT_CHARGE, email="dee@example.com", at=utcnow())
    assert declined_hold.state == SessionState.FAILED
    # Two sessions that ended without charging while the hold could not be given back (the provider was down, the
    # process died): the card authorisation is still open at localstripe, the wallet hold still booked.
    card_left = card_session(app, a, VISA, email="carl@example.com", at=utcnow())
    leave_holding(app, card_left.id, SessionState.CANCELLED, dt.timedelta(minutes=10))
    wallet_left = start(app, a, ana, at=utcnow())
    leave_holding(app, wallet_left.id, SessionState.START_TIMEOUT, dt.timedelta(minutes=20))
    with app.app_context(), db(app) as s:
        meter = s.scalar(select(Meter).where(Meter.meter_code == a.meter_code))
        pm = browser_card(app.config, DECLINED_AT_CHARGE)
        row = topup.start_meter_top_up(s, meter=meter, owner=topup.guest_owner(meter), email="payer@example.com",
                                       amount=Money(2000, "EUR"), payment_method_id=pm, customer_id=None)
        s.commit()
        with pytest.raises(CardDeclined):
            from payments import cards

            cards.submit(s, app.extensions["payment_provider"], row)
        s.commit()
        top_up_id = row.id
        assert s.get(CardPayment, top_up_id).state == State.FAILED
        s.execute(update(CardPayment).where(CardPayment.id == top_up_id).values(updated_at=utcnow() - dt.timedelta(hours=2)))
        s.add(Ticket(reference="T-OPEN0001", access_token_hash="0" * 64, operator_id=a.operator_id, email="ana@example.com",
                     category=TicketCategory.CHARGING, subject="Help", created_at=utcnow() - dt.timedelta(hours=5)))
        s.add(Ticket(reference="T-OPEN0002", access_token_hash="1" * 64, operator_id=b.operator_id, email="ben@example.com",
                     category=TicketCategory.CHARGING, subject="Help"))
        s.commit()

    agent = staff(app, "agent@alpha.example", Role.SUPPORT, a.operator_id)
    resp = agent.get("/support/queue")
    body = page(resp)
    assert rows(resp, "queue-sessions", "session") == [str(x.id) for x in (second, first, stuck, wallet_left, card_left)]
    assert rows(resp, "queue-sessions", "reason") == ["review", "review", "start_stuck", "hold_not_released", "hold_not_released"]
    assert "card payment authorized" in body and "wallet hold" in body
    assert "meter_backwards" in body and "3 hours" in body
    assert rows(resp, "queue-payments", "payment") == [str(top_up_id), str(declined_hold.card_payment_id)]
    assert rows(resp, "queue-payments", "purpose") == ["meter_top_up", "charging_session"]
    assert "Meter MA0001" in body and "2 hours" in body
    assert "1 open ticket" in body and "5 hours" in body
    assert str(theirs.id) not in rows(resp, "queue-sessions", "session")

    platform = staff(app, "agent@voltpay.example")
    resp = platform.get("/support/queue")
    assert str(theirs.id) in rows(resp, "queue-sessions", "session") and "2 open tickets" in text(resp)
    assert platform.get("/support/queue?days=abc").status_code == 400


def test_what_counts_as_stuck():
    now = dt.datetime(2026, 3, 4, 12, 0, tzinfo=dt.UTC)

    def cs(state, **kw):
        base = {"updated_at": now, "max_idle_s": 900}
        return ChargingSession(state=state, **{**base, **kw})

    minutes = lambda n: dt.timedelta(minutes=n)  # noqa: E731
    assert console.stuck_reason(cs(SessionState.START_REQUESTED, start_deadline=now - minutes(1)), now) is None  # the watchdog's turn
    assert console.stuck_reason(cs(SessionState.START_REQUESTED, start_deadline=now - minutes(3)), now) == ("start_stuck", now - minutes(3))
    assert console.stuck_reason(cs(SessionState.PENDING, updated_at=now - minutes(16)), now) is None
    assert console.stuck_reason(cs(SessionState.PENDING, updated_at=now - minutes(20)), now)[0] == "pending_stuck"
    asked = now - minutes(6)
    assert console.stuck_reason(cs(SessionState.CHARGING, stop_requested_at=now, last_message_at=now), now, first_stop=asked) == ("stop_stuck", asked)
    assert console.stuck_reason(cs(SessionState.CHARGING, stop_requested_at=now, last_message_at=now), now, first_stop=now - minutes(4)) is None
    assert console.stuck_reason(cs(SessionState.CHARGING, last_message_at=now - dt.timedelta(hours=25)), now)[0] == "silent"
    assert console.stuck_reason(cs(SessionState.FINISHING, stopped_at=now - minutes(16)), now) is None  # 15 min idle allowance + grace
    assert console.stuck_reason(cs(SessionState.FINISHING, stopped_at=now - minutes(18)), now) == ("idle_stuck", now - minutes(3))
    assert console.stuck_reason(cs(SessionState.FINISHING, stopped_at=now - minutes(30), ended_at=now - minutes(20)), now)[0] == "settle_stuck"
    assert console.stuck_reason(cs(SessionState.CHARGING, last_message_at=now), now) is None


# --------------------------------------------------------------------------- the audit log


def test_the_audit_log_filters_exports_the_same_rows_and_is_scoped(app, world):
    a, b = world["a"], world["b"]
    ana = customer(app, "ana@example.com")
    cs, _doc = paid_session(app, a, ana)
    agent = staff(app, "agent@alpha.example", Role.SUPPORT, a.operator_id)
    other = staff(app, "agent@beta.example", Role.SUPPORT, b.operator_id)
    with app.app_context(), db(app) as s:
        me = s.scalar(select(User).where(User.email == "agent@alpha.example"))
        them = s.scalar(select(User).where(User.email == "agent@beta.example"))
        day = dt.datetime(2026, 3, 4, 10, tzinfo=dt.UTC)
        entries = [
            ("refund", "session", cs.id, a.operator_id, me, "=HYPERLINK(\"http://evil\")", day),
            ("resend_receipt", "session", cs.id, a.operator_id, me, "lost email", day + dt.timedelta(days=1)),
            ("release_hold", "session", cs.id, a.operator_id, me, "stuck", day + dt.timedelta(days=2)),
            ("unlock", "meter", a.meter_code, a.operator_id, me, "-1 kWh", day + dt.timedelta(days=1)),
            ("refund", "session", 999, b.operator_id, them, "theirs", day + dt.timedelta(days=1)),
        ]
        for action, otype, oid, op, actor, reason, at in entries:
            e = audit_log.record(s, action=action, object_type=otype, object_id=oid, operator_id=op, reason=reason, actor=actor,
                                 before={"x": 1}, after={"x": 2})
            e.at = at
        s.commit()

    def ids(resp) -> list[str]:
        return rows(resp, "audit-entries", "entry")

    def csv_rows(resp) -> list[dict]:
        assert resp.status_code == 200 and resp.mimetype == "text/csv"
        return list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))

    everything = agent.get("/support/audit")
    assert len(ids(everything)) == 4 and "theirs" not in text(everything)  # newest first, B's never
    filters = {"object_type": "session", "object_id": str(cs.id), "from": "2026-03-04", "to": "2026-03-05"}
    shown = agent.get("/support/audit", query_string=filters)
    exported = csv_rows(agent.get("/support/audit.csv", query_string=filters))
    assert [r["id"] for r in exported] == ids(shown) and len(exported) == 2
    assert [r["action"] for r in exported] == ["resend_receipt", "refund"]  # newest first
    assert exported[1]["reason"] == "'=HYPERLINK(\"http://evil\")" and exported[1]["actor_email"] == "agent@alpha.example"
    by_actor = csv_rows(agent.get("/support/audit.csv", query_string={"actor": "ALPHA", "action": "unlock"}))
    assert [(r["object_type"], r["object_id"], r["reason"]) for r in by_actor] == [("meter", a.meter_code, "'-1 kWh")]
    assert ids(agent.get("/support/audit", query_string={"actor": "beta"})) == []
    assert len(ids(other.get("/support/audit"))) == 1 and len(csv_rows(other.get("/support/audit.csv"))) == 1
    platform = staff(app, "agent@voltpay.example")
    assert len(csv_rows(platform.get("/support/audit.csv"))) == 5
    bad = agent.get("/support/audit", query_string={"from": "2026-03-05", "to": "2026-03-04"})
    assert bad.status_code == 400 and "before the start date" in text(bad)
    assert agent.get("/support/audit.csv", query_string={"from": "tomorrow"}).status_code == 400
    assert agent.get("/support/audit", query_string={"to": "9999-12-31"}).status_code == 400
    # the session page shows its own entries
    assert "resend_receipt" in page(agent.get(f"/support/sessions/{cs.id}"))
    with db(app) as s:
        assert [e.action for e in console.audit_for(s, "session", cs.id)] == ["refund", "resend_receipt", "release_hold"]


def test_the_audit_log_pages(app, world):
    a = world["a"]
    agent = staff(app, "agent@alpha.example", Role.SUPPORT, a.operator_id)
    with app.app_context(), db(app) as s:
        start_at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for i in range(console.AUDIT_PAGE + 3):
            e = audit_log.record(s, action="note", object_type="meter", object_id=a.meter_code, operator_id=a.operator_id, reason=f"n{i}")
            e.at = start_at + dt.timedelta(minutes=i)
        s.commit()
    first = agent.get("/support/audit")
    second = agent.get("/support/audit", query_string={"page": 2})
    assert len(rows(first, "audit-entries", "entry")) == console.AUDIT_PAGE and len(rows(second, "audit-entries", "entry")) == 3
    assert 'rel="next"' in first.get_data(as_text=True) and 'rel="prev"' in second.get_data(as_text=True)
    assert "n52" in text(first) and "n0" in text(second)
    assert agent.get("/support/audit?page=0").status_code == 400
