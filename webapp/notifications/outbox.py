"""The email outbox: an email is recorded in the transaction that causes it, and queued only once that commits.

Code inside a transaction calls ``schedule()``. It inserts a ``SentEmail``
row (status ``queued``) under an idempotency key naming the cause
(``document:12:receipt``, ``session:7:started``): a second cause with the
same key — a replay, a retry, another worker — inserts nothing, so one cause
sends one email. The row's id is kept in ``session.info``; after the
*outermost* commit (``after_commit``) each new row is handed to the worker
(``deliver_email``); a rollback forgets them (and the rows go with it).
Nothing is rendered or sent in the caller's transaction, so a page never
waits for SMTP or for a PDF.

The worker renders the message from the row alone (its template and
reference name the cause; see ``webapp.notifications.emails``), in the
recipient's language, sends it, and records the outcome on the row:
``sent`` (with ``sent_at``), or the error and the attempt count while Huey
retries with backoff; ``failed`` once the retries are spent. Delivery is
at least once: a job that dies between the SMTP server's "250" and our
commit is sent again on retry.

If the queue could not be reached after the commit (Redis down), the row
stays ``queued`` with no attempt; ``resend_stuck_emails`` (every five
minutes) queues such rows again.

Wallet movements: ``payments.ledger.post`` notes on its connection the
accounts it booked (``ledger.POSTED``; the ORM's flush events never see its
statements); after the commit, the accounts of the committed transaction
are handed to the low-balance check
(``webapp.notifications.emails.check_low_balance_job``), with which of
them were debited; a rollback drops them.
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import current_app
from huey import crontab
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, SessionTransaction

from payments.ledger import POSTED
from webapp.db import session_factory, utcnow
from webapp.notifications.models import SentEmail
from webapp.tasks import periodic_task, task

log = logging.getLogger("voltpay.notifications")

PENDING = "voltpay.outbox"  # session.info: {idempotency key: SentEmail id} waiting for the commit
CONNECTIONS = "voltpay.outbox.connections"  # session.info: the info dicts of the connections of this transaction
STUCK_AFTER = dt.timedelta(minutes=10)  # a queued row never tried for this long lost its job: queue it again
RETRIES = 6
RETRY_DELAY = 30  # seconds; doubled at each retry, at most 10 minutes apart (webapp.tasks)


def _insert(s: Session, table):
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING (PostgreSQL and SQLite)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def schedule(s: Session, *, to: str, template: str, reference: str, key: str) -> int | None:
    """Record an email in the caller's transaction, sent once it commits; None when ``key`` was used before.

    Safe inside a flush (Core statement on the session's connection). The
    subject is filled in by the worker, which renders it in the recipient's
    language.
    """
    table = SentEmail.__table__
    email_id = s.connection().execute(
        _insert(s, table)
        .values(to=to[:254], template=template, subject="", reference=reference[:64], idempotency_key=key, status="queued",
                attempts=0, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(table.c.id)
    ).scalar_one_or_none()
    if email_id is not None:
        s.info.setdefault(PENDING, {})[key] = email_id
    return email_id


# --------------------------------------------------------------------------- session and connection events


@event.listens_for(Session, "after_begin")
def _remember_connection(s: Session, _transaction: SessionTransaction, connection) -> None:
    """Keep the connection's info dict: the postings noted on it belong to this transaction."""
    s.info.setdefault(CONNECTIONS, []).append(connection.info)


@event.listens_for(Engine, "rollback")
def _forget_postings(conn) -> None:
    """A rolled-back transaction moved no money."""
    conn.info.pop(POSTED, None)


@event.listens_for(Session, "after_commit")
def _after_commit(s: Session) -> None:
    """The outermost commit succeeded: queue its emails and the checks it asked for."""
    if s.in_nested_transaction():
        return  # a savepoint released: the transaction goes on
    emails = s.info.pop(PENDING, {})
    posted: dict[int, bool] = {}
    for info in s.info.pop(CONNECTIONS, []):
        for acct, debited in info.pop(POSTED, {}).items():
            posted[acct] = posted.get(acct, False) or debited
    for key, email_id in emails.items():
        _enqueue(email_id, key)
    if posted:
        from webapp.notifications.emails import check_low_balance_job

        _safely(check_low_balance_job, sorted(posted), sorted(a for a, d in posted.items() if d))


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(s: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended without a commit (rollback, close): forget what it scheduled."""
    if transaction.parent is not None:
        return
    s.info.pop(PENDING, None)
    for info in s.info.pop(CONNECTIONS, []):
        info.pop(POSTED, None)


def _safely(fn, *args) -> None:
    """Queue a job after a commit; the commit stands whatever happens here (the sweep catches lost emails)."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the queue being down must not turn a committed payment into an error page
        log.exception("could not queue a job after commit", extra={"job": getattr(fn, "__name__", str(fn))})


def _enqueue(email_id: int, key: str) -> None:
    _safely(deliver_email, email_id, key)


# --------------------------------------------------------------------------- the worker's side


@task(retries=RETRIES, retry_delay=RETRY_DELAY, context=True)
def deliver_email(email_id: int, key: str, task=None) -> None:
    """Job: render and send one recorded email, then record how it went; raises (Huey retries) while SMTP fails."""
    from webapp.mail import deliver
    from webapp.notifications.emails import build

    factory = session_factory()
    with factory() as s:
        row = s.get(SentEmail, email_id)
        if row is None or row.idempotency_key != key or row.status != "queued":
            return  # rolled back with a savepoint, already sent, or given up
        try:
            msg = build(s, row)
        except Exception as e:
            _record(email_id, error=e, final=task is None or not task.retries)
            raise
    if msg is None:  # the cause is gone, or the person asked not to get this any more
        _record(email_id, error="nothing to send", final=True, attempted=False)
        return
    try:
        deliver(msg)
    except Exception as e:
        _record(email_id, error=e, final=task is None or not task.retries, subject=str(msg["Subject"]))
        raise
    _record(email_id, subject=str(msg["Subject"]))


def _record(email_id: int, *, error: Exception | str | None = None, final: bool = False, subject: str | None = None,
            attempted: bool = True) -> None:
    """The outcome of one delivery attempt on the email's row."""
    values: dict = {"attempts": SentEmail.attempts + (1 if attempted else 0)}
    if subject is not None:
        values["subject"] = subject[:255]
    if error is None:
        values.update(status="sent", sent_at=utcnow(), error=None)
    else:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        values.update(status="failed" if final else "queued", error=text[:2000])
        log.warning("email not sent", extra={"email": email_id, "error": text, "final": final})
    with session_factory().begin() as s:
        s.execute(update(SentEmail).where(SentEmail.id == email_id).values(**values))


def resend_stuck(now: dt.datetime | None = None) -> int:
    """Queue again the emails whose job was lost (queued, never tried, older than ``STUCK_AFTER``); how many."""
    cutoff = (now or utcnow()) - STUCK_AFTER
    with session_factory()() as s:
        rows = s.execute(select(SentEmail.id, SentEmail.idempotency_key)
                         .where(SentEmail.status == "queued", SentEmail.attempts == 0, SentEmail.created_at < cutoff)
                         .order_by(SentEmail.id).limit(500)).all()
    for email_id, key in rows:
        _enqueue(email_id, key)
    return len(rows)


@periodic_task(crontab(minute="*/5"))
def resend_stuck_emails() -> None:
    """Periodic job: the outbox sweep (see ``resend_stuck``)."""
    n = resend_stuck()
    if n:
        log.warning("queued lost emails again", extra={"count": n, "app": current_app.name})
