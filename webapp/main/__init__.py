"""Home page, language picker and health check."""

from __future__ import annotations

from flask import Blueprint, jsonify, redirect, render_template, request, session, url_for
from flask_login import current_user
from sqlalchemy import text

from webapp.db import db_session
from webapp.i18n import LANGUAGES

bp = Blueprint("main", __name__)


@bp.route("/")
def home():
    """Start page: what Voltpay does and where to go next."""
    return render_template("main/home.html")


@bp.route("/language", methods=["POST"])
def language():
    """Switch the language; saved on the account when signed in."""
    code = request.form.get("locale", "")
    if code in LANGUAGES:
        session["locale"] = code
        if current_user.is_authenticated:
            current_user.locale = code
            db_session().commit()
    target = request.form.get("next") or ""
    if not target.startswith("/") or target.startswith("//"):
        target = url_for("main.home")
    return redirect(target)


@bp.route("/healthz")
def healthz():
    """Liveness and database check for load balancers: 200 when the database answers, else 503."""
    try:
        db_session().execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any database failure means "not healthy"
        return jsonify(status="unavailable", database="error", error=type(e).__name__), 503
    return jsonify(status="ok", database="ok")
