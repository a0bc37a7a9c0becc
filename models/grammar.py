"""Constrained decoding: a grammar per request, a token mask per step.

A request's constraint (``SamplingParams.constraint``: a JSON Schema, a regex or a list
of choices) becomes an llguidance matcher per sample. Before each step the sampler asks
every constrained sample for the set of tokens that keep its output a prefix of some
match (a bitmask over the model's *padded* vocabulary, 50,432 for the 20B, so that no
padding row can slip through); after the step each matcher consumes the drawn token.
When the grammar is complete the mask allows only end-of-text, so a sample that ends with
``finish_reason: "stop"`` is a complete match.

Why llguidance: bench/grammar_cpu.py measured it against xgrammar and outlines-core on
this engine's tokenizer (bench/results/grammar_cpu.json), following random walks through
each grammar. It was the only one whose every finished walk was valid: xgrammar let an
unescaped control character into a JSON string (``json.loads`` refuses it) and
outlines-core, which compiles a schema to a regex, ignores integer bounds. xgrammar's
masks are cheaper (p50 ~8 µs against ~25 µs; llguidance pays hundreds of µs, with
millisecond spikes, inside free JSON strings), which the engine absorbs by filling masks
on the host while the device runs the step's forward, for constrained rows only, on
llguidance's thread pool. It is also one Rust wheel with no dependencies (xgrammar
brings torch, transformers, triton and tvm-ffi), needs no per-schema compile step and
validates schemas and regexes itself, so a bad one is a per-request ``ValueError``.

Plain Python and numpy, no torch: the scheduler holds matchers; the sampler turns the
bitmasks into a device tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from models.tokenizer import ByteTokenizer, Tokenizer


class _ByteTokens:
    """llguidance's view of :class:`ByteTokenizer`: each id's bytes."""

    def __init__(self, tok: ByteTokenizer, vocab_size: int) -> None:
        self.eos_token_id = tok.eos_id
        self.bos_token_id = None
        self.tokens = [bytes([i - tok.offset]) if tok.offset <= i < tok.offset + 256
                       and i != tok.eos_id else b"" for i in range(vocab_size)]
        self.tokens[tok.eos_id] = b"<|endoftext|>"
        self.special_token_ids = [tok.eos_id]
        self.is_tokenizer_wrapper = True
        self._tok = tok

    def __call__(self, s: str | bytes) -> list[int]:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        return [b + self._tok.offset for b in data]


class Grammars:
    """Builds matchers for one tokenizer and vocabulary; one per engine. Nothing is
    loaded until the first constrained request (llguidance's tokenizer takes ~0.5 s).

    ``vocab_size``: the logits' width (the padded embedding); ids past the tokenizer's
    own vocabulary are never allowed. ``eos_id``: the one token that ends a match.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self._tokenizer: Any = None
        self._grammars: dict[str, str] = {}  # constraint (as JSON) -> llguidance grammar
        self._templates: dict[str, Any] = {}  # grammar -> a fresh matcher, never advanced

    @property
    def tokenizer(self) -> Any:
        """llguidance's tokenizer (built on first use)."""
        if self._tokenizer is None:
            import llguidance  # only engines that see a constrained request need it

            self._ll = llguidance
            tok, n, eos = self._source, self.vocab_size, self.eos_id
            if isinstance(tok, ByteTokenizer):
                wrapped: Any = llguidance.TokenizerWrapper(_ByteTokens(tok, n))
                self._tokenizer = llguidance.LLTokenizer(wrapped, n_vocab=n, eos_token=eos)
            elif isinstance(tok, Tokenizer) and tok.path is not None:
                text = Path(tok.path).read_text(encoding="utf-8")
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=n, eos_token=eos)
            else:
                raise ValueError(f"structured output needs a tokenizer, got {tok!r}")
            self._executor = llguidance.LLExecutor()
        return self._tokenizer

    def factory(self, constraint: Mapping[str, Any] | None) -> Callable[[], Any] | None:
        """A maker of fresh matchers for a request's constraint (None: unconstrained);
        ``ValueError`` naming the field for a grammar that cannot be used."""
        if constraint is None:
            return None
        grammar = self.grammar(constraint)
        return partial(self.matcher, grammar)

    def grammar(self, constraint: Mapping[str, Any]) -> str:
        """llguidance's grammar text for a constraint; ``ValueError`` if it is unusable
        (a schema feature it does not support, a regex Rust's engine refuses)."""
        key = json.dumps(constraint, sort_keys=True, separators=(",", ":"))
        cached = self._grammars.get(key)
        if cached is not None:
            return cached
        kind = constraint.get("type")
        tokenizer = self.tokenizer
        ll = self._ll
        try:
            if kind == "json_schema":
                # Compact JSON (no optional whitespace): a weak or random model given
                # free whitespace can spend its whole budget on it ("length", never
                # "stop"). A schema's own "x-guidance" options still apply over this.
                grammar = ll.LLMatcher.grammar_from_json_schema(
                    constraint["schema"], defaults={"whitespace_flexible": False})
            elif kind == "regex":
                grammar = ll.grammar_from("regex", constraint["pattern"])
            elif kind == "choice":
                # Lark string literals take JSON's escapes: any choice text is exact.
                grammar = ll.grammar_from("lark", "start: " + " | ".join(
                    json.dumps(c) for c in constraint["choices"]))
            else:
                raise ValueError(f"unknown constraint type {kind!r}")
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{_field(kind)}: {exc}") from None
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            why = " ".join(" ".join(messages).split())  # one line: it goes into a JSONL file
            raise ValueError(f"{_field(kind)}: {why}")
        if len(self._grammars) > 4096:  # distinct constraints are few in practice
            self._grammars.clear()
        self._grammars[key] = grammar
        return grammar

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher (one per sample) for a grammar from :meth:`grammar`: a copy of
        one kept unused per grammar (about 1 µs, where building one parses the grammar
        again: about 0.5 ms, half a second per thousand samples)."""
        template = self._templates.get(grammar)
        if template is None:
            template = self._ll.LLMatcher(self.tokenizer, grammar)
            if template.is_error():
                raise ValueError(f"structured output: {template.get_error()}")
            if len(self._templates) > 4096:
                self._templates.clear()
            self._templates[grammar] = template
        return template.deep_copy()

    def fill_masks(self, matchers: Sequence[Any]) -> np.ndarray:
        """(len(matchers), words) int32 bitmasks: bit ``v % 32`` of word ``v // 32`` set
        when token ``v`` is allowed next. Computed in parallel on llguidance's threads
        (the GIL is released) when there are several."""
        # A matcher listed twice (a fork's row and its source's) is computed once: the
        # parallel call may not borrow one matcher from two threads.
        first: dict[int, int] = {}
        rows = [first.setdefault(id(m), i) for i, m in enumerate(matchers)]
        unique = [(m, i) for i, m in enumerate(matchers) if rows[i] == i]
        out = np.zeros((len(matchers), self.words), dtype=np.int32)
        if len(unique) == 1:
            unique[0][0].unsafe_compute_mask_ptr(out[unique[0][1]].ctypes.data, self.words * 4)
        elif unique:
            self._executor.unsafe_compute_mask_ptr(unique, out.ctypes.data, self.words * 4,
                                                   len(matchers))
        for i, src in enumerate(rows):
            if src != i:
                out[i] = out[src]
        return out


def _field(kind: object) -> str:
    return {"json_schema": "response_format", "regex": "regex", "choice": "choice"}.get(
        str(kind), "constraint")


def allowed_ids(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The allowed token ids of one bitmask row (tests and debugging)."""
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]
