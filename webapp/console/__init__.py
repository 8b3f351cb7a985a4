"""The operator console (``/operator``): setup, monitoring, analytics and orders.

Operator staff see and change only their own operator's objects; an admin
sees every operator's. Anything else answers 404 (not 403), so ids reveal
nothing. The blueprint is defined here; its views live in the modules of this
package, imported by ``webapp.create_app``. (Branding, meter collectors and
settlement have their own blueprints under ``/operator`` too.)
"""

from __future__ import annotations

from flask import Blueprint, abort, redirect, request, url_for
from flask_login import current_user

from webapp.models import Role

bp = Blueprint("console", __name__, url_prefix="/operator")


def operator_scope() -> int | None:
    """The operator the current person works for; None for an admin (every operator). Others: 403."""
    if not current_user.is_authenticated:
        abort(401)
    if current_user.role == Role.ADMIN:
        return None
    if current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        return current_user.operator_id
    abort(403)


def require_own(operator_id: int | None) -> None:
    """404 unless the current person may see an object of ``operator_id``."""
    scope = operator_scope()
    if scope is not None and operator_id != scope:
        abort(404)


@bp.before_request
def _operator_only():
    if not current_user.is_authenticated:
        return redirect(url_for("auth.sign_in", next=request.full_path))
    operator_scope()
    return None


@bp.app_context_processor
def _endpoint_helpers():
    """``has_endpoint(name)`` for navigation that lists only sections this app has."""
    from flask import current_app

    return {"has_endpoint": lambda name: name in current_app.view_functions}
