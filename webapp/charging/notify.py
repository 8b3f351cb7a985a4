"""Emails of the charging journey that the journey itself needs: a guest's link to their session.

(Receipts and the other notifications belong to the receipts module.) Sent
through the worker (``webapp.mail.send_template``), never blocking a page.
"""

from __future__ import annotations

from flask import current_app

from webapp.charging.models import ChargingSession
from webapp.mail import send_template


def session_link(cs: ChargingSession, token: str | None) -> str:
    """The absolute link to a session's page; a guest's carries their token."""
    base = str(current_app.config["BASE_URL"]).rstrip("/")
    return f"{base}/s/{cs.id}" + (f"?t={token}" if token else "")


def send_guest_link(cs: ChargingSession, token: str | None, locale: str | None) -> None:
    """Email a guest the link to follow, stop and find their session again (nothing for an account's session)."""
    if token is None or not cs.email:
        return
    connector = cs.connector
    send_template(
        cs.email, "session_link", locale, link=session_link(cs, token), connector_code=connector.connector_code,
        site_name=connector.charger.site.name, session_id=cs.id,
    )


def send_found_links(email: str, found: list[tuple[ChargingSession, str]], locale: str | None) -> None:
    """Email a guest fresh links to the sessions they asked for (email + date + card last four)."""
    if not found:
        return
    send_template(email, "sessions_found", locale, links=[(cs, session_link(cs, token)) for cs, token in found])
