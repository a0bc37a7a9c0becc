"""FP8 (float8 e4m3) arithmetic: per-row scaling, the quantized linear layer, and
quantizing a loaded model's linear layers in place.

Decode reads every weight and every cached key/value once per step, so its speed is
bytes read; e4m3 halves both against bf16. One float32 scale per row keeps the range:
``scale = max|row| / 448`` (448 is e4m3's largest finite value), ``q = row / scale``
rounded to e4m3 (3 mantissa bits: ~6% worst-case relative error per element, ~2-3% on
average, and errors of a dot product's terms mostly cancel).

- KV cache: one scale per (token, head) over the head's dims (``quantize_rows`` on
  ``(N, heads, head_dim)``), kept beside the blocks (:mod:`models.engine.kv_cache`).
- Linear layers (:class:`Fp8Linear`): weights per output channel at load time,
  activations per token at run time, one ``torch._scaled_mm`` (FP8 tensor cores, bf16
  output) on GPUs that have them (sm89+). Elsewhere the same quantize/dequantize
  arithmetic runs in float32 (:func:`fp8_matmul_emulated`), so CPU tests check the
  numerics the GPU path computes. Embedding, LayerNorms and the output head stay in the
  model dtype: they are a small share of the bytes and the most sensitive to rounding.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from models.kernel_check import kernels_ok

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# A row's max |x| is clamped to at least this before dividing: a row of zeros (padding,
# a never-written cache slot) quantizes to zeros instead of NaN.
MIN_AMAX = 1e-12


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) -> (e4m3 values (..., K), float32 scales (..., 1)) with one scale per
    row over the last dim: ``x ≈ q.float() * scale``.

    On CUDA one fused Triton kernel (:func:`quantize_rows_triton`) does it where it
    passed its self-check; the torch ops below (six kernels) elsewhere."""
    if x.is_cuda and x.dim() >= 2 and x.stride(-1) == 1 and x.numel() and triton_ok(x.device):
        q, scale = quantize_rows_triton(x.reshape(-1, x.shape[-1]))
        return q.view(x.shape), scale.view(*x.shape[:-1], 1)
    return quantize_rows_torch(x)


def quantize_rows_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows` in torch ops (any device; the reference)."""
    # The max of bf16 values is exact in bf16; only the division needs float32.
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_scatter(x: Tensor, cache: Tensor, scales: Tensor, blocks: Tensor,
                     offsets: Tensor) -> None:
    """Quantize ``x`` (N, nh, hd) per token and head into an FP8 paged cache: e4m3 values
    at ``cache[blocks[i], :, offsets[i]]`` (cache: (blocks, nh, block_size, hd)), scales
    at ``scales[blocks[i], :, offsets[i]]`` (scales: (blocks, nh, block_size) float32).
    One Triton kernel on CUDA (after its self-check), torch ops elsewhere."""
    if (x.is_cuda and x.numel() and x.stride(-1) == 1 and cache.stride(-1) == 1
            and triton_ok(x.device)):
        quantize_scatter_triton(x, cache, scales, blocks, offsets)
        return
    xq, scale = quantize_rows_torch(x)  # (N, nh, hd) e4m3, (N, nh, 1)
    # Through a byte view: indexed writes of float8 tensors are not on every device.
    cache.view(torch.uint8)[blocks, :, offsets] = xq.view(torch.uint8)
    scales[blocks, :, offsets] = scale[..., 0]


# --------------------------------------------------------------------------------------
# Triton kernels (CUDA; CPU under TRITON_INTERPRET=1). One launch each instead of the
# half-dozen elementwise kernels above: with 44 layers x (4 linears + K + V) per step,
# those would be over a thousand tiny kernels in every decode step.
# --------------------------------------------------------------------------------------

_KERNELS = None


def _build_kernels():  # noqa: ANN202 - returns two triton JIT functions
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                             BLOCK: tl.constexpr, MIN_A: tl.constexpr, QMAX: tl.constexpr):
        # One program per row: its max |x| in one pass, then x / scale in a second (the
        # row is in L2 by then).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        x_row = x_ptr + row * stride_x
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, K, BLOCK):
            m = start + offs < K
            x = tl.load(x_row + start + offs, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), MIN_A) / QMAX
        tl.store(s_ptr + row, scale)
        q_row = q_ptr + row * stride_q
        for start in range(0, K, BLOCK):
            m = start + offs < K
            x = tl.load(x_row + start + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
            tl.store(q_row + start + offs, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def quantize_scatter_kernel(x_ptr, c_ptr, s_ptr, blocks_ptr, offsets_ptr,
                                stride_xn, stride_xh, stride_cb, stride_ch, stride_ct,
                                stride_sb, stride_sh, stride_st,
                                HEAD_DIM: tl.constexpr, HD_P2: tl.constexpr,
                                MIN_A: tl.constexpr, QMAX: tl.constexpr):
        # One program per (token, head): quantize its head_dim values and store them
        # (and the scale) at the token's cache slot.
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, HD_P2)
        m = d < HEAD_DIM
        x = tl.load(x_ptr + n * stride_xn + h * stride_xh + d, mask=m, other=0.0)
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_A) / QMAX
        blk = tl.load(blocks_ptr + n).to(tl.int64)
        off = tl.load(offsets_ptr + n).to(tl.int64)
        y = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(c_ptr + blk * stride_cb + h * stride_ch + off * stride_ct + d,
                 y.to(c_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + blk * stride_sb + h * stride_sh + off * stride_st, scale)

    return quantize_rows_kernel, quantize_scatter_kernel


def _kernels():  # noqa: ANN202
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    return _KERNELS


def quantize_rows_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows` of a 2-D ``x`` (M, K) with a contiguous last dim, in one
    Triton kernel: (e4m3 (M, K), float32 scales (M, 1))."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(2048, max(16, 1 << (k - 1).bit_length()))
        _kernels()[0][(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block,
                            MIN_A=MIN_AMAX, QMAX=FP8_MAX, num_warps=4 if block <= 1024 else 8)
    return q, scale


def quantize_scatter_triton(x: Tensor, cache: Tensor, scales: Tensor, blocks: Tensor,
                            offsets: Tensor) -> None:
    """:func:`quantize_scatter` in one Triton kernel (last dims contiguous)."""
    n, nh, hd = x.shape
    if n == 0:
        return
    _kernels()[1][(n, nh)](
        x, cache, scales, blocks, offsets, x.stride(0), x.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2),
        scales.stride(0), scales.stride(1), scales.stride(2),
        HEAD_DIM=hd, HD_P2=max(16, 1 << (hd - 1).bit_length()), MIN_A=MIN_AMAX,
        QMAX=FP8_MAX, num_warps=1 if hd <= 128 else 4)


