"""Support: the contact form and tickets (public), and the support console (``/support``, staff only).

Who sees what in the console: platform support (role ``support`` without an
operator) and admins see everything; an operator's support or operator staff
see only objects of their own operator's sites. Anything else answers 404, not
403, so an id reveals nothing about another operator's business.

The blueprint is defined here; its views live in the modules of this package,
imported by ``webapp.create_app``.
"""

from __future__ import annotations

from flask import Blueprint, abort, redirect, request, url_for
from flask_login import current_user

from webapp.models import Role

bp = Blueprint("support", __name__, url_prefix="/support")  # the console
contact_bp = Blueprint("contact", __name__)  # /contact and /tickets/<reference>: anyone

STAFF_ROLES = (Role.SUPPORT, Role.OPERATOR_STAFF)


def staff_scope() -> int | None:
    """The operator whose objects the current staff member may see; None: all of them. Non-staff: 403."""
    if not current_user.is_authenticated:
        abort(401)
    if current_user.role == Role.ADMIN:
        return None
    if current_user.role == Role.SUPPORT:
        return current_user.operator_id  # None: platform support
    if current_user.role == Role.OPERATOR_STAFF and current_user.operator_id:
        return current_user.operator_id
    abort(403)


def visible(operator_id: int | None) -> bool:
    """Whether the current staff member may see an object of ``operator_id`` (None: a platform-level object)."""
    scope = staff_scope()
    return scope is None or operator_id == scope


def require_visible(operator_id: int | None) -> None:
    """404 unless the current staff member may see an object of ``operator_id``."""
    if not visible(operator_id):
        abort(404)


@bp.before_request
def _staff_only():
    """Guests go to sign in; signed-in non-staff get 403."""
    if not current_user.is_authenticated:
        return redirect(url_for("auth.sign_in", next=request.full_path))
    staff_scope()
    return None
