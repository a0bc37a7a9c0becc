"""Engine throughput vs Hugging Face ``generate`` vs the roofline, measured in one run.

Workloads (token ids drawn at random, fixed seed, ``ignore_eos``, greedy):

- (a) 1024 prompts x 128 tokens in, 128 out;
- (b) 2000 prompts, input lengths uniform 16-1024, output uniform 16-512;
- (c) 2000 prompts, each one of 8 shared 1024-token prefixes (picked at random)
  followed by a unique 64-token suffix, 128 out: run three times on the same engine —
  prefix caching on with cascade decode attention (``ours``), prefix caching on without
  cascade (``ours_no_cascade``), prefix caching off (``ours_no_prefix_caching``); ratios
  ``prefix_caching_speedup`` (off / on with cascade), ``cascade_speedup`` (without /
  with) and ``prefix_caching_no_cascade_speedup`` (off / on without cascade).
  ``--no-cascade`` leaves cascade out (``ours`` is then caching without it);
  ``--cascade-eager`` adds a run whose cascade steps run eagerly instead of from their
  CUDA graphs (``ours_cascade_eager``).

Lengths are capped to the model's context (only the tiny smoke models need it).

Per workload: requests/s, output tok/s, total tok/s and peak GPU memory for neoxq's
engine; the same figures for HF ``transformers.generate`` with static batches on a
subset (labelled as such: HF needs minutes where the engine needs seconds), sharing the
engine's weight tensors (zero copy, so the 20B fits once); and the roofline time of the
whole workload from the copy bandwidth and bf16 GEMM rate measured in the same run
(docs/ARCHITECTURE.md, "The engine"): per decode step max(bytes / bandwidth, FLOPs / GEMM rate) with
bytes = weights + the KV of every running sequence, plus prefill FLOPs at the GEMM rate,
with sequences admitted while their final contexts fit in the engine's KV cache.
That whole-step bound lets one kernel's compute hide behind another's memory traffic,
which a step's kernels, run one after another, never do: at ~256 sequences the decode
GEMMs are compute-bound (20B: 10.5 TFLOP, 13 ms at 800 TFLOP/s, against 9.6 ms for the
weight bytes) while attention is bound by KV bytes. So a second figure, ``per_kernel``,
bounds each kernel class on its own and adds them: per decode step max(weight bytes /
bandwidth, GEMM FLOPs / GEMM rate) + max(KV bytes / bandwidth, attention FLOPs / GEMM
rate). Both are reported, with ratios against each.

    python -m bench.throughput --out bench/results/engine_h200.json          # 20B, H200
    python -m bench.throughput --workload c --num-prompts-c 1000 --skip-hf ...  # a subset
    python -m bench.throughput --model preset:tiny --device cpu --num-prompts 16  # smoke

Results merge into ``--out`` by workload, so ``--workload a`` and ``--workload b`` can run
as two commands and fill one file.

FP8: ``--kv-cache-dtype fp8`` and ``--quantization fp8`` run the engine that way;
``--modes bf16,fp8-kv,fp8-all`` runs several configurations one after another in one
process (the same random weights rebuilt for each, the GPU freed between) and writes
each mode's rows under ``modes`` with its output tok/s over the first mode's
(``ratios_over_first``); the first mode's rows are also the top-level ``workloads``
(HF runs next to it). A mode's roofline counts its own bytes (FP8 weights and KV) at
the bf16 GEMM rate measured in the run.

    python -m bench.throughput --workload a --modes bf16,fp8-kv,fp8-all --skip-hf --out x.json

The engine overlaps each step's host work with the GPU (``Engine(overlap=True)``);
``--no-overlap`` runs one step at a time, and ``--compare-overlap`` runs every workload
again on the same engine with the overlap switched the other way (``ours_no_overlap``
or ``ours_overlap``, and ``ratios.overlap_speedup`` = time off / time on):

    python -m bench.throughput --workload a --skip-hf --compare-overlap --out /tmp/o.json

Admission runs a queue longer than what fits at once in even waves where the decode
graphs' timings say so (``Engine(balance_waves=True)``); ``--no-balance-waves`` admits
greedily, and ``--compare-waves`` runs every workload again the other way on the same
engine (``ours_greedy_waves`` or ``ours_even_waves``, ``ratios.even_waves_speedup`` =
greedy time / even time; ``step_times.decode_ms_by_running`` shows the waves' sizes).

``--variants`` runs every workload again on the same engine once per variant (an A/B
without a second engine's warm-up or a second machine's speed): ``base`` (a repeat: the
run-to-run spread) or settings such as ``batch_tokens=2048`` (smaller steps),
``gelu_rows=512`` (the GELU epilogue at decode sizes only), ``kv_store=apart`` (k and v
stored by a kernel of their own) and ``branch=attn/0/attn-first`` (another decode branch
plan, see ``models.model.BranchPlan``; both recapture the decode graphs), combined with
commas:

    python -m bench.throughput --workload a --skip-hf \
        --variants "kv_store=apart;gelu_rows=512;kv_store=apart,gelu_rows=512" --out v.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import git_commit
from models.config import NeoXConfig
from models.dtypes import KV_CACHE_DTYPES, QUANTIZATIONS
from models.engine import MAX_BATCH_TOKENS, MAX_NUM_SEQS, Engine, InferenceEngine
from models.engine.kv_cache import block_bytes
from models.fp8 import apply_quantization
from models.fused import norms_ok
from models.model import MLP, BranchPlan, NeoX, gelu_epilogue_ok, init_random_
from models.sampling import SamplingParams

T0 = time.time()

# --modes names: (KV-cache dtype, quantization). "bf16" means the run's --dtype as is.
MODES: dict[str, tuple[str, str]] = {
    "bf16": ("auto", "none"), "fp8-kv": ("fp8", "none"), "fp8-weights": ("auto", "fp8"),
    "fp8-all": ("fp8", "fp8"),
}
# A --branch-plans entry: decode graphs without a branch stream.
NO_BRANCHES = "none"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def workload(name: str, num_prompts: int | None, max_position: int, vocab: int,
             seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompts as token ids, output lengths) of workload ``a``, ``b`` or ``c``."""
    r = random.Random(seed + {"a": 0, "b": 1, "c": 2}[name])
    if name == "c":
        return _shared_prefix_workload(r, num_prompts or 2000, max_position, vocab)
    if name == "a":
        n = num_prompts or 1024
        lens = [(128, 128)] * n
    else:
        n = num_prompts or 2000
        lens = [(r.randint(16, 1024), r.randint(16, 512)) for _ in range(n)]
    out_prompts, outs = [], []
    for p, o in lens:
        # Cap to the context (tiny smoke models): keep the in/out proportion.
        if p + o > max_position:
            scale = max_position / (p + o)
            p, o = max(1, int(p * scale)), max(1, int(o * scale))
            p = min(p, max_position - o)
        # Ids from 2 up: skip <|endoftext|> and <|padding|>; stay in the tokenizer's range.
        out_prompts.append([r.randrange(2, vocab) for _ in range(p)])
        outs.append(o)
    return out_prompts, outs


