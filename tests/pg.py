"""A PostgreSQL server of the test's own (`abfleet.pgserver`), with the store's schema. The
test may stop, freeze and restart it; the shared server is never touched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from abfleet.pgserver import BIN, USER, PostgresServer, family
from abfleet.pgserver import postgres_server as empty_postgres_server

__all__ = ["BIN", "USER", "PostgresServer", "family", "create_schema", "postgres_server"]


def create_schema(url: str) -> None:
    """The store's tables in a fresh database (the one place the tests create them)."""
    from abfleet.store import Store

    store = Store(url)
    try:
        store.init_schema()
    finally:
        store.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL 15 with the store's schema, stopped and removed afterwards."""
    with empty_postgres_server() as server:
        create_schema(server.url)
        yield server
