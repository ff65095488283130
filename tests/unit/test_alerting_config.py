"""Alertmanager's config, checked offline: amtool check-config, where each alert is routed
(`amtool config routes test`), what the inhibit rules mute (a model of Alertmanager's matcher
semantics over the shared file), the local stack's rendering with its webhook URLs; and the
runbooks every alert links with its runbook_url."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.monitoring_config import ALERTMANAGER_CONFIG, ROOT, RUNBOOKS, alert_rules, amtool_path, run_tool


# ---- runbooks ---------------------------------------------------------------------------------

def test_every_alert_has_a_runbook_url_to_its_page_in_the_repository():
    """runbook_url is docs/runbooks/<alertname>.md, relative to the repository root, and the file
    exists; no page is left without its alert, and the old README `runbook` anchors are gone."""
    names = set()
    for rule in alert_rules():
        name, annotations = rule["alert"], rule.get("annotations") or {}
        names.add(name)
        url = annotations.get("runbook_url")
        assert url, f"{name}: no runbook_url annotation"
        assert url == f"docs/runbooks/{name}.md", f"{name}: runbook_url {url!r} is not docs/runbooks/{name}.md"
        assert (ROOT / url).is_file(), f"{name}: {url} does not exist"
        assert "runbook" not in annotations, f"{name}: the old `runbook` annotation"
    pages = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == names, f"runbook pages without an alert: {sorted(pages - names)}"
    index = (RUNBOOKS / "README.md").read_text()
    assert not [n for n in names if f"[{n}.md]({n}.md)" not in index], "docs/runbooks/README.md must list every page"


def test_runbooks_say_what_it_means_how_to_confirm_and_the_fix():
    for path in sorted(RUNBOOKS.glob("Abfleet*.md")) + [RUNBOOKS / "Watchdog.md"]:
        text = path.read_text()
        assert text.startswith(f"# {path.stem}\n"), f"{path.name}: title"
        for heading in ("## What it means", "## Confirm", "## Fix"):
            assert heading in text, f"{path.name}: no {heading!r}"


def test_the_readme_runbook_section_is_an_index_of_the_runbook_pages():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Runbook", 1)[1].split("\n## ", 1)[0]
    assert "docs/runbooks/README.md" in section
    assert "### " not in section, "runbook paragraphs belong in docs/runbooks/"


# ---- Alertmanager -----------------------------------------------------------------------------

def test_amtool_check_config_of_the_shared_alertmanager_config():
    r = run_tool(amtool_path(), "check-config", str(ALERTMANAGER_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


# (labels, receiver): what `amtool config routes test` must answer for an alert with those labels.
ROUTES = [
    ({"alertname": "Watchdog", "severity": "info"}, "deadmans-switch"),
    ({"alertname": "AbfleetVariantDown", "severity": "critical", "fleet_variant": "candidate"}, "page"),
    ({"alertname": "AbfleetAvailabilityBudgetBurn", "severity": "critical", "variant": "candidate",
      "long_window": "1h"}, "page"),
    ({"alertname": "AbfleetAvailabilityBudgetBurn", "severity": "warning", "variant": "fleet", "long_window": "1d"},
     "ticket"),
    ({"alertname": "AbfleetSpoolRefusing", "severity": "critical", "fleet_variant": "production"}, "page"),
    ({"alertname": "AbfleetStoreErrors", "severity": "warning", "fleet_variant": "production"}, "ticket"),
    ({"alertname": "AbfleetDriftDetected", "severity": "warning"}, "ticket"),
    ({"alertname": "SomethingNew", "severity": "info"}, "ticket"),
    # No known severity: a mistake in the rules, sent where someone sees it at once.
    ({"alertname": "SomethingNew"}, "page"),
]


@pytest.mark.parametrize("labels,receiver", ROUTES, ids=[f"{l['alertname']}-{l.get('severity')}" for l, _ in ROUTES])
def test_amtool_routes_alerts_by_severity(labels, receiver):
    r = run_tool(amtool_path(), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
             f"--verify.receivers={receiver}", *(f"{k}={v}" for k, v in labels.items()))
    assert r.returncode == 0, f"{labels} -> {r.stdout.strip()} (expected {receiver}) {r.stderr}"
    assert r.stdout.strip() == receiver


def test_every_alert_of_the_rules_is_routed_by_its_severity():
    expected = {"critical": "page", "warning": "ticket", "info": "ticket"}
    amtool = amtool_path()
    for rule in alert_rules():
        labels = {"alertname": rule["alert"], **rule["labels"]}
        receiver = "deadmans-switch" if rule["alert"] == "Watchdog" else expected[labels["severity"]]
        r = run_tool(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
                 *(f"{k}={v}" for k, v in labels.items()))
        assert r.stdout.strip() == receiver, f"{labels} -> {r.stdout.strip()} (expected {receiver}) {r.stderr}"


def test_the_watchdog_is_repeated_often_and_pages_are_not_held_back():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    routes = {route["receiver"]: route for route in config["route"]["routes"]}
    assert routes["deadmans-switch"]["repeat_interval"] == "1m"
    assert routes["deadmans-switch"]["group_interval"] == "1m"
    assert routes["page"]["group_wait"] == "10s"
    assert routes["page"]["group_interval"] == "1m"  # a page that fires again in a live group


_MATCHER = re.compile(r'^\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*$')


def _matches(matchers: list[str], labels: dict[str, str]) -> bool:
    """Alertmanager's matcher semantics for the `name op "value"` form the config uses."""
    for matcher in matchers:
        name, op, value = _MATCHER.match(matcher).groups()
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None, "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def _muted(target: dict[str, str], firing: list[dict[str, str]]) -> bool:
    """Whether Alertmanager's inhibit_rules mute `target` while the `firing` alerts fire."""
    rules = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["inhibit_rules"]
    return any(_matches(rule["target_matchers"], target)
               and any(source is not target and _matches(rule["source_matchers"], source)
                       and all(source.get(n, "") == target.get(n, "") for n in rule.get("equal", []))
                       for source in firing)
               for rule in rules)


