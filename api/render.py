"""Store rows to API shapes: batch objects (native and OpenAI) and JSONL result lines.

Pure functions over rows already read; the routes stream the lines out page by page.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from api.schemas import (
    BatchErrorData,
    BatchErrors,
    BatchStatus,
    BatchUsage,
    Counts,
    FileObject,
    FineTuningCheckpointObject,
    FineTuningEventObject,
    FineTuningJobObject,
    LineErrorOut,
    OpenAIBatch,
    RequestCounts,
    Tokens,
)
from core.jsonl import CHAT_URL, ECHO, SAMPLING_DEFAULTS
from specs.status import ACTIVE
from store.jobs import event_id
from store.registry import fine_tuned_name
from store.tables import (
    Batch,
    File,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    Item,
    Result,
)


def _int(t: float | None) -> int | None:
    return int(t) if t is not None else None


def _text(value: Any) -> Any:
    """``value`` with every string made encodable: rows written before input was checked
    for lone surrogates may hold some, and one such row must not turn every listing of
    its owner into a 500 (the response encoder refuses them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def _line_errors(batch: Batch) -> list[dict[str, Any]]:
    return [_text(e) for e in (batch.errors or []) if isinstance(e, dict)]


def _run_seconds(batch: Batch) -> float | None:
    """How long a finished batch generated: from in_progress to its end."""
    end = batch.finalizing_at or batch.completed_at or batch.failed_at or batch.cancelled_at
    if batch.in_progress_at is None or end is None or end <= batch.in_progress_at:
        return None
    return end - batch.in_progress_at


def batch_rates(batch: Batch, *, tokens_per_s: float = 0.0, inflight_tokens: float = 0,
                inflight_items: float = 0, inflight_budget: float = 0
                ) -> tuple[float, float, float | None]:
    """``(tokens/s, items/s, ETA s)`` of a batch: the one definition behind the status
    route, the CLI's progress bar and the dashboard (``/metrics`` sums the same workers'
    figures).

    While it runs, ``tokens_per_s`` is what the live workers report generating for it
    (counted as tokens are generated, over the last 10 s: worker/meter.py), and the ETA is
    the work left at that rate: pending items times the tokens an item takes (the mean of
    its finished items; before any finished, the max_tokens of those in flight, else the
    batch's), minus the tokens already generated for items in flight. Once finished, the
    whole run's average, and ETA 0."""
    done = batch.request_completed + batch.request_failed
    pending = max(batch.request_total - done, 0)
    if batch.status not in ACTIVE:
        secs = _run_seconds(batch)
        if secs is None:
            return 0.0, 0.0, 0.0 if not pending else None
        return batch.completion_tokens / secs, done / secs, 0.0 if not pending else None
    if batch.request_completed:
        per_item = batch.completion_tokens / batch.request_completed
    elif inflight_items:
        per_item = inflight_budget / inflight_items
    else:
        per_item = float((batch.defaults or {}).get("max_tokens")
                         or SAMPLING_DEFAULTS["max_tokens"])
    items_per_s = tokens_per_s / per_item if per_item else 0.0
    if not pending:
        return tokens_per_s, items_per_s, 0.0
    if tokens_per_s <= 0:
        return 0.0, 0.0, None
    remaining = max(pending * per_item - inflight_tokens, 0.0)
    return tokens_per_s, items_per_s, remaining / tokens_per_s


def native_batch(batch: Batch, waiting: str | None = None, **live: float) -> BatchStatus:
    """A batch as the native API shows it, with progress, rates and ETA (``live``: what
    the workers report generating for it, :func:`batch_rates`) and ``waiting``: why it
    makes no progress (no live worker serves its model)."""
    done = batch.request_completed + batch.request_failed
    pending = max(batch.request_total - done, 0)
    tokens_per_s, items_per_s, eta = batch_rates(batch, **live)
    errors = _line_errors(batch)
    return BatchStatus(
        id=batch.id, status=batch.status, format=batch.format, endpoint=batch.endpoint,
        model=batch.model, waiting=waiting,
        counts=Counts(total=batch.request_total, completed=batch.request_completed,
                      failed=batch.request_failed, pending=pending),
        progress=done / batch.request_total if batch.request_total else 0.0,
        tokens=Tokens(prompt=batch.prompt_tokens, completion=batch.completion_tokens),
        tokens_per_s=round(tokens_per_s, 3), items_per_s=round(items_per_s, 3),
        eta_s=None if eta is None else round(eta, 1),
        created_at=batch.created_at, in_progress_at=batch.in_progress_at,
        finalizing_at=batch.finalizing_at, completed_at=batch.completed_at,
        failed_at=batch.failed_at, cancelling_at=batch.cancelling_at,
        cancelled_at=batch.cancelled_at, expires_at=batch.expires_at,
        input_file_id=batch.input_file_id, output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id, defaults=_text(batch.defaults or {}),
        metadata=_text(batch.metadata_ or {}),
        errors=[LineErrorOut(line=e.get("line"), param=e.get("param"),
                             code=str(e.get("code")), message=str(e.get("message")))
                for e in errors] if batch.errors is not None else None,
    )


def openai_batch(batch: Batch) -> OpenAIBatch:
    """A batch as OpenAI's Batch object."""
    errors = _line_errors(batch)
    return OpenAIBatch(
        id=batch.id, endpoint=batch.endpoint, model=batch.model,
        errors=BatchErrors(data=[BatchErrorData(code=e.get("code"), message=e.get("message"),
                                                param=e.get("param"), line=e.get("line"))
                                 for e in errors]) if errors else None,
        input_file_id=batch.input_file_id or "", completion_window=batch.completion_window,
        status=batch.status,  # type: ignore[arg-type]  # the store uses OpenAI's names
        output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
        created_at=int(batch.created_at), in_progress_at=_int(batch.in_progress_at),
        expires_at=_int(batch.expires_at), finalizing_at=_int(batch.finalizing_at),
        completed_at=_int(batch.completed_at), failed_at=_int(batch.failed_at),
        expired_at=_int(batch.expired_at), cancelling_at=_int(batch.cancelling_at),
        cancelled_at=_int(batch.cancelled_at),
        request_counts=RequestCounts(total=batch.request_total,
                                     completed=batch.request_completed,
                                     failed=batch.request_failed),
        metadata={str(k): str(v) for k, v in _text(batch.metadata_ or {}).items()} or None,
        usage=BatchUsage(input_tokens=batch.prompt_tokens, output_tokens=batch.completion_tokens,
                         total_tokens=batch.prompt_tokens + batch.completion_tokens),
    )


def file_object(f: File) -> FileObject:
    """A file row as OpenAI's File object."""
    return FileObject(id=f.id, bytes=f.bytes, created_at=int(f.created_at),
                      filename=f.filename, purpose=f.purpose, status=f.status)


def fine_tuning_job(job: FineTuningJob) -> FineTuningJobObject:
    """OpenAI's ``fine_tuning.job`` object; ``method.neoxq`` holds neoxq's options."""
    hp = dict(job.hyperparameters or {})
    return FineTuningJobObject(
        id=job.id, created_at=int(job.created_at), error=job.error,
        fine_tuned_model=job.fine_tuned_model, finished_at=_int(job.finished_at),
        hyperparameters=hp, model=job.model, organization_id=job.owner, result_files=[],
        seed=job.seed, status=job.status, trained_tokens=job.trained_tokens,
        training_file=job.training_file, validation_file=job.validation_file,
        metadata=_text(job.metadata_) or None,
        method={"type": "supervised", "supervised": {"hyperparameters": hp},
                "neoxq": dict(job.options or {})},
        user_provided_suffix=job.suffix)


def fine_tuning_event(ev: FineTuningEvent) -> FineTuningEventObject:
    """OpenAI's ``fine_tuning.job.event``."""
    return FineTuningEventObject(id=event_id(ev), created_at=int(ev.created_at),
                                 level=ev.level, message=_text(ev.message), type=ev.type,
                                 data=ev.data)


def fine_tuning_checkpoint(ck: FineTuningCheckpoint, job: FineTuningJob
                           ) -> FineTuningCheckpointObject:
    """OpenAI's ``fine_tuning.job.checkpoint``: named after the model the job makes."""
    name = fine_tuned_name(base=job.model, suffix=job.suffix, job_id=job.id)
    return FineTuningCheckpointObject(
        id=ck.id, created_at=int(ck.created_at), fine_tuning_job_id=job.id,
        fine_tuned_model_checkpoint=f"{name}:ckpt-step-{ck.step}",
        metrics={"step": ck.step, **(ck.metrics or {})}, step_number=ck.step)


def _usage(r: Result) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


# Characters that JSON leaves raw but that line-splitting readers (Python's
# str.splitlines, JavaScript's old line terminators) take for line breaks: escaped, so
# one result is always one line whatever the model generated.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _dump(obj: dict[str, Any]) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    # Lone surrogates (generated text cut mid-pair) cannot be UTF-8: replaced, not a 500.
    return text.translate(_LINE_BREAKS).encode("utf-8", "replace") + b"\n"


def native_result_line(item: Item, r: Result) -> bytes:
    """One line of ``GET /batches/{id}/results``."""
    out: dict[str, Any] = {
        "custom_id": item.custom_id, "index": item.index, "line": item.line_number,
        "text": r.text, "finish_reason": r.finish_reason, "usage": _usage(r),
        "timings": {"queued_at": r.queued_at, "started_at": r.started_at,
                    "first_token_at": r.first_token_at, "finished_at": r.finished_at,
                    "tokens_per_s": r.tokens_per_s, "worker_id": r.worker_id,
                    "attempt": r.attempt},
    }
    if r.choices and len(r.choices) > 1:
        out["choices"] = r.choices
    if r.logprobs is not None:
        out["logprobs"] = r.logprobs
    return _dump(out)


def native_error_line(item: Item, r: Result) -> bytes:
    """One line of ``GET /batches/{id}/errors`` for a failed item."""
    err = r.error or {}
    return _dump({"line": item.line_number, "index": item.index, "custom_id": item.custom_id,
                  "param": err.get("param"), "code": err.get("code", "error"),
                  "message": err.get("message", "")})


def file_error_line(e: dict[str, Any]) -> bytes:
    """A file-level error (the whole file was refused) as an errors line."""
    return _dump({"line": e.get("line"), "index": None, "custom_id": None,
                  "param": e.get("param"), "code": e.get("code"), "message": e.get("message")})


def _token_of(e: dict[str, Any]) -> tuple[str, list[int]]:
    # Results written before tokens carried their text hold only ids: the id stands in.
    if "token" in e:
        return str(e["token"]), list(e.get("bytes") or [])
    return str(e.get("token_id")), []


def _tops(e: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in e.get("top") or []:
        if isinstance(t, dict):
            out.append(t)
        else:  # the older [id, logprob] pairs
            out.append({"token_id": t[0], "logprob": t[1]})
    return out


def completion_logprobs(entries: list[dict[str, Any]] | None, prompt: str = ""
                        ) -> dict[str, Any] | None:
    """A completion choice's ``logprobs`` in OpenAI's legacy shape: ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (token text -> logprob; null where nothing was
    predicted, an echoed prompt's first token) and ``text_offset`` (each token's character
    offset in ``prompt`` + the choice's text, ``prompt`` being "" when the text echoes it).
    The one definition for batch output files and ``POST /v1/completions``."""
    return CompletionLogprobs(prompt).next(entries)


class CompletionLogprobs:
    """:func:`completion_logprobs` of one choice in pieces (a stream's chunks): each
    :meth:`next` renders the next tokens, their text offsets continuing from the earlier
    ones'."""

    def __init__(self, prompt: str = "") -> None:
        self.chars = len(prompt)  # characters before the next token
        # Counts only whole characters: one split over tokens starts at the first of them.
        self._decoder = codecs.getincrementaldecoder("utf-8")("ignore")

    def next(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        if not entries:
            return None
        tokens, offsets = [], []
        for e in entries:
            tok, raw = _token_of(e)
            tokens.append(tok)
            offsets.append(self.chars)
            self.chars += len(self._decoder.decode(bytes(raw) if raw else tok.encode("utf-8")))
        return {"tokens": tokens, "token_logprobs": [e.get("logprob") for e in entries],
                "top_logprobs": [None if e.get("logprob") is None and not e.get("top") else
                                 {_token_of(t)[0]: t.get("logprob") for t in _tops(e)}
                                 for e in entries],
                "text_offset": offsets}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A chat choice's ``logprobs``: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}``."""
    if entries is None:
        return None

    def one(e: dict[str, Any]) -> dict[str, Any]:
        tok, raw = _token_of(e)
        return {"token": tok, "logprob": e.get("logprob"), "bytes": raw or None}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in _tops(e)]}
                        for e in entries], "refusal": None}


