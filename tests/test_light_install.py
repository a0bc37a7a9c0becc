"""The light install (``pip install neoxq``, no ``[worker]`` extra) serves the API and runs
every client command without torch, numpy, safetensors or tokenizers: those packages are
made unimportable here, as on a machine that never installed them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import drop_redis_keys
from tests.api.live import ROOT, free_port
from tests.conftest import REDIS_HOST_URL

# What only neoxq[worker] brings (pyproject's worker extra).
WORKER_ONLY = ("torch", "numpy", "safetensors", "tokenizers", "yaml")


@pytest.fixture
def light_env(tmp_path: Path, unique: str) -> dict[str, str]:
    blocked = tmp_path / "not-installed"
    for name in WORKER_ONLY:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1",
                "NEOXQ_DATA_DIR": str(tmp_path / "data"),
                "NEOXQ_REDIS_URL": f"{REDIS_HOST_URL}/1",
                "NEOXQ_QUEUE": f"neoxq_light_{unique}",
                "NEOXQ_REDIS_KEY_PREFIX": f"neoxq_light_{unique}:"})
    yield env
    drop_redis_keys(env["NEOXQ_REDIS_URL"], env["NEOXQ_REDIS_KEY_PREFIX"])


def neoxq(env: dict[str, str], *argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks(light_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=light_env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr


def test_api_and_client_commands_without_torch(light_env: dict[str, str],
                                               tmp_path: Path) -> None:
    assert neoxq(light_env, "--help").returncode == 0
    assert neoxq(light_env, "db", "upgrade").returncode == 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--port", str(port),
                            "--log-level", "warning"], env=light_env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert api.poll() is None, api.stdout.read() if api.stdout else ""
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.2)
        client = dict(light_env, NEOXQ_API_URL=url)
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"p{i}"}) + "\n"
                               for i in range(3)))
        sub = neoxq(client, "submit", str(src), "--max-tokens", "4")
        assert sub.returncode == 0, sub.stderr
        batch = sub.stdout.strip()
        for argv in (["status", batch], ["status", batch, "--json"], ["batches"],
                     ["results", batch], ["errors", batch], ["workers"],
                     ["cancel", batch]):
            proc = neoxq(client, *argv)
            assert proc.returncode == 0, (argv, proc.stderr)
        status = json.loads(neoxq(client, "status", batch, "--json").stdout)
        assert status["counts"]["total"] == 3
        assert status["status"] in ("cancelling", "cancelled")
        # the dashboard and metrics are served by the same light process
        assert httpx.get(url + "/dashboard").status_code == 200
        assert "neoxq_batches" in httpx.get(url + "/metrics").text
    finally:
        api.terminate()
        api.wait(timeout=20)


def test_model_commands_say_which_install_they_need(light_env: dict[str, str]) -> None:
    for argv in (["worker", "--model", "preset:tiny", "--device", "cpu"],
                 ["generate", "preset:tiny", "--num-samples", "1"],
                 ["evaluate", "preset:tiny", "--limit", "1"]):
        proc = neoxq(light_env, *argv)
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert "pip install 'neoxq[worker]'" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
