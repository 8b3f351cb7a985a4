"""Simulated OCPP 1.6J chargers, built with the same ``ocpp`` library in the charge point's role.

A ``SimulatedCharger`` boots, reports each connector Available, sends
heartbeats, and answers the central system: RemoteStartTransaction
(Accepted; after the plug-in delay Preparing → Authorize → StartTransaction
with meterStart from its persistent register → Charging → MeterValues every
interval), RemoteStopTransaction (StopTransaction reason Remote with
transactionData → Finishing → Available after the unplug delay),
ChangeConfiguration (MeterValueSampleInterval and friends), UnlockConnector,
Reset (reconnect and boot again) and TriggerMessage.

Timestamps are real UTC times (the server prices by them). To see energy grow
in a test without waiting minutes, use a short ``meter_interval`` (0.1–0.3 s)
and a ``time_scale``: energy grows at ``power × time_scale``.

Faults (``faults=``): ``reject_start`` (RemoteStart answered Rejected),
``never_start`` (accepted, the car never plugs in: Preparing, then Available
again after ``never_start_timeout``), ``drop_mid_session`` (after
``drop_after`` meter values the connection drops for ``offline_s`` while
charging goes on; MeterValues and StopTransaction are queued and sent in order
after reconnecting, so a stop can arrive late), ``reboot`` (after
``drop_after`` meter values the charger reboots: the transaction stops with
reason Reboot, then it reconnects, boots and sends the queued messages) and
``mute`` (never answers the central system: its commands time out).

Tests drive chargers from their own thread through ``SimulatorThread``;
``run_fleet`` runs many for the demo and the benchmarks.

A central system that does not keep up is not made busier: reconnects (after a
lost connection, a refused or timed-out connect or boot) wait
``reconnect_delay`` doubled after each failure up to ``reconnect_max``, with
jitter, so a fleet does not come back in one storm; an Authorize or
StartTransaction that times out is sent again (``start_attempts``), and a
transaction message that times out is sent again after a growing pause.
``sent`` and ``received`` keep the last ``history`` entries.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import json
import logging
import random
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ocpp.messages
import websockets
from ocpp.exceptions import OCPPError
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action

ocpp.messages.ASYNC_VALIDATION = False

FAULTS = frozenset({"reject_start", "never_start", "drop_mid_session", "reboot", "mute"})
DEFAULT_SAMPLE_INTERVAL = 60  # seconds, until the central system configures MeterValueSampleInterval
VOLTS = 230

log = logging.getLogger("voltpay.simulator")
wire_log = logging.getLogger("voltpay.simulator.wire")
wire_log.setLevel(logging.WARNING)


class Offline(Exception):
    """The charger has no connection to the central system right now."""


class Refused(Exception):
    """The central system refused the connection (HTTP status in ``status``)."""

    def __init__(self, status: int):
        super().__init__(f"the central system refused the connection (HTTP {status})")
        self.status = status


def _quiet(task: asyncio.Task) -> asyncio.Task:
    """Mark the task's exception as seen (a closed connection ends readers and calls; the caller checks what it needs)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SimConnector:
    """One connector's state (read it from tests; change it through the charger's methods)."""

    number: int
    status: str = "Available"
    status_at: str = field(default_factory=_now)
    register_wh: float = 0.0  # the energy meter: persistent across transactions, reboots and reconnects
    plugged: bool = False
    suspended: bool = False  # SuspendedEV: the car draws nothing (full)
    id_tag: str | None = None
    transaction_id: int | None = None
    meter_start_wh: int | None = None
    meter_values_sent: int = 0  # in the current (or last) transaction
    last_transaction_id: int | None = None
    _tick: float | None = None  # loop time the register was last advanced
    _meter_task: asyncio.Task | None = None
    _plugged_event: asyncio.Event = field(default_factory=asyncio.Event)


