"""The scenario file of `abfleet simulate`: read, fill in defaults, validate.

Every field, its unit and its default are documented in docs/simulate.md. `load` returns a
plain dict with every default filled in, or raises ValueError naming the field at fault
(`arms.candidate.stars: ...`), which the command turns into a one-line message and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from abfleet.decision import ARMS, DecisionPolicy

# A realistic, mildly left-skewed 1..5 star shape (the textbook simulation's).
DEFAULT_STARS = [0.10, 0.13, 0.24, 0.30, 0.23]
EXPECT_KEYS = ("promote_at_most", "promote_at_least", "early_rollback_at_most", "early_rollback_at_least",
               "median_promote_hours_at_most", "srm_looks_at_most", "better_below_margin_at_least",
               "power_plan_says_unreachable")

TOP = {"name": None, "description": "", "hours": 168, "policy": {}, "traffic": {}, "users": {}, "feedback": {},
       "arms": {}, "effects": [], "segments": [], "weights": [{"from_hour": 0, "candidate": 0.2}],
       "flooders": [], "expect": {}}
TRAFFIC = {"requests_per_day": 2000.0, "day_night_ratio": 3.0, "peak_hour": 14.0}
USERS = {"count": 1000, "activity_sigma": 1.0, "rating_icc": 0.0, "ape_icc": 0.0}
FEEDBACK = {"rating_rate": 0.10, "price_rate": 0.0}
APE = {"median": 0.20, "sigma": 0.6, "outlier_rate": 0.0, "outlier_ape": 20.0}
LATENCY = {"median_ms": 6.0, "sigma": 0.5, "cold_start_requests": 0, "cold_start_ms": 2000.0}
ARM = {"stars": DEFAULT_STARS, "stars_shift": 0.0, "ape": {}, "latency": {}, "error_rate": 0.002,
       "rating_rate_factor": 1.0, "price_rate_factor": 1.0}
EFFECT = {"arm": "candidate", "from_hour": 0.0, "to_hour": None, "stars_shift": 0.0, "ape_factor": 1.0,
          "error_rate": None}
SEGMENT_ARM = {"stars": None, "stars_shift": 0.0, "ape_factor": 1.0, "rating_rate_factor": 1.0,
               "price_rate_factor": 1.0}
SEGMENT = {"name": None, "share": None, "production": {}, "candidate": {}}
FLOODER = {"users": 1, "ratings_each": 50, "stars": 1, "arm": "candidate", "from_hour": 0.0, "to_hour": None,
           "bias_icc": None}


def _fill(raw: Any, defaults: dict, where: str) -> dict:
    """`raw` (an object) over `defaults`; an unknown key or a non-object is an error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'scenario'}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"{where + '.' if where else ''}{unknown[0]}: unknown field (known: {', '.join(defaults)})")
    return {**defaults, **raw}


def _number(obj: dict, key: str, where: str, lo: float | None = None, hi: float | None = None,
            integer: bool = False, lo_open: bool = False, optional: bool = False) -> None:
    value = obj[key]
    name = f"{where}.{key}" if where else key
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: must be <= {hi:g}, got {value!r}")
    obj[key] = int(value) if integer else float(value)


def _stars(value: Any, name: str) -> list[float]:
    if (not isinstance(value, list) or len(value) != 5
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in value)):
        raise ValueError(f"{name}: expected five non-negative numbers (the shares of 1..5 stars), got {value!r}")
    if sum(value) <= 0:
        raise ValueError(f"{name}: the shares of 1..5 stars add up to 0")
    return [x / sum(value) for x in value]


def _hours(obj: dict, where: str, hours: int) -> None:
    _number(obj, "from_hour", where, 0, hours)
    if obj["to_hour"] is None:
        obj["to_hour"] = float(hours)
    _number(obj, "to_hour", where, obj["from_hour"], None)


