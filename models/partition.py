"""Partitioning a model's layers over pipeline stages, balanced by parameters.

A pure function of the config (no torch, no devices): every stage gets a contiguous
run of blocks; the first also holds the input embedding and the last the final norm
and output head. Parameters stand in for both memory and decode time, since a
batched decode step reads every weight once; the embedding is a lookup but still
costs its memory on stage 0, and that stage also samples, so counting it there is the
right direction for time as well.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.config import NeoXConfig


def stage_costs(config: NeoXConfig) -> tuple[int, int, int]:
    """(parameters per block, embedding parameters, final norm + head parameters)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attn_bias = 4 * h if config.attention_bias else 0  # QKV (3h) and dense (h) biases
    block = 4 * h + 4 * h * h + attn_bias + 2 * h * f + f + h
    # A stage that holds the head holds its own copy of the matrix even when the whole
    # model ties it to the embedding (the two live on different GPUs).
    return block, v * h, 2 * h + v * h


def partition_costs(costs: Sequence[float], num_stages: int) -> list[tuple[int, int]]:
    """Split ``costs`` (one per layer) into ``num_stages`` contiguous non-empty runs that
    minimise the largest run's sum; ties go to the most even split (smallest sum of
    squares). Returns ``[(start, stop), ...]``."""
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"pipeline_parallel: must be >= 1, got {num_stages}")
    if num_stages > n:
        raise ValueError(f"pipeline_parallel: {num_stages} stages for {n} layers; each stage "
                         f"needs at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = (float("inf"), float("inf"))
    # best[s][i]: (max load, sum of squares) of the first i layers over s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                prev = best[s - 1][j]
                if prev[0] == float("inf"):
                    continue
                load = prefix[i] - prefix[j]
                cand = (max(prev[0], load), prev[1] + load * load)
                if cand < best[s][i]:
                    best[s][i], cut[s][i] = cand, j
    ranges: list[tuple[int, int]] = []
    i = n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def partition_layers(config: NeoXConfig, num_stages: int) -> list[tuple[int, int]]:
    """``layer_range`` of each of ``num_stages`` pipeline stages, balanced by parameters
    (the embedding counts on the first stage, the final norm and head on the last)."""
    block, embed, head = stage_costs(config)
    costs = [float(block)] * config.num_layers
    if costs:
        costs[0] += embed
        costs[-1] += head
    return partition_costs(costs, num_stages)


def stage_params(config: NeoXConfig, layer_range: tuple[int, int]) -> int:
    """Parameters a stage holding ``layer_range`` keeps."""
    block, embed, head = stage_costs(config)
    start, stop = layer_range
    return (stop - start) * block + (embed if start == 0 else 0) + (
        head if stop == config.num_layers else 0)
