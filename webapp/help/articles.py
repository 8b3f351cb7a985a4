"""Help articles: Markdown files in the repository, read once per process, rendered, sanitised and searched.

Files
-----
``webapp/help/articles/<lang>/<slug>.md`` for ``lang`` in ``LANGUAGES``. Each
file starts with a front matter block between two ``---`` lines, one
``key: value`` per line:

* ``title`` and ``summary`` (every file);
* ``keywords``: comma-separated words people search with (every file; not
  shown, weighs more than the body in search);
* ``audience`` (``driver``, ``tenant`` or ``all``), ``order`` (an integer,
  the place in its group on the index) and ``related`` (comma-separated
  slugs): English only; a translation takes them from the English file, so
  the structure of the help center is the same in every language.

English is the reference: every article exists in English, and a
translation's slug must exist in English. A language without its own
version of an article shows the English one, marked ``fallback`` (the page
says so and marks the text ``lang="en"``).

Rendering
---------
Python-Markdown with ``toc`` (an ``id`` on every heading), ``attr_list``
(``## Card declined {#card-declined}`` gives the heading an explicit id, so
anchors are the same in every language and error codes keep their case:
``#GroundFailure``), ``tables``, ``fenced_code`` and ``sane_lists``. The
HTML is sanitised with nh3 although the files are ours: a slip in a file
(or a compromised contributor) must not put script on a payment site. Only
text markup, links, lists, tables and heading ids survive; links may be
relative, ``https:``, ``http:`` or ``mailto:``.

Search
------
In the request's language, over title, keywords and body text. Matching is
case-insensitive and accent-insensitive (NFKD, combining marks dropped,
casefolded: "devolucion" finds "devolución"), and a plain substring match,
which is also what Chinese needs (no spaces between words). A query of
several words finds the articles that contain every word. Ranking: each word
scores 100 in the title, else 10 in the keywords, else 1 per occurrence in
the body (at most 9), so a title hit always outranks keyword hits and
keyword hits outrank body hits; ties go by the index order. Each result has
a snippet of the body around the first match with every match marked; the
snippet is built from escaped text, so a query (or an article) can never
inject markup.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import markdown
import nh3
from markdown.extensions.toc import slugify_unicode
from markupsafe import Markup, escape

ARTICLES_DIR = Path(__file__).resolve().parent / "articles"
LANGUAGES = ("en", "es", "zh")
DEFAULT_LANGUAGE = "en"
AUDIENCES = ("driver", "tenant", "all")
SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
RESERVED_SLUGS = {"search", "static"}  # routes of the help blueprint
REQUIRED = ("title", "summary", "keywords")
STRUCTURE = ("audience", "order", "related")  # English files only
MAX_QUERY = 100
STOPWORDS = {
    "en": frozenset("a an and are at be can do does for how i in is it my of on or the to what when where why with".split()),
    "es": frozenset("a al como con cuando de del el en es la las lo los mi mis no o para por que qué se su un una y".split()),
}
SNIPPET_CHARS = 70  # of context on each side of the first match (Chinese packs more into fewer characters)

# The OCPP 1.6 ChargePointErrorCode values: the charger-error-codes article has a heading with each as its id.
OCPP_ERROR_CODES = (
    "ConnectorLockFailure", "EVCommunicationError", "GroundFailure", "HighTemperature", "InternalError", "LocalListConflict",
    "NoError", "OtherError", "OverCurrentFailure", "OverVoltage", "PowerMeterFailure", "PowerSwitchFailure", "ReaderFailure",
    "ResetFailure", "UnderVoltage", "WeakSignal",
)

# Payment failure codes (ours and the provider's decline codes) → the section of card-problems that explains them.
CARD_PROBLEM_ANCHORS = {
    "card_declined": "card-declined", "generic_decline": "card-declined", "do_not_honor": "card-declined",
    "insufficient_funds": "card-declined", "card_velocity_exceeded": "card-declined", "incorrect_cvc": "card-declined",
    "lost_card": "card-declined", "stolen_card": "card-declined", "fraudulent": "card-declined", "card_not_supported": "card-declined",
    "expired_card": "expired-card",
    "payment_intent_authentication_failure": "authentication-required", "authentication_required": "authentication-required",
    "payment_failed": "payment-failed", "invalid_request": "payment-failed",
    "provider_unavailable": "processor-unavailable", "not_submitted": "processor-unavailable", "payments_unavailable": "processor-unavailable",
    "invalid_setup": "card-not-saved",
    "wallet_insufficient": "wallet-too-low",
}
CARD_PROBLEM_DEFAULT = "card-declined"

_TAGS = set(nh3.ALLOWED_TAGS) - {"img", "area", "map"}
_ATTRIBUTES = {tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items() if tag in _TAGS}
for _h in ("h1", "h2", "h3", "h4", "h5", "h6"):
    _ATTRIBUTES.setdefault(_h, set()).add("id")
_ATTRIBUTES.setdefault("code", set()).add("class")  # fenced_code's language-xyz
_URL_SCHEMES = {"http", "https", "mailto"}
_HREF = re.compile(r'<a\b[^>]*\bhref="([^"]*)"')
_ID = re.compile(r'<h[1-6]\b[^>]*\bid="([^"]*)"[^>]*>(.*?)</h[1-6]>', re.S)
_BLOCK_TAG = re.compile(r"</?(?:p|li|ul|ol|h[1-6]|table|thead|tbody|tr|td|th|div|pre|blockquote|dl|dt|dd|br|hr)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")


class ArticleError(ValueError):
    """An article file that cannot be used (bad front matter, unknown slug, missing English version)."""


@dataclass(frozen=True)
class Article:
    """One help article in one language, rendered and ready to show or search."""

    slug: str
    lang: str  # the language of the text (English for a fallback)
    title: str
    summary: str
    keywords: tuple[str, ...]
    audience: str
    order: int
    related: tuple[str, ...]
    html: str  # sanitised
    text: str  # the body as plain text, for search and snippets
    anchors: tuple[str, ...]  # heading ids, in page order
    headings: tuple[tuple[str, str], ...]  # (id, text) of the h2 headings: the "on this page" list
    links: tuple[str, ...]  # every href in the body
    fallback: bool = False  # shown in another language because this one has no translation

    @property
    def body(self) -> Markup:
        """The body for a template (sanitised when loaded)."""
        return Markup(self.html)


@dataclass
class Library:
    """Every article of every language: ``articles[lang][slug]`` (fallbacks filled in)."""

    articles: dict[str, dict[str, Article]] = field(default_factory=dict)

    def get(self, slug: str, lang: str) -> Article | None:
        """The article in ``lang`` (its English version, marked fallback, when not translated), or None."""
        return self.articles.get(lang if lang in self.articles else DEFAULT_LANGUAGE, {}).get(slug)

    def all(self, lang: str) -> list[Article]:
        """Every article in ``lang``, in index order."""
        found = self.articles.get(lang if lang in self.articles else DEFAULT_LANGUAGE, {})
        return sorted(found.values(), key=lambda a: (a.order, a.slug))

    def by_audience(self, lang: str) -> dict[str, list[Article]]:
        """The index: articles per audience (driver, tenant, all), each in order."""
        out: dict[str, list[Article]] = {a: [] for a in AUDIENCES}
        for article in self.all(lang):
            out[article.audience].append(article)
        return out


# --------------------------------------------------------------------------- reading the files


def parse_front_matter(raw: str, where: str) -> tuple[dict[str, str], str]:
    """Split a file into its front matter (``key: value`` lines between ``---``) and its Markdown body."""
    text = raw.lstrip("\ufeff")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise ArticleError(f"{where}: the file must start with a '---' front matter block")
    meta: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        if line.strip() == "---":
            return meta, "\n".join(lines[n:])
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not re.fullmatch(r"[a-z_]+", key):
            raise ArticleError(f"{where}:{n}: expected 'key: value', got {line!r}")
        if key in meta:
            raise ArticleError(f"{where}:{n}: {key} is given twice")
        meta[key] = value.strip()
    raise ArticleError(f"{where}: the front matter block is not closed with '---'")


def _words(value: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in value.split(",") if w.strip())


def render(body: str) -> str:
    """Markdown → sanitised HTML (see the module docstring for the extensions and what survives)."""
    md = markdown.Markdown(
        extensions=["toc", "attr_list", "tables", "fenced_code", "sane_lists"],
        extension_configs={"toc": {"slugify": slugify_unicode}},
        output_format="html",
    )
    raw = md.convert(body)
    return nh3.clean(raw, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_URL_SCHEMES, link_rel="noopener")


def plain_text(fragment: str) -> str:
    """An HTML fragment's text: block tags become spaces, inline tags vanish, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(_TAG.sub("", _BLOCK_TAG.sub(" ", fragment))).split())


