"""FP8 accuracy against the unquantized model, measured through the engine.

For each mode — ``fp8-kv`` (FP8 KV cache), ``fp8-weights`` (FP8 linear layers), ``fp8-all``
(both) — against the same weights in the run's dtype (bf16 on the GPU), on held-out
tinyshakespeare text (the last 10%, GPT-NeoX-20B tokenizer):

1. ``random_20b``: the 20B shape with seeded random weights (no pretrained weights can be
   downloaded here), a few hundred held-out tokens;
2. ``trained_small``: a Pythia-160M-shaped model trained from scratch for a few hundred
   steps on the first 90% (plain torch: AdamW, bf16 autocast; about a minute on a GPU),
   evaluated on held-out sequences.

Per mode: mean and max absolute logit difference, top-1 agreement of the logits' argmax
and perplexity of the held-out tokens, all from teacher-forced logits of the engine's
score path (``Engine.score``; the head's output caught by a hook) — each sequence
prefilled in chunks of ``--chunk`` tokens, so later chunks read
keys and values back from the (FP8) cache and every linear layer runs as the mode says
(``torch._scaled_mm`` on FP8 GPUs). Plus greedy agreement: the share of tokens a greedy
generation reproduces before its first departure from the unquantized one (decode
steps: the Triton kernel reading the FP8 cache, CUDA graphs).

    python -m bench.fp8_accuracy --out bench/results/fp8_accuracy.json   # one H200, ~2 min
    python -m bench.fp8_accuracy --small --device cpu --out /tmp/acc.json  # test-sized
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import git_commit
from bench.throughput import MODES
from models.config import get_preset
from models.engine import Engine
from models.fp8 import quantize_fp8_
from models.model import DenseAttention, NeoX
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer, load_tokenizer

T0 = time.time()
COMPARED = ("fp8-kv", "fp8-weights", "fp8-all")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def split_text(path: Path, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(train, held-out) token ids: the first 90% of the text's characters, the rest."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return list(tokenizer.encode(text[:cut])), list(tokenizer.encode(text[cut:]))


def held_out_sequences(ids: list[int], num: int, length: int) -> list[list[int]]:
    """``num`` consecutive, non-overlapping ``length``-token windows of the held-out ids."""
    if len(ids) < num * length:
        raise SystemExit(f"held-out text has {len(ids)} tokens, {num} x {length} asked")
    return [ids[i * length: (i + 1) * length] for i in range(num)]


# --------------------------------------------------------------------------------------
# Training the small model (plain torch)
# --------------------------------------------------------------------------------------


def train_small(model: NeoX, ids: list[int], *, steps: int, batch: int, seq: int,
                lr: float, seed: int) -> dict[str, Any]:
    """Train ``model`` in place on random windows of ``ids`` (next-token loss)."""
    device = next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=cuda)
    warm = max(1, steps // 10)

    def at(step: int) -> float:  # linear warm-up, cosine to 10%
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, at)
    positions = torch.arange(seq, device=device).repeat(batch)
    attn = DenseAttention(batch, seq)
    model.train()
    losses = []
    t = time.time()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g, device=device)
        rows = starts[:, None] + torch.arange(seq + 1, device=device)[None]
        x, y = data[rows[:, :-1]], data[rows[:, 1:]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x.reshape(-1), positions, attn)  # (B*S, V)
        loss = F.cross_entropy(logits.float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return {"steps": steps, "batch": batch, "seq": seq, "learning_rate": lr,
            "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.time() - t}


# --------------------------------------------------------------------------------------
# Through the engine
# --------------------------------------------------------------------------------------


def engine_logits(engine: Engine, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Teacher-forced logits (len - 1, V) of each sequence from ``Engine.score``: the
    output head's rows of each step, caught by a forward hook. One sequence per call,
    so every row the head computes is that sequence's next position."""
    head = engine.model.embed_out
    rows: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, out: rows.append(out.float()))
    try:
        out = []
        for s in seqs:
            rows.clear()
            engine.score([([s[0]], s[1:])])
            got = torch.cat(rows)
            if got.shape[0] != len(s) - 1:
                raise RuntimeError(f"score path gave {got.shape[0]} logit rows for "
                                   f"{len(s) - 1} positions")
            out.append(got)
    finally:
        hook.remove()
    return out


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.samples[0].token_ids for o in engine.generate(prompts, params)]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], seqs: list[list[int]],
            vocab: int) -> dict[str, float]:
    """Logit differences, top-1 agreement and perplexity of ``got`` (against ``ref``)."""
    total = abs_sum = 0.0
    worst = 0.0
    agree = 0
    nll = 0.0
    for r, g, s in zip(ref, got, seqs, strict=True):
        r, g = r[:, :vocab], g[:, :vocab]  # the tokenizer's ids (not the padded rows)
        diff = (g - r).abs()
        abs_sum += float(diff.sum(dtype=torch.float64))
        worst = max(worst, float(diff.max()))
        total += diff.numel()
        agree += int((g.argmax(-1) == r.argmax(-1)).sum())
        targets = torch.tensor(s[1:], device=g.device)
        nll += float(F.cross_entropy(g, targets, reduction="sum"))
    positions = sum(len(s) - 1 for s in seqs)
    return {"mean_abs_logit_diff": abs_sum / total, "max_abs_logit_diff": worst,
            "top1_agreement": agree / positions, "perplexity": math.exp(nll / positions)}


def agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """Share of tokens generated before each sequence's first departure from ``ref``."""
    same = 0
    for a, b in zip(ref, got, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
    return same / sum(len(a) for a in ref)


def evaluate_modes(model: NeoX, seqs: list[list[int]], args: argparse.Namespace,
                   vocab: int, in_place: bool) -> dict[str, Any]:
    """Every mode on ``model``'s weights: the unquantized first, then FP8. ``in_place``
    quantizes ``model`` itself for the weight modes (the 20B: no room for a copy)."""
    device = next(model.parameters()).device
    prompt_len = min(len(s) for s in seqs) // 2
    prompts = [s[:prompt_len] for s in seqs]
    need = sum(len(s) + args.gen_tokens for s in seqs)
    # Room for every sequence at once (+ the null block and slack); no more.
    num_blocks = need // args.block_size + 2 * len(seqs) + 8
    out: dict[str, Any] = {}
    ref_logits: list[torch.Tensor] = []
    ref_tokens: list[list[int]] = []
    quantized: NeoX | None = None
    for mode in ("bf16", *COMPARED):
        kv, quant = MODES[mode]
        net = model
        if quant == "fp8":
            if quantized is None:
                quantized = quantize_fp8_(model if in_place else copy.deepcopy(model))
            net = quantized
        t = time.time()
        engine = Engine(net, None, num_blocks=num_blocks, block_size=args.block_size,
                        max_batch_tokens=args.chunk, max_num_seqs=len(seqs),
                        kv_cache_dtype=kv, tune_kernels=False, mask_padded_vocab=False)
        logits = engine_logits(engine, seqs)
        tokens = greedy(engine, prompts, args.gen_tokens)
        del engine
        gc.collect()
        if mode == "bf16":
            ref_logits, ref_tokens = logits, tokens
        res = compare(ref_logits, logits, seqs, vocab)
        res["greedy_agreement"] = agreement(ref_tokens, tokens)
        res["kv_cache_dtype"], res["quantization"] = kv, quant
        res["weight_bytes"] = net.parameter_bytes()
        res["seconds"] = time.time() - t
        out[mode] = res
        log(f"  {mode}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()
                                       if isinstance(v, float)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out["bf16"]["perplexity"]
    for mode in COMPARED:
        out[mode]["perplexity_ratio"] = out[mode]["perplexity"] / base
    return out


def build(spec: str, device: torch.device, dtype: torch.dtype, seed: int) -> NeoX:
    from models.loaders import random_model

    return random_model(get_preset(spec.removeprefix("preset:")), device=device, dtype=dtype,
                        seed=seed)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--data", type=Path, default=None,
                    help="text to train on and hold out (default: neoxq's tinyshakespeare)")
    ap.add_argument("--small", action="store_true",
                    help="test-sized: tiny shapes, a few steps and tokens (CPU in seconds)")
    ap.add_argument("--parts", default="random_20b,trained_small")
    ap.add_argument("--big-model", default=None, help="default preset:gpt-neox-20b")
    ap.add_argument("--small-model", default=None, help="default preset:pythia-160m")
    ap.add_argument("--big-seqs", type=int, default=None, help="held-out sequences (20B)")
    ap.add_argument("--seqs", type=int, default=None, help="held-out sequences (small)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--chunk", type=int, default=None,
                    help="prefill chunk (max batch tokens): later chunks read the cache")
    ap.add_argument("--gen-tokens", type=int, default=None, help="greedy tokens per sequence")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--train-seq", type=int, default=None)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    small = args.small
    defaults = {
        "big_model": "preset:tiny-sequential" if small else "preset:gpt-neox-20b",
        "small_model": "preset:tiny" if small else "preset:pythia-160m",
        "big_seqs": 2, "seqs": 2 if small else 8, "seq_len": 48 if small else 256,
        "chunk": 16 if small else 96, "gen_tokens": 8 if small else 32,
        "train_steps": 20 if small else 300, "train_batch": 4 if small else 16,
        "train_seq": 32 if small else 256,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    from models.dtypes import canonical_dtype_name

    dtype_name = canonical_dtype_name(args.dtype, device)
    dtype = getattr(torch, dtype_name)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: per-op overhead, which threads add to
    try:
        return _main(args, device, dtype, dtype_name)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          dtype_name: str) -> dict[str, Any]:
    import assets

    data = args.data or assets.TINYSHAKESPEARE
    tokenizer = load_tokenizer(assets.TOKENIZER)
    vocab = tokenizer.vocab_size
    train_ids, held_ids = split_text(data, tokenizer)
    log(f"{data}: {len(train_ids)} training, {len(held_ids)} held-out tokens")
    parts = [p for p in args.parts.split(",") if p]
    result: dict[str, Any] = {
        "commit": git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": dtype_name, "reference_mode": "bf16",
        "note": (f"'bf16' is the unquantized model in {dtype_name}; each FP8 mode is compared "
                 "with it on the same weights and the same held-out tokens"),
        "data": f"{Path(data).name}: first 90% train, last 10% held out; GPT-NeoX-20B "
                "tokenizer",
        "chunk_tokens": args.chunk, "parts": {},
    }

    if "random_20b" in parts:
        seqs = held_out_sequences(held_ids, args.big_seqs, args.seq_len)
        log(f"random_20b: {args.big_model} ({args.big_seqs} x {args.seq_len} held-out tokens)")
        model = build(args.big_model, device, dtype, args.seed)
        modes = evaluate_modes(model, seqs, args, vocab, in_place=True)
        result["parts"]["random_20b"] = {
            "model": f"{args.big_model} (random weights, seed {args.seed})",
            "tokens": sum(len(s) - 1 for s in seqs), "modes": modes}
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write(args.out, result)

    if "trained_small" in parts:
        log(f"trained_small: {args.small_model}, {args.train_steps} steps of "
            f"{args.train_batch} x {args.train_seq} tokens")
        model = build(args.small_model, device, torch.float32, args.seed)
        train = train_small(model, train_ids, steps=args.train_steps, batch=args.train_batch,
                            seq=args.train_seq, lr=args.lr, seed=args.seed)
        log(f"  trained in {train['seconds']:.1f}s: loss {train['first_loss']:.2f} -> "
            f"{train['final_loss']:.2f}")
        model = model.to(dtype)
        seqs = held_out_sequences(held_ids, args.seqs, args.seq_len)
        modes = evaluate_modes(model, seqs, args, vocab, in_place=False)
        result["parts"]["trained_small"] = {
            "model": f"{args.small_model} trained from scratch", "train": train,
            "tokens": sum(len(s) - 1 for s in seqs), "modes": modes}
        _write(args.out, result)
    result["wall_s"] = time.time() - T0
    _write(args.out, result)
    log("done")
    print(table(result))
    return result


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def table(data: dict[str, Any]) -> str:
    """A markdown table of a results file (for the README)."""
    lines = ["| model | mode | mean abs logit diff | max abs logit diff | top-1 agreement "
             "| perplexity (ratio) | greedy agreement |", "|---|---|---|---|---|---|---|"]
    for part, p in data["parts"].items():
        for mode, m in p["modes"].items():
            ratio = m.get("perplexity_ratio")
            lines.append(
                f"| {part} | {mode} | {m['mean_abs_logit_diff']:.4f} | "
                f"{m['max_abs_logit_diff']:.3f} | {m['top1_agreement']:.1%} | "
                f"{m['perplexity']:.3f}" + (f" ({ratio:.4f})" if ratio else "")
                + f" | {m['greedy_agreement']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
