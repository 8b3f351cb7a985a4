"""T+1 payout batches (``payments.payouts``), their files and Connect transfers, the daily job, and bulk allocation."""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
import xml.etree.ElementTree as ET
from decimal import Decimal as D

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from payments import payouts, settlement
from payments.ledger import AccountKind, JournalEntry, LedgerAccount, Posting, balance, get_account
from payments.money import Money
from payments.payouts import BankDetailsError, BatchState, Debtor, Payout, PayoutBatch, PayoutError, PayoutFileError, PayoutState, Rail
from payments.settlement import AllocationLine, Party, PartyKind

T = dt.date(2026, 11, 2)
NOON = dt.datetime(2026, 11, 2, 12, 0, tzinfo=dt.UTC)
NEXT_MORNING = dt.datetime(2026, 11, 3, 6, 0, tzinfo=dt.UTC)
DEBTOR = Debtor(name="Voltpay Platform SL", iban="ES91 2100 0418 4502 0005 1332", bic="CAIXESBBXXX")
NS = {"p": f"urn:iso:std:iso:20022:tech:xsd:{payouts.PAIN_SCHEMA}"}


@pytest.fixture(autouse=True)
def _every_run_from_a_fresh_localstripe(stripe_config):
    """Every test here may pay a connected account: give each a wiped localstripe and its settings."""


@pytest.fixture
def app_config(app_config, stripe_config, tmp_path):  # the conftest's settings, plus Stripe and the payout settings
    return {**app_config, **stripe_config, "PAYOUT_DIR": str(tmp_path / "payouts"), "PAYOUT_DEBTOR_NAME": DEBTOR.name,
            "PAYOUT_DEBTOR_IBAN": DEBTOR.iban, "PAYOUT_DEBTOR_BIC": DEBTOR.bic}


def make_parties(s) -> dict[str, Party]:
    """An operator paid by SEPA, a site host paid by SEPA with a 10.00 minimum, an equipment owner with a Turkish account
    (CSV), and the platform on Stripe Connect."""
    spec = {
        "op": dict(kind=PartyKind.OPERATOR, legal_name="Recarga Sur SL", iban="es91 2100 0418 4502 0005 1332", bic="CAIXESBBXXX"),
        "host": dict(kind=PartyKind.SITE_HOST, legal_name="Hôtel Élysée & Fils", iban="FR1420041010050500013M02606", min_payout_minor=1000),
        "owner": dict(kind=PartyKind.EQUIPMENT_OWNER, legal_name="=Anadolu Şarj", iban="TR330006100519786457841326"),
        "platform": dict(kind=PartyKind.PLATFORM, legal_name="Voltpay Platform", stripe_account_id="acct_1VoltpayPlatform"),
    }
    out = {name: Party(payout_currency="EUR", **kw) for name, kw in spec.items()}
    s.add_all(out.values())
    s.flush()
    return out


def add_rule(s, p) -> None:
    """Site 1: platform 5 %, owner 1.00 per session, host 10 % of the rest, the operator the remainder."""
    from payments.tariff_store import dumps

    s.add(settlement.SplitRule(site_id=1, number=1, effective_from=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), created_by="test", rule_json=dumps(
        {"shares": [{"party_id": p["host"].id, "bps": 1000}, {"party_id": p["owner"].id, "fixed_per_session": 100}],
         "platform_fee": {"party_id": p["platform"].id, "bps": 500}, "merchant_of_record": p["op"].id})))
    s.flush()


def pay(s, p, key: str, gross: int, at: dt.datetime, vat: int = 0):
    """A captured payment of ``gross`` on site 1 at ``at``, allocated (the capture's own booking is not needed here)."""
    return settlement.allocate(s, key=key, source=key, site_id=1, currency="EUR", gross=gross, vat=vat, merchant_of_record=p["op"].id, at=at)


def owed(s, party: Party, currency: str = "EUR") -> int:
    return balance(s, get_account(s, AccountKind.PARTY_PAYABLE, currency, party.owner)).amount