def openai_output_line(batch: Batch, item: Item, r: Result) -> bytes:
    """One line of a batch's output file, in OpenAI's shape: a ``text_completion`` for
    ``/v1/completions`` batches, a ``chat.completion`` for ``/v1/chat/completions``."""
    choices = r.choices or [{"index": 0, "text": r.text or "", "finish_reason": r.finish_reason,
                             "logprobs": r.logprobs}]
    suffix = f"{batch.id.removeprefix('batch_')}-{item.index}"
    common = {"created": int(r.finished_at or batch.created_at), "model": batch.model or "",
              "system_fingerprint": None}
    if batch.endpoint == CHAT_URL:
        body = {
            "id": f"chatcmpl-{suffix}", "object": "chat.completion", **common,
            "choices": [{"index": c.get("index", 0),
                         "message": {"role": "assistant", "content": c.get("text") or "",
                                     "refusal": None},
                         "logprobs": chat_logprobs(c.get("logprobs")),
                         "finish_reason": c.get("finish_reason")} for c in choices],
            "usage": _usage(r),
        }
    else:
        # Offsets count from the prompt's end, or from 0 when the text echoes it.
        base = "" if (item.params or {}).get(ECHO) else (item.prompt or "")
        body = {
            "id": f"cmpl-{suffix}", "object": "text_completion", **common,
            "choices": [{"index": c.get("index", 0), "text": c.get("text") or "",
                         "finish_reason": c.get("finish_reason"),
                         "logprobs": completion_logprobs(c.get("logprobs"), base)}
                        for c in choices],
            "usage": _usage(r),
        }
    return _dump({"id": f"batch_req_{item.id}", "custom_id": item.custom_id,
                  "response": {"status_code": 200, "request_id": f"req_{item.id}",
                               "body": body},
                  "error": None})


def openai_error_line(item: Item, r: Result | None, *, unrun_code: str = "batch_cancelled"
                      ) -> bytes:
    """One line of a batch's error file: a failed request (HTTP 400 in ``response``, as
    OpenAI reports bad requests) or one never run (``error``, as for expired requests)."""
    if r is None:
        why = "cancelled" if unrun_code == "batch_cancelled" else "expired"
        return _dump({"id": f"batch_req_{item.id}", "custom_id": item.custom_id,
                      "response": None,
                      "error": {"code": unrun_code,
                                "message": f"This request could not be executed before "
                                           f"the batch was {why}."}})
    err = r.error or {}
    return _dump({"id": f"batch_req_{item.id}", "custom_id": item.custom_id,
                  "response": {"status_code": 400, "request_id": f"req_{item.id}",
                               "body": {"error": {"message": err.get("message", ""),
                                                  "type": "invalid_request_error",
                                                  "param": err.get("param"),
                                                  "code": err.get("code")}}},
                  "error": None})
