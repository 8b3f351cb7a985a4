"""The signed-in person's account: profile, language, password, two-factor sign-in, RFID cards, API tokens."""

from __future__ import annotations

import re

from flask import Blueprint, abort, flash, redirect, render_template, session, url_for
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from wtforms import PasswordField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length

from webapp.auth import twofactor
from webapp.auth.forms import _PasswordRules
from webapp.auth.passwords import MAX_LENGTH, RULES_HELP, hash_password, verify_password
from webapp.auth.views import CODE_LIMIT
from webapp.db import db_session, utcnow
from webapp.extensions import limiter
from webapp.i18n import LANGUAGES
from webapp.models import ApiToken, RfidTag

bp = Blueprint("account", __name__, url_prefix="/account")

SETUP_SECRET = "totp_setup_secret"


class LanguageForm(FlaskForm):
    """The account's language."""

    # Each name is in its own language, so each option carries its lang for screen readers.
    locale = SelectField(_l("Language"), choices=[SelectChoice(code, name, render_kw={"lang": code}) for code, name in LANGUAGES.items()])


class ChangePasswordForm(FlaskForm):
    """Current password, then a new one."""

    current = PasswordField(_l("Current password"), validators=[Length(max=MAX_LENGTH)], render_kw={"autocomplete": "current-password"})
    password = PasswordField(
        _l("New password"),
        validators=[DataRequired(message=_l("Choose a password.")), _PasswordRules(email_field=None)],
        description=RULES_HELP,
        render_kw={"autocomplete": "new-password", "maxlength": MAX_LENGTH},
    )


class CodeForm(FlaskForm):
    """A 6-digit code from the authenticator app."""

    code = StringField(_l("6-digit code from the app"), validators=[DataRequired(message=_l("Enter the 6-digit code.")), Length(max=12)], render_kw={"autocomplete": "one-time-code", "inputmode": "numeric"})


class DisableTwoFactorForm(FlaskForm):
    """Password and a current code, to turn two-factor sign-in off."""

    password = PasswordField(_l("Password"), validators=[Length(max=MAX_LENGTH)], render_kw={"autocomplete": "current-password"})
    code = StringField(_l("6-digit code from the app, or a recovery code"), validators=[DataRequired(message=_l("Enter the 6-digit code.")), Length(max=32)], render_kw={"autocomplete": "one-time-code"})


class RfidTagForm(FlaskForm):
    """An RFID charging card to link: the number printed on it (the charger reads the same)."""

    id_tag = StringField(
        _l("Card number"),
        validators=[DataRequired(message=_l("Enter the number printed on the card.")), Length(max=40)],
        description=_l("4 to 20 letters and digits, as printed on the card (spaces and dashes are ignored)."),
        render_kw={"autocomplete": "off", "autocapitalize": "characters"},
    )
    label = StringField(_l("Name (optional)"), validators=[Length(max=64, message=_l("At most 64 characters."))])


RFID_TAG = re.compile(r"[0-9A-Z]{4,20}")


def normalize_id_tag(value: str) -> str:
    """A card number as chargers send it: upper case, without spaces or dashes."""
    return re.sub(r"[\s:-]", "", value or "").upper()


def _rfid_tags():
    return db_session().scalars(select(RfidTag).where(RfidTag.user_id == current_user.id).order_by(RfidTag.created_at)).all()


def _tokens():
    return db_session().scalars(
        select(ApiToken).where(ApiToken.user_id == current_user.id, ApiToken.revoked_at.is_(None), ApiToken.expires_at > utcnow()).order_by(ApiToken.created_at.desc())
    ).all()


@bp.route("/")
@login_required
def overview():
    """Account page."""
    return render_template(
        "account/overview.html",
        language_form=LanguageForm(locale=current_user.locale or "en"),
        password_form=ChangePasswordForm(),
        recovery_left=twofactor.remaining_recovery_codes(db_session(), current_user) if current_user.two_factor_enabled else None,
        api_tokens=_tokens(),
        rfid_tags=_rfid_tags(),
        rfid_form=RfidTagForm(),
    )


@bp.route("/language", methods=["POST"])
@login_required
def language():
    """Save the account's language."""
    form = LanguageForm()
    if form.validate_on_submit():
        current_user.locale = form.locale.data
        session["locale"] = form.locale.data
        db_session().commit()
        flash(_("Language saved."), "success")
    return redirect(url_for("account.overview"))


@bp.route("/password", methods=["POST"])
@login_required
@limiter.limit(CODE_LIMIT)
def change_password():
    """Change the password; other devices are signed out."""
    form = ChangePasswordForm()
    form.account_email = current_user.email
    if current_user.password_hash and not verify_password(current_user.password_hash, form.current.data or ""):
        form.current.errors = [_("Your current password is not right.")]
        ok = False
    else:
        ok = form.validate_on_submit()
    if not ok:
        s = db_session()
        return render_template(
            "account/overview.html",
            language_form=LanguageForm(locale=current_user.locale or "en"),
            password_form=form,
            recovery_left=twofactor.remaining_recovery_codes(s, current_user) if current_user.two_factor_enabled else None,
            api_tokens=_tokens(),
            rfid_tags=_rfid_tags(),
            rfid_form=RfidTagForm(),
        ), 400
    user = current_user._get_current_object()
    user.password_hash = hash_password(form.password.data)
    user.session_version += 1
    db_session().commit()
    login_user(user)  # keep this device signed in under the new session version
    flash(_("Password changed. Other devices have been signed out."), "success")
    return redirect(url_for("account.overview"))


