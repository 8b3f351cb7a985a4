"""Two-factor sign-in: TOTP (RFC 6238) codes, the enrolment QR code, one-time recovery codes."""

from __future__ import annotations

import io
import secrets
import unicodedata

import pyotp
import qrcode
import qrcode.image.svg
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from webapp.auth.tokens import digest
from webapp.db import utcnow
from webapp.models import RecoveryCode, User

ISSUER = "Voltpay"
RECOVERY_CODES = 10
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud or typed from paper


def new_secret() -> str:
    """A fresh base32 TOTP secret."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, email: str) -> str:
    """The otpauth:// URI an authenticator app scans."""
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=ISSUER)


def qr_svg(data: str) -> str:
    """An inline SVG QR code of ``data``."""
    img = qrcode.make(data, image_factory=qrcode.image.svg.SvgPathImage, box_size=10, border=2)
    buf = io.BytesIO()
    img.save(buf)
    return buf.getvalue().decode()


def matching_step(secret: str, code: str) -> int | None:
    """The time step at which ``code`` is valid (±1 step for clock drift), or None.

    Digits typed in another script (full-width from a CJK keyboard, Arabic-Indic)
    count as their ASCII values; anything else that is not a decimal digit is ignored.
    """
    code = "".join(str(unicodedata.decimal(ch)) for ch in code if ch.isdecimal())
    if len(code) != 6:
        return None
    totp = pyotp.TOTP(secret)
    now = int(utcnow().timestamp())
    for offset in (0, -1, 1):
        at = now + offset * totp.interval
        if secrets.compare_digest(totp.at(at), code):
            return at // totp.interval
    return None


def verify_totp(s: Session, user: User, code: str) -> bool:
    """Check a TOTP code and refuse a code (or an older one) that was already used."""
    if not user.totp_secret:
        return False
    step = matching_step(user.totp_secret, code)
    if step is None:
        return False
    # Conditional update: a replayed or concurrent second use of the same step loses.
    res = s.execute(
        update(User)
        .where(User.id == user.id, (User.totp_last_step.is_(None)) | (User.totp_last_step < step))
        .values(totp_last_step=step)
    )
    if res.rowcount != 1:
        return False
    user.totp_last_step = step
    return True


def normalize_recovery(code: str) -> str:
    """Recovery codes are compared without spaces, dashes or case."""
    return "".join(ch for ch in code.lower() if ch.isalnum())


def new_recovery_codes(s: Session, user: User) -> list[str]:
    """Replace the user's recovery codes with fresh ones and return them (shown once)."""
    s.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(_ALPHABET) for _ in range(10))
        codes.append(f"{raw[:5]}-{raw[5:]}")
        s.add(RecoveryCode(user_id=user.id, code_hash=digest(raw)))
    s.flush()
    return codes


def use_recovery_code(s: Session, user: User, code: str) -> bool:
    """Spend one recovery code; each works once."""
    h = digest(normalize_recovery(code))
    res = s.execute(
        update(RecoveryCode)
        .where(RecoveryCode.user_id == user.id, RecoveryCode.code_hash == h, RecoveryCode.used_at.is_(None))
        .values(used_at=utcnow())
    )
    return res.rowcount == 1


def remaining_recovery_codes(s: Session, user: User) -> int:
    """How many recovery codes are left unused."""
    return len(s.scalars(select(RecoveryCode.id).where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None))).all())


def disable(s: Session, user: User) -> None:
    """Turn two-factor sign-in off and drop the recovery codes."""
    user.totp_secret = None
    user.totp_last_step = None
    s.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    s.flush()
