"""Settings from the environment, and the router config nginx itself accepts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from abfleet import api, router
from abfleet.settings import Settings, process_environ


def test_defaults_are_the_local_stack():
    s = Settings.from_env({})
    assert (s.router_port, s.production_port, s.candidate_port, s.mlflow_port, s.prometheus_port) == (7000, 6001, 6002, 5000, 9090)
    assert s.weights == {"production": 0.8, "candidate": 0.2}
    assert s.db_url.startswith("sqlite:///") and s.tracking_uri == "http://127.0.0.1:5000"


def test_environment_overrides_with_types():
    s = Settings.from_env({"ABFLEET_ROUTER_PORT": "7100", "DATABASE_URL": "postgresql://x/y", "VARIANT": "candidate",
                           "ABFLEET_RELOAD_INTERVAL": "2.5", "ABFLEET_RUN_DIR": "/tmp/somewhere"})
    # A plain postgresql:// URL names the installed driver (SQLAlchemy 2.1 would pick psycopg 3).
    assert s.router_port == 7100 and s.db_url == "postgresql+psycopg2://x/y" and s.variant == "candidate"
    assert Settings(database_url="postgresql+psycopg2://a/b").db_url == "postgresql+psycopg2://a/b"
    assert s.reload_interval == 2.5 and s.run_dir == Path("/tmp/somewhere")
    assert s.env()["ABFLEET_ROUTER_PORT"] == "7100" and s.env()["VARIANT"] == "candidate"


@pytest.mark.parametrize("env,message", [
    ({"ABFLEET_ROUTER_PORT": "seven"}, "ABFLEET_ROUTER_PORT"),
    ({"VARIANT": "canary"}, "VARIANT"),
    ({"ABFLEET_CANDIDATE_WEIGHT": "120"}, "ABFLEET_CANDIDATE_WEIGHT"),
    ({"ABFLEET_DRIFT_VERDICT": "most"}, "ABFLEET_DRIFT_VERDICT"),
    ({"ABFLEET_DRIFT_SHARE": "0"}, "ABFLEET_DRIFT_SHARE"),
    ({"ABFLEET_PIPELINE_SAMPLE_ROWS": "999"}, "ABFLEET_PIPELINE_SAMPLE_ROWS"),  # under arms_min_rows: never a verdict
])
def test_bad_settings_say_which_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("text,weight", [("80/20", 20), ("100/0", 0), (" 50 / 50 ", 50), ("0/100", 100)])
def test_parse_weights(text, weight):
    assert router.parse_weights(text) == weight


@pytest.mark.parametrize("text", ["80/30", "80", "a/b", "-10/110"])
def test_parse_weights_refuses(text):
    with pytest.raises(ValueError, match="--weights"):
        router.parse_weights(text)


@pytest.mark.parametrize("weight", [0, 5, 20, 50, 100])
def test_rendered_config_passes_nginx_t(tmp_path, weight):
    if router.nginx_binary() is None:
        pytest.skip("nginx is NOT installed: `apt-get install -y nginx` (make test does it as root)")
    settings = Settings(run_dir=tmp_path)
    config = router.write_config(settings, candidate_weight=weight)
    text = config.read_text()
    assert "split_clients" in text and "$request_id" not in text.split("$abfleet_variant {")[1].split("}")[0]
    cmd = router.nginx_command(settings, config)
    result = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_candidate_is_listed_first_so_raising_its_weight_only_moves_users_to_it(tmp_path):
    text = router.render(Settings(run_dir=tmp_path), candidate_weight=20)
    block = text.split("$abfleet_variant {")[1].split("}")[0]
    assert block.index("candidate") < block.index("production")


def test_urls_of_the_local_stack_and_the_configured_prometheus():
    s = Settings(router_port=7100, prometheus_port=9190, airflow_port=8180)
    assert (s.router_url, s.prometheus_api, s.airflow_url) == (
        "http://127.0.0.1:7100", "http://127.0.0.1:9190", "http://127.0.0.1:8180")
    assert s.replace(prometheus_url="http://prometheus:9090/").prometheus_api == "http://prometheus:9090"
    assert s.admin_token_path == s.run_dir / "admin-token"
    assert s.replace(admin_token_file="/run/secrets/token").admin_token_path == Path("/run/secrets/token")


def test_the_router_container_renders_its_weight_from_the_environment_at_start(tmp_path):
    if router.nginx_binary() is None:
        pytest.skip("nginx is NOT installed: `apt-get install -y nginx` (make test does it as root)")
    env = process_environ({"ABFLEET_RUN_DIR": str(tmp_path), "ABFLEET_CANDIDATE_WEIGHT": "35"})
    result = subprocess.run([sys.executable, "-m", "abfleet.router", "--check", "--production-servers", "127.0.0.1:1",
                             "--candidate-servers", "127.0.0.1:2"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    block = (tmp_path / "nginx.conf").read_text().split("$abfleet_variant {")[1].split("}")[0]
    assert "35% candidate;" in block


def test_router_limits_are_settings_with_human_defaults():
    s = Settings.from_env({"ABFLEET_ROUTER_FEEDBACK_RATE": "0.5", "ABFLEET_ROUTER_TRUSTED_PROXIES": "10.40.0.0/20, 10.40.16.7"})
    assert s.router_feedback_rate == 0.5 and s.trusted_proxies == ["10.40.0.0/20", "10.40.16.7/32"]
    d = Settings()
    assert d.router_feedback_rate < d.router_predict_rate and d.router_feedback_burst < d.router_predict_burst
    assert d.trusted_proxies == [], "nobody is trusted to name the client unless configured"
    assert set(router.ONE_ADDRESS_LIMITS) <= {f.name for f in dataclasses.fields(Settings)}
    assert Settings(**router.ONE_ADDRESS_LIMITS).router_predict_rate > 100 * d.router_predict_rate


@pytest.mark.parametrize("env,message", [
    ({"ABFLEET_ROUTER_TRUSTED_PROXIES": "10.0.0.0/8; include /etc/passwd"}, "ABFLEET_ROUTER_TRUSTED_PROXIES"),
    ({"ABFLEET_ROUTER_TRUSTED_PROXIES": "alb.example.com"}, "ABFLEET_ROUTER_TRUSTED_PROXIES"),
    ({"ABFLEET_ROUTER_PREDICT_RATE": "0"}, "ABFLEET_ROUTER_PREDICT_RATE"),
    ({"ABFLEET_ROUTER_FEEDBACK_BURST": "-1"}, "ABFLEET_ROUTER_FEEDBACK_BURST"),
    ({"ABFLEET_ROUTER_CONNECTIONS_PER_ADDRESS": "0"}, "ABFLEET_ROUTER_CONNECTIONS_PER_ADDRESS"),
])
def test_bad_router_limits_say_which_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("per_second,text,retry", [(10, "10r/s", 1), (2.0, "2r/s", 1), (0.5, "30r/m", 2), (1 / 60, "1r/m", 60)])
def test_nginx_rates_and_retry_after(per_second, text, retry):
    assert router.nginx_rate(per_second) == text and router.retry_after(per_second) == retry


def test_the_router_knows_the_api_paths_it_limits_and_hides():
    assert router.FEEDBACK_PATH == api.FEEDBACK and router.PREDICT_PATH == api.PREDICT
    assert api.RELOAD.startswith(router.ADMIN_PREFIX + "/")
    public = [api.PREDICT, api.FEEDBACK, api.HEALTH, api.LOCATIONS, api.DRIFT_REPORT, api.PING]
    assert not [p for p in public if p.startswith(router.ADMIN_PREFIX)]


def test_limits_trusted_proxies_and_headers_render_and_pass_nginx_t(tmp_path):
    if router.nginx_binary() is None:
        pytest.skip("nginx is NOT installed: `apt-get install -y nginx` (make test does it as root)")
    settings = Settings(run_dir=tmp_path, router_predict_rate=2.5, router_feedback_rate=0.5,
                        router_trusted_proxies="10.40.0.0/20,10.40.16.0/20,fd00::/8")
    config = router.write_config(settings)
    text = config.read_text()
    assert "rate=150r/m" in text and "rate=30r/m" in text and "set_real_ip_from fd00::/8;" in text
    assert "real_ip_recursive on;" in text and "limit_req_status 429;" in text
    assert "return 404" in text.split(f"location ^~ {router.ADMIN_PREFIX} {{")[1].split("}")[0]
    for internal in (api.LIVE, api.READY):  # asked of each server directly, not through the router
        assert "return 404" in text.split(f"location = {internal} {{")[1].split("}")[0]
    # Each location that adds headers repeats the common ones (nginx drops inherited add_header).
    for block in text.split("location ")[1:]:
        if "add_header" in block.split("}")[0]:
            assert "X-Content-Type-Options" in block.split("}")[0], block[:80]
    result = subprocess.run([*router.nginx_command(settings, config)[:-2], "-t"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "real_ip_header" not in router.render(Settings(run_dir=tmp_path)), "no proxy is trusted by default"
    strict = router.write_config(settings.replace(router_feedback_burst=0, router_predict_burst=0))
    assert not [line for line in strict.read_text().splitlines() if "limit_req zone=" in line and "burst=" in line]
    result = subprocess.run([*router.nginx_command(settings, strict)[:-2], "-t"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
