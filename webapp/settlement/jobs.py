"""The daily T+1 payout job (Huey): build yesterday's batches, make the Connect transfers, hand the bank files over.

``daily_payouts`` runs once a day at ``VOLTPAY_PAYOUT_HOUR`` (UTC, default 6)
and calls ``run_payouts``, which is idempotent and safe to run by hand or
twice (``build_batch`` is unique per day and currency; a transfer is made
only for a payout still ``pending``, under its row lock, with the payout's
idempotency key):

1. for every currency in which parties have payables, build the batch of
   yesterday (UTC) — a day missed while the worker was down is not lost:
   the next batch pays everything owed up to its cut-off;
2. make the Connect transfers still pending in any batch (one transaction
   per payout: a provider outage defers only that payout to the next run);
3. with ``VOLTPAY_PAYOUT_DIR`` set, write each new batch's ``pain.001.xml``
   and ``payouts.csv`` into ``<dir>/<day>-<currency>-<batch id>/`` and mark
   the batch sent (the folder is the hand-over to the bank, e.g. a synced
   upload folder). Without it the files stay downloadable (``batch_files``,
   made from the database, byte for byte the same each time) and an
   operator marks the batch sent after uploading them. A batch without bank
   payouts (only Connect, or empty) is marked sent at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from flask import current_app
from sqlalchemy import select

from payments import payouts
from payments.base import utcnow
from payments.ledger import AccountKind, LedgerAccount
from payments.payouts import Payout, PayoutBatch, PayoutState, Rail
from webapp.db import session_factory
from webapp.tasks import periodic_task

log = logging.getLogger("voltpay.payouts")


def debtor(config=None) -> payouts.Debtor | None:
    """Our paying bank account from the settings (None: no IBAN configured, so no pain.001)."""
    config = config if config is not None else current_app.config
    if not config.get("PAYOUT_DEBTOR_IBAN"):
        return None
    return payouts.Debtor(name=config.get("PAYOUT_DEBTOR_NAME") or "Voltpay", iban=config["PAYOUT_DEBTOR_IBAN"],
                          bic=config.get("PAYOUT_DEBTOR_BIC") or None)


def batch_files(batch: PayoutBatch) -> dict[str, bytes]:
    """``{"pain.001.xml": bytes, "payouts.csv": bytes}`` of a batch, for download (no pain.001 without SEPA payouts or a debtor IBAN)."""
    return payouts.batch_files(batch, debtor())


def send_transfer(payout_id: int, provider, now: dt.datetime | None = None) -> str:
    """Make one pending Connect transfer under the payout's row lock, in its own transaction; its state afterwards."""
    with session_factory().begin() as s:
        p = s.get(Payout, payout_id, with_for_update=True)
        return payouts.send_transfer(p, provider, now) if p is not None else "missing"


def write_files(batch: PayoutBatch, folder: Path, files: dict[str, bytes]) -> Path:
    """Write a batch's files into ``folder/<day>-<currency>-<id>/`` (each written to a temporary name, then renamed)."""
    target = folder / f"{batch.day.isoformat()}-{batch.currency}-{batch.id}"
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = target / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target / name)
    return target


def run_payouts(now: dt.datetime | None = None, provider=None) -> dict[str, object]:
    """Build yesterday's batches, send pending Connect transfers, hand over the files; returns what it did."""
    now = now or utcnow()
    provider = provider or current_app.extensions.get("payment_provider")
    day = (now.astimezone(dt.UTC) - dt.timedelta(days=1)).date()
    factory = session_factory()
    with factory() as s:
        currencies = sorted(set(s.scalars(select(LedgerAccount.currency).where(LedgerAccount.kind == AccountKind.PARTY_PAYABLE))))
    batch_ids = []
    for currency in currencies:
        with factory.begin() as s:
            batch_ids.append(payouts.build_batch(s, day, currency, now).id)
    with factory() as s:
        pending = list(s.scalars(select(Payout.id).where(Payout.rail == Rail.STRIPE_CONNECT, Payout.state == PayoutState.PENDING)
                                 .order_by(Payout.id)))
    transfers: dict[str, int] = {}
    if pending and provider is None:
        log.warning("no payment provider configured: Connect transfers wait", extra={"payouts": len(pending)})
    elif pending:
        for pid in pending:
            state = str(send_transfer(pid, provider, now))
            transfers[state] = transfers.get(state, 0) + 1
    folder = current_app.config.get("PAYOUT_DIR")
    written = []
    for bid in batch_ids:
        with factory.begin() as s:
            batch = s.get(PayoutBatch, bid)
            if batch.state != payouts.BatchState.DRAFT:
                continue
            has_bank = any(p.rail in payouts.BANK_RAILS for p in batch.payouts)
            if has_bank and folder:
                written.append(str(write_files(batch, Path(folder), payouts.batch_files(batch, debtor()))))
            if not has_bank or folder:
                payouts.mark_sent(batch, now)
    result = {"day": day.isoformat(), "batches": batch_ids, "transfers": transfers, "written": written}
    log.info("payouts run", extra=result)
    return result


def _payout_time(now: dt.datetime) -> bool:
    """The scheduler's test: the first minute of the configured hour (UTC)."""
    from webapp import tasks

    hour = int((tasks._app.config if tasks._app is not None else {}).get("PAYOUT_HOUR", 6))
    return now.hour == hour and now.minute == 0


@periodic_task(_payout_time)
def daily_payouts() -> None:
    """Every day at VOLTPAY_PAYOUT_HOUR: yesterday's T+1 payout batches (see ``run_payouts``)."""
    run_payouts()
