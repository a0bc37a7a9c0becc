"""Where a step's time goes: per-step wall time by kind, and a kernel profile of
steady-state decode steps. Run on a GPU:  python3 -m bench.profile_engine

``--overlapped`` drives the engine's own ``step()`` (host work overlapped with the device,
as in bench.throughput) and traces a few steps of each kind: how much of the window the
GPU was busy, and kernel time by kind (GEMM, decode attention, the rest) — what a sum of
kernel times cannot show (gaps between steps, kernels running side by side).

Prints a table; writes JSON with --out. A diagnostic, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
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


def kernel_kind(name: str) -> str:
    """A GPU activity's kind, by its name: ``gemm``, ``attention`` (paged decode and its
    merge), ``copy`` (memcpy / memset) or ``other``."""
    low = name.lower()
    if any(k in low for k in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")):
        return "gemm"
    if "paged_decode" in low or "merge_kernel" in low or "cascade" in low:
        return "attention"
    if "memcpy" in low or "memset" in low:
        return "copy"
    return "other"


# Kernels listed by name in a trace's summary (the longest in total).
TOP_KERNELS = 16


def gpu_timeline(trace: dict[str, Any]) -> dict[str, Any]:
    """From a chrome trace (torch.profiler's export): the window from the first GPU
    activity's start to the last one's end, the time at least one ran (busy), kernel time
    by kind and of the longest kernels by name, and the time two or more ran at once
    (overlap)."""
    spans: list[tuple[float, float, str]] = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            start = float(ev["ts"])
            spans.append((start, start + float(ev.get("dur", 0.0)), ev.get("name", "")))
    if not spans:
        return {"window_ms": 0.0, "busy_ms": 0.0, "busy_share": 0.0, "overlap_ms": 0.0,
                "by_kind_ms": {}, "activities": 0}
    points = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    busy = overlap = 0.0
    depth, last = 0, points[0][0]
    for t, step in points:
        if depth >= 1:
            busy += t - last
        if depth >= 2:
            overlap += t - last
        depth += step
        last = t
    window = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for a, b, name in spans:
        kind, short = kernel_kind(name), name[:90]
        by_kind[kind] = by_kind.get(kind, 0.0) + (b - a) / 1e3
        by_name[short] = by_name.get(short, 0.0) + (b - a) / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"window_ms": window / 1e3, "busy_ms": busy / 1e3,
            "busy_share": busy / window if window else 0.0, "overlap_ms": overlap / 1e3,
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items())},
            "top_kernels_ms": {k: round(v, 3) for k, v in top},
            "activities": len(spans)}


def trace_steps(step: Callable[[], object], n: int) -> dict[str, Any]:
    """Run ``n`` calls of ``step`` under torch.profiler: their wall time and
    :func:`gpu_timeline` of the trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            step()
        wall = time.perf_counter() - t
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    return {"steps": n, "wall_ms": 1e3 * wall, **gpu_timeline(trace)}


def overlapped(engine: Engine, prompts: list[list[int]], outs: list[int]) -> dict[str, Any]:
    """Workload prompts through ``engine.step()``; traces of 4 steps each: mixed
    (prefill beside decodes), decode in the first wave (>= 150 running while prompts
    still wait, 40 steps in) and in the last (>= 150 running, none waiting, 40 steps in).
    Greedy admission makes waves of ~330 and ~180 on (a); even waves two of 256."""
    sched = engine.scheduler
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=o,
                                                     ignore_eos=True))
    traces: dict[str, Any] = {}
    since: dict[str, int] = {}
    decode = False  # whether the last step was decode-only
    while engine.has_unfinished():
        running = len(sched.running)
        if "mixed" not in traces and sched.waiting and running >= 100:
            traces["mixed"] = {"running": running, **trace_steps(engine.step, 4)}
            continue
        band = None if running < 150 else (
            "decode_first_wave" if sched.waiting else "decode_last_wave")
        if decode and band is not None and band not in traces:
            since[band] = since.get(band, 0) + 1
            if since[band] > 40:
                ctx = float(np.mean([len(s.tokens) for s in sched.running]))
                traces[band] = {"running": running, "mean_context": ctx,
                                **trace_steps(engine.step, 4)}
                log(f"{band}: {traces[band]}")
                continue
        before = engine.stats["decode_steps"]
        engine.step()
        decode = engine.stats["decode_steps"] > before
    return traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:gpt-neox-20b")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-branch-streams", action="store_true",
                    help="decode graphs without the MLP's second stream (kernel times then "
                         "add up: none runs beside another)")
    ap.add_argument("--overlapped", action="store_true",
                    help="trace the engine's own overlapped steps (see the module's docstring)")
    args = ap.parse_args()
    device = torch.device("cuda")
    model = build_model(args.model, device, torch.bfloat16)
    engine = Engine(model, None, kv_memory=None, max_num_seqs=args.max_num_seqs,
                    max_batch_tokens=args.max_batch_tokens, cuda_graphs=True,
                    branch_streams=not args.no_branch_streams)
    log(f"decode kernel config (tile, warps, stages, heads/program): {engine.attn_config}")
    meta = {"bench": "profile_engine", "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": torch.cuda.get_device_name(device), "model": args.model,
            "workload": f"a, {args.num_prompts} prompts",
            "engine": {"max_num_seqs": args.max_num_seqs,
                       "max_batch_tokens": args.max_batch_tokens,
                       "branch_streams": not args.no_branch_streams}}
    if args.overlapped:
        warm_up(engine)
        engine.capture_graphs()
        prompts, outs = workload("a", args.num_prompts, model.config.max_position,
                                 model.config.vocab_size, seed=0)
        traces = overlapped(engine, prompts, outs)
        for kind, tr in traces.items():
            log(f"{kind}: {json.dumps(tr)}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**meta, "mode": "overlapped", "traces": traces}, f, indent=1)
        return
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
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows, "profile": profiled, "cpu": cpu_tab,
                       "mixed": mixed_tab}, f, indent=1)


if __name__ == "__main__":
    main()
