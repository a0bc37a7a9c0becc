"""LAMBADA (OpenAI) and PIQA as local tasks, with lm-evaluation-harness's exact semantics.

Each task turns a document into ``(context, continuation)`` requests, turns the
model's ``(loglikelihood, is_greedy)`` answers into per-document metric values, and
aggregates them, all as lm-eval 0.4's ``lambada_openai`` and ``piqa`` tasks do:

- ``lambada_openai``: context = the text up to its last space-separated word,
  continuation = ``" " + last word``; ``acc`` = the continuation is the greedy one,
  ``perplexity`` = ``exp(-mean(loglikelihood))``.
- ``piqa``: context ``"Question: {goal}\\nAnswer:"``, continuations ``" " + sol1`` and
  ``" " + sol2``; ``acc`` = argmax of the loglikelihoods is the label, ``acc_norm`` =
  argmax of loglikelihood / ``len(sol)`` (characters of the choice without the
  delimiter, as lm-eval's ``multiple_choice`` does) is the label.

Standard errors follow lm-eval too: ``mean_stderr`` (sample stddev / sqrt(n)) for the
means, and for perplexity lm-eval's seeded bootstrap (chunks of 1000 resamples, chunk
``i`` drawn by ``random.Random(i).choices``), reproduced draw for draw in numpy so
100,000 resamples of 5153 documents take seconds instead of minutes.

No torch or lm_eval here: ``neoxq evaluate`` runs on machines without lm-eval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals.data import load_lambada, load_piqa

Request = tuple[str, str]  # (context, continuation)
Answer = tuple[float, bool]  # (loglikelihood of the continuation, it is the greedy one)

# lm-eval's default for simple_evaluate / the CLI.
DEFAULT_BOOTSTRAP_ITERS = 100_000


@dataclass(frozen=True)
class LocalTask:
    """One evaluation task over local files."""

    name: str  # lm-eval's task name, so result keys match the harness's
    aliases: tuple[str, ...]
    load: Callable[[str | Path | None], list[dict[str, Any]]]
    requests: Callable[[dict[str, Any]], list[Request]]
    process: Callable[[dict[str, Any], list[Answer]], dict[str, float]]
    # metric -> aggregation ("mean" or "perplexity"), in the order they are printed
    metrics: tuple[tuple[str, str], ...]
    higher_is_better: tuple[tuple[str, bool], ...]
    version: float = 1.0


# ---------------------------------------------------------------- LAMBADA (OpenAI)


def lambada_requests(doc: dict[str, Any]) -> list[Request]:
    """lm-eval's templates: ``text.split(' ')[:-1]|join(' ')`` and ``' '+text.split(' ')[-1]``."""
    words = doc["text"].split(" ")
    return [(" ".join(words[:-1]), " " + words[-1])]


def lambada_process(doc: dict[str, Any], answers: list[Answer]) -> dict[str, float]:
    (ll, is_greedy), = answers
    return {"perplexity": ll, "acc": int(is_greedy)}


# ---------------------------------------------------------------- PIQA


def piqa_choices(doc: dict[str, Any]) -> list[str]:
    return [doc["sol1"], doc["sol2"]]


def piqa_requests(doc: dict[str, Any]) -> list[Request]:
    context = f"Question: {doc['goal']}\nAnswer:"
    # target_delimiter " " goes in front of each choice
    return [(context, " " + choice) for choice in piqa_choices(doc)]


def piqa_process(doc: dict[str, Any], answers: list[Answer]) -> dict[str, float]:
    lls = np.array([ll for ll, _ in answers])
    # characters, not bytes, and without the delimiter: lm-eval's completion_len
    lengths = np.array([float(len(choice)) for choice in piqa_choices(doc)])
    gold = doc["label"]
    return {
        "acc": 1.0 if int(np.argmax(lls)) == gold else 0.0,
        "acc_norm": 1.0 if int(np.argmax(lls / lengths)) == gold else 0.0,
    }


