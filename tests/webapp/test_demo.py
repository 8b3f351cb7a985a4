"""``flask --app wsgi demo``: the whole demo (migrate, seed, localstripe, worker, charger gateway, simulated chargers, gunicorn) starts, serves pages,
prints where to go, how to sign in and which test cards to use, and stops every process it started
(localstripe too) on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # a bound for a loaded machine; it usually answers within a few seconds
STOP_TIMEOUT = 20.0  # the demo itself kills a child that has not stopped after 10 s


def _children(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, timeout: float, what: str, output: Path, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail with the demo's output at the deadline (or when ``proc`` dies)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            exit_code = proc.poll() if proc is not None else None
            raise AssertionError(f"{what}: not within {timeout} s (demo exit code {exit_code})\n{output.read_text()[-4000:]}")
        pause.wait(0.1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_demo_serves_pages_and_stops_all_its_processes(tmp_path, how):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLTPAY_")}
    env.update(
        VOLTPAY_ENV="development",
        VOLTPAY_DATABASE_URL=f"sqlite:///{tmp_path / 'demo.db'}",
        VOLTPAY_HUEY_PATH=str(tmp_path / "huey.db"),
        VOLTPAY_LOG_LEVEL="WARNING",
    )
    output = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "flask", "--app", "wsgi", "demo", "--port", str(port), "--web-workers", "1"]
    with output.open("wb") as log:
        # Its own process group, like a terminal job: Ctrl-C goes to the whole group.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[int] = []
    try:
        # the demo's own line: the charger gateway, started earlier, prints a "Ctrl-C stops" of its own
        _wait_until(lambda: f"Voltpay demo running at {base}/" in output.read_text(), START_TIMEOUT, "the demo says it runs", output, proc)
        _wait_until(lambda: _get(f"{base}/healthz")[0] == 200, START_TIMEOUT, "GET /healthz answers 200", output, proc)
        status, page = _get(f"{base}/auth/sign-up")
        assert status == 200 and "Create an account" in page

        text = output.read_text()
        assert f"{base}/" in text and f"{base}/auth/sign-in" in text and f"{base}/auth/sign-up" in text
        for email in ("driver@example.com", "tenant@example.com", "operator@example.com"):
            assert re.search(rf"{re.escape(email)}\s+\S{{12,}}", text), f"no password printed for {email}"
        for card in ("4242 4242 4242 4242", "4000 0000 0000 0341", "4000 0025 0000 3155"):
            assert card in text
        # Card payments go to localstripe, started by the demo; the web server loads its stripe.js.
        stripe_url = re.search(r"Card payments go to localstripe at (http://127\.0\.0\.1:\d+)", text).group(1)
        status, stripe_js = _get(f"{stripe_url}/js.stripe.com/v3/")
        assert status == 200 and "localstripe" in stripe_js
        # The two demo chargers are simulated and connected to the demo's gateway: a driver finds them available.
        def status_of(code: str) -> str | None:
            status, body = _get(f"{base}/api/v1/connectors/{code}")
            return json.loads(body)["status"] if status == 200 else None

        _wait_until(lambda: status_of("D101") == "available" and status_of("D202") == "available", START_TIMEOUT,
                    "the simulated chargers are online", output, proc)
        status, page = _get(f"{base}/c/D101")
        assert status == 200 and "Plaza Mayor car park" in page
        assert "DEMO-CP-1 and DEMO-CP-2 are simulated" in output.read_text()
        # localstripe, the job worker, the gateway, the simulated chargers and gunicorn (master and its worker) run under the demo.
        _wait_until(lambda: len(_children(proc.pid)) >= 6, 15, "the demo's processes", output, proc)
        children = _children(proc.pid)
        assert any("webapp.devtools.localstripe_server" in _cmdline(pid) for pid in children)
        assert any(" gateway" in _cmdline(pid) for pid in children) and any(" simulate " in _cmdline(pid) for pid in children)

        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        else:
            proc.send_signal(signal.SIGTERM)  # kill, docker stop: only the demo process hears it
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, output.read_text()[-4000:]
        _wait_until(lambda: not any(_alive(p) for p in children), 10, "every child process exits", output)
        assert _get(f"{stripe_url}/js.stripe.com/v3/")[0] == 0  # nothing answers there any more
    finally:
        if proc.poll() is None:  # the test failed: do not leave the demo running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert "Stopping the demo" in output.read_text()
