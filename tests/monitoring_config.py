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


def tool_path(name: str, missing: str) -> str:
    """The path of the command `name` (on PATH, or in /usr/bin); without it the test skips, saying `missing`."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        pytest.skip(f"{name} NOT INSTALLED: {missing}")
    return path


def promtool_path() -> str:
    return tool_path("promtool", "Prometheus config, alert rules and rule unit tests are NOT checked "
                                 "(apt-get install prometheus)")


def amtool_path() -> str:
    return tool_path("amtool", "the Alertmanager config is NOT checked "
                               "(apt-get install prometheus-alertmanager, or make install-system)")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def rules(kind: str) -> list[dict]:
    """The rules of every rule file that have the key `kind` ("alert" or "record")."""
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if kind in rule]


def alert_rules() -> list[dict]:
    return rules("alert")


def recording_rules() -> list[dict]:
    return rules("record")
