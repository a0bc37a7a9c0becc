"""Triton kernels of :mod:`models.fused` (imported only where they run)."""

import triton
import triton.language as tl


@triton.jit
def _rotated(x, xp, c, s, sign, rm):
    # As torch computes it: each product rounded to the dtype, then their sum.
    ty = x.dtype
    a = (x.to(tl.float32) * c[None, :]).to(ty).to(tl.float32)
    b = ((xp.to(tl.float32) * sign[None, :]) * s[None, :]).to(ty).to(tl.float32)
    return tl.where(rm[None, :], (a + b).to(ty), x)


@triton.jit
def split_rotate_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                        kc_ptr, vc_ptr, blocks_ptr, offsets_ptr, NH,
                        stride_n, stride_h, stride_w, stride_cos,
                        stride_cb, stride_ch, stride_ct,
                        HEAD_DIM: tl.constexpr, HD_P2: tl.constexpr, ROT: tl.constexpr,
                        HB: tl.constexpr, KV_OUT: tl.constexpr, STORE: tl.constexpr):
    # One program per (token, HB heads): read q, k, v once; rotate q and k. KV_OUT: write
    # contiguous k and v; STORE: write them at the token's slot of the paged caches.
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    d = tl.arange(0, HD_P2)
    m = (h < NH)[:, None] & (d < HEAD_DIM)[None, :]
    half = ROT // 2
    rm = d < ROT
    # Rotate-half: channel d < half takes -x[d + half], channel half <= d < ROT
    # takes x[d - half]; the rest pass through.
    partner = tl.where(d < half, d + half, tl.where(rm, d - half, d))
    sign = tl.where(d < half, -1.0, 1.0)
    c = tl.load(cos_ptr + n * stride_cos + d, mask=rm, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + n * stride_cos + d, mask=rm, other=0.0).to(tl.float32)
    row = qkv_ptr + n * stride_n + h[:, None].to(tl.int64) * stride_h
    out = n * NH * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :]
    x = tl.load(row + d[None, :], mask=m, other=0.0)
    xp = tl.load(row + partner[None, :], mask=m, other=0.0)
    tl.store(q_ptr + out, _rotated(x, xp, c, s, sign, rm), mask=m)
    x = tl.load(row + stride_w + d[None, :], mask=m, other=0.0)
    xp = tl.load(row + stride_w + partner[None, :], mask=m, other=0.0)
    k = _rotated(x, xp, c, s, sign, rm)
    v = tl.load(row + 2 * stride_w + d[None, :], mask=m, other=0.0)
    if KV_OUT:
        tl.store(k_ptr + out, k, mask=m)
        tl.store(v_ptr + out, v, mask=m)
    if STORE:
        blk = tl.load(blocks_ptr + n).to(tl.int64)
        off = tl.load(offsets_ptr + n).to(tl.int64)
        dst = blk * stride_cb + h[:, None].to(tl.int64) * stride_ch + off * stride_ct \
            + d[None, :]
        tl.store(kc_ptr + dst, k, mask=m)
        tl.store(vc_ptr + dst, v, mask=m)


@triton.jit
def write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, blocks_ptr, offsets_ptr, NH,
                    stride_kn, stride_kh, stride_vn, stride_vh,
                    stride_cb, stride_ch, stride_ct,
                    HEAD_DIM: tl.constexpr, HD_P2: tl.constexpr, HB: tl.constexpr):
    # One program per (token, HB heads): both caches' slots of that token.
    n = tl.program_id(0).to(tl.int64)
    h = (tl.program_id(1) * HB + tl.arange(0, HB)).to(tl.int64)
    d = tl.arange(0, HD_P2)
    m = (h < NH)[:, None] & (d < HEAD_DIM)[None, :]
    blk = tl.load(blocks_ptr + n).to(tl.int64)
    off = tl.load(offsets_ptr + n).to(tl.int64)
    dst = blk * stride_cb + h[:, None] * stride_ch + off * stride_ct + d[None, :]
    tl.store(kc_ptr + dst, tl.load(k_ptr + n * stride_kn + h[:, None] * stride_kh
                                   + d[None, :], mask=m), mask=m)
    tl.store(vc_ptr + dst, tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh
                                   + d[None, :], mask=m), mask=m)


@triton.jit
def add_norms_kernel(x_ptr, a_ptr, m_ptr, out_ptr, h1_ptr, h2_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, H, eps,
                     HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: the residual sum (rounded after each add, as torch adds),
    # then both LayerNorms of it from one read, statistics in float32.
    row = tl.program_id(0).to(tl.int64) * H
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    ty = x.dtype
    if HAS_ADD:
        a = tl.load(a_ptr + row + cols, mask=mask, other=0.0)
        m = tl.load(m_ptr + row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(ty)
        x = (x.to(tl.float32) + m.to(tl.float32)).to(ty)
        tl.store(out_ptr + row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / H
    centred = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / H
    normed = centred / tl.sqrt(var + eps)
    w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h1_ptr + row + cols, (normed * w1 + b1).to(ty), mask=mask)
    w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h2_ptr + row + cols, (normed * w2 + b2).to(ty), mask=mask)
