"""Training data: files validated line by line, tokenized, loss-masked and packed.

A training file is one of

- **chat** JSONL, OpenAI's fine-tuning format: ``{"messages": [{"role": "system" |
  "user" | "assistant", "content": str | [{"type": "text", "text": str}, ...],
  "weight"?: 0 | 1}, ...]}`` — loss on assistant messages (those with ``weight`` 1, the
  default) and the end-of-text token that closes each of them;
- **prompt/completion** JSONL, OpenAI's legacy format: ``{"prompt": str, "completion":
  str}`` — loss on the completion and the end-of-text token after it;
- **text** JSONL: ``{"text": str}`` — continued pre-training, loss on every token;
- **plain text** (any other suffix): the whole file is one stream for continued
  pre-training, cut into pieces of ``max_length`` tokens.

The format is set by the first line; every line must have it. Every example ends with
the end-of-text token. Bad lines are reported together, each with its line number and
field, before anything is trained. An example longer than ``max_length`` tokens is
refused (``overlong="error"``, the default), cut to ``max_length`` (``"truncate"``:
the end is dropped, so a prompt/completion keeps its prompt), or — text lines only —
cut into several examples (``"split"``).

Examples are packed into rows of ``max_length`` tokens (best fit, largest first), never
split across rows; each token carries its document's index in the row so that attention
stays within documents (:class:`models.model.PackedAttention`), and positions restart at
0 with each document.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.tokenizer import Tokenizer
from specs.training import CHAT_ROLES, check_lines

IGNORE = -100  # target of a token that carries no loss (torch's cross_entropy default)
OVERLONG = ("error", "truncate", "split")
MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """A training file cannot be used; the message names the file, line and field."""


@dataclass
class Example:
    """One document: token ids and, per token, whether predicting it carries loss."""

    tokens: list[int]
    loss: list[bool]
    line: int  # where it came from (1-based; 0 for a plain-text stream)


# ---------------------------------------------------------------------------- chat rendering


def render_chat(messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Messages as (text, carries loss) pieces in neoxq's plain chat template.

    Base GPT-NeoX models have no chat template of their own, so this one is plain text::

        System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}<|endoftext|>

    The end-of-text token closing each assistant message is a piece of its own that
    becomes the tokenizer's EOS id (never the text ``<|endoftext|>`` tokenized). To
    generate with a model trained on it, prompt with the conversation so far followed by
    ``"Assistant:"`` (:func:`chat_prompt`).
    """
    pieces: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        weight = m["role"] == "assistant" and m.get("weight", 1) == 1
        if i:
            pieces.append(("\n\n", False))
        pieces.append((f"{CHAT_ROLES[m['role']]}:", False))
        pieces.append((" " + _content_text(m["content"]), weight))
        if m["role"] == "assistant":
            pieces.append((_EOS, weight))
    return pieces


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt that asks a model trained on :func:`render_chat` for the next assistant
    message (end-of-text tokens between turns are written as ``<|endoftext|>``)."""
    text = "".join("<|endoftext|>" if t == _EOS else t for t, _ in render_chat(messages))
    return text + "\n\nAssistant:" if text else "Assistant:"


_EOS = "\x00<eos>\x00"  # marker for "the tokenizer's end-of-text id goes here"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


# ------------------------------------------------------------------------------ validation
# The per-line rules live in specs.training (the API checks uploads with them too).


def _pieces(fmt: str, obj: dict[str, Any]) -> list[tuple[str, bool]]:
    if fmt == "chat":
        return render_chat(obj["messages"])
    if fmt == "prompt_completion":
        return [(obj["prompt"], False), (obj["completion"], True), (_EOS, True)]
    return [(obj["text"], True), (_EOS, True)]


class _Errors:
    def __init__(self, path: Path) -> None:
        self.path, self.items, self.count = path, [], 0

    def add(self, line: int, msg: str) -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED_ERRORS:
            self.items.append(f"{self.path}:{line}: {msg}")

    def raise_if_any(self) -> None:
        if self.count:
            more = self.count - len(self.items)
            tail = f"\n(and {more} more bad lines)" if more else ""
            raise DataError(f"{self.count} bad line(s) in {self.path}:\n"
                            + "\n".join(self.items) + tail)


# ------------------------------------------------------------------------------- reading


def read_examples(
    path: str | Path, tokenizer: Tokenizer, max_length: int, overlong: str = "error"
) -> tuple[str, list[Example]]:
    """Read, validate and tokenize a training file; returns (format, examples).

    Raises :class:`DataError` listing every bad line (up to 20) with its line number.
    """
    path = Path(path)
    if overlong not in OVERLONG:
        raise DataError(f"overlong: expected one of {', '.join(OVERLONG)}, got {overlong!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty (no training examples)")
    if path.suffix not in (".jsonl", ".json"):
        return "plain_text", _plain_text(path, raw, tokenizer, max_length)

    errors = _Errors(path)
    checked = check_lines(raw.split(b"\n"))
    for bad in checked.bad:
        errors.add(bad.line, bad.message)
    fmt, parsed = checked.format, checked.good
    errors.raise_if_any()
    assert fmt is not None
    if overlong == "split" and fmt != "text":
        raise DataError(f"{path}: overlong='split' applies to text lines only; a {fmt} "
                        "example cannot be split (use 'truncate' or 'error')")

    examples = _tokenize(fmt, parsed, tokenizer)
    out: list[Example] = []
    for ex in examples:
        n = len(ex.tokens)
        if n > max_length:
            if overlong == "error":
                errors.add(ex.line, f"{n} tokens, longer than max_length {max_length} "
                           "(raise --max-length, or pass --overlong truncate)")
                continue
            if overlong == "split":
                out.extend(_split(ex.tokens, ex.loss, max_length, ex.line))
                continue
            ex = Example(ex.tokens[:max_length], ex.loss[:max_length], ex.line)
            if not any(ex.loss[1:]):
                errors.add(ex.line, f"nothing left to train on after truncating to "
                           f"max_length {max_length} (the prompt alone fills it)")
                continue
        out.append(ex)
    errors.raise_if_any()
    return fmt, out


def _tokenize(fmt: str, parsed: list[tuple[int, dict[str, Any]]],
              tokenizer: Tokenizer) -> list[Example]:
    per_line = [_pieces(fmt, obj) for _, obj in parsed]
    # One batched call: the Rust tokenizer encodes the pieces of all lines in parallel.
    # Pieces are encoded separately so that loss boundaries fall exactly between tokens
    # (as generation sees them: prompt tokens, then the completion's own tokens).
    texts = [t for pieces in per_line for t, _ in pieces if t != _EOS]
    encoded = iter(tokenizer.encode_batch(texts))
    examples = []
    for (lineno, _), pieces in zip(parsed, per_line, strict=True):
        tokens: list[int] = []
        loss: list[bool] = []
        for text, weight in pieces:
            ids = [tokenizer.eos_id] if text == _EOS else next(encoded)
            tokens += ids
            loss += [weight] * len(ids)
        examples.append(Example(tokens, loss, lineno))
    return examples


def _split(tokens: list[int], loss: list[bool], n: int, line: int) -> list[Example]:
    pieces = []
    for s in range(0, len(tokens), n):
        if len(tokens) - s >= 2:  # a 1-token piece predicts nothing
            pieces.append(Example(tokens[s:s + n], loss[s:s + n], line))
    return pieces


def _plain_text(path: Path, raw: bytes, tokenizer: Tokenizer, max_length: int) -> list[Example]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {exc.start})") from None
    tokens = tokenizer.encode(text) + [tokenizer.eos_id]
    return _split(tokens, [True] * len(tokens), max_length, 0)


# ------------------------------------------------------------------------------- packing


@dataclass
class PackedData:
    """Rows of ``max_length`` tokens, each holding whole documents, as numpy arrays.

    ``targets[r, j]`` is the token predicted at ``(r, j)`` — the next token of the same
    document when it carries loss — else ``IGNORE``; ``segments`` numbers the documents
    of a row (-1 for padding) and ``positions`` restart at 0 with each document.
    """

    tokens: np.ndarray  # (R, S) int64
    targets: np.ndarray  # (R, S) int64
    positions: np.ndarray  # (R, S) int64
    segments: np.ndarray  # (R, S) int64
    num_documents: int

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.tokens.shape[1])

    def num_targets(self, rows: np.ndarray) -> int:
        """Tokens carrying loss in these rows (-1 stands for an empty row)."""
        rows = rows[rows >= 0]
        return int((self.targets[rows] != IGNORE).sum())

    def num_tokens(self, rows: np.ndarray) -> int:
        """Real (non-padding) tokens in these rows."""
        rows = rows[rows >= 0]
        return int((self.segments[rows] >= 0).sum())


def pack(examples: Sequence[Example], max_length: int, pad_id: int = 0) -> PackedData:
    """Pack documents into rows best-fit-decreasing (deterministic: ties keep file order)."""
    if not examples:
        raise DataError("no training examples")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].tokens))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        n = len(examples[i].tokens)
        if n > max_length:
            raise DataError(f"line {examples[i].line}: {n} tokens > max_length {max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 1:  # a row with one free slot cannot take a useful document
            bisect.insort(free, (space - n, r))
    shape = (len(rows), max_length)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    for r, docs in enumerate(rows):
        at = 0
        for seg, i in enumerate(sorted(docs)):
            ex = examples[i]
            n = len(ex.tokens)
            t = np.asarray(ex.tokens, dtype=np.int64)
            tokens[r, at:at + n] = t
            positions[r, at:at + n] = np.arange(n)
            segments[r, at:at + n] = seg
            keep = np.asarray(ex.loss[1:], dtype=bool)
            targets[r, at:at + n - 1] = np.where(keep, t[1:], IGNORE)
            at += n
    return PackedData(tokens, targets, positions, segments, len(examples))


def load_dataset(
    path: str | Path, tokenizer: Tokenizer, max_length: int, overlong: str = "error"
) -> tuple[str, PackedData]:
    """:func:`read_examples` then :func:`pack`; returns (format, packed rows)."""
    fmt, examples = read_examples(path, tokenizer, max_length, overlong)
    if not examples:
        raise DataError(f"{path}: no training examples")
    packed = pack(examples, max_length, pad_id=tokenizer.eos_id)
    if not packed.num_targets(np.arange(packed.num_rows)):
        raise DataError(f"{path}: no token carries loss")
    return fmt, packed


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows of one epoch in training order: a permutation fixed by (seed, epoch), so a
    resumed run sees exactly the batches the interrupted one would have."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_rows(order: np.ndarray, batch: int, index: int) -> np.ndarray:
    """Row indices of global batch ``index`` of an epoch; a short last batch is filled
    with -1 (empty rows that carry no loss, so the step's mean is over real tokens)."""
    rows = order[index * batch:(index + 1) * batch]
    if len(rows) < batch:
        rows = np.concatenate([rows, np.full(batch - len(rows), -1, dtype=rows.dtype)])
    return rows


def steps_per_epoch(num_rows: int, batch: int) -> int:
    return math.ceil(num_rows / batch)
