"""Prometheus and Alertmanager configuration for the local stack, derived from
`monitoring/prometheus.yml` and `monitoring/alertmanager.yml`."""

from __future__ import annotations

from pathlib import Path

import yaml

from abfleet.settings import VARIANTS, Settings, project_root


def local_targets(settings: Settings) -> dict[str, list[dict]]:
    """Job name → the static_configs of the loopback addresses the local stack serves it on.
    With several replicas, each is a target of its own labelled `replica` with its name (the
    job's relabelling adds `fleet_variant`; Prometheus adds `instance`)."""
    h = settings.host
    out: dict[str, list[dict]] = {}
    for variant in VARIANTS:
        ports = settings.replica_ports(variant)
        if settings.replicas <= 1:
            out[variant] = [{"targets": [f"{h}:{ports[0]}"]}]
        else:
            out[variant] = [{"targets": [f"{h}:{port}"], "labels": {"replica": name}}
                            for name, port in zip(settings.replica_names(variant), ports)]
    out["prometheus"] = [{"targets": [f"{h}:{settings.prometheus_port}"]}]
    return out


def write_prometheus_config(settings: Settings) -> Path:
    """The shared prometheus.yml with local targets, absolute rule paths and the local
    Alertmanager, in the run dir."""
    source = project_root() / "monitoring" / "prometheus.yml"
    config = yaml.safe_load(source.read_text())
    targets = local_targets(settings)
    for job in config.get("scrape_configs", []):
        if job["job_name"] in targets:
            # Static loopback targets instead of DNS discovery.
            job.pop("dns_sd_configs", None)
            job["static_configs"] = targets[job["job_name"]]
    config["rule_files"] = [str(source.parent / rule) for rule in config.get("rule_files", [])]
    # Alerts go to the local stack's Alertmanager instead of compose's service name.
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [f"{settings.host}:{settings.alertmanager_port}"]}]}]}
    path = settings.run_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# Which receivers of monitoring/alertmanager.yml each local setting feeds: people's alerts
# (`page`, `ticket`) go to ABFLEET_WEBHOOK_URL, the always-firing Watchdog to
# ABFLEET_WATCHDOG_URL, a dead-man's-switch service that alarms when the pings stop.
PEOPLE_RECEIVERS = ("page", "ticket")
WATCHDOG_RECEIVER = "deadmans-switch"


def alertmanager_config(settings: Settings) -> dict:
    """`monitoring/alertmanager.yml` with webhooks on its receivers for the URLs that are set:
    settings.webhook_url on `page` and `ticket`, settings.watchdog_url on `deadmans-switch`.
    A receiver whose URL is not set keeps no configs: its alerts are kept and shown, sent
    nowhere."""
    config = yaml.safe_load((project_root() / "monitoring" / "alertmanager.yml").read_text())
    urls = {name: settings.webhook_url for name in PEOPLE_RECEIVERS}
    urls[WATCHDOG_RECEIVER] = settings.watchdog_url
    missing = set(urls) - {receiver["name"] for receiver in config["receivers"]}
    if missing:
        raise ValueError(f"monitoring/alertmanager.yml has no receiver {', '.join(sorted(missing))}")
    for receiver in config["receivers"]:
        url = urls.get(receiver["name"])
        if url:
            receiver["webhook_configs"] = [{"url": url, "send_resolved": True}]
    return config


def write_alertmanager_config(settings: Settings) -> Path:
    path = settings.run_dir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(alertmanager_config(settings), sort_keys=False))
    return path
