"""`make demo`: the main job on the local stack, from nothing to a serving A/B fleet.

Synthetic data → production and candidate models (production's data published as the first
dataset version, for the training DAG) → `abfleet up` → a few hundred requests through the
router → the URLs and the split it observed. On an interactive terminal the
stack keeps running; otherwise (CI) it is stopped at the end.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from abfleet import api, data, objects, registry, router, stack, train
from abfleet.settings import Settings, in_ci


def say(message: str) -> None:
    print(message, flush=True)


SEEDS = {"production": 1, "candidate": 2}  # the synthetic rows each model is trained on
ROWS = 10_000


def training_csv(settings: Settings, alias: str) -> Path:
    """The raw CSV the demo trains @alias on (written when missing; the same rows every time)."""
    folder = settings.run_dir / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"synth-{alias}-seed{SEEDS[alias]}.csv"
    if not csv.exists():
        data.write_raw(data.synth(ROWS, seed=SEEDS[alias]), csv)
    return csv


def ensure_dataset(settings: Settings) -> str:
    """The first dataset version is production's training data, so that the training DAG
    has something to train on from the start; a store holding versions already is left alone."""
    store = objects.open_store(settings)
    found = objects.dataset_versions(store)
    if found:
        say(f"dataset {found[-1][1]} is in the object store already")
        return found[-1][1]
    key = objects.publish_dataset(store, training_csv(settings, "production"))
    say(f"published production's training data as {key} (what the training DAG trains on)")
    return key


def ensure_models(settings: Settings) -> dict[str, str]:
    """Train production and candidate on synthetic rows unless the registry has them."""
    versions = registry.aliases(settings)
    for alias, seed in SEEDS.items():
        if versions.get(alias):
            say(f"@{alias} is version {versions[alias]} already: not retraining")
            continue
        csv = training_csv(settings, alias)
        say(f"training @{alias} on {csv.name}")
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = train.train(settings, csv, alias=alias, seed=seed, progress=lambda m: say(f"  {m}"))
        versions[alias] = result["version"]
        say(f"  median APE {result['metrics']['median_ape']:.1%} → version {result['version']} @{alias}")
    return versions


def wait_serving(settings: Settings, versions: dict[str, str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    for variant in ("production", "candidate"):
        url = f"{settings.server_url(variant)}{api.HEALTH}"
        while True:
            try:
                # Several answers in a row, on fresh connections: each gunicorn worker loads the
                # model by itself, and one that has it does not speak for the others.
                if all(requests.get(url, timeout=3).json().get("model_version") == versions[variant] for _ in range(6)):
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant} did not load version {versions[variant]} in {timeout:.0f}s")
            time.sleep(0.5)


def drive_traffic(settings: Settings, requests_count: int = 300) -> collections.Counter:
    """Distinct users ask for estimates through the router; every tenth one rates it."""
    router = settings.router_url
    frame = data.clean(data.synth(4 * requests_count, seed=99)).frame
    flats = api.acceptable_rows(frame, data.known_locations()).to_dict("records")

    def ask(i: int) -> tuple[str, int]:
        flat = flats[i % len(flats)]
        body = {k: flat[k] for k in data.FEATURES}
        user = {"X-User-Id": f"demo-{uuid.uuid4().hex[:12]}"}
        r = requests.post(f"{router}{api.PREDICT}", json=body, headers=user, timeout=10)
        if r.status_code == 200 and i % 10 == 0:
            stars = 5 if abs(r.json()["estimated_price"] - flat["price"]) / flat["price"] < 0.2 else 3
            # The same user rates: feedback is accepted only from the user who got the estimate.
            requests.post(f"{router}{api.FEEDBACK}", json={"prediction_id": r.json()["prediction_id"], "feedback_type": "rating", "feedback_value": stars},
                          headers=user, timeout=10)
        return r.headers.get("X-Variant", "none"), r.status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(requests_count)))
    return collections.Counter(f"{variant} {code}" for variant, code in answers)


def main() -> int:
    # 300 requests from many synthetic users, all from this one address: the router's
    # per-address limits are for people, so the demo's stack gets room for them.
    settings = Settings.from_env().replace(**router.ONE_ADDRESS_LIMITS)
    say(f"abfleet demo — run directory {settings.run_dir}")
    say("starting the local stack (MLflow, two model servers, nginx, Prometheus)")
    stack.up(settings, say=say)
    versions = ensure_models(settings)
    ensure_dataset(settings)
    say("waiting for both servers to load their models")
    wait_serving(settings, versions)
    say("sending 300 requests from distinct users through the router")
    counts = drive_traffic(settings)
    ok = {k.split()[0]: v for k, v in counts.items() if k.endswith(" 200")}
    total = sum(counts.values())
    failed = total - sum(ok.values())
    say(f"observed split: production {ok.get('production', 0)} ({ok.get('production', 0) / total:.0%}), "
        f"candidate {ok.get('candidate', 0)} ({ok.get('candidate', 0) / total:.0%}); failed {failed}")
    state = stack.status(settings)
    say(f"versions: production v{versions['production']}, candidate v{versions['candidate']}")
    for name, url in state["urls"].items():
        say(f"  {name:<10} {url}")
    interactive = sys.stdin.isatty() and not in_ci()
    if interactive:
        say("the fleet keeps running: open the router URL; stop it with `make down` (or `.venv/bin/abfleet down`)")
    else:
        say("non-interactive run: stopping the stack")
        stack.down(settings, say=say)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
