"""The worker process's machinery around one engine.

Threads, each with one job:

- :class:`EngineLoop` owns the engine (engines are single-threaded): it admits requests
  submitted by chunk tasks, steps while anything is unfinished, aborts on request, and
  hands finished outputs to the writer. Because every in-flight chunk submits into this
  one loop, the running batch mixes sequences from several chunks (and batches): when
  one chunk's last sequences are finishing, the next chunk's are already running.
- :class:`ResultWriter` turns outputs into result rows and commits them in batches
  (insert-if-absent + counters, one transaction), retrying through database outages;
  an item's future resolves only after its row is committed.
- :class:`Control` polls the store for cancelled batches (every ``cancel_poll_interval``),
  heartbeats the worker row, refreshes the broker's visibility timestamps of the
  messages this worker holds, and shares other workers' tails (below).

:class:`WorkerRuntime` ties them together and runs one chunk (:meth:`run_chunk`), which
is what the Celery task calls from a pool thread.

Several workers, one batch. A chunk task claims its items in the store a few at a time,
as the engine has room (:class:`Room`: a quarter more sequences than the engine runs at
once, and a tenth more tokens than its KV cache holds, counting each item at its final
size), not all at once: the rest of its range stays ``queued``. Claims take the costliest
items first, so long items start early and a batch ends with short ones. A worker with
room and an empty queue claims queued items of chunks other workers hold
(:meth:`WorkerRuntime.share_tail`, every ``cancel_poll_interval``), so no worker idles
while another drains a long tail. A
chunk is acknowledged when every item of its range has a result, whoever ran it; items
claimed by a worker whose heartbeat stopped are taken over by the chunk's holder
(store/claims.py). Results stay insert-if-absent, so exactly-once does not depend on
claims being perfect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine as SQLEngine
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from core.jsonl import ECHO, SAMPLING_DEFAULTS
from core.payloads import ChunkPayload
from core.settings import Settings
from models.chat import ChatTemplate, ChatTemplateError, load_chat_template
from models.engine.pipeline import PipelineError
from models.engine.protocol import InferenceEngine
from models.engine.scheduler import INTERACTIVE
from specs.status import STOPPED, BatchStatus, ItemStatus, WorkerStatus
from store.claims import (
    ClaimedItem,
    claim_range,
    claim_unstarted,
    fair_share,
    release_items,
    release_worker,
    unfinished_in_range,
)
from store.db import session_scope
from store.queries import (
    CHAT_MESSAGES,
    PROMPT_TOKEN_IDS,
    cancelling_batch_ids,
    finalize_if_done,
    finish_cancel,
    get_batch,
    heartbeat,
    insert_results,
    mark_lost_workers,
    register_worker,
)
from store.records import ResultRow
from store.registry import announce_model, batches_for
from store.tables import Batch
from worker import broker
from worker.interactive import Echo, InteractiveJob, InteractiveLane, describe_entries
from worker.meter import BUCKET, GenerationMeter

log = logging.getLogger("neoxq.worker")

# Outcomes of one item in this process.
WRITTEN = "written"  # its result row is committed (by us or, before, by someone else)
ABORTED = "aborted"  # stopped in the engine (cancel, hand-back); nothing written
TRANSIENT = "transient"  # the engine or the store failed; the chunk should be retried

# Exit status of a worker whose engine died (EX_SOFTWARE): supervisors restart it.
FATAL_EXIT_CODE = 70


class HandBack(Exception):
    """The worker is shutting down: the chunk goes back to the queue unfinished."""


class Retry(Exception):
    """A transient failure: run the chunk again later."""


@dataclass(eq=False)
class _Pending:
    item_id: int
    batch_id: str
    index: int
    prompt: str | list[int]
    params: dict[str, Any]
    queued_at: float | None
    attempt: int
    futures: list[Future] = field(default_factory=list)
    # OpenAI's echo: the prompt's text and per-token logprobs, put before the completion.
    echo: Echo | None = None
    error: tuple[str, str] | None = None  # (code, message): refused before the engine

    @property
    def request_id(self) -> str:
        return str(self.item_id)


def _cost(items: Sequence[ClaimedItem]) -> int:
    """The tokens claimed items may hold in the KV cache (their costs, store/claims.py)."""
    return sum(c[7] for c in items)


def _resolve(futures: Sequence[Future], outcome: str) -> None:
    for f in futures:
        if not f.done():
            f.set_result(outcome)


# ------------------------------------------------------------------------------ writer


class ResultWriter(threading.Thread):
    """Commits result rows in batches: up to ``max_rows`` or every ``max_delay`` seconds,
    whichever comes first, so results land as sequences finish without one transaction
    per sequence."""

    def __init__(self, db: SQLEngine, *, max_rows: int = 512, max_delay: float = 0.1,
                 on_written: Callable[[list[ResultRow]], None] | None = None) -> None:
        super().__init__(name="neoxq-writer", daemon=True)
        self.db = db
        self.max_rows, self.max_delay = max_rows, max_delay
        self.on_written = on_written
        self.inbox: queue.Queue[tuple[ResultRow, list[Future]] | None] = queue.Queue()
        self._stop_evt = threading.Event()

    def put(self, row: ResultRow, futures: list[Future]) -> None:
        self.inbox.put((row, futures))

    def stop(self) -> None:
        self._stop_evt.set()
        self.inbox.put(None)

    def run(self) -> None:
        while True:
            first = self.inbox.get()
            if first is None:
                if self.inbox.empty():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_delay
            while len(batch) < self.max_rows:
                try:
                    nxt = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.inbox.put(None)  # keep the stop marker for the outer loop
                    break
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[tuple[ResultRow, list[Future]]]) -> None:
        rows: dict[int, ResultRow] = {}
        for row, _ in batch:
            rows.setdefault(row.item_id, row)  # one row per item in one statement
        delay = 0.2
        while True:
            try:
                with session_scope(self.db) as session:
                    inserted = insert_results(session=session, rows=list(rows.values()))
                break
            except IntegrityError:
                # Not an outage: some row cannot go in (its item was deleted with its
                # batch). Write the rows one by one and drop those that fail.
                inserted = self._write_each(list(rows.values()))
                break
            except (OperationalError, DBAPIError) as exc:
                # The database restarted or dropped us: the transaction rolled back, the
                # pool replaces dead connections (pre_ping); try again. Nothing was
                # counted, and insert-if-absent makes the retry safe.
                if self._stop_evt.is_set() and delay > 5:
                    log.error("giving up writing %d results: %s", len(rows), exc)
                    for _, futs in batch:
                        _resolve(futs, TRANSIENT)
                    return
                log.warning("result write failed (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.on_written:
            new = set(inserted)
            self.on_written([r for r in rows.values() if r.item_id in new])
        for _, futs in batch:
            _resolve(futs, WRITTEN)

    def _write_each(self, rows: list[ResultRow]) -> list[int]:
        inserted: list[int] = []
        for row in rows:
            try:
                with session_scope(self.db) as session:
                    inserted += insert_results(session=session, rows=[row])
            except IntegrityError as exc:
                log.error("result of item %s dropped: %s", row.item_id, exc.orig)
        return inserted


# ------------------------------------------------------------------------- engine loop


class EngineLoop(threading.Thread):
    """The only thread that touches the engine."""

    def __init__(self, engine: InferenceEngine, writer: ResultWriter, *, worker_id: str,
                 exit_on_fatal: bool = False) -> None:
        super().__init__(name="neoxq-engine", daemon=True)
        # The `neoxq worker` process exits when its engine dies; in-process users (tests,
        # benchmarks) read `error` instead.
        self.exit_on_fatal = exit_on_fatal
        self.engine = engine
        self.writer = writer
        self.worker_id = worker_id
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.pending: dict[str, _Pending] = {}  # request id -> item in the engine
        self._lock = threading.Lock()  # guards `pending` against submit()'s dedupe check
        self._stop_evt = threading.Event()
        self.error: BaseException | None = None
        # Where the loop's time goes: stepping the engine vs everything else (admitting,
        # dispatching, waiting for the GIL), logged at shutdown.
        self.steps = 0
        self.step_seconds = 0.0
        self.started = time.monotonic()
        # The engine's counters after its last step (prefix-cache hit rate, ...): other
        # threads (heartbeat, metrics) read this copy, never the engine.
        self.engine_stats: dict[str, float] = {}
        # Tokens counted as the engine generates them (every tokens/s neoxq shows).
        self.meter = GenerationMeter()
        self._observed = 0.0
        # Requests in the engine that have not generated a token yet (waiting for room,
        # or prefilling), as of the last observation: claims read it (Room.starved).
        self.unstarted = 0
        # Synchronous requests in the engine (worker/interactive.py), by request id.
        self.interactive: dict[str, InteractiveJob] = {}
        # Requests with OpenAI's echo, scored together once the inbox is drained.
        self._echoes: list[tuple[_Pending | InteractiveJob, dict[str, Any], str]] = []

    # -- called from other threads --------------------------------------------------------

    def submit(self, items: Sequence[_Pending]) -> list[Future]:
        """Queue items for the engine; one future per item resolving to an outcome. An
        item already in the engine (a redelivered chunk) shares the running request."""
        futures = []
        with self._lock:
            for it in items:
                fut: Future = Future()
                futures.append(fut)
                running = self.pending.get(it.request_id)
                if running is not None:
                    running.futures.append(fut)
                    continue
                it.futures.append(fut)
                self.pending[it.request_id] = it
                self.inbox.put(("add", it))
                self.unstarted += 1  # until the loop's next count
        return futures

    def submit_interactive(self, job: InteractiveJob) -> None:
        """Queue a synchronous request for the engine, ahead of batch work."""
        self.inbox.put(("interactive", job))

    def abort(self, *, batch_ids: Sequence[str] = (), request_ids: Sequence[str] = ()) -> None:
        """Abort every sequence of ``batch_ids`` and the given requests (asynchronously)."""
        self.inbox.put(("abort", (tuple(batch_ids), tuple(request_ids))))

    def active_batches(self) -> set[str]:
        with self._lock:
            return {p.batch_id for p in self.pending.values()}

    def stop(self) -> None:
        self._stop_evt.set()
        self.inbox.put(("wake", None))

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting chunk
            self.error = exc
            log.exception("engine loop died")
            with self._lock:
                for p in self.pending.values():
                    _resolve(p.futures, TRANSIENT)
                self.pending.clear()
            self._fail_interactive("the worker's engine failed")
            if self.exit_on_fatal:
                # The engine is gone (a pipeline stage died, the device failed): a worker
                # without an engine must not keep taking chunks. Exit non-zero at once, as
                # a SIGKILL would: unacknowledged chunks are redelivered (acks_late) and
                # finished items are skipped, so nothing is lost or duplicated.
                logging.shutdown()
                os._exit(FATAL_EXIT_CODE)

    def _run(self) -> None:
        engine = self.engine
        last_check = time.monotonic()
        while not self._stop_evt.is_set():
            busy = engine.has_unfinished()
            try:  # block only when the engine has nothing to do
                cmd = self.inbox.get(timeout=0.05) if not busy else self.inbox.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._command(*cmd)
                try:
                    cmd = self.inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._echoes:
                self._run_echoes()
            if not engine.has_unfinished():
                self.unstarted = 0
                # Idle: still notice a dead pipeline stage within a second or so, not only
                # when the next chunk arrives.
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    engine.check_health()
                continue
            t0 = time.perf_counter()
            try:
                outputs = engine.step()
            except PipelineError:
                raise  # a dead stage cannot be retried in this process
            except Exception:  # noqa: BLE001 - e.g. CUDA OOM: transient for every request
                log.exception("engine step failed; aborting the running requests")
                self._fail_all()
                continue
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0
            self.engine_stats = engine.stats
            for out in outputs:
                self._finished(out)
            if self.interactive:
                self._progress()
            if time.monotonic() - self._observed >= BUCKET:
                # Not every step: the engine's count walks its running requests.
                self._observed = time.monotonic()
                generated = engine.generated_tokens()
                self.meter.observe(generated)
                # (+ what waits in the inbox: submitted during the step)
                self.unstarted = sum(1 for n in generated.values() if n == 0) \
                    + self.inbox.qsize()

    def _command(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self._add(arg)
        elif kind == "interactive":
            self._add_interactive(arg)
        elif kind == "abort":
            batch_ids, request_ids = arg
            for rid in request_ids:
                job = self.interactive.get(rid)
                if job is not None and not self.engine.abort(rid):
                    del self.interactive[rid]
                    self.meter.forget(rid)
                    job.aborted()
            with self._lock:
                targets = [rid for rid, p in self.pending.items()
                           if p.batch_id in batch_ids or rid in request_ids]
            for rid in targets:
                if not self.engine.abort(rid):  # not in the engine (yet): drop it here
                    with self._lock:
                        p = self.pending.pop(rid, None)
                    if p is not None:
                        _resolve(p.futures, ABORTED)

    def _add(self, p: _Pending) -> None:
        params = dict(p.params)
        if p.error is not None:
            self._write_error(p, *p.error)
            return
        echo = params.pop(ECHO, None)
        if echo:
            self._echoes.append((p, params, echo))
            return
        try:
            self.engine.add_request(p.request_id, p.prompt, params, arrival=time.time())
            self.meter.track(p.request_id, p.batch_id, _budget(params))
        except ValueError as exc:
            # A bad request (prompt longer than the context, bad parameter): an item
            # error, written like a result; the rest of the batch goes on.
            self._write_error(p, "invalid_request", str(exc))
        except Exception as exc:  # noqa: BLE001 - anything else is this item's failure too
            log.exception("add_request failed for item %s", p.item_id)
            self._write_error(p, "invalid_request", f"{type(exc).__name__}: {exc}")

    def _add_interactive(self, job: InteractiveJob) -> None:
        echo = job.params.pop(ECHO, None)
        if echo:
            self._echoes.append((job, job.params, echo))
            return
        self._start_interactive(job)

    def _start_interactive(self, job: InteractiveJob) -> None:
        try:
            self.engine.add_request(job.request_id, job.prompt, job.params,
                                    arrival=time.time(), priority=INTERACTIVE)
        except ValueError as exc:
            job.failed("invalid_request", str(exc), 400)
            return
        except Exception as exc:  # noqa: BLE001 - this request's failure, not the loop's
            log.exception("add_request failed for interactive request %s", job.request_id)
            job.failed("invalid_request", f"{type(exc).__name__}: {exc}", 400)
            return
        self.interactive[job.request_id] = job
        self.meter.track(job.request_id, None)

    def _run_echoes(self) -> None:
        """Score the prompts of echo requests, all in one engine call (an evaluation
        batch is thousands of them): ``score`` requests end here with the prompt's
        logprobs; the others then generate, and their prompt comes first in the result."""
        todo, self._echoes = self._echoes, []
        engine = self.engine
        ready = []
        for x, params, mode in todo:
            try:
                ids = echo_ids(x.prompt, engine)
            except ValueError as exc:
                self._echo_failed(x, str(exc))
                continue
            ready.append((x, params, mode, ids))
        scored = [r for r in ready if len(r[3]) > 1]
        results = iter(engine.score([(ids[:1], ids[1:]) for *_, ids in scored]))
        now = time.time()
        for x, params, mode, ids in ready:
            res = next(results) if len(ids) > 1 else None
            text = x.prompt if isinstance(x.prompt, str) else (
                engine.tokenizer.decode(ids) if engine.tokenizer is not None else "")
            entries = None
            if params.get("logprobs") is not None:
                entries = [{"token_id": ids[0], "logprob": None, "top": []}]
                if res is not None:
                    k = params["logprobs"]
                    entries += [{"token_id": t, "logprob": lp,
                                 "top": [[top[0], top[1]]] if k else []}
                                for t, lp, top in zip(ids[1:], res.token_logprobs, res.top,
                                                      strict=True)]
            echo = Echo(text=text, logprobs=entries, prompt_tokens=len(ids))
            if isinstance(x, InteractiveJob):
                x.echo = echo
                if mode == "score":
                    x.scored(engine.tokenizer)
                else:
                    self._start_interactive(x)
                continue
            x.echo = echo
            if mode == "score":
                with self._lock:
                    self.pending.pop(x.request_id, None)
                choice = {"index": 0, "text": text, "finish_reason": "length",
                          "logprobs": describe_entries(engine.tokenizer, entries)}
                self.writer.put(_row(x, self.worker_id, choices=[choice], text=text,
                                     finish_reason="length", prompt_tokens=len(ids),
                                     completion_tokens=0, logprobs=choice["logprobs"],
                                     started_at=now,
                                     finished_at=time.time()), x.futures)
            else:
                x.params = params
                self._add(x)

    def _echo_failed(self, x: _Pending | InteractiveJob, message: str) -> None:
        if isinstance(x, InteractiveJob):
            x.failed("invalid_request", message, 400)
        else:
            self._write_error(x, "invalid_request", message)

    def _progress(self) -> None:
        """Hand each streaming request the text its samples have settled so far."""
        for rid, job in self.interactive.items():
            if job.stream:
                part = self.engine.partial(rid)
                if part:
                    job.progress(part, self.engine.tokenizer)

    def _fail_interactive(self, message: str) -> None:
        jobs, self.interactive = list(self.interactive.values()), {}
        for job in jobs:
            self.meter.forget(job.request_id)
            job.failed("engine_error", message, 503)

    def _write_error(self, p: _Pending, code: str, message: str) -> None:
        with self._lock:
            self.pending.pop(p.request_id, None)
        t = time.time()
        self.writer.put(_row(p, self.worker_id, error={"code": code, "message": message},
                             finished_at=t), p.futures)

    def _finished(self, out: Any) -> None:
        self.meter.finish(out.request_id, out.completion_tokens)
        job = self.interactive.pop(out.request_id, None)
        if job is not None:
            job.finished(out, self.engine.tokenizer)
            return
        with self._lock:
            p = self.pending.pop(out.request_id, None)
        if p is None:
            return
        if any(s.finish_reason == "abort" for s in out.samples):
            _resolve(p.futures, ABORTED)
            return
        if out.error:
            self.writer.put(_row(p, self.worker_id, error={"code": "engine_error",
                                                           "message": out.error},
                                 finished_at=out.timings.finished or time.time()), p.futures)
            return
        self.writer.put(_output_row(p, out, self.worker_id, self.engine.tokenizer), p.futures)

    def _fail_all(self) -> None:
        for rid in self.interactive:
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
        self._fail_interactive("the engine step failed")
        with self._lock:
            pending, self.pending = list(self.pending.values()), {}
        for p in pending:
            self.meter.forget(p.request_id)
            try:
                self.engine.abort(p.request_id)
            except Exception:  # noqa: BLE001
                pass
            _resolve(p.futures, TRANSIENT)
        try:
            self.engine.step()  # collect the aborted outputs so the engine is empty again
        except Exception:  # noqa: BLE001
            log.exception("engine did not recover after a failed step")


def _budget(params: dict[str, Any]) -> int:
    """The most tokens a request may generate: its max_tokens times its samples."""
    return int(params.get("max_tokens") or SAMPLING_DEFAULTS["max_tokens"]) * int(
        params.get("n") or 1)


def _row(p: _Pending, worker_id: str, **values: Any) -> ResultRow:
    """The result row of ``p`` (an error, unless ``values`` say otherwise)."""
    return ResultRow(item_id=p.item_id, batch_id=p.batch_id, index=p.index,
                     queued_at=p.queued_at, worker_id=worker_id, attempt=p.attempt, **values)


def echo_ids(prompt: str | list[int], engine: InferenceEngine) -> list[int]:
    """An echo request's prompt as token ids, checked as the engine's score() will."""
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise ValueError("prompt: this worker has no tokenizer; pass token ids")
        ids = list(engine.tokenizer.encode(prompt))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt: must have at least one token")
    bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
    if bad:
        raise ValueError(f"prompt: token id {bad[0]} outside the model's vocabulary")
    if len(ids) - 1 > engine.max_position:
        raise ValueError(f"prompt: {len(ids)} tokens exceed the model's context of "
                         f"{engine.max_position} + 1")
    return ids


def _output_row(p: _Pending, out: Any, worker_id: str, tokenizer: Any = None) -> ResultRow:
    t = out.timings
    choices = [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason,
                "logprobs": s.logprobs} for s in out.samples]
    if p.echo is not None:
        choices = [p.echo.before(c) for c in choices]
    for c in choices:  # token texts and bytes, which the API (no tokenizer) cannot add
        c["logprobs"] = describe_entries(tokenizer, c["logprobs"])
    completion = sum(len(s.token_ids) for s in out.samples)
    started, finished = t.first_scheduled, t.finished or time.time()
    span = finished - started if started else 0.0
    return _row(
        p, worker_id, choices=choices, text=choices[0]["text"] if choices else "",
        finish_reason=choices[0]["finish_reason"] if choices else None,
        prompt_tokens=out.prompt_tokens or (p.echo.prompt_tokens if p.echo else 0),
        completion_tokens=completion,
        logprobs=choices[0]["logprobs"] if choices else None,
        started_at=started, first_token_at=t.first_token, finished_at=finished,
        tokens_per_s=completion / span if span > 0 else None,
    )


# ----------------------------------------------------------------------------- control


class Control(threading.Thread):
    """Cancellation polling, heartbeats, and refreshing held messages' visibility."""

    def __init__(self, rt: WorkerRuntime) -> None:
        super().__init__(name="neoxq-control", daemon=True)
        self.rt = rt
        self._stop_evt = threading.Event()

    def stop(self) -> None:
        self._stop_evt.set()

    def run(self) -> None:
        s = self.rt.settings
        next_beat = next_touch = 0.0
        next_sweep = time.monotonic() + s.reconcile_interval
        # Held messages are refreshed at the heartbeat's pace: their index time is this
        # worker's heartbeat as the broker sees it (worker/broker.py), and a message not
        # refreshed for `dead_worker_after` is taken for a dead worker's.
        touch_every = min(s.heartbeat_interval, s.dead_worker_after / 3)
        while not self._stop_evt.wait(s.cancel_poll_interval):
            now = time.monotonic()
            beat = now >= next_beat
            if beat:
                next_beat = now + s.heartbeat_interval
            if self.rt.warming:
                # Only alive while the engine warms up: no work is taken or given back.
                if beat:
                    _attempt("heartbeat", self.rt.beat)
                continue
            _attempt("cancellation poll", self.rt.poll_cancellations)
            _attempt("sharing a batch's tail", self.rt.release_unfinished, self.rt.share_tail)
            if beat:
                _attempt("heartbeat", self.rt.beat)
            if now >= next_touch:
                next_touch = now + touch_every
                _attempt("refreshing or restoring messages", self.rt.touch_messages,
                         self.rt.restore_dead_workers_chunks)
            if now >= next_sweep:
                next_sweep = now + s.reconcile_interval
                _attempt("reconciling store and queue", self.rt.reconcile)


