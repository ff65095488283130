"""Load tests: realistic requests, and `abfleet load` (Locust, headless, against the router).

Locust runs in a process of its own: it monkey-patches the standard library with gevent at
import, which breaks a process that has imported MLflow (and the other way round). Nothing
here imports MLflow; `tests/load/locustfile.py` imports only `realistic_rows`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from abfleet import api
from abfleet.load_shapes import SHAPES
from abfleet.settings import Settings, process_environ, project_root

LOCUSTFILE = Path("tests") / "load" / "locustfile.py"
SHAPE_FILE = Path("tests") / "load" / "shape.py"  # the Locust shape class of --shape step|spike


def realistic_rows(n: int = 2000, seed: int = 0) -> list[dict]:
    """Flats people would ask about, with their true price: the real Kaggle rows when the
    dataset is present, else seeded synthetic ones; cleaned, limited to locations the fleet
    knows and to the API's bounds (`api.acceptable_rows`)."""
    import numpy as np

    from abfleet import data

    raw = data.read_raw(data.REAL_DATASET) if data.real_dataset_available() else data.synth(max(n * 2, 1000), seed)
    frame = api.acceptable_rows(data.clean(raw).frame, data.known_locations())
    if len(frame) > n:
        frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))[:n]]
    return [{"location": str(r.location), "total_sqft": float(r.total_sqft), "bhk": int(r.bhk),
             "bath": int(r.bath), "price": float(r.price)} for r in frame.itertuples()]


def stars_for(estimate: float, actual: float) -> int:
    """The star rating a person who knows the true price gives an estimate, by its APE."""
    ape = abs(estimate - actual) / actual
    for stars, limit in ((5, 0.10), (4, 0.20), (3, 0.35), (2, 0.60)):
        if ape <= limit:
            return stars
    return 1


# ---- abfleet load ----------------------------------------------------------------------

def run(settings: Settings, users: int, duration: float, *, spawn_rate: float | None = None,
        out_dir: Path | None = None, processes: int = 1, user_class: str = "HomeBuyer", shape: str = "steady",
        say=print) -> dict:
    """Run Locust headless against the router for `duration` seconds; return a summary.

    With `processes` above 1, Locust forks that many worker processes under one master
    (`locust --processes N`), which merges their statistics: the load generator then uses
    as many cores. CSV stats (`stats_*.csv`) and the HTML report (`report.html`) go to
    `out_dir` (default: <run_dir>/load/<timestamp>/). A `shape` other than steady
    (abfleet.load_shapes) varies the users over the run, peaking at `users`.
    """
    if users < 1 or duration <= 0:
        raise ValueError("--users must be at least 1 and --duration above 0")
    if processes < 1:
        raise ValueError("--processes must be at least 1")
    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out_dir) if out_dir else settings.run_dir / "load" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    host = settings.router_url
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        raise FileNotFoundError("locust is not installed in this environment: run `make install`")
    rate = spawn_rate or max(1.0, users / 2.0)
    locustfiles = [project_root() / LOCUSTFILE] + ([project_root() / SHAPE_FILE] if shape != "steady" else [])
    argv = [str(locust), "-f", ",".join(map(str, locustfiles)), "--headless", "--host", host,
            "--users", str(users), "--spawn-rate", f"{rate:g}", "--run-time", f"{max(1, round(duration))}s",
            "--stop-timeout", "10", "--csv", str(out_dir / "stats"), "--html", str(out_dir / "report.html"),
            "--only-summary", "--loglevel", "WARNING" if processes == 1 else "INFO", "--exit-code-on-error", "1"]
    if processes > 1:
        argv += ["--processes", str(processes)]
    if shape != "steady":
        argv += ["--shape", shape]
    argv.append(user_class)  # the locustfile's user class to run (HomeBuyer: people; SteadyBuyer: a fixed rate)
    env = process_environ(python_path=[project_root()])
    log_path = out_dir / "locust.log"
    peak = f" at the peak of a {shape} shape" if shape != "steady" else ""
    say(f"locust: {users} users{peak} for {duration:g}s against {host}"
        f"{f' from {processes} worker processes' if processes > 1 else ''}; output in {out_dir}")
    with local_router_unlimited(settings, say), log_path.open("wb") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=project_root(),
                              timeout=duration + 120)
    summary = summarize(out_dir)
    summary.update({"users": users, "duration_s": duration, "host": host, "run_dir": str(out_dir), "processes": processes,
                    "shape": shape, "user_counts": user_counts(out_dir),
                    "workers_connected": workers_connected(log_path.read_text(errors="replace")),
                    "report": str(out_dir / "report.html"), "locust_exit_code": proc.returncode})
    if not (out_dir / "stats_stats.csv").exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"locust wrote no statistics (exit code {proc.returncode}); see {log_path}: {tail.strip().splitlines()[-1:] }")
    return summary


