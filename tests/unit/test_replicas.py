"""Several model servers per variant: their ports, names and folders in the local stack, the
router's upstreams and Prometheus's targets, the reload that reaches every worker of every
replica, feedback for a prediction another replica has not inserted yet, and the evaluation's
view of a replica that stopped being scraped (the live check is
tests/integration/test_replicas.py)."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest
import yaml

from abfleet import cli, fleet, monitoring, prometheus, router, stack
from abfleet.feedback import Feedback
from abfleet.reload_signal import ReloadSignal
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from tests.helpers import FixedSamples, answering, fleet_settings, free_port, wait_for

PG = "postgresql://u@127.0.0.1:1/db"


def test_replica_ports_step_past_the_other_variant_or_come_from_the_lists():
    two = Settings(replicas=2)
    assert two.replica_ports("production") == [6001, 6003] and two.replica_ports("candidate") == [6002, 6004]
    listed = Settings(replicas=2, production_ports="7101, 7102", candidate_ports="7201,7202")
    assert listed.replica_ports("candidate") == [7201, 7202]
    assert listed.replica_names("production") == ["production-1", "production-2"]
    one = Settings(production_ports="7101,7102")
    assert one.replica_ports("production") == [6001] and one.replica_names("production") == ["production"]
    with pytest.raises(ValueError, match="ABFLEET_PRODUCTION_PORTS names 1 ports for 2 replicas"):
        Settings.from_env({"ABFLEET_REPLICAS": "2", "ABFLEET_PRODUCTION_PORTS": "7101"})
    with pytest.raises(ValueError, match="ABFLEET_REPLICAS must be at least 1"):
        Settings.from_env({"ABFLEET_REPLICAS": "0"})


def test_every_replicas_url_for_the_reload():
    assert Settings().server_urls("production") == ["http://127.0.0.1:6001"]
    assert Settings(replicas=2).server_urls("candidate") == ["http://127.0.0.1:6002", "http://127.0.0.1:6004"]
    env = {"ABFLEET_PRODUCTION_URLS": "http://a:8000/, http://b:8000", "ABFLEET_CANDIDATE_URL": "http://c:8000"}
    settings = Settings.from_env(env)
    assert settings.server_urls("production") == ["http://a:8000", "http://b:8000"]
    assert settings.server_urls("candidate") == ["http://c:8000"]


def test_one_replica_is_the_stack_as_before(tmp_path):
    settings = fleet_settings(tmp_path)
    servers = stack.server_services(settings)
    assert [(s.name, s.port) for s in servers] == [("production", settings.production_port),
                                                    ("candidate", settings.candidate_port)]
    assert all(set(s.env) == {"VARIANT", "PROMETHEUS_MULTIPROC_DIR"} for s in servers)
    jobs = {j["job_name"]: j for j in yaml.safe_load(monitoring.write_prometheus_config(settings).read_text())["scrape_configs"]}
    assert jobs["production"]["static_configs"] == [{"targets": [f"127.0.0.1:{settings.production_port}"]}]


def test_each_replica_has_its_port_folders_upstream_entry_and_scrape_target(tmp_path):
    ports = {v: [free_port(), free_port()] for v in ("production", "candidate")}
    settings = fleet_settings(tmp_path, replicas=2, database_url=PG, production_ports=",".join(map(str, ports["production"])),
                              candidate_ports=",".join(map(str, ports["candidate"])))
    servers = {s.name: s for s in stack.server_services(settings)}
    assert list(servers) == ["production-1", "production-2", "candidate-1", "candidate-2"]
    second = servers["candidate-2"]
    assert second.port == ports["candidate"][1] and second.health_url.endswith(f":{second.port}/api/health")
    assert second.env == {"VARIANT": "candidate", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics" / "candidate-2"),
                          "ABFLEET_BIND": f"127.0.0.1:{second.port}", "ABFLEET_SPOOL_DIR": str(tmp_path / "spool" / "candidate-2")}
    conf = router.render(settings, production_servers=stack.server_addresses(settings, "production"),
                         candidate_servers=stack.server_addresses(settings, "candidate"))
    upstream = conf.split("upstream production {", 1)[1].split("}", 1)[0]
    assert [f"server 127.0.0.1:{p} max_fails" in upstream for p in ports["production"]] == [True, True]
    assert [f"server 127.0.0.1:{p} backup" in upstream for p in ports["candidate"]] == [True, True]
    jobs = {j["job_name"]: j for j in yaml.safe_load(monitoring.write_prometheus_config(settings).read_text())["scrape_configs"]}
    assert jobs["candidate"]["static_configs"] == [
        {"targets": [f"127.0.0.1:{p}"], "labels": {"replica": f"candidate-{i + 1}"}} for i, p in enumerate(ports["candidate"])]
    assert jobs["candidate"]["relabel_configs"] == [{"target_label": "fleet_variant", "replacement": "candidate"}]


def test_replicas_need_postgresql(tmp_path, capsys, monkeypatch):
    with pytest.raises(stack.StackError, match="--replicas 2 needs a PostgreSQL store: set DATABASE_URL"):
        stack.up(fleet_settings(tmp_path / "run", replicas=2), say=lambda _m: None)
    monkeypatch.setenv("ABFLEET_RUN_DIR", str(tmp_path / "run"))
    assert cli.main(["up", "--replicas", "2"]) == 1
    assert "needs a PostgreSQL store" in capsys.readouterr().err


def test_down_and_status_see_the_replicas_up_started(tmp_path):
    settings = fleet_settings(tmp_path)
    (tmp_path / "replicas").write_text("3\n")
    assert stack.as_started(settings).replicas == 3
    assert [s.name for s in stack.server_services(stack.as_started(settings))][:3] == [
        "production-1", "production-2", "production-3"]
    assert stack.down(settings, say=lambda _m: None) == []


# ---- the reload reaches every worker ---------------------------------------------------

def test_a_reload_signal_makes_a_watcher_reread_the_registry_and_acknowledge(tmp_path):
    signal = ReloadSignal(tmp_path / "server")
    holder = ModelHolder(Settings(run_dir=tmp_path, reload_interval=600.0))
    reads = []

    def refresh() -> bool:
        reads.append(time.monotonic())
        return False

    holder.refresh = refresh  # type: ignore[method-assign]
    holder.version_header = lambda: "5"  # type: ignore[method-assign]
    holder.start_watcher(signal)
    try:
        wait_for(lambda: reads, 10, 0.05, what="the watcher's first read")
        assert signal.current() == ""
        token = signal.bump()
        acks = signal.wait_acks(token, 1, 20.0)
        assert acks == {os.getpid(): "5"} and len(reads) == 2  # re-read once, though reload_interval is 10 min
        assert signal.acks("an older token") == {}
    finally:
        holder.stop_watcher()


def test_acknowledgements_of_dead_workers_do_not_count(tmp_path):
    signal = ReloadSignal(tmp_path)
    token = signal.bump()
    (tmp_path / f"reload.generation.ack.{2 ** 22 + 12345}").write_text(f"{token} 3")  # no such pid
    assert signal.wait_acks(token, 1, 0.3) == {}


def test_the_reload_goes_to_every_replica_and_says_how_many_answered(tmp_path):
    body = {"swapped": True, "model_version": "9", "workers": {"expected": 2, "reached": 2, "versions": ["9"]}}
    with answering(200, body) as (url, seen):
        dead = f"http://127.0.0.1:{free_port()}"
        env = {"ABFLEET_PRODUCTION_URLS": f"{url}/a,{url}/b", "ABFLEET_CANDIDATE_URLS": f"{url}/c,{dead}",
               "ABFLEET_ADMIN_TOKEN": "s3cret"}
        out = fleet.reload_servers(Settings.from_env(env, run_dir=tmp_path))
    assert sorted(r["path"] for r in seen) == ["/a/api/admin/reload", "/b/api/admin/reload", "/c/api/admin/reload"]
    assert out["production"] == f"2/2 replicas reached: {url}/a 200 9 (2/2 workers); {url}/b 200 9 (2/2 workers)"
    assert out["candidate"].startswith(f"1/2 replicas reached: {url}/c 200 9 (2/2 workers); {dead} not reached")


# ---- feedback for a prediction another replica has not inserted yet ---------------------

class LateStore:
    """A store whose prediction appears after `late` looks (it was in another replica's spool)."""

    def __init__(self, late: int | None):
        self.late, self.looks = late, 0

    def get_prediction(self, pid):
        self.looks += 1
        if self.late is None or self.looks <= self.late:
            return None
        return {"id": pid, "user_id": "u", "created_at": dt.datetime.now(dt.timezone.utc)}

    def record_feedback(self, pid, kind, value, received_by, **_kw):
        return {"variant": "production", "model_version": "1", "ape": None, "kind": "rating"}


def rate(store, **settings) -> int:
    feedback = Feedback(store, Settings(spool_linger=0.04, **settings))
    body = {"prediction_id": "a" * 32, "feedback_type": "rating", "feedback_value": 4}
    return feedback.record(body, "u").status


def test_feedback_waits_for_a_prediction_still_in_another_replicas_spool():
    store = LateStore(late=3)
    assert rate(store) == 201 and store.looks == 4
    never = LateStore(late=None)
    assert rate(never, feedback_settle_s=0.3) == 404 and never.looks > 2  # looked again, then gave up
    impatient = LateStore(late=3)
    assert rate(impatient, feedback_settle_s=0) == 404 and impatient.looks == 1


# ---- the evaluation and a replica that stopped being scraped ----------------------------

def test_a_dead_replica_neither_holds_the_instant_back_nor_loses_its_requests():
    # Replica a answers 40/s and is killed at t=1200 (last scrape 1196); b keeps going.
    a = [(float(t), (t - 1000) * 40.0) for t in range(1001, 1200, 5)]
    b = [(float(t), (t - 1000) * 40.0) for t in range(1003, 2000, 5)]
    prom = FixedSamples({"c": {(("instance", "a"),): a, (("instance", "b"),): b}})
    end = prometheus.common_instant(prom, ["c"], now=2000.0)
    assert end == 1998.0  # b's last scrape, not a's from 13 minutes before
    with_a = prometheus.growth_between(prom, "c", 1000.0, end, whole_window=True)
    assert with_a == pytest.approx(40 * 998 + 40 * 196)
    assert prometheus.growth_between(prom, "c", 1000.0, end) == pytest.approx(40 * 998)  # why the flag exists


class Up(prometheus.Prometheus):
    def __init__(self, window: list[dict], now: list[dict]):
        super().__init__("http://prometheus.invalid")
        self.window, self.now = window, now

    def query(self, expr, at=None):
        return self.window if expr.startswith("last_over_time(") else self.now


def up(replica: str, value: str) -> dict:
    return {"metric": {"fleet_variant": "candidate", "replica": replica, "instance": "x"}, "value": [0, value]}


def test_the_replica_check_names_a_killed_and_a_vanished_replica():
    healthy = Up([up("candidate-1", "1"), up("candidate-2", "1")], [up("candidate-1", "1"), up("candidate-2", "1")])
    assert prometheus.replicas(healthy, "candidate", "600s") == {"expected": 2, "scraped": 2, "missing": []}
    killed = Up([up("candidate-1", "1"), up("candidate-2", "0")], [up("candidate-1", "1"), up("candidate-2", "0")])
    assert prometheus.replicas(killed, "candidate", "600s") == {"expected": 2, "scraped": 1, "missing": ["candidate-2"]}
    vanished = Up([up("candidate-1", "1"), up("candidate-2", "1")], [up("candidate-1", "1")])
    assert prometheus.replicas(vanished, "candidate", "600s")["missing"] == ["candidate-2"]
    text = cli._decision_text({"decision": "continue", "reasons": [], "checks": {"replicas": {
        "production": {"expected": 2, "scraped": 2, "missing": []},
        "candidate": {"expected": 2, "scraped": 1, "missing": ["candidate-2"]}}}})
    assert "production 2/2 scraped; candidate 1/2 scraped (not scraped: candidate-2)" in text

