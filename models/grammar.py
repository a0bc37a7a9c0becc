"""Constrained decoding: a grammar per request, a token mask per step.

A request's constraint (``SamplingParams.constraint``: a JSON Schema, a regex or a list
of choices) is compiled once per distinct constraint and gives each sample a
:class:`Matcher`. Before each step the sampler asks every constrained sample for the
tokens that keep its output a prefix of some match (a bitmask over the model's *padded*
vocabulary, 50,432 rows for the 20B, so no padding row can slip through); after the step
each matcher consumes the drawn token. When the grammar is complete the mask allows only
end-of-text, so a sample that ends with ``finish_reason: "stop"`` is a complete match.

Why xgrammar: bench/grammar_cpu.py measured it against llguidance and outlines-core on
this engine's tokenizer (bench/results/grammar_cpu.json). All three fill masks on the
host; xgrammar's are the cheapest per token (it precomputes, per grammar, the tokens
whose fate does not depend on the stack, so free JSON string content costs microseconds
where llguidance re-walks the vocabulary trie, hundreds of microseconds) and were valid
in every walk; outlines-core compiles JSON Schema to a regex that drops integer
bounds (outputs that violate ``minimum``/``maximum``) and needs seconds to index
``json_object``. Its costs: a heavier import (torch, transformers, tvm-ffi; imported on
the first constrained request only) and a compile step per schema (~10-20 ms, cached).

Plain Python and numpy here; the scheduler holds matchers, the sampler turns bitmasks
into a device tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from models.tokenizer import ByteTokenizer, Tokenizer


class Matcher:
    """One sample's position in its grammar."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner  # an xgrammar GrammarMatcher

    def consume(self, token_id: int) -> bool:
        """Advance past ``token_id``; False (state unchanged) if the grammar refuses it."""
        return bool(self.inner.accept_token(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete and end-of-text was consumed."""
        return bool(self.inner.is_terminated())


def vocabulary_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each logits row's bytes, as a grammar engine matches them: the token's text bytes;
    ``b""`` (never matchable) for special tokens other than end-of-text and for the
    padded rows past the tokenizer's vocabulary."""
    if isinstance(tokenizer, ByteTokenizer):
        special: set[int] = set()
    elif isinstance(tokenizer, Tokenizer):
        special = tokenizer.special_ids
    else:
        raise ValueError(f"structured output needs a tokenizer, got {tokenizer!r}")
    n = min(tokenizer.vocab_size, vocab_size)
    out = [b"" if i in special else tokenizer.token_bytes(i) for i in range(n)]
    return out + [b""] * (vocab_size - n)


class Grammars:
    """Compiles constraints and makes matchers for one tokenizer; one per engine.
    Nothing is built until the first constrained request (xgrammar's import and its
    tokenizer index take seconds).

    ``vocab_size``: the logits' width (the padded embedding); ``eos_id``: the one token
    that ends a match.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self._compiler: Any = None
        self._compiled: dict[str, Any] = {}  # constraint (as JSON) -> CompiledGrammar

    @property
    def compiler(self) -> Any:
        """xgrammar's compiler for this vocabulary (built on first use)."""
        if self._compiler is None:
            import xgrammar as xgr

            self._xgr = xgr
            info = xgr.TokenizerInfo(vocabulary_bytes(self._source, self.vocab_size),
                                     xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                     stop_token_ids=[self.eos_id])
            self._compiler = xgr.GrammarCompiler(info)
            self._batch = xgr.BatchGrammarMatcher()
        return self._compiler

    def factory(self, constraint: Mapping[str, Any] | None) -> Callable[[], Matcher] | None:
        """A maker of fresh matchers for a request's constraint (None: unconstrained);
        ``ValueError`` naming the field for a constraint that cannot be compiled."""
        if constraint is None:
            return None
        compiled = self.grammar(constraint)
        return lambda: Matcher(self._xgr.GrammarMatcher(compiled))

    def grammar(self, constraint: Mapping[str, Any]) -> Any:
        """The compiled grammar of a constraint; ``ValueError("<field>: why")`` if it is
        unusable (a schema feature xgrammar lacks, a regex with look-around)."""
        key = json.dumps(constraint, sort_keys=True, separators=(",", ":"))
        cached = self._compiled.get(key)
        if cached is not None:
            return cached
        kind = constraint.get("type")
        compiler = self.compiler
        try:
            if kind == "json_schema":
                # Compact JSON (no optional whitespace): a weak or random model given
                # free whitespace can spend its whole budget on it ("length", never
                # "stop").
                compiled = compiler.compile_json_schema(
                    json.dumps(constraint["schema"]), any_whitespace=False, strict_mode=True)
            elif kind == "regex":
                compiled = compiler.compile_regex(constraint["pattern"])
            elif kind == "choice":
                # EBNF string literals take JSON's escapes: any choice text is exact.
                compiled = compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c) for c in constraint["choices"]))
            else:
                raise ValueError(f"unknown constraint type {kind!r}")
        except (RuntimeError, ValueError, TypeError) as exc:
            # One line (it goes into a JSONL file), without the C++ log prefix
            # ("[11:10:29] /project/cpp/regex_converter.cc:94: ").
            why = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", " ".join(str(exc).split()))
            raise ValueError(f"{_field(kind)}: {why}") from None
        if len(self._compiled) > 1024:  # distinct constraints are few in practice
            self._compiled.clear()
        self._compiled[key] = compiled
        return compiled

    def fill_masks(self, matchers: Sequence[Matcher]) -> np.ndarray:
        """(len(matchers), words) int32 bitmasks: bit ``v % 32`` of word ``v // 32`` set
        when token ``v`` is allowed next; filled on xgrammar's threads when several."""
        import torch

        out = torch.zeros((len(matchers), self.words), dtype=torch.int32)
        if len(matchers) == 1:
            matchers[0].inner.fill_next_token_bitmask(out, 0)
        elif matchers:
            # One matcher listed twice must not be filled from two threads at once.
            first: dict[int, int] = {}
            rows = [first.setdefault(id(m), i) for i, m in enumerate(matchers)]
            unique = [i for i, r in enumerate(rows) if r == i]
            self._batch.batch_fill_next_token_bitmask(
                [matchers[i].inner for i in unique], out, unique)
            for i, r in enumerate(rows):
                if r != i:
                    out[i] = out[r]
        return out.numpy()


def _field(kind: object) -> str:
    return {"json_schema": "response_format", "regex": "regex", "choice": "choice"}.get(
        str(kind), "constraint")


def allowed_ids(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The allowed token ids of one bitmask row (tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(mask_row).view(np.uint8),
                         bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]
