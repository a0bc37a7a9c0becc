"""Grammar libraries for constrained decoding, compared on this engine's tokenizer (CPU).

llguidance, xgrammar and outlines-core each turn a constraint (a JSON Schema, ``json_object``,
a regex, a list of choices) into a per-step token mask. This measures what the engine
pays and gets with each, on the real GPT-NeoX-20B tokenizer (the project's package data)
and its padded vocabulary (50,432 logits rows):

- setup: building the library's tokenizer index (once per worker);
- compile: one constraint (once per distinct schema; a batch of 1,000 lines often shares
  one) and a fresh matcher (once per sample);
- mask: one step's mask for one sequence, during random walks through the grammar
  (mean, p50, p99, in microseconds), and one step for a batch of 64 sequences;
- correctness: every walk draws among the allowed tokens only (EOS whenever allowed, half
  the time); each walk that ends with EOS must be a complete, valid output (the JSON parses
  and validates with ``jsonschema``; the regex matches in full; the text is one of the
  choices), and no mask may allow a padded id (>= 50,277).

The engine uses llguidance (models/grammar.py says why); its row runs through the
engine's own ``Grammars``. Run: ``python -m bench.grammar_cpu`` (the contenders are in
``neoxq[dev]``). Writes bench/results/grammar_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from bench.common import ROOT, git_commit
from models.tokenizer import load_tokenizer

VOCAB = 50432  # the 20B's padded embedding: masks cover every logits row
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 12},
        "reviewer": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "verified": {"type": "boolean"}},
            "required": ["age", "verified"], "additionalProperties": False},
        "topics": {"type": "array", "items": {"enum": ["plot", "acting", "music"]},
                   "minItems": 1, "maxItems": 3},
    },
    "required": ["sentiment", "stars", "summary", "reviewer", "topics"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
CHOICES = ["positive", "negative", "neutral", "not sure"]
CASES: dict[str, dict[str, Any]] = {
    "json_schema": {"type": "json_schema", "schema": SCHEMA},
    "json_object": {"type": "json_schema", "schema": {"type": "object"}},
    "regex": {"type": "regex", "pattern": DATE},
    "choice": {"type": "choice", "choices": CHOICES},
}


def valid(case: str, text: str) -> bool:
    """Whether a finished output satisfies its constraint."""
    c = CASES[case]
    if c["type"] == "json_schema":
        try:
            jsonschema.validate(json.loads(text), c["schema"])
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if c["type"] == "regex":
        return re.fullmatch(c["pattern"], text) is not None
    return text in c["choices"]


# ---------------------------------------------------------------------------------------
# One adapter per library: setup, compile, matcher, fill (into an int32 row), consume.
# ---------------------------------------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Any) -> None:
        import llguidance

        from models.grammar import Grammars

        self.version = llguidance.__version__
        self.g = Grammars(tok, VOCAB, tok.eos_id)
        _ = self.g.tokenizer  # the index is built here, timed as setup

    def compile(self, c: dict[str, Any]) -> Any:
        return self.g.grammar(c)

    def matcher(self, compiled: Any) -> Any:
        return self.g.matcher(compiled)

    def fill(self, m: Any, row: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * 4)

    def fill_batch(self, ms: list[Any], out: np.ndarray) -> None:
        out[:] = self.g.fill_masks(ms)

    def consume(self, m: Any, t: int) -> bool:
        return bool(m.consume_token(t))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Any) -> None:
        import torch
        import xgrammar as xgr

        self.torch, self.xgr = torch, xgr
        self.version = getattr(xgr, "__version__", None) or _dist_version("xgrammar")
        vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        vocab += [b""] * (VOCAB - len(vocab))
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB,
                                 stop_token_ids=[tok.eos_id])
        self.compiler = xgr.GrammarCompiler(info)

    def compile(self, c: dict[str, Any]) -> Any:
        if c["type"] == "json_schema":
            # (Its builtin JSON grammar accepts any JSON value, arrays included: an object
            # is the schema {"type": "object"}, as for the others.)
            return self.compiler.compile_json_schema(json.dumps(c["schema"]),
                                                     any_whitespace=False)
        if c["type"] == "regex":
            return self.compiler.compile_regex(c["pattern"])
        ebnf = "root ::= " + " | ".join(json.dumps(x) for x in c["choices"])
        return self.compiler.compile_grammar(ebnf)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, row: np.ndarray) -> None:
        t = self.torch.from_numpy(row).view(1, -1)
        m.fill_next_token_bitmask(t, 0)

    def fill_batch(self, ms: list[Any], out: np.ndarray) -> None:
        t = self.torch.from_numpy(out)
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(t, i)

    def consume(self, m: Any, t: int) -> bool:
        return bool(m.accept_token(t))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Any) -> None:
        import outlines_core as oc

        self.oc = oc
        self.version = _dist_version("outlines-core")
        self.eos = tok.eos_id
        ids: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i != tok.eos_id and (b := tok.token_bytes(i)):
                ids.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_id, ids)

    def compile(self, c: dict[str, Any]) -> Any:
        if c["type"] == "json_schema":
            # Its JSON support is a regex: compact (no optional whitespace), as the others.
            pattern = self.oc.json_schema.build_regex_from_schema(json.dumps(c["schema"]), "")
        elif c["type"] == "regex":
            pattern = c["pattern"]
        else:
            pattern = "|".join(re.escape(x) for x in c["choices"])
        return self.oc.Index(pattern, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, row: np.ndarray) -> None:
        row[:] = 0
        m.write_mask_into(row.ctypes.data, row.size, 4)

    def fill_batch(self, ms: list[Any], out: np.ndarray) -> None:
        for i, m in enumerate(ms):
            self.fill(m, out[i])

    def consume(self, m: Any, t: int) -> bool:
        try:
            m.advance(t, return_tokens=False)
        except (ValueError, RuntimeError, TypeError):
            return False
        return True


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _ids(row: np.ndarray) -> np.ndarray:
    return np.nonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB])[0]


def walk(lib: Any, compiled: Any, tok: Any, rng: random.Random, max_steps: int,
         lengths: np.ndarray, times: list[float]) -> tuple[str, list[int], bool]:
    """One random walk: ``(outcome, tokens, padded_leak)``; outcome is ``stop`` (EOS
    drawn), ``length`` (max_steps reached), ``dead`` (no token allowed) or ``rejected``
    (the library refused a token its own mask allowed)."""
    m = lib.matcher(compiled)
    row = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    out: list[int] = []
    leak = False
    for _ in range(max_steps):
        t0 = time.perf_counter()
        lib.fill(m, row)
        times.append(time.perf_counter() - t0)
        allowed = _ids(row)
        leak |= bool(allowed.size and allowed[-1] >= tok.vocab_size)
        if allowed.size == 0:
            return "dead", out, leak
        if tok.eos_id in allowed and rng.random() < 0.5:
            return "stop", out, leak
        # Short tokens: a uniform pick over 50k ids lands in long free-text tokens and
        # strings never close; structure is what is being tested.
        short = allowed[lengths[allowed] <= 2]
        pool = short if short.size else allowed
        pool = pool[pool != tok.eos_id] if pool.size > 1 else pool
        t = int(pool[rng.randrange(pool.size)])
        if t == tok.eos_id:
            return "stop", out, leak
        if not lib.consume(m, t):
            return "rejected", out, leak
        out.append(t)
    return "length", out, leak


def measure(make: Callable[[Any], Any], tok: Any, walks: int, max_steps: int,
            lengths: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        lib = make(tok)
    except ImportError as exc:
        return {"error": f"not installed: {exc}"}
    res: dict[str, Any] = {"version": lib.version,
                           "setup_s": round(time.perf_counter() - t0, 3), "cases": {}}
    for case, c in CASES.items():
        r: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            compiled = lib.compile(c)
            r["compile_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            t0 = time.perf_counter()
            for _ in range(10):
                lib.matcher(compiled)
            r["matcher_ms"] = round((time.perf_counter() - t0) * 100, 3)
        except Exception as exc:  # noqa: BLE001 - a library that cannot express it
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
            res["cases"][case] = r
            continue
        times: list[float] = []
        outcomes: dict[str, int] = {}
        bad: list[str] = []
        unfinished: list[str] = []
        leaks = 0
        rng = random.Random(0)
        for _ in range(walks):
            outcome, ids, leak = walk(lib, compiled, tok, rng, max_steps, lengths, times)
            leaks += leak
            text = tok.decode(ids)
            if outcome == "stop" and not valid(case, text):
                outcome = "stop_invalid"
                bad.append(text[:160])
            elif outcome != "stop":
                unfinished.append(text[:160])
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        us = sorted(t * 1e6 for t in times)
        r.update({
            "mask_us_mean": round(statistics.fmean(us), 1),
            "mask_us_p50": round(us[len(us) // 2], 1),
            "mask_us_p99": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
            "masks": len(us), "walks": outcomes, "padded_id_allowed": leaks,
            "invalid_examples": bad[:3], "unfinished_examples": unfinished[:2],
        })
        # One step for 64 sequences at their grammar's start (a batch of new requests).
        ms = [lib.matcher(compiled) for _ in range(64)]
        out = np.zeros((64, (VOCAB + 31) // 32), dtype=np.int32)
        t0 = time.perf_counter()
        for _ in range(5):
            lib.fill_batch(ms, out)
        r["batch64_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
        res["cases"][case] = r
        print(f"{lib.name:14s} {case:12s} {r}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--walks", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/grammar_cpu.json")
    args = p.parse_args(argv)
    tok = load_tokenizer(ROOT / "assets/20B_tokenizer.json")
    lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)]
                       + [0] * (VOCAB - tok.vocab_size))
    results = {name: measure(make, tok, args.walks, args.max_steps, lengths)
               for name, make in (("llguidance", LLGuidance), ("xgrammar", XGrammar),
                                  ("outlines-core", OutlinesCore))}
    doc = {
        "bench": "grammar_cpu", "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "tokenizer": "GPT-NeoX-20B (assets/20B_tokenizer.json), 50,277 ids",
        "vocab_rows": VOCAB, "walks_per_case": args.walks, "max_steps": args.max_steps,
        "results": results,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
