"""Every Grafana dashboard query runs against the live fleet's Prometheus: it parses, and returns data.

Traffic and feedback are first sent through the router so both variants have requests, latency,
ratings, quick verdicts and actual prices; the test then waits until Prometheus has scraped them.
Pipeline-side gauges (drift, evaluation, decisions, router weight) may not be exported by the stack
yet, and the fault counters labelled by operation or reason have no series before the first fault
(a healthy test fleet has none): a query that only uses such metrics must parse, and must return
data only once all of its metrics exist in Prometheus. Those parse-only queries are reported as
warnings and printed. The other fault metrics (spool backlog, refusals, readiness) exist from a
server's start and must return data.

The query extraction and variable substitution live in tests/dashboards.py.
"""

from __future__ import annotations

import time
import warnings

import pytest
import requests

from abfleet.api import FLAT, PREDICT
from tests.dashboards import DASHBOARD_DIR, ROOT, PanelQuery, ParseOnlyQuery, abfleet_metrics, dashboard_queries

pytestmark = pytest.mark.slow

SCRAPE_WAIT = 60.0  # seconds to wait for Prometheus (scrape interval 5s)

# Written by the pipeline / router side, not by the model servers: may be absent from a fresh stack.
PIPELINE_METRICS = frozenset({
    "abfleet_drift_share_drifted",
    "abfleet_drift_detected",
    "abfleet_drift_column_score",
    "abfleet_last_evaluation_timestamp_seconds",
    "abfleet_decisions_total",
    "abfleet_router_candidate_weight",
    "abfleet_drift_checked_timestamp_seconds",
    "abfleet_last_decision_info",
    "abfleet_last_decision_problems",
    "abfleet_evaluation_blind",
    "abfleet_experiment_start_timestamp_seconds",
    "abfleet_experiment_samples",
    "abfleet_experiment_min_samples",
    "abfleet_srm_p_value",
    "abfleet_registry_alias_info",
})

# Counted per operation / reason when a fault happens: no series on a healthy fleet.
FAULT_METRICS = frozenset({
    "abfleet_store_errors_total",
    "abfleet_feedback_failures_total",
})
MAY_BE_ABSENT = PIPELINE_METRICS | FAULT_METRICS


def prom_query(prom_url: str, expr: str) -> dict:
    """The API's JSON answer (errors included: a parse error is status 'error', errorType 'bad_data')."""
    r = requests.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    try:
        return r.json()
    except ValueError:
        return {"status": "error", "error": f"HTTP {r.status_code}: {r.text[:200]}"}


def metric_names(prom_url: str) -> set[str]:
    r = requests.get(f"{prom_url}/api/v1/label/__name__/values", timeout=10)
    r.raise_for_status()
    return set(r.json()["data"])


def check_query(prom_url: str, query: PanelQuery, existing: set[str]) -> str | None:
    """Run one panel query. Returns None when it parsed and returned data, a parse-only note when its
    pipeline or fault metrics do not exist yet; raises AssertionError otherwise."""
    answer = prom_query(prom_url, query.expr)
    assert answer.get("status") == "success", (
        f"{query.id}: Prometheus rejected the query: {answer.get('errorType')}: {answer.get('error')}\n{query.expr}")
    used = abfleet_metrics(query.expr)
    missing = sorted(used - existing)
    if used and used <= MAY_BE_ABSENT and missing:
        return f"{query.id}: parse-checked only, no series yet: {', '.join(missing)}"
    result = answer["data"]["result"]
    series = len(result) if isinstance(result, list) else 1  # scalar/string results are one value
    assert series >= 1, f"{query.id}: no data (metrics used: {sorted(used)}; missing: {missing})\n{query.expr}"
    return None


# ---- the live fleet ---------------------------------------------------------------------------

def generate_traffic(fleet, users: int = 60, max_users: int = 400) -> dict[str, int]:
    """Predictions and every kind of feedback through the router, until both variants have them."""
    session = requests.Session()
    url = fleet.router_url
    predictions: dict[str, list[tuple[str, str]]] = {"production": [], "candidate": []}
    i = 0
    while i < max_users and (i < users or not all(len(p) >= 3 for p in predictions.values())):
        user = f"dashboards-user-{i}"
        i += 1
        r = session.post(f"{url}{PREDICT}", json=FLAT, headers={"X-User-Id": user}, timeout=10)
        assert r.status_code == 200, f"predict via router: HTTP {r.status_code}: {r.text}"
        predictions[r.headers["X-Variant"]].append((user, r.json()["prediction_id"]))
    assert all(predictions.values()), f"one variant got no traffic from {i} users: " + str(
        {v: len(p) for v, p in predictions.items()})

    for variant, preds in predictions.items():
        for n, (user, prediction_id) in enumerate(preds):
            feedback = [{"feedback_type": "rating", "feedback_value": 3 + n % 3},
                        {"feedback_type": "actual_price", "feedback_value": 100.0},
                        {"feedback_type": "accurate"}]
            for body in feedback:
                r = session.post(f"{url}/api/feedback", json={"prediction_id": prediction_id, **body},
                                 headers={"X-User-Id": user}, timeout=10)
                assert r.status_code == 201, f"feedback {body} via router: HTTP {r.status_code}: {r.text}"
    return {v: len(p) for v, p in predictions.items()}


