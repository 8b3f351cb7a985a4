"""Sign-up, sign-in, two-factor and reset forms (CSRF-protected, errors tied to their fields)."""

from __future__ import annotations

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField
from wtforms.validators import DataRequired, Email, Length, ValidationError

from webapp.auth.passwords import MAX_LENGTH, RULES_HELP, password_problems


def normalize_email(value: str | None) -> str:
    """Emails are matched case-insensitively and without surrounding spaces."""
    return (value or "").strip().lower()


class _PasswordRules:
    """Validator: apply the password rules, using the form's email if there is one."""

    def __init__(self, email_field: str | None = "email"):
        self.email_field = email_field

    def __call__(self, form, field):
        if self.email_field and hasattr(form, self.email_field):
            email = getattr(form, self.email_field).data
        else:
            email = getattr(form, "account_email", "")  # set by the view when the user is known
        problems = password_problems(field.data or "", email or "")
        if problems:
            raise ValidationError(" ".join(problems))


EMAIL = [DataRequired(message=_l("Enter your email address.")), Email(message=_l("Enter an email address like name@example.com.")), Length(max=254)]


class SignUpForm(FlaskForm):
    """A new account: email and password."""

    email = EmailField(_l("Email"), validators=EMAIL, filters=[normalize_email], render_kw={"autocomplete": "email"})
    password = PasswordField(
        _l("Password"),
        validators=[DataRequired(message=_l("Choose a password.")), _PasswordRules()],
        description=RULES_HELP,
        render_kw={"autocomplete": "new-password", "maxlength": MAX_LENGTH},
    )


class SignInForm(FlaskForm):
    """Email and password."""

    email = EmailField(_l("Email"), validators=EMAIL, filters=[normalize_email], render_kw={"autocomplete": "username"})
    password = PasswordField(_l("Password"), validators=[DataRequired(message=_l("Enter your password.")), Length(max=MAX_LENGTH)], render_kw={"autocomplete": "current-password"})
    remember = BooleanField(_l("Keep me signed in on this device"))


class TwoFactorForm(FlaskForm):
    """A code from the authenticator app, or a recovery code."""

    code = StringField(
        _l("Code from your authenticator app, or a recovery code"),
        validators=[DataRequired(message=_l("Enter the 6-digit code.")), Length(max=32)],
        render_kw={"autocomplete": "one-time-code", "inputmode": "text", "autofocus": True},
    )


class EmailOnlyForm(FlaskForm):
    """Just an email: for a reset link or a new verification link."""

    email = EmailField(_l("Email"), validators=EMAIL, filters=[normalize_email], render_kw={"autocomplete": "email"})


class NewPasswordForm(FlaskForm):
    """Choose a new password after a reset link."""

    password = PasswordField(
        _l("New password"),
        validators=[DataRequired(message=_l("Choose a password.")), _PasswordRules(email_field=None)],
        description=RULES_HELP,
        render_kw={"autocomplete": "new-password", "maxlength": MAX_LENGTH},
    )
