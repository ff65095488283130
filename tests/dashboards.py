"""Grafana dashboards as lists of queries: panel walking and variable substitution, shared by
tests/unit/test_monitoring.py (metric names) and tests/integration/test_dashboards.py (live
Prometheus)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "monitoring" / "grafana" / "dashboards"


class ParseOnlyQuery(UserWarning):
    """A dashboard query checked for parsing only: its metrics are not exported yet. Shown in
    the warnings summary (pyproject's filterwarnings), never an error."""

# Grafana's built-in interval variables, replaced with fixed windows that suit a 5s scrape.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_METRIC = re.compile(r"\babfleet_[A-Za-z0-9_]*")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name
    panel: str  # panel title
    ref_id: str
    raw: str  # as written in the dashboard
    expr: str  # Grafana variables substituted

    @property
    def id(self) -> str:
        return f"{self.dashboard}:{self.panel}:{self.ref_id}"


def iter_panels(panels: list[dict]):
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels or []:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def template_values(dashboard: dict) -> dict[str, str]:
    """Templating variable -> the value a query gets: its default, or `.*` for All / multi / unknown."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        current = (var.get("current") or {}).get("value")
        if isinstance(current, list):
            current = current[0] if len(current) == 1 else "$__all"
        if current in (None, "", "$__all"):
            current = var.get("allValue") or ".*"
        values[var["name"]] = current
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); unknown ones become `.*`."""
    def repl(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        return values.get(name, ".*")

    return _VARIABLE.sub(repl, expr)


def dashboard_queries(directory: Path = DASHBOARD_DIR) -> list[PanelQuery]:
    queries = []
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text())
        values = template_values(dashboard)
        for panel in iter_panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []) or []:
                raw = (target.get("expr") or "").strip()
                if raw:
                    queries.append(PanelQuery(path.name, panel.get("title", f"panel {panel.get('id')}"),
                                              target.get("refId", "?"), raw, substitute(raw, values)))
    return queries


def abfleet_metrics(expr: str) -> set[str]:
    """The abfleet_* metric names a query uses, as written (histograms as _bucket/_count/_sum)."""
    return set(_METRIC.findall(expr))
