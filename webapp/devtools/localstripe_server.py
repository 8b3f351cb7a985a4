"""localstripe for the demo and the tests: in memory only, on 127.0.0.1, its port printed on stdout.

The ``localstripe`` CLI binds ``::`` and pickles its whole store to one shared
file on every write; this server keeps the store in RAM (see
shared/notes/localstripe.md). Run it with
``python -m webapp.devtools.localstripe_server [PORT]`` (0 or nothing: a free
port), or from Python with ``start()``, which also waits until it answers.

localstripe is a test double for Stripe: it accepts any ``sk_*`` key, ignores
Idempotency-Key and has no Connect. Only the demo (``flask demo``) and the
tests start it; the app talks to it through ``STRIPE_LOCALSTRIPE=1``.

The Connect addition (``add_transfers``): a minimal Connect ``/v1/transfers``
(create and retrieve), so payouts to connected accounts run through the real
SDK call in the demo and the tests. It keeps transfers in localstripe's
in-memory store (wiped with the rest by ``DELETE /_config/data``), checks that
``destination`` looks like ``acct_...`` and ``amount`` is a positive integer,
and, unlike the rest of localstripe, honours ``Idempotency-Key`` (the same
key returns the first transfer), as Stripe does. Connected accounts do not
exist here: any ``acct_...`` is accepted, except ids starting ``acct_invalid``,
which answer 400 like an unknown account on Stripe (to test a refused transfer).

Reconciliation's addition (``add_balance_transactions``): ``GET
/v1/balance_transactions`` answers as Stripe does (``created`` filters,
captured amounts, no released hold remainders) and ``POST /_config/fees`` sets
a transaction's fee for the tests; see its docstring. Transfers made by
``add_transfers`` have no balance transaction here.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STARTUP_TIMEOUT = 10.0  # seconds; it is ready in about 0.3 s


def serve(port: int = 0) -> None:
    """Run localstripe in this process until it is stopped (SIGTERM or Ctrl-C)."""
    import socket

    from aiohttp import web
    import localstripe.resources as res

    res.Store.dump_to_disk = lambda self: None  # in memory only
    from localstripe.server import app  # imported after the patch

    add_transfers(app, res.store)
    add_balance_transactions(app, res)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None)


def add_balance_transactions(app, res) -> None:
    """``GET /v1/balance_transactions`` as Stripe answers it, and ``POST /_config/fees`` to set a fee (tests).

    localstripe keeps a balance transaction per charge and per refund, but its
    list takes no ``created``/``type`` filter, keeps the whole hold as the
    charge's amount after a partial capture and lists the released rest of
    that hold as a refund. The list is re-derived here from the stored charges
    and refunds, so the SDK's ``BalanceTransaction.list(created=..., expand=
    ["data.source"])`` with auto-paging sees what Stripe would show:

    * a captured charge's transaction has the captured amount (the charge's
      amount less the refunds without a ``payment_intent``: localstripe's
      released remainder, see payments/providers/stripe.py);
    * those released remainders are not listed; refunds are negative;
    * ``fee`` is 0 unless ``POST /_config/fees`` (form ``source=pi_|ch_|re_...``
      and ``fee=<minor units>``) set it; ``net = amount − fee``.
    """
    from aiohttp import web

    store, UserError = res.store, res.UserError

    def charge_of(source: str):
        if source.startswith("pi_"):
            pi = store.get("payment_intent:" + source)
            source = pi.latest_charge.id if pi is not None and pi.latest_charge is not None else ""
        return store.get("charge:" + source)

    def visible(txn) -> bool:
        if txn.source.startswith("re_"):
            refund = store.get("refund:" + txn.source)
            return refund is not None and refund.payment_intent is not None
        if txn.source.startswith("ch_"):
            charge = store.get("charge:" + txn.source)
            if charge is None:
                return False
            released = sum(r.amount for r in charge.refunds._list if r.payment_intent is None)
            txn.amount = charge.amount - released  # derived again on every list: idempotent
        return True

    def list_all(cls, url, limit=None, starting_after=None, created=None, type=None, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs))
        bounds = created if isinstance(created, dict) else ({"eq": created} if created is not None else {})
        try:
            bounds = {k: int(v) for k, v in bounds.items()}
        except ValueError:
            raise UserError(400, "Bad request") from None
        ops = {"gte": lambda a, b: a >= b, "gt": lambda a, b: a > b, "lte": lambda a, b: a <= b, "lt": lambda a, b: a < b, "eq": lambda a, b: a == b}
        li = res.List(url, limit=limit, starting_after=starting_after)
        li._list = [t for k, t in store.items() if k.startswith("balance_transaction:") and visible(t)
                    and (type is None or t.type == type) and all(ops[op](t.created, v) for op, v in bounds.items() if op in ops)]
        li._list.sort(key=lambda t: (t.created, t.id), reverse=True)  # newest first, as Stripe lists
        return li

    res.BalanceTransaction._api_list_all = classmethod(list_all)  # localstripe's route calls this

    async def set_fee(request):
        form = await request.post()
        charge = None if form.get("source", "").startswith("re_") else charge_of(form.get("source", ""))
        source = charge.id if charge is not None else form.get("source", "")
        txns = [t for k, t in store.items() if k.startswith("balance_transaction:") and t.source == source]
        if not txns or not form.get("fee", "").isdigit():
            return web.json_response({"error": {"message": "no balance transaction for this source, or a bad fee"}}, status=404)
        txns[0].fee = int(form["fee"])
        return web.json_response({"id": txns[0].id, "fee": txns[0].fee})

    app.router.add_post("/_config/fees", set_fee)


def add_transfers(app, store) -> None:
    """Add ``POST /v1/transfers`` and ``GET /v1/transfers/{id}`` to localstripe's aiohttp ``app`` (see the module docstring)."""
    import re
    import secrets
    import time as _time

    from localstripe.errors import UserError
    from localstripe.server import get_post_data, json_response

    account = re.compile(r"acct_[A-Za-z0-9]+")
    by_key: dict[str, str] = {}

    async def create(request):
        data = await get_post_data(request) or {}
        key = request.headers.get("Idempotency-Key")
        if key and key in by_key and ("transfer:" + by_key[key]) in store:
            return json_response(store["transfer:" + by_key[key]])
        unexpected = set(data) - {"amount", "currency", "destination", "description", "metadata", "transfer_group"}
        if unexpected:
            raise UserError(400, "Unexpected " + ", ".join(sorted(unexpected)))
        destination = str(data.get("destination") or "")
        if not account.fullmatch(destination):
            raise UserError(400, "destination must be a connected account id (acct_...)", {"param": "destination"})
        if destination.startswith("acct_invalid"):
            raise UserError(400, f"No such destination: '{destination}'", {"param": "destination", "code": "resource_missing"})
        amount = str(data.get("amount") or "")
        if not amount.isdigit() or int(amount) <= 0:
            raise UserError(400, "amount must be a positive integer", {"param": "amount"})
        currency = str(data.get("currency") or "").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise UserError(400, "currency must be a three-letter ISO code", {"param": "currency"})
        tr = {"id": "tr_" + secrets.token_hex(7), "object": "transfer", "amount": int(amount), "currency": currency,
              "destination": destination, "description": data.get("description"), "metadata": data.get("metadata") or {},
              "transfer_group": data.get("transfer_group"), "created": int(_time.time()), "livemode": False,
              "reversed": False, "amount_reversed": 0}
        store["transfer:" + tr["id"]] = tr
        if key:
            by_key[key] = tr["id"]
        return json_response(tr)

    def retrieve(request):
        tr = store.get("transfer:" + request.match_info["id"])
        if tr is None:
            raise UserError(404, "Not Found")
        return json_response(tr)

    app.router.add_post("/v1/transfers", create)
    app.router.add_get("/v1/transfers/{id}", retrieve)


