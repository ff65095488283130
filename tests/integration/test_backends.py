"""The same fleet parts on the other back ends: PostgreSQL for the store, S3 for artifacts."""

from __future__ import annotations

import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from abfleet import procs
from abfleet.api import FLAT
from tests.helpers import fleet_settings, free_port, migrate, wait_for
from tests.helpers import health, start_model_server

pytestmark = pytest.mark.slow


def test_every_answered_prediction_is_stored_in_postgresql(fleet, postgres_url, tmp_path):
    from abfleet.store import Store

    port = free_port()
    settings = migrate(fleet.settings.replace(database_url=postgres_url, production_port=port))
    proc = start_model_server(settings, "production", log=tmp_path / "production.log",
                              metrics_dir=tmp_path / "metrics-production")
    try:
        url = f"http://{settings.host}:{port}"
        try:
            wait_for(lambda: health(url).get("model_version") == fleet.versions["production"], 90, what="server on PostgreSQL")
        except AssertionError:
            raise AssertionError(f"{health(url)}\n{(tmp_path / 'production.log').read_text()[-3000:]}") from None

        def ask(i):
            r = requests.post(f"{url}/api/predict_home_price", json={**FLAT, "bhk": 1 + i % 4}, headers={"X-User-Id": f"pg-{i}"}, timeout=20)
            return r.status_code, r.json()
        answers = [body for code, body in ThreadPoolExecutor(16).map(ask, range(300)) if code == 200]
        assert len(answers) == 300
        store = Store(postgres_url)
        assert store.engine.dialect.name == "postgresql"
        assert store.count_predictions() == len(answers)
        for body in answers:
            row = store.get_prediction(body["prediction_id"])
            assert row["variant"] == "production" and row["model_version"] == body["model_version"]
        store.engine.dispose()
    finally:
        procs.stop_child(proc, timeout=30)


def test_a_server_starts_and_answers_without_its_database(fleet, tmp_path):
    """A replacement server boots while its database is down (here: a PostgreSQL URL where
    nothing listens): it runs no DDL, answers predictions, and keeps them in its spool."""
    import shutil

    from abfleet.spool import SpoolReader, default_spool_dir

    port = free_port()
    db_url = f"postgresql+psycopg2://abfleet@127.0.0.1:{free_port()}/abfleet"
    settings = fleet.settings.replace(database_url=db_url, production_port=port)
    spool = default_spool_dir(db_url)  # where a server of this URL spools (the URL's own folder)
    proc = start_model_server(settings, "production", log=tmp_path / "production.log",
                              metrics_dir=tmp_path / "metrics-production")
    try:
        url = f"http://{settings.host}:{port}"
        try:
            wait_for(lambda: health(url).get("model_version") == fleet.versions["production"], 90,
                     what="a server without its database")
        except AssertionError:
            raise AssertionError(f"{health(url)}\n{(tmp_path / 'production.log').read_text()[-3000:]}") from None
        assert health(url)["store_reachable"] is False
        ids = []
        for i in range(20):
            r = requests.post(f"{url}/api/predict_home_price", json={**FLAT, "bhk": 1 + i % 4},
                              headers={"X-User-Id": f"nodb-{i}"}, timeout=20)
            assert r.status_code == 200, r.text
            ids.append(r.json()["prediction_id"])
        reader = SpoolReader(spool, lambda lines, values: None)
        assert all(reader.find_line(pid) for pid in ids), "an answered prediction is not in the spool"
    finally:
        procs.stop_child(proc, timeout=30)
        shutil.rmtree(spool, ignore_errors=True)


@pytest.fixture
def moto_s3(tmp_path, monkeypatch):
    """moto's S3 server on a free loopback port, with a versioned bucket."""
    import boto3

    port = free_port()
    moto = str(Path(sys.executable).parent / "moto_server")
    with (tmp_path / "moto.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    wait_for(lambda: _answers(endpoint), 30, what="moto server")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"abfleet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    yield s3, bucket, endpoint
    proc.terminate()
    proc.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


def test_train_register_and_serve_from_s3(moto_s3, synth_csv, tmp_path):
    from abfleet import stack, train

    s3, bucket, endpoint = moto_s3
    settings = fleet_settings(tmp_path / "run", s3_bucket=bucket, s3_endpoint_url=endpoint)
    assert settings.artifact_destination.startswith(f"s3://{bucket}/")
    try:
        stack.up(settings, only=("mlflow", "production"), say=lambda _m: None)
        result = train.train(settings, synth_csv, alias="production")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
        assert any(k.endswith("MLmodel") for k in keys), keys
        assert any(k.endswith("data/train.csv") for k in keys), keys
        assert not list((settings.run_dir / "objects").rglob("MLmodel")), "artifacts went to the local folder, not S3"
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
        url = f"http://{settings.host}:{settings.production_port}"
        wait_for(lambda: health(url).get("model_version") == result["version"], 60, what="server loading from S3")
        r = requests.post(f"{url}/api/predict_home_price", json=FLAT, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == result["version"]
    finally:
        stack.down(settings, say=lambda _m: None)
