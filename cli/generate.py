"""`neoxq generate` (GPT-NeoX's generate.py, batched) and `neoxq convert`.

No torch import at module level: `neoxq submit` and `--help` must start fast.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cli.options import add_fp8_arguments
from models.dtypes import DTYPE_NAMES
from models.engine.scheduler import MAX_BATCH_TOKENS, MAX_NUM_SEQS

if TYPE_CHECKING:
    from models.engine.protocol import InferenceEngine


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `convert`."""
    g = subparsers.add_parser(
        "generate",
        help="generate text directly with a local model (no queue)",
        description=(
            "Generate completions for a file of prompts (one per line in .txt, a 'prompt' "
            "field per line in .jsonl), unconditional samples (no -i), or prompts typed at "
            "the terminal (--interactive). Writes JSONL: context, text, length, finished, "
            "duration_seconds, finish_reason — one line per prompt (and sample), in input "
            "order."
        ),
    )
    g.add_argument("model", help="preset:NAME, an HF directory, a GPT-NeoX YAML (file or "
                   "directory), or a directory written by `neoxq convert`")
    g.add_argument("-i", "--input", type=Path, help="prompts: .txt (one per line) or .jsonl")
    g.add_argument("-o", "--output", type=Path, help="JSONL output file (default: stdout)")
    g.add_argument("--interactive", action="store_true", help="read prompts from the terminal")
    g.add_argument("--num-samples", type=int, default=1,
                   help="samples per prompt; without -i, the number of unconditional samples")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed; prompt i uses seed + i, so reruns reproduce")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable); not included in the text")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--tokenizer", type=Path, help="tokenizer.json overriding the model's")
    g.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="Jinja2 chat template for lines with messages (default: the "
                        "checkpoint's own, else neoxq's plain User:/Assistant: transcript)")
    g.add_argument("--batch-size", type=int, default=MAX_NUM_SEQS,
                   help="most sequences decoded together (continuous batching)")
    g.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS,
                   help="most tokens per forward pass (prefill chunks + decodes)")
    g.add_argument("--kv-memory", type=float, default=None,
                   help="KV-cache budget: a fraction of free GPU memory if <= 1, else GiB")
    g.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="split the layers over N GPUs")
    g.add_argument("--model-seed", type=int, default=0,
                   help="seed of the random weights of preset:NAME models")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt (no reuse of cached prefix KV)")
    g.add_argument("--no-cascade", dest="cascade", action="store_false",
                   help="read a shared prompt prefix once per sequence in each decode step "
                        "(default: once per group sharing it, on CUDA with prefix caching on)")
    add_fp8_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to neoxq's fast-loading form",
        description="Convert any model spec (HF dir, NeoX YAML, preset:NAME) to a directory "
        "of per-layer safetensors files + neoxq_config.json + tokenizer.json.",
    )
    c.add_argument("src", help="preset:NAME, an HF directory or a GPT-NeoX YAML")
    c.add_argument("dst", type=Path, help="output directory")
    c.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="stored dtype (default: the checkpoint's own)")
    c.add_argument("--tokenizer", type=Path, help="tokenizer.json overriding the source's")
    c.add_argument("--model-seed", type=int, default=0, help="seed for preset:NAME weights")
    c.set_defaults(func=run_convert)


# ------------------------------------------------------------------------------ prompts


class InputError(ValueError):
    """Bad input lines; the message names file, line and field of each (up to 20)."""


# One prompt to generate for: its text (or token ids), the fields its output carries
# (custom_id), and the sampling fields its own line sets.
Item = tuple[str | list[int], dict[str, Any], dict[str, Any]]


def _where(path: Path, err: Any) -> str:
    """``FILE:LINE: field: message`` for a :class:`core.jsonl.LineError`."""
    line = f"{err.line}:" if err.line else ""
    return f"{path}:{line} {err.field + ': ' if err.field else ''}{err.message}"


def count_prompts(path: Path, chat: Any = None) -> int:
    return sum(1 for _ in read_prompts(path, chat))


