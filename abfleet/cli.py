"""The `abfleet` command. Each sub-command is a thin caller of the library.

A command that fails says what went wrong in one line on stderr and exits non-zero;
`--json` prints one JSON document on stdout and nothing else there (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from abfleet import bench, bench_dags, bench_pipeline, capacity, evaluation, load, objects, router, sim_report, soak, stack
from abfleet.decision import PROMOTE, ROLLBACK, decide
from abfleet.settings import VARIANTS, Settings, decision_policy, process_environ, project_root
from abfleet.store import open_store



def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet load`: a Locust run, or with --find-capacity the stepped search for the highest
    steady rate that keeps its p99 (abfleet.capacity, which drives abfleet.load)."""
    if args.find_capacity:
        return capacity.cmd_find_capacity(args, settings)
    return load.cmd_load(args, settings)

def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, document: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str, allow_nan=False))
    else:
        print(text)


# ---- commands ---------------------------------------------------------------------

def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    weight = router.parse_weights(args.weights) if args.weights else None
    if args.replicas is not None:
        settings = settings.replace(replicas=args.replicas)
        settings.validate()
    _say(f"starting the local fleet in {settings.run_dir}")
    state = stack.up(settings, candidate_weight=weight, with_airflow=args.with_airflow, say=_say)
    if state["aliases"] and state["aliases"].get("production") is None:
        _say("note: no @production model yet: run `abfleet train --data CSV --alias production`")
    print(_status_text(state))
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = stack.down(settings, say=_say)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    ok = True
    if args.wait_dags:
        ok, runs = stack.wait_for_dag_runs(settings, args.wait_dags, say=lambda m: print(m, file=sys.stderr, flush=True))
        if not ok:
            why = runs.get("error") or ", ".join(f"{d}: {r['state'] if r else 'no run'}" for d, r in runs.items())
            print(f"abfleet status: the DAGs' latest runs did not all succeed within {args.wait_dags:g} s ({why})",
                  file=sys.stderr)
    state = stack.status(settings)
    _emit(args, state, _status_text(state))
    return 0 if ok else 1


def _status_text(state: dict) -> str:
    lines = [f"run directory: {state['run_dir']}"]
    for name, proc in state["processes"].items():
        health = "healthy" if proc["healthy"] else ("running" if proc["running"] else "stopped")
        pid = f"pid {proc['pid']}" if proc["pid"] else ""
        lines.append(f"  {name:<12} :{proc['port']:<6} {health:<8} {pid}")
    aliases = state["aliases"]
    if aliases is None:
        lines.append("  registry unreachable: aliases unknown")
    else:
        lines.append("  aliases: " + ", ".join(f"@{k} → v{v}" if v else f"@{k} → none" for k, v in aliases.items()))
    w = state["weights"]
    lines.append(f"  weights: production {w['production']}% / candidate {w['candidate']}%")
    lines.append("  " + "  ".join(f"{k}: {v}" for k, v in state["urls"].items()))
    if "dags" in state:
        lines.extend(_dags_text(state["dags"]))
    return "\n".join(lines)


def _dags_text(dags: dict) -> list[str]:
    """Each DAG's latest run, and why a task of it skipped itself."""
    if "error" in dags:
        return [f"  DAG runs unknown: {dags['error']}"]
    lines = ["  DAGs, latest run:"]
    for dag_id, run in dags.items():
        if run is None:
            lines.append(f"    {dag_id:<17} no run yet")
            continue
        lines.append(f"    {dag_id:<17} {run['state']:<8} {run['run_id']}")
        lines.extend(f"      {task} skipped: {reason}" for task, reason in run["skipped"].items())
    return lines


