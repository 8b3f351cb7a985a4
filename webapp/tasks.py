"""Background jobs on the Huey task queue.

One queue for every worker process: Redis when ``VOLTPAY_REDIS_URL`` is set,
otherwise a SQLite file (``VOLTPAY_HUEY_PATH``). Tests run tasks immediately
in-process, or start a real consumer. Every job is idempotent: running it
twice changes nothing the second time, so a retry or a second worker is safe.
Jobs run inside an app context of the app that configured the queue.
"""

from __future__ import annotations

import functools
import logging

from flask import Flask, current_app, has_app_context
from huey import Huey, RedisHuey, SqliteHuey  # noqa: F401  (RedisHuey/SqliteHuey documented choices)
from huey.storage import RedisStorage, SqliteStorage

log = logging.getLogger("voltpay.tasks")

huey = Huey("voltpay", storage_class=SqliteStorage, filename=":memory:", utc=True)
_app: Flask | None = None


def configure_queue(config: dict) -> None:
    """Point the shared queue at Redis or the SQLite file named in ``config``; or run tasks inline."""
    if config.get("HUEY_IMMEDIATE"):
        huey.immediate = True
        return
    huey.immediate = False
    if config.get("REDIS_URL"):
        huey.storage_class = RedisStorage
        huey.storage_kwargs = {"url": config["REDIS_URL"]}
    else:
        huey.storage_class = SqliteStorage
        huey.storage_kwargs = {"filename": config["HUEY_PATH"]}
    huey.storage = huey.create_storage()


def init_app(app: Flask) -> None:
    """Configure the queue from the app's settings and remember the app for job contexts."""
    global _app
    _app = app
    configure_queue(app.config)


def task(**kwargs):
    """Declare a background job that runs inside an app context (retries with backoff by default)."""
    kwargs.setdefault("retries", 5)
    kwargs.setdefault("retry_delay", 10)

    def decorate(fn):
        @functools.wraps(fn)
        def in_context(*a, **kw):
            if has_app_context():
                return fn(*a, **kw)
            if _app is None:
                raise RuntimeError("the task queue was used before create_app()")
            with _app.app_context():
                return fn(*a, **kw)

        return huey.task(**kwargs)(in_context)

    return decorate


def run_worker(workers: int = 2, periodic: bool = True) -> None:
    """Run the consumer in the foreground (``flask worker``)."""
    # Import the modules that declare tasks so the consumer knows them.
    import webapp.mail  # noqa: F401

    log.info("worker starting", extra={"workers": workers, "storage": type(huey.storage).__name__})
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=periodic, check_worker_health=True)
    consumer.run()


def app() -> Flask:
    """The app jobs run under (current one when inside a request)."""
    return current_app._get_current_object() if has_app_context() else _app  # type: ignore[return-value]