class _Link(ChargePoint):
    """One websocket of a simulated charger: the central system's calls go to the charger."""

    def __init__(self, sim: SimulatedCharger, ws):
        super().__init__(sim.cp_id, ws, response_timeout=sim.response_timeout, logger=wire_log)
        self.sim = sim

    async def route_message(self, raw_msg):
        if self.sim.mute:
            with contextlib.suppress(ValueError, IndexError, TypeError):
                if json.loads(raw_msg)[0] == 2:
                    return  # fault "mute": the central system's calls are never answered
        await super().route_message(raw_msg)

    def _received(self, action: str, kwargs: dict) -> None:
        self.sim.received.append((action, kwargs))

    @on(Action.remote_start_transaction)
    def on_sim_remote_start(self, id_tag, connector_id=None, **kw):
        self._received("RemoteStartTransaction", {"id_tag": id_tag, "connector_id": connector_id, **kw})
        return call_result.RemoteStartTransaction(status=self.sim._accept_start(connector_id))

    @after(Action.remote_start_transaction)
    def after_sim_remote_start(self, id_tag, connector_id=None, **kw):
        self.sim._after_start(id_tag, connector_id)

    @on(Action.remote_stop_transaction)
    def on_sim_remote_stop(self, transaction_id, **kw):
        self._received("RemoteStopTransaction", {"transaction_id": transaction_id})
        # A StartTransaction whose answer is still on its way may be this transaction (the central system commits, then answers).
        known = self.sim._by_transaction(transaction_id) is not None or bool(self.sim._starting)
        return call_result.RemoteStopTransaction(status="Accepted" if known else "Rejected")

    @after(Action.remote_stop_transaction)
    def after_sim_remote_stop(self, transaction_id, **kw):
        self.sim._spawn(self.sim._remote_stop(transaction_id))

    @on(Action.change_configuration)
    def on_sim_change_configuration(self, key, value, **kw):
        self._received("ChangeConfiguration", {"key": key, "value": value})
        return call_result.ChangeConfiguration(status=self.sim._configure(key, value))

    @on(Action.unlock_connector)
    def on_sim_unlock_connector(self, connector_id, **kw):
        self._received("UnlockConnector", {"connector_id": connector_id})
        return call_result.UnlockConnector(status="Unlocked" if connector_id in self.sim.connectors else "NotSupported")

    @after(Action.unlock_connector)
    def after_sim_unlock_connector(self, connector_id, **kw):
        c = self.sim.connectors.get(connector_id)
        if c is not None and c.transaction_id is not None:
            self.sim._spawn(self.sim._end(c, "UnlockCommand", unplug=True))

    @on(Action.reset)
    def on_sim_reset(self, type, **kw):  # noqa: A002 - OCPP's field name
        self._received("Reset", {"type": type})
        return call_result.Reset(status="Accepted")

    @after(Action.reset)
    def after_sim_reset(self, type, **kw):  # noqa: A002
        self.sim._spawn(self.sim.reboot(reason="HardReset" if type == "Hard" else "SoftReset"))

    @on(Action.trigger_message)
    def on_sim_trigger_message(self, requested_message, connector_id=None, **kw):
        self._received("TriggerMessage", {"requested_message": requested_message, "connector_id": connector_id})
        known = requested_message in ("BootNotification", "Heartbeat", "StatusNotification", "MeterValues")
        return call_result.TriggerMessage(status="Accepted" if known else "NotImplemented")

    @after(Action.trigger_message)
    def after_sim_trigger_message(self, requested_message, connector_id=None, **kw):
        self.sim._spawn(self.sim._triggered(requested_message, connector_id))


