"""The first batch a fresh worker serves vs its second, with and without the worker's
warm-up, through the worker's own path (Redis + SQL + ``neoxq worker``).

    python -m bench.first_batch --out bench/results/first_batch_h200.json   # one GPU
    python -m bench.first_batch --model preset:tiny --device cpu --num-prompts 16  # smoke

For each mode (``--modes``, default ``off on``): one worker starts (``NEOXQ_WORKER_WARMUP``
0 or 1) and loads the model; once it reports ready (after its warm-up, when on) the same
workload is submitted twice as two batches, one after the other, each timed from
``submit_batch`` until the batch is ``completed`` in the store. ``first_over_second`` is
the first batch's time over the second's: how much slower a fresh worker's first batch
runs (graph captures, kernel compiles, allocator growth inside its time). The warm-up
should bring it to ~1.0. The submission itself runs in this process, whose first
``submit_batch`` pays its own first use (SQL statements, the queue connection) — no
worker's doing — so ``worker_first_over_second`` compares the two batches from the end
of their submission on. The two batches have the same shapes (``bench.throughput``'s
workloads, greedy, ``ignore_eos``) with different prompts (no prefix-cache reuse).

Redis is embedded (``cli.embedded``) unless ``--redis-url``; the store is SQLite in a
temporary directory. The JSON has the commit, the device, the date and every figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import git_commit
from bench.scale import (
    Fleet,
    device_name,
    log,
    model_shape,
    parse_fleet_args,
    run_batch,
    workload_lines,
)


def run_mode(args: argparse.Namespace, warm: bool, redis_url: str, work: Path,
             ) -> dict[str, Any]:
    """One fresh worker (warm-up on or off): its readiness, then two batches."""
    from store.db import create_all, make_engine, session_scope
    from store.tables import Worker

    mode = "on" if warm else "off"
    db_url = args.database_url or f"sqlite:///{work / f'first_batch_{mode}.db'}"
    db = make_engine(db_url)
    create_all(db)
    max_position, vocab = model_shape(args.model)
    fleet = Fleet(args, "1", db_url, redis_url, work,
                  env={"NEOXQ_WORKER_WARMUP": "1" if warm else "0"})
    try:
        ready_s = fleet.wait_ready(db, args.load_timeout)
        with session_scope(db) as s:
            warmup_s = s.get(Worker, fleet.ids[0]).warmup_seconds
        log(f"warm-up {mode}: worker ready in {ready_s:.0f}s (warm-up "
            f"{'-' if warmup_s is None else f'{warmup_s:.1f}s'})")
        runs = []
        for k in range(2):
            lines = workload_lines(args.workload, args.num_prompts, max_position, vocab,
                                   args.seed + k)
            r = run_batch(fleet, db, lines, args.batch_timeout)
            runs.append(r)
            log(f"warm-up {mode}: batch {k + 1}: {r['seconds']:.2f}s, "
                f"{r['output_tok_per_s']:.0f} out tok/s")
        after = [r["seconds"] - r["submit_seconds"] for r in runs]
        return {"ready_s": ready_s, "warmup_seconds": warmup_s,
                "first": runs[0], "second": runs[1],
                "first_over_second": runs[0]["seconds"] / runs[1]["seconds"],
                "worker_first_over_second": after[0] / after[1]}
    finally:
        fleet.stop()
        db.dispose()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="worker warm-up off and/or on (each a fresh worker)")
    ap.add_argument("--workload", choices=("a", "b"), default="a")
    ap.add_argument("--num-prompts", type=int, default=256, help="prompts of each batch")
    args = parse_fleet_args(ap, argv, max_num_seqs=256, batch_timeout=600.0)
    result: dict[str, Any] = {
        "benchmark": "first_batch", "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(args.device), "model": args.model,
        "workload": f"({args.workload}) x {args.num_prompts} prompts, twice",
        "worker": {"max_num_seqs": args.max_num_seqs, "concurrency": args.concurrency,
                   "dtype": args.dtype or ("bfloat16" if args.device != "cpu" else "float32")},
        "modes": {},
    }
    redis_srv = None
    with tempfile.TemporaryDirectory(prefix="neoxq-first-batch-") as tmp:
        work = Path(tmp)
        redis_url = args.redis_url
        if redis_url is None:
            from cli.embedded import EmbeddedRedis

            redis_srv = EmbeddedRedis(log_dir=work).start()
            redis_url = redis_srv.url
        try:
            for mode in args.modes:
                t = time.time()
                res = run_mode(args, mode == "on", redis_url, work)
                res["wall_s"] = time.time() - t
                result["modes"][mode] = res
                log(f"warm-up {mode}: first / second batch = {res['first_over_second']:.3f} "
                    f"({res['worker_first_over_second']:.3f} after submission)")
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=2) + "\n")
        finally:
            if redis_srv is not None:
                redis_srv.stop()
    summary = {m: round(r["first_over_second"], 3) for m, r in result["modes"].items()}
    result["first_over_second"] = summary
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"first_over_second: {json.dumps(summary)}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the GPU machines' rule for NCCL
    main()
