"""``neoxq up`` (the whole stack in one command) and ``neoxq run`` (up, submit, wait,
results, down).

What "the whole stack" is, when nothing is configured:

- Redis: ``NEOXQ_REDIS_URL`` if set, else an embedded ``redis-server`` on a free port
  (:mod:`cli.embedded`), gone when neoxq exits;
- the store: ``NEOXQ_DATABASE_URL`` if set, else SQLite in ``NEOXQ_DATA_DIR`` (``./.neoxq``),
  migrated to the latest schema before anything starts;
- ``neoxq api`` and one ``neoxq worker`` per GPU (or per group of ``--pipeline-parallel``
  GPUs; :mod:`cli.gpus`) as child processes in their own process groups.

Ctrl-C (or SIGTERM) stops the workers first (it hands unfinished chunks back while Redis
and the store are still there), then the API, then Redis; a second Ctrl-C kills at once.
No child outlives neoxq: see :mod:`cli.embedded`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cli.embedded import NO_REDIS_SERVER, Child, EmbeddedRedis, free_port
from cli.gpus import WorkerSpec, parse_gpus, plan_workers
from cli.options import add_fp8_arguments, fp8_argv
from models.dtypes import DTYPE_NAMES
from specs.status import TERMINAL, BatchStatus

# Without --model: random weights of a small shape. On 2 CPU cores preset:small (26M
# parameters, mostly the 50k-row embedding and head) generates a few hundred tokens/s,
# enough for a demo batch in seconds; every output says the weights are random.
DEFAULT_MODEL = "preset:small"
RANDOM_WEIGHTS_NOTE = ("{model}: RANDOM WEIGHTS (a demo model: the text is gibberish). "
                       "Pass --model with a checkpoint (an HF directory or a GPT-NeoX YAML) "
                       "for real completions.")


def add_parser(sub: Any) -> None:
    """Register ``up`` and ``run`` on the root parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None,
                        help=f"preset:NAME, an HF dir, a NeoX YAML (default {DEFAULT_MODEL}: "
                             "random weights)")
    common.add_argument("--device", default=None, help="worker device (default cuda if any)")
    common.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    common.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                        help="split the model over N devices: one worker per group of N GPUs")
    common.add_argument("--gpus", default=None, metavar="IDS",
                        help="GPUs to use, e.g. 0,1,2,3 (default: all visible); one worker per "
                             "GPU, or per group of --pipeline-parallel GPUs")
    common.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes: at most the number of GPU groups (default: "
                             "one per group); with --device cpu, N CPU workers (default 1)")
    common.add_argument("--tokenizer", default=None, help="tokenizer.json (default: model's)")
    common.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja2 chat template for chat lines (default: the checkpoint's "
                             "own, else a plain User:/Assistant: transcript)")
    common.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="the worker recomputes every prompt: no reuse of the KV of "
                             "prompt prefixes already computed")
    common.add_argument("--no-cascade", dest="cascade", action="store_false",
                        help="the worker reads a shared prompt prefix once per sequence in each "
                             "decode step (default: once per group sharing it, on CUDA with "
                             "prefix caching on)")
    add_fp8_arguments(common)
    common.add_argument("--data-dir", type=Path, default=None,
                        help="SQLite database and uploads (default $NEOXQ_DATA_DIR or ./.neoxq)")

    p = sub.add_parser(
        "up", parents=[common], help="API + worker + Redis + store in one command",
        description="Start Redis (embedded unless NEOXQ_REDIS_URL is set), the store (SQLite "
                    "in the data dir unless NEOXQ_DATABASE_URL is set; migrated), the API and "
                    "one worker per GPU (or per --pipeline-parallel group). Ctrl-C stops "
                    "everything.")
    p.add_argument("--host", default="127.0.0.1", help="API address (loopback without keys)")
    p.add_argument("--port", type=int, default=8000, help="API port")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="worker's Prometheus port (default $NEOXQ_WORKER_METRICS_PORT)")
    p.add_argument("--quiet", action="store_true",
                   help="write the children's logs only to <data-dir>/logs, not the terminal")
    p.set_defaults(func=_cmd_up)

    r = sub.add_parser(
        "run", parents=[common], help="run a file of prompts end to end and write the results",
        description="Start the stack (as `neoxq up`), submit FILE (JSONL lines, or plain text: "
                    "one prompt per line), show progress, write the results to OUT, and stop "
                    "everything.")
    r.add_argument("file", type=Path,
                   help="prompts: JSONL ({\"prompt\": ...} or OpenAI Batch lines) or plain "
                        "text, one prompt per line (a file not named .jsonl/.json/.ndjson "
                        "whose first line is not a JSON object)")
    r.add_argument("-o", "--output", type=Path, required=True, help="results file (JSONL)")
    r.add_argument("--max-tokens", type=int, default=None)
    r.add_argument("--temperature", type=float, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop", action="append", default=None)
    r.add_argument("--include-prompt", action="store_true",
                   help="each result also carries its prompt (`prompt`, beside `line`)")
    r.set_defaults(func=_cmd_run)


# ---------------------------------------------------------------------------- the stack


class Stack:
    """Redis (maybe embedded), a migrated store, the API and the workers, as children."""

    def __init__(self, *, model: str, data_dir: Path | None, host: str = "127.0.0.1",
                 port: int | None = None, device: str | None = None, dtype: str | None = None,
                 pipeline_parallel: int = 1, tokenizer: str | None = None,
                 metrics_port: int | None = None, logs_to_terminal: bool = False,
                 gpus: list[str] | None = None, workers: int | None = None,
                 prefix_caching: bool = True, cascade: bool = True,
                 chat_template: str | None = None,
                 kv_cache_dtype: str | None = None, quantization: str | None = None) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port()
        self.worker_argv = ["worker", "--model", model]
        for flag, value in (("--device", device), ("--dtype", dtype),
                            ("--tokenizer", tokenizer), ("--chat-template", chat_template)):
            if value:
                self.worker_argv += [flag, value]
        if pipeline_parallel != 1:
            self.worker_argv += ["--pipeline-parallel", str(pipeline_parallel)]
        if not prefix_caching:
            self.worker_argv.append("--no-prefix-caching")
        if not cascade:
            self.worker_argv.append("--no-cascade")
        self.worker_argv += fp8_argv(kv_cache_dtype, quantization)
        self.workers = plan_workers(gpus=gpus, pipeline_parallel=pipeline_parallel,
                                    device=device, workers=workers)
        self.metrics_port = metrics_port
        self.logs_to_terminal = logs_to_terminal
        self.env = dict(os.environ)
        if data_dir is not None:
            self.env["NEOXQ_DATA_DIR"] = str(data_dir)
        self.data_dir = Path(self.env.get("NEOXQ_DATA_DIR") or ".neoxq").resolve()
        self.env["NEOXQ_DATA_DIR"] = str(self.data_dir)
        self.log_dir = self.data_dir / "logs"
        self.redis: EmbeddedRedis | None = None
        self.children: dict[str, Child] = {}
        self._stopping = False

    @property
    def url(self) -> str:
        """The API's base URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def _say(self, msg: str) -> None:
        print(f"neoxq: {msg}", file=sys.stderr, flush=True)

    def start(self, ready_timeout: float = 120.0) -> Stack:
        """Start everything and wait until the API is ready (the worker may still be
        loading its model: see :meth:`wait_worker`)."""
        embedded = None
        if not self.env.get("NEOXQ_REDIS_URL"):
            # Before anything is created: with no server binary nothing could run.
            embedded = EmbeddedRedis(log_dir=self.log_dir)
            if embedded.binary is None:
                raise RuntimeError(NO_REDIS_SERVER)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if embedded is not None:
            self.redis = embedded.start()
            self.env["NEOXQ_REDIS_URL"] = self.redis.url
            self._say(f"embedded Redis at {self.redis.url} ({self.redis.binary}; no "
                      "persistence; set NEOXQ_REDIS_URL to use your own)")
        else:
            check_redis(self.env["NEOXQ_REDIS_URL"])
            self._say(f"Redis at {self.env['NEOXQ_REDIS_URL']}")
        # Children must see exactly the settings this process validated.
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # Batches report the model the worker runs, not the 20B default name.
        self.env.setdefault("NEOXQ_MODEL_NAME", self.model)
        # On Ctrl-C the worker hands back what it has in flight; a short grace keeps
        # shutdown snappy (the handed-back items rerun on the next start).
        self.env.setdefault("NEOXQ_SHUTDOWN_GRACE", "5")
        if self.metrics_port is not None:
            self.env["NEOXQ_WORKER_METRICS_PORT"] = str(self.metrics_port)
        settings = self._settings()
        if not self.env.get("NEOXQ_DATABASE_URL"):
            self._say(f"store: SQLite at {settings.db_url.split(':///', 1)[-1]}")
        self._migrate(settings.db_url)
        for spec in self.workers:
            self._spawn_worker(spec)
        self._spawn("api", ["api", "--host", self.host, "--port", str(self.port),
                            "--no-upgrade", "--log-level", "warning"])
        self._wait_ready(ready_timeout)
        return self

    def _settings(self) -> Any:
        from core.settings import Settings

        keys = {k[len("NEOXQ_"):].lower(): v for k, v in self.env.items()
                if k.startswith("NEOXQ_")}
        fields = set(Settings.model_fields)
        try:
            return Settings(**{k: v for k, v in keys.items() if k in fields})
        except Exception as exc:  # pydantic's ValidationError: print it, not a traceback
            raise SystemExit(f"neoxq: bad settings: {exc}") from None

    def _migrate(self, url: str) -> None:
        # In a child: Alembic configures logging and holds module state; keeping it out
        # of this process keeps `up`'s own output clean.
        import subprocess

        rc = subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade"], env=self.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if rc.returncode != 0:
            raise RuntimeError(f"migrating the store failed:\n{rc.stderr[-3000:]}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = None if self.logs_to_terminal else self.log_dir / f"{name}.log"
        if log is not None and log.exists():
            log.unlink()  # one run's log per file
        child = Child(name, [sys.executable, "-m", "cli.main", *argv],
                      env={**self.env, **(env or {})}, log=log)
        self.children[name] = child
        return child

    def _spawn_worker(self, spec: WorkerSpec) -> Child:
        env = dict(spec.env)
        if self.metrics_port and len(self.workers) > 1:
            # One Prometheus port per worker on this host: the base port plus the index.
            env["NEOXQ_WORKER_METRICS_PORT"] = str(self.metrics_port + self.workers.index(spec))
        if spec.gpus:
            self._say(f"{spec.name} on GPU {','.join(spec.gpus)}")
        return self._spawn(spec.name, self.worker_argv, env)

    @property
    def worker_children(self) -> list[Child]:
        """The worker processes (one per GPU or GPU group)."""
        return [c for n, c in self.children.items() if _is_worker(n)]

    def _check_children(self) -> None:
        for name, child in self.children.items():
            if not child.alive():
                tail = child.log_tail()
                raise RuntimeError(f"{name} exited with code {child.proc.returncode}"
                                   + (f":\n{tail}" if tail else ""))
        if self.redis is not None and self.redis.child is not None and not self.redis.alive():
            raise RuntimeError("embedded Redis exited")

    def _wait_ready(self, timeout: float) -> None:
        """Wait for ``/readyz`` (the store and Redis answer through the API)."""
        import httpx

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_children()
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text[:500]
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready within {timeout:.0f} s ({last}); "
                           f"logs in {self.log_dir}")

    def wait_worker(self, timeout: float | None = None) -> list[Any]:
        """Wait until every worker has loaded its model and registered (no limit by
        default: the 20B takes minutes to load); returns their store rows. Read from the
        store, not the API: once API keys exist, ``GET /workers`` needs one."""
        from specs.status import WorkerStatus
        from store.db import make_engine, make_sessionmaker
        from store.queries import list_workers

        db = make_engine(self._settings().db_url)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while deadline is None or time.monotonic() < deadline:
                self._check_children()
                pids = {c.pid for c in self.worker_children}
                with contextlib.suppress(Exception):  # e.g. SQLite busy: ask again
                    with make_sessionmaker(db)() as session:
                        mine = [w for w in list_workers(session=session, seen_within=60)
                                if w.pid in pids and w.status != WorkerStatus.STOPPED]
                    if len({w.pid for w in mine}) == len(pids):
                        return sorted(mine, key=lambda w: w.pid)
                time.sleep(0.2)
        finally:
            db.dispose()
        raise RuntimeError(f"the workers did not register within {timeout} s")

    def watch(self, on_death: Any, interval: float = 0.5) -> threading.Thread:
        """Call ``on_death(message)`` from a thread if a child dies while running."""
        def loop() -> None:
            while not self._stopping:
                try:
                    self._check_children()
                except RuntimeError as exc:
                    if not self._stopping:
                        on_death(str(exc))
                    return
                time.sleep(interval)

        t = threading.Thread(target=loop, name="neoxq-watch", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop the workers (together), the API and Redis, in that order."""
        self._stopping = True
        grace = float(self.env.get("NEOXQ_SHUTDOWN_GRACE", "5")) + 10
        # Children stay in `children` until stopped, so a second Ctrl-C (kill_all) reaches
        # the one being waited for too. Workers drain side by side: N GPUs must not take
        # N grace periods to stop.
        workers = [n for n in self.children if _is_worker(n)]
        threads = [threading.Thread(target=self.children[n].stop, kwargs={"grace": grace})
                   for n in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in workers:
            self.children.pop(name, None)
        for name in list(self.children):
            self.children[name].stop(grace=10)
            self.children.pop(name, None)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def kill_all(self) -> None:
        """SIGKILL every child's process group now, without waiting (second Ctrl-C)."""
        procs = [c.proc for c in self.children.values()]
        if self.redis is not None and self.redis.child is not None:
            procs.append(self.redis.child.proc)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_redis(url: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the URL, if the Redis of NEOXQ_REDIS_URL does not answer:
    nothing started after it could work."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"Redis at {url} (NEOXQ_REDIS_URL) does not answer: {exc}; start "
                           "it, or unset NEOXQ_REDIS_URL for an embedded one") from None
    finally:
        client.close()


def check_model(model: str, tokenizer: str | None, chat_template: str | None = None) -> None:
    """Exit with a message, before anything starts, if ``model`` is not a loadable spec (a
    typo'd path or preset name, a directory without config.json, a bad NeoX YAML) or its
    chat template does not compile. Reads configs only, no weights."""
    from models.chat import load_chat_template
    from models.loaders import CheckpointError, load_config

    try:
        load_config(model, tokenizer=tokenizer)
    except (CheckpointError, ValueError, OSError) as exc:
        raise SystemExit(f"error: --model {model}: {exc}") from None
    try:
        load_chat_template(model, template_file=chat_template, tokenizer=tokenizer)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: --chat-template: {exc}") from None


def _is_worker(name: str) -> bool:
    return name == "worker" or name.startswith("worker-")


def stack_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Stack keywords ``up`` and ``run`` share; a bad GPU plan exits with a message."""
    try:
        gpus = parse_gpus(args.gpus) if args.gpus is not None else None
        plan_workers(gpus=gpus, pipeline_parallel=args.pipeline_parallel, device=args.device,
                     workers=args.workers)
    except ValueError as exc:
        raise SystemExit(f"neoxq: {exc}") from None
    return {"device": args.device, "dtype": args.dtype,
            "pipeline_parallel": args.pipeline_parallel, "tokenizer": args.tokenizer,
            "gpus": gpus, "workers": args.workers, "prefix_caching": args.prefix_caching,
            "cascade": args.cascade, "chat_template": args.chat_template,
            "kv_cache_dtype": args.kv_cache_dtype, "quantization": args.quantization}


@contextlib.contextmanager
def _terminate_as_interrupt() -> Any:
    """SIGINT, SIGTERM and SIGHUP end neoxq as Ctrl-C does (KeyboardInterrupt), so the
    cleanup runs."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored:
    # `neoxq up &` followed by `kill -INT` must still stop the stack.
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _second_interrupt_kills(stack: Stack) -> None:
    """While stopping, a second Ctrl-C kills every child at once."""
    def handler(_signum: int, _frame: Any) -> None:
        stack._say("killing")
        stack.kill_all()

    signal.signal(signal.SIGINT, handler)


def _stop(stack: Stack) -> None:
    """Stop the stack (a second Ctrl-C meanwhile kills every child), then give Ctrl-C
    back its default meaning."""
    _second_interrupt_kills(stack)
    stack.stop()
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _model_note(model: str | None) -> str:
    chosen = model or DEFAULT_MODEL
    if chosen.startswith("preset:"):
        return RANDOM_WEIGHTS_NOTE.format(model=chosen)
    return f"model {chosen}"


# ---------------------------------------------------------------------------- commands


def _cmd_up(args: argparse.Namespace) -> int:
    """Run the API, a worker, Redis and the store until Ctrl-C."""
    model = args.model or DEFAULT_MODEL
    check_model(model, args.tokenizer, args.chat_template)
    stack = Stack(model=model, data_dir=args.data_dir, host=args.host, port=args.port,
                  metrics_port=args.metrics_port, logs_to_terminal=not args.quiet,
                  **stack_options(args))
    print(f"neoxq: {_model_note(args.model)}", file=sys.stderr, flush=True)
    died: list[str] = []
    main_thread = threading.main_thread()

    def on_death(msg: str) -> None:
        died.append(msg)
        # Wake the main thread's sleep with a KeyboardInterrupt: one shutdown path.
        if main_thread.is_alive():
            signal.pthread_kill(main_thread.ident or 0, signal.SIGINT)

    with _terminate_as_interrupt():
        try:
            stack.start()
            stack._say(f"API and dashboard at {stack.url}/dashboard (docs {stack.url}/docs);"
                       f" submit with `neoxq submit FILE --wait --url {stack.url}`; "
                       "Ctrl-C stops everything")
            stack._say(f"{len(stack.workers)} worker(s) loading {model} ...")
            for w in stack.wait_worker():
                stack._say(f"worker ready: {w.id} on {', '.join(map(str, w.devices or []))}")
            stack.watch(on_death)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stack._say("stopping (Ctrl-C again to kill)")
        except RuntimeError as exc:
            died.append(str(exc))
        finally:
            _stop(stack)
    if died:
        print(f"neoxq: {died[0]}", file=sys.stderr)
        return 1
    stack._say("stopped")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Start the stack, submit FILE, show progress, write results to OUT, stop the stack.
    A run that does not finish (an error, a dead child, Ctrl-C) cancels its batch, so that
    no later ``neoxq up`` runs it unasked."""
    from cli.client import (
        ClientError,
        batch_params,
        connect,
        download,
        finish_line,
        follow,
        submit_file,
    )

    if not args.file.is_file():
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 1
    model = args.model or DEFAULT_MODEL
    check_model(model, args.tokenizer, args.chat_template)
    print(f"neoxq: {_model_note(args.model)}", file=sys.stderr, flush=True)
    stack = Stack(model=model, data_dir=args.data_dir, **stack_options(args))
    died: list[str] = []
    main_thread = threading.main_thread()

    def on_death(msg: str) -> None:
        died.append(msg)
        signal.pthread_kill(main_thread.ident or 0, signal.SIGINT)

    if model.startswith("preset:"):
        # the batch itself says so too (`neoxq status ID --json`, the dashboard)
        args.metadata = ["weights=random (demo preset)"]
    rc = 1
    batch: dict[str, Any] | None = None
    with _terminate_as_interrupt():
        try:
            started = time.monotonic()
            stack.start()
            stack._say(f"API up in {time.monotonic() - started:.1f} s; the worker loads the "
                       f"model while the file is submitted (logs in {stack.log_dir})")
            stack.watch(on_death)
            with connect(stack.url) as client:
                batch = submit_file(client, args.file, batch_params(args))
                stack._say(f"batch {batch['id']}: {batch['counts']['total']} prompts")
                batch = follow(client, batch, poll=0.5)
                n = download(client, f"/batches/{batch['id']}/results", args.output,
                             prompts_from=args.file if args.include_prompt else None)
            print(finish_line(batch, n, args.output), file=sys.stderr)
            rc = 0 if batch["status"] == BatchStatus.COMPLETED else 1
        except KeyboardInterrupt:
            if not died:
                stack._say("interrupted; stopping")
            rc = 130 if not died else 1
        except ClientError as exc:
            print(exc, file=sys.stderr)
            rc = exc.code
        except RuntimeError as exc:
            died.append(str(exc))
            rc = 1
        finally:
            _stop(stack)
            if batch is not None and batch["status"] not in TERMINAL:
                _cancel_unfinished(stack, batch["id"])
    if died:
        print(f"neoxq: {died[0]}", file=sys.stderr)
        return 1
    if rc == 0 and model.startswith("preset:"):
        print(f"neoxq: {_model_note(args.model)}", file=sys.stderr)
    return rc


def _cancel_unfinished(stack: Stack, batch_id: str) -> None:
    """Cancel a batch its run left unfinished, in the store (every child is stopped by
    now); its finished results are kept."""
    from store.db import make_engine, session_scope
    from store.queries import count_items, finish_cancel, request_cancel

    db = make_engine(stack._settings().db_url)
    try:
        with session_scope(db) as session:
            request_cancel(session=session, batch_id=batch_id)
            finish_cancel(session=session, batch_id=batch_id)
            counts = count_items(session=session, batch_id=batch_id)
        items = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        stack._say(f"batch {batch_id} cancelled, as its run did not finish ({items}); "
                   f"`neoxq results {batch_id}` has what finished")
    except Exception as exc:  # noqa: BLE001 - report, the run's own error matters more
        stack._say(f"could not cancel batch {batch_id}: {exc}")
    finally:
        db.dispose()
