"""Languages: complete catalogues, translated pages, the language picker, translated errors and
locale-aware formatting.

The catalogue tests fail with the list of msgids to translate when a string is added to the code
without ``make extract-messages`` and a translation in every catalogue.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from pathlib import Path

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.frontend import parse_keywords, parse_mapping_cfg
from babel.messages.pofile import read_po
from flask import render_template_string
from flask_babel import force_locale

ROOT = Path(__file__).resolve().parents[2]
TRANSLATIONS = ROOT / "webapp" / "translations"
LOCALES = ("es", "zh")
# The same keywords as `make extract-messages` (plus babel's defaults: _, gettext, ngettext, ...).
KEYWORDS = {**DEFAULT_KEYWORDS, **parse_keywords(["_l", "lazy_gettext", "ngettext:1,2"])}
PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[#0 +-]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")


def catalogue(locale: str):
    with open(TRANSLATIONS / locale / "LC_MESSAGES" / "messages.po", "rb") as f:
        return read_po(f, locale=locale)


def key(msgid: str | tuple) -> str:
    """A catalogue's key for a message: the singular for plurals."""
    return msgid[0] if isinstance(msgid, (tuple, list)) else msgid


def placeholders(text: str) -> list[str]:
    """The %-placeholders of ``text`` (``%%`` is a literal percent sign)."""
    return sorted(PLACEHOLDER.findall(text.replace("%%", "")))


@lru_cache(maxsize=1)
def extracted() -> dict[str, str]:
    """msgid → first place it is used, extracted from the code as `make extract-messages` does."""
    with open(ROOT / "babel.cfg") as f:
        method_map, options_map = parse_mapping_cfg(f)
    found: dict[str, str] = {}
    for filename, lineno, message, _comments, _context in extract_from_dir(str(ROOT), method_map, options_map, keywords=KEYWORDS):
        found.setdefault(key(message), f"{filename}:{lineno}")
    return found


# -- (a) the catalogues are complete -------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_every_string_is_translated(locale):
    cat = catalogue(locale)
    untranslated, fuzzy, wrong_placeholders, wrong_plurals = [], [], [], []
    for m in cat:
        if not m.id:
            continue
        strings = list(m.string) if isinstance(m.string, (tuple, list)) else [m.string]
        if not all(strings):
            untranslated.append(key(m.id))
        if m.fuzzy:
            fuzzy.append(key(m.id))
        if m.pluralizable:
            if len(strings) != cat.num_plurals:
                wrong_plurals.append(key(m.id))
            wanted = sorted(set(placeholders(m.id[0]) + placeholders(m.id[1])))
            got = [sorted(set(placeholders(s))) for s in strings if s]
        else:
            wanted, got = placeholders(m.id), [placeholders(s) for s in strings if s]
        if any(g != wanted for g in got):
            wrong_placeholders.append(key(m.id))
    assert not cat.fuzzy, f"{locale}: the catalogue header is marked fuzzy"
    assert not untranslated, f"{locale}: translate these msgids:\n" + "\n".join(untranslated)
    assert not fuzzy, f"{locale}: check and un-fuzzy these msgids:\n" + "\n".join(fuzzy)
    assert not wrong_placeholders, f"{locale}: msgstr placeholders differ from the msgid:\n" + "\n".join(wrong_placeholders)
    assert not wrong_plurals, f"{locale}: fill every plural form ({cat.num_plurals}):\n" + "\n".join(wrong_plurals)


@pytest.mark.parametrize("target", ["messages.pot", *LOCALES])
def test_catalogues_are_up_to_date_with_the_code(target):
    code = extracted()
    assert len(code) > 50, "the extraction found almost nothing; is babel.cfg right?"
    if target == "messages.pot":
        with open(TRANSLATIONS / "messages.pot", "rb") as f:
            ids = {key(m.id) for m in read_po(f) if m.id}
    else:
        ids = {key(m.id) for m in catalogue(target) if m.id}
    missing = sorted(set(code) - ids)
    assert not missing, f"{target}: run `make extract-messages` and translate:\n" + "\n".join(f"{code[m]}: {m!r}" for m in missing)


# -- (b) pages render in each language ----------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "lang", "texts"),
    [
        ("es", "es", ["Iniciar sesión", "¿Has olvidado tu contraseña?", "Crea una cuenta", "Correo electrónico", "Idioma"]),
        ("es-ES,es;q=0.9,en;q=0.5", "es", ["Iniciar sesión"]),
        ("zh-CN", "zh-Hans", ["登录", "忘记密码？", "创建账户", "邮箱", "语言"]),
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh-Hans", ["登录"]),
        ("en-GB", "en", ["Sign in", "Forgot your password?", "Create an account"]),
        ("fr", "en", ["Sign in"]),
    ],
)
def test_sign_in_page_follows_accept_language(client, accept, lang, texts):
    resp = client.get("/auth/sign-in", headers={"Accept-Language": accept})
    assert resp.status_code == 200
    page = resp.get_data(as_text=True)
    assert f'<html lang="{lang}">' in page
    for text in texts:
        assert text in page
    if lang != "en":
        assert "Forgot your password?" not in page and "Create an account" not in page


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("path", ["/", "/auth/sign-up", "/auth/forgot", "/no-such-page"])
def test_pages_render_without_english_leftovers(client, locale, path):
    resp = client.get(path, headers={"Accept-Language": locale})
    assert resp.status_code in (200, 404)
    page = resp.get_data(as_text=True)
    assert f'<html lang="{"zh-Hans" if locale == "zh" else locale}">' in page
    assert "Skip to content" not in page and ">Language<" not in page


