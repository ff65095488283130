"""Alembic's environment: migrations run on the connection `abfleet.migrations` hands over,
inside its transaction and lock. There is no offline (SQL script) mode."""

from alembic import context

from abfleet.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations with `abfleet db upgrade` (abfleet.migrations.upgrade)")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
