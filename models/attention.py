"""Paged attention: the :class:`~models.model.AttentionBackend` the engine plugs in.

One engine step packs ``N`` tokens: first ``D`` *decode* tokens (one per sequence that
is generating), then the tokens of any *prefill* chunks (prompts, possibly split over
several steps, and recomputation after preemption). Per layer the backend

1. writes the step's new keys/values into the paged cache at their slots;
2. decode tokens: attends each query to its sequence's whole context through the block
   table — a Triton kernel on CUDA (:func:`paged_decode_triton`), a gather in pure
   torch elsewhere (:func:`paged_decode_torch`, also the reference the kernel is
   checked against);
3. prefill tokens: a chunk that starts a sequence (a new prompt, or a recomputation)
   sees only its own keys, so such chunks are packed right-padded into a batch (a few
   batches when lengths differ a lot) and run one causal
   ``scaled_dot_product_attention`` call per batch (flash attention on CUDA); chunks
   that continue a sequence gather their earlier keys from the cache and run one SDPA
   call together with a block-diagonal causal mask built once per step.

All step metadata arrives as device tensors built by the engine from one host buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.engine.kv_cache import KVCache


@dataclass
class StepMetadata:
    """Device tensors describing one step's tokens (built by the engine)."""

    slot_blocks: Tensor  # (N,) block of each new token's cache slot
    slot_offsets: Tensor  # (N,) offset inside that block
    num_decode: int  # D: the first D tokens are decode tokens, one per sequence
    block_tables: Tensor | None = None  # (D, W) block ids per decode sequence
    context_lens: Tensor | None = None  # (D,) tokens each decode query attends to
    # Prefill tokens follow the decode tokens: first R rows of chunks that continue a
    # sequence, then chunks that start one (host ints: no device sync to slice them).
    num_continuing: int = 0  # R
    fresh: tuple[tuple[int, int], ...] = ()  # (start, end) rows, relative to D
    key_blocks: Tensor | None = None  # (Nk,) context keys of the continuing chunks
    key_offsets: Tensor | None = None  # (Nk,)
    prefill_mask: Tensor | None = None  # (1, 1, R, Nk) bool, True = may attend
    # The fresh chunks packed right-padded (engine.fresh_groups): (n, S) per group, the
    # rows (relative to D) of all groups' n * S padded queries, and for each fresh row
    # its index among those. Without them each fresh chunk runs its own call.
    fresh_groups: tuple[tuple[int, int], ...] = ()
    fresh_gather: Tensor | None = None  # (sum n * S,)
    fresh_scatter: Tensor | None = None  # (fresh rows,)


# cuDNN attention (torch's first choice on recent GPUs) builds a graph per new shape at
# ~1 ms of CPU per call; prefill shapes change every step, so keep to flash /
# memory-efficient (math as the fallback for shapes they refuse, and on CPU).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_mask(q_seq: Tensor, q_pos: Tensor, k_seq: Tensor, k_pos: Tensor) -> Tensor:
    """(1, 1, Nq, Nk) mask: a query sees keys of its own sequence at positions <= its own."""
    mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    return mask[None, None]


