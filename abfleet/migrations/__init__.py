"""Schema migrations of the prediction store, with Alembic: `abfleet db upgrade` runs them.

Servers never run DDL: the local stack's `up`, the compose stack's one-off `migrate` job and
the deploy's migrate container call `upgrade` before the servers need the tables, and the
commands that read or write tables themselves (train, evaluate, history, ...) call it through
`abfleet.store.open_store`.

An upgrade holds one transaction and one lock (PostgreSQL: an advisory lock; SQLite: BEGIN
IMMEDIATE), so several processes upgrading at once take turns and each finds the work done.
A store created before migrations existed (its tables, no `alembic_version`) is adopted: the
columns added since its tables were created and any missing table are added, then it is
stamped at the initial revision and upgraded from there.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
INITIAL = "0001"
# Nullable columns added to stores created before migrations (they were added in place then).
PRE_MIGRATION_COLUMNS = [("feedback", "user_id", sa.String(128))]
# Any key of its own, so that no other user of pg_advisory_xact_lock on the database collides.
_PG_LOCK = 0x61626669  # "abfi"
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT = "60s"  # how long a migration waits for a table (or another migration) on PostgreSQL


class DatabaseUnreachable(ConnectionError):
    """The database did not accept a connection; the message names it without its password."""


@dataclass(frozen=True)
class Outcome:
    before: str | None  # the revision found (None: an empty database, or a store made before migrations)
    after: str
    adopted: bool = False  # a store made before migrations was brought under them

    def describe(self) -> str:
        if self.adopted:
            return f"adopted a store created before migrations; upgraded from {INITIAL} to {self.after}"
        if self.before == self.after:
            return f"already at {self.after}"
        return f"upgraded from {self.before or 'an empty database'} to {self.after}"


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(an unparsable database URL)"


def _config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this installation knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def _engine(url: str) -> sa.Engine:
    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _own_transactions(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # the driver starts no transaction by itself...

        @sa.event.listens_for(engine, "begin")
        def _write_lock(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # ...so DDL is transactional, one migrator at a time
        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend == "postgresql" else {}
    return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)


def _connect(engine: sa.Engine, url: str) -> sa.Connection:
    try:
        return engine.connect()
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        raise DatabaseUnreachable(f"database unreachable at {shown(url)}: {reason}") from None


def _revision(conn: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current(url: str) -> str | None:
    """The database's revision; None for an empty one or a store made before migrations."""
    engine = _engine(url)
    try:
        with _connect(engine, url) as conn:
            return _revision(conn)
    finally:
        engine.dispose()


def is_pre_migration(conn: sa.Connection) -> bool:
    tables = set(sa.inspect(conn).get_table_names())
    return "alembic_version" not in tables and bool(tables & set(_initial_tables().tables))


def _initial_tables() -> sa.MetaData:
    # The tables as the initial revision creates them (its file name starts with a digit).
    path = next((HERE / "versions").glob(f"{INITIAL}_*.py"))
    spec = importlib.util.spec_from_file_location(f"abfleet_migration_{INITIAL}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.METADATA


def _adopt(conn: sa.Connection) -> None:
    """Bring a store made before migrations to the initial revision's schema, and stamp it."""
    from alembic import command

    _initial_tables().create_all(conn, checkfirst=True)
    inspector = sa.inspect(conn)
    for table, column, kind in PRE_MIGRATION_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind.compile(dialect=conn.dialect)}")
    command.stamp(_config(conn), INITIAL)


def upgrade(url: str) -> Outcome:
    """Bring the database at `url` to the newest revision (idempotent; safe to run from several
    processes at once). Raises DatabaseUnreachable when it does not answer."""
    from alembic import command

    engine = _engine(url)
    try:
        with _connect(engine, url) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
            before = _revision(conn)
            adopted = before is None and is_pre_migration(conn)
            if adopted:
                _adopt(conn)
            command.upgrade(_config(conn), "head")
            return Outcome(before, _revision(conn), adopted)
    finally:
        engine.dispose()
