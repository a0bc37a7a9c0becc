"""Server-side commands: ``neoxq worker`` and ``neoxq db`` (``api`` and ``keys`` join here).

Each command has its own ``_add_<name>`` function registering its parser and its own
``_cmd_<name>`` doing the work; heavy imports (torch, celery, sqlalchemy) happen inside
the command functions so that ``neoxq --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.options import add_fp8_arguments
from models.dtypes import DTYPE_NAMES


def add_parser(sub: Any) -> None:
    """Register the server-side commands on the root parser's subparsers."""
    _add_worker(sub)
    _add_db(sub)


# ---------------------------------------------------------------------------- worker


def _add_worker(sub: Any) -> None:
    p = sub.add_parser(
        "worker",
        help="run a GPU-resident worker that drains the queue",
        description=(
            "Load the model once, then consume chunk messages from the queue, keeping the "
            "engine full across chunk and batch boundaries. SIGTERM stops taking work, lets "
            "in-flight sequences finish for NEOXQ_SHUTDOWN_GRACE seconds, hands back the rest "
            "and exits."
        ),
    )
    p.add_argument("--model", required=True,
                   help="preset:NAME, an HF dir, a NeoX YAML, ..., or a name in the store's "
                        "model registry (a fine-tuned ft:BASE:SUFFIX:JOBID loads from where "
                        "its job wrote it)")
    p.add_argument("--name", default=None,
                   help="the model name this worker serves: batches naming it run here "
                        "(default NEOXQ_MODEL_NAME; a registry name serves itself)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="split the model over N devices/processes")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the model's)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja2 chat template for chat lines (default: the checkpoint's "
                        "own, else a plain User:/Assistant: transcript)")
    p.add_argument("--queue", default=None, help="queue name (default NEOXQ_QUEUE)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="chunks held at once (default NEOXQ_WORKER_CONCURRENCY)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences in the engine at once (engine default if unset)")
    p.add_argument("--yield-tokens", type=int, default=None, metavar="N",
                   help="while a synchronous (interactive) request runs, batch work gets at "
                        "most N tokens of each engine step, so the request runs near idle "
                        "speed (default: the engine's YIELD_TOKENS; -1: no cap)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt (no reuse of cached prefix KV)")
    p.add_argument("--no-cascade", dest="cascade", action="store_false",
                   help="read a shared prompt prefix once per sequence in each decode step "
                        "(default: once per group sharing it, on CUDA with prefix caching on)")
    add_fp8_arguments(p)
    p.add_argument("--no-warmup", dest="warm_up", action="store_false", default=None,
                   help="consume at once instead of warming the engine up first (default "
                        "NEOXQ_WORKER_WARMUP, on)")
    p.add_argument("--worker-id", default=None, help="id shown in the store (default host:pid)")
    p.add_argument("--database-url", default=None, help="overrides NEOXQ_DATABASE_URL")
    p.add_argument("--redis-url", default=None, help="overrides NEOXQ_REDIS_URL")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    """Run one worker process until SIGTERM/SIGINT."""
    from worker.main import WorkerOptions, run_worker

    engine_kwargs: dict[str, Any] = {"enable_prefix_caching": args.prefix_caching,
                                     "kv_cache_dtype": args.kv_cache_dtype}
    if not args.cascade:
        engine_kwargs["enable_cascade"] = False
    if args.max_num_seqs:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.yield_tokens is not None:
        engine_kwargs["yield_tokens"] = None if args.yield_tokens < 0 else args.yield_tokens
    return run_worker(
        WorkerOptions(
            model=args.model,
            name=args.name,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
            pipeline_parallel=args.pipeline_parallel,
            tokenizer=args.tokenizer,
            chat_template=args.chat_template,
            queue=args.queue,
            concurrency=args.concurrency,
            worker_id=args.worker_id,
            database_url=args.database_url,
            redis_url=args.redis_url,
            loglevel=args.loglevel,
            warm_up=args.warm_up,
            engine_kwargs=engine_kwargs,
        )
    )


# -------------------------------------------------------------------------------- db


def _add_db(sub: Any) -> None:
    p = sub.add_parser("db", help="database schema: upgrade, current",
                       description="Manage the store's schema with Alembic.")
    p.add_argument("--database-url", default=None, help="overrides NEOXQ_DATABASE_URL")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="migrate the database to the latest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_cmd_db_upgrade)
    cur = dsub.add_parser("current", help="print the database's schema revision")
    cur.set_defaults(func=_cmd_db_current)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Create or migrate the store's tables (``neoxq db upgrade``)."""
    import migrations

    migrations.upgrade(args.database_url, args.revision)
    print(f"database at {migrations.current(args.database_url)}")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    """Print the current schema revision (``neoxq db current``)."""
    import migrations

    print(migrations.current(args.database_url) or "empty (run `neoxq db upgrade`)")
    return 0
