"""Pipeline parallelism: the model split over N stage processes, several micro-batches
in flight.

Layout (docs/ARCHITECTURE.md, "Pipeline parallelism"):

- **Rank 0 is the calling process.** It holds stage 0 (the embedding and the first
  blocks) *and* the scheduler; ranks 1..N-1 are processes this module spawns, one per
  GPU (``cuda:base+rank``), each holding a contiguous run of blocks (the last also the
  final norm and head, see :mod:`models.partition`). Each stage loads only its own
  tensors (``load_model(..., layer_range=...)``).
- **Every stage holds the KV cache of its own layers**, with the same block ids, and
  runs the same :class:`~models.engine.runner.ModelRunner` as a one-GPU engine over its
  slice of the layers: rank 0 schedules a step, prepares it once
  (:class:`~models.engine.runner.StepInputs`: host arrays with the block tables and
  slots) and ships it to every stage.
- **Commands travel on a CPU channel** (a multiprocessing queue per stage), activations
  on torch.distributed point-to-point (NCCL on GPUs, gloo on CPU). An idle stage waits
  on its queue with a timeout — never on an NCCL operation — so ranks survive hours
  without work, notice a dead parent within a second and exit.
- **Micro-batches.** The running sequences are split into ``micro_batches`` groups
  (default N + 1), each a :class:`~models.engine.scheduler.Scheduler` over its own share
  of the KV blocks (and its own prefix cache). :meth:`PipelineEngine.step` takes the
  next group in turn: it waits
  for that group's logits (from the last stage), samples and updates on rank 0, then
  schedules the group's next step and launches it into stage 0. Meanwhile the other
  groups' steps are in the other stages, so all N GPUs compute at once.
- **Logits come back to rank 0 and rank 0 samples** (in the model dtype, exactly what
  a one-GPU engine samples from). Sampling needs the per-request state (penalties,
  seeds, stop strings, forks) that lives with the scheduler; shipping logits for the
  rows that need them (``rows x vocab``, a few MB per step over NVLink) is cheaper than
  shipping that state, and keeps one sampling code path for every N.
- Each direction has its own process group (``[r, r+1]`` forward, ``[N-1, 0]`` for
  logits), hence its own NCCL communicator and stream: a logits receive never queues
  behind a forward send on the same stream, which could serialise (or, with crossing
  sends, deadlock) the pipeline.
- **Not DeepSpeed's pipeline engine** (no autoregressive generation, docs/ARCHITECTURE.md), nor
  its launcher: the launcher starts every rank itself, while neoxq starts from one
  command (``neoxq worker``/``generate``) and rank 0 must stay the caller's process;
  the communication set-up it would save is one ``init_process_group`` call.
- **Failure.** A stage that raises reports its traceback on its status pipe and exits
  non-zero; rank 0 polls its pending receives with a liveness check, so a stage that
  dies (even by SIGKILL) makes the engine raise :class:`PipelineError` naming the stage
  within about a second; the remaining stages are then terminated. ``close()`` (also
  run at exit) stops and joins every stage.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from models.attention import tune_decode_kernel
from models.cascade import tune_cascade_kernel
from models.engine.block_manager import BlockManager
from models.engine.engine import (
    fit_params,
    prefix_salt,
    prefix_stats,
    prompt_ids,
    run_to_completion,
)
from models.engine.kv_cache import KVCache, blocks_for_budget
from models.engine.outputs import (
    PartialSample,
    RequestOutput,
    ScoreResult,
    as_params,
    score_pair,
)
from models.engine.runner import ModelRunner, SamplerInputs, StepInputs
from models.engine.sampler import Sampler
from models.engine.scheduler import BATCH, YIELD_TOKENS, Scheduler, StepPlan
from models.grammar import Grammars
from models.model import NeoX
from models.params import SamplingParams
from models.partition import partition_layers

# Idle ranks wait on their command queue, not on a collective, but a step in flight can
# legitimately take long (a huge prefill on a slow device): no timeout should ever fire.
PG_TIMEOUT = timedelta(days=30)
# How often a waiting rank 0 checks that the stages are alive, and a stage its parent.
LIVENESS_S = 0.25
PARENT_CHECK_S = 1.0
# How long a stage's reported error waits for another stage's death to show (see
# PipelineEngine._raise_error).
PEER_DEATH_S = 1.0


class PipelineError(RuntimeError):
    """A pipeline stage failed or died; the engine cannot continue."""


# --------------------------------------------------------------------------------------
# Stage processes (ranks 1..N-1)
# --------------------------------------------------------------------------------------


@dataclass
class _StageArgs:
    world: int
    init_file: str
    spec: str
    layer_range: tuple[int, int]
    device: str
    dtype: torch.dtype
    kv_dtype: torch.dtype
    quantization: str | None
    tokenizer: Any
    seed: int
    kv_memory: float | int | None
    block_size: int
    max_num_seqs: int
    max_batch_tokens: int
    tune_kernels: bool
    cuda_graphs: bool
    cascade: bool
    parent_pid: int
    num_threads: int


def _device_for(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def _init_dist(backend: str, init_file: str, rank: int, world: int,
               ) -> tuple[list[Any], Any]:
    """The default group and the point-to-point groups: ``fwd[r]`` carries activations
    r -> r+1, ``ret`` carries logits N-1 -> 0. Every rank creates them in the same order."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=PG_TIMEOUT)
    fwd = [dist.new_group([r, r + 1], timeout=PG_TIMEOUT) for r in range(world - 1)]
    ret = dist.new_group([0, world - 1], timeout=PG_TIMEOUT)
    return fwd, ret


