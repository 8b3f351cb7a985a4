"""The OCPP 1.6J central system: one asyncio process that holds the chargers' websockets.

Chargers connect to ``ws://HOST:PORT/ocpp/<charge_point_id>`` with the
subprotocol ``ocpp1.6`` and HTTP Basic credentials (security profile 1: the
user name is the charge point id, the password is checked against
``Charger.password_hash``). A path elsewhere gets 404, unknown chargers and
wrong passwords 401, another subprotocol 400.

Each message a charger sends is one database transaction in a worker thread
(``asyncio.to_thread``, so the event loop never waits on the database): the
domain function of ``webapp.charging.service``, the message and our answer in
``ocpp_messages``, commit, then the sessions that ended are queued for
settlement. Every message is answered; when the database fails the answer is
a CallError, so the charger keeps the message and sends it again.

Commands go the other way through a small internal HTTP endpoint (a stdlib
``ThreadingHTTPServer`` thread handing each request to the loop with
``run_coroutine_threadsafe``): ``POST /cp/<charge_point_id>/call`` with
``{"action": ..., "payload": {...snake_case...}, "session_id": optional}`` and
the shared secret in ``X-Voltpay-Gateway-Secret`` answers 200
``{"status": "Accepted"|..., "response": {...snake_case...}}``, 404 when the
charger is not connected here, 400 for a bad request, 502 when the charger
answered with a CallError (or the socket closed), 504 when it did not answer
in time. ``GET /healthz`` answers without the secret. The web app finds the
gateway holding a charger in ``charger_connections``
(``webapp.chargers.client.GatewayClient``).

The pitfalls of ../shared/notes/ocpp.md handled here: never ``await call()``
inside an ``@on`` handler (the gateway's own commands go out from ``@after``
in tasks); ``suppress=False`` and a short response timeout; a charger that
reconnects before its old socket died has the old socket closed, and the old
socket's cleanup deletes the connection row only if it is still its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hmac
import json
import logging
import re
import secrets
import signal
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ocpp.messages
import websockets
from flask import Flask
from ocpp.charge_point import remove_nones, serialize_as_dict, snake_to_camel_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, validate_payload
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, DataTransferStatus, RegistrationStatus
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidHeader
from websockets.frames import CloseCode
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response

from payments.base import utcnow
from webapp.auth.passwords import verify_password
from webapp.chargers.client import SECRET_HEADER, command_status
from webapp.charging import jobs, service
from webapp.charging.models import ChargeCommand, ChargerConnection, ChargingSession, CommandStatus, OcppMessage
from webapp.db import read_only
from webapp.models import Charger

# Schema checks run in the loop: cheaper than a thread-pool hop per message (notes, pitfall 9).
ocpp.messages.ASYNC_VALIDATION = False

SUBPROTOCOL = "ocpp1.6"
PATH_PREFIX = "/ocpp/"
COMMANDS = frozenset({"RemoteStartTransaction", "RemoteStopTransaction", "ChangeConfiguration", "UnlockConnector", "Reset", "TriggerMessage"})
SAMPLED_DATA = "Energy.Active.Import.Register,Power.Active.Import,Current.Import"
MAX_BODY = 64 * 1024
_CALL_PATH = re.compile(r"/cp/([^/]+)/call")

log = logging.getLogger("voltpay.gateway")
wire_log = logging.getLogger("voltpay.gateway.wire")  # every frame, at INFO (the library's own logging): DEBUG runs only


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def _wire(payload: object) -> dict:
    """A request or answer dataclass as it travels (camelCase, no empty fields)."""
    return snake_to_camel_case(remove_nones(serialize_as_dict(payload)))


def _session_of(s, transaction_id: int | None) -> int | None:
    if not transaction_id:
        return None
    return s.scalar(select(ChargingSession.id).where(ChargingSession.transaction_id == transaction_id))


@dataclass(frozen=True)
class CallOutcome:
    """What became of one command: ``kind`` is ok, not_connected, bad_request, timeout or call_error."""

    kind: str
    status: str | None = None  # the charger's ``status`` field (kind ok)
    response: dict | None = None  # the charger's answer, snake_case (kind ok)
    error: str | None = None

    HTTP = {"ok": 200, "not_connected": 404, "bad_request": 400, "timeout": 504, "call_error": 502, "unavailable": 503}

    @property
    def http_status(self) -> int:
        """The internal endpoint's status code for this outcome."""
        return self.HTTP[self.kind]

    def body(self) -> dict:
        """The internal endpoint's JSON body."""
        if self.kind == "ok":
            return {"status": self.status, "response": self.response}
        return {"status": None, "error": self.error}

    def command_status(self) -> CommandStatus:
        """How a ChargeCommand row records this outcome."""
        if self.kind == "ok":
            return command_status(self.status)
        return {"not_connected": CommandStatus.NOT_CONNECTED, "timeout": CommandStatus.TIMEOUT}.get(self.kind, CommandStatus.ERROR)


