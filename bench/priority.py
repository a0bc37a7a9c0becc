"""Interactive requests on a worker busy with a batch: latency and the batch's cost.

    python -m bench.priority --out bench/results/priority_h200.json          # 20B shape, GPU 0
    python -m bench.priority --model preset:tiny --device cpu --num-prompts 64 \\
        --idle-requests 3 --gap 0.5 --out /tmp/priority_cpu.json                # smoke

About 3-4 minutes on one H200 with the defaults (a 2,000-prompt batch, twice).

One worker (``neoxq worker``, GPU 0) and ``neoxq api`` on an embedded Redis and a SQLite
store, in one run:

1. warm-up: a small batch and a few interactive requests (CUDA graphs, kernel tuning);
2. **idle**: ``--idle-requests`` interactive completions, one after another, on the
   idle worker - ``POST /v1/completions`` of a 128-token prompt, 64 new tokens (greedy,
   ``ignore_eos``), timed at the client from request to complete answer;
3. **batch alone**: a ``--num-prompts`` batch (workload (a): 128 -> 128 tokens, as
   ``bench.throughput``), timed from submission until every result is committed;
4. **batch + interactive**: the same batch again while interactive completions are sent
   one after another (``--gap`` seconds apart) until it completes; the latencies of those
   that ran wholly inside the batch, and the batch's time.

While an interactive request runs, the worker caps the batch's tokens per engine step
(``--yield-tokens``, passed to ``neoxq worker``; default the engine's): the batch runs
less efficiently for that time, so its drop grows with the share of its time an
interactive request was in flight (``busy_fraction``, reported with
``drop_per_busy_fraction``). The default gap of 4 s keeps requests occasional (about a
quarter of the batch's time), as a batch user's smoke tests or notebook calls are.

Figures: interactive latency (median, p90, max) idle and busy and their ratio (target
<= 2x), the batch's output tok/s alone and with interactive traffic and the drop (target
<= 10%). Written to ``--out`` with the commit, the device and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import git_commit, stop
from bench.scale import (
    Fleet,
    device_name,
    model_shape,
    parse_fleet_args,
    run_batch,
    workload_lines,
)
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[priority {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """``neoxq api`` on the fleet's queue and store."""

    def __init__(self, fleet: Fleet, db_url: str, work: Path) -> None:
        import httpx

        s = fleet.settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
        env.update({"NEOXQ_DATABASE_URL": db_url, "NEOXQ_REDIS_URL": s.redis_url,
                    "NEOXQ_QUEUE": s.queue, "NEOXQ_REDIS_KEY_PREFIX": s.redis_key_prefix,
                    "NEOXQ_INTERACTIVE_TIMEOUT": "120"})
        out = open(work / "api.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--port",
                                      str(self.port), "--log-level", "warning",
                                      "--no-upgrade"],
                                     cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.http = httpx.Client(base_url=self.url, timeout=600)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "api.log").read_text()[-3000:])
            time.sleep(0.2)

    def complete(self, prompt: list[int], max_tokens: int) -> float:
        """One interactive completion; seconds from request to answer."""
        t0 = time.perf_counter()
        r = self.http.post("/v1/completions", json={
            # The deployment's default name: what the fleet's workers serve.
            "model": Settings().model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True})
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"interactive request: HTTP {r.status_code} {r.text[:500]}")
        n = r.json()["usage"]["completion_tokens"]
        if n != max_tokens:
            raise RuntimeError(f"interactive request generated {n} tokens, not {max_tokens}")
        return took

    def close(self) -> None:
        self.http.close()
        stop(self.proc, timeout=30)


