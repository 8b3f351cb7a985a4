"""The operator console's analytics and orders (``webapp.console.analytics``, ``webapp.console.orders``).

Data is made the way the product makes it: charging sessions opened, held,
started, stopped and settled by ``webapp.charging.service`` (the gateway's
calls, with chosen timestamps; a card session through localstripe), a refund
through ``refund_session``, a meter top-up through ``webapp.meters.topup`` and
a bill paid through ``webapp.meters.bills``. The figures on the page are
compared with the ledger (postings of the period) and the session rows; the
exports are read back with ``csv`` and ``openpyxl`` and compared with the
page's table, row by row.

Operator A has two sites, "Harbour" (Madrid: charger CP-A1, two connectors,
and meters) and "Bund" (Shanghai: charger CP-A2, one connector); operator B
has "Elsewhere" (charger CP-B1, a meter). Prices: 0.35/kWh + 21 % VAT.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from decimal import Decimal as D
from html import unescape
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import openpyxl
import pytest
from sqlalchemy import func, select, text

from payments import cards, wallet
from payments.base import utcnow
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting, get_account, transfer
from payments.money import Money
from payments.money import format as format_money
from payments.settlement import Party
from payments.tariff_store import add_version, connector_owner
from tests.webapp.test_charging_service import SIMPLE, Charger_
from webapp.auth.passwords import hash_password
from webapp.charging import service
from webapp.charging.models import ChargerConnection, ChargingSession, PaymentKind, SessionState
from webapp.charging.service import StartRequest
from webapp.db import Base
from webapp.meters import bills, topup
from webapp.meters.models import Bill, Billing, BillState, Tenant
from webapp.models import Charger, Connector, Meter, Operator, Role, Site, User

PASSWORD = "correct horse staple"
SHANGHAI = ZoneInfo("Asia/Shanghai")


# --------------------------------------------------------------------------- building the data through the services


@pytest.fixture
def app_config(app_config, tmp_path):
    """Background jobs are queued, not run: no worker here, so receipts are not rendered and emailed (the figures do not need them)."""
    return {**app_config, "HUEY_IMMEDIATE": False, "HUEY_PATH": str(tmp_path / "huey.db")}


def sm(app):
    return app.extensions["db_sessionmaker"]


def make_operator(app, name: str, sites: list[tuple[str, str, str, int]]) -> dict:
    """An operator with ``sites`` = [(site name, time zone, charge point id, connectors)]; every charger online, priced SIMPLE."""
    out = {"sites": {}, "chargers": {}, "codes": {}}
    with sm(app).begin() as s:
        op = Operator(name=name, legal_name=f"{name} S.L.", document_prefix=name[:4].upper())
        s.add(op)
        s.flush()
        out["op"] = op.id
        for site_name, tz, cp_id, n in sites:
            site = Site(operator_id=op.id, name=site_name, time_zone=tz, currency="EUR", min_billable_wh=0, min_billable_s=0)
            s.add(site)
            s.flush()
            ch = Charger(site_id=site.id, charge_point_id=cp_id, password_hash="x")
            s.add(ch)
            s.flush()
            s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id=f"c-{cp_id}"))
            for k in range(1, n + 1):
                code = f"{cp_id.replace('-', '')}{k:02d}"
                c = Connector(charger_id=ch.id, number=k, connector_code=code, max_power_kw=22, status="Available")
                s.add(c)
                s.flush()
                add_version(s, connector_owner(c.id), SIMPLE, site_currency="EUR", created_by="test")
                out["codes"][code] = c.id
            out["sites"][site_name], out["chargers"][cp_id] = site.id, ch.id
    return out


def account(app, email: str, euros: int = 0, **fields) -> int:
    """A verified account (with ``euros`` in its wallet); its id."""
    with sm(app).begin() as s:
        u = User(email=email, password_hash=hash_password(PASSWORD), email_verified_at=utcnow(), **fields)
        s.add(u)
        s.flush()
        if euros:
            transfer(s, idempotency_key=f"gift:{u.id}", description="test", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                     credit=wallet.wallet(s, u.owner, "EUR"), amount=Money(euros * 100, "EUR"))
        return u.id


def charge(app, code: str, user_id: int | None, *, started: dt.datetime, minutes: int | None, wh: int, settle: bool = True,
           payment_method_id: str | None = None, email: str | None = None) -> int:
    """A session on connector ``code`` as the gateway reports it: StartTransaction at ``started``, StopTransaction ``minutes`` later
    (None: still charging), then settled (captured) as the worker does. Its id."""
    provider = app.extensions.get("payment_provider")
    with app.app_context(), sm(app)() as s:
        connector = s.scalar(select(Connector).where(Connector.connector_code == code))
        charger = connector.charger
        kind = PaymentKind.CARD if payment_method_id else PaymentKind.WALLET
        card = provider.card_of(payment_method_id=payment_method_id) if payment_method_id else None
        req = StartRequest(connector=connector, user=s.get(User, user_id) if user_id else None, email=email, payment_kind=kind,
                           payment_method_id=payment_method_id, card_brand=card.brand if card else None, card_last4=card.last4 if card else None)
        cs = service.start_session(s, provider, Charger_(), req, now=utcnow()).session
        if cs.state != SessionState.START_REQUESTED:
            return cs.id
        ans = service.start_transaction(s, charger, connector_number=connector.number, id_tag=cs.id_tag, meter_start_wh=D(1000),
                                        timestamp=started, now=utcnow())
        if minutes is not None:
            service.stop_transaction(s, charger, transaction_id=ans.transaction_id, meter_stop_wh=D(1000 + wh), reason="Remote", readings=[],
                                     timestamp=started + dt.timedelta(minutes=minutes), now=utcnow())
        else:
            service.meter_values(s, charger, connector_number=connector.number, transaction_id=ans.transaction_id,
                                 readings=[service.Reading(utcnow(), D(1000 + wh), D(11000))], now=utcnow())
        s.commit()
        if minutes is not None and settle:
            done = service.settle(s, provider, cs.id, utcnow())
            assert done.state == SessionState.COMPLETED, (done.state, done.failure_code)
        return cs.id


def refund(app, session_id: int, cents: int) -> None:
    with app.app_context(), sm(app)() as s:
        service.refund_session(s, app.extensions.get("payment_provider"), session_id, Money(cents, "EUR"), reason="goodwill",
                               key=f"r-{session_id}", now=utcnow())


def meter_with_tenant(app, site_id: int, code: str, user_id: int | None, *, billing: Billing = Billing.PREPAID) -> tuple[int, int]:
    """A tenant meter of the site and its tenant (the account ``user_id``)."""
    with sm(app).begin() as s:
        t = Tenant(site_id=site_id, user_id=user_id, name=f"Tenant {code}", contact_email=f"{code.lower()}@tenants.example", billing=billing,
                   currency="EUR")
        s.add(t)
        s.flush()
        m = Meter(site_id=site_id, meter_code=code, serial=f"S-{code}", prepaid=billing == Billing.PREPAID, tenant_id=t.id)
        s.add(m)
        s.flush()
        return m.id, t.id


def top_up(app, meter_id: int, user_id: int, cents: int) -> None:
    """A top-up of the meter from the account's wallet (``webapp.meters.topup``)."""
    with app.app_context(), sm(app).begin() as s:
        topup.top_up_from_wallet(s, meter=s.get(Meter, meter_id), user=s.get(User, user_id), amount=Money(cents, "EUR"), key=f"t-{meter_id}")


