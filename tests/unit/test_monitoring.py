"""Monitoring config, checked offline and fast: Prometheus config and alert rules (promtool),
rule unit tests, SLO recording rules, metric names against abfleet/metrics.py, Grafana
provisioning and dashboards, and the compose files' mounts. Alertmanager's routes and
inhibition and the runbooks: tests/unit/test_alerting_config.py.

The live counterpart (every dashboard query against the fleet's Prometheus) is
tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import yaml

from abfleet import metrics
from tests.dashboards import dashboard_queries, iter_panels
from tests.monitoring_config import (ALERTMANAGER_CONFIG, MON, ROOT, RULE_FILES, alert_rules, promtool_path,
                                     recording_rules, run_tool)

PROMETHEUS_CONFIG = MON / "prometheus.yml"
RULE_TESTS = sorted((MON / "tests").glob("*.yml"))
DASHBOARDS = sorted((MON / "grafana" / "dashboards").glob("*.json"))
COMPOSE = MON / "docker-compose.monitoring.yml"
ROOT_COMPOSE = ROOT / "docker-compose.yaml"
DATASOURCE_UID = "prometheus"
SEVERITIES = {"critical", "warning", "info"}
# Fires all the time by design: no `for:` and no quiet case.
ALWAYS_FIRING = {"Watchdog"}

# Metrics the rules/dashboards use that the stack is to export but abfleet/metrics.py does not
# define yet. Move each into abfleet/metrics.py (then drop it here) once something exports it.
PENDING: dict[str, str] = {}
# A metric name, not part of a recording rule's level:metric:operations name (colons).
_METRIC = re.compile(r"(?<![\w:])abfleet_[A-Za-z0-9_]*(?![\w:])")
_RECORDED = re.compile(r"(?<![\w:])[A-Za-z_]\w*:\w+:\w+")  # level:metric:operations
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


# ---- helpers ----------------------------------------------------------------------------------

def _rule_texts() -> list[str]:
    """Every PromQL a rule evaluates: exprs, and annotation templates (they may `query`)."""
    texts = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                texts.append(rule["expr"])
                texts.extend(str(v) for v in (rule.get("annotations") or {}).values())
    return texts


def _defined_metrics() -> set[str]:
    return {v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith("abfleet_")}


def _is_defined(name: str, defined: set[str]) -> bool:
    return name in defined or any(name.endswith(s) and name[: -len(s)] in defined for s in _HISTOGRAM_SUFFIXES)


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in iter_panels(dashboard.get("panels", [])) if p.get("type") != "row"]


# ---- Prometheus -------------------------------------------------------------------------------

def test_there_are_rules_and_rule_tests():
    assert RULE_FILES, "no monitoring/rules/*.yml"
    assert RULE_TESTS, "no monitoring/tests/*.yml"


def test_promtool_check_config():
    # rule_files in prometheus.yml are relative to it; promtool resolves them the same way.
    r = run_tool(promtool_path(), "check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(RULE_FILES)} rule files found" in r.stdout, r.stdout


def test_promtool_check_rules():
    r = run_tool(promtool_path(), "check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    r = run_tool(promtool_path(), "test", "rules", *map(str, RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_tests_load_every_rules_file():
    loaded = {(path.parent / rule_file).resolve() for path in RULE_TESTS
              for rule_file in yaml.safe_load(path.read_text()).get("rule_files", [])}
    assert {p.resolve() for p in RULE_FILES} <= loaded, "rules files no unit test loads"


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []) or []:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    quiet |= ALWAYS_FIRING & alerts
    assert not alerts - firing, f"alerts with no firing case in monitoring/tests: {sorted(alerts - firing)}"
    assert not alerts - quiet, f"alerts with no non-firing case in monitoring/tests: {sorted(alerts - quiet)}"
    assert not (firing | quiet) - alerts, f"tests for alerts that do not exist: {sorted((firing | quiet) - alerts)}"


def test_alerts_have_for_severity_and_annotations():
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("for") or name in ALWAYS_FIRING, f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), f"{name}: summary/description"


def test_prometheus_config_has_the_fleet_jobs():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"production", "candidate", "prometheus"} <= jobs
    assert "rules/*.yml" in config["rule_files"]
    # Compose: every replica of a model server is a target of its own.
    by_name = {job["job_name"]: job for job in config["scrape_configs"]}
    assert by_name["production"]["dns_sd_configs"][0]["names"] == ["infer-prod"]
    assert by_name["candidate"]["dns_sd_configs"][0]["names"] == ["infer-cand"]
    # Compose: alerts go to the alertmanager service.
    (target,) = [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert target == "alertmanager:9093"


def test_the_local_stack_scrapes_loopback_targets_with_the_same_labels(tmp_path):
    from abfleet.monitoring import write_prometheus_config
    from abfleet.settings import Settings

    settings = Settings(run_dir=tmp_path, production_port=16001, candidate_port=16002)
    rendered = write_prometheus_config(settings)
    config = yaml.safe_load(rendered.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "dns_sd_configs" not in jobs["production"]
    assert jobs["production"]["static_configs"] == [{"targets": [f"{settings.host}:16001"]}]
    assert jobs["candidate"]["static_configs"] == [{"targets": [f"{settings.host}:16002"]}]
    assert jobs["candidate"]["relabel_configs"] == [{"target_label": "fleet_variant", "replacement": "candidate"}]
    assert config["alerting"] == {"alertmanagers": [{"static_configs": [
        {"targets": [f"{settings.host}:{settings.alertmanager_port}"]}]}]}
    r = run_tool(promtool_path(), "check", "config", str(rendered))
    assert r.returncode == 0, r.stdout + r.stderr


def test_recorded_series_used_by_rules_and_dashboards_are_recorded():
    recorded = {rule["record"] for rule in recording_rules()}
    assert recorded, "no recording rules"
    used = {name for text in _rule_texts() for name in _RECORDED.findall(text)}
    used |= {name for query in dashboard_queries() for name in _RECORDED.findall(query.raw)}
    assert not used - recorded, f"level:metric:operation names no rule records: {sorted(used - recorded)}"


SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d")


def test_slo_ratios_are_recorded_over_every_window_per_variant_and_for_the_fleet():
    by_name = {rule["record"]: rule["expr"] for rule in recording_rules()}
    for sli in ("errors", "slow"):
        for window in SLO_WINDOWS:
            expr = by_name.get(f"variant:abfleet_prediction_{sli}:ratio_rate{window}")
            assert expr, f"{sli} ratio over {window} not recorded"
            assert f"[{window}]" in expr and "sum by (variant)" in expr, expr
            assert 'label_replace(' in expr and '"variant", "fleet"' in expr, f"{sli} {window}: no fleet series"
            assert 'endpoint="/api/predict_home_price"' in expr, expr


# ---- metric names -----------------------------------------------------------------------------

def test_metric_names_in_rules_and_dashboards_are_defined_in_abfleet_metrics():
    defined = _defined_metrics()
    assert defined, "abfleet/metrics.py defines no abfleet_* names"
    used = {}
    for text in _rule_texts():
        for name in _METRIC.findall(text):
            used.setdefault(name, set()).add("monitoring/rules")
    for query in dashboard_queries():
        for name in _METRIC.findall(query.raw):
            used.setdefault(name, set()).add(query.dashboard)
    unknown = {n: sorted(w) for n, w in used.items() if not _is_defined(n, defined) and n not in PENDING}
    assert not unknown, f"metric names not defined in abfleet/metrics.py: {unknown}"
    pending = sorted(n for n in used if n in PENDING and not _is_defined(n, defined))
    if pending:
        warnings.warn("used in monitoring but not defined in abfleet/metrics.py yet (the stack must export them): "
                      + "; ".join(f"{n} ({PENDING[n]})" for n in pending), UserWarning, stacklevel=1)


def test_every_defined_server_metric_appears_in_a_dashboard():
    used = {name for query in dashboard_queries() for name in _METRIC.findall(query.raw)}
    # A recorded series on a dashboard shows the metrics its rule reads.
    shown = {name for query in dashboard_queries() for name in _RECORDED.findall(query.raw)}
    used |= {name for rule in recording_rules() if rule["record"] in shown for name in _METRIC.findall(rule["expr"])}
    unused = sorted(d for d in _defined_metrics() if not any(_is_defined(u, {d}) for u in used))
    # The sum of squares only feeds the evaluation's variance; everything else should be visible.
    assert set(unused) <= {metrics.APE_SUM_SQ}, f"defined but on no dashboard: {unused}"


# ---- Grafana ----------------------------------------------------------------------------------

def test_grafana_datasource_provisioning():
    config = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = config["datasources"]
    assert (ds["type"], ds["uid"], ds["url"]) == ("prometheus", DATASOURCE_UID, "http://prometheus:9090")


def test_grafana_dashboard_provider_points_at_the_mounted_dashboards():
    config = yaml.safe_load((MON / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboards_exist():
    assert {p.name for p in DASHBOARDS} >= {"ab-overview.json", "drift.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_panels_use_the_prometheus_datasource_and_have_queries(path):
    dashboard = json.loads(path.read_text())
    assert dashboard.get("uid") and dashboard.get("title"), f"{path.name}: uid and title"
    panels = _panels(dashboard)
    assert panels, f"{path.name}: no panels"
    ids = [p.get("id") for p in iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for panel in panels:
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert (panel.get("datasource") or {}).get("uid") == DATASOURCE_UID, f"{where}: datasource uid"
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"{where}: every panel needs targets, each with an expr"
        for target in panel["targets"]:
            assert (target.get("datasource") or {}).get("uid", DATASOURCE_UID) == DATASOURCE_UID, where
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refIds"


def test_dashboard_uids_are_unique():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every panel query (Grafana variables substituted) parses: checked as recording rules by promtool."""
    promtool = promtool_path()
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard_query_{i}", "expr": q.expr} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    r = run_tool(promtool, "check", "rules", str(path))
    if r.returncode != 0:
        bad = [f"dashboard_query_{i} = {q.id}" for i, q in enumerate(queries)]
        pytest.fail(f"{r.stdout}{r.stderr}\nquery index: " + "; ".join(bad))
    assert f"{len(queries)} rules found" in r.stdout, r.stdout


