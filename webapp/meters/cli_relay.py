"""``flask --app wsgi meters emergency-credit`` and ``meters relay-retry``: the operator's relay commands.

They join the ``meters`` command group if another module registered it
first, else they bring the group with them.
"""

from __future__ import annotations

import getpass

import click
from flask import Flask
from flask.cli import AppGroup

meters_group = AppGroup("meters", help="Prepaid and post-paid electricity meters.")


@meters_group.command("emergency-credit")
@click.option("--tenant-id", type=int, required=True, help="The tenant (tenants.id).")
@click.option("--amount", required=True, help="How far below zero the tenant's prepaid meters may go, e.g. 5.00; 0 removes it.")
@click.option("--by", default=None, help="Who decided it (logged); default: the system user running the command.")
def emergency_credit(tenant_id: int, amount: str, by: str | None) -> None:
    """Set a tenant's emergency credit (validated against METER_EMERGENCY_CREDIT_MAX_MINOR) and apply the relay rules."""
    from webapp.db import session_factory
    from webapp.meters.models import Tenant
    from webapp.meters.relay import EmergencyCreditError, parse_amount, set_emergency_credit

    with session_factory().begin() as s:
        tenant = s.get(Tenant, tenant_id)
        if tenant is None:
            raise click.ClickException(f"no tenant {tenant_id}")
        try:
            money = parse_amount(amount, tenant.currency)
            set_emergency_credit(s, tenant, money, by or f"cli:{getpass.getuser()}")
        except EmergencyCreditError as e:
            raise click.ClickException(str(e)) from None
    click.echo(f"tenant {tenant_id}: emergency credit {money}")


@meters_group.command("relay-retry")
@click.option("--command-id", type=int, required=True, help="A failed relay command (relay_commands.id).")
def relay_retry(command_id: int) -> None:
    """Send a failed relay command again (after the collector's webhook was fixed)."""
    from webapp.db import session_factory
    from webapp.meters.jobs import retry

    try:
        with session_factory().begin() as s:
            retry(s, command_id)
    except (LookupError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"relay command {command_id} queued again")


def register(app: Flask) -> None:
    """Add the commands to the app's ``meters`` group (creating it when nobody else did)."""
    group = app.cli.commands.get("meters")
    if group is None:
        app.cli.add_command(meters_group)
        return
    if group is not meters_group:
        for name, command in meters_group.commands.items():
            group.add_command(command, name)
