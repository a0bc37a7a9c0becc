"""Reference models for loader, parity and generate tests.

Tiny Hugging Face ``GPTNeoXForCausalLM`` models with *every* parameter randomised
(LayerNorms and biases too, so a mis-mapped or mis-merged tensor cannot hide behind
a default of 1 or 0), written out in each checkpoint layout neoxq must read —
including a GPT-NeoX/DeepSpeed pipeline checkpoint split over tensor-parallel ranks the
way the released 20B was split (the inverse of ``models.loaders.merge_tp_shards``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The shapes the parity tests cover: between them every architecture switch.
VARIANTS: dict[str, dict[str, Any]] = {
    # 20B-like: parallel residual, 25% rotary, tanh GELU, untied, vocab padded past 50277.
    "parallel-rot25": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        hidden_act="gelu_fast", tie_word_embeddings=False, vocab_size=50304,
    ),
    # Pythia-like sequential residual, half rotary, odd base, exact GELU, tied embeddings.
    "sequential-rot50-tied": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.5, rotary_emb_base=500, use_parallel_residual=False,
        hidden_act="gelu", tie_word_embeddings=True, vocab_size=50280,
    ),
    # Full rotary, large base, no attention biases, another tanh-GELU spelling.
    "rot100-nobias": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192,
        rotary_pct=1.0, rotary_emb_base=1_000_000, use_parallel_residual=True,
        hidden_act="gelu_new", tie_word_embeddings=False, attention_bias=False,
        vocab_size=50432,
    ),
    # head_dim 24 with 25% rotary = 6 rotated dims (the 20B's 24-of-96 in miniature).
    "headdim24-relu": dict(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=False,
        hidden_act="relu", tie_word_embeddings=False, vocab_size=50304,
    ),
}


def hf_config(**overrides: Any):
    """A transformers ``GPTNeoXConfig`` (5.x stores rotary settings in rope_parameters)."""
    from transformers import GPTNeoXConfig

    kw: dict[str, Any] = dict(
        max_position_embeddings=256, layer_norm_eps=1e-5, eos_token_id=0, bos_token_id=0,
        attn_implementation="eager",
    )
    kw.update(overrides)
    pct = kw.pop("rotary_pct", 0.25)
    base = kw.pop("rotary_emb_base", 10000)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": base,
                             "partial_rotary_factor": pct}
    return GPTNeoXConfig(**kw)


def hf_model(variant: str | dict[str, Any], seed: int = 0):
    """A random HF model; every tensor ~ N(0, 0.1) except LayerNorm weights ~ 1 ± 0.1."""
    from transformers import GPTNeoXForCausalLM

    cfg = hf_config(**(VARIANTS[variant] if isinstance(variant, str) else variant))
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1)
            if "layernorm.weight" in name or "final_layer_norm.weight" in name:
                p.add_(1.0)
    return model


def hf_state(model) -> dict[str, Tensor]:
    """The HF state dict with 4.x names (``embed_out``), one entry per tensor."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if "lm_head.weight" in sd:
        sd["embed_out.weight"] = sd.pop("lm_head.weight")
    if model.config.tie_word_embeddings:
        sd.pop("embed_out.weight", None)
    return sd


