"""Payment providers: the protocol and our types in ``base``, Stripe in ``stripe``, picked by ``make_provider``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from payments.providers.base import PaymentProvider

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(value: Any, name: str) -> bool:
    """A boolean setting that may come from the environment as text."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be true or false, not {value!r}")


def make_provider(config: Mapping[str, Any]) -> PaymentProvider:
    """The payment provider the configuration asks for (Stripe; localstripe when STRIPE_LOCALSTRIPE is set).

    Keys: STRIPE_SECRET_KEY (required), STRIPE_PUBLISHABLE_KEY, STRIPE_WEBHOOK_SECRET,
    STRIPE_API_BASE (None for api.stripe.com; the localstripe URL in the demo and the
    tests) and STRIPE_LOCALSTRIPE (bool: switch on the localstripe compatibility
    adjustments, which also need STRIPE_API_BASE).
    """
    from payments.providers.stripe import StripeProvider  # imported here: only this path loads the SDK

    if not config.get("STRIPE_SECRET_KEY"):
        raise ValueError("STRIPE_SECRET_KEY is not set")
    return StripeProvider(
        secret_key=config["STRIPE_SECRET_KEY"],
        publishable_key=config.get("STRIPE_PUBLISHABLE_KEY") or "",
        webhook_secret=config.get("STRIPE_WEBHOOK_SECRET") or None,
        api_base=config.get("STRIPE_API_BASE") or None,
        localstripe_compat=_flag(config.get("STRIPE_LOCALSTRIPE"), "STRIPE_LOCALSTRIPE"),
    )
