"""The paged KV cache: fixed-size blocks of key/value memory, and their allocator.

A sequence's keys and values live in a list of blocks (its *block table*); token ``t``
of a sequence sits in block ``table[t // block_size]`` at offset ``t % block_size``.
Blocks are allocated one at a time as sequences grow, so no memory is reserved for
tokens that are never generated and none is lost to padding. Blocks carry reference
counts so that the ``n`` samples of one prompt share the prompt's blocks
(copy-on-write of a shared partial block happens in the engine).

Layout: one tensor ``(layers, 2, num_blocks, heads, block_size, head_dim)``. Keeping a
head's ``block_size`` tokens contiguous (rather than ``(blocks, block_size, heads,
head_dim)``) means the decode kernel, which runs one program per (sequence, head),
reads each block as a single contiguous run of ``block_size * head_dim`` elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.config import NeoXConfig

# Block 0 is never handed out: padded rows of a CUDA-graph decode batch write their
# (discarded) keys there and read it, so they can never touch a live sequence's memory.
NULL_BLOCK = 0


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` blocks (block 0 reserved)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: need at least 2 (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        # Popping from the end hands out low ids first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks sequences can use (all but the reserved one)."""
        return self.num_blocks - 1

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache: no free block (the scheduler should have preempted)")
        b = self._free.pop()
        self._refs[b] = 1
        return b

    def fork(self, blocks: list[int]) -> list[int]:
        """Share ``blocks`` with one more owner; returns a new table (same ids)."""
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def free(self, block: int) -> None:
        r = self._refs[block] - 1
        if r < 0:
            raise RuntimeError(f"KV cache: block {block} freed more often than allocated")
        self._refs[block] = r
        if r == 0:
            self._free.append(block)

    def free_all(self, blocks: list[int]) -> None:
        for b in blocks:
            self.free(b)


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

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(K, V) of a global layer index, each ``(blocks, heads, block_size, head_dim)``."""
        kv = self.data[layer - self.layer_start]
        return kv[0], kv[1]

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer (copy-on-write)."""
        self.data[:, :, dst] = self.data[:, :, src]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def block_bytes(config: NeoXConfig, block_size: int, dtype: torch.dtype,
                num_layers: int | None = None) -> int:
    """Bytes one block takes across all (or ``num_layers``) layers, K and V."""
    layers = config.num_layers if num_layers is None else num_layers
    elem = torch.empty((), dtype=dtype).element_size()
    return layers * 2 * block_size * config.hidden_size * elem


def blocks_for(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)
