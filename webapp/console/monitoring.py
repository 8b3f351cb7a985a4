"""Monitoring: the alarm check (every minute), the alarm email, and the console's alarm list and live status board.

``check(s, now)`` looks at every condition and raises or clears alarms
(``webapp.console.models.Alarm``); it is idempotent, so running it again, or
in two workers at once, changes nothing more. The conditions:

``charger_offline``
    A charger is *online* while a gateway holds its websocket: it has a
    ``charger_connections`` row (the gateway writes it on connect and deletes
    it when the socket closes) that is not stale. A row is stale when it has
    seen nothing for ``2 × HEARTBEAT_INTERVAL + 1 min`` (a live charger
    heartbeats every interval), which is what a crashed gateway leaves behind.
    An offline charger raises the alarm once its last sign of life (its last
    message, or its connection row) is older than the operator's
    ``alarm_offline_minutes`` (default 10), so a quick reconnect raises
    nothing. It clears when the charger is online again. A charger that has
    **never been seen** (no message, no connection, ever) raises nothing: it is
    being installed, and the status board shows it as "never seen".
``connector_fault``
    A connector whose last StatusNotification has an error code other than
    ``NoError``, or the status ``Faulted``; also the charger itself
    (StatusNotification of connector 0, ``object_type`` "charger", key
    ``connector_fault:charger:<id>``). The detail is the code, the info and
    the vendor's code; it follows the connector while the alarm stays open
    (a changed code updates the detail, it does not raise a second alarm).
    The last status stands while the charger is offline.
``session_review``
    A charging session in ``review``; the detail is its failure code (or its
    anomaly). Clears when a person settles it.
``meter_silent``
    A meter expected to send readings — it has a collector, or it sent at
    least one reading — whose last reading (or, never read, its creation) is
    older than the operator's ``alarm_meter_silence_hours`` (default 26: a
    daily collector may be a little late). Meters with neither are read by
    hand and never raise it.
``meter_disconnected``
    A meter whose relay is ``disconnected`` (we switched its power off and the
    collector confirmed); the detail is why (``balance_exhausted``, ...).

Each alarm's ``key`` names its condition; the partial unique index on open
keys means a condition has at most one open alarm. Raising inserts in a
savepoint: an ``IntegrityError`` means another check raised it first, which
counts as raised. Clearing sets ``cleared_at`` only on alarms still open.

Email: each check emails every operator with an ``alarm_email`` one message
listing its open alarms not emailed yet (claimed by setting ``emailed_at``
with a conditional UPDATE, so no alarm is emailed twice), through the outbox
(sent by the worker after the commit). An operator without an address gets no
email and the alarms stay unclaimed: setting an address later emails the
alarms still open then, once. An alarm that cleared before it was emailed is
never emailed. The email is written in the language of the account whose
address is ``alarm_email`` if there is one, else English.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_datetime
from flask import abort, current_app, flash, has_app_context, jsonify, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_login import current_user
from flask_wtf import FlaskForm
from huey import crontab
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.routing import BuildError

from webapp.charging.models import ChargerConnection, ChargingSession, SessionState
from webapp.console import bp, operator_scope, require_own
from webapp.console.models import Alarm, AlarmKind
from webapp.db import db_session, session_factory, utcnow
from webapp.meters.models import RelayAction, RelayCommand
from webapp.models import Charger, Connector, Meter, Operator, Site, User
from webapp.notifications.models import SentEmail
from webapp.notifications.outbox import schedule
from webapp.tasks import periodic_task

log = logging.getLogger("voltpay.monitoring")

DEFAULT_HEARTBEAT_S = 300
STALE_SLACK = dt.timedelta(minutes=1)
CLEARED_SHOWN = dt.timedelta(days=7)  # the "cleared" tab of the alarm list
LIST_LIMIT = 500  # alarms on one page of the list
REFRESH_S = 30  # the status board reloads itself this often

KIND_LABELS = {
    AlarmKind.CHARGER_OFFLINE: _l("Charger offline"),
    AlarmKind.CONNECTOR_FAULT: _l("Fault"),
    AlarmKind.SESSION_REVIEW: _l("Session to review"),
    AlarmKind.METER_SILENT: _l("Meter without readings"),
    AlarmKind.METER_DISCONNECTED: _l("Meter disconnected"),
}
STATUS_LABELS = {  # OCPP 1.6 ChargePointStatus
    "Available": _l("Available"), "Preparing": _l("Preparing"), "Charging": _l("Charging"),
    "SuspendedEV": _l("Suspended by the car"), "SuspendedEVSE": _l("Suspended by the charger"), "Finishing": _l("Finishing"),
    "Reserved": _l("Reserved"), "Unavailable": _l("Unavailable"), "Faulted": _l("Faulted"),
}
NO_ERROR = "NoError"


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class Condition:
    """A condition that holds now and deserves an alarm."""

    kind: AlarmKind
    operator_id: int
    site_id: int | None
    object_type: str
    object_id: int
    detail: str = ""

    @property
    def key(self) -> str:
        """The alarm's key: ``<kind>:<object id>`` (``connector_fault:charger:<id>`` for a fault of the whole charger)."""
        if self.kind is AlarmKind.CONNECTOR_FAULT and self.object_type == "charger":
            return f"{self.kind.value}:charger:{self.object_id}"
        return f"{self.kind.value}:{self.object_id}"


