"""Where a step's time goes: per-step wall time by kind, and a kernel profile of
steady-state decode steps. Run on a GPU:  python3 -m bench.profile_engine

Prints a table; writes JSON with --out. A diagnostic, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import git_commit
from bench.throughput import build_model, log, warm_up, workload
from models.engine import MAX_BATCH_TOKENS, MAX_NUM_SEQS, Engine
from models.sampling import SamplingParams


def profile_steps(step: Callable[[], None], n: int) -> Any:
    """torch.profiler's per-op averages over ``n`` engine steps (CPU and CUDA)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    return prof.key_averages()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:gpt-neox-20b")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = build_model(args.model, device, torch.bfloat16)
    engine = Engine(model, None, kv_memory=None, max_num_seqs=args.max_num_seqs,
                    max_batch_tokens=args.max_batch_tokens, cuda_graphs=True)
    log(f"decode kernel config (tile, warps, stages, heads/program): {engine.attn_config}")
    # Host phases of each step: the engine's own pieces (scheduler -> runner -> sampler),
    # driven here with a timer around each.
    phase = {"schedule": 0.0, "sample": 0.0}
    sched, runner = engine.scheduler, engine.runner

    @torch.inference_mode()
    def step() -> None:
        t = time.perf_counter()
        plan = sched.schedule()
        phase["schedule"] += time.perf_counter() - t
        if not plan.is_empty:
            logits, rows = runner.execute(runner.prepare(plan))
            t = time.perf_counter()
            # Includes waiting for the GPU: the step's one sync (tokens to the host).
            sched.update(plan, engine.sampler(logits, plan, rows))
            phase["sample"] += time.perf_counter() - t
        sched.take_outputs()

    warm_up(engine)
    engine.capture_graphs()
    prompts, outs = workload("a", args.num_prompts, model.config.max_position,
                             model.config.vocab_size, seed=0)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=o,
                                                     ignore_eos=True))
    rows = []
    profiled = None
    mixed_tab = None
    while engine.has_unfinished():
        s0 = dict(engine.stats)
        phase["schedule"] = phase["sample"] = 0.0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        running = len(sched.running)
        if mixed_tab is None and running >= 100 and sched.waiting:
            # Steps that prefill new prompts while ~running sequences decode.
            mixed_tab = profile_steps(step, 2).table(sort_by="cuda_time_total", row_limit=30)
            continue
        if profiled is None and running >= 200 and not sched.waiting and len(rows) > 60:
            averages = profile_steps(step, 3)
            profiled = averages.table(sort_by="cuda_time_total", row_limit=25)
            cpu_tab = averages.table(sort_by="cpu_time_total", row_limit=25)
            continue
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        kind = "decode" if engine.stats["decode_steps"] > s0.get("decode_steps", 0) else "mixed"
        rows.append({"kind": kind, "running": running, "host_s": t1 - t0, "total_s": t2 - t0,
                     "schedule_s": phase["schedule"], "sample_sync_s": phase["sample"]})
    for kind in ("decode", "mixed"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            tot = np.array([r["total_s"] for r in sel])
            run = np.array([r["running"] for r in sel])
            sch = np.array([r["schedule_s"] for r in sel])
            smp = np.array([r["sample_sync_s"] for r in sel])
            log(f"{kind}: {len(sel)} steps, median {np.median(tot) * 1e3:.1f} ms, "
                f"sum {tot.sum():.1f}s, mean running {run.mean():.0f}; median schedule "
                f"{np.median(sch) * 1e3:.2f} ms, sample+sync+update {np.median(smp) * 1e3:.2f} ms, "
                f"rest of the step (metadata, launches) "
                f"{np.median(tot - sch - smp) * 1e3:.2f} ms")
    big = [r for r in rows if r["kind"] == "decode" and r["running"] >= 200]
    if big:
        med = np.median([r["total_s"] for r in big])
        log(f"decode steps with >=200 running: median {med * 1e3:.1f} ms")
    print("decode steps:", profiled, sep="\n")
    print(cpu_tab)
    print("mixed (prefill + decode) steps:", mixed_tab, sep="\n")
    if args.out:
        meta = {"bench": "profile_engine", "commit": git_commit(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "device": torch.cuda.get_device_name(device), "model": args.model,
                "workload": f"a, {args.num_prompts} prompts",
                "engine": {"max_num_seqs": args.max_num_seqs,
                           "max_batch_tokens": args.max_batch_tokens}}
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows, "profile": profiled, "cpu": cpu_tab,
                       "mixed": mixed_tab}, f, indent=1)


if __name__ == "__main__":
    main()
