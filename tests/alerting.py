"""A running local stack's alerting made fast enough for a test, and what reached the webhook:
shared by tests/integration/test_alerting.py and tests/integration/test_replica_alerts.py.

Prometheus gets 2s scrape and 1s evaluation intervals and the project's own rule files, copied
with only the named alerts' `for:` shortened; Alertmanager keeps the config the stack rendered
(its webhooks included) with every route's group_wait shortened to 2s.
"""

from __future__ import annotations

from pathlib import Path

import requests
import yaml

from abfleet.settings import project_root
from tests.helpers import wait_for


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def speed_up_prometheus(settings, rules_dir: Path, shorten: dict[str, str]) -> None:
    """Rewrite the rendered prometheus.yml: short intervals, the rule files copied with each alert
    of `shorten` (alert name → a `for:` in seconds, "3s") shortened; let Prometheus reload it."""
    path = settings.run_dir / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    # 2s scrapes: a loaded machine answers /metrics within the scrape timeout (the interval).
    config["global"].update(scrape_interval="2s", evaluation_interval="1s")
    found: dict[str, int] = {}
    copies = []
    for source in sorted((project_root() / "monitoring" / "rules").glob("*.yml")):
        rules = yaml.safe_load(source.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in shorten:
                    rule["for"] = shorten[rule["alert"]]
                    found[rule["alert"]] = found.get(rule["alert"], 0) + 1
        copy = rules_dir / source.name
        copy.write_text(yaml.safe_dump(rules, sort_keys=False))
        copies.append(str(copy))
    assert set(found) == set(shorten), f"not in monitoring/rules: {sorted(set(shorten) - set(found))}"
    config["rule_files"] = copies
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    prom = settings.local_url(settings.prometheus_port)
    requests.post(f"{prom}/-/reload", timeout=10).raise_for_status()

    def reloaded():
        groups = requests.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        durations = {}
        for group in groups:
            for rule in group["rules"]:
                if rule["name"] in shorten:
                    durations.setdefault(rule["name"], set()).add(rule.get("duration"))
        return all(durations.get(name) == {_seconds(value)} for name, value in shorten.items())
    wait_for(reloaded, 30, what=f"Prometheus to load the rules with `for:` shortened for {sorted(shorten)}")


def speed_up_alertmanager(settings) -> None:
    """The rendered alertmanager.yml with a 2s group_wait and group_interval on every route,
    reloaded by the running Alertmanager. (An alert that fires again in a group whose earlier
    alert resolved, a scrape that timed out once, say, waits a group_interval, not a group_wait.)"""
    path = settings.run_dir / "alertmanager.yml"
    config = yaml.safe_load(path.read_text())
    hooks = {r["name"]: [c["url"] for c in r.get("webhook_configs", [])] for r in config["receivers"]}
    assert hooks["page"] == hooks["ticket"] == [settings.webhook_url], hooks
    assert hooks["deadmans-switch"] == ([settings.watchdog_url] if settings.watchdog_url else []), hooks
    for route in [config["route"], *config["route"]["routes"]]:
        route.update(group_wait="2s", group_interval="2s")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    am = settings.local_url(settings.alertmanager_port)
    requests.post(f"{am}/-/reload", timeout=10).raise_for_status()
    wait_for(lambda: "group_wait: 2s" in requests.get(f"{am}/api/v2/status", timeout=5).json()["config"]["original"],
             30, what="Alertmanager to load the shortened group_wait")


def alert_posts(seen: list[dict], alert: str, path: str = "/alerts", since: int = 0, **labels: str) -> list[dict]:
    """Alertmanager's webhook POSTs to `path` among the receiver's requests (from the
    `since`-th on) that carry `alert` with these `labels`, when given, and firing."""
    return [r for r in seen[since:] if r["method"] == "POST" and r["json"] and r["path"] == path
            and any(a["labels"].get("alertname") == alert and a.get("status") == "firing"
                    and all(a["labels"].get(k) == v for k, v in labels.items()) for a in r["json"].get("alerts", []))]
