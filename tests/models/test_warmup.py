"""Engine warm-up (models/engine/warmup.py): every decode bucket run, nothing changed for
the requests served afterwards."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.config import get_preset
from models.engine import Engine
from models.engine.runner import DecodeGraphs, decode_buckets
from models.engine.warmup import warm_up
from models.model import NeoX, init_random_
from models.sampling import SamplingParams

VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> NeoX:
    config = get_preset("tiny").replace(vocab_size=VOCAB, max_position=128)
    return init_random_(NeoX(config), seed=2).eval()


def _requests() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[3 + (7 * i + j) % 400 for j in range(5 + 3 * i)] for i in range(6)]
    # No seeds: the engine draws them, so a warm-up drawing from the same stream would
    # change these outputs.
    params = [SamplingParams(temperature=1.0, max_tokens=12, n=1 + i % 2) if i % 2 else
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
              for i in range(6)]
    return prompts, params


def test_warm_up_changes_nothing(model: NeoX) -> None:
    prompts, params = _requests()
    cold = Engine(model, None, num_blocks=300, block_size=4, max_num_seqs=32, seed=5)
    expected = cold.generate(prompts, params)

    warm = Engine(model, None, num_blocks=300, block_size=4, max_num_seqs=32, seed=5)
    report = warm_up(warm)
    # On the CPU one bucket runs: nothing to compile, capture or tune.
    assert report.buckets == [1] and report.requests == 2 and report.seconds > 0
    assert not warm.has_unfinished() and warm.blocks.num_free == warm.blocks.capacity
    got = warm.generate(prompts, params)
    assert [[s.token_ids for s in o.samples] for o in got] == \
        [[s.token_ids for s in o.samples] for o in expected]


def test_each_bucket_prefills_in_one_step_then_decodes_at_its_size(model: NeoX) -> None:
    """Every bucket's prompts are admitted together, so its decode steps run at exactly
    that batch size: through the (uncaptured) decode graph of that bucket."""
    engine = Engine(model, None, num_blocks=150, block_size=4, max_num_seqs=32,
                    max_batch_tokens=96)
    engine.runner.graphs = DecodeGraphs(engine.runner, 32, capture=False)
    buckets = decode_buckets(32)
    report = warm_up(engine, buckets=buckets)
    assert report.buckets == buckets
    assert report.graphs == len(buckets)
    stats = engine.stats
    # Per bucket: the prefill step, a decode-only (graph) step reading the prefill's
    # samples on the device, the decodes mixed with a long prompt's first chunk, its
    # continuing chunk, and that prompt's own decode (a graph step at batch 1). The
    # largest bucket fills the engine: its second decode step is decode-only too.
    n = len(buckets)
    assert stats["steps"] == 5 * (n - 1) + 3
    assert stats["decode_steps"] == stats["graph_steps"] == 2 * n
    assert report.requests == sum(buckets) + n - 1
    assert stats["preemptions"] == 0
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.capacity


def test_refuses_a_busy_engine_and_bad_buckets(model: NeoX) -> None:
    engine = Engine(model, None, num_blocks=50, block_size=4, max_num_seqs=8)
    with pytest.raises(ValueError, match="buckets"):
        warm_up(engine, buckets=[16])
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="unfinished"):
        warm_up(engine)


def test_fastest_fits_prefers_a_faster_larger_bucket() -> None:
    from models.engine.runner import fastest_fits

    buckets = [64, 80, 96, 112]
    # 80 is slow (a bad tile fit), 96 is faster than both 64's and 80's batches need.
    seconds = {64: 1.0, 80: 1.30, 96: 1.05, 112: 1.2}
    assert fastest_fits(buckets, seconds) == {64: 64, 80: 96, 96: 96, 112: 112}
    # Within the margin the smaller one stays; unmeasured buckets are never chosen.
    assert fastest_fits([1, 2], {1: 1.0, 2: 0.995}) == {1: 1, 2: 2}
    assert fastest_fits([1, 2, 3], {1: 1.0, 3: 0.5}) == {1: 3, 2: 2, 3: 3}
    assert decode_buckets(512)[-3:] == [480, 496, 512]
    steps = decode_buckets(300)
    assert all(b - a <= 16 for a, b in itertools.pairwise(steps))
