"""The metrics provider of the evaluation: a small Prometheus client and the experiment's PromQL.

`variant_stats` turns the servers' counters into one arm's numbers in the decision input's
shape. The counter alignment (`value_at`, `common_instant`, `growth_between`) needs only a
`samples(selector, seconds, at)` method, so tests give it fixed series instead of a server.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import requests

from abfleet import metrics
from abfleet.api import PREDICT


class PrometheusError(RuntimeError):
    """Prometheus did not answer, or answered with an error."""


class Samples(Protocol):
    """What the counter alignment reads: every series' raw samples in a window."""

    def samples(self, selector: str, seconds: float, at: float) -> dict[tuple, list[tuple[float, float]]]: ...


def finite(raw: Any) -> float | None:
    """A sample value as a float; None (unknown) for NaN, ±Inf or anything not a number."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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
        """The value of a one-sample result; None when there is none or it is not finite."""
        result = self.query(expr)
        return finite(result[0]["value"][1]) if result else None

    def by_label(self, expr: str, label: str) -> dict[str, float | None]:
        """Each sample's value by its `label`; a value that is not finite is None."""
        return {r["metric"].get(label, ""): finite(r["value"][1]) for r in self.query(expr)}

    def samples(self, selector: str, seconds: float, at: float) -> dict[tuple, list[tuple[float, float]]]:
        """The raw samples of every series of `selector` in the `seconds` before `at`."""
        result = self.query(f"{selector}[{max(1, int(seconds))}s]", at=at)
        return {tuple(sorted(r["metric"].items())): [(float(t), float(v)) for t, v in r["values"]] for r in result}