@contextlib.contextmanager
def local_router_unlimited(settings: Settings, say=print) -> Iterator[None]:
    """While the block runs, the local stack's router (when this run directory's stack is up)
    lets one address send what Locust's many users send; its limits from `settings` are put
    back afterwards. Any other router is left alone, and its limits answer 429."""
    from abfleet import (  # here, not at import: the locustfile imports this module
        router,
        stack,
    )

    [svc] = [s for s in stack.services(settings) if s.name == "router"]
    if stack.running_pid(settings, svc) is None:
        yield
        return
    say("the local router's per-address limits are lifted for the run (Locust is one address)")
    stack.up(settings.replace(**router.ONE_ADDRESS_LIMITS), only=("router",), say=lambda _m: None)
    try:
        yield
    finally:
        stack.up(settings, only=("router",), say=lambda _m: None)


def workers_connected(log: str) -> int:
    """The most worker processes Locust's master reported connected at once (0 without a master)."""
    counts = [int(n) for n in re.findall(r"(\d+) workers connected", log)]
    return max(counts, default=0)


def user_counts(out_dir: Path) -> list[int]:
    """The running users over the run, each change once (none before the first starts), from
    Locust's history (`stats_stats_history.csv`, one row a second)."""
    path = out_dir / "stats_stats_history.csv"
    counts: list[int] = []
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated" and row.get("User Count", "").isdigit() and int(row["User Count"]):
                    if not counts or counts[-1] != int(row["User Count"]):
                        counts.append(int(row["User Count"]))
    return counts


def summarize(out_dir: Path) -> dict:
    """Totals and per-endpoint numbers from Locust's `stats_stats.csv`."""
    endpoints, total = {}, None
    path = out_dir / "stats_stats.csv"
    if path.exists():
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                item = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                        "rps": float(row["Requests/s"]), "p50_ms": _num(row.get("50%")),
                        "p99_ms": _num(row.get("99%")), "mean_ms": _num(row.get("Average Response Time"))}
                if row["Name"] == "Aggregated":
                    total = item
                else:
                    endpoints[f"{row['Type']} {row['Name']}"] = item
    failures = []
    fpath = out_dir / "stats_failures.csv"
    if fpath.exists():
        with fpath.open(newline="") as f:
            failures = [{"endpoint": f"{r['Method']} {r['Name']}", "error": r["Error"], "count": int(r["Occurrences"])}
                        for r in csv.DictReader(f)]
    total = total or {"requests": 0, "failures": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"total": total, "endpoints": endpoints, "failure_details": failures}


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def _text(summary: dict) -> str:
    t = summary["total"]
    lines = [f"{t['requests']} requests, {t['failures']} failed, {t['rps']:.1f} req/s, "
             f"p50 {t['p50_ms']} ms, p99 {t['p99_ms']} ms"]
    for name, e in summary["endpoints"].items():
        lines.append(f"  {name:<40} {e['requests']:>7} req  {e['failures']:>5} failed  p50 {e['p50_ms']} ms  p99 {e['p99_ms']} ms")
    for f in summary["failure_details"]:
        lines.append(f"  FAILED {f['count']}x {f['endpoint']}: {f['error']}")
    if summary.get("shape", "steady") != "steady":
        lines.append(f"shape {summary['shape']}: users over the run {' → '.join(map(str, summary['user_counts']))}")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet load` (without --find-capacity, which abfleet.capacity answers): exit 1 when
    any request failed (or Locust did)."""
    summary = run(settings, args.users, args.duration, spawn_rate=args.spawn_rate, processes=args.processes,
                  shape=args.shape, say=lambda m: print(m, file=sys.stderr, flush=True))
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(_text(summary))
    failed = summary["total"]["failures"] > 0 or summary["total"]["requests"] == 0 or summary["locust_exit_code"] != 0
    if failed:
        print(f"abfleet load: {summary['total']['failures']} of {summary['total']['requests']} requests failed "
              f"(locust exit code {summary['locust_exit_code']}): see {summary['report']}", file=sys.stderr)
    return 1 if failed else 0


def add_load_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("load", help="Locust, headless, against the router")
    p.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: users/2)")
    p.add_argument("--processes", type=int, default=1,
                   help="Locust worker processes on this machine, under one master that merges their stats (default 1)")
    p.add_argument("--shape", choices=SHAPES, default="steady",
                   help="users over the run: steady (all --users throughout), step (a quarter more each quarter of "
                        "the run), spike (a fifth, all for the middle fifth, a fifth again); default steady")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--find-capacity", action="store_true",
                   help="step a steady request rate up until p99 passes --p99-ms; report the highest that held")
    p.add_argument("--p99-ms", type=float, default=50.0, help="the p99 target of --find-capacity (default 50 ms)")
    p.add_argument("--start-rate", type=int, default=20, help="requests/s of the first step (default 20)")
    p.add_argument("--max-rate", type=int, default=2000, help="stop stepping here (default 2000 requests/s)")
    p.add_argument("--step-seconds", type=float, default=15.0, help="length of each step (default 15 s)")
    p.set_defaults(func=cmd_load)
    return p