def _article(slug: str, lang: str, meta: dict[str, str], body: str, english: Article | None, where: str) -> Article:
    allowed = set(REQUIRED) | (set(STRUCTURE) if lang == DEFAULT_LANGUAGE else set())
    unknown = set(meta) - allowed
    if unknown:
        raise ArticleError(f"{where}: unknown front matter keys {sorted(unknown)}"
                           + (" (audience, order and related belong in the English file)" if unknown & set(STRUCTURE) else ""))
    missing = [k for k in REQUIRED if not meta.get(k)]
    if missing:
        raise ArticleError(f"{where}: missing {missing}")
    if english is None:
        audience = meta.get("audience", "")
        if audience not in AUDIENCES:
            raise ArticleError(f"{where}: audience must be one of {AUDIENCES}, not {audience!r}")
        try:
            order = int(meta.get("order", ""))
        except ValueError:
            raise ArticleError(f"{where}: order must be an integer") from None
        related = _words(meta.get("related", ""))
    else:
        audience, order, related = english.audience, english.order, english.related
    body_html = render(body)
    headings = [(m.group(1), plain_text(m.group(2))) for m in _ID.finditer(body_html)]
    return Article(
        slug=slug, lang=lang, title=meta["title"], summary=meta["summary"], keywords=_words(meta["keywords"]), audience=audience,
        order=order, related=related, html=body_html, text=plain_text(body_html), anchors=tuple(i for i, _t in headings),
        headings=tuple((i, t) for i, t in headings if re.search(rf'<h2\b[^>]*\bid="{re.escape(i)}"', body_html)),
        links=tuple(html.unescape(h) for h in _HREF.findall(body_html)),
    )