# ---- compose ----------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _binds(service: dict) -> dict[str, str]:
    """target -> source of the bind mounts of a compose service (named volumes left out)."""
    binds = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        elif volume.get("type") == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        if source.startswith((".", "/", "~")):
            binds[target] = source
    return binds


def test_compose_bind_mount_sources_exist():
    for name, service in _compose()["services"].items():
        for target, source in _binds(service).items():
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} (-> {target}) missing beside {COMPOSE.name}"


def test_compose_mounts_what_prometheus_and_grafana_read():
    services = _compose()["services"]
    prom = _binds(services["prometheus"])
    assert (COMPOSE.parent / prom["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_CONFIG.resolve()
    # prometheus.yml loads rules/*.yml relative to itself.
    assert (COMPOSE.parent / prom["/etc/prometheus/rules"]).resolve() == (MON / "rules").resolve()
    grafana = _binds(services["grafana"])
    assert (COMPOSE.parent / grafana["/etc/grafana/provisioning"]).resolve() == (MON / "grafana/provisioning").resolve()
    assert (COMPOSE.parent / grafana["/var/lib/grafana/dashboards"]).resolve() == (MON / "grafana/dashboards").resolve()


@pytest.mark.parametrize("compose", [COMPOSE, ROOT_COMPOSE], ids=lambda p: p.name)
def test_compose_runs_alertmanager_with_the_shared_config(compose):
    services = yaml.safe_load(compose.read_text())["services"]
    binds = _binds(services["alertmanager"])
    assert (compose.parent / binds["/etc/alertmanager/alertmanager.yml"]).resolve() == ALERTMANAGER_CONFIG.resolve()
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in services["alertmanager"]["command"]


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose NOT INSTALLED: monitoring/docker-compose.monitoring.yml not validated")
    r = run_tool(compose, "-f", str(COMPOSE), "config", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