class _Sends:
    """Sends in flight: their tensors stay referenced until the transfer completes.

    NCCL work reports completion by itself (a CUDA event). gloo's send work completes
    only inside ``wait()``: there the oldest sends are waited for once more than
    ``keep`` are outstanding (by then their receivers have long posted the receive).
    """

    def __init__(self, polls: bool, keep: int = 8) -> None:
        self.items: list[tuple[Any, Tensor]] = []
        self.polls, self.keep = polls, keep

    def add(self, work: Any, t: Tensor) -> None:
        self.items.append((work, t))
        self.prune()

    def prune(self) -> None:
        if self.polls:
            self.items = [(w, t) for w, t in self.items if not w.is_completed()]
        else:
            while len(self.items) > self.keep:
                self.items.pop(0)[0].wait()

    def drain(self) -> None:
        for w, _ in self.items:
            w.wait()
        self.items = []


def _stage_main(rank: int, args: _StageArgs, cmd_q: Any, status: Any) -> None:
    """Entry point of a spawned stage process. Exits non-zero on any failure, after
    sending the traceback on ``status`` (rank 0 names the stage in its error)."""
    code = 0
    try:
        _stage_loop(rank, args, cmd_q, status)
    except BaseException as exc:  # noqa: BLE001 - everything is reported, then we exit
        code = 1
        with contextlib.suppress(Exception):
            status.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        # No interpreter teardown: destructors of communicators with a dead peer can hang.
        os._exit(code)


def _stage_loop(rank: int, args: _StageArgs, cmd_q: Any, status: Any) -> None:
    from models.loaders import load_model

    if os.environ.get("NEOXQ_PP_DEBUG"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["NEOXQ_PP_DEBUG"]), exit=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    status.send(("hello", os.getpid()))
    fwd, ret = _init_dist(backend, args.init_file, rank, args.world)
    t0 = time.time()
    loaded = load_model(args.spec, device=device, dtype=args.dtype, tokenizer=args.tokenizer,
                        layer_range=args.layer_range, seed=args.seed,
                        quantization=args.quantization)
    model = loaded.model
    if device.type == "cuda" and args.tune_kernels:
        cfg = model.config
        tune_decode_kernel(cfg.num_heads, cfg.head_dim, args.block_size, args.kv_dtype, device,
                           query_dtype=args.dtype)
        if args.cascade:
            tune_cascade_kernel(cfg.num_heads, cfg.head_dim, args.block_size, args.kv_dtype,
                                device, query_dtype=args.dtype)
        torch.cuda.empty_cache()
    max_blocks = blocks_for_budget(
        model.config, layer_range=args.layer_range, block_size=args.block_size,
        dtype=args.kv_dtype, device=device, kv_memory=args.kv_memory,
        max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
        logits=model.has_head)
    status.send(("ready", {"rank": rank, "layer_range": args.layer_range, "device": str(device),
                           "weight_bytes": model.parameter_bytes(), "max_blocks": max_blocks,
                           "load_s": time.time() - t0, "pid": os.getpid()}))
    last = rank == args.world - 1
    runner: ModelRunner | None = None
    sends = _Sends(polls=backend == "nccl")
    hidden = model.config.hidden_size
    checked = time.monotonic()
    with torch.inference_mode():
        while True:
            try:
                msg = cmd_q.get(timeout=PARENT_CHECK_S)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if msg is None or now - checked > PARENT_CHECK_S:
                checked = now
                if os.getppid() != args.parent_pid:  # rank 0 is gone: so are we
                    os._exit(3)
                sends.prune()
            if msg is None:
                continue
            kind = msg[0]
            if kind == "stop":
                # Let the last sends land before the process (and its buffers) goes.
                sends.drain()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return
            if kind == "init":
                runner = _stage_runner(model, msg[1], args.block_size, args.max_num_seqs,
                                       args.cuda_graphs, args.kv_dtype, args.cascade)
                status.send(("init_done", {"rank": rank, "kv_bytes": runner.cache.nbytes}))
                continue
            if kind == "capture":
                assert runner is not None
                status.send(("captured", runner.capture_graphs()))
                continue
            assert kind == "step" and runner is not None
            inputs: StepInputs = msg[1]
            x = torch.empty(inputs.num_tokens, hidden, dtype=args.dtype, device=device)
            # NCCL: wait() only orders our stream after the receive; the CPU runs on.
            dist.irecv(x, src=rank - 1, group=fwd[rank - 1]).wait()
            out, _ = runner.execute(inputs, x)
            if last:
                if inputs.num_rows:
                    out = out.contiguous()
                    sends.add(dist.isend(out, dst=0, group=ret), out)
            else:
                sends.add(dist.isend(out, dst=rank + 1, group=fwd[rank]), out)