def load(directory: Path = ARTICLES_DIR) -> Library:
    """Read, check and render every article under ``directory``; raises ArticleError on the first bad file."""
    lib = Library()
    english: dict[str, Article] = {}
    for lang in (DEFAULT_LANGUAGE, *[code for code in LANGUAGES if code != DEFAULT_LANGUAGE]):
        found: dict[str, Article] = {}
        folder = directory / lang
        for path in sorted(folder.glob("*.md")) if folder.is_dir() else []:
            slug = path.stem
            where = f"{lang}/{path.name}"
            if not SLUG.fullmatch(slug) or slug in RESERVED_SLUGS:
                raise ArticleError(f"{where}: a slug is lower-case words joined by '-' (and not {sorted(RESERVED_SLUGS)})")
            if lang != DEFAULT_LANGUAGE and slug not in english:
                raise ArticleError(f"{where}: there is no English article {slug!r}")
            meta, body = parse_front_matter(path.read_text(encoding="utf-8"), where)
            found[slug] = _article(slug, lang, meta, body, english.get(slug) if lang != DEFAULT_LANGUAGE else None, where)
        if lang == DEFAULT_LANGUAGE:
            english = found
            for article in found.values():
                bad = [r for r in article.related if r not in found or r == article.slug]
                if bad:
                    raise ArticleError(f"en/{article.slug}.md: related articles that do not exist: {bad}")
        for slug, article in english.items():
            if slug not in found:
                found[slug] = _fallback(article)
        lib.articles[lang] = found
    return lib


def _fallback(article: Article) -> Article:
    """The English article standing in for a missing translation."""
    return replace(article, fallback=True)


@lru_cache(maxsize=1)
def library() -> Library:
    """Every article, read once per process (the files ship with the code; a deploy restarts the process)."""
    return load()


# --------------------------------------------------------------------------- search