def _arm(raw: Any, where: str) -> dict:
    arm = _fill(raw, ARM, where)
    arm["stars"] = _stars(arm["stars"], f"{where}.stars")
    _number(arm, "stars_shift", where, -4, 4)
    _number(arm, "error_rate", where, 0, 1)
    for key in ("rating_rate_factor", "price_rate_factor"):
        _number(arm, key, where, 0)
    arm["ape"] = _fill(arm["ape"], APE, f"{where}.ape")
    _number(arm["ape"], "median", f"{where}.ape", 0, lo_open=True)
    _number(arm["ape"], "sigma", f"{where}.ape", 0)
    _number(arm["ape"], "outlier_rate", f"{where}.ape", 0, 1)
    _number(arm["ape"], "outlier_ape", f"{where}.ape", 0)
    arm["latency"] = _fill(arm["latency"], LATENCY, f"{where}.latency")
    _number(arm["latency"], "median_ms", f"{where}.latency", 0, lo_open=True)
    _number(arm["latency"], "sigma", f"{where}.latency", 0)
    _number(arm["latency"], "cold_start_requests", f"{where}.latency", 0, integer=True)
    _number(arm["latency"], "cold_start_ms", f"{where}.latency", 0)
    return arm


def _policy(raw: Any, base: DecisionPolicy) -> DecisionPolicy:
    fields = {f.name: f for f in dataclasses.fields(DecisionPolicy)}
    if not isinstance(raw, dict):
        raise ValueError(f"policy: expected a JSON object, got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"policy.{key}: not a decision policy field")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"policy.{key}: expected a number, got {value!r}")
    try:
        return dataclasses.replace(base, **raw)
    except ValueError as exc:
        raise ValueError(f"policy: {exc}") from None


def validate(raw: Any, base_policy: DecisionPolicy, name: str = "scenario") -> dict:
    """The scenario with every default filled in; ValueError naming the field otherwise."""
    sc = _fill(raw, TOP, "")
    sc["name"] = sc["name"] if isinstance(sc["name"], str) and sc["name"] else name
    _number(sc, "hours", "", 1, 24 * 60, integer=True)
    hours = sc["hours"]
    sc["policy"] = _policy(sc["policy"], base_policy)
    sc["traffic"] = t = _fill(sc["traffic"], TRAFFIC, "traffic")
    _number(t, "requests_per_day", "traffic", 0, 1e8, lo_open=True)
    _number(t, "day_night_ratio", "traffic", 1)
    _number(t, "peak_hour", "traffic", 0, 24)
    sc["users"] = u = _fill(sc["users"], USERS, "users")
    _number(u, "count", "users", 0, 2_000_000, integer=True)
    _number(u, "activity_sigma", "users", 0, 5)
    _number(u, "rating_icc", "users", 0, 1)
    _number(u, "ape_icc", "users", 0, 1)
    sc["feedback"] = f = _fill(sc["feedback"], FEEDBACK, "feedback")
    _number(f, "rating_rate", "feedback", 0, 1)
    _number(f, "price_rate", "feedback", 0, 1)
    sc["arms"] = _fill(sc["arms"], {a: {} for a in ARMS}, "arms")
    for a in ARMS:
        sc["arms"][a] = _arm(sc["arms"][a], f"arms.{a}")
    sc["effects"] = _list(sc["effects"], "effects")
    for i, raw_e in enumerate(sc["effects"]):
        where = f"effects[{i}]"
        e = sc["effects"][i] = _fill(raw_e, EFFECT, where)
        _choice(e, "arm", where, ARMS)
        _hours(e, where, hours)
        _number(e, "stars_shift", where, -4, 4)
        _number(e, "ape_factor", where, 0, lo_open=True)
        _number(e, "error_rate", where, 0, 1, optional=True)
    sc["segments"] = _list(sc["segments"], "segments")
    for i, raw_s in enumerate(sc["segments"]):
        where = f"segments[{i}]"
        s = sc["segments"][i] = _fill(raw_s, SEGMENT, where)
        s["name"] = s["name"] if isinstance(s["name"], str) and s["name"] else f"segment{i}"
        _number(s, "share", where, 0, 1, lo_open=True)
        for a in ARMS:
            s[a] = _fill(s[a], SEGMENT_ARM, f"{where}.{a}")
            if s[a]["stars"] is not None:
                s[a]["stars"] = _stars(s[a]["stars"], f"{where}.{a}.stars")
            _number(s[a], "stars_shift", f"{where}.{a}", -4, 4)
            _number(s[a], "ape_factor", f"{where}.{a}", 0, lo_open=True)
            for key in ("rating_rate_factor", "price_rate_factor"):
                _number(s[a], key, f"{where}.{a}", 0)
    if sc["segments"] and abs(sum(s["share"] for s in sc["segments"]) - 1.0) > 1e-6:
        raise ValueError(f"segments: the shares add up to {sum(s['share'] for s in sc['segments']):g}, not 1")
    sc["weights"] = _list(sc["weights"], "weights")
    if not sc["weights"]:
        raise ValueError("weights: at least one entry ({\"from_hour\": 0, \"candidate\": 0.2}) is needed")
    for i, raw_w in enumerate(sc["weights"]):
        where = f"weights[{i}]"
        w = sc["weights"][i] = _fill(raw_w, {"from_hour": None, "candidate": None}, where)
        _number(w, "from_hour", where, 0, hours)
        _number(w, "candidate", where, 0, 1, lo_open=True)
        if w["candidate"] >= 1:
            raise ValueError(f"{where}.candidate: must be < 1 (production keeps a share), got {w['candidate']!r}")
        if i == 0 and w["from_hour"] != 0:
            raise ValueError(f"{where}.from_hour: the first weight starts at hour 0")
        if i and w["from_hour"] <= sc["weights"][i - 1]["from_hour"]:
            raise ValueError(f"{where}.from_hour: must be later than the previous entry's")
    sc["flooders"] = _list(sc["flooders"], "flooders")
    for i, raw_f in enumerate(sc["flooders"]):
        where = f"flooders[{i}]"
        fl = sc["flooders"][i] = _fill(raw_f, FLOODER, where)
        _number(fl, "users", where, 1, 1_000_000, integer=True)
        each = fl["ratings_each"]
        each = each if isinstance(each, list) else [each, each]
        if len(each) != 2:
            raise ValueError(f"{where}.ratings_each: expected a number or [low, high], got {fl['ratings_each']!r}")
        fl["ratings_each"] = {"low": each[0], "high": each[1]}
        _number(fl["ratings_each"], "low", f"{where}.ratings_each", 1, 100_000, integer=True)
        _number(fl["ratings_each"], "high", f"{where}.ratings_each", fl["ratings_each"]["low"], 100_000, integer=True)
        stars = fl["stars"]
        if isinstance(stars, list):
            fl["stars"] = _stars(stars, f"{where}.stars")
        elif stars != "arm" and (isinstance(stars, bool) or stars not in (1, 2, 3, 4, 5)):
            raise ValueError(f"{where}.stars: expected 1..5, five shares, or \"arm\", got {stars!r}")
        _choice(fl, "arm", where, ARMS + ("assigned",))
        _hours(fl, where, hours)
        _number(fl, "bias_icc", where, 0, 1, optional=True)
        if fl["bias_icc"] is None:
            fl["bias_icc"] = u["rating_icc"]
    sc["expect"] = _fill(sc["expect"], {k: None for k in EXPECT_KEYS}, "expect")
    sc["expect"] = {k: v for k, v in sc["expect"].items() if v is not None}
    for key, value in sc["expect"].items():
        if key == "power_plan_says_unreachable":
            if value is not True:
                raise ValueError(f"expect.{key}: expected true, got {value!r}")
        else:
            _number(sc["expect"], key, "expect", 0, 1 if not key.endswith("hours_at_most") else None)
    return sc


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a JSON list, got {type(value).__name__}")
    return list(value)


def _choice(obj: dict, key: str, where: str, options: tuple) -> None:
    if obj[key] not in options:
        raise ValueError(f"{where}.{key}: expected one of {', '.join(options)}, got {obj[key]!r}")


def load(path: str | Path, base_policy: DecisionPolicy) -> dict:
    """Read and validate a scenario file (ValueError naming the file and field otherwise)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--scenario {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--scenario {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return validate(raw, base_policy, path.stem)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