# -- (c) the language picker and the account's language ---------------------------------


def sign_in(client, email="ana@example.com", password="correct horse staple"):
    resp = client.post("/auth/sign-in", data={"email": email, "password": password})
    assert resp.status_code == 302, resp.get_data(as_text=True)


def test_picker_switches_the_session_language(client):
    resp = client.post("/language", data={"locale": "es", "next": "/auth/sign-in"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/auth/sign-in")
    page = client.get("/auth/sign-in", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert '<html lang="es">' in page and "Iniciar sesión" in page
    client.post("/language", data={"locale": "zh"})
    page = client.get("/auth/sign-in", headers={"Accept-Language": "es"}).get_data(as_text=True)
    assert '<html lang="zh-Hans">' in page and "登录" in page


def test_picker_ignores_unknown_languages_and_foreign_redirects(client):
    resp = client.post("/language", data={"locale": "xx", "next": "//evil.example/"})
    assert resp.status_code == 302 and "evil.example" not in resp.headers["Location"]
    page = client.get("/auth/sign-in", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert '<html lang="en">' in page


def test_the_accounts_language_wins_over_accept_language(client, make_user):
    make_user(locale="zh")
    sign_in(client)
    page = client.get("/", headers={"Accept-Language": "es"}).get_data(as_text=True)
    assert '<html lang="zh-Hans">' in page and "退出登录" in page


def test_picker_saves_the_language_on_the_account(app, client, make_user):
    from webapp.models import User

    make_user(locale="en")
    sign_in(client)
    client.post("/language", data={"locale": "es"})
    with app.extensions["db_sessionmaker"]() as s:
        assert s.query(User).one().locale == "es"
    page = client.get("/", headers={"Accept-Language": "zh-CN"}).get_data(as_text=True)
    assert '<html lang="es">' in page and "Cerrar sesión" in page


# -- (d) form errors are translated -------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("es", ["Usa al menos 10 caracteres.", "Revisa el formulario"]), ("zh-CN", ["请至少使用 10 个字符。", "请检查表单"])],
)
def test_form_errors_are_translated(client, accept, expected):
    resp = client.post("/auth/sign-up", data={"email": "new@example.com", "password": "short"}, headers={"Accept-Language": accept})
    assert resp.status_code == 400
    page = resp.get_data(as_text=True)
    for text in expected:
        assert text in page
    assert "Use at least" not in page


def test_missing_field_message_is_translated(client):
    resp = client.post("/auth/sign-in", data={"email": "", "password": ""}, headers={"Accept-Language": "es"})
    page = resp.get_data(as_text=True)
    assert resp.status_code == 400
    assert "Introduce tu correo electrónico." in page and "Introduce tu contraseña." in page


# -- (e) API problem details are translated -----------------------------------------------


@pytest.mark.parametrize(
    ("accept", "title", "detail"),
    [
        ("es", "Inicia sesión.", "Envía un token de API en la cabecera Authorization: Bearer <token>."),
        ("zh-CN", "请登录。", "请在 Authorization 请求头中发送 API 令牌：Bearer <token>。"),
        ("en", "Please sign in.", "Send an API token in the Authorization header: Bearer <token>."),
    ],
)
def test_api_problem_detail_is_translated(client, accept, title, detail):
    resp = client.get("/api/v1/me", headers={"Accept-Language": accept})
    assert resp.status_code == 401
    assert resp.mimetype == "application/problem+json"
    assert resp.json["code"] == "unauthenticated"
    assert resp.json["title"] == title
    assert resp.json["detail"] == detail


# -- (f) dates and numbers follow the locale ---------------------------------------------

WHEN = dt.datetime(2026, 3, 5, 14, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("locale", "medium", "long", "number"),
    [
        ("en", "Mar 5, 2026, 2:30:00 PM", "March 5, 2026", "1,234,567.891"),
        ("es", "5 mar 2026, 14:30:00", "5 de marzo de 2026", "1.234.567,891"),
        ("zh", "2026年3月5日 14:30:00", "2026年3月5日", "1,234,567.891"),
    ],
)
def test_dates_and_numbers_are_formatted_per_locale(app, locale, medium, long, number):
    with app.test_request_context("/"), force_locale(locale):
        out = render_template_string(
            "{{ when|datetime }}|{{ when|datetime('long') }}|{{ n|decimal }}|{{ none|datetime }}|{{ html_lang() }}",
            when=WHEN,
            n=1234567.891,
            none=None,
        )
    got_medium, got_long, got_number, got_none, lang = out.split("|")
    # CLDR may use narrow no-break spaces; compare with plain spaces.
    norm = lambda s: re.sub(r"[\u202f\u00a0]", " ", s)  # noqa: E731
    assert norm(got_medium) == medium
    assert norm(got_long).startswith(long)
    assert got_number == number
    assert got_none == ""
    assert lang == {"zh": "zh-Hans"}.get(locale, locale)
