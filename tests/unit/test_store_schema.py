"""The store's schema comes from its migrations (`abfleet db upgrade`), on SQLite and
PostgreSQL: an empty database is upgraded to the newest revision, exactly the tables
abfleet.store describes; a second run finds nothing to do; a store created before migrations
is adopted with its rows; several migrators at once take turns; an unreachable database is
one readable line and exit 1."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from abfleet import migrations, procs
from abfleet.settings import Settings
from abfleet.store import Store, metadata
from tests.helpers import free_port

HEAD = migrations.head()

# The tables as the releases before migrations created them: feedback without user_id.
OLD = sa.MetaData()
sa.Table("predictions", OLD,
         sa.Column("id", sa.String(32), primary_key=True),
         sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
         sa.Column("variant", sa.String(16), nullable=False),
         sa.Column("model_version", sa.String(32), nullable=False),
         sa.Column("location", sa.String(128), nullable=False),
         sa.Column("total_sqft", sa.Float, nullable=False),
         sa.Column("bhk", sa.Integer, nullable=False),
         sa.Column("bath", sa.Integer, nullable=False),
         sa.Column("estimated_price", sa.Float, nullable=False),
         sa.Column("latency_ms", sa.Float, nullable=False),
         sa.Column("user_id", sa.String(128)))
sa.Table("feedback", OLD,
         sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id"), nullable=False),
         sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
         sa.Column("kind", sa.String(16), nullable=False),
         sa.Column("feedback_type", sa.String(16), nullable=False),
         sa.Column("feedback_value", sa.Float),
         sa.Column("ape", sa.Float),
         sa.Column("variant", sa.String(16), nullable=False),
         sa.Column("model_version", sa.String(32), nullable=False),
         sa.Column("received_by", sa.String(16)),
         sa.UniqueConstraint("prediction_id", "kind", name="one_feedback_of_a_kind"))
sa.Table("decisions", OLD,
         sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
         sa.Column("decision", sa.String(16), nullable=False),
         sa.Column("source", sa.String(32), nullable=False),
         sa.Column("production_version", sa.String(32)),
         sa.Column("candidate_version", sa.String(32)),
         sa.Column("applied", sa.Boolean, nullable=False),
         sa.Column("reasons", sa.Text, nullable=False),
         sa.Column("details", sa.Text, nullable=False))
sa.Table("fleet_state", OLD,
         sa.Column("key", sa.String(64), primary_key=True),
         sa.Column("value", sa.Text, nullable=False),
         sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False))


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """An empty database: a new SQLite file, or a new schema of the session's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"s_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{base}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def differences(url: str) -> list:
    """What separates the database's tables from abfleet.store's (alembic's autogenerate view)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    return diff


def test_an_empty_database_is_upgraded_once(empty_url):
    assert migrations.current(empty_url) is None
    first = migrations.upgrade(empty_url)
    assert (first.before, first.after, first.adopted) == (None, HEAD, False)
    assert first.describe() == f"upgraded from an empty database to {HEAD}"
    again = migrations.upgrade(empty_url)
    assert (again.before, again.after) == (HEAD, HEAD) and again.describe() == f"already at {HEAD}"
    assert migrations.current(empty_url) == HEAD
    assert differences(empty_url) == []  # the indexes and the unique constraint included


def test_a_store_made_before_migrations_is_adopted_with_its_rows(empty_url):
    engine = sa.create_engine(empty_url, poolclass=sa.pool.NullPool)
    stamp = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        OLD.create_all(conn)
        conn.execute(OLD.tables["predictions"].insert(), [{
            "id": "p-old", "created_at": stamp, "variant": "production", "model_version": "3", "location": "x",
            "total_sqft": 1000.0, "bhk": 2, "bath": 2, "estimated_price": 80.0, "latency_ms": 1.0, "user_id": "u-1"}])
        conn.execute(OLD.tables["feedback"].insert(), [{
            "prediction_id": "p-old", "created_at": stamp, "kind": "rating", "feedback_type": "rating",
            "feedback_value": 4.0, "variant": "production", "model_version": "3", "received_by": "production"}])
        conn.execute(OLD.tables["fleet_state"].insert(), [{"key": "candidate_weight", "value": "30", "updated_at": stamp}])
    engine.dispose()

    outcome = migrations.upgrade(empty_url)
    assert outcome.adopted and outcome.after == HEAD and outcome.describe().startswith("adopted")
    assert migrations.upgrade(empty_url).describe() == f"already at {HEAD}"
    assert differences(empty_url) == []

    store = Store(empty_url, spool_dir=None)
    try:
        assert store.get_prediction("p-old")["estimated_price"] == 80.0
        assert [(f["feedback_value"], f["user_id"]) for f in store.feedback_for("p-old")] == [(4.0, None)]
        assert store.get_state("candidate_weight") == 30
        row = store.record_feedback("p-old", "actual_price", 100.0, "production", user_id="u-1")
        assert row["ape"] == pytest.approx(0.2)
        assert {f["kind"]: f["user_id"] for f in store.feedback_for("p-old")} == {"rating": None, "actual_price": "u-1"}
    finally:
        store.close()


def test_migrators_at_once_take_turns(empty_url):
    outcomes, errors = [], []

    def run():
        try:
            outcomes.append(migrations.upgrade(empty_url))
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(o.describe() for o in outcomes) == sorted(
        [f"upgraded from an empty database to {HEAD}"] + [f"already at {HEAD}"] * 3)


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(procs.venv_bin("abfleet")), *args], env=procs.child_env(settings),
                          capture_output=True, text=True, timeout=120)


def test_the_command_says_what_it_did(tmp_path):
    settings = Settings(run_dir=tmp_path)
    behind = run_cli(settings, "db", "current")
    assert behind.returncode == 1 and f"run `abfleet db upgrade` to reach {HEAD}" in behind.stdout
    done = run_cli(settings, "db", "upgrade")
    assert done.returncode == 0 and done.stdout.strip().endswith(f"upgraded from an empty database to {HEAD}"), done
    again = run_cli(settings, "db", "upgrade")
    assert again.returncode == 0 and again.stdout.strip().endswith(f"already at {HEAD}"), again
    now = run_cli(settings, "db", "current")
    assert now.returncode == 0 and now.stdout.strip().endswith(f"{HEAD} (up to date)")


def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path):
    url = f"postgresql+psycopg2://abfleet:not-shown@127.0.0.1:{free_port()}/abfleet"
    with pytest.raises(migrations.DatabaseUnreachable, match="database unreachable at .*127.0.0.1"):
        migrations.upgrade(url)
    for action in ("upgrade", "current"):
        result = run_cli(Settings(run_dir=tmp_path, database_url=url), "db", action)
        assert result.returncode == 1 and result.stdout == ""
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("abfleet db: database unreachable at postgresql+psycopg2://abfleet:***@127.0.0.1:")
        assert "not-shown" not in line


def test_the_help_names_both_actions():
    result = subprocess.run([str(procs.venv_bin("abfleet")), "db", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "upgrade" in result.stdout and "current" in result.stdout
    assert "Servers never create or alter tables" in result.stdout


def test_jobs_get_the_job_statement_timeout_and_servers_the_short_one(tmp_path):
    """A job's aggregate over millions of rows must not meet the servers' 5-second limit."""
    from abfleet.store import open_store

    settings = Settings(run_dir=tmp_path, db_statement_timeout_s=5.0, job_statement_timeout_s=240.0)
    with open_store(settings) as store:
        assert store.statement_timeout == 240.0
    server = Store.from_settings(settings)
    try:
        assert server.statement_timeout == 5.0
    finally:
        server.close()
