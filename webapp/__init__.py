"""The Voltpay web app: phone pages, JSON API and webhooks."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

ROOT = Path(__file__).resolve().parent.parent


def init_payments(app: Flask) -> None:
    """Attach the payment provider named by the configuration (none configured: card payments are off)."""
    from payments.providers import make_provider

    app.extensions["payment_provider"] = make_provider(app.config) if app.config.get("STRIPE_SECRET_KEY") else None


def create_app(config: dict | None = None) -> Flask:
    """Build the app: defaults → environment → overrides → db → login/OAuth → blueprints → errors → headers."""
    from webapp import config as cfg

    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
        instance_path=str(ROOT / "instance"),
    )
    settings = cfg.from_environment()
    settings.update(config or {})
    cfg.finalize(settings)
    app.config.update(settings)

    if app.config["TRUSTED_PROXIES"]:
        n = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)

    from webapp import db, errors, i18n, logs, security, sessions, tasks
    from webapp.extensions import csrf, limiter

    sessions.init_app(app)
    logs.init_app(app)
    db.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
    i18n.init_app(app)
    tasks.init_app(app)

    from webapp.auth import init_login

    init_login(app)
    init_payments(app)
    from webapp.chargers.client import gateway_client

    app.extensions["charger_gateway"] = gateway_client(app)

    from webapp.account import bp as account_bp
    from webapp.api import bp as api_bp
    from webapp.auth import bp as auth_bp
    from webapp.charging import bp as charging_bp
    from webapp.help import bp as help_bp
    from webapp.history import bp as history_bp
    from webapp.main import bp as main_bp
    from webapp.meters.bill_views import bp as bills_bp
    from webapp.meters.views import bp as meters_bp
    from webapp.notifications import bp as notifications_bp
    from webapp.receipts.views import bp as receipts_bp
    from webapp.scan import bp as scan_bp
    from webapp.wallet import bp as wallet_bp
    from webapp.webhooks import bp as webhooks_bp

    app.register_blueprint(main_bp)
    app.register_blueprint(auth_bp)
    app.register_blueprint(account_bp)
    app.register_blueprint(notifications_bp)
    app.register_blueprint(wallet_bp)
    app.register_blueprint(charging_bp)
    from webapp.charging import page_cache

    page_cache.init_app(app)
    app.register_blueprint(history_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(webhooks_bp)
    app.register_blueprint(scan_bp)
    app.register_blueprint(receipts_bp)
    app.register_blueprint(meters_bp)
    app.register_blueprint(bills_bp)
    app.register_blueprint(help_bp)
    csrf.exempt(api_bp)  # bearer tokens only, never cookies: nothing for a forged form to ride on
    csrf.exempt(webhooks_bp)  # signed by Stripe, no cookies: the signature is the check

    errors.init_app(app)
    security.init_app(app)

    from webapp.cli import register as register_cli

    register_cli(app)
    from webapp.meters import jobs as _meter_jobs  # noqa: F401  (relay rules, delivery jobs, meter email builders)
    from webapp.meters.cli_relay import register as register_relay_cli

    register_relay_cli(app)
    from webapp.meters import oauth as meters_oauth
    from webapp.meters.cli import register as register_meters_cli
    from webapp.meters.operator_views import bp as meters_operator_bp

    meters_oauth.init_app(app)  # /oauth/token for meter data collectors
    app.register_blueprint(meters_operator_bp)
    from webapp.settlement.views import bp as settlement_bp

    app.register_blueprint(settlement_bp)  # /operator/settlement: parties, rules, statements, payouts, reconciliation
    from webapp import console, support
    from webapp.console import analytics, monitoring, orders, setup  # noqa: F401  (views register on console.bp)
    from webapp.support import actions, console as support_console, tickets  # noqa: F401  (views register on the bps)

    app.register_blueprint(console.bp)  # /operator: setup, monitoring, analytics, orders
    app.register_blueprint(support.bp)  # /support: the support console
    app.register_blueprint(support.contact_bp)  # /contact, /tickets/<reference>: anyone
    register_meters_cli(app)
    return app