def _shared_prefix_workload(r: random.Random, n: int, max_position: int, vocab: int,
                            ) -> tuple[list[list[int]], list[int]]:
    """Workload (c): 8 shared 1024-token prefixes, a unique 64-token suffix, 128 out
    (all three scaled down together for a short context)."""
    prefix, suffix, out = 1024, 64, 128
    if prefix + suffix + out > max_position:
        scale = max_position / (prefix + suffix + out)
        prefix, suffix, out = (max(1, int(x * scale)) for x in (prefix, suffix, out))
    prefixes = [[r.randrange(2, vocab) for _ in range(prefix)] for _ in range(8)]
    prompts = [r.choice(prefixes) + [r.randrange(2, vocab) for _ in range(suffix)]
               for _ in range(n)]
    return prompts, [out] * n


# --------------------------------------------------------------------------------------
# Ceilings and the roofline
# --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 GEMM FLOP/s."""
    cuda = device.type == "cuda"
    nbytes = (4 << 30) if cuda else (128 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    reps = 10 if cuda else 3
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    bw = 2 * nbytes * reps / (time.perf_counter() - t)
    del src, dst
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps = 20 if cuda else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    gemm = 2 * n**3 * reps / (time.perf_counter() - t)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "gemm_flops_per_s": gemm, "gemm_n": n,
            "copy_bytes": nbytes}


def roofline(cfg: NeoXConfig, prompts: list[int], outs: list[int], *, capacity_tokens: int,
             bandwidth: float, gemm: float, weight_bytes: int, kv_bytes_per_token: int,
             ) -> dict[str, float]:
    """Fastest possible time for the workload on this device (see the module docstring).

    Sequences are admitted first-come first-served while the sum of their final
    contexts (prompt + output) fits in ``capacity_tokens``; a prefill costs its FLOPs at
    the GEMM rate and produces the first token; each decode step reads the weights and
    every running sequence's KV.
    """
    h, layers = cfg.hidden_size, cfg.num_layers
    matmul_params = cfg.num_params() - cfg.vocab_size * h  # the input embedding is a lookup
    n = len(prompts)
    final = [p + o for p, o in zip(prompts, outs, strict=True)]
    ctx = np.zeros(0, dtype=np.float64)
    left = np.zeros(0, dtype=np.int64)
    nxt = 0
    used = 0
    t_prefill = t_decode = t_kernels = 0.0
    steps = 0
    conc = 0
    while nxt < n or len(ctx):
        admitted_ctx, admitted_left = [], []
        while nxt < n and (used + final[nxt] <= capacity_tokens or (not len(ctx)
                                                                    and not admitted_ctx)):
            p = prompts[nxt]
            t_prefill += (2 * matmul_params * p + 2 * p * p * h * layers) / gemm
            used += final[nxt]
            admitted_ctx.append(p + 1)
            admitted_left.append(outs[nxt] - 1)  # the prefill gave the first token
            nxt += 1
        ctx = np.concatenate([ctx, np.asarray(admitted_ctx, dtype=np.float64)])
        left = np.concatenate([left, np.asarray(admitted_left, dtype=np.int64)])
        done = left <= 0
        if done.any():
            used -= int((ctx[done] + left[done]).sum())
            ctx, left = ctx[~done], left[~done]
            continue
        b = len(ctx)
        kv = float(ctx.sum())
        bytes_ = weight_bytes + kv * kv_bytes_per_token
        flops = 2 * matmul_params * b + 4 * kv * h * layers
        t_decode += max(bytes_ / bandwidth, flops / gemm)
        t_kernels += (max(weight_bytes / bandwidth, 2 * matmul_params * b / gemm)
                      + max(kv * kv_bytes_per_token / bandwidth, 4 * kv * h * layers / gemm))
        steps += 1
        conc += b
        ctx += 1
        left -= 1
    total = t_prefill + t_decode
    out_tokens = sum(outs)
    return {"seconds": total, "prefill_seconds": t_prefill, "decode_seconds": t_decode,
            "decode_steps": steps, "mean_decode_batch": conc / max(steps, 1),
            "output_tok_per_s": out_tokens / total, "capacity_tokens": capacity_tokens,
            "per_kernel": {"seconds": t_prefill + t_kernels, "decode_seconds": t_kernels,
                           "output_tok_per_s": out_tokens / (t_prefill + t_kernels)}}


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def build_model(spec: str, device: torch.device, dtype: torch.dtype) -> NeoX:
    if spec.startswith("preset:"):
        from models.config import get_preset

        cfg = get_preset(spec.removeprefix("preset:"))
        with torch.device("meta"):
            model = NeoX(cfg)
        # Materialise straight on the device and draw there: seconds for the 20B.
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()
        return init_random_(model, seed=0).eval()
    from models.loaders import load_model

    return load_model(spec, device=device, dtype=dtype).model


