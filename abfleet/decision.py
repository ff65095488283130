"""Promote / roll back / continue: a pure function of the experiment's cumulative stats.

`decide(stats, policy)` reads the counters gathered since the candidate started
receiving traffic (see the README contract) and returns a JSON-serialisable dict
`{"decision", "reasons", "checks", "score", "flags"}`. No I/O happens here.

Precedence (the first rule that fires wins):
  0. The candidate could not be reached for max_unreachable_minutes -> rollback.
  1. `window_hours` or request counts missing, or requests < min_requests in an arm -> continue.
  2. Guardrails (error rate, p95 latency) fail -> rollback. They run before the SRM and
     rating checks on purpose: rolling back is the safe direction, and a broken candidate
     must not keep its traffic share while ratings trickle in or the split looks odd.
  3. Sample-ratio mismatch (chi-square, p < srm_p_value) -> continue, flag "srm"; a flagged
     experiment is neither promoted nor rolled back on its (biased) comparison.
  4. Star ratings < min_ratings in an arm -> continue.
  5. Primary comparison significantly worse, or score >= rollback_score_loss worse -> rollback.
  6. Significantly better and score >= promote_score_gain better: promote if nothing is
     missing and window_hours >= min_runtime_hours, else continue ("would promote, ...").
  7. window_hours >= max_runtime_hours -> rollback ("no significant difference after ...");
     this also ends experiments stuck in rules 1, 3 and 4.
  8. Otherwise continue.
Missing data never promotes: any missing field needed for a promotion yields continue with
a reason naming it; evidence that is present may still roll back.

People, not events: when the arms carry `people` (each arm's users, and per measure the
users, events, sum and sum of squares of each user's mean; see `abfleet.aggregates`), the
ratings and APE are compared over users' means, `min_ratings` counts users, and the SRM
check tests the users split (users are what the router assigns). A user who rates a hundred
estimates weighs as one. Without `people` the histograms are used as they are (the
textbook case, and `abfleet decide --stats` files written before). `failovers` of an arm
are its requests the router had to serve from the other arm: they count as its requests
and its errors, not the other arm's.

Primary test: the normal-mixture mSPRT of Johari et al. ("Always valid inference") on the
difference in means, mixing prior N(0, (msprt_tau * pooled sd)^2). Its confidence sequence
stays valid however often `decide` is called, so hourly looks do not inflate false promotions.
Ratings are always tested; APE (lower is better) is added when both arms have >= min_ape_count
actual prices, and alpha is then split (ape_alpha_share to APE). The split only tightens the
rating test, so the overall error is <= alpha while one metric is used and <= alpha * (1 +
ape_alpha_share) over an experiment that switches APE on part-way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

ARMS = ("production", "candidate")

# The three outcomes of `decide`, and of every evaluation record.
PROMOTE = "promote"
ROLLBACK = "rollback"
CONTINUE = "continue"
OUTCOMES = (PROMOTE, ROLLBACK, CONTINUE)


@dataclass(frozen=True)
class DecisionPolicy:
    """Every threshold of `decide`; `abfleet.settings.decision_policy()` overrides field F
    with env var ABFLEET_DECISION_<F>."""

    min_requests: int = 50
    min_ratings: int = 10
    min_ape_count: int = 20
    srm_p_value: float = 0.001
    # Error-rate guardrail: rollback if cand > max(prod + increase, prod * ratio) AND a
    # sequential beta-binomial test at guardrail_alpha says the errors favour the candidate.
    max_error_rate_increase: float = 0.02
    max_error_rate_ratio: float = 2.0
    guardrail_alpha: float = 0.01
    # Latency guardrail: rollback if cand p95 > prod p95 * ratio AND exceeds it by the increase.
    max_p95_latency_ratio: float = 1.5
    min_p95_latency_increase_ms: float = 20.0
    # Reachability guardrail: rollback when the candidate has not answered a scrape this long.
    max_unreachable_minutes: float = 10.0
    alpha: float = 0.05  # two-sided, always valid: P(ever "better"/"worse" | no effect) <= alpha
    msprt_tau: float = 0.25  # mixing-prior sd of the effect, in pooled standard deviations
    ape_alpha_share: float = 0.5
    min_runtime_hours: float = 24.0
    max_runtime_hours: float = 168.0
    promote_score_gain: float = 0.05
    rollback_score_loss: float = 0.20
    accuracy_weight: float = 0.7
    latency_weight: float = 0.3
    ape_accuracy_share: float = 0.5  # weight of 1-APE inside accuracy when APE is used
    latency_scale_ms: float = 100.0  # latency score = 1 / (1 + p95 / scale)

    def __post_init__(self) -> None:
        for name in ("alpha", "srm_p_value", "guardrail_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.min_ratings < 2 or self.min_ape_count < 2 or self.min_requests < 1:
            raise ValueError("min_ratings and min_ape_count must be >= 2, min_requests >= 1")
        if not 0.0 <= self.min_runtime_hours <= self.max_runtime_hours:
            raise ValueError("need 0 <= min_runtime_hours <= max_runtime_hours")
        if not 0.0 <= self.ape_alpha_share < 1.0 or not 0.0 <= self.ape_accuracy_share <= 1.0:
            raise ValueError("ape_alpha_share must be in [0, 1), ape_accuracy_share in [0, 1]")
        if self.msprt_tau <= 0 or self.latency_scale_ms <= 0 or self.max_error_rate_ratio < 1:
            raise ValueError("msprt_tau and latency_scale_ms must be > 0, error ratio >= 1")
        if min(self.accuracy_weight, self.latency_weight, self.promote_score_gain,
               self.rollback_score_loss, self.max_error_rate_increase) < 0:
            raise ValueError("weights, score thresholds and error increase must be >= 0")


def _num(x: Any) -> float | None:
    """A finite, non-negative float, or None for missing / garbage / NaN / inf / negative."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(v) and v >= 0.0):
        return None
    return int(x) if isinstance(x, int) else v  # keep counts integral in the report


