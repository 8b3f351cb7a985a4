"""Delivering relay commands to meter collectors (Huey jobs): a signed POST, retried with backoff until answered.

A command (``webapp.meters.relay``) is handed to ``deliver_relay_command``
after the transaction that created it commits; ``deliver_due_relay_commands``
runs every minute and queues the commands whose next attempt is due, so a
lost job, a restart or an outage only delays a command.

One attempt (``deliver``):

1. *Claim* the command in a short transaction: a conditional UPDATE moves
   ``next_attempt_at`` ``LEASE`` ahead, so a second worker (or the periodic
   sweep) skips it while this attempt runs; a worker that dies mid-attempt
   leaves it due again after the lease. A command that a newer one of the
   same meter overtook is marked ``superseded`` instead of sent.
2. *POST* the JSON body with its ``Voltpay-Signature`` header to the
   collector's ``webhook_url``, ``TIMEOUT`` seconds at most, outside any
   transaction (no row lock is held while a collector thinks).
3. *Record* the answer: any 2xx delivers it (``delivered_at``; the meter's
   relay state moves on; the tenant is emailed). Anything else — a non-2xx
   answer, a timeout, a refused connection, no webhook configured — counts
   an attempt, keeps ``last_error`` and schedules the next attempt
   ``RETRY_FIRST`` later, twice as long each time, at most ``RETRY_MAX``
   apart. After ``MAX_ATTEMPTS`` the command is ``failed``: visible to the
   operator (``relay_status``, the ``relay_commands`` table) and retried
   only when asked (``retry``, ``flask meters relay-retry``).

Each attempt sends the same body (the same command ``id``), so a collector
that got an earlier attempt but whose answer was lost recognises it. With
the defaults the attempts span about two hours.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import requests
from huey import crontab
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from webapp.db import session_factory, utcnow
from webapp.meters import relay
from webapp.meters.models import MeterCollector, RelayAction, RelayCommand
from webapp.models import Meter
from webapp.tasks import periodic_task, task

log = logging.getLogger("voltpay.meters.relay")

TIMEOUT = 10  # seconds for the collector to answer one POST
MAX_ATTEMPTS = 10
RETRY_FIRST = dt.timedelta(seconds=30)
RETRY_MAX = dt.timedelta(minutes=30)
LEASE = dt.timedelta(seconds=60)  # longer than TIMEOUT: an attempt in progress is never started twice
DUE_BATCH = 500
USER_AGENT = "Voltpay-Relay/1"


def backoff(attempts: int) -> dt.timedelta:
    """The wait before the next attempt after ``attempts`` failed ones (30 s, 1 min, 2 min, … 30 min)."""
    return min(RETRY_FIRST * (2 ** max(0, attempts - 1)), RETRY_MAX)


def _due(now: dt.datetime):
    return (RelayCommand.status == "pending") & or_(RelayCommand.next_attempt_at.is_(None), RelayCommand.next_attempt_at <= now)


def deliver(command_id: int, now: dt.datetime | None = None) -> str | None:
    """One delivery attempt of a command if it is due; its status afterwards, or None when it was not due."""
    now = now or utcnow()
    factory = session_factory()
    with factory.begin() as s:
        claimed = s.execute(update(RelayCommand).where(RelayCommand.id == command_id, _due(now))
                            .values(next_attempt_at=now + LEASE).execution_options(synchronize_session=False)).rowcount
        if not claimed:
            return None
        cmd = s.get(RelayCommand, command_id)
        meter = s.get(Meter, cmd.meter_id)
        newer = s.scalar(select(RelayCommand.id).where(RelayCommand.meter_id == cmd.meter_id, RelayCommand.id > cmd.id).limit(1))
        if newer is not None:
            cmd.status, cmd.next_attempt_at = "superseded", None
            return cmd.status
        collector = s.get(MeterCollector, meter.collector_id) if meter.collector_id else None
        body = relay.payload(cmd, meter)
        target = (collector.webhook_url, collector.webhook_secret) if collector and collector.active else (None, None)
        key = cmd.idempotency_key
    url, secret = target
    if not url or not secret:
        error: str | None = "no active collector with a webhook URL and secret for this meter"
    else:
        error = _post(url, secret, body, key)
    return _record(command_id, error, now)


def _post(url: str, secret: str, body: bytes, key: str) -> str | None:
    """POST one signed command; None when the collector accepted it (2xx), else what went wrong."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Idempotency-Key": key,
        relay.SIGNATURE_HEADER: relay.sign(secret, body, int(time.time())),  # the receiver's clock, not a test's "now"
    }
    try:
        resp = requests.post(url, data=body, headers=headers, timeout=TIMEOUT, allow_redirects=False)
    except requests.RequestException as e:
        return f"{type(e).__name__}: {e}"[:2000]
    if 200 <= resp.status_code < 300:
        return None
    return f"HTTP {resp.status_code}: {resp.text[:300]}"


