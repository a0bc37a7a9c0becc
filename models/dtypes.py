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
