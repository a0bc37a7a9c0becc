"""GPT-NeoX architecture configuration: one typed dataclass plus named presets.

Every Hugging Face ``GPTNeoXForCausalLM`` config and every GPT-NeoX YAML maps onto
:class:`NeoXConfig`; the network never reads a foreign key name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Activations the network implements. HF's "gelu_fast", "gelu_new" and
# "gelu_pytorch_tanh" are all the tanh approximation of GELU.
TANH_GELUS = frozenset({"gelu_fast", "gelu_new", "gelu_pytorch_tanh", "gelu_tanh"})
ACTIVATIONS = TANH_GELUS | {"gelu", "relu", "silu"}


@dataclass(frozen=True)
class NeoXConfig:
    """Shape and switches of a GPT-NeoX network. Defaults are GPT-NeoX-20B's."""

    name: str = "custom"
    # Embedding rows. The 20B tokenizer has 50277 ids; NeoX pads the table to a
    # multiple of 128 x tensor-parallel degree (2) = 50432 so shards split evenly.
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_layers: int = 44
    num_heads: int = 64
    # 4 x hidden in every released NeoX/Pythia model.
    intermediate_size: int = 24576
    # Rotary embedding covers the first 25% of each head's dims (24 of 96 for 20B).
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    # Longest context the model was trained on; prompts + completions must fit.
    max_position: int = 2048
    layer_norm_eps: float = 1e-5
    # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J style) when True; sequential otherwise.
    parallel_residual: bool = True
    hidden_act: str = "gelu_fast"
    # 20B and Pythia keep separate input/output embeddings.
    tie_embeddings: bool = False
    attention_bias: bool = True
    eos_token_id: int = 0
    bos_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dims per head must be even, got {self.rotary_dim}")
        for field in ("vocab_size", "num_layers", "intermediate_size", "max_position"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        # HF and NeoX both truncate: int(head_dim * rotary_pct).
        return int(self.head_dim * self.rotary_pct)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token at 2 bytes per element (bf16/fp16)."""
        return 2 * self.num_layers * self.hidden_size * 2

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv_bias = 3 * h if self.attention_bias else 0
        dense_bias = h if self.attention_bias else 0
        block = (
            4 * h  # two LayerNorms
            + 3 * h * h + qkv_bias
            + h * h + dense_bias
            + h * f + f
            + f * h + h
        )
        head = 0 if self.tie_embeddings else v * h
        return v * h + self.num_layers * block + 2 * h + head

    def replace(self, **changes: Any) -> NeoXConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NeoXConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown NeoXConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "hf") -> NeoXConfig:
        """Build from a Hugging Face ``GPTNeoXConfig`` dict (transformers 4.x or 5.x keys)."""
        model_type = d.get("model_type", "gpt_neox")
        if model_type != "gpt_neox":
            raise ValueError(f"config.json has model_type {model_type!r}, expected 'gpt_neox'")
        try:
            hidden = int(d["hidden_size"])
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            rotary_pct = d.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
            rotary_base = d.get("rotary_emb_base", rope.get("rope_theta", d.get("rope_theta")))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", None):
                raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
            return cls(
                name=name,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d.get("intermediate_size") or 4 * hidden),
                rotary_pct=float(rotary_pct),
                rotary_base=float(rotary_base if rotary_base is not None else 10000.0),
                max_position=int(d.get("max_position_embeddings", 2048)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
                parallel_residual=bool(d.get("use_parallel_residual", True)),
                hidden_act=str(d.get("hidden_act", "gelu")),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", True)),
                eos_token_id=_first_id(d.get("eos_token_id"), 0),
                bos_token_id=_first_id(d.get("bos_token_id"), 0),
            )
        except KeyError as exc:
            raise ValueError(f"HF config is missing required key {exc.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A transformers ``GPTNeoXConfig`` dict (4.x keys, which 5.x still reads)."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "max_position_embeddings": self.max_position,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.parallel_residual,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
        }


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, list):
        return int(value[0]) if value else default
    return int(value)


def pad_vocab(n_tokens: int, multiple: int) -> int:
    """Round a tokenizer size up to the embedding size NeoX allocates."""
    return int(math.ceil(n_tokens / multiple) * multiple)


def _pythia(name: str, layers: int, hidden: int, heads: int, vocab: int = 50304) -> NeoXConfig:
    return NeoXConfig(
        name=name,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",  # Pythia uses exact GELU, unlike the 20B's tanh approximation
    )


PRESETS: dict[str, NeoXConfig] = {
    "gpt-neox-20b": NeoXConfig(name="gpt-neox-20b"),
    "pythia-70m": _pythia("pythia-70m", 6, 512, 8),
    "pythia-160m": _pythia("pythia-160m", 12, 768, 12),
    "pythia-410m": _pythia("pythia-410m", 24, 1024, 16),
    "pythia-1b": _pythia("pythia-1b", 16, 2048, 8),
    "pythia-1.4b": _pythia("pythia-1.4b", 24, 2048, 16),
    "pythia-2.8b": _pythia("pythia-2.8b", 32, 2560, 32),
    "pythia-6.9b": _pythia("pythia-6.9b", 32, 4096, 32, vocab=50432),
    "pythia-12b": _pythia("pythia-12b", 36, 5120, 40, vocab=50688),
    # Tiny shapes for tests and the embedded demo. The vocabulary covers the real
    # 20B tokenizer (50277 ids) so the same model serves byte-level and BPE text.
    "tiny": NeoXConfig(
        name="tiny", vocab_size=50304, hidden_size=64, num_layers=2, num_heads=4,
        intermediate_size=256, max_position=512,
    ),
    "tiny-sequential": NeoXConfig(
        name="tiny-sequential", vocab_size=50304, hidden_size=64, num_layers=3, num_heads=4,
        intermediate_size=256, max_position=512, parallel_residual=False, hidden_act="gelu",
        rotary_pct=0.5, rotary_base=500.0,
    ),
    "small": NeoXConfig(
        name="small", vocab_size=50304, hidden_size=256, num_layers=4, num_heads=8,
        intermediate_size=1024, max_position=2048,
    ),
}


def get_preset(name: str) -> NeoXConfig:
    """Return the named preset; an unknown name is an error, never a guess."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
