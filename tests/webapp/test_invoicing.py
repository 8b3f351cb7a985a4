"""Invoices, receipts and credit notes at the money's edges: numbering, VAT per rate, refunds (``payments.invoicing``).

Sessions are driven through the charging service as the gateway drives them
(helpers of test_charging_service.py); card sessions capture at localstripe.
"""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal as D
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from payments import invoicing
from payments.base import utcnow
from payments.invoicing import Document, DocumentKind, InvoiceError, VatGroup
from payments.ledger import AccountKind
from payments.money import Money
from payments.providers.base import PaymentProvider
from payments.tariff_store import add_version, connector_owner, loads
from tests.stripe_browser import browser_card
from tests.webapp.wallet_helpers import ana, app_config  # noqa: F401  (fixtures: a signed-in account, localstripe)
from tests.webapp.test_charging_service import SIMPLE, card_site, charge, db, driver, earned, make_site, money, session, start  # noqa: F401
from webapp.charging import service
from webapp.charging.models import ChargerConnection, ChargingSession, PaymentKind, SessionState
from webapp.charging.service import ChargingError, Reading
from webapp.models import Charger, Connector, Operator, Site

# Energy at 21 %, a session fee at 10 % and parking at 0 %: three rates on one invoice.
MIXED = {"id": "T-MIXED", "currency": "EUR", "type": "AD_HOC_PAYMENT", "elements": [
    {"price_components": [{"type": "FLAT", "price": D("0.99"), "vat": D("10.0")},
                          {"type": "ENERGY", "price": D("0.3333"), "vat": D("21.0"), "step_size": 1},
                          {"type": "TIME", "price": D("0.87"), "vat": D("0.0"), "step_size": 60}]},
]}


@pytest.fixture
def site(app):
    make_site(app)
    with app.extensions["db_sessionmaker"].begin() as s:
        s.scalar(select(Operator)).document_prefix = "VP"
    return app


def docs(app, **where) -> list[Document]:
    with db(app) as s:
        q = select(Document).order_by(Document.id)
        for k, v in where.items():
            q = q.where(getattr(Document, k) == v)
        return list(s.scalars(q))


def content(doc: Document) -> dict:
    return loads(doc.content)


