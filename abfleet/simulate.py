"""`abfleet simulate`: a Monte-Carlo of the whole decision path, with hourly looks.

Each run draws one experiment from a scenario (see docs/simulate.md and
`abfleet.sim_scenario`): users with heavy-tailed activity, hashed whole to an arm by the
weight in force (as nginx's sticky split does, so a weight change moves users), their
requests over a day/night cycle, errors, a latency histogram in the servers' buckets,
star ratings and actual prices with a personal bias (a Gaussian copula keeps each arm's
star distribution exactly), effects over time, segments, and flooders. Every hour it
builds the decision input exactly as the evaluation does (`prometheus.arm_numbers`,
`aggregates.measure`, `evaluation.experiment_stats`) and calls the real `decide`; a run
stops at its first promote or rollback. A run is vectorised with numpy: the per-user
means are aggregated once per run, hour by hour, from the sorted events.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np
from scipy.special import ndtr

from abfleet import aggregates, fleet, prometheus
from abfleet.api import MAX_APE
from abfleet.decision import ARMS, PROMOTE, ROLLBACK, decide
from abfleet.evaluation import experiment_stats
from abfleet.metrics import LATENCY_BUCKETS

OUTCOMES = ("promote", "early_rollback", "timeout_rollback", "running")
QUICK = {"accurate": 0, "too_high": 0, "too_low": 0}
STARS = np.arange(1, 6)


def tilt(probs: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """P(1..5 stars) of each row of `probs` (..., 5) tilted by exp(theta * stars) so that its
    mean moves by `shift` (...), clipped to the reachable 1..5."""
    probs = np.asarray(probs, dtype=float)
    target = np.clip(probs @ STARS + shift, 1.001, 4.999)
    lo, hi = np.full(target.shape, -40.0), np.full(target.shape, 40.0)
    for _ in range(60):  # bisection: the tilted mean is increasing in theta
        theta = (lo + hi) / 2
        w = probs * np.exp(theta[..., None] * (STARS - 3))
        mean = (w @ STARS) / w.sum(-1)
        lo, hi = np.where(mean < target, theta, lo), np.where(mean < target, hi, theta)
    w = probs * np.exp(((lo + hi) / 2)[..., None] * (STARS - 3))
    out = w / w.sum(-1, keepdims=True)
    return np.where((np.abs(shift) < 1e-12)[..., None], probs, out)


def histogram_quantile(q: float, cum_buckets: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """Prometheus's histogram_quantile over rows of cumulative bucket counts (..., len(bounds)+1,
    the last +Inf): linear inside the bucket, the highest finite bound when the rank lands in
    +Inf, NaN when a row is empty."""
    total = cum_buckets[..., -1]
    rank = q * total
    idx = (cum_buckets < rank[..., None]).sum(-1)
    idx = np.minimum(idx, len(bounds))
    upper = np.array(bounds + (bounds[-1],))[idx]
    lower = np.where(idx > 0, np.array((0.0,) + bounds)[idx], 0.0)
    below = np.where(idx > 0, np.take_along_axis(cum_buckets, np.maximum(idx - 1, 0)[..., None], -1)[..., 0], 0.0)
    inside = np.take_along_axis(cum_buckets, idx[..., None], -1)[..., 0] - below
    frac = np.where(inside > 0, (rank - below) / np.maximum(inside, 1), 1.0)
    value = np.where(idx >= len(bounds), bounds[-1], lower + (upper - lower) * frac)
    return np.where(total > 0, value, np.nan)


class Plan:
    """What every run of a scenario shares: hourly rates, weights, star CDFs, APE medians."""

    def __init__(self, sc: dict):
        self.sc, self.H = sc, sc["hours"]
        H, t = self.H, sc["traffic"]
        r = t["day_night_ratio"]
        hours = np.arange(H) + 0.5
        shape = 1 + (r - 1) / (r + 1) * np.cos(2 * np.pi * (hours - t["peak_hour"]) / 24)
        self.rate = t["requests_per_day"] / 24.0 * shape  # requests per hour, all arms
        self.cum_rate = np.cumsum(self.rate)
        starts = [w["from_hour"] for w in sc["weights"]]
        self.periods = [(int(math.ceil(s)), int(math.ceil(e)) if e < H else H, w["candidate"])
                        for s, e, w in zip(starts, starts[1:] + [H], sc["weights"])]
        self.periods = [p for p in self.periods if p[0] < p[1]]
        self.wc = np.zeros(H)
        for s, e, w in self.periods:
            self.wc[s:e] = w
        segs = sc["segments"] or [{"share": 1.0, **{a: {"stars": None, "stars_shift": 0.0, "ape_factor": 1.0,
                                                        "rating_rate_factor": 1.0, "price_rate_factor": 1.0}
                                                    for a in ARMS}}]
        self.shares = np.array([s["share"] for s in segs])
        S = len(segs)
        shift = np.zeros((2, H, S))
        ape_med = np.zeros((2, H, S))
        self.err = np.zeros((2, H))
        base = np.zeros((2, H, S, 5))
        self.rating_rate = np.zeros((2, S))
        self.price_rate = np.zeros((2, S))
        for i, a in enumerate(ARMS):
            arm = sc["arms"][a]
            self.err[i] = arm["error_rate"]
            hour_shift, hour_ape = np.full(H, arm["stars_shift"]), np.full(H, arm["ape"]["median"])
            for e in sc["effects"]:
                if e["arm"] != a:
                    continue
                span = (np.arange(H) + 1 > e["from_hour"]) & (np.arange(H) + 1 <= e["to_hour"])
                hour_shift[span] += e["stars_shift"]
                hour_ape[span] *= e["ape_factor"]
                if e["error_rate"] is not None:
                    self.err[i, span] = e["error_rate"]
            for j, s in enumerate(segs):
                base[i, :, j] = s[a]["stars"] or arm["stars"]
                shift[i, :, j] = hour_shift + s[a]["stars_shift"]
                ape_med[i, :, j] = hour_ape * s[a]["ape_factor"]
                self.rating_rate[i, j] = sc["feedback"]["rating_rate"] * arm["rating_rate_factor"] * s[a]["rating_rate_factor"]
                self.price_rate[i, j] = sc["feedback"]["price_rate"] * arm["price_rate_factor"] * s[a]["price_rate_factor"]
        self.star_cdf = np.cumsum(tilt(base, shift), -1)[..., :4]  # (arm, hour, segment, 4)
        self.ape_median = ape_med
        self.ape_sigma = np.array([sc["arms"][a]["ape"]["sigma"] for a in ARMS])
        self.ape_outlier = [(sc["arms"][a]["ape"]["outlier_rate"], sc["arms"][a]["ape"]["outlier_ape"]) for a in ARMS]
        bounds = np.array(LATENCY_BUCKETS + (math.inf,))
        self.lat_probs, self.lat_mean_s, self.cold = [], [], []
        for a in ARMS:
            lat = sc["arms"][a]["latency"]
            mu, sg = math.log(lat["median_ms"] / 1000.0), lat["sigma"]
            cdf = ndtr((np.log(bounds) - mu) / sg) if sg > 0 else (bounds >= math.exp(mu)).astype(float)
            self.lat_probs.append(np.diff(np.concatenate([[0.0], cdf])))
            self.lat_mean_s.append(math.exp(mu + sg * sg / 2))
            cold = np.zeros(len(bounds))
            cold[int(np.searchsorted(bounds, lat["cold_start_ms"] / 1000.0))] = lat["cold_start_requests"]
            self.cold.append((cold, lat["cold_start_requests"], lat["cold_start_ms"] / 1000.0))


def _arm_of(hashes: np.ndarray, hours: np.ndarray, wc: np.ndarray) -> np.ndarray:
    """0 (production) or 1 (candidate) for each user hash at each hour, as the sticky split does."""
    return (hashes < wc[hours]).astype(np.int64)


def _people_series(arm: np.ndarray, hour: np.ndarray, user: np.ndarray, value: np.ndarray, H: int
                   ) -> np.ndarray:
    """Cumulative (users, events, sum of user means, sum of squared user means) per arm and
    hour, shape (4, 2, H), from the events' arm, hour, user and value."""
    out = np.zeros((4, 2 * H))
    if len(arm) == 0:
        return out.reshape(4, 2, H)
    key = arm * (int(user.max()) + 1) + user
    order = np.lexsort((hour, key))
    key, hr, val, cell = key[order], hour[order], value[order], (arm * H + hour)[order]
    n = len(key)
    new_key = np.ones(n, bool)
    new_key[1:] = key[1:] != key[:-1]
    start = np.maximum.accumulate(np.where(new_key, np.arange(n), 0))
    cs = np.cumsum(val)
    cum_sum = cs - np.where(start > 0, cs[start - 1], 0.0)
    cum_n = np.arange(n) - start + 1
    last = np.ones(n, bool)  # the last event of a (user, hour): the user's mean after that hour
    last[:-1] = (key[1:] != key[:-1]) | (hr[1:] != hr[:-1])
    idx = np.flatnonzero(last)
    mean = cum_sum[idx] / cum_n[idx]
    first = np.concatenate([[True], key[idx][1:] != key[idx][:-1]])
    prev = np.concatenate([[0.0], mean[:-1]])
    prev = np.where(first, 0.0, prev)
    c = cell[idx]
    out[0] = np.bincount(c, first, 2 * H)
    out[1] = np.bincount(cell, None, 2 * H)
    out[2] = np.bincount(c, mean - prev, 2 * H)
    out[3] = np.bincount(c, mean * mean - prev * prev, 2 * H)
    return np.cumsum(out.reshape(4, 2, H), axis=2)


