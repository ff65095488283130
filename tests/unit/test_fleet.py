"""The fleet's facts and actions: one home for the router's weight, the admin token's
sources, the servers' reload and the webhook."""

from __future__ import annotations

from abfleet import fleet
from abfleet.fleet_state import FleetStateCollector
from abfleet.metrics import DECISIONS, ROUTER_CANDIDATE_WEIGHT
from abfleet.settings import Settings
from abfleet.store import open_store
from tests.helpers import answering, free_port


def test_the_weight_is_the_stores_row_else_the_settings(tmp_path):
    settings = Settings(run_dir=tmp_path, candidate_weight=35)
    assert fleet.candidate_weight(settings) == 35  # nothing recorded: the configured weight
    fleet.set_candidate_weight(settings, 10)
    assert fleet.candidate_weight(settings) == 10
    assert fleet.candidate_weight(settings.replace(candidate_weight=90)) == 10
    assert fleet.weights(10) == {"production": 0.9, "candidate": 0.1}


def test_the_admin_token_comes_from_settings_or_the_file_settings_name(tmp_path):
    assert fleet.admin_token(Settings(run_dir=tmp_path)) is None
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    assert fleet.admin_token(Settings(run_dir=tmp_path, admin_token_file=str(secret))) == "from-a-file"
    (tmp_path / "admin-token").write_text("local")
    assert fleet.admin_token(Settings(run_dir=tmp_path)) == "local"
    assert fleet.admin_token(Settings(run_dir=tmp_path, admin_token="set")) == "set"


def test_without_a_token_the_reload_is_reported_as_skipped(tmp_path):
    settings = Settings(run_dir=tmp_path, reload_interval=9, production_url=f"http://127.0.0.1:{free_port()}")
    out = fleet.reload_servers(settings)
    assert set(out) == {"production", "candidate"}
    assert all(v.startswith("skipped (no admin token") and "within 9s" in v for v in out.values())


def exported_by(collector: FleetStateCollector) -> dict:
    """What a scrape gets from `collector` after one refresh from the store."""
    assert collector.refresh()
    return {f.name: f for f in collector.collect()}


def test_the_production_server_exports_the_recorded_weight_else_the_configured_one(tmp_path):
    with open_store(Settings(run_dir=tmp_path)) as store:
        exported = exported_by(FleetStateCollector(store, fallback_weight=15))
        assert exported[ROUTER_CANDIDATE_WEIGHT].samples[0].value == 15.0
        assert {s.labels["decision"] for s in exported[DECISIONS.removesuffix("_total")].samples} == {
            "promote", "rollback", "continue"}
        store.set_state("candidate_weight", 40)
        exported = exported_by(FleetStateCollector(store, fallback_weight=15))
        assert exported[ROUTER_CANDIDATE_WEIGHT].samples[0].value == 40.0
    (tmp_path / "fresh").mkdir()
    with open_store(Settings(run_dir=tmp_path / "fresh")) as store:
        assert ROUTER_CANDIDATE_WEIGHT not in exported_by(FleetStateCollector(store))