def raw(s, kind: AccountKind, owner: str = "", currency: str = "EUR") -> int:
    """Debit-positive sum of an account's postings."""
    return int(s.scalar(select(func.coalesce(func.sum(Posting.amount_minor), 0)).join(LedgerAccount)
                        .where(LedgerAccount.kind == kind, LedgerAccount.owner == owner, LedgerAccount.currency == currency)))


def by_party(batch: PayoutBatch) -> dict[int, Payout]:
    return {po.party_id: po for po in batch.payouts}


# --------------------------------------------------------------------------- batches


def test_a_batch_pays_the_day_once_however_often_it_is_built(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 10_000, NOON)  # net 10 000: platform 500, owner 100, host 940, op 8 460
        pay(s, p, "session:2", 20_000, NOON + dt.timedelta(hours=11, minutes=59))  # the last minute of T
        pay(s, p, "session:3", 5_000, dt.datetime(2026, 11, 3, 0, 0, tzinfo=dt.UTC))  # T+1: the next batch
        with pytest.raises(PayoutError):
            payouts.build_batch(s, T, "EUR", now=dt.datetime(2026, 11, 2, 23, 0, tzinfo=dt.UTC))  # the day is not over
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        got = {pid: (po.amount_minor, po.rail) for pid, po in by_party(batch).items()}
        assert got == {p["platform"].id: (1500, Rail.STRIPE_CONNECT), p["owner"].id: (200, Rail.CSV),
                       p["host"].id: (2830, Rail.SEPA), p["op"].id: (25_470, Rail.SEPA)}
        assert batch.state == BatchState.DRAFT and batch.total_minor == 30_000
        assert by_party(batch)[p["op"].id].iban == "ES9121000418450200051332"  # validated and compact, as the bank file needs it
        assert raw(s, AccountKind.PAYOUTS_IN_TRANSIT) == -30_000
        assert payouts.build_batch(s, T, "EUR", now=NEXT_MORNING + dt.timedelta(hours=1)).id == batch.id  # the same batch
        assert s.scalar(select(func.count(Payout.id))) == 4 and raw(s, AccountKind.PAYOUTS_IN_TRANSIT) == -30_000
        # Only T+1's revenue is still owed, and the T+1 batch pays just that.
        assert owed(s, p["op"]) + owed(s, p["host"]) + owed(s, p["owner"]) + owed(s, p["platform"]) == 5_000
        nxt = payouts.build_batch(s, T + dt.timedelta(days=1), "EUR", now=NEXT_MORNING + dt.timedelta(days=1))
        assert nxt.total_minor == 5_000 - 465  # the host's 465 is below its 10.00 minimum: it carries over
        assert owed(s, p["host"]) == 465 and owed(s, p["op"]) == 0


def test_a_batch_built_again_in_another_transaction_pays_nothing_twice(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 10_000, NOON)
    with Session.begin() as s:
        first = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING).id
    with Session.begin() as s:
        assert payouts.build_batch(s, T, "EUR", now=NEXT_MORNING).id == first
        # A catch-up build of an earlier day after the fact finds nothing left to pay either.
        assert payouts.build_batch(s, T - dt.timedelta(days=1), "EUR", now=NEXT_MORNING).payouts == []
        assert s.scalar(select(func.sum(Payout.amount_minor))) == 10_000 - 940  # the host is below its minimum


def test_below_the_minimum_the_payable_carries_over_until_it_is_reached(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 4_000, NOON)  # host: 10 % of 3 700 = 370
        b1 = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        assert p["host"].id not in by_party(b1) and owed(s, p["host"]) == 370
        pay(s, p, "session:2", 4_000, NOON + dt.timedelta(days=1))
        b2 = payouts.build_batch(s, T + dt.timedelta(days=1), "EUR", now=NEXT_MORNING + dt.timedelta(days=1))
        assert p["host"].id not in by_party(b2) and owed(s, p["host"]) == 740
        pay(s, p, "session:3", 4_000, NOON + dt.timedelta(days=2))
        b3 = payouts.build_batch(s, T + dt.timedelta(days=2), "EUR", now=NEXT_MORNING + dt.timedelta(days=2))
        assert by_party(b3)[p["host"].id].amount_minor == 1110 and owed(s, p["host"]) == 0


