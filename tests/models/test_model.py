"""The network against HF ``GPTNeoXForCausalLM`` on random tiny models, one per
architecture switch (see ``hf_fixtures.VARIANTS``): fp32 logits agree to ~1e-5."""

from __future__ import annotations

import pytest
import torch

from models.config import NeoXConfig
from models.loaders import translate
from models.model import NeoX
from tests.models.hf_fixtures import VARIANTS, hf_model, hf_state


def _ours_from_hf(hf) -> NeoX:
    cfg = NeoXConfig.from_hf(hf.config.to_dict())
    model = NeoX(cfg).eval()
    sd = {translate(k): v for k, v in hf_state(hf).items()}
    sd = {k: v for k, v in sd.items() if k is not None}
    if cfg.tie_embeddings:
        sd["embed_out.weight"] = sd["embed_in.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def _batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 11, 7 and 1, left-padded (as HF generate pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :10] = 0
    ids[mask == 0] = 1  # <|padding|>
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant: str) -> None:
    hf = hf_model(variant)
    ours = _ours_from_hf(hf)
    ids, mask = _batch(50277)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    got = ours.dense_logits(ids, mask)
    keep = mask.bool()
    scale = ref[keep].abs().max()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5 * scale)


def test_unpadded_batch_matches_hf() -> None:
    hf = hf_model("parallel-rot25", seed=3)
    ours = _ours_from_hf(hf)
    ids = torch.randint(0, 50277, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    got = ours.dense_logits(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_round_trips_through_hf(variant: str) -> None:
    cfg = NeoXConfig.from_hf(hf_model(variant).config.to_dict())
    spec = VARIANTS[variant]
    assert cfg.rotary_pct == spec["rotary_pct"]
    assert cfg.rotary_base == spec["rotary_emb_base"]
    assert cfg.parallel_residual == spec["use_parallel_residual"]
    assert cfg.tie_embeddings == spec["tie_word_embeddings"]
    assert cfg.attention_bias == spec.get("attention_bias", True)
    assert NeoXConfig.from_hf(cfg.to_hf()) == cfg.replace(name="hf")


def test_module_apply_reaches_every_submodule() -> None:
    """``model.apply(fn)`` is ``nn.Module.apply``: no submodule shadows it."""
    from models.config import get_preset

    model = NeoX(get_preset("tiny"))
    seen: list[str] = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "Rotary" in seen and "Block" in seen and seen[-1] == "NeoX"


@pytest.mark.parametrize("spec", ["input", "qkv", "qkv/32", "input/16/mlp-first",
                                  "attn/0/attn-first"])
def test_branched_blocks_equal_plain(spec: str) -> None:
    """A decode graph's branch plans (here on one stream, in the plan's order) change
    where the MLP branch runs, not what it computes: the same sum in the same order."""
    from models.model import Branches, BranchPlan, DenseAttention

    ours = _ours_from_hf(hf_model("parallel-rot25", seed=5))
    ids = torch.randint(0, 50277, (2, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(9).expand(2, 9).reshape(-1)
    with torch.no_grad():
        x = ours.embed(ids.reshape(-1))
        plain = ours.run_layers(x, positions, DenseAttention(2, 9))
        branched = ours.run_layers(x, positions, DenseAttention(2, 9),
                                   Branches(None, BranchPlan.parse(spec)))
    assert torch.equal(plain, branched)


@pytest.mark.parametrize("spec", ["input", "qkv/32", "input/16/mlp-first", "input/everywhere",
                                  "qkv/8/mlp-first/everywhere", "attn/attn-first",
                                  "attn/4/attn-first/everywhere"])
def test_branch_plan_specs_round_trip(spec: str) -> None:
    from models.model import BranchPlan

    plan = BranchPlan.parse(spec)
    assert BranchPlan.parse(str(plan)) == plan
    assert plan.everywhere == spec.endswith("everywhere")
    assert plan.mlp_first == ("mlp-first" in spec)
    assert plan.attn_first == ("attn-first" in spec)


@pytest.mark.parametrize("spec", ["output", "qkv/-1", "qkv/x", "qkv/8/first", "a/1/b/c",
                                  "qkv/everywhere/8", "qkv/8/everywhere/mlp-first",
                                  "input/0/mlp-first/mlp-first", "input/1/2",
                                  "attn/0/mlp-first/attn-first",
                                  "attn/0/attn-first/mlp-first", "attn/everywhere/attn-first"])
def test_branch_plan_rejects_bad_specs(spec: str) -> None:
    from models.model import BranchPlan

    with pytest.raises(ValueError, match="branch"):
        BranchPlan.parse(spec)


def test_gelu_epilogue_check_tells_the_two_gelus_apart() -> None:
    """The CPU's ``_addmm_activation`` computes the exact GELU: the check says no there,
    so a tanh-GELU model never takes the fused path on a CPU (or a GPU build like it)."""
    from models.model import MLP, gelu_epilogue_check

    assert not gelu_epilogue_check(torch.device("cpu"))
    from models.config import get_preset

    mlp = MLP(get_preset("tiny").replace(hidden_act="gelu_fast"))
    with torch.no_grad():
        assert not mlp.fuses_up(torch.randn(3, mlp.dense_h_to_4h.in_features))