def warm_up(engine: InferenceEngine) -> None:
    """Every kind of step once (Triton compiles, cuBLAS picks, graphs): new prompts,
    decode-only steps, decodes mixed with a new prompt and with a prompt chunked over
    several steps."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long = min(engine.max_position - 8, engine.max_batch_tokens)
    engine.add_request("warm0", [5] * 40, params)
    engine.add_request("warm1", [6] * 300, params)
    engine.step()
    engine.step()
    engine.add_request("warm2", [7] * 50, params)
    engine.add_request("warm3", [8] * long, params)
    while engine.has_unfinished():
        engine.step()


def step_times(kinds: list[tuple[str, int, float]]) -> dict[str, Any]:
    """Wall seconds by step kind (decode-only or mixed with prefill), and decode steps'
    median milliseconds per band of 32 running sequences: where a run's time went."""
    out: dict[str, Any] = {}
    for kind in ("decode", "mixed"):
        sel = [(n, secs) for k, n, secs in kinds if k == kind]
        out[kind] = {"steps": len(sel), "seconds": sum(secs for _, secs in sel),
                     "mean_running": float(np.mean([n for n, _ in sel])) if sel else 0.0}
    bands: dict[int, list[float]] = {}
    for k, n, secs in kinds:
        if k == "decode":
            bands.setdefault(n // 32 * 32, []).append(secs)
    out["decode_ms_by_running"] = {f"{b}-{b + 31}": {"steps": len(v),
                                                     "median_ms": 1e3 * float(np.median(v))}
                                   for b, v in sorted(bands.items())}
    return out


def run_ours(engine: InferenceEngine, prompts: list[list[int]], outs: list[int],
             ) -> dict[str, Any]:
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats0 = dict(engine.stats)
    t0 = time.time()
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=o,
                                                     ignore_eos=True), arrival=t0)
    done = 0
    ttft, gen_tokens = [], 0
    last = time.time()
    # With overlap a step() call launches step k and waits for step k-1's tokens, so the
    # wall time of call k is (as long as the device is the bound) step k-1's device time.
    # Sequences running: the one-GPU engine's; a pipeline's unfinished requests instead.
    sched = engine.scheduler if isinstance(engine, Engine) else None
    kinds: list[tuple[str, int, float]] = []
    launched: tuple[str, int] | None = None
    t_prev = time.perf_counter()
    while engine.has_unfinished():
        stats = engine.stats
        steps0, decode0 = stats["steps"], stats["decode_steps"]
        rows = len(sched.running) if sched is not None else engine.num_unfinished()
        outs_now = engine.step()
        t_now = time.perf_counter()
        if launched is not None:
            kinds.append((*launched, t_now - t_prev))
        t_prev = t_now
        stats = engine.stats
        launched = None if stats["steps"] == steps0 else (
            "decode" if stats["decode_steps"] > decode0 else "mixed", rows)
        for out in outs_now:
            done += 1
            gen_tokens += out.completion_tokens
            ttft.append(out.timings.first_token - out.timings.arrival)
        if time.time() - last > 15:
            last = time.time()
            log(f"  ours: {done}/{len(prompts)} requests, {gen_tokens} tokens, "
                f"{gen_tokens / (last - t0):.0f} out tok/s so far")
    _sync(device)
    secs = time.time() - t0
    prompt_tokens = sum(len(p) for p in prompts)
    if gen_tokens != sum(outs):
        raise RuntimeError(f"engine produced {gen_tokens} tokens, expected {sum(outs)}")
    stats = engine.stats
    steps = {k: stats[k] - stats0.get(k, 0) for k in stats if k != "prefix_cache_hit_rate"}
    query = steps.get("prefix_query_tokens", 0)
    steps["prefix_cache_hit_rate"] = steps.get("prefix_hit_tokens", 0) / query if query else 0.0
    return {
        "requests": len(prompts), "seconds": secs, "requests_per_s": len(prompts) / secs,
        "step_times": step_times(kinds),
        "output_tokens": gen_tokens, "output_tok_per_s": gen_tokens / secs,
        "total_tok_per_s": (gen_tokens + prompt_tokens) / secs,
        "ttft_median_s": float(np.median(ttft)), "ttft_p99_s": float(np.percentile(ttft, 99)),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
        else None,
        "engine_stats": steps,
    }


