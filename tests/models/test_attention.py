"""The paged decode kernel's configurations: one list the tuner chooses from, every entry
checked against the torch reference on the GPU (skipped on CPU)."""

from __future__ import annotations

import inspect

import pytest
import torch

from models.attention import DECODE_CONFIGS, tune_decode_kernel


def test_the_tuner_chooses_from_the_one_config_list() -> None:
    # The GPU test below is parametrized by the same tuple: a config added to the list is
    # tested by construction.
    default = inspect.signature(tune_decode_kernel).parameters["configs"].default
    assert default is DECODE_CONFIGS
    assert len(set(DECODE_CONFIGS)) == len(DECODE_CONFIGS)
    for tile, warps, stages, hpp in DECODE_CONFIGS:
        assert tile >= 16 and tile & (tile - 1) == 0
        assert warps in (1, 2, 4, 8) and stages >= 1
        assert hpp >= 1 and hpp & (hpp - 1) == 0
    assert {c[3] for c in DECODE_CONFIGS} >= {1, 2, 4, 8}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: "t{}w{}s{}h{}".format(*c))
def test_every_decode_config_matches_torch(config: tuple[int, int, int, int]) -> None:
    from models.attention import paged_decode_torch, paged_decode_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    # 8 heads: every heads-per-program the list holds divides it.
    # The 20B's shape (head dim 96 = 64 + 32: two parts) and a one-part head dim with
    # another block size and dtype.
    for hd, bs, dtype in ((96, 16, torch.bfloat16), (64, 8, torch.float16)):
        d, nh, w = 5, 8, 9
        kc = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda").to(dtype)
        vc = torch.randn(d * w + 1, nh, bs, hd, generator=g, device="cuda").to(dtype)
        q = torch.randn(d, nh, hd, generator=g, device="cuda").to(dtype)
        tables = (torch.randperm(d * w, generator=g, device="cuda") + 1).view(d, w)
        ctx = torch.tensor([1, bs, bs + 1, w * bs - 3, w * bs], device="cuda")
        ref = paged_decode_torch(q.float(), kc.float(), vc.float(), tables, ctx)
        got = paged_decode_triton(q, kc, vc, tables, ctx, *config).float()
        assert (got - ref).abs().max().item() < 2e-2, (hd, bs, dtype)
