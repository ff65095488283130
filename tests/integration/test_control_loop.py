"""The control loop on a live stack of its own: real Prometheus, nginx, both servers, MLflow,
and the evaluation DAG run with Airflow's dag.test(). Simulated users rate estimates by the
true price of held-out rows, so a better model really earns better ratings."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from abfleet import data, procs, registry, stack
from abfleet.api import PREDICT, acceptable_rows
from tests.helpers import Load, fleet_settings, wait_for

pytestmark = pytest.mark.slow
POLICY_ENV = {"ABFLEET_DECISION_MIN_RUNTIME_HOURS": "0"}  # the test cannot wait a day


def stars_for(estimate: float, truth: float) -> int:
    """How a user who knows the true price rates an estimate."""
    ape = abs(estimate - truth) / truth
    return 5 if ape < 0.10 else 4 if ape < 0.20 else 3 if ape < 0.35 else 2 if ape < 0.6 else 1


def raw_with_price_factor(rows: int, seed: int, factor: float):
    frame = data.synth(rows, seed=seed)
    frame["price"] = frame["price"] * factor
    return frame


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    import os

    from abfleet import train

    saved = {k: os.environ.get(k) for k in POLICY_ENV}
    os.environ.update(POLICY_ENV)  # seen by in-process evaluations and by the DAG's child process
    folder = tmp_path_factory.mktemp("loop")
    settings = fleet_settings(folder / "run", reload_interval=2.0)
    stack.up(settings, say=lambda _m: None)
    try:
        # Production overestimates by 40%; the candidate learned the true prices.
        weak, good = folder / "weak.csv", folder / "good.csv"
        data.write_raw(raw_with_price_factor(6000, 11, 1.4), weak)
        data.write_raw(data.synth(6000, seed=12), good)
        prod = train.train(settings, weak, alias="production")["version"]
        cand = train.train(settings, good, alias="candidate")["version"]
        wait_for(lambda: _serving(settings, "production") == prod and _serving(settings, "candidate") == cand, 60,
                 what="both servers to load")
        holdout = acceptable_rows(data.clean(data.synth(3000, seed=13)).frame, data.known_locations())
        yield settings, {"production": prod, "candidate": cand}, holdout.to_dict("records"), folder
    finally:
        stack.down(settings, say=lambda _m: None)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _serving(settings, variant: str):
    try:
        return requests.get(f"http://{settings.host}:{settings.port_of(variant)}/api/health", timeout=3).json().get("model_version")
    except (requests.RequestException, ValueError):
        return None


def _router(settings) -> str:
    return f"http://{settings.host}:{settings.router_port}"


def wait_primed(settings, versions: dict) -> None:
    """Prometheus has scraped each arm's series at zero since this call: the counts since the
    start then hold every event. (A real experiment runs for hours; here all traffic fits
    between a few scrapes. A Prometheus restarted moments ago still answers with the samples
    from before it stopped; traffic sent before its first new scrape would fall in the gap
    around the experiment's start, which is read between the samples on either side of it.)"""
    asked = time.time()
    for variant, version in versions.items():
        expr = f'min(timestamp(abfleet_ratings_total{{variant="{variant}",model_version="{version}"}}))'
        wait_for(lambda: prometheus_has(settings, expr, asked), 60, 1.0, what=f"Prometheus to scrape {variant} v{version}")


def simulate_users(settings, rows: list[dict], count: int, actual_share: float = 0.3) -> dict:
    """`count` distinct users ask, rate by the true price, and some report it."""
    wait_primed(settings, registry.aliases(settings))
    def one(i: int):
        row = rows[i % len(rows)]
        user = f"sim-{uuid.uuid4().hex[:10]}"
        body = {k: row[k] for k in data.FEATURES}
        r = requests.post(f"{_router(settings)}{PREDICT}", json=body, headers={"X-User-Id": user}, timeout=20)
        assert r.status_code == 200, r.text
        pid = r.json()["prediction_id"]
        stars = stars_for(r.json()["estimated_price"], row["price"])
        fb = requests.post(f"{_router(settings)}/api/feedback", headers={"X-User-Id": user}, timeout=20,
                           json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": stars})
        assert fb.status_code == 201, fb.text
        if i % round(1 / actual_share) == 0:
            requests.post(f"{_router(settings)}/api/feedback", headers={"X-User-Id": user}, timeout=20,
                          json={"prediction_id": pid, "feedback_type": "actual_price", "feedback_value": row["price"]})
        return r.headers["X-Variant"], stars

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(count)))
    ratings = {"production": [], "candidate": []}
    for variant, stars in answers:
        ratings[variant].append(stars)
    return ratings