def paid_bill(app, tenant_id: int, user_id: int, total: int, vat: int) -> int:
    """An issued bill of the tenant, paid from the account's wallet (``webapp.meters.bills``)."""
    with sm(app).begin() as s:
        b = Bill(tenant_id=tenant_id, period="2026-01", state=BillState.ISSUED, currency="EUR", total_minor=total, vat_minor=vat,
                 issued_at=utcnow())
        s.add(b)
        s.flush()
        bills.pay_from_wallet(s, b.id, s.get(User, user_id), utcnow())
        return b.id


def build_world(app) -> dict:
    """Operators A and B, their sites, sessions of every kind, a refund, meter top-ups and a paid bill (see the module docstring)."""
    now = utcnow()
    a = make_operator(app, "Volta", [("Harbour", "Europe/Madrid", "CP-A1", 2), ("Bund", "Asia/Shanghai", "CP-A2", 1)])
    b = make_operator(app, "Other", [("Elsewhere", "Europe/Madrid", "CP-B1", 1)])
    ana = account(app, "ana@example.com", 300)
    bob = account(app, "bob@example.com", 50)
    carl = account(app, "carl@example.com", 100)
    poor = account(app, "poor@example.com", 0)
    bund_day = (now - dt.timedelta(days=2)).replace(hour=2, minute=30, second=0, microsecond=0)  # 10:30 in Shanghai
    ids = {
        "s1": charge(app, "CPA101", ana, started=now - dt.timedelta(hours=3), minutes=30, wh=7000),  # 2.96
        "s2": charge(app, "CPA102", ana, started=now - dt.timedelta(hours=2), minutes=45, wh=10000),  # 4.24, 1.00 refunded
        "s3": charge(app, "CPA201", ana, started=bund_day, minutes=60, wh=4000),  # 1.69
        "s4": charge(app, "CPA101", bob, started=now - dt.timedelta(days=40), minutes=20, wh=5000),  # 2.12, charged long ago
        "s6": charge(app, "CPA201", ana, started=now - dt.timedelta(minutes=10), minutes=None, wh=1500),  # charging now
        "s7": charge(app, "CPA101", poor, started=now, minutes=None, wh=0),  # the wallet was empty: failed
        "b1": charge(app, "CPB101", carl, started=now - dt.timedelta(hours=1), minutes=40, wh=9000),  # operator B's
    }
    refund(app, ids["s2"], 100)
    meter_a, _ta = meter_with_tenant(app, a["sites"]["Harbour"], "MA1", ana)
    _mb, bill_tenant = meter_with_tenant(app, a["sites"]["Harbour"], "MA2", ana, billing=Billing.POSTPAID)
    meter_b, _tb = meter_with_tenant(app, b["sites"]["Elsewhere"], "MB1", carl)
    top_up(app, meter_a, ana, 2000)
    top_up(app, meter_b, carl, 1500)
    bill_id = paid_bill(app, bill_tenant, ana, 12100, 2100)
    staff_a = account(app, "staff@volta.example", role=Role.OPERATOR_STAFF, operator_id=a["op"])
    staff_b = account(app, "staff@other.example", role=Role.OPERATOR_STAFF, operator_id=b["op"])
    admin = account(app, "admin@voltpay.example", role=Role.ADMIN)
    return {"a": a, "b": b, "ids": ids, "users": {"ana": ana, "bob": bob, "staff_a": staff_a, "staff_b": staff_b, "admin": admin},
            "bund_day": bund_day, "bill": bill_id, "now": now}


