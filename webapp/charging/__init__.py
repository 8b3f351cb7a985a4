"""Scan-to-pay charging: sessions, their state machine and money (``service``), and the driver's pages (``views``)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("charging", __name__)

from webapp.charging import views  # noqa: E402,F401  (routes register on bp)
