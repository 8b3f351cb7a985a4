"""Configuration: safe development defaults, secrets and URLs from ``VOLTPAY_*`` variables.

Every setting an operator may change is listed in ``SETTINGS`` with its
environment variable, default and meaning; the README's table is generated
from the same list so the two cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = ROOT / "instance"

DEV_SECRET = "dev-insecure-secret-key-change-me"
DEV_GATEWAY_SECRET = "dev-insecure-gateway-secret"


@dataclass(frozen=True)
class Setting:
    """One configuration value read from the environment."""

    key: str  # Flask config key
    env: str  # environment variable
    default: object
    help: str
    kind: type = str


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


SETTINGS: tuple[Setting, ...] = (
    Setting("ENV", "VOLTPAY_ENV", "development", "development, test or production; production refuses unsafe defaults"),
    Setting("SECRET_KEY", "VOLTPAY_SECRET_KEY", DEV_SECRET, "signs sessions and tokens; a long random string in production"),
    Setting("DATABASE_URL", "VOLTPAY_DATABASE_URL", None, "SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@db/voltpay; default: SQLite file instance/voltpay.db"),
    Setting("REDIS_URL", "VOLTPAY_REDIS_URL", None, "Redis for rate limits and the task queue; default: in-memory limits and a SQLite task queue"),
    Setting("BASE_URL", "VOLTPAY_BASE_URL", "http://127.0.0.1:8000", "public https URL used in emails and QR codes"),
    Setting("TRUSTED_PROXIES", "VOLTPAY_TRUSTED_PROXIES", 0, "number of reverse proxies in front of gunicorn whose X-Forwarded-* headers are trusted", int),
    Setting("COOKIE_SECURE", "VOLTPAY_COOKIE_SECURE", None, "send cookies over HTTPS only; default: on in production, off in development (plain http)", bool),
    Setting("HUEY_PATH", "VOLTPAY_HUEY_PATH", str(INSTANCE / "huey.db"), "SQLite file for the task queue when no Redis is configured"),
    Setting("MAIL_FROM", "VOLTPAY_MAIL_FROM", "Voltpay <no-reply@voltpay.test>", "sender address of every email"),
    Setting("SMTP_HOST", "VOLTPAY_SMTP_HOST", None, "SMTP server; when unset, emails are written to the log (demo)"),
    Setting("SMTP_PORT", "VOLTPAY_SMTP_PORT", 587, "SMTP port", int),
    Setting("SMTP_USERNAME", "VOLTPAY_SMTP_USERNAME", None, "SMTP user name"),
    Setting("SMTP_PASSWORD", "VOLTPAY_SMTP_PASSWORD", None, "SMTP password"),
    Setting("SMTP_STARTTLS", "VOLTPAY_SMTP_STARTTLS", True, "upgrade the SMTP connection with STARTTLS", bool),
    Setting("SMTP_SSL", "VOLTPAY_SMTP_SSL", False, "connect to SMTP over implicit TLS (port 465)", bool),
    Setting("OIDC_ISSUER", "VOLTPAY_OIDC_ISSUER", None, "OpenID Connect issuer URL, e.g. https://accounts.google.com; sign-in with it is offered when set"),
    Setting("OIDC_CLIENT_ID", "VOLTPAY_OIDC_CLIENT_ID", None, "OpenID Connect client id"),
    Setting("OIDC_CLIENT_SECRET", "VOLTPAY_OIDC_CLIENT_SECRET", None, "OpenID Connect client secret"),
    Setting("OIDC_NAME", "VOLTPAY_OIDC_NAME", "Google", "provider name shown on the sign-in button"),
    Setting("STRIPE_SECRET_KEY", "VOLTPAY_STRIPE_SECRET_KEY", None, "Stripe secret key (sk_live_… in production); required in production"),
    Setting("STRIPE_PUBLISHABLE_KEY", "VOLTPAY_STRIPE_PUBLISHABLE_KEY", None, "Stripe publishable key (pk_live_…) used by stripe.js in the browser"),
    Setting("STRIPE_WEBHOOK_SECRET", "VOLTPAY_STRIPE_WEBHOOK_SECRET", None, "signing secret (whsec_…) of the webhook endpoint https://HOST/webhooks/stripe; required in production"),
    Setting("STRIPE_API_BASE", "VOLTPAY_STRIPE_API_BASE", None, "Stripe API URL; unset for api.stripe.com, the localstripe URL in the demo"),
    Setting("STRIPE_JS_URL", "VOLTPAY_STRIPE_JS_URL", "https://js.stripe.com/v3/", "where the browser loads stripe.js (localstripe's copy in the demo)"),
    Setting("STRIPE_LOCALSTRIPE", "VOLTPAY_STRIPE_LOCALSTRIPE", False, "talk to localstripe: switch on its compatibility adjustments (demo and tests only)", bool),
    Setting("API_TOKEN_DAYS", "VOLTPAY_API_TOKEN_DAYS", 30, "lifetime of API bearer tokens in days", int),
    Setting("LOG_LEVEL", "VOLTPAY_LOG_LEVEL", "INFO", "log level of the JSON logs"),
    Setting("PAGE_CACHE_SECONDS", "VOLTPAY_PAGE_CACHE_SECONDS", 2, "seconds a connector page, as anonymous visitors see it, is reused per process (0: off)", int),
    Setting("OCPP_LOG_DAYS", "VOLTPAY_OCPP_LOG_DAYS", 90, "days the OCPP message log is kept (support timelines, charger diagnosis); older messages are deleted daily", int),
    Setting("GATEWAY_HOST", "VOLTPAY_GATEWAY_HOST", "127.0.0.1", "address the charger gateway listens on for OCPP websockets (ws://HOST:PORT/ocpp/<charge point id>)"),
    Setting("GATEWAY_PORT", "VOLTPAY_GATEWAY_PORT", 9000, "port of the charger gateway's OCPP websockets", int),
    Setting("GATEWAY_INTERNAL_HOST", "VOLTPAY_GATEWAY_INTERNAL_HOST", "127.0.0.1", "address of the gateway's internal command endpoint (never expose it publicly)"),
    Setting("GATEWAY_INTERNAL_PORT", "VOLTPAY_GATEWAY_INTERNAL_PORT", 9001, "port of the gateway's internal command endpoint", int),
    Setting("GATEWAY_INTERNAL_URL", "VOLTPAY_GATEWAY_INTERNAL_URL", None, "URL at which web processes reach this gateway's internal endpoint; default: http://INTERNAL_HOST:INTERNAL_PORT"),
    Setting("GATEWAY_SECRET", "VOLTPAY_GATEWAY_SECRET", None, "shared secret of web processes and gateways for charger commands; required in production"),
    Setting("GATEWAY_TIMEOUT", "VOLTPAY_GATEWAY_TIMEOUT", 12.0, "seconds the gateway waits for a charger to answer a command", float),
    Setting("HEARTBEAT_INTERVAL", "VOLTPAY_HEARTBEAT_INTERVAL", 300, "heartbeat interval in seconds given to chargers at boot", int),
    Setting("PLATFORM_NAME", "VOLTPAY_PLATFORM_NAME", "Voltpay", "the platform's trading name: the seller on wallet top-up receipts"),
    Setting("PLATFORM_LEGAL_NAME", "VOLTPAY_PLATFORM_LEGAL_NAME", "Voltpay", "the platform's legal name on its receipts"),
    Setting("PLATFORM_ADDRESS", "VOLTPAY_PLATFORM_ADDRESS", "", "the platform's registered address on its receipts"),
    Setting("PLATFORM_VAT_ID", "VOLTPAY_PLATFORM_VAT_ID", "", "the platform's VAT id on its receipts"),
    Setting("PLATFORM_DOCUMENT_PREFIX", "VOLTPAY_PLATFORM_DOCUMENT_PREFIX", "VPW", "prefix of the platform's receipt numbers (VPW-2026-000001); operators set their own"),
    Setting("METER_EMERGENCY_CREDIT_MAX_MINOR", "VOLTPAY_METER_EMERGENCY_CREDIT_MAX_MINOR", 2000, "the most emergency credit an operator may give a prepaid meter, in minor units of its currency", int),
    Setting("PAYOUT_HOUR", "VOLTPAY_PAYOUT_HOUR", 6, "hour (UTC, 0-23) at which the worker builds and sends yesterday's T+1 payout batches", int),
    Setting("PAYOUT_DIR", "VOLTPAY_PAYOUT_DIR", None, "folder the payout job writes each batch's pain.001 and CSV files to; unset: download them from the operator views"),
    Setting("PAYOUT_DEBTOR_NAME", "VOLTPAY_PAYOUT_DEBTOR_NAME", "Voltpay", "account holder name of the bank account SEPA payouts are paid from"),
    Setting("PAYOUT_DEBTOR_IBAN", "VOLTPAY_PAYOUT_DEBTOR_IBAN", None, "IBAN SEPA payouts are paid from; without it no pain.001 file is made (CSV only)"),
    Setting("PAYOUT_DEBTOR_BIC", "VOLTPAY_PAYOUT_DEBTOR_BIC", None, "BIC of that account (optional)"),
    Setting("SUPPORT_APPROVAL_LIMIT_MINOR", "VOLTPAY_SUPPORT_APPROVAL_LIMIT_MINOR", 10000, "refunds and goodwill credits from the support console above this amount (minor units) need a second person's approval, unless the operator set its own limit", int),
    Setting("CONTACT_RATE_LIMIT", "VOLTPAY_CONTACT_RATE_LIMIT", "5 per hour", "how many tickets one address (IP) may open through the contact form, and how many replies per ticket link"),
)


def from_environment(environ: dict[str, str] | None = None) -> dict[str, object]:
    """Return the Flask configuration built from defaults and ``VOLTPAY_*`` variables."""
    environ = os.environ if environ is None else environ
    config: dict[str, object] = {}
    for s in SETTINGS:
        raw = environ.get(s.env)
        if raw is None or raw == "":
            config[s.key] = s.default
        elif s.kind is bool:
            config[s.key] = _bool(raw)
        elif s.kind is int:
            config[s.key] = int(raw)
        elif s.kind is float:
            config[s.key] = float(raw)
        else:
            config[s.key] = raw
    return config


class ConfigError(RuntimeError):
    """The configuration is unsafe or incomplete for the chosen environment."""


def finalize(config: dict[str, object]) -> None:
    """Fill derived values and refuse to run production on development defaults."""
    env = config["ENV"]
    if env not in {"development", "test", "production"}:
        raise ConfigError(f"VOLTPAY_ENV must be development, test or production, not {env!r}")
    if env == "production":
        missing = []
        if not config.get("SECRET_KEY") or config["SECRET_KEY"] == DEV_SECRET or len(str(config["SECRET_KEY"])) < 32:
            missing.append("VOLTPAY_SECRET_KEY (a random string of at least 32 characters)")
        if not config.get("DATABASE_URL"):
            missing.append("VOLTPAY_DATABASE_URL")
        for key in ("STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_WEBHOOK_SECRET"):
            if not config.get(key):
                missing.append(f"VOLTPAY_{key}")
        if not config.get("GATEWAY_SECRET") or config["GATEWAY_SECRET"] == DEV_GATEWAY_SECRET or len(str(config["GATEWAY_SECRET"])) < 32:
            missing.append("VOLTPAY_GATEWAY_SECRET (a random string of at least 32 characters, the same for web and gateway processes)")
        if config.get("STRIPE_LOCALSTRIPE"):
            raise ConfigError("VOLTPAY_STRIPE_LOCALSTRIPE is for the demo and tests; unset it in production")
        if missing:
            raise ConfigError("Voltpay refuses to start in production without: " + ", ".join(missing))
    if not config.get("GATEWAY_SECRET"):
        config["GATEWAY_SECRET"] = DEV_GATEWAY_SECRET  # development and tests only (production refused above)
    if not config.get("DATABASE_URL"):
        INSTANCE.mkdir(exist_ok=True)
        config["DATABASE_URL"] = f"sqlite:///{INSTANCE / 'voltpay.db'}"
    secure = env == "production" if config["COOKIE_SECURE"] is None else bool(config["COOKIE_SECURE"])
    config.update(
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=secure,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="__Host-voltpay" if secure else "voltpay",
        PERMANENT_SESSION_LIFETIME=60 * 60 * 24 * 14,
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session instead, so a long form is never lost
        TESTING=env == "test" or bool(config.get("TESTING")),
        BABEL_DEFAULT_LOCALE="en",
        BABEL_DEFAULT_TIMEZONE="UTC",
        BABEL_TRANSLATION_DIRECTORIES=str(ROOT / "webapp" / "translations"),
        RATELIMIT_STORAGE_URI=config.get("RATELIMIT_STORAGE_URI") or config.get("REDIS_URL") or "memory://",
        RATELIMIT_HEADERS_ENABLED=True,
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,
    )
    config.setdefault("RATELIMIT_ENABLED", True)