def test_webhook_receives_the_decision_and_a_dead_one_is_not_fatal():
    with answering(204) as (url, seen):
        settings = Settings(webhook_url=f"{url}/hook")
        assert fleet.notify(settings, {"decision": "rollback", "reasons": ["worse"]}) == "204"
    assert [r["json"] for r in seen] == [{"source": "abfleet", "decision": "rollback", "reasons": ["worse"]}]
    dead = Settings(webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    assert fleet.notify(dead, {"decision": "promote"}).startswith("failed")
    assert fleet.notify(Settings(), {"decision": "promote"}) is None


def test_reload_goes_to_the_configured_server_urls_with_the_token(tmp_path):
    with answering(200, {"swapped": True, "model_version": "9"}) as (url, seen):
        env = {"ABFLEET_PRODUCTION_URL": f"{url}/", "ABFLEET_CANDIDATE_URL": f"http://127.0.0.1:{free_port()}",
               "ABFLEET_ADMIN_TOKEN": "s3cret"}
        settings = Settings.from_env(env, run_dir=tmp_path, reload_interval=7)
        out = fleet.reload_servers(settings)
    assert [(r["path"], r["authorization"]) for r in seen] == [("/api/admin/reload", "Bearer s3cret")]
    assert out["production"] == "200 9"
    assert out["candidate"].startswith("not reached") and "within 7s" in out["candidate"]
    assert Settings(production_port=6101).server_url("production") == "http://127.0.0.1:6101"


def names(collector: FleetStateCollector) -> set[str]:
    return {f.name for f in collector.collect()}


def test_one_replica_exports_the_fleet_state_and_another_takes_over_when_its_lease_ends(tmp_path):
    import time

    from abfleet.fleet_state import LEASE_KEY, claim_lease

    with open_store(Settings(run_dir=tmp_path)) as store:
        first, second = (FleetStateCollector(store, owner=f"host-{x}/1", interval=5.0) for x in "ab")
        assert first.refresh() and second.refresh()  # both read the store; one holds the lease
        assert DECISIONS.removesuffix("_total") in names(first)
        assert names(second) == set(), "a second replica exported the fleet's state too"
        # Every worker of the owning replica serves it: a scrape may reach any of them.
        sibling = FleetStateCollector(store, owner="host-a/1", interval=5.0)
        assert sibling.refresh() and names(sibling) == names(first)
        assert claim_lease(store, "host-b/1", 15.0)["owner"] == "host-a/1"
        # host-a dies: nobody renews its lease, which runs out; host-b takes over at its next refresh.
        store.set_state(LEASE_KEY, {"owner": "host-a/1", "until": time.time() - 1})
        assert second.refresh() and DECISIONS.removesuffix("_total") in names(second)
        # host-a comes back (or was only slow): it finds the lease taken and stops exporting.
        assert first.refresh() and names(first) == set()


def test_the_last_decision_and_the_experiment_are_exported(tmp_path):
    from abfleet import metrics as m

    details = {"since": "2026-03-01T10:00:00+00:00", "blind": True, "problems": ["Prometheus at x unreachable: ConnectionError"],
               "checks": {"min_samples": {"requests": {"production": 400, "candidate": 90}, "ratings": {"production": 12,
                                          "candidate": None}, "min_requests": 50, "min_ratings": 10},
                          "srm": {"status": "pass", "p_value": 0.42}}}
    with open_store(Settings(run_dir=tmp_path)) as store:
        store.record_decision("rollback", "manual", True, ["manual rollback: latency"], {}, "3", "4")
        store.record_decision("continue", "dag", False, ["not enough star ratings yet: candidate=None"], details, "3", "5")
        store.set_state("drift_summary", {"checked_at": "2026-03-02T06:00:00+00:00", "drift_detected": False,
                                          "share_drifted": 0.0, "columns": {}})
        exported = exported_by(FleetStateCollector(store))

    def values(name):
        return {tuple(sorted(s.labels.items())): s.value for s in exported[name].samples}

    (info,) = exported[m.LAST_DECISION_INFO].samples
    assert info.value == 1.0 and info.labels == {
        "decision": "continue", "source": "dag", "applied": "false", "production_version": "3", "candidate_version": "5",
        "reason": "not enough star ratings yet: candidate=None"}
    assert values(DECISIONS.removesuffix("_total"))[(("decision", "continue"),)] == 1.0
    assert values(m.EVALUATION_BLIND) == {(): 1.0}
    assert values(m.LAST_DECISION_PROBLEMS) == {(): 1.0}
    assert values(m.EXPERIMENT_START) == {(("candidate_version", "5"),): 1772359200.0}
    assert values(m.EXPERIMENT_SAMPLES) == {
        (("measure", "requests"), ("variant", "production")): 400.0, (("measure", "requests"), ("variant", "candidate")): 90.0,
        (("measure", "ratings"), ("variant", "production")): 12.0}
    assert values(m.EXPERIMENT_MIN_SAMPLES) == {(("measure", "requests"),): 50.0, (("measure", "ratings"),): 10.0}
    assert values(m.SRM_P_VALUE) == {(): 0.42}
    assert values(m.DRIFT_CHECKED) == {(): 1772431200.0}


def test_the_registry_aliases_are_exported_and_unknown_while_the_registry_fails(tmp_path):
    from abfleet import metrics as m

    answers = iter([{"production": "3", "candidate": "7"}, RuntimeError("registry down"), {"production": "7", "candidate": None}])

    def aliases():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with open_store(Settings(run_dir=tmp_path)) as store:
        collector = FleetStateCollector(store, aliases=aliases)

        def exported():
            collector.refresh_aliases()  # what the collector's own thread does every aliases_every
            assert collector.refresh()
            return {tuple(sorted(s.labels.items())) for f in collector.collect() if f.name == m.REGISTRY_ALIAS
                    for s in f.samples}

        assert exported() == {(("alias", "candidate"), ("model_version", "7")), (("alias", "production"), ("model_version", "3"))}
        assert exported() == set()  # the registry did not answer: no claim about it
        assert exported() == {(("alias", "production"), ("model_version", "7"))}  # no @candidate after a promotion