_BUILT: dict[str, tuple[dict, dict[str, list[dict]]]] = {}


@pytest.fixture
def world(app, database_url):
    """``world_in`` the test's app."""
    return world_in(app, database_url)


def world_in(app, database_url: str) -> dict:
    """``build_world`` in ``app``: built through the services once per database, then its rows copied back in.

    Building it takes the services a few seconds; the tests only read it (or add to it), so the later ones get the
    very same rows (ids included) put back into their empty tables in one transaction.
    """
    engine = app.extensions["db_engine"]
    if database_url not in _BUILT:
        w = build_world(app)
        with engine.connect() as c:
            _BUILT[database_url] = (w, {t.name: [dict(r._mapping) for r in c.execute(t.select())] for t in Base.metadata.sorted_tables})
        return w
    w, rows = _BUILT[database_url]
    with engine.begin() as c:
        for t in Base.metadata.sorted_tables:
            if rows[t.name]:
                c.execute(t.insert(), rows[t.name])
        if engine.dialect.name == "postgresql":  # the copied ids were not drawn from the sequences: move them past
            for t in Base.metadata.sorted_tables:
                if "id" in t.c and t.c.id.primary_key and rows[t.name]:
                    c.execute(text(f"SELECT setval(pg_get_serial_sequence('\"{t.name}\"', 'id'), (SELECT MAX(id) FROM \"{t.name}\"))"))
    return w


def sign_in(client, email: str) -> None:
    resp = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD})
    assert resp.status_code == 302, resp.get_data(as_text=True)[-1500:]


def period(days_before: int = 3, days_after: int = 1) -> dict:
    today = utcnow().date()
    return {"from": (today - dt.timedelta(days=days_before)).isoformat(), "to": (today + dt.timedelta(days=days_after)).isoformat()}


# --------------------------------------------------------------------------- reading pages and files


