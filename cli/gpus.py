"""Which worker processes ``neoxq up``/``neoxq run`` start: one per GPU, or one per group
of ``--pipeline-parallel N`` GPUs, each seeing only its own GPUs (``CUDA_VISIBLE_DEVICES``).

Why one worker per GPU by default: measured on 2 H200s with the 20B shape, through the
queue, two workers (one per GPU) gave 1.78x one engine on workload (a) and 1.89x on a
(b)-like workload, where one worker holding the model in 2 pipeline stages gave 1.67x and
1.58x. When the model fits on one GPU, data parallelism through the queue is the faster
way to use more GPUs; pipeline stages are for models or contexts that do not fit.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerSpec:
    """One worker child: its name, the GPUs it sees (empty: CPU or default placement)."""

    name: str
    gpus: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def parse_gpus(spec: str) -> list[str]:
    """``"0,1,2"`` -> ``["0", "1", "2"]``; ids may also be GPU UUIDs (as nvidia-smi -L
    names them). Duplicates and empty entries are errors, not guesses."""
    ids = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in ids):
        raise ValueError(f"--gpus: a comma-separated list of GPU ids expected, got {spec!r}")
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise ValueError(f"--gpus: GPU {', '.join(dup)} listed twice")
    return ids


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``$CUDA_VISIBLE_DEVICES`` when set, else every GPU
    ``nvidia-smi`` lists (no torch import: ``neoxq up`` starts fast and a CPU-only machine
    without the NVIDIA driver simply has none)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [s.strip() for s in env.split(",") if s.strip()]
        # "-1" (or any negative id) is the usual way to hide every GPU.
        return [] if any(s.startswith("-") for s in ids) else ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def plan_workers(*, gpus: list[str] | None, pipeline_parallel: int = 1,
                 device: str | None = None, workers: int | None = None) -> list[WorkerSpec]:
    """The worker children to start.

    - ``device`` ``cpu``: ``workers`` CPU workers (default 1), GPUs hidden from them;
    - otherwise ``gpus`` (default :func:`visible_gpus`) in consecutive groups of
      ``pipeline_parallel``, one worker per group; ``workers`` may ask for fewer groups;
    - no GPU at all: one worker on the default device, as on a CPU-only machine.
    """
    if pipeline_parallel < 1:
        raise ValueError("--pipeline-parallel: must be >= 1")
    if workers is not None and workers < 1:
        raise ValueError("--workers: must be >= 1")
    if device is not None and device.startswith("cpu"):
        if gpus:
            raise ValueError("--gpus and --device cpu contradict each other")
        n = workers or 1
        # Hidden GPUs: a CPU worker must not grab CUDA memory or contexts it never uses.
        return [WorkerSpec(_name(i, n), (), {"CUDA_VISIBLE_DEVICES": ""}) for i in range(n)]
    if device is not None and ":" in device:
        # An explicit device ordinal (cuda:1) names one placement: one worker, as asked.
        if gpus or (workers or 1) > 1:
            raise ValueError(f"--device {device} names one GPU; use --gpus to pick several")
        return [WorkerSpec("worker")]
    chosen = visible_gpus() if gpus is None else gpus
    if not chosen:
        if pipeline_parallel > 1 or (workers or 1) > 1:
            # No GPU listed, but the user asked for several processes: CPU pipeline stages
            # or CPU workers are still meaningful (tests, demos).
            n = workers or 1
            return [WorkerSpec(_name(i, n)) for i in range(n)]
        return [WorkerSpec("worker")]
    if len(chosen) % pipeline_parallel:
        raise ValueError(f"--gpus: {len(chosen)} GPUs do not split into groups of "
                         f"--pipeline-parallel {pipeline_parallel}")
    groups = [tuple(chosen[i:i + pipeline_parallel])
              for i in range(0, len(chosen), pipeline_parallel)]
    if workers is not None:
        if workers > len(groups):
            raise ValueError(f"--workers {workers}: only {len(groups)} group(s) of "
                             f"{pipeline_parallel} GPU(s) in {','.join(chosen)}")
        groups = groups[:workers]
    n = len(groups)
    return [WorkerSpec(_name(i, n), g, {"CUDA_VISIBLE_DEVICES": ",".join(g)})
            for i, g in enumerate(groups)]


def _name(i: int, n: int) -> str:
    return "worker" if n == 1 else f"worker-{i}"
