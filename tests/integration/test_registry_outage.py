"""MLflow killed under load: both servers keep answering with the models they hold while their
watchers fail to reach the registry, and a promotion made after MLflow returns is picked up
(by the reload call and by the watchers) without one failed request. The stack is the
test's own: killing its MLflow disturbs nothing else."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from abfleet import api, data, fleet, procs, registry, stack
from abfleet.load import realistic_rows
from tests.helpers import Load, fleet_settings, health, wait_for

pytestmark = pytest.mark.slow
RELOAD_S = 1.0


def served(url: str, n: int = 12) -> set[str]:
    """The X-Model-Version headers of `n` predictions sent straight to one server (its workers in turn)."""
    seen = set()
    for i in range(n):
        r = requests.post(f"{url}{api.PREDICT}", json={**api.FLAT, "bhk": 1 + i % 4}, timeout=20)
        assert r.status_code == 200, r.text
        seen.add(r.headers["X-Model-Version"])
    return seen


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory, synth_csv):
    from abfleet import train

    folder = tmp_path_factory.mktemp("registry-outage")
    settings = fleet_settings(folder / "run", reload_interval=RELOAD_S)
    stack.up(settings, only=("mlflow", "production", "candidate", "router"), say=lambda _m: None)
    try:
        other = folder / "candidate.csv"
        data.write_raw(data.synth(6000, seed=2), other)
        versions = {"production": train.train(settings, synth_csv, alias="production", seed=0)["version"],
                    "candidate": train.train(settings, other, alias="candidate", seed=1)["version"]}
        for variant, version in versions.items():
            wait_for(lambda: health(settings.server_url(variant)).get("model_version") == version, 60,
                     what=f"{variant} to serve version {version}")
        yield settings, versions
    finally:
        stack.down(settings, say=lambda _m: None)


def test_mlflow_killed_servers_keep_their_models_and_pick_up_a_later_promotion(own_stack):
    settings, versions = own_stack
    urls = {variant: settings.server_url(variant) for variant in versions}
    [mlflow] = [s for s in stack.services(settings) if s.name == "mlflow"]
    pid = stack.running_pid(settings, mlflow)
    assert pid is not None
    with Load(settings.router_url, realistic_rows(300, seed=5)) as load:
        time.sleep(2)
        os.killpg(pid, signal.SIGKILL)  # the CLI and its web server: the whole registry is gone
        wait_for(lambda: not procs.answers_http(mlflow.health_url, any_answer=True), 30, what="MLflow to be gone")
        load.versions.clear()
        time.sleep(8 * RELOAD_S)  # many watcher rounds, each failing to reach the registry
        for variant, url in urls.items():
            assert health(url).get("model_version") == versions[variant], health(url)
            assert served(url) == {versions[variant]}
        during = set(load.versions)
        logs = {v: (settings.run_dir / "logs" / f"{v}.log").read_text(errors="replace") for v in urls}
        stack.up(settings, only=("mlflow",), say=lambda _m: None)
        assert registry.aliases(settings) == versions  # the registry's state survived the kill

        registry.promote(settings, ["promoted while testing a registry outage"], "test",
                         candidate=versions["candidate"], production=versions["production"])
        reloaded = fleet.reload_servers(settings)
        new = versions["candidate"]
        # The candidate server falls back to production's model: now the promoted version.
        header = {"production": new, "candidate": f"{new} (fallback: production)"}
        for variant, url in urls.items():
            wait_for(lambda: health(url).get("model_version") == new, 30, what=f"{variant} to serve version {new}")
            # Every worker, not only the one the reload call reached: a few rounds of answers.
            wait_for(lambda: served(url) == {header[variant]}, 30, what=f"every {variant} worker to serve {header[variant]}")
        time.sleep(2)
    assert load.failed == 0, f"{load.failed} of {load.sent} requests failed: {load.failures[:5]}"
    assert load.sent > 100, load.sent
    assert during == {("production", versions["production"]), ("candidate", versions["candidate"])}, during
    for variant, text in logs.items():
        assert "model refresh failed" in text, f"the {variant} watcher never met the outage"
    assert all(answer.startswith("200") for answer in reloaded.values()), reloaded