@bp.route("/two-factor", methods=["GET", "POST"])
@login_required
@limiter.limit(CODE_LIMIT, methods=["POST"])
def two_factor_setup():
    """Turn on two-factor sign-in: scan the QR code, confirm a code, keep the recovery codes."""
    if current_user.two_factor_enabled:
        return redirect(url_for("account.overview"))
    secret = session.get(SETUP_SECRET)
    if not secret:
        secret = session[SETUP_SECRET] = twofactor.new_secret()
    form = CodeForm()
    if form.validate_on_submit():
        if twofactor.matching_step(secret, form.code.data) is None:
            form.code.errors.append(_("That code is not right. Check the time on your phone and enter the newest code."))
        else:
            s = db_session()
            user = current_user._get_current_object()
            user.totp_secret = secret
            user.totp_last_step = twofactor.matching_step(secret, form.code.data)
            codes = twofactor.new_recovery_codes(s, user)
            s.commit()
            session.pop(SETUP_SECRET, None)
            return render_template("account/recovery_codes.html", codes=codes, first_time=True)
    uri = twofactor.provisioning_uri(secret, current_user.email)
    status = 400 if form.errors else 200
    return render_template("account/two_factor_setup.html", form=form, qr=twofactor.qr_svg(uri), secret=secret), status


@bp.route("/two-factor/recovery-codes", methods=["POST"])
@login_required
@limiter.limit(CODE_LIMIT)
def new_recovery_codes():
    """Replace the recovery codes (needs a current code)."""
    form = CodeForm()
    s = db_session()
    user = current_user._get_current_object()
    if not user.two_factor_enabled:
        return redirect(url_for("account.overview"))
    if form.validate_on_submit() and twofactor.verify_totp(s, user, form.code.data):
        codes = twofactor.new_recovery_codes(s, user)
        s.commit()
        return render_template("account/recovery_codes.html", codes=codes, first_time=False)
    s.rollback()
    flash(_("That code is not right. Your recovery codes were not changed."), "error")
    return redirect(url_for("account.overview"))


@bp.route("/two-factor/disable", methods=["GET", "POST"])
@login_required
@limiter.limit(CODE_LIMIT, methods=["POST"])
def two_factor_disable():
    """Turn two-factor sign-in off (needs the password and a code)."""
    user = current_user._get_current_object()
    if not user.two_factor_enabled:
        return redirect(url_for("account.overview"))
    form = DisableTwoFactorForm()
    if form.validate_on_submit():
        s = db_session()
        password_ok = user.password_hash is None or verify_password(user.password_hash, form.password.data or "")
        code_ok = twofactor.verify_totp(s, user, form.code.data) or twofactor.use_recovery_code(s, user, form.code.data)
        if password_ok and code_ok:
            twofactor.disable(s, user)
            s.commit()
            flash(_("Two-factor sign-in is off."), "success")
            return redirect(url_for("account.overview"))
        s.rollback()
        form.code.errors.append(_("The password or the code is not right."))
    return render_template("account/two_factor_disable.html", form=form), 400 if form.errors else 200


@bp.route("/sign-out-everywhere", methods=["POST"])
@login_required
def sign_out_everywhere():
    """Sign out on every device, this one included."""
    user = current_user._get_current_object()
    user.session_version += 1
    db_session().commit()
    logout_user()
    session.clear()
    flash(_("You are signed out on every device."), "info")
    return redirect(url_for("auth.sign_in"))


@bp.route("/api-tokens/<int:token_id>/revoke", methods=["POST"])
@login_required
def revoke_api_token(token_id: int):
    """Revoke one of the user's API tokens (someone else's: 404)."""
    s = db_session()
    token = s.get(ApiToken, token_id)
    if token is None or token.user_id != current_user.id:
        abort(404)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        s.commit()
    flash(_("The API token is revoked."), "success")
    return redirect(url_for("account.overview"))


@bp.route("/rfid-tags", methods=["POST"])
@login_required
@limiter.limit("20 per hour", key_func=lambda: f"rfid:{current_user.id}")
def add_rfid_tag():
    """Link an RFID card: starting a charge with it pays from this account's wallet."""
    form = RfidTagForm()
    if form.validate_on_submit():
        tag = normalize_id_tag(form.id_tag.data)
        if not RFID_TAG.fullmatch(tag):
            form.id_tag.errors.append(_("A card number has 4 to 20 letters and digits."))
        else:
            s = db_session()
            try:
                with s.begin_nested():
                    s.add(RfidTag(id_tag=tag, user_id=current_user.id, label=(form.label.data or "").strip()))
                s.commit()
            except IntegrityError:
                s.rollback()
                # Whose card it is stays private: the same words whether it is yours or someone else's.
                form.id_tag.errors.append(_("This card is already linked to an account. If it is yours and you have lost it, contact support."))
            else:
                flash(_("Card %(tag)s linked. Hold it to a charger's reader to charge from your wallet.", tag=tag), "success")
                return redirect(url_for("account.overview"))
    return render_template(
        "account/overview.html",
        language_form=LanguageForm(locale=current_user.locale or "en"),
        password_form=ChangePasswordForm(),
        recovery_left=twofactor.remaining_recovery_codes(db_session(), current_user) if current_user.two_factor_enabled else None,
        api_tokens=_tokens(),
        rfid_tags=_rfid_tags(),
        rfid_form=form,
    ), 400


@bp.route("/rfid-tags/<int:tag_id>/remove", methods=["POST"])
@login_required
def remove_rfid_tag(tag_id: int):
    """Unlink one of the person's RFID cards (someone else's: 404)."""
    s = db_session()
    tag = s.scalar(select(RfidTag).where(RfidTag.id == tag_id, RfidTag.user_id == current_user.id))
    if tag is None:
        abort(404)
    s.delete(tag)
    s.commit()
    flash(_("The card is no longer linked to your account."), "success")
    return redirect(url_for("account.overview"))