def _fin(x: float | None) -> float | None:
    # JSON output: NaN/inf become null.
    return x if x is not None and math.isfinite(x) else None


def _moments_ratings(h: Any) -> tuple[float, float, float] | None:
    """(n, mean, sample variance) of a {"1".."5": count} histogram; None if unusable."""
    if not isinstance(h, Mapping):
        return None
    n = s = ss = 0.0
    for star in range(1, 6):
        c = h.get(str(star), h.get(star, 0))
        c = _num(0 if c is None else c)
        if c is None:
            return None
        n += c
        s += c * star
        ss += c * star * star
    return _moments(n, s, ss)


def _moments(n: float, s: float, ss: float) -> tuple[float, float, float]:
    mean = s / n if n > 0 else 0.0
    var = max(ss - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return n, mean, var


def _moments_ape(a: Any) -> tuple[float, float, float] | None:
    """(n, mean, sample variance) of an {"count", "sum", "sum_sq"} APE summary; None (no APE
    data, which never promotes) when the count is unknown, or a sum is unknown while the count
    is not zero. Unknown is None, NaN, ±Inf or negative: never read as 0, a perfect score."""
    if not isinstance(a, Mapping):
        return None
    n, s, ss = _num(a.get("count")), _num(a.get("sum")), _num(a.get("sum_sq"))
    if n is None or (n > 0 and (s is None or ss is None)):
        return None
    return _moments(n, s or 0.0, ss or 0.0)


def _moments_people(people: Any, measure: str) -> tuple[float, float, float] | None:
    """(users, mean of the users' means, their sample variance) of one measure of `people`."""
    block = people.get(measure) if isinstance(people, Mapping) else None
    if not isinstance(block, Mapping):
        return None
    n, s, ss = _num(block.get("users")), _num(block.get("sum")), _num(block.get("sum_sq"))
    if n is None or (n > 0 and (s is None or ss is None)):
        return None
    return _moments(n, s or 0.0, ss or 0.0)


def _people_audit(people: Mapping[str, Any]) -> dict[str, Any]:
    """Users and events per arm, as the audit shows them."""
    def count(arm: str, measure: str, key: str):
        block = people[arm].get(measure) if isinstance(people[arm], Mapping) else None
        return _num(block.get(key)) if isinstance(block, Mapping) else None

    return {a: {"users": _num(people[a].get("users")) if isinstance(people[a], Mapping) else None,
                "rating_users": count(a, "ratings", "users"), "ratings": count(a, "ratings", "count"),
                "price_users": count(a, "ape", "users"), "actual_prices": count(a, "ape", "count")}
            for a in ARMS}


def _rerouted(req: dict, err: dict, failovers: dict) -> tuple[dict, dict]:
    """Requests and errors with each arm's failovers moved back to it (intent to treat)."""
    if any(req[a] is None for a in ARMS):
        return req, err
    f = {a: min(failovers[a] or 0, req[ARMS[1 - i]]) for i, a in enumerate(ARMS)}
    req = {a: req[a] + f[a] - f[ARMS[1 - i]] for i, a in enumerate(ARMS)}
    err = {a: None if err[a] is None else err[a] + f[a] for a in ARMS}
    return req, err


def msprt(diff: float, var: float, pooled_var: float, alpha: float, tau: float) -> dict[str, Any]:
    """Normal-mixture mSPRT for H0: difference = 0.

    `var` is the variance of `diff` (s_c^2/n_c + s_p^2/n_p); the mixing prior is
    N(0, tau^2 * pooled_var). Returns log likelihood ratio, the always-valid confidence
    sequence [ci_low, ci_high] at level 1-alpha, and `significant` (= 0 outside it, i.e.
    LR >= 1/alpha). Valid under continuous monitoring for the normal approximation.
    """
    t2 = max(tau * tau * pooled_var, 1e-12)  # floor: identical constant arms are not evidence
    v = max(var, 1e-12)
    log_lr = 0.5 * math.log(v / (v + t2)) + t2 * diff * diff / (2.0 * v * (v + t2))
    half = math.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + math.log((v + t2) / v)))
    significant = log_lr >= math.log(1.0 / alpha)
    return {"diff": diff, "se": math.sqrt(v), "log_lr": log_lr,
            "log_threshold": math.log(1.0 / alpha), "ci_low": diff - half, "ci_high": diff + half,
            "alpha": alpha, "significant": significant}


