"""Typed records that travel between processes and the store.

:class:`ResultRow` is the one shape of a ``results`` row as code builds it: the worker
(a finished sequence, an engine error, a chunk that gave up), ingestion (a bad line run
as an item error) and tests all make one of these, and :func:`store.queries.insert_results`
writes them. Every column is present with its default, so one executemany takes a list
of them whatever built each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class ResultRow:
    """The outcome of one item: completions and timings, or ``error`` (``{code, message,
    param?, line?}``) when it failed. Timestamps are Unix seconds, as in the tables."""

    item_id: int
    batch_id: str
    index: int
    # [{index, text, finish_reason, logprobs}], one per sample (n > 1)
    choices: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None  # the first choice's text
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[Any] | None = None
    error: dict[str, Any] | None = None
    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    tokens_per_s: float | None = None
    worker_id: str | None = None
    attempt: int = 1

    @property
    def failed(self) -> bool:
        return self.error is not None

    def as_row(self) -> dict[str, Any]:
        """The column values, for an INSERT."""
        return asdict(self)
