"""App factory, configuration, health check, security headers and error pages."""

from __future__ import annotations

import pytest

from webapp import create_app
from webapp.config import ConfigError


def test_production_refuses_missing_secret_and_database(monkeypatch):
    monkeypatch.delenv("VOLTPAY_SECRET_KEY", raising=False)
    monkeypatch.delenv("VOLTPAY_DATABASE_URL", raising=False)
    with pytest.raises(ConfigError) as e:
        create_app({"ENV": "production"})
    assert "VOLTPAY_SECRET_KEY" in str(e.value) and "VOLTPAY_DATABASE_URL" in str(e.value)


PRODUCTION_STRIPE = {"STRIPE_SECRET_KEY": "sk_live_x", "STRIPE_PUBLISHABLE_KEY": "pk_live_x", "STRIPE_WEBHOOK_SECRET": "whsec_x",
                     "GATEWAY_SECRET": "g" * 40}


def test_production_refuses_short_secret(database_url):
    with pytest.raises(ConfigError) as e:
        create_app({"ENV": "production", "SECRET_KEY": "short", "DATABASE_URL": database_url, **PRODUCTION_STRIPE})
    assert "VOLTPAY_SECRET_KEY" in str(e.value) and "VOLTPAY_DATABASE_URL" not in str(e.value)


def test_production_needs_stripe_keys_and_webhook_secret(database_url):
    with pytest.raises(ConfigError) as e:
        create_app({"ENV": "production", "SECRET_KEY": "x" * 40, "DATABASE_URL": database_url, "STRIPE_SECRET_KEY": "sk_live_x"})
    assert "VOLTPAY_STRIPE_WEBHOOK_SECRET" in str(e.value) and "VOLTPAY_STRIPE_PUBLISHABLE_KEY" in str(e.value)
    with pytest.raises(ConfigError, match="LOCALSTRIPE"):
        create_app({"ENV": "production", "SECRET_KEY": "x" * 40, "DATABASE_URL": database_url, **PRODUCTION_STRIPE, "STRIPE_LOCALSTRIPE": True})


def test_production_cookies_are_secure(database_url):
    app = create_app({"ENV": "production", "SECRET_KEY": "x" * 40, "DATABASE_URL": database_url, **PRODUCTION_STRIPE})
    assert app.config["SESSION_COOKIE_SECURE"] and app.config["SESSION_COOKIE_HTTPONLY"]
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    assert app.config["SESSION_COOKIE_NAME"].startswith("__Host-")
    resp = app.test_client().get("/healthz")
    assert "max-age" in resp.headers["Strict-Transport-Security"]


def test_settings_come_from_the_environment(monkeypatch, database_url):
    monkeypatch.setenv("VOLTPAY_BASE_URL", "https://pay.example.com")
    monkeypatch.setenv("VOLTPAY_API_TOKEN_DAYS", "7")
    app = create_app({"ENV": "test", "DATABASE_URL": database_url})
    assert app.config["BASE_URL"] == "https://pay.example.com"
    assert app.config["API_TOKEN_DAYS"] == 7


def test_healthz_checks_the_database(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json == {"status": "ok", "database": "ok"}


def test_healthz_reports_a_dead_database(app_config, tmp_path):
    app = create_app(dict(app_config, DATABASE_URL=f"sqlite:///{tmp_path}/missing/dir/x.db"))
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.json["status"] == "unavailable"


def test_security_headers_on_every_page(client):
    resp = client.get("/")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Request-ID"]


def test_request_id_is_kept_when_given(client):
    resp = client.get("/healthz", headers={"X-Request-ID": "abc12345-from-proxy"})
    assert resp.headers["X-Request-ID"] == "abc12345-from-proxy"


def test_unknown_page_is_a_helpful_404(client):
    resp = client.get("/no/such/page")
    assert resp.status_code == 404
    page = resp.get_data(as_text=True)
    assert "We could not find that." in page and "Go to the start page" in page


def test_server_error_page_rolls_back_and_shows_request_id(app):
    @app.route("/boom")
    def boom():
        raise RuntimeError("kaput")

    resp = app.test_client().get("/boom", headers={"X-Request-ID": "req-boom-123"})
    assert resp.status_code == 500
    page = resp.get_data(as_text=True)
    assert "req-boom-123" in page and "kaput" not in page and "Traceback" not in page


def test_static_assets_are_local(client):
    page = client.get("/").get_data(as_text=True)
    assert "http" not in page.split("<body>")[0].replace('http-equiv', '')  # no CDN in the head
    assert client.get("/static/css/app.css").status_code == 200


def test_readme_lists_every_setting():
    from webapp.config import ROOT, SETTINGS

    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in SETTINGS if f"`{s.env}`" not in readme]
    assert missing == [], f"README.md does not document {missing}"
