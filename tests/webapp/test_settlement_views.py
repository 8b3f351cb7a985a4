"""The operator's settlement pages: parties, split rules, statements (HTML/CSV/XLSX), revenue, payouts, reconciliation; who sees what."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from decimal import Decimal

import pytest
from sqlalchemy import select

from payments import reconcile as rec
from payments import settlement
from payments.base import utcnow
from payments.settlement import Party, PartyKind, SplitRule

IBAN = "DE89370400440532013000"
PASSWORD = "correct horse staple"


@pytest.fixture
def sm(app):
    return app.extensions["db_sessionmaker"]


@pytest.fixture
def world(sm):
    """Two operators, each with a site and parties; revenue allocated at operator A's site this month."""
    from webapp.models import Operator, Site

    now = utcnow()
    with sm.begin() as s:
        a, b = Operator(name="Alpha", legal_name="Alpha Charging SL"), Operator(name="Beta", legal_name="Beta Energie GmbH")
        s.add_all([a, b])
        s.flush()
        sa, sb = Site(operator_id=a.id, name="Alpha Garage"), Site(operator_id=b.id, name="Beta Hof")
        s.add_all([sa, sb])
        a_op = Party(operator_id=a.id, kind=PartyKind.OPERATOR, legal_name="Alpha Charging SL", payout_currency="EUR")
        a_host = Party(operator_id=a.id, kind=PartyKind.SITE_HOST, legal_name="Garage Owner SA", payout_currency="EUR", iban=IBAN)
        b_op = Party(operator_id=b.id, kind=PartyKind.OPERATOR, legal_name="Beta Energie GmbH", payout_currency="EUR")
        platform = Party(operator_id=None, kind=PartyKind.PLATFORM, legal_name="Voltpay", payout_currency="EUR")
        s.add_all([a_op, a_host, b_op, platform])
        s.flush()
        s.add(SplitRule(site_id=sa.id, number=1, effective_from=now - dt.timedelta(days=1), created_by="test",
                        rule_json=f'{{"shares": [{{"party_id": {a_host.id}, "bps": 3000}}], "merchant_of_record": {a_op.id}}}'))
        s.flush()
        first = settlement.allocate(s, key="t:1", source="session:1", site_id=sa.id, currency="EUR", gross=1210, vat=210, fee=0,
                                    merchant_of_record=a_op.id, at=now - dt.timedelta(minutes=5))
        settlement.allocate(s, key="t:2", source="session:2", site_id=sa.id, currency="EUR", gross=605, vat=105, fee=0,
                            merchant_of_record=a_op.id, at=now - dt.timedelta(minutes=4))
        settlement.reverse(s, first, key="t:1:refund", gross=121, vat=21, at=now - dt.timedelta(minutes=3))
        settlement.allocate(s, key="t:3", source="session:3", site_id=sb.id, currency="EUR", gross=999, vat=0, fee=0,
                            merchant_of_record=b_op.id, at=now - dt.timedelta(minutes=2))
        return {"a": a.id, "b": b.id, "site_a": sa.id, "site_b": sb.id, "a_op": a_op.id, "a_host": a_host.id, "b_op": b_op.id, "platform": platform.id}


