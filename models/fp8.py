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

import torch
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# A row's max |x| is clamped to at least this before dividing: a row of zeros (padding,
# a never-written cache slot) quantizes to zeros instead of NaN.
MIN_AMAX = 1e-12


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) -> (e4m3 values (..., K), float32 scales (..., 1)) with one scale per
    row over the last dim: ``x ≈ q.float() * scale``."""
    # The max of bf16 values is exact in bf16; only the division needs float32.
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


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
                         out_dtype: torch.dtype) -> Tensor:
    """The same product on FP8 tensor cores (CUDA, see :func:`scaled_mm_supported`)."""
    # Rowwise scaling takes bf16 output only; wq.t() is the column-major (K, N) operand
    # the FP8 GEMM wants, with no copy.
    out = torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           out_dtype=torch.bfloat16)
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
        matmul = fp8_matmul_scaled_mm if self.use_scaled_mm else fp8_matmul_emulated
        out = matmul(xq, x_scale, self.weight, self.weight_scale, x.dtype)  # (M, N)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scaled_mm={self.use_scaled_mm}")


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