def fold(text: str) -> tuple[str, list[int]]:
    """``text`` made case- and accent-insensitive, and for each character of the result its index in ``text``."""
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKD", ch):
            if unicodedata.combining(c):
                continue
            for f in c.casefold():
                out.append(f)
                index.append(i)
    return "".join(out), index


def terms_of(query: str, lang: str = DEFAULT_LANGUAGE) -> list[str]:
    """The folded words of a query (each searched as a substring), without repeats, in order.

    Little words of the language ("the", "de", "la") are left out when the query has other words: as substrings
    they are in every article and would rank a title that happens to hold "de" above the article asked for.
    """
    folded, _index = fold(" ".join(query.split())[:MAX_QUERY])
    seen: list[str] = []
    for word in folded.split():
        if word not in seen:
            seen.append(word)
    meaningful = [w for w in seen if w not in STOPWORDS.get(lang, ())]
    return meaningful or seen


def _spans(text: str, terms: Iterable[str]) -> list[tuple[int, int]]:
    """Every match of any term in ``text``, as merged (start, end) index ranges of the original text."""
    folded, index = fold(text)
    found: list[tuple[int, int]] = []
    for term in terms:
        start = folded.find(term)
        while start != -1:
            end = start + len(term)
            found.append((index[start], index[end - 1] + 1))
            start = folded.find(term, end)
    merged: list[tuple[int, int]] = []
    for a, b in sorted(found):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def highlight(text: str, terms: Iterable[str]) -> Markup:
    """``text`` escaped, with every match of ``terms`` in ``<mark>``."""
    out: list[str] = []
    pos = 0
    for a, b in _spans(text, terms):
        out.append(str(escape(text[pos:a])))
        out.append(f"<mark>{escape(text[a:b])}</mark>")
        pos = b
    out.append(str(escape(text[pos:])))
    return Markup("".join(out))


def snippet(text: str, terms: list[str], width: int = SNIPPET_CHARS) -> Markup | None:
    """A window of ``text`` around its first match, cut at spaces where the language has them, matches marked; None without a match."""
    spans = (_spans(text, [" ".join(terms)]) if len(terms) > 1 else []) or _spans(text, terms)  # the whole phrase first
    if not spans:
        return None
    a, b = spans[0]
    start, end = max(0, a - width), min(len(text), b + width)
    if start > 0:
        space = text.find(" ", start, a)
        start = space + 1 if space != -1 else start
    if end < len(text):
        space = text.rfind(" ", b, end)
        end = space if space != -1 else end
    inner = highlight(text[start:end].strip(), terms)
    return Markup("{}{}{}").format("… " if start > 0 else "", inner, " …" if end < len(text) else "")


@dataclass(frozen=True)
class Hit:
    """A search result: the article, its score, and its title and snippet with the matches marked."""

    article: Article
    score: int
    title: Markup
    snippet: Markup


def search(query: str, lang: str, lib: Library | None = None) -> list[Hit]:
    """The articles of ``lang`` that contain every word of ``query``, best first (see the module docstring)."""
    terms = terms_of(query or "", lang)
    if not terms:
        return []
    lib = lib or library()
    hits: list[Hit] = []
    for article in lib.all(lang):
        title, _ti = fold(article.title)
        keywords, _ki = fold(" · ".join(article.keywords))
        body, _bi = fold(article.text)
        score = 0
        for term in terms:
            if term in title:
                score += 100
            elif term in keywords:
                score += 10
            elif term in body:
                score += min(body.count(term), 9)
            else:
                score = -1
                break
        if score <= 0:
            continue
        hits.append(Hit(article, score, highlight(article.title, terms),
                        snippet(article.text, terms) or highlight(article.summary, terms)))
    hits.sort(key=lambda h: (-h.score, h.article.order, h.article.slug))
    return hits


# --------------------------------------------------------------------------- helpers for in-flow links


def card_problem_anchor(code: str | None) -> str:
    """The card-problems section for a payment failure code (declined, 3-D Secure, processor down, ...)."""
    return CARD_PROBLEM_ANCHORS.get(code or "", CARD_PROBLEM_DEFAULT)


def charger_error_anchor(code: str | None) -> str | None:
    """The charger-error-codes section of an OCPP error code, or None for no code or one the protocol does not define."""
    return code if code in OCPP_ERROR_CODES else None
