"""Pipeline parallelism: the model split over N stage processes, several micro-batches
in flight.

Layout (DESIGN.md, "Pipeline parallelism"):

- **Rank 0 is the calling process.** It holds stage 0 (the embedding and the first
  blocks) *and* the scheduler; ranks 1..N-1 are processes this module spawns, one per
  GPU (``cuda:base+rank``), each holding a contiguous run of blocks (the last also the
  final norm and head, see :mod:`models.partition`). Each stage loads only its own
  tensors (``load_model(..., layer_range=...)``).
- **Every stage holds the KV cache of its own layers**, with the same block ids: rank 0
  decides block tables and slots and ships them with each step (:class:`StepPlan`).
- **Commands travel on a CPU channel** (a multiprocessing queue per stage), activations
  on torch.distributed point-to-point (NCCL on GPUs, gloo on CPU). An idle stage waits
  on its queue with a timeout — never on an NCCL operation — so ranks survive hours
  without work, notice a dead parent within a second and exit.
- **Micro-batches.** The running sequences are split into ``micro_batches`` groups
  (default N + 1), each a full :class:`~models.engine.Engine` scheduler over its own share
  of the KV blocks. :meth:`PipelineEngine.step` takes the next group in turn: it waits
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
- **Not DeepSpeed's pipeline engine** (no autoregressive generation, DESIGN.md), nor
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
import dataclasses
import math
import os
import queue
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

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from models.attention import PagedAttention, StepMetadata, tune_decode_kernel
from models.config import NeoXConfig
from models.engine import (
    Engine,
    RequestOutput,
    ScoreResult,
    Timings,
    _Request,
    _Seq,
    as_params,
    run_to_completion,
    score_pair,
)
from models.kv_cache import NULL_BLOCK, BlockAllocator, KVCache, block_bytes
from models.model import NeoX
from models.partition import partition_layers
from models.sampling import SamplingParams

# Idle ranks wait on their command queue, not on a collective, but a step in flight can
# legitimately take long (a huge prefill on a slow device): no timeout should ever fire.
PG_TIMEOUT = timedelta(days=30)
# How often a waiting rank 0 checks that the stages are alive, and a stage its parent.
LIVENESS_S = 0.25
PARENT_CHECK_S = 1.0


class PipelineError(RuntimeError):
    """A pipeline stage failed or died; the engine cannot continue."""


# --------------------------------------------------------------------------------------
# One step, as every stage sees it
# --------------------------------------------------------------------------------------

@dataclass
class StepPlan:
    """One micro-batch step as every stage needs it (picklable host data).

    Built from exactly what :meth:`Engine._forward` hands the network: the token ids,
    positions, the :class:`StepMetadata` it gives the attention backend and the logits
    rows it selects, recorded on host tensors (:class:`_Recorder`). int64 tensors travel
    in one array (one host-to-device copy per stage), anything else beside it.
    """

    num_tokens: int  # N tokens in the forward
    rows: int  # logits rows the last stage returns
    select_rows: bool  # the head runs on a subset of the N rows (``logit_rows``)
    ints: np.ndarray  # int64 tensors, flattened and concatenated
    int_fields: list[tuple[str, tuple[int, ...]]]  # (name, shape) of each, in order
    other: dict[str, Any]  # other StepMetadata fields (numpy arrays or plain values)
    copies: tuple[list[int], list[int]] | None = None  # copy-on-write blocks (src, dst)

    @classmethod
    def from_host(cls, tokens: Tensor, positions: Tensor, meta: StepMetadata,
                  logit_rows: Tensor | None) -> StepPlan:
        named: list[tuple[str, Tensor]] = [("tokens", tokens), ("positions", positions)]
        if logit_rows is not None:
            named.append(("logit_rows", logit_rows))
        other: dict[str, Any] = {}
        for f in dataclasses.fields(meta):
            v = getattr(meta, f.name)
            if isinstance(v, Tensor) and v.dtype == torch.int64:
                named.append((f"meta.{f.name}", v))
            elif isinstance(v, Tensor):
                other[f.name] = v.cpu().numpy()
            else:
                other[f.name] = v
        ints = np.concatenate([t.reshape(-1).numpy() for _, t in named]).astype(np.int64)
        return cls(num_tokens=int(tokens.numel()),
                   rows=int(logit_rows.numel()) if logit_rows is not None else int(
                       tokens.numel()),
                   select_rows=logit_rows is not None, ints=ints,
                   int_fields=[(name, tuple(t.shape)) for name, t in named], other=other)

    def host(self, name: str) -> np.ndarray:
        """One int64 section (``tokens``, ``positions``, ``meta.<field>``) on the host."""
        off = 0
        for n, shape in self.int_fields:
            size = math.prod(shape)
            if n == name:
                return self.ints[off: off + size].reshape(shape)
            off += size
        raise KeyError(name)

    def is_decode_only(self) -> bool:
        return self.other.get("num_decode") == self.num_tokens and not self.select_rows

    def to_device(self, device: torch.device) -> tuple[Tensor, Tensor, StepMetadata,
                                                        Tensor | None]:
        """(tokens, positions, metadata, logit rows or None) as ``device`` tensors."""
        host = torch.from_numpy(self.ints)
        if device.type == "cuda":
            dev = host.pin_memory().to(device, non_blocking=True)
        else:
            dev = host
        sizes = [math.prod(shape) for _, shape in self.int_fields]
        got = {name: t.view(shape) for (name, shape), t in
               zip(self.int_fields, torch.split(dev, sizes), strict=True)}
        fields: dict[str, Any] = {k[5:]: v for k, v in got.items() if k.startswith("meta.")}
        for k, v in self.other.items():
            fields[k] = torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v
        return got["tokens"], got["positions"], StepMetadata(**fields), got.get("logit_rows")


class _Recorder:
    """Stands in for the network and the attention backend while ``Engine._forward``
    runs on host tensors: it records what the network would have been given."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None
        self.positions: Tensor | None = None
        self.meta: StepMetadata | None = None
        self.logit_rows: Tensor | None = None

    def set_step(self, meta: StepMetadata) -> None:
        self.meta = meta

    def embed(self, tokens: Tensor) -> Tensor:
        self.tokens = tokens
        return tokens

    def run_layers(self, x: Tensor, positions: Tensor, attn: Any) -> _Recorder:
        self.positions = positions
        return self

    def __getitem__(self, rows: Tensor) -> _Recorder:
        self.logit_rows = rows
        return self

    def head(self, hidden: Any) -> None:
        return None

    def plan(self) -> StepPlan:
        assert self.tokens is not None and self.positions is not None and self.meta is not None
        return StepPlan.from_host(self.tokens, self.positions, self.meta, self.logit_rows)


