"""The baseline of ``bench/http_load.py``: a bare Flask app answering "hello", served by the same gunicorn settings as Voltpay.

It lives below ``bench/`` so that ``make bench``, which runs every ``bench/*.py``, does not run it.
"""

from flask import Flask

app = Flask("hello")


@app.get("/")
def hello() -> str:
    """The smallest page Flask can serve."""
    return "hello"
