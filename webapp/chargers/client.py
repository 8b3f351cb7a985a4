"""The web side of charger commands: ``GatewayClient`` implements ``webapp.charging.service.Gateway``.

A command is a ``charge_commands`` row first (the audit trail, unique by its
idempotency key), committed before anything leaves; then the connection
table says which gateway holds the charger, and that gateway's internal
endpoint runs the OCPP call (``webapp.chargers.gateway``). The outcome is
written to the row and returned. No database transaction stays open over the
network call, so a slow charger never holds a lock (on SQLite not even the
write lock every transaction takes).

Payloads are snake_case, as the ``ocpp`` library names the fields, in the
row and on the wire; so is the charger's answer in ``CommandResult.response``.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse

import requests
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from payments.base import utcnow
from webapp.charging.models import ChargeCommand, ChargerConnection, CommandStatus
from webapp.charging.service import CommandResult, Gateway, dumps_json
from webapp.models import Charger

SECRET_HEADER = "X-Voltpay-Gateway-Secret"
# What a charger answers when it does what was asked: RemoteStart/Stop, ChangeConfiguration, Reset and
# TriggerMessage say "Accepted", UnlockConnector "Unlocked". Anything else (Rejected, RebootRequired,
# NotSupported, NotImplemented, UnlockFailed) is a refusal.
DONE_ANSWERS = frozenset({"Accepted", "Unlocked"})

log = logging.getLogger("voltpay.chargers")


def command_status(answer: str | None) -> CommandStatus:
    """The command status for a charger's ``status`` answer."""
    return CommandStatus.ACCEPTED if answer in DONE_ANSWERS else CommandStatus.REJECTED


class GatewayClient(Gateway):
    """Sends commands to chargers through the gateway that holds each one (see the module docstring)."""

    def __init__(self, *, secret: str, timeout: float):
        self.secret = secret
        self.timeout = timeout  # the gateway's own wait for the charger; the HTTP call allows 3 s more
        self._local = threading.local()

    def _http(self) -> requests.Session:
        # One keep-alive session per thread (requests.Session is not meant to be shared across threads).
        http = getattr(self._local, "session", None)
        if http is None:
            http = self._local.session = requests.Session()
        return http

    def call(self, s: Session, charger: Charger, action: str, payload: dict, *, key: str, session_id: int | None = None,
             requested_by: str = "system") -> CommandResult:
        """Record the command, send it through the gateway holding the charger, record and return the answer.

        Commits ``s`` (before the network call and after it). A key seen before
        returns the stored outcome without sending again (one still being sent
        elsewhere reads as TIMEOUT: its outcome is not known yet). No
        connection → NOT_CONNECTED; the charger refused → REJECTED; no answer
        in time → TIMEOUT; a CallError or an unreachable gateway → ERROR.
        """
        existing = s.scalar(select(ChargeCommand).where(ChargeCommand.idempotency_key == key))
        if existing is not None:
            s.commit()
            return _stored(existing)
        row = ChargeCommand(charger_id=charger.id, session_id=session_id, action=action, payload=dumps_json(payload), idempotency_key=key,
                            requested_by=requested_by[:64], status=CommandStatus.SENDING, created_at=utcnow())
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
        except IntegrityError:  # the same key at the same moment: the other caller sends it
            existing = s.scalar(select(ChargeCommand).where(ChargeCommand.idempotency_key == key))
            s.commit()
            return _stored(existing)
        connection = s.get(ChargerConnection, charger.id)
        gateway_url = connection.gateway_url if connection is not None else None
        cp_id = charger.charge_point_id
        s.commit()  # the row is visible, and no transaction is open while the charger thinks
        if gateway_url is None:
            status, response = CommandStatus.NOT_CONNECTED, {"error": "the charger is not connected"}
        else:
            status, response = self._post(gateway_url, cp_id, action, payload, session_id)
        row.status, row.response, row.answered_at = status, dumps_json(response), utcnow()
        s.commit()
        if status not in (CommandStatus.ACCEPTED, CommandStatus.REJECTED):
            log.warning("charger command not delivered", extra={"charger": cp_id, "action": action, "status": status.value})
        return CommandResult(status, response)

    def _post(self, gateway_url: str, cp_id: str, action: str, payload: dict, session_id: int | None) -> tuple[CommandStatus, dict]:
        url = f"{gateway_url.rstrip('/')}/cp/{urllib.parse.quote(cp_id, safe='')}/call"
        body = {"action": action, "payload": payload}
        if session_id is not None:
            body["session_id"] = session_id
        try:
            r = self._http().post(url, json=body, headers={SECRET_HEADER: self.secret}, timeout=(3.0, self.timeout + 3))
        except requests.ReadTimeout:
            return CommandStatus.TIMEOUT, {"error": "the gateway did not answer in time"}
        except requests.RequestException as e:
            return CommandStatus.ERROR, {"error": f"the gateway cannot be reached: {type(e).__name__}"}
        try:
            answer = r.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if r.status_code == 200:
            return command_status(answer.get("status")), answer.get("response") or {}
        error = {"error": answer.get("error") or f"HTTP {r.status_code}"}
        if r.status_code == 404:
            return CommandStatus.NOT_CONNECTED, error
        if r.status_code == 504:
            return CommandStatus.TIMEOUT, error
        return CommandStatus.ERROR, error


def _stored(row: ChargeCommand) -> CommandResult:
    if row.status == CommandStatus.SENDING:
        return CommandResult(CommandStatus.TIMEOUT, None)
    try:
        response = json.loads(row.response) if row.response else None
    except ValueError:
        response = None
    return CommandResult(row.status, response)


def gateway_client(app: Flask) -> GatewayClient:
    """The app's charger gateway client, from its GATEWAY_* settings."""
    return GatewayClient(secret=str(app.config["GATEWAY_SECRET"]), timeout=float(app.config["GATEWAY_TIMEOUT"]))