def triton_ok(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` and agree with the torch ops: checked
    once per device (a few small launches and one sync) and remembered. Never checked
    while a CUDA graph is being captured (the torch ops run there instead)."""
    return kernels_ok("FP8 Triton kernels", device, _self_check)


def _self_check(device: torch.device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(37, 300, generator=g, device=device) * torch.logspace(
        -3, 2, 37, device=device)[:, None]
    x = x.to(torch.bfloat16)
    q, s = quantize_rows_triton(x)
    q_ref, s_ref = quantize_rows_torch(x)
    # Codes may differ by one e4m3 step (< 1/8 relative; 2^-9 among subnormals) where
    # a division lands on a rounding tie; anything more is a broken conversion.
    ok = torch.allclose(s, s_ref, rtol=1e-6, atol=0) and torch.allclose(
        q.float(), q_ref.float(), rtol=0.13, atol=2.0**-9)
    kv = torch.randn(5, 3, 96, generator=g, device=device).to(torch.bfloat16)
    cache = torch.zeros(4, 3, 8, 96, dtype=FP8, device=device)
    scales = torch.ones(4, 3, 8, device=device)
    blocks = torch.tensor([1, 1, 3, 2, 3], device=device)
    offsets = torch.tensor([0, 5, 7, 2, 0], device=device)
    quantize_scatter_triton(kv, cache, scales, blocks, offsets)
    kq, ks = quantize_rows_torch(kv)
    got_q = cache.view(torch.uint8)[blocks, :, offsets].view(FP8).float()
    ok = ok and torch.allclose(scales[blocks, :, offsets], ks[..., 0], rtol=1e-6, atol=0)
    ok = ok and torch.allclose(got_q, kq.float(), rtol=0.13, atol=2.0**-9)
    if not ok:
        warnings.warn(f"FP8 Triton kernels disagree with torch on {device}; using torch ops",
                      stacklevel=3)
    return bool(ok)


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`quantize_rows`: ``q.float() * scale`` in ``dtype``. ``scale``
    broadcasts against ``q`` ((..., 1) per row)."""
    return (q.float() * scale).to(dtype)


def scaled_mm_supported(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether ``torch._scaled_mm`` runs an FP8 GEMM of this shape on ``device``: a CUDA
    GPU with FP8 tensor cores (compute capability 8.9+) and both weight dims multiples
    of 16 (cuBLASLt's FP8 layout rule; the token count may be anything)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if in_features % 16 or out_features % 16:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_emulated(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                        out_dtype: torch.dtype) -> Tensor:
    """``(xq * x_scale) @ (wq * w_scale).T`` in float32, rounded to ``out_dtype``: what
    ``torch._scaled_mm`` computes with rowwise scales. xq (M, K) e4m3, x_scale (M, 1),
    wq (N, K) e4m3, w_scale (N,)."""
    acc = xq.float() @ wq.float().t()  # (M, N)
    return (acc * x_scale * w_scale[None, :]).to(out_dtype)


def fp8_matmul_scaled_mm(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                         out_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """The same product on FP8 tensor cores (CUDA, see :func:`scaled_mm_supported`),
    plus ``bias`` (bf16) added by the GEMM's epilogue when given."""
    # Rowwise scaling takes bf16 output only; wq.t() is the column-major (K, N) operand
    # the FP8 GEMM wants, with no copy.
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           bias=bias, out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


class Fp8Linear(nn.Module):
    """``nn.Linear`` with e4m3 weights (one float32 scale per output channel) and
    activations quantized per token at each call. Output in the input's dtype.

    ``use_scaled_mm`` (decided once, from the weight's device and shape, so no check
    runs inside a captured CUDA graph) picks ``torch._scaled_mm`` over the emulation.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"Fp8Linear: a 2-D {FP8} weight expected, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, K) e4m3
        self.weight_scale = nn.Parameter(weight_scale.float().reshape(-1),
                                         requires_grad=False)  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.use_scaled_mm = scaled_mm_supported(weight.device, self.in_features,
                                                 self.out_features)
        # Whether the GEMM adds the bias itself (saves a pass over the output): found
        # out on the first eager call (None until then; never probed inside a capture).
        self.fused_bias: bool | None = None if self.bias is not None and (
            self.bias.dtype == torch.bfloat16) else False

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize a float ``nn.Linear`` (its weight per output channel)."""
        wq, scale = quantize_rows(linear.weight.detach())  # (N, K), (N, 1)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(wq, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        if self.use_scaled_mm:
            out = self._scaled_mm(xq, x_scale, x.dtype)  # (M, N)
        else:
            out = fp8_matmul_emulated(xq, x_scale, self.weight, self.weight_scale, x.dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*lead, self.out_features)

    def _scaled_mm(self, xq: Tensor, x_scale: Tensor, dtype: torch.dtype) -> Tensor:
        w, ws = self.weight, self.weight_scale
        if self.fused_bias:
            return fp8_matmul_scaled_mm(xq, x_scale, w, ws, dtype, bias=self.bias)
        if self.fused_bias is None and not _capturing(xq):
            try:
                out = fp8_matmul_scaled_mm(xq, x_scale, w, ws, dtype, bias=self.bias)
                self.fused_bias = True
                return out
            except RuntimeError:  # a torch whose FP8 GEMM takes no bias here
                self.fused_bias = False
        out = fp8_matmul_scaled_mm(xq, x_scale, w, ws, dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scaled_mm={self.use_scaled_mm}")


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device's current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# The linear layers of a block that FP8 quantization replaces (attribute paths).
QUANTIZED_LINEARS: tuple[str, ...] = (
    "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@torch.no_grad()
def quantize_fp8_(model: nn.Module) -> nn.Module:
    """Replace every block's linear layers (:data:`QUANTIZED_LINEARS`) of a loaded
    :class:`~models.model.NeoX` (whole or a stage) with :class:`Fp8Linear`, in place,
    one layer at a time: the memory peak is the float model plus one layer's e4m3
    copy, never two models. The embedding, LayerNorms and head are left as they are.
    Returns ``model``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("quantize_fp8_: a NeoX model (with .layers) expected")
    device = None
    for block in layers.values():
        for path in QUANTIZED_LINEARS:
            parent_name, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            if isinstance(linear, Fp8Linear):
                continue
            device = linear.weight.device
            setattr(parent, leaf, Fp8Linear.from_linear(linear))
            del linear
    if device is not None and device.type == "cuda":
        # The float weights' memory goes back to the driver, where the KV-cache sizing
        # (free memory) can see it.
        torch.cuda.empty_cache()
    return model


def quantization_of(model: nn.Module) -> str | None:
    """"fp8" when ``model``'s linear layers are :class:`Fp8Linear`, else None."""
    return "fp8" if any(isinstance(m, Fp8Linear) for m in model.modules()) else None


def apply_quantization(model: nn.Module, quantization: str | None) -> nn.Module:
    """Quantize ``model`` as a ``--quantization`` name says (None/"none": unchanged)."""
    from models.dtypes import canonical_quantization

    if canonical_quantization(quantization) == "fp8":
        quantize_fp8_(model)
    return model