class SimulatedCharger:
    """A charge point with ``connectors`` connectors talking OCPP 1.6J to ``url`` (``ws://host:port/ocpp``).

    ``plug_in_delay``: seconds between an accepted RemoteStart and the car
    plugging in (None: wait for ``plug_in()``). ``unplug_delay``: seconds
    between a stop and the car leaving (None: wait for ``unplug()``).
    ``meter_interval``: seconds between MeterValues, fixed (None: follow the
    central system's MeterValueSampleInterval, divided by ``time_scale``).
    ``time_scale``: energy grows at power × time_scale.
    """

    def __init__(
        self, cp_id: str, password: str, url: str, *, connectors: int = 2, power_kw: float = 11.0, plug_in_delay: float | None = 1.0,
        unplug_delay: float | None = 0.5, meter_interval: float | None = None, time_scale: float = 1.0, faults: Iterable[str] = (),
        drop_after: int = 3, offline_s: float = 1.0, never_start_timeout: float = 3.0, heartbeat_interval: float | None = None,
        reconnect_delay: float = 1.0, response_timeout: float = 10.0, vendor: str = "Voltpay", model: str = "Sim-22",
        serial: str | None = None, firmware: str = "sim-1.0", subprotocol: str = "ocpp1.6", reconnect_max: float = 60.0,
        start_attempts: int = 4, history: int = 1000,
    ):
        unknown = set(faults) - FAULTS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        self.cp_id, self.password, self.url = cp_id, password, url.rstrip("/")
        self.connectors = {n: SimConnector(n) for n in range(1, connectors + 1)}
        self.power_w = power_kw * 1000
        self.plug_in_delay, self.unplug_delay = plug_in_delay, unplug_delay
        self.meter_interval, self.time_scale = meter_interval, time_scale
        self.faults = set(faults)
        self.mute = "mute" in self.faults
        self.drop_after, self.offline_s, self.never_start_timeout = drop_after, offline_s, never_start_timeout
        self.heartbeat_interval = heartbeat_interval  # None: as the boot answer says
        self.reconnect_delay, self.response_timeout = reconnect_delay, response_timeout
        self.reconnect_max, self.start_attempts = reconnect_max, start_attempts
        self._failures = 0  # connects (or boots) in a row that failed: the backoff's exponent
        self._starting: set[asyncio.Future] = set()  # StartTransactions waiting for their answer (done when answered)
        self.vendor, self.model, self.serial, self.firmware = vendor, model, serial or f"SN-{cp_id}"[:25], firmware
        self.subprotocol = subprotocol
        self.configuration: dict[str, str] = {"MeterValueSampleInterval": str(DEFAULT_SAMPLE_INTERVAL)}
        self.sent: collections.deque[tuple[str, object]] = collections.deque(maxlen=history)  # requests answered, in order (the last ``history``)
        self.received: collections.deque[tuple[str, dict]] = collections.deque(maxlen=history)  # commands received (action, fields)
        self._last_sent: dict[str, object] = {}  # the last answered request of each action
        self.errors: list[BaseException] = []  # failures of background work (tests assert it stays empty)
        self.boots = 0
        self.booted = asyncio.Event()  # set after the first boot was accepted
        self._ready = asyncio.Event()  # connected, booted and caught up
        self._link: _Link | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._runner: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._queue: collections.deque = collections.deque()  # transaction messages waiting for the central system
        self._tasks: set[asyncio.Task] = set()
        self._need_boot = True
        self._hold_offline = False
        self._resume = asyncio.Event()
        self._closed = False
        self._faulted_once: set[str] = set()

    # ------------------------------------------------------------------ inspection

    @property
    def online(self) -> bool:
        """Connected, booted and done replaying what was queued."""
        return self._ready.is_set()

    def connector(self, number: int = 1) -> SimConnector:
        """Connector ``number``'s state."""
        return self.connectors[number]

    def last_sent(self, action: str):
        """The last request of ``action`` the central system answered (to send it again, as a replay)."""
        try:
            return self._last_sent[action]
        except KeyError:
            raise LookupError(f"{self.cp_id} has sent no {action}") from None

    def count_received(self, action: str) -> int:
        """How many ``action`` commands the central system sent."""
        return sum(1 for name, _ in self.received if name == action)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 10.0) -> SimulatedCharger:
        """Connect (raising ``Refused`` or OSError at once when that fails), boot, and keep running in the background."""
        await self._connect()
        self._runner = asyncio.create_task(self._run(), name=f"sim-{self.cp_id}")
        self._runner.add_done_callback(self._task_done)  # a later refusal lands in ``errors``
        await asyncio.wait_for(self._ready.wait(), timeout)
        return self

    async def run(self) -> None:
        """Run until cancelled or closed, reconnecting whenever the connection is lost (the fleet's entry point)."""
        self._runner = asyncio.current_task()
        await self._run()

    async def close(self) -> None:
        """Stop everything and close the connection."""
        self._closed = True
        self._resume.set()
        for c in self.connectors.values():
            if c._meter_task is not None:
                c._meter_task.cancel()
        for task in [self._heartbeat, self._flusher, *self._tasks]:
            if task is not None:
                task.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner

    async def wait_online(self, timeout: float = 10.0) -> None:
        """Wait until connected and caught up."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _connect(self) -> None:
        token = base64.b64encode(f"{self.cp_id}:{self.password}".encode()).decode()
        try:
            ws = await websockets.connect(
                f"{self.url}/{urllib.parse.quote(self.cp_id, safe='')}", subprotocols=[self.subprotocol],
                additional_headers={"Authorization": f"Basic {token}"}, compression=None, open_timeout=10,
            )
        except websockets.InvalidStatus as e:
            raise Refused(e.response.status_code) from None
        self._ws = ws
        self._link = _Link(self, ws)
        self._reader = _quiet(asyncio.create_task(self._link.start(), name=f"sim-{self.cp_id}-reader"))

    async def _run(self) -> None:
        while not self._closed:
            if self._link is None:
                if self._hold_offline:
                    await self._resume.wait()
                    continue
                try:
                    await self._connect()
                except Refused as e:
                    log.error("simulated charger refused", extra={"charger": self.cp_id, "status": e.status})
                    if e.status in (401, 403, 404):
                        raise
                    await self._backoff()
                    continue
                except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI):
                    await self._backoff()
                    continue
            reader = self._reader
            try:
                await self._caught_up()
                await asyncio.wait({reader})
            except (Offline, websockets.ConnectionClosed, TimeoutError, OCPPError) as e:
                log.info("simulated charger lost its connection", extra={"charger": self.cp_id, "reason": type(e).__name__})
            finally:
                self._ready.clear()
                self._link = None
                if not reader.done():
                    reader.cancel()
                if self._ws is not None:
                    with contextlib.suppress(Exception):
                        await self._ws.close()
                    self._ws = None
            if not self._closed and not self._hold_offline:
                await self._backoff()  # the connection was lost (or the boot timed out): try again after a pause

    def _pause(self, n: int, base: float) -> float:
        """Exponential backoff with jitter: ``base`` × 2**n up to ``reconnect_max``, a random half to all of it."""
        return min(self.reconnect_max, base * 2 ** min(n, 30)) * random.uniform(0.5, 1.0)

    async def _backoff(self) -> None:
        """Wait before connecting again: longer after each failure in a row (a boot answered resets it)."""
        pause = self._pause(self._failures, self.reconnect_delay)
        self._failures += 1
        await asyncio.sleep(pause)

    async def _caught_up(self) -> None:
        """After connecting: boot if needed, send what was queued, then every connector's status."""
        if self._need_boot:
            while True:
                r = await self._call(call.BootNotification(
                    charge_point_vendor=self.vendor, charge_point_model=self.model, charge_point_serial_number=self.serial,
                    firmware_version=self.firmware,
                ))
                if r.status == "Accepted":
                    break
                await asyncio.sleep(max(r.interval, 1))
            self._need_boot = False
            self.boots += 1
            interval = self.heartbeat_interval or r.interval or 300
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.create_task(self._heartbeats(interval))
        self._kick()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        for c in self.connectors.values():
            await self._call(call.StatusNotification(connector_id=c.number, error_code="NoError", status=c.status, timestamp=c.status_at))
        self._failures = 0
        self._ready.set()
        self.booted.set()

    async def _heartbeats(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)
            if self._link is not None:
                with contextlib.suppress(Offline, TimeoutError, OCPPError, websockets.ConnectionClosed):
                    await self._call(call.Heartbeat())

    async def _call(self, request):
        """Send one request and return the answer; raises Offline when the connection is (or goes) away."""
        link, reader = self._link, self._reader
        if link is None or reader is None or reader.done():
            raise Offline(self.cp_id)
        sending = _quiet(asyncio.create_task(link.call(request, suppress=False)))
        await asyncio.wait({sending, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            sending.cancel()
            raise Offline(self.cp_id)
        try:
            result = sending.result()
        except websockets.ConnectionClosed:
            raise Offline(self.cp_id) from None
        name = type(request).__name__
        self.sent.append((name, request))
        self._last_sent[name] = request
        return result

    async def _call_retrying(self, request):
        """``_call``, sent again after a timeout (or once connected again) up to ``start_attempts`` times with a growing pause."""
        for attempt in range(self.start_attempts):
            try:
                return await self._call(request)
            except (TimeoutError, Offline):
                if attempt == self.start_attempts - 1 or self._closed:
                    raise
                log.warning("simulated charger sends again after a timeout", extra={"charger": self.cp_id, "action": type(request).__name__})
            await asyncio.sleep(self._pause(attempt, self.reconnect_delay))
            if not self._ready.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), self.response_timeout)
        raise AssertionError("unreachable")

    async def send(self, request):
        """Send any OCPP 1.6 request now (a test replaying a message) and return the central system's answer."""
        return await self._call(request)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            if not isinstance(e, Offline):
                self.errors.append(e)
                log.error("simulated charger task failed", extra={"charger": self.cp_id}, exc_info=e)

    # ------------------------------------------------------------------ the transaction queue (offline-safe, in order)

    def _enqueue(self, request) -> None:
        self._queue.append(request)
        self._kick()

    def _kick(self) -> None:
        if self._link is not None and self._queue and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        timeouts = 0
        while self._queue:
            request = self._queue[0]
            try:
                await self._call(request)
            except Offline:
                return  # sent again (in order) after reconnecting
            except TimeoutError:
                # The central system is slow (it may have stored it: a repeat is applied once): send it again after a pause.
                log.warning("simulated charger sends again after a timeout", extra={"charger": self.cp_id, "action": type(request).__name__})
                await asyncio.sleep(self._pause(timeouts, self.reconnect_delay))
                timeouts += 1
                continue
            except OCPPError as e:
                log.warning("central system refused a transaction message", extra={"charger": self.cp_id, "error": str(e)})
            if self._queue and self._queue[0] is request:
                self._queue.popleft()

    async def _drain(self) -> None:
        """Wait until the queue is sent (or the connection is gone)."""
        self._kick()
        if self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    # ------------------------------------------------------------------ connectors

    async def _status(self, c: SimConnector, status: str) -> None:
        c.status, c.status_at = status, _now()
        if self._link is None:
            return  # sent with every connector's status after reconnecting
        with contextlib.suppress(Offline, TimeoutError, OCPPError):
            await self._drain()  # what was queued before goes first: a status must not overtake the stop it follows
            await self._call(call.StatusNotification(connector_id=c.number, error_code="NoError", status=status, timestamp=c.status_at))

    def _accept_start(self, connector_id: int | None) -> str:
        if "reject_start" in self.faults:
            return "Rejected"
        c = self._free_connector(connector_id)
        return "Accepted" if c is not None else "Rejected"

    def _free_connector(self, connector_id: int | None) -> SimConnector | None:
        candidates = [self.connectors.get(connector_id)] if connector_id else list(self.connectors.values())
        for c in candidates:
            if c is not None and c.transaction_id is None and c.status in ("Available", "Preparing"):
                return c
        return None

    def _after_start(self, id_tag: str, connector_id: int | None) -> None:
        c = self._free_connector(connector_id)
        if c is not None and "reject_start" not in self.faults:
            self._spawn(self._remote_start(c, id_tag))

    async def _remote_start(self, c: SimConnector, id_tag: str) -> None:
        if "never_start" in self.faults:
            await self._status(c, "Preparing")
            await asyncio.sleep(self.never_start_timeout)  # the connection timeout of a real charger: nobody plugged in
            if c.transaction_id is None:
                await self._status(c, "Available")
            return
        if not c.plugged:
            if self.plug_in_delay is None:
                await c._plugged_event.wait()
            else:
                await asyncio.sleep(self.plug_in_delay)
                c.plugged = True
        if c.status != "Preparing":
            await self._status(c, "Preparing")
        auth = await self._call_retrying(call.Authorize(id_tag=id_tag))
        if auth.id_tag_info.get("status") != "Accepted":
            await self._status(c, "Available")
            return
        await self._begin(c, id_tag)

    async def _remote_stop(self, transaction_id: int) -> None:
        if self._by_transaction(transaction_id) is None and self._starting:
            await asyncio.wait(set(self._starting), timeout=self.response_timeout * self.start_attempts)
        c = self._by_transaction(transaction_id)
        if c is not None:
            await self._end(c, "Remote")

    async def _begin(self, c: SimConnector, id_tag: str) -> None:
        meter_start = int(c.register_wh)
        starting = asyncio.get_running_loop().create_future()
        self._starting.add(starting)
        try:
            # Sent again after a timeout: the central system answers a repeated start with the same transaction.
            r = await self._call_retrying(call.StartTransaction(connector_id=c.number, id_tag=id_tag, meter_start=meter_start,
                                                                timestamp=_now()))
            c.transaction_id, c.last_transaction_id, c.id_tag = r.transaction_id, r.transaction_id, id_tag
        finally:
            self._starting.discard(starting)
            starting.set_result(None)
        c.meter_start_wh, c.meter_values_sent = meter_start, 0
        c._tick = asyncio.get_running_loop().time()
        if r.id_tag_info.get("status") != "Accepted":
            await self._end(c, "DeAuthorized")
            return
        await self._status(c, "SuspendedEV" if c.suspended else "Charging")
        c._meter_task = asyncio.create_task(self._meter_loop(c))

    def _interval(self) -> float:
        if self.meter_interval is not None:
            return self.meter_interval
        try:
            configured = float(self.configuration.get("MeterValueSampleInterval", DEFAULT_SAMPLE_INTERVAL))
        except ValueError:
            configured = DEFAULT_SAMPLE_INTERVAL
        return max(configured, 1) / self.time_scale

    def _advance(self, c: SimConnector) -> float:
        """Move the register to now; return the power drawn."""
        t = asyncio.get_running_loop().time()
        power = 0.0 if c.suspended or c.transaction_id is None else self.power_w
        if c._tick is not None:
            c.register_wh += power * (t - c._tick) * self.time_scale / 3600
        c._tick = t
        return power

    def _meter_value(self, c: SimConnector, power: float, context: str, timestamp: str | None = None) -> dict:
        return {
            "timestamp": timestamp or _now(),
            "sampled_value": [
                {"value": str(int(c.register_wh)), "context": context, "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": f"{power:.0f}", "context": context, "measurand": "Power.Active.Import", "unit": "W"},
                {"value": f"{power / VOLTS:.1f}", "context": context, "measurand": "Current.Import", "unit": "A"},
            ],
        }

    async def _meter_loop(self, c: SimConnector) -> None:
        while c.transaction_id is not None:
            await asyncio.sleep(self._interval())
            if c.transaction_id is None:
                return
            power = self._advance(c)
            c.meter_values_sent += 1
            self._enqueue(call.MeterValues(connector_id=c.number, transaction_id=c.transaction_id,
                                           meter_value=[self._meter_value(c, power, "Sample.Periodic")]))
            if c.meter_values_sent == self.drop_after:
                if "drop_mid_session" in self.faults and "drop" not in self._faulted_once:
                    self._faulted_once.add("drop")
                    self._spawn(self._drop(self.offline_s))
                if "reboot" in self.faults and "reboot" not in self._faulted_once:
                    self._faulted_once.add("reboot")
                    self._spawn(self.reboot())
                    return

    async def _end(self, c: SimConnector, reason: str, *, unplug: bool = False, status: bool = True) -> None:
        """Stop the connector's transaction: StopTransaction (queued when offline), then Finishing and, later, Available."""
        if c.transaction_id is None:
            return
        power = self._advance(c)
        task, c._meter_task = c._meter_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        transaction_id, c.transaction_id = c.transaction_id, None
        stamp = _now()
        end = self._meter_value(c, power, "Transaction.End", stamp)
        self._enqueue(call.StopTransaction(meter_stop=int(c.register_wh), timestamp=stamp, transaction_id=transaction_id, reason=reason,
                                           id_tag=c.id_tag, transaction_data=[end]))
        c.id_tag = None
        await self._drain()
        if not status:
            return
        await self._status(c, "Finishing")
        if unplug or reason == "EVDisconnected":
            await self._leave(c)
        elif self.unplug_delay is not None:
            self._spawn(self._leave_later(c, self.unplug_delay))

    async def _leave_later(self, c: SimConnector, delay: float) -> None:
        await asyncio.sleep(delay)
        if c.transaction_id is None and c.status == "Finishing":
            await self._leave(c)

    async def _leave(self, c: SimConnector) -> None:
        c.plugged, c.suspended = False, False
        c._plugged_event.clear()
        await self._status(c, "Available")

    def _by_transaction(self, transaction_id: int) -> SimConnector | None:
        return next((c for c in self.connectors.values() if c.transaction_id == transaction_id), None)

    def _configure(self, key: str, value: str) -> str:
        if key in ("MeterValueSampleInterval", "HeartbeatInterval", "ClockAlignedDataInterval"):
            try:
                if int(value) < 0:
                    return "Rejected"
            except ValueError:
                return "Rejected"
        elif key not in ("MeterValuesSampledData", "MeterValuesAlignedData", "StopTxnSampledData"):
            return "NotSupported"
        self.configuration[key] = value
        return "Accepted"

    async def _triggered(self, message: str, connector_id: int | None) -> None:
        if message == "BootNotification":
            self._need_boot = True
            await self._caught_up()
        elif message == "Heartbeat":
            await self._call(call.Heartbeat())
        elif message == "StatusNotification":
            for c in self.connectors.values():
                if connector_id in (None, c.number):
                    await self._status(c, c.status)
        elif message == "MeterValues":
            for c in self.connectors.values():
                if connector_id in (None, c.number):
                    power = self._advance(c)
                    await self._call(call.MeterValues(connector_id=c.number, transaction_id=c.transaction_id,
                                                      meter_value=[self._meter_value(c, power, "Trigger")]))

    async def _drop(self, offline_s: float) -> None:
        await self.disconnect()
        await asyncio.sleep(offline_s)
        await self.reconnect()

    # ------------------------------------------------------------------ what a person (or a test) does at the charger

    async def plug_in(self, connector: int = 1) -> None:
        """The driver plugs the car in (Preparing until a start is authorised)."""
        c = self.connectors[connector]
        c.plugged = True
        c._plugged_event.set()
        if c.transaction_id is None and c.status == "Available":
            await self._status(c, "Preparing")

    async def unplug(self, connector: int = 1) -> None:
        """The driver unplugs: a running transaction stops (EVDisconnected); the connector is Available."""
        c = self.connectors[connector]
        if c.transaction_id is not None:
            await self._end(c, "EVDisconnected", unplug=True)
        else:
            await self._leave(c)

    async def stop_locally(self, connector: int = 1) -> None:
        """The driver stops at the charger (reason Local); the cable stays in until ``unplug`` or the unplug delay."""
        c = self.connectors[connector]
        await self._end(c, "Local")

    async def suspend(self, connector: int = 1) -> None:
        """The car is full: SuspendedEV, power 0, the transaction goes on."""
        c = self.connectors[connector]
        self._advance(c)
        c.suspended = True
        if c.transaction_id is not None:
            await self._status(c, "SuspendedEV")

    async def resume(self, connector: int = 1) -> None:
        """The car draws power again: Charging."""
        c = self.connectors[connector]
        self._advance(c)
        c.suspended = False
        if c.transaction_id is not None:
            await self._status(c, "Charging")

    async def disconnect(self) -> None:
        """Lose the connection and stay offline (charging goes on; messages queue) until ``reconnect()``."""
        self._hold_offline = True
        self._resume.clear()
        self._ready.clear()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.wait({self._reader})

    async def reconnect(self, timeout: float = 10.0) -> None:
        """Connect again (no boot: the charger did not restart), replay the queue, report the statuses."""
        self._hold_offline = False
        self._resume.set()
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def reboot(self, reason: str = "Reboot", down_s: float = 0.2) -> None:
        """Restart: the connection drops, running transactions stop (``reason``, queued), then connect and boot again."""
        await self.disconnect()
        for c in self.connectors.values():
            if c.transaction_id is not None:
                await self._end(c, reason, status=False)
                c.status, c.status_at = "Finishing", _now()
                if self.unplug_delay is not None:
                    self._spawn(self._leave_later(c, self.unplug_delay + down_s))
        self._need_boot = True
        await asyncio.sleep(down_s)
        await self.reconnect()


