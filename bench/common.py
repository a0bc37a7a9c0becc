"""What every benchmark result records about the code it ran, and the clean-up of the
services a benchmark starts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The commit the benchmark ran, with ``-dirty`` if tracked files differ from it.

    The GPU machine receives a copy of the working tree without ``.git``; there the
    caller passes the commit in ``NEOXQ_COMMIT`` (``NEOXQ_COMMIT=$(git rev-parse HEAD)``
    on the submitting side, with a clean tree).
    """
    if os.environ.get("NEOXQ_COMMIT"):
        return os.environ["NEOXQ_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if dirty else head


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Ask a benchmark's subprocess (a server, a worker) to stop; kill it after
    ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def drop_redis_keys(redis_url: str, prefix: str) -> None:
    """Delete a run's Redis keys (its queue and results), all named ``prefix...``."""
    import redis  # only the benchmarks that start services need it

    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def time_cuda_graph(fn: Callable[[], object], reps: int = 20) -> float:
    """Seconds per call of ``fn`` on the current CUDA device, replayed from a CUDA graph
    (as the engine's decode steps are), so launch overhead is not counted."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 3 / reps / 1e3