class ChargerLink(ChargePoint):
    """One charger's websocket: answers what the charger sends and runs the commands sent to it."""

    def __init__(self, gateway: GatewayServer, ws: ServerConnection, cp_id: str, charger_id: int):
        super().__init__(cp_id, ws, response_timeout=gateway.timeout, logger=wire_log)
        self.gateway = gateway
        self.ws = ws
        self.charger_id = charger_id
        self.connection_id = secrets.token_hex(12)
        self.connected_at = utcnow()
        self._message = None  # the call being handled: its raw payload goes to the message log
        self._sample_interval: int | None = None
        self._boots = 0
        self._stops: list[tuple[int, str, int | None]] = []  # auto-stops found while handling MeterValues

    async def _handle_call(self, msg):
        # One message at a time per charger (start() awaits each), so this is the message the handlers see.
        self._message = msg
        try:
            return await super()._handle_call(msg)
        finally:
            self._message = None

    async def _apply(self, work):
        """Run ``work(s, charger, now) -> (answer, response, session_id)`` in a thread as one transaction
        with the message and our answer logged; after the commit, queue the sessions to settle."""
        msg = self._message
        gateway = self.gateway

        def run():
            with gateway.app.app_context():
                with gateway.factory() as s:
                    charger = s.get(Charger, self.charger_id)
                    if charger is None:
                        raise RuntimeError(f"charger {self.id} is not registered any more")
                    now = utcnow()
                    service.charger_seen(s, charger, now)
                    answer, response, session_id = work(s, charger, now)
                    s.execute(insert(OcppMessage), [  # both rows in one statement, in the message's transaction
                        {"charger_id": self.charger_id, "session_id": session_id, "direction": "in", "action": msg.action,
                         "payload": service.dumps_json(msg.payload), "at": now},
                        {"charger_id": self.charger_id, "session_id": session_id, "direction": "out", "action": msg.action,
                         "payload": service.dumps_json(_wire(response)), "at": now},
                    ])
                    s.commit()
                if answer is not None and answer.settle:
                    gateway.settle(answer.settle)
            return answer, response, session_id

        return await asyncio.to_thread(run)

    # ------------------------------------------------------------------ what the charger sends

    @on(Action.boot_notification)
    async def on_boot_notification(self, charge_point_vendor, charge_point_model, **kw):
        """BootNotification: keep what the charger is; accept it with our heartbeat interval."""
        def work(s, charger, now):
            service.charger_booted(
                s, charger, vendor=charge_point_vendor, model=charge_point_model,
                serial=kw.get("charge_point_serial_number") or kw.get("charge_box_serial_number"),
                firmware=kw.get("firmware_version"), now=now,
            )
            self._sample_interval = charger.site.meter_sample_interval_s
            response = call_result.BootNotification(current_time=_iso(now), interval=self.gateway.heartbeat_interval,
                                                    status=RegistrationStatus.accepted)
            return None, response, None

        return (await self._apply(work))[1]

    @after(Action.boot_notification)
    def after_boot_notification(self, **kw):
        """After the boot is answered: set the meter sample interval and what the meter values carry."""
        self._boots += 1
        self.gateway.spawn(self._configure(self._sample_interval, self._boots))

    async def _configure(self, interval: int | None, boot: int) -> None:
        settings = [("MeterValuesSampledData", SAMPLED_DATA)]
        if interval:
            settings.insert(0, ("MeterValueSampleInterval", str(interval)))
        await self.commands([("ChangeConfiguration", {"key": key, "value": value},
                              f"charger:{self.charger_id}:connection:{self.connection_id}:boot:{boot}:{key}") for key, value in settings])

    @on(Action.heartbeat)
    async def on_heartbeat(self, **kw):
        """Heartbeat: the charger is alive; tell it our time."""
        return (await self._apply(lambda s, charger, now: (None, call_result.Heartbeat(current_time=_iso(now)), None)))[1]

    @on(Action.status_notification)
    async def on_status_notification(self, connector_id, error_code, status, **kw):
        """StatusNotification: keep the connector's (or, for connector 0, the charger's) status and error code."""
        def work(s, charger, now):
            answer = service.status_changed(
                s, charger, connector_number=connector_id, status=status, error_code=error_code, info=kw.get("info"),
                vendor_error_code=kw.get("vendor_error_code"), timestamp=_parse_time(kw.get("timestamp")), now=now,
            )
            return answer, call_result.StatusNotification(), None

        return (await self._apply(work))[1]

    @on(Action.authorize)
    async def on_authorize(self, id_tag, **kw):
        """Authorize: a session's own idTag, or an account's RFID tag."""
        def work(s, charger, now):
            status = service.authorize(s, charger, id_tag, now)
            session_id = s.scalar(select(ChargingSession.id).where(ChargingSession.id_tag == id_tag))
            return None, call_result.Authorize(id_tag_info={"status": status}), session_id

        return (await self._apply(work))[1]

    @on(Action.start_transaction)
    async def on_start_transaction(self, connector_id, id_tag, meter_start, timestamp, **kw):
        """StartTransaction: the session is charging; its transactionId is ours (the same answer when replayed)."""
        def work(s, charger, now):
            answer = service.start_transaction(
                s, charger, connector_number=connector_id, id_tag=id_tag, meter_start_wh=Decimal(meter_start),
                timestamp=_parse_time(timestamp) or now, now=now,
            )
            response = call_result.StartTransaction(transaction_id=answer.transaction_id, id_tag_info={"status": answer.id_tag_status})
            return answer, response, _session_of(s, answer.transaction_id)

        return (await self._apply(work))[1]

    @on(Action.meter_values)
    async def on_meter_values(self, connector_id, meter_value, transaction_id=None, **kw):
        """MeterValues: samples, live energy and cost; a limit reached schedules RemoteStopTransaction."""
        readings = service.parse_meter_values(meter_value)

        def work(s, charger, now):
            answer = service.meter_values(s, charger, connector_number=connector_id, transaction_id=transaction_id,
                                          readings=readings, now=now)
            return answer, call_result.MeterValues(), answer.session_id

        answer, response, session_id = await self._apply(work)
        if answer.stop_transaction_id is not None:
            self._stops.append((answer.stop_transaction_id, answer.stop_reason or "limit", session_id))
        return response

    @after(Action.meter_values)
    def after_meter_values(self, **kw):
        """After the answer: send the RemoteStopTransaction a reached limit asked for (never from inside @on)."""
        while self._stops:
            transaction_id, reason, session_id = self._stops.pop(0)
            # One key per request: the service asks again while the session keeps charging (a lost stop is retried).
            attempt = secrets.token_hex(4)
            key = (f"session:{session_id}:remote_stop:{reason}:{attempt}" if session_id
                   else f"charger:{self.charger_id}:transaction:{transaction_id}:remote_stop:{reason}:{attempt}")
            # Retried: a session left charging past its hold costs the operator what the capture cannot take.
            self.gateway.spawn(self.command("RemoteStopTransaction", {"transaction_id": transaction_id}, key=key,
                                            session_id=session_id, requested_by=reason, attempts=3))

    @on(Action.stop_transaction)
    async def on_stop_transaction(self, meter_stop, timestamp, transaction_id, reason=None, id_tag=None, transaction_data=None, **kw):
        """StopTransaction: the last readings and the stop; always answered, applied once (offline replays too)."""
        readings = service.parse_meter_values(transaction_data or [])

        def work(s, charger, now):
            answer = service.stop_transaction(
                s, charger, transaction_id=transaction_id, meter_stop_wh=Decimal(meter_stop), timestamp=_parse_time(timestamp) or now,
                reason=reason, readings=readings, now=now,
            )
            info = {"status": answer.id_tag_status} if id_tag else None
            return answer, call_result.StopTransaction(id_tag_info=info), answer.session_id

        return (await self._apply(work))[1]

    @on(Action.data_transfer)
    async def on_data_transfer(self, vendor_id, **kw):
        """DataTransfer: no vendor extensions are understood here."""
        work = lambda s, charger, now: (None, call_result.DataTransfer(status=DataTransferStatus.unknown_vendor_id), None)  # noqa: E731
        return (await self._apply(work))[1]

    @on(Action.firmware_status_notification)
    async def on_firmware_status_notification(self, status, **kw):
        """FirmwareStatusNotification: logged only."""
        return (await self._apply(lambda s, charger, now: (None, call_result.FirmwareStatusNotification(), None)))[1]

    @on(Action.diagnostics_status_notification)
    async def on_diagnostics_status_notification(self, status, **kw):
        """DiagnosticsStatusNotification: logged only."""
        return (await self._apply(lambda s, charger, now: (None, call_result.DiagnosticsStatusNotification(), None)))[1]

    # ------------------------------------------------------------------ what we send

    async def run_call(self, action: str, payload: dict, *, session_id: int | None = None) -> CallOutcome:
        """Send one command (snake_case payload) and wait for the answer; the exchange is logged in ``ocpp_messages``."""
        outcome, wire, sent_at = await self._exchange(action, payload)
        if wire is not None:
            self.gateway.spawn(asyncio.to_thread(self.gateway.log_command, self.charger_id, session_id, action, wire, outcome, sent_at))
        return outcome

    async def _exchange(self, action: str, payload: dict) -> tuple[CallOutcome, dict | None, dt.datetime | None]:
        """Send one command and wait for the answer: the outcome, the request as sent and when (None: not sent)."""
        if action not in COMMANDS:
            return CallOutcome("bad_request", error=f"unknown action {action!r}; one of {', '.join(sorted(COMMANDS))}"), None, None
        try:
            request = getattr(call, action)(**payload)
            wire = _wire(request)
            await validate_payload(Call(unique_id="check", action=action, payload=wire), "1.6")
        except TypeError as e:
            return CallOutcome("bad_request", error=f"payload of {action}: {e}"), None, None
        except OCPPError as e:
            return CallOutcome("bad_request", error=f"payload of {action}: {(e.details or {}).get('cause') or e.description}"), None, None
        sent_at = utcnow()
        try:
            result = await asyncio.wait_for(self.call(request, suppress=False), self.gateway.timeout)
        except TimeoutError:
            outcome = CallOutcome("timeout", error=f"the charger did not answer within {self.gateway.timeout:g} s")
        except OCPPError as e:
            outcome = CallOutcome("call_error", error=f"{e.code}: {e.description}")
        except websockets.ConnectionClosed:
            outcome = CallOutcome("call_error", error="the connection closed before the charger answered")
        else:
            response = remove_nones(serialize_as_dict(result))
            outcome = CallOutcome("ok", status=str(response.get("status")), response=response)
        return outcome, wire, sent_at

    async def command(self, action: str, payload: dict, *, key: str, session_id: int | None = None, requested_by: str = "gateway",
                      attempts: int = 1, retry_after: float = 5.0) -> CallOutcome | None:
        """A command of the gateway's own (boot configuration, auto-stop): recorded as a ChargeCommand, sent once per ``key``
        (up to ``attempts`` times while the charger does not answer on this connection)."""
        return (await self.commands([(action, payload, key)], session_id=session_id, requested_by=requested_by, attempts=attempts,
                                    retry_after=retry_after))[0]

    async def commands(self, items: list[tuple[str, dict, str]], *, session_id: int | None = None, requested_by: str = "gateway",
                       attempts: int = 1, retry_after: float = 5.0) -> list[CallOutcome | None]:
        """``command`` for several ``(action, payload, key)`` sent one after the other: recorded in one transaction, their
        outcomes recorded and logged in one (None for a key sent before)."""
        ids = await asyncio.to_thread(self.gateway.record_commands, self.charger_id, items, session_id, requested_by)
        outcomes: list[CallOutcome | None] = []
        done = []
        for (action, payload, _key), command_id in zip(items, ids, strict=True):
            if command_id is None:
                outcomes.append(None)  # this key was sent before
                continue
            for attempt in range(1, attempts + 1):
                outcome, wire, sent_at = await self._exchange(action, payload)
                if wire is not None:
                    done.append((None, action, wire, outcome, sent_at))  # each attempt is logged
                if outcome.kind not in ("timeout", "call_error") or attempt == attempts or self.gateway.links.get(self.id) is not self:
                    break
                await asyncio.sleep(retry_after)
            done.append((command_id, action, None, outcome, None))
            outcomes.append(outcome)
            if outcome.kind != "ok":
                log.warning("charger command failed", extra={"charger": self.id, "action": action, "outcome": outcome.kind, "error": outcome.error})
        if done:
            await asyncio.to_thread(self.gateway.finish_commands, self.charger_id, session_id, done)
        return outcomes


