"""The Alembic migrations, on a fresh empty SQLite file and (with VOLTPAY_TEST_DATABASE_URL) on PostgreSQL:
upgrade to head gives exactly the models' schema, downgrade to base removes every table, and upgrade works again.

PostgreSQL runs in a schema of its own (search_path set in the URL), so the
session's migrated database that the other tests use is left alone.
"""

from __future__ import annotations

import os
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url, text

import webapp.models  # noqa: F401  (registers the tables)
from webapp.cli import alembic_config
from webapp.db import Base, make_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path):
    """The URL of an empty database: a new SQLite file, or a new PostgreSQL schema (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    base = os.environ.get("VOLTPAY_TEST_DATABASE_URL", "")
    if not base.startswith("postgresql"):
        pytest.skip("PostgreSQL migrations not tested: set VOLTPAY_TEST_DATABASE_URL to a postgresql+psycopg:// URL")
    schema = f"mig_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _schema_differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables_and_revision(url: str) -> tuple[set[str], str | None]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()), MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_matches_models_downgrade_removes_everything_upgrade_again(empty_database_url):
    url = empty_database_url
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False  # keep pytest's log capture
    head = ScriptDirectory.from_config(cfg).get_current_head()
    models = set(Base.metadata.tables)

    assert _tables_and_revision(url) == (set(), None)  # really empty

    command.upgrade(cfg, "head")
    assert _tables_and_revision(url) == (models | {"alembic_version"}, head)
    assert _schema_differences(url) == []

    command.downgrade(cfg, "base")
    tables, revision = _tables_and_revision(url)
    assert tables <= {"alembic_version"} and revision is None  # every model table gone

    command.upgrade(cfg, "head")
    assert _tables_and_revision(url) == (models | {"alembic_version"}, head)
    assert _schema_differences(url) == []
