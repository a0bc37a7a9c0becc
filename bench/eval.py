"""Evaluation benchmark: full LAMBADA (OpenAI) + PIQA, neoxq vs lm-eval's ``hf`` model.

Two modes, each writing one JSON (commit, device, date, figures):

``cpu`` (CI machine, 2 cores): a tiny random GPT-NeoX in HF format with the real 20B
tokenizer. Three runs on the same files:

1. neoxq: ``neoxq evaluate``'s path (:func:`evals.runner.evaluate_local`) on the engine;
2. lm-eval 0.4's own ``hf`` model (``HFLM``) through ``lm_eval.simple_evaluate`` on the
   local task objects (:func:`evals.harness.local_tasks`);
3. ``hf-replica``: this file's re-implementation of ``HFLM._loglikelihood_tokens``
   (sort longest first, fixed batches, right padding, full-vocabulary log-softmax) on an
   HF ``GPTNeoXForCausalLM`` wrapping the engine's own tensors — the baseline that the
   GPU mode uses. Its metrics must equal lm-eval's here, which is what licenses it
   there.

``gpu`` (one H200, ``preset:gpt-neox-20b`` bf16, random weights): the GPU image has no
lm-eval, so the baseline is (3): HF ``GPTNeoXForCausalLM`` built on ``meta`` with the
engine's parameters assigned (zero copy, one set of 41 GB weights), scored exactly as
lm-eval's ``hf`` model scores. Both runs do the same 8829 requests in the same process.

    python bench/eval.py cpu                       # the data bundled in assets/
    python bench/eval.py gpu --model preset:gpt-neox-20b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# `python bench/eval.py` puts bench/ first on sys.path, where bench/queue.py would shadow
# the standard library's queue (torch imports it); import from the repo root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/eval.py` from the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import assets  # noqa: E402
from bench.common import git_commit  # noqa: E402
from cli.evaluate import json_default  # noqa: E402
from evals.backend import EvalBackend, build_backend  # noqa: E402
from evals.runner import aggregate_answers, build_requests, evaluate_local  # noqa: E402
from evals.scoring import encode_pairs  # noqa: E402
from evals.tasks import get_task  # noqa: E402

TASKS = ["lambada_openai", "piqa"]

TINY_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": 50304,  # covers the 20B tokenizer's 50277 ids
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "use_parallel_residual": True,
    "hidden_act": "gelu_fast",
    "tie_word_embeddings": False,
    # wider than HF's 0.02 so the random model's argmax decisions are far from ties
    "initializer_range": 0.2,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

TOKENIZER_CONFIG = {
    # load tokenizer.json as it is (no class-specific rebuilding), offline
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "model_max_length": 2048,
}


def write_tiny_hf_model(dest: Path, tokenizer_json: Path, seed: int = 0,
                        config: dict | None = None) -> Path:
    """Save a random ``GPTNeoXForCausalLM`` + ``tokenizer.json`` + ``tokenizer_config.json``
    (loadable offline by ``AutoTokenizer``) to ``dest``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**TINY_CONFIG, **(config or {})})).eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    shutil.copy(tokenizer_json, dest / "tokenizer.json")
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=1))
    return dest


# ---------------------------------------------------------------- HF baseline


def neox_module(engine: Any) -> torch.nn.Module:
    """The engine's ``models.model.NeoX`` (single-stage engines only)."""
    for path in (("model",), ("runner", "model"), ("model", "model")):
        obj = engine
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.nn.Module) and hasattr(obj, "layers"):
            return obj
    raise RuntimeError("cannot find the engine's NeoX module (pipeline engines not supported)")


