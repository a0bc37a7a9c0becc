"""The API process killed in the middle of uploads, for real (``neoxq api`` under
uvicorn, SIGKILL and SIGTERM), on SQLite and PostgreSQL: an interrupted upload leaves no
batch, no item and - once the restarted API has swept - no file."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from store.db import make_engine, session_scope
from store.tables import Batch, File, Item
from tests.api.live import Live, fresh_database, start_stack

# Enough that ingesting takes seconds (the kill lands inside it), few enough for CI.
LINES = 20_000


def _body() -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "prompt": f"prompt number {i} " * 3,
                                "max_tokens": 4}).encode() + b"\n" for i in range(LINES))


def _upload_in_background(live: Live, body: bytes, pause: float = 0.0) -> threading.Thread:
    """POST the body in 64 KiB pieces (with ``pause`` seconds between them); the
    request's fate (a killed server) is not this thread's business."""

    def pieces():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]
            if pause:
                time.sleep(pause)

    def run() -> None:
        try:
            httpx.post(live.url + "/batches", content=pieces(), timeout=60,
                       headers={"content-type": "application/x-ndjson"})
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _files(data: Path) -> list[str]:
    d = data / "files"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_api_killed_mid_upload_and_mid_ingest_leaves_nothing(tmp_path: Path, kind: str) -> None:
    body = _body()
    with fresh_database(kind, tmp_path) as url:
        db = make_engine(url)
        live = start_stack(tmp_path, worker=False, database_url=url,
                           stale_upload_after="0.5", sweep_interval="0.5")
        data = tmp_path / "data"
        try:
            # 1. SIGKILL while the bytes arrive: a partial temporary file, no rows.
            _upload_in_background(live, body, pause=0.05)
            _wait(lambda: any(n.startswith(".tmp-") for n in _files(data)), 30,
                  "the upload to start")
            live.procs["api"].send_signal(signal.SIGKILL)
            live.procs["api"].wait(10)
            assert any(n.startswith(".tmp-") for n in _files(data))

            # 2. SIGKILL during ingestion: the whole file arrived, rows were being written.
            live.start("api", "api", "--port", live.url.rsplit(":", 1)[1],
                       "--log-level", "warning")
            live.wait_ready()
            _upload_in_background(live, body)
            tmp_size = [0]

            def arrived() -> bool:
                sizes = [p.stat().st_size for p in (data / "files").glob(".tmp-*")]
                tmp_size[0] = max(sizes, default=0)
                return tmp_size[0] == len(body)

            _wait(arrived, 60, "the whole upload on disk")
            time.sleep(0.5)  # into the validation/insert of 50,000 lines
            live.procs["api"].send_signal(signal.SIGKILL)
            live.procs["api"].wait(10)
            with session_scope(db) as s:
                assert s.scalar(select(func.count()).select_from(Batch)) == 0
                assert s.scalar(select(func.count()).select_from(Item)) == 0
                assert s.scalar(select(func.count()).select_from(File)) == 0

            # 3. SIGTERM mid-upload: uvicorn stops taking requests and lets the running one
            # end (completed: a batch, its rows and its file; cut: nothing) - either way
            # no partial file, and no file without a row.
            live.start("api", "api", "--port", live.url.rsplit(":", 1)[1],
                       "--log-level", "warning")
            live.wait_ready()
            time.sleep(1.5)  # the restarted API swept the leftovers of 1 and 2
            assert _files(data) == []
            _upload_in_background(live, body, pause=0.05)
            _wait(lambda: any(n.startswith(".tmp-") for n in _files(data)), 30,
                  "the upload to start")
            live.procs["api"].send_signal(signal.SIGTERM)
            live.procs["api"].wait(60)

            live.start("api", "api", "--port", live.url.rsplit(":", 1)[1],
                       "--log-level", "warning")
            live.wait_ready()
            _wait(lambda: not any(n.startswith(".tmp-") for n in _files(data)), 10,
                  "the sweeper to remove the leftovers")
            with session_scope(db) as s:
                paths = {Path(p).name for p in s.scalars(select(File.path))}
                statuses = set(s.scalars(select(Batch.status)))
                items = s.scalar(select(func.count()).select_from(Item))
            assert set(_files(data)) == paths
            assert statuses <= {"in_progress"} and items == LINES * len(statuses)
            # And the restarted API works: a file goes through whole.
            small = b"".join(body.splitlines(keepends=True)[:500])
            r = httpx.post(live.url + "/batches", content=small, timeout=120,
                           headers={"content-type": "application/x-ndjson"})
            assert r.status_code == 201, r.text[:300]
            assert r.json()["counts"]["total"] == 500
            assert f"{r.json()['input_file_id']}.jsonl" in _files(data)
        finally:
            live.stop()
            db.dispose()