def _record(command_id: int, error: str | None, now: dt.datetime) -> str:
    """The outcome of one attempt on the command, and on the meter when it was confirmed."""
    with session_factory().begin() as s:
        cmd = s.get(RelayCommand, command_id, with_for_update=True, populate_existing=True)
        if cmd is None:
            return "gone"  # its meter was deleted meanwhile
        cmd.attempts += 1
        if error is None:
            cmd.delivered_at = now
            cmd.last_error = None
            if cmd.status == "pending":  # not overtaken while it was on the wire
                cmd.status, cmd.next_attempt_at = "delivered", None
                _confirmed(s, cmd, now)
            log.info("relay command delivered", extra={"command": cmd.id, "attempts": cmd.attempts})
            return cmd.status
        cmd.last_error = error
        if cmd.status == "pending":
            if cmd.attempts >= MAX_ATTEMPTS:
                cmd.status, cmd.next_attempt_at = "failed", None
            else:
                cmd.next_attempt_at = now + backoff(cmd.attempts)
        log.warning("relay command not delivered", extra={"command": cmd.id, "attempts": cmd.attempts, "error": error,
                                                          "status": cmd.status})
        return cmd.status


def _confirmed(s: Session, cmd: RelayCommand, now: dt.datetime) -> None:
    """The collector accepted ``cmd``: the relay state moves on (unless a newer command changed it) and the tenant hears."""
    before, after = ((relay.DISCONNECTING, relay.DISCONNECTED) if cmd.action is RelayAction.DISCONNECT
                     else (relay.RECONNECTING, relay.CONNECTED))
    t = Meter.__table__
    moved = s.execute(update(t).where(t.c.id == cmd.meter_id, t.c.relay_state == before)
                      .values(relay_state=after, relay_changed_at=now)).rowcount
    if moved:
        relay.email_for(s, cmd, s.get(Meter, cmd.meter_id, populate_existing=True))


def retry(s: Session, command_id: int, now: dt.datetime | None = None) -> RelayCommand:
    """Try a failed command again (an operator fixed the collector); only the meter's newest command. Caller commits."""
    cmd = s.get(RelayCommand, command_id, with_for_update=True)
    if cmd is None:
        raise LookupError(f"no relay command {command_id}")
    newer = s.scalar(select(RelayCommand.id).where(RelayCommand.meter_id == cmd.meter_id, RelayCommand.id > cmd.id).limit(1))
    if cmd.status != "failed" or newer is not None:
        raise ValueError(f"relay command {command_id} is {cmd.status}{' and overtaken' if newer else ''}: nothing to retry")
    cmd.status, cmd.next_attempt_at, cmd.attempts = "pending", None, 0
    s.flush()
    s.info.setdefault(relay.QUEUED, set()).add(cmd.id)
    return cmd


def due_ids(now: dt.datetime | None = None) -> list[int]:
    """Ids of the commands whose next attempt is due, oldest first."""
    with session_factory()() as s:
        return list(s.scalars(select(RelayCommand.id).where(_due(now or utcnow())).order_by(RelayCommand.id).limit(DUE_BATCH)))


def deliver_due(now: dt.datetime | None = None) -> dict[int, str | None]:
    """Attempt every due command here and now (tests, commands); each command's status afterwards."""
    now = now or utcnow()
    return {cid: deliver(cid, now) for cid in due_ids(now)}


@task(retries=2, retry_delay=5)
def deliver_relay_command(command_id: int) -> None:
    """Job: one delivery attempt (the command's own schedule does the retrying; Huey's only covers a database hiccup)."""
    deliver(command_id)


def enqueue(command_ids) -> None:
    """Queue a delivery attempt of each command (after the commit that created them); never raises."""
    for cid in command_ids:
        try:
            deliver_relay_command(cid)
        except Exception:  # noqa: BLE001 - the queue being down must not undo a committed debit: the sweep sends it
            log.exception("could not queue a relay command", extra={"command": cid})


@periodic_task(crontab(minute="*"))
def deliver_due_relay_commands() -> None:
    """Periodic job: queue the commands whose next attempt is due (new, retrying, or lost by a dead worker)."""
    enqueue(due_ids())
