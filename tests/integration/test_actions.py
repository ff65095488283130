"""Acting on what was judged, and loading only what a server expects, on a live stack of its
own (MLflow, both servers, nginx, Prometheus): an alias moved between the evaluation's read
and its action, a tampered artifact, a pickled one, and a retrain during a young experiment."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import requests

from abfleet import api, evaluation, model, registry, train
from abfleet.store import Store
from tests.helpers import health, trained_stack, wait_for

pytestmark = pytest.mark.slow
SMALL = model.ModelParams(max_iter=30)  # versions here only need to exist and load, not to be good


@pytest.fixture(scope="module")
def actions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("actions")
    with trained_stack(folder, 5, SMALL) as (settings, versions, csv):
        yield settings, versions, csv, folder


def serving(settings, variant: str) -> str | None:
    return health(settings.server_url(variant)).get("model_version")


def new_version(settings, csv: Path) -> str:
    """A registered version with no alias."""
    return train.train(settings, csv, params=SMALL, seed=7)["version"]


def back_to(settings, versions: dict) -> None:
    """The module's aliases again, and both servers serving them with nothing to report."""
    registry.set_alias(settings, "candidate", versions["candidate"])
    wait_for(lambda: serving(settings, "candidate") == versions["candidate"]
             and not health(settings.server_url("candidate")).get("last_error"), 30, what="the candidate back")


def skops_file(settings, version: str) -> Path:
    """Where the local stack's artifact store keeps this version's model.skops."""
    model_id = registry.version_info(settings, version).source.removeprefix("models:/")  # m-<id>: its folder
    found = [p for p in (settings.run_dir / "objects" / "mlflow").rglob(registry.SKOPS_FILE) if model_id in str(p)]
    assert len(found) == 1, found
    return found[0]


def test_a_candidate_moved_between_collect_and_act_is_not_promoted(actions):
    settings, versions, csv, _folder = actions
    collected = evaluation.collect(settings)
    assert (collected["production_version"], collected["candidate_version"]) == (versions["production"], versions["candidate"])
    newer = new_version(settings, csv)
    registry.set_alias(settings, "candidate", newer)  # a retrain lands between the read and the action

    record = evaluation.act(settings, collected, {"decision": "promote", "reasons": ["judged better"], "checks": {}},
                            source="test")
    reason = f"refused: @candidate moved from {versions['candidate']} to {newer} since it was judged"
    assert not record["applied"] and record["refused"] == reason, record
    assert registry.aliases(settings) == {"production": versions["production"], "candidate": newer}
    assert "promoted_at" not in registry.version_info(settings, newer).tags
    row = Store(settings.db_url).decision_history(limit=1)[0]
    assert (row["decision"], row["applied"], row["source"]) == ("promote", False, "test")
    assert row["reasons"][-1] == reason and row["details"]["refused"] == reason
    assert row["candidate_version"] == versions["candidate"]  # the version that was judged
    back_to(settings, versions)


def test_a_tampered_artifact_is_refused_and_the_server_keeps_its_model(actions):
    settings, versions, csv, _folder = actions
    tampered = new_version(settings, csv)
    # Valid skops bytes, of another model: only the recorded checksum tells them apart.
    skops_file(settings, tampered).write_bytes(skops_file(settings, versions["production"]).read_bytes())
    with pytest.raises(registry.ArtifactRefused, match=f"version {tampered} refused: artifact checksum mismatch"):
        registry.load_model(settings, tampered)

    registry.set_alias(settings, "candidate", tampered)
    url = settings.server_url("candidate")
    wait_for(lambda: health(url).get("last_error") == f"version {tampered} refused: artifact checksum mismatch", 30,
             what="the candidate server to refuse the tampered version")
    assert serving(settings, "candidate") == versions["candidate"]
    r = requests.post(f"{url}{api.PREDICT}", json=api.FLAT, timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == versions["candidate"], r.text
    log = (settings.run_dir / "logs" / "candidate.log").read_text()
    assert f"version {tampered} refused: artifact checksum mismatch" in log and "tag says" in log
    back_to(settings, versions)


def _pickled_version(settings, fitted, fmt: str, folder: Path) -> str:
    import mlflow
    import mlflow.artifacts
    import mlflow.sklearn

    registry.client(settings)
    mlflow.set_experiment(settings.model_name)
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow rightly warns that pickle is unsafe
        # Requirements given: inferring them would load the model here, and run the payload.
        info = mlflow.sklearn.log_model(fitted, name="model", registered_model_name=settings.model_name,
                                        serialization_format=fmt, pip_requirements=["scikit-learn"])
    version = str(info.registered_model_version)
    # A checksum that matches: the format alone must be what refuses it.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{version}",
                                                     dst_path=str(folder / f"v{version}")))
    registry.tag_version(settings, version, {registry.CHECKSUM_TAG: registry.file_sha256(local / "model.pkl")})
    return version


class Payload:
    """What an attacker would pickle: loading it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_version_is_refused_and_never_unpickled(actions):
    settings, versions, _csv, folder = actions
    marker = folder / "unpickled"
    bomb = _pickled_version(settings, Payload(marker), "cloudpickle", folder)
    assert pickle.loads(pickle.dumps(Payload(folder / "probe"))) is None and (folder / "probe").exists()  # it would run
    for fmt in ("pickle", "cloudpickle"):
        version = _pickled_version(settings, registry.load_model(settings, versions["production"]), fmt, folder)
        with pytest.raises(registry.ArtifactRefused, match=f"version {version} refused: serialization {fmt} is not skops"):
            registry.load_model(settings, version)

    registry.set_alias(settings, "candidate", bomb)
    wait_for(lambda: health(settings.server_url("candidate")).get("last_error")
             == f"version {bomb} refused: serialization cloudpickle is not skops", 30,
             what="the candidate server to refuse the pickled version")
    assert serving(settings, "candidate") == versions["candidate"] and not marker.exists()
    back_to(settings, versions)


def test_a_retrain_does_not_replace_a_young_experiments_candidate_unless_forced(actions):
    from abfleet import objects

    settings, versions, csv, _folder = actions
    old = versions["candidate"]
    deferred = train.train(settings, csv, alias="candidate", params=SMALL, seed=8)
    assert deferred["alias"] is None and "minimum run of 24 h" in deferred["candidate_deferred"], deferred
    assert registry.version_for(settings, "candidate") == old
    assert registry.version_info(settings, deferred["version"]).tags.get(train.DEFERRED_TAG) == deferred["candidate_deferred"]

    # The training DAG's code (what a drift-triggered retrain runs) defers the same way.
    objects.publish_dataset(objects.open_store(settings), csv)
    job = train.train_candidate(settings)
    assert not job["candidate_set"] and "minimum run" in job["reason"], job
    assert registry.version_for(settings, "candidate") == old

    forced = train.train(settings, csv, alias="candidate", params=SMALL, seed=9, force=True)
    assert forced["alias"] == "candidate" and registry.version_for(settings, "candidate") == forced["version"]
    tags = registry.version_info(settings, old).tags
    assert tags.get("superseded") and tags.get("superseded_by") == forced["version"]
    wait_for(lambda: serving(settings, "candidate") == forced["version"], 30, what="the forced candidate to load")
