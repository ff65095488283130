"""The I/O around the decision: what happens with nothing to judge, and the arms check."""

from __future__ import annotations

from abfleet import evaluation
from abfleet.settings import Settings


def test_nothing_to_judge_is_a_continue_that_says_why():
    outcome = evaluation.judge({"stats": None, "problems": ["no @candidate in the registry: nothing to evaluate"]})
    assert outcome["decision"] == "continue" and "no @candidate" in outcome["reasons"][0]


def test_a_problem_never_ends_in_a_promotion():
    strong = {"model_version": "1", "requests": 5000, "errors": 0, "latency_p95_ms": 10, "latency_mean_ms": 5,
              "ratings": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0}, "quick": {}, "ape": {"count": 0, "sum": 0, "sum_sq": 0}}
    prod = {**strong, "ratings": {"1": 400, "2": 400, "3": 200, "4": 0, "5": 0}, "requests": 8000}
    cand = {**strong, "model_version": "2", "ratings": {"1": 0, "2": 0, "3": 20, "4": 100, "5": 130}, "requests": 2000}
    stats = {"window_hours": 48, "weights": {"production": 0.8, "candidate": 0.2}, "variants": {"production": prod, "candidate": cand}}
    assert evaluation.judge({"stats": stats, "problems": []})["decision"] == "promote"
    held = evaluation.judge({"stats": stats, "problems": ["the two arms receive different inputs"]})
    assert held["decision"] == "continue" and "different inputs" in held["reasons"][0]


def test_arms_check_flags_arms_that_receive_different_inputs(tmp_path):
    import datetime as dt
    import uuid

    from abfleet import data
    from abfleet.store import Store

    settings = Settings(run_dir=tmp_path, arms_min_rows=200)
    store = Store(settings.db_url)
    store.init_schema()
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    frame = data.clean(data.synth(3000, seed=50)).frame.sample(frac=1, random_state=1)  # synth rows come in blocks

    def log(rows, variant):
        store.record_predictions([{"id": uuid.uuid4().hex, "variant": variant, "model_version": "1", "location": r.location,
                                   "total_sqft": float(r.total_sqft), "bhk": int(r.bhk), "bath": int(r.bath),
                                   "estimated_price": 50.0, "latency_ms": 1.0, "user_id": None} for r in rows.itertuples()])

    log(frame.iloc[:1200], "production")
    log(frame.iloc[1200:1500], "candidate")
    assert evaluation.arms_check(settings, since)["drift_detected"] is False
    big = frame.iloc[1500:].copy()
    big = big[big.bhk >= 3]  # a broken split: only large flats reach the candidate
    log(big.head(400), "candidate")
    verdict = evaluation.arms_check(settings, since)
    assert verdict["drift_detected"] is True and "bhk" in verdict["drifted_columns"]


def test_the_latest_drift_verdict_is_reported_beside_the_decision(tmp_path):
    from abfleet.store import Store

    settings = Settings(run_dir=tmp_path)
    store = Store(settings.db_url)
    store.init_schema()
    assert evaluation.latest_drift(settings) is None
    store.set_state("drift_summary", {"checked_at": "2026-01-01T00:00:00+00:00", "drift_detected": True,
                                      "drifted_columns": ["location", "total_sqft"], "prediction_drift": True,
                                      "target_drift": None, "report": "file:///r.html", "columns": {},
                                      "experiment": {"touched": True, "arms": {}}})
    drift = evaluation.latest_drift(settings)
    assert drift["drift_detected"] is True and drift["touches_experiment"] is True
    assert drift["drifted_columns"] == ["location", "total_sqft"] and drift["report"] == "file:///r.html"
    record = evaluation.act(settings, {"drift": drift, "at": "now"}, {"decision": "continue", "reasons": []}, dry_run=True)
    assert record["drift"] == drift


def test_an_evaluation_that_cannot_read_prometheus_is_recorded_blind_and_exported_so(tmp_path, monkeypatch):
    import datetime as dt

    from abfleet import metrics, registry
    from abfleet.fleet_state import FleetStateCollector
    from abfleet.procs import free_port
    from abfleet.store import open_store

    settings = Settings(run_dir=tmp_path, prometheus_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr(registry, "aliases", lambda s: {"production": "3", "candidate": "4"})
    monkeypatch.setattr(registry, "experiment_start", lambda s, v: dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
    monkeypatch.setattr(registry, "tag_version", lambda *a, **k: None)
    with open_store(settings):
        pass  # the tables, as `abfleet db upgrade` makes them
    record = evaluation.evaluate(settings, source="test")
    assert record["blind"] is True and record["decision"] == "continue", record
    assert any("unreachable" in reason for reason in record["reasons"]), record["reasons"]
    with open_store(settings) as store:
        assert store.decision_history(1)[0]["details"]["blind"] is True
        collector = FleetStateCollector(store)
        assert collector.refresh()
        (blind,) = [f for f in collector.collect() if f.name == metrics.EVALUATION_BLIND]
    assert blind.samples[0].value == 1.0