def _compare(m_p: tuple, m_c: tuple, alpha: float, tau: float, lower_better: bool) -> dict:
    (n_p, mu_p, v_p), (n_c, mu_c, v_c) = m_p, m_c
    pooled = ((n_p - 1) * v_p + (n_c - 1) * v_c) / max(n_p + n_c - 2, 1.0)
    out = msprt(mu_c - mu_p, v_c / n_c + v_p / n_p, pooled, alpha, tau)
    good = (out["diff"] < 0) == lower_better
    out["status"] = ("better" if good else "worse") if out["significant"] else "inconclusive"
    out.update(n_production=n_p, n_candidate=n_c, mean_production=mu_p, mean_candidate=mu_c)
    return out


def _srm(req: dict, weights: Any, p: DecisionPolicy) -> dict:
    """Chi-square goodness of fit (df = 1) of the request split against the weights."""
    w = [_num(weights.get(a)) if isinstance(weights, Mapping) else None for a in ARMS]
    if None in w or sum(w) <= 0 or min(w) <= 0:
        return {"status": "missing", "weights": None}
    total = req["production"] + req["candidate"]
    if total <= 0:
        return {"status": "missing", "weights": dict(zip(ARMS, w))}
    expected = [total * x / sum(w) for x in w]
    chi2 = sum((req[a] - e) ** 2 / e for a, e in zip(ARMS, expected))
    p_value = math.erfc(math.sqrt(chi2 / 2.0))  # chi-square survival function with 1 dof
    return {"status": "fail" if p_value < p.srm_p_value else "pass", "chi2": chi2,
            "p_value": p_value, "threshold": p.srm_p_value,
            "expected": dict(zip(ARMS, expected)), "observed": dict(req)}


