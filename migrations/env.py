"""Alembic environment: the models' metadata, and the URL from the command or VOLTPAY_DATABASE_URL."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

import webapp.models  # noqa: F401  (registers the tables)
from webapp.config import finalize, from_environment
from webapp.db import Base, make_engine

config = context.config
if config.config_file_name and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """The URL given by the caller, else the app's configured one."""
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    settings = from_environment()
    finalize(settings)
    return str(settings["DATABASE_URL"])


def run_migrations_offline() -> None:
    """Emit SQL without a connection."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database (batch mode so SQLite can alter tables)."""
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
