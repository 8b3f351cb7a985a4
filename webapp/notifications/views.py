"""The signed-in person's choice of emails: one checkbox per kind and the low-balance threshold."""

from __future__ import annotations

from babel.numbers import format_decimal
from flask import flash, redirect, render_template, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import BooleanField, StringField

from payments.money import Money, MoneyError, exponent, parse
from webapp.db import db_session
from webapp.notifications import bp
from webapp.notifications.emails import DEFAULT_THRESHOLD_MINOR, LOW_BALANCE_EVERY
from webapp.notifications.models import NotificationPreferences

MAX_THRESHOLD_MINOR = 100_000_00  # a threshold above any wallet's top-up limits is a typo


class PreferencesForm(FlaskForm):
    """Which emails to get, and below what wallet balance to be warned."""

    receipts = BooleanField(_l("Receipts and invoices, with the PDF attached"))
    session_started = BooleanField(_l("Charging started"))
    session_completed = BooleanField(_l("Charging ended, with energy and cost"))
    payment_failed = BooleanField(_l("A payment did not go through"))
    low_balance = BooleanField(_l("My wallet balance is low"))
    low_balance_threshold = StringField(_l("Warn me when my wallet balance falls below"),
                                        render_kw={"inputmode": "decimal", "autocomplete": "off", "maxlength": 20})


KINDS = ("receipts", "session_started", "session_completed", "payment_failed", "low_balance")


def _locale() -> str:
    return str(get_locale() or "en")


def _amount_text(money: Money) -> str:
    """``money`` as a person types it in this language ("5.00", "5,00"), without symbol or grouping."""
    digits = exponent(money.currency)
    return format_decimal(money.to_decimal(), format="0." + "0" * digits if digits else "0", locale=_locale())


def _threshold_message(code: str, params: dict) -> str:
    """The message next to the threshold field for a ``MoneyError`` code (or ``too_high``)."""
    if code == "empty":
        return _("Enter an amount, for example %(example)s.", example=_amount_text(Money(DEFAULT_THRESHOLD_MINOR, current_user.currency)))
    if code == "negative":
        return _("The amount cannot be negative.")
    if code == "too_many_decimals":
        return _("Use at most %(decimals)s decimals.", decimals=params.get("decimals", 2))
    if code == "too_high":
        return _("Enter an amount of at most %(maximum)s.", maximum=_amount_text(Money(MAX_THRESHOLD_MINOR, current_user.currency)))
    return _("Enter the amount as a number, for example %(example)s.",
             example=_amount_text(Money(DEFAULT_THRESHOLD_MINOR, current_user.currency)))


def _row() -> NotificationPreferences | None:
    return db_session().scalar(select(NotificationPreferences).where(NotificationPreferences.user_id == current_user.id))


def _page(form: PreferencesForm, status: int = 200):
    return render_template("account/notifications.html", form=form, currency=current_user.currency,
                           throttle_hours=int(LOW_BALANCE_EVERY.total_seconds() // 3600)), status


@bp.route("/notifications")
@login_required
def preferences():
    """The page: the account's current choices (everything on until they choose)."""
    row = _row()
    form = PreferencesForm(formdata=None)
    for kind in KINDS:
        getattr(form, kind).data = True if row is None else bool(getattr(row, kind))
    threshold = DEFAULT_THRESHOLD_MINOR if row is None else row.low_balance_threshold_minor
    form.low_balance_threshold.data = _amount_text(Money(threshold, current_user.currency))
    return _page(form)


@bp.route("/notifications", methods=["POST"])
@login_required
def save_preferences():
    """Save the choices; a threshold that is not an amount is refused next to its field (400)."""
    form = PreferencesForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    row = _row()
    typed = (form.low_balance_threshold.data or "").strip()
    try:
        if not typed and not form.low_balance.data:  # alerts off and the field cleared: keep the amount we have
            threshold = Money(DEFAULT_THRESHOLD_MINOR if row is None else row.low_balance_threshold_minor, current_user.currency)
        else:
            threshold = parse(typed, current_user.currency, _locale())
        if threshold.amount > MAX_THRESHOLD_MINOR:
            raise MoneyError("threshold too high", "too_high")
    except MoneyError as e:
        form.low_balance_threshold.errors = [_threshold_message(e.code, getattr(e, "params", {}) or {})]
        return _page(form, 400)
    s = db_session()
    if row is None:
        row = NotificationPreferences(user_id=current_user.id)
        s.add(row)
    for kind in KINDS:
        setattr(row, kind, bool(getattr(form, kind).data))
    if row.low_balance_threshold_minor != threshold.amount:
        row.low_balance_threshold_minor = threshold.amount
        row.low_balance_sent_at = None  # a new threshold: the next check judges the balance against it afresh
    s.commit()
    flash(_("Email choices saved."), "success")
    return redirect(url_for("notifications.preferences"))
