"""The append-only audit log of staff actions: ``record`` writes one entry.

Call ``record`` inside the same database transaction as the action itself, so
the entry exists exactly when the action happened (a rolled-back action leaves
no entry; an action refused or failed is recorded with that outcome by the
caller in its own transaction). ``before`` and ``after`` are small dicts of
what the action changed, stored as JSON (sorted keys; money as minor units).
"""

from __future__ import annotations

import json
from typing import Any

from flask import g, has_request_context
from flask_login import current_user
from sqlalchemy.orm import Session

from webapp.support.models import AuditEntry


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def record(
    s: Session,
    *,
    action: str,
    object_type: str,
    object_id: Any,
    operator_id: int | None,
    reason: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    outcome: str = "done",
    actor: Any = None,
) -> AuditEntry:
    """Add one audit entry to ``s`` (the caller commits). The actor is ``actor``, else the signed-in user, else the system."""
    who = actor
    if who is None and has_request_context() and current_user.is_authenticated:
        who = current_user
    entry = AuditEntry(
        actor_id=getattr(who, "id", None),
        actor_email=getattr(who, "email", None) or "system",
        actor_role=str(getattr(who, "role", "system")),
        operator_id=operator_id,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        reason=reason or "",
        before_json=_json(before),
        after_json=_json(after),
        outcome=outcome,
        request_id=getattr(g, "request_id", None) if has_request_context() else None,
    )
    s.add(entry)
    return entry
