"""The deployment files: ``docker compose config`` validates docker-compose.yml when a
compose-capable docker client is here (no engine needed); the properties the deployment
depends on are checked on the parsed file everywhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def compose_cmd() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose``, whichever works here."""
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _cmd(service: dict[str, Any]) -> str:
    c = service.get("command", "")
    return " ".join(c) if isinstance(c, list) else c


def _workers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in spec["services"].items() if k.startswith("worker")}


def test_redis_is_durable_and_never_evicts(spec: dict[str, Any]) -> None:
    cmd = _cmd(spec["services"]["redis"])
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    assert spec["services"]["redis"]["healthcheck"]


def test_migration_runs_once_before_api_and_workers(spec: dict[str, Any]) -> None:
    s = spec["services"]
    assert _cmd(s["migrate"]) == "neoxq db upgrade" and s["migrate"]["restart"] == "no"
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", *_workers(spec)):
        assert s[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        env = s[name]["environment"]
        # the store and the broker of this file, or another host's (workers elsewhere)
        assert env["NEOXQ_DATABASE_URL"].startswith("postgresql://")
        assert "@${POSTGRES_HOST:-postgres}:5432/" in env["NEOXQ_DATABASE_URL"]
        assert env["NEOXQ_REDIS_URL"] == "redis://${REDIS_HOST:-redis}:6379/0"
        assert env["NEOXQ_ENVIRONMENT"] == "production"
    assert "--no-upgrade" in _cmd(s["api"])  # the one-shot service owns migrations


def test_one_worker_service_per_gpu(spec: dict[str, Any]) -> None:
    workers = _workers(spec)
    assert list(workers) == ["worker-0", "worker-1"]
    gpus = []
    for w in workers.values():
        [device] = w["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        # by id: with `count` every container may be handed the same GPU
        assert "count" not in device and "replicas" not in w["deploy"]
        gpus += device["device_ids"]
        cmd = _cmd(w)
        assert "--pipeline-parallel ${NEOXQ_PIPELINE_PARALLEL:-1}" in cmd
        assert "--model ${NEOXQ_MODEL:-/checkpoints}" in cmd
        assert "${NEOXQ_CHECKPOINT_DIR:-./checkpoints}:/checkpoints:ro" in w["volumes"]
        assert w["environment"]["NEOXQ_WORKER_METRICS_PORT"] == "9100"
        # longer than the worker's drain (NEOXQ_SHUTDOWN_GRACE, 30 s by default)
        assert int(w["stop_grace_period"].rstrip("s")) > 30
    assert gpus == ["0", "1"]  # each GPU once
    # A one-GPU host starts worker-0 alone; the second GPU's worker is opt-in.
    assert "profiles" not in workers["worker-0"] and workers["worker-1"]["profiles"] == ["gpu1"]
    text = COMPOSE.read_text()
    assert "Growing it:" in text and "--no-deps worker-0 worker-1" in text


def test_flower_only_in_the_monitoring_profile(spec: dict[str, Any]) -> None:
    s = spec["services"]
    assert s["flower"]["profiles"] == ["monitoring"]
    assert all("profiles" not in v for k, v in s.items()
               if k not in ("flower", "worker-1", "trainer"))


def test_images_build_from_this_repository(spec: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.M))
    s = spec["services"]
    for name in ("migrate", "worker-0", "worker-1", "trainer"):
        assert s[name]["build"]["context"] == "."
        assert s[name]["build"]["target"] in targets
    # every package the project installs is copied in (pyproject's own list)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        assert f"COPY {pkg} {pkg}" in dockerfile, pkg
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_every_neoxq_variable_the_compose_file_sets_is_a_setting(spec: dict[str, Any]) -> None:
    from core.settings import Settings

    fields = {f"NEOXQ_{name.upper()}" for name in Settings.model_fields}
    for name, service in spec["services"].items():
        env = service.get("environment") or {}
        for key in env:
            if key.startswith("NEOXQ_"):
                assert key in fields, f"{name}: {key} is not a Settings field"


def test_docker_compose_config_validates() -> None:
    cmd = compose_cmd()
    if cmd is None:
        pytest.skip("no compose-capable docker client here (`docker compose` plugin or "
                    "docker-compose)")
    # YAML output: both compose v2 and v1 (docker-compose 1.29) write it.
    result = subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert set(data["services"]) >= {"redis", "postgres", "migrate", "api", "worker-0"}
    assert data["services"]["worker-1"]["profiles"] == ["gpu1"]  # opt-in: not up by default
    worker = data["services"]["worker-0"]
    assert worker["command"][worker["command"].index("--pipeline-parallel") + 1] == "1"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["0"]
    assert worker["environment"]["NEOXQ_DATABASE_URL"] == \
        "postgresql://neoxq:neoxq@postgres:5432/neoxq"
    # with a profile, flower or the second GPU's worker joins
    for profile, service in (("monitoring", "flower"), ("gpu1", "worker-1")):
        prof = subprocess.run([*cmd, "-f", str(COMPOSE), "--profile", profile, "config",
                               "--services"], capture_output=True, text=True, timeout=60,
                              cwd=ROOT)
        assert prof.returncode == 0, prof.stderr
        assert service in prof.stdout.split()
    # workers on another host: the same file, pointed at the first host
    env = {**os.environ, "POSTGRES_HOST": "host1", "REDIS_HOST": "host1"}
    other = subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT, env=env)
    assert other.returncode == 0, other.stderr
    env_w = yaml.safe_load(other.stdout)["services"]["worker-0"]["environment"]
    assert env_w["NEOXQ_REDIS_URL"] == "redis://host1:6379/0"
    assert "@host1:5432/" in env_w["NEOXQ_DATABASE_URL"]


def test_readme_documents_every_setting() -> None:
    from core.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [f"NEOXQ_{n.upper()}" for n in Settings.model_fields
               if f"| `NEOXQ_{n.upper()}` |" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
