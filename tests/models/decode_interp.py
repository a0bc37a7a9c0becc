"""Runs cases of the Triton decode kernel under Triton's interpreter (CPU) and prints,
as JSON, each case's largest difference from the torch reference.

Run by tests/models/test_attention.py in a subprocess with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when the kernel is built, so it must not share a process with
code that builds the kernel for a GPU). Input: a JSON list of cases on stdin.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from models.attention import DecodeConfig, paged_decode_torch, paged_decode_triton

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float8_e4m3fn": torch.float8_e4m3fn}


def random_case(*, head_dim: int, block_size: int, dtype: torch.dtype, num_heads: int,
                context_lens: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    """(q, K, V, K scales | None, V scales | None, tables, lengths): a paged cache with
    shuffled block tables one column wider than the longest context needs. An fp8
    cache is quantized per token and head (scale = max |x| / 448), as the engine stores
    it; q is bf16 then."""
    g = torch.Generator().manual_seed(seed)
    d = len(context_lens)
    w = -(-max(context_lens) // block_size) + 1
    shape = (d * w + 1, num_heads, block_size, head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tables = (torch.randperm(d * w, generator=g) + 1).view(d, w)
    ctx = torch.tensor(context_lens)
    if dtype != torch.float8_e4m3fn:
        q = torch.randn(d, num_heads, head_dim, generator=g).to(dtype)
        return q, k.to(dtype), v.to(dtype), None, None, tables, ctx
    q = torch.randn(d, num_heads, head_dim, generator=g).to(torch.bfloat16)
    ks = k.abs().amax(-1).clamp_min(1e-6) / 448
    vs = v.abs().amax(-1).clamp_min(1e-6) / 448
    k8 = (k / ks[..., None]).to(dtype)
    v8 = (v / vs[..., None]).to(dtype)
    return q, k8, v8, ks, vs, tables, ctx


def run_case(case: dict) -> float:
    dtype = DTYPES[case["dtype"]]
    q, kc, vc, ks, vs, tables, ctx = random_case(
        head_dim=case["head_dim"], block_size=case["block_size"], dtype=dtype,
        num_heads=case["num_heads"], context_lens=case["context_lens"], seed=case["seed"])
    ref = paged_decode_torch(q.float(), kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
    cfg = case.get("config")
    got = paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs,
                              config=None if cfg is None else DecodeConfig(*cfg),
                              num_splits=case.get("splits"))
    assert got.dtype == q.dtype and got.shape == q.shape
    return (got.float() - ref).abs().max().item()


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    cases = json.load(sys.stdin)
    json.dump({c["name"]: run_case(c) for c in cases}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
