"""The GPT-NeoX network, and nothing else.

Tokens travel flattened: a forward pass takes ``N`` tokens (from any number of
sequences, packed back to back) with their positions, and an *attention backend*
that knows which tokens see which and owns the KV cache. The network itself is
cache-agnostic, so the same module serves HF-parity tests (:class:`DenseAttention`),
the paged continuous-batching engine and pipeline stages (which hold a
contiguous run of layers, see ``layer_range``).

Parameter names are neoxq's own; checkpoint names are translated in ``loaders.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.config import TANH_GELUS, NeoXConfig
from models.fused import add_norms, rotate_half_torch, split_rotate
from models.kernel_check import kernels_ok

# An attention's inputs: q, k, v (N, n_heads, head_dim); k and v None where the backend
# stored them and reads them back from its cache.
QKV = tuple[Tensor, Tensor | None, Tensor | None]


class AttentionBackend(Protocol):
    """Computes attention for one layer and keeps whatever cache it needs.

    :meth:`inputs` turns a layer's fused projection into q, k and v, ``(N, n_heads,
    head_dim)`` for the N tokens of this forward pass, q and k rotated; ``__call__``
    attends with them (the result has the same shape as ``q``). A cached backend may
    store k and v while it splits them and return None for those it does not need
    again.
    """

    def inputs(self, layer: int, qkv: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
               ) -> QKV: ...

    def __call__(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None,
                 ) -> Tensor: ...


class Uncached:
    """What the cacheless backends share: q, k, v split and rotated, nothing stored."""

    def inputs(self, layer: int, qkv: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
               ) -> QKV:
        return rotary.split_rotate(qkv, cos, sin)


class DenseAttention(Uncached):
    """Causal attention over a padded ``(B, S)`` batch with no cache.

    ``attention_mask`` (B, S) marks real tokens with 1; padding may sit on either
    side. Used for HF-parity tests and whole-sequence scoring.
    """

    def __init__(self, batch: int, seq: int, attention_mask: Tensor | None = None) -> None:
        self.batch, self.seq = batch, seq
        self.mask: Tensor | None = None
        if attention_mask is not None:
            keep = attention_mask.bool()  # (B, S)
            causal = torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
            mask = causal[None] & keep[:, None, :]  # (B, S_q, S_k)
            # A query that is itself padding would see nothing and give NaN; let it
            # see itself so the (ignored) output stays finite.
            mask |= torch.eye(seq, dtype=torch.bool, device=keep.device)[None]
            self.mask = mask[:, None]  # (B, 1, S_q, S_k)

    def __call__(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None,
                 ) -> Tensor:
        assert k is not None and v is not None
        b, s = self.batch, self.seq
        nh, hd = q.shape[1], q.shape[2]
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hd)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(b * s, nh, hd)  # (N, nh, hd)


class PackedAttention(Uncached):
    """Causal attention over a ``(B, S)`` batch of rows that each pack several documents.

    ``segments`` (B, S) numbers the documents of each row (0, 1, ... along the row;
    trailing padding is -1, and sees only padding): a token sees the earlier tokens of its
    own document only, so packing never lets one training example attend to another.
    Rows holding a single document (plus padding) take the plain causal path, which is
    flash attention on CUDA; otherwise one block-diagonal causal mask is built per batch.
    """

    def __init__(self, segments: Tensor) -> None:
        self.batch, self.seq = segments.shape
        self.mask: Tensor | None = None
        # Padding follows the real tokens, so with one document per row causal is exact
        # for every real token (padding outputs are never scored).
        real = segments >= 0
        first = segments[:, :1]
        if not bool(((segments == first) | ~real).all()):
            same = segments[:, :, None] == segments[:, None, :]  # (B, S_q, S_k)
            causal = torch.ones(self.seq, self.seq, dtype=torch.bool,
                                device=segments.device).tril()
            self.mask = (same & causal[None])[:, None]  # (B, 1, S_q, S_k)

    def __call__(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None,
                 ) -> Tensor:
        assert k is not None and v is not None
        b, s = self.batch, self.seq
        nh, hd = q.shape[1], q.shape[2]
        q, k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hd)
        if self.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.transpose(1, 2).reshape(b * s, nh, hd)  # (N, nh, hd)


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rotary_dim`` dims, "rotate half" style."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.dim = config.rotary_dim
        self.base = config.rotary_base
        self.max_position = config.max_position
        self._cache: tuple[Tensor, Tensor] | None = None

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0].device != device:
            # fp32 tables, as HF computes them; cast to the activation dtype on use.
            inv_freq = 1.0 / (
                self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64,
                                           device=device).float() / self.dim)
            )
            t = torch.arange(self.max_position, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # (P, dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, dim)
            self._cache = (emb.cos(), emb.sin())
        return self._cache

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = self._table(positions.device)
        # (N, 1, dim): broadcast over heads
        return cos[positions].to(dtype)[:, None], sin[positions].to(dtype)[:, None]

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (N, nh, hd); rotate the first ``dim`` channels. (Not ``apply``: that name is
        ``nn.Module.apply(fn)``, which DeepSpeed and other tools call on every submodule.)"""
        return rotate_half_torch(x, cos, sin, self.dim)

    def split_rotate(self, qkv: Tensor, cos: Tensor, sin: Tensor,
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The fused projection (N, nh, 3, hd) -> contiguous (N, nh, hd) q, k, v with q
        and k rotated (one kernel on CUDA, see :mod:`models.fused`)."""
        return split_rotate(qkv, cos, sin, self.dim)


class Attention(nn.Module):
    def __init__(self, config: NeoXConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h, bias=config.attention_bias)
        self.dense = nn.Linear(h, h, bias=config.attention_bias)

    def forward(
        self, x: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor, attn: AttentionBackend
    ) -> Tensor:
        return self.attend(self.query_key_value(x), rotary, cos, sin, attn)

    def attend(self, qkv: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
               attn: AttentionBackend) -> Tensor:
        """The rest of :meth:`forward` after the QKV projection ``qkv`` (N, 3H)."""
        return self.finish(self.prepare(qkv, rotary, cos, sin, attn), attn)

    def prepare(self, qkv: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
                attn: AttentionBackend) -> QKV:
        """The attention's inputs from the projection ``qkv`` (N, 3H): q, k and v split
        out and rotated (and, with a cache, k and v stored), as ``attn`` does it."""
        n = qkv.shape[0]
        # The fused projection is interleaved per head: [q_h, k_h, v_h] for each head h.
        return attn.inputs(self.layer, qkv.view(n, self.num_heads, 3, self.head_dim),
                           rotary, cos, sin)

    def finish(self, qkv: QKV, attn: AttentionBackend) -> Tensor:
        """Attention over :meth:`prepare`'s inputs and the output projection."""
        q, k, v = qkv
        out = attn(self.layer, q, k, v)  # (N, nh, hd)
        return self.dense(out.reshape(out.shape[0], self.num_heads * self.head_dim))




class MLP(nn.Module):
    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = config.hidden_act
        # The tanh GELU as the first GEMM's epilogue on CUDA (see fuses_up), for inputs
        # of up to fused_gelu_max_rows rows (None: any).
        self.fused_gelu = True
        self.fused_gelu_max_rows: int | None = None

    def fuses_up(self, x: Tensor) -> bool:
        """Whether the up-projection and its tanh GELU run as one cuBLASLt GEMM with a
        GELU epilogue: the activation applied to the fp32 accumulator in registers, so the
        4x-wide intermediate is written once instead of written, read and written again.
        At every row count by default: at the 20B's shape on an H200 the fused GEMM
        took 0.92-0.96x the time of GEMM + GELU at decode sizes, and at 4,096 rows 0.97x
        one day and 1.09x another in isolation (``bench.gelu_epilogue``), but in place,
        prefill steps included, workload (a) ran 1.006x faster with it at every size
        than at decode sizes only (the same engine, ``bench.throughput --variants
        gelu_rows=512``). The epilogue's GELU is the tanh approximation, so only for
        models that use it; plain ``nn.Linear`` only (FP8 or LoRA-wrapped projections
        keep their own forward), no autograd."""
        up = self.dense_h_to_4h
        rows = self.fused_gelu_max_rows
        return (self.fused_gelu and self.act in TANH_GELUS and x.is_cuda and x.dim() == 2
                and (rows is None or x.shape[0] <= rows)
                and type(up) is nn.Linear and up.bias is not None
                and x.dtype == up.weight.dtype
                and not (torch.is_grad_enabled()
                         and (x.requires_grad or up.weight.requires_grad))
                and gelu_epilogue_ok(x.device))

    def forward(self, x: Tensor) -> Tensor:
        if self.fuses_up(x):
            up = self.dense_h_to_4h
            return self.dense_4h_to_h(
                torch._addmm_activation(up.bias, x, up.weight.t(), use_gelu=True))
        x = self.dense_h_to_4h(x)
        if self.act in TANH_GELUS:
            x = F.gelu(x, approximate="tanh")
        elif self.act == "gelu":
            x = F.gelu(x)
        elif self.act == "relu":
            x = F.relu(x)
        else:
            x = F.silu(x)
        return self.dense_4h_to_h(x)


def gelu_epilogue_check(device: torch.device) -> bool:
    """``torch._addmm_activation(..., use_gelu=True)`` computes the tanh GELU on
    ``device`` (its CPU version computes the exact one; which one a GPU build's epilogue
    computes is checked, not assumed): in float32, where the two differ measurably, and
    in bfloat16 within rounding of the unfused ops."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(48, 64, generator=g, device=device)
    w = torch.randn(96, 64, generator=g, device=device) * 0.25
    b = torch.randn(96, generator=g, device=device)
    ok = True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        got = torch._addmm_activation(bd, xd, wd.t(), use_gelu=True).float()
        z = F.linear(xd.float(), wd.float(), bd.float())
        tanh_err = (got - F.gelu(z, approximate="tanh")).abs().max().item()
        erf_err = (got - F.gelu(z)).abs().max().item()
        ok = ok and tanh_err <= tol * z.abs().max().item() and (
            dtype != torch.float32 or tanh_err * 10 < erf_err)
    return ok


def gelu_epilogue_ok(device: torch.device) -> bool:
    """Whether :class:`MLP` may fuse its tanh GELU into the up-projection on ``device``
    (checked once per device, before any CUDA graph capture; see kernels_ok)."""
    return kernels_ok("GELU GEMM epilogue", device, gelu_epilogue_check)


FORKS = ("input", "qkv", "attn")


class BranchPlan(NamedTuple):
    """How a parallel-residual block's MLP runs beside its attention in a decode step.

    A decode step's attention is bound by reading the KV cache and its MLP by tensor-core
    math, so the two can share the GPU. ``fork``: where the MLP branch starts, with the
    block (``"input"``: its first GEMM beside the QKV one) or after the QKV projection
    (``"qkv"``: both MLP GEMMs beside the attention kernel) or once the attention's
    inputs are split out and stored (``"attn"``: the attention kernel and the first MLP
    GEMM become ready together). ``free_sms``: streaming multiprocessors the MLP's GEMMs
    leave free (cuBLASLt's SM count target), so that the attention runs there meanwhile
    instead of waiting for a GEMM holding every SM. ``mlp_first``: the MLP stream has the
    higher priority (CUDA graphs keep a kernel's capture-time stream priority), so its
    GEMM's blocks are placed before the attention's. ``attn_first``: the block's own
    stream has the higher priority instead, so every attention program is placed before
    any MLP GEMM block and the GEMM's blocks take the multiprocessors the attention's
    last wave leaves idle (a GEMM block needs a whole multiprocessor's registers, so it
    starts on one only once the attention has left it). ``everywhere``: every decode
    graph uses the branch stream; by default a
    batch size whose graph, timed at capture, runs faster with each block in order on one
    stream is captured that way (two GEMMs sharing the SMs help or hurt depending on how
    their tiles fill them: on an H200 at the 20B's shapes the stream saves ~1 ms a step
    below 176 rows and costs 1.5-2 ms at 192 and 240-256).
    """

    fork: str = "input"
    free_sms: int = 0
    mlp_first: bool = False
    everywhere: bool = False
    attn_first: bool = False

    def check(self) -> BranchPlan:
        if self.fork not in FORKS:
            raise ValueError(f"branch fork: one of {', '.join(FORKS)}, got {self.fork!r}")
        if self.free_sms < 0:
            raise ValueError(f"branch free_sms: >= 0, got {self.free_sms}")
        if self.mlp_first and self.attn_first:
            raise ValueError("branch plan: mlp-first or attn-first, not both")
        return self

    @classmethod
    def parse(cls, spec: str) -> BranchPlan:
        """``FORK[/FREE_SMS][/mlp-first|/attn-first][/everywhere]``, e.g. ``qkv/32``,
        ``input/0/mlp-first`` or ``attn/0/attn-first``."""
        fork, *rest = spec.split("/")
        flags = [p for p in rest if p in BRANCH_FLAGS]
        numbers = [p for p in rest if p not in BRANCH_FLAGS]
        try:
            free = int(numbers[0]) if numbers else 0
        except ValueError:
            free = -1
        in_order = rest == numbers + [f for f in BRANCH_FLAGS if f in flags]
        if free < 0 or len(numbers) > 1 or not in_order:
            raise ValueError(f"branch plan {spec!r}: "
                             "FORK[/FREE_SMS][/mlp-first|/attn-first][/everywhere]")
        return cls(fork, free, "mlp-first" in flags, "everywhere" in flags,
                   "attn-first" in flags).check()

    def __str__(self) -> str:
        return (f"{self.fork}/{self.free_sms}" + ("/mlp-first" if self.mlp_first else "")
                + ("/attn-first" if self.attn_first else "")
                + ("/everywhere" if self.everywhere else ""))


BRANCH_FLAGS = ("mlp-first", "attn-first", "everywhere")


class Branches(NamedTuple):
    """A :class:`BranchPlan` and the MLP branch's stream (None: run on the current
    stream, in the plan's order — how CPU tests exercise the path)."""

    stream: torch.cuda.Stream | None
    plan: BranchPlan = BranchPlan()


@contextmanager
def gemm_sm_carveout(sms: int) -> Iterator[None]:
    """cuBLAS(Lt) GEMMs launched (or captured) inside leave ``sms`` multiprocessors
    free; no-op for 0 or where this torch build has no such setting."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    if sms <= 0 or setter is None or getter is None:
        yield
        return
    before = getter()
    setter(sms)
    try:
        yield
    finally:
        setter(before)


class Block(nn.Module):
    def __init__(self, config: NeoXConfig, layer: int) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = Attention(config, layer)
        self.mlp = MLP(config)
        self.parallel = config.parallel_residual

    def forward(
        self, x: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor, attn: AttentionBackend,
        side: Branches | None = None,
    ) -> Tensor:
        """``side``: with the parallel residual, run the MLP branch beside the attention
        (see :class:`Branches`); the result is the same sum in the same order."""
        if self.parallel:
            # GPT-J style: both branches read the same input.
            a, m = self.branches(self.input_layernorm(x), self.post_attention_layernorm(x),
                                 rotary, cos, sin, attn, side)
            return x + a + m
        x = x + self.attention(self.input_layernorm(x), rotary, cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))

    def branches(self, h1: Tensor, h2: Tensor, rotary: Rotary, cos: Tensor, sin: Tensor,
                 attn: AttentionBackend, side: Branches | None = None,
                 ) -> tuple[Tensor, Tensor]:
        """A parallel-residual block's attention of ``h1`` (its input LayerNorm's output)
        and MLP of ``h2`` (the other LayerNorm's), on two streams as ``side`` says."""
        if side is None:
            return self.attention(h1, rotary, cos, sin, attn), self.mlp(h2)
        main = torch.cuda.current_stream(h1.device) if side.stream is not None else None
        attention = self.attention
        qkv = prepared = None
        if side.plan.fork in ("qkv", "attn"):
            qkv = attention.query_key_value(h1)
        if side.plan.fork == "attn":
            prepared = attention.prepare(qkv, rotary, cos, sin, attn)
        if side.stream is not None:
            side.stream.wait_stream(main)
        with torch.cuda.stream(side.stream), gemm_sm_carveout(side.plan.free_sms):
            m = self.mlp(h2)
        if qkv is None:
            qkv = attention.query_key_value(h1)
        if prepared is None:
            prepared = attention.prepare(qkv, rotary, cos, sin, attn)
        a = attention.finish(prepared, attn)
        if side.stream is not None:
            main.wait_stream(side.stream)
        return a, m


class NeoX(nn.Module):
    """GPT-NeoX decoder, or a contiguous slice of it (a pipeline stage).

    ``layer_range=(start, stop)`` keeps only blocks ``start..stop-1``; the embedding
    lives with the slice that starts at 0 and the final norm and head with the
    one that ends at ``num_layers``. Blocks keep their global index in their name
    (``layers.17.…``) so a stage's parameter names are a subset of the full model's.
    """

    def __init__(self, config: NeoXConfig, layer_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        start, stop = layer_range or (0, config.num_layers)
        if not 0 <= start <= stop <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} outside 0..{config.num_layers}")
        self.layer_range = (start, stop)
        self.has_embedding = start == 0
        self.has_head = stop == config.num_layers
        h = config.hidden_size
        if self.has_embedding:
            self.embed_in = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(start, stop)})
        if self.has_head:
            self.final_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
            self.embed_out = nn.Linear(h, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        # Training turns this on to recompute each block's activations during the backward
        # pass instead of keeping them (activation checkpointing); inference never needs it.
        self.checkpoint_blocks = False
        # Inference on CUDA: residual sums and the next block's norms fused (run_layers_fused).
        self.fused_norms = True
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head with the input embedding when the config ties them."""
        if self.config.tie_embeddings and self.has_embedding and self.has_head:
            self.embed_out.weight = self.embed_in.weight

    def embed(self, tokens: Tensor) -> Tensor:
        """(N,) token ids -> (N, H) hidden states."""
        return self.embed_in(tokens)

    def run_layers(self, x: Tensor, positions: Tensor, attn: AttentionBackend,
                   side: Branches | None = None) -> Tensor:
        """(N, H) hidden states through this module's blocks (``side``: see
        :meth:`Block.forward`)."""
        if (self.fused_norms and self.layers and self.config.parallel_residual and x.is_cuda
                and not torch.is_grad_enabled()):
            return self.run_layers_fused(x, positions, attn, side)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for block in self.layers.values():
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, self.rotary, cos, sin, attn, use_reentrant=False)
            else:
                x = block(x, self.rotary, cos, sin, attn, side)
        return x

    def run_layers_fused(self, x: Tensor, positions: Tensor, attn: AttentionBackend,
                         side: Branches | None = None) -> Tensor:
        """:meth:`run_layers` of parallel-residual blocks with each block's residual sum
        and the next block's two LayerNorms in one kernel (:func:`models.fused.add_norms`,
        which runs torch ops where its kernel does not run): the same numbers up to the
        norms' last bit. What run_layers does for inference on CUDA."""
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        blocks = list(self.layers.values())
        first = blocks[0]
        x, h1, h2 = add_norms(x, None, None, first.input_layernorm,
                              first.post_attention_layernorm)
        for block, nxt in zip(blocks, blocks[1:], strict=False):
            a, m = block.branches(h1, h2, self.rotary, cos, sin, attn, side)
            x, h1, h2 = add_norms(x, a, m, nxt.input_layernorm, nxt.post_attention_layernorm)
        a, m = blocks[-1].branches(h1, h2, self.rotary, cos, sin, attn, side)
        return x + a + m

    def head(self, x: Tensor) -> Tensor:
        """(N, H) -> (N, V) logits."""
        return self.embed_out(self.final_layer_norm(x))

    def forward(self, x: Tensor, positions: Tensor, attn: AttentionBackend) -> Tensor:
        """Token ids (first stage) or hidden states in; logits (last stage) or hidden out."""
        if self.has_embedding:
            x = self.embed(x)
        x = self.run_layers(x, positions, attn)
        return self.head(x) if self.has_head else x

    @torch.no_grad()
    def dense_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits for a padded (B, S) batch, no cache: the HF-parity entry point.

        Positions count real tokens only (as HF ``generate`` does), so left padding
        leaves every sequence's numbers unchanged.
        """
        b, s = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        attn = DenseAttention(b, s, attention_mask)
        logits = self(input_ids.reshape(-1), positions.reshape(-1), attn)
        return logits.view(b, s, -1)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in _unique(self.parameters()))


def _unique(params: Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def init_random_(model: NeoX, seed: int = 0, std: float = 0.02) -> NeoX:
    """Fill a materialised model with seeded random weights (GPT-NeoX's init shapes).

    Normal(0, std) for matrices and embeddings; the two output projections of each
    block are scaled by 1/sqrt(2 * layers) as in GPT-NeoX's "wang_init" so that
    activations stay bounded in deep random models. LayerNorms start at (1, 0).
    """
    out_std = std / math.sqrt(2 * model.config.num_layers)
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                # One generator per device, drawn on that device: the 20B's 41 GB
                # fill in seconds on a GPU instead of minutes through host RAM.
                g = generators.get(p.device)
                if g is None:
                    g = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                s = out_std if name.endswith(("dense.weight", "dense_4h_to_h.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * s)
    return model
