"""localstripe for the demo and the tests: in memory only, on 127.0.0.1, its port printed on stdout.

The ``localstripe`` CLI binds ``::`` and pickles its whole store to one shared
file on every write; this server keeps the store in RAM (see
shared/notes/localstripe.md). Run it with
``python -m webapp.devtools.localstripe_server [PORT]`` (0 or nothing: a free
port), or from Python with ``start()``, which also waits until it answers.

localstripe is a test double for Stripe: it accepts any ``sk_*`` key, ignores
Idempotency-Key and has no Connect. Only the demo (``flask demo``) and the
tests start it; the app talks to it through ``STRIPE_LOCALSTRIPE=1``.
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

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    print(sock.getsockname()[1], flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None)


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
