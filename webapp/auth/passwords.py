"""Password hashing (Argon2id) and the password rules shown on the sign-up form.

Rules follow NIST SP 800-63B: a minimum length, no composition rules, and a
refusal of passwords known from breaches or built from obvious patterns
(the email address, one repeated character, keyboard or number runs). The
breach list is a bundled file of the most common leaked passwords, so the
check works offline and sends nothing anywhere.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from flask_babel import lazy_gettext as _l

MIN_LENGTH = 10
MAX_LENGTH = 128

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the email is unknown, so a miss costs as long as a hit (no timing oracle). Made on first
# use, not at import: a hash with the production parameters costs 64 MiB and a noticeable time to make.
_DUMMY_HASH: str | None = None

_SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiop", "asdfghjkl", "zxcvbnm", "1qaz2wsx3edc")


def use_fast_parameters_for_tests() -> None:
    """Cheap Argon2 parameters so the test suite is not dominated by hashing (never in production)."""
    global _hasher, _DUMMY_HASH
    _hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    _DUMMY_HASH = None


def _dummy_hash() -> str:
    """The hash an unknown account is checked against, made with the current parameters on first use."""
    global _DUMMY_HASH
    dummy = _DUMMY_HASH
    if dummy is None:
        dummy = _DUMMY_HASH = _hasher.hash("voltpay-timing-equaliser")
    return dummy


def hash_password(password: str) -> str:
    """Return an Argon2id hash of ``password``."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Check ``password`` against ``stored_hash`` in constant-ish time, even when there is no hash."""
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than today's."""
    return _hasher.check_needs_rehash(stored_hash)


@lru_cache(maxsize=1)
def _common() -> frozenset[str]:
    path = Path(__file__).with_name("common_passwords.txt")
    return frozenset(line.strip().lower() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def _is_run(s: str) -> bool:
    low = s.lower()
    for seq in _SEQUENCES:
        for src in (seq, seq[::-1]):
            if low in src * 3:
                return True
    return False


def password_problems(password: str, email: str = "") -> list[str]:
    """Reasons ``password`` is refused, in words a person understands (empty when it is fine)."""
    problems: list[str] = []
    if len(password) < MIN_LENGTH:
        problems.append(str(_l("Use at least %(n)s characters.", n=MIN_LENGTH)))
    if len(password) > MAX_LENGTH:
        problems.append(str(_l("Use at most %(n)s characters.", n=MAX_LENGTH)))
    low = password.lower()
    local = email.split("@", 1)[0].lower() if email else ""
    stripped = re.sub(r"[\d\W_]+$", "", low)  # "password2024!" is still "password"
    if low in _common() or stripped in _common():
        problems.append(str(_l("This password appears in lists of leaked passwords. Choose another one.")))
    elif len(set(low)) <= 2 or _is_run(low):
        problems.append(str(_l("Avoid repeated characters and keyboard or number runs.")))
    elif local and len(local) >= 3 and local in low:
        problems.append(str(_l("Do not use your email address in the password.")))
    elif "voltpay" in low:
        problems.append(str(_l("Do not use the name of this service in the password.")))
    return problems


RULES_HELP = _l(
    "At least %(min)s characters. Long phrases are good. We refuse passwords known from data breaches, "
    "your email address, and runs like 1234567890 or qwerty.",
    min=MIN_LENGTH,
)
