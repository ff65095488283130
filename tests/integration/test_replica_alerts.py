"""`abfleet up --replicas 2` on a PostgreSQL of the test's own, watched as an on-call engineer
would: the fleet's state is exported once whatever the replicas (decisions counted once,
the drift alert fires once) and moves to the other production replica when its exporter
dies; an evaluation that cannot read Prometheus raises AbfleetEvaluationBlind; the candidate's
servers killed, AbfleetVariantDown reaches the webhook through Alertmanager while the alerts
it mutes (each server's TargetDown, the variant's ReplicasMissing) do not.

One stack for the module: MLflow with one small model as both @production and @candidate,
two servers per variant, nginx, Alertmanager and Prometheus, with short scrape and
evaluation intervals, the alerts' `for:` and Alertmanager's grouping waits shortened
(tests/alerting.py) and the servers' fleet-state refresh every second (its lease lasts three). The tests run in order: the last
two kill servers.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from abfleet import data, evaluation, metrics, model, registry, stack, train
from abfleet.store import Store
from tests.alerting import alert_posts, speed_up_alertmanager, speed_up_prometheus
from tests.dashboards import dashboard_queries
from tests.helpers import answering, fleet_settings, free_port, wait_for
from tests.pg import postgres_server

pytestmark = pytest.mark.slow

# Shortened `for:`. The order matters as it does with the real ones: AbfleetVariantDown fires
# before the alerts it mutes reach Alertmanager, and AbfleetTargetDown before the
# AbfleetReplicasMissing it mutes.
SHORTEN = {"AbfleetVariantDown": "1s", "AbfleetTargetDown": "6s", "AbfleetReplicasMissing": "12s",
           "AbfleetEvaluationBlind": "1s", "AbfleetDriftDetected": "1s"}
# What the production replica holding the lease exports (abfleet/fleet_state.py).
FLEET_SERIES = (metrics.DECISIONS, metrics.LAST_EVALUATION, metrics.LAST_DECISION_INFO, metrics.EVALUATION_BLIND,
                metrics.ROUTER_CANDIDATE_WEIGHT, metrics.DRIFT_DETECTED, metrics.REGISTRY_ALIAS)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replica-alerts")
    (folder / "rules").mkdir()
    with postgres_server() as pg, answering(200) as (url, seen):
        ports = {v: [free_port(), free_port()] for v in ("production", "candidate")}
        # One gunicorn worker per server: what is tested here is per replica (the lease's
        # siblings are tests/unit/test_fleet.py's), and four servers boot faster so.
        settings = fleet_settings(folder / "run", replicas=2, workers=1, database_url=pg.url, db_check_interval_s=1.0,
                                  webhook_url=f"{url}/alerts", watchdog_url=f"{url}/watchdog",
                                  production_ports=",".join(map(str, ports["production"])),
                                  candidate_ports=",".join(map(str, ports["candidate"])))
        try:
            stack.up(settings, only=("mlflow",), say=lambda _m: None)
            # The model is trained while the servers boot (they load it once it is registered).
            with ThreadPoolExecutor(1) as pool:
                trained = pool.submit(register_a_model, settings, folder / "rows.csv")
                stack.up(settings, say=lambda _m: None)
                trained.result()
            speed_up_alertmanager(settings)
            speed_up_prometheus(settings, folder / "rules", SHORTEN)
            wait_for(lambda: value(settings, 'count(up{fleet_variant=~"production|candidate"} == 1)') == 4, 60, 0.5,
                     what="Prometheus to scrape the four servers")
            store = Store(pg.url)
            yield settings, seen, store
            store.close()
        finally:
            stack.down(settings, say=lambda _m: None)


def register_a_model(settings, csv) -> None:
    """One small model as @production and @candidate: an experiment to evaluate, for one training."""
    data.write_raw(data.synth(1500, seed=31), csv)
    version = train.train(settings, csv, alias="production", params=model.ModelParams(max_iter=20))["version"]
    registry.set_alias(settings, "candidate", version)


def query(settings, expr: str) -> list[dict]:
    r = requests.get(f"{settings.local_url(settings.prometheus_port)}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def value(settings, expr: str) -> float | None:
    result = query(settings, expr)
    return float(result[0]["value"][1]) if result else None


def exporters(settings) -> dict[str, set[str]]:
    """Fleet-state metric name → the replicas exporting it now."""
    out: dict[str, set[str]] = {}
    names = "|".join(FLEET_SERIES)
    for r in query(settings, f'group by (__name__, replica) ({{__name__=~"{names}"}})'):
        out.setdefault(r["metric"]["__name__"], set()).add(r["metric"]["replica"])
    return out


def decision_panel(settings) -> dict[str, float]:
    (panel,) = [q for q in dashboard_queries() if q.panel == "Decisions (in range)"]
    return {r["metric"]["decision"]: float(r["value"][1]) for r in query(settings, panel.expr)}


def firing(settings, alert: str) -> list[dict]:
    return query(settings, f'ALERTS{{alertname="{alert}", alertstate="firing"}}')


def test_the_fleet_state_is_exported_once_with_two_production_replicas(live):
    settings, seen, store = live
    assert value(settings, 'count(up{fleet_variant="production"} == 1)') == 2  # both replicas scraped
    for decision in ("continue", "continue", "rollback"):
        store.record_decision(decision, "test", False, [f"{decision} for the test"], {}, "1", "1")
    store.set_state("drift_summary", {"drift_detected": True, "share_drifted": 0.5, "drifted_columns": ["bhk"],
                                      "columns": {"bhk": {"score": 0.01}}, "checked_at": "2026-01-01T00:00:00+00:00"})
    wait_for(lambda: value(settings, f'sum({metrics.DECISIONS}{{decision="continue"}})') == 2, 30, 0.5,
             what="Prometheus to scrape the decisions")
    wait_for(lambda: set(FLEET_SERIES) <= set(exporters(settings)), 30, 0.5, what="every fleet-state series")
    by_name = exporters(settings)
    assert all(len(replicas) == 1 for replicas in by_name.values()), by_name
    assert len(set().union(*by_name.values())) == 1, f"the fleet's state comes from two replicas: {by_name}"
    assert value(settings, f"sum({metrics.DECISIONS})") == 3
    # The dashboard's decisions panel: each decision once.
    wait_for(lambda: {k: round(v) for k, v in decision_panel(settings).items()} == {"continue": 2, "rollback": 1,
                                                                                  "promote": 0}, 30, 0.5,
             what="the decisions panel to show 2 continue and 1 rollback")
    # The drift alert fires once, and reaches the webhook once.
    wait_for(lambda: firing(settings, "AbfleetDriftDetected"), 30, 0.5, what="AbfleetDriftDetected to fire")
    assert len(firing(settings, "AbfleetDriftDetected")) == 1
    posts = wait_for(lambda: alert_posts(seen, "AbfleetDriftDetected"), 30, 0.5, what="the drift alert at the webhook")
    assert len([a for a in posts[0]["json"]["alerts"] if a["labels"]["alertname"] == "AbfleetDriftDetected"]) == 1
    # The always-firing Watchdog reaches its own receiver, and only that one.
    wait_for(lambda: alert_posts(seen, "Watchdog", "/watchdog"), 30, 0.5, what="the Watchdog at its receiver")
    assert not alert_posts(seen, "Watchdog")


def test_an_evaluation_that_cannot_read_prometheus_raises_the_blind_alert(live):
    settings, seen, store = live
    blind = settings.replace(prometheus_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    record = evaluation.evaluate(blind, source="test")
    assert record["blind"] is True and record["decision"] == "continue", record
    wait_for(lambda: value(settings, f"max({metrics.EVALUATION_BLIND})") == 1, 30, 0.5,
             what="the blind flag to be exported and scraped")
    posts = wait_for(lambda: alert_posts(seen, "AbfleetEvaluationBlind"), 30, 0.5,
                     what="Alertmanager to POST AbfleetEvaluationBlind to the webhook")
    body = posts[0]["json"]
    assert body["receiver"] == "ticket" and body["status"] == "firing", body
    # The experiment's panels show the decision just recorded.
    wanted = {"Last decision", "Evaluation blind / problems", "Experiment running for", "Last evaluation"}
    for panel in [q for q in dashboard_queries() if q.panel in wanted]:
        assert query(settings, panel.expr), f"{panel.id}: no data\n{panel.expr}"
    info = query(settings, f"max by (decision, source, reason) ({metrics.LAST_DECISION_INFO})")
    assert [r["metric"]["source"] for r in info] == ["test"] and "unreachable" in info[0]["metric"]["reason"], info


def test_the_fleet_state_moves_to_the_other_replica_when_its_exporter_dies(live):
    settings, seen, store = live
    (owner,) = exporters(settings)[metrics.DECISIONS]
    before = len(seen)
    kill(settings, owner)
    (other,) = {n for n in settings.replica_names("production")} - {owner}
    wait_for(lambda: exporters(settings).get(metrics.DECISIONS) == {other}, 30, 0.5,
             what=f"{other} to export the fleet's state once {owner} is gone")
    counts, _ = store.decision_counts()
    assert value(settings, f"sum({metrics.DECISIONS})") == sum(counts.values())
    # The dead server is named by AbfleetTargetDown; its variant's ReplicasMissing is muted.
    wait_for(lambda: alert_posts(seen, "AbfleetTargetDown", since=before, replica=owner), 30, 0.5,
             what=f"AbfleetTargetDown for {owner} at the webhook")
    muted = wait_for(lambda: suppressed(settings, "AbfleetReplicasMissing", fleet_variant="production"), 40, 0.5,
                     what="AbfleetReplicasMissing (production) to fire, muted")
    assert muted[0]["status"]["inhibitedBy"], muted


def test_the_candidates_servers_killed_page_through_alertmanager_and_what_follows_is_muted(live):
    settings, seen, store = live
    started, before = time.monotonic(), len(seen)  # only what follows the kill counts
    for name in settings.replica_names("candidate"):
        kill(settings, name)
    posts = wait_for(lambda: alert_posts(seen, "AbfleetVariantDown", since=before, fleet_variant="candidate"), 120, 0.5,
                     what="Alertmanager to POST AbfleetVariantDown (candidate) to the webhook")
    print(f"\n[replica-alerts] AbfleetVariantDown at the webhook {time.monotonic() - started:.1f}s after the kill")
    body = posts[0]["json"]
    assert body["receiver"] == "page" and body["status"] == "firing", body
    (alert,) = [a for a in body["alerts"] if a["labels"]["alertname"] == "AbfleetVariantDown"]
    assert alert["annotations"]["runbook_url"] == "docs/runbooks/AbfleetVariantDown.md"
    # What follows from it fires too, and Alertmanager holds it back.
    muted = wait_for(lambda: len(suppressed(settings, "AbfleetTargetDown", fleet_variant="candidate")) == 2
                     and suppressed(settings, "AbfleetReplicasMissing", fleet_variant="candidate"), 40, 0.5,
                     what="the candidate's TargetDown (both servers) and ReplicasMissing to fire, muted")
    assert muted
    time.sleep(3)  # a group_wait (2s) and more: what was muted would have been sent by now
    for alert in ("AbfleetTargetDown", "AbfleetReplicasMissing"):
        assert not alert_posts(seen, alert, since=before, fleet_variant="candidate"), f"{alert} (candidate) reached the webhook"


def kill(settings, name: str) -> None:
    """SIGKILL a replica's gunicorn master and its workers."""
    pid = stack.running_pid(settings, next(s for s in stack.services(settings) if s.name == name))
    assert pid is not None, name
    os.killpg(pid, signal.SIGKILL)


def suppressed(settings, alert: str, **labels: str) -> list[dict]:
    """Alertmanager's active `alert`s with these labels that an inhibition mutes."""
    am = settings.local_url(settings.alertmanager_port)
    matchers = [f'alertname="{alert}"', *(f'{k}="{v}"' for k, v in labels.items())]
    found = requests.get(f"{am}/api/v2/alerts", params={"filter": matchers}, timeout=5).json()
    return [a for a in found if a["status"]["state"] == "suppressed"]
