"""A prepaid meter's relay and alerts: disconnect and reconnect commands POSTed to a real local HTTP receiver that
checks the signature, retries with backoff, emergency credit, and the low-balance email through a real SMTP server.

Balances move through ``payments.ledger`` transfers on the meter wallet, each followed by ``balance_changed`` in
the same transaction, as the reading ingest and the top-up do. Jobs run in immediate mode (the conftest's
default): the commit hands a command to the delivery job, which POSTs it in the committing thread, so the
receiver has it when the commit returns. Later attempts are driven by calling ``deliver_due`` with a later
``now``; nothing waits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from payments.base import utcnow
from payments.ledger import AccountKind, InsufficientFunds, LedgerAccount, get_account, transfer
from payments.money import Money
from tests.conftest import free_port
from webapp.meters import jobs, relay
from webapp.meters.models import MeterCollector, RelayCommand, Tenant
from webapp.models import Meter, Operator, Site
from webapp.notifications.models import SentEmail

SECRET = "whsec_collector_test_0123456789"
TENANT = "tenant@example.com"


# --------------------------------------------------------------------------- a collector's webhook receiver


class Receiver:
    """A collector's webhook endpoint: checks each request's signature as a vendor would, answers as scripted."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: list[int] = []  # status codes to answer, in order; 200 once they run out
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's hook name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                header = self.headers.get("Voltpay-Signature", "")
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "valid": _vendor_check(SECRET, body, header)})
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok": true}' if status < 300 else b'{"error": "busy"}')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/relay"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def commands(self) -> list[dict]:
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests]


