"""The one list of weight/compute dtype names neoxq accepts, and their parser.

Every command and loader that takes a dtype (``neoxq worker|generate|evaluate|serve``,
the checkpoint loaders, the benchmarks) parses it here, so ``bf16`` means the same
everywhere and an unknown name is the same error everywhere. torch is imported only
when a name is parsed, so a CLI can offer the names (``--dtype`` choices) without
paying for torch at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Canonical names: torch's own attribute names.
CANONICAL: tuple[str, ...] = ("float32", "bfloat16", "float16")
# What people also type, mapped onto the canonical names.
ALIASES: dict[str, str] = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                           "fp16": "float16", "half": "float16"}
# Every accepted spelling (``--dtype`` choices): canonical names first.
DTYPE_NAMES: tuple[str, ...] = (*CANONICAL, *ALIASES)


def default_dtype_name(device: object) -> str:
    """bfloat16 on CUDA (the 20B's released precision, half the memory of float32);
    float32 elsewhere (CPU bf16 kernels are slow, and the reference tests use fp32)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def canonical_dtype_name(name: str | None, device: object = "cpu") -> str:
    """``"bf16"`` -> ``"bfloat16"``; None or ``"auto"`` -> the default for ``device``.
    Unknown names raise ``ValueError`` listing the accepted ones."""
    key = str(name).strip().lower().removeprefix("torch.") if name is not None else "auto"
    if key == "auto":
        return default_dtype_name(device)
    key = ALIASES.get(key, key)
    if key not in CANONICAL:
        raise ValueError(f"dtype: one of {', '.join(DTYPE_NAMES)} expected, got {name!r}")
    return key


def parse_dtype(name: str | torch.dtype | None, device: object = "cpu") -> torch.dtype:
    """A name (any spelling of :data:`DTYPE_NAMES`, ``"torch.bfloat16"``, ``"auto"``/None
    for the device's default) or a ``torch.dtype`` -> the ``torch.dtype``."""
    import torch

    if isinstance(name, torch.dtype):
        name = str(name)
    return getattr(torch, canonical_dtype_name(name, device))


# --------------------------------------------------------------------------------------
# FP8 options: the KV cache's storage dtype and the linear layers' quantization.
# --------------------------------------------------------------------------------------

# ``--kv-cache-dtype``: "auto" stores keys and values in the model's dtype; "fp8" in
# float8 e4m3 with one float32 scale per token and head.
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8")
# ``--quantization``: "none" keeps the checkpoint's linear weights in the model dtype;
# "fp8" stores them in float8 e4m3 per output channel and runs FP8 GEMMs.
QUANTIZATIONS: tuple[str, ...] = ("none", "fp8")
_KV_ALIASES: dict[str, str] = {"fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8"}


def canonical_kv_cache_dtype(name: str | None) -> str:
    """``--kv-cache-dtype`` as one of :data:`KV_CACHE_DTYPES` (None -> "auto");
    ``ValueError`` naming the accepted ones otherwise."""
    key = "auto" if name is None else str(name).strip().lower()
    key = _KV_ALIASES.get(key, key)
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv-cache-dtype: one of {', '.join(KV_CACHE_DTYPES)} expected, "
                         f"got {name!r}")
    return key


def parse_kv_cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the KV cache stores: the model's for "auto", float8 e4m3 for
    "fp8"."""
    import torch

    if canonical_kv_cache_dtype(name) == "fp8":
        return torch.float8_e4m3fn
    return model_dtype


def canonical_quantization(name: str | None) -> str | None:
    """``--quantization`` as None (no quantization: None, "none") or "fp8";
    ``ValueError`` naming the accepted ones otherwise."""
    key = "none" if name is None else str(name).strip().lower()
    if key not in QUANTIZATIONS:
        raise ValueError(f"quantization: one of {', '.join(QUANTIZATIONS)} expected, "
                         f"got {name!r}")
    return None if key == "none" else key


def precision_label(dtype_name: str, kv_cache_dtype: str | None = None,
                    quantization: str | None = None) -> str:
    """How a worker announces its numerics (at most 16 characters, the store's column):
    the weights' dtype, then ``:`` and ``w8`` for FP8 linear weights and ``kv8`` for an
    FP8 KV cache — ``bfloat16``, ``bfloat16:kv8``, ``bfloat16:w8kv8``."""
    tags = ("w8" if canonical_quantization(quantization) == "fp8" else "") + (
        "kv8" if canonical_kv_cache_dtype(kv_cache_dtype) == "fp8" else "")
    return f"{dtype_name}:{tags}" if tags else dtype_name
