"""One evaluation cycle: Prometheus → stats → decision → action → record.

The hourly DAG, `abfleet evaluate` and the manual `abfleet promote|rollback` all run
through here, so they are audited the same way. `abfleet.decision` stays pure; this module
does the I/O around it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import requests

from abfleet import metrics as m
from abfleet import registry
from abfleet.decision import DecisionPolicy, decide
from abfleet.settings import VARIANTS, Settings

log = logging.getLogger(__name__)
PREDICT = "/api/predict_home_price"


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or answered with an error."""


class Prometheus:
    """The smallest client that does: instant queries over the HTTP API."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        try:
            r = requests.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout)
            body = r.json()
        except (requests.RequestException, ValueError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} unreachable: {type(exc).__name__}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus refused {expr!r}: {body.get('error')}")
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if value == value and abs(value) != float("inf") else None  # NaN / inf → unknown

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def samples(self, selector: str, seconds: float, at: float) -> dict[tuple, list[tuple[float, float]]]:
        """The raw samples of every series of `selector` in the `seconds` before `at`."""
        result = self.query(f"{selector}[{max(1, int(seconds))}s]", at=at)
        return {tuple(sorted(r["metric"].items())): [(float(t), float(v)) for t, v in r["values"]] for r in result}


def prometheus_url(settings: Settings) -> str:
    return settings.prometheus_url or f"http://{settings.host}:{settings.prometheus_port}"


# PromQL lives here, one place. Counts since the experiment started are the counter now
# minus the counter at the start (`@ since`), which is exact at any window length;
# increase() extrapolates at its window's edges (by up to a scrape interval, so by a fifth
# in a 30-second window), and is used only when a server restarted and reset a counter.
SELECTORS = {
    "requests": f'{m.REQUESTS}{{variant="{{v}}",model_version="{{mv}}",endpoint="{PREDICT}"}}',
    "errors": f'{m.REQUESTS}{{variant="{{v}}",model_version="{{mv}}",endpoint="{PREDICT}",status=~"5.."}}',
    "latency_bucket": f'{m.LATENCY}_bucket{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "latency_sum": f'{m.LATENCY}_sum{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "latency_count": f'{m.LATENCY}_count{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "ratings": f'{m.RATINGS}{{variant="{{v}}",model_version="{{mv}}"}}',
    "quick": f'{m.QUICK_FEEDBACK}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_count": f'{m.APE_COUNT}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_sum": f'{m.APE_SUM}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_sum_sq": f'{m.APE_SUM_SQ}{{variant="{{v}}",model_version="{{mv}}"}}',
}


def since_start(selector: str, by: str, since: float, window: str, reset: bool) -> str:
    """The growth of a counter since `since` (unix time), summed `by` a label list."""
    group = f"sum by ({by})" if by else "sum"
    if reset:
        return f"{group} (increase({selector}[{window}]))"
    # Series born after the start have no value `@ since`: `or ... * 0` counts them from zero.
    return f"{group} ({selector}) - ({group} ({selector} @ {since:.3f}) or {group} ({selector}) * 0)"


# Both arms' request counts are read at one instant. Each server is scraped at its own moment,
# so "the latest sample" of two servers can be a scrape interval apart: under heavy traffic
# that is enough requests to fake a sample-ratio mismatch (5 s of 400 requests/s in a short
# window did). Each counter is read between the two scrapes around the instant instead.
LOOKBACK_S = 300  # Prometheus's staleness: a series with no sample this long before is new


def _value_at(points: list[tuple[float, float]], t: float) -> float:
    """A counter's value at t: linear between the samples around t; 0 before its first one."""
    before = [p for p in points if p[0] <= t]
    if not before:
        return 0.0
    t0, v0 = before[-1]
    after = [p for p in points if p[0] > t]
    if not after or after[0][1] < v0:  # nothing later, or a reset: hold the last value
        return v0
    t1, v1 = after[0]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def common_instant(prom: Prometheus, selectors: list[str], now: float) -> float | None:
    """The latest instant every series of these selectors has a sample at or after: the last
    scrape of the server (or replica) scraped longest ago. None when a selector has no
    recent sample."""
    lasts = []
    for selector in selectors:
        series = prom.samples(selector, LOOKBACK_S, now)
        if not series:
            return None
        lasts.extend(points[-1][0] for points in series.values() if points)
    return min(lasts)


def growth_between(prom: Prometheus, selector: str, since: float, end: float) -> float:
    """How much a counter (summed over its series) grew from `since` to `end`, each end read
    between the samples around it. A series born after `since` counts from zero."""
    start = prom.samples(selector, 2 * LOOKBACK_S, since + LOOKBACK_S)
    finish = prom.samples(selector, 2 * LOOKBACK_S, end + LOOKBACK_S)
    return sum(_value_at(points, end) - _value_at(start.get(key, []), since) for key, points in finish.items())


def _count(x: float | None) -> int | None:
    return None if x is None else int(round(x))