def prometheus_has(settings, expr: str, at_least: float) -> bool:
    r = requests.get(f"http://{settings.host}:{settings.prometheus_port}/api/v1/query", params={"query": expr}, timeout=5).json()
    result = r["data"]["result"]
    return bool(result) and float(result[0]["value"][1]) >= at_least


def wait_scraped(settings, ratings: dict, version: dict) -> None:
    for variant, stars in ratings.items():
        expr = f'sum(abfleet_ratings_total{{variant="{variant}",model_version="{version[variant]}"}})'
        wait_for(lambda: prometheus_has(settings, expr, len(stars)), 60, 1.0, what=f"Prometheus to scrape {variant} ratings")
    # Two more quiet scrapes: increase() extrapolates at the edges of its window, which
    # matters when the whole experiment lasts seconds (a real one lasts hours), unless the
    # counters are flat there.
    time.sleep(11)


def run_evaluation_dag(settings, folder):
    from abfleet import airflow_local

    return airflow_local.test_dag(settings, "evaluate_ab")


def latest_decision(settings) -> dict:
    from abfleet.store import Store

    return Store(settings.db_url).decision_history(limit=1)[0]


def test_with_prometheus_stopped_the_evaluation_continues_and_changes_nothing(loop):
    from abfleet import evaluation

    settings, versions, _rows, _folder = loop
    svc = next(s for s in stack.services(settings) if s.name == "prometheus")
    procs.stop(stack.running_pid(settings, svc))
    try:
        record = evaluation.evaluate(settings, source="test")
        assert record["decision"] == "continue" and not record["applied"]
        assert any("Prometheus" in r and "unreachable" in r for r in record["reasons"]), record["reasons"]
        assert registry.aliases(settings) == versions
        assert latest_decision(settings)["decision"] == "continue"
    finally:
        stack.up(settings, say=lambda _m: None)
        wait_primed(settings, versions)  # the next test's traffic comes after the gap, not in it


def test_duplicate_rating_409_unknown_404_and_no_counter_moves(loop):
    settings, _versions, rows, _folder = loop
    router = _router(settings)
    r = requests.post(f"{router}{PREDICT}", json={k: rows[0][k] for k in data.FEATURES}, headers={"X-User-Id": "dup"}, timeout=10)
    variant, pid = r.headers["X-Variant"], r.json()["prediction_id"]
    server = f"http://{settings.host}:{settings.port_of(variant)}/metrics"

    def total() -> float:
        text = requests.get(server, timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("abfleet_ratings_total{"))

    first = requests.post(f"{router}/api/feedback", json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4}, headers={"X-User-Id": "dup"}, timeout=10)
    assert first.status_code == 201
    before = total()
    again = requests.post(f"{router}/api/feedback", json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5}, headers={"X-User-Id": "dup"}, timeout=10)
    unknown = requests.post(f"{router}/api/feedback", json={"prediction_id": uuid.uuid4().hex, "feedback_type": "rating", "feedback_value": 5}, headers={"X-User-Id": "dup"}, timeout=10)
    assert again.status_code == 409 and unknown.status_code == 404
    assert total() == before


