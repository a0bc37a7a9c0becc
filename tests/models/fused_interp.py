"""Runs the fused attention-input kernels (models.fused) under Triton's interpreter (CPU)
against the torch ops and prints, as JSON, each check's result.

Run by tests/models/test_fused.py in a subprocess with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when a kernel is built, so it must not share a process with code
that builds kernels for a GPU).
"""

from __future__ import annotations

import json

import torch

from models.fused import (
    add_norms_torch,
    add_norms_triton,
    split_rotate_store_triton,
    split_rotate_torch,
    split_rotate_triton,
    write_kv_torch,
    write_kv_triton,
)

# (heads, head dim, rotary dims): the 20B's, an odd one (heads not a multiple of a
# program's, head dim not a power of two), full rotary, none.
SHAPES = [(64, 96, 24), (5, 24, 8), (3, 16, 16), (4, 32, 0)]


def split_case(nh: int, hd: int, dim: int, dtype: torch.dtype, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    n = 6
    qkv = (torch.randn(n, nh, 3, hd, generator=g) * 3).to(dtype)
    ang = torch.rand(n, 1, max(dim, 1), generator=g)[..., :dim] * 50
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    got = split_rotate_triton(qkv, cos, sin, dim)
    ref = split_rotate_torch(qkv, cos, sin, dim)
    # Relative to each tensor's largest value: bf16 is compared at its own precision
    # (the interpreter converts float32 to bfloat16 by truncation, not to nearest as
    # CUDA does; the GPU test checks bit equality there).
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
              for a, b in zip(got, ref, strict=True))
    return {"max_rel": err, "contiguous": float(all(t.is_contiguous() for t in got)),
            "v_exact": float(torch.equal(got[2], ref[2]))}


def write_case(nh: int, hd: int, dtype: torch.dtype, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    n, bs, blocks = 7, 4, 6
    k, v = ((torch.randn(n, nh, hd, generator=g) * 2).to(dtype) for _ in range(2))
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    b, o = slots // bs, slots % bs
    start = torch.randn(blocks, nh, bs, hd, generator=g).to(dtype)
    caches = [start.clone() for _ in range(4)]
    write_kv_triton(k, v, caches[0], caches[1], b, o)
    write_kv_torch(k, v, caches[2], caches[3], b, o)
    return {"exact": float(torch.equal(caches[0], caches[2])
                           and torch.equal(caches[1], caches[3]))}


def store_case(nh: int, hd: int, dim: int, dtype: torch.dtype, seed: int,
               ) -> dict[str, float]:
    """The split with the cache store in one kernel against split_rotate + write_kv (both
    Triton, so exact even where the interpreter rounds bfloat16 its own way), with and
    without the contiguous k and v."""
    g = torch.Generator().manual_seed(seed)
    n, bs, blocks = 6, 4, 5
    qkv = (torch.randn(n, nh, 3, hd, generator=g) * 3).to(dtype)
    ang = torch.rand(n, 1, max(dim, 1), generator=g)[..., :dim] * 50
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    b, o = slots // bs, slots % bs
    start = torch.randn(blocks, nh, bs, hd, generator=g).to(dtype)
    ref = split_rotate_triton(qkv, cos, sin, dim)
    want = [start.clone(), start.clone()]
    write_kv_triton(ref[1], ref[2], *want, b, o)
    exact = True
    for kv_out in (True, False):
        caches = [start.clone(), start.clone()]
        q, k, v = split_rotate_store_triton(qkv, cos, sin, dim, *caches, b, o, kv_out)
        exact = exact and torch.equal(q, ref[0]) and all(
            torch.equal(c, w) for c, w in zip(caches, want, strict=True))
        exact = exact and (k is None and v is None if not kv_out
                           else torch.equal(k, ref[1]) and torch.equal(v, ref[2]))
    return {"exact": float(exact)}


def norms_case(h: int, dtype: torch.dtype, with_add: bool, seed: int) -> dict[str, float]:
    """The fused residual sum + both LayerNorms against the torch ops: largest error of
    the sum and of the norms, relative to each reference's largest value."""
    g = torch.Generator().manual_seed(seed)
    lns = [torch.nn.LayerNorm(h, dtype=dtype) for _ in range(2)]
    with torch.no_grad():
        for ln in lns:
            ln.weight.copy_(1 + 0.1 * torch.randn(h, generator=g))
            ln.bias.copy_(0.1 * torch.randn(h, generator=g))
        x, a, m = ((torch.randn(5, h, generator=g) * 3).to(dtype) for _ in range(3))
        args = (x, a, m) if with_add else (x, None, None)
        got = add_norms_triton(*args, *lns)
        ref = add_norms_torch(*args, *lns)
    errs = [float((p.float() - q.float()).abs().max() / q.float().abs().max())
            for p, q in zip(got, ref, strict=True)]
    return {"sum_rel": errs[0], "norms_rel": max(errs[1:])}


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    for i, (nh, hd, dim) in enumerate(SHAPES):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = f"{nh}x{hd}/rot{dim}/{str(dtype)[6:]}"
            results[f"split {name}"] = split_case(nh, hd, dim, dtype, seed=i)
            results[f"write {name}"] = write_case(nh, hd, dtype, seed=i)
        # The store adds no arithmetic to the split (checked in every dtype above): one
        # dtype, the engine's, covers its branches.
        results[f"store {nh}x{hd}/rot{dim}/bfloat16"] = store_case(nh, hd, dim,
                                                                  torch.bfloat16, seed=i)
    for h in (48, 200):
        for dtype in (torch.float32, torch.bfloat16):
            for with_add in (True, False):
                name = f"norms {h}/{str(dtype)[6:]}/{'add' if with_add else 'first'}"
                results[name] = norms_case(h, dtype, with_add, seed=h)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
