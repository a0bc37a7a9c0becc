"""Fused per-layer kernels around attention: the q/k/v split with rotary embedding, the
KV-cache write, and (parallel-residual models) the residual sum with both of the next
block's LayerNorms.

Per layer the torch ops behind these are ~15 small kernels (unbind, a rotate-half built
from slices, a negation and two cats for each of q and k, three element-wise ops each,
a copy of v, and two advanced-index writes into the paged cache, whose index kernel
moves bf16 at ~0.3 TB/s). Each is tiny, but a decode step runs them for 44 layers (~2 ms
of a ~35 ms step on an H200 at 20B) and a 2,000-token prefill step spends ~20 ms in
them. Here they are two Triton kernels: one reads the fused projection once and writes
contiguous q, k, v with the rotation applied; one stores k and v at their cache slots.

The rotation rounds exactly as the torch ops do (each product rounded to the activation
dtype, then the sum), so either path gives bit-identical results. The kernels run on
CUDA after a one-time self-check against the torch ops (never during CUDA-graph capture:
:func:`fused_ok` is called by whoever builds the graphs first), for tensors that need no
gradient; the torch ops run everywhere else.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from models.kernel_check import kernels_ok

_KERNELS = None


def rotate_half_torch(x: Tensor, cos: Tensor, sin: Tensor, dim: int) -> Tensor:
    """x (N, nh, hd) with its first ``dim`` channels rotated ("rotate half" rotary
    embedding); cos, sin (N, 1, dim) in x's dtype."""
    if dim == 0:
        return x
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def split_rotate_torch(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`split_rotate` in torch ops (any device, autograd; the reference)."""
    q, k, v = qkv.unbind(2)
    return rotate_half_torch(q, cos, sin, dim), rotate_half_torch(k, cos, sin, dim), \
        v.contiguous()


def split_rotate(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection ``qkv`` (N, nh, 3, hd) -> contiguous q, k, v (N, nh, hd), q
    and k with their first ``dim`` channels rotated; cos, sin (N, 1, dim) in qkv's
    dtype."""
    if (qkv.is_cuda and not (qkv.requires_grad and torch.is_grad_enabled())
            and qkv.stride(-1) == 1 and fused_ok(qkv.device)):
        return split_rotate_triton(qkv, cos, sin, dim)
    return split_rotate_torch(qkv, cos, sin, dim)


def write_kv_torch(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, blocks: Tensor,
                   offsets: Tensor) -> None:
    """:func:`write_kv` in torch ops (the reference)."""
    # Advanced indices around a slice put the indexed dim first: kc[b, :, o] is (N, nh, hd).
    k_cache[blocks, :, offsets] = k
    v_cache[blocks, :, offsets] = v


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, blocks: Tensor,
             offsets: Tensor) -> None:
    """Store k, v (N, nh, hd) at cache slots ``(blocks[i], offsets[i])`` of a layer's
    caches (blocks, nh, block_size, hd) of the same dtype."""
    if (k.is_cuda and k_cache.dtype == k.dtype and k.stride(-1) == 1 and v.stride(-1) == 1
            and fused_ok(k.device)):
        write_kv_triton(k, v, k_cache, v_cache, blocks, offsets)
    else:
        write_kv_torch(k, v, k_cache, v_cache, blocks, offsets)


def _kernels():  # noqa: ANN202 - three triton JIT functions
    # Imported on first use: triton is not needed where only the torch ops run.
    global _KERNELS
    if _KERNELS is None:
        from models import fused_kernels
        _KERNELS = (fused_kernels.split_rotate_kernel, fused_kernels.write_kv_kernel,
                    fused_kernels.add_norms_kernel)
    return _KERNELS


def _heads_per_program(nh: int) -> int:
    return min(4, 1 << (nh - 1).bit_length())


def split_rotate_constexprs(nh: int, hd: int, dim: int) -> dict[str, int]:
    """The split/rotate kernel's compile-time arguments for a shape."""
    return {"HEAD_DIM": hd, "HD_P2": max(16, 1 << (hd - 1).bit_length()), "ROT": dim,
            "HB": _heads_per_program(nh)}