def _events(plan: Plan, rng: np.random.Generator, mean_req: np.ndarray, rate: np.ndarray, users: dict | None,
            icc: float, z_key: str) -> tuple[np.ndarray, ...]:
    """Events (feedback of one kind) of the regular users: arm, hour, segment, user, latent."""
    H, S = plan.H, len(plan.shares)
    n = rng.poisson(mean_req[:, :, None] * plan.shares[None, None, :] * rate[:, None, :])
    cells = np.repeat(np.arange(2 * H * S), n.ravel())
    arm, hour, seg = cells // (H * S), (cells // S) % H, cells % S
    k = len(cells)
    if users is None:  # anonymous: every event is its own user
        user = np.arange(k)
        z = np.zeros(k)
    else:
        user = np.zeros(k, dtype=np.int64)
        for s, e, w in plan.periods:
            in_period = (hour >= s) & (hour < e)
            for i in (0, 1):
                sel = np.flatnonzero(in_period & (arm == i))
                members = np.flatnonzero((users["hash"] < w) == bool(i))
                if len(sel) and len(members):
                    cw = np.cumsum(users["activity"][members])
                    pick = np.searchsorted(cw, rng.random(len(sel)) * cw[-1])
                    user[sel] = members[np.minimum(pick, len(members) - 1)]
        z = users[z_key][user]
    latent = math.sqrt(icc) * z + math.sqrt(1 - icc) * rng.standard_normal(k)
    return arm, hour, seg, user, latent


