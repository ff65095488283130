"""Shared fixtures. `fleet` is a real local stack (MLflow, two gunicorn servers, nginx,
Prometheus) on free loopback ports in a temporary run directory, with a production and a
candidate model trained on synthetic rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from abfleet import data
from abfleet.settings import Settings
from tests.helpers import OUTPUT_DIR, fleet_settings, wait_for


@dataclass(frozen=True)
class TinyModel:
    fitted: object  # the fitted scikit-learn pipeline
    test: object  # its held-out rows (a DataFrame)


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    """One small model for the whole session, fitted on 80% of 8,000 synthetic rows: the unit
    tests of the server, the compiled trees and the spool share it."""
    from abfleet import model

    cleaned = data.clean(data.synth(8000, seed=11))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    return TinyModel(model.fit(train, model.ModelParams(max_iter=120)), test)


@pytest.fixture(scope="session")
def tiny_predictor(tiny_model):
    from abfleet import model

    return model.FastPredictor(tiny_model.fitted)


@pytest.fixture(scope="session")
def synth_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth.csv"
    data.write_raw(data.synth(6000, seed=1), path)
    return path


@dataclass
class Fleet:
    settings: Settings
    store: object
    output_dir: Path
    versions: dict

    @property
    def router_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.router_port}"

    def server_url(self, variant: str) -> str:
        return f"http://{self.settings.host}:{self.settings.port_of(variant)}"

    def metrics_text(self, variant: str) -> str:
        return requests.get(f"{self.server_url(variant)}/metrics", timeout=5).text

    def serving(self, variant: str) -> str | None:
        try:
            return requests.get(f"{self.server_url(variant)}/api/health", timeout=5).json().get("model_version")
        except requests.RequestException:
            return None


@pytest.fixture(scope="session")
def fleet(tmp_path_factory, synth_csv) -> Fleet:
    """The local stack, started once for the session and stopped at its end."""
    from abfleet import stack, train
    from abfleet.store import Store

    settings = fleet_settings(tmp_path_factory.mktemp("fleet") / "run")
    stack.up(settings, say=lambda _m: None)
    try:
        prod = train.train(settings, synth_csv, alias="production", seed=0)
        cand_csv = synth_csv.parent / "synth-candidate.csv"
        data.write_raw(data.synth(6000, seed=2), cand_csv)
        cand = train.train(settings, cand_csv, alias="candidate", seed=1)
        f = Fleet(settings, Store(settings.db_url), OUTPUT_DIR, {"production": prod["version"], "candidate": cand["version"]})
        OUTPUT_DIR.mkdir(exist_ok=True)
        for variant in ("production", "candidate"):
            wait_for(lambda: f.serving(variant) == f.versions[variant], 60, what=f"{variant} to serve its model")
        yield f
    finally:
        stack.down(settings, say=lambda _m: None)


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for the session (dropped afterwards); skips loudly when none answers."""
    import sqlalchemy as sa

    base = os.environ.get("ABFLEET_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    name = f"abfleet_test_{os.getpid()}"
    try:
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL NOT reachable at {base}: {exc.orig}")
    url = base.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
