"""Sampling parameters and stop handling: plain Python, no torch.

The scheduler (``models.engine.scheduler``) holds a request's :class:`SamplingParams` and
each sample's :class:`StopChecker`; keeping them free of torch lets the scheduler run,
and be tested, on plain data. :mod:`models.sampling` re-exports both next to the
device-side sampler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NoReturn, Protocol

# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------

MAX_STOP_STRINGS = 16  # OpenAI allows 4; more than a handful is a client bug, not a need
MAX_STOP_LENGTH = 256  # characters; each step scans (longest stop - 1) + new characters
MAX_STOP_TOKEN_IDS = 256
MAX_N = 128
MAX_LOGPROBS = 20  # OpenAI's limit for top alternatives per token
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # any value that folds into 64 bits

_INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "n")
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass
class SamplingParams:
    """How to sample one request. ``validate()`` runs on construction."""

    max_tokens: int = 64
    """Most tokens to generate per sample (>= 1); the context length may stop it earlier."""
    min_tokens: int = 0
    """EOS and ``stop_token_ids`` are banned, stop strings ignored, until this many tokens."""
    temperature: float = 1.0
    """Divides the logits (>= 0); 0 means greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep the k most likely tokens (ties at the k-th value kept); 0 or -1 = off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose mass reaches p (0 < p <= 1)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's ([0, 1])."""
    repetition_penalty: float = 1.0
    """CTRL/HF style (> 0): positive logits of prompt+output tokens are divided by it,
    negative ones multiplied."""
    presence_penalty: float = 0.0
    """OpenAI ([-2, 2]): subtracted once from the logit of every token in the output."""
    frequency_penalty: float = 0.0
    """OpenAI ([-2, 2]): subtracted per occurrence of the token in the output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample; excluded from the text. A single str is accepted."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sample (in addition to EOS); excluded from the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks); EOS is then an ordinary token."""
    seed: int | None = None
    """Per-request seed; None lets the engine pick one at arrival."""
    n: int = 1
    """Independent samples per prompt (1..128), sharing one prefill."""
    logprobs: int | None = None
    """Return each chosen token's logprob and this many top alternatives (0..20)."""

    def __post_init__(self) -> None:
        # Accept the forms clients commonly send; validate() then sees only lists.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    # -- validation ----------------------------------------------------------------------

    def validate(self) -> SamplingParams:
        """Raise ``ValueError("<field>: <what was expected>, got <value>")`` on the first
        bad field; return ``self`` so calls chain."""
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                _fail(name, "must be an integer", getattr(self, name))
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value):
                _fail(name, "must be a number", value)
            if not math.isfinite(value):
                _fail(name, "must be finite", value)
        if self.max_tokens < 1:
            _fail("max_tokens", "must be >= 1", self.max_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            _fail("min_tokens", f"must be between 0 and max_tokens ({self.max_tokens})",
                  self.min_tokens)
        if self.temperature < 0:
            _fail("temperature", "must be >= 0", self.temperature)
        if self.top_k < -1:
            _fail("top_k", "must be >= 1, or 0 or -1 to turn it off", self.top_k)
        if not 0 < self.top_p <= 1:
            _fail("top_p", "must be in (0, 1]", self.top_p)
        if not 0 <= self.min_p <= 1:
            _fail("min_p", "must be in [0, 1]", self.min_p)
        if self.repetition_penalty <= 0:
            _fail("repetition_penalty", "must be > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                _fail(name, "must be in [-2, 2]", getattr(self, name))
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            _fail("stop", "must be a string or a list of strings", self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"at most {MAX_STOP_STRINGS} strings", len(self.stop))
        for s in self.stop:
            if not s:
                _fail("stop", "strings must not be empty", s)
            if len(s) > MAX_STOP_LENGTH:
                _fail("stop", f"strings must be at most {MAX_STOP_LENGTH} characters",
                      len(s))
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            _fail("stop_token_ids", "must be a list of non-negative integers",
                  self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            _fail("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids",
                  len(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", "must be true or false", self.ignore_eos)
        if self.seed is not None and not (
            _is_int(self.seed) and _SEED_MIN <= self.seed <= _SEED_MAX
        ):
            _fail("seed", "must be a 64-bit integer or null", self.seed)
        if not 1 <= self.n <= MAX_N:
            _fail("n", f"must be between 1 and {MAX_N}", self.n)
        if self.logprobs is not None and not (
            _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            _fail("logprobs", f"must be an integer between 0 and {MAX_LOGPROBS} or null",
                  self.logprobs)
        return self

    # -- conversion ----------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Build and validate from a request's fields, over optional batch-level defaults.

        Unknown keys (in ``d`` or ``defaults``) are an error that names them. A ``null``
        value means "not given": the default (batch-level, then the field's own) applies,
        as OpenAI's API treats it.
        """
        known = {f.name for f in fields(cls)}
        merged: dict[str, Any] = {}
        for source in (defaults or {}, d):
            if not isinstance(source, Mapping):
                raise ValueError(f"sampling parameters: must be an object, got {source!r}")
            unknown = sorted(str(k) for k in source if k not in known)
            if unknown:
                names = ", ".join(unknown)
                raise ValueError(f"{names}: unknown sampling parameter"
                                 f"{'s' if len(unknown) > 1 else ''}")
            merged.update({k: v for k, v in source.items() if v is not None})
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(p.to_dict()) == p``."""
        return asdict(self)

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """True when any of the three penalties changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fail(name: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{name}: {expected}, got {got!r}")


# ---------------------------------------------------------------------------------------
# Detokenizing and stopping
# ---------------------------------------------------------------------------------------


class Decoder(Protocol):
    """What stop handling needs from a tokenizer."""

    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing token list into text, one token at a time, in O(window) per step.

    The prefix-offset technique (TGI, vLLM): decode ``tokens[prefix:]`` and
    ``tokens[prefix:read]``; the difference is the new text. Byte-level BPE can split a
    character over several tokens, which decodes to U+FFFD until the last byte arrives,
    so text ending in U+FFFD is held back. The concatenated deltas equal
    ``decode(tokens)`` once :meth:`flush` has run.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] were decoded into already-emitted text
        self._read = 0

    def append(self, token_id: int) -> str:
        """Add one token; return the text that became final (maybe "")."""
        self.tokens.append(token_id)
        window = self.tokens[self._prefix :]
        prefix_text = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        text = self.tokenizer.decode(window)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            delta = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character decodes to U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.tokens[self._prefix : self._read])
        text = self.tokenizer.decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return text[len(prefix_text) :]


class StopChecker:
    """Per sample: appends tokens, decides when it ends and with what text.

    ``token_ids`` keeps every generated token (they were computed and count as
    completion tokens); the text excludes EOS, a stop token and a stop string with
    everything after it. Requests without stop strings are not detokenized until the
    end (:meth:`text` decodes once).
    """

    def __init__(self, params: SamplingParams, tokenizer: Decoder, *,
                 eos_id: int | None) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self.eos_id = None if params.ignore_eos else eos_id
        self.stop_ids = set(params.stop_token_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        """The stop string or token id that ended the sample, if any."""
        self._text_tokens: int | None = None  # tokens that make the text, once finished
        self._detok = IncrementalDetokenizer(tokenizer) if params.stop else None
        self._keep = max((len(s) for s in params.stop), default=1) - 1
        self._parts: list[str] = []  # emitted text, except the last `_keep` chars
        self._tail = ""
        self._final_text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> str | None:
        """Record one generated token; return "stop" or "length" if the sample ends."""
        if self.finished:
            raise RuntimeError("StopChecker: sample already finished")
        self.token_ids.append(token_id)
        n = len(self.token_ids)
        # min_tokens is enforced by banning in sample(); a stop id seen anyway (e.g. a
        # caller that sampled elsewhere) still ends the sample.
        if token_id == self.eos_id or token_id in self.stop_ids:
            return self._finish("stop", n - 1, token_id)
        if self._detok is not None:
            delta = self._detok.append(token_id)
            if delta and self._push(delta, search=n >= self.params.min_tokens):
                return self.finish_reason
        if n >= self.params.max_tokens:
            return self._finish("length", n)
        return None

    def finish_length(self) -> str:
        """End the sample from outside (context full): reason "length"."""
        return self._finish("length", len(self.token_ids))

    def finish_abort(self) -> str:
        """End the sample because its request was aborted."""
        return self._finish("abort", len(self.token_ids))

    @property
    def text(self) -> str:
        """The sample's text so far (final once finished)."""
        if self._final_text is not None:
            return self._final_text
        end = len(self.token_ids) if self._text_tokens is None else self._text_tokens
        if self._detok is None:
            text = self.tokenizer.decode(self.token_ids[:end])
        else:
            text = "".join(self._parts) + self._tail
        if self.finished:
            self._final_text = text
        return text

    def _finish(self, reason: str, text_tokens: int, what: str | int | None = None) -> str:
        self.finish_reason = reason
        self.stop_reason = what
        self._text_tokens = text_tokens
        if self._detok is not None and self._final_text is None:
            # Emit what the detokenizer held back (a stop token never reached it).
            rest = self._detok.flush()
            if rest and self._push(rest, search=len(self.token_ids) >= self.params.min_tokens,
                                   finishing=True):
                return self.finish_reason or reason
        return reason

    def _push(self, delta: str, *, search: bool, finishing: bool = False) -> bool:
        """Add new text; on a stop string, truncate and finish. True if stopped."""
        window = self._tail + delta
        if search:
            hits = [(i, s) for s in self.params.stop if (i := window.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                self._final_text = "".join(self._parts) + window[:i]
                self.finish_reason, self.stop_reason = "stop", s
                return True
        if finishing or len(window) <= self._keep:
            self._tail = window
        else:
            cut = len(window) - self._keep
            self._parts.append(window[:cut])
            self._tail = window[cut:]
        return False


def decode_output(tokenizer: Decoder, token_ids: Sequence[int], params: SamplingParams,
                  *, eos_id: int | None) -> str:
    """Text of a finished sample that had no stop strings: one decode, dropping a final
    EOS or stop token."""
    ids = list(token_ids)
    if ids and ((ids[-1] == eos_id and not params.ignore_eos)
                or ids[-1] in params.stop_token_ids):
        ids.pop()
    return tokenizer.decode(ids)
