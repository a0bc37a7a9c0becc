"""Pipeline parallelism: workload (a) of the engine benchmark at PP=1, 2 (, 4) in one run.

Each pipeline size runs in its own child process, one after the other (a fresh CUDA
context and process group each time; PP=1 uses one GPU, PP=N the first N), so the
ratios compare like with like on the same machine in the same session. Per size:
output tok/s, the speed-up over PP=1, per-stage layers, weight bytes and KV cache, and
the load time. The workload and the engine's measurement are ``bench.throughput``'s.

    python -m bench.pipeline --stages 1 2 --out bench/results/pipeline_h200.json   # 2 GPUs
    python -m bench.pipeline --stages 1 2 4 --out bench/results/pipeline_h200.json # 4 GPUs
    python -m bench.pipeline --model preset:tiny --device cpu --num-prompts 16      # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import git_commit

ROOT = Path(__file__).resolve().parents[1]


def _single(args: argparse.Namespace) -> dict[str, Any]:
    """One pipeline size, in this process: build, warm up, run workload (a)."""
    import torch

    from bench.throughput import log, run_ours, warm_up, workload
    from models.dtypes import canonical_dtype_name
    from models.engine import Engine, PipelineEngine
    from models.runtime import build_engine

    n = args.single
    device = args.device
    dtype = canonical_dtype_name(args.dtype, device)
    if device == "cpu":
        torch.set_num_threads(1)
    kw: dict[str, Any] = {"max_num_seqs": args.max_num_seqs,
                          "max_batch_tokens": args.max_batch_tokens}
    if args.kv_memory is not None:
        kw["kv_memory"] = args.kv_memory if device.startswith("cuda") else int(args.kv_memory)
    if args.no_cuda_graphs:
        kw["cuda_graphs"] = False
    if n > 1 and args.micro_batches:
        kw["micro_batches"] = args.micro_batches
    t = time.time()
    engine = build_engine(args.model, device=device, dtype=dtype, pipeline_parallel=n,
                          seed=args.seed, **kw)
    load_s = time.time() - t
    try:
        cfg = engine.config
        if isinstance(engine, Engine):
            stages = [{"rank": 0, "layer_range": [0, cfg.num_layers], "device": str(engine.device),
                       "weight_bytes": engine.model.parameter_bytes(),
                       "kv_bytes": engine.kv_cache_bytes}]
            cache_tokens = engine.cache_tokens
        else:
            assert isinstance(engine, PipelineEngine)
            stages = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()
                       if k != "pid"} for s in engine.stage_info]
            cache_tokens = engine.cache_tokens
        for s in stages:
            log(f"PP={n} stage {s['rank']}: layers {s['layer_range'][0]}..{s['layer_range'][1] - 1}"
                f" on {s['device']}, weights {s['weight_bytes'] / 1e9:.2f} GB, KV "
                f"{s.get('kv_bytes', 0) / 1e9:.1f} GB")
        log(f"PP={n}: built in {load_s:.1f}s; KV cache {cache_tokens} tokens")
        t = time.time()
        warm_up(engine)
        graphs = engine.capture_graphs()
        log(f"PP={n}: warm-up {time.time() - t:.1f}s ({graphs} CUDA graphs)")
        prompts, outs = workload("a", args.num_prompts, cfg.max_position,
                                 min(cfg.vocab_size, 50277), args.seed)
        res = run_ours(engine, prompts, outs)
        log(f"PP={n}: {res['seconds']:.1f}s, {res['output_tok_per_s']:.0f} out tok/s, "
            f"stats {res['engine_stats']}")
        groups = engine.micro_batches if isinstance(engine, PipelineEngine) else 1
        return {"pipeline_parallel": n, "micro_batches": groups,
                "load_s": load_s, "stages": stages,
                "cache_tokens": cache_tokens, "run": res,
                "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"}
    finally:
        engine.close()


_git_commit = git_commit


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:gpt-neox-20b")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-prompts", type=int, default=None, help="default 1024 (workload a)")
    ap.add_argument("--max-num-seqs", type=int, default=512, help="per micro-batch")
    ap.add_argument("--max-batch-tokens", type=int, default=2048, help="per micro-batch")
    ap.add_argument("--kv-memory", type=float, default=None,
                    help="fraction of free GPU memory per GPU (bytes off CUDA)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="micro-batch groups in flight for PP>1 (default N + 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pipeline size")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--single-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.single is not None:
        res = _single(args)
        if args.single_out:
            args.single_out.write_text(json.dumps(res))
        return res

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    result: dict[str, Any] = {
        "commit": _git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": args.model, "workload": "a", "device": None,
        "engine": {"max_num_seqs_per_micro_batch": args.max_num_seqs,
                   "max_batch_tokens_per_micro_batch": args.max_batch_tokens,
                   "kv_memory": args.kv_memory},
        "runs": {},
    }
    child = ["--model", args.model, "--device", args.device, "--seed", str(args.seed),
             "--max-num-seqs", str(args.max_num_seqs),
             "--max-batch-tokens", str(args.max_batch_tokens)]
    for flag, value in (("--dtype", args.dtype), ("--num-prompts", args.num_prompts),
                        ("--kv-memory", args.kv_memory)):
        if value is not None:
            child += [flag, str(value)]
    if args.no_cuda_graphs:
        child.append("--no-cuda-graphs")
    if args.micro_batches:
        child += ["--micro-batches", str(args.micro_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.stages:
            out = Path(tmp) / f"pp{n}.json"
            cmd = [sys.executable, "-m", "bench.pipeline", *child, "--single", str(n),
                   "--single-out", str(out)]
            print(f"=== PP={n}: {' '.join(cmd)}", flush=True)
            t = time.time()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0 or not out.exists():
                print(f"=== PP={n} failed ({rc}) after {time.time() - t:.0f}s", flush=True)
                result["runs"][str(n)] = {"error": f"exit {rc}"}
                continue
            res = json.loads(out.read_text())
            result["device"] = res.pop("device")
            result["runs"][str(n)] = res
            base = result["runs"].get("1", {}).get("run")
            if base and n != 1:
                res["speedup_over_pp1"] = res["run"]["output_tok_per_s"] / base[
                    "output_tok_per_s"]
            print(f"=== PP={n}: {res['run']['output_tok_per_s']:.0f} out tok/s"
                  + (f", {res['speedup_over_pp1']:.2f}x PP=1" if "speedup_over_pp1" in res
                     else ""), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
