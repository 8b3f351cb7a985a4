"""Email notifications: receipts, session started/completed, payment failed, low wallet balance.

``outbox`` records each email in the transaction that causes it and queues
it after the commit; ``emails`` decides which events send what to whom (and
documents the rules); ``views`` is the page where a signed-in person chooses
(``/account/notifications``). Importing this package registers the hooks.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("notifications", __name__, url_prefix="/account")

from webapp.notifications import emails, outbox, views  # noqa: E402,F401  (registers hooks, jobs and routes)