def csrf_token(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def sign_in(client, make_user, email: str, **fields) -> None:
    make_user(email, **fields)
    page = client.get("/auth/sign-in").get_data(as_text=True)
    r = client.post("/auth/sign-in", data={"email": email, "password": PASSWORD, "csrf_token": csrf_token(page)})
    assert r.status_code in (302, 303), r.status_code


@pytest.fixture
def staff_a(csrf_client, make_user, world):
    from webapp.models import Role

    sign_in(csrf_client, make_user, "staff-a@example.com", role=Role.OPERATOR_STAFF, operator_id=world["a"])
    return csrf_client


@pytest.fixture
def admin(csrf_client, make_user, world):
    from webapp.models import Role

    sign_in(csrf_client, make_user, "admin@example.com", role=Role.ADMIN)
    return csrf_client


# --------------------------------------------------------------------------- permissions


def test_staff_see_only_their_operators_parties_and_statements(staff_a, world):
    html = staff_a.get("/operator/settlement/parties").get_data(as_text=True)
    assert "Garage Owner SA" in html and "Beta Energie" not in html and "Voltpay</td>" not in html
    assert "DE89 •••• •••• 3000" in html and IBAN not in html  # masked
    for url in (f"/operator/settlement/parties/{world['b_op']}/statement", f"/operator/settlement/parties/{world['b_op']}/statement.csv",
                f"/operator/settlement/parties/{world['b_op']}/statement.xlsx", f"/operator/settlement/parties/{world['b_op']}/edit",
                f"/operator/settlement/parties/{world['platform']}/statement", f"/operator/settlement/sites/{world['site_b']}/rules",
                "/operator/settlement/parties/999999/statement"):
        assert staff_a.get(url).status_code == 404, url
    assert staff_a.get(f"/operator/settlement/parties/{world['a_host']}/statement").status_code == 200
    index = staff_a.get("/operator/settlement/").get_data(as_text=True)
    assert "Alpha Garage" in index and "Beta Hof" not in index
    assert staff_a.get("/operator/settlement/reconciliation").status_code == 403  # the provider account is the platform's


def test_customers_and_strangers_are_kept_out(client, make_user, world):
    assert client.get("/operator/settlement/parties").status_code in (302, 401)
    make_user("driver@example.com")
    client.post("/auth/sign-in", data={"email": "driver@example.com", "password": PASSWORD})
    assert client.get("/operator/settlement/parties").status_code == 403
    assert client.get(f"/operator/settlement/parties/{world['a_op']}/statement").status_code == 403


def test_an_admin_sees_every_operator(admin, world):
    html = admin.get("/operator/settlement/parties").get_data(as_text=True)
    assert "Garage Owner SA" in html and "Beta Energie GmbH" in html and "Voltpay" in html
    assert admin.get(f"/operator/settlement/parties/{world['b_op']}/statement").status_code == 200


# --------------------------------------------------------------------------- parties


def test_create_and_edit_a_party_with_a_checked_iban(staff_a, sm, world):
    page = staff_a.get("/operator/settlement/parties/new").get_data(as_text=True)
    token = csrf_token(page)
    form = {"csrf_token": token, "kind": "agency", "legal_name": "Agencia Sur", "email": "pay@sur.example", "payout_currency": "eur",
            "iban": "DE89 3704 0044 0532 0130 01", "bic": "", "min_payout": "25.00", "parent_party_id": str(world["a_op"]), "active": "y"}
    bad = staff_a.post("/operator/settlement/parties/new", data=form)
    html = bad.get_data(as_text=True)
    assert bad.status_code == 400 and 'id="iban-error"' in html and "not a valid IBAN" in html

    assert staff_a.post("/operator/settlement/parties/new", data={**form, "iban": "DE89 3704 0044 0532 0130 00", "bic": "COBADEFFXXX"}).status_code == 303
    with sm() as s:
        p = s.scalar(select(Party).where(Party.legal_name == "Agencia Sur"))
        assert (p.operator_id, p.iban, p.bic, p.min_payout_minor, p.parent_party_id, p.payout_currency) == (
            world["a"], IBAN, "COBADEFFXXX", 2500, world["a_op"], "EUR")

    edit = staff_a.get(f"/operator/settlement/parties/{p.id}/edit").get_data(as_text=True)
    assert IBAN not in edit and "DE89 •••• •••• 3000" in edit
    r = staff_a.post(f"/operator/settlement/parties/{p.id}/edit", data={**form, "csrf_token": csrf_token(edit), "iban": "", "bic": "", "legal_name": "Agencia Sur SL"})
    assert r.status_code == 303
    with sm() as s:
        p = s.get(Party, p.id)
        assert (p.legal_name, p.iban) == ("Agencia Sur SL", IBAN)  # an empty IBAN keeps the account

    # Without the CSRF token nothing is saved.
    assert staff_a.post("/operator/settlement/parties/new", data={**form, "csrf_token": ""}).status_code == 400


# --------------------------------------------------------------------------- split rules


def test_a_new_rule_version_is_validated_with_the_reason_at_the_field(staff_a, sm, world):
    url = f"/operator/settlement/sites/{world['site_a']}/rules"
    page = staff_a.get(url).get_data(as_text=True)
    assert "Version" in page and "Garage Owner SA" in page
    token = csrf_token(page)
    too_much = f'{{"shares": [{{"party_id": {world["a_host"]}, "bps": 8000}}, {{"party_id": {world["platform"]}, "bps": 3000}}], "merchant_of_record": {world["a_op"]}}}'
    r = staff_a.post(url, data={"csrf_token": token, "rule": too_much})
    assert r.status_code == 400 and "110" in r.get_data(as_text=True) and 'id="rule-error"' in r.get_data(as_text=True)
    others = f'{{"shares": [{{"party_id": {world["b_op"]}, "bps": 1000}}], "merchant_of_record": {world["a_op"]}}}'
    r = staff_a.post(url, data={"csrf_token": token, "rule": others})
    assert r.status_code == 400 and "no such party" in r.get_data(as_text=True)  # another operator's party
    r = staff_a.post(url, data={"csrf_token": token, "rule": "{not json"})
    assert r.status_code == 400 and "Not valid JSON" in r.get_data(as_text=True)

    good = f'{{"shares": [{{"party_id": {world["a_host"]}, "bps": 2500}}], "platform_fee": {{"party_id": {world["platform"]}, "bps": 100}}, "merchant_of_record": {world["a_op"]}}}'
    assert staff_a.post(url, data={"csrf_token": token, "rule": good}).status_code == 303
    with sm() as s:
        assert [r.number for r in s.scalars(select(SplitRule).where(SplitRule.site_id == world["site_a"]).order_by(SplitRule.number))] == [1, 2]


# --------------------------------------------------------------------------- statements and revenue


def test_a_statement_has_the_same_rows_and_totals_in_html_csv_and_xlsx(staff_a, world):
    from openpyxl import load_workbook

    base = f"/operator/settlement/parties/{world['a_host']}/statement"
    html = staff_a.get(base).get_data(as_text=True)
    table = html[html.index('data-testid="statement"'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    html_rows = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
    html_totals = dict(re.findall(r'data-total="(\w+)">([^<]*)<', table))
    # 30 % of the nets 1000 and 500, less 30 % of the refund's 100.
    assert [r[1] for r in html_rows] == ["revenue", "revenue", "refund"]
    assert [r[5] for r in html_rows] == ["3.00", "1.50", "-0.30"]
    assert html_totals == {"revenue": "4.50", "refund": "-0.30", "payout": "0.00", "total": "4.20"}

    resp = staff_a.get(base + ".csv")
    assert resp.mimetype == "text/csv" and "attachment" in resp.headers["Content-Disposition"]
    lines = list(csv.reader(io.StringIO(resp.get_data(as_text=True))))
    assert lines[0] == ["date", "kind", "reference", "site", "role", "amount", "currency"]
    csv_rows = lines[1:1 + len(html_rows)]
    assert [r[:6] for r in csv_rows] == [r[:6] for r in html_rows]
    assert {r[0]: r[5] for r in lines[2 + len(html_rows):]} == {"Total revenue": "4.50", "Total refund": "-0.30", "Total payout": "0.00", "Total": "4.20"}

    wb = load_workbook(io.BytesIO(staff_a.get(base + ".xlsx").get_data()))
    ws = wb.active
    values = [list(r) for r in ws.iter_rows(values_only=True)]
    assert values[1] == ["date", "kind", "reference", "site", "role", "amount", "currency"]
    xrows = values[2:2 + len(html_rows)]
    assert [(r[0].strftime("%Y-%m-%d %H:%M"), r[1], r[2], r[3], r[4], f"{Decimal(str(r[5])):.2f}") for r in xrows] == [tuple(r[:6]) for r in html_rows]
    xtotals = {r[0]: f"{Decimal(str(r[5])):.2f}" for r in values[3 + len(html_rows):]}
    assert xtotals == {"Total revenue": "4.50", "Total refund": "-0.30", "Total payout": "0.00", "Total": "4.20"}


def test_a_bad_period_is_refused(staff_a, world):
    base = f"/operator/settlement/parties/{world['a_host']}/statement"
    assert staff_a.get(base + "?from=2026-13-01").status_code == 400
    assert staff_a.get(base + "?from=2026-12-05&to=2026-12-01").status_code == 400


def test_revenue_per_day_and_site_shows_only_the_operators_sites(staff_a, world):
    html = staff_a.get("/operator/settlement/revenue").get_data(as_text=True)
    assert "Alpha Garage" in html and "Beta Hof" not in html
    row = re.search(r"<td>Alpha Garage</td>(.*?)</tr>", html, re.S).group(1)
    assert re.findall(r'<td class="num">([^<]*)</td>', row) == ["2", "1", "16.94", "2.94", "0.00", "14.00"]


# --------------------------------------------------------------------------- payouts


def test_payout_batches_staff_see_their_payouts_an_admin_downloads_the_files(staff_a, sm, world, make_user, app):
    payouts = pytest.importorskip("payments.payouts")
    day = utcnow().date()
    with sm.begin() as s:
        b = s.get(Party, world["b_op"])
        b.iban = "FR1420041010050500013M02606"
        batch = payouts.build_batch(s, day, "EUR", now=utcnow() + dt.timedelta(days=1))
        batch_id = batch.id
        assert {p.party_id for p in batch.payouts} >= {world["a_host"], world["b_op"]}
    html = staff_a.get("/operator/settlement/payouts").get_data(as_text=True)
    assert str(day) in html
    page = staff_a.get(f"/operator/settlement/payouts/{batch_id}").get_data(as_text=True)
    assert "Garage Owner SA" in page and "Beta Energie" not in page and "payouts.csv" not in page
    assert staff_a.get(f"/operator/settlement/payouts/{batch_id}/files/payouts.csv").status_code == 403


def test_admin_downloads_batch_files(admin, sm, world):
    payouts = pytest.importorskip("payments.payouts")
    with sm.begin() as s:
        batch_id = payouts.build_batch(s, utcnow().date(), "EUR", now=utcnow() + dt.timedelta(days=1)).id
    page = admin.get(f"/operator/settlement/payouts/{batch_id}").get_data(as_text=True)
    assert "payouts.csv" in page
    r = admin.get(f"/operator/settlement/payouts/{batch_id}/files/payouts.csv")
    assert r.status_code == 200 and r.mimetype == "text/csv" and "Garage Owner SA" in r.get_data(as_text=True)


# --------------------------------------------------------------------------- reconciliation


def test_reconciliation_import_list_and_resolve(admin, sm, world):
    day = dt.date(2026, 11, 30)
    export = ("id,Type,Source,Amount,Fee,Net,Currency,Created (UTC),Available On (UTC),Description\n"
              "txn_1,adjustment,du_1,-15.00,0.00,-15.00,eur,2026-11-30 10:00:00,2026-12-02 00:00:00,Chargeback\n")
    page = admin.get("/operator/settlement/reconciliation").get_data(as_text=True)
    token = csrf_token(page)
    bad = admin.post("/operator/settlement/reconciliation/import", content_type="multipart/form-data",
                     data={"csrf_token": token, "day": str(day), "file": (io.BytesIO(b"id,Type\n"), "x.csv")})
    assert bad.status_code == 400 and "missing columns" in bad.get_data(as_text=True) and 'id="file-error"' in bad.get_data(as_text=True)

    r = admin.post("/operator/settlement/reconciliation/import", content_type="multipart/form-data",
                   data={"csrf_token": token, "day": str(day), "file": (io.BytesIO(export.encode()), "balance.csv")})
    assert r.status_code == 303
    run_page = admin.get(r.headers["Location"]).get_data(as_text=True)
    assert 'data-testid="run-state">open<' in run_page and "missing in ledger" in run_page and "-15.00" in run_page
    with sm() as s:
        item = s.scalar(select(rec.ReconciliationItem))
        run_id = item.run_id
    url = f"/operator/settlement/reconciliation/{run_id}/items/{item.id}/resolve"
    empty = admin.post(url, data={"csrf_token": csrf_token(run_page), "note": " "})
    assert empty.status_code == 400 and f'id="note-{item.id}-error"' in empty.get_data(as_text=True)
    assert admin.post(url, data={"csrf_token": csrf_token(run_page), "note": "chargeback, booked by finance"}).status_code == 303
    done = admin.get(f"/operator/settlement/reconciliation/{run_id}").get_data(as_text=True)
    assert 'data-testid="run-state">reconciled<' in done and "chargeback, booked by finance" in done
    with sm() as s:
        item = s.get(rec.ReconciliationItem, item.id)
        assert item.resolved_by.startswith("user:") and item.resolved_at is not None
    assert admin.post(url, data={"note": "no token"}).status_code == 400  # CSRF
    assert admin.get("/operator/settlement/reconciliation/999999").status_code == 404
