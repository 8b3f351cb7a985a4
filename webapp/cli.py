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
        from webapp.auth.passwords import hash_password, password_problems
        from webapp.db import session_factory, utcnow
        from webapp.models import Role, User

        email = email.strip().lower()
        problems = password_problems(password, email)
        if problems:
            raise click.ClickException(" ".join(problems))
        with session_factory().begin() as s:
            user = s.scalar(select(User).where(User.email == email))
            if user is None:
                user = User(email=email)
                s.add(user)
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
            created = seed(s, password_factory=lambda: secrets.token_urlsafe(9))
        if not created:
            click.echo("demo data already present; nothing changed")
            return
        base = current_app.config["BASE_URL"].rstrip("/")
        click.echo("\nVoltpay demo is seeded. Accounts (passwords shown once):")
        for role, email, password in created["accounts"]:
            click.echo(f"  {role:<10} {email:<28} {password}")
        click.echo(f"\nOpen {base}/ on your phone-sized window and sign in, or sign up with any address.")
        click.echo("Connector codes: " + ", ".join(created["connectors"]))
        click.echo("Meter codes:     " + ", ".join(created["meters"]))

    @app.cli.command("worker")
    @click.option("--workers", default=2, show_default=True, help="Worker threads.")
    def worker(workers: int) -> None:
        """Run the background job worker (Huey consumer)."""
        from webapp.tasks import run_worker

        run_worker(workers=workers)

    _demo_command(app)


def _interrupt(*_args) -> None:
    """Turn SIGTERM into the same clean shutdown as Ctrl-C."""
    raise KeyboardInterrupt


def _demo_command(app: Flask) -> None:
    @app.cli.command("demo")
    @click.option("--port", default=8000, show_default=True, help="Port of the web server.")
    def demo(port: int) -> None:
        """Run the whole demo on this machine: migrate, seed, worker and web server (Ctrl-C stops all)."""
        import os
        import signal
        import subprocess
        import sys
        import time

        from alembic import command

        command.upgrade(alembic_config(current_app.config["DATABASE_URL"]), "head")
        ctx = click.get_current_context()
        ctx.invoke(app.cli.commands["seed-demo"])
        env = dict(os.environ, VOLTPAY_ENV=os.environ.get("VOLTPAY_ENV", "development"), VOLTPAY_BASE_URL=f"http://127.0.0.1:{port}")
        bindir = Path(sys.executable).parent
        procs = [
            subprocess.Popen([str(bindir / "flask"), "--app", "wsgi", "worker"], cwd=ROOT, env=env),
            subprocess.Popen(
                [str(bindir / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4", "--access-logfile", "-", "wsgi:app"],
                cwd=ROOT,
                env=env,
            ),
        ]
        click.echo(f"\nVoltpay demo running. Open http://127.0.0.1:{port}/ (phone-sized window). Emails are printed in this log. Ctrl-C stops.\n")
        try:
            signal.signal(signal.SIGTERM, _interrupt)
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
