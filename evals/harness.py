"""neoxq inside lm-evaluation-harness: the ``neoxq`` model and the local task objects.

``NeoXQLM`` is an lm-eval ``LM`` backed by neoxq's engine. It tokenizes, truncates and
rolls windows exactly as lm-eval's ``hf`` model does (see :mod:`evals.scoring`), so
any lm-eval task gives the numbers the ``hf`` model would, only batched by neoxq.

lm-eval 0.4 finds models only in its registry, which it fills with its own models;
it reads no entry points. Importing this module registers ``neoxq``; the launcher
``python -m evals`` does that and then runs lm-eval's own CLI::

    python -m evals --model neoxq --model_args model=preset:pythia-70m,device=cuda,dtype=bf16 \\
        --tasks lambada_openai_local,piqa_local --include_path evals/lm_tasks

(the bundled copies of the data are read unless ``--metadata '{"data_dir": DIR}'`` names
another folder of the same layout).

``local_tasks(data_dir)`` builds lm-eval ``ConfigurableTask`` objects for LAMBADA and
PIQA from the same templates as lm-eval's stock YAML, reading local files instead of
the Hugging Face hub.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from evals.backend import EvalBackend, build_backend
from evals.data import load_lambada, load_piqa
from evals.scoring import score_pairs

# requests handed to the engine per call when lm-eval says "auto" (the engine batches
# internally by tokens; this only sets how often the progress bar moves)
AUTO_BATCH = 1024


@register_model("neoxq")
class NeoXQLM(TemplateLM):
    """lm-eval model backed by neoxq's continuous-batching engine.

    ``model_args``: ``model`` (a neoxq model spec: ``preset:NAME``, HF dir, NeoX YAML,
    converted dir), ``device``, ``dtype``, ``tokenizer`` (tokenizer.json path),
    ``pipeline_parallel``, ``max_length``, ``max_gen_toks``, and engine options such as
    ``kv_cache_dtype=fp8`` and ``quantization=fp8``; lm-eval's ``--batch_size`` is
    the number of requests handed to the engine per call.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        backend: EvalBackend | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        tokenizer: str | None = None,
        batch_size: int | str = 256,
        pipeline_parallel: int = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__()
        if backend is None:
            if model is None:
                raise ValueError("model_args: pass model=SPEC (preset:NAME, an HF dir, ...)")
            backend = build_backend(
                model, device=device, dtype=dtype, tokenizer=tokenizer,
                pipeline_parallel=int(pipeline_parallel),
                max_length=int(max_length) if max_length else None, **engine_kwargs,
            )
        # not `self.backend`: TemplateLM reads that as "causal"/"seq2seq"
        self.neoxq = backend
        self._device = device
        text = str(batch_size)
        self._batch_size = AUTO_BATCH if text.startswith("auto") else int(text)
        self._max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> NeoXQLM:
        """``model_args`` win over lm-eval's own ``--device``/``--batch_size`` defaults
        (lm-eval would pass both and fail on the duplicate keyword)."""
        from lm_eval.utils import simple_parse_args_string

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(simple_parse_args_string(arg_string))
        args.pop("max_batch_size", None)  # meaningless here: the engine batches by tokens
        return cls(**args)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> NeoXQLM:
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(arg_dict)
        args.pop("max_batch_size", None)
        return cls(**args)

    # -- facts lm-eval asks for

    @property
    def eot_token_id(self) -> int:
        return self.neoxq.eos_id

    @property
    def max_length(self) -> int:
        return self.neoxq.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        # GPT-NeoX's tokenizer adds no BOS/EOS, so add_special_tokens changes nothing.
        return self.neoxq.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.neoxq.decode(tokens)

    # -- scoring

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), disable=disable_tqdm,
                   desc="Running loglikelihood requests (neoxq)")
        try:
            answers = score_pairs(
                self.neoxq.engine, [(ctx, cont) for _, ctx, cont in requests],
                max_length=self.max_length, batch_size=self.batch_size, progress=bar,
            )
        finally:
            bar.close()
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Whole-text loglikelihood over disjoint windows of the context length, as the
        ``hf`` model computes it (first window conditioned on EOS, context_len=1)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts: list[int] = []
        for (string,) in (req.args for req in requests):
            rolling = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            windows.extend((None, ctx, cont) for ctx, cont in rolling)
            counts.append(len(rolling))
        answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out: list[float] = []
        pos = 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(ll for ll, _ in answers[pos : pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # -- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) generation until a stop string, grouped by
        generation settings; contexts are left-truncated to ``max_length - max_gen_toks``."""
        from models.sampling import SamplingParams

        eos_text = self.neoxq.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm,
                   desc="Running generate_until requests (neoxq)")
        for idxs in groups.values():
            kwargs = copy.deepcopy(requests[idxs[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens",
                                                                   self.max_gen_toks)))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(
                max_tokens=max_new, temperature=temperature,
                top_p=float(kwargs.pop("top_p", 1.0)) if do_sample else 1.0,
                top_k=int(kwargs.pop("top_k", 0) or 0) if do_sample else 0,
                stop=[s for s in until if s], seed=kwargs.pop("seed", None),
            )
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a context of "
                                 f"at most {self.max_length} tokens")
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] for i in chunk]
                outputs = self.neoxq.engine.generate(prompts, params)
                for i, res in zip(chunk, outputs, strict=True):
                    if res.error:
                        raise RuntimeError(f"generation failed: {res.error}")
                    text = postprocess_generated_text(res.samples[0].text, until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]  # every slot was filled above

    def get_model_info(self) -> dict[str, Any]:
        return {"model_spec": self.neoxq.spec, "max_length": self.max_length}


# ---------------------------------------------------------------- local lm-eval tasks


def lambada_dataset(data_dir: str | Path | None = None, **_: Any) -> dict[str, Any]:
    """``custom_dataset`` for lm-eval: LAMBADA (OpenAI) test split from local files
    (``data_dir`` None: the bundled copy)."""
    import datasets

    return {"test": datasets.Dataset.from_list(load_lambada(data_dir))}


def piqa_dataset(data_dir: str | Path | None = None, **_: Any) -> dict[str, Any]:
    """``custom_dataset`` for lm-eval: PIQA validation split from local files
    (``data_dir`` None: the bundled copy)."""
    import datasets

    return {"validation": datasets.Dataset.from_list(load_piqa(data_dir))}


def lambada_config(data_dir: str | Path, name: str = "lambada_openai") -> dict[str, Any]:
    """lm-eval's ``lambada_openai.yaml``, with the hub download replaced by local files."""
    return {
        "task": name,
        "custom_dataset": lambada_dataset,
        "dataset_kwargs": {"data_dir": str(data_dir)},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def piqa_config(data_dir: str | Path, name: str = "piqa") -> dict[str, Any]:
    """lm-eval's ``piqa.yaml``, with the hub download replaced by local files."""
    return {
        "task": name,
        "custom_dataset": piqa_dataset,
        "dataset_kwargs": {"data_dir": str(data_dir)},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


LOCAL_CONFIGS = {"lambada_openai": lambada_config, "lambada": lambada_config,
                 "piqa": piqa_config}


def local_tasks(data_dir: str | Path, names: list[str] | None = None) -> list[ConfigurableTask]:
    """lm-eval Task objects for the local tasks (default: LAMBADA and PIQA), named as
    lm-eval names its stock ones so result keys line up."""
    names = names or ["lambada_openai", "piqa"]
    tasks = []
    for name in names:
        if name not in LOCAL_CONFIGS:
            raise ValueError(f"unknown local task {name!r}; known: {sorted(LOCAL_CONFIGS)}")
        canonical = "lambada_openai" if name.startswith("lambada") else name
        tasks.append(ConfigurableTask(config=LOCAL_CONFIGS[name](data_dir, canonical)))
    return tasks