def _vendor_check(secret: str, body: bytes, header: str) -> bool:
    """The signature check written from docs/collector-webhooks.md, independently of our own code."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if abs(time.time() - int(fields.get("t", "0"))) > 300:
        return False
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


@pytest.fixture
def receiver():
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


# --------------------------------------------------------------------------- a building with one prepaid meter


def db(app):
    return app.extensions["db_sessionmaker"]()


@pytest.fixture
def meter(app, receiver):
    """A prepaid meter of a tenant (threshold 10.00, no emergency credit) whose collector posts to the receiver."""
    with app.extensions["db_sessionmaker"].begin() as s:
        op = Operator(name="Op", legal_name="Op S.L.")
        s.add(op)
        s.flush()
        site = Site(operator_id=op.id, name="Dorm", time_zone="Europe/Madrid", currency="EUR")
        collector = MeterCollector(operator_id=op.id, name="DCU-1", client_id="dcu-1", client_secret_hash="x",
                                   webhook_url=receiver.url, webhook_secret=SECRET)
        s.add_all([site, collector])
        s.flush()
        tenant = Tenant(site_id=site.id, name="Ana Ruiz", contact_email=TENANT, unit="2B", currency="EUR",
                        low_balance_threshold_minor=1000, emergency_credit_minor=0)
        s.add(tenant)
        s.flush()
        m = Meter(site_id=site.id, meter_code="M2B", serial="SN-0042", prepaid=True, tenant_id=tenant.id, collector_id=collector.id)
        s.add(m)
    return m


def move(app, meter_id: int, minor: int, now: dt.datetime | None = None) -> None:
    """Top up (``minor`` > 0) or consume (``minor`` < 0) on the meter wallet, then apply the rules, in one transaction."""
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        m = s.get(Meter, meter_id)
        wallet = relay.meter_wallet(s, m, "EUR")
        other = get_account(s, AccountKind.PROVIDER_CLEARING if minor > 0 else AccountKind.REVENUE, "EUR")
        debit, credit = (other, wallet) if minor > 0 else (wallet, other)
        transfer(s, idempotency_key=f"test:{uuid.uuid4()}", description="test", debit=debit, credit=credit, amount=Money(abs(minor), "EUR"))
        relay.balance_changed(s, m, now or utcnow())


def meter_row(app, meter_id: int) -> Meter:
    with db(app) as s:
        return s.get(Meter, meter_id)


def commands(app) -> list[RelayCommand]:
    with db(app) as s:
        return list(s.scalars(select(RelayCommand).order_by(RelayCommand.id)))


def emails(app, template: str | None = None) -> list[SentEmail]:
    with db(app) as s:
        q = select(SentEmail).order_by(SentEmail.id)
        return list(s.scalars(q.where(SentEmail.template == template) if template else q))


def status(app, meter_id: int) -> dict:
    with app.test_request_context(), db(app) as s:
        return relay.relay_status(s.get(Meter, meter_id), s)


def mail(mailbox, word: str, count: int = 1) -> list:
    """The messages to the tenant whose subject contains ``word`` (the low-balance email comes along on the way down)."""
    mailbox.wait_for(TENANT)
    return [m for m in mailbox.to(TENANT) if word in str(m["Subject"])]


def body(msg) -> str:
    return msg.get_body(("plain",)).get_content().replace("\r\n", "\n")


def set_webhook(app, url: str) -> None:
    with app.extensions["db_sessionmaker"].begin() as s:
        s.scalar(select(MeterCollector)).webhook_url = url


# --------------------------------------------------------------------------- disconnect and reconnect


def test_the_credit_running_out_sends_one_signed_disconnect_and_tells_the_tenant(app, meter, receiver, mailbox):
    move(app, meter.id, 500)
    move(app, meter.id, -300)
    assert receiver.requests == [] and commands(app) == []

    move(app, meter.id, -200)  # balance 0.00: no emergency credit, so the power goes off

    [req] = receiver.requests
    assert req["valid"] and req["path"] == "/relay"
    assert req["headers"]["Content-Type"] == "application/json"
    [cmd] = commands(app)
    sent = json.loads(req["body"])
    assert sent == {"id": cmd.id, "meter_code": "M2B", "serial": "SN-0042", "action": "disconnect",
                    "reason": "balance_exhausted", "created_at": cmd.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert (cmd.status, cmd.attempts, cmd.last_error) == ("delivered", 1, None) and cmd.delivered_at is not None
    assert req["headers"]["Idempotency-Key"] == cmd.idempotency_key
    m = meter_row(app, meter.id)
    assert m.relay_state == "disconnected" and m.relay_changed_at is not None

    [msg] = mail(mailbox, "is off")
    assert str(msg["Subject"]) == "The power of meter M2B is off: the credit is used up"
    text = body(msg)
    assert "Hello Ana Ruiz," in text and "balance €0.00" in text
    assert "Top up any amount and the power comes back on" in text and "http://localhost/m/M2B" in text

    # Idempotent: the rules applied again (another reading at zero) send nothing more.
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay.balance_changed(s, s.get(Meter, meter.id), utcnow())
        relay.balance_changed(s, s.get(Meter, meter.id), utcnow())
    assert len(commands(app)) == 1 and len(receiver.requests) == 1
    with app.app_context(), db(app) as s:
        with pytest.raises(InsufficientFunds):  # and the ledger refuses to go below zero without emergency credit
            transfer(s, idempotency_key="over", description="t", debit=relay.meter_wallet(s, s.get(Meter, meter.id), "EUR"),
                     credit=get_account(s, AccountKind.REVENUE, "EUR"), amount=Money(1, "EUR"))


def test_a_top_up_above_zero_reconnects(app, meter, receiver, mailbox):
    move(app, meter.id, 100)
    move(app, meter.id, -100)
    assert meter_row(app, meter.id).relay_state == "disconnected"

    move(app, meter.id, 2000)

    first, second = receiver.commands()
    assert (first["action"], second["action"]) == ("disconnect", "reconnect")
    assert second["id"] > first["id"] and second["reason"] == "topped_up"
    assert all(r["valid"] for r in receiver.requests)
    assert meter_row(app, meter.id).relay_state == "connected"
    assert [c.status for c in commands(app)] == ["delivered", "delivered"]
    assert status(app, meter.id)["pending"] is None

    back = mail(mailbox, "back on")
    assert [str(m["Subject"]) for m in back] == ["The power of meter M2B is back on"]
    assert "Credit now: €20.00." in body(back[0])
    move(app, meter.id, 500)  # more money while connected: nothing to send
    assert len(receiver.requests) == 2


def test_a_collector_answering_500_is_retried_with_the_same_command_until_it_accepts(app, meter, receiver, mailbox):
    receiver.answers = [500, 503]
    move(app, meter.id, 100)
    t0 = utcnow()
    move(app, meter.id, -100, now=t0)

    [cmd] = commands(app)
    assert (cmd.status, cmd.attempts) == ("pending", 1) and cmd.last_error.startswith("HTTP 500")
    assert cmd.next_attempt_at > t0
    shown = status(app, meter.id)
    assert shown["state"] == "disconnecting" and shown["label"] == "Switching the power off"
    assert shown["pending"]["action"] == "disconnect" and shown["pending"]["status"] == "pending" and shown["pending"]["attempts"] == 1
    assert mail(mailbox, "is off") == []  # not cut yet: nothing to tell

    with app.app_context():
        assert jobs.deliver_due(cmd.next_attempt_at - dt.timedelta(seconds=1)) == {}  # not due yet
        first_retry_at = commands(app)[0].next_attempt_at
        assert jobs.deliver_due(first_retry_at) == {cmd.id: "pending"}  # 503
        again = commands(app)[0]
        assert again.attempts == 2 and again.next_attempt_at - first_retry_at == jobs.backoff(2)  # twice the first wait
        assert jobs.deliver_due(again.next_attempt_at) == {cmd.id: "delivered"}

    assert len(receiver.requests) == 3 and all(r["valid"] for r in receiver.requests)
    assert len({r["body"] for r in receiver.requests}) == 1  # the same command, the same id, every time
    assert commands(app)[0].attempts == 3
    assert meter_row(app, meter.id).relay_state == "disconnected"
    assert len(mail(mailbox, "is off")) == 1


def test_a_collector_that_is_down_counts_attempts_then_fails_visibly_and_can_be_retried(app, meter, receiver):
    set_webhook(app, f"http://127.0.0.1:{free_port()}/relay")  # nobody listens there
    move(app, meter.id, 100)
    move(app, meter.id, -100)

    with app.app_context():
        while (cmd := commands(app)[0]).status == "pending":
            assert jobs.deliver_due(cmd.next_attempt_at) == {cmd.id: cmd.status if cmd.attempts + 1 < jobs.MAX_ATTEMPTS else "failed"}
    assert cmd.status == "failed" and cmd.attempts == jobs.MAX_ATTEMPTS and cmd.next_attempt_at is None
    assert "ConnectionError" in cmd.last_error
    with app.app_context():
        assert jobs.deliver_due(utcnow() + dt.timedelta(days=1)) == {}  # given up: no more attempts
    shown = status(app, meter.id)
    assert shown["state"] == "disconnecting" and shown["pending"]["status"] == "failed"

    set_webhook(app, receiver.url)  # the operator fixes the collector and retries
    result = app.test_cli_runner().invoke(args=["meters", "relay-retry", "--command-id", str(cmd.id)])
    assert result.exit_code == 0, result.output
    assert [c["id"] for c in receiver.commands()] == [cmd.id] and receiver.requests[0]["valid"]
    assert meter_row(app, meter.id).relay_state == "disconnected"
    again = app.test_cli_runner().invoke(args=["meters", "relay-retry", "--command-id", str(cmd.id)])
    assert again.exit_code != 0 and "delivered" in again.output


def test_a_top_up_while_the_disconnect_is_still_retrying_supersedes_it(app, meter, receiver, mailbox):
    receiver.answers = [500]
    move(app, meter.id, 100)
    move(app, meter.id, -100)
    move(app, meter.id, 300)

    disconnect, reconnect = commands(app)
    assert (disconnect.status, reconnect.status) == ("superseded", "delivered")
    assert [c["action"] for c in receiver.commands()] == ["disconnect", "reconnect"]
    assert meter_row(app, meter.id).relay_state == "connected"
    with app.app_context():
        assert jobs.deliver_due(utcnow() + dt.timedelta(hours=1)) == {}  # the old disconnect is never sent again
    assert len(mail(mailbox, "back on")) == 1
    assert mail(mailbox, "is off") == []  # the cut never happened: no "power off" email


def test_a_rolled_back_transaction_sends_no_command(app, meter, receiver):
    move(app, meter.id, 100)
    with app.app_context(), db(app) as s:
        m = s.get(Meter, meter.id)
        transfer(s, idempotency_key="gone", description="t", debit=relay.meter_wallet(s, m, "EUR"),
                 credit=get_account(s, AccountKind.REVENUE, "EUR"), amount=Money(100, "EUR"))
        relay.balance_changed(s, m, utcnow())
        assert m.relay_state == "disconnecting"
        s.rollback()
    assert commands(app) == [] and receiver.requests == []
    assert meter_row(app, meter.id).relay_state == "connected"


def test_an_operator_disconnect_is_not_undone_by_a_top_up(app, meter, receiver):
    move(app, meter.id, 100)
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay._issue(s, s.get(Meter, meter.id), relay.RelayAction.DISCONNECT, "operator", utcnow())
    move(app, meter.id, 1000)
    assert [(c["action"], c["reason"]) for c in receiver.commands()] == [("disconnect", "operator")]
    assert meter_row(app, meter.id).relay_state == "disconnected"


# --------------------------------------------------------------------------- emergency credit


def wallet_account(app, meter_id: int) -> LedgerAccount:
    with db(app) as s:
        return s.scalar(select(LedgerAccount).where(LedgerAccount.owner == f"meter:{meter_id}"))


def test_emergency_credit_lets_the_balance_go_below_zero_before_the_power_is_cut(app, meter, receiver):
    tenant_id = meter.tenant_id
    move(app, meter.id, 200)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["meters", "emergency-credit", "--tenant-id", str(tenant_id), "--amount", "5.00", "--by", "ops"])
    assert result.exit_code == 0, result.output
    assert wallet_account(app, meter.id).overdraft_limit_minor == 500

    move(app, meter.id, -500)  # -3.00: on emergency credit, power still on
    assert commands(app) == [] and meter_row(app, meter.id).relay_state == "connected"
    move(app, meter.id, -200)  # -5.00: the emergency credit is used up
    assert [c["action"] for c in receiver.commands()] == ["disconnect"]
    with app.app_context(), db(app) as s, pytest.raises(InsufficientFunds):
        transfer(s, idempotency_key="past", description="t", debit=relay.meter_wallet(s, s.get(Meter, meter.id), "EUR"),
                 credit=get_account(s, AccountKind.REVENUE, "EUR"), amount=Money(1, "EUR"))

    move(app, meter.id, 400)  # -1.00: the emergency credit is repaid first, the power stays off
    assert len(receiver.requests) == 1 and meter_row(app, meter.id).relay_state == "disconnected"
    move(app, meter.id, 200)  # +1.00
    assert [c["action"] for c in receiver.commands()] == ["disconnect", "reconnect"]
    assert meter_row(app, meter.id).relay_state == "connected"

    for amount, message in (("-1", "cannot be negative"), ("20.01", "at most 20.00 EUR"), ("abc", "not an amount")):
        bad = runner.invoke(args=["meters", "emergency-credit", "--tenant-id", str(tenant_id), "--amount", amount])
        assert bad.exit_code != 0 and message in bad.output, (amount, bad.output)
    missing = runner.invoke(args=["meters", "emergency-credit", "--tenant-id", "999", "--amount", "1"])
    assert missing.exit_code != 0 and "no tenant 999" in missing.output


def test_removing_emergency_credit_in_use_cuts_the_power_and_stops_further_debits(app, meter, receiver):
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay.set_emergency_credit(s, s.get(Tenant, meter.tenant_id), Money(500, "EUR"), "ops")
    move(app, meter.id, 100)
    move(app, meter.id, -400)  # -3.00
    assert commands(app) == []

    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay.set_emergency_credit(s, s.get(Tenant, meter.tenant_id), Money(0, "EUR"), "ops")
    assert [c["action"] for c in receiver.commands()] == ["disconnect"]
    assert wallet_account(app, meter.id).overdraft_limit_minor == 300  # held at what is used: no further debit passes
    with app.app_context(), db(app) as s, pytest.raises(InsufficientFunds):
        transfer(s, idempotency_key="more", description="t", debit=relay.meter_wallet(s, s.get(Meter, meter.id), "EUR"),
                 credit=get_account(s, AccountKind.REVENUE, "EUR"), amount=Money(1, "EUR"))

    move(app, meter.id, 400)  # +1.00: reconnected, and the overdraft is back to the tenant's setting
    assert [c["action"] for c in receiver.commands()] == ["disconnect", "reconnect"]
    assert wallet_account(app, meter.id).overdraft_limit_minor == 0
    with app.app_context(), db(app) as s:
        with pytest.raises(relay.EmergencyCreditError) as e:
            relay.set_emergency_credit(s, s.get(Tenant, meter.tenant_id), Money(100, "USD"), "ops")
        assert e.value.code == "currency_mismatch"


# --------------------------------------------------------------------------- the low-balance email


def test_one_low_balance_email_throttled_and_re_armed_after_a_top_up(app, meter, receiver, mailbox):
    t0 = utcnow()
    move(app, meter.id, 2000, now=t0)
    move(app, meter.id, -1100, now=t0)  # 9.00 < 10.00

    [msg] = mailbox.wait_for(TENANT)
    assert str(msg["Subject"]) == "Meter M2B is running low: €9.00 left"
    text = body(msg)
    assert "The credit of meter M2B is €9.00, below €10.00." in text
    assert "When it runs out the power is switched off until you top up." in text
    assert "http://localhost/m/M2B" in text
    with db(app) as s:
        assert s.get(Tenant, meter.tenant_id).low_balance_alerted_at is not None

    move(app, meter.id, -100, now=t0)  # 8.00: still the same low spell
    assert len(emails(app, "meter_low_balance")) == 1

    move(app, meter.id, 1000, now=t0)  # 18.00: above the threshold again, the alert is re-armed
    with db(app) as s:
        assert s.get(Tenant, meter.tenant_id).low_balance_alerted_at is None
    move(app, meter.id, -900, now=t0 + dt.timedelta(hours=1))  # 9.00 again, but within 24 h of the last email
    assert len(emails(app, "meter_low_balance")) == 1

    move(app, meter.id, 500, now=t0 + dt.timedelta(hours=2))  # 14.00: re-armed
    move(app, meter.id, -600, now=t0 + dt.timedelta(hours=25))  # 8.00, a day later: news again
    rows = emails(app, "meter_low_balance")
    assert [(r.to, r.status) for r in rows] == [(TENANT, "sent"), (TENANT, "sent")]
    assert len(mailbox.wait_for(TENANT, 2)) == 2
    assert receiver.requests == []  # never near zero


def test_the_low_balance_email_mentions_the_emergency_credit(app, meter, mailbox):
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay.set_emergency_credit(s, s.get(Tenant, meter.tenant_id), Money(300, "EUR"), "ops")
    move(app, meter.id, 900)
    [msg] = mailbox.wait_for(TENANT)
    assert "you can use €3.00 of emergency credit" in body(msg)


# --------------------------------------------------------------------------- the signature


def test_the_signature_scheme():
    payload = b'{"id":1}'
    header = relay.sign("s3cret", payload, 1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    assert v1 == "v1=" + hmac.new(b"s3cret", b"1700000000." + payload, hashlib.sha256).hexdigest()
    assert relay.verify_signature("s3cret", payload, header, now=1_700_000_100)
    assert not relay.verify_signature("s3cret", payload, header, now=1_700_000_400)  # too old: a replay
    assert not relay.verify_signature("other", payload, header, now=1_700_000_000)
    assert not relay.verify_signature("s3cret", payload + b" ", header, now=1_700_000_000)
    assert not relay.verify_signature("s3cret", payload, "garbage", now=1_700_000_000)
    # A receiver accepts any v1 that matches (room for rotating the secret).
    assert relay.verify_signature("s3cret", payload, f"t=1700000000,v1=00,{v1}", now=1_700_000_000)


def test_backoff_doubles_and_is_capped():
    assert [jobs.backoff(n).total_seconds() for n in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1800, 1800]


# --------------------------------------------------------------------------- concurrent debits and top-ups


def test_concurrent_debits_and_top_ups_leave_the_relay_matching_the_balance(app, meter, receiver):
    """Readings and top-ups racing on one meter (truly concurrent on PostgreSQL): the commands alternate, the last one wins."""
    from concurrent.futures import ThreadPoolExecutor

    move(app, meter.id, 100)

    def worker(n: int) -> None:
        for i in range(12):
            try:
                move(app, meter.id, 100 if i % 2 else -100)  # every thread starts with a debit: the first takes it to zero
            except InsufficientFunds:
                pass  # the wallet was empty at that moment: the reading would wait for a top-up

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    with app.app_context():
        jobs.deliver_due(utcnow() + dt.timedelta(hours=3))

    with db(app) as s:
        balance = relay.meter_balance(s, s.get(Meter, meter.id), "EUR").amount
    cmds = commands(app)
    actions = [c.action.value for c in cmds]
    assert balance >= 100 and len(actions) >= 2  # it went to zero at the first debit and ended above
    assert all(a != b for a, b in zip(actions, actions[1:])), actions  # never two disconnects (or reconnects) in a row
    state = meter_row(app, meter.id).relay_state
    if balance > 0:
        assert state == "connected" and (not cmds or actions[-1] == "reconnect")
    else:
        assert state == "disconnected" and actions[-1] == "disconnect"
    assert cmds == [] or cmds[-1].status == "delivered"
    assert all(r["valid"] for r in receiver.requests)


def test_a_closed_account_is_switched_off_whatever_its_balance_and_not_emailed(app, meter, receiver, mailbox):
    from webapp.meters.models import TenantState

    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        relay.set_emergency_credit(s, s.get(Tenant, meter.tenant_id), Money(500, "EUR"), "ops")
    move(app, meter.id, 2000)
    with app.app_context(), app.extensions["db_sessionmaker"].begin() as s:
        s.get(Tenant, meter.tenant_id).state = TenantState.CLOSED
        s.flush()
        relay.balance_changed(s, s.get(Meter, meter.id), utcnow())
    assert [(c["action"], c["reason"]) for c in receiver.commands()] == [("disconnect", "account_closed")]
    assert meter_row(app, meter.id).relay_state == "disconnected"
    move(app, meter.id, 100)  # money arriving later does not switch a closed account back on
    assert len(receiver.requests) == 1
    assert [e.template for e in emails(app)] == ["meter_low_balance"]  # from before (no credit yet); nothing about the relay
