"""Queue overhead: the same requests through Redis + SQL + a worker vs the engine directly.

    python -m bench.queue [--requests 10000] [--ingest-lines 50000] [--out PATH]

1. **Direct**: ``build_engine("preset:tiny")`` in this process, ``engine.generate`` on all
   requests at once (the engine's own continuous batching, nothing else).
2. **Queue**: a ``neoxq worker`` subprocess with the same model and engine settings; the
   clock runs from ``submit_batch`` (validate, store, enqueue) until the batch is
   ``completed`` in the store - every result committed. The worker loads its model
   before the clock starts (it does so once per life).
3. **Ingest**: a 50,000-line native JSONL file streamed into a fresh batch (validation,
   items, chunk plan), without a worker.

The direct side feeds requests as earlier ones finish, with as many in flight as the
worker holds (chunks in flight x chunk size); ``generate`` with every request up front
is timed once for reference. The fastest direct run is the baseline. Direct and queue runs are
interleaved ``--repeats`` times and each side's fastest counts, since other processes
share this machine's CPU (every run is reported).
Overhead = queue time / direct time - 1; the target is <= 10%.
Writes ``bench/results/queue_cpu.json`` with the commit, the device and the date.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import drop_redis_keys, git_commit, stop
from specs.status import READY_WORKERS, TERMINAL, BatchStatus

ROOT = Path(__file__).resolve().parents[1]
MODEL = "preset:tiny"


def requests(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """Short prompts, fixed-length greedy generations (``ignore_eos``: same work each run)."""
    return [{"custom_id": f"r{i}", "prompt": f"Request {i}: the quick brown fox",
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            for i in range(n)]


def run_direct(lines: list[dict[str, Any]], max_num_seqs: int, window: int | None) -> float:
    """The engine alone. ``window=None``: ``generate`` with every request added up front;
    otherwise requests are added as earlier ones finish, at most ``window`` unfinished -
    the admission the worker does (chunks in flight x chunk size)."""
    from models.runtime import build_engine
    from models.sampling import SamplingParams

    engine = build_engine(MODEL, device="cpu", max_num_seqs=max_num_seqs)
    params = SamplingParams.from_dict({k: v for k, v in lines[0].items()
                                       if k not in ("custom_id", "prompt")})
    engine.generate(["warm up"], params)
    t0 = time.perf_counter()
    if window is None:
        outs = engine.generate([x["prompt"] for x in lines], params)
    else:
        outs, nxt = [], 0
        while nxt < len(lines) or engine.has_unfinished():
            while nxt < len(lines) and nxt - len(outs) < window:
                engine.add_request(str(nxt), lines[nxt]["prompt"], params)
                nxt += 1
            outs.extend(engine.step())
    elapsed = time.perf_counter() - t0
    assert len(outs) == len(lines) and all(o.error is None for o in outs)
    return elapsed


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _settings(db_url: str, redis_url: str, tag: str, **kw: Any):
    from core.settings import Settings

    return Settings(database_url=db_url, redis_url=redis_url, queue=f"neoxq_bench_{tag}",
                    redis_key_prefix=f"neoxq_bench_{tag}:", **kw)


def run_queue(lines: list[dict[str, Any]], db_url: str, redis_url: str,
              max_num_seqs: int, concurrency: int, chunk_items: int,
              work: Path) -> dict[str, Any]:
    from core.celery_app import enqueue_chunk, make_celery
    from store.db import create_all, make_engine, session_scope
    from store.ingest import submit_batch
    from store.tables import Batch, Worker

    tag = uuid.uuid4().hex[:8]
    s = _settings(db_url, redis_url, tag, chunk_items=chunk_items,
                  worker_concurrency=concurrency)
    db = make_engine(db_url)
    create_all(db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"NEOXQ_DATABASE_URL": db_url, "NEOXQ_REDIS_URL": redis_url,
                "NEOXQ_QUEUE": s.queue, "NEOXQ_REDIS_KEY_PREFIX": s.redis_key_prefix,
                "NEOXQ_CHUNK_ITEMS": str(chunk_items),
                "NEOXQ_WORKER_CONCURRENCY": str(concurrency),
                "OMP_NUM_THREADS": str(_threads())})
    log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed below
    t_start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker", "--model", MODEL, "--device", "cpu",
         "--worker-id", f"bench-{tag}", "--max-num-seqs", str(max_num_seqs),
         "--loglevel", os.environ.get("NEOXQ_BENCH_LOGLEVEL", "WARNING")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:  # ready: registered, engine loaded (the row appears after the load)
            with session_scope(db) as session:
                w = session.get(Worker, f"bench-{tag}")
                if w is not None and w.status in READY_WORKERS:
                    break
            if proc.poll() is not None:
                raise RuntimeError((work / "worker.log").read_text()[-3000:])
            time.sleep(0.1)
        startup = time.perf_counter() - t_start
        time.sleep(1.0)  # let Celery connect and start consuming
        app = make_celery(s)
        data = "\n".join(json.dumps(x) for x in lines).encode()
        t0 = time.time()
        report = submit_batch(engine=db, source=io.BytesIO(data), settings=s,
                              enqueue=lambda p: enqueue_chunk(p, app=app, queue=s.queue))
        t_submitted = time.time() - t0
        while True:  # polled slowly (CPU is shared); the clock stops at completed_at
            with session_scope(db) as session:
                b = session.get(Batch, report.batch_id)
                if b.status in TERMINAL:
                    break
            if proc.poll() is not None:
                raise RuntimeError((work / "worker.log").read_text()[-3000:])
            time.sleep(0.2)
        elapsed = (b.completed_at or time.time()) - t0
        assert b.status == BatchStatus.COMPLETED and b.request_completed == len(lines), b.status
        return {"seconds": elapsed, "submit_seconds": t_submitted, "chunks": len(report.chunks),
                "worker_startup_seconds": startup, "completion_tokens": b.completion_tokens}
    finally:
        stop(proc, timeout=60)
        log.close()
        db.dispose()
        drop_redis_keys(redis_url, s.redis_key_prefix)


def run_ingest(n: int, db_url: str) -> dict[str, Any]:
    from store.db import create_all, make_engine
    from store.ingest import submit_batch

    db = make_engine(db_url)
    create_all(db)
    lines = (json.dumps({"custom_id": f"line-{i}", "prompt": f"Prompt number {i}: " + "x" * 80,
                         "max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "stop": ["\n"]})
             for i in range(n))
    data = ("\n".join(lines) + "\n").encode()
    sent: list[Any] = []
    t0 = time.perf_counter()
    report = submit_batch(engine=db, source=io.BytesIO(data), enqueue=sent.append,
                          settings=_settings(db_url, "redis://unused", "ingest",
                                             max_lines=max(n, 50_000)))
    elapsed = time.perf_counter() - t0
    db.dispose()
    assert report.status == BatchStatus.IN_PROGRESS and report.total == n, report.errors[:3]
    return {"lines": n, "bytes": len(data), "seconds": round(elapsed, 3),
            "lines_per_s": round(n / elapsed), "chunks": len(sent)}


def _meta() -> dict[str, Any]:
    import torch

    commit = git_commit()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "benchmark": "queue",
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{cpu} x{os.cpu_count()} (CPU)",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--ingest-lines", type=int, default=50_000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--chunk-items", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    p.add_argument("--redis-url", default=os.environ.get("NEOXQ_REDIS_URL",
                                                         "redis://127.0.0.1:6379/1"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "queue_cpu.json"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (1: steadiest on a shared CPU)")
    args = p.parse_args(argv)
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:

    lines = requests(args.requests, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db_url = args.database_url or f"sqlite:///{work / 'queue.db'}"
        window = args.concurrency * args.chunk_items
        # Interleaved, and each side's fastest run counts: other processes share the CPU.
        direct_all, direct_win, queues = [], [], []
        load_before = os.getloadavg()
        for rep in range(args.repeats):
            if rep == 0:  # everything up front: slower on CPU, recorded for reference
                direct_all.append(run_direct(lines, args.max_num_seqs, None))
                print(f"[{rep}] direct, generate: {direct_all[-1]:.2f}s", flush=True)
            direct_win.append(run_direct(lines, args.max_num_seqs, window))
            print(f"[{rep}] direct, window {window}: {direct_win[-1]:.2f}s", flush=True)
            queues.append(run_queue(lines, f"{db_url}{rep}" if not args.database_url else db_url,
                                    args.redis_url, args.max_num_seqs, args.concurrency,
                                    args.chunk_items, work))
            print(f"[{rep}] queue: {queues[-1]['seconds']:.2f}s", flush=True)
        queue = min(queues, key=lambda q: q["seconds"])
        ingest = run_ingest(args.ingest_lines, f"sqlite:///{work / 'ingest.db'}")
        print(f"ingest {args.ingest_lines} lines: {ingest['seconds']:.2f}s", flush=True)

    direct = min(direct_all + direct_win)
    overhead = queue["seconds"] / direct - 1
    result = {
        **_meta(),
        "model": MODEL,
        "database": "sqlite" if not args.database_url else args.database_url.split(":")[0],
        "workload": {"requests": args.requests, "prompt": "Request {i}: the quick brown fox",
                     "max_tokens": args.max_tokens, "greedy": True, "ignore_eos": True},
        "engine": {"max_num_seqs": args.max_num_seqs, "torch_threads": args.threads},
        "queue_config": {"worker_concurrency": args.concurrency,
                         "chunk_items": args.chunk_items},
        "direct_seconds": round(direct, 3),
        "direct_generate_seconds_runs": [round(x, 3) for x in direct_all],
        "direct_windowed_seconds_runs": [round(x, 3) for x in direct_win],
        "direct_window": window,
        "queue_seconds": round(queue["seconds"], 3),
        "queue_seconds_runs": [round(q["seconds"], 3) for q in queues],
        "queue_submit_seconds": round(queue["submit_seconds"], 3),
        "queue_chunks": queue["chunks"],
        "worker_startup_seconds": round(queue["worker_startup_seconds"], 2),
        "direct_requests_per_s": round(args.requests / direct, 1),
        "queue_requests_per_s": round(args.requests / queue["seconds"], 1),
        "overhead": round(overhead, 4),
        "overhead_target": 0.10,
        "overhead_ok": overhead <= 0.10,
        "ingest": ingest,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
