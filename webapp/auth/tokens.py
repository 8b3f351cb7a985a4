"""Single-use emailed tokens and other random secrets, stored only as SHA-256 hashes.

The tokens are 256-bit random values, so a fast hash is enough: there is no
dictionary to try, and the database alone does not let anyone use a link.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from webapp.db import utcnow
from webapp.models import EmailToken, EmailTokenPurpose, User

LIFETIME = {
    EmailTokenPurpose.VERIFY: dt.timedelta(days=2),
    EmailTokenPurpose.RESET: dt.timedelta(hours=1),
}


def digest(secret: str) -> str:
    """SHA-256 hex digest of a random secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret."""
    return secrets.token_urlsafe(nbytes)


def issue(s: Session, user: User, purpose: EmailTokenPurpose) -> str:
    """Create a token for ``user`` and return it in the clear (only its hash is stored)."""
    token = new_secret()
    s.add(EmailToken(user_id=user.id, purpose=purpose, token_hash=digest(token), expires_at=utcnow() + LIFETIME[purpose]))
    s.flush()
    return token


def peek(s: Session, token: str, purpose: EmailTokenPurpose) -> EmailToken | None:
    """The unused, unexpired token row for ``token``, without consuming it."""
    row = s.scalar(select(EmailToken).where(EmailToken.token_hash == digest(token), EmailToken.purpose == purpose))
    if row is None or row.used_at is not None or row.expires_at <= utcnow():
        return None
    return row


def consume(s: Session, token: str, purpose: EmailTokenPurpose) -> User | None:
    """Use ``token`` once: mark it used and return its user, or None if unknown, used or expired.

    The conditional UPDATE makes two concurrent uses of one link succeed only once.
    """
    now = utcnow()
    res = s.execute(
        update(EmailToken)
        .where(
            EmailToken.token_hash == digest(token),
            EmailToken.purpose == purpose,
            EmailToken.used_at.is_(None),
            EmailToken.expires_at > now,
        )
        .values(used_at=now)
        .returning(EmailToken.user_id)
    )
    user_id = res.scalar_one_or_none()
    if user_id is None:
        return None
    if purpose == EmailTokenPurpose.RESET:
        # A reset spends every other outstanding reset link of the account too.
        s.execute(
            update(EmailToken)
            .where(EmailToken.user_id == user_id, EmailToken.purpose == purpose, EmailToken.used_at.is_(None))
            .values(used_at=now)
        )
    return s.get(User, user_id)