class Tables(HTMLParser):
    """The tables of a page by ``data-testid``: their column keys, and per data row each cell's text and ``data-value``."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = self._row = self._cell = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and (a.get("data-testid") or "").startswith("table-"):
            self._table = self.tables.setdefault(a["data-testid"][6:], {"keys": [], "rows": []})
        elif self._table is not None and tag == "th" and "data-key" in a:
            self._table["keys"].append(a["data-key"])
        elif self._table is not None and tag == "tr" and "data-row" in a:
            self._row = []
            self._table["rows"].append(self._row)
        elif self._row is not None and tag in ("td", "th") and "data-value" in a:
            self._cell = {"value": a["data-value"], "text": ""}
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data.strip()


def page_tables(client, url: str, **args) -> dict[str, dict]:
    resp = client.get(url, query_string=args)
    assert resp.status_code == 200, resp.get_data(as_text=True)[-3000:]
    return Tables(resp.get_data(as_text=True)).tables


def values(table: dict) -> list[list[str]]:
    return [[c["value"] for c in row] for row in table["rows"]]


def by_key(table: dict, **match) -> list[dict[str, str]]:
    """The rows as {column key: export value}, those matching ``match``."""
    rows = [dict(zip(table["keys"], r, strict=True)) for r in values(table)]
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def minor(text: str) -> int:
    return int(D(text) * 100)


def read_csv(resp) -> list[list[str]]:
    assert resp.status_code == 200 and resp.mimetype == "text/csv" and resp.headers["Cache-Control"] == "no-store"
    return list(csv.reader(io.StringIO(resp.get_data(as_text=True))))


def read_xlsx(resp) -> list[list]:
    assert resp.status_code == 200 and resp.mimetype.endswith("spreadsheetml.sheet")
    wb = openpyxl.load_workbook(io.BytesIO(resp.data))
    return [list(r) for r in wb.worksheets[0].iter_rows(values_only=True)]


def same_as_csv(xlsx_rows: list[list], csv_rows: list[list[str]]) -> None:
    """The workbook holds the CSV's rows: numbers as numbers equal to the CSV's decimals, text as text."""
    assert len(xlsx_rows) == len(csv_rows)
    for xr, cr in zip(xlsx_rows, csv_rows, strict=True):
        assert len(xr) == len(cr)
        for x, c in zip(xr, cr, strict=True):
            if x is None:
                assert c == ""
            elif isinstance(x, dt.datetime):
                assert x.strftime("%Y-%m-%d %H:%M") == c
            elif isinstance(x, (int, float)):
                assert D(str(x)) == D(c), (x, c)
            else:
                assert str(x) == c.removeprefix("'") if c.startswith("'") else str(x) == c


# --------------------------------------------------------------------------- the figures equal the ledger


def posted(app, kind: AccountKind, lo: dt.datetime, hi: dt.datetime, owner: str | None = None) -> int:
    """What the ledger shows on ``kind`` accounts for entries booked in [lo, hi): the sum of postings on the account's normal side."""
    with sm(app)() as s:
        q = (select(func.coalesce(func.sum(Posting.amount_minor), 0)).join(LedgerAccount, LedgerAccount.id == Posting.account_id)
             .join(JournalEntry, JournalEntry.id == Posting.entry_id)
             .where(LedgerAccount.kind == kind, JournalEntry.created_at >= lo, JournalEntry.created_at < hi))
        if owner is not None:
            q = q.where(LedgerAccount.owner == owner)
        return -int(s.scalar(q))


@pytest.fixture
def card_app(app_config, stripe_config):
    """The app with the Stripe provider on localstripe."""
    from tests.conftest import _truncate
    from webapp import create_app

    application = create_app({**app_config, **stripe_config})
    _truncate(application)
    yield application
    application.extensions["db_engine"].dispose()