def _alert(name: str, **labels: str) -> dict[str, str]:
    return {"alertname": name, **labels}


VARIANT_DOWN = _alert("AbfleetVariantDown", severity="critical", fleet_variant="candidate")
STORE_ERRORS = _alert("AbfleetStoreErrors", severity="warning", fleet_variant="production", instance="a:8000",
                      operation="insert")
PAGE = _alert("AbfleetAvailabilityBudgetBurn", severity="critical", variant="candidate", long_window="1h")
GUARDRAIL = _alert("AbfleetCandidateGuardrail", severity="critical", guardrail="error_ratio", model_version="7")
INHIBITION = [
    # (firing source, target, muted)
    (VARIANT_DOWN, _alert("AbfleetTargetDown", severity="critical", fleet_variant="candidate", instance="b:8000"), True),
    (VARIANT_DOWN, _alert("AbfleetCandidateNotReady", severity="warning", fleet_variant="candidate"), True),
    (VARIANT_DOWN, _alert("AbfleetReplicasMissing", severity="critical", fleet_variant="candidate"), True),
    (_alert("AbfleetTargetDown", severity="critical", fleet_variant="production", instance="b:8000"),
     _alert("AbfleetReplicasMissing", severity="critical", fleet_variant="production"), True),
    (_alert("AbfleetTargetDown", severity="critical", fleet_variant="production", instance="b:8000"),
     _alert("AbfleetReplicasMissing", severity="critical", fleet_variant="candidate"), False),
    (VARIANT_DOWN, _alert("AbfleetCandidateNoTraffic", severity="warning", model_version="7"), True),
    (VARIANT_DOWN, _alert("AbfleetSampleRatioMismatch", severity="warning"), True),
    (VARIANT_DOWN, _alert("AbfleetTargetDown", severity="critical", fleet_variant="production"), False),
    (VARIANT_DOWN, _alert("AbfleetProductionNotReady", severity="critical", fleet_variant="production"), False),
    (VARIANT_DOWN, _alert("AbfleetAvailabilityBudgetBurn", severity="critical", variant="production"), False),
    (VARIANT_DOWN, _alert("AbfleetVariantDown", severity="critical", fleet_variant="production"), False),
    (STORE_ERRORS, _alert("AbfleetFeedbackFailing", severity="warning", fleet_variant="production",
                          instance="a:8000", reason="store"), True),
    (STORE_ERRORS, _alert("AbfleetSpoolBacklogHigh", severity="warning", fleet_variant="production",
                          instance="a:8000"), True),
    (STORE_ERRORS, _alert("AbfleetSpoolNotDraining", severity="warning", fleet_variant="production",
                          instance="a:8000"), True),
    (STORE_ERRORS, _alert("AbfleetSpoolBacklogHigh", severity="warning", fleet_variant="production",
                          instance="b:8000"), False),
    (STORE_ERRORS, _alert("AbfleetSpoolRefusing", severity="critical", fleet_variant="production",
                          instance="a:8000"), False),
    (PAGE, _alert("AbfleetAvailabilityBudgetBurn", severity="warning", variant="candidate", long_window="1d"), True),
    (PAGE, _alert("AbfleetLatencyBudgetBurn", severity="warning", variant="candidate", long_window="1d"), False),
    (PAGE, _alert("AbfleetAvailabilityBudgetBurn", severity="critical", variant="fleet", long_window="6h"), True),
    (PAGE, _alert("AbfleetAvailabilityBudgetBurn", severity="warning", variant="production", long_window="1d"), False),
    (PAGE, _alert("AbfleetAvailabilityBudgetBurn", severity="critical", variant="production", long_window="6h"),
     False),
    (GUARDRAIL, PAGE, True),
    (GUARDRAIL, _alert("AbfleetAvailabilityBudgetBurn", severity="warning", variant="candidate", long_window="1d"), True),
    (GUARDRAIL, _alert("AbfleetAvailabilityBudgetBurn", severity="critical", variant="production", long_window="1h"),
     False),
    (GUARDRAIL, _alert("AbfleetLatencyBudgetBurn", severity="critical", variant="candidate", long_window="1h"), False),
    (_alert("AbfleetCandidateGuardrail", severity="warning", guardrail="latency_p95"), PAGE, False),
]


