"""What `abfleet up` says when it cannot start: one line that says what to do."""

from __future__ import annotations

import socket

import pytest

from abfleet import cli, router, stack
from tests.helpers import fleet_settings


def test_a_taken_port_is_named_with_the_setting_to_change(tmp_path, capsys, monkeypatch):
    settings = fleet_settings(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
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


def test_a_variant_named_alone_starts_its_replicas_and_not_airflow(tmp_path):
    settings = fleet_settings(tmp_path / "run", replicas=2)
    names = [svc.name for svc in stack.chosen(settings, only=("production", "prometheus"))]
    assert names == ["production-1", "production-2", "prometheus"]
    assert "airflow" not in [svc.name for svc in stack.chosen(settings)]
    assert "airflow" in [svc.name for svc in stack.chosen(settings, only=("mlflow",), with_airflow=True)]
