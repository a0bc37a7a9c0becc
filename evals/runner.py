"""Run the local tasks (LAMBADA, PIQA) on neoxq's engine, without lm-eval.

All requests of all tasks go to the engine together (one long stream keeps its batches
full), then are split back per task, processed and aggregated with lm-eval's formulas
(:mod:`evals.tasks`). lm-eval itself is not needed here, so ``neoxq evaluate`` runs
on the GPU image, which lacks it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evals.scoring import Scorer, encode_pair, encode_pairs, score_pairs
from evals.tasks import DEFAULT_BOOTSTRAP_ITERS, LocalTask, aggregate, get_task


def limit_docs(docs: list[dict[str, Any]], limit: float | None) -> list[dict[str, Any]]:
    """lm-eval's ``--limit``: below 1.0 a fraction of the documents, else a count."""
    if limit is None:
        return docs
    if limit <= 0:
        raise ValueError(f"limit: expected a positive number, got {limit}")
    n = int(math.ceil(len(docs) * limit)) if limit < 1.0 else int(limit)
    return docs[:n]


def build_requests(
    tasks: Sequence[LocalTask], data_dir: str | Path | None, limit: float | None
) -> dict[str, tuple[list[dict[str, Any]], list[list[tuple[str, str]]]]]:
    """``{task: (docs, requests per doc)}``; reading the files raises ``DataError``."""
    out = {}
    for task in tasks:
        docs = limit_docs(task.load(data_dir), limit)
        out[task.name] = (docs, [task.requests(doc) for doc in docs])
    return out


def aggregate_answers(
    tasks: Sequence[LocalTask],
    per_task: dict[str, tuple[list[dict[str, Any]], list[list[tuple[str, str]]]]],
    answers: Sequence[tuple[float, bool]],
    bootstrap_iters: int,
) -> dict[str, Any]:
    """``{task: metrics}`` from the answers to :func:`build_requests`'s requests, flat in
    the order of ``tasks``, then documents, then each document's requests."""
    results: dict[str, Any] = {}
    pos = 0
    for task in tasks:
        docs, reqs = per_task[task.name]
        per_doc = []
        for doc, doc_reqs in zip(docs, reqs, strict=True):
            per_doc.append(task.process(doc, answers[pos : pos + len(doc_reqs)]))
            pos += len(doc_reqs)
        results[task.name] = aggregate(task, per_doc, bootstrap_iters)
    return results


def evaluate_local(
    engine: Scorer,
    encode: Callable[[str], list[int]],
    task_names: Sequence[str],
    data_dir: str | Path | None,
    *,
    prefix_token_id: int,
    max_length: int,
    limit: float | None = None,
    batch_size: int = 256,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    progress: bool = True,
    encode_batch: Callable[[list[str]], list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Evaluate local tasks; returns ``{"results": {task: metrics}, "n_samples", "timing"}``.

    ``encode`` turns text into token ids with no special tokens added (as lm-eval's
    ``hf`` model encodes for causal models), ``encode_batch`` (optional) many texts at
    once; ``prefix_token_id`` conditions empty
    contexts (EOS for GPT-NeoX).
    """
    tasks = [get_task(n) for n in dict.fromkeys(task_names)]  # dedupe, keep order
    t0 = time.perf_counter()
    per_task = build_requests(tasks, data_dir, limit)
    flat: list[tuple[str, str]] = [
        req for _, reqs in per_task.values() for doc_reqs in reqs for req in doc_reqs
    ]
    if encode_batch is not None:
        pairs = encode_pairs(encode_batch, flat, prefix_token_id)
    else:
        pairs = [encode_pair(encode, ctx, cont, prefix_token_id) for ctx, cont in flat]
    t_tok = time.perf_counter()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="scoring requests", unit="req", file=sys.stderr)
    try:
        answers = score_pairs(
            engine, pairs, max_length=max_length, batch_size=batch_size, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    t_score = time.perf_counter()

    results = aggregate_answers(tasks, per_task, answers, bootstrap_iters)
    n_samples = {task.name: len(per_task[task.name][0]) for task in tasks}
    t_end = time.perf_counter()
    return {
        "results": results,
        "n_samples": n_samples,
        "n_requests": len(pairs),
        "versions": {t.name: t.version for t in tasks},
        "timing": {
            "tokenize_s": t_tok - t0,
            "score_s": t_score - t_tok,
            "aggregate_s": t_end - t_score,
            "total_s": t_end - t0,
            "requests_per_s": len(pairs) / max(t_score - t_tok, 1e-9),
        },
    }
