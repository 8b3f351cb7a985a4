"""Fixtures of the money core's tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def Session(app):  # noqa: N802 - a session factory, named like one
    """The app's session factory, on empty tables."""
    return app.extensions["db_sessionmaker"]
