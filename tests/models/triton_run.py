"""Running a test module's Triton kernels in a subprocess: under Triton's CPU
interpreter, or compiled for a GPU this machine may not have. The interpreter is chosen
when a kernel is built, so it must not share a process with code that builds kernels
for a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_json(argv: list[str], *, interpret: bool, stdin: Any = None,
             timeout: float = 500) -> Any:
    """``python argv...`` from the repository root with ``TRITON_INTERPRET`` 1 or 0 and
    ``stdin`` (as JSON, if given); its stdout's last line parsed as JSON. Skips the test
    where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout,
                          input=None if stdin is None else json.dumps(stdin))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