def write_hf_dir(
    model, path: Path, tokenizer: Path | None, *, layout: str = "safetensors",
    config_keys: str = "5.x", head_name: str = "embed_out.weight",
) -> Path:
    """Write ``model`` as an HF directory.

    layout: ``safetensors`` (one file), ``sharded`` (3 safetensors + index), ``bin``,
    ``bin-sharded``. config_keys: ``5.x`` (rope_parameters) or ``4.x`` (rotary_pct,
    rotary_emb_base). head_name: ``embed_out.weight`` (4.x) or ``lm_head.weight`` (5.x).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    if config_keys == "4.x":
        rope = cfg.pop("rope_parameters")
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = hf_state(model)
    if "embed_out.weight" in sd and head_name != "embed_out.weight":
        sd[head_name] = sd.pop("embed_out.weight")
    names = sorted(sd)
    if layout == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    elif layout == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    elif layout in ("sharded", "bin-sharded"):
        ext = "safetensors" if layout == "sharded" else "bin"
        prefix = "model" if ext == "safetensors" else "pytorch_model"
        parts = [names[i::3] for i in range(3)]
        weight_map = {}
        for i, part in enumerate(parts):
            fname = f"{prefix}-{i + 1:05d}-of-00003.{ext}"
            chunk = {n: sd[n] for n in part}
            if ext == "safetensors":
                save_file(chunk, str(path / fname))
            else:
                torch.save(chunk, path / fname)
            weight_map.update({n: fname for n in part})
        index = {"metadata": {}, "weight_map": weight_map}
        (path / f"{prefix}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(layout)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, path / "tokenizer.json")
    return path


# ------------------------------------------------------------------ NeoX pipeline checkpoints

# The inverse of the merge rules: how the released 20B's tensors are spread over ranks.
_SPLIT = {
    "attention.query_key_value.weight": "split0",
    "attention.query_key_value.bias": "split0",
    "mlp.dense_h_to_4h.weight": "split0",
    "mlp.dense_h_to_4h.bias": "split0",
    "attention.dense.weight": "split1",
    "mlp.dense_4h_to_h.weight": "split1",
    "attention.dense.bias": "parts",
    "mlp.dense_4h_to_h.bias": "parts",
    "input_layernorm.weight": "replicate",
    "input_layernorm.bias": "replicate",
    "post_attention_layernorm.weight": "replicate",
    "post_attention_layernorm.bias": "replicate",
}


def split_tp(name: str, t: Tensor, tp: int, gen: torch.Generator) -> list[Tensor]:
    """Split one tensor into ``tp`` rank shards.

    Row-parallel biases get unequal random parts that sum back to the tensor;
    replicated LayerNorms get opposite perturbations (+d on one rank, -d on another)
    that only averaging cancels — so a loader that took rank 0's copy, or summed,
    would fail the parity test.
    """
    rule = next((r for suffix, r in _SPLIT.items() if name.endswith(suffix)), None)
    if name in ("word_embeddings.weight", "final_linear.weight"):
        rule = "split0"
    if name.startswith("norm."):
        rule = "replicate"
    if rule == "split0":
        return [c.clone() for c in t.chunk(tp, dim=0)]
    if rule == "split1":
        return [c.clone() for c in t.chunk(tp, dim=1)]
    if rule == "parts":
        w = torch.rand(tp, generator=gen) + 0.5
        w = w / w.sum()
        return [t * wi for wi in w]
    if rule == "replicate":
        if tp == 1:
            return [t.clone()]
        d = torch.randn(t.shape, generator=gen) * 0.05
        deltas = [d, -d] + [torch.zeros_like(t)] * (tp - 2)
        return [t + di for di in deltas]
    raise KeyError(name)


def write_neox_checkpoint(
    model, root: Path, tokenizer: Path, *, tp: int, step: int = 10,
    divisible_by: int = 128, split_yaml: bool = True, seed: int = 0,
) -> Path:
    """Write ``model`` as a GPT-NeoX pipeline checkpoint + YAML config; return the YAML
    path (a directory of two YAMLs when ``split_yaml``, as NeoX configs often are).

    The HF model's vocabulary must already be the NeoX-padded size:
    ``pad_vocab(tokenizer ids, divisible_by * tp)``.
    """
    cfg = model.config
    L = cfg.num_hidden_layers
    sd = hf_state(model)
    gen = torch.Generator().manual_seed(seed)
    step_dir = root / "ckpt" / f"global_step{step}"
    step_dir.mkdir(parents=True)
    (root / "ckpt" / "latest").write_text(f"global_step{step}\n")

    def save(idx: int, tensors: dict[str, Tensor]) -> None:
        shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
        for name, t in tensors.items():
            pieces = ([t.clone()] * tp if name.endswith("inv_freq")
                      else split_tp(name, t, tp, gen))
            for r in range(tp):
                shards[r][name] = pieces[r]
        for r in range(tp):
            torch.save(shards[r], step_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")

    save(0, {"word_embeddings.weight": sd["gpt_neox.embed_in.weight"]})
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rot = int(head_dim * cfg.rope_parameters["partial_rotary_factor"])
    for i in range(L):
        prefix = f"gpt_neox.layers.{i}."
        block = {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
        # NeoX saves its rotary buffer in every block; loaders must ignore it.
        block["attention.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, rot, 2).float() / rot))
        save(i + 2, block)
    save(L + 3, {"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                 "norm.bias": sd["gpt_neox.final_layer_norm.bias"]})
    if cfg.tie_word_embeddings:
        save(L + 4, {"word_embeddings.weight": sd["gpt_neox.embed_in.weight"]})
    else:
        save(L + 4, {"final_linear.weight": sd["embed_out.weight"]})
    # mp_rank files hold optimizer/engine state in real checkpoints, no weights.
    torch.save({"iteration": step}, step_dir / "mp_rank_00_model_states.pt")

    act = cfg.hidden_act
    model_args = {
        "num-layers": L,
        "hidden_size": cfg.hidden_size,  # underscore and hyphen keys both occur in the wild
        "num-attention-heads": cfg.num_attention_heads,
        "seq-length": cfg.max_position_embeddings,
        "max-position-embeddings": cfg.max_position_embeddings,
        "pos-emb": "rotary",
        "rotary_pct": cfg.rope_parameters["partial_rotary_factor"],
        "rotary-emb-base": cfg.rope_parameters["rope_theta"],
        "gpt_j_residual": cfg.use_parallel_residual,
        "activation": "gelu" if act.startswith("gelu") else act,
        "bias-gelu-fusion": act in ("gelu_fast", "gelu_new"),
        "layernorm-epsilon": cfg.layer_norm_eps,
        "no-weight-tying": not cfg.tie_word_embeddings,
        "norm": "layernorm",
    }
    if cfg.intermediate_size != 4 * cfg.hidden_size:
        model_args["intermediate_size"] = cfg.intermediate_size
    run_args = {
        "model-parallel-size": tp,
        "pipe-parallel-size": 2,
        "make_vocab_size_divisible_by": divisible_by,
        "vocab-file": str(tokenizer),
        "load": str(root / "ckpt"),
        "attention-config": [[["global"], L]],
    }
    conf = root / "configs"
    conf.mkdir()
    if split_yaml:
        _write_yaml(conf / "model.yml", model_args)
        _write_yaml(conf / "run.yml", run_args)
        return conf
    _write_yaml(conf / "neox.yml", {**model_args, **run_args})
    return conf / "neox.yml"


def _write_yaml(path: Path, d: dict[str, Any]) -> None:
    # NeoX configs are JSON-ish YAML with comments; write that style.
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
    path.write_text(f"# GPT-NeoX config written by neoxq tests\n{{\n{body},\n}}\n")
