"""Cost of structured output on the engine: the same prompts with and without a JSON schema.

One engine, the real 20B tokenizer, ``--num-prompts`` prompts (LAMBADA passages, the
project's copy, asking for a JSON review). Run B samples them under bench/grammar_cpu.py's
review schema (enum, integer ranges, a nested object, an array, a bounded string), where
the grammar ends each output at EOS once the JSON is complete (at most ``--max-tokens``).
Run A then samples the same prompts unconstrained, each line generating exactly as many
tokens as its run-B output (``ignore_eos``, ``max_tokens`` = that length): both runs do
the same prefill and decode work, so the ratio of their output tokens per second is the
grammar's cost alone (target >= 90% on the 20B on one H200) rather than a difference in
output lengths. B also reports the host time spent filling masks
(``Sampler.mask_seconds``, overlapped with the forward) and how many ``stop`` outputs
validate (all must). Run C repeats B with each line's ``max_tokens`` set to its B length
+ 1: the same outputs, but admitted as run A's lines are (the engine admits by prompt +
``max_tokens``), so C against A is the grammar's cost with admission equal
(``same_budget_over_unconstrained``) and B against C what a loose ``max_tokens`` costs.

Each run also reports where its host time goes, per step (``Engine.phase_seconds``):
scheduling, preparing inputs, launching the forward, launching the sampling (of which
filling masks and packing per-row parameters are host work), applying the tokens
(matchers, stop checks, detokenization; on CUDA it includes waiting for the device),
and the seconds spent in ``add_request`` before the first step.

Run: ``python -m bench.structured`` (CUDA, the 20B shape on random weights). On a CPU
(``--device cpu``, default model ``preset:tiny``, one torch thread) the forward is cheap
and nothing overlaps, so the same runs isolate the host cost of structured output:
``host_ms_per_step`` (scheduling, inputs, masks, parameters, applying tokens) against
the unconstrained run's; the rest of a CPU step is the forward and the sampling
kernels, which the GPU runs in a fraction of the time. ``--label before|after`` keeps
several runs in one file. Writes bench/results/structured_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from bench.common import ROOT, git_commit
from bench.grammar_cpu import SCHEMA
from bench.throughput import build_model, warm_up
from models.dtypes import parse_dtype
from models.engine import Engine
from models.sampling import SamplingParams
from models.tokenizer import load_tokenizer


def prompts(tok: Any, n: int, max_len: int) -> list[list[int]]:
    texts = [json.loads(x)["text"] for x in
             (ROOT / "assets/lambada_test.jsonl").read_text().splitlines()[:n]]
    out = []
    for t in texts:
        ids = tok.encode(t)[: max_len - 16]
        out.append(ids + tok.encode("\nReview as JSON:"))
    return out


def run(engine: Engine, ps: list[list[int]],
        params: list[SamplingParams]) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """Run the prompts; the figures and each prompt's output length and finish reason
    (in prompt order)."""
    mask0 = engine.sampler.mask_seconds
    batch0 = getattr(engine.sampler, "batch_seconds", 0.0)
    phases0 = dict(getattr(engine, "phase_seconds", {}))
    steps0 = engine.stats["steps"]
    stats0 = dict(engine.stats)
    # Each run starts from an empty prefix cache: the second run must not find the
    # first one's prompts cached (the same prefill work in both).
    engine.set_prefix_caching(False)
    engine.set_prefix_caching(True)
    t0 = time.time()
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        engine.add_request(str(i), p, sp, arrival=t0)
    add_secs = time.time() - t0
    outs = []
    # Sequences running as each step is launched: how full the steps were (admission).
    running: list[int] = []
    while engine.has_unfinished():
        running.append(len(engine.scheduler.running))
        outs += engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    secs = time.time() - t0
    steps = int(engine.stats["steps"] - steps0)
    masks = engine.sampler.mask_seconds - mask0
    batch = getattr(engine.sampler, "batch_seconds", 0.0) - batch0
    phases = {k: v - phases0.get(k, 0.0) for k, v in getattr(engine, "phase_seconds", {}).items()}
    per_step = {k: round(1e3 * v / max(steps, 1), 3) for k, v in phases.items()}
    per_step["masks"] = round(1e3 * masks / max(steps, 1), 3)
    per_step["batch"] = round(1e3 * batch / max(steps, 1), 3)
    host = None
    if phases:
        # Work that is host work on any device (the launches of the forward and of the
        # sampling kernels are the computation itself on a CPU).
        host = round(1e3 * (phases["schedule"] + phases["prepare"] + phases["apply"] + masks
                            + batch) / max(steps, 1), 3)
    tokens = sum(o.completion_tokens for o in outs)
    reasons: dict[str, int] = {}
    invalid = 0
    for o in outs:
        s = o.samples[0]
        reasons[s.finish_reason or "none"] = reasons.get(s.finish_reason or "none", 0) + 1
        if params[0].constraint is not None and s.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(s.text), SCHEMA)
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
    lengths = [(o.completion_tokens, o.samples[0].finish_reason or "")
               for o in sorted(outs, key=lambda o: int(o.request_id))]
    return {"seconds": round(secs, 3), "output_tokens": tokens,
            "output_tok_per_s": round(tokens / secs, 1), "finish_reasons": reasons,
            "stop_invalid": invalid,
            "mask_host_seconds": round(masks, 3),
            "add_request_seconds": round(add_secs, 3), "steps": steps,
            "decode_steps": int(engine.stats["decode_steps"] - stats0["decode_steps"]),
            "preemptions": int(engine.stats["preemptions"] - stats0["preemptions"]),
            "running_peak": max(running, default=0),
            "running_mean": round(sum(running) / max(len(running), 1), 1),
            "running_by_step": running,
            "ms_per_step": per_step, "host_ms_per_step": host}, lengths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="default preset:gpt-neox-20b on CUDA, preset:tiny on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default=None,
                    help="store this run under runs[LABEL] of the output file, keeping "
                         "the other labels there (before/after comparisons)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.model is None:
        args.model = "preset:gpt-neox-20b" if device.type == "cuda" else "preset:tiny"
    if device.type == "cpu":
        torch.set_num_threads(1)  # steady figures on a shared machine
    dtype = parse_dtype(args.dtype, args.device)
    tok = load_tokenizer(ROOT / "assets/20B_tokenizer.json")
    model = build_model(args.model, device, dtype)
    engine = Engine(model, tok, max_num_seqs=args.max_num_seqs)
    # As a worker does before its first chunk: every step kind once and every decode
    # graph captured (captured on first use instead, the graphs' capture fell inside
    # whichever run came first, the constrained one: ~1.5 s of its ~12).
    warm_up(engine)
    engine.capture_graphs()
    ps = prompts(tok, args.num_prompts, args.prompt_tokens)
    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
    # A constrained warm-up: the grammar library's tokenizer index is built once per
    # engine, at its first constrained request.
    engine.generate([ps[0]], SamplingParams(response_format=rf, max_tokens=8))
    constrained, lengths = run(engine, ps, [
        SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, response_format=rf)
        for i in range(len(ps))])
    free, _ = run(engine, ps, [SamplingParams(temperature=0.8, seed=i, max_tokens=max(1, n),
                                              ignore_eos=True)
                               for i, (n, _) in enumerate(lengths)])
    # The same constrained lines again with max_tokens = each one's length (+ 1 for the
    # EOS of those the grammar ended):
    # the same outputs (per-request seeds), but the engine, which admits a request by its
    # projected final size (prompt + max_tokens), now projects what the unconstrained
    # run projects, so as many lines run at once. The gap between this run and the
    # first is admission; between this one and the unconstrained run, the grammar.
    budgeted, _ = run(engine, ps, [
        SamplingParams(temperature=0.8, seed=i, max_tokens=n + (why == "stop"),
                       response_format=rf)
        for i, (n, why) in enumerate(lengths)])
    ratio = constrained["output_tok_per_s"] / free["output_tok_per_s"]
    result: dict[str, Any] = {
        "bench": "structured", "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": args.model, "dtype": str(dtype).removeprefix("torch."),
        "num_prompts": len(ps), "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "unconstrained": free, "json_schema": constrained,
        "json_schema_same_budget": budgeted,
        "constrained_over_unconstrained": round(ratio, 4), "target": 0.9,
        "same_budget_over_unconstrained": round(
            budgeted["output_tok_per_s"] / free["output_tok_per_s"], 4),
    }
    if constrained["host_ms_per_step"] is not None and free["host_ms_per_step"]:
        result["host_ms_per_step_constrained_over_unconstrained"] = round(
            constrained["host_ms_per_step"] / free["host_ms_per_step"], 3)
    out = args.out or ROOT / f"bench/results/structured_{device.type}.json"
    if args.label is not None:
        old = json.loads(out.read_text()) if out.exists() else {}
        runs = old.get("runs", {}) if old.get("bench") == "structured" else {}
        runs[args.label] = result
        written: dict[str, Any] = {"bench": "structured", "runs": runs}
    else:
        written = result
    out.write_text(json.dumps(written, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in (
        "unconstrained", "json_schema", "json_schema_same_budget",
        "constrained_over_unconstrained", "same_budget_over_unconstrained")}, indent=1))
    return result


if __name__ == "__main__":
    main()
