"""Cascade (shared-prefix) decode attention: a prefix shared by many sequences is read
once per decode step, not once per sequence.

With prefix caching, prompts that share a prefix share its KV blocks: their block tables
start with the same block ids. A decode step then has *groups* of sequences whose
contexts begin with the same P tokens in the same memory. Plain paged decode reads those
P tokens once per sequence (for the 20B, ~1 MB of KV per token); here each group's
queries (G sequences x heads) attend to the shared prefix in one pass that loads each
prefix tile once for all of them (a tensor-core tile of queries per program), producing
a partial result with its log-sum-exp; each sequence attends to the rest of its context
(positions P..) with the paged decode kernel started at a per-sequence offset; the
partials merge exactly (softmax over a union of key sets: weights ``exp(lse - max)``).

This module holds what does not depend on the decode kernel: finding the groups (host,
numpy, per step), the metadata layout (static shapes, so a CUDA graph can replay it),
the torch reference of the whole computation, and the Triton kernel of the prefix pass
(which writes into the split-KV partial buffers of :func:`models.attention.
paged_decode_triton`; the composition lives there).

Metadata, per step: ``starts`` (D,) the first context position each decode row attends
to itself (0 outside groups, P inside); ``tiles`` (T, 4) one row per tile of at most
:data:`TILE_ROWS` group members: (first index into ``rows``, number of members (0: an
unused tile), P, the decode row whose block table holds the prefix blocks); ``rows`` the
members, tile after tile.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# Queries per prefix-pass program (the M side of its tensor-core dots: a power of two
# >= 16). A larger group takes several tiles, which run at the same time and read the
# prefix through L2.
TILE_ROWS = 64
# Most groups one step cascades (a static bound, so the tile count of a CUDA graph is
# fixed: see max_tiles); further groups run the plain path.
MAX_GROUPS = 32
# A group needs at least this many shared full blocks ...
MIN_SHARED_BLOCKS = 2
# ... and a step cascades only when it saves reading at least this many tokens of KV in
# all (sum over groups of (members - 1) x prefix tokens). The extra kernels cost a few
# microseconds per layer; for the 20B (24 KB of K and V per token and layer) reads of
# ~500 tokens per layer take as long on an H200.
MIN_SAVED_TOKENS = 1024


class CascadeConfig(NamedTuple):
    """Launch parameters of the prefix pass."""

    keys: int = 64  # prefix tokens per loop iteration (the N side of the dots)
    num_warps: int = 4
    num_stages: int = 2
    # Parts each group's prefix is cut into, one program each (like split-KV decode):
    # more programs in flight when there are few groups.
    prefix_splits: int = 2


DEFAULT_CASCADE = CascadeConfig()
# Variants bench/cascade.py times (and the GPU tests check).
CASCADE_CONFIGS: tuple[CascadeConfig, ...] = (
    DEFAULT_CASCADE,
    CascadeConfig(64, 4, 2, 1),
    CascadeConfig(64, 4, 2, 4),
    CascadeConfig(32, 4, 2, 2),
    CascadeConfig(64, 8, 2, 2),
    CascadeConfig(64, 4, 3, 2),
    CascadeConfig(128, 8, 2, 2),
)


@dataclass
class CascadeMetadata:
    """Device tensors of one step's groups (see the module docstring)."""

    starts: Tensor  # (D,) int64
    tiles: Tensor  # (T, 4) int64
    rows: Tensor  # (>= members,) int64


