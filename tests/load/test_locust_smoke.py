"""`abfleet load` for a few seconds against the live fleet: nothing fails, the report is written."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from abfleet import api, data, load

@pytest.mark.slow
def test_short_locust_run_has_no_failures_and_writes_its_report(fleet, capsys):
    parser = argparse.ArgumentParser()
    load.add_load_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["load", "--users", "10", "--duration", "10"])
    code = args.func(args, fleet.settings)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    # This run's folder: the newest one named by its start time (--find-capacity's are capacity-<time>).
    runs = sorted(p for p in (fleet.settings.run_dir / "load").iterdir() if p.name[:1].isdigit())
    assert runs, "no run directory under <run_dir>/load"
    run = runs[-1]
    assert (run / "report.html").stat().st_size > 0
    with (run / "stats_stats.csv").open(newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows[api.PREDICT]["Request Count"]) > 0
    # People rated some answers, and the router kept each of them on one variant (checked per answer).
    assert any(name.startswith(api.FEEDBACK) for name in rows), list(rows)


def test_stars_follow_the_error():
    assert load.stars_for(100, 100) == 5
    assert load.stars_for(115, 100) == 4
    assert load.stars_for(70, 100) == 3
    assert load.stars_for(150, 100) == 2
    assert load.stars_for(300, 100) == 1


def test_realistic_rows_fit_the_api_and_the_fleet_vocabulary():
    rows = load.realistic_rows(300, seed=3)
    assert len(rows) == 300
    known = data.known_locations()
    for row in rows:
        api.PredictRequest.model_validate({k: row[k] for k in ("location", "total_sqft", "bhk", "bath")})
        assert row["location"] in known and row["price"] > 0


@pytest.mark.slow
def test_two_locust_worker_processes_merge_their_stats(fleet, capsys):
    parser = argparse.ArgumentParser()
    load.add_load_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["load", "--users", "8", "--duration", "10", "--processes", "2", "--json"])
    code = args.func(args, fleet.settings)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    summary = json.loads(out.out)
    assert summary["processes"] == 2 and summary["workers_connected"] == 2, summary
    assert summary["total"]["failures"] == 0 and summary["endpoints"][f"POST {api.PREDICT}"]["requests"] > 0


def test_workers_connected_reads_the_masters_log():
    log = ("[x] INFO/locust.runners: Worker a_1 (index 0) reported as ready. 1 workers connected.\n"
           "[x] INFO/locust.runners: Worker b_2 (index 1) reported as ready. 2 workers connected.\n")
    assert load.workers_connected(log) == 2 and load.workers_connected("") == 0


@pytest.mark.slow
def test_a_step_shape_climbs_through_its_levels_without_failures(fleet, capsys):
    parser = argparse.ArgumentParser()
    load.add_load_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["load", "--users", "8", "--duration", "16", "--shape", "step", "--spawn-rate", "8", "--json"])
    code = args.func(args, fleet.settings)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    summary = json.loads(out.out)
    assert summary["shape"] == "step" and summary["total"]["failures"] == 0, summary
    counts = summary["user_counts"]
    assert max(counts) == 8 and counts == sorted(counts), counts  # it only climbs, to the peak
    assert len(set(counts) & {2, 4, 6, 8}) >= 3, f"the run did not go through the steps: {counts}"


def test_user_counts_read_the_history_each_change_once(tmp_path):
    rows = ["Timestamp,User Count,Type,Name", "1,0,,Aggregated", "2,2,,Aggregated", "2,2,POST,/x", "3,2,,Aggregated",
            "4,10,,Aggregated", "5,2,,Aggregated"]
    (tmp_path / "stats_stats_history.csv").write_text("\n".join(rows) + "\n")
    assert load.user_counts(tmp_path) == [2, 10, 2]
    assert load.user_counts(tmp_path / "missing") == []
