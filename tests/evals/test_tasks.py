"""The local tasks build lm-eval's requests and compute lm-eval's aggregates."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evals.tasks import (
    aggregate,
    bootstrap_perplexity_stderr,
    get_task,
    lambada_requests,
    piqa_requests,
)


def test_requests_equal_lm_evals_on_every_document(data_dir: Path) -> None:
    """Our Python templates vs lm-eval's Jinja ones (its stock YAML), all 5153 + 1838 docs."""
    from evals.harness import local_tasks

    lambada, piqa = local_tasks(data_dir)
    for doc, ours in zip(lambada.test_docs(), map(lambada_requests, lambada.test_docs()),
                         strict=True):
        ctx = lambada.fewshot_context(doc, 0)
        (inst,) = [lambada.construct_requests(doc, ctx, metadata=("t", 0, 1))]
        assert [inst.args] == ours
    for doc in piqa.validation_docs():
        ctx = piqa.fewshot_context(doc, 0)
        insts = piqa.construct_requests(doc, ctx, metadata=("t", 0, 1))
        assert [i.args for i in insts] == piqa_requests(doc)
        assert piqa.doc_to_target(doc) == doc["label"]


def test_task_names_and_aliases() -> None:
    assert get_task("lambada").name == "lambada_openai"
    assert get_task("piqa").name == "piqa"
    with pytest.raises(ValueError, match="unknown local task 'hellaswag'"):
        get_task("hellaswag")


def test_piqa_acc_norm_divides_by_characters_of_the_choice() -> None:
    task = get_task("piqa")
    doc = {"goal": "g", "sol1": "aaaa", "sol2": "a", "label": 0}
    # raw: choice 0 wins (-4 > -5); per character: -1.0 vs -5.0, choice 0 wins too
    assert task.process(doc, [(-4.0, False), (-5.0, False)]) == {"acc": 1.0, "acc_norm": 1.0}
    # raw: choice 1 wins (-3 > -4); per character: -1.0 vs -3.0, choice 0 wins
    assert task.process(doc, [(-4.0, False), (-3.0, False)]) == {"acc": 0.0, "acc_norm": 1.0}


def test_aggregates_equal_lm_evals() -> None:
    from lm_eval.api.metrics import bootstrap_stderr, mean, mean_stderr, perplexity

    rng = random.Random(3)
    lls = [-rng.random() * 8 for _ in range(57)]
    accs = [float(rng.random() < 0.3) for _ in range(57)]
    ours = aggregate(get_task("lambada"), [{"perplexity": x, "acc": a}
                                            for x, a in zip(lls, accs, strict=True)], 2000)
    assert ours["acc"] == pytest.approx(mean(accs), abs=1e-12)
    assert ours["acc_stderr"] == pytest.approx(mean_stderr(accs), abs=1e-12)
    assert ours["perplexity"] == pytest.approx(perplexity(lls), rel=1e-12)
    # lm-eval's seeded bootstrap, reproduced draw for draw
    assert ours["perplexity_stderr"] == pytest.approx(bootstrap_stderr(perplexity, lls, 2000),
                                                      rel=1e-9)
    assert bootstrap_perplexity_stderr(lls, 1000) == pytest.approx(
        bootstrap_stderr(perplexity, lls, 1000), rel=1e-9)
    one = aggregate(get_task("lambada"), [{"perplexity": -1.0, "acc": 1}])
    assert one["acc_stderr"] is None and one["perplexity_stderr"] is None


def test_batched_encoding_equals_one_by_one(data_dir: Path, tokenizer_path: Path) -> None:
    """encode_pairs (two batched tokenizer calls) == encode_pair (lm-eval's per request)."""
    from evals.runner import build_requests
    from evals.scoring import encode_pair, encode_pairs
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    per_task = build_requests([get_task("lambada"), get_task("piqa")], data_dir, 300)
    reqs = [r for _, rs in per_task.values() for doc in rs for r in doc]
    reqs += [("", " hi"), ("", "<|endoftext|>x"), ("ends with spaces  ", "x"), ("a", "b")]
    batched = encode_pairs(tok.encode_batch, reqs, 0)
    assert batched == [encode_pair(tok.encode, c, t, 0) for c, t in reqs]
    assert batched[-3] == ([0], [89])  # a continuation starting with EOS: EOS is the context


def test_engine_calls_are_token_budgeted_and_answers_keep_order() -> None:
    from evals.scoring import _chunks, score_pairs, truncate_pair

    assert _chunks([0, 1, 2, 3], [5, 5, 5, 50], batch_size=10, max_tokens=12) == [[0, 1], [2],
                                                                                   [3]]
    assert _chunks([0, 1, 2], [1, 1, 1], batch_size=2, max_tokens=None) == [[0, 1], [2]]
    # HFLM keeps max_length + 1 tokens of (context + continuation)
    assert truncate_pair([1, 2, 3, 4], [5, 6], max_length=4) == ([2, 3, 4], [5, 6])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        truncate_pair([1], [2, 3, 4], max_length=2)

    class Echo:
        """Scores a pair as -(its total length); records the calls' input tokens."""

        max_batch_tokens = 10

        def __init__(self) -> None:
            self.calls: list[int] = []

        def score(self, pairs: list) -> list:
            from types import SimpleNamespace

            self.calls.append(sum(len(c) + len(t) - 1 for c, t in pairs))
            return [SimpleNamespace(logprob=-(len(c) + len(t)), is_greedy=len(t) == 1)
                    for c, t in pairs]

    engine = Echo()
    pairs = [([1] * n, [2]) for n in (3, 8, 1, 5, 2)]
    assert score_pairs(engine, pairs, max_length=64) == [
        (-4.0, True), (-9.0, True), (-2.0, True), (-6.0, True), (-3.0, True)]
    assert max(engine.calls) <= 10