def split_rotate_triton(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`split_rotate` in one Triton kernel (qkv's last dim contiguous).

    Launched with FP fusion off: with it, the compiler contracts a product and the sum
    after it into one fused multiply-add (one rounding where torch rounds twice)."""
    q, k, v = _split_rotate_launch(qkv, cos, sin, dim, None, True)
    assert k is not None and v is not None
    return q, k, v


def split_rotate_store(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int, k_cache: Tensor,
                       v_cache: Tensor, blocks: Tensor, offsets: Tensor, kv_out: bool = True,
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`split_rotate`, and the rotated k and v also stored at cache slots
    ``(blocks[i], offsets[i])`` as :func:`write_kv` stores them, in one pass over the
    projection. ``kv_out=False``: k and v go to the caches only (None returned for them:
    a decode step's attention reads them from there). One Triton kernel where
    :func:`store_fuses` says so, the torch ops elsewhere."""
    if store_fuses(qkv, k_cache, v_cache):
        return split_rotate_store_triton(qkv, cos, sin, dim, k_cache, v_cache, blocks,
                                         offsets, kv_out)
    q, k, v = split_rotate(qkv, cos, sin, dim)
    write_kv(k, v, k_cache, v_cache, blocks, offsets)
    return (q, k, v) if kv_out else (q, None, None)


def split_rotate_store_triton(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int,
                              k_cache: Tensor, v_cache: Tensor, blocks: Tensor,
                              offsets: Tensor, kv_out: bool = True,
                              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`split_rotate_store` in one Triton kernel (the layouts
    :func:`store_fuses` checks)."""
    return _split_rotate_launch(qkv, cos, sin, dim, (k_cache, v_cache, blocks, offsets),
                                kv_out)


def store_fuses(qkv: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether :func:`split_rotate_store` runs as one kernel: CUDA, no autograd, caches in
    the projection's dtype with the same layout, last dims contiguous, the kernels
    passed their self-check."""
    return (qkv.is_cuda and not (qkv.requires_grad and torch.is_grad_enabled())
            and qkv.stride(-1) == 1 and k_cache.dtype == qkv.dtype
            and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
            and fused_ok(qkv.device))


def _split_rotate_launch(qkv: Tensor, cos: Tensor, sin: Tensor, dim: int,
                         store: tuple[Tensor, Tensor, Tensor, Tensor] | None, kv_out: bool,
                         ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    n, nh, three, hd = qkv.shape
    assert three == 3
    q = torch.empty(n, nh, hd, dtype=qkv.dtype, device=qkv.device)
    k, v = (torch.empty_like(q), torch.empty_like(q)) if kv_out else (None, None)
    if n == 0:
        return q, k, v
    if dim == 0:  # nothing to rotate: any (N, 1, 1) table will do, it is never read
        cos = sin = qkv.new_ones(n, 1, 1)
    cos2, sin2 = cos.reshape(n, -1), sin.reshape(n, -1)
    assert cos2.stride(1) == 1 and sin2.stride() == cos2.stride()
    # Pointers a disabled branch never reads still need a tensor: q stands in.
    k_cache, v_cache, blocks, offsets = store or (q, q, q, q)
    cache_strides = k_cache.stride()[:3] if store else (0, 0, 0)
    hb = _heads_per_program(nh)
    _kernels()[0][(n, -(-nh // hb))](
        qkv, cos2, sin2, q, q if k is None else k, q if v is None else v,
        k_cache, v_cache, blocks, offsets, nh, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        cos2.stride(0), *cache_strides, **split_rotate_constexprs(nh, hd, dim),
        KV_OUT=kv_out, STORE=store is not None, num_warps=4, enable_fp_fusion=False)
    return q, k, v


def write_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, blocks: Tensor,
                    offsets: Tensor) -> None:
    """:func:`write_kv` in one Triton kernel (last dims contiguous, caches alike)."""
    n, nh, hd = k.shape
    if n == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    hb = _heads_per_program(nh)
    _kernels()[1][(n, -(-nh // hb))](
        k, v, k_cache, v_cache, blocks, offsets, nh, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=hd, HD_P2=max(16, 1 << (hd - 1).bit_length()), HB=hb, num_warps=4)


def fused_ok(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` and agree exactly with the torch ops:
    checked once per device and remembered. Never checked while a CUDA graph is being
    captured (the torch ops run there instead): call it before capturing."""
    return kernels_ok("fused attention-input kernels", device, self_check)


def self_check(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The kernels against the torch ops on small odd shapes (heads not a multiple of the
    program's, head dim not a power of two, a partial rotary)."""
    g = torch.Generator(device=device).manual_seed(0)
    n, nh, hd, dim = 7, 5, 24, 8
    qkv = torch.randn(n, nh, 3, hd, generator=g, device=device).to(dtype)
    ang = torch.rand(n, 1, dim, generator=g, device=device) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    got = split_rotate_triton(qkv, cos, sin, dim)
    ref = split_rotate_torch(qkv, cos, sin, dim)
    ok = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    caches = [torch.zeros(4, nh, 4, hd, dtype=dtype, device=device) for _ in range(4)]
    blocks = torch.tensor([1, 1, 3, 2, 3, 0, 2], device=device)
    offsets = torch.tensor([0, 3, 2, 2, 0, 1, 1], device=device)
    write_kv_triton(got[1], got[2], caches[0], caches[1], blocks, offsets)
    write_kv_torch(ref[1], ref[2], caches[2], caches[3], blocks, offsets)
    ok = ok and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    for kv_out in (True, False):  # the split with the cache store in the same kernel
        stored = [torch.zeros_like(caches[0]) for _ in range(2)]
        q, k, v = split_rotate_store_triton(qkv, cos, sin, dim, *stored, blocks, offsets,
                                            kv_out)
        ok = ok and torch.equal(q, ref[0]) and torch.equal(stored[0], caches[2]) \
            and torch.equal(stored[1], caches[3])
        ok = ok and (k is None if not kv_out else torch.equal(k, ref[1]) and torch.equal(
            v, ref[2]))
    if not ok:
        warnings.warn(f"fused attention-input kernels disagree with torch on {device}; "
                      "using torch ops", stacklevel=3)
    return bool(ok)


# --------------------------------------------------------------------------------------
# Residual sum + both LayerNorms
# --------------------------------------------------------------------------------------
#
# A parallel-residual block ends with x + attention + mlp, and the next one starts with
# two LayerNorms of that sum: four kernels (two adds, two norms) that write the sum and
# read it back three times — ~500 MB a layer at a 4,096-token prefill step of the 20B,
# where one kernel reading each input once and writing the sum and both norms moves 300.
# The sum rounds after each add as torch's adds do (bit-identical); the norms' statistics
# are float32 sums in another order than torch's kernel, so their outputs may differ
# from it in the last bit: the self-check allows that, no more.


def add_norms_torch(x: Tensor, a: Tensor | None, m: Tensor | None,
                    ln1: torch.nn.LayerNorm, ln2: torch.nn.LayerNorm,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``s = x + a + m`` (just ``x`` when ``a`` is None) and ``ln1(s)``, ``ln2(s)``."""
    s = x if a is None else x + a + m
    return s, ln1(s), ln2(s)


def add_norms_triton(x: Tensor, a: Tensor | None, m: Tensor | None,
                     ln1: torch.nn.LayerNorm, ln2: torch.nn.LayerNorm,
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`add_norms_torch` in one Triton kernel ((N, H) contiguous inputs, one eps)."""
    n, h = x.shape
    h1, h2 = torch.empty_like(x), torch.empty_like(x)
    out = x if a is None else torch.empty_like(x)
    if n == 0:
        return out, h1, h2
    has_add = a is not None
    _kernels()[2][(n,)](
        x, a if has_add else x, m if has_add else x, out, h1, h2,
        ln1.weight, ln1.bias, ln2.weight, ln2.bias, h, ln1.eps,
        HAS_ADD=has_add, BLOCK=max(16, 1 << (h - 1).bit_length()),
        num_warps=8 if h > 2048 else 4)
    return out, h1, h2


def add_norms(x: Tensor, a: Tensor | None, m: Tensor | None,
              ln1: torch.nn.LayerNorm, ln2: torch.nn.LayerNorm,
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The residual sum ``x + a + m`` (``x`` alone when ``a`` is None) and both
    LayerNorms of it; one kernel on CUDA where :func:`norms_ok` (no autograd)."""
    plain = all(type(ln) is torch.nn.LayerNorm and ln.weight is not None
                and ln.bias is not None for ln in (ln1, ln2))
    if (plain and x.is_cuda and x.dim() == 2 and ln1.eps == ln2.eps
            and ln1.weight.dtype == x.dtype == ln2.weight.dtype
            and all(t is None or (t.is_contiguous() and t.shape == x.shape
                                  and t.dtype == x.dtype) for t in (a, m))
            and x.is_contiguous() and (a is None) == (m is None)
            and not torch.is_grad_enabled() and norms_ok(x.device)):
        return add_norms_triton(x, a, m, ln1, ln2)
    return add_norms_torch(x, a, m, ln1, ln2)


def norms_check(device: torch.device) -> bool:
    """The fused sum + norms against the torch ops on an odd width: the sum bit for bit,
    the norms within a unit in the last place (float32: 1e-5 relative)."""
    g = torch.Generator(device=device).manual_seed(0)
    ok = True
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
        h = 200
        lns = [torch.nn.LayerNorm(h, device=device, dtype=dtype) for _ in range(2)]
        with torch.no_grad():
            for ln in lns:
                ln.weight.copy_(1 + 0.1 * torch.randn(h, generator=g, device=device))
                ln.bias.copy_(0.1 * torch.randn(h, generator=g, device=device))
            x, a, m = (torch.randn(9, h, generator=g, device=device).to(dtype) * 3
                       for _ in range(3))
            for args in ((x, a, m), (x, None, None)):
                got = add_norms_triton(*args, *lns)
                ref = add_norms_torch(*args, *lns)
                ok = ok and torch.equal(got[0], ref[0]) and all(
                    (p.float() - q.float()).abs().max().item()
                    <= tol * q.float().abs().max().item()
                    for p, q in zip(got[1:], ref[1:], strict=True))
    if not ok:
        warnings.warn(f"fused residual-sum + LayerNorm kernel disagrees with torch on "
                      f"{device}; using torch ops", stacklevel=3)
    return bool(ok)


def norms_ok(device: torch.device) -> bool:
    """Whether :func:`add_norms` runs its kernel on ``device`` (checked once; never
    during a CUDA graph capture: call it before capturing)."""
    return kernels_ok("fused residual-sum + LayerNorm kernel", device, norms_check)