@dataclass
class Summary:
    """What one check did: alarms raised and cleared (ids), details updated, alarms open afterwards, emails scheduled."""

    raised: list[int] = field(default_factory=list)
    cleared: list[int] = field(default_factory=list)
    updated: int = 0
    open: int = 0
    emails: int = 0

    def as_dict(self) -> dict:
        """Counts for the log."""
        return {"raised": len(self.raised), "cleared": len(self.cleared), "updated": self.updated, "open": self.open, "emails": self.emails}


def stale_after() -> dt.timedelta:
    """How long a connection row may stay silent before it counts as a dead gateway's leftover."""
    heartbeat = DEFAULT_HEARTBEAT_S
    if has_app_context():
        heartbeat = int(current_app.config.get("HEARTBEAT_INTERVAL") or DEFAULT_HEARTBEAT_S)
    return 2 * dt.timedelta(seconds=heartbeat) + STALE_SLACK


def is_online(connection_last_seen: dt.datetime | None, now: dt.datetime, stale: dt.timedelta | None = None) -> bool:
    """Whether a charger with this connection row (None: none) counts as online at ``now``."""
    return connection_last_seen is not None and connection_last_seen >= now - (stale or stale_after())


def _last_life(*times: dt.datetime | None) -> dt.datetime | None:
    seen = [t for t in times if t is not None]
    return max(seen) if seen else None


