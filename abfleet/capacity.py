"""`abfleet load --find-capacity`: the highest steady request rate whose p99 stays under a
target, found by stepping the rate up (x1.5 a step) until a step misses it.

Each step is its own Locust run of the locustfile's SteadyBuyer (one prediction a second per
user, so the offered rate is the number of users), with its CSV stats and HTML report in a
folder of its own. A step holds when nothing failed, its p99 is at most the target and the
rate achieved is at least 90% of the rate offered (else the load generator or the fleet
could not keep up, and the p99 would flatter it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

from abfleet import load
from abfleet.settings import Settings

STEP_FACTOR = 1.5
KEPT_UP = 0.9  # the share of the offered rate a step must achieve


def rates(start: int, highest: int) -> list[int]:
    """The offered rates of the steps: start, then x1.5 (rounded up) until past `highest`."""
    if start < 1 or highest < start:
        raise ValueError("need 1 <= --start-rate <= --max-rate")
    out = [start]
    while (following := max(out[-1] + 1, math.ceil(out[-1] * STEP_FACTOR))) <= highest:
        out.append(following)
    return out


def verdict(step: dict, offered: int, p99_ms: float) -> str | None:
    """Why a step did not hold (None when it held)."""
    total = step["total"]
    if total["requests"] == 0:
        return "no request was answered"
    if total["failures"]:
        return f"{total['failures']} of {total['requests']} requests failed"
    if total["p99_ms"] is None or total["p99_ms"] > p99_ms:
        return f"p99 {total['p99_ms']} ms is over {p99_ms:g} ms"
    if total["rps"] < KEPT_UP * offered:
        return f"{total['rps']:.1f} requests/s achieved of {offered} offered"
    return None


def find_capacity(settings: Settings, p99_ms: float, *, start: int = 20, highest: int = 2000, step_s: float = 15.0,
                  processes: int = 1, out_dir: Path | None = None, say=print) -> dict:
    """Step the rate up; return {"rate", "p99_ms", "target_p99_ms", "steps": [...], "out_dir"}."""
    out_dir = Path(out_dir) if out_dir else settings.run_dir / "load" / f"capacity-{dt.datetime.now():%Y%m%d-%H%M%S}"
    steps, best = [], None
    for offered in rates(start, highest):
        step_dir = out_dir / f"step-{len(steps) + 1:02d}-{offered}rps"
        summary = load.run(settings, offered, step_s, spawn_rate=offered, out_dir=step_dir, processes=processes,
                           user_class="SteadyBuyer", say=lambda _m: None)
        why = verdict(summary, offered, p99_ms)
        total = summary["total"]
        steps.append({"offered_rps": offered, "achieved_rps": round(total["rps"], 1), "p99_ms": total["p99_ms"],
                      "requests": total["requests"], "failures": total["failures"], "held": why is None,
                      "why_not": why, "stats_csv": str(step_dir / "stats_stats.csv"), "report": str(step_dir / "report.html")})
        say(f"step {len(steps)}: {offered} requests/s offered, {total['rps']:.1f} achieved, p99 {total['p99_ms']} ms"
            f" -> {'held' if why is None else why}")
        if why is not None:
            break
        best = steps[-1]
    result = {"rate": best["achieved_rps"] if best else None, "offered_rps": best["offered_rps"] if best else None,
              "p99_ms": best["p99_ms"] if best else None, "target_p99_ms": p99_ms, "steps": steps, "out_dir": str(out_dir)}
    (out_dir / "capacity.json").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "capacity.json").write_text(json.dumps(result, indent=2))
    return result


def cmd_find_capacity(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 with a rate, 1 when not even the first step held."""
    result = find_capacity(settings, args.p99_ms, start=args.start_rate, highest=args.max_rate,
                           step_s=args.step_seconds, processes=args.processes,
                           say=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["rate"] is None:
        print(f"no step held p99 <= {args.p99_ms:g} ms: {result['steps'][0]['why_not']}; evidence in {result['out_dir']}")
    else:
        print(f"capacity: {result['rate']} requests/s (offered {result['offered_rps']}) with p99 {result['p99_ms']} ms "
              f"<= {args.p99_ms:g} ms; every step's CSV and HTML report in {result['out_dir']}")
    return 0 if result["rate"] is not None else 1
