"""Database engine, declarative base and one SQLAlchemy session per request.

Views get the request's session with ``db_session()``; it is closed (and any
uncommitted work rolled back) when the request ends. Commands and jobs open
their own with ``Session.begin()`` from ``session_factory()``.
"""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from payments.base import Base, UTCDateTime, utcnow

__all__ = ["Base", "UTCDateTime", "utcnow", "make_engine", "init_app", "engine", "session_factory", "db_session", "read_only"]

READ_ONLY = "voltpay_read_only"  # connection execution option: this transaction only reads (SQLite: no write lock at BEGIN)


def make_engine(url: str) -> Engine:
    """Create the engine; SQLite gets WAL (synchronous=NORMAL), a busy timeout and enforced foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url:
                cur.execute("PRAGMA journal_mode=WAL")
                # WAL's usual setting: a commit survives the application crashing (not the machine losing power
                # before the next checkpoint), without an fsync per commit.
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN
        # so a read-then-write (the wallet check) cannot interleave with another writer.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn, _record):
            dbapi_conn.isolation_level = None

        # Only a transaction declared read-only (``read_only``) begins as a plain reader.
        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def init_app(app: Flask) -> None:
    """Create the engine and session factory for ``app`` and close sessions after each request."""
    engine = make_engine(app.config["DATABASE_URL"])
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    app.extensions["db_engine"] = engine
    app.extensions["db_sessionmaker"] = factory

    @app.teardown_appcontext
    def _close_session(_exc):
        s = g.pop("db_session", None)
        if s is not None:
            s.close()


def engine() -> Engine:
    """The current app's engine."""
    return current_app.extensions["db_engine"]


def session_factory() -> sessionmaker[Session]:
    """The current app's session factory (for jobs and commands)."""
    return current_app.extensions["db_sessionmaker"]


def read_only(s: Session) -> Session:
    """Declare the transaction ``s`` is about to begin as read-only (call before its first query) and return ``s``.

    On SQLite it then begins as a plain reader (a WAL snapshot) instead of taking the write lock at BEGIN, so it
    neither waits for nor delays the writers; it must not write. Other databases are not affected.
    """
    s.connection(execution_options={READ_ONLY: True})
    return s


def db_session() -> Session:
    """The session of the current request (or app context), created on first use."""
    if "db_session" not in g:
        g.db_session = session_factory()()
    return g.db_session