def test_analytics_totals_equal_the_ledger_for_the_same_period(card_app, stripe_config, database_url):
    from tests.stripe_browser import browser_card

    app = card_app
    w = world_in(app, database_url)
    guest = charge(app, "CPA102", None, started=utcnow() - dt.timedelta(minutes=50), minutes=30, wh=6000,
                   payment_method_id=browser_card(stripe_config, "4242424242424242"), email="guest@example.com")  # 2.54 by card
    with app.app_context(), sm(app)() as s:  # a guest tops up A's meter by card
        meter = s.scalar(select(Meter).where(Meter.meter_code == "MA1"))
        row = topup.start_meter_top_up(s, meter=meter, owner=topup.guest_owner(meter), email="payer@example.com", amount=Money(1000, "EUR"),
                                       payment_method_id=browser_card(stripe_config, "4242424242424242"), customer_id=None)
        s.commit()
        cards.submit(s, app.extensions["payment_provider"], row)
        s.commit()
    client = app.test_client()
    app.config["WTF_CSRF_ENABLED"] = False
    args = period()
    lo = dt.datetime.fromisoformat(args["from"]).replace(tzinfo=dt.UTC)
    hi = dt.datetime.fromisoformat(args["to"]).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)

    with sm(app)() as s:
        rows = {cs.id: cs for cs in s.scalars(select(ChargingSession))}
        merchant_a = s.scalar(select(Party).where(Party.operator_id == w["a"]["op"]))
    a_sessions = [w["ids"][k] for k in ("s1", "s2", "s3", "s4")] + [guest]
    assert rows[guest].payment_kind is PaymentKind.CARD and rows[guest].captured_minor == 254

    # Operator A: revenue = captured − refunded of its sessions; its part after VAT = what its merchant party was allocated.
    sign_in(client, "staff@volta.example")
    summary = by_key(page_tables(client, "/operator/analytics", **args)["summary"], currency="EUR")[0]
    revenue = sum(rows[i].captured_minor - rows[i].refunded_minor for i in a_sessions)
    assert revenue == 296 + 424 - 100 + 169 + 212 + 254
    assert minor(summary["revenue"]) == revenue
    assert minor(summary["captured"]) == sum(rows[i].captured_minor for i in a_sessions)
    assert minor(summary["refunded"]) == 100
    assert minor(summary["revenue_excl_vat"]) == posted(app, AccountKind.PARTY_PAYABLE, lo, hi, owner=f"party:{merchant_a.id}")
    assert minor(summary["revenue"]) - minor(summary["vat"]) == minor(summary["revenue_excl_vat"])
    assert int(summary["paid_sessions"]) == 5 and minor(summary["average_session_value"]) == round((296 + 424 + 169 + 212 + 254) / 5)
    # Sessions and energy: the sessions that started charging in the period (not the one of 40 days ago; the one charging now too).
    started = [cs for cs in rows.values() if cs.started_at and lo <= cs.started_at < hi and cs.connector_id in w["a"]["codes"].values()]
    assert int(summary["sessions"]) == len(started) == 5
    assert D(summary["energy_kwh"]) == sum((cs.energy_wh for cs in started), D(0)) / 1000
    # Meters of A: the top-up and the bill, not B's top-up.
    meters = (int(summary["top_ups"]), minor(summary["top_up_amount"]), int(summary["bill_payments"]), minor(summary["bill_amount"]))
    assert meters == (2, 3000, 1, 12100)
    payments = by_key(page_tables(client, "/operator/orders", tab="meters")["meters"])
    assert sorted((r["kind"], r["method"], r["payer"], minor(r["amount"])) for r in payments) == [
        ("bill", "wallet", "ana@example.com", 12100), ("top_up", "card", "payer@example.com", 1000), ("top_up", "wallet", "ana@example.com", 2000)]

    # The whole platform (an admin) against whole ledger accounts: party payables are the charging revenue net of VAT, VAT payable
    # is the charging VAT plus the bill's, REVENUE keeps the bill's net (bills are not allocated), meter wallets hold the top-ups.
    client.post("/auth/sign-out")
    sign_in(client, "admin@voltpay.example")
    everything = by_key(page_tables(client, "/operator/analytics", **args)["summary"], currency="EUR")[0]
    assert minor(everything["revenue"]) == revenue + rows[w["ids"]["b1"]].captured_minor
    assert minor(everything["revenue_excl_vat"]) == posted(app, AccountKind.PARTY_PAYABLE, lo, hi)
    assert minor(everything["vat"]) + 2100 == posted(app, AccountKind.VAT_PAYABLE, lo, hi)
    assert minor(everything["bill_amount"]) - 2100 == posted(app, AccountKind.REVENUE, lo, hi) == 10000
    assert minor(everything["top_up_amount"]) == posted(app, AccountKind.METER_WALLET, lo, hi) == 4500
    # A period that ends before anything was booked has no money, whatever the sessions' dates.
    old = by_key(page_tables(client, "/operator/analytics", **period(60, -5))["summary"], currency="EUR")[0]
    assert (minor(old["revenue"]), int(old["sessions"]), int(old["paid_sessions"])) == (0, 1, 0)


# --------------------------------------------------------------------------- exports