def wallet_session(app, user, code="A101", *, wh=7000, t0=None):
    cs = start(app, user, code=code).session
    charge(app, cs, t0 or utcnow(), kwh_at=[(300, wh // 2)], stop_s=700, stop_wh=wh)
    return session(app, cs.id)


# --------------------------------------------------------------------------- arithmetic


def test_mixed_rates_on_one_invoice_add_up_to_the_cent():
    priced = {"currency": "EUR", "total_cost": {"excl_vat": D("0.99") + D("6.6660") + D("0.87"),
                                                "incl_vat": D("1.089") + D("8.06586") + D("0.87")},
              "breakdown": [
                  {"dimension": "FLAT", "unit_price": D("0.99"), "vat": D("10"), "billed_quantity": 1, "unit": "session",
                   "cost": {"excl_vat": D("0.99"), "incl_vat": D("1.089")}},
                  {"dimension": "ENERGY", "unit_price": D("0.3333"), "vat": D("21"), "billed_quantity": D("20"), "unit": "kWh",
                   "cost": {"excl_vat": D("6.666"), "incl_vat": D("8.06586")}},
                  {"dimension": "TIME", "unit_price": D("0.87"), "vat": D("0"), "billed_quantity": D("1"), "unit": "h",
                   "cost": {"excl_vat": D("0.87"), "incl_vat": D("0.87")}}]}
    lines, vat = invoicing.charging_lines(priced, "EUR", 1002)  # 10.02486 → 10.02 charged
    assert sum(v.gross_minor for v in vat) == 1002
    # gross by largest remainder: 10.02 × (8.06586, 1.089, 0.87) / 10.02486 = 806.19, 108.85, 86.96 → 806, 109, 87
    assert {v.rate: (v.net_minor, v.vat_minor) for v in vat} == {D("21"): (666, 140), D("10"): (99, 10), D("0"): (87, 0)}
    assert sum(ln.net_minor for ln in lines) == sum(v.net_minor for v in vat)
    for v in vat:  # per rate: the VAT is the rate's share of its gross, within half a cent of rate × net
        assert abs(D(v.net_minor) * v.rate / 100 - v.vat_minor) <= D("0.5") + v.rate / 100


def test_a_session_capped_at_its_hold_shows_the_full_price_and_what_was_not_charged():
    priced = {"currency": "EUR", "total_cost": {"excl_vat": D("10"), "incl_vat": D("12.1")}, "breakdown": [
        {"dimension": "ENERGY", "unit_price": D("0.5"), "vat": D("21"), "billed_quantity": D("20"), "unit": "kWh",
         "cost": {"excl_vat": D("10"), "incl_vat": D("12.1")}}]}
    lines, vat = invoicing.charging_lines(priced, "EUR", 1000)
    assert [(ln.kind, ln.net_minor, ln.note) for ln in lines] == [("energy", 1000, None), ("adjustment", -174, "above_hold")]
    assert vat == [VatGroup(D("21"), 826, 174)]


rates = st.sampled_from([D("0"), D("5"), D("10"), D("21"), D("19.6")])
part = st.tuples(rates, st.decimals(min_value=D("0.0001"), max_value=D("500"), places=4))


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(part, min_size=1, max_size=6), captured=st.integers(min_value=1, max_value=10**6),
       refunds=st.lists(st.integers(min_value=1, max_value=10**6), max_size=4))
def test_any_split_and_any_refunds_add_up_and_never_credit_more_than_was_paid(parts, captured, refunds):
    weights: dict = {}
    for r, w in parts:
        weights[r] = weights.get(r, D(0)) + w
    vat = invoicing.vat_groups(invoicing.allocate(captured, weights))
    assert sum(v.gross_minor for v in vat) == captured and all(v.net_minor >= 0 and v.vat_minor >= 0 for v in vat)
    credits: list[list[VatGroup]] = []
    left = captured
    for amount in refunds:
        if amount > left:
            with pytest.raises(InvoiceError):
                invoicing.credit_split(vat, credits, amount)
            continue
        c = invoicing.credit_split(vat, credits, amount)
        assert sum(g.gross_minor for g in c) == amount
        credits.append(c)
        left -= amount
    if left:
        credits.append(invoicing.credit_split(vat, credits, left))
    for v in vat:  # everything credited: each rate's net and VAT cancel exactly
        assert sum(g.net_minor for c in credits for g in c if g.rate == v.rate) == v.net_minor
        assert sum(g.vat_minor for c in credits for g in c if g.rate == v.rate) == v.vat_minor


def test_largest_remainder_is_exact_and_fair():
    assert invoicing.largest_remainder(100, [1, 1, 1]) == [34, 33, 33]
    assert invoicing.largest_remainder(-100, [1, 1, 1]) == [-34, -33, -33]
    assert invoicing.largest_remainder(5, [0, 0]) == [5, 0]
    assert sum(invoicing.largest_remainder(999_999, [D("0.1"), D("0.2"), D("0.7")])) == 999_999


# --------------------------------------------------------------------------- issued at capture


def test_a_wallet_session_gets_its_invoice_in_the_capture_with_the_session_facts(site):
    ana = driver(site)
    cs = wallet_session(site, ana)
    [doc] = docs(site)
    assert doc.number == f"VP-{doc.issued_at.astimezone(ZoneInfo('Europe/Madrid')).year}-000001"  # the site's year
    assert (doc.kind, doc.owner, doc.source, doc.total_minor, doc.vat_minor, doc.net_minor) == (
        DocumentKind.INVOICE, ana.owner, f"session:{cs.id}", 296, 51, 245)
    c = content(doc)
    assert c["seller"]["legal_name"] == "Op S.L." and c["buyer"]["email"] == "ana@example.com"
    assert c["lines"] == [{"kind": "energy", "quantity": "7.000", "unit": "kWh", "unit_price": "0.35", "vat_rate": "21.0", "net": 245, "note": None}]
    assert c["payment"] == {"method": "wallet", "brand": None, "last4": None, "held": cs.hold_minor, "captured": 296,
                            "released": cs.hold_minor - 296, "currency": "EUR"}
    assert c["session"]["connector_code"] == "A101" and c["session"]["energy_kwh"] == "7.000"
    assert c["session"]["meter_start_wh"] == "1000.000" and c["session"]["meter_stop_wh"] == "8000.000"


def test_a_free_session_gets_no_invoice(site):
    ana = driver(site)
    wallet_session(site, ana, wh=50)  # below the 100 Wh minimum
    assert docs(site) == []


def test_wallet_refunds_issue_credit_notes_in_their_own_series_and_never_refund_twice(site):
    ana = driver(site)
    cs = wallet_session(site, ana)
    with site.app_context(), db(site) as s:
        service.refund_session(s, None, cs.id, Money(100, "EUR"), reason="charger fault", key="r1", now=utcnow())
        service.refund_session(s, None, cs.id, Money(100, "EUR"), reason="charger fault", key="r1", now=utcnow())  # clicked twice
        with pytest.raises(ChargingError) as e:
            service.refund_session(s, None, cs.id, Money(197, "EUR"), reason="too much", key="r2", now=utcnow())
        assert e.value.code == "refund_exceeds_captured"
        with pytest.raises(ChargingError) as e:
            service.refund_session(s, None, cs.id, Money(0, "EUR"), reason="nothing", key="r3", now=utcnow())
        assert e.value.code == "refund_invalid"
    invoice, credit = docs(site)
    assert credit.kind == DocumentKind.CREDIT_NOTE and credit.number.startswith("VP-CN-") and credit.number.endswith("-000001")
    assert credit.original_id == invoice.id and credit.total_minor == 100 and credit.vat_minor == 17 and credit.net_minor == 83
    assert content(credit)["original"]["number"] == invoice.number and content(credit)["reason"] == "charger fault"
    assert money(site, ana.owner) == 5000 - 296 + 100
    assert earned(site) == 245 - 83 and money(site, kind=AccountKind.VAT_PAYABLE) == 51 - 17
    assert session(site, cs.id).refunded_minor == 100
    with site.app_context(), db(site) as s:  # the rest: revenue and VAT of the session are back to zero exactly
        service.refund_session(s, None, cs.id, Money(196, "EUR"), reason="goodwill", key="r4", now=utcnow())
    assert earned(site) == 0 and money(site, kind=AccountKind.VAT_PAYABLE) == 0
    assert money(site, ana.owner) == 5000
    assert [d.number[-6:] for d in docs(site, kind=DocumentKind.CREDIT_NOTE)] == ["000001", "000002"]
    assert content(docs(site)[0]) == content(invoice)  # the invoice itself never changes


def test_a_session_that_is_not_completed_cannot_be_refunded(site):
    ana = driver(site)
    cs = start(site, ana).session
    with site.app_context(), db(site) as s, pytest.raises(ChargingError) as e:
        service.refund_session(s, None, cs.id, Money(100, "EUR"), reason="x", key="k", now=utcnow())
    assert e.value.code == "not_refundable"


def test_a_number_given_by_a_rolled_back_capture_is_given_again(site):
    with site.app_context(), db(site) as s:
        op = s.scalar(select(Operator))
        kw = dict(kind=DocumentKind.INVOICE, scope=f"operator:{op.id}", prefix="VP", issued_at=utcnow(), year=2026, currency="EUR",
                  owner="user:1", user_id=None, email=None, locale="en", source="test", vat=[VatGroup(D("21"), 100, 21)], content={})
        first = invoicing.issue(s, key="a", **kw).number
        s.rollback()
        again = invoicing.issue(s, key="b", **kw).number
        s.commit()
        assert first == again == "VP-2026-000001"
        assert invoicing.issue(s, key="b", **kw).number == "VP-2026-000001"  # the same cause: the same document
        assert invoicing.issue(s, key="c", **kw).number == "VP-2026-000002"
        s.commit()


def many_connectors(app, n: int) -> list[str]:
    with app.extensions["db_sessionmaker"].begin() as s:
        site_ = s.scalar(select(Site))
        ch = Charger(site_id=site_.id, charge_point_id="CP-MANY", password_hash="x")
        s.add(ch)
        s.flush()
        codes = []
        for i in range(1, n + 1):
            c = Connector(charger_id=ch.id, number=i, connector_code=f"M{i:03d}", max_power_kw=22, status="Available")
            s.add(c)
            s.flush()
            add_version(s, connector_owner(c.id), SIMPLE, site_currency="EUR", created_by="test")
            codes.append(c.connector_code)
        s.add(ChargerConnection(charger_id=ch.id, gateway_url="http://gateway.invalid", connection_id="c2"))
    return codes


def test_fifty_concurrent_captures_number_their_invoices_without_gap_or_duplicate(site):
    """50 sessions settled at once, each in its own transaction and thread (PostgreSQL: real row-lock contention).

    SQLite runs one writer at a time whatever the threads do, so there the
    same test runs 10 sessions (its pool would only make the other 40 wait).
    """
    n = 50 if site.extensions["db_engine"].dialect.name == "postgresql" else 10
    codes = many_connectors(site, n)
    t0 = utcnow() - dt.timedelta(minutes=20)
    ids = []
    with site.app_context():
        for i, code in enumerate(codes):
            u = driver(site, email=f"d{i}@example.com")
            cs = start(site, u, code=code).session
            assert cs.state == SessionState.START_REQUESTED
            with db(site) as s:  # the charger's messages, without the worker settling them: the threads will
                charger = s.scalar(select(Charger).where(Charger.charge_point_id == "CP-MANY"))
                ans = service.start_transaction(s, charger, connector_number=i + 1, id_tag=cs.id_tag, meter_start_wh=D(0),
                                                timestamp=t0, now=t0)
                service.meter_values(s, charger, connector_number=i + 1, transaction_id=ans.transaction_id,
                                     readings=[Reading(t0 + dt.timedelta(minutes=5), D(1000 + 10 * i), D(11000))], now=t0)
                service.stop_transaction(s, charger, transaction_id=ans.transaction_id, meter_stop_wh=D(2000 + 10 * i),
                                         timestamp=t0 + dt.timedelta(minutes=10), reason="Local", readings=[], now=t0)
                s.commit()
            ids.append(cs.id)
    barrier = threading.Barrier(len(ids))
    errors: list[BaseException] = []
    # One connection per thread (the app's pool is smaller: threads would queue for connections, not for the numbers).
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    engine = site.extensions["db_engine"]
    if engine.dialect.name == "postgresql":
        engine = create_engine(engine.url, pool_size=n, max_overflow=0, pool_timeout=300)
    sessions = sessionmaker(engine, expire_on_commit=False) if engine is not site.extensions["db_engine"] else site.extensions["db_sessionmaker"]

    def settle(sid: int) -> None:
        try:
            with site.app_context(), sessions() as s:
                if engine is not site.extensions["db_engine"]:
                    s.connection()  # PostgreSQL: the connection first, then all start together (SQLite's would take the lock)
                barrier.wait(timeout=120)  # a thread that fails early breaks the barrier instead of hanging the others
                service.settle(s, None, sid, utcnow())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=settle, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if engine is not site.extensions["db_engine"]:
        engine.dispose()
    assert errors == []
    with db(site) as s:
        assert s.scalars(select(ChargingSession.state).where(ChargingSession.id.in_(ids))).all() == [SessionState.COMPLETED] * n
    numbers = [d.sequence for d in docs(site, kind=DocumentKind.INVOICE)]
    assert sorted(numbers) == list(range(1, n + 1))
    assert len({d.source for d in docs(site)}) == n


# --------------------------------------------------------------------------- cards


def test_a_card_session_invoice_names_the_card_and_a_partial_refund_credits_it(card_site, stripe_config):
    make_site(card_site)
    provider: PaymentProvider = card_site.extensions["payment_provider"]
    pm = browser_card(stripe_config, "4242424242424242")
    card = provider.card_of(payment_method_id=pm)
    cs = start(card_site, None, email="guest@example.com", payment_kind=PaymentKind.CARD, payment_method_id=pm,
               card_brand=card.brand, card_last4=card.last4, locale="es").session
    charge(card_site, cs, utcnow(), kwh_at=[(300, 4000)], stop_s=600, stop_wh=10000)
    [doc] = docs(card_site)
    c = content(doc)
    assert doc.owner == f"guest:{cs.id}" and doc.email == "guest@example.com" and doc.locale == "es"
    assert c["payment"]["method"] == "card" and c["payment"]["last4"] == "4242" and c["payment"]["brand"] == "visa"
    assert (doc.total_minor, c["payment"]["captured"], c["payment"]["held"]) == (424, 424, cs.hold_minor)
    with card_site.app_context(), db(card_site) as s:
        service.refund_session(s, provider, cs.id, Money(124, "EUR"), reason="slow charging", key="support-1", now=utcnow())
        service.refund_session(s, provider, cs.id, Money(124, "EUR"), reason="slow charging", key="support-1", now=utcnow())
    credit = docs(card_site, kind=DocumentKind.CREDIT_NOTE)
    assert len(credit) == 1 and credit[0].total_minor == 124 and credit[0].original_id == doc.id
    assert provider.retrieve(payment_id=_pi(card_site, cs)).amount_refunded == Money(124, "EUR")
    assert earned(card_site) == 350 - credit[0].net_minor
    assert money(card_site, kind=AccountKind.VAT_PAYABLE) == 74 - credit[0].vat_minor
    assert money(card_site, kind=AccountKind.PROVIDER_CLEARING) == 424 - 124


def _pi(app, cs) -> str:
    from payments.cards import CardPayment

    with db(app) as s:
        return s.get(CardPayment, cs.card_payment_id).provider_payment_id


def test_a_wallet_top_up_gets_a_receipt_without_vat_once(app, client, ana, stripe_config):
    """Wallet credit is a multi-purpose voucher: VAT is due when it is spent (the charging invoice), not at top-up."""
    from tests.webapp.wallet_helpers import payment_id_of, save_card, top_up
    from webapp.models import User

    with app.extensions["db_sessionmaker"].begin() as s:
        s.get(User, ana.id).locale = "zh"
    card = save_card(client, stripe_config, "4242424242424242")
    payment_id = payment_id_of(top_up(client, card, preset="2000", new_card=True))
    assert client.post(f"/wallet/top-ups/{payment_id}/confirm").status_code == 302  # asked again: still one receipt
    [doc] = docs(app)
    assert (doc.kind, doc.total_minor, doc.vat_minor, doc.locale, doc.source, doc.owner) == (
        DocumentKind.RECEIPT, 2000, 0, "zh", f"card_payment:{payment_id}", ana.owner)
    assert doc.number.startswith("VPW-") and content(doc)["notes"] == ["vat_on_use"]
    assert content(doc)["vat"] == [{"rate": None, "net": 2000, "vat": 0, "gross": 2000}]