# Each must return both variants with scraped, non-zero data (the servers create some series at 0
# when a model loads, so a series alone does not prove the traffic has been scraped yet).
READY = [
    f'sum by (variant) (abfleet_requests_total{{endpoint="{PREDICT}"}}) > 0',
    f'sum by (variant) (abfleet_request_latency_seconds_count{{endpoint="{PREDICT}"}}) > 0',
    "sum by (variant) (abfleet_ratings_total) > 0",
    "sum by (variant) (abfleet_quick_feedback_total) > 0",
    "sum by (variant) (abfleet_ape_observations_total) > 0",
    "max by (variant) (abfleet_model_info)",
]
SCRAPE_INTERVAL = 5.0


def wait_until_scraped(prom_url: str, timeout: float = SCRAPE_WAIT) -> None:
    deadline = time.monotonic() + timeout
    pending = list(READY)
    while True:
        pending = [q for q in pending
                   if {s["metric"].get("variant") for s in prom_query(prom_url, q).get("data", {}).get("result", [])}
                   < {"production", "candidate"}]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not pending, f"Prometheus has not scraped both variants within {timeout:.0f}s for: {pending}"


@pytest.fixture(scope="module")
def live_prometheus(fleet) -> tuple[str, set[str]]:
    """Two waves of traffic a few scrapes apart, so rate()/increase() panels see real increments
    (a series whose first scrape already holds the whole burst shows no increase)."""
    prom_url = f"http://{fleet.settings.host}:{fleet.settings.prometheus_port}"
    sent = generate_traffic(fleet)
    print(f"\n[dashboards] predictions sent per variant: {sent}")
    wait_until_scraped(prom_url)
    sent = generate_traffic(fleet)
    print(f"[dashboards] second wave: {sent}")
    time.sleep(2.5 * SCRAPE_INTERVAL)  # scraped at least twice more
    return prom_url, metric_names(prom_url)


QUERIES = dashboard_queries()


def test_dashboards_have_queries():
    assert QUERIES, f"no panel queries found under {DASHBOARD_DIR}"
    assert {q.dashboard for q in QUERIES} >= {"ab-overview.json", "drift.json"}


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_dashboard_query_parses_and_returns_data(live_prometheus, query: PanelQuery):
    prom_url, existing = live_prometheus
    note = check_query(prom_url, query, existing)
    if note:
        print(f"\n[dashboards] PARSE-ONLY {note}")
        warnings.warn(ParseOnlyQuery(f"PARSE-ONLY {note}"), stacklevel=1)


def test_live_prometheus_loaded_the_alert_rules(live_prometheus):
    """The stack's Prometheus found monitoring/rules/*.yml and evaluates them without errors."""
    import yaml

    prom_url, _ = live_prometheus
    expected = {rule["alert"] for path in (ROOT / "monitoring" / "rules").glob("*.yml")
                for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "alert" in rule}
    groups = requests.get(f"{prom_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert expected <= set(loaded), f"alert rules not loaded by the live Prometheus: {sorted(expected - set(loaded))}"
    broken = {name: rule.get("lastError") for name, rule in loaded.items() if rule.get("health") == "err"}
    assert not broken, f"alert rules failing to evaluate: {broken}"


def test_live_prometheus_sends_alerts_to_the_stacks_alertmanager(live_prometheus, fleet):
    """The rendered `alerting:` block: Prometheus knows the local Alertmanager, which answers."""
    prom_url, _ = live_prometheus
    s = fleet.settings
    active = requests.get(f"{prom_url}/api/v1/alertmanagers", timeout=10).json()["data"]["activeAlertmanagers"]
    assert [a["url"] for a in active] == [f"http://{s.host}:{s.alertmanager_port}/api/v2/alerts"], active
    assert requests.get(f"{s.local_url(s.alertmanager_port)}/-/ready", timeout=10).status_code == 200
