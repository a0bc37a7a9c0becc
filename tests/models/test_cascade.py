"""Cascade (shared-prefix) decode attention: the host grouping, the torch path and the
Triton kernels (under Triton's interpreter, CPU) against ``paged_decode_torch``, and the
engine's greedy tokens with cascade on == off == prefix caching off (eager steps and the
decode-graph buffers)."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from models import cascade
from models.attention import paged_decode_torch
from models.config import get_preset
from models.engine import Engine
from models.model import NeoX
from tests.models.cascade_interp import CASES, build_case
from tests.models.test_engine import VOCAB, _greedy, _model, _no_leaks, _run
from tests.models.triton_run import run_json

BS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Grouping and layout (host)
# --------------------------------------------------------------------------------------


def _found(tables: list[list[int]], ctx: list[int], **kw) -> list[tuple[list[int], int]]:
    return [(r.tolist(), p) for r, p in cascade.find_groups(
        np.array(tables), np.array(ctx), BS, **{"min_saved": 0, **kw})]


def test_find_groups_shared_leading_blocks() -> None:
    tables = [
        [5, 6, 7, 8, 30],   # group A (4 shared)
        [9, 10, 11, 0, 0],  # group B with row 3 (2 shared: 11 vs 12)
        [5, 6, 7, 8, 31],   # A
        [9, 10, 12, 0, 0],  # B
        [13, 14, 15, 0, 0],  # alone
        [5, 6, 7, 8, 40],   # A, but its context ends inside block 8: A shares 3 blocks
    ]
    ctx = [19, 11, 20, 12, 9, 13]
    assert _found(tables, ctx) == [([0, 2, 5], 3 * BS), ([1, 3], 2 * BS)]
    # A group needs min_blocks shared blocks; nothing pays below the savings threshold.
    assert _found(tables, ctx, min_blocks=3) == [([0, 2, 5], 3 * BS)]
    saved = (2 * 3 + 1 * 2) * BS  # tokens of prefix reads the two groups save
    assert len(_found(tables, ctx, min_saved=saved)) == 2
    assert _found(tables, ctx, min_saved=saved + 1) == []
    assert _found(tables[4:5], ctx[4:5]) == []
    assert _found(tables, ctx, max_groups=1) == [([0, 2, 5], 3 * BS)]


def test_find_groups_splits_where_members_part_ways() -> None:
    # Rows 0-2 share 5 blocks; row 3 holds its own copy of block 3 (prefilled in the same
    # step as row 0); row 4 shares only the first two blocks and has a short context.
    tables = [
        [1, 2, 3, 4, 5, 6, 20],
        [1, 2, 3, 4, 5, 6, 21],
        [1, 2, 3, 4, 5, 6, 22],
        [1, 2, 9, 4, 5, 6, 23],
        [1, 2, 30, 0, 0, 0, 0],
    ]
    ctx = [27, 26, 28, 27, 11]
    assert _found(tables, ctx) == [([0, 1, 2], 6 * BS)]
    # Without the long group's extra members, one group over the two common blocks
    # saves more than nothing.
    assert _found([tables[0], tables[3], tables[4]], [27, 27, 11]) == [([0, 1, 2], 2 * BS)]


def test_layout_tiles_large_groups() -> None:
    big = np.arange(3, 3 + cascade.TILE_ROWS + 5)
    groups = [(big, 32), (np.array([0, 2]), 8)]
    d = len(big) + 3
    n = cascade.max_tiles(d)
    assert cascade.num_tiles_used(groups) == 3 <= n
    starts, tiles, rows = cascade.layout(groups, d, n)
    tiles = tiles.reshape(n, 4)
    assert tiles[:3].tolist() == [[0, cascade.TILE_ROWS, 32, 3], [cascade.TILE_ROWS, 5, 32, 3],
                                  [len(big), 2, 8, 0]]
    assert not tiles[3:].any()
    assert starts[big].tolist() == [32] * len(big) and starts[[0, 2]].tolist() == [8, 8]
    assert starts[1] == 0
    assert rows[: len(big) + 2].tolist() == [*big.tolist(), 0, 2]


# --------------------------------------------------------------------------------------
# Torch path vs the plain reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cascade_torch_matches_paged_decode(case: dict) -> None:
    q, kc, vc, ks, vs, tables, ctx, meta = build_case(case)
    ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
    got = cascade.cascade_decode_torch(q.float(), kc, vc, tables, ctx, meta,
                                       k_scale=ks, v_scale=vs)
    assert (got - ref).abs().max().item() < 1e-5


# --------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU, a subprocess)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    return run_json(["-m", "tests.models.cascade_interp"], interpret=True)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_interpreted_cascade_matches_torch(interpreted: dict[str, float], name: str) -> None:
    dtype = next(c["dtype"] for c in CASES if c["name"] == name)
    # Outputs in the query's dtype: one rounding of a value of magnitude < 4.
    tol = {"float32": 1e-5, "float16": 4e-3}.get(dtype, 2e-2)
    for splits in (1, 3):
        assert interpreted[f"{name}/{splits}"] <= tol, (name, splits)


def test_interpreted_tuner_picks_a_checked_config(interpreted: dict) -> None:
    # Both candidates pass the correctness check (so both are timed).
    assert interpreted["tuner_passed"] == 2
    assert interpreted["tuner_pick"] in (0, 1) and interpreted["tuner_remembers"]


def test_kernels_compile_for_the_h200() -> None:
    # What the interpreter cannot see (tensor-core dot layouts, shared memory, fp8
    # conversions) the compiler checks: the prefix pass's variants at the 20B's shape and
    # the decode kernel with start offsets, for sm_90 with the ptxas in triton's wheel.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    shape = {"num_heads": 64, "head_dim": 96, "block_size": 16}
    cases = [{"name": f"{dt}_{i}", "dtype": dt, "config": list(cfg), **shape}
             for i, cfg in enumerate(cascade.CASCADE_CONFIGS)
             for dt in (("bfloat16", "float8_e4m3fn") if i == 0 else ("bfloat16",))]
    cases.append({"name": "fp16_hd64", "dtype": "float16", "config": list(cascade.DEFAULT_CASCADE),
                  "num_heads": 8, "head_dim": 64, "block_size": 8})
    got = _subprocess("tests.models.cascade_interp", cases, "--compile-sm90")
    assert set(got) == {c["name"] for c in cases}
    # An H200 SM has 228 KB of shared memory.
    assert all(0 < g["shared"] <= 228 * 1024 for g in got.values()), got
    # The decode kernel with per-sequence starts (cascade steps), as the engine launches it.
    from models.attention import DECODE_CONFIGS

    dec = [{"name": "start_bf16", "config": list(DECODE_CONFIGS[0]), "dtype": "bfloat16",
            "start": True, "merge": True, **shape}]
    assert set(_subprocess("tests.models.decode_interp", dec, "--compile-sm90")) == {"start_bf16"}


def _subprocess(module: str, cases: list[dict], *flags: str) -> dict:
    return run_json(["-m", module, *flags], interpret=False, stdin=cases)


# --------------------------------------------------------------------------------------
# The engine: cascade on == off == prefix caching off
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> NeoX:
    return _model(get_preset("tiny").replace(vocab_size=VOCAB, max_position=256))


def _shared_prefix_requests(seed: int = 3) -> list[tuple[int, str, list[int], object]]:
    """Three prefixes (5, 8 and 11 blocks) shared by several prompts each, unique suffixes,
    staggered arrivals, and two prompts sharing nothing."""
    r = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [r.randrange(2, VOCAB) for _ in range(n)]

    prefixes = [toks(5 * BS), toks(8 * BS), toks(11 * BS)]
    out = []
    for i in range(14):
        p = prefixes[i % 3] + toks(1 + i % 6) if i < 12 else toks(9 + i)
        out.append((i // 3, f"r{i}", p, _greedy(6 + (i * 5) % 11)))
    return out


def _engine(model: NeoX, **kw) -> Engine:
    engine = Engine(model, None, num_blocks=200, block_size=BS, max_batch_tokens=64, **kw)
    # A tiny model's shared prefixes are short: cascade whatever the savings.
    engine.runner.cascade_min_saved = 0
    return engine


def test_engine_cascade_equals_plain_and_no_caching(model: NeoX) -> None:
    reqs = _shared_prefix_requests()
    assert not Engine(model, None, num_blocks=20).runner.cascade  # CPU: off by default
    on = _engine(model, enable_cascade=True)
    got = _run(on, reqs)
    assert on.stats["cascade_steps"] > 5 and on.stats["prefix_hit_tokens"] > 0
    off = _engine(model, enable_cascade=False)
    plain = _run(off, reqs)
    assert off.stats["cascade_steps"] == 0
    nocache = _engine(model, enable_prefix_caching=False)
    ref = _run(nocache, reqs)
    for rid, out in ref.items():
        want = out.samples[0].token_ids
        assert got[rid].samples[0].token_ids == plain[rid].samples[0].token_ids == want, rid
    _no_leaks(on)


def test_engine_cascade_through_decode_graph_buffers(model: NeoX) -> None:
    """The decode-graph path (static buffers, uncaptured on CPU) with cascade groups."""
    from models.engine.runner import DecodeGraphs

    reqs = _shared_prefix_requests(seed=8)
    ref = _run(_engine(model, enable_cascade=False), reqs)
    engine = _engine(model, max_num_seqs=16, enable_cascade=True)
    graphs = engine.runner.graphs = DecodeGraphs(engine.runner, 16, capture=False)
    got = _run(engine, reqs)
    assert engine.stats["graph_steps"] > 5 and engine.stats["cascade_steps"] > 5
    assert any(c for _, c in graphs.graphs) and any(not c for _, c in graphs.graphs)
    for rid, out in ref.items():
        assert got[rid].samples[0].token_ids == out.samples[0].token_ids, rid
    _no_leaks(engine)


# --------------------------------------------------------------------------------------
# CUDA (skipped here; speed figures from bench/cascade.py live in bench/results)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", cascade.CASCADE_CONFIGS, ids=lambda c: "k{}w{}s{}p{}".format(*c))
def test_cuda_cascade_kernel_matches_torch(config: cascade.CascadeConfig) -> None:
    from models.attention import cascade_decode_triton

    for case in CASES:
        q, kc, vc, ks, vs, tables, ctx, meta = _cuda_case(case)
        ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
        tol = {"float32": 1e-4, "float16": 4e-3}.get(case["dtype"], 2e-2)
        for splits in (1, 3):
            got = cascade_decode_triton(q, kc, vc, tables, ctx, meta, k_scale=ks, v_scale=vs,
                                        num_splits=splits, cascade_config=config).float()
            assert (got - ref).abs().max().item() <= tol, (case["name"], splits)


def _cuda_case(case: dict) -> tuple:
    q, kc, vc, ks, vs, tables, ctx, meta = build_case(case)
    cuda = [t if t is None else t.cuda() for t in (q, kc, vc, ks, vs, tables, ctx)]
    return (*cuda, cascade.CascadeMetadata(starts=meta.starts.cuda(), tiles=meta.tiles.cuda(),
                                           rows=meta.rows.cuda()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_engine_cascade_equals_plain(model: NeoX, graphs: bool) -> None:
    gpu = _model(model.config).cuda()
    reqs = _shared_prefix_requests(seed=4)
    kw = {"cuda_graphs": graphs, "max_num_seqs": 16}
    ref = _run(_engine(gpu, enable_cascade=False, **kw), reqs)
    engine = _engine(gpu, enable_cascade=True, **kw)
    got = _run(engine, reqs)
    assert engine.stats["cascade_steps"] > 5
    if graphs:
        assert engine.stats["graph_steps"] > 5
    for rid, out in ref.items():
        assert got[rid].samples[0].token_ids == out.samples[0].token_ids, rid


def test_engine_cascade_with_fp8_kv_cache(model: NeoX) -> None:
    """An FP8 cache: the prefix pass reads e4m3 values with their per-token scales."""
    reqs = _shared_prefix_requests(seed=6)
    ref = _run(_engine(model, enable_cascade=False, kv_cache_dtype="fp8"), reqs)
    engine = _engine(model, enable_cascade=True, kv_cache_dtype="fp8")
    got = _run(engine, reqs)
    assert engine.stats["cascade_steps"] > 5
    for rid, out in ref.items():
        assert got[rid].samples[0].token_ids == out.samples[0].token_ids, rid


def test_two_pipeline_stages_with_cascade() -> None:
    """Rank 0 finds the groups; every stage runs cascade steps (no override of the
    savings threshold: prefixes of 256 tokens shared by six prompts pass it)."""
    from models.runtime import build_engine

    r = random.Random(12)
    prefix = [r.randrange(2, 250) for _ in range(256)]
    arrivals = [(i, f"r{i}", prefix + [r.randrange(2, 250) for _ in range(3 + i)],
                 _greedy(8 + i)) for i in range(6)]
    kw = {"block_size": 16, "max_batch_tokens": 300}
    one = build_engine("preset:tiny", num_blocks=200, enable_prefix_caching=False, **kw)
    ref = _run(one, arrivals)
    # One micro-batch: each has its own blocks and prefix cache, and the prompts must
    # meet in one to share their prefix.
    with build_engine("preset:tiny", pipeline_parallel=2, num_blocks=200, micro_batches=1,
                      enable_cascade=True, **kw) as two:
        got = _run(two, arrivals)
        stats = two.stats
    assert stats["cascade_steps"] > 3 and stats["prefix_hit_tokens"] > 0
    for rid, out in ref.items():
        assert got[rid].samples[0].token_ids == out.samples[0].token_ids, rid
