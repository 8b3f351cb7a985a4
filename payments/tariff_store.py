"""Tariffs in the database: one versioned OCPI 2.2.1 tariff per owner (a connector today, a meter later).

Tables
------
* ``tariffs``: one row per owner, named like the rest of the money domain names
  its owners: ``connector:<id>`` (and ``meter:<id>`` once meters take OCPI
  tariffs). A plain string rather than a foreign key keeps ``payments`` free of
  the web app's tables and lets any kind of owner have a tariff.
* ``tariff_versions``: the tariff's history. Each version holds the OCPI Tariff
  object as JSON text (numbers kept exactly: it is read back with
  ``parse_float=Decimal``), its currency, the UTC instant it takes effect
  (``effective_from``), when and by whom it was created.

Rules
-----
1. **The version in force at ``at``** is the one with the latest
   ``effective_from <= at`` (``tariff_in_force``). A session is priced by the
   version in force when it starts, for its whole length, as OCPI says a driver
   accepts the tariff that is valid when they start.
2. **Versions are never edited or deleted**: a price change is a new version. An
   ORM update of a version raises (``before_update`` hook below).
3. **No rewriting of history.** A version may not take effect before it is
   created: ``effective_from`` earlier than ``now - BACKDATE_TOLERANCE`` is
   refused; within the tolerance (a form sent a few seconds ago, clocks a little
   apart) it is moved to ``now``. So every answer ``tariff_in_force`` gave for a
   past instant stays true forever, and the database checks it too
   (``effective_from >= created_at``). Future versions may be added in any order
   (a change scheduled for 1 March, then one for 15 February); two versions of
   one tariff cannot take effect at the same instant.
4. **Refused, never stored:** text that is not JSON, a tariff that
   ``validate_tariff`` refuses (``TariffError`` with the field's path and the
   reason), a currency other than the site's, and a tariff whose own
   ``end_date_time`` is before the version takes effect (it could never price
   anything).

Services ``flush()``; the caller commits.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache

from sqlalchemy import CheckConstraint, ForeignKey, Integer, String, Text, UniqueConstraint, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from payments.base import Base, UTCDateTime, utcnow
from payments.money import MoneyError, check_currency
from payments.tariffs import CompiledTariff, TariffError, compile_tariff

__all__ = [
    "BACKDATE_TOLERANCE",
    "MAX_TARIFF_JSON_CHARS",
    "Tariff",
    "TariffVersion",
    "add_version",
    "connector_owner",
    "dumps",
    "loads",
    "meter_owner",
    "tariff_in_force",
    "versions",
]

BACKDATE_TOLERANCE = dt.timedelta(seconds=60)
MAX_TARIFF_JSON_CHARS = 65_536  # a real tariff is a few KiB; this bounds what one request may store
_OWNER = re.compile(r"(connector|meter):[1-9][0-9]{0,18}")


def connector_owner(connector_id: int) -> str:
    """How a connector owns its tariff: ``connector:<id>``."""
    return f"connector:{int(connector_id)}"


def meter_owner(meter_id: int) -> str:
    """How a meter will own its tariff: ``meter:<id>``."""
    return f"meter:{int(meter_id)}"


class Tariff(Base):
    """The tariff of one owner; its prices are in its versions."""

    __tablename__ = "tariffs"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), unique=True)  # "connector:12", "meter:7"
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    versions: Mapped[list[TariffVersion]] = relationship(back_populates="tariff", order_by="TariffVersion.effective_from")


class TariffVersion(Base):
    """One immutable version of a tariff: the OCPI Tariff JSON and the instant it takes effect."""

    __tablename__ = "tariff_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    tariff_id: Mapped[int] = mapped_column(ForeignKey("tariffs.id"))
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... in order of creation
    effective_from: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    tariff_json: Mapped[str] = mapped_column(Text)  # the OCPI Tariff object; numbers exact (read with Decimal)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))  # "user:42", "seed", "cli"

    tariff: Mapped[Tariff] = relationship(back_populates="versions")

    __table_args__ = (
        UniqueConstraint("tariff_id", "number", name="uq_tariff_versions_tariff_number"),
        # also the index of tariff_in_force: (tariff_id, effective_from <= at) ORDER BY effective_from DESC
        UniqueConstraint("tariff_id", "effective_from", name="uq_tariff_versions_tariff_effective_from"),
        CheckConstraint("effective_from >= created_at", name="not_backdated"),
        CheckConstraint("number >= 1", name="number_positive"),
    )

    @property
    def ocpi(self) -> dict:
        """The OCPI Tariff object, freshly parsed (numbers as Decimal); safe to change."""
        return loads(self.tariff_json)

    @property
    def compiled(self) -> CompiledTariff:
        """The validated, pre-compiled tariff for ``payments.tariffs`` (cached by content)."""
        return _compile_text(self.tariff_json)

    @property
    def owner(self) -> str:
        """The owner of the tariff this version belongs to."""
        return self.tariff.owner


@event.listens_for(TariffVersion, "before_update")
def _versions_are_immutable(_mapper, _connection, target: TariffVersion) -> None:
    raise TariffError("", f"tariff version {target.id} cannot be changed: add a new version instead")


@lru_cache(maxsize=256)
def _compile_text(text: str) -> CompiledTariff:
    return compile_tariff(loads(text))


# --------------------------------------------------------------------------- JSON, Decimal-exact


def _no_constant(name: str) -> object:
    raise TariffError("", f"not valid JSON: {name} is not a number")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:  # the last one would silently win: refuse, a price may hide behind it
            raise TariffError("", f"not valid: the key {json.dumps(k)} appears twice in one JSON object")
        out[k] = v
    return out


def loads(text: str) -> dict | list | object:
    """Parse JSON text with numbers as exact Decimals (integers stay int); ``TariffError`` if it is not JSON."""
    if not isinstance(text, str):
        raise TariffError("", "must be JSON text")
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise TariffError("", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise TariffError("", "not valid JSON: nested too deeply") from None


def _number_text(d: Decimal) -> str:
    if not d.is_finite():
        raise TariffError("", "numbers must be finite")
    text = str(d)  # "0.35", "1E+1": both valid JSON numbers, exactly the Decimal
    return text


def dumps(value: object) -> str:
    """JSON text with Decimals written as exact JSON numbers (never through float)."""
    if isinstance(value, Decimal):
        return _number_text(value)
    if isinstance(value, float):
        return _number_text(Decimal(repr(value)))  # read as the number it prints as, like the engine
    if isinstance(value, Mapping):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, (dt.datetime, dt.date)):
        return json.dumps(value.isoformat())
    if value is None or isinstance(value, (str, int, bool)):
        return json.dumps(value)  # ASCII escapes: no NUL or lone surrogate reaches the database as such
    raise TariffError("", f"cannot be written as JSON: {type(value).__name__}")


# --------------------------------------------------------------------------- queries


def tariff_in_force(s: Session, owner: str, at: dt.datetime) -> TariffVersion | None:
    """The version of ``owner``'s tariff in force at ``at``: the latest with ``effective_from <= at``."""
    if at.tzinfo is None:
        raise ValueError("tariff_in_force needs an aware datetime")
    return s.scalar(
        select(TariffVersion)
        .join(Tariff)
        .where(Tariff.owner == owner, TariffVersion.effective_from <= at)
        .order_by(TariffVersion.effective_from.desc())
        .limit(1)
    )


