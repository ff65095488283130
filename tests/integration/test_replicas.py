"""`abfleet up --replicas 2` on a PostgreSQL of the test's own: two gunicorn servers per
variant behind one router, each scraped by Prometheus on its own. A rating sent to the other
replica right after its prediction is accepted; one reload call moves all four servers (every
worker of each) to a promoted version; a replica killed with SIGKILL is named by the
evaluation, and the ratings it counted before it died are still counted."""

from __future__ import annotations

import itertools
import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from abfleet import data, evaluation, fleet, model, registry, stack, train
from abfleet.api import FEEDBACK, HEALTH, PREDICT, acceptable_rows
from tests.helpers import fleet_settings, free_port, wait_for
from tests.pg import postgres_server

pytestmark = pytest.mark.slow
SMALL = model.ModelParams(max_iter=30)
PAIRS = 320


@pytest.fixture(scope="module")
def fleet4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    with postgres_server() as pg:
        ports = {v: [free_port(), free_port()] for v in ("production", "candidate")}
        # The servers never re-read the registry by themselves during the test: what moves
        # them is the reload call (or a worker that has no model yet, once a second).
        settings = fleet_settings(folder / "run", replicas=2, database_url=pg.url, reload_interval=600.0,
                                  production_ports=",".join(map(str, ports["production"])),
                                  candidate_ports=",".join(map(str, ports["candidate"])))
        # Both models registered before the servers start: each worker loads its own at start.
        stack.up(settings, only=("mlflow",), say=lambda _m: None)
        try:
            csv = folder / "rows.csv"
            data.write_raw(data.synth(2000, seed=21), csv)
            versions = {"production": train.train(settings, csv, alias="production", params=SMALL)["version"],
                        "candidate": train.train(settings, csv, alias="candidate", params=SMALL, seed=1)["version"]}
            stack.up(settings, say=lambda _m: None)
            servers = {name: settings.local_url(port) for v in ports
                       for name, port in zip(settings.replica_names(v), settings.replica_ports(v))}
            wait_for(lambda: all(serving(url) == {versions[name.split("-")[0]]} for name, url in servers.items()),
                     90, 0.5, what="all four servers (every worker) to load their models")
            rows = acceptable_rows(data.clean(data.synth(800, seed=22)).frame, data.known_locations()).to_dict("records")
            yield settings, versions, servers, rows
        finally:
            stack.down(settings, say=lambda _m: None)


def serving(url: str, asks: int = 12) -> set[str | None]:
    """The versions a server's workers report on /api/health over `asks` requests."""
    seen = set()
    for _ in range(asks):
        try:
            seen.add(requests.get(f"{url}{HEALTH}", timeout=5).json().get("model_version"))
        except (requests.RequestException, ValueError):
            seen.add(None)
    return seen


def prometheus_value(settings, expr: str) -> float | None:
    r = requests.get(f"{settings.local_url(settings.prometheus_port)}/api/v1/query", params={"query": expr}, timeout=5)
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_the_stack_runs_two_servers_per_variant_behind_one_router(fleet4):
    settings, versions, servers, _rows = fleet4
    state = stack.status(settings)
    assert [n for n in state["processes"] if n.startswith(("production", "candidate"))] == list(servers)
    assert all(state["processes"][n]["healthy"] for n in servers)
    upstream = (settings.run_dir / "nginx.conf").read_text().split("upstream candidate {", 1)[1].split("}", 1)[0]
    assert all(f"server {url.removeprefix('http://')} max_fails" in upstream for n, url in servers.items() if "candidate" in n)
    # Prometheus scrapes each replica as its own target, labelled with its variant and name.
    wait_for(lambda: prometheus_value(settings, 'count(up{fleet_variant=~"production|candidate"} == 1)') == 4, 60, 1.0,
             what="Prometheus to scrape the four servers")
    assert prometheus_value(settings, 'count(up{fleet_variant="candidate",replica="candidate-2"} == 1)') == 1


