"""1,000 simulated chargers sending MeterValues every 10 s to one OCPP gateway: CPU, memory, and the RemoteStart round trip.

The gateway runs as it does in production, ``flask --app wsgi gateway`` in a
process of its own, on a fresh database (SQLite in a temporary folder, or a
private PostgreSQL database with ``--database-url``). The simulated chargers
(``webapp.chargers.simulator.run_fleet``) run in a second process
(``bench/apps/fleet.py``), and 20 idle probe chargers in a third, so the
fleet's figures are its own. Every charger has one connector with a simple
energy tariff, and its site has ``meter_sample_interval_s = 10``, which the
gateway sends as MeterValueSampleInterval at boot.

The simulator sends MeterValues only during a transaction, so each fleet
charger gets a session the way a driver's wallet start makes one (opened, the
hold placed: state ``authorized``), and the benchmark sends its
RemoteStartTransaction through the gateway's internal endpoint (``POST
/cp/<id>/call``, 16 threads); the simulated car plugs in after 1 s and the
charger sends Authorize, StartTransaction and then MeterValues every 10 s.

Measured, in this order:

* the baseline: the RemoteStart round trip (POST to the internal endpoint →
  gateway → charger → answer) to idle probe chargers with no other charger
  connected, over a keep-alive connection (as ``GatewayClient``'s
  ``requests.Session``) and over a new connection per call, alternately; the
  probes never plug a car in, so they stay idle;
* connect+boot time of the fleet (from the fleet process's start, after its
  imports, until every charger has booted and reported its connector status,
  as the database sees it), and the bulk RemoteStart rate;
* over a steady window (``--seconds``, default 60) with every fleet charger
  charging: CPU (100 % = one core) and RSS of the gateway and of the fleet,
  MeterValues per second stored (``session_samples`` rows and logged
  messages; a MeterValues the charger sent again after a timeout is logged
  twice but stored once), the gateway's CPU per message handled, and the same
  RemoteStart round trips to the probes, spread over the window; their ratio
  to the baseline is the figure to watch. Other processes on the machine
  (this script, the probes, anything else) are shown as the machine's CPU
  minus the gateway's and the fleet's.

When the gateway cannot keep up, chargers time out (10 s) and send again or
reconnect after a growing, jittered pause, giving up a start only after
several attempts; the run goes on with what booted and started (waiting stops
when the count has not grown for 15 s) and says so.

Charger passwords: one password is hashed once and the hash is stored for
every charger; the gateway verifies it (Argon2id) on every connect. By default
the hash has the test suite's cheap parameters (``--argon2 fast``), so the
default run fits in about 3 minutes; ``--argon2 production`` stores a hash with
the real parameters, and the connect storm then costs what it would after a
gateway restart (the run prints the CPU one such verify takes either way).

    .venv/bin/python bench/gateway.py [--chargers 1000] [--seconds 60] [--calls 20] [--probes 20] [--argon2 fast|production]
                                      [--ramp CONNECTS_PER_S] [--start-rate STARTS_PER_S] [--logs DIR]
                                      [--database-url postgresql+psycopg://user@host/any]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for webapp and payments, imported once the database is made

FLEET_RUNNER = ROOT / "bench" / "apps" / "fleet.py"
SAMPLE_INTERVAL_S = 10
PLUG_IN_DELAY_S = 1.0
BULK_THREADS = 16
CHARGER_PASSWORD = "bench-charger-secret"
FLEET_PREFIX, PROBE_PREFIX = "BENCH-CP-", "BENCH-PROBE-"
TARIFF = """{"id": "BENCH", "currency": "EUR", "type": "AD_HOC_PAYMENT",
  "elements": [{"price_components": [{"type": "ENERGY", "price": 0.35, "vat": 21.0, "step_size": 1}]}]}"""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- processes as /proc sees them


class Proc:
    """A child process started in its own session, its output in ``log``."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        """Still running."""
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (its threads included)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kib(self) -> tuple[int, int]:
        """(RSS now, peak RSS) in KiB."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def tail(self, n: int = 20) -> str:
        """The last lines it wrote."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def problems(self) -> int:
        """Lines of its output that report an error."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if '"ERROR"' in line or "Traceback" in line or line.startswith("ERROR"))

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (each process here stops cleanly on it), then SIGKILL to its whole group after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the process and anything it left behind
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