def max_tiles(batch: int, max_groups: int = MAX_GROUPS) -> int:
    """Tiles a step of ``batch`` decode rows can need: sum of ceil(G / TILE_ROWS) over at
    most ``max_groups`` groups of sum(G) <= batch members."""
    return -(-batch // TILE_ROWS) + min(max_groups, batch // 2)


def find_groups(tables: np.ndarray, context_lens: np.ndarray, block_size: int, *,
                min_blocks: int = MIN_SHARED_BLOCKS, max_groups: int = MAX_GROUPS,
                min_saved: int = MIN_SAVED_TOKENS) -> list[tuple[np.ndarray, int]]:
    """Groups of decode rows whose block tables start with the same blocks: ``[(rows,
    prefix tokens), ...]``, the largest savings first, or ``[]`` when the groups save
    reading fewer than ``min_saved`` tokens in all.

    ``tables`` (D, W) block ids (columns past a row's blocks are ignored: a member's
    prefix stops before the block of its newest token, so nobody writes into a prefix
    this step); ``context_lens`` (D,). Where members part ways (say two requests
    prefilled the same prefix in one step, so one holds a private copy of a block), a
    group splits there if its parts save more. Costs one sort of the rows and one
    comparison of neighbouring tables (microseconds for hundreds of rows), then a walk
    over the D - 1 neighbour pairs.
    """
    d = len(context_lens)
    if d < 2 or tables.shape[1] == 0:
        return []
    # Blocks wholly before a row's newest token (context - 1) are usable.
    usable = (np.asarray(context_lens, dtype=np.int64) - 1) // block_size
    width = min(tables.shape[1], int(usable.max()))
    if width < min_blocks or len(np.unique(tables[:, 0])) == d:
        return []  # no two rows share even a first block
    t = np.ascontiguousarray(tables[:, :width], dtype=np.int64)
    # Sorting the rows' bytes puts rows with a common leading run of blocks next to each
    # other (any byte order does: equal columns are equal bytes).
    order = np.argsort(t.view(np.dtype((np.void, t.shape[1] * 8))).ravel(), kind="stable")
    s = t[order]
    eq = s[1:] == s[:-1]  # (D-1, W)
    common = np.where(eq.all(axis=1), t.shape[1], eq.argmin(axis=1))
    usable = usable[order]
    pairs = np.minimum(common, np.minimum(usable[1:], usable[:-1])).tolist()
    found = _best_ranges(pairs, 0, d - 1, min_blocks)[1]
    found.sort(key=lambda g: -(g[1] - g[0]) * g[2])
    found = found[:max_groups]
    if not found or sum((hi - lo) * p for lo, hi, p in found) * block_size < min_saved:
        return []
    return [(np.sort(order[lo: hi + 1]), p * block_size) for lo, hi, p in found]


def _best_ranges(pairs: list[int], lo: int, hi: int, min_blocks: int,
                 ) -> tuple[int, list[tuple[int, int, int]]]:
    """Sorted rows ``lo..hi`` (``pairs[i]``: blocks rows i and i+1 share): (blocks
    saved, groups ``(lo, hi, shared blocks)``), either all of them over what they all
    share, or split where that is least and each part grouped alike, whichever saves
    more."""
    p = min(pairs[lo:hi])
    whole = ((hi - lo) * p, [(lo, hi, p)]) if p >= min_blocks else (0, [])
    saved, parts = 0, []
    start = lo
    for i in range(lo, hi + 1):
        if i == hi or pairs[i] == p:
            if i > start:
                s, g = _best_ranges(pairs, start, i, min_blocks)
                saved += s
                parts += g
            start = i + 1
    return (saved, parts) if saved > whole[0] else whole


def layout(groups: list[tuple[np.ndarray, int]], num_rows: int, num_tiles: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host arrays of :class:`CascadeMetadata` for ``groups`` (from :func:`find_groups`)
    in a step of ``num_rows`` decode rows: (starts (num_rows,), tiles (num_tiles * 4,),
    rows (num_rows,)); unused tiles and rows are zeros."""
    starts = np.zeros(num_rows, dtype=np.int64)
    tiles = np.zeros((num_tiles, 4), dtype=np.int64)
    rows = np.zeros(num_rows, dtype=np.int64)
    t = at = 0
    for members, p in groups:
        starts[members] = p
        rows[at: at + len(members)] = members
        for k in range(0, len(members), TILE_ROWS):
            tiles[t] = (at + k, min(TILE_ROWS, len(members) - k), p, members[0])
            t += 1
        at += len(members)
    return starts, tiles.reshape(-1), rows


def num_tiles_used(groups: list[tuple[np.ndarray, int]]) -> int:
    return sum(-(-len(rows) // TILE_ROWS) for rows, _ in groups)


# --------------------------------------------------------------------------------------
# Torch reference (CPU engine path; what the kernels are checked against)
# --------------------------------------------------------------------------------------


def _dequant(x: Tensor, scale: Tensor | None) -> Tensor:
    """fp32 values of gathered cache entries (..., hd); ``scale`` (...,) per token and head."""
    return x.float() if scale is None else x.float() * scale[..., None]


def prefix_partials_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    meta: CascadeMetadata, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each group member's attention over its group's shared prefix, the prefix read once
    per tile: (outputs (D, nh, hd) fp32, natural log-sum-exp (D, nh); -inf and 0 for rows
    outside every group). Arguments as :func:`models.attention.paged_decode_torch`."""
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    out = torch.zeros(d, nh, hd, dtype=torch.float32, device=q.device)
    lse = torch.full((d, nh), float("-inf"), dtype=torch.float32, device=q.device)
    for first, count, plen, trow in meta.tiles.tolist():
        if count == 0:
            continue
        rows = meta.rows[first: first + count]
        blocks = block_tables[trow, : -(-plen // bs)]  # (nb,)
        ks = None if k_scale is None else k_scale[blocks]  # (nb, nh, bs)
        vs = None if v_scale is None else v_scale[blocks]
        # (nb, nh, bs, hd) -> (nh, P, hd)
        k = _dequant(k_cache[blocks], ks).transpose(0, 1).reshape(nh, -1, hd)[:, :plen]
        v = _dequant(v_cache[blocks], vs).transpose(0, 1).reshape(nh, -1, hd)[:, :plen]
        scores = torch.einsum("rhe,hte->rht", q[rows].float(), k) / math.sqrt(hd)  # (G, nh, P)
        visible = torch.arange(plen, device=q.device)[None, :] < context_lens[rows][:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        part_lse = torch.logsumexp(scores, dim=-1)  # (G, nh)
        probs = torch.exp(scores - part_lse.clamp_min(-1e30)[..., None])
        out[rows] = torch.einsum("rht,hte->rhe", probs, v)
        lse[rows] = part_lse
    return out, lse


def suffix_partials_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    starts: Tensor, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each row's attention over its context positions ``starts[i] .. context_lens[i]-1``:
    (outputs (D, nh, hd) fp32, natural log-sum-exp (D, nh); -inf and 0 when empty)."""
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    w = block_tables.shape[1]
    ks = None if k_scale is None else k_scale[block_tables]  # (D, W, nh, bs)
    vs = None if v_scale is None else v_scale[block_tables]
    k = _dequant(k_cache[block_tables], ks)  # (D, W, nh, bs, hd)
    v = _dequant(v_cache[block_tables], vs)
    k = k.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd)  # (D, nh, T, hd)
    v = v.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd)
    scores = torch.einsum("dhe,dhte->dht", q.float(), k) / math.sqrt(hd)  # (D, nh, T)
    pos = torch.arange(w * bs, device=q.device)[None, :]
    valid = (pos >= starts[:, None]) & (pos < context_lens[:, None])  # (D, T)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (D, nh)
    probs = torch.exp(scores - lse.clamp_min(-1e30)[..., None])
    return torch.einsum("dht,dhte->dhe", probs, v), lse


def merge_partials(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """The attention over two disjoint key sets from each one's (output, natural lse):
    outputs (D, nh, hd), lse (D, nh); fp32."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: output 0
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    den = (w1 + w2).clamp_min(1e-30)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / den[..., None]


def cascade_decode_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    meta: CascadeMetadata, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> Tensor:
    """:func:`models.attention.paged_decode_torch` computed as cascade: each group's
    shared prefix once for its members, the rest per row, merged. (D, nh, hd) in q's
    dtype; equal to the plain result up to fp32 rounding."""
    po, plse = prefix_partials_torch(q, k_cache, v_cache, block_tables, context_lens, meta,
                                     k_scale=k_scale, v_scale=v_scale)
    so, slse = suffix_partials_torch(q, k_cache, v_cache, block_tables, context_lens,
                                     meta.starts, k_scale=k_scale, v_scale=v_scale)
    return merge_partials(po, plse, so, slse).to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton prefix pass (CUDA, or CPU under TRITON_INTERPRET=1; triton imported on first use)
# --------------------------------------------------------------------------------------

_KERNEL = None


def _build_kernel():  # noqa: ANN202 - returns a triton JIT function
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_parts", "first_slot"])
    def cascade_prefix_kernel(
        part_o_ptr, part_lse_ptr, q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, ctx_ptr,
        tiles_ptr, rows_ptr, scale_log2, num_parts, first_slot,
        stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_sb, stride_sh,
        stride_bt,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr,
        NUM_STAGES: tl.constexpr, PREFIX_SPLITS: tl.constexpr, HAS_SCALE: tl.constexpr,
        EXACT: tl.constexpr,
    ):
        # One program per (tile of group members, head, part of the prefix): the tile's
        # queries against the part's keys, each K/V tile loaded once for all of them.
        # Writes partial (output, log2-sum-exp) rows at slot first_slot + part of the
        # decode kernel's (row, head, num_parts) partial buffers.
        tile = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        first = tl.load(tiles_ptr + tile * 4)
        count = tl.load(tiles_ptr + tile * 4 + 1)
        plen = tl.load(tiles_ptr + tile * 4 + 2)
        trow = tl.load(tiles_ptr + tile * 4 + 3)
        if count > 0:
            r = tl.arange(0, ROWS)
            rmask = r < count
            rows = tl.load(rows_ptr + first + r, mask=rmask, other=0).to(tl.int64)
            # Keys a member may see: its context (a member shorter than the prefix
            # sees only its own part of it).
            lim = tl.minimum(tl.load(ctx_ptr + rows, mask=rmask, other=0), plen)  # (ROWS,)
            d = tl.arange(0, HD_P)
            dmask = d < HEAD_DIM
            qm = rmask[:, None] & dmask[None, :]
            q = tl.load(q_ptr + rows[:, None] * stride_qn + head * stride_qh + d[None, :],
                        mask=qm, other=0.0)  # (ROWS, HD_P), the model's dtype
            if EXACT:
                q = q.to(tl.float32)
            part = tl.cdiv(tl.cdiv(plen, PREFIX_SPLITS), KEYS) * KEYS
            start = split * part
            end = tl.minimum(plen, start + part)
            t = tl.arange(0, KEYS)
            bt_row = bt_ptr + trow * stride_bt
            m_i = tl.full([ROWS], -1e30, tl.float32)  # finite: no -inf - -inf
            l_i = tl.zeros([ROWS], tl.float32)
            acc = tl.zeros([ROWS, HD_P], tl.float32)
            for s0 in tl.range(start, end, KEYS, num_stages=NUM_STAGES):
                pos = s0 + t
                valid = pos < end
                blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
                off = (pos % BLOCK_SIZE).to(tl.int64)
                base = blk * stride_kb + head * stride_kh + off * stride_kt  # (KEYS,)
                kvm = valid[:, None] & dmask[None, :]
                # An fp8 cache converts exactly to the query's dtype (e4m3 fits bf16/fp16),
                # and every dtype to fp32 (EXACT).
                k = tl.load(k_ptr + base[:, None] + d[None, :], mask=kvm, other=0.0).to(
                    q.dtype)  # (KEYS, HD_P)
                v = tl.load(v_ptr + base[:, None] + d[None, :], mask=kvm, other=0.0).to(
                    q.dtype)
                # Products of bf16/fp16 values are exact in fp32; accumulation is fp32.
                if EXACT:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * scale_log2  # (ROWS, KEYS), log2 domain
                if HAS_SCALE:
                    srow = blk * stride_sb + head * stride_sh + off
                    s = s * tl.load(ks_ptr + srow, mask=valid, other=0.0)[None, :]
                s = tl.where(pos[None, :] < lim[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])  # (ROWS, KEYS) fp32
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if HAS_SCALE:
                    p = p * tl.load(vs_ptr + srow, mask=valid, other=0.0)[None, :]
                if EXACT:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    # p in two halves of the value dtype (hi + lo carries ~16 bits of
                    # mantissa): tensor-core dots that keep the weights near fp32.
                    p_hi = p.to(q.dtype)
                    p_lo = (p - p_hi.to(tl.float32)).to(q.dtype)
                    pv = tl.dot(p_hi, v) + tl.dot(p_lo, v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            nonempty = l_i > 0
            l_safe = tl.where(nonempty, l_i, 1.0)
            o = acc / l_safe[:, None]
            lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
            prow = (rows * NUM_HEADS + head) * num_parts + first_slot + split  # (ROWS,)
            tl.store(part_lse_ptr + prow, lse, mask=rmask)
            tl.store(part_o_ptr + prow[:, None] * HEAD_DIM + d[None, :], o, mask=qm)

    return cascade_prefix_kernel


def prefix_kernel():  # noqa: ANN201 - a triton JIT function
    """The prefix pass's Triton kernel (built on first use)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def prefix_constexprs(num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                      has_scale: bool, config: CascadeConfig = DEFAULT_CASCADE,
                      ) -> dict[str, int | bool]:
    """The prefix kernel's compile-time arguments (``dtype``: the queries')."""
    return {"NUM_HEADS": num_heads, "HEAD_DIM": head_dim,
            "HD_P": max(16, 1 << max(0, head_dim - 1).bit_length()),
            "BLOCK_SIZE": block_size, "ROWS": TILE_ROWS, "KEYS": config.keys,
            "NUM_STAGES": config.num_stages, "PREFIX_SPLITS": config.prefix_splits,
            "HAS_SCALE": has_scale, "EXACT": _exact_dots(dtype)}


def _exact_dots(dtype: torch.dtype) -> bool:
    """Whether the prefix pass runs its dots in fp32: for fp32 models, and for bf16 under
    Triton's interpreter (its bf16 ``tl.dot`` returns garbage; fp32 products of bf16
    values are exact, so the result is the same)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and os.environ.get("TRITON_INTERPRET") == "1")


def prefix_partials_triton(
    part_o: Tensor, part_lse: Tensor, first_slot: int, q: Tensor, k_cache: Tensor,
    v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, meta: CascadeMetadata, *,
    k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    config: CascadeConfig = DEFAULT_CASCADE,
) -> None:
    """The prefix pass into partial buffers ``part_o`` (D, nh, S, hd) and ``part_lse``
    (D, nh, S) float32 (log2 domain), slots ``first_slot .. + config.prefix_splits``, for
    group members only (the caller sets the other rows' slots to -inf). The launch
    depends only on shapes (the tile count is ``meta.tiles``' rows), so it can be
    captured in a CUDA graph."""
    kernel = prefix_kernel()
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    num_parts = part_lse.shape[2]
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("prefix_partials_triton: q and the caches need a contiguous last "
                         "dim (and one layout for K and V)")
    if first_slot + config.prefix_splits > num_parts:
        raise ValueError("prefix_partials_triton: not enough partial slots")
    if part_o.shape != (d, nh, num_parts, hd) or not part_o.is_contiguous() \
            or not part_lse.is_contiguous():
        raise ValueError("prefix_partials_triton: partials must be contiguous "
                         "(D, nh, S, hd) and (D, nh, S)")
    if k_scale is not None:
        assert v_scale is not None
        ks, vs, s_strides = k_scale, v_scale, (k_scale.stride(0), k_scale.stride(1))
    else:
        ks, vs, s_strides = part_lse, part_lse, (0, 0)  # never read
    n_tiles = meta.tiles.shape[0]
    if n_tiles == 0 or d == 0:
        return
    kernel[(n_tiles, nh, config.prefix_splits)](
        part_o, part_lse, q, k_cache, v_cache, ks, vs, block_tables, context_lens,
        meta.tiles, meta.rows, (1.0 / math.sqrt(hd)) * 1.4426950408889634, num_parts,
        first_slot, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), *s_strides, block_tables.stride(0),
        **prefix_constexprs(nh, hd, bs, q.dtype, k_scale is not None, config),
        num_warps=config.num_warps,
    )


# --------------------------------------------------------------------------------------
# Picking the prefix pass's config (CUDA)
# --------------------------------------------------------------------------------------

# (heads, head_dim, block_size, cache dtype) -> the config tune_cascade_kernel picked
_TUNED: dict[tuple[int, int, int, torch.dtype], CascadeConfig] = {}


def cascade_choice(num_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype) -> CascadeConfig:
    """The prefix pass's config at this shape and cache dtype: the tuner's pick, else
    :data:`DEFAULT_CASCADE`."""
    return _TUNED.get((num_heads, head_dim, block_size, dtype), DEFAULT_CASCADE)


def tune_cascade_kernel(
    num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str, *, query_dtype: torch.dtype | None = None,
    configs: tuple[CascadeConfig, ...] = CASCADE_CONFIGS, groups: int = 8,
    members: int = 32, prefix: int = 1024, budget_s: float = 10.0,
) -> tuple[CascadeConfig, dict[CascadeConfig, float]]:
    """Time the prefix pass's candidate configs on a shared-prefix step (``groups``
    prefixes of ``prefix`` tokens, ``members`` queries each) and remember the fastest
    for this shape (later :func:`cascade_choice` calls answer it). A candidate first
    runs a small case against :func:`prefix_partials_torch`; one that fails to compile
    or disagrees is never picked. Stops trying candidates after ``budget_s`` seconds
    (the default first). Returns the pick and the milliseconds of every candidate that
    passed (none when the shape was tuned before)."""
    import time

    key = (num_heads, head_dim, block_size, dtype)
    if key in _TUNED:
        return _TUNED[key], {}
    t_end = time.monotonic() + budget_s
    if query_dtype is None:
        query_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    g = torch.Generator(device=device).manual_seed(0)
    pb = -(-prefix // block_size)
    nb = groups * pb + 1
    shape = (nb, num_heads, block_size, head_dim)
    kc = torch.randn(shape, generator=g, device=device)
    vc = torch.randn(shape, generator=g, device=device)
    ks = vs = None
    if dtype == torch.float8_e4m3fn:
        ks = kc.abs().amax(-1).clamp_min(1e-6) / 448
        vs = vc.abs().amax(-1).clamp_min(1e-6) / 448
        kc, vc = (kc / ks[..., None]).to(dtype), (vc / vs[..., None]).to(dtype)
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
    d = groups * members
    q = torch.randn(d, num_heads, head_dim, generator=g, device=device).to(query_dtype)
    tables = torch.zeros(d, pb + 1, dtype=torch.int64, device=device)
    for i in range(d):
        tables[i, :pb] = torch.arange(pb, device=device) + 1 + (i % groups) * pb
    ctx = torch.full((d,), pb * block_size + 1, dtype=torch.int64, device=device)
    found = [(np.arange(k, d, groups), pb * block_size) for k in range(groups)]
    n_tiles = max_tiles(d)
    starts, tiles, rows = layout(found, d, n_tiles)
    meta = CascadeMetadata(starts=torch.from_numpy(starts).to(device),
                           tiles=torch.from_numpy(tiles).view(n_tiles, 4).to(device),
                           rows=torch.from_numpy(rows).to(device))
    # The reference on the first group's first rows (the torch path gathers per tile).
    n_chk = min(4, members)
    chk = CascadeMetadata(starts=meta.starts, rows=meta.rows,
                          tiles=torch.tensor([[0, n_chk, pb * block_size, 0]], device=device))
    ref_o, ref_lse = prefix_partials_torch(q.float(), kc, vc, tables, ctx, chk,
                                           k_scale=ks, v_scale=vs)
    ref_rows = torch.from_numpy(rows[:n_chk]).to(device)
    tol = 1e-3 if query_dtype == torch.float32 else 3e-2
    times: dict[CascadeConfig, float] = {}
    for cfg in configs:
        if times and time.monotonic() > t_end:
            break
        slots = cfg.prefix_splits
        part_o = torch.empty(d, num_heads, slots, head_dim, device=device)
        part_lse = torch.empty(d, num_heads, slots, device=device)

        def run(cfg: CascadeConfig = cfg, po: Tensor = part_o, pl: Tensor = part_lse) -> None:
            prefix_partials_triton(po, pl, 0, q, kc, vc, tables, ctx, meta, k_scale=ks,
                                   v_scale=vs, config=cfg)

        try:
            run()
            lse2 = part_lse[ref_rows]  # (4, nh, S), log2 domain
            lse = torch.logsumexp(lse2 * math.log(2), dim=-1)
            w = torch.exp(lse2 * math.log(2) - lse[..., None])
            o = (part_o[ref_rows] * w[..., None]).sum(2)
            ok = ((o - ref_o[ref_rows]).abs().max().item() <= tol
                  and (lse - ref_lse[ref_rows]).abs().max().item() <= 1e-2)
        except Exception:  # noqa: BLE001 - e.g. out of shared memory
            ok = False
        if not ok:
            continue
        times[cfg] = _time_ms(run, device)
    pick = min(times, key=times.__getitem__) if times else DEFAULT_CASCADE
    _TUNED[key] = pick
    return pick, times


def _time_ms(fn: Callable[[], object], device: torch.device | str, reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` (launched back to back) on a CUDA device (on a
    CPU, under Triton's interpreter, wall time of two calls)."""
    import time

    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        fn()
        return (time.perf_counter() - t0) / 2 * 1e3
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps
