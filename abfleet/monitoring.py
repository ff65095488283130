"""Prometheus configuration for the local stack, derived from `monitoring/prometheus.yml`."""

from __future__ import annotations

from pathlib import Path

import yaml

from abfleet.settings import Settings, project_root


def local_targets(settings: Settings) -> dict[str, str]:
    """Job name → the loopback address the local stack serves it on."""
    h = settings.host
    return {
        "production": f"{h}:{settings.production_port}",
        "candidate": f"{h}:{settings.candidate_port}",
        "prometheus": f"{h}:{settings.prometheus_port}",
    }


def write_prometheus_config(settings: Settings) -> Path:
    """The shared prometheus.yml with local targets and absolute rule paths, in the run dir."""
    source = project_root() / "monitoring" / "prometheus.yml"
    config = yaml.safe_load(source.read_text())
    targets = local_targets(settings)
    for job in config.get("scrape_configs", []):
        if job["job_name"] in targets:
            # One process per job here: a static loopback target instead of DNS discovery.
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["rule_files"] = [str(source.parent / rule) for rule in config.get("rule_files", [])]
    path = settings.run_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