def test_exports_open_and_hold_the_same_rows_as_the_tables(client, world, monkeypatch):
    sign_in(client, "staff@volta.example")
    args = {**period(), "granularity": "day"}
    tables = page_tables(client, "/operator/analytics", **args)
    assert set(tables) == {"summary", "periods", "sites", "chargers", "hours", "meters"}
    for key, table in tables.items():
        assert table["rows"], key
        rows = read_csv(client.get("/operator/analytics.csv", query_string={**args, "table": key}))
        assert rows[0] == table["keys"] and rows[1:] == values(table), key
        same_as_csv(read_xlsx(client.get("/operator/analytics.xlsx", query_string={**args, "table": key})), rows)
    # What a person reads is the same amount, in their language.
    money_cols = [i for i, k in enumerate(tables["sites"]["keys"]) if k in ("revenue", "vat", "average_session_value")]
    for row in tables["sites"]["rows"]:
        for i in money_cols:
            assert row[i]["text"] == format_money(Money(minor(row[i]["value"]), "EUR"), "en")
    assert len(tables["periods"]["rows"]) == 5  # five days, one currency
    spanish = Tables(client.get("/operator/analytics", query_string=args, headers={"Accept-Language": "es"}).get_data(as_text=True)).tables
    cell = spanish["summary"]["rows"][0][tables["summary"]["keys"].index("revenue")]
    assert cell["text"] == format_money(Money(minor(cell["value"]), "EUR"), "es") and "," in cell["text"]

    # Orders: every page of the filtered table, in the same order.
    monkeypatch.setattr("webapp.console.orders.PAGE_SIZE", 2)
    shown = []
    url, query = "/operator/orders", {"tab": "historical"}
    while url:
        resp = client.get(url, query_string=query)
        assert resp.status_code == 200
        html = resp.get_data(as_text=True)
        shown += values(Tables(html).tables["historical"])
        nxt = re.search(r'<a href="([^"]+)" rel="next"', html)
        url, query = (unescape(nxt.group(1)), None) if nxt else (None, None)
    assert len(shown) == 5  # s1, s2, s3, s4 completed; the failed one
    rows = read_csv(client.get("/operator/orders.csv", query_string={"tab": "historical"}))
    assert rows[1:] == shown
    same_as_csv(read_xlsx(client.get("/operator/orders.xlsx", query_string={"tab": "historical"})), rows)
    meters = page_tables(client, "/operator/orders", tab="meters")["meters"]
    assert read_csv(client.get("/operator/orders.csv", query_string={"tab": "meters"}))[1:] == values(meters)


def test_a_formula_typed_into_a_filter_stays_text_in_the_files(client, world):
    sign_in(client, "staff@volta.example")
    query = {"tab": "historical", "user": "=cmd|' /c calc'!A1"}
    assert read_csv(client.get("/operator/orders.csv", query_string=query))[1:] == []
    wb = openpyxl.load_workbook(io.BytesIO(client.get("/operator/orders.xlsx", query_string=query).data))
    about = {r[0].value: r[1] for r in wb["about"].iter_rows()}
    assert about["user"].value == "=cmd|' /c calc'!a1" and about["user"].data_type == "s"


# --------------------------------------------------------------------------- filters


