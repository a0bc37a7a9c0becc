"""The trainer's small pure pieces, and activation checkpointing's exactness."""

from __future__ import annotations

import pytest
import torch

from models.config import get_preset
from models.loaders import load_model
from models.model import PackedAttention
from train.finetune import lr_lambda, model_flops_per_token, parse_batch_size


def test_batch_size_in_sequences_or_tokens() -> None:
    assert parse_batch_size("16", 2048) == 16
    assert parse_batch_size("65536t", 2048) == 32
    assert parse_batch_size("5000t", 2048) == 3  # rounded up to whole rows
    for bad in ("0", "-4", "abc", "12k"):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad, 2048)


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    f = lr_lambda(total=100, warmup=10)
    rates = [f(s) for s in range(100)]
    assert rates[0] == pytest.approx(1 / 11) and rates[9] == pytest.approx(10 / 11)
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert f(100) == pytest.approx(0.1)


def test_model_flops_per_token() -> None:
    cfg = get_preset("gpt-neox-20b")
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    assert model_flops_per_token(cfg, "full") == 6 * n
    assert model_flops_per_token(cfg, "lora", adapter_params=1000) == 4 * n + 6000
    assert 80e9 < 4 * n < 82e9


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = load_model("preset:tiny-sequential").model.train()
    model.requires_grad_(True)
    tokens = torch.randint(1, 300, (2 * 16,), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(6), torch.arange(16)])
    segments = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.checkpoint_blocks = checkpointing
        logits = model(tokens, positions, PackedAttention(segments))
        torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, msg=name)
