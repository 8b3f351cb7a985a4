"""``flask --app wsgi meters create-collector``: a meter data collector and its client secret (printed once).

The commands join the ``meters`` command group if another module registered
it first, else they bring the group with them.
"""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup

meters_group = AppGroup("meters", help="Prepaid and post-paid electricity meters.")


@meters_group.command("create-collector")
@click.option("--operator-id", type=int, required=True, help="The operator whose meters it reads (operators.id).")
@click.option("--name", required=True, help="A name the operator recognises, e.g. the concentrator's location.")
@click.option("--webhook-url", default=None, help="Where relay commands (disconnect, reconnect) are POSTed.")
def create_collector_command(operator_id: int, name: str, webhook_url: str | None) -> None:
    """Create an OAuth2 client for a meter data collector; its secrets are printed once and stored hashed."""
    from webapp.db import session_factory
    from webapp.meters.oauth import create_collector
    from webapp.models import Operator

    if webhook_url and not webhook_url.startswith(("https://", "http://")):
        raise click.ClickException("--webhook-url must be an http(s) URL")
    with session_factory().begin() as s:
        if s.get(Operator, operator_id) is None:
            raise click.ClickException(f"no operator {operator_id}")
        collector, secret = create_collector(s, operator_id, name, webhook_url)
        client_id, webhook_secret = collector.client_id, collector.webhook_secret
    click.echo(f"client_id:      {client_id}")
    click.echo(f"client_secret:  {secret}")
    click.echo(f"webhook_secret: {webhook_secret}")
    click.echo("Store the secrets now: they are not shown again. Token endpoint: POST /oauth/token (grant_type=client_credentials).")


def register(app: Flask) -> None:
    """Add the commands to the app's ``meters`` group (creating it when nobody else did)."""
    group = app.cli.commands.get("meters")
    if group is None:
        app.cli.add_command(meters_group)
        return
    if group is not meters_group:
        for name, command in meters_group.commands.items():
            group.add_command(command, name)
