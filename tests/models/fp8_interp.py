"""Runs the FP8 Triton kernels under Triton's interpreter (CPU) against the torch ops and
prints, as JSON, each check's result.

Run by tests/models/test_fp8.py in a subprocess with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when a kernel is built, so it must not share a process with code
that builds kernels for a GPU).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from models.fp8 import (
    FP8,
    quantize_rows_torch,
    quantize_rows_triton,
    quantize_scatter_triton,
)


def odd_codes(got: Tensor, ref: Tensor, exact: Tensor) -> float:
    """Share of e4m3 codes that differ from torch's other than by the interpreter's own
    rounding slips (CUDA converts in hardware, round to nearest even): its float -> e4m3
    conversion loses the carry when rounding up crosses a power of two (127.9 -> 64
    instead of 128), and rounds exact ties (168 between 160 and 176) away from zero."""
    g, r = got.float(), ref.float()
    carry = (r != 0) & (torch.frexp(r.abs()).mantissa == 0.5) & (g == r / 2)
    tie = (g - exact).abs() == (r - exact).abs()
    return float(((g != r) & ~carry & ~tie).float().mean())


def rows_case(m: int, k: int, dtype: torch.dtype, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-4, 3, m)[:, None]).to(dtype)
    x[0] = 0  # a row of zeros
    q, s = quantize_rows_triton(x)
    q_ref, s_ref = quantize_rows_torch(x)
    return {"scale_rel": float(((s - s_ref).abs() / s_ref).max()),
            "odd_codes": odd_codes(q, q_ref, x.float() / s_ref),
            "finite": float(torch.isfinite(q.float()).all())}


def scatter_case(hd: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    n, nh, bs, blocks = 7, 3, 4, 6
    x = torch.randn(n, nh, hd, generator=g).to(torch.bfloat16) * 5
    cache = torch.zeros(blocks, nh, bs, hd, dtype=FP8)
    scales = torch.ones(blocks, nh, bs)
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    b, o = slots // bs, slots % bs
    quantize_scatter_triton(x, cache, scales, b, o)
    q_ref, s_ref = quantize_rows_torch(x)
    got = cache.view(torch.uint8)[b, :, o]
    untouched = torch.ones(blocks, nh, bs, dtype=torch.bool)
    untouched[b, :, o] = False
    return {"scale_rel": float(((scales[b, :, o] - s_ref[..., 0]).abs() / s_ref[..., 0]).max()),
            "odd_codes": odd_codes(got.view(FP8), q_ref, x.float() / s_ref),
            "others_untouched": float((scales[untouched] == 1).all()
                                      and (cache.view(torch.uint8)[untouched] == 0).all())}


def main() -> None:
    out = {
        "rows_bf16_6144": rows_case(9, 6144, torch.bfloat16, 0),
        "rows_f32_300": rows_case(5, 300, torch.float32, 1),
        "rows_f16_64": rows_case(3, 64, torch.float16, 2),
        "scatter_hd96": scatter_case(96, 3),
        "scatter_hd64": scatter_case(64, 4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