def _selector(name: str, variant: str, version: str) -> str:
    return SELECTORS[name].replace("{v}", variant).replace("{mv}", version)


def variant_stats(prom: Prometheus, variant: str, version: str, since: float, window: str,
                  end: float | None = None) -> dict[str, Any]:
    """One arm's numbers since the experiment started, in the decision input's shape.

    With `end` (see `common_instant`) the request count is the growth from `since` to `end`,
    read between scrapes, so both arms are counted over the same stretch of time."""
    sel = {name: _selector(name, variant, version) for name in SELECTORS}
    reset = bool(prom.scalar(f'sum(resets({sel["requests"]}[{window}]))'))

    def grow(name: str, by: str = "") -> str:
        return since_start(sel[name], by, since, window, reset)

    p95 = prom.scalar(f'histogram_quantile(0.95, {grow("latency_bucket", "le")})')
    mean = prom.scalar(f'({grow("latency_sum")}) / ({grow("latency_count")})')
    return {
        "model_version": version,
        "requests": _count(growth_between(prom, sel["requests"], since, end) if end is not None and not reset
                           else prom.scalar(grow("requests"))),
        "errors": _count(prom.scalar(grow("errors"))) or 0,
        "latency_p95_ms": None if p95 is None else round(p95 * 1000, 3),
        "latency_mean_ms": None if mean is None else round(mean * 1000, 3),
        "ratings": {stars: _count(v) for stars, v in sorted(prom.by_label(grow("ratings", "stars"), "stars").items())},
        "quick": {kind: _count(v) for kind, v in sorted(prom.by_label(grow("quick", "kind"), "kind").items())},
        "ape": {"count": _count(prom.scalar(grow("ape_count"))) or 0, "sum": prom.scalar(grow("ape_sum")) or 0.0,
                "sum_sq": prom.scalar(grow("ape_sum_sq")) or 0.0},
    }


def _since(settings: Settings, version: str) -> dt.datetime:
    info = registry.version_info(settings, version)
    tag = (info.tags or {}).get("candidate_since")
    if tag:
        return dt.datetime.fromisoformat(tag)
    return dt.datetime.fromtimestamp(info.creation_timestamp / 1000, dt.timezone.utc)


def collect(settings: Settings, now: dt.datetime | None = None) -> dict:
    """Who is in the experiment, since when, and the stats Prometheus holds for it."""
    from abfleet import stack

    now = now or dt.datetime.now(dt.timezone.utc)
    out: dict[str, Any] = {"at": now.isoformat(timespec="seconds"), "stats": None, "problems": [],
                           "production_version": None, "candidate_version": None, "since": None}
    try:
        versions = registry.aliases(settings)
    except Exception as exc:  # registry down: nothing can be decided, nothing is changed
        out["problems"].append(f"registry unreachable: {exc}")
        return out
    out["production_version"], out["candidate_version"] = versions["production"], versions["candidate"]
    if not versions["candidate"] or not versions["production"]:
        out["problems"].append("no @candidate in the registry: nothing to evaluate" if versions["production"]
                               else "no @production in the registry")
        return out
    since = _since(settings, versions["candidate"])
    out["since"] = since.isoformat(timespec="seconds")
    # Exactly the experiment: a window reaching back before `since` would count the
    # production traffic of an earlier experiment and skew the split.
    seconds = max(1, int((now - since).total_seconds()))
    weight = stack.saved_weight(settings) / 100.0
    stats: dict[str, Any] = {"window_hours": round(seconds / 3600.0, 4),
                             "weights": {"production": round(1 - weight, 4), "candidate": weight}, "variants": {}}
    prom = Prometheus(prometheus_url(settings))
    try:
        end = common_instant(prom, [_selector("requests", v, versions[v]) for v in VARIANTS], now.timestamp())
        for variant in VARIANTS:
            stats["variants"][variant] = variant_stats(prom, variant, versions[variant], since.timestamp(),
                                                       f"{seconds}s", end)
    except PrometheusError as exc:
        # No numbers: the decision sees missing data, which never promotes.
        out["problems"].append(str(exc))
        stats["variants"] = {v: {"model_version": versions[v]} for v in VARIANTS}
    out["stats"] = stats
    out["arms"] = arms_check(settings, since)
    if out["arms"].get("drift_detected"):
        # Users were assigned at random, so the arms' inputs must look alike; if not, the
        # split is broken and no comparison between them can be trusted.
        out["problems"].append("the two arms receive different inputs (columns "
                               + ", ".join(out["arms"]["drifted_columns"]) + "): is the split broken?")
    return out


def arms_check(settings: Settings, since: dt.datetime) -> dict:
    """Do production and candidate get inputs from the same distribution since the start?"""
    try:
        import pandas as pd

        from abfleet import drift
        from abfleet.store import open_store
    except ImportError as exc:  # Evidently lives in the pipeline extra
        return {"drift_detected": None, "reason": f"not checked: {exc.name} is not installed"}
    with open_store(settings, create_schema=False) as store:
        rows = pd.DataFrame(store.predictions_since(since))
    if rows.empty:
        return {"drift_detected": None, "reason": "no predictions logged since the candidate started"}
    arms = {v: rows[rows.variant == v] for v in VARIANTS}
    policy = drift.DriftPolicy(min_rows=settings.arms_min_rows)
    return drift.arms_same_distribution(arms["production"], arms["candidate"], policy)


