"""Security headers, set in one place for every response."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request


def content_security_policy(
    extra_script_origins: tuple[str, ...] = (), extra_frame_origins: tuple[str, ...] = (), extra_connect_origins: tuple[str, ...] | None = None,
) -> str:
    """Build the CSP: only our own scripts and styles, no inline script, no framing of our pages."""
    script = " ".join(("'self'", *extra_script_origins))
    frame = " ".join(("'self'", *extra_frame_origins))
    connect = " ".join(("'self'", *(extra_script_origins if extra_connect_origins is None else extra_connect_origins)))
    directives = {
        "default-src": "'self'",
        "script-src": script,
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": connect,
        "frame-src": frame,
        "font-src": "'self'",
        "object-src": "'none'",
        "base-uri": "'none'",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
    }
    return "; ".join(f"{k} {v}" for k, v in directives.items())


STRIPE_JS_ORIGIN = ("https://js.stripe.com",)


def origin_of(url: str | None) -> tuple[str, ...]:
    """The scheme://host[:port] of ``url``, or nothing."""
    if not url:
        return ()
    parts = urlsplit(url)
    return (f"{parts.scheme}://{parts.netloc}",) if parts.scheme and parts.netloc else ()


def init_app(app: Flask) -> None:
    """Add the security headers to every response."""
    script_origins = origin_of(app.config.get("STRIPE_JS_URL"))
    frame_origins = connect_origins = script_origins  # localstripe serves its stripe.js and its API from one origin
    if script_origins == STRIPE_JS_ORIGIN:
        # stripe.js calls the API and shows 3-D Secure in frames from hooks.stripe.com (Stripe's CSP guide).
        frame_origins = (*script_origins, "https://hooks.stripe.com")
        connect_origins = (*script_origins, "https://api.stripe.com")
    csp = content_security_policy(script_origins, frame_origins, connect_origins)

    defaults = [
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "strict-origin-when-cross-origin"),
        ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(self)"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if app.config["ENV"] == "production":
        defaults.append(("Strict-Transport-Security", "max-age=63072000; includeSubDomains"))

    @app.after_request
    def _headers(resp: Response) -> Response:
        h = resp.headers
        present = {k.lower() for k in h.keys()}  # a view may set its own (one pass, not one look-up per header)
        for k, v in defaults:
            if k.lower() not in present:
                h.add(k, v)
        if "cache-control" not in present and request.endpoint and not request.endpoint.startswith("static"):
            # Pages carry personal data and CSRF tokens: never cache them in shared caches.
            h.add("Cache-Control", "no-store")
        return resp