def test_a_better_candidate_is_promoted_by_the_dag_and_swapped_in_without_a_failed_request(loop):
    settings, versions, rows, folder = loop
    ratings = simulate_users(settings, rows, 700)
    mean = {v: sum(s) / len(s) for v, s in ratings.items()}
    assert mean["candidate"] > mean["production"] + 0.5, mean  # the simulation itself is what we think
    wait_scraped(settings, ratings, versions)
    # What the evaluation counts is exactly what the servers stored since the candidate started.
    from abfleet import evaluation
    from abfleet.store import Store

    stats = evaluation.collect(settings)["stats"]["variants"]
    stored = Store(settings.db_url).predictions_since(evaluation.experiment_start(settings, versions["candidate"]))
    assert {v: stats[v]["requests"] for v in stats} == {v: sum(r["variant"] == v for r in stored) for v in stats}
    pids = {v: stack.running_pid(settings, next(s for s in stack.services(settings) if s.name == v)) for v in ("production", "candidate")}
    with Load(_router(settings), rows[::-1]) as load:
        run_evaluation_dag(settings, folder)
        decision = latest_decision(settings)
        assert decision["decision"] == "promote", (decision["reasons"], decision["details"]["arms"])
        wait_for(lambda: _serving(settings, "production") == versions["candidate"], 30, what="production to swap")
        seen = load.sent
        wait_for(lambda: load.sent > seen + 50, 30, what="load after the swap")
    decision = latest_decision(settings)
    assert decision["decision"] == "promote" and decision["applied"] and decision["source"] == "airflow", decision
    assert registry.aliases(settings) == {"production": versions["candidate"], "candidate": None}
    assert registry.version_info(settings, versions["production"]).tags.get("retired")
    assert load.failed == 0, load.failures[:5]
    assert ("production", versions["candidate"]) in load.versions and ("production", versions["production"]) in load.versions
    # Same processes: the model was swapped in memory, not by a restart.
    assert pids == {v: stack.running_pid(settings, next(s for s in stack.services(settings) if s.name == v)) for v in pids}


def test_a_broken_candidate_is_rolled_back_and_its_artifacts_stay(loop):
    import mlflow.artifacts

    from abfleet import train

    settings, _versions, rows, folder = loop
    production = registry.version_for(settings, "production")
    broken_csv = folder / "broken.csv"
    data.write_raw(raw_with_price_factor(6000, 12, 3.0), broken_csv)  # estimates ×3
    broken = train.train(settings, broken_csv, alias="candidate")["version"]
    wait_for(lambda: _serving(settings, "candidate") == broken, 30, what="broken candidate to load")
    ratings = simulate_users(settings, rows, 500)
    wait_scraped(settings, ratings, {"production": production, "candidate": broken})
    run_evaluation_dag(settings, folder)
    decision = latest_decision(settings)
    assert decision["decision"] == "rollback" and decision["applied"], (decision["reasons"], decision["details"]["stats"])
    assert registry.aliases(settings) == {"production": production, "candidate": None}
    info = registry.version_info(settings, broken)
    assert info.tags.get("rolled_back") and info.tags.get("rolled_back_reasons")
    local = mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{broken}", dst_path=str(folder / "kept"))
    assert any(p.name == "MLmodel" for p in __import__("pathlib").Path(local).rglob("MLmodel"))
    wait_for(lambda: _serving(settings, "candidate") == production, 30, what="candidate server to fall back")


def test_training_dag_sets_a_candidate_only_when_the_offline_check_passes(loop):
    from abfleet import airflow_local, objects

    settings, _versions, _rows, folder = loop
    store = objects.open_store(settings)
    production = registry.version_for(settings, "production")
    assert registry.version_for(settings, "candidate") is None
    first, second = folder / "publish-1.csv", folder / "publish-2.csv"
    data.write_raw(data.synth(6000, seed=21), first)
    data.write_raw(data.synth(6000, seed=22), second)

    # A bar no retrained model clears (50% better than production): no candidate.
    objects.publish_dataset(store, first)
    out = airflow_local.test_dag(settings.replace(offline_margin=-0.5), "train_candidate").stdout
    assert registry.version_for(settings, "candidate") is None
    rejected = max(int(v.version) for v in registry.client(settings).search_model_versions(f"name='{settings.model_name}'"))
    assert "offline_rejected" in registry.version_info(settings, str(rejected)).tags, out[-2000:]
    # The default margin (at most 5% worse on the same held-out rows): a candidate.
    objects.publish_dataset(store, second)
    airflow_local.test_dag(settings, "train_candidate")
    candidate = registry.version_for(settings, "candidate")
    assert candidate is not None and int(candidate) > rejected and candidate != production
    info = registry.version_info(settings, candidate)
    assert info.tags.get("candidate_since") and "offline_rejected" not in info.tags