@dataclass
class Usage:
    """CPU and memory of one process over a window."""

    cpu: float  # share of one core
    rss_kib: int  # at the end of the window
    max_rss_kib: int  # the most seen during the window


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, every process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class UsageWatch:
    """Samples the RSS of some processes every half second while a window runs; CPU from the start and end."""

    def __init__(self, procs: list[Proc]):
        self.procs = procs
        self.max_rss = {p.name: 0 for p in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> UsageWatch:
        self.t0 = time.perf_counter()
        self.cpu0 = {p.name: p.cpu_seconds() for p in self.procs}
        self.machine0 = machine_cpu_seconds()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for p in self.procs:
                self.max_rss[p.name] = max(self.max_rss[p.name], p.memory_kib()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self.t0
        self.machine = (machine_cpu_seconds() - self.machine0) / wall  # busy cores
        self.result = {}
        for p in self.procs:
            rss = p.memory_kib()[0]
            self.result[p.name] = Usage((p.cpu_seconds() - self.cpu0[p.name]) / wall, rss, max(rss, self.max_rss[p.name]))


# --------------------------------------------------------------------------- the gateway's internal endpoint


class Internal:
    """HTTP/1.1 client of the gateway's internal endpoint: a keep-alive connection per thread, as ``GatewayClient``'s
    ``requests.Session`` keeps, or a fresh connection per call."""

    def __init__(self, port: int, secret: str):
        self.port, self.secret = port, secret
        self._local = threading.local()

    def call(self, cp_id: str, action: str, payload: dict, session_id: int | None = None, *, fresh: bool = False) -> tuple[int, dict, float]:
        """POST ``/cp/<cp_id>/call``; return (HTTP status, body, seconds from sending to the whole answer)."""
        body = json.dumps({"action": action, "payload": payload, **({"session_id": session_id} if session_id else {})}).encode()
        headers = {"Content-Type": "application/json", "X-Voltpay-Gateway-Secret": self.secret}
        for attempt in (1, 2):
            conn = None if fresh else getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if not fresh:
                    self._local.conn = conn
            try:
                t0 = time.perf_counter()
                conn.request("POST", f"/cp/{cp_id}/call", body, headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, json.loads(data or b"{}"), time.perf_counter() - t0
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
            finally:
                if fresh:
                    conn.close()
        raise AssertionError("unreachable")


@dataclass
class RoundTrips:
    """RemoteStart round trips to the probes, over a keep-alive connection and over a fresh connection each."""

    keep: list[float] = field(default_factory=list)  # ms
    fresh: list[float] = field(default_factory=list)  # ms
    not_accepted: int = 0


def median(ms: list[float]) -> float:
    return statistics.median(ms)


def p95(ms: list[float]) -> float:
    ordered = sorted(ms)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def probe_round_trips(internal: Internal, probes: list[str], calls: int, *, spread_over: float = 0.0, warm_up: int = 0) -> RoundTrips:
    """``calls`` pairs of RemoteStartTransactions (keep-alive, then fresh connection), one at a time, round robin over the idle
    probes, the pairs evenly spaced over ``spread_over`` seconds."""
    out = RoundTrips()
    pause = spread_over / calls if spread_over else 0.05
    for i in range(warm_up + calls):
        t_next = time.perf_counter() + pause
        for fresh, into in ((False, out.keep), (True, out.fresh)):
            cp_id = probes[(2 * i + fresh) % len(probes)]
            status, body, seconds = internal.call(cp_id, "RemoteStartTransaction", {"connector_id": 1, "id_tag": f"PROBE{secrets.token_hex(6).upper()}"},
                                                  fresh=fresh)
            if i >= warm_up:
                into.append(seconds * 1000)
                if status != 200 or body.get("status") != "Accepted":
                    out.not_accepted += 1
        time.sleep(max(0.0, t_next - time.perf_counter()))
    return out


def round_trip_lines(label: str, r: RoundTrips, baseline: RoundTrips | None = None) -> str:
    """The keep-alive and fresh-connection figures of one measurement, with the ratio of the medians to the baseline."""
    lines = []
    for kind, ms, base in (("keep-alive", r.keep, baseline.keep if baseline else None), ("new conn", r.fresh, baseline.fresh if baseline else None)):
        ratio = f"   ratio (median) {median(ms) / median(base):5.2f}" if base else ""
        lines.append(f"{label} {kind:<10} median {median(ms):6.1f} ms   p95 {p95(ms):6.1f} ms   max {max(ms):6.1f} ms{ratio}")
    if r.not_accepted:
        lines.append(f"  {r.not_accepted} of {2 * len(r.keep)} calls not accepted")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the database


def private_postgres(server_url: str) -> tuple[str, callable]:
    """A new empty database on the server of ``server_url`` (its own database name is not touched); return its URL and a dropper."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(server_url)
    if not base.drivername.startswith("postgresql"):
        raise SystemExit("--database-url must be a PostgreSQL URL (postgresql+psycopg://user@host:5432/any)")
    name = f"voltpay_bench_gateway_{secrets.token_hex(4)}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return base.set(database=name).render_as_string(hide_password=False), drop


@dataclass
class Made:
    """What ``prepare_database`` made."""

    fleet: list[tuple[str, int, str]]  # (charge point id, authorized session id, its idTag)
    probes: list[str]
    hash_note: str
    verify_ms_cpu: float  # CPU time of one verify of the stored hash


def prepare_database(app, n: int, n_probes: int, argon2: str) -> Made:
    """An operator, a site sampling every 10 s, ``n`` + ``n_probes`` chargers of one connector each with a tariff, a driver with
    a funded wallet, and an authorized session (hold placed) on every fleet connector."""
    from webapp.models import Charger, Connector, Operator, Role, Site, User  # first: importing webapp.api before webapp.models is circular
    from payments import wallet
    from payments.ledger import AccountKind, get_account, transfer
    from payments.money import Money
    from payments.tariff_store import add_version, connector_owner
    from webapp.auth import passwords
    from webapp.charging import service
    from webapp.charging.models import PaymentKind, SessionState
    from webapp.db import utcnow

    if argon2 == "fast":
        passwords.use_fast_parameters_for_tests()
    password_hash = passwords.hash_password(CHARGER_PASSWORD)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(3):
        assert passwords.verify_password(password_hash, CHARGER_PASSWORD)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    verify_ms = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / 3 * 1000
    params = password_hash.split("$")[3]
    hash_note = (f"one password hashed once ({'the test suite fast' if argon2 == 'fast' else 'production'} Argon2id parameters "
                 f"{params}), the hash stored for every charger; the gateway verifies it on every connect")

    factory = app.extensions["db_sessionmaker"]
    with app.app_context(), factory() as s:
        op = Operator(name="Bench Energy", legal_name="Bench Energy S.L.", address="Calle Mayor 1, Madrid", vat_id="ESB00000000")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Bench car park", address="Plaza Mayor 3, Madrid", time_zone="Europe/Madrid", currency="EUR",
                    meter_sample_interval_s=SAMPLE_INTERVAL_S)
        s.add(site)
        s.flush()
        ids = [f"{FLEET_PREFIX}{i:05d}" for i in range(1, n + 1)] + [f"{PROBE_PREFIX}{i:03d}" for i in range(1, n_probes + 1)]
        chargers = [Charger(site_id=site.id, charge_point_id=cp_id, password_hash=password_hash, vendor="Voltpay", model="Sim-22") for cp_id in ids]
        s.add_all(chargers)
        s.flush()
        connectors = [Connector(charger_id=c.id, number=1, connector_code=f"B{i:05d}", max_power_kw=22) for i, c in enumerate(chargers, 1)]
        s.add_all(connectors)
        s.flush()
        now = utcnow()
        for connector in connectors:
            add_version(s, connector_owner(connector.id), TARIFF, site_currency="EUR", created_by="bench", now=now)
        driver = User(email="bench-driver@example.com", password_hash=password_hash, role=Role.CUSTOMER, email_verified_at=now, locale="en")
        s.add(driver)
        s.flush()
        now = utcnow()  # after the tariffs: they are in force from the moment they were added
        q = service.quote(s, connectors[0], now=now)
        transfer(s, idempotency_key="bench:top-up", description="bench", debit=get_account(s, AccountKind.PROVIDER_CLEARING, "EUR"),
                 credit=wallet.wallet(s, driver.owner, "EUR"), amount=Money(q.hold.amount * (n + 1), "EUR"))
        fleet = []
        for charger, connector in zip(chargers[:n], connectors[:n], strict=True):
            cs, _ = service.open_session(s, connector=connector, user=driver, email=driver.email, payment_kind=PaymentKind.WALLET,
                                         q=service.quote(s, connector, now=now), now=now)
            service.place_wallet_hold(s, cs, now)
            if cs.state != SessionState.AUTHORIZED:
                raise SystemExit(f"the session on {charger.charge_point_id} was not authorized: {cs.state} ({cs.failure_code})")
            fleet.append((charger.charge_point_id, cs.id, cs.id_tag))
        s.commit()
    return Made(fleet, ids[n:], hash_note, verify_ms)


class Db:
    """Counting queries of the benchmark on an engine of its own: plain SQLAlchemy, not the app's, whose SQLite transactions
    begin with BEGIN IMMEDIATE (the write lock) unless declared read-only; here a SELECT is a WAL reader and never waits for,
    or delays, the gateway."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine

        self.engine = create_engine(url, pool_size=1, max_overflow=0)

    def scalar(self, sql: str, **params) -> int:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return int(c.scalar(text(sql), params) or 0)

    def booted(self, prefix: str) -> int:
        """Chargers of ``prefix`` that have booted and reported their connector's status."""
        return self.scalar("SELECT count(*) FROM connectors JOIN chargers ON chargers.id = connectors.charger_id "
                           "WHERE connectors.status_at IS NOT NULL AND chargers.last_boot_at IS NOT NULL "
                           "AND chargers.charge_point_id LIKE :p", p=prefix + "%")

    def commands_sending(self) -> int:
        """Gateway commands still waiting for an answer (the ChangeConfigurations after each boot)."""
        return self.scalar("SELECT count(*) FROM charge_commands WHERE status = 'sending'")

    def charging(self) -> int:
        return self.scalar("SELECT count(*) FROM charging_sessions WHERE state = 'charging'")

    def meter_samples(self) -> int:
        return self.scalar("SELECT count(*) FROM session_samples WHERE source = 'meter_values'")

    def messages_in(self) -> int:
        """Every message logged as received: the chargers' requests and their answers to commands."""
        return self.scalar("SELECT count(*) FROM ocpp_messages WHERE direction = 'in'")

    def meter_messages(self) -> int:
        return self.scalar("SELECT count(*) FROM ocpp_messages WHERE action = 'MeterValues' AND direction = 'in'")


def wait_for(what: str, check, timeout: float, procs: list[Proc], every: float = 0.25) -> float:
    """Poll ``check()`` until true; return the seconds it took. Fails on a timeout or a dead process."""
    t0 = time.perf_counter()
    while not check():
        for p in procs:
            if not p.alive():
                raise SystemExit(f"{p.name} stopped while waiting for {what}:\n{p.tail()}")
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}\n" + "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in procs))
        time.sleep(every)
    return time.perf_counter() - t0


