"""LoRA through ``peft``: wrap the network's linears, save the adapter, merge it.

``peft`` wraps any ``nn.Module`` whose targets are ``nn.Linear`` — neoxq's network
included, unchanged — and it is the format people exchange adapters in, with merging,
dropout and initialisation maintained upstream. A local implementation would save ~50
lines and lose all of that, so the library is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from models.model import NeoX

# The linear layers of a GPT-NeoX block, by their name in models/model.py.
LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
DEFAULT_TARGETS = ("query_key_value",)


def parse_targets(spec: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated subset of :data:`LINEARS`."""
    if spec == "all":
        return LINEARS
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in LINEARS]
    if unknown or not names:
        raise ValueError(f"lora targets: expected 'all' or names from {', '.join(LINEARS)}, "
                         f"got {spec!r}")
    return names


def apply_lora(model: NeoX, rank: int, alpha: float, dropout: float,
               targets: tuple[str, ...]) -> Any:
    """Freeze ``model`` and add LoRA adapters to ``targets`` in place; returns the
    ``peft.PeftModel`` (for saving and merging). ``model`` itself keeps working as the
    network, now with adapters, and keeps its parameter names' prefixes."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
    model.requires_grad_(False)
    # Exact names ("...attention.dense" vs "...mlp.dense_4h_to_h") through a regex that
    # peft matches against each module's full name.
    pattern = r".*\.(" + "|".join(targets) + r")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=pattern, bias="none")
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(peft_model: Any, path: Path) -> None:
    """The adapter alone, in peft's layout (``adapter_config.json`` and
    ``adapter_model.safetensors``; tensor names are neoxq's module names)."""
    peft_model.save_pretrained(str(path))


def merge(peft_model: Any) -> NeoX:
    """Fold the adapters into the base weights (W + B·A·alpha/r) and return the plain
    network, ready for :func:`models.loaders.save_neoxq`."""
    return peft_model.merge_and_unload()