def _stars_of(plan: Plan, arm: np.ndarray, hour: np.ndarray, seg: np.ndarray, latent: np.ndarray) -> np.ndarray:
    return 1 + (ndtr(latent)[:, None] > plan.star_cdf[arm, hour, seg]).sum(1)


def _flooders(plan: Plan, rng: np.random.Generator, first_id: int) -> tuple[np.ndarray, ...]:
    """The flooders' ratings: arm, hour, user, stars."""
    parts = []
    for fl in plan.sc["flooders"]:
        n = fl["users"]
        each = rng.integers(fl["ratings_each"]["low"], fl["ratings_each"]["high"] + 1, n)
        user = np.repeat(np.arange(n), each)
        k = len(user)
        hour = np.minimum(rng.uniform(fl["from_hour"], fl["to_hour"], k).astype(np.int64), plan.H - 1)
        if fl["arm"] == "assigned":
            arm = _arm_of(rng.random(n)[user], hour, plan.wc)
        else:
            arm = np.full(k, ARMS.index(fl["arm"]))
        if fl["stars"] == "arm":
            icc = fl["bias_icc"]
            latent = math.sqrt(icc) * rng.standard_normal(n)[user] + math.sqrt(1 - icc) * rng.standard_normal(k)
            seg = rng.choice(len(plan.shares), k, p=plan.shares)
            stars = _stars_of(plan, arm, hour, seg, latent)
        elif isinstance(fl["stars"], list):
            stars = rng.choice(STARS, k, p=fl["stars"])
        else:
            stars = np.full(k, fl["stars"])
        parts.append((arm, hour, user + first_id, stars))
        first_id += n
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    return tuple(np.concatenate(x) for x in zip(*parts))


