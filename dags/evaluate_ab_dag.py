"""evaluate_ab: the hourly A/B evaluation, the same code path as `abfleet evaluate`."""

from __future__ import annotations

import datetime

import pendulum

from airflow.sdk import Param, dag, task

from abfleet.decision import CONTINUE, PROMOTE, ROLLBACK  # a pure module: cheap at parse time

# Which action task carries out each decision of `abfleet.decision.decide`.
ACTION_TASKS = {PROMOTE: "promote", ROLLBACK: "rollback", CONTINUE: "keep_testing"}


def _act(expected: str, collected: dict, outcome: dict, dry_run: bool) -> dict:
    # The evaluation is imported here, not at the top: the DAG processor parses this file often.
    from abfleet import evaluation
    from abfleet.settings import Settings

    if outcome["decision"] != expected:  # only the branch may route here; never act on another decision
        raise ValueError(f"task for {expected!r} got decision {outcome['decision']!r}")
    record = evaluation.act(Settings.from_env(), collected, outcome, dry_run=dry_run, source="airflow")
    print(f"{record['decision']} (applied={record['applied']}, dry_run={dry_run}): {'; '.join(record['reasons'])}")
    return record


@dag(
    dag_id="evaluate_ab",
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abfleet"],
    params={"dry_run": Param(False, type="boolean", description="decide and log, but change and record nothing")},
    default_args={"retries": 0, "execution_timeout": datetime.timedelta(minutes=10)},
)
def evaluate_ab():
    """
    ### Hourly A/B evaluation

    Reads the experiment's numbers from Prometheus and the registry (`collect`), decides
    with `abfleet.decision.decide` (`judge`), then the `choose` branch runs exactly one of
    `promote`, `rollback` or `keep_testing`. Every outcome, "continue" included, is
    recorded in the decision history with source "airflow". Missing data never promotes.
    Trigger with `{"dry_run": true}` to see the decision without acting on it.
    """

    @task
    def collect() -> dict:
        """The versions under test, since when, and their stats (problems listed, not raised)."""
        from abfleet import evaluation
        from abfleet.settings import Settings

        collected = evaluation.collect(Settings.from_env())
        for problem in collected.get("problems") or []:
            print(f"problem: {problem}")
        return collected

    @task
    def judge(collected: dict) -> dict:
        """The decision and the numbers behind it."""
        from abfleet import evaluation

        return evaluation.judge(collected)

    @task.branch
    def choose(outcome: dict) -> str:
        """Gate: only a "promote" decision reaches the promote task."""
        try:
            return ACTION_TASKS[outcome["decision"]]
        except KeyError:
            raise ValueError(f"unknown decision {outcome.get('decision')!r}") from None

    @task
    def promote(collected: dict, outcome: dict, params=None) -> dict:
        """Move @production to the candidate and reload the servers."""
        return _act(PROMOTE, collected, outcome, bool(params["dry_run"]))

    @task
    def rollback(collected: dict, outcome: dict, params=None) -> dict:
        """Take the candidate out of the experiment, tagged with the reasons."""
        return _act(ROLLBACK, collected, outcome, bool(params["dry_run"]))

    @task
    def keep_testing(collected: dict, outcome: dict, params=None) -> dict:
        """Record the "continue" and leave the aliases alone."""
        return _act(CONTINUE, collected, outcome, bool(params["dry_run"]))

    collected = collect()
    outcome = judge(collected)
    choose(outcome) >> [
        promote(collected, outcome),
        rollback(collected, outcome),
        keep_testing(collected, outcome),
    ]


evaluate_ab()
