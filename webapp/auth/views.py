"""Sign-up, email verification, sign-in (with two-factor), sign-out and password reset pages.

No account enumeration: sign-up, sign-in and reset answer the same whether
or not an account exists for the email; the difference only shows in the
mailbox of the address's owner.
"""

from __future__ import annotations

from flask import current_app, flash, redirect, render_template, request, session, url_for
from flask_babel import gettext as _
from flask_login import current_user, login_user, logout_user
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from webapp import mail
from webapp.auth import bp, tokens, twofactor
from webapp.auth.forms import EmailOnlyForm, NewPasswordForm, SignInForm, SignUpForm, TwoFactorForm
from webapp.auth.passwords import hash_password, needs_rehash, verify_password
from webapp.db import db_session, utcnow
from webapp.extensions import limiter
from webapp.models import EmailTokenPurpose, User

# Per client address; sign-in also per email address below, so one IP cannot spray many accounts
# and many IPs cannot hammer one account.
SIGN_IN_LIMIT = "10 per minute;60 per hour"
CODE_LIMIT = "5 per minute;30 per hour"
EMAIL_LIMIT = "5 per minute;20 per hour"

PENDING_2FA = "pending_2fa"


def safe_next(default: str = "main.home") -> str:
    """The ``next`` URL if it stays on this site, else ``default``."""
    target = request.args.get("next") or request.form.get("next") or ""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for(default)


def _email_key() -> str:
    return "email:" + (request.form.get("email") or "").strip().lower()


def _link(endpoint: str, **values) -> str:
    """An absolute link for emails, on the configured public base URL."""
    return current_app.config["BASE_URL"].rstrip("/") + url_for(endpoint, **values)


def send_verification(user: User) -> None:
    """Email ``user`` a fresh verification link."""
    token = tokens.issue(db_session(), user, EmailTokenPurpose.VERIFY)
    mail.send_template(user.email, "verify", user.locale, link=_link("auth.verify", token=token))


def finish_sign_in(user: User, remember: bool) -> None:
    """Start the session for ``user`` (new session id: no fixation)."""
    session.pop(PENDING_2FA, None)
    session.clear()
    login_user(user, remember=remember)
    session.permanent = True


@bp.route("/sign-up", methods=["GET", "POST"])
@limiter.limit(EMAIL_LIMIT, methods=["POST"])
def sign_up():
    """Create an account; the same answer whether or not the email is taken."""
    if current_user.is_authenticated:
        return redirect(url_for("main.home"))
    form = SignUpForm()
    if form.validate_on_submit():
        s = db_session()
        existing = s.scalar(select(User).where(User.email == form.email.data))
        password_hash = hash_password(form.password.data)  # hashed either way: same timing
        if existing is None:
            user = User(email=form.email.data, password_hash=password_hash, locale=_locale_now())
            s.add(user)
            try:
                s.flush()
            except IntegrityError:  # a concurrent sign-up took the address: answer as if it existed
                s.rollback()
                existing = s.scalar(select(User).where(User.email == form.email.data))
            else:
                send_verification(user)
        if existing is not None:
            mail.send_template(existing.email, "account_exists", existing.locale, sign_in=_link("auth.sign_in"), reset=_link("auth.forgot"))
        s.commit()
        session["check_email"] = form.email.data
        return redirect(url_for("auth.check_email"))
    return render_template("auth/sign_up.html", form=form), 400 if form.errors else 200


def _locale_now() -> str:
    from flask_babel import get_locale

    return str(get_locale() or "en")


@bp.route("/check-email")
def check_email():
    """Tell the person to look in their mailbox."""
    return render_template("auth/check_email.html", email=session.get("check_email"), form=EmailOnlyForm(email=session.get("check_email")))


@bp.route("/verify/<token>")
def verify(token: str):
    """Confirm the email address from the emailed link (single use)."""
    s = db_session()
    user = tokens.consume(s, token, EmailTokenPurpose.VERIFY)
    if user is None:
        return render_template("auth/link_invalid.html", form=EmailOnlyForm(), resend=True), 400
    if user.email_verified_at is None:
        user.email_verified_at = utcnow()
    s.commit()
    flash(_("Your email address is confirmed. You can sign in now."), "success")
    return redirect(url_for("auth.sign_in"))


@bp.route("/verify/resend", methods=["POST"])
@limiter.limit(EMAIL_LIMIT)
@limiter.limit(EMAIL_LIMIT, key_func=_email_key)
def resend_verification():
    """Send a new verification link if the address has an unverified account; same answer otherwise."""
    form = EmailOnlyForm()
    if form.validate_on_submit():
        s = db_session()
        user = s.scalar(select(User).where(User.email == form.email.data))
        if user is not None and not user.is_verified and user.is_active:
            send_verification(user)
            s.commit()
        session["check_email"] = form.email.data
        return redirect(url_for("auth.check_email"))
    return render_template("auth/check_email.html", email=None, form=form), 400