def _first_seen(plan: Plan, rng: np.random.Generator, users: dict | None, n_ids: int,
                seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Cumulative users answered per arm and hour (2, H): each user's first request in an arm
    (an exponential waiting time in units of traffic, per weight period), or an earlier event."""
    H = plan.H
    first = np.full((2, n_ids), H, dtype=np.int64)
    if users is not None:
        act = users["activity"]
        for s, e, w in plan.periods:
            start = plan.cum_rate[s - 1] if s > 0 else 0.0
            arrival = start + rng.exponential(size=len(act)) / np.maximum(act, 1e-300)
            hour = np.searchsorted(plan.cum_rate, arrival)
            arm = (users["hash"] < w).astype(np.int64)
            ok = hour < e
            idx = np.flatnonzero(ok)
            np.minimum.at(first, (arm[idx], idx), hour[idx])
    for arm, hour, user in seen:
        np.minimum.at(first, (arm, user), hour)
    counts = np.zeros((2, H + 1))
    for i in (0, 1):
        counts[i] = np.bincount(first[i], minlength=H + 1)[: H + 1]
    return np.cumsum(counts[:, :H], axis=1)


def run_once(plan: Plan, rng: np.random.Generator) -> dict[str, Any]:
    """One experiment; the first promote or rollback ends it."""
    sc, H = plan.sc, plan.H
    U = sc["users"]["count"]
    users = None
    if U:
        act = rng.lognormal(0.0, sc["users"]["activity_sigma"], U) if sc["users"]["activity_sigma"] > 0 else np.ones(U)
        users = {"activity": act / act.sum(), "hash": rng.random(U),
                 "z_rating": rng.standard_normal(U), "z_ape": rng.standard_normal(U)}
        share_c = np.zeros(H)
        for s, e, w in plan.periods:
            share_c[s:e] = users["activity"][users["hash"] < w].sum()
        mean_req = plan.rate * np.stack([1 - share_c, share_c])
        req = rng.poisson(mean_req).astype(float)
    else:
        total = rng.poisson(plan.rate)
        cand = rng.binomial(total, plan.wc)
        req = np.stack([total - cand, cand]).astype(float)
        mean_req = plan.rate * np.stack([1 - plan.wc, plan.wc])
    r_arm, r_hour, r_seg, r_user, r_lat = _events(plan, rng, mean_req, plan.rating_rate, users,
                                                  sc["users"]["rating_icc"], "z_rating")
    stars = _stars_of(plan, r_arm, r_hour, r_seg, r_lat)
    p_arm, p_hour, p_seg, p_user, p_lat = _events(plan, rng, mean_req, plan.price_rate, users,
                                                  sc["users"]["ape_icc"], "z_ape")
    ape = plan.ape_median[p_arm, p_hour, p_seg] * np.exp(plan.ape_sigma[p_arm] * p_lat)
    for i, (rate, value) in enumerate(plan.ape_outlier):
        if rate > 0:
            hit = (p_arm == i) & (rng.random(len(ape)) < rate)
            ape[hit] = value
    ape = np.minimum(ape, MAX_APE)
    first_id = max(U, len(r_arm), len(p_arm))
    f_arm, f_hour, f_user, f_stars = _flooders(plan, rng, first_id)
    req += np.bincount(f_arm * H + f_hour, minlength=2 * H).reshape(2, H)
    r_arm, r_hour = np.concatenate([r_arm, f_arm]), np.concatenate([r_hour, f_hour])
    r_user, stars = np.concatenate([r_user, f_user]), np.concatenate([stars, f_stars])
    n_ids = first_id + (int(f_user.max()) + 1 - first_id if len(f_user) else 0)
    if users is None:  # anonymous: each request is a user; flooders are counted by their first event
        answered = np.cumsum(req - np.bincount(f_arm * H + f_hour, minlength=2 * H).reshape(2, H), axis=1)
        answered += _first_seen(plan, rng, None, n_ids, [(f_arm, f_hour, f_user)])
    else:
        answered = _first_seen(plan, rng, users, n_ids, [(r_arm, r_hour, r_user), (p_arm, p_hour, p_user)])
    errors = rng.binomial(req.astype(np.int64), plan.err)
    cum_req, cum_err = np.cumsum(req, axis=1), np.cumsum(errors, axis=1)
    p95, mean = [], []
    for i in (0, 1):
        hist = rng.multinomial(req[i].astype(np.int64), plan.lat_probs[i]).astype(float)
        cold, n_cold, cold_s = plan.cold[i]
        hist[0] += cold
        p95.append(histogram_quantile(0.95, np.cumsum(np.cumsum(hist, axis=0), axis=1), LATENCY_BUCKETS))
        mean.append((cum_req[i] * plan.lat_mean_s[i] + n_cold * cold_s) / np.maximum(cum_req[i] + n_cold, 1))
    hist = np.cumsum(np.bincount((r_arm * H + r_hour) * 5 + stars - 1, minlength=10 * H).reshape(2, H, 5), axis=1)
    cell = p_arm * H + p_hour
    ape_sums = np.cumsum(np.stack([np.bincount(cell, w, 2 * H) for w in (None, ape, ape * ape)]).reshape(3, 2, H),
                         axis=2)
    rat_people = _people_series(r_arm, r_hour, r_user, stars.astype(float), H)
    ape_people = _people_series(p_arm, p_hour, p_user, ape, H)
    return _looks(plan, cum_req.tolist(), cum_err.tolist(), [x.tolist() for x in p95], [x.tolist() for x in mean],
                  hist.tolist(), ape_sums.tolist(), answered.tolist(), rat_people.tolist(), ape_people.tolist())


def _looks(plan: Plan, req, err, p95, mean, hist, ape, answered, rat_people, ape_people) -> dict[str, Any]:
    """The hourly looks: the decision input as the evaluation builds it, the real `decide`."""
    policy = plan.sc["policy"]
    srm_looks = looks = 0
    outcome: dict[str, Any] = {}
    for h in range(plan.H):
        variants, people = {}, {}
        for i, a in enumerate(ARMS):
            variants[a] = {**prometheus.arm_numbers(
                str(i + 1), requests=req[i][h], errors=err[i][h], failovers=0.0,
                p95_s=None if p95[i][h] != p95[i][h] else p95[i][h], mean_s=mean[i][h],
                ratings={str(k + 1): hist[i][h][k] for k in range(5)}, quick=QUICK,
                ape=(ape[0][i][h], ape[1][i][h], ape[2][i][h])),
                "unreachable_minutes": 0.0, "replicas": {"expected": 1, "scraped": 1, "missing": []}}
            people[a] = {"users": int(answered[i][h]),
                         "ratings": aggregates.measure(*(rat_people[m][i][h] for m in range(4))),
                         "ape": aggregates.measure(*(ape_people[m][i][h] for m in range(4)))}
        stats = experiment_stats((h + 1) * 3600, fleet.weights(plan.wc[h] * 100), variants, people)
        outcome = decide(stats, policy)
        looks += 1
        srm_looks += "srm" in outcome["flags"]
        if h == 0:
            plan_check = outcome["checks"].get("power_plan")
        if outcome["decision"] in (PROMOTE, ROLLBACK):
            break
    reason = outcome["reasons"][0] if outcome["reasons"] else ""
    kind = ("promote" if outcome["decision"] == PROMOTE else "running" if outcome["decision"] != ROLLBACK else
            "timeout_rollback" if reason.startswith("no significant difference after") else "early_rollback")
    return {"outcome": kind, "hour": h + 1, "reason": reason, "looks": looks, "srm_looks": srm_looks,
            "better_below_margin": reason.startswith("candidate significantly better but"),
            "power_plan_unreachable": bool(plan_check and plan_check.get("reachable") is False)}


def reason_kind(reason: str) -> str:
    """A reason with its numbers replaced by #, so that reasons group by kind."""
    return re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", reason)


def simulate(sc: dict, runs: int, seed: int) -> dict[str, Any]:
    """`runs` experiments of a validated scenario: shares of each outcome, median hours to
    each, the reasons' histogram, and each `expect` bar with what was measured."""
    started = time.perf_counter()
    plan = Plan(sc)
    rng = np.random.default_rng(seed)
    results = [run_once(plan, rng) for _ in range(runs)]
    seconds = time.perf_counter() - started
    shares = {k: sum(r["outcome"] == k for r in results) / runs for k in OUTCOMES}
    hours = {k: [r["hour"] for r in results if r["outcome"] == k] for k in OUTCOMES}
    measured = {
        "promote_at_most": shares["promote"], "promote_at_least": shares["promote"],
        "early_rollback_at_most": shares["early_rollback"],
        "early_rollback_at_least": shares["early_rollback"],
        "median_promote_hours_at_most": statistics.median(hours["promote"]) if hours["promote"] else None,
        "srm_looks_at_most": sum(r["srm_looks"] for r in results) / max(1, sum(r["looks"] for r in results)),
        "better_below_margin_at_least": sum(r["better_below_margin"] for r in results) / runs,
        "power_plan_says_unreachable": sum(r["power_plan_unreachable"] for r in results) / runs,
    }
    expect = {}
    for key, bar in sc["expect"].items():
        value = measured[key]
        ok = (value is not None and (value <= bar if key.endswith("at_most") else
                                     value >= 0.9 if key == "power_plan_says_unreachable" else value >= bar))
        expect[key] = {"bar": bar, "measured": value, "pass": ok}
    return {"scenario": sc["name"], "description": sc["description"], "runs": runs, "seed": seed,
            "shares": shares, "median_hours": {k: statistics.median(v) if v else None for k, v in hours.items()},
            "reasons": dict(Counter(reason_kind(r["reason"]) for r in results).most_common()),
            "srm_looks": measured["srm_looks_at_most"], "expect": expect,
            "passed": all(e["pass"] for e in expect.values()),
            "seconds": round(seconds, 3), "seconds_per_1000_runs": round(seconds / runs * 1000, 2)}