class StageRuntime:
    """A stage's layers and the KV cache of those layers; runs one :class:`StepPlan`.

    ``graphs``: decode-only steps replay a per-bucket graph of this stage's layers
    (:class:`_StageGraphs`), captured on CUDA; off CUDA the same static-buffer path runs
    uncaptured (so it is tested on CPU).
    """

    def __init__(self, model: NeoX, num_blocks: int, block_size: int, graphs: bool = False,
                 max_batch: int = 256) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        start, stop = model.layer_range
        cfg = model.config
        self.cache = KVCache(num_layers=stop - start, num_blocks=num_blocks,
                             block_size=block_size, num_heads=cfg.num_heads,
                             head_dim=cfg.head_dim, dtype=self.dtype, device=self.device,
                             layer_start=start)
        self.attn = PagedAttention(self.cache)
        self.graphs = _StageGraphs(self, max_batch, capture=self.device.type == "cuda") \
            if graphs else None
        self.graph_steps = 0

    def _copies(self, plan: StepPlan) -> None:
        if plan.copies:
            src, dst = plan.copies
            self.cache.copy_blocks(torch.tensor(src, device=self.device),
                                   torch.tensor(dst, device=self.device))

    def forward(self, plan: StepPlan, x: Tensor | None) -> Tensor:
        """Token ids (first stage, from the plan) or hidden states ``x`` (N, H) in;
        hidden states (N, H) out, or logits (rows, V) from the last stage. The result is
        the caller's to keep (a graph's output buffer is copied out)."""
        self._copies(plan)
        if self.graphs is not None and plan.is_decode_only() and \
                plan.num_tokens <= self.graphs.max_batch:
            self.graph_steps += 1
            return self.graphs.run(plan, x)
        tokens, pos, meta, lrows = plan.to_device(self.device)
        self.attn.set_step(meta)
        m = self.model
        if m.has_embedding:
            x = m.embed(tokens)
        assert x is not None
        x = m.run_layers(x, pos, self.attn)  # (N, H)
        if not m.has_head:
            return x
        if lrows is not None:
            x = x[lrows]
        return m.head(x)  # (rows, V)


