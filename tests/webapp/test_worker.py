"""The background worker: a real Huey consumer (threads) delivers queued email over real SMTP.

Each test points the shared queue at a SQLite file in tmp_path (or Redis db 15),
starts a consumer in this process, and stops it cleanly. Afterwards the queue
is back in immediate mode, as every other test expects.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid

import pytest
from huey.signals import SIGNAL_RETRYING

from tests.conftest import free_port
from webapp import tasks
from webapp.mail import build_message, send_email_job, send_template
from webapp.tasks import huey

REDIS_URL = "redis://127.0.0.1:6379/15"
TO = "ana@example.com"
LINK = "http://localhost/verify/abc123"


def _ping_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "redis"])
def queue(request, app_config, tmp_path, monkeypatch):
    """Switch the app under test to a real queue (SQLite file or Redis db 15); immediate mode again afterwards."""
    settings = {"HUEY_IMMEDIATE": False, "HUEY_PATH": str(tmp_path / "huey.db"), "REDIS_URL": None}
    if request.param == "redis":
        try:
            _ping_redis()
        except Exception as e:  # noqa: BLE001 - any failure to reach Redis means "cannot test Redis here"
            pytest.skip(f"Redis not reachable at {REDIS_URL} ({type(e).__name__}: {e}); the Redis queue is untested")
        settings["REDIS_URL"] = REDIS_URL
        # Keys of a queue of its own: nothing leaks to, or from, another test run using the same Redis.
        monkeypatch.setattr(huey, "name", f"voltpay-test-{uuid.uuid4().hex}")
    app_config.update(settings)
    yield request.param
    huey.flush()  # this queue's keys (Redis) or rows (the SQLite file)
    tasks.configure_queue({"HUEY_IMMEDIATE": True})
    assert huey.immediate


@contextlib.contextmanager
def running_consumer():
    """A real consumer with two worker threads and a scheduler, stopped gracefully on exit."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # Poll an empty SQLite queue at least every 0.2 s (the default backs off to 10 s).
    consumer = huey.create_consumer(workers=2, worker_type="thread", periodic=False, max_delay=0.2, shutdown_timeout=15)
    consumer.start()  # also installs its signal handlers; restored below
    try:
        yield consumer
    finally:
        consumer.stop(graceful=True)
        for s, handler in saved.items():
            signal.signal(s, handler)
        huey._timeout_handler = None
    threads = [t for _, t in consumer.worker_threads] + [consumer.scheduler]
    assert not any(t.is_alive() for t in threads), "the consumer did not stop"


_progress = threading.Event()  # set on every retry, so a waiter re-checks at once


def _wait(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``condition()`` holds, re-checking on every retry and at least every 50 ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        _progress.wait(0.05)
        _progress.clear()


@contextlib.contextmanager
def retry_delays():
    """The delay Huey uses before each retry, recorded as the retries happen."""
    seen: list[float] = []

    def on_retry(_signal, task, *_args):
        seen.append(task.retry_delay)
        _progress.set()

    huey.signal(SIGNAL_RETRYING)(on_retry)
    try:
        yield seen
    finally:
        huey.disconnect_signal(on_retry, SIGNAL_RETRYING)


def test_worker_delivers_a_queued_email(queue, app, mailbox):
    with app.test_request_context():
        send_template(TO, "verify", "en", link=LINK)
    # The page only queued the message: nothing was sent in the request.
    assert huey.pending_count() == 1
    assert mailbox.messages == []

    with running_consumer():
        [msg] = mailbox.wait_for(TO)
        _wait(lambda: huey.pending_count() == 0, what="an empty queue")

    assert msg["To"] == TO
    assert msg["From"] == app.config["MAIL_FROM"]
    assert msg["Subject"] == "Confirm your email address for Voltpay"
    body = msg.get_body(("plain",)).get_content()
    assert LINK in body and "The link works for 48 hours" in body


def test_sign_up_page_does_not_wait_for_smtp(queue, app, client, mailbox, smtp_server):
    app.config["SMTP_PORT"] = free_port()  # nothing listens there: the page must not even try
    resp = client.post("/auth/sign-up", data={"email": "new@example.com", "password": "correct horse staple"})
    assert resp.status_code == 302
    assert huey.pending_count() == 1 and mailbox.messages == []

    app.config["SMTP_PORT"] = smtp_server[1]
    with running_consumer():
        [msg] = mailbox.wait_for("new@example.com")
    assert "/verify/" in msg.get_body(("plain",)).get_content()


def test_failed_delivery_is_retried_with_backoff_then_delivered(queue, app, mailbox, monkeypatch):
    # Same job, shorter first delay so the test is quick: 0.05 s, then 0.1 s, 0.2 s …
    monkeypatch.setattr(send_email_job.task_class, "default_retry_delay", 0.05)
    good_port = app.config["SMTP_PORT"]
    app.config["SMTP_PORT"] = free_port()  # SMTP server unreachable: connection refused

    with retry_delays() as delays, running_consumer():
        with app.app_context():
            send_template(TO, "verify", "en", link=LINK)
        _wait(lambda: len(delays) >= 2, what="two failed attempts")
        assert mailbox.messages == []
        app.config["SMTP_PORT"] = good_port  # the SMTP server is back
        [msg] = mailbox.wait_for(TO)
        _wait(lambda: huey.pending_count() == 0 and huey.scheduled_count() == 0, what="no job left")

    assert delays[:2] == [0.05, 0.1]  # exponential backoff
    assert msg["Subject"] == "Confirm your email address for Voltpay"
    assert len(mailbox.to(TO)) == 1  # delivered exactly once


def test_retry_delays_double_and_are_capped(app):
    """The real job's schedule: 30 s, 60 s, … never more than MAX_RETRY_DELAY; run by hand, as a worker would."""
    app.config["SMTP_PORT"] = free_port()
    with app.app_context():
        raw = build_message(TO, "hello", "body").as_bytes()
    job = send_email_job.s(raw)
    with retry_delays() as delays:
        while job.retries:
            job.eta = None  # due now
            huey.execute(job)
    huey.flush()
    assert delays == [30, 60, 120, 240, 480, tasks.MAX_RETRY_DELAY]