class PagedAttention:
    """Attention backend over a :class:`KVCache` for one step at a time.

    ``use_triton`` picks the CUDA decode kernel (default: whenever the cache is on CUDA).
    """

    def __init__(self, cache: KVCache, use_triton: bool | None = None) -> None:
        self.cache = cache
        if use_triton is None:
            use_triton = cache.data.device.type == "cuda"
        self.use_triton = use_triton
        self.meta: StepMetadata | None = None

    def set_step(self, meta: StepMetadata) -> None:
        self.meta = meta

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        m = self.meta
        assert m is not None, "PagedAttention.set_step() was not called"
        kc, vc = self.cache.layer(layer)  # each (blocks, heads, block_size, hd)
        # Advanced indices around a slice put the indexed dim first: kc[b, :, o] is (N, nh, hd).
        kc[m.slot_blocks, :, m.slot_offsets] = k
        vc[m.slot_blocks, :, m.slot_offsets] = v
        d = m.num_decode
        if d == q.shape[0]:
            return self._decode(q, kc, vc)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], kc, vc)
        r = d + m.num_continuing
        with sdpa_kernel(_SDPA_BACKENDS):
            if m.num_continuing:
                out[d:r] = self._continuing(q[d:r], kc, vc)
            if m.fresh_groups:
                out[d + m.fresh[0][0]: d + m.fresh[-1][1]] = self._fresh(q[d:], k[d:], v[d:])
            else:
                for start, end in m.fresh:
                    s, e = d + start, d + end
                    out[s:e] = _causal(q[s:e], k[s:e], v[s:e])
        return out

    def _fresh(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """All chunks that start a sequence, one causal call per length group; q, k, v are
        the step's rows after the decode tokens. Returns the fresh rows' outputs."""
        m = self.meta
        assert m is not None and m.fresh_gather is not None and m.fresh_scatter is not None
        nh, hd = q.shape[1:]
        qg, kg, vg = q[m.fresh_gather], k[m.fresh_gather], v[m.fresh_gather]
        outs = []
        at = 0
        for n, s in m.fresh_groups:
            # (n * S, nh, hd) -> (n, nh, S, hd): 4-D with a contiguous last dim for flash.
            part = [t[at: at + n * s].view(n, s, nh, hd).transpose(1, 2) for t in (qg, kg, vg)]
            o = F.scaled_dot_product_attention(*part, is_causal=True)
            outs.append(o.transpose(1, 2).reshape(n * s, nh, hd))
            at += n * s
        packed = outs[0] if len(outs) == 1 else torch.cat(outs)
        return packed[m.fresh_scatter]

    def _decode(self, q: Tensor, kc: Tensor, vc: Tensor) -> Tensor:
        m = self.meta
        assert m is not None and m.block_tables is not None and m.context_lens is not None
        if self.use_triton:
            return paged_decode_triton(q, kc, vc, m.block_tables, m.context_lens)
        return paged_decode_torch(q, kc, vc, m.block_tables, m.context_lens)

    def _continuing(self, q: Tensor, kc: Tensor, vc: Tensor) -> Tensor:
        m = self.meta
        assert m is not None and m.key_blocks is not None and m.prefill_mask is not None
        keys = kc[m.key_blocks, :, m.key_offsets]  # (Nk, nh, hd)
        values = vc[m.key_blocks, :, m.key_offsets]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # (1, nh, Nq, hd)
            keys.transpose(0, 1)[None],  # (1, nh, Nk, hd)
            values.transpose(0, 1)[None],
            attn_mask=m.prefill_mask,
        )
        return out[0].transpose(0, 1)  # (Nq, nh, hd)