def _error_guardrail(req: dict, err: dict, p: DecisionPolicy) -> dict:
    """Rollback when the candidate's error rate exceeds the limit AND a sequential test agrees.

    The test conditions on the total errors k: under H0 each lands in the candidate with
    probability pi0 = candidate share of requests. The Beta(1, 1)-binomial mixture likelihood
    ratio against that is a test martingale, so LR >= 1/guardrail_alpha stays valid under hourly
    looks, and unlike a normal approximation it is not fooled by one or two rare errors.
    """
    if err["production"] is None or err["candidate"] is None:
        return {"status": "missing"}
    n_p, n_c = req["production"], req["candidate"]
    x, k = min(err["candidate"], n_c), min(err["production"], n_p) + min(err["candidate"], n_c)
    r_p, r_c = (k - x) / n_p, x / n_c
    limit = max(r_p + p.max_error_rate_increase, r_p * p.max_error_rate_ratio)
    pi0 = n_c / (n_p + n_c)
    log_lr = (math.lgamma(1 + x) + math.lgamma(1 + k - x) - math.lgamma(2 + k)
              - x * math.log(pi0) - (k - x) * math.log(1.0 - pi0))
    significant = log_lr >= math.log(1.0 / p.guardrail_alpha)
    return {"status": "fail" if r_c > limit and significant else "pass",
            "rate_production": r_p, "rate_candidate": r_c, "limit": limit, "log_lr": log_lr,
            "log_threshold": math.log(1.0 / p.guardrail_alpha), "significant": significant}


def _latency_guardrail(p95: dict, p: DecisionPolicy) -> dict:
    lp, lc = p95["production"], p95["candidate"]
    if lp is None or lc is None:
        return {"status": "missing", "p95_production_ms": lp, "p95_candidate_ms": lc}
    limit = max(lp * p.max_p95_latency_ratio, lp + p.min_p95_latency_increase_ms)
    return {"status": "fail" if lc > limit else "pass", "p95_production_ms": lp,
            "p95_candidate_ms": lc, "ratio": _fin(lc / lp) if lp > 0 else None, "limit_ms": limit}


def _score(rating_mean: float | None, ape_mean: float | None, p95: float | None,
           p: DecisionPolicy) -> dict:
    """score = accuracy_weight * accuracy + latency_weight * latency, each in [0, 1].

    accuracy = (mean stars - 1) / 4, blended with 1 - mean APE (share ape_accuracy_share)
    when APE is used; latency = 1 / (1 + p95 / latency_scale_ms). None if an input is missing.
    """
    acc = None if rating_mean is None else (rating_mean - 1.0) / 4.0
    if acc is not None and ape_mean is not None:
        acc = (1 - p.ape_accuracy_share) * acc + p.ape_accuracy_share * (1.0 - min(ape_mean, 1.0))
    lat = None if p95 is None else 1.0 / (1.0 + p95 / p.latency_scale_ms)
    score = None if acc is None or lat is None else p.accuracy_weight * acc + p.latency_weight * lat
    return {"accuracy": acc, "latency": lat, "score": score}