def cmd_data_synth(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import data  # pandas: only for the commands that read data

    frame = data.synth(args.rows, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data.write_raw(frame, out)
    print(f"wrote {len(frame)} synthetic rows (seed {args.seed}) to {out}")
    return 0


def cmd_data_publish(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import data  # pandas: only for the commands that read data

    data.read_raw(args.csv)  # refuse a file without the raw schema before storing it
    store = objects.open_store(settings)
    key = objects.publish_dataset(store, Path(args.csv))
    print(f"published {args.csv} as {store.location(key)}")
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import train  # pandas and scikit-learn: only for this command

    if args.from_store:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = train.train_candidate(settings, force=args.force, progress=_say)
        _emit(args, result, f"version {result['version']}: {'@candidate' if result['candidate_set'] else 'not made candidate'} ({result['reason']})")
        return 0
    if not args.data:
        raise ValueError("give --data CSV, or --from-store")
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    # MLflow prints run links on stdout; keep stdout for our own output (--json).
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train.train(settings, Path(args.data), alias=args.alias, seed=args.seed, force=args.force, progress=_say)
    m = result["metrics"]
    text = (f"registered {settings.model_name} version {result['version']}"
            + (f" as @{result['alias']}" if result["alias"] else "")
            + (f", NOT made @candidate: {result['candidate_deferred']}" if result.get("candidate_deferred") else "")
            + f"\n  median APE {m['median_ape']:.1%}  MAPE {m['mape']:.1%}  MAE {m['mae']:.2f} lakhs  R² {m['r2']:.3f}")
    _emit(args, result, text)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run one model server under gunicorn (the container runs this same command)."""
    settings = settings.replace(variant=args.variant or settings.variant, bind=f"{settings.host}:{args.port}" if args.port else settings.bind)
    # prometheus_client finds its folder by this name, in every worker.
    env = process_environ({**settings.env(), "PROMETHEUS_MULTIPROC_DIR": str(settings.metrics_dir)})
    config = project_root() / "inference" / "backend" / "gunicorn.conf.py"
    gunicorn = Path(sys.executable).parent / "gunicorn"
    argv = [str(gunicorn), "-c", str(config)]
    os.chdir(project_root())
    os.execve(argv[0], argv, env)
    return 0  # not reached


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import migrations

    outcome = migrations.upgrade(settings.db_url)
    print(f"{migrations.shown(settings.db_url)}: {outcome.describe()}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import migrations

    revision, head = migrations.current(settings.db_url), migrations.head()
    state = "up to date" if revision == head else f"behind: run `abfleet db upgrade` to reach {head}"
    print(f"{migrations.shown(settings.db_url)}: {revision or 'no revision (empty, or created before migrations)'} ({state})")
    return 0 if revision == head else 1


def cmd_decide(args: argparse.Namespace, settings: Settings) -> int:
    try:
        stats = json.loads(Path(args.stats).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--stats {args.stats}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--stats {args.stats}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(stats, dict):
        raise ValueError(f"--stats {args.stats}: expected a JSON object with window_hours, weights, variants")
    outcome = decide(stats, decision_policy())
    _emit(args, outcome, _decision_text(outcome))
    return 0


def _decision_text(outcome: dict) -> str:
    lines = [f"decision: {outcome['decision']}"] + [f"  - {r}" for r in outcome.get("reasons", [])]
    for name, check in (outcome.get("checks") or {}).items():
        if name == "people":  # who the comparison counted: users, and their events
            status = "; ".join(f"{arm} {c['rating_users']} users rated {c['ratings']} estimates, "
                               f"{c['price_users']} reported {c['actual_prices']} prices" for arm, c in check.items())
        elif name == "replicas":  # each arm's servers Prometheus scrapes
            status = "; ".join(f"{arm} {c['scraped']}/{c['expected']} scraped"
                               + (f" (not scraped: {', '.join(c['missing'])})" if c["missing"] else "")
                               for arm, c in check.items() if c)
        else:
            status = check.get("status", check.get("passed", ""))
        lines.append(f"  {name:<12} {status}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    record = evaluation.evaluate(settings, dry_run=args.dry_run, source="cli")
    text = _decision_text(record) + ("\n(dry run: nothing changed, nothing recorded)" if args.dry_run else
                                     f"\nrecorded as decision #{record.get('id')}" + (" and applied" if record["applied"] else ""))
    _emit(args, record, text)
    return 0


def cmd_manual(args: argparse.Namespace, settings: Settings) -> int:
    record = evaluation.manual(settings, args.command, args.reason)
    if not record["applied"]:  # an alias moved between the read and the action: nothing changed
        _emit(args, record, f"{args.command}: not applied, {record.get('refused')}; decision #{record['id']}")
        return 1
    action = record.get("action") or {}
    _emit(args, record, f"{args.command}: done ({', '.join(f'{k}={v}' for k, v in action.items())}); decision #{record['id']}")
    return 0


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    with open_store(settings) as store:
        rows = store.decision_history(limit=args.limit)
    if args.json:
        _emit(args, {"decisions": rows}, "")
        return 0
    if not rows:
        print("no decisions yet")
    for r in rows:
        print(f"#{r['id']:<4} {r['created_at']:%Y-%m-%d %H:%M} {r['decision']:<9} {'applied' if r['applied'] else '       '} "
              f"{r['source']:<8} prod v{r['production_version']} cand v{r['candidate_version']}: {'; '.join(r['reasons'])[:160]}")
    return 0


def cmd_drift(args: argparse.Namespace, settings: Settings) -> int:
    from abfleet import drift  # pandas and Evidently: only for this command

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.reference or args.current:
            if not (args.reference and args.current):
                raise ValueError("give both --reference CSV and --current CSV, or neither (then the store's traffic is used)")
            result = drift.from_raw_files(args.reference, args.current, drift.policy_from(settings))
            summary = {**result.summary, "report": None}
            if result.html is not None:
                out = Path(args.report or (settings.run_dir / "drift-report.html"))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(result.html)
                summary["report"] = str(out)
        else:
            summary = drift.run(settings, days=args.days)
    verdict = {True: "DRIFT", False: "no drift", None: f"no verdict: {summary.get('reason')}"}[summary["drift_detected"]]
    lines = [verdict] + [f"  {name:<16} {c['test']:<32} score {c['score']:.4f}{'  drifted' if c['drifted'] else ''}"
                         for name, c in summary.get("columns", {}).items()]
    lines.append(f"report: {summary.get('report')}")
    _emit(args, summary, "\n".join(lines))
    return 0


# ---- parser -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abfleet",
        description="An A/B-tested inference fleet: train, serve, split traffic, promote or roll back.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the local fleet (idempotent) and print its URLs")
    p.add_argument("--weights", help="production/candidate split in percent, e.g. 80/20 (default: the last used, or 80/20)")
    p.add_argument("--with-airflow", action="store_true",
                   help="also run Airflow (standalone, ~1 GB) with the project's DAGs unpaused, so the hourly evaluation fires")
    p.add_argument("--replicas", type=int, metavar="N",
                   help="model servers per variant (default ABFLEET_REPLICAS, 1); more than one needs PostgreSQL (DATABASE_URL)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop only what `up` started")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="processes, ports, versions per alias, weights, DAG runs")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--wait-dags", type=float, default=0, metavar="SECONDS",
                   help="first wait until every DAG's latest run has ended; exit 1 if one failed, "
                        "none ran within SECONDS, or Airflow is not running")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data_sub.add_parser("synth", help="write seeded synthetic rows in the raw Kaggle schema")
    s.add_argument("--rows", type=int, default=10000, help="number of rows (default 10000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="CSV file to write")
    s.set_defaults(func=cmd_data_synth)

    s = data_sub.add_parser("publish", help="store a raw CSV as the next datasets/train_V{n}.csv for the training DAG")
    s.add_argument("csv", help="raw CSV (Kaggle schema)")
    s.set_defaults(func=cmd_data_publish)

    p = sub.add_parser("train", help="train on a raw-schema CSV and register a version")
    p.add_argument("--data", help="raw CSV (Kaggle 'Bengaluru House Data' schema)")
    p.add_argument("--alias", choices=VARIANTS, help="point this alias at the new version")
    p.add_argument("--from-store", action="store_true",
                   help="train on the newest published dataset and set @candidate only if it passes the offline check")
    p.add_argument("--seed", type=int, default=0, help="split and model seed (default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace @candidate even when its experiment is younger than the minimum run (the old one is tagged superseded)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run one model server under gunicorn")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="which alias to serve (default: VARIANT from the environment, else production)")
    p.add_argument("--port", type=int, help="listen port (default: the variant's port from settings)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("db", help="the prediction store's schema: migrations (Alembic)",
                       description="The prediction store's schema (DATABASE_URL, else the SQLite file in the run directory). "
                                   "Servers never create or alter tables: run `abfleet db upgrade` before they need them "
                                   "(`abfleet up`, the compose stack's migrate job and the deploy do).")
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    s = db_sub.add_parser("upgrade", help="apply every migration not applied yet (idempotent)",
                          description="Apply every migration the database lacks and say what was done. A store created "
                                      "before migrations is adopted (missing columns added, then stamped). Safe to run "
                                      "from several places at once. Exits 1 when the database is unreachable.")
    s.set_defaults(func=cmd_db_upgrade)
    s = db_sub.add_parser("current", help="the database's revision, and whether it is the newest (exit 1 when behind)")
    s.set_defaults(func=cmd_db_current)

    p = sub.add_parser("decide", help="the decision alone, from aggregated stats (JSON)")
    p.add_argument("--stats", required=True, help="JSON file in the decision-input shape (see DESIGN.md)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_decide)

    p = sub.add_parser("evaluate", help="one evaluation cycle: Prometheus → decision → action → record")
    p.add_argument("--dry-run", action="store_true", help="decide, but change and record nothing")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_evaluate)

    for name, text in ((PROMOTE, "make the candidate production (manual override, audited)"),
                       (ROLLBACK, "remove the candidate (manual override, audited)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--reason", help="why, for the audit trail")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(func=cmd_manual)

    p = sub.add_parser("drift", help="one drift check (the drift DAG's code path), or two raw CSVs compared")
    p.add_argument("--reference", help="raw CSV to compare against (with --current)")
    p.add_argument("--current", help="raw CSV to check (with --reference)")
    p.add_argument("--days", type=float, help="traffic window in days when checking the store (default: settings)")
    p.add_argument("--report", help="where to write the HTML report for two files (default: the run directory)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_drift)

    load.add_load_parser(sub).set_defaults(func=cmd_load)
    bench.add_bench_parser(sub, bench_pipeline.add_parser, bench_dags.add_parser)
    soak.add_soak_parser(sub)
    sim_report.add_parser(sub)

    p = sub.add_parser("history", help="every decision with its numbers")
    p.add_argument("--limit", type=int, default=50, help="how many, newest first (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_history)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = False
    try:
        settings = Settings.from_env()
        debug = settings.debug
        return args.func(args, settings)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as exc:  # one line, no traceback: the message says what to do
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _say(f"abfleet {args.command}: {message}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