def test_a_refund_after_the_cut_off_is_not_paid_out(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        alloc = pay(s, p, "session:1", 10_000, NOON)
        settlement.reverse(s, alloc, key="refund:1", gross=10_000, vat=0, at=NEXT_MORNING - dt.timedelta(hours=1))  # T+1, before the run
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        assert batch.payouts == []  # owed at the cut-off, but given back since: nothing to pay
        assert all(owed(s, party) == 0 for party in p.values())


def test_a_returned_payout_is_reversed_and_paid_in_the_next_batch(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        p["host"].min_payout_minor = 0
        pay(s, p, "session:1", 10_000, NOON)
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        payouts.mark_sent(batch, NEXT_MORNING)
        op, host = by_party(batch)[p["op"].id], by_party(batch)[p["host"].id]
        assert (batch.state, op.state) == (BatchState.SENT, PayoutState.SENT)
        payouts.mark_paid(op, NEXT_MORNING)
        assert raw(s, AccountKind.PROVIDER_CLEARING, payouts.BANK_OWNER) == -8460  # left our bank account
        payouts.return_payout(op, "AC04 account closed", NEXT_MORNING + dt.timedelta(days=2))  # returned after it was paid
        payouts.return_payout(host, "AC01 wrong IBAN", NEXT_MORNING + dt.timedelta(days=2))  # returned while in transit
        payouts.return_payout(host, "again", NEXT_MORNING + dt.timedelta(days=2))  # idempotent
        assert (op.state, op.reason, host.state, batch.state) == (PayoutState.RETURNED, "AC04 account closed", PayoutState.RETURNED,
                                                                 BatchState.PARTLY_RETURNED)
        with pytest.raises(PayoutError):
            payouts.mark_paid(op)
        assert owed(s, p["op"]) == 8460 and owed(s, p["host"]) == 940
        assert raw(s, AccountKind.PROVIDER_CLEARING, payouts.BANK_OWNER) == 0
        # The rest of the batch is paid; the in-transit account holds nothing once everything is settled.
        for po in batch.payouts:
            if po.state == PayoutState.SENT or po.rail == Rail.STRIPE_CONNECT:
                payouts.mark_paid(po)
        assert raw(s, AccountKind.PAYOUTS_IN_TRANSIT) == 0
        # Next day's batch pays them again (the operator fixed the IBAN in between).
        p["op"].iban, p["op"].bic = "DE89370400440532013000", "COBADEFFXXX"
        nxt = payouts.build_batch(s, T + dt.timedelta(days=1), "EUR", now=NEXT_MORNING + dt.timedelta(days=1))
        assert {pid: po.amount_minor for pid, po in by_party(nxt).items()} == {p["op"].id: 8460, p["host"].id: 940}
        assert by_party(nxt)[p["op"].id].iban == "DE89370400440532013000"
        assert owed(s, p["op"]) == 0


def test_a_batch_is_settled_when_every_payout_is_paid(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 10_000, NOON)
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        payouts.mark_sent(batch)
        for po in batch.payouts:
            payouts.mark_paid(po)
            payouts.mark_paid(po)  # idempotent
        assert batch.state == BatchState.SETTLED and batch.settled_at is not None
        assert raw(s, AccountKind.PAYOUTS_IN_TRANSIT) == 0
        assert raw(s, AccountKind.PROVIDER_CLEARING, "") == -500 and raw(s, AccountKind.PROVIDER_CLEARING, payouts.BANK_OWNER) == -8560  # op and owner (the host is below its minimum)


def test_a_party_without_bank_details_is_not_paid_until_it_has_some(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        p["owner"].iban = None
        pay(s, p, "session:1", 10_000, NOON)
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        assert p["owner"].id not in by_party(batch) and owed(s, p["owner"]) == 100


# --------------------------------------------------------------------------- files


@pytest.fixture
def sepa_batch(Session):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 12_345, NOON)
        pay(s, p, "session:2", 10_000, NOON)
        return payouts.build_batch(s, T, "EUR", now=NEXT_MORNING).id


def test_the_pain001_file_validates_against_its_schema_and_lists_the_sepa_payouts(Session, sepa_batch):
    with Session() as s:
        batch = s.get(PayoutBatch, sepa_batch)
        xml = payouts.pain001(batch, DEBTOR)
        payouts.validate_pain001(xml)
        assert payouts.pain001(batch, DEBTOR) == xml  # the same file every time: a bank spots a duplicate upload
        root = ET.fromstring(xml)
        sepa = [po for po in batch.payouts if po.rail == Rail.SEPA]
        assert root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:MsgId", namespaces=NS) == batch.reference
        assert root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs", namespaces=NS) == str(len(sepa)) == "2"
        assert D(root.findtext("p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum", namespaces=NS)) == D(sum(po.amount_minor for po in sepa)) / 100
        txs = root.findall(".//p:CdtTrfTxInf", NS)
        assert sorted((t.findtext("p:PmtId/p:EndToEndId", namespaces=NS), t.findtext("p:CdtrAcct/p:Id/p:IBAN", namespaces=NS),
                       D(t.findtext("p:Amt/p:InstdAmt", namespaces=NS))) for t in txs) == \
            sorted((po.end_to_end_id, po.iban, D(po.amount_minor) / 100) for po in sepa)
        assert root.findtext(".//p:DbtrAcct/p:Id/p:IBAN", namespaces=NS) == "ES9121000418450200051332"
        assert "<Nm>Hotel Elysee &amp; Fils</Nm>" in xml.decode()  # transliterated to the SEPA character set


@pytest.mark.parametrize("corrupt", [
    lambda x: x.replace(b"<IBAN>FR14", b"<IBAN>fr14"),  # an IBAN that breaks the pattern
    lambda x: x.replace(b"<NbOfTxs>2</NbOfTxs>", b"<NbOfTxs>two</NbOfTxs>", 1),
    lambda x: x.replace(b"<ChrgBr>SLEV</ChrgBr>", b"<ChrgBr>WHOEVER</ChrgBr>", 1),
    lambda x: x[: len(x) // 2],  # truncated
])
def test_a_corrupted_pain001_file_does_not_validate(Session, sepa_batch, corrupt):
    with Session() as s:
        xml = payouts.pain001(s.get(PayoutBatch, sepa_batch), DEBTOR)
    bad = corrupt(xml)
    assert bad != xml
    with pytest.raises(PayoutFileError):
        payouts.validate_pain001(bad)


def test_the_csv_has_one_row_per_bank_payout(Session, sepa_batch):
    with Session() as s:
        batch = s.get(PayoutBatch, sepa_batch)
        rows = list(csv.DictReader(io.StringIO(payouts.payouts_csv(batch).decode())))
        bank = [po for po in batch.payouts if po.rail in (Rail.SEPA, Rail.CSV)]
        assert len(rows) == len(bank) == 3  # the Connect payout is not in it
        assert sorted((int(r["party_id"]), r["iban"], D(r["amount"]), r["currency"], r["reference"]) for r in rows) == \
            sorted((po.party_id, po.iban, D(po.amount_minor) / 100, "EUR", po.end_to_end_id) for po in bank)
        owner = next(r for r in rows if r["iban"].startswith("TR"))
        assert owner["beneficiary"] == "'=Anadolu Şarj" and owner["amount"] == "2.00"  # no formula in a spreadsheet
        assert set(payouts.batch_files(batch, DEBTOR)) == {"pain.001.xml", "payouts.csv"}
        assert set(payouts.batch_files(batch, None)) == {"payouts.csv"}


# --------------------------------------------------------------------------- Stripe Connect


def test_a_connect_payout_is_a_transfer_through_the_stripe_sdk(Session, stripe_provider, stripe_config):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 10_000, NOON)
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        po = by_party(batch)[p["platform"].id]
        assert payouts.send_transfer(po, stripe_provider, NEXT_MORNING) == "paid"
        assert payouts.send_transfer(po, stripe_provider, NEXT_MORNING) == "paid"  # not sent twice
        tr_id = po.provider_transfer_id
        assert tr_id.startswith("tr_")
        assert raw(s, AccountKind.PROVIDER_CLEARING, "") == -500  # left our Stripe balance
    client = stripe.StripeClient(stripe_config["STRIPE_SECRET_KEY"], base_addresses={"api": stripe_config["STRIPE_API_BASE"]},
                                 max_network_retries=0)
    tr = client.v1.transfers.retrieve(tr_id)
    assert (tr.amount, tr.currency, tr.destination) == (500, "eur", "acct_1VoltpayPlatform")


def test_a_refused_transfer_fails_the_payout_and_the_money_is_owed_again(Session, stripe_provider):
    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        p["platform"].stripe_account_id = "acct_invalid42"  # localstripe answers 400 No such destination
        pay(s, p, "session:1", 10_000, NOON)
        batch = payouts.build_batch(s, T, "EUR", now=NEXT_MORNING)
        po = by_party(batch)[p["platform"].id]
        assert payouts.send_transfer(po, stripe_provider, NEXT_MORNING) == "failed"
        assert "No such destination" in po.reason and owed(s, p["platform"]) == 500 and batch.state == BatchState.PARTLY_RETURNED
        p["platform"].stripe_account_id = "acct_1Fixed"
        nxt = payouts.build_batch(s, T + dt.timedelta(days=1), "EUR", now=NEXT_MORNING + dt.timedelta(days=1))
        assert payouts.send_transfer(by_party(nxt)[p["platform"].id], stripe_provider) == "paid"
        assert owed(s, p["platform"]) == 0


def test_the_provider_refuses_a_transfer_it_cannot_make(stripe_provider):
    from payments.providers.base import InvalidRequest

    with pytest.raises(InvalidRequest):
        stripe_provider.transfer(destination="cus_123", amount=Money(100, "EUR"), idempotency_key="x")
    with pytest.raises(InvalidRequest):
        stripe_provider.transfer(destination="acct_1", amount=Money(0, "EUR"), idempotency_key="y")


# --------------------------------------------------------------------------- the daily job


def test_the_daily_job_builds_sends_and_writes_the_files_once(app, Session, tmp_path):
    from webapp.settlement import jobs

    with Session.begin() as s:
        p = make_parties(s)
        add_rule(s, p)
        pay(s, p, "session:1", 10_000, NOON)
    with app.app_context():
        first = jobs.run_payouts(now=NEXT_MORNING)
        again = jobs.run_payouts(now=NEXT_MORNING + dt.timedelta(minutes=5))
    assert first["day"] == "2026-11-02" and first["transfers"] == {"paid": 1} and len(first["written"]) == 1
    assert again["batches"] == first["batches"] and again["transfers"] == {} and again["written"] == []
    folder = tmp_path / "payouts" / f"2026-11-02-EUR-{first['batches'][0]}"
    payouts.validate_pain001((folder / "pain.001.xml").read_bytes())
    with Session() as s:
        batch = s.get(PayoutBatch, first["batches"][0])
        assert batch.state == BatchState.SENT and s.scalar(select(func.count(Payout.id))) == 3  # the host is below its minimum
        assert {po.state for po in batch.payouts} == {PayoutState.SENT, PayoutState.PAID}
        with app.app_context():
            assert jobs.batch_files(batch) == {"pain.001.xml": (folder / "pain.001.xml").read_bytes(),
                                               "payouts.csv": (folder / "payouts.csv").read_bytes()}


def test_the_job_is_scheduled_at_the_configured_hour(app):
    from webapp.settlement import jobs

    app.config["PAYOUT_HOUR"] = 7
    assert jobs._payout_time(dt.datetime(2026, 11, 3, 7, 0, tzinfo=dt.UTC))
    assert not jobs._payout_time(dt.datetime(2026, 11, 3, 6, 0, tzinfo=dt.UTC))
    assert not jobs._payout_time(dt.datetime(2026, 11, 3, 7, 1, tzinfo=dt.UTC))


# --------------------------------------------------------------------------- bank details


@pytest.mark.parametrize("iban, bic, field", [
    ("DE89 3704 0044 0532 0130 01", None, "iban"),  # wrong check digits
    ("DE89", None, "iban"),
    ("", None, "iban"),
    ("XX89370400440532013000", None, "iban"),
    ("DE89370400440532013000", "COBADEF", "bic"),  # too short
    ("DE89370400440532013000", "CAIXESBBXXX", "bic"),  # a Spanish bank for a German account
])
def test_bad_bank_details_are_refused_with_the_field(iban, bic, field):
    with pytest.raises(BankDetailsError) as e:
        payouts.validate_bank(iban, bic)
    assert e.value.field == field and e.value.reason


def test_good_bank_details_come_back_compact():
    assert payouts.validate_bank("de89 3704 0044 0532 0130 00", "cobadeffxxx") == ("DE89370400440532013000", "COBADEFFXXX")
    assert payouts.validate_bank("MC5811222000010123456789030", "BNPAFRPP") == ("MC5811222000010123456789030", "BNPAFRPP")  # Monaco, French bank
    assert payouts.validate_bank("FR1420041010050500013M02606") == ("FR1420041010050500013M02606", None)


# --------------------------------------------------------------------------- bulk allocation


def random_rules(rng, parties):
    rules = [{"shares": [], "merchant_of_record": parties[0]}]
    for _ in range(6):
        shares = []
        for pid in rng.sample(parties[1:], rng.randint(0, 3)):
            kind = rng.choice(["bps", "fixed_per_session", "per_kwh"])
            shares.append({"party_id": pid, kind: rng.randint(0, 4000) if kind == "bps" else rng.randint(0, 400) if kind == "fixed_per_session"
                           else str(D(rng.randint(0, 999)) / 1000)})
        rule = {"shares": shares, "merchant_of_record": parties[0]}
        if rng.random() < 0.7:
            rule["platform_fee"] = {"party_id": parties[-1], "bps": rng.randint(0, 1000), "fixed": rng.randint(0, 50)}
        rules.append(rule)
    return rules


def entries(s, prefix: str) -> list[tuple]:
    """Each allocation and its lines, in booking order, without ids or keys."""
    out = []
    allocs = s.scalars(select(settlement.Allocation).where(settlement.Allocation.idempotency_key.like(prefix + "%"))
                       .order_by(settlement.Allocation.id)).all()
    for a in allocs:
        lines = [(ln.party_id, ln.role, ln.amount_minor) for ln in s.scalars(select(AllocationLine).where(AllocationLine.allocation_id == a.id)
                                                                                .order_by(AllocationLine.id))]
        out.append((a.source, a.site_id, a.rule_id, a.currency, a.gross_minor, a.vat_minor, a.fee_minor, a.net_minor, a.kwh, a.booked_at, lines))
    return out


def booked(s, key_like: str) -> dict[tuple[int, str], int]:
    """(account id, currency) → the sum of the postings of the entries whose key is like ``key_like``."""
    return {(a, c): int(t) for a, c, t in s.execute(
        select(Posting.account_id, Posting.currency, func.sum(Posting.amount_minor)).join(JournalEntry, JournalEntry.id == Posting.entry_id)
        .where(JournalEntry.idempotency_key.like(key_like)).group_by(Posting.account_id, Posting.currency)) if t}


def new_parties(s, kind: PartyKind, n: int) -> list[int]:
    """``n`` new parties of ``kind`` paid in EUR; their ids."""
    ps = [Party(kind=kind, legal_name=f"{kind.value} {i}", payout_currency="EUR") for i in range(n)]
    s.add_all(ps)
    s.flush()
    return [x.id for x in ps]


def test_allocate_many_books_exactly_what_allocate_books(Session):
    from payments.tariff_store import dumps

    rng = random.Random(8)
    with Session.begin() as s:
        pids = new_parties(s, PartyKind.OPERATOR, 6)
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for site in (1, 2, 3):  # site 4 has no rule: all to the merchant of record
            for n, rule in enumerate(rng.sample(random_rules(rng, pids), 3), 1):
                s.add(settlement.SplitRule(site_id=site, number=n, effective_from=start + dt.timedelta(days=10 * (n - 1)),
                                           created_by="test", rule_json=dumps(rule)))
        s.flush()
        payments = []
        for i in range(300):
            gross = rng.choice([0, 1, 7, 99, 100, 1210, rng.randint(0, 50_000)])
            vat = rng.choice([0, gross * 21 // 121, gross])
            fee = min(rng.choice([0, 0, 29, 250]), gross - vat)
            payments.append(dict(source=f"session:{i}", site_id=rng.randint(1, 4), currency=rng.choice(["EUR", "EUR", "JPY"]), gross=gross,
                                 vat=vat, fee=fee, kwh=D(rng.randint(0, 80_000)) / 1000, merchant_of_record=pids[0],
                                 at=start + dt.timedelta(days=rng.randint(0, 30), seconds=rng.randint(0, 86_399))))
        for i, pm in enumerate(payments):
            settlement.allocate(s, key=f"one:{i}", **pm)
        ids = settlement.allocate_many(s, [dict(pm, key=f"many:{i}") for i, pm in enumerate(payments)])
        assert len(set(ids)) == 300
        assert entries(s, "many:") == entries(s, "one:")
        # The ledger: one balanced entry per currency for the whole call, each account moved by exactly what the
        # 300 entries of allocate moved it.
        bulk = s.scalars(select(JournalEntry).where(JournalEntry.idempotency_key.like("allocations:%")).order_by(JournalEntry.id)).all()
        assert [(e.idempotency_key, e.reference) for e in bulk] == [(f"allocations:{min(ids)}:EUR", f"allocations:{min(ids)}-{max(ids)}"),
                                                                    (f"allocations:{min(ids)}:JPY", f"allocations:{min(ids)}-{max(ids)}")]
        assert all(sum(p.amount_minor for p in e.postings) == 0 and {p.currency for p in e.postings} == {e.idempotency_key[-3:]} for e in bulk)
        assert booked(s, "allocations:%") == booked(s, "allocation:one:%") != {}
        # Once per key: again, or mixed with keys allocate booked, nothing new.
        count = s.scalar(select(func.count(JournalEntry.id)))
        assert settlement.allocate_many(s, [dict(pm, key=f"many:{i}") for i, pm in enumerate(payments)]) == ids
        assert settlement.allocate_many(s, [dict(payments[0], key="one:0")] * 2) == [s.scalar(
            select(settlement.Allocation.id).where(settlement.Allocation.idempotency_key == "one:0"))] * 2
        assert s.scalar(select(func.count(JournalEntry.id))) == count
        # And allocate sees them as booked.
        assert settlement.allocate(s, key="many:5", **payments[5]).id == ids[5]


def test_allocate_many_stores_keys_and_sources_with_tabs_backslashes_and_line_breaks_as_given(Session):
    """Keys come from importers: what COPY's text format treats specially is written as it was given."""
    with Session.begin() as s:
        p = Party(kind=PartyKind.OPERATOR, legal_name="op", payout_currency="EUR")
        s.add(p)
        s.flush()
        odd = ["import:a\tb", "import:back\\slash\\N", "import:line\nbreak\r", "import:plain"]
        ids = settlement.allocate_many(s, [dict(key=k, source=k[:64], site_id=9, currency="EUR", gross=100, vat=0, merchant_of_record=p.id,
                                                at=dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) for k in odd])
    with Session() as s:
        rows = s.execute(select(settlement.Allocation.id, settlement.Allocation.idempotency_key, settlement.Allocation.source)
                         .order_by(settlement.Allocation.id)).all()
        assert [tuple(r) for r in rows] == [(i, k, k) for i, k in zip(ids, odd, strict=True)]
        assert settlement.allocate_many(s, [dict(key=k, source=k, site_id=9, currency="EUR", gross=100, vat=0, merchant_of_record=p.id,
                                                 at=dt.datetime(2026, 1, 5, tzinfo=dt.UTC)) for k in odd]) == ids  # found again by key


def test_two_workers_allocating_at_once_book_every_payment_and_create_each_payable_once(Session):
    """Settlement workers allocate side by side: their first payments for the same new parties create each payable once,
    nobody deadlocks or waits for ever, and every line reaches its party's payable."""
    import threading

    from payments.tariff_store import dumps

    with Session.begin() as s:
        pids = new_parties(s, PartyKind.SITE_HOST, 6)
        at = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
        # Overlapping parties, listed in opposite orders on the two sites.
        for site, order in ((1, pids[1:5]), (2, pids[5:1:-1])):
            s.add(settlement.SplitRule(site_id=site, number=1, effective_from=at - dt.timedelta(days=1), created_by="test", rule_json=dumps(
                {"shares": [{"party_id": p, "bps": 1000} for p in order], "merchant_of_record": pids[0]})))
    work = {site: [dict(key=f"site{site}:{i}", source=f"session:{site}{i}", site_id=site, currency="EUR", gross=1210 + i, vat=210, fee=25,
                        merchant_of_record=pids[0], at=at) for i in range(300)] for site in (1, 2)}
    barrier = threading.Barrier(2)
    failed: list[BaseException] = []

    def worker(rows):
        try:
            barrier.wait(timeout=30)
            with Session.begin() as s:
                settlement.allocate_many(s, rows)
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    threads = [threading.Thread(target=worker, args=(rows,)) for rows in work.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failed and not any(t.is_alive() for t in threads)
    with Session() as s:
        payables = dict(s.execute(select(LedgerAccount.owner, LedgerAccount.id).where(LedgerAccount.kind == AccountKind.PARTY_PAYABLE)).all())
        assert sorted(payables) == sorted(f"party:{p}" for p in pids)  # one each (the owner is unique per kind and currency)
        lines = dict(s.execute(select(AllocationLine.party_id, func.sum(AllocationLine.amount_minor)).group_by(AllocationLine.party_id)).all())
        assert sum(lines.values()) == sum(p["gross"] - p["vat"] - p["fee"] for rows in work.values() for p in rows)
        for pid in pids:
            assert balance(s, s.get(LedgerAccount, payables[f"party:{pid}"])) == Money(int(lines[pid]), "EUR")
        assert s.scalar(select(func.count(settlement.Allocation.id))) == 600


rules = st.builds(
    lambda a, b, fixed, per_kwh, fee_bps, fee_fixed, order: {
        "shares": [[{"party_id": 2, "bps": a}, {"party_id": 3, "bps": b}, {"party_id": 4, "fixed_per_session": fixed},
                    {"party_id": 5, "per_kwh": str(per_kwh)}][i] for i in order],
        "platform_fee": {"party_id": 9, "bps": fee_bps, "fixed": fee_fixed}, "merchant_of_record": 1},
    st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 10_000), st.decimals(min_value=0, max_value=2, places=4),
    st.integers(0, 2000), st.integers(0, 500), st.permutations(range(4)))


@settings(max_examples=500, deadline=None)
@given(rule=rules, gross=st.integers(0, 10**9), vat_pct=st.integers(0, 27), fee=st.integers(0, 500),
       kwh=st.decimals(min_value=0, max_value=1000, places=3), currency=st.sampled_from(["EUR", "JPY", "KWD"]))
def test_the_fast_split_of_allocate_many_equals_split(rule, gross, vat_pct, fee, kwh, currency):
    from payments.money import exponent

    vat = gross * vat_pct // (100 + vat_pct)
    fee = min(fee, gross - vat)
    sp = settlement.split(rule, gross=gross, vat=vat, fee=fee, kwh=kwh, currency=currency)
    assert settlement._split_fast(settlement._compile_rule(rule), gross, vat, fee, kwh, exponent(currency)) == (sp.net, list(sp.parts))