def decide(stats: Mapping[str, Any], policy: DecisionPolicy | None = None) -> dict[str, Any]:
    """Decide "promote" | "rollback" | "continue" from cumulative A/B stats (module docstring).

    Never raises on malformed or partial input (it is treated as missing) and never promotes
    on missing data. The result is JSON-serialisable: plain str/int/float/bool/None only.
    """
    p = policy or DecisionPolicy()
    st = stats if isinstance(stats, Mapping) else {}
    raw_v = st.get("variants") if isinstance(st.get("variants"), Mapping) else {}
    arms = {a: raw_v.get(a) if isinstance(raw_v.get(a), Mapping) else {} for a in ARMS}
    window = _num(st.get("window_hours"))
    req, err = _rerouted({a: _num(arms[a].get("requests")) for a in ARMS},
                         {a: _num(arms[a].get("errors")) for a in ARMS},
                         {a: _num(arms[a].get("failovers")) for a in ARMS})
    p95 = {a: _num(arms[a].get("latency_p95_ms")) for a in ARMS}
    by_people = any("people" in arms[a] for a in ARMS)
    people = {a: arms[a].get("people") for a in ARMS}
    if by_people:
        rat = {a: _moments_people(people[a], "ratings") for a in ARMS}
        ape = {a: _moments_people(people[a], "ape") for a in ARMS}
    else:
        rat = {a: _moments_ratings(arms[a].get("ratings")) for a in ARMS}
        ape = {a: _moments_ape(arms[a].get("ape")) for a in ARMS}
    unreachable = _num(arms["candidate"].get("unreachable_minutes"))
    missing = ([] if window is not None else ["window_hours"]) + [
        f"{a}.{k}" for a in ARMS for k, v in (("requests", req[a]), ("errors", err[a]),
        ("latency_p95_ms", p95[a]), ("ratings", rat[a]), ("ape", ape[a])) if v is None]
    checks: dict[str, Any] = {}
    flags: list[str] = []
    out = {"decision": CONTINUE, "reasons": [], "checks": checks, "score": {}, "flags": flags}

    def finish(decision: str, reason: str) -> dict[str, Any]:
        if decision == CONTINUE and window is not None and window >= p.max_runtime_hours:
            decision = ROLLBACK  # rule 7 also ends experiments stuck earlier
            reason = f"no significant difference after {p.max_runtime_hours:g} h ({reason})"
        if missing:
            flags.append("missing_data")
        out["decision"] = decision
        out["reasons"].insert(0, reason)
        if missing:
            out["reasons"].append("missing data: " + ", ".join(missing))
        return out

    n_rat = {a: (rat[a][0] if rat[a] else None) for a in ARMS}
    checks["min_samples"] = {"requests": req, "ratings": n_rat, "min_requests": p.min_requests,
                             "min_ratings": p.min_ratings, "unit": "users" if by_people else "ratings"}
    if by_people:
        checks["people"] = _people_audit(people)
    checks["reachability"] = {"status": "missing" if unreachable is None else
                              "fail" if unreachable >= p.max_unreachable_minutes else "pass",
                              "unreachable_minutes": unreachable,
                              "max_unreachable_minutes": p.max_unreachable_minutes}
    # Rule 0: a candidate nobody can reach is failing every user it was meant to serve.
    if checks["reachability"]["status"] == "fail":
        return finish(ROLLBACK, f"guardrail failed: candidate unreachable for {unreachable:.1f} min "
                                f"(limit {p.max_unreachable_minutes:g} min)")
    checks["runtime"] = {"window_hours": window, "min_runtime_hours": p.min_runtime_hours,
                         "max_runtime_hours": p.max_runtime_hours,
                         "status": "missing" if window is None else
                         "expired" if window >= p.max_runtime_hours else
                         "ok" if window >= p.min_runtime_hours else "waiting"}
    # Rule 1: without request volume nothing (not even a guardrail) is meaningful.
    short = [a for a in ARMS if req[a] is None or req[a] < p.min_requests]
    checks["min_samples"]["status"] = ("missing" if None in req.values() else
                                       "fail" if short else "pass")
    if window is None or short:
        return finish(CONTINUE, "not enough requests yet: " + ", ".join(
            f"{a}={req[a]}" for a in short) if short else "window_hours unknown")

    # Rule 2: guardrails on the request-level metrics.
    checks["error_rate"] = _error_guardrail(req, err, p)
    checks["latency_p95"] = _latency_guardrail(p95, p)
    split = {a: _num(people[a].get("users")) if isinstance(people[a], Mapping) else None
             for a in ARMS} if by_people else req
    checks["srm"] = (_srm(split, st.get("weights"), p) if None not in split.values()
                     else {"status": "missing", "weights": None})
    checks["srm"]["unit"] = "users" if by_people else "requests"
    if checks["srm"]["status"] == "missing":
        missing.append("weights")
    few = [a for a in ARMS if n_rat[a] is None or n_rat[a] < p.min_ratings]
    checks["min_samples"]["status"] = ("missing" if None in n_rat.values() else
                                       "fail" if few else "pass")
    tripped = [k for k in ("error_rate", "latency_p95") if checks[k]["status"] == "fail"]
    if tripped:
        e, lat = checks["error_rate"], checks["latency_p95"]
        msgs = {"error_rate": f"candidate error rate {e.get('rate_candidate', 0):.4f} > limit "
                              f"{e.get('limit', 0):.4f} and significantly above production",
                "latency_p95": f"candidate p95 {lat.get('p95_candidate_ms')} ms > limit "
                               f"{lat.get('limit_ms', 0):.1f} ms"}
        return finish(ROLLBACK, "guardrail failed: " + "; ".join(msgs[k] for k in tripped))
    # Rule 3: a skewed split means the comparison below is biased.
    if checks["srm"]["status"] == "fail":
        flags.append("srm")
        return finish(CONTINUE, f"sample ratio mismatch (p={checks['srm']['p_value']:.2g} < "
                                  f"{p.srm_p_value:g}); not comparing arms")
    # Rule 4: ratings are the primary metric; fewer than the minimum is pure noise.
    if few:
        return finish(CONTINUE, "not enough star ratings yet: " + ", ".join(
            f"{a}={n_rat[a]}" for a in few))

    # Rule 5/6: primary comparison and composite score.
    use_ape = all(ape[a] is not None and ape[a][0] >= p.min_ape_count for a in ARMS)
    a_rat = p.alpha * (1.0 - p.ape_alpha_share) if use_ape else p.alpha
    checks["ratings"] = _compare(rat["production"], rat["candidate"], a_rat, p.msprt_tau, False)
    checks["ape"] = (_compare(ape["production"], ape["candidate"], p.alpha * p.ape_alpha_share,
                              p.msprt_tau, True) if use_ape else
                     {"status": "missing" if None in ape.values() else "unused",
                      "counts": {a: ape[a][0] if ape[a] else None for a in ARMS},
                      "min_ape_count": p.min_ape_count})
    statuses = [checks["ratings"]["status"], checks["ape"]["status"]]
    verdict = ("worse" if "worse" in statuses else
               "better" if "better" in statuses else "inconclusive")
    sc = {a: _score(rat[a][1], ape[a][1] if use_ape else None, p95[a], p) for a in ARMS}
    s_p, s_c = sc["production"]["score"], sc["candidate"]["score"]
    rel = (s_c - s_p) / s_p if s_p is not None and s_c is not None and s_p > 0 else None
    out["score"] = {**sc, "relative_change": _fin(rel), "uses_ape": use_ape,
                    "weights": {"accuracy": p.accuracy_weight, "latency": p.latency_weight}}
    checks["score"] = {"status": "missing" if rel is None else
                       "loss" if rel <= -p.rollback_score_loss else
                       "gain" if rel >= p.promote_score_gain else "neutral",
                       "relative_change": _fin(rel), "promote_score_gain": p.promote_score_gain,
                       "rollback_score_loss": p.rollback_score_loss}
    checks["primary"] = {"status": verdict}
    if verdict == "worse":
        bad = [k for k in ("ratings", "ape") if checks[k]["status"] == "worse"]
        return finish(ROLLBACK, "candidate significantly worse on " + ", ".join(bad))
    if rel is not None and rel <= -p.rollback_score_loss:
        return finish(ROLLBACK, f"candidate score {rel:+.1%} vs production "
                                  f"(limit -{p.rollback_score_loss:.0%})")
    if verdict == "better" and rel is not None and rel >= p.promote_score_gain:
        if missing or checks["srm"]["status"] != "pass":
            flags.append("would_promote")
            return finish(CONTINUE, "would promote, but data is missing")
        if window < p.min_runtime_hours:
            flags.append("would_promote")
            return finish(CONTINUE, f"would promote, waiting until {p.min_runtime_hours:g} h "
                                      f"(now {window:g} h)")
        return finish(PROMOTE, f"candidate significantly better, score {rel:+.1%}")
    if verdict == "better":
        return finish(CONTINUE, "candidate significantly better but score gain "
                                  f"{'unknown' if rel is None else f'{rel:+.1%}'} < "
                                  f"{p.promote_score_gain:.0%}")
    return finish(CONTINUE, "no significant difference yet")