# PromQL lives here, one place. Counts since the experiment started are the counter now
# minus the counter at the start (`@ since`), which is exact at any window length;
# increase() extrapolates at its window's edges (by up to a scrape interval, so by a fifth
# in a 30-second window), and is used only when a server restarted and reset a counter.
SELECTORS = {
    "requests": f'{metrics.REQUESTS}{{variant="{{v}}",model_version="{{mv}}",endpoint="{PREDICT}"}}',
    "errors": f'{metrics.REQUESTS}{{variant="{{v}}",model_version="{{mv}}",endpoint="{PREDICT}",status=~"5.."}}',
    "latency_bucket": f'{metrics.LATENCY}_bucket{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "latency_sum": f'{metrics.LATENCY}_sum{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "latency_count": f'{metrics.LATENCY}_count{{variant="{{v}}",endpoint="{PREDICT}"}}',
    "ratings": f'{metrics.RATINGS}{{variant="{{v}}",model_version="{{mv}}"}}',
    "quick": f'{metrics.QUICK_FEEDBACK}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_count": f'{metrics.APE_COUNT}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_sum": f'{metrics.APE_SUM}{{variant="{{v}}",model_version="{{mv}}"}}',
    "ape_sum_sq": f'{metrics.APE_SUM_SQ}{{variant="{{v}}",model_version="{{mv}}"}}',
    # Served by the other variant's servers: counted there, whatever version they hold.
    "failovers": f'{metrics.FAILOVERS}{{intended="{{v}}",endpoint="{PREDICT}"}}',
    "up": 'up{fleet_variant="{v}"}',
}


def selector(name: str, variant: str, version: str) -> str:
    """The series of SELECTORS[name] for one arm and model version."""
    return SELECTORS[name].replace("{v}", variant).replace("{mv}", version)


def since_start(selector: str, by: str, since: float, window: str, reset: bool) -> str:
    """The growth of a counter since `since` (unix time), summed `by` a label list."""
    group = f"sum by ({by})" if by else "sum"
    if reset:
        return f"{group} (increase({selector}[{window}]))"
    # Each series' latest value in the window, not at this instant: a replica that stopped
    # being scraped (killed, scaled in) keeps the requests it answered while it was. Series
    # born after the start have no value `@ since`: `or ... * 0` counts them from zero.
    latest = f"last_over_time({selector}[{window}])"
    return f"{group} ({latest}) - ({group} ({selector} @ {since:.3f}) or {group} ({latest}) * 0)"


# Both arms' request counts are read at one instant. Each server is scraped at its own moment,
# so "the latest sample" of two servers can be a scrape interval apart: under heavy traffic
# that is enough requests to fake a sample-ratio mismatch (5 s of 400 requests/s in a short
# window did). Each counter is read between the two scrapes around the instant instead.
LOOKBACK_S = 300  # Prometheus's staleness: a series with no sample this long before is new
# A series whose last sample is this much older than the freshest one's belongs to a target
# that stopped being scraped (a dead replica): it no longer holds the common instant back.
# Several scrape intervals (5 s here; 30 s is a slow setting), so a late scrape is not a death.
STOPPED_GAP_S = 120.0


def value_at(points: list[tuple[float, float]], t: float) -> float:
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


def common_instant(prom: Samples, selectors: list[str], now: float) -> float | None:
    """The latest instant every series of these selectors has a sample at or after: the last
    scrape of the server (or replica) scraped longest ago. None when a selector has no
    recent sample."""
    lasts = []
    for expr in selectors:
        series = prom.samples(expr, LOOKBACK_S, now)
        if not series:
            return None
        lasts.extend(points[-1][0] for points in series.values() if points)
    freshest = max(lasts)
    return min(t for t in lasts if t >= freshest - STOPPED_GAP_S)


def growth_between(prom: Samples, selector: str, since: float, end: float, whole_window: bool = False) -> float:
    """How much a counter (summed over its series) grew from `since` to `end`, each end read
    between the samples around it. A series born after `since` counts from zero.

    A series with no sample near `end` (its replica stopped being scraped long before) counts
    to its last sample when `whole_window` (the caller knows a replica went missing): then
    the whole window's samples are read, which costs more and is needed only then."""
    start = prom.samples(selector, 2 * LOOKBACK_S, since + LOOKBACK_S)
    finish = prom.samples(selector, 2 * LOOKBACK_S, end + LOOKBACK_S)
    total = sum(value_at(points, end) - value_at(start.get(key, []), since) for key, points in finish.items())
    if whole_window:
        earlier = prom.samples(selector, end - since, end)
        total += sum(points[-1][1] - value_at(start.get(key, []), since)
                     for key, points in earlier.items() if key not in finish and points)
    return total


def replica_label(metric: dict) -> str:
    """How the report names a scraped server: its `replica` label, else its address."""
    return metric.get("replica") or metric.get("instance", "")


def replicas(prom: Prometheus, variant: str, window: str) -> dict[str, Any]:
    """Which servers of `variant` Prometheus scraped during the window (`expected`) and which
    it scrapes successfully now (`scraped`); any other is `missing`, by name. A killed replica
    fails its scrapes (`up` 0); one gone from service discovery has no current `up` at all."""
    sel = selector("up", variant, "")
    seen = {replica_label(r["metric"]) for r in prom.query(f"last_over_time({sel}[{window}])")}
    now = {replica_label(r["metric"]): finite(r["value"][1]) for r in prom.query(sel)}
    scraped = sorted(name for name, value in now.items() if value is not None and value >= 1)
    expected = sorted(seen | set(now))
    return {"expected": len(expected), "scraped": len(scraped),
            "missing": [name for name in expected if name not in scraped]}


def unreachable_minutes(prom: Samples, variant: str, now: float, lookback_s: float) -> float | None:
    """How long every server of `variant` has failed its scrapes, in minutes: 0 while one
    answers; since its last good scrape (or, never good, since the first scrape seen in
    `lookback_s`) otherwise. None when Prometheus knows no target of it (in compose a dead
    container drops out of DNS: its failovers still count against it, see `variant_stats`)."""
    series = prom.samples(selector("up", variant, ""), lookback_s, now)
    downs = []
    for points in series.values():
        if not points:
            continue
        if points[-1][1] >= 1:
            return 0.0
        good = [t for t, v in points if v >= 1]
        downs.append(now - (good[-1] if good else points[0][0]))
    return round(min(downs) / 60.0, 3) if downs else None


def _count(x: float | None) -> int | None:
    return None if x is None else int(round(x))


def _counts(values: dict[str, float | None]) -> dict[str, int] | None:
    # One unknown value makes the whole histogram unknown: reading it as 0 would skew it.
    if any(v is None for v in values.values()):
        return None
    return {key: _count(v) for key, v in sorted(values.items())}


def variant_stats(prom: Prometheus, variant: str, version: str, since: float, window: str,
                  end: float | None = None, whole_window: bool = False) -> dict[str, Any]:
    """One arm's numbers since the experiment started, in the decision input's shape; a
    number Prometheus does not have (or has as NaN or ±Inf) is None, never 0.

    With `end` (see `common_instant`) the request count is the growth from `since` to `end`,
    read between scrapes, so both arms are counted over the same stretch of time (with
    `whole_window`, see `growth_between`, counting replicas that stopped long before)."""
    series = {name: selector(name, variant, version) for name in SELECTORS}
    reset = bool(prom.scalar(f'sum(resets({series["requests"]}[{window}]))'))
    failover_reset = bool(prom.scalar(f'sum(resets({series["failovers"]}[{window}]))'))

    def growth(name: str, by: str = "") -> str:
        return since_start(series[name], by, since, window, reset)

    p95 = prom.scalar(f'histogram_quantile(0.95, {growth("latency_bucket", "le")})')
    mean = prom.scalar(f'({growth("latency_sum")}) / ({growth("latency_count")})')
    return arm_numbers(
        version,
        requests=growth_between(prom, series["requests"], since, end, whole_window) if end is not None and not reset
        else prom.scalar(growth("requests")),
        errors=prom.scalar(growth("errors")),
        # No series yet (no server has failed over) is none, not unknown.
        failovers=prom.scalar(since_start(series["failovers"], "", since, window, failover_reset)) or 0.0,
        p95_s=p95, mean_s=mean,
        ratings=prom.by_label(growth("ratings", "stars"), "stars"),
        quick=prom.by_label(growth("quick", "kind"), "kind"),
        ape=(prom.scalar(growth("ape_count")), prom.scalar(growth("ape_sum")), prom.scalar(growth("ape_sum_sq"))))


def arm_numbers(version: str, *, requests: float | None, errors: float | None, failovers: float | None,
                p95_s: float | None, mean_s: float | None, ratings: dict[str, float | None],
                quick: dict[str, float | None], ape: tuple[float | None, float | None, float | None]) -> dict[str, Any]:
    """One arm's numbers in the decision input's shape, from counts since the start (None:
    unknown), latencies in seconds, the star and quick-feedback counts by label, and the APE
    (count, sum, sum of squares). Pure: `abfleet simulate` builds its arms with it too."""
    return {
        "model_version": version,
        "requests": _count(requests),
        "errors": _count(errors),
        "failovers": _count(failovers),
        "latency_p95_ms": None if p95_s is None else round(p95_s * 1000, 3),
        "latency_mean_ms": None if mean_s is None else round(mean_s * 1000, 3),
        "ratings": _counts(ratings),
        "quick": _counts(quick),
        # Missing or non-finite stays None (the decision reads "no APE data"), never 0: a sum
        # read as 0 would be a perfect score.
        "ape": {"count": _count(ape[0]), "sum": ape[1], "sum_sq": ape[2]},
    }


def arm_stats(url: str, versions: dict[str, str], since: float, window: str, now: float,
              reach_lookback_s: float = 1200.0) -> dict[str, dict]:
    """Each arm's numbers (arm → model version given), their request counts read at one
    common instant, and how long the arm has been unreachable (looking back at most
    `reach_lookback_s`); raises PrometheusError when Prometheus at `url` cannot answer."""
    prom = Prometheus(url)
    end = common_instant(prom, [selector("requests", v, versions[v]) for v in versions], now)
    scraped = {variant: replicas(prom, variant, window) for variant in versions}
    return {variant: {**variant_stats(prom, variant, versions[variant], since, window, end,
                                      whole_window=bool(scraped[variant]["missing"])),
                      "unreachable_minutes": unreachable_minutes(prom, variant, now, reach_lookback_s),
                      "replicas": scraped[variant]}
            for variant in versions}