def versions(s: Session, owner: str) -> list[TariffVersion]:
    """Every version of ``owner``'s tariff, in the order they take effect."""
    return list(
        s.scalars(select(TariffVersion).join(Tariff).where(Tariff.owner == owner).order_by(TariffVersion.effective_from)).all()
    )


def _tariff_row(s: Session, owner: str) -> Tariff:
    """``owner``'s tariff row, created on first use, locked so version numbers are handed out one at a time."""
    stmt = select(Tariff).where(Tariff.owner == owner)
    row = s.scalar(stmt.with_for_update())
    if row is not None:
        return row
    try:
        with s.begin_nested():
            row = Tariff(owner=owner)
            s.add(row)
    except IntegrityError:  # created concurrently: take the other one, locked
        row = s.scalar(stmt.with_for_update())
        assert row is not None
    return row


def _parse(tariff: str | Mapping) -> tuple[dict, str]:
    """(the tariff as a dict with Decimal numbers, its canonical JSON text), or ``TariffError``."""
    if isinstance(tariff, str):
        if len(tariff) > MAX_TARIFF_JSON_CHARS:
            raise TariffError("", f"the tariff JSON is too long (at most {MAX_TARIFF_JSON_CHARS} characters)")
        parsed = loads(tariff)
    elif isinstance(tariff, Mapping):
        parsed = loads(dumps(tariff))  # the same exact numbers, and a copy the caller cannot change later
    else:
        raise TariffError("", "a tariff must be a JSON object")
    if not isinstance(parsed, dict):
        raise TariffError("", "a tariff must be a JSON object")
    compile_tariff(parsed)  # TariffError(path, reason) on the first problem
    text = dumps(parsed)
    if len(text) > MAX_TARIFF_JSON_CHARS:
        raise TariffError("", f"the tariff JSON is too long (at most {MAX_TARIFF_JSON_CHARS} characters)")
    return parsed, text