def test_a_rating_sent_to_the_other_replica_right_after_its_prediction_is_accepted(fleet4):
    settings, versions, servers, rows = fleet4
    pairs = [(v, i) for i, v in zip(range(PAIRS), itertools.cycle(("production", "candidate")))]

    def one(pair) -> tuple[int, int, str]:
        variant, i = pair
        first, second = (f"{variant}-1", f"{variant}-2") if i % 4 < 2 else (f"{variant}-2", f"{variant}-1")
        user, row = f"u-{uuid.uuid4().hex[:12]}", rows[i % len(rows)]
        p = requests.post(f"{servers[first]}{PREDICT}", json={k: row[k] for k in data.FEATURES},
                          headers={"X-User-Id": user}, timeout=20)
        assert p.status_code == 200, p.text
        f = requests.post(f"{servers[second]}{FEEDBACK}", headers={"X-User-Id": user}, timeout=20,
                          json={"prediction_id": p.json()["prediction_id"], "feedback_type": "rating",
                                "feedback_value": 1 + i % 5})
        return f.status_code, i, f.text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, pairs))
    refused = [(i, text) for status, i, text in answers if status != 201]
    assert refused == [], refused[:5]
    assert len(answers) == PAIRS


def ratings_total(record: dict, variant: str) -> int | None:
    counts = (record["stats"] or {}).get("variants", {}).get(variant, {}).get("ratings")
    return None if counts is None else sum(counts.values())


def test_a_killed_replica_is_named_by_the_evaluation_and_its_ratings_still_count(fleet4):
    settings, versions, servers, _rows = fleet4
    sent = PAIRS // 2  # the ratings the candidate's two replicas counted in the previous test
    expr = f'sum(abfleet_ratings_total{{variant="candidate",model_version="{versions["candidate"]}"}})'
    wait_for(lambda: prometheus_value(settings, expr) == sent, 60, 1.0, what="Prometheus to scrape every rating")
    before = evaluation.evaluate(settings, dry_run=True, source="test")
    assert ratings_total(before, "candidate") == sent, before["stats"]
    assert before["checks"]["replicas"]["candidate"] == {"expected": 2, "scraped": 2, "missing": []}

    victim = next(s for s in stack.services(settings) if s.name == "candidate-2")
    pid = stack.running_pid(settings, victim)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # the replica's master and its workers, mid-experiment
    wait_for(lambda: prometheus_value(settings, 'up{replica="candidate-2"}') == 0, 60, 1.0,
             what="Prometheus to find candidate-2 down")
    after = evaluation.evaluate(settings, dry_run=True, source="test")
    assert after["checks"]["replicas"]["candidate"] == {"expected": 2, "scraped": 1, "missing": ["candidate-2"]}
    assert after["checks"]["replicas"]["production"]["missing"] == []
    assert any("candidate-2" in reason for reason in after["reasons"]), after["reasons"]
    assert after["decision"] != "promote"
    # What the dead replica counted before it died is still in the numbers.
    assert ratings_total(after, "candidate") == sent, after["stats"]

    # `up` starts what is missing: the replica comes back, and the fleet is whole again.
    stack.up(settings, say=lambda _m: None)
    wait_for(lambda: serving(servers["candidate-2"]) == {versions["candidate"]}, 60, 0.5, what="candidate-2 back")


def test_a_promotion_reaches_all_four_servers_with_one_reload(fleet4):
    settings, versions, servers, _rows = fleet4
    old, new = versions["production"], versions["candidate"]
    assert all(serving(url) == {old if name.startswith("production") else new} for name, url in servers.items())
    registry.promote(settings, ["test"], "test", candidate=new, production=old)
    assert all(serving(url, 6) == {old} for name, url in servers.items() if name.startswith("production"))  # not yet
    out = fleet.reload_servers(settings)
    answered = {"production": f"200 {new} (2/2 workers)", "candidate": f"200 {new} (fallback: production) (2/2 workers)"}
    for variant, each in answered.items():
        assert out[variant].startswith("2/2 replicas reached: "), out
        assert out[variant].count(each) == 2, out
    # Right after the one call, every worker of every server serves the promoted version (the
    # candidate's servers fall back to @production, which is now that version).
    assert {name: serving(url) for name, url in servers.items()} == {name: {new} for name in servers}