def wait_progress(count, target: int, procs: list[Proc], *, stall: float, cap: float, every: float = 0.25) -> tuple[int, float]:
    """Poll ``count()`` until it reaches ``target``, stops growing for ``stall`` seconds, or ``cap`` seconds pass;
    return the last count and the seconds until it was first reached."""
    t0 = time.perf_counter()
    last, last_change = count(), time.perf_counter()
    while last < target:
        now = time.perf_counter()
        if now - last_change > stall or now - t0 > cap:
            break
        for p in procs:
            if not p.alive():
                raise SystemExit(f"{p.name} stopped:\n{p.tail()}")
        time.sleep(every)
        n = count()
        if n != last:
            last, last_change = n, time.perf_counter()
    return last, last_change - t0


def start_fleet(name: str, tmp: Path, env: dict[str, str], ws_url: str, cp_ids: list[str], options: dict, procs: list[Proc],
                ramp: int = 0) -> tuple[Proc, Path]:
    """Start ``bench/apps/fleet.py`` for ``cp_ids``; return it and the file it writes once its imports are done."""
    started = tmp / f"{name}.started"
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"url": ws_url, "chargers": [[cp, CHARGER_PASSWORD] for cp in cp_ids], "options": options,
                                "ramp": ramp, "started": str(started)}))
    p = Proc(name, [sys.executable, str(FLEET_RUNNER), str(spec)], env, tmp / f"{name}.log")
    procs.append(p)
    return p, started


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=1000, help="simulated chargers sending MeterValues (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="the steady window in seconds (default 60)")
    parser.add_argument("--calls", type=int, default=20, help="RemoteStart round trips measured, with and without the fleet (default 20)")
    parser.add_argument("--probes", type=int, default=20, help="idle probe chargers the round trips go to (default 20)")
    parser.add_argument("--argon2", choices=("fast", "production"), default="fast",
                        help="parameters of the chargers' stored password hash (default fast: see the docstring)")
    parser.add_argument("--ramp", type=int, default=0, help="fleet chargers connecting per second (default 0: all at once, "
                                                             "as after a gateway restart)")
    parser.add_argument("--start-rate", type=float, default=0, help="RemoteStarts per second for the fleet's sessions "
                                                                    f"(default 0: as fast as {BULK_THREADS} threads go)")
    parser.add_argument("--logs", type=Path, help="copy the gateway's, the fleet's and the probes' output to this folder at the end")
    parser.add_argument("--database-url", help="a PostgreSQL server (postgresql+psycopg://user@host:5432/any): a private database "
                                               "is created there and dropped afterwards; default: SQLite in a temporary folder")
    args = parser.parse_args()
    if args.chargers < 1 or args.probes < 1 or args.calls < 1:
        parser.error("--chargers, --probes and --calls must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below when stopped
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C too, even when started where SIGINT was ignored

    tmp = Path(tempfile.mkdtemp(prefix="voltpay-bench-gateway-"))
    procs: list[Proc] = []
    drop_database = None
    try:
        if args.database_url:
            url, drop_database = private_postgres(args.database_url)
        else:
            url = f"sqlite:///{tmp / 'bench.db'}"
        from webapp import create_app
        from webapp.cli import migrate_to_head

        t = time.perf_counter()
        migrate_to_head(url)
        app = create_app({"ENV": "development", "DATABASE_URL": url, "HUEY_IMMEDIATE": True, "HUEY_PATH": str(tmp / "huey.db"), "LOG_LEVEL": "WARNING"})
        made = prepare_database(app, args.chargers, args.probes, args.argon2)
        db = Db(url)
        backend = "PostgreSQL (private database)" if args.database_url else "SQLite (WAL)"
        print(f"{args.chargers} chargers + {args.probes} idle probes, one connector each; MeterValues every {SAMPLE_INTERVAL_S} s; "
              f"{backend}; {os.cpu_count()} CPUs shared by gateway, fleet, probes and this script; database ready in {time.perf_counter() - t:.1f} s")
        print(f"passwords: {made.hash_note}: {made.verify_ms_cpu:.1f} ms CPU per verify "
              f"(x {args.chargers} = {made.verify_ms_cpu * args.chargers / 1000:.1f} CPU-s for the whole fleet to connect)")

        secret = secrets.token_urlsafe(32)
        ws_port, internal_port = free_port(), free_port()
        env = {**os.environ, "VOLTPAY_ENV": "development", "VOLTPAY_DATABASE_URL": url, "VOLTPAY_HUEY_PATH": str(tmp / "huey.db"),
               "VOLTPAY_LOG_LEVEL": "INFO", "VOLTPAY_GATEWAY_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        gateway = Proc("gateway", [sys.executable, "-m", "flask", "--app", "wsgi", "gateway", "--host", "127.0.0.1", "--port", str(ws_port),
                                   "--internal-host", "127.0.0.1", "--internal-port", str(internal_port)], env, tmp / "gateway.log")
        procs.append(gateway)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{internal_port}/healthz", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for("the gateway to listen", healthy, 60, procs)
        ws_url = f"ws://127.0.0.1:{ws_port}/ocpp"
        internal = Internal(internal_port, secret)
        gw_idle_rss = gateway.memory_kib()[0]

        # Probes: never plug a car in (plug_in_delay None), so every RemoteStart finds them idle and nothing else follows.
        _probe_proc, _ = start_fleet("probes", tmp, env, ws_url, made.probes, {"connectors": 1, "plug_in_delay": None}, procs)
        wait_for("the probes to boot", lambda: db.booted(PROBE_PREFIX) == args.probes, 60, procs)
        wait_for("the probes' boot configuration", lambda: db.commands_sending() == 0, 60, procs)
        gw_probes_rss = gateway.memory_kib()[0]
        baseline = probe_round_trips(internal, made.probes, args.calls, warm_up=3)
        print(f"gateway idle: RSS {mib(gw_idle_rss)} (with the {args.probes} probes: {mib(gw_probes_rss)})")
        print(f"baseline  RemoteStart round trip (POST /cp/<id>/call → gateway → idle charger → answer), 0 background chargers, "
              f"{args.calls} calls each:")
        print(round_trip_lines("  ", baseline))

        fleet_ids = [cp for cp, _, _ in made.fleet]
        fleet, started = start_fleet("fleet", tmp, env, ws_url, fleet_ids, {"connectors": 1, "plug_in_delay": PLUG_IN_DELAY_S}, procs,
                                     ramp=args.ramp)
        wait_for("the fleet runner to start", started.exists, 60, procs, every=0.05)
        fleet_start = json.loads(started.read_text())
        t_started = time.perf_counter() - (time.time() - fleet_start["t"])
        booted, _ = wait_progress(lambda: db.booted(FLEET_PREFIX), args.chargers, procs, stall=15 if args.argon2 == "fast" else 30,
                                  cap=60 + (args.chargers / args.ramp if args.ramp else 0))
        connect_boot = time.perf_counter() - t_started
        wait_progress(lambda: -db.commands_sending(), 0, procs, stall=15, cap=60)  # until no ChangeConfiguration is pending
        print(f"fleet     connect+boot of {booted} of {args.chargers} chargers: {connect_boot:.1f} s "
              f"(fleet process idle RSS {mib(fleet_start['rss_kib'])}, gateway RSS now {mib(gateway.memory_kib()[0])}, "
              f"peak so far {mib(gateway.memory_kib()[1])})")

        t = time.perf_counter()

        def remote_start(item: tuple[int, tuple[str, int, str]]) -> bool:
            n, (cp_id, session_id, id_tag) = item
            if args.start_rate:
                time.sleep(max(0.0, t + n / args.start_rate - time.perf_counter()))
            status, body, _ = internal.call(cp_id, "RemoteStartTransaction", {"connector_id": 1, "id_tag": id_tag}, session_id)
            return status == 200 and body.get("status") == "Accepted"

        with concurrent.futures.ThreadPoolExecutor(BULK_THREADS) as pool:
            accepted = sum(pool.map(remote_start, enumerate(made.fleet)))
        bulk = time.perf_counter() - t
        charging, start_wait = wait_progress(db.charging, args.chargers, procs, stall=15, cap=60)
        print(f"fleet     bulk RemoteStart via HTTP, {BULK_THREADS} threads{f' paced at {args.start_rate:g}/s' if args.start_rate else ''}: "
              f"{args.chargers / bulk:.0f}/s ({accepted} of {args.chargers} accepted); "
              f"{charging} charging {start_wait:.1f} s later")

        time.sleep(SAMPLE_INTERVAL_S + 5)  # every charger has sent MeterValues; the start traffic is over
        samples0, messages0, in0 = db.meter_samples(), db.meter_messages(), db.messages_in()
        with UsageWatch([gateway, fleet]) as watch:
            t = time.perf_counter()
            loaded = probe_round_trips(internal, made.probes, args.calls, spread_over=args.seconds)
            time.sleep(max(0.0, args.seconds - (time.perf_counter() - t)))
            window = time.perf_counter() - t
        samples, messages, handled = db.meter_samples() - samples0, db.meter_messages() - messages0, db.messages_in() - in0
        still = db.charging()
        gw, fl = watch.result["gateway"], watch.result["fleet"]
        per_conn = (gw.rss_kib - gw_probes_rss) / args.chargers
        print(f"steady    {window:.0f} s window, {still} of {args.chargers} sessions charging:")
        print(f"  gateway CPU {gw.cpu:6.1%}   RSS {mib(gw.rss_kib)} (max {mib(gw.max_rss_kib)}; {per_conn:.0f} KiB per charger over idle; "
              f"peak since start {mib(gateway.memory_kib()[1])})")
        print(f"  gateway handled {handled / window:.1f} messages/s, {gw.cpu * window / max(handled, 1) * 1000:.1f} ms CPU each "
              f"(so one core at most ~{handled / max(gw.cpu * window, 1e-9):.0f} messages/s)")
        print(f"  fleet   CPU {fl.cpu:6.1%}   RSS {mib(fl.rss_kib)} (max {mib(fl.max_rss_kib)})")
        print(f"  machine {watch.machine:6.1%} of one core busy in all, {watch.machine - gw.cpu - fl.cpu:6.1%} by other processes "
              f"(this script, the probes, anything else running) out of {os.cpu_count()} cores")
        print(f"  MeterValues stored {samples / window:6.1f}/s (session_samples), logged {messages / window:6.1f}/s (ocpp_messages); "
              f"expected {still / SAMPLE_INTERVAL_S:.1f}/s from {still} charging")
        print(f"voltpay   RemoteStart round trip with {still} background chargers charging ({args.calls} calls each, spread over the window):")
        print(round_trip_lines("  ", loaded, baseline))
        opened = sum(1 for line in gateway.log.read_text(errors="replace").splitlines() if '"connection open"' in line)
        fleet_log = fleet.log.read_text(errors="replace")
        gave_up = fleet_log.count("TimeoutError: Waited")  # a simulated charger's task (the start after RemoteStart) failed
        late = fleet_log.count("unknown unique id")  # an answer came after the charger stopped waiting
        again = fleet_log.count("sends again after a timeout")  # Authorize, StartTransaction or a transaction message sent again
        print(f"  since the start: websocket connections opened {opened} for {args.chargers + args.probes} chargers; fleet: {gave_up} starts "
              f"abandoned after their last 10 s timeout, {again} messages sent again after a timeout, {late} answers arrived too late")
        bad = {p.name: p.problems() for p in procs if p.problems()}
        if bad:
            print("errors logged: " + ", ".join(f"{name} {n}" for name, n in bad.items()) + f" ({'copied to ' + str(args.logs) if args.logs else 'see --logs'})")
            for name in bad:
                print(f"--- {name}\n" + next(p for p in procs if p.name == name).tail(6))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        chargers = [p for p in procs if p.name != "gateway"]
        for p in chargers:  # the fleet and the probes first, so the gateway sees them leave
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        for p in [*chargers, *(p for p in procs if p.name == "gateway")]:
            p.stop()
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for p in procs:
                shutil.copy(p.log, args.logs / p.log.name)
        if drop_database is not None:
            drop_database()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the processes and temporary files are cleaned up")
