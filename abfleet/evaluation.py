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

from abfleet import aggregates, fleet, prometheus, registry, sampling
from abfleet.decision import CONTINUE, PROMOTE, ROLLBACK, DecisionPolicy, decide
from abfleet.settings import VARIANTS, Settings, decision_policy
from abfleet.store import open_store

log = logging.getLogger(__name__)


def experiment_start(settings: Settings, version: str) -> dt.datetime:
    """When `version` became @candidate (its `candidate_since` tag), else when it was registered."""
    return registry.experiment_start(settings, version)


def collect(settings: Settings, now: dt.datetime | None = None) -> dict:
    """Who is in the experiment, since when, and the stats Prometheus holds for it."""
    now = now or dt.datetime.now(dt.timezone.utc)
    # `blind`: Prometheus did not answer, so no traffic, error or latency was seen at all.
    out: dict[str, Any] = {"at": now.isoformat(timespec="seconds"), "stats": None, "problems": [],
                           "production_version": None, "candidate_version": None, "since": None, "blind": False}
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
    since = experiment_start(settings, versions["candidate"])
    out["since"] = since.isoformat(timespec="seconds")
    # Exactly the experiment: a window reaching back before `since` would count the
    # production traffic of an earlier experiment and skew the split.
    seconds = max(1, int((now - since).total_seconds()))
    arms = {v: versions[v] for v in VARIANTS}
    # Look back far enough to see the whole unreachable stretch the policy allows, and more.
    reach_s = max(600.0, 2 * 60 * decision_policy().max_unreachable_minutes)
    try:
        variants = prometheus.arm_stats(settings.prometheus_api, arms, since.timestamp(),
                                                 f"{seconds}s", now.timestamp(), reach_s)
    except prometheus.PrometheusError as exc:
        # No numbers: the decision sees missing data, which never promotes (nor rolls back).
        out["problems"].append(str(exc))
        out["blind"] = True
        variants = {v: {"model_version": versions[v]} for v in VARIANTS}
    # Users, and each user's mean rating and APE, from the store: the comparison counts people.
    try:
        with open_store(settings, create_schema=False) as store:
            people = aggregates.people(store, since, arms)
    except Exception as exc:  # store down: `people` unknown, which never promotes nor rolls back
        out["problems"].append(f"store unreachable, users not counted: {type(exc).__name__}")
        people = {v: None for v in VARIANTS}
    stats = experiment_stats(seconds, fleet.weights(fleet.candidate_weight(settings)), variants, people)
    out["stats"] = stats
    out["replicas"] = replicas_check(stats["variants"])
    for v, check in out["replicas"].items():
        if check and check["missing"]:
            # Its requests until it stopped are counted; any it answered unscraped are not, so
            # the counts may be short: report it, and promote nothing until it is back.
            out["problems"].append(f"{v}: {check['scraped']} of {check['expected']} servers scraped; not scraped now: "
                                   + ", ".join(check["missing"]))
    out["arms"] = arms_check(settings, since, arms)
    out["drift"] = latest_drift(settings)
    if out["arms"].get("drift_detected"):
        # Users were assigned at random, so the arms' inputs must look alike; if not, the
        # split is broken and no comparison between them can be trusted.
        out["problems"].append("the two arms receive different inputs (columns "
                               + ", ".join(out["arms"]["drifted_columns"]) + "): is the split broken?")
    return out


def experiment_stats(seconds: float, weights: dict, variants: dict, people: dict) -> dict:
    """The decision input: the window in hours, the current weights, each arm's numbers (see
    `prometheus.arm_numbers`) with its `people` (see `aggregates.people`). Pure: `abfleet
    simulate` builds every hourly look with it."""
    for v in VARIANTS:
        variants[v]["people"] = people[v]
    return {"window_hours": round(seconds / 3600.0, 4), "weights": weights, "variants": variants}


def replicas_check(variants: dict) -> dict:
    """Each arm's servers: how many Prometheus scraped during the experiment (`expected`),
    how many it scrapes now, and the missing ones by name (None: Prometheus did not answer)."""
    return {v: (variants.get(v) or {}).get("replicas") for v in VARIANTS}


def arms_check(settings: Settings, since: dt.datetime, arms: dict[str, str] | None = None) -> dict:
    """Do production and candidate get inputs from the same distribution since the start?

    Each arm (arm → model version; any version when not given) is read as its count and a
    sample of at most `settings.pipeline_sample_rows` rows drawn in the database."""
    try:
        import pandas as pd

        from abfleet import drift  # needs evidently, which only the pipeline extra installs
    except ImportError as exc:  # Evidently lives in the pipeline extra
        return {"drift_detected": None, "reason": f"not checked: {exc.name} is not installed"}
    frames, counts = {}, {}
    with open_store(settings, create_schema=False) as store:
        for v in VARIANTS:
            counts[v], rows = sampling.sample(store, since, settings.pipeline_sample_rows, variant=v,
                                              version=(arms or {}).get(v))
            frames[v] = pd.DataFrame(rows, columns=sampling.SAMPLE_COLUMNS)
    if not any(counts.values()):
        return {"drift_detected": None, "reason": "no predictions logged since the candidate started"}
    policy = drift.DriftPolicy(min_rows=settings.arms_min_rows, max_rows=settings.pipeline_sample_rows)
    summary = drift.arms_same_distribution(frames["production"], frames["candidate"], policy)
    return {**summary, "arm_rows": counts, "sampled_rows": {v: len(f) for v, f in frames.items()}}


