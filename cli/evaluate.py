"""``neoxq evaluate``: zero-shot LAMBADA and PIQA (and any lm-eval task) on neoxq's engine.

LAMBADA (OpenAI) and PIQA run from local files (the bundled copies, or ``--data-dir``)
with lm-evaluation-harness's exact request construction and metrics, without lm-eval installed. Any
other task name goes through lm-eval itself (``evals.harness.NeoXQLM``), which must
then be installed and able to reach the task's data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from cli.options import add_fp8_arguments
from models.dtypes import DTYPE_NAMES

# display names of the seed's table
METRIC_LABELS = {"perplexity": "ppl"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="zero-shot LAMBADA/PIQA (or any lm-eval task) on a model",
        description=(
            "Evaluate MODEL (preset:NAME, a Hugging Face dir, a NeoX YAML or a converted "
            "dir) zero-shot. lambada (= lambada_openai) and piqa read the data neoxq carries "
            "(or --data-dir) and need no network and no lm-eval; other names are lm-eval "
            "tasks."
        ),
    )
    p.add_argument("model", nargs="?", default=None,
                   help="model spec: preset:NAME, HF dir, NeoX YAML, converted dir; with "
                        "--api, the model name the batch lines give (optional)")
    p.add_argument("--api", metavar="URL", default=None,
                   help="score through a running neoxq API (its batch queue: every worker "
                        "shares the work) instead of loading the model here")
    p.add_argument("--api-key", default=None, help="bearer key for --api "
                                                   "(default $NEOXQ_API_KEY)")
    p.add_argument("--max-length", type=int, default=None,
                   help="the model's context in tokens, for --api (default 2048, the "
                        "20B's; a local model knows its own)")
    p.add_argument("--tasks", default="lambada,piqa",
                   help="comma-separated task names (default: lambada,piqa)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with lambada_test.jsonl and piqa/valid.jsonl + valid-labels.lst "
                        "(default: the copies bundled with neoxq)")
    p.add_argument("--limit", type=float, default=None,
                   help="first N documents per task (a fraction if below 1), as lm-eval's")
    p.add_argument("--batch-size", type=int, default=256,
                   help="requests per engine call (the engine batches by tokens inside)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json overriding the model's")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline stages (GPUs)")
    add_fp8_arguments(p)
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="bootstrap resamples for perplexity's stderr, as lm-eval (0: none)")
    p.add_argument("-o", "--output", type=Path, default=None, help="write results JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def format_table(results: dict[str, dict[str, Any]], versions: dict[str, Any]) -> str:
    """The seed's table: Task | Version | Metric | Value | ± | Stderr."""
    rows = [("Task", "Version", "Metric", "Value", "", "Stderr")]
    for task, metrics in results.items():
        first = True
        for key, value in metrics.items():
            if key.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{key}_stderr")
            rows.append((
                task if first else "",
                str(versions.get(task, "")) if first else "",
                METRIC_LABELS.get(key, key),
                f"{value:.4f}",
                "±",
                f"{stderr:.4f}" if isinstance(stderr, int | float) else "N/A",
            ))
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("|" + "|".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}"
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     + "|")
        if n == 0:
            lines.append("|" + "|".join("-" * w for w in widths) + "|")
    return "\n".join(lines)


