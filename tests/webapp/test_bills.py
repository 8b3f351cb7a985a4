"""Post-paid bills, monthly prepaid invoices, paying a bill, overdue reminders and closing an account.

The building: a master meter M upstream of three post-paid tenant meters
(A1, B1, C1) and a public-area meter PA, in Madrid; readings for March 2025
through the real ingest (``webapp.meters.readings``), card payments through
localstripe, emails through the real SMTP server.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal as D
from fractions import Fraction

import pytest
from sqlalchemy import func, select

from payments import cards
from payments.cards import CardPayment, CardRefund, State
from payments.invoicing import Document, DocumentKind
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, balance, get_account, transfer
from payments.money import Money
from payments.tariff_store import loads
from tests.stripe_browser import VISA
from tests.webapp.wallet_helpers import app_config, save_card, sign_in  # noqa: F401  (app_config is a fixture)
from webapp.meters import bills, closing, readings, topup
from webapp.meters.models import Bill, Billing, BillState, BuildingBilling, MeterTariff, Tenant, TenantState
from webapp.models import Meter, MeterKind, Operator, Site

UTC = dt.UTC
PERIOD = "2025-03"
START = dt.datetime(2025, 2, 28, 23, 0, tzinfo=UTC)  # 1 March 00:00 in Madrid
MID = dt.datetime(2025, 3, 15, 11, 0, tzinfo=UTC)
END = dt.datetime(2025, 3, 31, 22, 0, tzinfo=UTC)  # 1 April 00:00 in Madrid (summer time)
NOW = dt.datetime(2025, 4, 1, 6, 0, tzinfo=UTC)
PRICE = {"currency": "EUR", "vat": D(21), "kind": "flat", "energy_price": D("0.2000"), "demand_charge_per_kw": D("4.50")}
UTILITY = {"currency": "EUR", "vat": D(21), "kind": "flat", "energy_price": D("0.1500")}
FEES = [{"name": "Service fee", "amount_minor": 1500, "vat": 21}, {"name": "Rent", "amount_minor": 50000, "vat": 0}]
# (register at start, mid, end; demand at mid, end) — A 250.25 kWh, B 200.333, C 49.999, public area 80.123
READINGS = {
    "A1": ("1000", "1100.5", "1250.25", "7.5", "9.25"),
    "B1": ("500", "600", "700.333", "5", "4"),
    "C1": ("0", "10", "49.999", None, None),
    "PA": ("0", "40", "80.123", None, None),
}
TENANT_KWH = D("250.25") + D("200.333") + D("49.999")
LOSS = D("20.5")


@pytest.fixture
def sm(app):
    return app.extensions["db_sessionmaker"]


def make_building(sm, *, method="consumption", master_end=None, users=None) -> dict:
    """The building, its tenants (created in January) and its readings for March."""
    users = users or {}
    with sm.begin() as s:
        op = Operator(name="Tower Op", legal_name="Tower Op S.L.", document_prefix="TW")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Tower", time_zone="Europe/Madrid", currency="EUR", address="Gran Vía 1")
        s.add(site)
        s.flush()
        s.add(BuildingBilling(site_id=site.id, public_area_method=method, fixed_fees_json=json.dumps(FEES), due_days=14,
                              reminder_days=7, vat_rate=D(21)))
        price, utility = MeterTariff(site_id=site.id, name="Tenants"), MeterTariff(site_id=site.id, name="Utility")
        s.add_all([price, utility])
        s.flush()
        readings.add_meter_tariff_version(s, price, PRICE, START - dt.timedelta(days=60), "test")
        readings.add_meter_tariff_version(s, utility, UTILITY, START - dt.timedelta(days=60), "test")
        created = dt.datetime(2025, 1, 1, tzinfo=UTC)
        tenants = {}
        for key, area, custom in (("A", "50", "2"), ("B", "30", "1"), ("C", "20", "1")):
            t = Tenant(site_id=site.id, name=f"Tenant {key}", contact_email=f"{key.lower()}@tenants.example", unit=f"Shop {key}",
                       leased_area_m2=D(area), custom_share=D(custom), billing=Billing.POSTPAID, currency="EUR", created_at=created,
                       user_id=users.get(key))
            s.add(t)
            tenants[key] = t
        s.flush()
        master = Meter(site_id=site.id, meter_code="M", serial="SM", kind=MeterKind.MASTER, prepaid=False, tariff_id=utility.id)
        s.add(master)
        s.flush()
        meters = {"M": master}
        for code in ("A1", "B1", "C1"):
            meters[code] = Meter(site_id=site.id, meter_code=code, serial=f"S{code}", prepaid=False, tenant_id=tenants[code[0]].id,
                                 tariff_id=price.id, master_meter_id=master.id)
        meters["PA"] = Meter(site_id=site.id, meter_code="PA", serial="SPA", kind=MeterKind.PUBLIC_AREA, prepaid=False,
                             tariff_id=price.id, master_meter_id=master.id)
        s.add_all(list(meters.values())[1:])
        s.flush()
        rows = []
        for code, (r0, r1, r2, d1, d2) in READINGS.items():
            rows += [{"meter_code": code, "at": START.isoformat(), "register_kwh": r0},
                     {"meter_code": code, "at": MID.isoformat(), "register_kwh": r1, **({"demand_kw": d1} if d1 else {})},
                     {"meter_code": code, "at": END.isoformat(), "register_kwh": r2, **({"demand_kw": d2} if d2 else {})}]
        master_end = master_end if master_end is not None else D(10000) + TENANT_KWH + D("80.123") + LOSS
        rows += [{"meter_code": "M", "at": START.isoformat(), "register_kwh": "10000"},
                 {"meter_code": "M", "at": END.isoformat(), "register_kwh": str(master_end)}]
        report = readings.ingest(s, operator_id=op.id, rows=rows, source="api", now=NOW)
        assert report.rejected == 0, report.as_json()
        return {"op": op.id, "site": site.id, **{k: t.id for k, t in tenants.items()}}


def generate(sm, b, now=NOW) -> list[Bill]:
    with sm.begin() as s:
        out = bills.generate_bills(s, s.get(Site, b["site"]), PERIOD, now)
        return [(x.id, x.tenant_id) for x in out]


def all_bills(sm, b) -> dict[str, Bill]:
    with sm() as s:
        rows = {t.id: k for k in "ABC" for t in [s.get(Tenant, b[k])]}
        return {rows[x.tenant_id]: x for x in s.scalars(select(Bill).order_by(Bill.tenant_id))}


def lines_of(bill: Bill, kind: str) -> list[dict]:
    return [ln for ln in bills.bill_facts(bill)["lines"] if ln["kind"] == kind]


def exact(total: int, weights: list[D]) -> list[Fraction]:
    ws = [Fraction(w) for w in weights]
    return [total * w / sum(ws) for w in ws]


# --------------------------------------------------------------------------- the bill


@pytest.mark.parametrize("method,expected", [
    ("consumption", None),  # weights 250.25 : 200.333 : 49.999 (checked against the exact shares below)
    ("area", [801, 481, 320]),  # 1602 × 50/30/20 % = 801, 480.6, 320.4: the cent left goes to the largest remainder (B)
    ("equal", [534, 534, 534]),
    ("custom", [801, 401, 400]),  # 2:1:1 = 801, 400.5, 400.5: the tie goes to the earlier tenant
])
def test_bill_lines_add_up_and_public_area_is_shared_exactly_by_each_method(sm, method, expected):
    b = make_building(sm, method=method)
    generate(sm, b)
    got = all_bills(sm, b)
    assert {k: x.state for k, x in got.items()} == {k: BillState.ISSUED for k in "ABC"}

    # Energy, priced by the tenant tariff: A 250.25 kWh × 0.20 = 50.05.
    a = got["A"]
    [energy] = lines_of(a, "energy")
    assert (energy["quantity"], energy["unit_price"], energy["net"], energy["meter"]) == ("250.250", "0.2000", 5005, "A1")
    # Demand: the month's maximum (9.25 kW) × 4.50 = 41.625 → 41.63.
    [demand] = lines_of(a, "demand")
    assert (D(demand["quantity"]), demand["net"]) == (D("9.25"), 4163)
    assert not lines_of(got["C"], "demand") or lines_of(got["C"], "demand")[0]["net"] == 0
    # Fees: one of each per tenant, with their own VAT rates.
    assert sorted((ln["note"], ln["net"], ln["vat_rate"]) for ln in lines_of(a, "fee")) == [("Rent", 50000, "0"), ("Service fee", 1500, "21")]

    # Public area: 80.123 kWh × 0.20 = 16.0246 → 16.02, shared to the cent and the kWh to the Wh.
    public = [lines_of(got[k], "public_area")[0] for k in "ABC"]
    assert sum(ln["net"] for ln in public) == 1602
    assert sum(D(ln["quantity"]) for ln in public) == D("80.123")
    if expected is not None:
        assert [ln["net"] for ln in public] == expected
    else:
        for ln, e in zip(public, exact(1602, [D("250.25"), D("200.333"), D("49.999")]), strict=True):
            assert abs(ln["net"] - e) < 1

    # Line loss: master − Σ sub-meters = 20.5 kWh at the master's average price 0.15 = 3.075 → 3.08, by consumption.
    loss = [lines_of(got[k], "line_loss")[0] for k in "ABC"]
    assert sum(ln["net"] for ln in loss) == 308
    assert sum(D(ln["quantity"]) for ln in loss) == LOSS
    for ln, e in zip(loss, exact(308, [D("250.25"), D("200.333"), D("49.999")]), strict=True):
        assert abs(ln["net"] - e) < 1

    # VAT to the cent, per rate, and the invoice says the same.
    with sm() as s:
        for x in got.values():
            lines = bills.bill_facts(x)["lines"]
            net21 = sum(ln["net"] for ln in lines if D(ln["vat_rate"]) == 21)
            vat = int((D(net21) * D("0.21")).quantize(D(1), rounding="ROUND_HALF_UP"))
            assert x.vat_minor == vat
            assert x.total_minor == sum(ln["net"] for ln in lines) + vat
            doc = s.get(Document, x.document_id)
            assert (doc.kind, doc.total_minor, doc.vat_minor, doc.scope) == (DocumentKind.INVOICE, x.total_minor, x.vat_minor, f"operator:{b['op']}")
            content = loads(doc.content)
            assert sum(ln["net"] for ln in content["lines"]) == doc.net_minor
            assert content["bill"]["period"] == PERIOD and content["bill"]["due_date"] == "2025-04-15"
            assert {sh["kind"] for sh in content["bill"]["shares"]} == {"public_area", "line_loss"}
            assert {"seller", "buyer", "lines", "vat", "payment", "branding", "time_zone"} <= set(content)
            assert doc.number.startswith("TW-2025-")
        # The shares the documents show add up to the pools too.
        pools = {}
        for x in got.values():
            for sh in loads(s.get(Document, x.document_id).content)["bill"]["shares"]:
                pools[sh["kind"]] = pools.get(sh["kind"], 0) + sh["amount"]
        assert pools == {"public_area": 1602, "line_loss": 308}


def test_negative_line_loss_sends_every_bill_to_review_and_allocates_nothing(sm):
    b = make_building(sm, master_end=D(10000) + TENANT_KWH + D("80.123") - D("3.5"))  # sub-meters measured 3.5 kWh more
    generate(sm, b)
    got = all_bills(sm, b)
    for x in got.values():
        assert x.state is BillState.REVIEW
        assert "negative line loss" in x.review_reason
        assert x.document_id is None and x.total_minor == 0
        assert bills.bill_facts(x)["shares"] == [] and not lines_of(x, "line_loss")
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 0


def test_generation_is_idempotent_and_waits_for_the_end_of_month_reading(sm, app):
    b = make_building(sm)
    first = generate(sm, b)
    assert len(first) == 3
    assert generate(sm, b) == []  # issued bills are never computed again
    with app.app_context():
        assert bills.run_monthly(NOW)["bills"] == 0
        assert bills.run_monthly(NOW)["bills"] == 0
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(Bill)) == 3
        assert s.scalar(select(func.count()).select_from(Document).where(Document.source.like("bill:%"))) == 3


def test_a_bill_waits_for_missing_readings_then_goes_to_review(sm):
    b = make_building(sm)
    with sm.begin() as s:  # pretend PA's last reading never came
        from webapp.meters.models import MeterInterval, MeterReading

        pa = s.scalar(select(Meter).where(Meter.meter_code == "PA"))
        s.query(MeterInterval).filter(MeterInterval.meter_id == pa.id, MeterInterval.end_at == END).delete()
        s.query(MeterReading).filter(MeterReading.meter_id == pa.id, MeterReading.at == END).delete()
    generate(sm, b)
    assert {x.state for x in all_bills(sm, b).values()} == {BillState.DRAFT}
    generate(sm, b, now=END + dt.timedelta(days=3))
    got = all_bills(sm, b)
    assert {x.state for x in got.values()} == {BillState.REVIEW}
    assert all("PA" in x.review_reason for x in got.values())


def test_prepaid_tenants_get_a_monthly_invoice_of_what_was_debited(sm):
    b = make_building(sm)
    with sm.begin() as s:
        site = s.get(Site, b["site"])
        price = s.scalar(select(MeterTariff).where(MeterTariff.name == "Tenants"))
        t = Tenant(site_id=site.id, name="Pia", contact_email="pia@tenants.example", billing=Billing.PREPAID, currency="EUR",
                   created_at=dt.datetime(2025, 1, 1, tzinfo=UTC), low_balance_threshold_minor=0)
        s.add(t)
        s.flush()
        p1 = Meter(site_id=site.id, meter_code="P1", serial="SP1", prepaid=True, tenant_id=t.id, tariff_id=price.id)
        s.add(p1)
        s.flush()
        transfer(s, idempotency_key="t:topup", description="top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=readings.meter_wallet(s, p1), amount=Money(10000, "EUR"))
        rep = readings.ingest(s, operator_id=b["op"], source="api", now=NOW, rows=[
            {"meter_code": "P1", "at": START.isoformat(), "register_kwh": "0"},
            {"meter_code": "P1", "at": MID.isoformat(), "register_kwh": "12.345"},
            {"meter_code": "P1", "at": END.isoformat(), "register_kwh": "20.001"}])
        assert rep.rejected == 0
        debited = 10000 - readings.meter_balance(s, p1).amount
        tid = t.id
    with sm.begin() as s:
        [doc] = bills.prepaid_invoices(s, s.get(Site, b["site"]), PERIOD, NOW)
        assert doc.total_minor == debited  # documents the money already taken, no new payment
        content = loads(doc.content)
        assert content["payment"]["method"] == "meter_wallet"
        assert sum(ln["net"] for ln in content["lines"]) == doc.net_minor and doc.vat_minor > 0
    with sm.begin() as s:
        assert bills.prepaid_invoices(s, s.get(Site, b["site"]), PERIOD, NOW)[0].id == doc.id
        assert s.scalar(select(func.count()).select_from(Document).where(Document.source == f"tenant:{tid}:prepaid:{PERIOD}")) == 1


# --------------------------------------------------------------------------- pages, payment, API


@pytest.fixture
def tenants_signed_in(client, make_user, sm):
    a = make_user("a@tenants.example")
    bb = make_user("b@tenants.example")
    b = make_building(sm, users={"A": a.id, "B": bb.id})
    generate(sm, b)
    sign_in(client, "a@tenants.example")
    return b


def test_another_tenants_bill_is_not_found(client, tenants_signed_in, sm, app):
    got = all_bills(sm, tenants_signed_in)
    assert client.get(f"/bills/{got['A'].id}").status_code == 200
    assert client.get(f"/bills/{got['B'].id}").status_code == 404
    assert client.get(f"/bills/{got['C'].id}").status_code == 404  # C has no account at all
    assert client.post(f"/bills/{got['B'].id}/pay", data={"payment_method": "wallet"}).status_code == 404
    page = client.get("/account/bills").get_data(as_text=True)
    assert f"/bills/{got['A'].id}" in page and f"/bills/{got['B'].id}" not in page
    # The API says the same.
    token = client.post("/api/v1/auth/token", json={"email": "a@tenants.example", "password": "correct horse staple"}).get_json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    listed = client.get("/api/v1/bills", headers=auth).get_json()["data"]
    assert [x["id"] for x in listed] == [got["A"].id]
    one = client.get(f"/api/v1/bills/{got['A'].id}", headers=auth).get_json()
    assert one["total"] == {"amount": got["A"].total_minor, "currency": "EUR"}
    assert {sh["kind"] for sh in one["shares"]} == {"public_area", "line_loss"}
    assert client.get(f"/api/v1/bills/{got['B'].id}", headers=auth).status_code == 404


def test_paying_a_bill_by_card_marks_it_paid_once(client, tenants_signed_in, sm, app, stripe_config):
    got = all_bills(sm, tenants_signed_in)
    bill = got["A"]
    page = client.get(f"/bills/{bill.id}").get_data(as_text=True)
    assert "How the shared costs were computed" in page
    pm = save_card(client, stripe_config, VISA)
    response = client.post(f"/bills/{bill.id}/pay", data={"payment_method": pm})
    assert response.status_code == 302, response.get_data(as_text=True)[-2000:]
    payment_id = int(re.fullmatch(rf"/bills/{bill.id}/payments/(\d+)", response.headers["Location"]).group(1))
    assert "the bill is paid" in client.get(response.headers["Location"]).get_data(as_text=True)
    with sm() as s:
        row = s.get(CardPayment, payment_id)
        assert row.state is State.SUCCEEDED and row.captured_minor == bill.total_minor
        paid = s.get(Bill, bill.id)
        assert paid.state is BillState.PAID and paid.card_payment_id == payment_id
        entries = s.scalars(select(JournalEntry).where(JournalEntry.reference == f"bill:{bill.id}")).all()
        assert len(entries) == 1
        vat = sum(-p.amount_minor for p in entries[0].postings if p.account.kind is AccountKind.VAT_PAYABLE)
        assert vat == bill.vat_minor
    # The webhook, the reconciliation job and "check again" may all report the same success: booked once.
    client.post(f"/bills/{bill.id}/payments/{payment_id}/confirm")
    with sm.begin() as s:
        cards.refresh(s, app.extensions["payment_provider"], cards.lock(s, payment_id))
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(JournalEntry).where(JournalEntry.reference == f"bill:{bill.id}")) == 1
    # A paid bill cannot be paid again.
    again = client.post(f"/bills/{bill.id}/pay", data={"payment_method": pm})
    assert again.status_code == 409
    assert client.get(f"/api/v1/bills/{bill.id}").status_code == 401


def test_paying_from_the_wallet(client, tenants_signed_in, sm):
    bill = all_bills(sm, tenants_signed_in)["A"]
    poor = client.post(f"/bills/{bill.id}/pay", data={"payment_method": "wallet"})
    assert poor.status_code == 400
    with sm.begin() as s:
        from payments import wallet

        user_owner = f"user:{s.get(Tenant, bill.tenant_id).user_id}"
        transfer(s, idempotency_key="t:wallet", description="top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, user_owner, "EUR"), amount=Money(bill.total_minor + 100, "EUR"))
    assert client.post(f"/bills/{bill.id}/pay", data={"payment_method": "wallet"}).status_code == 302
    assert client.post(f"/bills/{bill.id}/pay", data={"payment_method": "wallet"}).status_code == 409
    with sm() as s:
        assert s.get(Bill, bill.id).state is BillState.PAID
        assert wallet.wallet_balance(s, user_owner, "EUR").amount == 100


def test_overdue_reminder_once_per_period(sm, app, mailbox):
    b = make_building(sm)
    generate(sm, b)
    [issued] = mailbox.wait_for("a@tenants.example", 1)  # one email: the bill, its invoice attached, its due date
    assert "electricity bill for March 2025" in issued["Subject"]
    [pdf] = list(issued.iter_attachments())
    assert pdf.get_filename().endswith(".pdf") and pdf.get_content().startswith(b"%PDF")
    due = dt.datetime(2025, 4, 15, 10, 0, tzinfo=UTC)
    with app.app_context():
        assert bills.run_reminders(due + dt.timedelta(days=3)) == 0  # overdue, but not reminder_days yet
        assert bills.run_reminders(due + dt.timedelta(days=7)) == 3  # A, B and C
        assert bills.run_reminders(due + dt.timedelta(days=7, hours=5)) == 0  # the same day again: nothing
        assert bills.run_reminders(due + dt.timedelta(days=10)) == 0
    reminders = [m for m in mailbox.wait_for("a@tenants.example", 2) if "Reminder" in m["Subject"]]
    assert len(reminders) == 1
    assert "http://localhost/bills/" in reminders[0].get_body(("plain",)).get_content()
    with app.app_context():
        assert bills.run_reminders(due + dt.timedelta(days=14)) == 3  # the next period: the second reminder
    with sm() as s:
        assert {x.reminders_sent for x in s.scalars(select(Bill))} == {2}


# --------------------------------------------------------------------------- closing an account


@pytest.fixture
def prepaid_tenant(client, make_user, sm, app, stripe_config):
    """Pia, signed in, with a prepaid meter P1 topped up 20.00 by card and 12.50 by bank (no card to refund to)."""
    user = make_user("pia@tenants.example")
    b = make_building(sm)
    sign_in(client, "pia@tenants.example")
    pm = save_card(client, stripe_config, VISA)
    provider = app.extensions["payment_provider"]
    with sm.begin() as s:
        site = s.get(Site, b["site"])
        price = s.scalar(select(MeterTariff).where(MeterTariff.name == "Tenants"))
        t = Tenant(site_id=site.id, name="Pia", contact_email="pia@tenants.example", billing=Billing.PREPAID, currency="EUR",
                   user_id=user.id, created_at=dt.datetime(2025, 1, 1, tzinfo=UTC), low_balance_threshold_minor=0)
        s.add(t)
        s.flush()
        p1 = Meter(site_id=site.id, meter_code="P1", serial="SP1", prepaid=True, tenant_id=t.id, tariff_id=price.id)
        s.add(p1)
        s.flush()
        rep = readings.ingest(s, operator_id=b["op"], source="api", now=NOW,
                              rows=[{"meter_code": "P1", "at": START.isoformat(), "register_kwh": "0"}])
        assert rep.rejected == 0
        ids = {"tenant": t.id, "meter": p1.id, "site": site.id, "user": user.id}
    from payments import wallet

    with sm() as s:
        row = topup.start_meter_top_up(s, meter=s.get(Meter, ids["meter"]), owner=user.owner, email=user.email,
                                       amount=Money(2000, "EUR"), payment_method_id=pm,
                                       customer_id=wallet.known_customer_id(s, user.owner))
        s.commit()
        cards.submit(s, provider, row)
        s.commit()
        assert row.state is State.SUCCEEDED
        assert topup.meter_balance(s, s.get(Meter, ids["meter"])).amount == 2000
    return {**b, **ids}


def close(sm, app, ids, register: str) -> dict:
    with sm() as s:
        return closing.close_tenant(s, app.extensions["payment_provider"], s.get(Tenant, ids["tenant"]),
                                    [{"meter_code": "P1", "register_kwh": register}], NOW)


def test_closing_refunds_the_prepaid_balance_to_the_card(client, sm, app, prepaid_tenant):
    ids = prepaid_tenant
    st = close(sm, app, ids, "10")  # 10 kWh × 0.20 × 1.21 = 2.42 used since the first reading
    with sm() as s:
        meter = s.get(Meter, ids["meter"])
        tenant = s.get(Tenant, ids["tenant"])
        assert tenant.state is TenantState.CLOSED and tenant.closed_at == NOW
        assert topup.meter_balance(s, meter).amount == 0
        [rf] = s.scalars(select(CardRefund)).all()
        assert (rf.amount_minor, rf.status) == (2000 - 242, "succeeded")
        assert st["refunded_minor"] == 1758 and st["bank_transfer_minor"] == 0
        final = s.scalar(select(Document).where(Document.source == f"tenant:{ids['tenant']}:prepaid:2025-04"))  # the interval ends at the final reading
        assert final is not None and final.total_minor == 242
    # Closing again changes nothing.
    close(sm, app, ids, "10")
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(CardRefund)) == 1
    page = client.get(f"/tenancies/{ids['tenant']}/statement")
    assert page.status_code == 200 and "Closing statement" in page.get_data(as_text=True)


def test_closing_records_a_bank_transfer_for_what_no_card_can_take_back(client, sm, app, prepaid_tenant, make_user):
    ids = prepaid_tenant
    with sm.begin() as s:  # credit that did not come from a card (paid at the operator's desk)
        transfer(s, idempotency_key="t:desk", description="top-up", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=readings.meter_wallet(s, s.get(Meter, ids["meter"])), amount=Money(1250, "EUR"))
    st = close(sm, app, ids, "10")
    assert st["refunded_minor"] == 2000 and st["bank_transfer_minor"] == 1250 - 242
    with sm() as s:
        acct = s.scalar(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.REFUNDS_PAYABLE,
                                                    LedgerAccount.owner == f"tenant:{ids['tenant']}"))
        assert balance(s, acct).amount == 1008
        assert topup.meter_balance(s, s.get(Meter, ids["meter"])).amount == 0
    assert "Owed to you by bank transfer" in client.get(f"/tenancies/{ids['tenant']}/statement").get_data(as_text=True)
    # The operator sees the row to pay.
    from webapp.models import Role

    with sm() as s:
        op_id = s.get(Site, ids["site"]).operator_id
    make_user("staff@tower.example", role=Role.OPERATOR_STAFF, operator_id=op_id)
    client.post("/auth/sign-out")
    sign_in(client, "staff@tower.example")
    page = client.get("/operator/tenant-refunds").get_data(as_text=True)
    assert "pia@tenants.example" in page and "10.08" in page


def test_closing_a_post_paid_account_gives_a_final_bill_issued_at_the_end_of_the_month(sm, app):
    b = make_building(sm)
    generate(sm, b)  # March, as usual
    closed_at = dt.datetime(2025, 4, 10, 10, 0, tzinfo=UTC)
    with sm() as s:
        st = closing.close_tenant(s, None, s.get(Tenant, b["A"]), [{"meter_code": "A1", "register_kwh": "1300.25"}], closed_at)
        assert st["final_bill"].state is BillState.DRAFT  # its shares need the building's end-of-month readings
        assert s.get(Tenant, b["A"]).state is TenantState.CLOSED
    april_end = dt.datetime(2025, 4, 30, 22, 0, tzinfo=UTC)
    with sm.begin() as s:
        master_end = D(10000) + TENANT_KWH + D("80.123") + LOSS
        rows = [{"meter_code": c, "at": april_end.isoformat(), "register_kwh": r} for c, r in
                (("B1", "800.333"), ("C1", "59.999"), ("PA", "100.123"), ("M", str(master_end + 50 + 100 + 10 + 20 + 5)))]
        assert readings.ingest(s, operator_id=b["op"], rows=rows, source="api", now=april_end).rejected == 0
    with app.app_context():
        assert bills.run_monthly(april_end + dt.timedelta(hours=2))["bills"] == 3
    with sm() as s:
        april = {x.tenant_id: x for x in s.scalars(select(Bill).where(Bill.period == "2025-04"))}
        assert {x.state for x in april.values()} == {BillState.ISSUED}
        final = april[b["A"]]
        assert bills.bill_facts(final)["final"] is True
        [energy] = lines_of(final, "energy")
        assert D(energy["quantity"]) == D(50) and energy["net"] == 1000
        fee = {ln["note"]: ln for ln in lines_of(final, "fee")}
        assert fee["Rent"]["net"] == 50000 * (9 * 24 + 12) // (30 * 24)  # 9.5 of 30 days: 15833.33 → 15833
        # The pools are shared by all three, the leaver by its consumption up to its final reading.
        loss = [lines_of(x, "line_loss")[0] for x in april.values()]
        assert sum(D(ln["quantity"]) for ln in loss) == D(5)
        assert sum(lines_of(x, "public_area")[0]["net"] for x in april.values()) == 400  # 20 kWh × 0.20
