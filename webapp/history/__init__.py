"""The signed-in person's history: charging sessions, wallet top-ups and documents by month; CSV export; statement PDF.

Decisions (see also ``service`` and ``views``):

* **Months** run from the first to the first of the next month at midnight in
  the zone the pages show times in (flask-babel's time zone,
  ``BABEL_DEFAULT_TIMEZONE``, which ``webapp.config`` sets to UTC: so today
  these are UTC months, as the CSV's UTC timestamps). A person has no time
  zone of their own and their sessions may be at sites in several zones, so
  one zone for the whole history keeps every row's shown date inside the
  month it is listed under, and the statement's closing balance equal to the
  next month's opening one.
* A charging session belongs to the month it was **created** in (when the
  driver paid or reserved), a top-up to the month it was made, a document to
  the month it was **issued**, a wallet movement to the month it was booked.
* Every query is filtered by the signed-in account (``user_id`` for sessions,
  ``owner`` for card payments, documents and the wallet): there is no
  parameter naming whose history to show.
"""

from flask import Blueprint

bp = Blueprint("history", __name__, url_prefix="/account")

from webapp.history import views  # noqa: E402,F401  (routes register on import)