def stats(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "median_s": statistics.median(s),
            "p90_s": s[min(len(s) - 1, int(0.9 * len(s)))], "max_s": s[-1],
            "mean_s": statistics.fmean(s), "all_s": [round(x, 4) for x in s]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=2000, help="the batch's prompts")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="interactive prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="interactive completion")
    ap.add_argument("--idle-requests", type=int, default=10)
    ap.add_argument("--gap", type=float, default=4.0,
                    help="seconds between interactive requests during the batch")
    ap.add_argument("--yield-tokens", type=int, default=None,
                    help="the worker's --yield-tokens (default: the engine's; -1: no cap)")
    ap.add_argument("--warmup", type=int, default=64, help="prompts of the warm-up batch")
    args = parse_fleet_args(ap, argv, max_num_seqs=512, batch_timeout=1800.0, stores=False)
    args.worker_args = ([] if args.yield_tokens is None
                        else ["--yield-tokens", str(args.yield_tokens)])

    from cli.embedded import EmbeddedRedis
    from store.db import create_all, make_engine

    result: dict[str, Any] = {
        "benchmark": "priority", "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(args.device), "model": args.model,
        "batch": f"{args.num_prompts} x 128 -> 128 tokens (workload a), greedy, ignore_eos",
        "interactive": f"{args.prompt_tokens}-token prompt -> {args.max_tokens} tokens, "
                       "greedy, ignore_eos, POST /v1/completions",
        "gap_s": args.gap,
        "worker": {"max_num_seqs": args.max_num_seqs, "concurrency": args.concurrency,
                   "yield_tokens": "engine default" if args.yield_tokens is None
                   else args.yield_tokens,
                   "dtype": args.dtype or ("bfloat16" if args.device != "cpu" else "float32")},
    }
    max_position, vocab = model_shape(args.model)
    rng = random.Random(args.seed + 1)

    def prompt() -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(args.prompt_tokens)]

    with tempfile.TemporaryDirectory(prefix="neoxq-priority-") as tmp:
        work = Path(tmp)
        redis_srv = EmbeddedRedis(log_dir=work).start()
        db_url = f"sqlite:///{work / 'neoxq.db'}"
        db = make_engine(db_url)
        create_all(db)
        fleet = Fleet(args, "1", db_url, redis_srv.url, work)
        api = None
        try:
            result["ready_s"] = fleet.wait_ready(db, args.load_timeout)
            api = Api(fleet, db_url, work)
            log(f"worker ready in {result['ready_s']:.0f}s; warming up")
            run_batch(fleet, db, workload_lines("a", args.warmup, max_position, vocab,
                                                args.seed + 7), args.batch_timeout)
            for _ in range(3):
                api.complete(prompt(), args.max_tokens)

            idle = [api.complete(prompt(), args.max_tokens) for _ in range(args.idle_requests)]
            result["idle"] = stats(idle)
            log(f"idle: median {result['idle']['median_s']:.3f}s")

            lines = workload_lines("a", args.num_prompts, max_position, vocab, args.seed)
            alone = run_batch(fleet, db, lines, args.batch_timeout)
            result["batch_alone"] = {k: alone[k] for k in ("requests", "seconds",
                                                           "output_tokens",
                                                           "output_tok_per_s")}
            log(f"batch alone: {alone['seconds']:.1f}s, {alone['output_tok_per_s']:.0f} tok/s")

            busy: list[tuple[float, float, float]] = []  # (start, end, seconds)
            done = threading.Event()
            errors: list[str] = []

            def traffic() -> None:
                time.sleep(args.gap)
                while not done.is_set():
                    t0 = time.time()
                    try:
                        took = api.complete(prompt(), args.max_tokens)
                    except Exception as exc:  # noqa: BLE001 - reported in the result
                        errors.append(str(exc))
                        return
                    busy.append((t0, time.time(), took))
                    done.wait(args.gap)

            sender = threading.Thread(target=traffic, daemon=True)
            t_batch = time.time()
            sender.start()
            mixed = run_batch(fleet, db, lines, args.batch_timeout)
            t_end = t_batch + mixed["seconds"]
            done.set()
            sender.join(timeout=600)
            inside = [s for t0, t1, s in busy if t1 <= t_end]
            result["busy"] = stats(inside)
            result["busy"]["sent_during_batch"] = len(busy)
            result["busy"]["errors"] = errors
            # Seconds of the batch with an interactive request in flight.
            overlap = sum(max(0.0, min(t1, t_end) - max(t0, t_batch)) for t0, t1, _ in busy)
            busy_fraction = overlap / mixed["seconds"] if mixed["seconds"] else 0.0
            result["batch_with_interactive"] = {
                k: mixed[k] for k in ("requests", "seconds", "output_tokens",
                                      "output_tok_per_s")}
            result["ratios"] = {
                "busy_over_idle_median": (result["busy"].get("median_s", float("nan"))
                                          / result["idle"]["median_s"]),
                "busy_over_idle_p90": (result["busy"].get("p90_s", float("nan"))
                                       / result["idle"]["p90_s"]),
                "batch_throughput_drop": 1 - mixed["output_tok_per_s"]
                / alone["output_tok_per_s"],
                "busy_fraction": busy_fraction,
            }
            r = result["ratios"]
            r["drop_per_busy_fraction"] = (r["batch_throughput_drop"] / busy_fraction
                                           if busy_fraction else None)
            result["target"] = {
                "interactive_at_most_2x_idle": bool(r["busy_over_idle_median"] <= 2.0),
                "batch_drop_at_most_10pct": bool(r["batch_throughput_drop"] <= 0.10),
            }
            log(f"busy: median {result['busy'].get('median_s', float('nan')):.3f}s "
                f"({len(inside)} requests); batch {mixed['output_tok_per_s']:.0f} tok/s; "
                f"{json.dumps(r)}")
        except Exception as exc:  # noqa: BLE001 - what finished is still written
            result["error"] = str(exc)[-4000:]
            log(f"failed: {exc}")
        finally:
            if api is not None:
                api.close()
            fleet.stop()
            db.dispose()
            redis_srv.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if "error" in main(sys.argv[1:]) else 0)
