"""Scaling through the queue: 2 workers (one per GPU) vs 1, and one worker in 2 pipeline
stages, on workloads (a) and (b), each after a warm-up, in one run.

    python -m bench.scale --out bench/results/scale_h200.json              # 2 GPUs
    python -m bench.scale --configs pp2 --out bench/results/scale_h200.json  # add to it

With the 20B shape on 2 H200s, configurations ``1`` and ``2`` take about 6 minutes
together ((b)'s 1,000 prompts take ~2.5 minutes on one worker) and ``pp2`` about 3 more:
run ``--configs 1 2`` and ``--configs pp2`` as two calls where one is limited to 10.
    python -m bench.scale --model preset:tiny --device cpu --num-prompts-a 48 \\
        --num-prompts-b 48 --out /tmp/scale_cpu.json                       # smoke

Configurations (``--configs``, default ``1 2 pp2``):

- ``1``: one worker on GPU 0 - the baseline;
- ``2``: two workers, GPU 0 and GPU 1 (``CUDA_VISIBLE_DEVICES`` each), as ``neoxq up``
  starts them by default;
- ``pp2``: one worker holding the model in 2 pipeline stages on GPUs 0 and 1;
- ``2-noshare``: two workers with tail sharing off (``NEOXQ_WORKER_SHARE_TAIL=0``).

Per configuration: the workers are started and load the model (not timed), a warm-up
batch runs through them (CUDA graphs, kernel tuning, allocator), then each workload is
submitted as one batch; its clock runs from ``submit_batch`` until the batch is
``completed`` in the store - every result committed. Workloads are
``bench.throughput.workload``'s: (a) 1,024 prompts of 128 tokens -> 128 new tokens;
(b) 1,000 prompts of 16-1,024 tokens -> 16-512 new tokens (greedy, ``ignore_eos``: the
same work every run). Figures: output tok/s, the speed-up over ``1``, each worker's items
and tokens, and the tail (seconds between the first worker running out of work and the
batch's end). Redis is embedded (``cli.embedded``; ``--redis-url`` to use another) and
the store SQLite in a temporary directory (``--database-url`` for PostgreSQL).

The JSON is written after every configuration and merged with what ``--out`` already
holds (another ``--configs`` run adds to it), so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import drop_redis_keys, git_commit, stop

ROOT = Path(__file__).resolve().parents[1]

# name -> (worker GPU groups, tail sharing)
CONFIGS: dict[str, tuple[list[list[str]], bool]] = {
    "1": ([["0"]], True),
    "2": ([["0"], ["1"]], True),
    "pp2": ([["0", "1"]], True),
    "2-noshare": ([["0"], ["1"]], False),
}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def workload_lines(name: str, n: int | None, max_position: int, vocab: int,
                   seed: int) -> list[dict[str, Any]]:
    """JSONL lines of workload ``name``: token-id prompts, fixed output lengths."""
    from bench.throughput import workload

    prompts, outs = workload(name, n, max_position, vocab, seed)
    return [{"custom_id": f"{name}{i}", "prompt": p, "max_tokens": o, "temperature": 0,
             "ignore_eos": True} for i, (p, o) in enumerate(zip(prompts, outs, strict=True))]


def model_shape(model: str) -> tuple[int, int]:
    """(context length, usable vocabulary) of the model, without building it."""
    from models.config import get_preset

    if model.startswith("preset:"):
        cfg = get_preset(model.split(":", 1)[1])
        return cfg.max_position, min(cfg.vocab_size, 50277)
    cfg_path = Path(model) / "config.json"
    data = json.loads(cfg_path.read_text())
    return int(data.get("max_position_embeddings", 2048)), min(int(data["vocab_size"]), 50277)


class Fleet:
    """The worker processes of one configuration, on one queue and store."""

    def __init__(self, args: argparse.Namespace, name: str, db_url: str, redis_url: str,
                 work: Path, env: dict[str, str] | None = None) -> None:
        from core.settings import Settings

        groups, share = CONFIGS[name]
        tag = uuid.uuid4().hex[:8]
        self.name, self.groups, self.work = name, groups, work
        self.settings = Settings(database_url=db_url, redis_url=redis_url,
                                 queue=f"neoxq_scale_{tag}",
                                 redis_key_prefix=f"neoxq_scale_{tag}:",
                                 worker_concurrency=args.concurrency,
                                 worker_share_tail=share)
        env_extra = env
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
        env.update({"NEOXQ_DATABASE_URL": db_url, "NEOXQ_REDIS_URL": redis_url,
                    "NEOXQ_QUEUE": self.settings.queue,
                    "NEOXQ_REDIS_KEY_PREFIX": self.settings.redis_key_prefix,
                    "NEOXQ_WORKER_CONCURRENCY": str(args.concurrency),
                    "NEOXQ_WORKER_SHARE_TAIL": "1" if share else "0",
                    "NEOXQ_HEARTBEAT_INTERVAL": "2", "PYTHONUNBUFFERED": "1"})
        env.update(env_extra or {})
        self.procs: list[subprocess.Popen] = []
        self.ids: list[str] = []
        for i, gpus in enumerate(groups):
            wid = f"scale-{tag}-{i}"
            wenv = dict(env)
            argv = [sys.executable, "-m", "cli.main", "worker", "--model", args.model,
                    "--device", args.device, "--worker-id", wid,
                    "--max-num-seqs", str(args.max_num_seqs), "--loglevel", "INFO"]
            if args.device.startswith("cuda"):
                wenv["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus)
            else:
                wenv["OMP_NUM_THREADS"] = str(args.cpu_threads)
            if len(gpus) > 1:
                argv += ["--pipeline-parallel", str(len(gpus))]
            if args.dtype:
                argv += ["--dtype", args.dtype]
            # Engine options a benchmark varies (bench.priority's --yield-tokens).
            argv += list(getattr(args, "worker_args", []))
            out = open(work / f"{wid}.log", "wb")  # noqa: SIM115 - the child holds it
            self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=wenv, stdout=out,
                                               stderr=subprocess.STDOUT))
            out.close()
            self.ids.append(wid)

    def log_of(self, wid: str) -> str:
        return (self.work / f"{wid}.log").read_text(errors="replace")

    def check(self) -> None:
        for wid, p in zip(self.ids, self.procs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"worker {wid} exited {p.returncode}:\n"
                                   f"{self.log_of(wid)[-4000:]}")

    def wait_ready(self, db: Any, timeout: float) -> float:
        from specs.status import READY_WORKERS
        from store.db import session_scope
        from store.tables import Worker

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            self.check()
            with session_scope(db) as s:
                ready = [w for w in s.query(Worker).filter(Worker.id.in_(self.ids))
                         if w.status in READY_WORKERS]
            if len(ready) == len(self.ids):
                time.sleep(1.0)  # let Celery connect and start consuming
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: workers not ready after {timeout:.0f}s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            stop(p, timeout=60)
        drop_redis_keys(self.settings.redis_url, self.settings.redis_key_prefix)

    def shared_items(self) -> dict[str, int]:
        """Items each worker took from chunks the other held (from its log)."""
        pat = re.compile(r"sharing the tail: took (\d+) queued items")
        return {wid: sum(int(m) for m in pat.findall(self.log_of(wid))) for wid in self.ids}


def run_batch(fleet: Fleet, db: Any, lines: list[dict[str, Any]], timeout: float
              ) -> dict[str, Any]:
    """Submit ``lines`` as one batch and wait until it is completed; its figures."""
    from sqlalchemy import select

    from core.celery_app import enqueue_chunk, make_celery
    from specs.status import TERMINAL, BatchStatus
    from store.db import session_scope
    from store.ingest import submit_batch
    from store.tables import Batch, Result

    s = fleet.settings
    app = make_celery(s)
    data = "\n".join(json.dumps(x) for x in lines).encode()
    t0 = time.time()
    report = submit_batch(engine=db, source=io.BytesIO(data), settings=s,
                          enqueue=lambda p: enqueue_chunk(p, app=app, queue=s.queue))
    submitted = time.time() - t0
    if report.status != BatchStatus.IN_PROGRESS:
        raise RuntimeError(f"batch not started: {report.status} {report.errors[:3]}")
    while True:
        fleet.check()
        with session_scope(db) as ses:
            b = ses.get(Batch, report.batch_id)
            status, done_at = b.status, b.completed_at
            n_ok, n_bad, out_tokens = b.request_completed, b.request_failed, b.completion_tokens
        if status in TERMINAL:
            break
        if time.time() - t0 > timeout:
            raise RuntimeError(f"batch {report.batch_id} not done after {timeout:.0f}s")
        time.sleep(0.25)
    if status != BatchStatus.COMPLETED or n_ok != len(lines):
        raise RuntimeError(f"batch {report.batch_id}: {status}, {n_ok} ok, {n_bad} failed")
    seconds = (done_at or time.time()) - t0
    per: dict[str, dict[str, float]] = defaultdict(lambda: {"items": 0, "output_tokens": 0,
                                                            "last_finished": 0.0})
    with session_scope(db) as ses:
        for wid, tokens, fin in ses.execute(
                select(Result.worker_id, Result.completion_tokens, Result.finished_at)
                .where(Result.batch_id == report.batch_id)).tuples():
            w = per[wid or "?"]
            w["items"] += 1
            w["output_tokens"] += tokens or 0
            w["last_finished"] = max(w["last_finished"], fin or 0.0)
    ends = [w["last_finished"] for w in per.values()]
    end = done_at or max(ends)
    return {
        "requests": len(lines), "seconds": seconds, "submit_seconds": submitted,
        "chunks": len(report.chunks), "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / seconds,
        # How long the batch ran with some worker out of work (0 with one worker).
        "tail_seconds": end - min(ends) if len(ends) > 1 else 0.0,
        "workers": {wid: {"items": int(w["items"]), "output_tokens": int(w["output_tokens"]),
                          "finished_before_end_s": end - w["last_finished"]}
                    for wid, w in sorted(per.items())},
    }


def run_config(args: argparse.Namespace, name: str, db_url: str, redis_url: str,
               work: Path, save: Callable[[dict[str, Any]], None] | None = None,
               ) -> dict[str, Any]:
    """One configuration's fleet through a warm-up and each workload; ``save`` gets the
    figures so far after each workload (a run cut short by a time limit keeps them)."""
    from store.db import create_all, make_engine

    db = make_engine(db_url)
    create_all(db)
    max_position, vocab = model_shape(args.model)
    fleet = Fleet(args, name, db_url, redis_url, work)
    try:
        load_s = fleet.wait_ready(db, args.load_timeout)
        log(f"{name}: {len(fleet.ids)} worker(s) ready in {load_s:.0f}s "
            f"(GPU groups {fleet.groups if args.device.startswith('cuda') else 'cpu'})")
        res: dict[str, Any] = {"workers": len(fleet.ids), "gpu_groups": fleet.groups,
                               "share_tail": fleet.settings.worker_share_tail,
                               "ready_s": load_s, "runs": {}}
        # Warm-up: both workloads' shapes, enough items that every worker gets some.
        t = time.time()
        warm = (workload_lines("a", args.warmup, max_position, vocab, args.seed + 7)
                + workload_lines("b", args.warmup, max_position, vocab, args.seed + 7))
        run_batch(fleet, db, warm, args.batch_timeout)
        res["warmup_s"] = time.time() - t
        log(f"{name}: warm-up {res['warmup_s']:.0f}s")
        for wl, n in (("a", args.num_prompts_a), ("b", args.num_prompts_b)):
            r = run_batch(fleet, db, workload_lines(wl, n, max_position, vocab, args.seed),
                          args.batch_timeout)
            res["runs"][wl] = r
            if save is not None:
                save(res)
            log(f"{name} workload {wl}: {r['seconds']:.1f}s, {r['output_tok_per_s']:.0f} "
                f"out tok/s, tail {r['tail_seconds']:.1f}s, per worker "
                f"{[w['items'] for w in r['workers'].values()]} items")
        res["shared_items"] = fleet.shared_items()
        return res
    finally:
        fleet.stop()
        db.dispose()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}" if n else "cuda (none visible)"
    import platform

    return f"{platform.processor() or platform.machine()} (CPU, {os.cpu_count()} cores)"


def summarise(result: dict[str, Any]) -> None:
    """Speed-ups over the one-worker baseline, per workload."""
    base = result["configs"].get("1", {}).get("runs", {})
    summary: dict[str, Any] = {}
    for name, cfg in result["configs"].items():
        for wl, r in cfg.get("runs", {}).items():
            row = summary.setdefault(wl, {})
            row[name] = {"output_tok_per_s": round(r["output_tok_per_s"], 1)}
            if wl in base and name != "1":
                row[name]["speedup_over_1"] = round(
                    r["output_tok_per_s"] / base[wl]["output_tok_per_s"], 3)
    result["summary"] = summary
    two = [summary[w]["2"]["speedup_over_1"] for w in summary if "speedup_over_1" in
           summary[w].get("2", {})]
    result["target"] = {"two_workers_speedup_at_least": 1.9,
                        "met": bool(two) and min(two) >= 1.9}


def visible_devices(gpus: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker on ``gpus``, indices among the GPUs this
    process sees: under ``CUDA_VISIBLE_DEVICES=1`` a fleet's GPU "0" is physical GPU 1
    (else two benchmarks started side by side on one host would share GPU 0)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not outer:
        return ",".join(gpus)
    seen = [d.strip() for d in outer.split(",") if d.strip()]
    bad = [g for g in gpus if not g.isdigit() or int(g) >= len(seen)]
    if bad:
        raise SystemExit(f"GPU {bad} not among CUDA_VISIBLE_DEVICES={outer}")
    return ",".join(seen[int(g)] for g in gpus)


def parse_fleet_args(ap: argparse.ArgumentParser, argv: list[str] | None, *,
                     max_num_seqs: int, batch_timeout: float,
                     stores: bool = True) -> argparse.Namespace:
    """Add the options of a benchmark that runs ``neoxq worker``s through the queue (the
    model, the workers' engine and timeouts; with ``stores``, the database and Redis)
    to ``ap``, parse ``argv``, and fill in the device (CUDA when there is one)."""
    ap.add_argument("--model", default="preset:gpt-neox-20b")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    ap.add_argument("--concurrency", type=int, default=4, help="chunks each worker holds")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads per CPU worker")
    ap.add_argument("--seed", type=int, default=0)
    if stores:
        ap.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
        ap.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    ap.add_argument("--load-timeout", type=float, default=600.0)
    ap.add_argument("--batch-timeout", type=float, default=batch_timeout)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["1", "2", "pp2"], choices=list(CONFIGS))
    ap.add_argument("--num-prompts-a", type=int, default=None, help="default 1024")
    ap.add_argument("--num-prompts-b", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=64, help="prompts of each workload")
    args = parse_fleet_args(ap, argv, max_num_seqs=512, batch_timeout=1200.0)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the GPU machines' rule for NCCL

    result: dict[str, Any] = {}
    if args.out and args.out.exists():
        result = json.loads(args.out.read_text())  # add to an earlier run's configs
    result.update({
        "benchmark": "scale", "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(args.device), "model": args.model,
        "workloads": {"a": f"{args.num_prompts_a or 1024} x 128 -> 128 tokens",
                      "b": f"{args.num_prompts_b} x 16-1024 -> 16-512 tokens"},
        "worker": {"max_num_seqs": args.max_num_seqs, "concurrency": args.concurrency,
                   "dtype": args.dtype or ("bfloat16" if args.device != "cpu" else "float32")},
        "store": "postgresql" if (args.database_url or "").startswith("postgres") else "sqlite",
    })
    result.setdefault("configs", {})
    redis_srv = None
    with tempfile.TemporaryDirectory(prefix="neoxq-scale-") as tmp:
        work = Path(tmp)
        redis_url = args.redis_url
        if redis_url is None:
            from cli.embedded import EmbeddedRedis

            redis_srv = EmbeddedRedis(log_dir=work).start()
            redis_url = redis_srv.url
        try:
            partials: dict[str, dict[str, Any]] = {}  # this run's figures so far
            for name in args.configs:
                db_url = args.database_url or f"sqlite:///{work / f'{name}.db'}"
                t = time.time()

                def save(cfg: dict[str, Any], name: str = name, t: float = t,
                         partial: bool = True) -> None:
                    if partial:
                        partials[name] = dict(cfg)
                    result["configs"][name] = {**cfg, "commit": result["commit"],
                                               "date": result["date"],
                                               "wall_s": time.time() - t,
                                               **({"partial": True} if partial else {})}
                    summarise(result)
                    if args.out:
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps(result, indent=2) + "\n")

                try:
                    cfg = run_config(args, name, db_url, redis_url, work, save)
                except Exception as exc:  # noqa: BLE001 - recorded; the other configs run
                    log(f"{name} failed: {exc}")
                    # Workloads that finished before the failure stay in the result.
                    cfg = {**partials.get(name, {}), "error": str(exc)[-4000:]}
                save(cfg, partial=False)
        finally:
            if redis_srv is not None:
                redis_srv.stop()
    log(json.dumps(result.get("summary", {})))
    return result


if __name__ == "__main__":
    res = main(sys.argv[1:])
    sys.exit(1 if any("error" in c for c in res["configs"].values()) else 0)