def _iso(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds") if t is not None else ""


def _fault_detail(error_code: str | None, info: str | None = None, vendor: str | None = None) -> str:
    text = error_code or "Faulted"
    if info:
        text += f": {info}"
    if vendor:
        text += f" ({vendor})"
    return text[:500]


def _is_fault(status: str | None, error_code: str | None) -> bool:
    return status == "Faulted" or (error_code is not None and error_code != NO_ERROR)


def conditions(s: Session, now: dt.datetime) -> dict[str, Condition]:
    """Every condition that holds at ``now``, by alarm key."""
    found: dict[str, Condition] = {}

    def add(c: Condition) -> None:
        found[c.key] = c

    # Chargers: those not online, with their operator's threshold.
    stale = stale_after()
    rows = s.execute(
        select(Charger.id, Charger.last_seen_at, Charger.status, Charger.error_code, Site.id, Site.operator_id,
               Operator.alarm_offline_minutes, ChargerConnection.last_seen, ChargerConnection.connected_at)
        .join(Site, Site.id == Charger.site_id).join(Operator, Operator.id == Site.operator_id)
        .outerjoin(ChargerConnection, ChargerConnection.charger_id == Charger.id)
        .where(or_(ChargerConnection.charger_id.is_(None), ChargerConnection.last_seen < now - stale,
                   Charger.status == "Faulted", and_(Charger.error_code.is_not(None), Charger.error_code != NO_ERROR)))
    ).all()
    for charger_id, seen_at, status, error_code, site_id, op_id, minutes, conn_seen, conn_at in rows:
        if not is_online(conn_seen, now, stale):
            last = _last_life(seen_at, conn_seen, conn_at)
            if last is not None and last < now - dt.timedelta(minutes=max(1, minutes or 10)):
                add(Condition(AlarmKind.CHARGER_OFFLINE, op_id, site_id, "charger", charger_id, _iso(last)))
        if _is_fault(status, error_code):
            add(Condition(AlarmKind.CONNECTOR_FAULT, op_id, site_id, "charger", charger_id, _fault_detail(error_code)))

    # Connectors reporting a fault.
    for cid, status, code, info, vendor, site_id, op_id in s.execute(
        select(Connector.id, Connector.status, Connector.error_code, Connector.status_info, Connector.vendor_error_code,
               Site.id, Site.operator_id)
        .join(Charger, Charger.id == Connector.charger_id).join(Site, Site.id == Charger.site_id)
        .where(or_(Connector.status == "Faulted", and_(Connector.error_code.is_not(None), Connector.error_code != NO_ERROR)))
    ):
        if _is_fault(status, code):
            add(Condition(AlarmKind.CONNECTOR_FAULT, op_id, site_id, "connector", cid, _fault_detail(code, info, vendor)))

    # Sessions waiting for a person.
    for sid, failure, anomaly, site_id, op_id in s.execute(
        select(ChargingSession.id, ChargingSession.failure_code, ChargingSession.anomaly, Site.id, Site.operator_id)
        .join(Connector, Connector.id == ChargingSession.connector_id).join(Charger, Charger.id == Connector.charger_id)
        .join(Site, Site.id == Charger.site_id).where(ChargingSession.state == SessionState.REVIEW)
    ):
        add(Condition(AlarmKind.SESSION_REVIEW, op_id, site_id, "session", sid, (failure or anomaly or "")[:500]))

    # Meters that stopped reporting, per operator (each has its own threshold).
    for op_id, hours in s.execute(select(Operator.id, Operator.alarm_meter_silence_hours)):
        cutoff = now - dt.timedelta(hours=max(1, hours or 26))
        for mid, last, site_id in s.execute(
            select(Meter.id, Meter.last_reading_at, Site.id).join(Site, Site.id == Meter.site_id)
            .where(Site.operator_id == op_id, or_(Meter.collector_id.is_not(None), Meter.last_reading_at.is_not(None)),
                   func.coalesce(Meter.last_reading_at, Meter.created_at) < cutoff)
        ):
            add(Condition(AlarmKind.METER_SILENT, op_id, site_id, "meter", mid, _iso(last)))

    # Meters switched off.
    off = s.execute(select(Meter.id, Site.id, Site.operator_id).join(Site, Site.id == Meter.site_id)
                    .where(Meter.relay_state == "disconnected")).all()
    if off:
        reasons: dict[int, str] = {}
        for mid, reason in s.execute(select(RelayCommand.meter_id, RelayCommand.reason)
                                     .where(RelayCommand.meter_id.in_([m for m, _s, _o in off]),
                                            RelayCommand.action == RelayAction.DISCONNECT)
                                     .order_by(RelayCommand.id)):
            reasons[mid] = reason  # the newest disconnect wins
        for mid, site_id, op_id in off:
            add(Condition(AlarmKind.METER_DISCONNECTED, op_id, site_id, "meter", mid, reasons.get(mid, "")))
    return found


def check(s: Session, now: dt.datetime) -> Summary:
    """Raise an alarm for each new condition, clear those whose condition ended, email the new ones. Caller commits."""
    summary = Summary()
    found = conditions(s, now)
    open_alarms = {a.key: a for a in s.scalars(select(Alarm).where(Alarm.cleared_at.is_(None)))}

    for key, c in found.items():
        alarm = open_alarms.get(key)
        if alarm is not None:
            if alarm.detail != c.detail:
                alarm.detail = c.detail
                summary.updated += 1
            continue
        alarm = Alarm(operator_id=c.operator_id, site_id=c.site_id, kind=c.kind, key=key, object_type=c.object_type,
                      object_id=c.object_id, detail=c.detail, raised_at=now)
        try:
            with s.begin_nested():
                s.add(alarm)
        except IntegrityError:  # another check raised it meanwhile: it is raised
            log.debug("alarm raised by a concurrent check", extra={"key": key})
            continue
        summary.raised.append(alarm.id)

    ended = [a.id for key, a in open_alarms.items() if key not in found]
    if ended:
        # Conditional: an alarm another check cleared meanwhile keeps its time.
        summary.cleared = list(s.scalars(update(Alarm).where(Alarm.id.in_(ended), Alarm.cleared_at.is_(None))
                                         .values(cleared_at=now).returning(Alarm.id)
                                         .execution_options(synchronize_session=False)))
        for a in open_alarms.values():
            if a.id in summary.cleared:
                s.expire(a)
    s.flush()
    summary.emails = email_new_alarms(s, now)
    summary.open = s.scalar(select(func.count()).select_from(Alarm).where(Alarm.cleared_at.is_(None))) or 0
    return summary


def email_new_alarms(s: Session, now: dt.datetime) -> int:
    """Schedule one email per operator with an address listing its open alarms not emailed yet; how many emails."""
    pending = s.execute(
        select(Alarm.operator_id, Alarm.id).join(Operator, Operator.id == Alarm.operator_id)
        .where(Alarm.cleared_at.is_(None), Alarm.emailed_at.is_(None), Operator.alarm_email.is_not(None), Operator.alarm_email != "")
        .order_by(Alarm.id)
    ).all()
    by_operator: dict[int, list[int]] = defaultdict(list)
    for op_id, alarm_id in pending:
        by_operator[op_id].append(alarm_id)
    sent = 0
    for op_id, ids in sorted(by_operator.items()):
        claimed = sorted(s.scalars(update(Alarm).where(Alarm.id.in_(ids), Alarm.emailed_at.is_(None), Alarm.cleared_at.is_(None))
                                   .values(emailed_at=now).returning(Alarm.id).execution_options(synchronize_session=False)))
        if not claimed:
            continue  # another check claimed them
        to = s.scalar(select(Operator.alarm_email).where(Operator.id == op_id))
        reference = f"alarms:{op_id}:{claimed[0]}-{claimed[-1]}"
        schedule(s, to=to.strip(), template="alarms", reference=reference, key=f"{reference}:email")
        sent += 1
    return sent


def run_check(now: dt.datetime | None = None) -> Summary:
    """One check in its own transaction (the worker's job, commands, tests); emails go out after the commit."""
    with session_factory().begin() as s:
        return check(s, now or utcnow())


@periodic_task(crontab(minute="*"))
def monitoring_check() -> None:
    """Every minute: raise and clear the operators' alarms, and email the new ones."""
    summary = run_check()
    if summary.raised or summary.cleared or summary.emails:
        log.info("alarms checked", extra=summary.as_dict())


# --------------------------------------------------------------------------- describing an alarm (pages and email)


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(value: dt.datetime | None, tz: str | None, fmt: str = "medium") -> str:
    """``value`` in the time zone ``tz`` (a site's), written for the current language; "" for None."""
    if value is None:
        return ""
    return format_datetime(value, fmt, tzinfo=_zone(tz), locale=str(get_locale() or "en"))


def describe(alarm: Alarm, tz: str | None) -> str:
    """What the alarm's detail means, in a sentence for the current language."""
    detail = alarm.detail or ""
    if alarm.kind in (AlarmKind.CHARGER_OFFLINE, AlarmKind.METER_SILENT):
        try:
            at = dt.datetime.fromisoformat(detail) if detail else None
        except ValueError:
            at = None
        if alarm.kind is AlarmKind.CHARGER_OFFLINE:
            return _("Last seen %(time)s", time=local_time(at, tz)) if at else _("Not seen since it was added")
        return _("Last reading %(time)s", time=local_time(at, tz)) if at else _("No reading received yet")
    if alarm.kind is AlarmKind.METER_DISCONNECTED:
        reasons = {"balance_exhausted": _("the credit is used up"), "operator": _("switched off by the operator"),
                   "account_closed": _("the account was closed")}
        return _("Power off: %(reason)s", reason=reasons.get(detail, detail)) if detail else _("Power off")
    if alarm.kind is AlarmKind.SESSION_REVIEW:
        return _("Reason: %(code)s", code=detail) if detail else ""
    return detail


@dataclass
class ObjectInfo:
    """What an alarm is about, for people: a name and (where a page exists) a link."""

    name: str
    link: str | None = None


# Pages an alarm's object may link to, first found wins: (endpoint, argument name, which id).
OBJECT_PAGES = {
    "charger": [("console.charger", "charger_id", "charger")],
    "connector": [("console.charger", "charger_id", "charger")],
    "session": [("console.order", "session_id", "session"), ("support.session", "session_id", "session")],
    "meter": [("support.meter", "meter_code", "meter_code"), ("console.meter_edit", "meter_id", "meter")],
}


def _link(object_type: str, ids: dict[str, int | str], *, external: bool = False) -> str | None:
    views = current_app.view_functions
    for endpoint, arg, which in OBJECT_PAGES.get(object_type, []):
        if endpoint in views and which in ids:
            try:
                return url_for(endpoint, **{arg: ids[which]}, _external=external)
            except BuildError:
                continue
    return None


def object_infos(s: Session, alarms: list[Alarm], *, links: bool = True) -> dict[int, ObjectInfo]:
    """Alarm id → what it is about (a few queries for the whole list)."""
    want: dict[str, set[int]] = defaultdict(set)
    for a in alarms:
        want[a.object_type].add(a.object_id)
    chargers = {cid: cp for cid, cp in s.execute(select(Charger.id, Charger.charge_point_id)
                                                 .where(Charger.id.in_(want["charger"])))} if want["charger"] else {}
    connectors = {row[0]: row for row in s.execute(
        select(Connector.id, Connector.number, Connector.connector_code, Charger.id, Charger.charge_point_id)
        .join(Charger, Charger.id == Connector.charger_id).where(Connector.id.in_(want["connector"])))} if want["connector"] else {}
    meters = {row[0]: row for row in s.execute(select(Meter.id, Meter.meter_code, Meter.serial)
                                               .where(Meter.id.in_(want["meter"])))} if want["meter"] else {}
    out: dict[int, ObjectInfo] = {}
    for a in alarms:
        ids: dict[str, int | str] = {}
        if a.object_type == "charger":
            name = _("Charger %(id)s", id=chargers.get(a.object_id, f"#{a.object_id}"))
            ids["charger"] = a.object_id
        elif a.object_type == "connector":
            row = connectors.get(a.object_id)
            if row is None:
                name = _("Connector #%(id)s", id=a.object_id)
            else:
                name = _("Charger %(charger)s, connector %(number)s (%(code)s)", charger=row[4], number=row[1], code=row[2])
                ids["charger"] = row[3]
        elif a.object_type == "session":
            name = _("Session #%(id)s", id=a.object_id)
            ids["session"] = a.object_id
        elif a.object_type == "meter":
            row = meters.get(a.object_id)
            name = _("Meter %(code)s (serial %(serial)s)", code=row[1], serial=row[2]) if row else _("Meter #%(id)s", id=a.object_id)
            ids["meter"] = a.object_id
            if row:
                ids["meter_code"] = row[1]
        else:
            name = f"{a.object_type} #{a.object_id}"
        out[a.id] = ObjectInfo(name, _link(a.object_type, ids) if links else None)
    return out


def _sites(s: Session, ids) -> dict[int, Site]:
    ids = {i for i in ids if i is not None}
    return {site.id: site for site in s.scalars(select(Site).where(Site.id.in_(ids)))} if ids else {}


# --------------------------------------------------------------------------- the email (written by the worker)


def _build_alarm_email(s: Session, row: SentEmail):
    """The alarm email: the alarms claimed by one check, listed with their site, object and time."""
    from flask_babel import force_locale

    from webapp.notifications.emails import _base, _locale, _render

    _, op_id, span = row.reference.split(":")
    first, last = (int(x) for x in span.split("-"))
    anchor = s.get(Alarm, first)
    if anchor is None or anchor.emailed_at is None:
        return None
    alarms = list(s.scalars(select(Alarm).where(Alarm.operator_id == int(op_id), Alarm.id.between(first, last),
                                                Alarm.emailed_at == anchor.emailed_at).order_by(Alarm.id)))
    operator = s.get(Operator, int(op_id))
    if not alarms or operator is None:
        return None
    person = s.scalar(select(User).where(func.lower(User.email) == row.to.lower()))
    locale = _locale(person.locale if person else None)
    sites = _sites(s, (a.site_id for a in alarms))
    with force_locale(locale):
        infos = object_infos(s, alarms, links=False)
        items = []
        for a in alarms:
            site = sites.get(a.site_id)
            tz = site.time_zone if site else "UTC"
            items.append({
                "kind": str(KIND_LABELS.get(a.kind, a.kind.value)), "site": site.name if site else "", "object": infos[a.id].name,
                "detail": describe(a, tz), "raised": local_time(a.raised_at, tz), "cleared": local_time(a.cleared_at, tz),
            })
    return _render(row.to, "alarms", locale, operator=operator.name, alarms=items, count=len(items),
                   link=f"{_base()}/operator/alarms")


def _register_builders() -> None:
    from webapp.notifications.emails import BUILDERS

    BUILDERS.setdefault("alarms", _build_alarm_email)


_register_builders()


# --------------------------------------------------------------------------- pages


class AcknowledgeForm(FlaskForm):
    """Acknowledge an alarm (the CSRF token is the whole form)."""


def _scoped(q, column, scope: int | None):
    return q if scope is None else q.where(column == scope)


@bp.get("/alarms")
def alarms():
    """The alarm list: open alarms newest first, or those cleared in the last 7 days (``?show=cleared``)."""
    scope = operator_scope()
    s = db_session()
    show = "cleared" if request.args.get("show") == "cleared" else "open"
    q = _scoped(select(Alarm), Alarm.operator_id, scope)
    if show == "cleared":
        q = q.where(Alarm.cleared_at >= utcnow() - CLEARED_SHOWN).order_by(Alarm.cleared_at.desc(), Alarm.id.desc())
    else:
        q = q.where(Alarm.cleared_at.is_(None)).order_by(Alarm.raised_at.desc(), Alarm.id.desc())
    rows = list(s.scalars(q.limit(LIST_LIMIT)))
    count_q = _scoped(select(func.count()).select_from(Alarm), Alarm.operator_id, scope)
    open_count = s.scalar(count_q.where(Alarm.cleared_at.is_(None))) or 0
    sites = _sites(s, (a.site_id for a in rows))
    infos = object_infos(s, rows)
    ackers = {u.id: u.email for u in s.scalars(select(User).where(User.id.in_({a.acknowledged_by_id for a in rows} - {None})))}
    operators = ({o.id: o.name for o in s.scalars(select(Operator).where(Operator.id.in_({a.operator_id for a in rows})))}
                 if scope is None else {})
    items = []
    for a in rows:
        site = sites.get(a.site_id)
        tz = site.time_zone if site else "UTC"
        items.append({
            "alarm": a, "kind": KIND_LABELS.get(a.kind, a.kind.value), "site": site.name if site else "",
            "object": infos[a.id], "detail": describe(a, tz), "raised": local_time(a.raised_at, tz),
            "cleared": local_time(a.cleared_at, tz), "acknowledged": local_time(a.acknowledged_at, tz),
            "acknowledged_by": ackers.get(a.acknowledged_by_id), "operator": operators.get(a.operator_id),
        })
    return render_template("console/alarms.html", items=items, show=show, open_count=open_count, limit=LIST_LIMIT,
                           admin=scope is None)


@bp.post("/alarms/<int(max=2147483647):alarm_id>/acknowledge")
def acknowledge(alarm_id: int):
    """Acknowledge an alarm: someone is on it (it stays in the list until its condition ends)."""
    form = AcknowledgeForm()
    s = db_session()
    alarm = s.get(Alarm, alarm_id, with_for_update=True)
    if alarm is None:
        abort(404)
    require_own(alarm.operator_id)
    if not form.validate_on_submit():
        abort(400)
    if alarm.acknowledged_at is None:  # the first person to acknowledge it stays on record
        alarm.acknowledged_at, alarm.acknowledged_by_id = utcnow(), current_user.id
        s.commit()
        flash(_("Alarm acknowledged."), "success")
    else:
        s.rollback()
    show = request.form.get("show")
    return redirect(url_for("console.alarms", show="cleared") if show == "cleared" else url_for("console.alarms"), code=303)


def status_board(s: Session, scope: int | None, now: dt.datetime, site_id: int | None = None) -> list[dict]:
    """The live status of every charger and connector of the operator (``scope``; None: every operator), by site with chargers."""
    q = _scoped(select(Site), Site.operator_id, scope).order_by(Site.name, Site.id)
    if site_id is not None:
        q = q.where(Site.id == site_id)
    sites = list(s.scalars(q))
    if not sites:
        return []
    chargers = list(s.scalars(select(Charger).where(Charger.site_id.in_([x.id for x in sites])).order_by(Charger.charge_point_id)))
    charger_ids = [c.id for c in chargers]
    conns = {c.charger_id: c for c in s.scalars(select(ChargerConnection).where(ChargerConnection.charger_id.in_(charger_ids)))} if chargers else {}
    connectors: dict[int, list[Connector]] = defaultdict(list)
    if chargers:
        for c in s.scalars(select(Connector).where(Connector.charger_id.in_(charger_ids)).order_by(Connector.number)):
            connectors[c.charger_id].append(c)
    by_site: dict[int, list[Charger]] = defaultdict(list)
    for c in chargers:
        by_site[c.site_id].append(c)
    stale = stale_after()
    out = []
    for site in sites:
        items = []
        for c in by_site.get(site.id, []):
            conn = conns.get(c.id)
            online = is_online(conn.last_seen if conn else None, now, stale)
            last = _last_life(c.last_seen_at, conn.last_seen if conn else None)
            state = "online" if online else ("offline" if last is not None else "never_seen")
            items.append({
                "id": c.id, "charge_point_id": c.charge_point_id, "state": state, "online": online,
                "status": c.status, "error_code": c.error_code, "fault": _is_fault(c.status, c.error_code),
                "last_seen": last, "connected_at": conn.connected_at if conn else None,
                "connectors": [{
                    "id": k.id, "number": k.number, "connector_code": k.connector_code, "status": k.status,
                    "error_code": k.error_code, "info": k.status_info, "vendor_error_code": k.vendor_error_code,
                    "status_at": k.status_at, "fault": _is_fault(k.status, k.error_code),
                } for k in connectors.get(c.id, [])],
            })
        if not items:
            continue  # a building with meters only
        out.append({"id": site.id, "name": site.name, "time_zone": site.time_zone, "operator_id": site.operator_id, "chargers": items})
    return out


def _site_filter() -> int | None:
    raw = request.args.get("site")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 2147483647:
        abort(404)
    site = db_session().get(Site, int(raw))
    if site is None:
        abort(404)
    require_own(site.operator_id)
    return site.id


@bp.get("/status")
def status():
    """The live status board: each site's chargers and connectors; reloads itself every ``REFRESH_S`` seconds."""
    scope = operator_scope()
    site_id = _site_filter()
    now = utcnow()
    board = status_board(db_session(), scope, now, site_id)
    refresh = request.args.get("refresh") != "off"
    return render_template("console/status.html", board=board, now=now, refresh=refresh, refresh_s=REFRESH_S, site_id=site_id,
                           status_labels=STATUS_LABELS, local_time=local_time)


@bp.get("/status.json")
def status_json():
    """The status board as JSON (times in UTC, ISO 8601), for a script or a wall screen."""
    scope = operator_scope()
    site_id = _site_filter()
    now = utcnow()
    board = status_board(db_session(), scope, now, site_id)
    for site in board:
        for c in site["chargers"]:
            c["last_seen"], c["connected_at"] = _iso(c["last_seen"]) or None, _iso(c["connected_at"]) or None
            for k in c["connectors"]:
                k["status_at"] = _iso(k["status_at"]) or None
    resp = jsonify({"generated_at": _iso(now), "sites": board})
    resp.headers["Cache-Control"] = "no-store"
    return resp
