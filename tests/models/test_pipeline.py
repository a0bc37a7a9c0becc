"""Pipeline parallelism on CPU: 2 stage processes over gloo against the one-process
engine (fp32, greedy), and a stage killed mid-run.

The tiny preset draws every parameter from its own seeded generator, so a stage built
from ``layer_range`` holds exactly the weights those layers have in the whole model.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.engine.pipeline import PipelineEngine, PipelineError
from models.engine.protocol import InferenceEngine
from models.loaders import load_model
from models.runtime import build_engine
from tests.models.test_engine import _greedy, _run

ROOT = Path(__file__).resolve().parents[2]
SPEC = "preset:tiny"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(2, 250) for _ in range(r.randint(lo, hi))] for _ in range(n)]


def test_stage_weights_are_slices_of_the_whole_model() -> None:
    whole = load_model(SPEC, seed=3).model.state_dict()
    for rng in ((0, 1), (1, 2)):
        part = load_model(SPEC, seed=3, layer_range=rng).model.state_dict()
        assert part and set(part) <= set(whole)
        for k, v in part.items():
            assert torch.equal(v, whole[k]), k


def test_two_stages_match_one_stage_greedy() -> None:
    """Continuous batching (requests arriving at different steps, prefill chunks, n=2
    forks with copy-on-write, preemption in a small cache) and scoring: 2 stages give
    the one-process engine's tokens exactly."""
    kw = dict(block_size=8, max_batch_tokens=96, max_num_seqs=6)
    prompts = _prompts(14, 3, 70, seed=1)
    arrivals = [(i // 3 * 2, f"r{i}", p, _greedy(12 + (i % 5) * 4, n=2 if i % 4 == 1 else 1))
                for i, p in enumerate(prompts)]
    pairs = [(p[:-3], p[-3:]) for p in _prompts(5, 8, 40, seed=2)]
    one = build_engine(SPEC, num_blocks=400, **kw)
    ref = _run(one, arrivals)
    ref_scores = one.score(pairs)
    # 2 x 20 blocks of 8 tokens, overcommitted: the groups must preempt and recompute.
    # cuda_graphs on CPU: decode steps take the stages' static-buffer path, uncaptured.
    with build_engine(SPEC, pipeline_parallel=2, num_blocks=41, kv_overcommit=4.0,
                      cuda_graphs=True, **kw) as two:
        assert isinstance(two, PipelineEngine) and isinstance(two, InferenceEngine)
        assert [s["layer_range"] for s in two.stage_info] == [(0, 1), (1, 2)]
        got = _run(two, arrivals)
        scores = two.score(pairs)
        gen = two.generate([prompts[0], prompts[1]], _greedy(6))
        assert two.stats["preemptions"] > 0
        assert 0 < two.stats["graph_steps"] < two.stats["steps"]
        assert not two.has_unfinished() and two.num_unfinished() == 0
    assert set(got) == set(ref)
    for rid, r in ref.items():
        assert [s.token_ids for s in got[rid].samples] == [s.token_ids for s in r.samples], rid
        assert [s.finish_reason for s in got[rid].samples] == ["length"] * len(r.samples)
    for a, b in zip(scores, ref_scores, strict=True):
        assert a.is_greedy == b.is_greedy
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert [o.samples[0].token_ids for o in gen] == [
        ref["r0"].samples[0].token_ids[:6], ref["r1"].samples[0].token_ids[:6]]


def test_abort_and_bad_requests() -> None:
    with build_engine(SPEC, pipeline_parallel=2, num_blocks=200) as eng:
        with pytest.raises(ValueError, match="max_tokens"):
            eng.add_request("bad", [5] * 10, _greedy(600))
        eng.add_request("a", [5, 6, 7], _greedy(50))
        eng.add_request("b", [8, 9], _greedy(5))
        eng.step()
        with pytest.raises(ValueError, match="already"):
            eng.add_request("a", [1], _greedy(1))
        assert eng.abort("a")
        assert not eng.abort("nope")
        outs = {}
        while eng.has_unfinished():
            outs.update({o.request_id: o for o in eng.step()})
        assert outs["a"].samples[0].finish_reason == "abort"
        assert len(outs["b"].samples[0].token_ids) == 5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_stage_ends_the_run_with_a_clear_error(tmp_path: Path) -> None:
    """`neoxq generate --pipeline-parallel 3` on CPU; SIGKILL the middle stage mid-run:
    the command exits non-zero within seconds naming the stage, and the last stage is
    gone too (no orphans)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"line {i} " * 6 for i in range(400)) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "generate", "preset:tiny-sequential", "-i",
         str(prompts), "-o", str(tmp_path / "out.jsonl"), "--pipeline-parallel", "3",
         "--device", "cpu", "--max-tokens", "400"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    pids: dict[int, int] = {}
    try:
        assert proc.stderr is not None
        lines = []
        while len(pids) < 2:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            m = re.search(r"stage (\d) of 3 started \(pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        while not line.startswith("loaded "):  # the model is loaded: generating
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        time.sleep(1.0)
        assert proc.poll() is None, "".join(lines) + proc.stderr.read()
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.time()
        rest = proc.communicate(timeout=30)[1]
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = "".join(lines) + rest
    assert proc.returncode != 0, err
    assert elapsed < 10, err
    assert re.search(r"pipeline stage 1 \(pid \d+.*\) was killed by signal 9", err), err
    deadline = time.time() + 5
    while _alive(pids[2]) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pids[2]), "stage 2 outlived the run"


def test_dead_stage_breaks_the_engine_in_process() -> None:
    """The worker's case: the engine raises PipelineError naming the stage, keeps raising,
    closes cleanly, and the process can build a new pipeline afterwards."""
    eng = build_engine(SPEC, pipeline_parallel=2, num_blocks=200)
    try:
        eng.add_request("a", [5] * 10, _greedy(400))
        eng.step()
        os.kill(eng.stage_info[1]["pid"], signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(PipelineError, match=r"stage 1 .*killed by signal 9"):
            while time.time() - t0 < 30:
                eng.step()
        assert time.time() - t0 < 10
        with pytest.raises(PipelineError, match="stage 1"):
            eng.step()
    finally:
        eng.close()
    with build_engine(SPEC, pipeline_parallel=2, num_blocks=200) as again:
        assert len(again.generate([[5, 6, 7]], _greedy(3))[0].samples[0].token_ids) == 3
