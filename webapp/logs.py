"""Structured JSON logs, one line per event, each carrying the request id."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, g, has_request_context, request

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object; extra fields are kept."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON with time, level, logger, message, request id and extras."""
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if has_request_context() and getattr(g, "request_id", None):
            out["request_id"] = g.request_id
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    """Send the ``voltpay`` loggers to stderr as JSON (once per process)."""
    root = logging.getLogger("voltpay")
    root.setLevel(level)
    if not any(getattr(h, "_voltpay", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(JsonFormatter())
        h._voltpay = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.propagate = False


def init_app(app: Flask) -> None:
    """Give every request an id (trusted from X-Request-ID when well-formed) and log it on the way out."""
    configure(app.config.get("LOG_LEVEL", "INFO"))
    log = logging.getLogger("voltpay.http")

    @app.before_request
    def _start():
        rid = request.headers.get("X-Request-ID", "")
        g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        started = g.get("request_started")
        if started is not None and request.endpoint != "static":
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": resp.status_code,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
        return resp
