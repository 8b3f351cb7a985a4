"""The help center: ``/help`` (index by audience), ``/help/<slug>`` (an article), ``/help/search?q=`` (search).

Articles are Markdown files in ``webapp/help/articles/<lang>/`` (see
``webapp.help.articles``), shown in the request's language (flask-babel's
``get_locale()``: the account's, the picker's, or Accept-Language), or in
English with a note when an article has no translation yet.

Every page of the payment flows links here one tap away through the macros
of ``templates/help/_links.html`` (``help_link`` and ``need_help``); this
module gives them the template globals they use. An article's "Contact us"
link goes to ``/contact`` (the contact form, another part of the app) with the
``session``, ``document``, ``meter`` and ``topic`` query parameters the article
was opened with, passed through as they came, so a ticket started from a
session's help box carries the session.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from flask import Blueprint, render_template, request
from flask_babel import get_locale
from flask_babel import lazy_gettext as _l

from webapp.help import articles
from webapp.help.articles import Article, ArticleError

log = logging.getLogger("voltpay.help")

bp = Blueprint("help", __name__, url_prefix="/help", static_folder="static", static_url_path="/static")

ABOUT_KEYS = ("session", "document", "meter", "topic")  # what the contact form attaches to a ticket
AUDIENCE_TITLES = {
    "driver": _l("Charging your car"),
    "tenant": _l("Electricity meters and bills"),
    "all": _l("For everyone"),
}
CONTACT_PATH = "/contact"  # the contact form (webapp.support); a plain path, so this module does not depend on it


def language() -> str:
    """The request's language if articles are written in it, else English."""
    code = str(get_locale() or articles.DEFAULT_LANGUAGE)
    return code if code in articles.LANGUAGES else articles.DEFAULT_LANGUAGE


def about_params(about: dict | None) -> dict[str, str]:
    """The contact references of ``about`` (session, document, meter, topic) that have a value, as strings."""
    if not about:
        return {}
    return {k: str(about[k]) for k in ABOUT_KEYS if about.get(k) not in (None, "")}


def contact_url(about: dict | None = None) -> str:
    """``/contact`` with the references a ticket should carry, as a plain URL."""
    params = about_params(about)
    return CONTACT_PATH + ("?" + urlencode(params) if params else "")


def _request_about() -> dict[str, str]:
    """The contact references this page was opened with (``?session=…&document=…``), untouched."""
    return {k: request.args[k] for k in ABOUT_KEYS if request.args.get(k)}


@bp.app_template_global("help_article")
def help_article(slug: str) -> Article | None:
    """The article ``slug`` in the page's language (for the in-flow macros), or None when there is none.

    A broken article file is logged, never raised: a help link must not turn a payment page into an error page.
    """
    try:
        return articles.library().get(slug, language())
    except ArticleError:
        log.exception("help articles could not be loaded")
        return None


@bp.app_template_global("help_about")
def help_about(about: dict | None) -> dict[str, str]:
    """The macros' ``about`` cleaned for a URL (see ``about_params``)."""
    return about_params(about)


@bp.app_template_global("contact_url")
def contact_url_global(about: dict | None = None) -> str:
    """``/contact?…`` for the macros and pages."""
    return contact_url(about)


bp.add_app_template_global(articles.card_problem_anchor, "card_problem_anchor")
bp.add_app_template_global(articles.charger_error_anchor, "charger_error_anchor")


def _search_form_query() -> str:
    return " ".join((request.args.get("q") or "").split())[: articles.MAX_QUERY]


@bp.route("", strict_slashes=False)
def index():
    """The help center: a search box and the articles for drivers, for tenants and for everyone."""
    lang = language()
    groups = articles.library().by_audience(lang)
    return render_template("help/index.html", groups=[(a, AUDIENCE_TITLES[a], groups[a]) for a in articles.AUDIENCES if groups[a]],
                           query="")


@bp.route("/search")
def search():
    """Search the articles of the page's language; an empty query shows the box and the index's articles."""
    query = _search_form_query()
    lang = language()
    hits = articles.search(query, lang) if query else []
    popular = [] if hits else articles.library().all(lang)[:6]
    return render_template("help/search.html", query=query, hits=hits, popular=popular)


@bp.route("/<string(maxlength=64):slug>")
def article(slug: str):
    """One article, its related articles, and a "still stuck? Contact us" link that carries the page's references."""
    lang = language()
    lib = articles.library()
    found = lib.get(slug, lang) if articles.SLUG.fullmatch(slug) else None
    if found is None:
        return not_found(slug)
    related = [r for r in (lib.get(s, lang) for s in found.related) if r is not None]
    about = _request_about()
    return render_template("help/article.html", article=found, related=related, about=about, contact=contact_url(about),
                           query="")


def not_found(slug: str):
    """404 for an unknown article: say so, and offer the search with the slug's words and the index's first articles."""
    words = " ".join(w for w in slug.replace("-", " ").replace("_", " ").split() if w.isalnum())[: articles.MAX_QUERY]
    hits = articles.search(words, language()) if words else []
    return render_template("help/not_found.html", query=words, hits=hits[:5], popular=articles.library().all(language())[:6]), 404