def read_prompts(path: Path, chat: Any = None) -> Iterator[Item]:
    """Yield ``(prompt, extra, params)`` from a .txt (non-empty lines) or .jsonl file.

    JSONL lines are validated exactly as the API validates them (:mod:`core.jsonl`: native
    ``{"prompt" or "messages", "custom_id"?, <sampling fields>}`` or OpenAI Batch lines),
    so a line's own ``max_tokens``, ``temperature``, ``stop``, ``seed``, ``n``, ... apply to
    it over the command-line options; the first bad lines are all reported, before any
    model loads. ``chat`` (a :class:`models.chat.ChatTemplate`) renders lines with
    ``messages`` into prompts, as the worker does."""
    from core.jsonl import LineError, LineValidator
    from models.chat import ChatTemplate, ChatTemplateError

    jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    if not jsonl:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = line.rstrip("\r\n")
                if text.strip():  # GPT-NeoX skips blank lines too
                    yield text, {}, {}
        return
    validator = LineValidator("auto", max_lines=2**62)
    errors: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            parsed = validator.feed(raw.rstrip(b"\r\n"))
            if parsed is None:
                continue
            if not parsed.ok:
                errors += [_where(path, e) for e in parsed.errors]
                if len(errors) >= 20:
                    break
                continue
            prompt = parsed.prompt
            if parsed.messages is not None:
                try:
                    prompt = (chat or ChatTemplate.default()).render(parsed.messages)
                except ChatTemplateError as exc:
                    errors.append(_where(path, LineError(parsed.line, "messages",
                                                         "invalid_messages", str(exc))))
                    continue
            if not errors:
                extra = {"custom_id": parsed.custom_id} if parsed.custom_id else {}
                yield prompt, extra, parsed.params
    errors += [_where(path, e) for e in validator.finish() if e.code == "empty_file"]
    if errors:
        raise InputError("\n".join(errors[:20]))


# ------------------------------------------------------------------------------ generate


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_num_seqs": args.batch_size,
                          "max_batch_tokens": args.max_batch_tokens,
                          "enable_prefix_caching": args.prefix_caching,
                          "kv_cache_dtype": args.kv_cache_dtype,
                          "quantization": args.quantization}
    if not args.cascade:
        kw["enable_cascade"] = False
    if args.kv_memory is not None:
        kw["kv_memory"] = args.kv_memory if args.kv_memory <= 1 else int(args.kv_memory * 2**30)
    return kw


def _params(args: argparse.Namespace, seed: int, n: int, line: dict[str, Any] | None = None):
    """A prompt's SamplingParams: its line's own fields over the command-line options."""
    from models.sampling import SamplingParams

    options = {"max_tokens": args.max_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "stop": list(args.stop),
               "seed": seed, "n": n}
    return SamplingParams.from_dict(line or {}, defaults=options)


def _records(context: str | list[int], extra: dict[str, Any], out) -> list[dict[str, Any]]:
    """JSONL lines (GPT-NeoX's fields + finish_reason) for one RequestOutput."""
    if out.error:
        return [{"context": context, **extra, "text": "", "length": 0, "finished": False,
                 "duration_seconds": 0.0, "finish_reason": "error", "error": out.error}]
    t = out.timings
    start = t.first_scheduled or t.arrival
    duration = round((t.finished or time.time()) - start, 6)
    return [
        {"context": context, **extra, "text": s.text, "length": len(s.token_ids),
         "finished": s.finish_reason == "stop", "duration_seconds": duration,
         "finish_reason": s.finish_reason, **({"sample": s.index} if len(out.samples) > 1
                                              else {})}
        for s in out.samples
    ]