class GatewayServer:
    """The gateway process: OCPP websockets, the internal command endpoint, the connection table.

    ``GatewayServer(app).serve_forever()`` runs it in the foreground (the CLI);
    ``start_in_thread()`` / ``stop()`` run it in a background thread (tests,
    benchmarks: pass port 0 and read ``ws_url`` and ``internal_url``).
    Arguments left None come from the app's ``GATEWAY_*`` settings.
    """

    def __init__(self, app: Flask, host: str | None = None, port: int | None = None, internal_host: str | None = None,
                 internal_port: int | None = None, advertised_url: str | None = None):
        cfg = app.config
        self.app = app
        self.factory = app.extensions["db_sessionmaker"]
        self.host = cfg["GATEWAY_HOST"] if host is None else host
        self.port = int(cfg["GATEWAY_PORT"] if port is None else port)
        self.internal_host = cfg["GATEWAY_INTERNAL_HOST"] if internal_host is None else internal_host
        self.internal_port = int(cfg["GATEWAY_INTERNAL_PORT"] if internal_port is None else internal_port)
        self._advertised = advertised_url or cfg.get("GATEWAY_INTERNAL_URL")
        self.secret = str(cfg["GATEWAY_SECRET"])
        self.timeout = float(cfg["GATEWAY_TIMEOUT"])
        self.heartbeat_interval = int(cfg["HEARTBEAT_INTERVAL"])
        self.links: dict[str, ChargerLink] = {}  # charge point id → its connection here
        self.stats = {"connected": 0, "disconnected": 0}  # connections opened, and closed with their cleanup done
        self.ws_url: str | None = None  # ws://host:port/ocpp (chargers append /<charge point id>)
        self.internal_url: str | None = None  # what the connection table advertises
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future] = set()
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ws_server = None
        self._httpd: ThreadingHTTPServer | None = None
        if str(cfg.get("LOG_LEVEL", "INFO")).upper() != "DEBUG":
            wire_log.setLevel(logging.WARNING)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen for chargers and for commands (the ports are known afterwards)."""
        self.loop = asyncio.get_running_loop()
        self._ws_server = await serve(
            self._handler, self.host, self.port, subprotocols=[SUBPROTOCOL], process_request=self._authenticate,
            compression=None, logger=logging.getLogger("voltpay.gateway.ws"),
        )
        self.port = self._ws_server.sockets[0].getsockname()[1]
        handler = type("InternalHandler", (_InternalHandler,), {"gateway": self})
        self._httpd = ThreadingHTTPServer((self.internal_host, self.internal_port), handler)
        self._httpd.daemon_threads = True
        self.internal_port = self._httpd.server_address[1]
        self.internal_url = (self._advertised or f"http://{_reachable(self.internal_host)}:{self.internal_port}").rstrip("/")
        self.ws_url = f"ws://{_reachable(self.host)}:{self.port}/ocpp"
        threading.Thread(target=self._httpd.serve_forever, name="gateway-internal-http", daemon=True).start()
        log.info("gateway listening", extra={"ocpp": self.ws_url, "internal": self.internal_url})

    async def close(self) -> None:
        """Stop taking commands, close every charger's socket (their rows go), finish the gateway's own tasks."""
        if self._httpd is not None:
            await asyncio.to_thread(self._httpd.shutdown)
            self._httpd.server_close()
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self.timeout + 2)
            for task in pending:
                task.cancel()
        log.info("gateway stopped")

    async def run(self) -> None:
        """Start, serve until ``stop_soon()`` (or a signal), then close."""
        self._stopping = self._stopping or asyncio.Event()
        try:
            await self.start()
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.close()

    def stop_soon(self) -> None:
        """Ask the running gateway to stop (from any thread)."""
        if self.loop is not None and self._stopping is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopping.set)

    def serve_forever(self) -> None:
        """Run in the foreground until SIGINT or SIGTERM, then stop cleanly."""
        async def main():
            self._stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stopping.set)
            await self.run()

        asyncio.run(main())

    def start_in_thread(self, timeout: float = 10.0) -> GatewayServer:
        """Run the gateway in a daemon thread; return once it listens (``ws_url``, ``internal_url`` set)."""
        def target():
            try:
                asyncio.run(self.run())
            except BaseException as e:  # noqa: BLE001 - reported through start_in_thread
                self._startup_error = self._startup_error or e
                self._ready.set()

        self._thread = threading.Thread(target=target, name="ocpp-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gateway did not start in time")
        if self._startup_error is not None:
            raise RuntimeError(f"the gateway did not start: {self._startup_error}") from self._startup_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a gateway started with ``start_in_thread`` and wait for it."""
        self.stop_soon()
        if self._thread is not None:
            self._thread.join(timeout)

    def spawn(self, aw) -> None:
        """Run ``aw`` in the background; its failure is logged, and ``close()`` waits for it."""
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ connections

    async def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP Basic per charger (security profile 1) before the websocket opens."""
        path = urllib.parse.urlsplit(request.path).path
        cp_id = urllib.parse.unquote(path[len(PATH_PREFIX):]) if path.startswith(PATH_PREFIX) else ""
        if not cp_id or "/" in path[len(PATH_PREFIX):]:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not found: chargers connect to /ocpp/<charge point id>\n")
        try:
            username, password = parse_authorization_basic(request.headers["Authorization"])
        except (KeyError, InvalidHeader):
            return _unauthorized(connection, "Missing credentials\n")
        if username != cp_id:
            return _unauthorized(connection, "The user name must be the charge point id\n")
        charger_id = await asyncio.to_thread(self._check_password, cp_id, password)
        if charger_id is None:
            log.warning("charger refused", extra={"charger": cp_id, "remote": str(connection.remote_address)})
            return _unauthorized(connection, "Invalid credentials\n")
        connection.voltpay_charger = (cp_id, charger_id)  # type: ignore[attr-defined]
        return None

    def _check_password(self, cp_id: str, password: str) -> int | None:
        with self.factory() as s:
            row = read_only(s).execute(select(Charger.id, Charger.password_hash).where(Charger.charge_point_id == cp_id)).first()
        if row is None:
            verify_password(None, password)  # an unknown charger takes as long as a wrong password
            return None
        return row.id if verify_password(row.password_hash, password) else None

    async def _handler(self, ws: ServerConnection) -> None:
        cp_id, charger_id = ws.voltpay_charger  # type: ignore[attr-defined]
        link = ChargerLink(self, ws, cp_id, charger_id)
        older = self.links.get(cp_id)
        self.links[cp_id] = link
        self.stats["connected"] += 1
        try:
            await asyncio.to_thread(self._register, link)
            if older is not None:
                # Pitfall 13: the charger came back before its old socket died; that socket's cleanup leaves our row alone.
                log.info("charger reconnected; closing its older connection", extra={"charger": cp_id})
                self.spawn(older.ws.close(CloseCode.NORMAL_CLOSURE, "replaced by a newer connection"))
            await link.start()
        except websockets.ConnectionClosed:
            pass
        except Exception:
            log.exception("charger connection failed", extra={"charger": cp_id})
        finally:
            if self.links.get(cp_id) is link:
                del self.links[cp_id]
            try:
                await asyncio.shield(asyncio.to_thread(self._unregister, link))
            except Exception:
                log.exception("could not remove the connection row", extra={"charger": cp_id})
            self.stats["disconnected"] += 1

    def _register(self, link: ChargerLink, retry: bool = True) -> None:
        """Point the connection table at this socket, unless a newer connection of the charger got there first."""
        with self.factory() as s:
            row = s.get(ChargerConnection, link.charger_id, with_for_update=True)
            if row is not None and row.connected_at > link.connected_at:
                return
            if row is None:
                s.add(ChargerConnection(charger_id=link.charger_id, gateway_url=self.internal_url, connection_id=link.connection_id,
                                        connected_at=link.connected_at, last_seen=link.connected_at))
            else:
                row.gateway_url, row.connection_id = self.internal_url, link.connection_id
                row.connected_at = row.last_seen = link.connected_at
            try:
                s.commit()
            except IntegrityError:  # another gateway inserted the row at the same moment
                s.rollback()
                if retry:
                    self._register(link, retry=False)

    def _unregister(self, link: ChargerLink) -> None:
        """Remove the connection row, only if it is still this socket's."""
        with self.factory() as s:
            s.execute(delete(ChargerConnection).where(ChargerConnection.charger_id == link.charger_id,
                                                      ChargerConnection.connection_id == link.connection_id))
            s.commit()

    # ------------------------------------------------------------------ database work of commands (worker threads)

    def settle(self, session_ids: list[int]) -> None:
        """Queue settlement after the commit (inside an app context); a failure waits for the watchdog."""
        try:
            jobs.enqueue_settlements(session_ids)
        except Exception:
            log.exception("settlement not queued; the watchdog will settle", extra={"sessions": ",".join(map(str, session_ids))})

    def record_commands(self, charger_id: int, items: list[tuple[str, dict, str]], session_id: int | None,
                        requested_by: str) -> list[int | None]:
        """Insert the rows of several ``(action, payload, key)`` commands in one transaction; None for a key used before."""
        if len(items) == 1:
            action, payload, key = items[0]
            return [self.record_command(charger_id, action, payload, key, session_id, requested_by)]
        with self.factory() as s:
            keys = [key for _a, _p, key in items]
            used = set(s.scalars(select(ChargeCommand.idempotency_key).where(ChargeCommand.idempotency_key.in_(keys))))
            rows = {key: ChargeCommand(charger_id=charger_id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                                       idempotency_key=key, requested_by=requested_by[:64], status=CommandStatus.SENDING)
                    for action, payload, key in items if key not in used}
            s.add_all(rows.values())
            try:
                s.commit()
            except IntegrityError:  # another process took one of the keys meanwhile: one at a time
                s.rollback()
                return [self.record_command(charger_id, action, payload, key, session_id, requested_by) for action, payload, key in items]
            return [rows[key].id if key in rows else None for key in keys]

    def finish_commands(self, charger_id: int, session_id: int | None,
                        done: list[tuple[int | None, str, dict | None, CallOutcome, dt.datetime | None]]) -> None:
        """In one transaction: ``(command id, action, wire, outcome, sent at)`` records a command's outcome when the id is
        given and logs the exchange in ``ocpp_messages`` when the wire is."""
        with self.factory() as s:
            for command_id, action, wire, outcome, sent_at in done:
                if command_id is not None:
                    self._finish(s, command_id, outcome)
                if wire is not None:
                    session_id = self._log(s, charger_id, session_id, action, wire, outcome, sent_at)
            s.commit()

    def record_command(self, charger_id: int, action: str, payload: dict, key: str, session_id: int | None,
                       requested_by: str) -> int | None:
        """Insert the command row (status sending); None when the key was used before."""
        with self.factory() as s:
            if s.scalar(select(ChargeCommand.id).where(ChargeCommand.idempotency_key == key)) is not None:
                return None
            row = ChargeCommand(charger_id=charger_id, session_id=session_id, action=action, payload=service.dumps_json(payload),
                                idempotency_key=key, requested_by=requested_by[:64], status=CommandStatus.SENDING)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return None
            return row.id

    def finish_command(self, command_id: int, outcome: CallOutcome) -> None:
        """Record a command's outcome."""
        with self.factory() as s:
            self._finish(s, command_id, outcome)
            s.commit()

    @staticmethod
    def _finish(s, command_id: int, outcome: CallOutcome) -> None:
        row = s.get(ChargeCommand, command_id)
        row.status = outcome.command_status()
        row.response = service.dumps_json(outcome.response if outcome.kind == "ok" else {"error": outcome.error})
        row.answered_at = utcnow()

    def log_command(self, charger_id: int, session_id: int | None, action: str, wire: dict, outcome: CallOutcome,
                    sent_at: dt.datetime) -> None:
        """Log a command and the charger's answer in ``ocpp_messages``."""
        with self.factory() as s:
            self._log(s, charger_id, session_id, action, wire, outcome, sent_at)
            s.commit()

    @staticmethod
    def _log(s, charger_id: int, session_id: int | None, action: str, wire: dict, outcome: CallOutcome, sent_at: dt.datetime) -> int | None:
        if session_id is not None and s.get(ChargingSession, session_id) is None:
            session_id = None
        s.add(OcppMessage(charger_id=charger_id, session_id=session_id, direction="out", action=action,
                          payload=service.dumps_json(wire), at=sent_at))
        if outcome.kind == "ok":
            s.add(OcppMessage(charger_id=charger_id, session_id=session_id, direction="in", action=action,
                              payload=service.dumps_json(snake_to_camel_case(outcome.response)), at=utcnow()))
        elif outcome.kind == "call_error":
            s.add(OcppMessage(charger_id=charger_id, session_id=session_id, direction="in", action="CallError",
                              payload=service.dumps_json({"error": outcome.error}), at=utcnow()))
        return session_id

    # ------------------------------------------------------------------ the internal endpoint's entry (HTTP threads)

    def call_from_thread(self, cp_id: str, action: str, payload: dict, session_id: int | None = None) -> CallOutcome:
        """Run a command on the loop from another thread and wait for its outcome."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return CallOutcome("unavailable", error="the gateway is stopping")
        try:
            future = asyncio.run_coroutine_threadsafe(self._call(cp_id, action, payload, session_id), loop)
        except RuntimeError:
            return CallOutcome("unavailable", error="the gateway is stopping")
        try:
            return future.result(timeout=self.timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return CallOutcome("timeout", error="no outcome in time")
        except concurrent.futures.CancelledError:
            return CallOutcome("unavailable", error="the gateway is stopping")

    async def _call(self, cp_id: str, action: str, payload: dict, session_id: int | None) -> CallOutcome:
        link = self.links.get(cp_id)
        if link is None:
            return CallOutcome("not_connected", error=f"charger {cp_id} is not connected to this gateway")
        return await link.run_call(action, payload, session_id=session_id)


def _unauthorized(connection: ServerConnection, text: str) -> Response:
    response = connection.respond(HTTPStatus.UNAUTHORIZED, text)
    response.headers["WWW-Authenticate"] = build_www_authenticate_basic("Voltpay OCPP")
    return response


def _reachable(host: str) -> str:
    """A host name others can use for an address we listen on (a wildcard address names this machine)."""
    if host in ("", "0.0.0.0", "::"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


class _InternalHandler(BaseHTTPRequestHandler):
    """``POST /cp/<charge_point_id>/call`` and ``GET /healthz`` of the internal endpoint."""

    gateway: GatewayServer
    server_version = "VoltpayGateway/1"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # keep-alive: the answer's small writes must not wait for the client's delayed ACK (40 ms)

    def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
        """Health check: the gateway runs; how many chargers it holds."""
        if urllib.parse.urlsplit(self.path).path == "/healthz":
            self._json(200, {"status": "ok", "chargers": len(self.gateway.links)})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        """Run a command on a charger held here."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return self._json(411, {"error": "Content-Length required"})
        if length > MAX_BODY:
            self.close_connection = True
            return self._json(413, {"error": "request too large"})
        raw = self.rfile.read(length)
        given = self.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.gateway.secret.encode()):
            return self._json(401, {"error": f"the {SECRET_HEADER} header is missing or wrong"})
        match = _CALL_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
        if match is None:
            return self._json(404, {"error": "not found"})
        try:
            body = json.loads(raw)
        except ValueError:
            return self._json(400, {"error": "the body is not JSON"})
        if not isinstance(body, dict) or not isinstance(body.get("action"), str) or not isinstance(body.get("payload", {}), dict):
            return self._json(400, {"error": 'expected {"action": "...", "payload": {...}}'})
        session_id = body.get("session_id")
        if session_id is not None and (not isinstance(session_id, int) or isinstance(session_id, bool)):
            return self._json(400, {"error": "session_id must be an integer"})
        outcome = self.gateway.call_from_thread(urllib.parse.unquote(match.group(1)), body["action"], body.get("payload", {}), session_id)
        self._json(outcome.http_status, outcome.body())

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        """Access log at DEBUG (commands are in ocpp_messages and charge_commands)."""
        log.debug("internal http: " + format, *args)