class _StageGraphs:
    """Graphs of a stage's decode-only steps, one per bucketed batch size (the engine's
    ``_DecodeGraphs``, for a slice of the layers).

    Inputs live in one static int64 buffer (tokens, positions, slot blocks, slot offsets,
    context lengths, block tables of ``width`` columns) refreshed by one copy per step
    from a freshly pinned host array (stages never sync with the host, so a reused
    pinned buffer could be overwritten before its copy ran); stages after the first also
    copy the received hidden states into a static input. Rows past the batch are
    padding: token 0 at position 0, writing to and reading from the null block. The
    output is cloned: the next replay would overwrite it while a send still reads it.
    """

    def __init__(self, rt: StageRuntime, max_batch: int, capture: bool = True) -> None:
        self.rt = rt
        self.capture = capture
        self.max_batch = max_batch
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48) if b < max_batch}
                              | set(range(64, max_batch, 32)) | {max_batch})
        cfg = rt.model.config
        # The engine rounds its table width up to 16 columns: cover the largest such.
        self.width = -(-math.ceil(cfg.max_position / rt.block_size) // 16) * 16
        m, w = max_batch, self.width
        self.offsets = [0, m, 2 * m, 3 * m, 4 * m, 5 * m, 5 * m + m * w]
        self.static = torch.zeros(self.offsets[-1], dtype=torch.int64, device=rt.device)
        self.x = None if rt.model.has_embedding else torch.zeros(
            m, cfg.hidden_size, dtype=rt.dtype, device=rt.device)
        self.graphs: dict[int, Any] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _section(self, i: int) -> Tensor:
        return self.static[self.offsets[i]: self.offsets[i + 1]]

    def _capture(self, b: int) -> Any:
        rt, m = self.rt, self.rt.model
        tokens, pos, sblk, soff, ctx = (self._section(i)[:b] for i in range(5))
        tables = self._section(5).view(self.max_batch, self.width)[:b]
        attn = PagedAttention(rt.cache)
        # Valid, harmless inputs while warming up and capturing.
        tokens.zero_()
        pos.zero_()
        sblk.fill_(NULL_BLOCK)
        soff.zero_()
        ctx.fill_(1)
        tables.fill_(NULL_BLOCK)
        x_static = self.x

        def forward() -> Tensor:
            attn.set_step(StepMetadata(slot_blocks=sblk, slot_offsets=soff, num_decode=b,
                                       block_tables=tables, context_lens=ctx))
            x = m.embed(tokens) if m.has_embedding else x_static[:b]  # type: ignore[index]
            h = m.run_layers(x, pos, attn)  # (b, H)
            return m.head(h) if m.has_head else h

        if not self.capture:
            return forward
        stream = torch.cuda.Stream(device=rt.device)
        stream.wait_stream(torch.cuda.current_stream(rt.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton compiles, cuBLAS picks, off-graph
                forward()
        torch.cuda.current_stream(rt.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread queries events while we capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward()

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay

    def capture_all(self) -> int:
        """Capture every bucket now, largest first (the smaller reuse its memory)."""
        with torch.inference_mode():
            for b in sorted(self.buckets, reverse=True):
                if b not in self.graphs:
                    self.graphs[b] = self._capture(b)
        return len(self.graphs)

    def run(self, plan: StepPlan, x: Tensor | None) -> Tensor:
        d = plan.num_tokens
        b = next(v for v in self.buckets if v >= d)
        if b not in self.graphs:
            self.graphs[b] = self._capture(b)
        o, w = self.offsets, self.width
        n = o[5] + b * w  # only the used prefix of the tables section travels
        host = np.zeros(n, dtype=np.int64)
        host[o[0]: o[0] + d] = plan.host("tokens")
        host[o[1]: o[1] + d] = plan.host("positions")
        host[o[2]: o[2] + b] = NULL_BLOCK  # padding rows write to the null block
        host[o[2]: o[2] + d] = plan.host("meta.slot_blocks")
        host[o[3]: o[3] + d] = plan.host("meta.slot_offsets")
        host[o[4]: o[4] + b] = 1
        host[o[4]: o[4] + d] = plan.host("meta.context_lens")
        bt = plan.host("meta.block_tables")  # (d, table width <= w); zeros = null block
        host[o[5]: n].reshape(b, w)[:d, : bt.shape[1]] = bt
        src = torch.from_numpy(host)
        if self.capture:
            src = src.pin_memory()
        self.static[:n].copy_(src, non_blocking=True)
        if self.x is not None:
            assert x is not None
            self.x[:d].copy_(x)
        out = self.graphs[b]()[:d]
        return out.clone()


def _stage_blocks(
    config: NeoXConfig, layer_range: tuple[int, int], device: torch.device,
    dtype: torch.dtype, kv_memory: float | int | None, block_size: int, max_num_seqs: int,
    max_batch_tokens: int, rank: int,
) -> int:
    """How many KV blocks this stage can hold (the engine's sizing rule, per stage)."""
    per_block = block_bytes(config, block_size, dtype, layer_range[1] - layer_range[0])
    if device.type == "cuda":
        if kv_memory is None:
            kv_memory = 0.9
        if isinstance(kv_memory, float):
            if not 0 < kv_memory <= 1:
                raise ValueError(f"kv_memory: a fraction must be in (0, 1], got {kv_memory}")
            torch.cuda.synchronize(device)
            free, _ = torch.cuda.mem_get_info(device)
            v = config.vocab_size
            reserve = 2 << 30  # activations of the largest step, receive buffers
            if layer_range[1] == config.num_layers or rank == 0:
                # The last stage's logits; rank 0's received logits and sampler temporaries.
                reserve += max_batch_tokens * v * 4 * 3 + max_num_seqs * v * 8 * 6
            budget = int(free * kv_memory) - reserve
        else:
            budget = int(kv_memory)
    else:
        if isinstance(kv_memory, float):
            raise ValueError("kv_memory: give bytes (an int) off CUDA")
        budget = int(kv_memory) if kv_memory is not None else 256 << 20
    return max(0, budget // per_block)


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
    tokenizer: Any
    seed: int
    kv_memory: float | int | None
    block_size: int
    max_num_seqs: int
    max_batch_tokens: int
    tune_kernels: bool
    cuda_graphs: bool
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
                        layer_range=args.layer_range, seed=args.seed)
    model = loaded.model
    if device.type == "cuda" and args.tune_kernels:
        cfg = model.config
        tune_decode_kernel(cfg.num_heads, cfg.head_dim, args.block_size, args.dtype, device)
        torch.cuda.empty_cache()
    max_blocks = _stage_blocks(model.config, args.layer_range, device, args.dtype,
                               args.kv_memory, args.block_size, args.max_num_seqs,
                               args.max_batch_tokens, rank)
    status.send(("ready", {"rank": rank, "layer_range": args.layer_range, "device": str(device),
                           "weight_bytes": model.parameter_bytes(), "max_blocks": max_blocks,
                           "load_s": time.time() - t0, "pid": os.getpid()}))
    last = rank == args.world - 1
    runtime: StageRuntime | None = None
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
                runtime = StageRuntime(model, msg[1], args.block_size, graphs=args.cuda_graphs,
                                       max_batch=args.max_num_seqs)
                status.send(("init_done", {"rank": rank, "kv_bytes": runtime.cache.nbytes}))
                continue
            if kind == "capture":
                assert runtime is not None and runtime.graphs is not None
                status.send(("captured", runtime.graphs.capture_all()))
                continue
            assert kind == "step" and runtime is not None
            plan: StepPlan = msg[1]
            x = torch.empty(plan.num_tokens, hidden, dtype=args.dtype, device=device)
            # NCCL: wait() only orders our stream after the receive; the CPU runs on.
            dist.irecv(x, src=rank - 1, group=fwd[rank - 1]).wait()
            out = runtime.forward(plan, x)
            if last:
                if plan.rows:
                    out = out.contiguous()
                    sends.add(dist.isend(out, dst=0, group=ret), out)
            else:
                sends.add(dist.isend(out, dst=rank + 1, group=fwd[rank]), out)


# --------------------------------------------------------------------------------------
# Rank 0: micro-batch groups (schedulers) and the pipeline engine
# --------------------------------------------------------------------------------------


class _RangeAllocator(BlockAllocator):
    """A :class:`BlockAllocator` handing out only the block ids ``lo..hi-1`` (a group's
    share of the stages' caches; block 0 stays the shared null block)."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(hi)
        self._free = list(range(hi - 1, lo - 1, -1))
        self._lo = lo

    @property
    def capacity(self) -> int:
        return self.num_blocks - self._lo


class _CopyRecorder:
    """Stands in for a group's KV cache: copy-on-write copies ride along with the step."""

    def __init__(self) -> None:
        self.copies: tuple[list[int], list[int]] | None = None

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        self.copies = (src.tolist(), dst.tolist())


_CPU = torch.device("cpu")


class _Group(Engine):
    """One micro-batch: the engine's scheduler, state and sampling, over a share of the
    KV blocks, with the forward replaced by a launch into the pipeline.

    ``Engine._execute`` builds a step and calls ``_forward`` then ``_sample_and_update``;
    here ``_forward`` records a :class:`StepPlan` and launches it, and
    ``_sample_and_update`` keeps its arguments until :meth:`consume` has the logits.
    """

    def __init__(self, owner: PipelineEngine, meta_model: NeoX, tokenizer: Any,
                 lo: int, hi: int, device: torch.device, **kwargs: Any) -> None:
        # A meta-device whole model: Engine's bookkeeping without memory (the cache it
        # builds lives on meta too); the real layers are the stages'.
        super().__init__(meta_model, tokenizer, num_blocks=hi, cuda_graphs=False,
                         tune_kernels=False, **kwargs)
        self.owner = owner
        self.device = device
        self.allocator = _RangeAllocator(lo, hi)
        self.watermark_blocks = int(kwargs.get("watermark", 0.01) * self.allocator.capacity)
        self.cache = _CopyRecorder()  # type: ignore[assignment]
        self.inflight: tuple[Any, Tensor | None] | None = None
        self.deferred_aborts: list[str] = []
        self._stash: tuple[Any, ...] | None = None
        self.load = 0  # tokens of unfinished requests (balances new requests over groups)

    def launch(self) -> bool:
        """Schedule this group's next step and launch it; False if nothing to run."""
        sched = self._schedule()
        if not (sched.decodes or sched.prefills):
            return False
        self.cache.copies = None  # type: ignore[attr-defined]
        self._execute(sched)
        return True

    def _forward(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        # The engine's own forward, on host tensors, with a recorder for network and
        # attention: the step's metadata is whatever the engine builds, by construction.
        rec = _Recorder()
        model, attn, device = self.model, self.attn, self.device
        self.model, self.attn, self.device = rec, rec, _CPU  # type: ignore[assignment]
        try:
            out = Engine._forward(self, *args, **kwargs)
        finally:
            self.model, self.attn, self.device = model, attn, device
        plan = rec.plan()
        plan.copies = self.cache.copies  # type: ignore[attr-defined]
        self.inflight = self.owner._launch(plan)
        # (logits, sampler rows, score rows, score targets): the last three on the host
        # until the logits come back.
        return (None, *out[1:])

    def _sample_and_update(self, logits: Tensor, *args: Any) -> None:  # type: ignore[override]
        self._stash = args

    def consume(self, logits: Tensor) -> None:
        """Sample and update from the logits of the step in flight."""
        assert self._stash is not None
        args = tuple(a.to(self.device, non_blocking=True) if isinstance(a, Tensor) else a
                     for a in self._stash)
        self._stash = None
        Engine._sample_and_update(self, logits, *args)

    def enqueue_score(self, rid: str, inp: list[int], ctx: list[int], cont: list[int]) -> None:
        req = _Request(rid, inp, None, 0, Timings(time.time()), score_ctx=len(ctx),
                       score_targets=cont)
        req.seqs.append(_Seq(req, 0, inp, len(inp), None))
        self._enqueue(req, req.seqs[0])


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
    ``abort`` of a request whose micro-batch is in flight takes effect when that step
    returns (if the step finished the request, it finishes normally).
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
        tune_kernels: bool | None = None,
        cuda_graphs: bool | None = None,
        startup_timeout: float = 1800.0,
        **engine_kwargs: Any,
    ) -> None:
        from models.dtypes import parse_dtype
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
        self.device = _device_for(base, 0)
        config = load_config(spec, tokenizer=tokenizer)
        self.config = config
        self.ranges = partition_layers(config, n)
        if tune_kernels is None:
            tune_kernels = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.cuda_graphs = bool(cuda_graphs)
        self.block_size = block_size
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        try:
            self._start(spec, base, dtype, tokenizer, seed, kv_memory, block_size,
                        max_num_seqs, max_batch_tokens, bool(tune_kernels), startup_timeout)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            t0 = time.time()
            loaded = load_model(spec, device=self.device, dtype=dtype, tokenizer=tokenizer,
                                layer_range=self.ranges[0], seed=seed)
            self.tokenizer = loaded.tokenizer
            stage0 = loaded.model
            if self.device.type == "cuda" and tune_kernels:
                tune_decode_kernel(config.num_heads, config.head_dim, block_size, dtype,
                                   self.device)
                torch.cuda.empty_cache()
            mine = _stage_blocks(config, self.ranges[0], self.device, dtype, kv_memory,
                                 block_size, max_num_seqs, max_batch_tokens, 0)
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
            self._stage = StageRuntime(stage0, total, block_size, graphs=self.cuda_graphs,
                                       max_batch=max_num_seqs)
            self.stage_info[0]["kv_bytes"] = self._stage.cache.nbytes
            for r in range(1, n):
                self.stage_info[r].update(self._expect(r, "init_done", startup_timeout))
            self.num_blocks = total
            with torch.device("meta"):
                meta_model = NeoX(config).to(dtype)
            self._groups: list[_Group] = []
            lo, usable = 1, total - 1
            for g in range(groups):
                hi = lo + usable // groups + (1 if g < usable % groups else 0)
                self._groups.append(_Group(
                    self, meta_model, self.tokenizer, lo, hi, self.device,
                    block_size=block_size, max_num_seqs=max_num_seqs,
                    max_batch_tokens=max_batch_tokens, seed=seed + g, **engine_kwargs))
                lo = hi
        except BaseException:
            self.close()
            raise
        g0 = self._groups[0]
        self.eos_id = g0.eos_id
        self.max_position = g0.max_position
        self.model = stage0
        self._turn = 0
        self._where: dict[str, tuple[_Group, int]] = {}  # request -> (group, its load)
        self._outputs: list[RequestOutput] = []
        self._rng = g0._rng
        self._last_check = time.monotonic()
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- start-up ------------------------------------------------------------------------

    def _start(self, spec: str | Path, base: torch.device, dtype: torch.dtype, tokenizer: Any,
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
                device=str(_device_for(base, r)), dtype=dtype, tokenizer=tokenizer, seed=seed,
                kv_memory=kv_memory, block_size=block_size, max_num_seqs=max_num_seqs,
                max_batch_tokens=max_batch_tokens, tune_kernels=tune_kernels,
                cuda_graphs=graphs, parent_pid=os.getpid(), num_threads=torch.get_num_threads())
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
                    raise PipelineError(f"pipeline stage {rank} failed: {msg[1]}")
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
                    raise PipelineError(f"pipeline stage {r} failed: {msg[1]}")

    # -- the pipeline --------------------------------------------------------------------

    def _launch(self, plan: StepPlan) -> tuple[Any, Tensor | None]:
        """Send a step to every stage, run stage 0 on it, post the logits receive."""
        for q in self._cmd_qs:
            q.put(("step", plan))
        x = self._stage.forward(plan, None)
        self._sends.add(dist.isend(x, dst=1, group=self._fwd[0]), x)
        if not plan.rows:
            return None, None
        buf = torch.empty(plan.rows, self.config.vocab_size, dtype=self.dtype,
                          device=self.device)
        return dist.irecv(buf, src=self.num_stages - 1, group=self._ret), buf

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

    def _finish(self, g: _Group) -> None:
        assert g.inflight is not None
        work, buf = g.inflight
        if work is not None:
            self._wait(work)
        logits = buf if buf is not None else torch.empty(
            0, self.config.vocab_size, dtype=self.dtype, device=self.device)
        g.inflight = None
        # Sampling on a side stream: its host sync then waits for this step's logits
        # only, not for the stage-0 work of the next micro-batch already queued.
        with torch.cuda.stream(self._side) if self._side is not None else \
                contextlib.nullcontext():
            g.consume(logits)
        aborts, g.deferred_aborts = g.deferred_aborts, []
        for rid in aborts:
            g.abort(rid)

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
            g.launch()
        return self._collect()

    def _collect(self) -> list[RequestOutput]:
        out, self._outputs = self._outputs, []
        for g in self._groups:
            if g._outputs:
                out.extend(g._outputs)
                g._outputs = []
        for o in out:
            where = self._where.pop(o.request_id, None)
            if where is not None:
                where[0].load -= where[1]
        return out

    # -- requests ------------------------------------------------------------------------

    def _pick(self) -> _Group:
        return min(self._groups, key=lambda g: g.load)

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | Mapping[str, Any] | None = None,
        arrival: float | None = None,
    ) -> None:
        """Queue a request (on the least loaded micro-batch). Raises ``ValueError``
        naming the field for a bad one."""
        self._guard()
        if isinstance(request_id, str) and request_id in self._where:
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        params = as_params(params)
        if params.seed is None:
            # One seed stream for the whole engine, as a one-GPU engine draws them.
            params = dataclasses.replace(params, seed=self._rng.getrandbits(63))
        g = self._pick()
        g.add_request(request_id, prompt, params, arrival)
        req = g._requests[request_id]
        load = len(req.prompt) + params.max_tokens * params.n
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
            return g.abort(request_id)
        req = g._requests.get(request_id)
        if req is None or req.done:
            return False
        g.deferred_aborts.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        """Raises :class:`PipelineError` once a stage has failed: a caller that only
        polls this (an idle worker loop) must not spin on a broken engine."""
        if self._broken is not None:
            raise PipelineError(self._broken)
        return bool(self._outputs) or any(
            g.inflight is not None or g.has_unfinished() for g in self._groups)

    def num_unfinished(self) -> int:
        return sum(g.num_unfinished() for g in self._groups)

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for g in self._groups:
            for k, v in g.stats.items():
                total[k] = total.get(k, 0) + v
        total["graph_steps"] = self._stage.graph_steps  # stage 0's; the others match
        return total

    def capture_graphs(self) -> int:
        """Capture every stage's decode graphs now instead of on first use (as
        :meth:`Engine.capture_graphs`). Returns how many rank 0 holds."""
        self._guard()
        if self._stage.graphs is None:
            return 0
        with self._failing():
            for q in self._cmd_qs:
                q.put(("capture",))
            count = self._stage.graphs.capture_all()
            for r in range(1, self.num_stages):
                self._expect(r, "captured", 1800.0)
        return count

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
        return run_to_completion(self, prompts, params)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ScoreResult]:
        """Log-likelihood of each continuation given its context (as :meth:`Engine.score`)."""
        self._guard()
        tag = f"_score{self._rng.getrandbits(40):x}_"
        todo: list[tuple[str, _Group, int]] = []
        for i, pair in enumerate(pairs):
            ctx, cont, inp = score_pair(i, pair, self.max_position, self.config.vocab_size)
            g = self._pick()
            g._check_fits(len(inp), f"pairs[{i}]")
            rid = f"{tag}{i}"
            g.enqueue_score(rid, inp, ctx, cont)
            g.load += len(inp)
            todo.append((rid, g, len(inp)))
        others: list[RequestOutput] = []
        while any(rid not in g._scores for rid, g, _ in todo):
            others.extend(self.step())
        self._outputs = others + self._outputs
        results = []
        for rid, g, load in todo:
            g.load -= load
            results.append(g._scores.pop(rid))
        return results

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


__all__ = ["PipelineEngine", "PipelineError", "StageRuntime", "StepPlan"]
