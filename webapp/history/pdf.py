"""HTML → PDF with WeasyPrint, for the monthly statement.

The statement is self-contained HTML (its CSS inline, no images or links to
fetch), so nothing is loaded over the network while rendering. Fonts come
from the system: DejaVu/Noto for Latin scripts and "WenQuanYi Micro Hei"
(Debian's ``fonts-wqy-microhei``) for Chinese, named in the template's CSS.
"""

from __future__ import annotations

import logging

from weasyprint import HTML
from weasyprint.urls import URLFetcher

# WeasyPrint reports every CSS property it does not know at WARNING level: not ours to act on.
logging.getLogger("weasyprint").setLevel(logging.ERROR)
logging.getLogger("fontTools").setLevel(logging.ERROR)


class _NoFetching(URLFetcher):
    """Refuses every URL: the statement needs none, and text from the database must never make the server fetch one."""

    def fetch(self, url, headers=None):
        """Refuse."""
        raise ValueError(f"the statement loads nothing: {url[:80]}")


def render_pdf(html: str) -> bytes:
    """The PDF of a self-contained HTML document."""
    return HTML(string=html, base_url=None, url_fetcher=_NoFetching()).write_pdf()