def hf_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """An HF ``GPTNeoXForCausalLM`` whose parameters ARE ``model``'s tensors (no copy).

    Built on ``meta``, then every parameter assigned; neoxq's names are HF's minus
    ``gpt_neox.``, and the head is ``embed_out`` (transformers 4.x) or ``lm_head`` (5.x).
    The rotary tables are non-persistent buffers, rebuilt on the model's device.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    ours = dict(model.named_parameters(remove_duplicate=False))
    device = next(iter(ours.values())).device
    config = GPTNeoXConfig(**model.config.to_hf())
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(config)
    state = {}
    for name, _ in hf.named_parameters(remove_duplicate=False):
        key = name.removeprefix("gpt_neox.")
        if key in ("lm_head.weight", "embed_out.weight"):
            key = "embed_out.weight"
        if key not in ours:
            raise KeyError(f"HF parameter {name} has no neoxq counterpart {key}")
        state[name] = ours[key]
    hf.load_state_dict(state, assign=True, strict=False)
    rotary = hf.gpt_neox.rotary_emb
    hf.gpt_neox.rotary_emb = type(rotary)(config).to(device)
    for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{name} is still on meta after wrapping")
    # no .to(dtype): the parameters already have it, and the rotary table stays fp32
    return hf.eval()


@torch.no_grad()
def hf_loglikelihood(
    hf: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], *, batch_size: int,
    max_length: int, softmax_dtype: torch.dtype | None = None, progress: bool = True,
) -> list[tuple[float, bool]]:
    """``lm_eval.models.huggingface.HFLM._loglikelihood_tokens``, without lm-eval.

    Same order (longest first, ties by tokens), same fixed batches, same left
    truncation, right padding with 0, no attention mask, log-softmax over the whole
    vocabulary at every position in the model's dtype (HFLM's default
    ``softmax_dtype=None``), argmax and gather on the continuation positions.
    (lm-eval's one-token-continuation cache never hits on LAMBADA or PIQA.)
    """
    from tqdm import tqdm

    device = next(hf.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])),
                                                     tuple(pairs[i][0] + pairs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc="hf baseline", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inps, conts = [], []
        for i in chunk:
            ctx, cont = pairs[i]
            inps.append((ctx + cont)[-(max_length + 1):][:-1])
            conts.append(cont)
        width = max(len(x) for x in inps)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, inp in enumerate(inps):
            batch[row, : len(inp)] = torch.tensor(inp)
        logits = hf(batch.to(device)).logits
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)  # (B, S, V)
        for row, i in enumerate(chunk):
            inplen, contlen = len(inps[row]), len(conts[row])
            sel = logp[row, inplen - contlen : inplen]  # (contlen, V)
            cont_t = torch.tensor(conts[row], device=device)
            greedy = bool((sel.argmax(dim=-1) == cont_t).all())
            ll = float(sel.gather(1, cont_t[:, None]).sum())
            out[i] = (ll, greedy)
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]  # every slot was filled above


def metrics_from_answers(
    data_dir: Path, answers: list[tuple[float, bool]], limit: float | None,
    bootstrap_iters: int,
) -> dict[str, Any]:
    """Per-task metrics for answers in :func:`all_pairs` order."""
    tasks = [get_task(n) for n in TASKS]
    per_task = build_requests(tasks, data_dir, limit)
    return aggregate_answers(tasks, per_task, answers, bootstrap_iters)


def all_pairs(backend: EvalBackend, data_dir: Path, limit: float | None
              ) -> list[tuple[list[int], list[int]]]:
    tasks = [get_task(n) for n in TASKS]
    per_task = build_requests(tasks, data_dir, limit)
    flat = [r for _, reqs in per_task.values() for doc_reqs in reqs for r in doc_reqs]
    return encode_pairs(backend.encode_batch, flat, backend.eos_id)


# ---------------------------------------------------------------- runs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_neoxq(backend: EvalBackend, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    sync(args.device)
    t0 = time.perf_counter()
    out = evaluate_local(
        backend.engine, backend.encode, TASKS, data_dir, prefix_token_id=backend.eos_id,
        max_length=backend.max_length, limit=args.limit, batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters, progress=not args.quiet,
        encode_batch=backend.encode_batch,
    )
    sync(args.device)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall, "score_s": out["timing"]["score_s"], "requests": out["n_requests"],
        "requests_per_s": out["n_requests"] / wall,
        "requests_per_s_scoring": out["n_requests"] / out["timing"]["score_s"],
        "batch_size": args.batch_size, "results": out["results"],
    }


def run_hf_replica(backend: EvalBackend, data_dir: Path, args: argparse.Namespace
                   ) -> tuple[dict[str, Any], list[tuple[float, bool]]]:
    hf = hf_wrap(neox_module(backend.engine))
    sync(args.device)
    t0 = time.perf_counter()
    pairs = all_pairs(backend, data_dir, args.limit)
    t1 = time.perf_counter()
    answers = hf_loglikelihood(hf, pairs, batch_size=args.hf_batch_size,
                               max_length=backend.max_length, progress=not args.quiet)
    sync(args.device)
    t2 = time.perf_counter()
    results = metrics_from_answers(data_dir, answers, args.limit, args.bootstrap_iters)
    wall = time.perf_counter() - t0
    del hf
    return {
        "wall_s": wall, "score_s": t2 - t1, "requests": len(pairs),
        "requests_per_s": len(pairs) / wall, "requests_per_s_scoring": len(pairs) / (t2 - t1),
        "batch_size": args.hf_batch_size, "results": results,
        "what": "HFLM._loglikelihood_tokens re-implemented (bench/eval.py:hf_loglikelihood) "
                "on transformers GPTNeoXForCausalLM sharing neoxq's parameter tensors",
    }, answers


def run_lm_eval_hf(model_dir: Path, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's own ``hf`` model on the local task objects (CPU mode only)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from evals.harness import local_tasks

    lm = HFLM(pretrained=str(model_dir), device=args.device, dtype="float32",
              batch_size=args.hf_batch_size)
    timed = {"s": 0.0, "n": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests: list, disable_tqdm: bool = False) -> list:
        t = time.perf_counter()
        res = inner(requests, disable_tqdm=disable_tqdm or args.quiet)
        timed["s"] += time.perf_counter() - t
        timed["n"] += len(requests)
        return res

    lm.loglikelihood = loglikelihood  # type: ignore[method-assign]
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=local_tasks(data_dir, TASKS), limit=args.limit,
                                  bootstrap_iters=args.bootstrap_iters)
    wall = time.perf_counter() - t0
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: (None if v == "N/A" else v)
                         for k, v in metrics.items() if "," in k}
    return {
        "wall_s": wall, "score_s": timed["s"], "requests": timed["n"],
        "requests_per_s": timed["n"] / wall, "requests_per_s_scoring": timed["n"] / timed["s"],
        "batch_size": args.hf_batch_size, "results": results,
        "what": f"lm_eval {lm_eval.__version__} HFLM via simple_evaluate "
                "(wall includes its bootstrap, datasets and task setup)",
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Largest differences between two results dicts (perplexity relative)."""
    worst_abs, worst_rel = 0.0, 0.0
    for task, metrics in a.items():
        for key, value in metrics.items():
            other = b[task].get(key)
            if not isinstance(value, int | float) or not isinstance(other, int | float):
                continue
            if key.startswith("perplexity"):
                worst_rel = max(worst_rel, abs(value - other) / max(abs(other), 1e-12))
            else:
                worst_abs = max(worst_abs, abs(value - other))
    return {"max_abs_diff_acc_and_stderrs": worst_abs, "max_rel_diff_perplexity": worst_rel,
            "equal_to_1e-4": worst_abs <= 1e-4 and worst_rel <= 1e-4}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    commit = git_commit()
    device = platform.processor() or platform.machine()
    if args.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    import transformers

    return {
        "commit": commit, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--data-dir", type=Path, default=assets.DATA_DIR,
                   help="LAMBADA/PIQA files and the tokenizer (default: assets/, bundled)")
    p.add_argument("--model", default=None, help="gpu mode: model spec (preset:gpt-neox-20b)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json (default: DATA_DIR/20B_tokenizer.json)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="neoxq requests per call")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF baseline batch size")
    p.add_argument("--bootstrap-iters", type=int, default=100_000)
    p.add_argument("--kv-memory", type=float, default=None,
                   help="engine KV budget (fraction of free GPU memory; gpu default 0.3, "
                        "leaving room for the HF baseline's activations)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="engine tokens per step")
    p.add_argument("--skip-lm-eval", action="store_true", help="cpu mode: no real lm-eval run")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("-o", "--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tokenizer = args.tokenizer or args.data_dir / "20B_tokenizer.json"
    gpu = args.mode == "gpu"
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch_size = args.batch_size or (1024 if gpu else 256)
    args.hf_batch_size = args.hf_batch_size or (64 if gpu else 16)
    args.out = args.out or ROOT / "bench" / "results" / f"eval_{'h200' if gpu else 'cpu'}.json"
    if not gpu:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    report: dict[str, Any] = {"mode": args.mode, **environment(args)}
    t0 = time.perf_counter()
    if gpu:
        spec = args.model or "preset:gpt-neox-20b"
        model_dir = None
    else:
        import tempfile

        model_dir = write_tiny_hf_model(Path(tempfile.mkdtemp(prefix="neoxq-eval-")), tokenizer)
        spec = str(model_dir)
    engine_kwargs: dict[str, Any] = {}
    if args.device.startswith("cuda"):
        engine_kwargs["kv_memory"] = args.kv_memory or 0.3
    if args.max_batch_tokens:
        engine_kwargs["max_batch_tokens"] = args.max_batch_tokens
    backend = build_backend(spec, device=args.device, dtype=args.dtype,
                            tokenizer=str(tokenizer), **engine_kwargs)
    sync(args.device)
    report["model"] = {"spec": spec if gpu else "tiny random HF GPTNeoXForCausalLM",
                       "config": TINY_CONFIG if not gpu else None,
                       "dtype": args.dtype, "build_s": time.perf_counter() - t0,
                       "engine_kwargs": engine_kwargs,
                       "max_length": backend.max_length}
    print(f"model ready in {report['model']['build_s']:.1f}s", file=sys.stderr)

    runs: dict[str, Any] = {}
    runs["neoxq"] = run_neoxq(backend, args.data_dir, args)
    print(f"neoxq: {runs['neoxq']['wall_s']:.1f}s", file=sys.stderr)
    report["runs"] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # written now too, so a failing baseline cannot lose neoxq's figures
    args.out.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    try:
        runs["hf_replica"], _ = run_hf_replica(backend, args.data_dir, args)
    except Exception as exc:  # noqa: BLE001 - report whatever broke the baseline, keep ours
        report["hf_replica_error"] = f"{type(exc).__name__}: {exc}"
        args.out.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
        raise
    print(f"hf replica: {runs['hf_replica']['wall_s']:.1f}s", file=sys.stderr)
    if not gpu and not args.skip_lm_eval:
        runs["lm_eval_hf"] = run_lm_eval_hf(model_dir, args.data_dir, args)
        print(f"lm-eval hf: {runs['lm_eval_hf']['wall_s']:.1f}s", file=sys.stderr)
    pairs = all_pairs(backend, args.data_dir, args.limit)
    report["workload"] = {
        "requests": len(pairs), "tokens": sum(len(c) + len(t) for c, t in pairs),
        "continuation_tokens": sum(len(t) for _, t in pairs),
        "max_request_tokens": max(len(c) + len(t) for c, t in pairs),
    }
    for run in runs.values():
        run["tokens_per_s_scoring"] = report["workload"]["tokens"] / run["score_s"]
    report["runs"] = runs
    report["baseline"] = (
        "lm-eval's own hf model (lm_eval_hf) and its re-implementation (hf_replica)"
        if "lm_eval_hf" in runs else
        "hf_replica: lm-eval is not installed on the GPU image, so HFLM's scoring loop is "
        "re-implemented in bench/eval.py (same order, batches, truncation, right padding, "
        "log-softmax dtype); the CPU run shows its metrics equal lm-eval's hf model's"
    )
    ref = runs.get("lm_eval_hf", runs["hf_replica"])
    report["agreement"] = {name: compare(r["results"], ref["results"])
                           for name, r in runs.items() if r is not ref}
    report["speedup_vs_hf"] = {
        "wall": ref["wall_s"] / runs["neoxq"]["wall_s"],
        "scoring": runs["neoxq"]["requests_per_s_scoring"] / ref["requests_per_s_scoring"],
    }
    if "lm_eval_hf" in runs:
        report["speedup_vs_hf_replica"] = {
            "wall": runs["hf_replica"]["wall_s"] / runs["neoxq"]["wall_s"],
            "scoring": (runs["neoxq"]["requests_per_s_scoring"]
                        / runs["hf_replica"]["requests_per_s_scoring"]),
        }
    report["total_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    print(json.dumps({k: report[k] for k in ("agreement", "speedup_vs_hf")}, indent=1,
                     default=json_default))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
