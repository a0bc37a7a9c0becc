"""neoxq's metrics equal lm-evaluation-harness's own ``hf`` model's.

Both sides load the same tiny random HF-format model from disk and score the same
local task objects (lm-eval's stock LAMBADA/PIQA templates over the bundled data), so
only the model backend differs. Accuracies and stderrs must agree to 1e-4 absolute,
perplexities (in the 1e5s for a random model) to 1e-4 relative.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

LIMIT = 40
HF_BATCH = 16


def _close(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    for task, metrics in theirs.items():
        for key, value in metrics.items():
            mine = ours[task][key]
            if value is None:
                assert mine is None, (task, key)
            elif key.startswith("perplexity"):
                assert math.isclose(mine, value, rel_tol=1e-4), (task, key, mine, value)
            else:
                assert abs(mine - value) <= 1e-4, (task, key, mine, value)


def _lm_eval_metrics(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        task: {k.split(",")[0]: (None if v == "N/A" else v) for k, v in m.items() if "," in k}
        for task, m in out["results"].items()
    }


@pytest.fixture(scope="module")
def backend(tiny_hf_dir: Path) -> Any:
    from evals.backend import build_backend

    return build_backend(str(tiny_hf_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hflm(tiny_hf_dir: Path) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_hf_dir), device="cpu", dtype="float32", batch_size=HF_BATCH)


@pytest.fixture(scope="module")
def hf_results(hflm: Any, data_dir: Path) -> dict[str, Any]:
    import lm_eval

    from evals.harness import local_tasks

    out = lm_eval.simple_evaluate(model=hflm, tasks=local_tasks(data_dir), limit=LIMIT)
    return _lm_eval_metrics(out)


def test_neoxq_evaluate_equals_lm_eval_hf(backend: Any, hf_results: dict, data_dir: Path) -> None:
    """The path ``neoxq evaluate`` takes (no lm-eval involved) vs lm-eval's hf model."""
    from evals.runner import evaluate_local

    out = evaluate_local(
        backend.engine, backend.encode, ["lambada", "piqa"], data_dir,
        prefix_token_id=backend.eos_id, max_length=backend.max_length, limit=LIMIT,
        batch_size=32, progress=False,
    )
    assert out["n_samples"] == {"lambada_openai": LIMIT, "piqa": LIMIT}
    assert out["n_requests"] == 3 * LIMIT
    _close(out["results"], hf_results)
    # a random model still has a non-trivial PIQA accuracy: the comparison is not 0 == 0
    assert 0.0 < hf_results["piqa"]["acc"] < 1.0


def test_neoxq_lm_eval_model_equals_lm_eval_hf(
    backend: Any, hf_results: dict, data_dir: Path
) -> None:
    """The registered ``neoxq`` lm-eval model, through lm-eval's own evaluator."""
    import lm_eval

    from evals.harness import NeoXQLM, local_tasks

    lm = NeoXQLM(backend=backend, batch_size=32)
    out = lm_eval.simple_evaluate(model=lm, tasks=local_tasks(data_dir), limit=LIMIT)
    _close(_lm_eval_metrics(out), hf_results)


def _instances(kind: str, args: list[tuple]) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_per_request_and_greedy(backend: Any, hflm: Any, data_dir: Path) -> None:
    """Request by request, including empty contexts, trailing spaces and is_greedy=True."""
    from evals.data import load_lambada
    from evals.harness import NeoXQLM

    lm = NeoXQLM(backend=backend, batch_size=7)
    texts = [d["text"] for d in load_lambada(data_dir)[:12]]
    reqs = [(t[: len(t) // 2], t[len(t) // 2:]) for t in texts]
    reqs += [("", " hello world"), ("trailing space ", "x"), ("Question: why?\nAnswer:", " no")]
    # continuations the model itself prefers: is_greedy must come out True on both sides
    for ctx in texts[:3]:
        ids = backend.encode(ctx)
        greedy = hflm.model.generate(
            __import__("torch").tensor([ids]), max_new_tokens=3, do_sample=False,
            pad_token_id=0,
        )[0, len(ids):].tolist()
        reqs.append((backend.decode(ids), backend.decode(greedy)))
    ours = lm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    theirs = hflm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        assert ga == gb
    assert sum(g for _, g in theirs) >= 1


def test_loglikelihood_rolling_windows(backend: Any, tiny_hf_dir: Path, data_dir: Path) -> None:
    """Rolling windows of the context length (32 here, so texts span several windows)."""
    from lm_eval.models.huggingface import HFLM

    from evals.backend import wrap_engine
    from evals.data import load_lambada
    from evals.harness import NeoXQLM

    short = wrap_engine(backend.engine, backend.tokenizer, max_length=32)
    lm = NeoXQLM(backend=short, batch_size=5)
    hf = HFLM(pretrained=str(tiny_hf_dir), device="cpu", dtype="float32", batch_size=4,
              max_length=32)
    texts = [(d["text"],) for d in load_lambada(data_dir)[:6]]
    assert max(len(backend.encode(t)) for (t,) in texts) > 2 * 32
    ours = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), True)
    theirs = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), True)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_generate_until_greedy(backend: Any, hflm: Any, data_dir: Path) -> None:
    from evals.data import load_lambada
    from evals.harness import NeoXQLM

    lm = NeoXQLM(backend=backend, batch_size=4)
    gen = {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}
    args = [(d["text"][:200], dict(gen)) for d in load_lambada(data_dir)[:5]]
    ours = lm.generate_until(_instances("generate_until", args), disable_tqdm=True)
    theirs = hflm.generate_until(_instances("generate_until", args), disable_tqdm=True)
    assert ours == theirs
    assert any(ours)