def judge(collected: dict, policy: DecisionPolicy | None = None) -> dict:
    """The decision for collected stats; 'continue' whenever there is nothing sound to judge."""
    problems = collected.get("problems") or []
    if collected.get("stats") is None:
        return {"decision": "continue", "reasons": problems or ["nothing to evaluate"], "checks": {}}
    outcome = decide(collected["stats"], policy or DecisionPolicy.from_env())
    if problems:
        if outcome["decision"] == "promote":  # belt and braces: a problem never ends in a promotion
            outcome["decision"] = "continue"
        outcome["reasons"] = problems + outcome["reasons"]
    return outcome


def act(settings: Settings, collected: dict, outcome: dict, *, dry_run: bool = False, source: str = "cli") -> dict:
    """Apply the decision (aliases, tags, reload, webhook) and record it, continue included."""
    decision = outcome["decision"]
    reasons = list(outcome.get("reasons") or [])
    record: dict[str, Any] = {"decision": decision, "reasons": reasons, "source": source, "applied": False,
                              "dry_run": dry_run, "production_version": collected.get("production_version"),
                              "candidate_version": collected.get("candidate_version"), "at": collected.get("at")}
    if dry_run:
        return record
    if decision in ("promote", "rollback") and collected.get("candidate_version"):
        action = registry.promote if decision == "promote" else registry.rollback
        record["action"] = action(settings, reasons, source)
        record["applied"] = True
        record["reloaded"] = reload_servers(settings)
        record["webhook"] = notify(settings, record)
    record["id"] = _record(settings, record, outcome, collected)
    return record


def evaluate(settings: Settings, *, dry_run: bool = False, source: str = "cli") -> dict:
    """One whole cycle; returns the record with the stats and checks behind it."""
    collected = collect(settings)
    outcome = judge(collected)
    record = act(settings, collected, outcome, dry_run=dry_run, source=source)
    return {**record, "stats": collected.get("stats"), "checks": outcome.get("checks"), "score": outcome.get("score"),
            "flags": outcome.get("flags", [])}


def manual(settings: Settings, decision: str, reason: str | None) -> dict:
    """`abfleet promote|rollback`: the same action and audit trail as the DAG's."""
    collected = collect(settings)
    if not collected.get("candidate_version"):
        raise registry.RegistryError(f"there is no @candidate to {decision}")
    outcome = {"decision": decision, "reasons": [f"manual {decision}: {reason or 'no reason given'}"], "checks": {}}
    return act(settings, collected, outcome, source="manual")


def reload_servers(settings: Settings) -> dict[str, str]:
    """Ask both servers to re-read their alias now (they also notice by themselves)."""
    from abfleet import stack

    token = stack.admin_token(settings)
    out = {}
    for variant in VARIANTS:
        url = f"{settings.server_url(variant)}/api/admin/reload"
        try:
            r = requests.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            out[variant] = f"{r.status_code} {r.json().get('model_version', '')}".strip()
        except (requests.RequestException, ValueError) as exc:
            out[variant] = f"not reached ({type(exc).__name__}); it will notice within {settings.reload_interval:.0f}s"
    return out


def notify(settings: Settings, record: dict) -> str | None:
    """POST the decision to the configured webhook; a failure is reported, never fatal."""
    if not settings.webhook_url:
        return None
    try:
        r = requests.post(settings.webhook_url, json={"source": "abfleet", **record}, timeout=10)
        return f"{r.status_code}"
    except requests.RequestException as exc:
        log.warning("webhook %s failed: %s", settings.webhook_url, exc)
        return f"failed: {type(exc).__name__}"


def _record(settings: Settings, record: dict, outcome: dict, collected: dict) -> int:
    from abfleet.store import open_store

    details = {"stats": collected.get("stats"), "checks": outcome.get("checks"), "score": outcome.get("score"),
               "flags": outcome.get("flags", []), "action": record.get("action"), "since": collected.get("since"),
               "arms": collected.get("arms"), "problems": collected.get("problems")}
    with open_store(settings) as store:
        decision_id = store.record_decision(record["decision"], record["source"], record["applied"], record["reasons"],
                                            details, record["production_version"], record["candidate_version"])
    version = record["candidate_version"]
    if version:
        try:
            registry.tag_version(settings, version, {
                f"decision.{decision_id:06d}": json.dumps({"decision": record["decision"], "at": record["at"],
                                                           "source": record["source"], "reasons": record["reasons"]})[:4900]})
        except Exception as exc:  # the table row is the record of truth; the tag is a convenience
            log.warning("could not tag version %s: %s", version, exc)
    return decision_id
