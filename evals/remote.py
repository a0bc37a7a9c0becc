"""Scoring through a running neoxq instead of a local engine (``neoxq evaluate --api``).

The requests become one OpenAI Batch file of ``/v1/completions`` lines with the prompt as
token ids, ``echo: true``, ``logprobs: 1`` and ``max_tokens: 0`` - how evaluation tools
score text over OpenAI's API - so every worker of the fleet shares the work. Each answer
is read back as lm-eval's ``local-completions`` model reads it: the continuation's
log-likelihood is the sum of its tokens' logprobs, and it is greedy when each token's
logprob is the largest of its position's top alternatives. The worker computes those
numbers with the engine's own ``score()``, so the metrics equal the local path's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from evals.scoring import TokenPair
from specs.status import TERMINAL, BatchStatus

# Requests per batch file (OpenAI's Batch limit, and neoxq's default max_lines).
MAX_LINES = 50_000


@dataclass
class RemoteScore:
    """One continuation's answer (the fields ``score_pairs`` reads)."""

    logprob: float
    is_greedy: bool


class RemoteError(RuntimeError):
    """The API refused the work or a request failed."""


class ApiScorer:
    """A :class:`~evals.scoring.Scorer` backed by a neoxq API at ``url``."""

    # score_pairs cuts work into engine-step-sized calls by this; the fleet needs one
    # call with everything (one batch file), so there is no limit here.
    max_batch_tokens = 1 << 62

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 poll_s: float = 0.5, timeout_s: float = 24 * 3600,
                 progress: Any | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)
        self.model, self.poll_s, self.timeout_s = model, poll_s, timeout_s
        self.progress = progress  # a tqdm bar: requests done so far
        self.batch_ids: list[str] = []

    def close(self) -> None:
        self.http.close()

    def _check(self, r: httpx.Response) -> dict[str, Any]:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:500]
            raise RemoteError(f"{r.request.method} {r.request.url.path}: "
                              f"HTTP {r.status_code}: {msg}")
        return r.json()

    def served_model(self) -> str:
        """The model the batch lines name: ``model`` if given, else the one the fleet
        serves (``GET /v1/models``; every known name when none is live yet). Batches run
        only on workers of the model they name, so a fleet of several needs a choice."""
        if self.model is None:
            for query in ("", "?all=true"):
                names = [m["id"] for m in self._check(self.http.get(f"/v1/models{query}"))["data"]]
                if len(names) > 1:
                    raise RemoteError(f"the API serves several models ({', '.join(names)}): "
                                      "name one (MODEL)")
                if names:
                    self.model = names[0]
                    break
            else:
                raise RemoteError("the API knows no model: start a worker")
        return self.model

    def _submit(self, pairs: list[TokenPair], first: int) -> str:
        model = self.served_model()
        lines = []
        for i, (ctx, cont) in enumerate(pairs):
            body = {"model": model, "prompt": ctx + cont, "max_tokens": 0,
                    "echo": True, "logprobs": 1}
            lines.append(json.dumps({"custom_id": str(first + i), "method": "POST",
                                     "url": "/v1/completions", "body": body}))
        data = ("\n".join(lines) + "\n").encode()
        f = self._check(self.http.post("/v1/files", data={"purpose": "batch"},
                                       files={"file": ("eval.jsonl", data)}))
        b = self._check(self.http.post("/v1/batches", json={
            "input_file_id": f["id"], "endpoint": "/v1/completions",
            "completion_window": "24h", "metadata": {"purpose": "neoxq evaluate"}}))
        return b["id"]

    def _wait(self, batch_ids: list[str]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout_s
        shown = 0
        while True:
            batches = [self._check(self.http.get(f"/v1/batches/{b}")) for b in batch_ids]
            done = sum((b.get("request_counts") or {}).get("completed", 0) for b in batches)
            if self.progress is not None and done > shown:
                self.progress.update(done - shown)
                shown = done
            if all(b["status"] in TERMINAL for b in batches):
                return batches
            if time.monotonic() > deadline:
                raise RemoteError(f"batches {batch_ids} not done after {self.timeout_s:g} s")
            time.sleep(self.poll_s)

    def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if not file_id:
            return []
        r = self.http.get(f"/v1/files/{file_id}/content")
        if r.status_code >= 400:
            self._check(r)
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def score(self, pairs: list[TokenPair]) -> list[RemoteScore]:
        """Score ``pairs`` through the API's batch queue; answers in input order."""
        pairs = [(list(c), list(t)) for c, t in pairs]
        ids = [self._submit(pairs[i:i + MAX_LINES], i) for i in range(0, len(pairs),
                                                                        MAX_LINES)]
        self.batch_ids += ids
        batches = self._wait(ids)
        answers: dict[int, RemoteScore] = {}
        for b in batches:
            for err in self._lines(b.get("error_file_id")):
                e = err.get("error") or ((err.get("response") or {}).get("body") or {}).get(
                    "error") or {}
                raise RemoteError(f"request {err.get('custom_id')} failed: "
                                  f"{e.get('message', e)}")
            if b["status"] != BatchStatus.COMPLETED:
                raise RemoteError(f"batch {b['id']} ended {b['status']}")
            for line in self._lines(b.get("output_file_id")):
                i = int(line["custom_id"])
                choice = line["response"]["body"]["choices"][0]
                answers[i] = continuation_answer(choice["logprobs"], len(pairs[i][0]))
        missing = [i for i in range(len(pairs)) if i not in answers]
        if missing:
            raise RemoteError(f"{len(missing)} answers missing (first: request {missing[0]})")
        return [answers[i] for i in range(len(pairs))]


def continuation_answer(logprobs: dict[str, Any], context_tokens: int) -> RemoteScore:
    """The answer for a continuation after ``context_tokens`` prompt tokens, from an
    echoed prompt's OpenAI ``logprobs`` (as lm-eval's completions models read it)."""
    token_lps = logprobs["token_logprobs"][context_tokens:]
    tops = logprobs["top_logprobs"][context_tokens:]
    greedy = all(lp >= max(top.values()) for lp, top in zip(token_lps, tops, strict=True))
    return RemoteScore(logprob=math.fsum(token_lps), is_greedy=greedy)