def _attempt(what: str, *steps: Callable[[], object]) -> None:
    """Run ``steps`` in order; a failure (a database or Redis hiccup) is logged and the
    control loop tries again at its next turn."""
    try:
        for step in steps:
            step()
    except Exception as exc:  # noqa: BLE001 - anything: the loop must keep running
        log.warning("%s failed: %s", what, exc)


# ----------------------------------------------------------------------------- runtime


def _wait_any(mine: list[tuple[str, Future]], timeout: float) -> None:
    """Wait until one of our unfinished items finishes, at most ``timeout`` s."""
    running = [f for _, f in mine if not f.done()]
    if running:
        wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
    else:
        time.sleep(timeout)


# Tokens a worker claims beyond what its KV cache holds (items at prompt + max_tokens):
# enough that a finished sequence's place is taken while the next claim is made, little
# enough that the rest of a batch stays queued, where an idle worker can take it.
TOKEN_SLACK = 1.1


def in_flight_tokens(engine: InferenceEngine) -> int:
    """The tokens of items (prompt + max_tokens x n each) one worker claims into its
    engine at once: :data:`TOKEN_SLACK` times what its KV cache holds."""
    return int(engine.cache_tokens * TOKEN_SLACK)


def in_flight_limit(engine: InferenceEngine, settings: Settings) -> int:
    """How many items one worker claims into its engine at once (``Room``'s size):
    ``NEOXQ_WORKER_MAX_IN_FLIGHT``, or a quarter more than the engine runs at once -
    enough that the engine never waits for a claim, few enough that the rest of a chunk
    stays queued for idle workers. Sized by the sequences the engine runs at once
    (``max_num_seqs`` per micro-batch, times its micro-batches)."""
    if settings.worker_max_in_flight:
        return settings.worker_max_in_flight
    seqs = engine.max_num_seqs * engine.micro_batches
    return max(8, seqs + seqs // 4)


class Room:
    """How many more items - and tokens of items - this worker's engine may be given: a
    counting semaphore of two resources that hands out several units at once. Chunk
    threads (and the tail sharer) take slots and tokens before claiming items, give back
    what the claim did not use, and each finished item gives back its slot and its cost;
    so items are claimed as the engine has room for them and the rest stay queued, where
    idle workers can take them."""

    def __init__(self, size: int, tokens: int | None = None,
                 starved: Callable[[], bool] | None = None) -> None:
        self.size = size
        self.free = size
        self.tokens = tokens if tokens is not None else 1 << 62  # None: no token bound
        self.tokens_free = self.tokens
        # Whether the engine has started everything it was given: then a claim's worth of
        # tokens more may be taken beyond the budget. Costs count prompts whole, and a
        # shared prompt prefix is held once in the cache, so an engine may run more than
        # the budget says; it grows until items wait in the engine.
        self.starved = starved or (lambda: False)
        self.waiting = 0  # chunk threads waiting for room
        self._cv = threading.Condition()

    @property
    def least_tokens(self) -> int:
        """Tokens worth a claim: an eighth of the budget (one claim per finished short
        item would be wasteful)."""
        return max(1, self.tokens // 8)

    def take(self, most: int, *, least: int = 1, timeout: float = 0.0) -> tuple[int, int]:
        """Up to ``most`` slots and the free tokens, waiting up to ``timeout`` s for at
        least ``least`` slots and :attr:`least_tokens` tokens (or, while the engine is
        :attr:`starved`, that many beyond the budget). Returns (slots, tokens); (0, 0) on
        a timeout."""
        least = max(1, min(least, most, self.size))
        with self._cv:
            self.waiting += 1
            try:
                if not self._cv.wait_for(lambda: self.free >= least and self._tokens_ready(),
                                         timeout=timeout):
                    return 0, 0
                n, t = min(most, self.free), max(self.tokens_free, self.least_tokens)
                self.free -= n
                self.tokens_free -= t
                return n, t
            finally:
                self.waiting -= 1

    def _tokens_ready(self) -> bool:
        return self.tokens_free >= self.least_tokens or self.tokens_free == self.tokens \
            or self.starved()

    def give(self, n: int, tokens: int = 0) -> None:
        """Give back ``n`` slots and ``tokens`` (negative: a claim used more tokens than
        it was given, as a first item costlier than the free tokens may)."""
        if n or tokens:
            with self._cv:
                self.free += n
                self.tokens_free += tokens
                self._cv.notify_all()

    def has_room(self, least: int) -> bool:
        """Whether ``least`` slots and a claim's worth of tokens are free now."""
        with self._cv:
            return self.free >= least and self._tokens_ready()


class WorkerRuntime:
    """Everything a worker process holds for its whole life: one engine, its loop, the
    result writer, the control thread and counters."""

    def __init__(self, engine: InferenceEngine, db: SQLEngine, settings: Settings, *,
                 worker_id: str | None = None, model: str = "",
                 devices: Sequence[str] = (), pipeline_parallel: int = 1,
                 exit_on_fatal: bool = False, chat_template: ChatTemplate | None = None,
                 checkpoint: str | None = None, dtype: str | None = None,
                 warm_up: bool = False) -> None:
        # ``model``: the name this worker serves (its batches name it; settings.queue is
        # that model's queue); ``checkpoint`` and ``dtype``: what it loaded. ``warm_up``:
        # :meth:`start` warms the engine up (models/engine/warmup.py) before returning.
        self.settings = settings
        self.warm_up = warm_up
        self.warming = False
        self.warmup_seconds: float | None = None
        # Chat lines' messages become prompts here, with the checkpoint's template.
        self.chat_template = chat_template or load_chat_template(None)
        self.db = db
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.model, self.devices, self.pipeline_parallel = model, list(devices), pipeline_parallel
        self.checkpoint, self.dtype = checkpoint, dtype
        self.items_done = 0
        self.tokens_done = 0
        self.tokens_per_s = 0.0  # the meter's, as of the last heartbeat
        self._stats_lock = threading.Lock()
        self.writer = ResultWriter(db, on_written=self._count)
        self.loop = EngineLoop(engine, self.writer, worker_id=self.worker_id,
                               exit_on_fatal=exit_on_fatal)
        self.control = Control(self)
        # Synchronous requests, popped from their own Redis list ahead of batch work.
        # Chats are rendered with the same template as chat lines of a batch.
        self.lane = InteractiveLane(settings, self.loop, worker_id=self.worker_id,
                                    render_chat=self.chat_template.render)
        self.draining_since: float | None = None
        self._held_tasks: set[str] = set()  # Celery task ids of chunks running here
        self._ranges = 0  # chunks whose items are being claimed and run here
        self._held_lock = threading.Lock()
        self._redis: Any = None
        self._app: Any = None
        self.room = Room(in_flight_limit(engine, settings), in_flight_tokens(engine),
                         starved=lambda: self.loop.unstarted == 0)
        # Claims of items that ended without a result here (aborted, failed transiently),
        # given back by the control thread: (item id, whether the attempt counts).
        self._unclaim: list[tuple[int, bool]] = []
        self._unclaim_lock = threading.Lock()
        self.shared_items = 0  # items this worker took from chunks other workers hold
        self._shared: dict[str, list[Future]] = {}  # batch -> outcomes of items we took
        # Items of each batch claimed here and not finished, and each batch's fair share
        # per live worker (cached for a second: two COUNTs per claim would be wasteful).
        self._holding: dict[str, int] = {}
        self._shares: dict[str, tuple[float, int]] = {}
        self._holding_lock = threading.Lock()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        with session_scope(self.db) as session:
            register_worker(session=session, worker_id=self.worker_id,
                            host=socket.gethostname(), pid=os.getpid(), model=self.model,
                            devices=self.devices, pipeline_parallel=self.pipeline_parallel,
                            checkpoint=self.checkpoint, dtype=self.dtype)
            if self.model:
                announce_model(session=session, name=self.model, checkpoint=self.checkpoint)
            # A previous life under this id (killed) may have left claims: they are ours
            # to give back, since to others this id now looks alive again.
            release_worker(session=session, worker_id=self.worker_id)
        self.writer.start()
        if self.warm_up:
            self.warming = True
        # The control thread heartbeats from now on (while the engine warms up too, so
        # that a long warm-up never looks like a dead worker).
        self.control.start()
        if self.warm_up:
            self._warm_up()
        self.loop.start()
        self.lane.start()
        self.beat(WorkerStatus.RUNNING)

    def _warm_up(self) -> None:
        """Warm the engine up before anything is consumed (the engine loop is not running
        yet, so this thread may drive the engine): the first chunk then runs at steady
        speed instead of capturing graphs and compiling kernels inside its own time."""
        from models.engine.warmup import warm_up

        try:
            self.beat(WorkerStatus.WARMING)
            log.info("warming up the engine before consuming")
            report = warm_up(self.loop.engine)
            self.warmup_seconds = report.seconds
            log.info("%s", report.describe())
        except BaseException:
            log.exception("the engine failed while warming up")
            if self.loop.exit_on_fatal:
                # As when the engine dies later (EngineLoop.run): exit non-zero at once,
                # so that a supervisor restarts the worker.
                logging.shutdown()
                os._exit(FATAL_EXIT_CODE)
            raise
        finally:
            self.warming = False

    def begin_drain(self) -> None:
        """SIGTERM: take no new chunks; in-flight ones get ``shutdown_grace`` seconds."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.lane.paused = True
            log.info("draining: finishing in-flight chunks for up to %.0fs",
                     self.settings.shutdown_grace)

    def stop(self) -> None:
        self.lane.stop()
        self.control.stop()
        self.loop.stop()
        self.loop.join(timeout=10)
        life = time.monotonic() - self.loop.started
        log.info("engine loop: %d steps, %.1fs stepping of %.1fs alive; %d items (%d taken "
                 "from other workers' chunks), %d tokens", self.loop.steps,
                 self.loop.step_seconds, life, self.items_done, self.shared_items,
                 self.tokens_done)
        self.writer.stop()
        self.writer.join(timeout=30)
        try:
            # Whatever is still claimed here did not finish: hand it back (a stop is not
            # a failed attempt).
            with session_scope(self.db) as session:
                release_worker(session=session, worker_id=self.worker_id, uncount=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("giving back claimed items failed: %s", exc)
        try:
            self.beat(WorkerStatus.STOPPED)
        except Exception as exc:  # noqa: BLE001
            log.warning("final heartbeat failed: %s", exc)

    # -- one chunk -----------------------------------------------------------------------

    def run_chunk(self, payload: ChunkPayload, *, task_id: str | None = None) -> str:
        """Run items ``[start, end)`` of a batch that have no result yet; return when each
        has a committed result (or was cancelled). Raises :class:`HandBack` when the worker
        is shutting down and :class:`Retry` after a transient failure."""
        if task_id:
            # Held from the first moment: the chunk's message is refreshed at every
            # heartbeat while this runs, even while its first query waits on a lock.
            with self._held_lock:
                self._held_tasks.add(task_id)
        try:
            return self._run_chunk(payload)
        finally:
            if task_id:
                with self._held_lock:
                    self._held_tasks.discard(task_id)

    def _run_chunk(self, payload: ChunkPayload) -> str:
        if self.draining_since is not None:
            raise HandBack()
        with session_scope(self.db) as session:
            batch = get_batch(session=session, batch_id=payload.batch_id)
            if batch is None:
                log.warning("chunk for unknown batch %s dropped", payload.batch_id)
                return "unknown batch"
            if batch.status != BatchStatus.IN_PROGRESS:
                # Cancelled, failed, expired or done: nothing to run. (A cancelling batch
                # is finished by the control thread.)
                return f"batch {batch.status}"
            defaults = dict(batch.defaults or {})
        with self._held_lock:
            self._ranges += 1
        try:
            ran = self._run_range(payload, defaults)
        finally:
            with self._held_lock:
                self._ranges -= 1
        with session_scope(self.db) as session:
            final = finalize_if_done(session=session, batch_id=payload.batch_id)
        if final:
            log.info("batch %s %s", payload.batch_id, final)
        return f"{ran} items"

    def _run_range(self, payload: ChunkPayload, defaults: dict[str, Any]) -> int:
        """Claim the range's items as the engine has room, run them, then wait for the
        items other workers claimed; take over those whose worker is gone."""
        s = self.settings
        group = max(1, self.room.size // 8)
        mine: list[tuple[str, Future]] = []  # (request id, outcome) of items we run
        while True:
            if self.draining_since is not None:
                self._drain(mine)
            # No more than this worker's fair share of the batch at once: the rest stays
            # queued for the other workers, even when one engine could hold it all.
            want = min(payload.end - payload.start, self._allowed(payload.batch_id))
            slots, tokens = self.room.take(want, least=min(group, want), timeout=0.2) \
                if want > 0 else (0, 0)
            # The chunks held here take turns at the room, a share each per claim: each
            # claims its costliest items first, so the worker's longest items of all its
            # chunks start in its first wave, not chunk after chunk.
            turn = max(self.room.least_tokens, self.room.tokens // max(1, self._ranges))
            if tokens > turn:
                self.room.give(0, tokens - turn)
                tokens = turn
            claimed: list[ClaimedItem] = []
            if slots:
                try:
                    with session_scope(self.db) as session:
                        claimed = claim_range(
                            session=session, batch_id=payload.batch_id, start=payload.start,
                            end=payload.end, worker_id=self.worker_id, limit=slots,
                            live_within=s.dead_worker_after, max_cost=tokens)
                finally:
                    self.room.give(slots - len(claimed), tokens - _cost(claimed))
            if claimed:
                mine += self._run_claimed(claimed, {payload.batch_id: defaults})
                continue
            if any(f.done() and f.result() == TRANSIENT for _, f in mine):
                self._settle_all(mine)
                raise Retry()
            if not slots and any(not f.done() for _, f in mine):
                # No room in the engine (or our share is held): wait for one of ours.
                _wait_any(mine, 0.2)
                continue
            # Nothing left to claim: the rest of the range is done, ours in flight, or
            # claimed by live workers. Wait for it, taking over what a dead worker held.
            with session_scope(self.db) as session:
                status = session.scalar(select(Batch.status)
                                        .where(Batch.id == payload.batch_id))
                left = unfinished_in_range(session=session, batch_id=payload.batch_id,
                                           start=payload.start, end=payload.end)
            if status != BatchStatus.IN_PROGRESS or not left:
                # Cancelled meanwhile: the control thread aborts our sequences; wait for
                # them so the chunk ends with nothing of it left in the engine.
                self._settle_all(mine)
                return len(mine)
            _wait_any(mine, s.cancel_poll_interval)

    def _run_claimed(self, claimed: list[ClaimedItem],
                     defaults: dict[str, dict[str, Any]]) -> list[tuple[str, Future]]:
        """Submit claimed items to the engine (items out of attempts fail instead); one
        future per submitted item. Every item's slot comes back when its future
        resolves, and a claim that ends without a result is given back."""
        s = self.settings
        # Claiming counted this attempt: more than max_attempts means the item was tried
        # max_attempts times already (crashes, transient errors) - give up on it.
        exhausted = [c for c in claimed if c[6] > s.max_attempts]
        runnable = [c for c in claimed if c[6] <= s.max_attempts]
        if exhausted:
            self.room.give(len(exhausted), _cost(exhausted))
            self._fail_items(exhausted, "max_attempts",
                             f"gave up after {s.max_attempts} attempts")
        pending = [self._pending(c, defaults[c[1]]) for c in runnable]
        futures = self.loop.submit(pending) if pending else []
        with self._holding_lock:
            for p in pending:
                self._holding[p.batch_id] = self._holding.get(p.batch_id, 0) + 1
        for c, p, f in zip(runnable, pending, futures, strict=True):
            f.add_done_callback(lambda f, item_id=p.item_id, batch_id=p.batch_id, cost=c[7]:
                                self._settled(item_id, batch_id, f, cost))
        return [(p.request_id, f) for p, f in zip(pending, futures, strict=True)]

    def _allowed(self, batch_id: str) -> int:
        """How many more items of ``batch_id`` this worker may claim now: its fair share
        of the batch's unfinished items (per live worker) less what it holds."""
        t = time.monotonic()
        cached = self._shares.get(batch_id)
        if cached is None or t - cached[0] > 1.0:
            with session_scope(self.db) as session:
                share = fair_share(session=session, batch_id=batch_id,
                                   live_within=self.settings.dead_worker_after)
            cached = self._shares[batch_id] = (t, share)
        with self._holding_lock:
            held = self._holding.get(batch_id, 0)
        # Never below one group: a worker must always be able to make progress.
        return max(max(1, self.room.size // 8), cached[1]) - held

    def _settled(self, item_id: int, batch_id: str, fut: Future, cost: int = 0) -> None:
        # Runs on the engine or writer thread: no database work here.
        self.room.give(1, cost)
        with self._holding_lock:
            left = self._holding.get(batch_id, 1) - 1
            if left > 0:
                self._holding[batch_id] = left
            else:
                self._holding.pop(batch_id, None)
                self._shares.pop(batch_id, None)
        outcome = fut.result()
        if outcome != WRITTEN:
            with self._unclaim_lock:
                # Aborted on shutdown (handed back) does not count as an attempt; a
                # transient failure does.
                self._unclaim.append((item_id, outcome == ABORTED))

    def release_unfinished(self) -> None:
        """Give back claims of items that ended here without a result."""
        with self._unclaim_lock:
            todo, self._unclaim = self._unclaim, []
        if not todo:
            return
        try:
            with session_scope(self.db) as session:
                for uncount in (True, False):
                    release_items(session=session, worker_id=self.worker_id, uncount=uncount,
                                  item_ids=[i for i, u in todo if u == uncount])
        except Exception:
            with self._unclaim_lock:
                self._unclaim = todo + self._unclaim  # try again next time
            raise

    def _settle_all(self, mine: list[tuple[str, Future]], timeout: float = 30) -> None:
        wait([f for _, f in mine], timeout=timeout)
        with contextlib.suppress(Exception):
            self.release_unfinished()

    def _drain(self, mine: list[tuple[str, Future]]) -> None:
        """Shutting down: let our in-flight items finish within the grace period, then
        abort the rest and hand the chunk back (finished items are committed; the
        redelivered chunk skips them)."""
        grace = self.settings.shutdown_grace
        assert self.draining_since is not None
        while any(not f.done() for _, f in mine):
            if self.loop.error is not None or not self.loop.is_alive():
                raise Retry()
            if time.monotonic() - self.draining_since >= grace:
                break
            _wait_any(mine, 0.25)
        left = [rid for rid, f in mine if not f.done()]
        if left:
            self.loop.abort(request_ids=left)
        self._settle_all(mine, timeout=10)
        if any(f.done() and f.result() == TRANSIENT for _, f in mine):
            raise Retry()
        raise HandBack()

    def _pending(self, c: ClaimedItem, defaults: dict[str, Any]) -> _Pending:
        item_id, batch_id, index, prompt, item_params, queued_at, attempts, _ = c
        params = {**{k: v for k, v in defaults.items() if v is not None}, **(item_params or {})}
        ids: str | list[int] = params.pop(PROMPT_TOKEN_IDS, None) or prompt
        messages = params.pop(CHAT_MESSAGES, None)
        error = None
        if messages is not None:
            try:
                ids = self.chat_template.render(messages)
            except ChatTemplateError as exc:  # the template refuses this conversation
                error = ("invalid_messages", str(exc))
        return _Pending(item_id=item_id, batch_id=batch_id, index=index, prompt=ids,
                        params=params, queued_at=queued_at, attempt=attempts, error=error)

    # -- sharing the tail ------------------------------------------------------------------

    def share_tail(self) -> int:
        """When this worker has room and the queue is empty, claim queued items of chunks
        other workers hold (from the back of their batches) and run them here; returns how
        many. Without this, a worker that runs out of chunks idles while another drains
        the rest of a batch it took in large chunks."""
        self._finalize_shared()
        if not self.settings.worker_share_tail or self.draining_since is not None \
                or self.loop.error is not None:
            return 0
        group = max(1, self.room.size // 8)
        if self.room.waiting or not self.room.has_room(group):
            return 0  # our own chunks want the room, or there is little of it
        if broker.queue_length(self.redis, self.settings):
            return 0  # work is waiting in the queue: take it the ordinary way
        with session_scope(self.db) as session:
            # Take a live worker's share of what is queued, not all of it: the holders
            # keep their part, and several idle workers split the rest.
            share = fair_share(session=session, batch_id=None, status=ItemStatus.QUEUED,
                               live_within=self.settings.dead_worker_after)
        if not share:
            return 0
        slots, tokens = self.room.take(min(self.room.free, max(group, share)))
        claimed: list[ClaimedItem] = []
        try:
            with session_scope(self.db) as session:
                claimed = claim_unstarted(session=session, worker_id=self.worker_id,
                                          limit=slots, live_within=self.settings.dead_worker_after,
                                          batches=self._my_batches(), max_cost=tokens)
                batches = {c[1] for c in claimed}
                defaults: dict[str, dict[str, Any]] = {}
                if batches:
                    defaults = {b: dict(d or {}) for b, d in session.execute(
                        select(Batch.id, Batch.defaults).where(Batch.id.in_(batches)))}
        finally:
            self.room.give(slots - len(claimed), tokens - _cost(claimed))
        if claimed:
            log.info("sharing the tail: took %d queued items of batch(es) %s", len(claimed),
                     ", ".join(sorted({c[1] for c in claimed})))
            batch_of = {str(c[0]): c[1] for c in claimed}
            for c in claimed:
                self._shared.setdefault(c[1], [])
            for rid, f in self._run_claimed(claimed, defaults):
                self._shared[batch_of[rid]].append(f)
            with self._stats_lock:
                self.shared_items += len(claimed)
        return len(claimed)

    def _finalize_shared(self) -> None:
        """Finalize batches whose last items may have been ones we took: the holders of
        their chunks may all have finished before us."""
        for batch_id, futures in list(self._shared.items()):
            if all(f.done() for f in futures):
                del self._shared[batch_id]
                with session_scope(self.db) as session:
                    final = finalize_if_done(session=session, batch_id=batch_id)
                if final:
                    log.info("batch %s %s", batch_id, final)

    def _fail_items(self, items: Sequence[ClaimedItem], code: str, message: str) -> None:
        t = time.time()
        rows = [_row(_Pending(c[0], c[1], c[2], "", {}, c[5], c[6]), self.worker_id,
                     error={"code": code, "message": message}, finished_at=t)
                for c in items]
        with session_scope(self.db) as session:
            insert_results(session=session, rows=rows)

    # -- control ---------------------------------------------------------------------------

    def poll_cancellations(self) -> None:
        """Abort sequences of batches that were cancelled (or failed/expired), and finish
        pending cancellations: cancelling -> cancelled."""
        active = self.loop.active_batches()
        with session_scope(self.db) as session:
            stop = []
            if active:
                stop = list(session.scalars(select(Batch.id).where(
                    Batch.id.in_(active), Batch.status.in_(STOPPED))))
            cancelling = cancelling_batch_ids(session=session)
        if stop:
            log.info("aborting sequences of batches %s", stop)
            self.loop.abort(batch_ids=stop)
        for batch_id in cancelling:
            if batch_id in active:
                self._await_aborted(batch_id)
            with session_scope(self.db) as session:
                if finish_cancel(session=session, batch_id=batch_id):
                    log.info("batch %s cancelled", batch_id)

    def _await_aborted(self, batch_id: str, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while batch_id in self.loop.active_batches() and time.monotonic() < deadline:
            time.sleep(0.02)

    def beat(self, status: str | None = None) -> None:
        """Refresh this worker's row: liveness, generated tokens/s (in all and per batch,
        from :class:`worker.meter.GenerationMeter`), totals."""
        snap = self.loop.meter.snapshot()
        with self._stats_lock:
            self.tokens_per_s = snap.tokens_per_s
            values = (self.tokens_per_s, self.items_done, self.tokens_done)
        if status is None:
            if self.warming:
                status = WorkerStatus.WARMING
            elif self.draining_since is not None:
                status = WorkerStatus.DRAINING
            else:
                status = WorkerStatus.BUSY if self.loop.active_batches() else WorkerStatus.IDLE
        with session_scope(self.db) as session:
            heartbeat(session=session, worker_id=self.worker_id, status=status,
                      tokens_per_s=values[0], items_done=values[1], tokens_done=values[2],
                      prefix_cache_hit_rate=self.loop.engine_stats.get(
                          "prefix_cache_hit_rate", 0.0),
                      batch_rates=snap.batch_rates(), warmup_seconds=self.warmup_seconds)

    def _count(self, rows: list[ResultRow]) -> None:
        with self._stats_lock:
            self.items_done += len(rows)
            tokens = sum(r.completion_tokens for r in rows)
            self.tokens_done += tokens

    @property
    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.settings.redis_url)
        return self._redis

    def reconcile(self, *, now: bool = False) -> int:
        """Re-enqueue items that no message covers any more (worker/reconcile.py): at
        most once per ``reconcile_interval`` across the fleet, or at once with ``now``."""
        from core.celery_app import enqueue_chunk, make_celery
        from worker.reconcile import reconcile, reconcile_locked

        if self._app is None:
            self._app = make_celery(self.settings)
        # Every batch swept is this worker's model's: its chunks go back to our own queue.
        app, q = self._app, self.settings.queue
        sweep = reconcile if now else reconcile_locked
        return sweep(self.db, self.redis, self.settings,
                     lambda p: enqueue_chunk(p, app=app, queue=q), model=self.model or None)

    def _my_batches(self) -> Any:
        """The batches this worker may run: its model's (all of them when it names none)."""
        return batches_for(self.model, self.settings.model_name) if self.model else None

    def touch_messages(self) -> None:
        """Refresh the broker's index time of the chunk messages this worker runs (its
        heartbeat as the broker sees it; worker/broker.py): a long chunk on a live worker
        is never delivered twice, while a dead worker's stop being refreshed."""
        with self._held_lock:
            held = set(self._held_tasks)
        broker.touch(self.redis, self.settings, held)

    def restore_dead_workers_chunks(self) -> int:
        """Take back the work of workers that stopped heartbeating ``dead_worker_after``
        seconds ago (any live worker does it):

        - the chunk messages they held, whose broker time they stopped refreshing, go
          back on the queue (kombu's mutex makes that one restorer at a time);
        - a worker whose store heartbeat stopped is marked ``lost``, and the one worker
          that marks it reconciles at once: a message it had popped from the queue but
          not yet recorded as held (a SIGKILL in that millisecond) is found missing and
          enqueued again now, not at the next periodic sweep minutes later.
        """
        restored = broker.restore_orphans(self.redis, self.settings,
                                          self.settings.dead_worker_after)
        with session_scope(self.db) as session:
            lost = mark_lost_workers(session=session,
                                     older_than=self.settings.dead_worker_after)
        if lost:
            log.warning("workers %s stopped heartbeating; taking back their work", lost)
            self.reconcile(now=True)
        return restored