TASKS: dict[str, LocalTask] = {
    "lambada_openai": LocalTask(
        name="lambada_openai",
        aliases=("lambada",),
        load=load_lambada,
        requests=lambada_requests,
        process=lambada_process,
        metrics=(("acc", "mean"), ("perplexity", "perplexity")),
        higher_is_better=(("acc", True), ("perplexity", False)),
    ),
    "piqa": LocalTask(
        name="piqa",
        aliases=(),
        load=load_piqa,
        requests=piqa_requests,
        process=piqa_process,
        metrics=(("acc", "mean"), ("acc_norm", "mean")),
        higher_is_better=(("acc", True), ("acc_norm", True)),
    ),
}


def get_task(name: str) -> LocalTask:
    """A local task by its lm-eval name or alias; unknown names are a ``ValueError``."""
    for task in TASKS.values():
        if name == task.name or name in task.aliases:
            return task
    known = sorted({n for t in TASKS.values() for n in (t.name, *t.aliases)})
    raise ValueError(f"unknown local task {name!r}; known: {', '.join(known)}")


def is_local_task(name: str) -> bool:
    return any(name == t.name or name in t.aliases for t in TASKS.values())


# ---------------------------------------------------------------- aggregation


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sample_stddev(xs: Sequence[float]) -> float:
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float:
    return sample_stddev(xs) / math.sqrt(len(xs))


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-mean(lls))


def _python_rng_state(seed: int) -> tuple[str, np.ndarray, int]:
    """numpy's legacy MT19937 state equal to ``random.Random(seed)``'s.

    Both generators are MT19937 and turn two 32-bit words into a double the same way;
    only the seeding differs, so copy Python's seeded state across.
    """
    _, internal, _ = random.Random(seed).getstate()
    return ("MT19937", np.array(internal[:-1], dtype=np.uint32), internal[-1])


def bootstrap_perplexity_stderr(lls: Sequence[float], iters: int) -> float:
    """lm-eval's ``bootstrap_stderr(perplexity, lls, iters)``, draw for draw.

    lm-eval draws chunk ``i`` (of ``min(1000, iters)`` resamples) with
    ``random.Random(i).choices(xs, k=n)``, i.e. ``xs[floor(random() * n)]`` n times,
    and returns the sample stddev of the resampled perplexities.
    """
    xs = np.asarray(lls, dtype=np.float64)
    n = len(xs)
    chunk = min(1000, iters)
    rng = np.random.RandomState()
    stats: list[np.ndarray] = []
    for i in range(iters // chunk):
        rng.set_state(_python_rng_state(i))
        idx = np.floor(rng.random_sample((chunk, n)) * n).astype(np.int64)  # (chunk, n)
        stats.append(np.exp(-xs[idx].mean(axis=1)))
    res = np.concatenate(stats)
    return float(np.sqrt(((res - res.mean()) ** 2).sum() / (len(res) - 1)))


def aggregate(
    task: LocalTask, per_doc: list[dict[str, float]], bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS
) -> dict[str, float | None]:
    """``{metric: value, metric_stderr: value}`` as lm-eval reports them (``None`` where
    lm-eval prints "N/A": one document, or bootstrapping switched off)."""
    out: dict[str, float | None] = {}
    for metric, how in task.metrics:
        items = [d[metric] for d in per_doc]
        stderr: float | None = None
        if how == "mean":
            out[metric] = mean(items)
            if len(items) > 1 and bootstrap_iters > 0:
                stderr = mean_stderr(items)
        elif how == "perplexity":
            out[metric] = perplexity(items)
            if len(items) > 1 and bootstrap_iters > 0:
                stderr = bootstrap_perplexity_stderr(items, bootstrap_iters)
        else:  # pragma: no cover - the table above is the only source of `how`
            raise ValueError(f"unknown aggregation {how!r}")
        out[f"{metric}_stderr"] = stderr
    return out
