"""Languages: choice of locale (account, picker, Accept-Language) and locale-aware formatting."""

from __future__ import annotations

from flask import Flask, has_request_context, request, session
from flask_babel import format_datetime, format_decimal, get_locale
from flask_login import current_user

from webapp.extensions import babel

# Code → name in its own language, for the picker.
LANGUAGES: dict[str, str] = {"en": "English", "es": "Español", "zh": "简体中文"}


def select_locale() -> str:
    """The account's language, else the picker's (session), else the best Accept-Language match.

    Outside a request (CLI commands, worker jobs) there is no user or session: English.
    """
    if not has_request_context():
        return "en"
    if current_user and getattr(current_user, "is_authenticated", False) and current_user.locale in LANGUAGES:
        return current_user.locale
    chosen = session.get("locale")
    if chosen in LANGUAGES:
        return chosen
    return _best_match(request.headers.get("Accept-Language", ""))


_MATCHES: dict[str, str] = {}  # Accept-Language header -> our language: browsers send a handful of distinct headers


def _best_match(header: str) -> str:
    """The language of ours that ``header`` (Accept-Language) prefers most, English when none; remembered per header."""
    found = _MATCHES.get(header)
    if found is None:
        from werkzeug.datastructures import LanguageAccept
        from werkzeug.http import parse_accept_header

        found = parse_accept_header(header, LanguageAccept).best_match(list(LANGUAGES), default="en") or "en"
        if len(_MATCHES) >= 1024:  # bounded: a client inventing headers cannot grow it
            _MATCHES.clear()
        _MATCHES[header] = found
    return found


def html_lang() -> str:
    """The BCP 47 tag for the page's lang attribute."""
    code = str(get_locale() or "en")
    return {"zh": "zh-Hans"}.get(code, code)


def init_app(app: Flask) -> None:
    """Attach flask-babel and expose the formatting helpers to templates."""
    babel.init_app(app, locale_selector=select_locale)
    app.jinja_env.globals.update(LANGUAGES=LANGUAGES, html_lang=html_lang, current_locale=lambda: str(get_locale()))
    app.jinja_env.filters.update(
        datetime=lambda value, fmt="medium": format_datetime(value, fmt) if value else "",
        decimal=format_decimal,
    )


def supported(code: str | None) -> bool:
    """Whether ``code`` is a language we offer."""
    return code in LANGUAGES


