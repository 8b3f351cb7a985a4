"""Requests per second and p99 latency over HTTP through gunicorn, against a bare Flask app served the same way in the same run.

wrk (one thread, 32 keep-alive connections) loads gunicorn serving, one after
the other: a bare Flask "hello" app (``bench/apps/hello.py``), then Voltpay
on a fresh SQLite database with the demo data, for the connector page behind
a QR code (``/c/D101``) and a live session as its driver's app polls it
(``GET /api/v1/sessions/<id>`` with a bearer token; the session has been
charging for 20 minutes with a reading a minute). Both apps run under the same
gunicorn settings, so the ratio says what Voltpay's stack costs on this
machine; the goal is a connector page at ≥ 0.5 of the bare app.

The rate limiter is switched off for the run (``create_app({"RATELIMIT_ENABLED":
False})`` as gunicorn's app spec: no environment variable controls it), since
every request comes from one address. Logs stay at the production default
(INFO, one JSON line per request, to a file). Needs ``wrk`` (Debian:
``apt-get install wrk``).

Named http_load.py, not http.py: every script in bench/ has this folder first
on sys.path, where an http.py would stand in for the standard library's http
package (urllib, werkzeug and gunicorn import it).

One gunicorn worker (with 4 threads) by default: with two, the 32 keep-alive
connections wrk opens at once land on whichever worker accepts first, and
the rate then depends on that split more than on the app (the same build
measured 0.16 and 1.28 in two runs on 2 cores); one worker on one core,
wrk on the other, measures what a request costs.

The bare app and the connector page run alternately, three rounds each
(``--rounds``), and the medians are compared; then the session API once.

    .venv/bin/python bench/http_load.py [--seconds 10] [--rounds 3] [--connections 32] [--workers 1] [--threads 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for webapp and payments, imported once the database is made

CONNECTOR = "D101"  # the demo's simple-tariff connector, free and online
SESSION_CONNECTOR = "D102"  # the connector of the live session
HELLO_APP = "bench.apps.hello:app"
VOLTPAY_APP = "webapp:create_app({'RATELIMIT_ENABLED': False})"


@dataclass
class Result:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    client_cpu: float  # wrk's CPU time over the wall time (1.0 = one core)
    server_cpu: float  # gunicorn's (master and workers) likewise


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_database(url: str, tmp: Path) -> tuple[int, str]:
    """Migrate and seed the database at ``url``, start one charging session; return its id and its driver's API token."""
    from sqlalchemy import select

    from webapp.models import ApiToken, Charger, Connector, User  # first: importing webapp.api before webapp.models is circular
    from payments import wallet
    from payments.ledger import AccountKind, get_account, transfer
    from payments.money import Money
    from webapp import create_app
    from webapp.api import TOKEN_PREFIX
    from webapp.auth.tokens import digest, new_secret
    from webapp.charging import service
    from webapp.charging.models import ChargerConnection, CommandStatus, PaymentKind, SessionState
    from webapp.cli import migrate_to_head
    from webapp.db import utcnow
    from webapp.seed import seed

    class AcceptingGateway(service.Gateway):
        """Stands in for the charger gateway: every command is accepted."""

        def call(self, s, charger, action, payload, *, key, session_id=None, requested_by="system"):
            """Accept without sending anything."""
            return service.CommandResult(CommandStatus.ACCEPTED, {"status": "Accepted"})

    migrate_to_head(url)
    app = create_app({"ENV": "development", "DATABASE_URL": url, "HUEY_IMMEDIATE": True, "HUEY_PATH": str(tmp / "huey.db"), "LOG_LEVEL": "WARNING"})
    factory = app.extensions["db_sessionmaker"]
    with app.app_context(), factory() as s:
        created = seed(s, password_factory=lambda: secrets.token_urlsafe(16))
        driver = s.scalar(select(User).where(User.email == "driver@example.com"))
        for charger in s.scalars(select(Charger)):
            s.add(ChargerConnection(charger_id=charger.id, gateway_url="http://gateway.invalid", connection_id=f"bench-{charger.id}"))
            charger.last_seen_at = utcnow()
        for connector in s.scalars(select(Connector)):
            connector.status = "Available"
        transfer(s, idempotency_key="bench:top-up", description="bench", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, driver.owner, "EUR"), amount=Money(50_00, "EUR"))
        secret = TOKEN_PREFIX + new_secret()  # made and stored the way POST /api/v1/auth/token does
        s.add(ApiToken(user_id=driver.id, token_hash=digest(secret), name="bench", expires_at=utcnow() + dt.timedelta(days=1)))
        s.commit()
        assert created and CONNECTOR in created["connectors"], "the demo data has no connector " + CONNECTOR

        now = utcnow()  # after the seed: its tariffs are in force from the moment they were added

        connector = s.scalar(select(Connector).where(Connector.connector_code == SESSION_CONNECTOR))
        req = service.StartRequest(connector=connector, user=driver, email=driver.email, payment_kind=PaymentKind.WALLET)
        cs = service.start_session(s, None, AcceptingGateway(), req, now=now).session
        charger = connector.charger
        t0 = now - dt.timedelta(minutes=20)
        service.start_transaction(s, charger, connector_number=connector.number, id_tag=cs.id_tag, meter_start_wh=Decimal(1000), timestamp=t0, now=now)
        connector.status = "Charging"
        readings = [service.Reading(t0 + dt.timedelta(minutes=m), Decimal(1000 + m * 11000 // 60), Decimal(11000)) for m in range(1, 21)]
        service.meter_values(s, charger, connector_number=connector.number, transaction_id=cs.transaction_id, readings=readings, now=now)
        s.commit()
        if cs.state != SessionState.CHARGING:
            raise SystemExit(f"the benchmark's session did not start charging: {cs.state} ({cs.failure_code})")
        return cs.id, secret


class Server:
    """gunicorn serving ``app_spec`` on a free port, its output in ``log``."""

    def __init__(self, app_spec: str, gunicorn_args: list[str], env: dict[str, str], log: Path, ready_path: str):
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--chdir", str(ROOT), *gunicorn_args, app_spec]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url(ready_path), timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"gunicorn {app_spec} did not start:\n{self.tail()}") from None
                time.sleep(0.2)

    def url(self, path: str) -> str:
        """The address of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def tail(self, n: int = 30) -> str:
        """The last lines gunicorn wrote."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def cpu_seconds(self) -> float:
        """CPU time used so far by the gunicorn master and its workers (0 where /proc is missing)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if entry.name == str(self.proc.pid) or fields[1] == str(self.proc.pid):
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def stop(self) -> None:
        """Stop gunicorn (graceful, then killed after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * _UNIT_MS[unit]


def check(server: Server, path: str, headers: dict[str, str]) -> None:
    """Fail unless ``path`` answers 200 (a missing route or a 429 must not be measured as fast)."""
    req = urllib.request.Request(server.url(path), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status == 200:
                return
            status, body = resp.status, resp.read(300)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read(300)
    raise SystemExit(f"GET {path} answered {status}, not 200: {body!r}\n{server.tail(10)}")


def wrk(server: Server, path: str, headers: dict[str, str], *, seconds: float, connections: int) -> Result:
    """Load ``path`` with wrk for ``seconds`` after a 2-second warm-up; return its rate and latencies."""
    check(server, path, headers)
    cmd = ["wrk", "--threads", "1", "--connections", str(connections), "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    subprocess.run([*cmd, "--duration", "2s", server.url(path)], check=True, capture_output=True)  # warm-up: lazy imports, templates, caches
    before_client = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_server, start = server.cpu_seconds(), time.perf_counter()
    out = subprocess.run([*cmd, "--duration", f"{seconds:g}s", server.url(path)], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    after_client, server_cpu = resource.getrusage(resource.RUSAGE_CHILDREN), server.cpu_seconds() - before_server
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    if bad or errors:
        raise SystemExit(f"wrk on {path}: {bad.group(0) if bad else errors.group(0)}\n{out}\n{server.tail(10)}")
    client_cpu = (after_client.ru_utime + after_client.ru_stime) - (before_client.ru_utime + before_client.ru_stime)
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        requests=int(re.search(r"(\d+) requests in", out).group(1)),
        client_cpu=client_cpu / wall,
        server_cpu=server_cpu / wall,
    )


def _median(results: list[Result]) -> Result:
    """The run with the median rate (its latencies and CPU with it)."""
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def line(label: str, r: Result, baseline: Result | None = None) -> str:
    """One result as a table row, with the ratio to the baseline when given."""
    ratio = f"   ratio {r.rps / baseline.rps:5.2f}" if baseline else " " * 14
    return (f"{label:<34} {r.rps:8.0f} req/s   p50 {r.p50_ms:7.1f} ms   p99 {r.p99_ms:7.1f} ms{ratio}"
            f"   CPU server {r.server_cpu:4.0%} client {r.client_cpu:4.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per case (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of the bare app and the connector page, alternately; medians compared (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (default 1; see above)")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker (default 4)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/http_load.py needs wrk: apt-get install wrk (Debian, Ubuntu) or brew install wrk (macOS)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below when stopped

    gunicorn_args = ["--workers", str(args.workers), "--worker-class", "gthread", "--threads", str(args.threads), "--no-control-socket"]
    tmp = Path(tempfile.mkdtemp(prefix="voltpay-bench-http-"))
    servers: list[Server] = []
    try:
        url = f"sqlite:///{tmp / 'bench.db'}"
        env = {**os.environ, "VOLTPAY_ENV": "development", "VOLTPAY_DATABASE_URL": url, "VOLTPAY_HUEY_PATH": str(tmp / "huey.db"),
               "VOLTPAY_LOG_LEVEL": "INFO"}
        session_id, token = prepare_database(url, tmp)
        print(f"gunicorn {' '.join(gunicorn_args)}; wrk --threads 1 --connections {args.connections} --duration {args.seconds:g}s; "
              f"{os.cpu_count()} CPUs shared by server and client")

        hello = Server(HELLO_APP, gunicorn_args, env, tmp / "hello.log", "/")
        servers.append(hello)
        voltpay = Server(VOLTPAY_APP, gunicorn_args, env, tmp / "voltpay.log", "/healthz")
        servers.append(voltpay)
        # Rounds, the bare app and the connector page alternately (the idle server waits without using the CPU);
        # the median of each is compared, so a hiccup of the machine during one run does not decide the ratio.
        bases, pages = [], []
        for _round in range(args.rounds):
            bases.append(wrk(hello, "/", {}, seconds=args.seconds, connections=args.connections))
            pages.append(wrk(voltpay, f"/c/{CONNECTOR}", {"Accept": "text/html", "Accept-Language": "en"},
                             seconds=args.seconds, connections=args.connections))
        baseline, page = _median(bases), _median(pages)
        print(line("baseline  bare Flask hello", baseline))
        print(line(f"voltpay   connector page /c/{CONNECTOR}", page, baseline))
        api = wrk(voltpay, f"/api/v1/sessions/{session_id}", {"Accept": "application/json", "Authorization": f"Bearer {token}"},
                  seconds=args.seconds, connections=args.connections)
        print(line("voltpay   GET /api/v1/sessions/{id}", api, baseline))
        ratio = page.rps / baseline.rps
        rounds = ", ".join(f"{p.rps / b.rps:.2f}" for b, p in zip(bases, pages, strict=True))
        print(f"connector page ratio ≥ 0.5: {'met' if ratio >= 0.5 else 'not met'} ({ratio:.2f}; the rounds: {rounds})")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