def hf_model(model: NeoX) -> Any:
    """transformers' GPTNeoXForCausalLM built on ``meta`` around our parameter tensors."""
    import transformers

    cfg = model.config
    hc = transformers.GPTNeoXConfig(**cfg.to_hf())
    with torch.device("meta"):
        hf = transformers.GPTNeoXForCausalLM(hc)
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"
    for name, p in model.named_parameters():
        target = head if name == "embed_out.weight" else f"gpt_neox.{name}"
        mod, _, leaf = target.rpartition(".")
        setattr(hf.get_submodule(mod), leaf, torch.nn.Parameter(p, requires_grad=False))
    device = next(model.parameters()).device
    # Buffers (rotary inverse frequencies) were never materialised: rebuild those modules.
    for mod_name, mod in list(hf.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            if any(True for _ in mod.parameters()):
                raise RuntimeError(f"HF module {mod_name} has weights and unset buffers")
            with torch.device(device):
                fresh = type(mod)(hc)
            parent, _, leaf = mod_name.rpartition(".")
            setattr(hf.get_submodule(parent) if parent else hf, leaf, fresh)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF model still has meta tensors: {left[:4]}")
    return hf.eval()


def run_hf(hf: Any, prompts: list[list[int]], outs: list[int], batch: int,
           device: torch.device) -> dict[str, Any]:
    """Static batches, left padded; each batch generates its longest requested output.

    Output tokens count what the requests asked for (the useful ones); the tokens HF
    generated past a request's length in a mixed batch are reported separately.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pad = 1  # <|padding|>
    generated = 0
    t0 = time.time()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i:i + batch], outs[i:i + batch]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        new = max(os_)
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=pad)
        _sync(device)
        generated += new * len(ps)
        log(f"  hf: batch {i // batch + 1}/{math.ceil(len(prompts) / batch)} "
            f"({len(ps)} x {width} in, {new} out) done")
    secs = time.time() - t0
    useful = sum(outs)
    return {
        "subset": True, "requests": len(prompts), "batch_size": batch, "seconds": secs,
        "requests_per_s": len(prompts) / secs, "output_tokens": useful,
        "output_tok_per_s": useful / secs,
        "total_tok_per_s": (useful + sum(len(p) for p in prompts)) / secs,
        "generated_tok_per_s": generated / secs,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
        else None,
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


_git_commit = git_commit


def _write(path: Path | None, result: dict[str, Any]) -> None:
    """Merge into ``path`` by workload (other workloads' earlier results stay)."""
    if path is None:
        return
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    merged = {**old, **{k: v for k, v in result.items() if k != "workloads"}}
    merged["workloads"] = {**old.get("workloads", {}), **result.get("workloads", {})}
    if "modes" in result:  # each mode's workloads merge the same way
        modes = dict(old.get("modes", {}))
        for mode, m in result["modes"].items():
            before = modes.get(mode, {})
            modes[mode] = {**before, **m, "workloads": {**before.get("workloads", {}),
                                                        **m.get("workloads", {})}}
        merged["modes"] = modes
        merged["ratios_over_first"] = mode_ratios(modes, merged.get("mode_order", []))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)


def mode_ratios(modes: dict[str, Any], order: list[str]) -> dict[str, dict[str, float]]:
    """Each mode's output tok/s over the first mode's, per workload both ran."""
    if not order or order[0] not in modes:
        return {}
    base = modes[order[0]].get("workloads", {})
    out: dict[str, dict[str, float]] = {}
    for mode in order[1:]:
        for name, w in modes.get(mode, {}).get("workloads", {}).items():
            if name in base:
                out.setdefault(mode, {})[name] = (w["ours"]["output_tok_per_s"]
                                                  / base[name]["ours"]["output_tok_per_s"])
    return out


def table(data: dict[str, Any]) -> str:
    """A markdown table of a results file (for the README)."""
    lines = [
        f"{data.get('model')} on {data.get('device')} ({data.get('dtype')}), commit "
        f"{str(data.get('commit'))[:10]}, {data.get('date')}; copy "
        f"{data['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, GEMM "
        f"{data['ceilings']['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s",
        "",
        "| workload | neoxq out tok/s | total tok/s | req/s | peak GPU GB | roofline out tok/s "
        "| neoxq / roofline | HF out tok/s (subset) | neoxq / HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in sorted(data["workloads"].items()):
        o, r, hf = w["ours"], w["roofline"], w.get("hf", {})
        peak = o.get("peak_gpu_bytes")
        hf_rate = hf.get("output_tok_per_s")
        lines.append(
            f"| ({name}) {w['prompts']} prompts | {o['output_tok_per_s']:.0f} | "
            f"{o['total_tok_per_s']:.0f} | {o['requests_per_s']:.2f} | "
            f"{peak / 1e9 if peak else float('nan'):.1f} | {r['output_tok_per_s']:.0f} | "
            f"{w['ratios']['ours_over_roofline']:.0%} | "
            + (f"{hf_rate:.0f} ({hf['requests']} prompts, batch {hf['batch_size']}) | "
               f"{w['ratios']['ours_over_hf']:.1f}x |" if hf_rate else "- | - |"))
        plain = w.get("ours_no_cascade")
        if plain:
            lines.append(
                f"| ({name}) prefix caching on, no cascade | {plain['output_tok_per_s']:.0f} | "
                f"{plain['total_tok_per_s']:.0f} | {plain['requests_per_s']:.2f} | - | "
                f"{r['output_tok_per_s']:.0f} | "
                f"{plain['output_tok_per_s'] / r['output_tok_per_s']:.0%} | - | "
                f"cascade / none = {w['ratios']['cascade_speedup']:.2f}x |")
        off = w.get("ours_no_prefix_caching")
        if off:
            lines.append(
                f"| ({name}) prefix caching off | {off['output_tok_per_s']:.0f} | "
                f"{off['total_tok_per_s']:.0f} | {off['requests_per_s']:.2f} | - | "
                f"{r['output_tok_per_s']:.0f} | "
                f"{off['output_tok_per_s'] / r['output_tok_per_s']:.0%} | - | "
                f"on / off = {w['ratios']['prefix_caching_speedup']:.2f}x |")
    if data.get("modes"):
        first = (data.get("mode_order") or [""])[0]
        lines += ["", f"| mode | workload | out tok/s | over {first} | KV tokens | weights GB "
                      "| roofline out tok/s |", "|---|---|---|---|---|---|---|"]
        ratios = data.get("ratios_over_first", {})
        for mode in data.get("mode_order") or sorted(data["modes"]):
            m = data["modes"].get(mode, {})
            for name, w in sorted(m.get("workloads", {}).items()):
                ratio = ratios.get(mode, {}).get(name, 1.0 if mode == first else None)
                lines.append(
                    f"| {mode} | ({name}) | {w['ours']['output_tok_per_s']:.0f} | "
                    + (f"{ratio:.2f}x" if ratio is not None else "-")
                    + f" | {m['engine'].get('cache_tokens', 0)} | "
                    f"{m['engine'].get('weight_bytes', 0) / 1e9:.1f} | "
                    f"{w['roofline']['output_tok_per_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:gpt-neox-20b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--workload", choices=("a", "b", "c", "both", "all"), default="both",
                    help="both = a and b; all = a, b and c")
    ap.add_argument("--num-prompts", type=int, default=None, help="override every workload")
    ap.add_argument("--num-prompts-b", type=int, default=None,
                    help="override workload b's count (the README's figures use 1000)")
    ap.add_argument("--num-prompts-c", type=int, default=None,
                    help="override workload c's count")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ours", action="store_true",
                    help="HF baseline only, added to the engine results already in --out")
    # HF subsets: on CUDA, (a) at its best batch size (256) and one batch of 32 of (b)
    # (about a minute each for the 20B); on CPU (the smoke run) a few prompts.
    ap.add_argument("--hf-prompts-a", type=int, default=None, help="default 256 (CPU: 8)")
    ap.add_argument("--hf-batch-a", type=int, default=256)
    ap.add_argument("--hf-prompts-b", type=int, default=None, help="default 32 (CPU: 4)")
    ap.add_argument("--hf-batch-b", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS)
    ap.add_argument("--kv-memory", type=float, default=None,
                    help="fraction of free GPU memory (CUDA) or bytes (CPU) for the KV cache")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-cascade", action="store_true",
                    help="no cascade decode attention (workload c: no with/without runs)")
    ap.add_argument("--c-ours-only", action="store_true",
                    help="workload (c): only the engine as configured (no runs without "
                         "cascade or without prefix caching)")
    ap.add_argument("--cascade-eager", action="store_true",
                    help="workload c: also a run with cascade steps outside CUDA graphs")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated runs, one after another ({', '.join(MODES)}); "
                         "overrides --kv-cache-dtype/--quantization")
    ap.add_argument("--branch-plans", default=None, metavar="PLANS",
                    help="comma-separated decode branch plans "
                         "(FORK[/FREE_SMS][/mlp-first|/attn-first][/everywhere], see "
                         "models.model.BranchPlan, or 'none': no branch stream), one "
                         "engine each on the same weights, results under branch_plans; the "
                         "first one's are the run's")
    ap.add_argument("--no-branch-streams", action="store_true",
                    help="decode graphs run each block's attention and MLP one after the "
                         "other instead of on two streams")
    ap.add_argument("--no-fused-gelu", action="store_true",
                    help="the MLP's GELU as its own kernel instead of the up-projection's "
                         "GEMM epilogue")
    ap.add_argument("--no-fused-norms", action="store_true",
                    help="each block's residual adds and the next block's LayerNorms as "
                         "their own kernels instead of one (models.fused.add_norms)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="run one step at a time (host work not hidden behind the device)")
    ap.add_argument("--no-balance-waves", action="store_true",
                    help="admit greedily (full waves and a last one of what is left) "
                         "instead of in even waves where the decode graphs' timings say "
                         "those are cheaper")
    ap.add_argument("--compare-waves", action="store_true",
                    help="run each workload again with even waves switched the other way "
                         "(same engine): ours_greedy_waves or ours_even_waves, and "
                         "ratios.even_waves_speedup")
    ap.add_argument("--compare-overlap", action="store_true",
                    help="run each workload again with the overlap off (same engine): "
                         "ours_no_overlap and ratios.overlap_speedup")
    ap.add_argument("--variants", default=None, metavar="SPECS",
                    help="after each workload, run it again on the same engine once per "
                         "';'-separated variant, each 'base' (as it was: a repeat) or "
                         "comma-separated KEY=VALUE settings: batch_tokens=N (at most "
                         "--max-batch-tokens), gelu_rows=N (the GELU epilogue up to N "
                         "rows), kv_store=fused|apart, branch=PLAN (a decode branch plan; "
                         "both recapture the decode graphs); "
                         "results under variants, ratios.variant_speedup = this run's "
                         "time / the variant's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON results (merged by workload)")
    ap.add_argument("--table", type=Path, default=None,
                    help="print a results file as a markdown table and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.modes is not None:
        args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in args.mode_list if m not in MODES]
        if bad or not args.mode_list:
            raise SystemExit(f"--modes: each one of {', '.join(MODES)}, got {args.modes!r}")
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return {}
    threads = torch.get_num_threads()
    if args.device == "cpu":
        # Tiny CPU models are dominated by per-op overhead, which intra-op threads only
        # add to (badly so on a shared machine).
        torch.set_num_threads(1)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _run_engine(args: argparse.Namespace, model: NeoX, result: dict[str, Any],
                names: list[str], loads: dict[str, tuple[list[list[int]], list[int]]],
                kv_cache_dtype: str = "auto", save: Any = None,
                ceil: dict[str, float] | None = None,
                plan: BranchPlan | None = None, streams: bool | None = None) -> None:
    """Ceilings (unless given), the engine on each workload and its roofline, into
    ``result``; ``save()`` after each workload (default: merge ``result`` into --out).
    ``streams``: whether decode graphs use branch streams (default: unless
    --no-branch-streams)."""
    device = next(model.parameters()).device
    cfg = model.config
    weight_bytes = model.parameter_bytes()
    variants = parse_variants(args.variants)
    if save is None:
        def save() -> None:
            _write(args.out, result)
    if ceil is None:
        ceil = measure_ceilings(device)
        log(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s, GEMM "
            f"{ceil['gemm_flops_per_s'] / 1e12:.1f} TFLOP/s")
    result["ceilings"] = ceil

    kv_memory: float | int | None = args.kv_memory
    if kv_memory is not None and device.type != "cuda":
        kv_memory = int(kv_memory)
    engine = Engine(model, None, kv_memory=kv_memory, max_num_seqs=args.max_num_seqs,
                    max_batch_tokens=args.max_batch_tokens,
                    cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs,
                    kv_cache_dtype=kv_cache_dtype, overlap=not args.no_overlap,
                    enable_cascade=not args.no_cascade,
                    branch_streams=(not args.no_branch_streams) if streams is None else streams,
                    branch_plan=plan, balance_waves=not args.no_balance_waves)
    # Bytes a token's K and V take in this cache (FP8: values plus their scales).
    kv_per_token = block_bytes(cfg, engine.block_size, engine.kv_dtype) // engine.block_size
    result["engine"].update(kv_cache_dtype=kv_cache_dtype, weight_bytes=weight_bytes,
                            quantization=engine.quantization or "none",
                            num_blocks=engine.num_blocks, block_size=engine.block_size,
                            kv_cache_bytes=engine.kv_cache_bytes,
                            cache_tokens=engine.cache_tokens,
                            decode_kernel_config=engine.attn_config,
                            cascade_kernel_config=engine.cascade_config)
    log(f"engine: {engine.num_blocks} KV blocks = {engine.cache_tokens} tokens "
        f"({engine.kv_cache_bytes / 1e9:.1f} GB); decode kernel (tile, warps, stages, "
        f"heads/program) {engine.attn_config}")
    t = time.time()
    warm_up(engine)
    graphs = engine.capture_graphs()
    log(f"warm-up done in {time.time() - t:.1f}s ({graphs} CUDA graphs)")
    dg = engine.runner.graphs
    if dg is not None and dg.seconds:
        result["engine"].update(graphs_info(engine))
        log(f"decode graphs: runs as {result['engine']['decode_runs_as']}; serial "
            f"{dg.serial_buckets}; ms "
            f"{result['engine']['decode_graph_ms']}")

    for name in names:
        prompts, outs = loads[name]
        lens = [len(p) for p in prompts]
        roof = roofline(cfg, lens, outs, capacity_tokens=engine.cache_tokens,
                        bandwidth=ceil["copy_bytes_per_s"], gemm=ceil["gemm_flops_per_s"],
                        weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token)
        log(f"workload {name}: {len(prompts)} prompts, {sum(lens)} in / {sum(outs)} out tokens; "
            f"roofline {roof['seconds']:.1f}s = {roof['output_tok_per_s']:.0f} out tok/s "
            f"(mean decode batch {roof['mean_decode_batch']:.0f})")
        _fresh_cache(engine)
        engine.set_cascade(not args.no_cascade)
        ours = run_ours(engine, prompts, outs)
        _say(name, "ours", ours, roof)
        entry: dict[str, Any] = {
            "prompts": len(prompts), "prompt_tokens": sum(lens), "output_tokens": sum(outs),
            "ours": ours, "roofline": roof,
            "ratios": {"ours_over_roofline": ours["output_tok_per_s"] / roof["output_tok_per_s"],
                       "ours_over_per_kernel_roofline":
                       ours["output_tok_per_s"] / roof["per_kernel"]["output_tok_per_s"]},
        }
        if name == "c" and not args.c_ours_only:
            # The same requests again without cascade and with the cache off: what each
            # buys. (The roofline above assumes every prompt is prefilled, i.e. no reuse.)
            ratios = entry["ratios"]
            if not args.no_cascade:
                _fresh_cache(engine)
                engine.set_cascade(False)
                plain = run_ours(engine, prompts, outs)
                _say(name, "ours, prefix caching on, no cascade", plain, roof)
                entry["ours_no_cascade"] = plain
                ratios["cascade_speedup"] = plain["seconds"] / ours["seconds"]
                if args.cascade_eager:
                    _fresh_cache(engine)
                    engine.set_cascade(True, graphs=False)
                    eager = run_ours(engine, prompts, outs)
                    engine.set_cascade(True)
                    _say(name, "ours, cascade steps eager", eager, roof)
                    entry["ours_cascade_eager"] = eager
                    ratios["cascade_eager_speedup"] = plain["seconds"] / eager["seconds"]
            engine.set_prefix_caching(False)
            off = run_ours(engine, prompts, outs)
            engine.set_prefix_caching(True)
            engine.set_cascade(not args.no_cascade)
            _say(name, "ours, prefix caching off", off, roof)
            entry["ours_no_prefix_caching"] = off
            ratios["prefix_caching_speedup"] = off["seconds"] / ours["seconds"]
            if "ours_no_cascade" in entry:
                ratios["prefix_caching_no_cascade_speedup"] = (
                    off["seconds"] / entry["ours_no_cascade"]["seconds"])
            log("workload c: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        if args.compare_waves:
            _fresh_cache(engine)
            engine.set_balance_waves(args.no_balance_waves)
            other = run_ours(engine, prompts, outs)
            engine.set_balance_waves(not args.no_balance_waves)
            even, greedy = (other, ours) if args.no_balance_waves else (ours, other)
            _say(name, f"ours, {'even' if args.no_balance_waves else 'greedy'} waves", other,
                 roof)
            entry["ours_even_waves" if args.no_balance_waves else "ours_greedy_waves"] = other
            entry["ratios"]["even_waves_speedup"] = greedy["seconds"] / even["seconds"]
            log(f"workload {name}: even / greedy waves = "
                f"{entry['ratios']['even_waves_speedup']:.3f}x")
        if args.compare_overlap:
            engine.set_overlap(args.no_overlap)
            other = run_ours(engine, prompts, outs)
            engine.set_overlap(not args.no_overlap)
            on, off = (other, ours) if args.no_overlap else (ours, other)
            _say(name, f"ours, overlap {'on' if args.no_overlap else 'off'}", other, roof)
            entry["ours_overlap" if args.no_overlap else "ours_no_overlap"] = other
            entry["ratios"]["overlap_speedup"] = off["seconds"] / on["seconds"]
            log(f"workload {name}: overlap on / off = "
                f"{entry['ratios']['overlap_speedup']:.3f}x")
        for label, settings in variants:
            result["workloads"][name] = entry
            save()  # what ran so far, should a variant fail
            _fresh_cache(engine)
            undo = _apply_variant(engine, model, settings)
            other = run_ours(engine, prompts, outs)
            if "branch" in settings:
                other["graphs"] = graphs_info(engine)
            undo()
            _say(name, f"ours, variant {label}", other, roof)
            entry.setdefault("variants", {})[label] = other
            speedups = entry["ratios"].setdefault("variant_speedup", {})
            speedups[label] = ours["seconds"] / other["seconds"]
            log(f"workload {name}: variant {label} {speedups[label]:.3f}x")
        result["workloads"][name] = entry
        save()

    # Free the engine's KV cache (and its graphs) before HF or the next engine allocates
    # its own (``dg`` holds the runner, hence the cache, too: a later engine sized from
    # the free memory would otherwise get a fraction of it).
    del engine, dg
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graphs_info(engine: Engine) -> dict[str, Any]:
    """The decode graphs' branch plan, which buckets run serially, each bucket's time
    at capture and which buckets replay a larger one's graph."""
    dg = engine.runner.graphs
    if dg is None or not dg.seconds:
        return {}
    return dict(branch_streams=dg.side is not None,
                branch_plan=str(dg.side.plan) if dg.side is not None else None,
                decode_serial_buckets=dg.serial_buckets,
                decode_graph_ms={b: round(1e3 * t, 3) for b, t in dg.seconds.items()},
                decode_runs_as={b: r for b, r in dg.runs_as.items() if b != r})


VARIANT_KEYS = ("batch_tokens", "gelu_rows", "kv_store", "branch")
KV_STORES = ("fused", "apart")


def parse_variants(spec: str | None) -> list[tuple[str, dict[str, str]]]:
    """``--variants``: ``base;batch_tokens=2048;gelu_rows=8192,kv_store=apart`` ->
    ``[(label, {key: value})]`` (``base``: no setting changed)."""
    out: list[tuple[str, dict[str, str]]] = []
    for label in (p.strip() for p in (spec or "").split(";")):
        if not label:
            continue
        settings: dict[str, str] = {}
        for item in ([] if label == "base" else label.split(",")):
            key, _, value = item.partition("=")
            if key not in VARIANT_KEYS or not value:
                raise SystemExit(f"--variants {label!r}: KEY=VALUE with KEY one of "
                                 f"{', '.join(VARIANT_KEYS)}, or 'base'")
            if key == "kv_store" and value not in KV_STORES:
                raise SystemExit(f"--variants {label!r}: kv_store is one of "
                                 f"{', '.join(KV_STORES)}")
            if key == "branch":
                try:
                    BranchPlan.parse(value)
                except ValueError as e:
                    raise SystemExit(f"--variants {label!r}: {e}") from None
            elif key != "kv_store" and not (value.isdigit() and int(value) > 0):
                raise SystemExit(f"--variants {label!r}: {key} takes a positive integer")
            settings[key] = value
        out.append((label, settings))
    return out


def _apply_variant(engine: Engine, model: NeoX, settings: dict[str, str]) -> Any:
    """Apply one ``--variants`` entry to the engine; returns what undoes it."""
    undo: list[Any] = []
    if "batch_tokens" in settings:
        engine.set_max_batch_tokens(int(settings["batch_tokens"]))
        undo.append(lambda: engine.set_max_batch_tokens(engine.max_batch_tokens))
    if "gelu_rows" in settings:
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        before = [m.fused_gelu_max_rows for m in mlps]
        for m in mlps:
            m.fused_gelu_max_rows = int(settings["gelu_rows"])

        def restore_gelu() -> None:
            for m, rows in zip(mlps, before, strict=True):
                m.fused_gelu_max_rows = rows
        undo.append(restore_gelu)
    if "kv_store" in settings:
        fused = engine.runner.fused_kv_store
        engine.set_fused_kv_store(settings["kv_store"] == "fused")
        undo.append(lambda: engine.set_fused_kv_store(fused))
    if "branch" in settings:
        plan = engine.runner.branch_plan
        engine.set_branch_plan(BranchPlan.parse(settings["branch"]))
        undo.append(lambda: engine.set_branch_plan(plan))

    def undo_all() -> None:
        for fn in reversed(undo):
            fn()
    return undo_all


def _fresh_cache(engine: Engine) -> None:
    """Prefix caching on with nothing cached (a run must not find an earlier run's
    prefixes)."""
    engine.set_prefix_caching(False)
    engine.set_prefix_caching(True)


def _say(name: str, what: str, ours: dict[str, Any], roof: dict[str, Any]) -> None:
    log(f"workload {name} {what}: {ours['seconds']:.1f}s, {ours['output_tok_per_s']:.0f} out "
        f"tok/s, {ours['total_tok_per_s']:.0f} total tok/s, {ours['requests_per_s']:.2f} "
        f"req/s = {ours['output_tok_per_s'] / roof['output_tok_per_s']:.0%} of roofline "
        f"({ours['output_tok_per_s'] / roof['per_kernel']['output_tok_per_s']:.0%} of the "
        f"per-kernel one); stats {ours['engine_stats']}")
    st = ours["step_times"]
    log("  time by step kind: " + ", ".join(
        f"{k} {st[k]['steps']} steps {st[k]['seconds']:.2f}s (mean running "
        f"{st[k]['mean_running']:.0f})" for k in ("decode", "mixed"))
        + f"; decode ms by running {st['decode_ms_by_running']}")


def _loads(args: argparse.Namespace, model: NeoX,
           ) -> tuple[list[str], dict[str, tuple[list[list[int]], list[int]]]]:
    cfg = model.config
    names = {"both": ["a", "b"], "all": ["a", "b", "c"]}.get(args.workload, [args.workload])
    counts = {"a": args.num_prompts, "b": args.num_prompts_b or args.num_prompts,
              "c": args.num_prompts_c or args.num_prompts}
    loads = {n: workload(n, counts[n], cfg.max_position, min(cfg.vocab_size, 50277),
                         args.seed) for n in names}
    return names, loads


def _run_modes(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               result: dict[str, Any]) -> NeoX | None:
    """Each --modes entry in turn on freshly built (same) weights: rows under
    ``result["modes"]``; the first mode's also as ``result["workloads"]``. Returns the
    first mode's float weights, rebuilt, when HF is to run next to it; else None."""
    order: list[str] = args.mode_list
    result["mode_order"] = order
    result["modes"] = {}
    ceil: dict[str, float] | None = None
    for mode in order:
        kv, quant = MODES[mode]
        model = _unfuse(args, build_model(args.model, device, dtype))
        apply_quantization(model, quant)
        _sync(device)
        log(f"mode {mode}: kv-cache-dtype {kv}, quantization {quant}, weights "
            f"{model.parameter_bytes() / 1e9:.1f} GB")
        names, loads = _loads(args, model)
        entry: dict[str, Any] = {"kv_cache_dtype": kv, "quantization": quant,
                                 "engine": dict(result["engine"]), "workloads": {}}
        result["modes"][mode] = entry

        def save() -> None:
            if order[0] in result["modes"]:
                result["workloads"] = result["modes"][order[0]]["workloads"]
            result["ratios_over_first"] = mode_ratios(result["modes"], order)
            _write(args.out, result)

        _run_engine(args, model, entry, names, loads, kv_cache_dtype=kv, save=save, ceil=ceil)
        ceil = entry["ceilings"]
        result["ceilings"] = ceil
        for name, ratio in result["ratios_over_first"].get(mode, {}).items():
            log(f"mode {mode} ({name}): {ratio:.2f}x the output tok/s of {order[0]}")
        # Every mode gets the whole GPU: nothing of the previous one stays.
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["engine"] = result["modes"][order[0]]["engine"]
    if MODES[order[0]][1] != "none":
        args.skip_hf = True  # HF runs float weights only: a first mode with FP8 has none
    if args.skip_hf:
        return None
    return build_model(args.model, device, dtype)  # the same weights again, for HF


def _unfuse(args: argparse.Namespace, model: NeoX) -> NeoX:
    """--no-fused-gelu: every MLP computes its GELU apart from the GEMM;
    --no-fused-norms: residual adds and LayerNorms apart."""
    for m in model.modules():
        if isinstance(m, MLP):
            m.fused_gelu = not args.no_fused_gelu
    model.fused_norms = not args.no_fused_norms
    return model


def _run_plans(args: argparse.Namespace, model: NeoX, result: dict[str, Any],
               names: list[str], loads: dict[str, tuple[list[list[int]], list[int]]],
               ) -> None:
    """The engine once per --branch-plans entry on the same weights (an A/B in one
    process): rows under ``result["branch_plans"]``, the first plan's also as the run's
    ``workloads``; ``plan_ratios`` divides each plan's output tok/s by the first's."""
    specs = [p.strip() for p in args.branch_plans.split(",") if p.strip()]
    if not specs:
        raise SystemExit("--branch-plans: at least one plan")
    plans = [None if s == NO_BRANCHES else BranchPlan.parse(s) for s in specs]
    labels = [str(plan or NO_BRANCHES) for plan in plans]
    first = labels[0]
    result["branch_plans"] = {}
    ceil: dict[str, float] | None = None
    for plan, label in zip(plans, labels, strict=True):
        entry: dict[str, Any] = {"engine": dict(result["engine"]), "workloads": {}}
        result["branch_plans"][label] = entry

        def save() -> None:
            done = result["branch_plans"]
            result["workloads"] = done[first]["workloads"]
            result["engine"] = done[first]["engine"]
            base = done[first]["workloads"]
            result["plan_ratios"] = {
                p: {n: w["ours"]["output_tok_per_s"] / base[n]["ours"]["output_tok_per_s"]
                    for n, w in e["workloads"].items() if n in base}
                for p, e in done.items()}
            _write(args.out, result)

        log(f"branch plan {label}")
        _run_engine(args, model, entry, names, loads, kv_cache_dtype=args.kv_cache_dtype,
                    save=save, ceil=ceil, plan=plan, streams=plan is not None)
        ceil = entry["ceilings"]
        result["ceilings"] = ceil
        for name, ratio in result["plan_ratios"].get(label, {}).items():
            log(f"branch plan {label} ({name}): {ratio:.3f}x the output tok/s of {first}")


def _main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    parse_variants(args.variants)  # a bad spec stops before any model is built
    if args.hf_prompts_a is None:
        args.hf_prompts_a = 256 if cuda else 8
    if args.hf_prompts_b is None:
        args.hf_prompts_b = 32 if cuda else 4
    from models.dtypes import canonical_dtype_name

    dtype_name = canonical_dtype_name(args.dtype, device)
    dtype = getattr(torch, dtype_name)
    log(f"neoxq throughput: {args.model} on {device} ({dtype_name})")
    result: dict[str, Any] = {
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": args.model, "dtype": dtype_name,
        "engine": {"max_num_seqs": args.max_num_seqs, "max_batch_tokens": args.max_batch_tokens,
                   "cuda_graphs": device.type == "cuda" and not args.no_cuda_graphs,
                   "overlap": not args.no_overlap,
                   "balance_waves": not args.no_balance_waves,
                   # Whether the MLPs' GELU runs as the GEMM epilogue (CUDA builds whose
                   # epilogue computes the tanh GELU; see models.model.MLP).
                   "fused_gelu": not args.no_fused_gelu and device.type == "cuda"
                   and gelu_epilogue_ok(device),
                   "fused_norms": not args.no_fused_norms and device.type == "cuda"
                   and norms_ok(device)},
        "workloads": {},
    }

    if args.modes is not None:
        if args.skip_ours:
            raise SystemExit("--modes runs the engine: drop --skip-ours")
        model: NeoX | None = _run_modes(args, device, dtype, result)
    else:
        model = _unfuse(args, build_model(args.model, device, dtype))
        apply_quantization(model, args.quantization)
        _sync(device)
        names, loads = _loads(args, model)
        if args.skip_ours:
            # HF only, next to engine results an earlier run left in --out.
            old = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
            for name in names:
                if "ours" not in old.get("workloads", {}).get(name, {}):
                    raise SystemExit(f"--skip-ours: {args.out} has no engine results for "
                                     f"({name})")
                result["workloads"][name] = old["workloads"][name]
            for key in ("engine", "commit", "date"):
                result.pop(key)
        elif args.branch_plans is not None:
            _run_plans(args, model, result, names, loads)
        else:
            _run_engine(args, model, result, names, loads, kv_cache_dtype=args.kv_cache_dtype)
    if args.quantization != "none" and args.modes is None:
        args.skip_hf = True  # HF runs float weights only
    if args.skip_hf or model is None:
        log("HF baseline skipped")
        return result
    names, loads = _loads(args, model)
    try:
        hf = hf_model(model)
    except ImportError as exc:
        log(f"HF baseline unavailable: {exc}")
        result["hf_error"] = str(exc)
        _write(args.out, result)
        return result
    for name in names:
        if name == "c":
            continue  # (c) compares the engine with itself (prefix caching on / off)
        prompts, outs = loads[name]
        k = min(len(prompts), args.hf_prompts_a if name == "a" else args.hf_prompts_b)
        batch = args.hf_batch_a if name == "a" else args.hf_batch_b
        log(f"workload {name} HF: first {k} prompts in static batches of {batch}")
        hf_res: dict[str, Any] = {}
        while batch >= 1:
            try:
                hf_res = run_hf(hf, prompts[:k], outs[:k], batch, device)
                break
            except torch.OutOfMemoryError:
                # Its best batch size is the largest that fits: halve and retry.
                log(f"HF out of memory at batch {batch}; retrying at {batch // 2}")
                hf_res = {"subset": True, "error": f"out of memory at batch {batch}"}
                gc.collect()
                torch.cuda.empty_cache()
                batch //= 2
        w = result["workloads"][name]
        w["hf"] = hf_res
        if "output_tok_per_s" in hf_res:
            w["ratios"]["ours_over_hf"] = w["ours"]["output_tok_per_s"] / hf_res["output_tok_per_s"]
            log(f"workload {name} HF (subset of {k}): {hf_res['output_tok_per_s']:.0f} out tok/s "
                f"-> ours/HF = {w['ratios']['ours_over_hf']:.1f}x")
            for plan, entry in result.get("branch_plans", {}).items():
                pw = entry["workloads"].get(name)
                if pw is not None:
                    pw["ratios"]["ours_over_hf"] = (pw["ours"]["output_tok_per_s"]
                                                    / hf_res["output_tok_per_s"])
                    log(f"  branch plan {plan}: ours/HF = {pw['ratios']['ours_over_hf']:.2f}x")
        _write(args.out, result)
    log("done")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
