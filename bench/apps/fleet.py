"""The simulated chargers of ``bench/gateway.py``, in a process of their own: ``run_fleet`` until SIGTERM or SIGINT.

    .venv/bin/python bench/apps/fleet.py SPEC.json

SPEC is JSON: ``{"url": "ws://host:port/ocpp", "chargers": [[cp_id, password], ...],
"options": {...SimulatedCharger keyword arguments...}, "ramp": connects per second or 0, "started": "path"}``.
With a ramp, the chargers start in batches of ``ramp`` a second (one ``run_fleet`` per batch);
without, all at once, as after a gateway restart. Just
before the chargers start connecting (imports done), the runner writes
``{"t": <unix time>, "rss_kib": <its own RSS>}`` to ``started``, so the
benchmark can time connect+boot from that moment and tell the fleet's idle
memory from what its connections cost.

It lives below ``bench/`` so that ``make bench``, which runs every ``bench/*.py``, does not run it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from webapp.chargers.simulator import run_fleet  # noqa: E402


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    chargers = [(cp_id, password) for cp_id, password in spec["chargers"]]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        Path(spec["started"]).write_text(json.dumps({"t": time.time(), "rss_kib": _rss_kib()}))
        ramp = int(spec.get("ramp") or 0) or len(chargers)
        batches = [chargers[i:i + ramp] for i in range(0, len(chargers), ramp)]

        async def batch(n: int, members: list[tuple[str, str]]):
            await asyncio.sleep(n)
            return await run_fleet(spec["url"], members, stop=stop, **spec.get("options", {}))

        sims = [sim for group in await asyncio.gather(*(batch(n, b) for n, b in enumerate(batches))) for sim in group]
        errors = sum(len(sim.errors) for sim in sims)
        if errors:
            print(f"fleet: {errors} background failures in the simulated chargers", file=sys.stderr)

    asyncio.run(go())


if __name__ == "__main__":
    main()
