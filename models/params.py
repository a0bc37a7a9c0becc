"""Sampling parameters and stop handling: plain Python, no torch.

The scheduler (``models.engine.scheduler``) holds a request's :class:`SamplingParams` and
each sample's :class:`StopChecker`; keeping them free of torch lets the scheduler run,
and be tested, on plain data. :mod:`models.sampling` re-exports both next to the
device-side sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# The parameters themselves are written once, in the leaf package every layer may import
# (specs/sampling.py says why); here, where the scheduler and the sampler find them.
from specs.sampling import (  # noqa: E402, F401 - re-exported
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)

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

    def stable_text(self) -> str:
        """The beginning of the text that later tokens cannot change (what a stream may
        send already): without the characters a stop string could still claim, and
        without a trailing incomplete UTF-8 sequence."""
        if self.finished:
            return self.text
        if self._detok is not None:
            return "".join(self._parts)
        return self.tokenizer.decode(self.token_ids).rstrip("\ufffd")

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
