"""``flask --app wsgi gateway`` (the OCPP gateway) and ``flask --app wsgi simulate`` (simulated chargers)."""

from __future__ import annotations

import click
from flask import Flask, current_app

# The demo's chargers (webapp/seed.py): what ``simulate`` runs when no --charger is given.
DEMO_CHARGERS = ("DEMO-CP-1:demo-charger-1-secret", "DEMO-CP-2:demo-charger-2-secret")


def _pairs(values: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        left, sep, right = value.partition(":")
        if not sep or not left or not right:
            raise click.BadParameter(f"{value!r} is not {what}")
        out.append((left, right))
    return out


def register(app: Flask) -> None:
    """Add ``gateway`` and ``simulate`` to ``app.cli``."""

    @app.cli.command("gateway")
    @click.option("--host", default=None, help="Address for the chargers' websockets (default: VOLTPAY_GATEWAY_HOST).")
    @click.option("--port", default=None, type=int, help="Port for the chargers' websockets (default: VOLTPAY_GATEWAY_PORT).")
    @click.option("--internal-host", default=None, help="Address of the internal command endpoint (default: VOLTPAY_GATEWAY_INTERNAL_HOST).")
    @click.option("--internal-port", default=None, type=int, help="Port of the internal command endpoint (default: VOLTPAY_GATEWAY_INTERNAL_PORT).")
    def gateway(host: str | None, port: int | None, internal_host: str | None, internal_port: int | None) -> None:
        """Run the OCPP 1.6J charger gateway in the foreground (Ctrl-C or SIGTERM stops it cleanly)."""
        from webapp.chargers.gateway import GatewayServer

        server = GatewayServer(current_app._get_current_object(), host=host, port=port, internal_host=internal_host, internal_port=internal_port)
        click.echo(f"OCPP 1.6J gateway: chargers connect to ws://{server.host}:{server.port}/ocpp/<charge point id>; "
                   f"commands on http://{server.internal_host}:{server.internal_port}. Ctrl-C stops.")
        try:
            server.serve_forever()
        except OSError as e:
            raise click.ClickException(f"the gateway cannot listen: {e}") from None

    @app.cli.command("simulate")
    @click.option("--url", default=None, help="The gateway's OCPP URL, e.g. ws://127.0.0.1:9000/ocpp (default: from the gateway settings).")
    @click.option("--charger", "chargers", multiple=True, metavar="CP_ID:PASSWORD", help="A charger to simulate (repeatable; default: the demo's two).")
    @click.option("--connectors", default=2, show_default=True, help="Connectors per charger.")
    @click.option("--power-kw", default=11.0, show_default=True, help="Power each car draws.")
    @click.option("--plug-in-delay", default=1.0, show_default=True, help="Seconds from an accepted remote start to the car plugging in.")
    @click.option("--unplug-delay", default=5.0, show_default=True, help="Seconds from the stop to the car leaving.")
    @click.option("--interval", default=None, type=float, help="Seconds between meter values (default: as the gateway configures).")
    @click.option("--time-scale", default=1.0, show_default=True, help="Energy grows at power × this (demo: see kWh move quickly).")
    @click.option("--fault", "faults", multiple=True, metavar="CP_ID:FAULT",
                  help="reject_start, never_start, drop_mid_session, reboot or mute for one charger (repeatable).")
    def simulate(url, chargers, connectors, power_kw, plug_in_delay, unplug_delay, interval, time_scale, faults) -> None:
        """Run simulated chargers against the gateway until Ctrl-C."""
        import asyncio
        import signal

        from webapp.chargers.simulator import FAULTS, run_fleet

        cfg = current_app.config
        url = url or f"ws://{cfg['GATEWAY_HOST']}:{cfg['GATEWAY_PORT']}/ocpp"
        fleet = _pairs(chargers or DEMO_CHARGERS, "CP_ID:PASSWORD")
        by_charger: dict[str, set[str]] = {}
        for cp_id, fault in _pairs(faults, "CP_ID:FAULT"):
            if fault not in FAULTS:
                raise click.BadParameter(f"unknown fault {fault!r}; one of {', '.join(sorted(FAULTS))}")
            by_charger.setdefault(cp_id, set()).add(fault)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await run_fleet(url, fleet, faults=by_charger, stop=stop, connectors=connectors, power_kw=power_kw,
                            plug_in_delay=plug_in_delay, unplug_delay=unplug_delay, meter_interval=interval, time_scale=time_scale)

        click.echo(f"Simulating {', '.join(cp for cp, _ in fleet)} against {url}. Ctrl-C stops.")
        asyncio.run(main())