def add_version(
    s: Session,
    owner: str,
    tariff: str | Mapping,
    *,
    site_currency: str,
    created_by: str,
    effective_from: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> TariffVersion:
    """Add a version of ``owner``'s tariff taking effect at ``effective_from`` (default: now); flushes.

    ``tariff`` is the OCPI Tariff object as JSON text or a dict. Raises
    ``TariffError(path, reason)`` and stores nothing when the JSON is not valid,
    the tariff does not validate, its currency is not ``site_currency``, or
    ``effective_from`` is in the past (see the module's rules).
    """
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise ValueError(f"not a tariff owner: {owner!r} (expected connector:<id> or meter:<id>)")
    if not isinstance(created_by, str) or not created_by or len(created_by) > 64:
        raise ValueError("created_by must name who adds the version (at most 64 characters)")
    now = now or utcnow()
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    try:
        site_currency = check_currency(site_currency)
    except MoneyError as e:
        raise ValueError(f"site currency: {e}") from None
    parsed, text = _parse(tariff)
    compiled = _compile_text(text)
    if compiled.currency != site_currency:
        raise TariffError("currency", f"must be {site_currency}, the site's currency (the tariff is in {compiled.currency})")
    if effective_from is None:
        effective_from = now
    elif not isinstance(effective_from, dt.datetime) or effective_from.tzinfo is None:
        raise TariffError("effective_from", "must be a date and time with a time zone")
    effective_from = effective_from.astimezone(dt.UTC)
    if effective_from < now - BACKDATE_TOLERANCE:
        raise TariffError(
            "effective_from",
            "must not be in the past: sessions already started were priced by the version then in force",
        )
    effective_from = max(effective_from, now)
    if compiled.valid_until is not None and compiled.valid_until <= effective_from:
        raise TariffError("end_date_time", "the tariff ends before this version takes effect, so it could never price a session")

    row = _tariff_row(s, owner)
    if s.scalar(select(TariffVersion.id).where(TariffVersion.tariff_id == row.id, TariffVersion.effective_from == effective_from)):
        raise TariffError("effective_from", "another version of this tariff takes effect at that instant")
    number = (s.scalar(select(func.max(TariffVersion.number)).where(TariffVersion.tariff_id == row.id)) or 0) + 1
    version = TariffVersion(
        tariff_id=row.id,
        number=number,
        effective_from=effective_from,
        currency=compiled.currency,
        tariff_json=text,
        created_at=now,
        created_by=created_by,
    )
    s.add(version)
    s.flush()
    return version
