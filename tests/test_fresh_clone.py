"""A new user's first minutes, for real: clone the repository into an empty directory (no
``../shared`` beside it), install it with the README's command, run the README's example
and evaluate a preset on the data the repository carries.

To keep this to a minute or two on 2 CPU cores, the new virtual environment reuses the
packages of the one running the tests: a ``.pth`` file puts this environment's
site-packages on its path (without running that folder's own ``.pth`` files, so this
checkout's editable install does not leak in). ``scripts/setup.sh`` then runs unchanged:
pip finds every dependency already satisfied and installs only the clone itself,
editable, with its ``neoxq`` command — the same steps a user's machine takes, minus the
downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_clone_install_run_evaluate(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.fail("git is needed to clone the repository")
    clone = tmp_path / "neoxq"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NEOXQ_", "PYTHON", "VIRTUAL_ENV"))}

    # The venv setup.sh would create, seeded with this environment's packages.
    subprocess.run([sys.executable, "-m", "venv", str(clone / ".venv")], check=True,
                   timeout=120)
    venv_python = clone / ".venv" / "bin" / "python"
    site = subprocess.run([str(venv_python), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "_reuse_test_env.pth").write_text(sysconfig.get_path("purelib") + "\n")

    # The README: `bash scripts/setup.sh && .venv/bin/neoxq run examples/prompts.txt ...`
    started = time.monotonic()
    _run(["bash", "scripts/setup.sh"], clone, env, timeout=600)
    installed = time.monotonic() - started
    neoxq = clone / ".venv" / "bin" / "neoxq"
    assert neoxq.exists(), "setup.sh did not install the neoxq command"
    where = _run([str(venv_python), "-c", "import cli, assets; print(cli.__file__); "
                  "print(assets.DATA_DIR)"], clone, env, timeout=60).stdout.split()
    assert all(Path(p).is_relative_to(clone) for p in where), where  # the clone's code

    # No redis-server on PATH either: the embedded Redis is the dependency's.
    run_env = dict(env, PATH=str(clone / ".venv" / "bin"))
    started = time.monotonic()
    proc = _run([str(neoxq), "run", "examples/prompts.txt", "-o", "out.jsonl"], clone,
                run_env, timeout=300)
    ran = time.monotonic() - started
    rows = [json.loads(x) for x in (clone / "out.jsonl").read_text().splitlines()]
    prompts = [x for x in (clone / "examples" / "prompts.txt").read_text().splitlines()
               if x.strip()]
    assert len(rows) == len(prompts) and all(r["usage"]["completion_tokens"] > 0 for r in rows)
    assert "RANDOM WEIGHTS" in proc.stderr and "embedded Redis" in proc.stderr

    # `neoxq evaluate` on a preset: no --data-dir, the clone's own copies of the data.
    started = time.monotonic()
    proc = _run([str(neoxq), "evaluate", "preset:small", "--tasks", "lambada,piqa",
                 "--limit", "20", "--no-progress", "-o", "eval.json"], clone, run_env,
                timeout=600)
    evaluated = time.monotonic() - started
    assert "lambada_openai" in proc.stdout and "piqa" in proc.stdout
    report = json.loads((clone / "eval.json").read_text())
    assert report["n_samples"] == {"lambada_openai": 20, "piqa": 20}
    assert Path(report["config"]["data_dir"]) == clone / "assets"

    # The clone's own test suite finds its data (the fixtures that used to skip).
    _run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
          "tests/test_assets.py", "tests/models/test_tokenizer.py"], clone, env, timeout=300)
    print(f"fresh clone: setup.sh {installed:.1f} s, neoxq run {ran:.1f} s, "
          f"evaluate --limit 20 {evaluated:.1f} s")
