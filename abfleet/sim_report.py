"""The `abfleet simulate` command: its arguments, its text and JSON output, and the table of
every scenario's bars that it can write into a Markdown file (docs/simulate.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from abfleet import sim_scenario, simulate
from abfleet.settings import decision_policy

TABLE_START, TABLE_END = "<!-- simulate-table:start -->", "<!-- simulate-table:end -->"
BAR_TEXT = {"promote_at_most": "promoted ≤ {:.0%}", "promote_at_least": "promoted ≥ {:.0%}",
            "early_rollback_at_most": "rolled back early ≤ {:.0%}", "early_rollback_at_least": "rolled back early ≥ {:.0%}",
            "median_promote_hours_at_most": "median hours to promote ≤ {:g}",
            "srm_looks_at_most": "looks flagged SRM ≤ {:.1%}",
            "better_below_margin_at_least": "recorded \"better, below the margin\" ≥ {:.0%}",
            "power_plan_says_unreachable": "power plan says unreachable at the start"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="Monte-Carlo of the decision path over scenario files (docs/simulate.md)",
                       description="Run the real decision, hourly, over simulated experiments of each scenario and "
                                   "report the share of runs promoted, rolled back early, rolled back at the time "
                                   "limit, or still running, the median hours to each, and the reasons. A scenario "
                                   "that does not validate exits 2 with a message naming the field.")
    p.add_argument("--scenario", required=True, nargs="+", action="extend", metavar="FILE.json",
                   help="scenario file(s); the format is in docs/simulate.md")
    p.add_argument("--runs", type=int, default=1000, help="experiments per scenario (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--table", metavar="FILE.md",
                   help=f"also write the bars table between {TABLE_START} and {TABLE_END} in this Markdown file")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace, settings: object) -> int:
    try:
        if args.runs < 1:
            raise ValueError(f"--runs: must be >= 1, got {args.runs}")
        scenarios = [sim_scenario.load(path, decision_policy()) for path in args.scenario]
    except ValueError as exc:
        print(f"abfleet simulate: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    results = []
    for sc in scenarios:
        results.append(simulate.simulate(sc, args.runs, args.seed))
        if not args.json:
            print(text(results[-1]), flush=True)
        else:
            print(f"{sc['name']}: {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    if args.table:
        write_table(Path(args.table), results)
    if args.json:
        print(json.dumps({"results": results}, indent=2, allow_nan=False))
    return 0


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def text(r: dict) -> str:
    sh, med = r["shares"], r["median_hours"]
    lines = [f"{r['scenario']}: {r['runs']} runs, {r['seconds']:.1f} s ({r['seconds_per_1000_runs']:.1f} s per 1,000)"]
    for key, label in (("promote", "promoted"), ("early_rollback", "rolled back early"),
                       ("timeout_rollback", "rolled back at the time limit"), ("running", "still running")):
        hours = "" if med[key] is None else f", median {med[key]:g} h"
        lines.append(f"  {label:<30} {sh[key]:>7.1%}{hours}")
    lines.append(f"  looks flagged SRM              {r['srm_looks']:>7.2%}")
    lines.append("  reasons:")
    lines += [f"    {n:>6}  {reason}" for reason, n in r["reasons"].items()]
    for key, e in r["expect"].items():
        lines.append(f"  bar: {bar_text(key, e['bar'])}: measured {measured_text(key, e['measured'])} "
                     f"{'PASS' if e['pass'] else 'FAIL'}")
    return "\n".join(lines)


def bar_text(key: str, bar: float | bool) -> str:
    return BAR_TEXT[key].format(bar)


def measured_text(key: str, value: float | None) -> str:
    if key == "median_promote_hours_at_most":
        return "no promotion" if value is None else f"{value:g} h"
    if key == "power_plan_says_unreachable":
        return f"{value:.0%} of runs (there is no power plan)" if not value else f"{value:.0%} of runs"
    return _pct(value) if key != "srm_looks_at_most" else f"{value:.2%}"


def table(results: list[dict]) -> str:
    rows = ["| scenario | bar | measured today | pass | promoted / early rb / rb at limit / running | s per 1,000 runs |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        sh = r["shares"]
        outcomes = " / ".join(_pct(sh[k]) for k in simulate.OUTCOMES)
        for key, e in r["expect"].items():
            rows.append(f"| {r['scenario']} | {bar_text(key, e['bar'])} | {measured_text(key, e['measured'])} | "
                        f"{'pass' if e['pass'] else '**FAIL**'} | {outcomes} | {r['seconds_per_1000_runs']:.1f} |")
    runs = {r["runs"] for r in results}
    return "\n".join(rows) + f"\n\n{', '.join(map(str, sorted(runs)))} runs a scenario, seed {results[0]['seed']}.\n"


def write_table(path: Path, results: list[dict]) -> None:
    """Replace the table between the markers in `path` (appended with them when absent)."""
    body = path.read_text() if path.exists() else ""
    block = f"{TABLE_START}\n{table(results)}{TABLE_END}"
    if TABLE_START in body and TABLE_END in body:
        head, rest = body.split(TABLE_START, 1)
        body = head + block + rest.split(TABLE_END, 1)[1]
    else:
        body = body.rstrip("\n") + ("\n\n" if body else "") + block + "\n"
    path.write_text(body)
