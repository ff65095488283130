"""The fleet's facts: one home for the router's weight, and the admin token's sources."""

from __future__ import annotations

from abfleet import fleet
from abfleet.metrics import DECISIONS, ROUTER_CANDIDATE_WEIGHT, FleetStateCollector
from abfleet.settings import Settings
from abfleet.store import open_store
from tests.conftest import free_port


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


def test_the_production_server_exports_the_recorded_weight_else_the_configured_one(tmp_path):
    with open_store(Settings(run_dir=tmp_path)) as store:
        exported = {f.name: f for f in FleetStateCollector(store, fallback_weight=15).collect()}
        assert exported[ROUTER_CANDIDATE_WEIGHT].samples[0].value == 15.0
        assert {s.labels["decision"] for s in exported[DECISIONS.removesuffix("_total")].samples} == {
            "promote", "rollback", "continue"}
        store.set_state("candidate_weight", 40)
        exported = {f.name: f for f in FleetStateCollector(store, fallback_weight=15).collect()}
        assert exported[ROUTER_CANDIDATE_WEIGHT].samples[0].value == 40.0
    (tmp_path / "fresh").mkdir()
    with open_store(Settings(run_dir=tmp_path / "fresh")) as store:
        assert ROUTER_CANDIDATE_WEIGHT not in {f.name for f in FleetStateCollector(store).collect()}