def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of one whole sequence over itself; all (L, nh, hd)."""
    # 4-D (1, nh, L, hd): the fused (flash / memory-efficient) kernels only take 4-D inputs.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True,
    )
    return out[0].transpose(0, 1)  # (L, nh, hd)


def paged_decode_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor
) -> Tensor:
    """One query per sequence against its paged context, in plain torch (fp32 math).

    q: (D, nh, hd); caches: (blocks, nh, block_size, hd); block_tables: (D, W);
    context_lens: (D,). Columns of ``block_tables`` past a sequence's length are ignored.
    """
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    w = block_tables.shape[1]
    k = k_cache[block_tables]  # (D, W, nh, bs, hd)
    v = v_cache[block_tables]
    k = k.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd).float()  # (D, nh, T, hd)
    v = v.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd).float()
    scores = torch.einsum("dhe,dhte->dht", q.float(), k) / math.sqrt(hd)  # (D, nh, T)
    valid = torch.arange(w * bs, device=q.device)[None, :] < context_lens[:, None]  # (D, T)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("dht,dhte->dhe", probs, v).to(q.dtype)  # (D, nh, hd)


# --------------------------------------------------------------------------------------
# Triton decode kernel (CUDA only; triton is imported on first use)
# --------------------------------------------------------------------------------------

_KERNEL = None


def _build_kernel():  # noqa: ANN202 - returns a triton JIT function
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr,
        scale_log2,
        stride_qn, stride_qh, stride_on, stride_oh,
        stride_kb, stride_kh, stride_kt,
        stride_bt,
        HEAD_DIM: tl.constexpr, HD_A: tl.constexpr, HD_B: tl.constexpr,
        HD_B_ALLOC: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
        NUM_STAGES: tl.constexpr, HPP: tl.constexpr,
    ):
        # One program per (HPP heads, sequence): an online softmax over the sequence's
        # context, TILE tokens (TILE // BLOCK_SIZE blocks) per iteration. With HPP > 1
        # the block-table loads and address math are shared by the heads and each
        # iteration moves HPP times the bytes (a block's heads are adjacent in the
        # cache). Tiles are (TILE, HPP, dims); the softmax state is per head. The head
        # group is the fastest-varying grid index, so programs start sequence by
        # sequence: with sequences sorted longest first (the engine does) the last wave
        # holds the shortest ones and the tail is short.
        #
        # The head dim is covered by two power-of-two parts, HD_A + HD_B (96 = 64 + 32):
        # padding 96 to 128 would leave a quarter of every load's lanes masked off. When
        # no such split exists HD_A is the padded width (> HEAD_DIM, masked) and HD_B 0.
        heads = tl.program_id(0) * HPP + tl.arange(0, HPP)
        seq = tl.program_id(1)
        ctx = tl.load(ctx_ptr + seq)
        da = tl.arange(0, HD_A)
        amask = da < HEAD_DIM
        db = HD_A + tl.arange(0, HD_B_ALLOC)
        q_rows = q_ptr + seq * stride_qn + heads[:, None] * stride_qh  # (HPP, 1)
        # Fold 1/sqrt(hd) and log2(e) into q so the loop uses exp2.
        qa = tl.load(q_rows + da[None, :], mask=amask[None, :], other=0.0)
        qa = qa.to(tl.float32) * scale_log2  # (HPP, HD_A)
        acc_a = tl.zeros([HPP, HD_A], tl.float32)
        acc_b = tl.zeros([HPP, HD_B_ALLOC], tl.float32)  # unused when HD_B == 0
        qb = acc_b
        if HD_B > 0:
            qb = tl.load(q_rows + db[None, :]).to(tl.float32) * scale_log2
        m_i = tl.full([HPP], -float("inf"), tl.float32)  # running max (log2 domain)
        l_i = tl.zeros([HPP], tl.float32)  # softmax denominator
        t = tl.arange(0, TILE)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        head_off = heads.to(tl.int64) * stride_kh  # (HPP,)
        # num_stages > 1 lets the compiler issue the next tiles' loads while this one's
        # math runs (each iteration is otherwise a chain of dependent loads).
        for start in tl.range(0, ctx, TILE, num_stages=NUM_STAGES):
            pos = start + t
            valid = pos < ctx
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            row = blk * stride_kb + (pos % BLOCK_SIZE).to(tl.int64) * stride_kt
            base = row[:, None, None] + head_off[None, :, None]  # (TILE, HPP, 1)
            vmask = valid[:, None, None]
            a_mask = vmask & amask[None, None, :]
            # K and V are both issued before any math: V does not depend on the scores.
            ka = tl.load(k_ptr + base + da[None, None, :], mask=a_mask, other=0.0)
            va = tl.load(v_ptr + base + da[None, None, :], mask=a_mask, other=0.0)
            s = tl.sum(ka.to(tl.float32) * qa[None, :, :], axis=2)  # (TILE, HPP)
            if HD_B > 0:
                kb = tl.load(k_ptr + base + db[None, None, :], mask=vmask, other=0.0)
                vb = tl.load(v_ptr + base + db[None, None, :], mask=vmask, other=0.0)
                s += tl.sum(kb.to(tl.float32) * qb[None, :, :], axis=2)
            s = tl.where(valid[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))  # (HPP,)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])  # (TILE, HPP)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_a = acc_a * alpha[:, None] + tl.sum(p[:, :, None] * va.to(tl.float32), axis=0)
            if HD_B > 0:
                acc_b = acc_b * alpha[:, None] + tl.sum(
                    p[:, :, None] * vb.to(tl.float32), axis=0)
            m_i = m_new
        o_rows = out_ptr + seq * stride_on + heads[:, None] * stride_oh
        tl.store(o_rows + da[None, :], (acc_a / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=amask[None, :])
        if HD_B > 0:
            tl.store(o_rows + db[None, :],
                     (acc_b / l_i[:, None]).to(out_ptr.dtype.element_ty))

    return paged_decode_kernel


def _split_head_dim(hd: int) -> tuple[int, int]:
    """(HD_A, HD_B): hd = HD_A + HD_B with both powers of two (HD_B may be 0, HD_B >= 16
    so a load row stays >= 32 bytes), else (padded power of two, 0)."""
    a = 1 << (hd.bit_length() - 1)
    b = hd - a
    if a >= 16 and (b == 0 or (b >= 16 and b & (b - 1) == 0)):
        return a, b
    return max(16, 1 << (hd - 1).bit_length()), 0


# (heads, head_dim, block_size, dtype) -> (tile, num_warps, num_stages, heads per
# program), filled by tune_decode_kernel.
_TUNED: dict[tuple[int, int, int, torch.dtype], tuple[int, int, int, int]] = {}
_DEFAULT_CONFIG = (64, 4, 1, 1)


def paged_decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    tile: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    heads_per_program: int | None = None,
) -> Tensor:
    """The Triton version of :func:`paged_decode_torch` (same arguments, CUDA tensors).

    Every ``context_lens[i]`` must be >= 1. fp32 accumulation whatever the cache dtype.
    ``tile`` (tokens per loop iteration), ``num_warps`` and ``num_stages`` (software
    pipelining depth of the loop) and ``heads_per_program`` (a power of two dividing the
    head count; else 1 is used) default to what :func:`tune_decode_kernel` picked for
    this shape, else (64, 4, 1, 1).
    """
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    best = _TUNED.get((nh, hd, bs, k_cache.dtype), _DEFAULT_CONFIG)
    tile = best[0] if tile is None else tile
    num_warps = best[1] if num_warps is None else num_warps
    num_stages = best[2] if num_stages is None else num_stages
    hpp = best[3] if heads_per_program is None else heads_per_program
    if hpp < 1 or hpp & (hpp - 1) or nh % hpp:
        hpp = 1
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_decode_triton: q and the caches need a contiguous last dim")
    tile = max(tile, bs)
    out = torch.empty(d, nh, hd, dtype=q.dtype, device=q.device)
    if d == 0:
        return out
    hd_a, hd_b = _split_head_dim(hd)
    _KERNEL[(nh // hpp, d)](
        out, q, k_cache, v_cache, block_tables, context_lens,
        (1.0 / math.sqrt(hd)) * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=hd, HD_A=hd_a, HD_B=hd_b, HD_B_ALLOC=max(hd_b, 16),
        BLOCK_SIZE=bs, TILE=tile, NUM_STAGES=num_stages, HPP=hpp,
        num_warps=num_warps,
    )
    return out


DECODE_CONFIGS: tuple[tuple[int, int, int, int], ...] = tuple(
    (tile, warps, stages, 1)
    for tile, warps in ((32, 2), (32, 4), (64, 4), (128, 4))
    for stages in (1, 2, 3)
) + tuple(
    (tile, warps, stages, hpp)
    for tile, warps, hpp in ((16, 4, 4), (32, 4, 2), (32, 4, 4), (16, 8, 8), (32, 8, 4))
    for stages in (1, 2)
)


def tune_decode_kernel(
    num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str, batch: int = 192, context: int = 384,
    configs: tuple[tuple[int, int, int, int], ...] = DECODE_CONFIGS,
) -> tuple[int, int, int, int]:
    """Time the decode kernel at this shape for a few (tile, num_warps, num_stages,
    heads per program) and remember the fastest; later calls at the shape use it.
    Returns the pick. Takes several seconds (compiles), and a temporary cache of
    ``batch * context`` tokens; a shape already tuned in this process returns at once.
    A config that fails to compile or run is skipped."""
    key = (num_heads, head_dim, block_size, dtype)
    if key in _TUNED:
        return _TUNED[key]
    blocks = batch * math.ceil(context / block_size)
    g = torch.Generator(device=device).manual_seed(0)
    kc = torch.randn(blocks + 1, num_heads, block_size, head_dim, generator=g, device=device,
                     dtype=torch.float32).to(dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    perm = torch.randperm(blocks, generator=g, device=device) + 1
    tables = perm.view(batch, -1)  # (batch, blocks per sequence), shuffled like a real cache
    # Mixed lengths (as in a real batch), longest first like the engine sorts them.
    ctx = torch.linspace(context, max(1, context // 4), batch, device=device).long()
    # A few rows of the reference: a config whose output disagrees is never picked (a
    # miscompiled pipelined loop must not slip in silently).
    n_ref = min(batch, 8)
    ref = paged_decode_torch(q[:n_ref], kc, vc, tables[:n_ref], ctx[:n_ref]).float()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    timings = {}
    for cfg in configs:
        try:
            got = paged_decode_triton(q, kc, vc, tables, ctx, *cfg)  # compile
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for deep pipelines
            continue
        if not (got[:n_ref].float() - ref).abs().max().item() <= tol:
            continue
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(10):
            paged_decode_triton(q, kc, vc, tables, ctx, *cfg)
        end.record()
        torch.cuda.synchronize(device)
        timings[cfg] = start.elapsed_time(end)
    best = min(timings, key=timings.__getitem__) if timings else _DEFAULT_CONFIG
    _TUNED[key] = best
    return best