def generate_stream(
    engine: InferenceEngine,
    items: Iterator[Item],
    args: argparse.Namespace,
    sink: TextIO,
    total: int | None,
) -> int:
    """Feed prompts to the engine in a bounded window (so a million-line file is never
    all in memory), write results in input order as they complete. Returns the count."""
    from tqdm import tqdm

    from models.engine import RequestOutput, Timings

    eos = engine.eos_id
    window = max(2 * args.batch_size, 64)
    contexts: dict[int, tuple[str | list[int], dict[str, Any]]] = {}
    done: dict[int, list[dict[str, Any]]] = {}
    next_out = 0
    next_in = 0
    exhausted = False
    bar = tqdm(total=total, file=sys.stderr, unit="prompt", disable=args.quiet,
               desc="generate", dynamic_ncols=True)
    n = args.num_samples if args.input is not None or args.interactive else 1
    while True:
        while not exhausted and engine.num_unfinished() < window:
            item = next(items, None)
            if item is None:
                exhausted = True
                break
            context, extra, line_params = item
            i = next_in
            next_in += 1
            contexts[i] = (context, extra)
            # An empty prompt means "unconditional": the model starts after EOS.
            prompt: str | list[int] = context if context else [eos]
            try:
                engine.add_request(str(i), prompt,
                                   _params(args, args.seed + i, n, line_params))
            except ValueError as exc:
                err = RequestOutput(str(i), 0, [], Timings(time.time()), error=str(exc))
                done[i] = _records(context, extra, err)
        if engine.has_unfinished():
            for out in engine.step():
                i = int(out.request_id)
                done[i] = _records(*contexts[i], out)
        while next_out in done:
            for rec in done.pop(next_out):
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            contexts.pop(next_out, None)
            next_out += 1
            bar.update(1)
        sink.flush()
        if exhausted and not engine.has_unfinished():
            break  # every request added is now in `done` and written
    bar.close()
    return next_out


def _interactive(engine: InferenceEngine, args: argparse.Namespace, sink: TextIO | None) -> int:
    count = 0
    while True:
        try:
            prompt = input("Context prompt >>> ")
        except EOFError:
            print(file=sys.stderr)
            return count
        if prompt.strip() in ("exit", "quit"):
            return count
        quiet = argparse.Namespace(**{**vars(args), "quiet": True})
        buf = io.StringIO()
        generate_stream(engine, iter([(prompt, {}, {})]), quiet, buf, 1)
        for line in buf.getvalue().splitlines():
            rec = json.loads(line)
            print(f"{prompt}{rec['text']}\n[{rec['length']} tokens, {rec['finish_reason']}, "
                  f"{rec['duration_seconds']:.2f}s]", flush=True)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()
        count += 1


def run_generate(args: argparse.Namespace) -> int:
    """`neoxq generate MODEL [-i FILE] [-o FILE]`: batched generation with the engine."""
    if args.num_samples < 1:
        print("--num-samples: must be >= 1", file=sys.stderr)
        return 2
    items: Iterator[Item]
    total: int | None = None
    if args.input is not None:
        if not args.input.is_file():
            print(f"-i: no such file: {args.input}", file=sys.stderr)
            return 2
        from models.chat import load_chat_template

        try:
            chat = load_chat_template(args.model, template_file=args.chat_template,
                                      tokenizer=args.tokenizer)
            total = count_prompts(args.input, chat)  # also validates every line first
        except (InputError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        items = read_prompts(args.input, chat)
    elif not args.interactive:
        total = args.num_samples
        items = iter([("", {}, {})] * args.num_samples)

    try:  # a bad sampling option fails here, before the model loads
        _params(args, args.seed, args.num_samples if args.input or args.interactive else 1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from models.dtypes import canonical_dtype_name
    from models.loaders import CheckpointError
    from models.runtime import build_engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = canonical_dtype_name(args.dtype, device)
    t0 = time.time()
    try:
        engine = build_engine(
            args.model, device=device, dtype=dtype, pipeline_parallel=args.pipeline_parallel,
            tokenizer=args.tokenizer, seed=args.model_seed, **_engine_kwargs(args),
        )
    except (CheckpointError, ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"loaded {args.model} on {device} ({dtype}) in {time.time() - t0:.1f}s",
              file=sys.stderr)
    sink: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.interactive:
            _interactive(engine, args, sink if args.output else None)
        else:
            generate_stream(engine, items, args, sink, total)
    finally:
        if args.output:
            sink.close()
        engine.close()
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """`neoxq convert SRC DST [--dtype]`: write neoxq's fast-loading form."""
    from models.loaders import CheckpointError, convert

    t0 = time.time()
    try:
        dst = convert(args.src, args.dst, args.dtype, tokenizer=args.tokenizer,
                      seed=args.model_seed)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {dst} ({size / 1e9:.2f} GB) in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
