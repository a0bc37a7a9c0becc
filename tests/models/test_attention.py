"""The paged decode kernel: the torch reference (CPU), the Triton kernel under Triton's
interpreter against it (CPU, in a subprocess), and every config the tuner chooses from on
the GPU (skipped on CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from models.attention import (
    DECODE_CONFIGS,
    DECODE_SPLITS,
    DEFAULT_CHOICE,
    paged_decode_torch,
    tune_decode_kernel,
)
from tests.models.decode_interp import random_case
from tests.models.triton_run import run_json


def test_the_tuner_chooses_from_the_one_config_list() -> None:
    # The GPU test below is parametrized by the same tuple: a config added to the list is
    # tested by construction.
    params = inspect.signature(tune_decode_kernel).parameters
    assert params["configs"].default is DECODE_CONFIGS
    assert params["splits"].default is DECODE_SPLITS
    assert len(set(DECODE_CONFIGS)) == len(DECODE_CONFIGS)
    for tile, warps, stages, hpp, lanes, *_ in DECODE_CONFIGS:
        assert tile >= 8 and tile & (tile - 1) == 0
        assert warps in (1, 2, 4, 8) and stages >= 1
        assert hpp >= 1 and hpp & (hpp - 1) == 0
        if lanes:  # fp32 accumulators per thread at head dim 96 (padded to 128)
            assert tile * hpp * 128 // (32 * warps) <= 32
    assert {c.heads_per_program for c in DECODE_CONFIGS} >= {1, 2}
    assert {c.lanes for c in DECODE_CONFIGS} == {True, False}
    assert any(c.prefetch for c in DECODE_CONFIGS)
    assert any(c.split_hd for c in DECODE_CONFIGS)
    assert DECODE_SPLITS[0] == 1 and max(DECODE_SPLITS) > 1
    # The untuned default is the first kernel's unsplit loop (the benchmark's baseline).
    assert DEFAULT_CHOICE.splits == 1 and DEFAULT_CHOICE.config in DECODE_CONFIGS


def _dense_reference(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]
                     ) -> torch.Tensor:
    """Attention of each q row over its own (T, nh, hd) keys/values, fp64, no paging."""
    outs = []
    for i, (ki, vi) in enumerate(zip(k, v, strict=True)):
        s = torch.einsum("he,the->ht", q[i].double(), ki.double()) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("ht,the->he", s.softmax(-1), vi.double()))
    return torch.stack(outs)


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, table: torch.Tensor, n: int
            ) -> torch.Tensor:
    """A sequence's first n cached tokens as (n, nh, hd) fp32 values."""
    bs = cache.shape[2]
    rows = [cache[table[t // bs], :, t % bs].float() for t in range(n)]  # each (nh, hd)
    if scale is not None:
        rows = [r * scale[table[t // bs], :, t % bs][:, None] for t, r in enumerate(rows)]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_torch_reference_matches_dense_attention(dtype: torch.dtype) -> None:
    # Ragged lengths, one of them 1 and none a multiple of the block size but one; fp8
    # caches carry per-token scales.
    lens = [1, 7, 16, 23]
    q, kc, vc, ks, vs, tables, ctx = random_case(head_dim=24, block_size=8, dtype=dtype,
                                                 num_heads=3, context_lens=lens, seed=3)
    got = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
    k = [_gather(kc, ks, tables[i], n) for i, n in enumerate(lens)]
    v = [_gather(vc, vs, tables[i], n) for i, n in enumerate(lens)]
    want = _dense_reference(q.float(), k, v)
    assert (got.double() - want).abs().max().item() < 1e-5


def test_fp8_reference_is_close_to_the_unquantized_values() -> None:
    # The quantization the fp8 cache stores (scale = max |x| / 448 per token and head)
    # keeps attention outputs within e4m3's precision of the bf16 cache's.
    lens = [5, 40, 33]
    q, k8, v8, ks, vs, tables, ctx = random_case(head_dim=32, block_size=16,
                                                 dtype=torch.float8_e4m3fn, num_heads=2,
                                                 context_lens=lens, seed=4)
    _, kf, vf, *_ = random_case(head_dim=32, block_size=16, dtype=torch.float32,
                                num_heads=2, context_lens=lens, seed=4)
    exact = paged_decode_torch(q.float(), kf, vf, tables, ctx)
    fp8 = paged_decode_torch(q.float(), k8, v8, tables, ctx, k_scale=ks, v_scale=vs)
    err = (fp8 - exact).abs().max().item()
    assert 0 < err < 0.1


def test_scales_are_checked() -> None:
    q, k8, v8, ks, vs, tables, ctx = random_case(head_dim=16, block_size=4,
                                                 dtype=torch.float8_e4m3fn, num_heads=2,
                                                 context_lens=[3], seed=5)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_decode_torch(q, k8, v8, tables, ctx)
    with pytest.raises(ValueError, match="both"):
        paged_decode_torch(q, k8, v8, tables, ctx, k_scale=ks)
    with pytest.raises(ValueError, match="block_size"):
        paged_decode_torch(q, k8, v8, tables, ctx, k_scale=ks[:, :1], v_scale=vs[:, :1])


# --------------------------------------------------------------------------------------
# The Triton kernel under Triton's interpreter (CPU)
# --------------------------------------------------------------------------------------

# Configs: (tile, warps, stages, heads per program, lanes[, prefetch, split_hd]).
# Lengths: 1, not multiples of the block size, and (split) shorter than one part, so
# that parts past a sequence's end are empty.
_LANES, _REDUCE = (16, 4, 1, 2, True), (16, 4, 1, 2, False)
_PREFETCH, _REDUCE_PREFETCH = (16, 4, 1, 2, True, True), (8, 1, 1, 2, False, True)
_SPLIT_HD = (16, 4, 1, 2, False, False, True)  # 96 = 64 + 32
_CASES = [
    # name, head_dim, block_size, dtype, context lengths, config, splits
    ("hd96_lanes_unsplit", 96, 16, "bfloat16", [1, 15, 17, 50], _LANES, 1),
    ("hd96_reduce_unsplit", 96, 16, "bfloat16", [1, 15, 17, 50], _REDUCE, 1),
    ("hd96_lanes_split", 96, 16, "bfloat16", [70, 1, 5, 33], _LANES, 4),
    ("hd96_reduce_split", 96, 16, "bfloat16", [70, 1, 5, 33], _REDUCE, 3),
    ("hd64_lanes_split", 64, 8, "float32", [41, 1, 9, 20], (8, 4, 1, 1, True), 2),
    ("hd64_reduce_unsplit", 64, 8, "float16", [41, 1, 9, 20], (32, 4, 2, 4, False), 1),
    ("hd96_prefetch_unsplit", 96, 16, "bfloat16", [1, 15, 17, 50], _PREFETCH, 1),
    ("hd96_prefetch_split", 96, 16, "bfloat16", [70, 1, 5, 33], _PREFETCH, 4),
    ("hd96_reduce_prefetch_split", 96, 16, "bfloat16", [70, 1, 5, 33], _REDUCE_PREFETCH, 4),
    ("hd96_split_hd_unsplit", 96, 16, "bfloat16", [1, 15, 17, 50], _SPLIT_HD, 1),
    ("hd96_split_hd_split", 96, 16, "bfloat16", [70, 1, 5, 33], _SPLIT_HD, 4),
    ("hd96_default", 96, 16, "bfloat16", [1, 18, 40], None, None),
    ("fp8_lanes_split", 96, 16, "float8_e4m3fn", [70, 1, 5, 33], _LANES, 4),
    ("fp8_reduce_unsplit", 96, 16, "float8_e4m3fn", [1, 15, 17, 50], _REDUCE, 1),
    ("fp8_prefetch_split", 96, 16, "float8_e4m3fn", [70, 1, 5, 33], _PREFETCH, 3),
    ("fp8_reduce_prefetch_unsplit", 96, 16, "float8_e4m3fn", [1, 15, 17, 50],
     _REDUCE_PREFETCH, 1),
    ("fp8_split_hd_split", 96, 16, "float8_e4m3fn", [70, 1, 5, 33], _SPLIT_HD, 2),
    ("fp8_hd64_reduce_split", 64, 8, "float8_e4m3fn", [41, 1, 9, 20], (16, 4, 1, 1, False), 2),
]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    """Every case's max |kernel - torch|, from one interpreter subprocess."""
    cases = [{"name": n, "head_dim": hd, "block_size": bs, "dtype": dt, "num_heads": 4,
              "context_lens": lens, "config": cfg, "splits": s, "seed": i}
             for i, (n, hd, bs, dt, lens, cfg, s) in enumerate(_CASES)]
    return _run_cases(cases)


@pytest.mark.parametrize("name", [c[0] for c in _CASES])
def test_interpreted_kernel_matches_torch(interpreted: dict[str, float], name: str) -> None:
    dtype = next(c[3] for c in _CASES if c[0] == name)
    # Outputs are in the query's dtype: one rounding of a value of magnitude < 4.
    tol = {"float32": 1e-5, "float16": 4e-3}.get(dtype, 2e-2)
    assert interpreted[name] <= tol, (name, interpreted[name])


def _run_cases(cases: list[dict], *args: str, interpret: bool = True) -> dict:
    return run_json(["-m", "tests.models.decode_interp", *args], interpret=interpret,
                    stdin=cases)


def test_kernel_compiles_for_the_h200() -> None:
    # What the interpreter cannot see (types carried around the loop, layouts, shared
    # memory) the compiler checks: the variants of the 20B's shape, for sm_90, with the
    # ptxas in triton's wheel. The GPU test below compiles and runs them all.
    cases = [
        {"name": "pipelined_bf16", "config": DECODE_CONFIGS[0], "dtype": "bfloat16",
         "merge": True},
        {"name": "prefetch_fp8", "config": (8, 1, 1, 1, False, True), "dtype": "float8_e4m3fn"},
        {"name": "lanes_split_hd_bf16", "config": (16, 4, 1, 1, True, True, True),
         "dtype": "bfloat16"},
    ]
    for c in cases:
        c.update(num_heads=64, head_dim=96, block_size=16)
    got = _run_cases(cases, "--compile-sm90", interpret=False)
    assert set(got) == {c["name"] for c in cases}
    # Pipelining stages K/V through shared memory; an H200 SM has 228 KB of it.
    assert 0 < got["pipelined_bf16"]["shared"] < 64 * 1024


# --------------------------------------------------------------------------------------
# CUDA (skipped here; figures from the GPU live in bench/results)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS,
                         ids=lambda c: "t{}w{}s{}h{}{}{}{}".format(
                             *c[:4], "L" if c.lanes else "R", "P" if c.prefetch else "",
                             "S" if c.split_hd else ""))
def test_every_decode_config_matches_torch(config: tuple) -> None:
    from models.attention import paged_decode_triton

    # 8 heads: every heads-per-program the list holds divides it. The 20B's shape (head
    # dim 96 = 64 + 32: two parts), a one-part head dim with another block size and
    # dtype, and an fp8 cache; unsplit and split (parts past short sequences' ends).
    for i, (hd, bs, dtype) in enumerate(((96, 16, torch.bfloat16), (64, 8, torch.float16),
                                         (96, 16, torch.float8_e4m3fn))):
        lens = [1, bs, bs + 1, 9 * bs - 3, 9 * bs]
        q, kc, vc, ks, vs, tables, ctx = (
            t if t is None else t.cuda()
            for t in random_case(head_dim=hd, block_size=bs, dtype=dtype, num_heads=8,
                                 context_lens=lens, seed=i))
        ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
        for splits in (1, 3, 8):
            got = paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs,
                                      config=config, num_splits=splits).float()
            assert (got - ref).abs().max().item() < 2e-2, (hd, bs, dtype, splits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuner_picks_per_shape_class() -> None:
    from models.attention import decode_choice

    picks = tune_decode_kernel(8, 64, 16, torch.float16, "cuda", batches=(4, 64),
                               budget_s=20)
    assert set(picks) == {"batch~4/short", "batch~4/any", "batch~64/short", "batch~64/any"}
    for choice in picks.values():
        assert choice.config in DECODE_CONFIGS and choice.splits in DECODE_SPLITS
    assert decode_choice(8, 64, 16, torch.float16, 60, 2048) == picks["batch~64/any"]
    assert decode_choice(8, 64, 16, torch.float16, 3, 256) == picks["batch~4/short"]


def test_each_shape_class_gets_its_own_pick() -> None:
    from models.attention import (
        DecodeChoice,
        DecodeConfig,
        choose_per_class,
        decode_choice,
        register_decode_choices,
    )

    fast_short = DecodeChoice(DecodeConfig(32, 4, 1, 1, True), 1)
    fast_long = DecodeChoice(DecodeConfig(16, 4, 1, 2, True), 8)
    balanced = DecodeChoice(DecodeConfig(64, 4, 1, 1, False), 2)
    times = {
        (256, "short"): {fast_short: 1.0, fast_long: 2.0, balanced: 1.1},
        (256, "long"): {fast_short: 9.0, fast_long: 4.0, balanced: 4.6},
        (96, "short"): {fast_short: 0.5, fast_long: 0.45},
        (96, "long"): {fast_short: 3.0, fast_long: 2.0},
        (8, "short"): {fast_short: 0.1},  # its long run never happened (time budget)
    }  # nor any run at batch 32
    picks = choose_per_class(times, (8, 32, 96, 256))
    assert {b for b, _ in picks} == {8, 96, 256}
    assert picks[(256, "short")] == fast_short
    assert picks[(256, "any")] == balanced  # within 15% of the best at both lengths
    assert picks[(96, "short")] == picks[(96, "any")] == fast_long
    assert picks[(8, "short")] == picks[(8, "any")] == fast_short
    # A shape nobody tuned runs the default; a tuned one by batch (nearest in log
    # scale) and by the context its block tables can hold.
    shape = (3, 40, 8, torch.float16)
    assert decode_choice(*shape, 250, 2048) == DEFAULT_CHOICE
    register_decode_choices(*shape, picks)
    assert decode_choice(*shape, 250, 2048) == balanced  # a CUDA-graph step's tables
    assert decode_choice(*shape, 250, 256) == fast_short
    assert decode_choice(*shape, 90, 4096) == fast_long
    assert decode_choice(*shape, 1, 4096) == fast_short
    assert decode_choice(*shape, 30, 4096) == fast_long  # 32 untimed: 96 is nearer than 8


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_continuing_chunks_attend_to_their_own_cached_context(kv_dtype: torch.dtype) -> None:
    """Chunks that continue sequences of very different lengths (so several padded
    groups, uneven query counts) each see exactly their own cached keys up to their own
    positions: equal to a dense per-sequence reference over the cache's (dequantized)
    keys, with decode rows and a fresh chunk in the same step."""
    from models.attention import PagedAttention, StepMetadata, read_blocks
    from models.config import get_preset
    from models.engine.kv_cache import KVCache
    from models.engine.runner import continuing_groups

    config = get_preset("tiny")
    nh, hd, bs = config.num_heads, config.head_dim, 4
    cache = KVCache.for_model(config, (0, 1), 64, bs, kv_dtype, "cpu")
    g = torch.Generator().manual_seed(5)
    kc, vc = cache.layer(0)
    scales = cache.layer_scales(0)
    if scales is None:
        kc.copy_(torch.randn(kc.shape, generator=g))
        vc.copy_(torch.randn(vc.shape, generator=g))
    else:
        kc.view(torch.uint8).copy_(torch.randint(0, 120, kc.shape, generator=g))
        vc.view(torch.uint8).copy_(torch.randint(0, 120, vc.shape, generator=g))
        for s in scales:
            s.copy_(torch.rand(s.shape, generator=g) + 0.5)
    # (start, end, blocks): contexts 41, 6, 23 and 5 tokens (groups by context length).
    seqs = [(37, 41, list(range(1, 12))), (2, 6, [20, 21]), (20, 23, [30, 31, 32, 33, 34, 35]),
            (4, 5, [40, 41])]
    rows, row = [], 0
    for start, end, blocks in seqs:
        rows.append((row, row + end - start, start, end, blocks))
        row += end - start
    groups, (tables, qpos, gather, scatter) = continuing_groups(rows, bs)
    assert len(groups) > 1
    decode, fresh = 2, 3
    r = row
    n = decode + r + fresh
    q, k, v = (torch.randn(n, nh, hd, generator=g) for _ in range(3))
    slots = [(50, 0), (51, 0)]  # the decode rows' new tokens (positions 0)
    for start, end, blocks in seqs:
        slots += [(blocks[p // bs], p % bs) for p in range(start, end)]
    slots += [(60, p) for p in range(fresh)]
    slot_blocks = torch.tensor([b for b, _ in slots])
    slot_offsets = torch.tensor([o for _, o in slots])
    attn = PagedAttention(cache, use_triton=False)
    t = [torch.from_numpy(a) for a in (tables, qpos, gather, scatter)]
    attn.set_step(StepMetadata(
        slot_blocks=slot_blocks, slot_offsets=slot_offsets, num_decode=decode,
        block_tables=torch.tensor([[50], [51]]), context_lens=torch.tensor([1, 1]),
        num_continuing=r, fresh=((r, r + fresh),), continuing_groups=groups,
        cont_tables=t[0], cont_qpos=t[1], cont_gather=t[2], cont_scatter=t[3]))
    out = attn(0, q, k, v)
    # Reference: after the writes, each continuing query attends to its sequence's
    # cached keys at positions <= its own.
    for i, (row0, row1, start, _end, blocks) in enumerate(rows):
        table = torch.tensor(blocks)
        keys, values = (read_blocks(c, None if scales is None else scales[j], table,
                                    torch.float32).transpose(0, 1).reshape(nh, -1, hd)
                        for j, c in enumerate((kc, vc)))
        for qi in range(row1 - row0):
            p = start + qi
            ref = _dense_reference(q[decode + row0 + qi][None],
                                   [keys[:, : p + 1].transpose(0, 1)],
                                   [values[:, : p + 1].transpose(0, 1)])[0]
            assert torch.allclose(out[decode + row0 + qi].double(), ref, atol=1e-4), (i, qi)