def latest_drift(settings: Settings) -> dict | None:
    """The daily drift job's latest verdict, reported beside the decision: whether the inputs
    drifted, which columns, and whether both arms of the experiment see it. None when there
    is none (or the store cannot say)."""
    try:
        with open_store(settings, create_schema=False) as store:
            summary = store.get_state("drift_summary")
    except Exception:  # the store's trouble is reported by `people` already
        return None
    if not summary:
        return None
    keys = ("checked_at", "drift_detected", "drifted_columns", "prediction_drift", "target_drift", "report")
    return {**{k: summary.get(k) for k in keys},
            "touches_experiment": (summary.get("experiment") or {}).get("touched")}


def judge(collected: dict, policy: DecisionPolicy | None = None) -> dict:
    """The decision for collected stats; CONTINUE whenever there is nothing sound to judge."""
    problems = collected.get("problems") or []
    if collected.get("stats") is None:
        return {"decision": CONTINUE, "reasons": problems or ["nothing to evaluate"], "checks": {}}
    outcome = decide(collected["stats"], policy or decision_policy())
    if problems:
        if outcome["decision"] == PROMOTE:  # belt and braces: a problem never ends in a promotion
            outcome["decision"] = CONTINUE
        # A rollback leads with what rolled it back; anything else with what stands in the way.
        outcome["reasons"] = (outcome["reasons"] + problems if outcome["decision"] == ROLLBACK
                              else problems + outcome["reasons"])
    return outcome


def act(settings: Settings, collected: dict, outcome: dict, *, dry_run: bool = False, source: str = "cli") -> dict:
    """Apply the decision (aliases, tags, reload, webhook) and record it, continue included.

    The action applies to the versions `collected` read, never to whatever the aliases hold
    by now: when either alias moved since, nothing changes and the record says "refused" and
    why (`applied` false)."""
    decision = outcome["decision"]
    reasons = list(outcome.get("reasons") or [])
    record: dict[str, Any] = {"decision": decision, "reasons": reasons, "source": source, "applied": False,
                              "dry_run": dry_run, "production_version": collected.get("production_version"),
                              "candidate_version": collected.get("candidate_version"), "at": collected.get("at"),
                              "drift": collected.get("drift")}
    if dry_run:
        return record
    if decision in (PROMOTE, ROLLBACK) and collected.get("candidate_version"):
        action = registry.promote if decision == PROMOTE else registry.rollback
        try:
            record["action"] = action(settings, reasons, source, candidate=collected["candidate_version"],
                                      production=collected.get("production_version"))
        except registry.AliasMoved as exc:
            record["refused"] = f"refused: {exc}"
            record["reasons"] = reasons + [record["refused"]]
            log.warning("%s not applied: %s", decision, record["refused"])
        else:
            record["applied"] = True
            record["reloaded"] = fleet.reload_servers(settings)
        record["webhook"] = fleet.notify(settings, record)
    record["id"] = _record(settings, record, outcome, collected)
    return record


def evaluate(settings: Settings, *, dry_run: bool = False, source: str = "cli") -> dict:
    """One whole cycle; returns the record with the stats and checks behind it."""
    collected = collect(settings)
    outcome = judge(collected)
    record = act(settings, collected, outcome, dry_run=dry_run, source=source)
    return {**record, "stats": collected.get("stats"), "checks": report_checks(outcome, collected), "score": outcome.get("score"),
            "flags": outcome.get("flags", []), "blind": collected.get("blind", False)}


def manual(settings: Settings, decision: str, reason: str | None) -> dict:
    """`abfleet promote|rollback`: the same action and audit trail as the DAG's, on the
    versions the aliases hold when it reads them (refused, and recorded so, if they move)."""
    collected = collect(settings)
    if not collected.get("candidate_version"):
        raise registry.RegistryError(f"there is no @candidate to {decision}")
    outcome = {"decision": decision, "reasons": [f"manual {decision}: {reason or 'no reason given'}"], "checks": {}}
    return act(settings, collected, outcome, source="manual")


def report_checks(outcome: dict, collected: dict) -> dict:
    """The decision's checks, and the scrape check of every arm's servers (`replicas`)."""
    checks = dict(outcome.get("checks") or {})
    if collected.get("replicas") is not None:
        checks["replicas"] = collected["replicas"]
    return checks


def _record(settings: Settings, record: dict, outcome: dict, collected: dict) -> int:
    details = {"stats": collected.get("stats"), "checks": report_checks(outcome, collected), "score": outcome.get("score"),
               "flags": outcome.get("flags", []), "action": record.get("action"), "refused": record.get("refused"),
               "since": collected.get("since"), "blind": collected.get("blind", False),
               "arms": collected.get("arms"), "drift": collected.get("drift"), "problems": collected.get("problems")}
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
