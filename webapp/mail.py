"""Email over SMTP, sent by the worker.

Messages are rendered in the request (in the recipient's language) and
queued; the worker delivers them with retries. Without ``VOLTPAY_SMTP_HOST``
(the demo) the message is written to the log instead, links included, so a
newcomer can follow a verification link from the terminal.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from flask import current_app, render_template
from flask_babel import force_locale

from webapp.tasks import task

log = logging.getLogger("voltpay.mail")


def build_message(to: str, subject: str, text: str, html: str | None = None, attachments: list[tuple[str, str, bytes]] | None = None) -> EmailMessage:
    """Build a MIME message from the configured sender to ``to``."""
    msg = EmailMessage()
    msg["From"] = current_app.config["MAIL_FROM"]
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="voltpay")
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    for filename, mimetype, data in attachments or []:
        maintype, subtype = mimetype.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def deliver(msg: EmailMessage) -> None:
    """Hand ``msg`` to the SMTP server, or log it when none is configured."""
    cfg = current_app.config
    host = cfg.get("SMTP_HOST")
    if not host:
        body = msg.get_body(("plain",))
        log.info("email (no SMTP server configured)", extra={"to": msg["To"], "subject": msg["Subject"], "body": body.get_content() if body else ""})
        return
    port = int(cfg["SMTP_PORT"])
    context = ssl.create_default_context()
    if cfg.get("SMTP_SSL"):
        server: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=30, context=context)
    else:
        server = smtplib.SMTP(host, port, timeout=30)
    with server:
        if not cfg.get("SMTP_SSL") and cfg.get("SMTP_STARTTLS"):
            server.starttls(context=context)
        if cfg.get("SMTP_USERNAME"):
            server.login(cfg["SMTP_USERNAME"], cfg.get("SMTP_PASSWORD") or "")
        server.send_message(msg)
    log.info("email sent", extra={"to": msg["To"], "subject": msg["Subject"]})


@task(retries=6, retry_delay=30)
def send_email_job(raw: bytes) -> None:
    """Deliver one message (bytes of the MIME message); on SMTP failure retried 6 times, 30 s to 10 min apart."""
    from email import message_from_bytes, policy

    deliver(message_from_bytes(raw, policy=policy.default))  # type: ignore[arg-type]


def send_template(to: str, template: str, locale: str | None, **context) -> None:
    """Render ``templates/email/<template>.txt`` (and ``.html`` if present) in ``locale`` and queue it."""
    with force_locale(locale or "en"):
        subject = render_template(f"email/{template}.subject.txt", **context).strip()
        text = render_template(f"email/{template}.txt", **context)
    msg = build_message(to, subject, text)
    send_email_job(msg.as_bytes())