@pytest.mark.parametrize("source,target,muted", INHIBITION,
                         ids=[f"{s['alertname']}-mutes-{t['alertname']}-{m}" for s, t, m in INHIBITION])
def test_inhibit_rules_mute_the_alerts_that_follow_from_another(source, target, muted):
    assert _muted(target, [source]) is muted
    assert not _muted(target, []), "nothing is muted while nothing fires"


def test_inhibition_covers_only_alerts_the_rules_define():
    defined = {rule["alert"] for rule in alert_rules()}
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    named = set()
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            name, op, value = _MATCHER.match(matcher).groups()
            if name == "alertname":
                named |= set(value.split("|")) if op == "=~" else {value}
    assert named <= defined, f"inhibit_rules name alerts no rule defines: {sorted(named - defined)}"


def test_the_local_alertmanager_sends_people_and_watchdog_to_their_urls(tmp_path):
    from abfleet.monitoring import write_alertmanager_config
    from abfleet.settings import Settings

    amtool = amtool_path()
    both = write_alertmanager_config(Settings(run_dir=tmp_path, webhook_url="http://127.0.0.1:1/hook",
                                              watchdog_url="http://127.0.0.1:2/ping"))
    config = yaml.safe_load(both.read_text())
    hooks = {r["name"]: r.get("webhook_configs") for r in config["receivers"]}
    people = [{"url": "http://127.0.0.1:1/hook", "send_resolved": True}]
    assert hooks == {"page": people, "ticket": people,
                     "deadmans-switch": [{"url": "http://127.0.0.1:2/ping", "send_resolved": True}]}
    # The routing and inhibition of the shared file are kept as they are.
    shared = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["route"] == shared["route"] and config["inhibit_rules"] == shared["inhibit_rules"]
    r = run_tool(amtool, "check-config", str(both))
    assert r.returncode == 0, r.stdout + r.stderr
    # Only the people's webhook: the dead-man's switch keeps no config.
    only_people = yaml.safe_load(write_alertmanager_config(
        Settings(run_dir=tmp_path, webhook_url="http://127.0.0.1:1/hook")).read_text())
    assert {r["name"]: r.get("webhook_configs") for r in only_people["receivers"]} == {
        "page": people, "ticket": people, "deadmans-switch": None}
    # Neither: receivers without configs, which Alertmanager accepts (alerts are only shown).
    without = write_alertmanager_config(Settings(run_dir=tmp_path))
    config = yaml.safe_load(without.read_text())
    assert all(set(r) == {"name"} for r in config["receivers"]), config["receivers"]
    r = run_tool(amtool, "check-config", str(without))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_watchdog_url_is_read_from_the_environment():
    from abfleet.settings import Settings

    assert Settings.from_env({"ABFLEET_WATCHDOG_URL": "http://hc.example/ping"}).watchdog_url == "http://hc.example/ping"
    assert Settings.from_env({}).watchdog_url == ""


def test_the_stack_starts_alertmanager_on_its_port_and_says_how_to_install_a_missing_one(tmp_path, monkeypatch):
    from abfleet import stack
    from abfleet.settings import Settings

    settings = Settings(run_dir=tmp_path, alertmanager_port=19093)
    (am,) = [s for s in stack.services(settings) if s.name == "alertmanager"]
    assert f"--web.listen-address={settings.host}:19093" in am.command
    assert f"--config.file={tmp_path / 'alertmanager.yml'}" in am.command
    assert "--cluster.listen-address=" in am.command  # no gossip port on 9094
    names = [s.name for s in stack.services(settings)]
    assert names.index("alertmanager") < names.index("prometheus")
    monkeypatch.setattr(stack, "alertmanager_binary", lambda: None)
    with pytest.raises(stack.StackError, match="prometheus-alertmanager is not installed: run `sudo apt-get install -y "
                                               "prometheus-alertmanager` \\(or `make install-system`\\)"):
        stack.up(settings, only=("alertmanager",), say=lambda _m: None)
