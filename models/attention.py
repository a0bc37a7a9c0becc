"""Paged attention: the :class:`~models.model.AttentionBackend` the engine plugs in.

One engine step packs ``N`` tokens: first ``D`` *decode* tokens (one per sequence that
is generating), then the tokens of any *prefill* chunks (prompts, possibly split over
several steps, and recomputation after preemption). Per layer the backend

1. writes the step's new keys/values into the paged cache at their slots (an FP8 cache:
   quantized per token and head, with their scales);
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.cascade import (
    CascadeConfig,
    CascadeMetadata,
    cascade_choice,
    cascade_decode_torch,
    prefix_partials_triton,
)
from models.engine.kv_cache import KVCache
from models.fp8 import dequantize_rows, quantize_scatter
from models.fused import split_rotate_store, store_fuses, write_kv

if TYPE_CHECKING:
    from models.model import Rotary


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
    # The continuing chunks packed padded (runner.continuing_groups): (n, Lq, W) per
    # group, the groups' block tables (n * W each), padded query rows' positions and
    # rows (relative to D; n * Lq each), and for each continuing row its padded row.
    continuing_groups: tuple[tuple[int, int, int], ...] = ()
    cont_tables: Tensor | None = None
    cont_qpos: Tensor | None = None
    cont_gather: Tensor | None = None
    cont_scatter: Tensor | None = None
    # The fresh chunks packed right-padded (engine.fresh_groups): (n, S) per group, the
    # rows (relative to D) of all groups' n * S padded queries, and for each fresh row
    # its index among those (both empty when that packing is the rows in place). Without
    # them each fresh chunk runs its own call.
    fresh_groups: tuple[tuple[int, int], ...] = ()
    fresh_gather: Tensor | None = None  # (sum n * S,)
    fresh_scatter: Tensor | None = None  # (fresh rows,)
    # Decode rows sharing a cached prefix (models.cascade): the prefix once per group.
    cascade: CascadeMetadata | None = None


# cuDNN attention (torch's first choice on recent GPUs) builds a graph per new shape at
# ~1 ms of CPU per call; prefill shapes change every step, so keep to flash /
# memory-efficient (math as the fallback for shapes they refuse, and on CPU).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class PagedAttention:
    """Attention backend over a :class:`KVCache` for one step at a time.

    ``use_triton`` picks the CUDA decode kernel (default: whenever the cache is on CUDA).
    """

    def __init__(self, cache: KVCache, use_triton: bool | None = None,
                 fused_store: bool = True) -> None:
        self.cache = cache
        if use_triton is None:
            use_triton = cache.data.device.type == "cuda"
        self.use_triton = use_triton
        # Store k and v in the cache from the kernel that splits and rotates them (see
        # inputs) instead of reading them back in a second kernel.
        self.fused_store = fused_store
        self.meta: StepMetadata | None = None
        self.cont_masks: list[Tensor] = []
        self.stored_layer: int | None = None  # the layer whose k, v inputs() stored

    def inputs(self, layer: int, qkv: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """q, k, v of the fused projection (N, nh, 3, hd), q and k rotated. Where one
        kernel can (a cache in the activations' dtype, see :func:`store_fuses`), k and v
        are stored at their cache slots by the same kernel, and in a decode-only step
        not returned at all (its attention reads them from the cache)."""
        m = self.meta
        assert m is not None, "PagedAttention.set_step() was not called"
        self.stored_layer = None
        kc, vc = self.cache.layer(layer)
        if not (self.fused_store and self.cache.layer_scales(layer) is None
                and store_fuses(qkv, kc, vc)):
            return rotary.split_rotate(qkv, cos, sin)
        self.stored_layer = layer
        return split_rotate_store(qkv, cos, sin, rotary.dim, kc, vc, m.slot_blocks,
                                  m.slot_offsets, kv_out=m.num_decode < qkv.shape[0])

    def set_step(self, meta: StepMetadata) -> None:
        self.meta = meta
        self.cont_masks = continuing_masks(meta, self.cache.block_size)

    def __call__(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None,
                 ) -> Tensor:
        m = self.meta
        assert m is not None, "PagedAttention.set_step() was not called"
        kc, vc = self.cache.layer(layer)  # each (blocks, heads, block_size, hd)
        scales = self.cache.layer_scales(layer)  # FP8 cache: each (blocks, heads, block_size)
        stored, self.stored_layer = self.stored_layer == layer, None
        if not stored:
            assert k is not None and v is not None
            if scales is None:
                write_kv(k, v, kc, vc, m.slot_blocks, m.slot_offsets)
            else:
                write_fp8(kc, scales[0], m.slot_blocks, m.slot_offsets, k)
                write_fp8(vc, scales[1], m.slot_blocks, m.slot_offsets, v)
        d = m.num_decode
        if d == q.shape[0]:
            return self._decode(q, kc, vc, scales)
        assert k is not None and v is not None
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], kc, vc, scales)
        r = d + m.num_continuing
        with sdpa_kernel(_SDPA_BACKENDS):
            # Chunks that start a sequence attend to the step's own (unrounded) k and v;
            # only keys read back from the cache carry the FP8 rounding.
            if m.num_continuing:
                out[d:r] = self._continuing(q[d:r], kc, vc, scales)
            if m.fresh_groups:
                self._fresh(q[d:], k[d:], v[d:], out[d + m.fresh[0][0]: d + m.fresh[-1][1]])
            else:
                for start, end in m.fresh:
                    s, e = d + start, d + end
                    out[s:e] = _causal(q[s:e], k[s:e], v[s:e])
        return out

    def _fresh(self, q: Tensor, k: Tensor, v: Tensor, dest: Tensor) -> None:
        """All chunks that start a sequence, one causal call per length group, their
        outputs written to ``dest`` (the fresh rows of the step's output); q, k, v are the
        step's rows after the decode tokens."""
        m = self.meta
        assert m is not None and m.fresh_gather is not None and m.fresh_scatter is not None
        nh, hd = q.shape[1:]
        # Already packed (runs of equal chunks in row order): each group's output is
        # its rows' output.
        in_place = m.fresh_gather.numel() == 0
        if in_place:
            lo, hi = m.fresh[0][0], m.fresh[-1][1]
            qg, kg, vg = q[lo:hi], k[lo:hi], v[lo:hi]
        else:
            qg, kg, vg = q[m.fresh_gather], k[m.fresh_gather], v[m.fresh_gather]
        outs = []
        at = 0
        for n, s in m.fresh_groups:
            # (n * S, nh, hd) -> (n, nh, S, hd): 4-D with a contiguous last dim for flash.
            part = [t[at: at + n * s].view(n, s, nh, hd).transpose(1, 2) for t in (qg, kg, vg)]
            o = F.scaled_dot_product_attention(*part, is_causal=True).transpose(1, 2)
            if in_place:
                dest[at: at + n * s].view(n, s, nh, hd).copy_(o)
            else:
                outs.append(o.reshape(n * s, nh, hd))
            at += n * s
        if not in_place:
            packed = outs[0] if len(outs) == 1 else torch.cat(outs)
            torch.index_select(packed, 0, m.fresh_scatter, out=dest)

    def _decode(self, q: Tensor, kc: Tensor, vc: Tensor,
                scales: tuple[Tensor, Tensor] | None) -> Tensor:
        m = self.meta
        assert m is not None and m.block_tables is not None and m.context_lens is not None
        ks, vs = (None, None) if scales is None else scales
        if m.cascade is not None:
            cascade = cascade_decode_triton if self.use_triton else cascade_decode_torch
            return cascade(q, kc, vc, m.block_tables, m.context_lens, m.cascade,
                           k_scale=ks, v_scale=vs)
        decode = paged_decode_triton if self.use_triton else paged_decode_torch
        return decode(q, kc, vc, m.block_tables, m.context_lens, k_scale=ks, v_scale=vs)

    def _continuing(self, q: Tensor, kc: Tensor, vc: Tensor,
                    scales: tuple[Tensor, Tensor] | None) -> Tensor:
        """Chunks that continue a sequence: each attends to its sequence's cached keys up
        to its own positions, one padded masked call per context-length group; q holds
        the continuing rows. Returns their outputs."""
        m = self.meta
        assert m is not None and m.cont_tables is not None and m.cont_qpos is not None
        assert m.cont_gather is not None and m.cont_scatter is not None
        nh, hd = q.shape[1:]
        bs = kc.shape[2]
        qg = q[m.cont_gather]
        outs = []
        at_t = at_q = 0
        for (n, lq, w), mask in zip(m.continuing_groups, self.cont_masks, strict=True):
            table = m.cont_tables[at_t: at_t + n * w]
            keys, values = (read_blocks(c, None if scales is None else scales[i], table,
                                        q.dtype).view(n, w, nh, bs, hd).transpose(1, 2)
                            .reshape(n, nh, w * bs, hd) for i, c in enumerate((kc, vc)))
            o = F.scaled_dot_product_attention(
                qg[at_q: at_q + n * lq].view(n, lq, nh, hd).transpose(1, 2), keys, values,
                attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape(n * lq, nh, hd))
            at_t += n * w
            at_q += n * lq
        packed = outs[0] if len(outs) == 1 else torch.cat(outs)
        return packed[m.cont_scatter]


def continuing_masks(meta: StepMetadata, block_size: int) -> list[Tensor]:
    """Per continuing group, the (n, 1, Lq, W * block_size) mask (broadcast over heads)
    of which padded keys each padded query sees: its own chunk's positions up to its
    own. The same in every layer, so built once per step."""
    if not meta.continuing_groups:
        return []
    assert meta.cont_qpos is not None
    masks = []
    at = 0
    for n, lq, w in meta.continuing_groups:
        qpos = meta.cont_qpos[at: at + n * lq].view(n, 1, lq, 1)
        masks.append(torch.arange(w * block_size, device=qpos.device) <= qpos)
        at += n * lq
    return masks


def read_blocks(cache: Tensor, scales: Tensor | None, blocks: Tensor,
                dtype: torch.dtype) -> Tensor:
    """Whole blocks of a layer's cache, dequantized to ``dtype`` when the cache is FP8:
    (len(blocks), nh, block_size, hd)."""
    if scales is None:
        return cache.index_select(0, blocks)
    xq = cache.view(torch.uint8).index_select(0, blocks).view(cache.dtype)
    return dequantize_rows(xq, scales.index_select(0, blocks)[..., None], dtype)


def write_fp8(cache: Tensor, scales: Tensor, blocks: Tensor, offsets: Tensor,
              x: Tensor) -> None:
    """Quantize ``x`` (N, nh, hd) per token and head into an FP8 cache's slots
    ``(blocks[i], offsets[i])``: e4m3 values into ``cache`` (blocks, nh, block_size, hd),
    their float32 scales into ``scales`` (blocks, nh, block_size)."""
    quantize_scatter(x, cache, scales, blocks, offsets)


def read_fp8(cache: Tensor, scales: Tensor, blocks: Tensor, offsets: Tensor,
             dtype: torch.dtype) -> Tensor:
    """The slots ``(blocks[i], offsets[i])`` of an FP8 cache, dequantized to ``dtype``:
    (N, nh, hd)."""
    xq = cache.view(torch.uint8)[blocks, :, offsets].view(cache.dtype)  # (N, nh, hd)
    return dequantize_rows(xq, scales[blocks, :, offsets][..., None], dtype)


def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of one whole sequence over itself; all (L, nh, hd)."""
    # 4-D (1, nh, L, hd): the fused (flash / memory-efficient) kernels only take 4-D inputs.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True,
    )
    return out[0].transpose(0, 1)  # (L, nh, hd)


def _dequantized(x: Tensor, scale: Tensor | None) -> Tensor:
    """fp32 values of gathered cache entries (..., hd); ``scale`` (...,) per token and head."""
    return x.float() if scale is None else x.float() * scale[..., None]


def _check_scales(k_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    if (k_scale is None) != (v_scale is None):
        raise ValueError("paged decode: give both k_scale and v_scale, or neither")
    if k_scale is None:
        if k_cache.dtype == torch.float8_e4m3fn:
            raise ValueError("paged decode: an fp8 cache needs k_scale and v_scale")
        return
    assert v_scale is not None
    if k_scale.shape != k_cache.shape[:3] or v_scale.shape != k_cache.shape[:3]:
        raise ValueError(f"paged decode: scales must be (blocks, heads, block_size) = "
                         f"{tuple(k_cache.shape[:3])}, got {tuple(k_scale.shape)} and "
                         f"{tuple(v_scale.shape)}")
    if k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32:
        raise ValueError("paged decode: scales must be float32")


def paged_decode_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
) -> Tensor:
    """One query per sequence against its paged context, in plain torch (fp32 math).

    q: (D, nh, hd); caches: (blocks, nh, block_size, hd); block_tables: (D, W);
    context_lens: (D,). Columns of ``block_tables`` past a sequence's length are ignored.
    An fp8 (``float8_e4m3fn``) cache comes with float32 ``k_scale``/``v_scale`` of shape
    (blocks, nh, block_size): a cached value is its fp8 number times its token's scale.
    """
    _check_scales(k_cache, k_scale, v_scale)
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    w = block_tables.shape[1]
    ks = None if k_scale is None else k_scale[block_tables]  # (D, W, nh, bs)
    vs = None if v_scale is None else v_scale[block_tables]
    k = _dequantized(k_cache[block_tables], ks)  # (D, W, nh, bs, hd)
    v = _dequantized(v_cache[block_tables], vs)
    k = k.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd)  # (D, nh, T, hd)
    v = v.permute(0, 2, 1, 3, 4).reshape(d, nh, w * bs, hd)
    scores = torch.einsum("dhe,dhte->dht", q.float(), k) / math.sqrt(hd)  # (D, nh, T)
    valid = torch.arange(w * bs, device=q.device)[None, :] < context_lens[:, None]  # (D, T)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("dht,dhte->dhe", probs, v).to(q.dtype)  # (D, nh, hd)


# --------------------------------------------------------------------------------------
# Triton decode kernel (CUDA, or CPU under TRITON_INTERPRET=1; triton is imported on
# first use)
# --------------------------------------------------------------------------------------
#
# Decode is bound by reading the cache: each query reads its sequence's K and V once.
# Reaching the card's bandwidth needs enough loads in flight on every SM, all the time:
#
# * Many small resident programs, loads ahead of the math: one-warp programs (every
#   reduction stays inside the warp: no shared memory, no barriers), the loop's K/V loads
#   pipelined through shared memory (num_stages) or prefetched into registers a tile
#   ahead (see DECODE_CONFIGS).
# * Split-KV (flash-decoding): each sequence's context is cut into ``num_splits`` equal
#   parts, one program each, writing a partial (output, log-sum-exp) that a small merge
#   kernel combines. A batch of 90 sequences x 64 heads is ~5,800 programs of very
#   different lengths; split, the work comes in even pieces and the last wave is short.
#   The part size is computed in the kernel from the sequence's length, so the grid
#   depends only on the batch and the split count: a CUDA graph captured once replays
#   correctly whatever the context lengths (a part past the end writes a neutral
#   partial). Large batches of short contexts fill the card unsplit.
# * Per-lane softmax state (``lanes``): each of a tile's token lanes keeps its own
#   running max, sum and output row, merged once at the end. The loop then has no
#   reduction across the tile's tokens (those cross warps, through shared memory and a
#   barrier per iteration); only the q.k dot reduces, along the head dim, inside a warp.
#   Its accumulators cost registers, though; one-warp programs get the same (every
#   reduction inside the warp) with tile-wide state. The tuner times both forms.
# * Config per shape class: the tuner times every candidate at a few batch sizes with
#   short and long contexts and keeps the best per class (see tune_decode_kernel).


class DecodeConfig(NamedTuple):
    """A compiled variant of the decode kernel."""

    tile: int  # tokens per loop iteration (a power of two)
    num_warps: int
    num_stages: int  # software-pipelining depth of the loop
    heads_per_program: int  # adjacent heads sharing one program's address math
    lanes: bool  # per-lane softmax state (else tile-wide reductions every iteration)
    prefetch: bool = False  # loads one tile ahead of the math
    split_hd: bool = False  # head dim as two power-of-two parts (96 = 64 + 32), not padded


class DecodeChoice(NamedTuple):
    """A kernel variant and how many parts each sequence's context is split into."""

    config: DecodeConfig
    splits: int


_KERNELS = None


def _build_kernels():  # noqa: ANN202 - returns two triton JIT functions
    import triton
    import triton.language as tl

    # num_splits is a runtime value inside the kernel (one compile serves every split
    # count; the branch on it is uniform across the program).
    @triton.jit(do_not_specialize=["num_splits", "num_parts"])
    def paged_decode_kernel(
        out_ptr, part_o_ptr, part_lse_ptr,
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, ctx_ptr, start_ptr,
        scale_log2, num_splits, num_parts,
        stride_qn, stride_qh, stride_on, stride_oh,
        stride_kb, stride_kh, stride_kt, stride_sb, stride_sh,
        stride_bt,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HD_A: tl.constexpr,
        HD_B: tl.constexpr, HD_B_ALLOC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr, NUM_STAGES: tl.constexpr, HPP: tl.constexpr,
        LANES: tl.constexpr, PREFETCH: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_START: tl.constexpr,
    ):
        # One program per (HPP heads, sequence, part of its context). With HPP > 1 the
        # block-table loads and address math are shared by the heads. The head group is
        # the fastest-varying grid index, so programs start sequence by sequence.
        #
        # The head dim is covered by one padded, masked power of two (masked lanes issue
        # no memory requests: the padding costs issue slots, not bandwidth) or by two
        # power-of-two parts HD_A + HD_B (96 = 64 + 32), which costs a register-layout
        # conversion (through shared memory) per tile.
        heads = tl.program_id(0) * HPP + tl.arange(0, HPP)
        seq = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        ctx = tl.load(ctx_ptr + seq)
        # Positions lo..ctx-1 (lo > 0: a cascade step computed the shared prefix apart).
        lo = 0
        if HAS_START:
            lo = tl.load(start_ptr + seq)
        # This part: the context cut into num_splits pieces of whole tiles.
        part = tl.cdiv(tl.cdiv(tl.maximum(ctx - lo, 0), num_splits), TILE) * TILE
        start = lo + split * part
        end = tl.minimum(ctx, start + part)
        da = tl.arange(0, HD_A)
        amask = da < HEAD_DIM
        a_cols = da[None, None, :]
        a_mask = amask[None, None, :]
        db = HD_A + tl.arange(0, HD_B_ALLOC)
        b_cols = db[None, None, :]
        q_rows = q_ptr + seq * stride_qn + heads[:, None] * stride_qh  # (HPP, 1)
        # Fold 1/sqrt(hd) and log2(e) into q so the loop uses exp2.
        qa = tl.load(q_rows + da[None, :], mask=amask[None, :], other=0.0)
        qa = qa.to(tl.float32) * scale_log2  # (HPP, HD_A)
        acc_b = tl.zeros([HPP, HD_B_ALLOC], tl.float32)  # unused when HD_B == 0
        qb = acc_b
        if HD_B > 0:
            qb = tl.load(q_rows + db[None, :]).to(tl.float32) * scale_log2
        t = tl.arange(0, TILE)
        bt_row = bt_ptr + seq * stride_bt
        head_off = heads.to(tl.int64) * stride_kh  # (HPP,)
        scale_head = heads.to(tl.int64) * stride_sh  # (HPP,)
        if LANES:
            # Per-lane state. Lanes that never see a valid token keep a finite max so
            # that exp2(max - new max) never computes -inf - -inf.
            m_l = tl.full([TILE, HPP], -1e30, tl.float32)
            l_l = tl.zeros([TILE, HPP], tl.float32)
            acc3 = tl.zeros([TILE, HPP, HD_A], tl.float32)
            acc3b = tl.zeros([TILE, HPP, HD_B_ALLOC], tl.float32)
        else:
            m_i = tl.full([HPP], -float("inf"), tl.float32)  # running max (log2 domain)
            l_i = tl.zeros([HPP], tl.float32)  # softmax denominator
            acc_a = tl.zeros([HPP, HD_A], tl.float32)
        if PREFETCH:
            # Loads run one tile ahead of the math (block ids two): each iteration
            # issues tile i+1's K/V from ids already in registers, then computes tile i,
            # so a warp always has a tile's loads in flight.
            pos = start + t
            valid = pos < end
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            off = (pos % BLOCK_SIZE).to(tl.int64)
            base = (blk * stride_kb + off * stride_kt)[:, None, None] \
                + head_off[None, :, None]  # (TILE, HPP, 1)
            vmask = valid[:, None, None]
            ka = tl.load(k_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
            va = tl.load(v_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
            if HD_B > 0:
                kb = tl.load(k_ptr + base + b_cols, mask=vmask, other=0.0)
                vb = tl.load(v_ptr + base + b_cols, mask=vmask, other=0.0)
            ksc = 1.0
            vsc = 1.0
            if HAS_SCALE:
                srow = (blk * stride_sb + off)[:, None] + scale_head[None, :]
                ksc = tl.load(ks_ptr + srow, mask=valid[:, None], other=0.0)
                vsc = tl.load(vs_ptr + srow, mask=valid[:, None], other=0.0)
            blk = tl.load(bt_row + (pos + TILE) // BLOCK_SIZE, mask=pos + TILE < end,
                          other=0).to(tl.int64)
        # num_stages > 1 lets the compiler software-pipeline the loop.
        for s0 in tl.range(start, end, TILE, num_stages=NUM_STAGES):
            if PREFETCH:
                c_valid = valid
                c_ka = ka
                c_va = va
                c_ks = ksc
                c_vs = vsc
                if HD_B > 0:
                    c_kb = kb
                    c_vb = vb
                pos = s0 + TILE + t
                valid = pos < end
                off = (pos % BLOCK_SIZE).to(tl.int64)
                base = (blk * stride_kb + off * stride_kt)[:, None, None] \
                    + head_off[None, :, None]
                vmask = valid[:, None, None]
                ka = tl.load(k_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
                va = tl.load(v_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
                if HD_B > 0:
                    kb = tl.load(k_ptr + base + b_cols, mask=vmask, other=0.0)
                    vb = tl.load(v_ptr + base + b_cols, mask=vmask, other=0.0)
                if HAS_SCALE:
                    srow = (blk * stride_sb + off)[:, None] + scale_head[None, :]
                    ksc = tl.load(ks_ptr + srow, mask=valid[:, None], other=0.0)
                    vsc = tl.load(vs_ptr + srow, mask=valid[:, None], other=0.0)
                blk = tl.load(bt_row + (pos + TILE) // BLOCK_SIZE, mask=pos + TILE < end,
                              other=0).to(tl.int64)
            else:
                pos = s0 + t
                c_valid = pos < end
                blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=c_valid, other=0)
                blk = blk.to(tl.int64)
                off = (pos % BLOCK_SIZE).to(tl.int64)
                base = (blk * stride_kb + off * stride_kt)[:, None, None] \
                    + head_off[None, :, None]  # (TILE, HPP, 1)
                vmask = c_valid[:, None, None]
                # K and V are both issued before any math: V does not depend on the
                # scores.
                c_ka = tl.load(k_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
                c_va = tl.load(v_ptr + base + a_cols, mask=vmask & a_mask, other=0.0)
                if HD_B > 0:
                    c_kb = tl.load(k_ptr + base + b_cols, mask=vmask, other=0.0)
                    c_vb = tl.load(v_ptr + base + b_cols, mask=vmask, other=0.0)
                c_ks = 1.0
                c_vs = 1.0
                if HAS_SCALE:
                    srow = (blk * stride_sb + off)[:, None] + scale_head[None, :]
                    c_ks = tl.load(ks_ptr + srow, mask=c_valid[:, None], other=0.0)
                    c_vs = tl.load(vs_ptr + srow, mask=c_valid[:, None], other=0.0)
            s = tl.sum(c_ka.to(tl.float32) * qa[None, :, :], axis=2)  # (TILE, HPP)
            if HD_B > 0:
                s += tl.sum(c_kb.to(tl.float32) * qb[None, :, :], axis=2)
            if HAS_SCALE:
                s = s * c_ks
            s = tl.where(c_valid[:, None], s, float("-inf"))
            if LANES:
                m_new = tl.maximum(m_l, s)
                alpha = tl.exp2(m_l - m_new)
                p = tl.exp2(s - m_new)  # (TILE, HPP)
                l_l = l_l * alpha + p
                if HAS_SCALE:
                    p = p * c_vs
                acc3 = acc3 * alpha[:, :, None] + p[:, :, None] * c_va.to(tl.float32)
                if HD_B > 0:
                    acc3b = acc3b * alpha[:, :, None] + p[:, :, None] * c_vb.to(tl.float32)
                m_l = m_new
            else:
                m_new = tl.maximum(m_i, tl.max(s, axis=0))  # (HPP,)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[None, :])  # (TILE, HPP)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                if HAS_SCALE:
                    p = p * c_vs
                acc_a = acc_a * alpha[:, None] + tl.sum(
                    p[:, :, None] * c_va.to(tl.float32), axis=0)
                if HD_B > 0:
                    acc_b = acc_b * alpha[:, None] + tl.sum(
                        p[:, :, None] * c_vb.to(tl.float32), axis=0)
                m_i = m_new
        if LANES:
            m_i = tl.max(m_l, axis=0)  # (HPP,)
            w = tl.exp2(m_l - m_i[None, :])  # (TILE, HPP)
            l_i = tl.sum(l_l * w, axis=0)
            acc_a = tl.sum(acc3 * w[:, :, None], axis=0)  # (HPP, HD_A)
            if HD_B > 0:
                acc_b = tl.sum(acc3b * w[:, :, None], axis=0)
        # An empty part (it starts past the end: short sequences, or the padding rows of
        # a CUDA-graph batch) has l_i == 0: output 0 with log-sum-exp -inf, which the
        # merge weighs 0.
        nonempty = l_i > 0
        l_safe = tl.where(nonempty, l_i, 1.0)
        o_a = acc_a / l_safe[:, None]
        o_b = acc_b / l_safe[:, None]
        if num_parts == 1:
            o_rows = out_ptr + seq * stride_on + heads[:, None] * stride_oh
            tl.store(o_rows + da[None, :], o_a.to(out_ptr.dtype.element_ty),
                     mask=amask[None, :])
            if HD_B > 0:
                tl.store(o_rows + db[None, :], o_b.to(out_ptr.dtype.element_ty))
        else:
            lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))  # (HPP,)
            prow = (seq * NUM_HEADS + heads) * num_parts + split  # (HPP,)
            tl.store(part_lse_ptr + prow, lse)
            p_rows = part_o_ptr + prow[:, None] * HEAD_DIM
            tl.store(p_rows + da[None, :], o_a, mask=amask[None, :])
            if HD_B > 0:
                tl.store(p_rows + db[None, :], o_b)

    @triton.jit
    def merge_kernel(
        out_ptr, part_o_ptr, part_lse_ptr, num_splits, stride_on, stride_oh,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HD_P: tl.constexpr,
        S_P: tl.constexpr, RH: tl.constexpr,
    ):
        # One program per (sequence, RH heads): the parts' outputs weighted by
        # exp2(lse - max lse), normalised by the weights' sum.
        seq = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * RH + tl.arange(0, RH)
        sp = tl.arange(0, S_P)
        smask = sp < num_splits
        prow = (seq * NUM_HEADS + heads[:, None]) * num_splits + sp[None, :]  # (RH, S_P)
        lse = tl.load(part_lse_ptr + prow, mask=smask[None, :], other=float("-inf"))
        mx = tl.max(lse, axis=1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # all parts empty: output 0
        w = tl.exp2(lse - mx[:, None])  # (RH, S_P)
        den = tl.sum(w, axis=1)
        den = tl.where(den > 0, den, 1.0)
        d = tl.arange(0, HD_P)
        dmask = d < HEAD_DIM
        # Empty parts (weight 0) are not read: a caller's unused slots hold no output.
        o = tl.load(part_o_ptr + prow[:, :, None] * HEAD_DIM + d[None, None, :],
                    mask=(smask[None, :] & (lse > float("-inf")))[:, :, None]
                    & dmask[None, None, :], other=0.0)
        res = tl.sum(o * w[:, :, None], axis=1) / den[:, None]  # (RH, HD_P)
        o_rows = out_ptr + seq * stride_on + heads[:, None] * stride_oh
        tl.store(o_rows + d[None, :], res.to(out_ptr.dtype.element_ty), mask=dmask[None, :])

    return paged_decode_kernel, merge_kernel


def decode_kernels():  # noqa: ANN201 - two triton JIT functions
    """The Triton JIT functions (decode kernel, merge kernel), built on first use."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    return _KERNELS


def decode_constexprs(num_heads: int, head_dim: int, block_size: int, config: DecodeConfig,
                      has_scale: bool, has_start: bool = False) -> dict[str, int | bool]:
    """The decode kernel's compile-time arguments for a shape and ``config``. The head
    dim is one padded power of two, or two parts when ``config.split_hd``; a
    ``heads_per_program`` that is not a power of two dividing ``num_heads`` becomes 1.
    ``has_start``: per-sequence first positions (cascade decode)."""
    if config.split_hd:
        hd_a, hd_b = _split_head_dim(head_dim)
    else:
        hd_a, hd_b = max(16, _pow2_at_least(head_dim)), 0
    hpp = config.heads_per_program
    if hpp < 1 or hpp & (hpp - 1) or num_heads % hpp:
        hpp = 1
    return {"NUM_HEADS": num_heads, "HEAD_DIM": head_dim, "HD_A": hd_a, "HD_B": hd_b,
            "HD_B_ALLOC": max(hd_b, 16), "BLOCK_SIZE": block_size,
            "TILE": max(config.tile, 1), "NUM_STAGES": config.num_stages, "HPP": hpp,
            "LANES": bool(config.lanes), "PREFETCH": bool(config.prefetch),
            "HAS_SCALE": has_scale, "HAS_START": has_start}


def merge_constexprs(num_heads: int, head_dim: int, splits: int) -> dict[str, int]:
    """The merge kernel's compile-time arguments: RH heads per program (a power of two
    dividing ``num_heads``, at most 16 partials a program)."""
    s_p = _pow2_at_least(splits)
    rh = 1
    while rh * 2 * s_p <= 16 and num_heads % (rh * 2) == 0:
        rh *= 2
    return {"NUM_HEADS": num_heads, "HEAD_DIM": head_dim,
            "HD_P": max(16, _pow2_at_least(head_dim)), "S_P": s_p, "RH": rh}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _split_head_dim(hd: int) -> tuple[int, int]:
    """(HD_A, HD_B): hd = HD_A + HD_B with both powers of two (HD_B may be 0, HD_B >= 16
    so a load row stays >= 32 bytes), else (padded power of two, 0)."""
    a = 1 << (hd.bit_length() - 1)
    b = hd - a
    if a >= 16 and (b == 0 or (b >= 16 and b & (b - 1) == 0)):
        return a, b
    return max(16, _pow2_at_least(hd)), 0


# The candidates the tuner times, in the order they are compiled and checked (if that
# takes half the tuner's time budget, the rest are left out). A decode program is a chain
# of dependent loads; what reaches the bandwidth is enough bytes in flight per SM: many
# small resident programs, and loads issued ahead of the math. ptxas for sm_90 at the
# 20B's shape (bf16): one-warp programs of 8-16 tokens take 64-88 registers, 23-32
# resident per SM, with no barriers (every reduction stays in the warp); num_stages 2-3
# pipelines the K/V loads through shared memory (cp.async, ~8 KB a stage for 16 tokens);
# the first kernel's default (64 tokens, 4 warps) takes 124 registers, 4 per SM.
DECODE_CONFIGS: tuple[DecodeConfig, ...] = (
    DecodeConfig(16, 1, 3, 1, False),
    DecodeConfig(8, 1, 3, 1, False),
    DecodeConfig(16, 1, 1, 1, False),
    DecodeConfig(16, 2, 3, 1, False),
    DecodeConfig(8, 1, 1, 1, False),
    DecodeConfig(32, 1, 2, 1, False),
    DecodeConfig(8, 1, 1, 1, False, prefetch=True),
    DecodeConfig(32, 4, 3, 1, False),
    DecodeConfig(16, 1, 2, 1, False),
    DecodeConfig(8, 1, 1, 2, False),
    DecodeConfig(32, 1, 1, 1, False),
    DecodeConfig(16, 1, 3, 2, False),
    DecodeConfig(16, 4, 1, 1, True),
    DecodeConfig(32, 4, 1, 1, False, split_hd=True),
    DecodeConfig(64, 4, 1, 1, False, split_hd=True),
)
DECODE_SPLITS: tuple[int, ...] = (1, 2, 4, 8, 16)
# What an untuned shape runs: the first kernel's default (tile-wide reductions, unsplit).
DEFAULT_CHOICE = DecodeChoice(DecodeConfig(64, 4, 1, 1, False, split_hd=True), 1)

# Shape classes. A step's batch maps to the nearest tuned batch size (log scale); its
# context class comes from the block-table width, the one static bound on its lengths:
# a CUDA-graph step's tables span the whole model context, so graph steps are "any".
TUNE_BATCHES: tuple[int, ...] = (8, 32, 96, 256)
SHORT_CONTEXT = 512  # tables of at most this many tokens are the "short" class
# Ragged contexts the tuner times each batch size at: (longest, shortest) per class.
TUNE_CONTEXTS = {"short": (256, 128), "long": (1536, 96)}

# (heads, head_dim, block_size, cache dtype) -> {(tuned batch, "short" | "any"): choice}
_TUNED: dict[tuple[int, int, int, torch.dtype], dict[tuple[int, str], DecodeChoice]] = {}


def decode_choice(num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  batch: int, max_context: int) -> DecodeChoice:
    """The kernel config and split count a step of ``batch`` sequences whose block
    tables cover ``max_context`` tokens runs with (the tuner's pick for its class, else
    :data:`DEFAULT_CHOICE`). ``dtype`` is the cache's."""
    table = _TUNED.get((num_heads, head_dim, block_size, dtype))
    if not table:
        return DEFAULT_CHOICE
    b = min({x for x, _ in table}, key=lambda x: abs(math.log(x / max(1, batch))))
    return table[(b, "short" if max_context <= SHORT_CONTEXT else "any")]


def paged_decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    config: DecodeConfig | None = None, num_splits: int | None = None,
    starts: Tensor | None = None, parts: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The Triton version of :func:`paged_decode_torch` (same arguments, CUDA tensors, or
    CPU ones under ``TRITON_INTERPRET=1``).

    Cascade decode (:func:`cascade_decode_triton`) adds two things: ``starts`` (D,)
    int64, the first context position each query attends to (default 0); ``parts``,
    caller-owned split-KV partial buffers (outputs (D, nh, S, hd) and log2-sum-exp
    (D, nh, S), float32, S >= ``num_splits``) whose slots past ``num_splits`` the
    caller has filled with other partials of the same queries: they merge into the
    result.

    Every ``context_lens[i]`` must be >= 1. fp32 accumulation whatever the cache dtype;
    an fp8 cache is read as fp8 and scaled in registers. ``config`` (a compiled kernel
    variant) and ``num_splits`` (parts per sequence, merged by a second kernel) default
    to :func:`decode_choice` for this step's shape. The launch depends only on shapes,
    so the call can be captured in a CUDA graph and replayed with other lengths/tables.
    """
    kernel, merge = decode_kernels()
    _check_scales(k_cache, k_scale, v_scale)
    d, nh, hd = q.shape
    bs = k_cache.shape[2]
    if config is None or num_splits is None:
        pick = decode_choice(nh, hd, bs, k_cache.dtype, d, block_tables.shape[1] * bs)
        config = pick.config if config is None else config
        num_splits = pick.splits if num_splits is None else num_splits
    consts = decode_constexprs(nh, hd, bs, config, k_scale is not None, starts is not None)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("paged_decode_triton: q and the caches need a contiguous last dim")
    out = torch.empty(d, nh, hd, dtype=q.dtype, device=q.device)
    if d == 0:
        return out
    splits = max(1, int(num_splits))
    num_parts = splits
    if parts is not None:
        num_parts = parts[1].shape[2]
        if num_parts < splits or parts[0].shape != (d, nh, num_parts, hd) \
                or not (parts[0].is_contiguous() and parts[1].is_contiguous()):
            raise ValueError("paged_decode_triton: parts must be contiguous (D, nh, S, hd) "
                             "and (D, nh, S) with S >= num_splits")
    if k_scale is not None:
        assert v_scale is not None
        if k_scale.stride() != v_scale.stride() or k_scale.stride(2) != 1:
            raise ValueError("paged_decode_triton: k_scale and v_scale need one layout "
                             "with tokens contiguous")
        ks, vs, s_strides = k_scale, v_scale, (k_scale.stride(0), k_scale.stride(1))
    else:
        ks, vs, s_strides = out, out, (0, 0)  # never read
    # Partials are only written when split; unsplit calls still pass fp32 buffers so
    # that both run the same compiled kernel (pointer types are part of its signature).
    part_o = part_lse = torch.empty(16, dtype=torch.float32, device=q.device)
    if parts is not None:
        part_o, part_lse = parts
    elif splits > 1:
        part_o = torch.empty(d, nh, splits, hd, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(d, nh, splits, dtype=torch.float32, device=q.device)
    kernel[(nh // consts["HPP"], d, splits)](
        out, part_o, part_lse,
        q, k_cache, v_cache, ks, vs, block_tables, context_lens,
        context_lens if starts is None else starts,
        (1.0 / math.sqrt(hd)) * 1.4426950408889634, splits, num_parts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *s_strides,
        block_tables.stride(0),
        **consts, num_warps=config.num_warps,
    )
    if num_parts > 1:
        m_consts = merge_constexprs(nh, hd, num_parts)
        merge[(d, nh // m_consts["RH"])](
            out, part_o, part_lse, num_parts, out.stride(0), out.stride(1), **m_consts,
            num_warps=4,
        )
    return out


def cascade_decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    meta: CascadeMetadata, *, k_scale: Tensor | None = None, v_scale: Tensor | None = None,
    config: DecodeConfig | None = None, num_splits: int | None = None,
    cascade_config: CascadeConfig | None = None,
) -> Tensor:
    """:func:`paged_decode_triton` with groups of queries sharing a prefix
    (:mod:`models.cascade`): the prefix pass writes each member's prefix partial into
    extra split-KV slots, the decode kernel covers positions ``meta.starts[i]..`` into
    the others, and its merge combines them. Same arguments and result (up to fp32
    rounding), plus ``meta``; graph-capturable like the plain kernel. ``cascade_config``
    defaults to :func:`models.cascade.cascade_choice` for the shape."""
    _check_scales(k_cache, k_scale, v_scale)
    d, nh, hd = q.shape
    if cascade_config is None:
        cascade_config = cascade_choice(nh, hd, k_cache.shape[2], k_cache.dtype)
    if config is None or num_splits is None:
        pick = decode_choice(nh, hd, k_cache.shape[2], k_cache.dtype, d,
                             block_tables.shape[1] * k_cache.shape[2])
        config = pick.config if config is None else config
        num_splits = pick.splits if num_splits is None else num_splits
    splits = max(1, int(num_splits))
    slots = splits + cascade_config.prefix_splits
    part_o = torch.empty(d, nh, slots, hd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(d, nh, slots, dtype=torch.float32, device=q.device)
    part_lse[:, :, splits:] = float("-inf")  # rows outside every group: no prefix part
    prefix_partials_triton(part_o, part_lse, splits, q, k_cache, v_cache, block_tables,
                           context_lens, meta, k_scale=k_scale, v_scale=v_scale,
                           config=cascade_config)
    return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens,
                               k_scale=k_scale, v_scale=v_scale, config=config,
                               num_splits=splits, starts=meta.starts,
                               parts=(part_o, part_lse))


def _gpu_time(fn: Callable[[], object], reps: int) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA device, replayed from a CUDA
    graph as the engine runs decode (so small shapes are timed without launch
    overhead); a plain loop if capture fails."""
    fn()
    torch.cuda.synchronize()
    run: Callable[[], object]
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        run, per_run = graph.replay, reps
    except Exception:  # noqa: BLE001 - capture refused: time launches instead
        torch.cuda.synchronize()
        run, per_run = fn, 1
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    n = reps // per_run
    start.record()
    for _ in range(max(1, n)):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / max(1, n) / per_run


def _random_cache(blocks: int, num_heads: int, block_size: int, head_dim: int,
                  dtype: torch.dtype, g: torch.Generator,
                  device: torch.device | str) -> tuple[Tensor, ...]:
    """(K, V, K scales, V scales) with random contents; the scales are None unless
    ``dtype`` is fp8."""
    shape = (blocks, num_heads, block_size, head_dim)
    kc = torch.randn(shape, generator=g, device=device)
    vc = torch.randn(shape, generator=g, device=device)
    if dtype != torch.float8_e4m3fn:
        return kc.to(dtype), vc.to(dtype), None, None
    ks = torch.rand(shape[:3], generator=g, device=device) / 100 + 1e-3
    vs = torch.rand(shape[:3], generator=g, device=device) / 100 + 1e-3
    return kc.mul(50).to(dtype), vc.mul(50).to(dtype), ks, vs


def tune_decode_kernel(
    num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str, *, query_dtype: torch.dtype | None = None,
    configs: tuple[DecodeConfig, ...] = DECODE_CONFIGS,
    splits: tuple[int, ...] = DECODE_SPLITS, batches: tuple[int, ...] = TUNE_BATCHES,
    pool_bytes: int = 1 << 30, budget_s: float = 25.0,
) -> dict[str, DecodeChoice]:
    """Time the decode kernel's candidate configs and split counts at this shape and
    remember the best per shape class; later calls at the shape use them.

    ``dtype`` is the cache's (fp8 caches get scales); ``query_dtype`` the model's
    (default: ``dtype``, bf16 for fp8). Each candidate first runs a small case against
    :func:`paged_decode_torch`, split and unsplit: one that fails to compile or disagrees
    (a miscompiled pipelined loop) is never picked. Then every batch size in ``batches``
    is timed with short and long ragged contexts (:data:`TUNE_CONTEXTS`, block tables
    shuffled over a pool of ``pool_bytes``, far larger than L2). Per batch size the
    "short" class takes the fastest at short contexts; the "any" class (CUDA-graph steps,
    whose tables span the whole model context) the candidate whose worse ratio to the
    best, over short and long, is smallest. Compiling stops adding candidates after half
    of ``budget_s`` seconds, timing at all of it (largest batches first). Returns the
    picks by class name; a shape already tuned returns at once.
    """
    key = (num_heads, head_dim, block_size, dtype)
    if key in _TUNED:
        return _describe(_TUNED[key])
    t_start = time.monotonic()
    if query_dtype is None:
        query_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    g = torch.Generator(device=device).manual_seed(0)
    # Correctness case: ragged lengths from 1 to several blocks, split parts past the end.
    n_chk, w_chk = 6, 9
    kc, vc, ks, vs = _random_cache(n_chk * w_chk + 1, num_heads, block_size, head_dim, dtype,
                                   g, device)
    q = torch.randn(n_chk, num_heads, head_dim, generator=g, device=device).to(query_dtype)
    # 16 columns (padding past 9): the engine's tables are a multiple of 16 wide, and
    # triton compiles a variant per divisibility of the row stride.
    tables = torch.zeros(n_chk, 16, dtype=torch.int64, device=device)
    tables[:, :w_chk] = (torch.randperm(n_chk * w_chk, generator=g, device=device) + 1
                         ).view(n_chk, w_chk)
    full = w_chk * block_size
    ctx = torch.tensor([full, 1, block_size, block_size + 1, full - 3, 2 * block_size + 5],
                       device=device)
    ref = paged_decode_torch(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs).float()
    tol = 1e-3 if query_dtype == torch.float32 else 3e-2
    good: list[DecodeConfig] = []
    for cfg in configs:
        if good and time.monotonic() - t_start > budget_s / 2:
            break  # leave the other half of the budget to timing
        try:
            ok = all(
                (paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs,
                                     config=cfg, num_splits=s).float() - ref).abs().max().item()
                <= tol
                for s in (1, 4))
        except Exception:  # noqa: BLE001 - e.g. out of registers/shared memory
            ok = False
        if ok:
            good.append(cfg)
    del kc, vc, ks, vs
    times = _time_candidates(good, splits, batches, num_heads, head_dim, block_size, dtype,
                             query_dtype, device, g, pool_bytes, t_start + budget_s)
    picks = choose_per_class(times, batches)
    register_decode_choices(num_heads, head_dim, block_size, dtype, picks)
    return _describe(picks)


def choose_per_class(times: dict[tuple[int, str], dict[DecodeChoice, float]],
                     batches: tuple[int, ...]) -> dict[tuple[int, str], DecodeChoice]:
    """The pick per class from timings ``{(batch, "short" | "long"): {choice: ms}}``:
    ``(batch, "short")`` the fastest at short contexts; ``(batch, "any")`` the choice
    whose larger ratio to the best (short and long) is smallest. A class without
    timings gets the other's pick; a batch size without any is left out (steps of that
    size then use the nearest one's)."""
    picks: dict[tuple[int, str], DecodeChoice] = {}
    for b in batches:
        short, long = times.get((b, "short"), {}), times.get((b, "long"), {})
        if not short and not long:
            continue
        if short:
            picks[(b, "short")] = min(short, key=short.__getitem__)
        both = [c for c in short if c in long]
        if both:
            best_s, best_l = min(short.values()), min(long.values())
            picks[(b, "any")] = min(both, key=lambda c: max(short[c] / best_s,
                                                            long[c] / best_l))
        elif long:
            picks[(b, "any")] = min(long, key=long.__getitem__)
        if (b, "any") not in picks:  # no long timings, so short ones
            picks[(b, "any")] = picks[(b, "short")]
        picks.setdefault((b, "short"), picks[(b, "any")])
    return picks


def register_decode_choices(num_heads: int, head_dim: int, block_size: int,
                            dtype: torch.dtype,
                            picks: dict[tuple[int, str], DecodeChoice]) -> None:
    """Make ``picks`` (``{(batch, "short" | "any"): choice}``) what
    :func:`decode_choice` answers for this shape and cache dtype."""
    _TUNED[(num_heads, head_dim, block_size, dtype)] = dict(picks)


def _describe(picks: dict[tuple[int, str], DecodeChoice]) -> dict[str, DecodeChoice]:
    return {f"batch~{b}/{c}": choice for (b, c), choice in sorted(picks.items())}


def _time_candidates(
    configs: list[DecodeConfig], splits: tuple[int, ...], batches: tuple[int, ...],
    num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    query_dtype: torch.dtype, device: torch.device | str, g: torch.Generator,
    pool_bytes: int, deadline: float,
) -> dict[tuple[int, str], dict[DecodeChoice, float]]:
    """Milliseconds per call of every (config, split count) at every (batch, context
    profile); stops measuring at ``deadline`` (``time.monotonic``)."""
    # A pool of blocks shared by every shape (tables drawn with replacement).
    elem = torch.empty((), dtype=dtype).element_size()
    pool = max(64, pool_bytes // (2 * num_heads * block_size * head_dim * elem))
    kc, vc, ks, vs = _random_cache(pool, num_heads, block_size, head_dim, dtype, g, device)
    times: dict[tuple[int, str], dict[DecodeChoice, float]] = {}
    # Largest first: if the deadline cuts timing short, the big batches (where the
    # choice matters most) have been measured.
    for b in sorted(batches, reverse=True):
        for name, (longest, shortest) in TUNE_CONTEXTS.items():
            w = math.ceil(longest / block_size)
            tables = torch.randint(1, pool, (b, w), generator=g, device=device)
            # Mixed lengths (as in a real batch), longest first like the engine sorts them.
            ctx = torch.linspace(longest, shortest, b, device=device).long()
            q = torch.randn(b, num_heads, head_dim, generator=g, device=device).to(query_dtype)
            row = times.setdefault((b, name), {})
            for cfg in configs:
                for s in splits:
                    if time.monotonic() > deadline:
                        return times
                    row[DecodeChoice(cfg, s)] = _gpu_time(
                        lambda cfg=cfg, s=s, tables=tables, ctx=ctx, q=q: paged_decode_triton(
                            q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs, config=cfg,
                            num_splits=s),
                        reps=5)
    return times
