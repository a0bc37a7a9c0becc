"""The official ``openai`` package runs the whole Batch flow against neoxq unchanged:
upload, create, poll, download output and error files, list, cancel, delete - against
``neoxq api`` under uvicorn and a real ``neoxq worker`` on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.api.live import ROOT, Live, fresh_database, start_stack

# The name the live worker serves (NEOXQ_MODEL_NAME is unset: the default); lines must
# name a model the store knows.
MODEL = "gpt-neox-20b"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp(f"live_openai_{request.param}")
    with fresh_database(request.param, tmp) as url:
        stack = start_stack(tmp, worker=True, database_url=url)
        yield stack
        stack.stop()


def create_key(live: Live, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", name], cwd=ROOT,
                         env=live.env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def line(cid: str, prompt: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"model": MODEL, "prompt": prompt, **body}})


def wait_status(client: OpenAI, batch_id: str, statuses: tuple[str, ...],
                timeout: float = 60) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {b.status} after {timeout}s")


def test_openai_client_batch_flow(live: Live, tmp_path: Path) -> None:
    key = create_key(live, "sdk")
    client = OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)
    src = tmp_path / "requests.jsonl"
    lines = [line(f"req-{i}", f"Hello number {i}", max_tokens=6, temperature=0)
             for i in range(6)]
    # A request the engine refuses (prompt + max_tokens beyond the context): an item error.
    lines.insert(3, line("too-long", "x", max_tokens=10**6))
    src.write_text("\n".join(lines) + "\n")

    uploaded = client.files.create(file=src.open("rb"), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == src.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert client.files.content(uploaded.id).read() == src.read_bytes()

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h", metadata={"job": "sdk-test"})
    assert batch.status in ("validating", "in_progress")
    assert batch.request_counts.total == 7 and batch.metadata == {"job": "sdk-test"}
    done = wait_status(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
    assert done.completed_at >= done.in_progress_at >= done.created_at
    if getattr(done, "usage", None) is not None:  # newer SDKs parse OpenAI's batch usage
        assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0

    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(6)]  # input order
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    # The body parses as the SDK's own Completion type.
    assert openai.types.Completion.model_validate(body).choices[0].index == 0

    errs = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert len(errs) == 1 and errs[0]["custom_id"] == "too-long"
    assert errs[0]["response"]["status_code"] == 400
    assert "max_tokens" in errs[0]["response"]["body"]["error"]["message"]

    listed = client.batches.list(limit=10)
    assert batch.id in [b.id for b in listed.data]
    files = [f.id for f in client.files.list()]
    assert {uploaded.id, done.output_file_id, done.error_file_id} <= set(files)

    # Another key sees none of it.
    other = OpenAI(base_url=live.url + "/v1", api_key=create_key(live, "other"), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=live.url + "/v1", api_key="nxq-bogus", max_retries=0).files.list()

    # Cancel a long batch while it runs: finished results stay, the rest are cancelled.
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(line(f"b{i}", f"Long job {i}", max_tokens=300, temperature=0,
                                  ignore_eos=True) for i in range(200)) + "\n")
    f2 = client.files.create(file=big.open("rb"), purpose="batch")
    running = client.batches.create(input_file_id=f2.id, endpoint="/v1/completions",
                                    completion_window="24h")
    cancelling = client.batches.cancel(running.id)
    assert cancelling.status in ("cancelling", "cancelled")
    t0 = time.monotonic()
    cancelled = wait_status(client, running.id, ("cancelled",), timeout=30)
    assert time.monotonic() - t0 < 10
    assert cancelled.request_counts.completed < 200 and cancelled.error_file_id
    cancelled_lines = client.files.content(cancelled.error_file_id).text.splitlines()
    unrun = [json.loads(x) for x in cancelled_lines]
    assert len(unrun) == 200 - cancelled.request_counts.completed - \
        cancelled.request_counts.failed
    assert unrun[0]["error"]["code"] == "batch_cancelled" and unrun[0]["response"] is None

    # Pagination with after/limit.
    page1 = client.batches.list(limit=1)
    assert len(page1.data) == 1 and page1.has_more
    page2 = client.batches.list(limit=1, after=page1.data[0].id)
    assert page2.data[0].id != page1.data[0].id

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