def test_filters_narrow_the_figures_and_the_rows(client, world):
    w = world
    sign_in(client, "staff@volta.example")
    args = period()
    day = page_tables(client, "/operator/analytics", **args)
    total = by_key(day["summary"])[0]
    # Per week and per month: the same totals, spread over fewer rows.
    for gran in ("week", "month"):
        t = page_tables(client, "/operator/analytics", **args, granularity=gran)["periods"]
        assert sum(minor(r["revenue"]) for r in by_key(t)) == minor(total["revenue"])
        assert sum(int(r["sessions"]) for r in by_key(t)) == int(total["sessions"])
    # One site, one charger: their own figures, which add up to the whole.
    harbour = by_key(page_tables(client, "/operator/analytics", **args, site=w["a"]["sites"]["Harbour"])["summary"])[0]
    bund = by_key(page_tables(client, "/operator/analytics", **args, site=w["a"]["sites"]["Bund"])["summary"])[0]
    assert minor(harbour["revenue"]) + minor(bund["revenue"]) == minor(total["revenue"])
    assert (int(harbour["sessions"]), int(bund["sessions"])) == (2, 2)
    assert minor(bund["revenue"]) == 169 and int(bund["top_ups"]) == 0 and int(harbour["top_ups"]) == 1
    only = page_tables(client, "/operator/analytics", **args, charger=w["a"]["chargers"]["CP-A2"])
    assert [r["charger"] for r in by_key(only["chargers"])] == ["CP-A2"] and by_key(only["meters"]) == []
    # Utilization of a past local day at Bund: one hour of charging on one connector = 1/24.
    local_day = w["bund_day"].astimezone(SHANGHAI).date().isoformat()
    bund_day = page_tables(client, "/operator/analytics", **{"from": local_day, "to": local_day}, site=w["a"]["sites"]["Bund"])
    assert by_key(bund_day["chargers"])[0]["utilization_percent"] == "4.2"
    assert by_key(bund_day["sites"])[0]["charging_hours"] == "1.00"

    # Orders: by user, state, amount and date.
    hist = lambda **q: by_key(page_tables(client, "/operator/orders", tab="historical", **q)["historical"])  # noqa: E731
    assert {r["user"] for r in hist(user="BOB@")} == {"bob@example.com"}
    assert [r["state"] for r in hist(state="failed")] == ["failed"]
    assert sorted(minor(r["amount"]) for r in hist(min="2,00", max="3.00")) == [212, 296]
    assert {r["session"] for r in hist(site=w["a"]["sites"]["Bund"])} == {str(w["ids"]["s3"])}
    assert hist(**{"from": "2000-01-01", "to": "2000-01-31"}) == []
    assert len(hist(**period())) == 5
    abnormal = by_key(page_tables(client, "/operator/orders", tab="abnormal")["abnormal"])
    assert {r["session"] for r in abnormal} == {str(w["ids"]["s2"]), str(w["ids"]["s7"])}
    refunded = by_key(page_tables(client, "/operator/orders", tab="abnormal", state="refunded")["abnormal"])
    assert [r["session"] for r in refunded] == [str(w["ids"]["s2"])]
    if "support.session" in client.application.view_functions:  # each session links to its page in the support console
        page = client.get("/operator/orders", query_string={"tab": "abnormal"}).get_data(as_text=True)
        assert f'href="/support/sessions/{w["ids"]["s2"]}"' in page
    live = by_key(page_tables(client, "/operator/orders")["realtime"])
    assert [(r["session"], r["state"]) for r in live] == [(str(w["ids"]["s6"]), "charging")]
    meters = by_key(page_tables(client, "/operator/orders", tab="meters")["meters"])
    assert sorted((r["kind"], minor(r["amount"]), r["payer"], r["method"]) for r in meters) == [
        ("bill", 12100, "ana@example.com", "wallet"), ("top_up", 2000, "ana@example.com", "wallet")]
    if "support.meter" in client.application.view_functions:
        assert 'href="/support/meters/MA1"' in client.get("/operator/orders", query_string={"tab": "meters"}).get_data(as_text=True)
    assert [r["kind"] for r in by_key(page_tables(client, "/operator/orders", tab="meters", state="bill")["meters"])] == ["bill"]
    assert [r["kind"] for r in by_key(page_tables(client, "/operator/orders", tab="meters", min="100")["meters"])] == ["bill"]


def test_bad_inputs_answer_400_with_the_reason_at_the_field(client, world):
    sign_in(client, "staff@volta.example")
    cases = [
        ("/operator/analytics", {"from": "31/01/2026"}, "A date like 2026-01-31."),
        ("/operator/analytics", {"from": "2026-02-10", "to": "2026-02-01"}, "The period must end on or after the day it starts."),
        ("/operator/analytics", {"from": "2024-01-01", "to": "2025-06-01"}, "At most 366 days at a time."),
        ("/operator/analytics", {"granularity": "hour"}, "Choose day, week or month."),
        ("/operator/analytics", {"site": "abc"}, "Choose one from the list."),
        ("/operator/analytics.csv", {"table": "summary", "to": "2026-13-01"}, "A date like 2026-01-31."),
        ("/operator/orders", {"tab": "historical", "min": "12.345"}, "Too many decimals for this currency."),
        ("/operator/orders", {"tab": "historical", "max": "twelve"}, "An amount like 12.50."),
        ("/operator/orders", {"tab": "historical", "min": "5", "max": "1"}, "The largest amount must be at least the smallest."),
        ("/operator/orders", {"tab": "historical", "state": "charging"}, "Choose a state from the list."),
        ("/operator/orders.csv", {"tab": "meters", "min": "-3"}, "The amount cannot be negative."),
    ]
    for url, query, message in cases:
        resp = client.get(url, query_string=query)
        html = resp.get_data(as_text=True)
        assert resp.status_code == 400, (url, query)
        assert 'aria-invalid="true"' in html and message in html, (url, query, html[-2500:])
    assert client.get("/operator/analytics.csv", query_string={"table": "nope"}).status_code == 400
    assert client.get("/operator/orders", query_string={"tab": "nope"}).status_code == 400
    assert client.get("/operator/orders", query_string={"page": "x"}).status_code == 400


