"""Cases of cascade decode attention, and (run as a module with ``TRITON_INTERPRET=1``,
by tests/models/test_cascade.py in a subprocess) the Triton path under Triton's
interpreter: prints, as JSON, each case's largest difference from ``paged_decode_torch``
per decode split count. With ``--compile-sm90`` (no interpreter) it compiles the prefix
kernel for an H200 instead, for the cases given as JSON on stdin, and prints each one's
shared memory."""

from __future__ import annotations

import json
import os
import sys

import torch

from models import cascade
from tests.models.decode_interp import DTYPES, random_case

# Groups are (rows, shared prefix blocks); rows not in a group attend plainly. Members
# may be shorter than their group's prefix (they see only their own part of it) or end
# exactly at it (nothing left for the decode kernel).
CASES: list[dict] = [
    {"name": "groups_f32", "dtype": "float32", "head_dim": 32, "block_size": 4,
     "context_lens": [30, 25, 21, 40, 13, 9, 17, 20, 8],
     "groups": [([0, 2, 3], 5), ([1, 4], 3), ([6], 4), ([5, 7], 2)]},
    {"name": "short_members_f32", "dtype": "float32", "head_dim": 16, "block_size": 4,
     "context_lens": [40, 12, 20, 5, 33],
     "groups": [([0, 1, 2, 3, 4], 5)]},  # 12 < 20, 20 == 20, 5 < 20
    {"name": "hd96_bf16", "dtype": "bfloat16", "head_dim": 96, "block_size": 16,
     "context_lens": [70, 1, 50, 90, 40, 33],
     "groups": [([0, 2, 3], 3), ([4, 5], 2)]},
    {"name": "hd64_fp16", "dtype": "float16", "head_dim": 64, "block_size": 8,
     "context_lens": [41, 30, 9, 20, 50, 26],
     "groups": [([0, 1, 3, 5], 2), ([2, 4], 1)]},
    {"name": "fp8", "dtype": "float8_e4m3fn", "head_dim": 96, "block_size": 16,
     "context_lens": [70, 1, 50, 90, 40, 33],
     "groups": [([0, 2, 3], 3), ([4, 5], 2)]},
    {"name": "many_tiles_f32", "dtype": "float32", "head_dim": 16, "block_size": 4,
     "context_lens": [9 + i % 7 for i in range(cascade.TILE_ROWS + 6)],
     "groups": [(list(range(1, cascade.TILE_ROWS + 6)), 2)]},
]


def build_case(case: dict) -> tuple:
    """(q, K, V, K scales, V scales, tables, context lens, CascadeMetadata): a random
    paged cache (as the decode kernel's tests) whose groups' tables share their first
    blocks."""
    q, kc, vc, ks, vs, tables, ctx = random_case(
        head_dim=case["head_dim"], block_size=case["block_size"], dtype=DTYPES[case["dtype"]],
        num_heads=case.get("num_heads", 2), context_lens=case["context_lens"], seed=7)
    bs = case["block_size"]
    groups = []
    for rows, blocks in case["groups"]:
        tables[rows, :blocks] = tables[rows[0], :blocks]
        groups.append((torch.tensor(rows).numpy(), blocks * bs))
    d = len(case["context_lens"])
    starts, tiles, rows = cascade.layout(groups, d, cascade.max_tiles(d))
    meta = cascade.CascadeMetadata(starts=torch.from_numpy(starts),
                                   tiles=torch.from_numpy(tiles).view(-1, 4),
                                   rows=torch.from_numpy(rows))
    return q, kc, vc, ks, vs, tables, ctx, meta


_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
                 "float8_e4m3fn": "fp8e4nv"}


def compile_sm90(case: dict) -> dict:
    """Compile the prefix kernel for sm_90 at ``case``'s shape, dtype and config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = cascade.prefix_kernel()
    cache = _TRITON_TYPES[case["dtype"]]
    fp8 = case["dtype"] == "float8_e4m3fn"
    q = "bf16" if fp8 else cache
    cfg = cascade.CascadeConfig(*case["config"])
    ptrs = {"part_o_ptr": "fp32", "part_lse_ptr": "fp32", "q_ptr": q, "k_ptr": cache,
            "v_ptr": cache, "ks_ptr": "fp32", "vs_ptr": "fp32", "bt_ptr": "i64",
            "ctx_ptr": "i64", "tiles_ptr": "i64", "rows_ptr": "i64"}
    consts = cascade.prefix_constexprs(
        case["num_heads"], case["head_dim"], case["block_size"],
        torch.bfloat16 if fp8 else DTYPES[case["dtype"]], fp8, cfg)
    names = kernel.arg_names
    sig = {n: ("*" + ptrs[n] if n in ptrs else "fp32" if n == "scale_log2"
               else "constexpr" if n in consts else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in ptrs or n.startswith("stride")}
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    return {"shared": k.metadata.shared}


def main() -> int:
    if "--compile-sm90" in sys.argv[1:]:
        json.dump({c["name"]: compile_sm90(c) for c in json.load(sys.stdin)}, sys.stdout)
        return 0
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    from models.attention import DecodeConfig, cascade_decode_triton, paged_decode_torch

    result = {}
    for case in CASES:
        q, kc, vc, ks, vs, tables, ctx, meta = build_case(case)
        ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
        # Both forms of the decode kernel (per-lane state, tile-wide reductions).
        for splits, config in ((1, DecodeConfig(16, 4, 1, 1, True)),
                               (3, DecodeConfig(16, 4, 1, 2, False))):
            got = cascade_decode_triton(q, kc, vc, tables, ctx, meta, k_scale=ks, v_scale=vs,
                                        config=config, num_splits=splits)
            assert got.dtype == q.dtype and got.shape == q.shape
            result[f"{case['name']}/{splits}"] = (got.float() - ref).abs().max().item()
    # The tuner at a tiny shape: checks each candidate against the torch path, picks one.
    pick, times = cascade.tune_cascade_kernel(2, 16, 4, torch.float16, "cpu", groups=2,
                                              members=3, prefix=16,
                                              configs=cascade.CASCADE_CONFIGS[:2])
    result["tuner_pick"] = cascade.CASCADE_CONFIGS.index(pick)
    result["tuner_passed"] = len(times)
    result["tuner_remembers"] = cascade.cascade_choice(2, 16, 4, torch.float16) == pick
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
