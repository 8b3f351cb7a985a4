"""Background work of the charging journey (Huey): settling ended sessions, and a watchdog every minute.

``settle_session`` is queued by whoever ends a session (the gateway on
StopTransaction or the car leaving, the watchdog on an idle overrun) after
its transaction commits; it retries with backoff while the provider does not
answer. The watchdog (``charging_watchdog``) finds what no event will: starts
that timed out (never plugged in), holds left waiting for 3-D Secure, cars
idling past the hold's allowance, sessions not settled yet, and sessions
whose charger fell silent. Every step is idempotent and takes the session's
row lock, so two workers (or a worker and the gateway) never do it twice.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import current_app
from huey import crontab

from payments.base import utcnow
from payments.providers.base import ProviderError
from webapp.charging import service
from webapp.db import session_factory
from webapp.tasks import periodic_task, task

log = logging.getLogger("voltpay.charging")


def _provider():
    return current_app.extensions.get("payment_provider")


def settle_now(session_id: int, now: dt.datetime | None = None):
    """Settle one ended session in its own database session (see ``service.settle``)."""
    with session_factory()() as s:
        cs = service.settle(s, _provider(), session_id, now or utcnow())
        if cs is not None:
            _after_settle(cs)
        return cs


def _after_settle(cs) -> None:
    """Hooks after a session is billed (receipts and emails register here)."""
    for hook in AFTER_SETTLE:
        try:
            hook(cs)
        except Exception:  # a failed notification must not undo or repeat a capture
            log.exception("after-settle hook failed", extra={"session": cs.id})


AFTER_SETTLE: list = []


@task(retries=8, retry_delay=15)
def settle_session(session_id: int) -> None:
    """Job: settle an ended session; a provider outage raises, so Huey retries with backoff."""
    settle_now(session_id)


def enqueue_settlements(session_ids) -> None:
    """Queue settlement of each session (call after the transaction that ended them committed)."""
    for sid in session_ids:
        try:
            settle_session(sid)
        except ProviderError as e:  # immediate mode (tests) runs the job here: the watchdog retries it
            log.warning("settlement deferred", extra={"session": sid, "reason": e.code})


def run_watchdog(now: dt.datetime | None = None) -> dict[str, int]:
    """One pass of the watchdog; returns how many sessions each step touched."""
    now = now or utcnow()
    factory = session_factory()
    provider = _provider()
    with factory() as s:
        due = service.due_work(s, now)
    counts = {k: 0 for k in due}
    for sid in due["start_timeout"]:
        with factory() as s:
            if _quietly(service.expire_start, s, provider, sid, now):
                counts["start_timeout"] += 1
    for sid in due["pending"]:
        with factory() as s:
            if _quietly(service.abandon_pending, s, provider, sid, now):
                counts["pending"] += 1
    for sid in due["idle_over"]:
        with factory() as s:
            if service.end_idle_overrun(s, sid, now):
                counts["idle_over"] += 1
                due["settle"].append(sid)
    for sid in due["silent"]:
        with factory() as s:
            service.review_silent(s, sid, now)
            counts["silent"] += 1
    for sid in due["unreleased"]:
        with factory() as s:
            if _quietly(lambda s, p, i, _now: service.release_leftover(s, p, i), s, provider, sid, now):
                counts["unreleased"] += 1
    for sid in dict.fromkeys(due["settle"]):
        try:
            settle_now(sid, now)
            counts["settle"] += 1
        except ProviderError as e:
            log.warning("settlement deferred", extra={"session": sid, "reason": e.code})
    return counts


def _quietly(fn, s, provider, sid, now):
    try:
        return fn(s, provider, sid, now)
    except ProviderError as e:
        log.warning("charging watchdog step deferred", extra={"session": sid, "step": fn.__name__, "reason": e.code})
        s.rollback()
        return None


@periodic_task(crontab(minute="*"))
def charging_watchdog() -> None:
    """Every minute: release timed-out starts and abandoned holds, end idle overruns, settle, flag silent sessions."""
    counts = run_watchdog()
    if any(counts.values()):
        log.info("charging watchdog", extra={"counts": counts})


def purge_ocpp_log(now: dt.datetime | None = None) -> int:
    """Delete OCPP messages older than ``OCPP_LOG_DAYS``, in batches; returns how many were deleted."""
    from sqlalchemy import delete, select

    from webapp.charging.models import OcppMessage

    cutoff = (now or utcnow()) - dt.timedelta(days=int(current_app.config.get("OCPP_LOG_DAYS") or 90))
    deleted = 0
    factory = session_factory()
    while True:
        with factory.begin() as s:
            ids = list(s.scalars(select(OcppMessage.id).where(OcppMessage.at < cutoff).order_by(OcppMessage.id).limit(5000)))
            if not ids:
                return deleted
            s.execute(delete(OcppMessage).where(OcppMessage.id.in_(ids)))
            deleted += len(ids)


@periodic_task(crontab(minute="17", hour="3"))
def purge_ocpp_log_job() -> None:
    """Every night: keep the OCPP message log to its retention period."""
    n = purge_ocpp_log()
    if n:
        log.info("ocpp log purged", extra={"deleted": n})