def start(port: int = 0, timeout: float = STARTUP_TIMEOUT, **popen) -> tuple[subprocess.Popen, str]:
    """Start localstripe in a child process; return it and its URL once it answers (RuntimeError otherwise)."""
    popen.setdefault("cwd", ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "webapp.devtools.localstripe_server", str(port)], stdout=subprocess.PIPE, text=True, **popen)
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"localstripe did not start (printed {line!r}; see its stderr)")
        url = f"http://127.0.0.1:{int(line)}"
        deadline = time.monotonic() + timeout
        while True:  # the socket listens before the port is printed: wait for the (auth-free) stripe.js
            try:
                urllib.request.urlopen(url + "/js.stripe.com/v3/", timeout=max(0.1, deadline - time.monotonic())).close()
                return proc, url
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"localstripe did not answer within {timeout} s") from None
                try:
                    proc.wait(timeout=0.05)  # doubles as the pause between tries
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"localstripe exited with status {proc.returncode}") from None
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a localstripe started by ``start`` (SIGTERM, then SIGKILL after ``timeout``)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def register_webhook(url: str, endpoint_id: str, *, target: str, secret: str, events: list[str] | None = None) -> None:
    """Ask localstripe to sign and send its events to ``target`` (registrations survive a data wipe)."""
    form = [("url", target), ("secret", secret)] + [("events[]", e) for e in events or ()]
    request = urllib.request.Request(f"{url}/_config/webhooks/{endpoint_id}", data=urllib.parse.urlencode(form).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).close()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