def _run_lm_eval_tasks(backend: Any, names: list[str], args: argparse.Namespace) -> dict:
    """Other tasks through lm-eval itself, on the same engine."""
    try:
        import lm_eval
    except ImportError:
        raise SystemExit(
            f"tasks {', '.join(names)} are lm-eval tasks and lm-eval is not installed "
            "(pip install 'neoxq[eval]'); lambada and piqa need no lm-eval"
        ) from None
    from evals.harness import NeoXQLM

    lm = NeoXQLM(backend=backend, batch_size=args.batch_size, device=args.device)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit,
                                  bootstrap_iters=args.bootstrap_iters)
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt and isinstance(value, int | float):
                clean[name] = value
            elif filt and value == "N/A":
                clean[name] = None
        results[task] = clean
    return {"results": results, "versions": out.get("versions", {}),
            "n_samples": {k: v.get("effective", v) if isinstance(v, dict) else v
                          for k, v in out.get("n-samples", {}).items()}}


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table; write JSON with ``-o``."""
    from evals.data import DEFAULT_DATA_DIR, DataError
    from evals.tasks import get_task, is_local_task

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        print("error: --tasks: expected at least one task name", file=sys.stderr)
        return 2
    local = [get_task(n).name for n in names if is_local_task(n)]
    remote = [n for n in names if not is_local_task(n)]
    if local:
        # fail on a bad data file before spending minutes loading the model
        try:
            for name in dict.fromkeys(local):
                get_task(name).load(args.data_dir)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    if args.api:
        return _run_api(args, local, remote)
    if args.model is None:
        print("error: MODEL is required (or --api URL)", file=sys.stderr)
        return 2

    import torch

    from evals.backend import build_backend
    from evals.runner import evaluate_local
    from models.dtypes import canonical_dtype_name

    dtype = canonical_dtype_name(args.dtype, args.device)
    t0 = time.perf_counter()
    backend = build_backend(
        args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer,
        pipeline_parallel=args.pipeline_parallel, kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
    )
    load_s = time.perf_counter() - t0

    report: dict[str, Any] = {"results": {}, "versions": {}, "n_samples": {}}
    if local:
        try:
            out = evaluate_local(
                backend.engine, backend.encode, local, args.data_dir,
                prefix_token_id=backend.eos_id, max_length=backend.max_length,
                limit=args.limit, batch_size=args.batch_size,
                bootstrap_iters=args.bootstrap_iters, progress=not args.no_progress,
                encode_batch=backend.encode_batch,
            )
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for key in ("results", "versions", "n_samples"):
            report[key].update(out[key])
        report["timing"] = out["timing"]
        report["n_requests"] = out["n_requests"]
    if remote:
        out = _run_lm_eval_tasks(backend, remote, args)
        for key in ("results", "versions", "n_samples"):
            report[key].update(out[key])

    report["config"] = {
        "model": args.model, "device": args.device, "dtype": str(dtype),
        "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization,
        "tokenizer": args.tokenizer, "tasks": names, "limit": args.limit,
        "batch_size": args.batch_size,
        "data_dir": str(args.data_dir or DEFAULT_DATA_DIR) if local else None,
        "bootstrap_iters": args.bootstrap_iters, "load_s": load_s,
        "torch": torch.__version__,
    }
    print(format_table(report["results"], report["versions"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _run_api(args: argparse.Namespace, local: list[str], remote: list[str]) -> int:
    """``--api``: the local tasks' requests scored by the fleet behind a neoxq API."""
    import os

    from evals.data import DEFAULT_DATA_DIR, DataError
    from evals.remote import ApiScorer, RemoteError
    from evals.runner import evaluate_local
    from models.tokenizer import load_tokenizer

    if remote:
        print(f"error: --api runs lambada and piqa only; {', '.join(remote)} need a local "
              "model", file=sys.stderr)
        return 2
    if args.max_length is not None and args.max_length < 2:
        print("error: --max-length: expected at least 2", file=sys.stderr)
        return 2
    import assets

    # The tokenizer the workers' model uses (the 20B's unless --tokenizer says otherwise):
    # requests travel as token ids, so the API's side never tokenizes differently.
    tok = load_tokenizer(args.tokenizer or assets.TOKENIZER)
    max_length = args.max_length or 2048
    scorer = ApiScorer(args.api, api_key=args.api_key or os.environ.get("NEOXQ_API_KEY"),
                       model=args.model)
    try:
        out = evaluate_local(
            scorer, lambda t: list(tok.encode(t)), local, args.data_dir,
            prefix_token_id=int(tok.eos_id if tok.eos_id is not None else 0),
            max_length=max_length, limit=args.limit, batch_size=1 << 30,
            bootstrap_iters=args.bootstrap_iters, progress=not args.no_progress,
            encode_batch=lambda ts: [list(x) for x in tok.encode_batch(ts)])
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RemoteError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        scorer.close()
    report: dict[str, Any] = {k: out[k] for k in ("results", "versions", "n_samples",
                                                  "timing", "n_requests")}
    report["config"] = {
        "api": args.api, "model": args.model, "tokenizer": args.tokenizer, "tasks": local,
        "limit": args.limit, "max_length": max_length, "batches": scorer.batch_ids,
        "data_dir": str(args.data_dir or DEFAULT_DATA_DIR),
        "bootstrap_iters": args.bootstrap_iters,
    }
    print(format_table(report["results"], report["versions"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default`` for eval reports: a non-finite float is null,
    anything else (a path, a dtype) its string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)