@bp.route("/sign-in", methods=["GET", "POST"])
@limiter.limit(SIGN_IN_LIMIT, methods=["POST"])
@limiter.limit(SIGN_IN_LIMIT, methods=["POST"], key_func=_email_key)
def sign_in():
    """Email and password; then the two-factor step if the account has it."""
    if current_user.is_authenticated:
        return redirect(safe_next())
    form = SignInForm()
    if form.validate_on_submit():
        s = db_session()
        user = s.scalar(select(User).where(User.email == form.email.data))
        ok = verify_password(user.password_hash if user else None, form.password.data)
        if not ok or user is None or not user.is_active:
            form.password.errors.append(_("The email or password is not right. Check them, or reset your password."))
            return render_template("auth/sign_in.html", form=form, next=safe_next()), 400
        if needs_rehash(user.password_hash):
            user.password_hash = hash_password(form.password.data)
        if not user.is_verified:
            # Only someone who knows the password gets here, so saying so reveals nothing.
            send_verification(user)
            s.commit()
            flash(_("Please confirm your email address first. We have sent you a new link."), "warning")
            session["check_email"] = user.email
            return redirect(url_for("auth.check_email"))
        s.commit()
        if user.two_factor_enabled:
            session[PENDING_2FA] = {"user": user.get_id(), "remember": bool(form.remember.data), "next": safe_next()}
            return redirect(url_for("auth.two_factor"))
        finish_sign_in(user, bool(form.remember.data))
        return redirect(safe_next())
    return render_template("auth/sign_in.html", form=form, next=safe_next()), 400 if form.errors else 200


@bp.route("/two-factor", methods=["GET", "POST"])
@limiter.limit(CODE_LIMIT, methods=["POST"])
def two_factor():
    """Second step: a TOTP code or a one-time recovery code."""
    pending = session.get(PENDING_2FA)
    if not pending:
        flash(_("Please sign in first."), "info")
        return redirect(url_for("auth.sign_in"))
    s = db_session()
    uid, version = (int(x) for x in pending["user"].split(":", 1))
    user = s.get(User, uid)
    if user is None or user.session_version != version or not user.two_factor_enabled:
        session.pop(PENDING_2FA, None)
        return redirect(url_for("auth.sign_in"))
    form = TwoFactorForm()
    if form.validate_on_submit():
        code = form.code.data.strip()
        digits = "".join(ch for ch in code if ch.isdigit())
        if len(digits) == 6 and len(code.replace(" ", "")) <= 7:
            ok = twofactor.verify_totp(s, user, code)
            used_recovery = False
        else:
            ok = twofactor.use_recovery_code(s, user, code)
            used_recovery = ok
        if ok:
            s.commit()
            nxt = pending.get("next") or url_for("main.home")
            finish_sign_in(user, pending.get("remember", False))
            if used_recovery:
                left = twofactor.remaining_recovery_codes(s, user)
                flash(_("You used a recovery code. %(n)s left; make new ones in your account if you are running low.", n=left), "warning")
            return redirect(nxt)
        s.rollback()
        form.code.errors.append(_("That code is not right or was already used. Wait for the next code and try again."))
        return render_template("auth/two_factor.html", form=form), 400
    return render_template("auth/two_factor.html", form=form), 400 if form.errors else 200


@bp.route("/sign-out", methods=["POST"])
def sign_out():
    """End the session."""
    logout_user()
    session.clear()
    flash(_("You are signed out."), "info")
    return redirect(url_for("main.home"))


@bp.route("/forgot", methods=["GET", "POST"])
@limiter.limit(EMAIL_LIMIT, methods=["POST"])
@limiter.limit(EMAIL_LIMIT, methods=["POST"], key_func=_email_key)
def forgot():
    """Ask for a reset link; the same answer whether or not the account exists."""
    form = EmailOnlyForm()
    if form.validate_on_submit():
        s = db_session()
        user = s.scalar(select(User).where(User.email == form.email.data))
        if user is not None and user.is_active:
            token = tokens.issue(s, user, EmailTokenPurpose.RESET)
            mail.send_template(user.email, "reset", user.locale, link=_link("auth.reset", token=token))
            s.commit()
        return render_template("auth/forgot_sent.html", email=form.email.data)
    return render_template("auth/forgot.html", form=form), 400 if form.errors else 200


@bp.route("/reset/<token>", methods=["GET", "POST"])
@limiter.limit(CODE_LIMIT, methods=["POST"])
def reset(token: str):
    """Choose a new password from an emailed link; the link works once and expires after an hour."""
    s = db_session()
    row = tokens.peek(s, token, EmailTokenPurpose.RESET)
    if row is None:
        return render_template("auth/link_invalid.html", form=EmailOnlyForm(), resend=False), 400
    form = NewPasswordForm()
    form.account_email = row.user.email
    if form.validate_on_submit():
        user = tokens.consume(s, token, EmailTokenPurpose.RESET)
        if user is None:  # spent by a concurrent request between peek and consume
            s.rollback()
            return render_template("auth/link_invalid.html", form=EmailOnlyForm(), resend=False), 400
        user.password_hash = hash_password(form.password.data)
        user.session_version += 1  # sign out every other device
        if user.email_verified_at is None:
            user.email_verified_at = utcnow()  # the link proved the mailbox
        s.commit()
        logout_user()
        flash(_("Your password is changed. Sign in with the new one."), "success")
        return redirect(url_for("auth.sign_in"))
    return render_template("auth/reset.html", form=form, token=token), 400 if form.errors else 200
