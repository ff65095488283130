"""The monitoring config's files and tools, shared by tests/unit/test_monitoring.py (Prometheus,
rules, Grafana, compose) and tests/unit/test_alerting_config.py (Alertmanager, runbooks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
RULE_FILES = sorted((MON / "rules").glob("*.yml"))
ALERTMANAGER_CONFIG = MON / "alertmanager.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"


def promtool_path() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
    if path is None:
        pytest.skip("promtool NOT INSTALLED: Prometheus config, alert rules and rule unit tests are NOT checked "
                    "(apt-get install prometheus)")
    return path


def amtool_path() -> str:
    path = shutil.which("amtool") or ("/usr/bin/amtool" if os.access("/usr/bin/amtool", os.X_OK) else None)
    if path is None:
        pytest.skip("amtool NOT INSTALLED: the Alertmanager config is NOT checked "
                    "(apt-get install prometheus-alertmanager, or make install-system)")
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule]