# --------------------------------------------------------------------------------------
# Rank 0: micro-batch groups (schedulers) and the pipeline engine
# --------------------------------------------------------------------------------------


def _stage_runner(model: NeoX, num_blocks: int, block_size: int, max_num_seqs: int,
                  cuda_graphs: bool, kv_dtype: torch.dtype, cascade: bool) -> ModelRunner:
    """A stage's runner: its layers over a KV cache of those layers (every stage the
    same block ids) stored in ``kv_dtype``. ``cascade``: rank 0 prepares cascade steps;
    every stage captures their graphs up front."""
    param = next(model.parameters())
    cache = KVCache.for_model(model.config, model.layer_range, num_blocks, block_size,
                              kv_dtype, param.device)
    return ModelRunner(model, cache, max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs,
                       pipelined=True, cascade=cascade)


class _MicroBatch:
    """One micro-batch: a scheduler over a share of the stages' KV blocks, and its step
    in flight (the logits receive, and the plan and sampler rows that wait for them)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.inflight: tuple[Any, Tensor | None] | None = None
        self.stash: tuple[StepPlan, SamplerInputs] | None = None
        self.deferred_aborts: list[str] = []
        self.load = 0  # tokens of unfinished requests (balances new requests over groups)


class PipelineEngine:
    """The :class:`~models.engine.Engine` interface over ``num_stages`` pipeline stages.

    Build it with :func:`models.runtime.build_engine` (``pipeline_parallel=N``). Stage 0
    runs in this process on ``device`` (``cuda`` -> ``cuda:0``, ``cuda:1`` -> stages on
    1..N); stages 1..N-1 are spawned processes on the next devices. Use it as a context
    manager or call :meth:`close`; ``atexit`` closes it too.

    Engine arguments keep their meaning per micro-batch: ``max_num_seqs`` and
    ``max_batch_tokens`` bound one forward (one micro-batch), ``kv_memory`` is per GPU,
    ``num_blocks`` is the blocks of every stage's cache (shared out among the groups).
    ``micro_batches`` (default ``num_stages + 1``) is the number of groups in flight.
    ``cuda_graphs`` (default on CUDA) replays decode-only steps from per-stage graphs.
    ``kv_cache_dtype`` ("auto"/"fp8") is every stage's cache dtype; ``quantization``
    (None/"fp8") quantizes every stage's linear layers as it loads them.
    ``abort`` of a request whose micro-batch is in flight takes effect when that step
    returns (if the step finished the request, it finishes normally). The other
    arguments mean what they mean for :class:`~models.engine.engine.Engine`.
    """

    def __init__(
        self,
        spec: str | Path,
        *,
        num_stages: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        tokenizer: Any = None,
        seed: int = 0,
        kv_memory: float | int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 2048,
        micro_batches: int | None = None,
        kv_overcommit: float = 1.0,
        watermark: float = 0.01,
        yield_tokens: int | None = YIELD_TOKENS,
        enable_prefix_caching: bool = True,
        enable_cascade: bool | None = None,
        mask_padded_vocab: bool = True,
        clamp_max_tokens: bool = False,
        tune_kernels: bool | None = None,
        cuda_graphs: bool | None = None,
        kv_cache_dtype: str | None = None,
        quantization: str | None = None,
        startup_timeout: float = 1800.0,
    ) -> None:
        from models.dtypes import (
            canonical_kv_cache_dtype,
            canonical_quantization,
            parse_dtype,
            parse_kv_cache_dtype,
        )
        from models.loaders import load_config, load_model

        if num_stages < 2:
            raise ValueError(f"pipeline_parallel: a pipeline needs >= 2 stages, got {num_stages}")
        self._closed = False
        self._broken: str | None = None
        self._procs: list[Any] = []
        self._cmd_qs: list[Any] = []
        self._status: list[Any] = []
        self._tmpdir = tempfile.mkdtemp(prefix="neoxq-pp-")
        self._dist = False
        self._backend = "gloo"
        self._sends = _Sends(polls=torch.device(device).type == "cuda")
        atexit.register(self.close)
        self.num_stages = n = num_stages
        base = torch.device(device)
        if base.type == "cuda" and torch.cuda.device_count() < (base.index or 0) + n:
            raise ValueError(f"pipeline_parallel: {n} stages need {n} GPUs from {base}, "
                             f"{torch.cuda.device_count()} visible")
        dtype = parse_dtype(dtype)
        self.dtype = dtype
        self.kv_cache_dtype = canonical_kv_cache_dtype(kv_cache_dtype)
        self.kv_dtype = kv_dtype = parse_kv_cache_dtype(self.kv_cache_dtype, dtype)
        self.quantization = quantization = canonical_quantization(quantization)
        self.device = _device_for(base, 0)
        config = load_config(spec, tokenizer=tokenizer)
        self.config = config
        self.ranges = partition_layers(config, n)
        if tune_kernels is None:
            tune_kernels = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.cuda_graphs = bool(cuda_graphs)
        self.cascade = (enable_prefix_caching and self.device.type == "cuda"
                        if enable_cascade is None else enable_cascade)
        self.block_size = block_size
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.max_position = config.max_position
        self.clamp_max_tokens = clamp_max_tokens
        self._rng = random.Random(seed)
        try:
            self._start(spec, base, dtype, kv_dtype, quantization, tokenizer, seed, kv_memory,
                        block_size, max_num_seqs, max_batch_tokens, bool(tune_kernels),
                        startup_timeout)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            t0 = time.time()
            loaded = load_model(spec, device=self.device, dtype=dtype, tokenizer=tokenizer,
                                layer_range=self.ranges[0], seed=seed,
                                quantization=quantization)
            self.tokenizer = loaded.tokenizer
            stage0 = loaded.model
            if self.device.type == "cuda" and tune_kernels:
                tune_decode_kernel(config.num_heads, config.head_dim, block_size, kv_dtype,
                                   self.device, query_dtype=dtype)
                if self.cascade:
                    tune_cascade_kernel(config.num_heads, config.head_dim, block_size,
                                        kv_dtype, self.device, query_dtype=dtype)
                torch.cuda.empty_cache()
            # Rank 0 receives the logits and samples.
            mine = blocks_for_budget(
                config, layer_range=self.ranges[0], block_size=block_size, dtype=kv_dtype,
                device=self.device, kv_memory=kv_memory, max_batch_tokens=max_batch_tokens,
                max_num_seqs=max_num_seqs, logits=True)
            self.stage_info: list[dict[str, Any]] = [{
                "rank": 0, "layer_range": self.ranges[0], "device": str(self.device),
                "weight_bytes": stage0.parameter_bytes(), "max_blocks": mine,
                "load_s": time.time() - t0, "pid": os.getpid()}]
            self.stage_info += [self._expect(r, "ready", startup_timeout)
                                for r in range(1, n)]
            total = num_blocks if num_blocks is not None else min(
                s["max_blocks"] for s in self.stage_info)
            # N + 1 groups: while rank 0 samples and schedules one group, the stages still
            # have N groups' steps to work on (with N, every stage idles for that time).
            groups = micro_batches or n + 1
            if total < 1 + 2 * groups:
                raise ValueError(f"kv_memory: {total} KV blocks cannot be shared by "
                                 f"{groups} micro-batches (stage memory: "
                                 f"{[s['max_blocks'] for s in self.stage_info]} blocks)")
            for q in self._cmd_qs:
                q.put(("init", total))
            self._runner = _stage_runner(stage0, total, block_size, max_num_seqs,
                                         self.cuda_graphs, kv_dtype, self.cascade)
            self.stage_info[0]["kv_bytes"] = self._runner.cache.nbytes
            for r in range(1, n):
                self.stage_info[r].update(self._expect(r, "init_done", startup_timeout))
            self.num_blocks = total
            tok = self.tokenizer
            self.eos_id: int = (int(tok.eos_id) if tok is not None and tok.eos_id is not None
                                else int(config.eos_token_id))
            vocab = tok.vocab_size if tok is not None else None
            self.grammars = Grammars(tok, config.vocab_size, self.eos_id)
            self._sampler = Sampler(
                device=self.device, eos_id=self.eos_id,
                valid_vocab=min(int(vocab), config.vocab_size)
                if mask_padded_vocab and vocab else None, grammars=self.grammars)
            salt = prefix_salt(config, dtype, kv_dtype, quantization)
            self._groups: list[_MicroBatch] = []
            lo, usable = 1, total - 1
            for g in range(groups):
                hi = lo + usable // groups + (1 if g < usable % groups else 0)
                blocks = BlockManager(hi, block_size, lo=lo,
                                      enable_prefix_caching=enable_prefix_caching, salt=salt)
                self._groups.append(_MicroBatch(Scheduler(
                    blocks, max_position=self.max_position, max_num_seqs=max_num_seqs,
                    max_batch_tokens=max_batch_tokens, kv_overcommit=kv_overcommit,
                    watermark=watermark, decoder=tok, eos_id=self.eos_id,
                    yield_tokens=yield_tokens)))
                lo = hi
        except BaseException:
            self.close()
            raise
        self.model = stage0
        self._turn = 0
        self._where: dict[str, tuple[_MicroBatch, int]] = {}  # request -> (group, its load)
        self._pending: list[RequestOutput] = []
        self._last_check = time.monotonic()
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- start-up ------------------------------------------------------------------------

    def _start(self, spec: str | Path, base: torch.device, dtype: torch.dtype,
               kv_dtype: torch.dtype, quantization: str | None, tokenizer: Any,
               seed: int, kv_memory: float | int | None, block_size: int, max_num_seqs: int,
               max_batch_tokens: int, tune_kernels: bool, timeout: float) -> None:
        graphs = self.cuda_graphs
        n = self.num_stages
        # Multicast (NVLS) stays off: set before the children inherit the environment.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        init_file = os.path.join(self._tmpdir, "store")
        ctx = mp.get_context("spawn")
        for r in range(1, n):
            args = _StageArgs(
                world=n, init_file=init_file, spec=str(spec), layer_range=self.ranges[r],
                device=str(_device_for(base, r)), dtype=dtype, kv_dtype=kv_dtype,
                quantization=quantization, tokenizer=tokenizer, seed=seed,
                kv_memory=kv_memory, block_size=block_size, max_num_seqs=max_num_seqs,
                max_batch_tokens=max_batch_tokens, tune_kernels=tune_kernels,
                cuda_graphs=graphs, cascade=self.cascade, parent_pid=os.getpid(),
                num_threads=torch.get_num_threads())
            cmd_q = ctx.Queue()
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_stage_main, args=(r, args, cmd_q, send_end),
                            name=f"neoxq-stage{r}", daemon=True)
            p.start()
            send_end.close()  # ours is the reading end: EOF when the child dies
            self._procs.append(p)
            self._cmd_qs.append(cmd_q)
            self._status.append(recv_end)
        for r in range(1, n):
            pid = self._expect(r, "hello", timeout)
            print(f"neoxq pipeline: stage {r} of {n} started (pid {pid}, "
                  f"layers {self.ranges[r][0]}..{self.ranges[r][1] - 1}, "
                  f"{_device_for(base, r)})", file=sys.stderr, flush=True)
        self._backend = "nccl" if base.type == "cuda" else "gloo"
        if base.type == "cuda":
            torch.cuda.set_device(_device_for(base, 0))
        self._fwd, self._ret = _init_dist(self._backend, init_file, 0, n)
        self._dist = True

    def _expect(self, rank: int, kind: str, timeout: float) -> Any:
        """The next status message of a stage, which must be ``kind``; liveness-checked."""
        conn = self._status[rank - 1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if conn.poll(LIVENESS_S):
                try:
                    msg = conn.recv()
                except EOFError:
                    self._raise_dead(rank)
                if msg[0] == "error":
                    self._raise_error(rank, msg[1])
                if msg[0] != kind:
                    raise PipelineError(f"pipeline stage {rank}: expected {kind}, got {msg[0]}")
                return msg[1]
            if not self._procs[rank - 1].is_alive():
                self._raise_dead(rank)
        raise PipelineError(f"pipeline stage {rank}: no {kind!r} within {timeout:.0f}s")

    def _raise_dead(self, rank: int) -> None:
        p = self._procs[rank - 1]
        p.join(timeout=2.0)
        conn = self._status[rank - 1]
        with contextlib.suppress(Exception):
            while conn.poll(0):
                msg = conn.recv()
                if msg[0] == "error":
                    raise PipelineError(f"pipeline stage {rank} (pid {p.pid}) failed: {msg[1]}")
        code = p.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        raise PipelineError(f"pipeline stage {rank} (pid {p.pid}, layers "
                            f"{self.ranges[rank][0]}..{self.ranges[rank][1] - 1}) {how}")

    def check_stages(self) -> None:
        """Raise :class:`PipelineError` if a stage reported an error or died."""
        dead = [r for r in range(1, self.num_stages) if not self._procs[r - 1].is_alive()]
        for r in dead:  # name a dead stage before the peers it took down with it
            self._raise_dead(r)
        for r in range(1, self.num_stages):
            conn = self._status[r - 1]
            if conn.poll(0):
                try:
                    msg = conn.recv()
                except EOFError:
                    self._raise_dead(r)
                if msg[0] == "error":
                    self._raise_error(r, msg[1])

    def _raise_error(self, rank: int, text: str) -> None:
        """Raise a stage's reported error — unless another stage died meanwhile, which
        is then the cause (a killed stage's peers fail on the broken connection, and
        can report that before the killed process is seen to have exited): wait up to
        :data:`PEER_DEATH_S` for one to show, and name it instead."""
        deadline = time.monotonic() + PEER_DEATH_S
        while True:
            for r in range(1, self.num_stages):
                if r != rank and not self._procs[r - 1].is_alive():
                    self._raise_dead(r)
            if time.monotonic() >= deadline:
                raise PipelineError(f"pipeline stage {rank} failed: {text}")
            time.sleep(0.05)

    # -- the pipeline --------------------------------------------------------------------

    def _launch(self, g: _MicroBatch) -> None:
        """Schedule the micro-batch's next step; send it to every stage, run stage 0 on
        it, post the logits receive. Nothing happens if it has nothing to run."""
        # Every micro-batch's step is on the path of every other's (they share the
        # stages), so all of them yield to a higher-priority request in any of them.
        tops = [t for t in (h.scheduler.top_priority() for h in self._groups) if t is not None]
        plan = g.scheduler.schedule(max(tops) if tops else None)
        if plan.is_empty:
            return
        inputs = self._runner.prepare(plan)
        for q in self._cmd_qs:
            q.put(("step", inputs))
        x, rows = self._runner.execute(inputs)
        self._sends.add(dist.isend(x, dst=1, group=self._fwd[0]), x)
        g.stash = (plan, rows)
        if not inputs.num_rows:
            g.inflight = (None, None)
            return
        buf = torch.empty(inputs.num_rows, self.config.vocab_size, dtype=self.dtype,
                          device=self.device)
        g.inflight = (dist.irecv(buf, src=self.num_stages - 1, group=self._ret), buf)

    def _wait(self, work: Any) -> None:
        """Wait for a receive, checking every ``LIVENESS_S`` that the stages are alive."""
        try:
            if self._backend == "nccl":
                # The work's CUDA event says when the data is there; no thread needed.
                next_check = time.monotonic() + LIVENESS_S
                while not work.is_completed():
                    now = time.monotonic()
                    if now >= next_check:
                        self.check_stages()
                        next_check = now + LIVENESS_S
                    time.sleep(0.0002)
                work.wait()
            else:
                # gloo work completes only inside wait(): wait in a helper thread.
                done = threading.Event()
                errors: list[BaseException] = []

                def run() -> None:
                    try:
                        work.wait()
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        errors.append(exc)
                    finally:
                        done.set()

                threading.Thread(target=run, name="neoxq-pp-wait", daemon=True).start()
                while not done.wait(LIVENESS_S):
                    self.check_stages()
                if errors:
                    raise errors[0]
        except PipelineError:
            raise
        except Exception as exc:  # the transport noticed a dead peer first: name it
            self._blame(exc, grace=5.0)
            raise PipelineError(f"pipeline: receiving logits failed: {exc}") from exc

    def _finish(self, g: _MicroBatch) -> None:
        """Wait for the micro-batch's logits; sample and update its scheduler."""
        assert g.inflight is not None and g.stash is not None
        work, buf = g.inflight
        if work is not None:
            self._wait(work)
        logits = buf if buf is not None else torch.empty(
            0, self.config.vocab_size, dtype=self.dtype, device=self.device)
        plan, rows = g.stash
        g.inflight = g.stash = None
        # Sampling on a side stream: its host sync then waits for this step's logits
        # only, not for the stage-0 work of the next micro-batch already queued.
        with torch.cuda.stream(self._side) if self._side is not None else \
                contextlib.nullcontext():
            g.scheduler.update(plan, self._sampler(logits, plan, rows))
        aborts, g.deferred_aborts = g.deferred_aborts, []
        for rid in aborts:
            g.scheduler.abort(rid)

    def _guard(self) -> None:
        if self._broken is not None:
            raise PipelineError(self._broken)
        if self._closed:
            raise PipelineError("pipeline engine is closed")

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A PipelineError breaks the engine for good: stop every stage, re-raise. Any
        other error is first blamed on a stage that died, if one did (the transport often
        notices a dead peer before the liveness check does)."""
        try:
            yield
        except PipelineError as exc:
            self._broken = str(exc)
            self._kill()
            raise
        except Exception as exc:
            try:
                self._blame(exc)
            except PipelineError as err:
                self._broken = str(err)
                self._kill()
                raise err from exc
            raise

    def _blame(self, exc: BaseException, grace: float = 3.0) -> None:
        """Raise PipelineError if a stage failed (waiting up to ``grace`` seconds for a
        dying one to be seen); return if every stage is healthy."""
        if not self._procs:
            return
        deadline = time.monotonic() + grace
        while True:
            self.check_stages()
            if time.monotonic() >= deadline or not _looks_like_transport(exc):
                return
            time.sleep(0.05)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Advance the next micro-batch: collect its step's logits (sample, update), then
        schedule and launch its next step. Returns the requests that finished (or were
        aborted) since the last call."""
        self._guard()
        with self._failing():
            now = time.monotonic()
            if now - self._last_check > 1.0:
                self._last_check = now
                self.check_stages()
                self._sends.prune()
            g = self._groups[self._turn]
            self._turn = (self._turn + 1) % len(self._groups)
            if g.inflight is not None:
                self._finish(g)
            self._launch(g)
        return self._collect()

    def _collect(self) -> list[RequestOutput]:
        out, self._pending = self._pending, []
        for g in self._groups:
            out.extend(g.scheduler.take_outputs())
        for o in out:
            where = self._where.pop(o.request_id, None)
            if where is not None:
                where[0].load -= where[1]
        return out

    # -- requests ------------------------------------------------------------------------

    def _pick(self) -> _MicroBatch:
        return min(self._groups, key=lambda g: g.load)

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival: float | None = None,
        priority: int = BATCH,
    ) -> None:
        """Queue a request (on the least loaded micro-batch). Raises ``ValueError``
        naming the field for a bad one."""
        self._guard()
        params = as_params(params)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        if request_id in self._where:
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        ids = prompt_ids(prompt, self.tokenizer, self.config.vocab_size)
        params = fit_params(ids, params, self.max_position, self.clamp_max_tokens)
        g = self._pick()
        g.scheduler.check_fits(len(ids) + params.max_tokens, "prompt")
        # One seed stream for the whole engine, as a one-GPU engine draws them.
        new_matcher = self.grammars.factory(params.constraint)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        g.scheduler.add_generate(request_id, ids, params, seed, arrival or time.time(),
                                 priority, new_matcher=new_matcher)
        load = len(ids) + params.max_tokens * params.n
        g.load += load
        self._where[request_id] = (g, load)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its memory; its output (finish_reason "abort") comes
        back from a later :meth:`step`. False if it is unknown or finished."""
        self._guard()
        where = self._where.get(request_id)
        if where is None:
            return False
        g = where[0]
        if g.inflight is None:
            return g.scheduler.abort(request_id)
        req = g.scheduler.requests.get(request_id)
        if req is None or req.done:
            return False
        g.deferred_aborts.append(request_id)
        return True

    def partial(self, request_id: str) -> list[PartialSample] | None:
        """A running request's progress per sample (see ``Scheduler.partial``)."""
        where = self._where.get(request_id)
        return None if where is None else where[0].scheduler.partial(request_id)

    def has_unfinished(self) -> bool:
        """Raises :class:`PipelineError` once a stage has failed: a caller that only
        polls this (an idle worker loop) must not spin on a broken engine."""
        if self._broken is not None:
            raise PipelineError(self._broken)
        return bool(self._pending) or any(
            g.inflight is not None or g.scheduler.has_unfinished() for g in self._groups)

    def num_unfinished(self) -> int:
        return sum(g.scheduler.num_unfinished() for g in self._groups)

    def check_health(self) -> None:
        """Raise :class:`PipelineError` if a stage reported an error or died."""
        self.check_stages()

    def generated_tokens(self) -> dict[str, int]:
        """As :meth:`Engine.generated_tokens`, over every micro-batch group."""
        out: dict[str, int] = {}
        for g in self._groups:
            out.update(g.scheduler.generated_tokens())
        return out

    @property
    def stats(self) -> dict[str, float]:
        """The micro-batches' counters added up (as :attr:`Engine.stats`)."""
        total: dict[str, float] = {}
        for g in self._groups:
            for k, v in g.scheduler.stats.items():
                total[k] = total.get(k, 0) + v
        total["graph_steps"] = self._runner.graph_steps  # stage 0's; the others match
        total["cascade_steps"] = self._runner.cascade_steps
        total.update(prefix_stats([g.scheduler.blocks for g in self._groups]))
        return total

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on or off from now on (as :meth:`Engine.set_prefix_caching`)."""
        for g in self._groups:
            g.scheduler.blocks.set_enabled(enabled)

    def set_cascade(self, enabled: bool, *, graphs: bool = True) -> None:
        """Turn cascade decode attention on or off from now on (as
        :meth:`Engine.set_cascade`; rank 0 prepares every step, the stages follow)."""
        self._runner.cascade = enabled
        self._runner.cascade_graphs = graphs

    def capture_graphs(self) -> int:
        """Capture every stage's decode graphs now instead of on first use (as
        :meth:`Engine.capture_graphs`). Returns how many rank 0 holds."""
        self._guard()
        if self._runner.graphs is None:
            return 0
        with self._failing():
            for q in self._cmd_qs:
                q.put(("capture",))
            count = self._runner.capture_graphs()
            for r in range(1, self.num_stages):
                self._expect(r, "captured", 1800.0)
        return count

    @property
    def micro_batches(self) -> int:
        """Micro-batch groups in flight."""
        return len(self._groups)

    @property
    def cache_tokens(self) -> int:
        """Tokens the stages' KV caches hold (all micro-batches together)."""
        return (self.num_blocks - 1) * self.block_size

    # -- conveniences (as Engine) ----------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order (as :meth:`Engine.generate`)."""
        self._guard()
        tag = f"_gen{self._rng.getrandbits(40):x}_"
        final, others = run_to_completion(self.add_request, self.step, tag, prompts, params)
        self._pending = others + self._pending
        return final

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ScoreResult]:
        """Log-likelihood of each continuation given its context (as :meth:`Engine.score`)."""
        self._guard()
        tag = f"_score{self._rng.getrandbits(40):x}_"
        checked = []
        for i, pair in enumerate(pairs):
            ctx, cont, inp = score_pair(i, pair, self.max_position, self.config.vocab_size)
            self._groups[0].scheduler.check_fits(len(inp), f"pairs[{i}]")
            checked.append((ctx, cont, inp))
        todo: list[tuple[str, _MicroBatch, int]] = []
        for i, (ctx, cont, inp) in enumerate(checked):
            g = self._pick()
            rid = f"{tag}{i}"
            g.scheduler.add_score(rid, inp, len(ctx), cont)
            g.load += len(inp)
            todo.append((rid, g, len(inp)))
        results: dict[str, ScoreResult] = {}
        others: list[RequestOutput] = []
        while len(results) < len(todo):
            others.extend(self.step())
            for rid, g, load in todo:
                if rid not in results:
                    got = g.scheduler.take_score(rid)
                    if got is not None:
                        results[rid] = got
                        g.load -= load
        self._pending = others + self._pending
        return [results[rid] for rid, _, _ in todo]

    # -- shutdown --------------------------------------------------------------------------

    def _kill(self) -> None:
        """Stop every stage now (no drain): the engine is broken."""
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)

    def close(self) -> None:
        """Finish the steps in flight, stop and join every stage process. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        healthy = self._broken is None and all(p.is_alive() for p in self._procs)
        if healthy and self._dist:
            try:
                with torch.inference_mode():
                    for g in getattr(self, "_groups", []):
                        if g.inflight is not None and g.inflight[0] is not None:
                            self._wait(g.inflight[0])
                            g.inflight = None
            except Exception:  # noqa: BLE001 - closing anyway
                healthy = False
        for q in self._cmd_qs:
            with contextlib.suppress(Exception):
                q.put(("stop",))
        deadline = time.monotonic() + (10.0 if healthy else 0.0)
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()
        for q in self._cmd_qs:
            with contextlib.suppress(Exception):
                q.close()
                q.cancel_join_thread()
        # A broken NCCL group may block in its teardown: leave it to process exit. gloo
        # tears down cleanly (and the process may want a new group, as the tests do).
        if self._dist and (healthy or self._backend == "gloo"):
            def teardown() -> None:
                with contextlib.suppress(Exception):
                    if healthy:
                        self._sends.drain()
                    dist.destroy_process_group()

            # Bounded: communicator teardown must never turn a shutdown into a hang.
            t = threading.Thread(target=teardown, name="neoxq-pp-teardown", daemon=True)
            t.start()
            t.join(timeout=30.0)
        self._dist = False
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def shutdown(self) -> None:
        """Alias of :meth:`close`."""
        self.close()

    def __enter__(self) -> PipelineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_weight_bytes(engine: PipelineEngine) -> list[int]:
    """Weight bytes each stage holds (for benchmarks)."""
    return [int(s["weight_bytes"]) for s in engine.stage_info]


def _looks_like_transport(exc: BaseException) -> bool:
    """gloo/NCCL errors about a peer (worth waiting for the dead stage to show)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError | dist.DistBackendError) and any(
        w in text for w in ("connection", "gloo", "nccl", "peer", "socket", "closed"))


__all__ = ["PipelineEngine", "PipelineError"]
