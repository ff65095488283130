"""What `abfleet up` says when it cannot start: one line that says what to do."""

from __future__ import annotations

import contextlib
import socket

import pytest

from abfleet import cli, router, stack
from tests.helpers import fleet_settings


@contextlib.contextmanager
def busy_port():
    """A loopback port something listens on, for the length of the block."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_a_taken_port_is_named_with_the_setting_to_change(tmp_path, capsys, monkeypatch):
    settings = fleet_settings(tmp_path / "run")
    with busy_port() as port:
        with pytest.raises(stack.StackError, match=f"port {port} \\(mlflow\\) is taken.*ABFLEET_MLFLOW_PORT"):
            stack.up(settings.replace(mlflow_port=port), only=("mlflow",), say=lambda _m: None)
        monkeypatch.setenv("ABFLEET_RUN_DIR", str(tmp_path / "run"))
        monkeypatch.setenv("ABFLEET_MLFLOW_PORT", str(port))
        assert cli.main(["up"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("abfleet up: port") and "Traceback" not in "\n".join(err)


def test_missing_nginx_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(router, "nginx_binary", lambda: None)
    with pytest.raises(stack.StackError, match="nginx is not installed: run `sudo apt-get install -y nginx`"):
        stack.up(fleet_settings(tmp_path / "run"), say=lambda _m: None)


def test_down_with_nothing_running_stops_nothing(tmp_path):
    assert stack.down(fleet_settings(tmp_path / "run"), say=lambda _m: None) == []


def test_plain_up_leaves_airflow_out_and_a_variant_means_its_replicas(tmp_path):
    # Airflow's environment carries every setting, VARIANT included: that must not make it a server.
    settings = fleet_settings(tmp_path / "run")
    plain = [svc.name for svc in stack.chosen(settings)]
    assert "airflow" not in plain and {"mlflow", "production", "candidate", "router", "prometheus"} <= set(plain)
    assert [svc.name for svc in stack.chosen(settings, with_airflow=True)] == plain + ["airflow"]
    assert [svc.name for svc in stack.chosen(settings, only=("production",))] == ["production"]
    replicas = settings.replace(replicas=2)
    assert [svc.name for svc in stack.chosen(replicas, only=("candidate", "mlflow"))] == ["mlflow", "candidate-1", "candidate-2"]


def test_a_taken_airflow_port_names_airflows_setting(tmp_path):
    settings = fleet_settings(tmp_path / "run")
    with busy_port() as port:
        with pytest.raises(stack.StackError, match=f"port {port} \\(airflow\\) is taken.*ABFLEET_AIRFLOW_PORT"):
            stack.up(settings.replace(airflow_port=port), only=("airflow",), say=lambda _m: None)


def test_status_text_lists_each_dags_latest_run_and_why_a_task_skipped():
    state = {"run_dir": "run", "processes": {}, "aliases": {"production": "1", "candidate": None},
             "weights": {"production": 100, "candidate": 0}, "urls": {},
             "dags": {"evaluate_ab": None,
                      "train_candidate": {"run_id": "scheduled__x", "state": "success", "tasks": {"train": "skipped"},
                                          "skipped": {"train": "nothing to train on: no dataset"}}}}
    lines = cli._status_text(state).splitlines()
    assert "    evaluate_ab       no run yet" in lines
    assert "    train_candidate   success  scheduled__x" in lines and "      train skipped: nothing to train on: no dataset" in lines
    assert cli._status_text({**state, "dags": {"error": "ConnectionError: refused"}}).endswith(
        "DAG runs unknown: ConnectionError: refused")


def test_waiting_for_dag_runs_ends_when_all_ended_and_fails_on_a_failed_one(monkeypatch, tmp_path):
    """`abfleet status --wait-dags`: polls until every latest run ended; a failed one is False."""
    from abfleet import airflow_local

    answers = iter([
        {"evaluate_ab": None, "drift_monitoring": {"state": "running"}},
        {"evaluate_ab": {"state": "success"}, "drift_monitoring": {"state": "running"}},
        {"evaluate_ab": {"state": "success"}, "drift_monitoring": {"state": "failed"}},
    ])
    monkeypatch.setattr(airflow_local, "healthy", lambda _s: True)
    monkeypatch.setattr(stack, "dag_runs", lambda _s: next(answers))
    settings = fleet_settings(tmp_path)
    ok, runs = stack.wait_for_dag_runs(settings, 60, say=lambda _m: None, interval=0)
    assert not ok and runs["drift_monitoring"]["state"] == "failed"

    monkeypatch.setattr(stack, "dag_runs", lambda _s: {"evaluate_ab": {"state": "success"}})
    assert stack.wait_for_dag_runs(settings, 60, say=lambda _m: None, interval=0) == (True, {"evaluate_ab": {"state": "success"}})
    monkeypatch.setattr(stack, "dag_runs", lambda _s: {"evaluate_ab": None})
    ok, runs = stack.wait_for_dag_runs(settings, 0, say=lambda _m: None, interval=0)
    assert not ok and runs == {"evaluate_ab": None}  # timed out with no run
    monkeypatch.setattr(airflow_local, "healthy", lambda _s: False)
    ok, runs = stack.wait_for_dag_runs(settings, 60, say=lambda _m: None, interval=0)
    assert not ok and "not running" in runs["error"]


def test_a_variant_named_alone_starts_its_replicas_and_not_airflow(tmp_path):
    settings = fleet_settings(tmp_path / "run", replicas=2)
    names = [svc.name for svc in stack.chosen(settings, only=("production", "prometheus"))]
    assert names == ["production-1", "production-2", "prometheus"]
    assert "airflow" not in [svc.name for svc in stack.chosen(settings)]
    assert "airflow" in [svc.name for svc in stack.chosen(settings, only=("mlflow",), with_airflow=True)]
