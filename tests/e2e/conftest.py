"""Browser tests: the app served on a real local port and driven by headless Chromium (Playwright).

The live server runs the very ``app`` object of tests/conftest.py (so the tables it
truncated are the ones the browser writes to), with CSRF checks on as in production
and ``BASE_URL`` pointing at the live server, so links in emails open in the browser.
Card payments go to localstripe, whose stripe.js the pages load (``stripe_config``).

Chromium comes from the system (Debian's ``chromium`` package), not from
``playwright install``: set ``VOLTPAY_CHROMIUM`` to use another binary. Without one,
the browser tests are skipped with a message saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from flask import Flask, got_request_exception
from werkzeug.serving import make_server

PHONE = {"width": 360, "height": 740}

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_path() -> tuple[str | None, str]:
    """The Chromium binary to drive and, when there is none, why: $VOLTPAY_CHROMIUM, else `chromium` on PATH."""
    chosen = os.environ.get("VOLTPAY_CHROMIUM")
    if chosen:
        if os.path.isfile(chosen) and os.access(chosen, os.X_OK):
            return chosen, ""
        return None, f"VOLTPAY_CHROMIUM={chosen} is not an executable file"
    for path in (shutil.which("chromium"), "/usr/bin/chromium"):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path, ""
    return None, "Chromium not installed: apt-get install chromium (or set VOLTPAY_CHROMIUM)"


@pytest.fixture
def live_socket() -> Iterator[socket.socket]:
    """A listening socket on a free port, bound before the app is built so BASE_URL can name it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield sock
    sock.close()


@pytest.fixture
def app_config(app_config: dict, stripe_config: dict, live_socket: socket.socket) -> dict:
    """The shared test settings, with CSRF on (a real browser sends the tokens), the live URL, and card
    payments on localstripe (emptied for each test), whose stripe.js the pages load (STRIPE_JS_URL)."""
    host, port = live_socket.getsockname()[:2]
    return {**app_config, **stripe_config, "WTF_CSRF_ENABLED": True, "BASE_URL": f"http://{host}:{port}"}


@dataclass
class LiveServer:
    """The running app: its URL and any exception a request raised."""

    url: str
    app: Flask
    errors: list[BaseException] = field(default_factory=list)

    def __call__(self, path: str = "/") -> str:
        return self.url.rstrip("/") + path


@pytest.fixture
def live_server(app: Flask, live_socket: socket.socket) -> Iterator[LiveServer]:
    """Serve ``app`` (the same object the ``app`` fixture truncated) with werkzeug in a thread."""
    assert app.config["WTF_CSRF_ENABLED"] is True
    host, port = live_socket.getsockname()[:2]
    server = make_server(host, port, app, threaded=True, fd=live_socket.fileno())
    live = LiveServer(url=app.config["BASE_URL"], app=app)
    assert live.url == f"http://{host}:{port}"

    def _record(sender, exception, **_extra):
        live.errors.append(exception)

    got_request_exception.connect(_record, app)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield live
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        got_request_exception.disconnect(_record, app)


@pytest.fixture(scope="session")
def browser():
    """Headless system Chromium, one per test run."""
    path, why_not = chromium_path()
    if path is None:
        pytest.skip(why_not)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class ConsoleError:
    """One console error or uncaught exception, with the URL it came from."""

    text: str
    url: str


@dataclass
class Console:
    """Console errors and uncaught page errors (CSP violations show up here)."""

    errors: list[ConsoleError] = field(default_factory=list)

    def unexpected(self, *allowed: tuple[str, str]) -> list[ConsoleError]:
        """Errors other than the ``(text start, url)`` pairs a test expects."""
        return [e for e in self.errors if not any(e.text.startswith(t) and e.url == u for t, u in allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser, console: Console):
    """A fresh phone-sized page (360×740, touch) in its own browser context."""
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True, locale="en-GB")
    context.set_default_timeout(5_000)
    p = context.new_page()
    p.on("console", lambda msg: console.errors.append(ConsoleError(msg.text, msg.location.get("url", ""))) if msg.type == "error" else None)
    p.on("pageerror", lambda exc: console.errors.append(ConsoleError(f"uncaught {exc.name}: {exc.message}", p.url)))
    try:
        yield p
    finally:
        context.close()
