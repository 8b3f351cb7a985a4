"""Throughput of Voltpay pages through the whole app stack, against a bare Flask app in the same run.

Prints requests per second for the sign-in page, /healthz and an API 401,
and the ratio to a "hello" Flask app served the same way (in-process WSGI
test client, one thread), so the number says what our middleware, templates,
session, CSRF, babel and database cost, independent of the machine's speed.

    .venv/bin/python bench/pages.py [seconds-per-case]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.cli import migrate_to_head  # noqa: E402


def rate(client, path: str, seconds: float) -> float:
    """Requests per second of GET ``path`` over about ``seconds``."""
    for _ in range(20):  # warm-up
        client.get(path)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.get(path)
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    db = Path(tempfile.mkdtemp()) / "bench.db"
    url = os.environ.get("VOLTPAY_BENCH_DATABASE_URL", f"sqlite:///{db}")
    migrate_to_head(url)
    app = create_app({"ENV": "test", "DATABASE_URL": url, "HUEY_IMMEDIATE": True, "RATELIMIT_ENABLED": False, "LOG_LEVEL": "WARNING"})
    hello = Flask("hello")
    hello.add_url_rule("/", "hello", lambda: "hello")

    baseline = rate(hello.test_client(), "/", seconds)
    print(f"baseline  bare Flask hello        {baseline:9.0f} req/s")
    client = app.test_client()
    for label, path in (("sign-in page", "/auth/sign-in"), ("health check", "/healthz"), ("API 401 problem", "/api/v1/me")):
        r = rate(client, path, seconds)
        print(f"voltpay   {label:<22} {r:9.0f} req/s   ratio {r / baseline:5.2f}")


if __name__ == "__main__":
    main()