class SimulatorThread:
    """An event loop in a daemon thread for simulated chargers, driven from synchronous code (tests)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.chargers: list[SimulatedCharger] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="charger-simulators", daemon=True)
        self._thread.start()

    def run(self, aw, timeout: float = 30.0):
        """Run a coroutine on the simulators' loop and return its result."""
        return asyncio.run_coroutine_threadsafe(aw, self.loop).result(timeout)

    def start(self, sim: SimulatedCharger, timeout: float = 10.0) -> SimulatedCharger:
        """Start ``sim`` (connected and booted on return)."""
        async def go():
            return await sim.start(timeout)

        self.run(go(), timeout + 5)
        self.chargers.append(sim)
        return sim

    def stop(self) -> None:
        """Close every charger and the loop."""
        for sim in self.chargers:
            with contextlib.suppress(Exception):
                self.run(sim.close(), 10)

        async def cancel_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def run_fleet(url: str, chargers: Iterable[tuple[str, str]], *, faults: Mapping[str, Iterable[str]] | None = None,
                    stop: asyncio.Event | None = None, **options) -> list[SimulatedCharger]:
    """Run one simulated charger per ``(charge point id, password)`` until ``stop`` is set (or cancelled).

    ``options`` go to every ``SimulatedCharger`` (power_kw, plug_in_delay,
    meter_interval, ...); ``faults`` maps a charge point id to its faults.
    Chargers reconnect on their own, so the gateway may start after them.
    """
    faults = faults or {}
    options.setdefault("history", 20)  # nobody reads a fleet charger's history: keep its memory flat
    sims = [SimulatedCharger(cp_id, password, url, faults=faults.get(cp_id, ()), **options) for cp_id, password in chargers]
    stop = stop or asyncio.Event()

    def stopped(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated charger stopped", extra={"charger": task.get_name(), "error": str(task.exception())})

    tasks = [asyncio.create_task(sim.run(), name=f"sim-{sim.cp_id}") for sim in sims]
    for t in tasks:
        t.add_done_callback(stopped)
    try:
        await stop.wait()  # a charger that fails (refused) is logged; the others keep running
    finally:
        for sim in sims:
            with contextlib.suppress(Exception):
                await sim.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return sims
