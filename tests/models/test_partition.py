"""Partitioning layers over pipeline stages: a pure function, tested without a GPU."""

from __future__ import annotations

import itertools

import pytest

from models.config import get_preset
from models.model import NeoX
from models.partition import partition_costs, partition_layers, stage_costs, stage_params


def _check_cover(ranges: list[tuple[int, int]], n: int) -> None:
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (a, b), (c, _) in itertools.pairwise(ranges):
        assert a < b == c


def test_costs_match_the_network() -> None:
    import torch

    cfg = get_preset("tiny")
    block, embed, head = stage_costs(cfg)
    with torch.device("meta"):
        full = NeoX(cfg)
        first, last = NeoX(cfg, (0, 1)), NeoX(cfg, (1, cfg.num_layers))
    assert sum(p.numel() for p in full.parameters()) == cfg.num_params()
    assert block * cfg.num_layers + embed + head == cfg.num_params()
    for stage, rng in ((first, (0, 1)), (last, (1, cfg.num_layers))):
        assert sum(p.numel() for p in stage.parameters()) == stage_params(cfg, rng)


def test_20b_two_and_four_stages() -> None:
    cfg = get_preset("gpt-neox-20b")
    # The embedding and the head weigh ~0.68 of a block each: 2 stages split evenly.
    assert partition_layers(cfg, 2) == [(0, 22), (22, 44)]
    assert partition_layers(cfg, 4) == [(0, 11), (11, 22), (22, 33), (33, 44)]
    total = cfg.num_params()
    for n in (2, 4, 8):
        ranges = partition_layers(cfg, n)
        _check_cover(ranges, 44)
        loads = [stage_params(cfg, r) for r in ranges]
        assert sum(loads) == total
        # No stage more than one block above the ideal share.
        assert max(loads) <= total / n + stage_costs(cfg)[0]


def test_optimal_on_small_cases() -> None:
    # Brute force over every split of a few irregular cost lists.
    cases = [[5, 1, 1, 1, 1, 5], [1, 2, 3, 4, 5, 6, 7], [10, 1, 1, 1], [3, 3, 3]]
    for costs in cases:
        for n in range(1, len(costs) + 1):
            ranges = partition_costs(costs, n)
            _check_cover(ranges, len(costs))
            assert len(ranges) == n
            got = max(sum(costs[a:b]) for a, b in ranges)
            best = min(
                max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *cuts, len(costs))))
                for cuts in itertools.combinations(range(1, len(costs)), n - 1))
            assert got == best, (costs, n, ranges)


def test_one_stage_and_errors() -> None:
    cfg = get_preset("tiny")
    assert partition_layers(cfg, 1) == [(0, cfg.num_layers)]
    assert partition_layers(cfg, 2) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="at least one layer"):
        partition_layers(cfg, 3)
    with pytest.raises(ValueError, match=">= 1"):
        partition_layers(cfg, 0)
