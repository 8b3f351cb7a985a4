"""Monitoring alarms of the operator console.

An alarm is raised when a condition starts (a charger goes offline, a connector
reports a fault, a session goes to ``review``, a meter stops sending readings
or is disconnected) and cleared when it ends. ``key`` names the condition
("charger_offline:12"); at most one alarm per key is open at a time (a partial
unique index where the database has them, and the raise path checks first), so
a condition that persists raises one alarm, not one per check. An operator
acknowledges an alarm (it stays until cleared); new alarms are emailed to the
operator's alarm address once.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import Enum, ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from webapp.db import Base, UTCDateTime, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class AlarmKind(enum.StrEnum):
    CHARGER_OFFLINE = "charger_offline"
    CONNECTOR_FAULT = "connector_fault"
    SESSION_REVIEW = "session_review"
    METER_SILENT = "meter_silent"
    METER_DISCONNECTED = "meter_disconnected"


class Alarm(Base):
    """A condition that needs an operator's attention, from when it started until it ended."""

    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"), index=True)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"), index=True)
    kind: Mapped[AlarmKind] = mapped_column(_enum(AlarmKind, "alarm_kind"))
    key: Mapped[str] = mapped_column(String(64))  # the condition: "<kind>:<object id>"
    object_type: Mapped[str] = mapped_column(String(32))  # charger, connector, session, meter
    object_id: Mapped[int] = mapped_column()
    detail: Mapped[str] = mapped_column(Text, default="")  # e.g. the OCPP error code and info
    raised_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    cleared_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    acknowledged_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    emailed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(
            "uq_alarms_open_key",
            "key",
            unique=True,
            postgresql_where=text("cleared_at IS NULL"),
            sqlite_where=text("cleared_at IS NULL"),
        ),
    )
