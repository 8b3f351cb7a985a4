"""Reconciliation of a day: real captures and refunds through the Stripe SDK (localstripe), our ledger, and the differences.

Differences are injected the way they happen: a payment captured at the
provider that never reached our books, a refund made in the provider's
dashboard, a fee that is not the one we booked, a booking the provider does
not know.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
import urllib.request

import pytest
from sqlalchemy import func, select

from payments import cards
from payments import reconcile as rec
from payments.base import utcnow
from payments.cards import CardPayment, Purpose, State
from payments.ledger import AccountKind, balance, get_account, post
from payments.money import Money
from payments.reconcile import ItemKind, ReconciliationItem, ReconciliationRun, RunState
from tests.payments.test_card_payments import db, eur, hold_payment, refund, save_card, top_up  # noqa: F401  (fixtures)
from tests.stripe_browser import VISA


def provider_txns(provider, day):
    lo, hi = rec.fetch_window(day)
    return provider.balance_transactions(created_from=lo, created_to=hi)


def set_fee(stripe_config, source: str, fee: int) -> None:
    """Make localstripe report ``fee`` on the balance transaction of ``source`` (pi_ or re_)."""
    data = urllib.parse.urlencode({"source": source, "fee": fee}).encode()
    urllib.request.urlopen(urllib.request.Request(stripe_config["STRIPE_API_BASE"] + "/_config/fees", data=data), timeout=10).close()


def open_items(db, run) -> list[ReconciliationItem]:
    return [i for i in db.scalars(select(ReconciliationItem).where(ReconciliationItem.run_id == run.id).order_by(ReconciliationItem.id)) if i.is_open]


def fees(db) -> Money:
    return balance(db, get_account(db, AccountKind.PROVIDER_FEES, "EUR"))


@pytest.fixture
def day():
    return utcnow().date()


@pytest.fixture
def paid_day(db, stripe_provider, save_card):
    """A day of real card money: a wallet top-up partly refunded, and a charging hold captured in part."""
    card = save_card(VISA)
    topped = top_up(db, stripe_provider, card, 2000)
    refund(db, stripe_provider, topped, 500, "refund:1", top_up=True)
    held = hold_payment(db, stripe_provider, card, 3000)
    cards.capture(db, stripe_provider, cards.lock(db, held.id), eur(1200))
    db.commit()
    return card, topped, held


def test_a_clean_day_is_reconciled_and_a_rerun_changes_nothing(db, stripe_provider, paid_day, day):
    txns = provider_txns(stripe_provider, day)
    assert sorted((t.type, t.amount) for t in txns) == [("charge", 1200), ("charge", 2000), ("refund", -500)]

    run = rec.reconcile_day(db, day, "EUR", txns, utcnow())
    db.commit()
    assert (run.state, run.matched_count, run.ledger_count, run.provider_count, run.item_count) == (RunState.RECONCILED, 3, 3, 3, 0)
    assert run.reconciled_at is not None

    again = rec.reconcile_day(db, day, "EUR", provider_txns(stripe_provider, day), utcnow())
    db.commit()
    assert again.id == run.id and again.state == RunState.RECONCILED and again.item_count == 0
    assert db.scalar(select(func.count()).select_from(ReconciliationRun)) == 1


def test_missing_capture_wrong_fee_and_extra_refund_are_listed_with_their_cause(db, stripe_provider, stripe_config, paid_day, save_card, day):
    card, topped, held = paid_day
    # A capture at the provider that never reached our books (a payment made around Voltpay).
    outside = stripe_provider.charge(amount=eur(999), payment_method_id=card.id, customer_id=None, idempotency_key="outside:1")
    # A refund made in the provider's dashboard, not through Voltpay.
    extra = stripe_provider.refund(payment_id=topped.provider_payment_id, amount=eur(300), idempotency_key="dashboard:1")
    # The provider's fee on the hold is 25; we booked 30 for it (a wrong fee). On the top-up it is 40 and we booked none.
    post(db, idempotency_key="provider_fee:manual:1", description="fee", reference=f"card_payment:{held.id}",
         postings=[(get_account(db, AccountKind.PROVIDER_FEES, "EUR"), eur(30)), (get_account(db, AccountKind.PROVIDER_CLEARING, "EUR"), eur(-30))])
    # A capture we booked that the provider does not know.
    ghost = CardPayment(purpose=Purpose.WALLET_TOP_UP, reference="user:1", owner="user:1", currency="EUR", amount_minor=700,
                        captured_minor=700, state=State.SUCCEEDED, provider_payment_id="pi_ghost")
    db.add(ghost)
    db.flush()
    post(db, idempotency_key=ghost.key("credit"), description="Wallet top-up", reference=f"card_payment:{ghost.id}",
         postings=[(get_account(db, AccountKind.PROVIDER_CLEARING, "EUR"), eur(700)), (get_account(db, AccountKind.REVENUE, "EUR"), eur(-700))])
    db.commit()
    set_fee(stripe_config, held.provider_payment_id, 25)
    set_fee(stripe_config, topped.provider_payment_id, 40)

    run = rec.reconcile_day(db, day, "EUR", provider_txns(stripe_provider, day), utcnow())
    db.commit()

    assert run.state == RunState.OPEN
    found = {(i.kind, i.provider_ref): i for i in open_items(db, run)}
    assert set(found) == {
        (ItemKind.MISSING_IN_LEDGER, outside.id),
        (ItemKind.MISSING_IN_LEDGER, extra.id),
        (ItemKind.FEE_DIFFERS, held.provider_payment_id),
        (ItemKind.MISSING_IN_PROVIDER, "pi_ghost"),
    }
    assert "no payment of ours" in found[(ItemKind.MISSING_IN_LEDGER, outside.id)].cause
    assert found[(ItemKind.MISSING_IN_LEDGER, outside.id)].provider_amount_minor == 999
    assert f"card payment #{topped.id}" in found[(ItemKind.MISSING_IN_LEDGER, extra.id)].cause
    assert "made at the provider" in found[(ItemKind.MISSING_IN_LEDGER, extra.id)].cause
    wrong_fee = found[(ItemKind.FEE_DIFFERS, held.provider_payment_id)]
    assert (wrong_fee.our_amount_minor, wrong_fee.provider_amount_minor) == (30, 25)
    # The fee we had not booked was booked by the run, and its item is resolved by the system.
    auto = db.scalar(select(ReconciliationItem).where(ReconciliationItem.key == f"fee_differs:card_payment:{topped.id}"))
    assert auto.resolved_by == rec.SYSTEM and auto.fee_entry_id is not None and not auto.is_open
    assert fees(db) == eur(30 + 40)
    assert run.item_count == 5 and run.open_count == 4

    # Re-run: the same items, nothing booked twice.
    ids = sorted(i.id for i in db.scalars(select(ReconciliationItem)))
    run = rec.reconcile_day(db, day, "EUR", provider_txns(stripe_provider, day), utcnow())
    db.commit()
    assert sorted(i.id for i in db.scalars(select(ReconciliationItem))) == ids
    assert fees(db) == eur(70) and run.open_count == 4

    # The operator accepts the provider's fee and explains the rest: then the day is reconciled.
    rec.book_provider_fee(db, wrong_fee, by="user:9", now=utcnow())
    assert fees(db) == eur(65)
    with pytest.raises(rec.ReconcileError) as no_note:
        rec.resolve_item(db, found[(ItemKind.MISSING_IN_PROVIDER, "pi_ghost")], by="user:9", note="  ", now=utcnow())
    assert no_note.value.field == "note"
    for kind_ref in [(ItemKind.MISSING_IN_PROVIDER, "pi_ghost"), (ItemKind.MISSING_IN_LEDGER, outside.id)]:
        rec.resolve_item(db, found[kind_ref], by="user:9", note="test data", now=utcnow())
    assert run.state == RunState.OPEN and run.open_count == 1
    rec.resolve_item(db, found[(ItemKind.MISSING_IN_LEDGER, extra.id)], by="user:9", note="refunded by phone, booked by hand", now=utcnow())
    db.commit()
    assert run.state == RunState.RECONCILED and run.open_count == 0
    item = found[(ItemKind.MISSING_IN_LEDGER, extra.id)]
    assert (item.resolved_by, item.note) == ("user:9", "refunded by phone, booked by hand") and item.resolved_at is not None
    with pytest.raises(rec.ReconcileError):
        rec.resolve_item(db, item, by="user:9", note="again", now=utcnow())

    # A re-run keeps the operator's decisions: still reconciled, still the same items.
    run = rec.reconcile_day(db, day, "EUR", provider_txns(stripe_provider, day), utcnow())
    db.commit()
    assert run.state == RunState.RECONCILED and sorted(i.id for i in db.scalars(select(ReconciliationItem))) == ids


def test_a_difference_that_goes_away_is_resolved_on_the_next_run(db, stripe_provider, paid_day, day):
    card, topped, held = paid_day
    txns = provider_txns(stripe_provider, day)
    run = rec.reconcile_day(db, day, "EUR", [t for t in txns if t.type != "refund"], utcnow())  # the refund not yet listed
    db.commit()
    assert [i.kind for i in open_items(db, run)] == [ItemKind.MISSING_IN_PROVIDER]

    run = rec.reconcile_day(db, day, "EUR", txns, utcnow())
    db.commit()
    assert run.state == RunState.RECONCILED and run.item_count == 1
    assert db.scalar(select(ReconciliationItem)).resolved_by == rec.SYSTEM


def stripe_export(provider, txns) -> str:
    """The balance transactions as Stripe's Dashboard exports them: charges named by their charge, amounts in euros."""
    lines = ["id,Type,Source,Amount,Fee,Net,Currency,Created (UTC),Available On (UTC),Description"]
    for t in txns:
        source = provider.retrieve(payment_id=t.source).charge_id if t.type == "charge" else t.source
        when = dt.datetime.fromtimestamp(t.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{t.id},{t.type},{source},{t.amount / 100:.2f},{t.fee / 100:.2f},{t.net / 100:.2f},eur,{when},{when},")
    return "\n".join(lines) + "\n"


def test_the_providers_csv_export_reconciles_the_same_way(db, stripe_provider, stripe_config, paid_day, day):
    card, topped, held = paid_day
    set_fee(stripe_config, held.provider_payment_id, 31)
    text = stripe_export(stripe_provider, provider_txns(stripe_provider, day))
    assert ",ch_" in text

    parsed = rec.parse_balance_csv(text)
    assert sorted((t.type, t.amount, t.fee) for t in parsed) == [("charge", 1200, 31), ("charge", 2000, 0), ("refund", -500, 0)]
    txns = rec.resolve_charge_sources(parsed, lambda ch: stripe_provider.charge_payment_id(charge_id=ch))
    run = rec.reconcile_day(db, day, "EUR", txns, utcnow(), source="csv")
    db.commit()
    assert (run.state, run.source, run.matched_count) == (RunState.RECONCILED, "csv", 3)
    assert fees(db) == eur(31)  # the export's fee was booked


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("id,Type,Source,Amount\n", "missing columns"),
    ("id,Type,Source,Amount,Fee,Net,Currency,Created (UTC)\ntxn_1,charge,ch_1,12.345,0,12.345,eur,2026-12-05 10:00\n", "more decimals"),
    ("id,Type,Source,Amount,Fee,Net,Currency,Created (UTC)\ntxn_1,charge,ch_1,12.00,0.30,12.00,eur,2026-12-05 10:00\n", "Net"),
    ("id,Type,Source,Amount,Fee,Net,Currency,Created (UTC)\ntxn_1,charge,ch_1,12.00,0,12.00,eur,yesterday\n", "Created"),
])
def test_a_bad_export_is_refused_with_its_line(text, message):
    with pytest.raises(rec.CsvError) as err:
        rec.parse_balance_csv(text)
    assert message in str(err.value)


def test_the_job_reconciles_a_day_with_the_provider_twice_the_same_way(app, db, stripe_provider, paid_day, day):
    from webapp.settlement import reconcile_jobs

    with app.app_context():
        assert reconcile_jobs.reconcile(day, stripe_provider) == {"EUR": "reconciled"}
        assert reconcile_jobs.reconcile(day, stripe_provider) == {"EUR": "reconciled"}
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(ReconciliationRun)) == 1
