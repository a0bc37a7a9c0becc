"""The paged KV memory: one tensor of fixed-size blocks per slice of layers, and its sizing.

Block ids are handed out by :class:`models.engine.block_manager.BlockManager`; token
``t`` of a sequence sits in block ``table[t // block_size]`` at offset ``t % block_size``.

Layout: one tensor ``(layers, 2, num_blocks, heads, block_size, head_dim)``. Keeping a
head's ``block_size`` tokens contiguous (rather than ``(blocks, block_size, heads,
head_dim)``) means the decode kernel, which runs one program per (sequence, head),
reads each block as a single contiguous run of ``block_size * head_dim`` elements.

An FP8 cache (``dtype=torch.float8_e4m3fn``) stores e4m3 values plus one float32 scale per
(layer, K/V, block, head, slot), i.e. per token and head (``value ≈ q * scale``, see
:mod:`models.fp8`), in a second tensor ``(layers, 2, num_blocks, heads, block_size)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config import NeoXConfig


class KVCache:
    """Key/value memory for ``num_layers`` consecutive layers starting at ``layer_start``."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layer_start: int = 0,
    ) -> None:
        self.layer_start = layer_start
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.head_dim = num_heads, head_dim
        # (L, 2, blocks, heads, block_size, head_dim); zeros so that never-written slots
        # (read only under a mask) hold finite values.
        self.data = torch.zeros(
            num_layers, 2, num_blocks, num_heads, block_size, head_dim, dtype=dtype, device=device
        )
        # (L, 2, blocks, heads, block_size) float32 for an FP8 cache; ones so that a
        # never-written slot dequantizes to its (zero) value.
        self.scales: Tensor | None = None
        if is_fp8(dtype):
            self.scales = torch.ones(num_layers, 2, num_blocks, num_heads, block_size,
                                     dtype=torch.float32, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """The stored values' dtype (the model's, or float8 e4m3)."""
        return self.data.dtype

    @classmethod
    def for_model(cls, config: NeoXConfig, layer_range: tuple[int, int], num_blocks: int,
                  block_size: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The cache of the layers ``layer_range`` of a model (all, or one stage's)."""
        start, stop = layer_range
        return cls(num_layers=stop - start, num_blocks=num_blocks, block_size=block_size,
                   num_heads=config.num_heads, head_dim=config.head_dim, dtype=dtype,
                   device=device, layer_start=start)

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(K, V) of a global layer index, each ``(blocks, heads, block_size, head_dim)``."""
        kv = self.data[layer - self.layer_start]
        return kv[0], kv[1]

    def layer_scales(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """(K scales, V scales) of a global layer index, each ``(blocks, heads,
        block_size)`` float32, for an FP8 cache; None for a cache in the model dtype."""
        if self.scales is None:
            return None
        s = self.scales[layer - self.layer_start]
        return s[0], s[1]

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer (copy-on-write), with
        their scales."""
        data = self.data.view(torch.uint8) if self.scales is not None else self.data
        data[:, :, dst] = data[:, :, src]
        if self.scales is not None:
            self.scales[:, :, dst] = self.scales[:, :, src]

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.data.numel() * self.data.element_size() + scales


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a KV dtype is stored as float8 with per-token scales."""
    return dtype == torch.float8_e4m3fn


def block_bytes(config: NeoXConfig, block_size: int, dtype: torch.dtype,
                num_layers: int | None = None) -> int:
    """Bytes one block takes across all (or ``num_layers``) layers, K and V (an FP8
    block: one byte per value plus a float32 scale per token and head)."""
    layers = config.num_layers if num_layers is None else num_layers
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = config.hidden_size * elem + (config.num_heads * 4 if is_fp8(dtype) else 0)
    return layers * 2 * block_size * per_token


def blocks_for_budget(
    config: NeoXConfig, *, layer_range: tuple[int, int], block_size: int,
    dtype: torch.dtype, device: torch.device, kv_memory: float | int | None,
    max_batch_tokens: int, max_num_seqs: int, logits: bool,
) -> int:
    """How many KV blocks of the layers ``layer_range`` fit in ``kv_memory``.

    ``kv_memory``: a float in (0, 1] is a fraction of the device's free memory (after a
    reserve), an int is bytes; None means 0.9 on CUDA, 256 MiB elsewhere. ``logits``:
    this process also holds a step's logits and the sampler's temporaries (the whole
    model, a pipeline's last stage, or rank 0, which samples).
    """
    per_block = block_bytes(config, block_size, dtype, layer_range[1] - layer_range[0])
    if device.type == "cuda":
        if kv_memory is None:
            kv_memory = 0.9
        if isinstance(kv_memory, float):
            if not 0 < kv_memory <= 1:
                raise ValueError(f"kv_memory: a fraction must be in (0, 1], got {kv_memory}")
            torch.cuda.synchronize(device)
            free, _ = torch.cuda.mem_get_info(device)
            reserve = 2 << 30  # activations of the largest step, receive buffers
            if logits:
                # The fp32 logits of a scoring step and the sampler's (rows, vocab)
                # temporaries stay outside the cache.
                v = config.vocab_size
                reserve += max_batch_tokens * v * 4 * 3 + max_num_seqs * v * 8 * 6
            budget = int(free * kv_memory) - reserve
        else:
            budget = int(kv_memory)
    else:
        if isinstance(kv_memory, float):
            raise ValueError("kv_memory: give bytes (an int) off CUDA")
        budget = int(kv_memory) if kv_memory is not None else 256 << 20
    return max(0, budget // per_block)
