"""The local fleet end to end: real MLflow, two gunicorn servers, nginx, SQLite store."""

from __future__ import annotations

import collections
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from abfleet.api import FLAT, PREDICT
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def _variant_of(fleet, user: str) -> str:
    r = requests.get(f"{fleet.router_url}/api/health", headers={"X-User-Id": user}, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["X-Variant"]


def _parallel(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def test_split_is_80_20_over_distinct_users(fleet):
    users = [f"user-{i}-{uuid.uuid4().hex[:6]}" for i in range(10_000)]
    session = requests.Session()
    variants = _parallel(lambda u: session.get(f"{fleet.router_url}/api/health", headers={"X-User-Id": u}, timeout=10).headers["X-Variant"], users)
    share = variants.count("candidate") / len(variants)
    assert 0.185 <= share <= 0.215, f"candidate share {share:.3%}"


def test_split_is_sticky_per_user(fleet):
    users = [f"sticky-{i}" for i in range(50)]
    seen = collections.defaultdict(set)
    for user, variant in zip(users * 20, _parallel(lambda u: _variant_of(fleet, u), users * 20)):
        seen[user].add(variant)
    assert all(len(v) == 1 for v in seen.values()), {u: v for u, v in seen.items() if len(v) > 1}
    assert {next(iter(v)) for v in seen.values()} == {"production", "candidate"}


def test_client_without_id_gets_a_cookie_and_keeps_its_variant(fleet):
    for _ in range(10):  # ten new people; each must stay where the first answer put them
        session = requests.Session()
        first = session.post(f"{fleet.router_url}{PREDICT}", json=FLAT, timeout=10)
        assert first.status_code == 200, first.text
        assert "abfleet_uid" in session.cookies
        variants = {session.post(f"{fleet.router_url}{PREDICT}", json=FLAT, timeout=10).headers["X-Variant"] for _ in range(15)}
        assert variants == {first.headers["X-Variant"]}


def test_every_answered_prediction_is_stored_with_variant_and_version(fleet):
    def ask(i: int):
        r = requests.post(f"{fleet.router_url}{PREDICT}", json={**FLAT, "total_sqft": 800 + i}, headers={"X-User-Id": f"burst-{i}"}, timeout=20)
        return r.status_code, r.json(), r.headers
    answers = [(code, body, headers) for code, body, headers in _parallel(ask, range(400), workers=16) if code == 200]
    assert len(answers) == 400
    for _code, body, headers in answers:
        row = fleet.store.get_prediction(body["prediction_id"])
        assert row is not None
        assert row["variant"] == headers["X-Variant"]
        assert row["model_version"] == body["model_version"] == fleet.versions[row["variant"]]
        assert row["user_id"].startswith("burst-")
    stored = sum(1 for _c, body, _h in answers if fleet.store.get_prediction(body["prediction_id"]))
    assert stored == len(answers)


def _count(text: str, endpoint: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "abfleet_requests_total" and sample.labels.get("endpoint") == endpoint:
                total += sample.value
    return total


def test_metrics_count_every_request_across_workers(fleet):
    url = fleet.server_url("production")
    before = _count(fleet.metrics_text("production"), PREDICT)
    sent = 300
    codes = _parallel(lambda i: requests.post(f"{url}{PREDICT}", json=FLAT, timeout=10).status_code, range(sent))
    assert codes.count(200) == sent
    after = _count(fleet.metrics_text("production"), PREDICT)
    assert after - before == sent
    # Both workers answered some of them (one metrics file per worker), or the test
    # would prove nothing about summing across workers.
    files = list((fleet.settings.run_dir / "metrics" / "production").glob("counter_*.db"))
    assert len(files) >= 2, files


BAD_INPUTS = [
    ("missing field", {"location": "Indira Nagar", "bhk": 2, "bath": 2}, "total_sqft"),
    ("wrong type", {**FLAT, "total_sqft": "large"}, "total_sqft"),
    ("bool as number", {**FLAT, "bhk": True}, "bhk"),
    ("zero area", {**FLAT, "total_sqft": 0}, "total_sqft"),
    ("negative area", {**FLAT, "total_sqft": -500}, "total_sqft"),
    ("absurd area", {**FLAT, "total_sqft": 1e12}, "total_sqft"),
    ("bhk 0", {**FLAT, "bhk": 0}, "bhk"),
    ("bhk 100", {**FLAT, "bhk": 100}, "bhk"),
    ("fractional bhk", {**FLAT, "bhk": 2.5}, "bhk"),
    ("bath 0", {**FLAT, "bath": 0}, "bath"),
    ("unknown location", {**FLAT, "location": "Atlantis"}, "location"),
    ("empty location", {**FLAT, "location": "  "}, "location"),
]


@pytest.mark.parametrize("case,body,field", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_field(fleet, case, body, field):
    r = requests.post(f"{fleet.router_url}{PREDICT}", json=body, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["field"] == field and field in r.json()["error"]


@pytest.mark.parametrize("raw,field", [
    ('{"location": "Indira Nagar", "total_sqft": NaN, "bhk": 2, "bath": 2}', "total_sqft"),
    ('{"location": "Indira Nagar", "total_sqft": Infinity, "bhk": 2, "bath": 2}', "total_sqft"),
    ('{"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": -Infinity}', "bath"),
    ("this is not json", "body"),
    ('["a", "list"]', "body"),
], ids=["nan", "infinity", "minus-infinity", "not-json", "json-list"])
def test_non_finite_numbers_and_non_json_bodies_are_refused(fleet, raw, field):
    r = requests.post(f"{fleet.router_url}{PREDICT}", data=raw, headers={"Content-Type": "application/json"}, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["field"] == field


def test_ten_megabyte_body_is_refused_with_json(fleet):
    r = requests.post(f"{fleet.router_url}{PREDICT}", data=b"x" * 10_000_000, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["field"] == "body"


def test_form_fields_are_accepted(fleet):
    r = requests.post(f"{fleet.router_url}{PREDICT}", data={k: str(v) for k, v in FLAT.items()}, timeout=10)
    assert r.status_code == 200 and r.json()["estimated_price"] > 0


def test_every_response_names_variant_and_version(fleet):
    for path in ("/api/health", "/api/get_location_names"):
        r = requests.get(f"{fleet.router_url}{path}", headers={"X-User-Id": "headers"}, timeout=10)
        assert r.headers["X-Variant"] in ("production", "candidate") and r.headers["X-Model-Version"]
    r = requests.post(f"{fleet.router_url}{PREDICT}", json={}, timeout=10)
    assert r.headers["X-Variant"] and r.headers["X-Model-Version"]


def test_with_the_candidate_stopped_requests_still_succeed(fleet):
    from abfleet import procs, stack

    svc = next(s for s in stack.services(fleet.settings) if s.name == "candidate")
    pid = stack.running_pid(fleet.settings, svc)
    assert pid is not None
    procs.stop(pid)
    try:
        users = [f"failover-{i}" for i in range(200)]
        answers = _parallel(lambda u: requests.post(f"{fleet.router_url}{PREDICT}", json=FLAT, headers={"X-User-Id": u}, timeout=20), users)
        assert [a.status_code for a in answers] == [200] * len(users)
        assert {a.headers["X-Variant"] for a in answers} == {"production"}
    finally:
        stack.up(fleet.settings, say=lambda _m: None)
        wait_for(lambda: fleet.serving("candidate") == fleet.versions["candidate"], 60, what="candidate back")


def test_down_then_up_serves_the_same_versions_and_keeps_the_store(fleet):
    from abfleet import stack

    before = fleet.store.count_predictions()
    assert before > 0
    stopped = stack.down(fleet.settings, say=lambda _m: None)
    assert set(stopped) >= {"mlflow", "production", "candidate", "router"}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{fleet.router_url}/api/health", timeout=2)
    state = stack.up(fleet.settings, say=lambda _m: None)
    assert state["aliases"] == fleet.versions
    for variant in ("production", "candidate"):
        wait_for(lambda: fleet.serving(variant) == fleet.versions[variant], 60, what=f"{variant} after up")
    assert fleet.store.count_predictions() == before
    r = requests.post(f"{fleet.router_url}{PREDICT}", json=FLAT, headers={"X-User-Id": "after-restart"}, timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == fleet.versions[r.headers["X-Variant"]]


def test_up_is_idempotent_and_status_reports_everything(fleet):
    from abfleet import stack

    pids = {name: p["pid"] for name, p in stack.status(fleet.settings)["processes"].items()}
    state = stack.up(fleet.settings, say=lambda _m: None)
    assert {name: p["pid"] for name, p in state["processes"].items()} == pids
    assert all(p["healthy"] for p in state["processes"].values()), state["processes"]
    assert state["weights"] == {"production": 80, "candidate": 20}
    assert state["aliases"] == fleet.versions
