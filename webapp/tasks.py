"""Background jobs on the Huey task queue.

One queue for every worker process: Redis when ``VOLTPAY_REDIS_URL`` is set,
otherwise a SQLite file (``VOLTPAY_HUEY_PATH``). Outside immediate mode a job
call only stores the job; the worker (``flask worker``) runs it, so a slow or
dead SMTP server never holds up a page. Tests run jobs immediately in-process,
or start a real consumer. Every job is idempotent: running it twice changes
nothing the second time, so a retry or a second worker is safe. Jobs run inside
an app context of the app that configured the queue.

A failed job is retried with exponential backoff: the first retry after
``retry_delay`` seconds, each next one twice as late, never more than
``MAX_RETRY_DELAY`` apart (10 s, 20 s, 40 s, … 10 min).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from flask import Flask, has_app_context
from huey import Huey
from huey.storage import RedisStorage, SqliteStorage

log = logging.getLogger("voltpay.tasks")

RETRY_BACKOFF = 2  # each retry waits this many times longer than the one before
MAX_RETRY_DELAY = 600  # seconds; the longest wait between two attempts

huey = Huey("voltpay", storage_class=SqliteStorage, filename=":memory:", utc=True)
_app: Flask | None = None


@huey.pre_execute()
def _cap_retry_delay(job) -> None:
    """Keep the backoff bounded: Huey waits ``retry_delay`` after a failure, then multiplies it."""
    if job.retry_delay and job.retry_delay > MAX_RETRY_DELAY:
        job.retry_delay = MAX_RETRY_DELAY


def configure_queue(config: dict) -> None:
    """Point the shared queue at Redis or the SQLite file named in ``config``; or run tasks inline."""
    if config.get("HUEY_IMMEDIATE"):
        huey.immediate = True  # in-memory storage, jobs run in the caller
        return
    leaving_immediate = huey.immediate
    if config.get("REDIS_URL"):
        huey.storage_class = RedisStorage
        huey.storage_kwargs = {"url": config["REDIS_URL"]}
    else:
        huey.storage_class = SqliteStorage
        huey.storage_kwargs = {"filename": config["HUEY_PATH"]}
        Path(config["HUEY_PATH"]).parent.mkdir(parents=True, exist_ok=True)  # instance/ is not in a fresh checkout
    huey.immediate = False  # when leaving immediate mode, Huey builds the storage from the kwargs above
    if not leaving_immediate:
        huey.storage = huey.create_storage()


def init_app(app: Flask) -> None:
    """Configure the queue from the app's settings and remember the app for job contexts."""
    global _app
    _app = app
    configure_queue(app.config)


def task(retries: int = 5, retry_delay: float = 10, **kwargs):
    """Declare a background job that runs inside an app context.

    A job that raises is retried up to ``retries`` times, the first time after
    ``retry_delay`` seconds and then with exponential backoff (see the module
    docstring). Other keyword arguments go to ``huey.task``.
    """
    kwargs.setdefault("retry_backoff", RETRY_BACKOFF)

    def decorate(fn):
        return huey.task(retries=retries, retry_delay=retry_delay, **kwargs)(_in_app_context(fn))

    return decorate


def periodic_task(validate_datetime, **kwargs):
    """Declare a job the worker's scheduler runs on a schedule (``huey.crontab(...)``), inside an app context.

    No retries: the next run comes soon and does the same work, so a periodic
    job must be idempotent and cheap to repeat.
    """

    def decorate(fn):
        return huey.periodic_task(validate_datetime, **kwargs)(_in_app_context(fn))

    return decorate


def _in_app_context(fn):
    """Run ``fn`` in the app context of the app that configured the queue (or the caller's)."""

    @functools.wraps(fn)
    def in_context(*a, **kw):
        if has_app_context():
            return fn(*a, **kw)
        if _app is None:
            raise RuntimeError("the task queue was used before create_app()")
        with _app.app_context():
            return fn(*a, **kw)

    return in_context


def run_worker(workers: int = 2, periodic: bool = True) -> None:
    """Run the consumer in the foreground (``flask worker``); Ctrl-C or SIGTERM stops it."""
    # Import the modules that declare tasks so the consumer knows them.
    import webapp.mail  # noqa: F401
    import webapp.charging.jobs  # noqa: F401
    import webapp.wallet.jobs  # noqa: F401
    import webapp.notifications  # noqa: F401
    import webapp.meters.jobs  # noqa: F401
    import webapp.meters.bills  # noqa: F401  (monthly bills, overdue reminders)
    import webapp.settlement.jobs  # noqa: F401  (daily T+1 payout batches)
    import webapp.settlement.reconcile_jobs  # noqa: F401  (daily reconciliation with the provider)

    log.info("worker starting", extra={"workers": workers, "storage": type(huey.storage).__name__})
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=periodic, check_worker_health=True)
    consumer.run()
