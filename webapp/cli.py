"""``flask --app wsgi <command>``: migrate, create-admin, seed-demo, worker."""

from __future__ import annotations

import secrets
from pathlib import Path

import click
from flask import Flask, current_app
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str):
    """Alembic configuration for ``url`` using the repository's migrations folder."""
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate_to_head(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def register(app: Flask) -> None:
    """Add the commands to ``app.cli``."""

    @app.cli.command("migrate")
    @click.option("--revision", default="head", help="Target revision (default: head).")
    def migrate(revision: str) -> None:
        """Apply database migrations."""
        from alembic import command

        command.upgrade(alembic_config(current_app.config["DATABASE_URL"]), revision)
        click.echo(f"database at {revision}")

    @app.cli.command("create-admin")
    @click.argument("email")
    @click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
    def create_admin(email: str, password: str) -> None:
        """Create an admin account (or make an existing account admin)."""
        from email_validator import EmailNotValidError, validate_email

        from webapp.auth.passwords import hash_password, password_problems
        from webapp.db import session_factory, utcnow
        from webapp.models import Role, User

        email = email.strip().lower()
        try:
            validate_email(email, check_deliverability=False)
        except EmailNotValidError as e:
            raise click.ClickException(f"{email!r} is not an email address: {e}") from None
        problems = password_problems(password, email)
        if problems:
            raise click.ClickException(" ".join(problems))
        with session_factory().begin() as s:
            user = s.scalar(select(User).where(User.email == email))
            if user is None:
                user = User(email=email)
                s.add(user)
            elif user.password_hash:
                user.session_version += 1  # a new password signs out the account's other sessions
            user.password_hash = hash_password(password)
            user.role = Role.ADMIN
            user.email_verified_at = user.email_verified_at or utcnow()
        click.echo(f"admin {email} ready")

    @app.cli.command("seed-demo")
    def seed_demo() -> None:
        """Fill an empty database with the demo operator, site, chargers, meters, driver and tenant."""
        from webapp.db import session_factory
        from webapp.seed import seed

        with session_factory().begin() as s:
            created = seed(s, password_factory=_demo_password)
        if not created:
            click.echo("demo data already present; nothing changed")
            return
        click.echo("\nVoltpay demo is seeded. Accounts (passwords shown once):")
        _echo_demo(created, current_app.config["BASE_URL"])

    @app.cli.command("worker")
    @click.option("--workers", default=2, show_default=True, help="Worker threads.")
    def worker(workers: int) -> None:
        """Run the background job worker (Huey consumer)."""
        from webapp.tasks import run_worker

        run_worker(workers=workers)

    _demo_command(app)
    from webapp.chargers import cli as charger_cli  # gateway, simulate

    charger_cli.register(app)


def _demo_password() -> str:
    """A random password for a demo account that the password rules accept."""
    from webapp.auth.passwords import password_problems

    while True:
        password = secrets.token_urlsafe(12)
        if not password_problems(password):
            return password


def _echo_demo(created: dict, base_url: str) -> None:
    """Print the demo accounts with their passwords, the pages to open and the codes to try."""
    base = base_url.rstrip("/")
    for role, email, password in created["accounts"]:
        click.echo(f"  {role:<10} {email:<28} {password}")
    click.echo(f"\nOpen {base}/ in a phone-sized window: sign in at {base}/auth/sign-in, or sign up at {base}/auth/sign-up with any address.")
    click.echo("Connector codes: " + ", ".join(created["connectors"]))
    click.echo("Meter codes:     " + ", ".join(created["meters"]))


DEMO_CARDS = (
    ("4242 4242 4242 4242", "pays"),
    ("4000 0000 0000 0341", "is declined when charged"),
    ("4000 0025 0000 3155", "asks for 3-D Secure (a dialog: complete or fail it)"),
)


def _demo_stripe_env(stripe_url: str) -> dict[str, str]:
    """VOLTPAY_STRIPE_* for the demo's processes: test keys, localstripe's API and stripe.js, a fresh webhook secret."""
    return {
        "VOLTPAY_STRIPE_SECRET_KEY": "sk_test_voltpay_demo",
        "VOLTPAY_STRIPE_PUBLISHABLE_KEY": "pk_test_voltpay_demo",
        "VOLTPAY_STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(16),
        "VOLTPAY_STRIPE_API_BASE": stripe_url,
        "VOLTPAY_STRIPE_JS_URL": stripe_url + "/js.stripe.com/v3/",
        "VOLTPAY_STRIPE_LOCALSTRIPE": "1",
    }


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url: str, proc, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers (any HTTP status) or ``proc`` exits; raise ClickException on either failure."""
    import threading
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None:
                raise click.ClickException(f"{url} did not come up: its process exited (code {proc.returncode})") from None
            if time.monotonic() > deadline:
                raise click.ClickException(f"{url} did not answer within {timeout:.0f} s") from None
            pause.wait(0.1)


def _interrupt(*_args) -> None:
    """Turn SIGINT and SIGTERM into the same clean shutdown (even where SIGINT was inherited as ignored)."""
    raise KeyboardInterrupt


def _demo_command(app: Flask) -> None:
    @app.cli.command("demo")
    @click.option("--port", default=8000, show_default=True, help="Port of the web server.")
    @click.option("--web-workers", default=2, show_default=True, help="Gunicorn worker processes.")
    def demo(port: int, web_workers: int) -> None:
        """Run the whole demo on this machine: migrate, seed, localstripe, worker, charger gateway, two simulated chargers and the web server (Ctrl-C stops all)."""
        import os
        import signal
        import subprocess
        import sys
        import time

        from webapp.db import session_factory
        from webapp.devtools import localstripe_server
        from webapp.seed import reset_demo_passwords, seed

        base = f"http://127.0.0.1:{port}"
        current_app.config["BASE_URL"] = base
        migrate_to_head(current_app.config["DATABASE_URL"])
        env = dict(os.environ, VOLTPAY_ENV=os.environ.get("VOLTPAY_ENV", "development"), VOLTPAY_BASE_URL=base)
        gunicorn = ["--bind", f"127.0.0.1:{port}", "--workers", str(web_workers), "--threads", "4", "--graceful-timeout", "5", "--access-logfile", "-", "--no-control-socket"]
        # The charger gateway on free ports (a second demo on the same machine must not collide), and the
        # two demo chargers simulated with the same OCPP library, connecting to it over real websockets.
        ocpp_port, internal_port = _free_port(), _free_port()
        env.update(
            VOLTPAY_GATEWAY_HOST="127.0.0.1", VOLTPAY_GATEWAY_PORT=str(ocpp_port),
            VOLTPAY_GATEWAY_INTERNAL_HOST="127.0.0.1", VOLTPAY_GATEWAY_INTERNAL_PORT=str(internal_port),
            VOLTPAY_GATEWAY_INTERNAL_URL=f"http://127.0.0.1:{internal_port}",
            VOLTPAY_GATEWAY_SECRET=os.environ.get("VOLTPAY_GATEWAY_SECRET") or secrets.token_urlsafe(32),
        )
        ocpp_url = f"ws://127.0.0.1:{ocpp_port}/ocpp"
        commands = {
            "worker": [sys.executable, "-m", "flask", "--app", "wsgi", "worker"],
            "charger gateway": [sys.executable, "-m", "flask", "--app", "wsgi", "gateway"],
            "web server": [sys.executable, "-m", "gunicorn", *gunicorn, "wsgi:app"],
        }
        simulate = [sys.executable, "-m", "flask", "--app", "wsgi", "simulate", "--url", ocpp_url, "--power-kw", "22",
                    "--plug-in-delay", "3", "--unplug-delay", "20"]
        smtp = current_app.config.get("SMTP_HOST")
        emails = f"Emails go to {smtp}." if smtp else "Emails are printed in this log."
        procs: dict[str, subprocess.Popen] = {}
        try:
            # Ctrl-C reaches the whole process group; SIGTERM (kill, docker stop) reaches only this process.
            # Both end here in KeyboardInterrupt, and the finally block stops every child either way.
            signal.signal(signal.SIGINT, _interrupt)
            signal.signal(signal.SIGTERM, _interrupt)
            # Card payments go to localstripe (in memory, a free port): the web and worker processes need its URL.
            try:
                procs["localstripe"], stripe_url = localstripe_server.start()
            except RuntimeError as e:
                raise click.ClickException(f"{e}; demo stopped") from None
            env.update(_demo_stripe_env(stripe_url))
            localstripe_server.register_webhook(
                stripe_url, "voltpay-demo", target=f"{base}/webhooks/stripe", secret=env["VOLTPAY_STRIPE_WEBHOOK_SECRET"],
            )
            for name, argv in commands.items():  # they boot while the demo data is written
                procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env)
            with session_factory().begin() as s:
                created = seed(s, password_factory=_demo_password)
                # Passwords are stored hashed: on a later start, new ones are the only way to show them again.
                fresh = created is not None
                created = created or reset_demo_passwords(s, password_factory=_demo_password)
            # The chargers connect once their passwords and the gateway are there.
            _wait_for_http(f"http://127.0.0.1:{internal_port}/healthz", procs["charger gateway"])
            procs["simulated chargers"] = subprocess.Popen(simulate, cwd=ROOT, env=env)
            click.echo("\nVoltpay demo accounts" + ("" if fresh else " (demo data kept, passwords renewed)") + ":")
            _echo_demo(created, base)
            click.echo(f"\nCard payments go to localstripe at {stripe_url} (a test double of Stripe; no real money). Test cards,")
            click.echo("with any future expiry (month, two-digit year such as 30), any CVC and any postal code:")
            for number, what in DEMO_CARDS:
                click.echo(f"  {number}  {what}")
            click.echo(f"\nChargers DEMO-CP-1 and DEMO-CP-2 are simulated and connected to the gateway at {ocpp_url}:")
            click.echo(f"open {base}/c/D101 (or scan a code from {base}/sites/1/qr-sheet as the operator), pay as a guest or from")
            click.echo("the driver's wallet, and the simulated car plugs in three seconds later and charges at 22 kW.")
            click.echo(f"\nVoltpay demo running at {base}/ (health: {base}/healthz, wallet: {base}/wallet). {emails} Ctrl-C stops.\n")
            while True:  # block until a child exits; Ctrl-C and SIGTERM interrupt the wait
                pid, status = os.wait()
                for name, p in procs.items():
                    if p.pid == pid:
                        p.returncode = os.waitstatus_to_exitcode(status)
                        raise click.ClickException(f"the {name} exited (code {p.returncode}); demo stopped")
        except KeyboardInterrupt:
            click.echo("\nStopping the demo…")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the shutdown finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 10
            for p in procs.values():
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if p.stdout is not None:
                    p.stdout.close()
