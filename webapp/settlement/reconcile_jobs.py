"""The daily reconciliation job (Huey): yesterday's ledger against the provider's balance transactions.

``daily_reconciliation`` runs every day at 04:40 UTC (after the provider's
day has closed and after the T+1 payouts) and calls ``reconcile``, which
may also be run by hand or twice: ``payments.reconcile.reconcile_day`` is
idempotent (same run, same items). The provider is asked once per day, for
the day and its margins, outside any database transaction; each currency is
then reconciled in its own transaction.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import current_app
from huey import crontab
from sqlalchemy import select

from payments import reconcile as rec
from payments.base import utcnow
from payments.ledger import AccountKind, LedgerAccount
from payments.providers.base import BalanceTxn
from webapp.db import session_factory
from webapp.tasks import periodic_task

log = logging.getLogger("voltpay.reconciliation")


def _currencies(s, txns: list[BalanceTxn]) -> list[str]:
    """Currencies worth a run: those of our provider clearing accounts and those the provider moved."""
    ours = set(s.scalars(select(LedgerAccount.currency).where(LedgerAccount.kind == AccountKind.PROVIDER_CLEARING, LedgerAccount.owner == "")))
    return sorted(ours | {t.currency.upper() for t in txns})


def reconcile(day: dt.date, provider=None, now: dt.datetime | None = None, txns: list[BalanceTxn] | None = None,
              source: str = "api") -> dict[str, str]:
    """Reconcile ``day`` in every currency; ``{currency: state}``. Fetches from ``provider`` unless ``txns`` are given."""
    now = now or utcnow()
    if txns is None:
        provider = provider if provider is not None else current_app.extensions.get("payment_provider")
        if provider is None:
            log.warning("no payment provider configured: reconciliation skipped", extra={"day": day.isoformat()})
            return {}
        lo, hi = rec.fetch_window(day)
        txns = provider.balance_transactions(created_from=lo, created_to=hi)
    with session_factory()() as s:
        currencies = _currencies(s, txns)
    out = {}
    for currency in currencies:
        with session_factory().begin() as s:
            run = rec.reconcile_day(s, day, currency, txns, now, source=source)
            out[currency] = run.state.value
            log.info("day reconciled" if run.state == rec.RunState.RECONCILED else "day has differences",
                     extra={"day": day.isoformat(), "currency": currency, "open": run.open_count, "matched": run.matched_count})
    return out


@periodic_task(crontab(minute="40", hour="4"))
def daily_reconciliation() -> None:
    """Every day at 04:40 UTC: reconcile yesterday (UTC) against the provider."""
    reconcile(utcnow().date() - dt.timedelta(days=1))