# --------------------------------------------------------------------------- who sees what


def test_another_operators_data_is_invisible_and_its_ids_answer_404(client, world):
    w = world
    sign_in(client, "staff@volta.example")
    args = period()
    page = client.get("/operator/analytics", query_string=args).get_data(as_text=True)
    assert "Elsewhere" not in page and "CP-B1" not in page
    sites = by_key(Tables(page).tables["sites"])
    assert [r["site"] for r in sites] == ["Bund", "Harbour"]
    for query in ({"site": w["b"]["sites"]["Elsewhere"]}, {"charger": w["b"]["chargers"]["CP-B1"]}, {"site": 999999}):
        assert client.get("/operator/analytics", query_string=query).status_code == 404
        assert client.get("/operator/analytics.xlsx", query_string={**query, "table": "summary"}).status_code == 404
        assert client.get("/operator/orders", query_string={**query, "tab": "historical"}).status_code == 404
    everything = client.get("/operator/orders.csv", query_string={"tab": "historical"}).get_data(as_text=True)
    assert "carl@example.com" not in everything and "CP-B1" not in everything
    assert "carl@example.com" not in client.get("/operator/orders", query_string={"tab": "meters"}).get_data(as_text=True)

    # B's staff see B only; an admin sees both; a customer is refused; a visitor is sent to sign in.
    client.post("/auth/sign-out")
    sign_in(client, "staff@other.example")
    assert [r["site"] for r in by_key(page_tables(client, "/operator/analytics", **args)["sites"])] == ["Elsewhere"]
    assert client.get("/operator/analytics", query_string={"site": w["a"]["sites"]["Harbour"]}).status_code == 404
    b_meters = by_key(page_tables(client, "/operator/orders", tab="meters")["meters"])
    assert [(r["payer"], minor(r["amount"])) for r in b_meters] == [("carl@example.com", 1500)]
    client.post("/auth/sign-out")
    sign_in(client, "admin@voltpay.example")
    assert {r["site"] for r in by_key(page_tables(client, "/operator/analytics", **args)["sites"])} == {"Bund", "Harbour", "Elsewhere"}
    assert client.get("/operator/orders", query_string={"site": w["b"]["sites"]["Elsewhere"]}).status_code == 200
    client.post("/auth/sign-out")
    sign_in(client, "ana@example.com")
    assert client.get("/operator/analytics").status_code == 403
    assert client.get("/operator/orders.csv").status_code == 403
    client.post("/auth/sign-out")
    assert client.get("/operator/orders").status_code == 302


# --------------------------------------------------------------------------- busiest hours


def test_the_heat_map_counts_session_starts_by_the_sites_local_hour(client, world):
    w = world
    sign_in(client, "staff@volta.example")
    local = w["bund_day"].astimezone(SHANGHAI)
    assert local.hour == 10 and w["bund_day"].hour == 2
    resp = client.get("/operator/analytics", query_string={**period(), "site": w["a"]["sites"]["Bund"]})
    html = resp.get_data(as_text=True)
    hours = by_key(Tables(html).tables["hours"])
    day = hours[local.isoweekday() - 1]
    assert day["weekday"] == str(local.isoweekday()) and day["h10"] == "1" and day["h02"] == "0"
    # The session charging now counts at its own local hour; nothing else at Bund.
    now_local = (w["now"] - dt.timedelta(minutes=10)).astimezone(SHANGHAI)
    same_cell = (now_local.isoweekday(), now_local.hour) == (local.isoweekday(), 10)
    assert hours[now_local.isoweekday() - 1][f"h{now_local.hour:02d}"] == ("2" if same_cell else "1")
    assert sum(int(r["total"]) for r in hours) == 2
    # The chart draws the same cells, each with its count, and says what it shows.
    assert 'data-testid="heat-map"' in html and '<title id="heat-title">' in html and html.count('data-count="1"') >= 1
    assert "<desc" in html and 'role="img"' in html
