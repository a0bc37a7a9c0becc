"""The dashboard: its JSON routes on SQLite and PostgreSQL, and the page itself in headless
Chromium (Debian's /usr/bin/chromium driven by Playwright) while a real worker runs a
batch — progress must move on screen, the plots must draw, and a screenshot is saved."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Api, jsonl, prompts, write_results
from tests.api.live import Live, start_stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def submit(client: object, n: int, **params: object) -> dict:
    r = client.post("/batches", content=jsonl(prompts(n)), params=params,  # type: ignore[attr-defined]
                    headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    return r.json()


# ------------------------------------------------------------------------------ JSON


def test_overview_and_detail(api_factory: Callable[..., Api]) -> None:
    api = api_factory()
    empty = api.client.get("/dashboard/api/overview").json()
    assert empty["batches"] == [] and empty["tokens_per_s"] == 0.0
    assert len(empty["series"]) == 120 and empty["step"] == 5  # 10 minutes of 5 s points

    batch = submit(api.client, 10)
    write_results(api.db, batch["id"], upto=6, fail={5})
    o = api.client.get("/dashboard/api/overview", params={"window": 60, "step": 2}).json()
    [b] = o["batches"]
    assert b["id"] == batch["id"] and b["status"] == "in_progress"
    assert b["counts"] == {"total": 10, "completed": 5, "failed": 1, "pending": 4}
    assert b["progress"] == pytest.approx(0.6)
    assert len(o["series"]) == 30
    assert sum(p["tokens_per_s"] for p in o["series"]) * 2 == pytest.approx(25)  # 5 ok x 5
    assert sum(p["items_per_s"] for p in o["series"]) * 2 == pytest.approx(6)
    assert o["series"][-1]["t"] >= o["series"][0]["t"]

    d = api.client.get(f"/dashboard/api/batches/{batch['id']}", params={"bins": 4}).json()
    t = d["timings"]
    assert d["batch"]["id"] == batch["id"] and t["sampled"] == 6
    assert t["workers"] == {"test": 5}
    assert t["tokens_per_s"]["count"] == 5 and t["tokens_per_s"]["p50"] == 50.0
    assert t["completion_tokens"]["counts"] == [5, 0, 0, 0]  # all equal: the first bin
    assert len(t["queue_wait_s"]["edges"]) == 5
    assert t["queue_wait_s"]["min"] >= 0

    # another key's caller sees none of it (the first key adopts what was made without
    # keys; a second one is "another key")
    api.key("first")
    key = api.key()
    auth = {"Authorization": f"Bearer {key}"}
    assert api.client.get(f"/dashboard/api/batches/{batch['id']}", headers=auth).status_code \
        == 404
    assert api.client.get("/dashboard/api/overview", headers=auth).json()["batches"] == []
    assert api.client.get("/dashboard/api/overview").status_code == 401



def test_series_counts_tokens_when_they_were_generated(api_factory: Callable[..., Api]) -> None:
    from sqlalchemy import select

    from store.db import session_scope
    from store.queries import insert_results
    from store.records import ResultRow
    from store.tables import Item, now

    api = api_factory()
    batch = submit(api.client, 2)
    t = now()
    with session_scope(api.db) as s:
        items = list(s.scalars(select(Item).where(Item.batch_id == batch["id"])
                               .order_by(Item.index)))
        # one long item: 100 tokens over 20 s; one short: 12 tokens over 2 s
        spans = [(t - 30.0, t - 10.0, 100), (t - 6.0, t - 4.0, 12)]
        insert_results(session=s, rows=[ResultRow(
            item_id=it.id, batch_id=batch["id"], index=it.index,
            choices=[{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}],
            text="x", finish_reason="length", prompt_tokens=1, completion_tokens=n,
            queued_at=it.queued_at, started_at=first, first_token_at=first,
            finished_at=done, tokens_per_s=n / (done - first), worker_id="w", attempt=1)
            for it, (first, done, n) in zip(items, spans, strict=True)])
    o = api.client.get("/dashboard/api/overview", params={"window": 60, "step": 2}).json()
    rates = [p["tokens_per_s"] for p in o["series"]]
    assert sum(rates) * 2 == pytest.approx(112)  # every token, once
    # spread over its 20 s at 5 tok/s, not 100 tokens in the 2 s it finished in
    long_part = [r for p, r in zip(o["series"], rates, strict=True)
                 if t - 28 <= p["t"] <= t - 12]
    assert long_part and all(r == pytest.approx(5.0) for r in long_part)
    assert max(rates) <= 6.0 + 1e-9  # never above the fastest true pace (12 tokens in 2 s)

def test_page_and_assets(sqlite_api: Api) -> None:
    page = sqlite_api.client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # No CDN: every script and stylesheet comes from this server.
    assert "http://" not in page.text and "https://" not in page.text
    for name in ("dashboard.js", "dashboard.css"):
        assert sqlite_api.client.get(f"/dashboard/static/{name}").status_code == 200
    assert sqlite_api.client.get("/dashboard/static/../app.py").status_code == 404
    assert sqlite_api.client.get("/dashboard/static/secret.txt").status_code == 404
    assert sqlite_api.client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
    assert sqlite_api.client.get("/dashboard/api/overview",
                                 params={"window": 86400, "step": 1}).status_code == 400


# ------------------------------------------------------------------------------ browser


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium; scripts/setup.sh "
                    "installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (the Python package) is not installed: pip install playwright")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    stack = start_stack(tmp_path, worker=False, chunk_items="4")
    yield stack
    stack.stop()


@pytest.mark.slow
def test_dashboard_in_chromium_while_a_batch_runs(browser: object, live: Live,
                                                  tmp_path: Path) -> None:
    with httpx.Client(base_url=live.url) as client:
        batch = submit(client, 48, max_tokens=48, ignore_eos="true", temperature=0.8)
    # Started after the submission, so the page sees the batch at 0% and then moving.
    live.start("worker", "worker", "--model", "preset:small", "--device", "cpu",
               "--worker-id", "gpu-less-demo", "--concurrency", "2", "--max-num-seqs", "8")

    page = browser.new_page(viewport={"width": 1280, "height": 1000})  # type: ignore[attr-defined]
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.goto(live.url + "/dashboard")
    bar = page.locator(f'.bar[data-batch="{batch["id"]}"]')
    bar.wait_for(timeout=20_000)

    seen: list[float] = []
    deadline = time.monotonic() + 150
    shot_taken = False
    while time.monotonic() < deadline:
        p = float(bar.get_attribute("data-progress") or 0)
        if not seen or p != seen[-1]:
            seen.append(p)
        if not shot_taken and 0.5 <= p < 0.95:
            # mid-run: open the batch's detail and take the picture the README shows
            page.locator(f'tr.batch[data-id="{batch["id"]}"]').click()
            page.locator('#detail [data-chart="duration_s"] .stats').filter(
                has_text="p50").wait_for(timeout=10_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            shot_taken = True
        if p >= 1.0:
            break
        time.sleep(0.3)
    assert seen and seen[-1] == 1.0, (seen, live.log("worker")[-3000:])
    # progress moved on screen: several distinct, increasing values on the way to 100%
    assert len(seen) >= 3 and seen == sorted(seen), seen
    assert page.locator(f'tr.batch[data-id="{batch["id"]}"] .pill').inner_text() in (
        "completed", "finalizing", "in_progress")

    # the tokens/s plot has drawn something (non-blank pixels on the canvas)
    painted = page.evaluate("""() => {
        const c = document.querySelector('#throughput');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
        return n; }""")
    assert painted > 1000
    # the worker row shows its device and health
    row = page.locator('#workers tr[data-id="gpu-less-demo"]')
    assert "cpu" in row.inner_text() and "healthy" in row.inner_text()
    assert shot_taken, seen
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert not [m for m in console if m.startswith(("error", "pageerror"))], console
    # a fine-tuning job's loss curve is drawn as inline SVG: a line and validation dots
    from store.db import make_engine, session_scope
    from store.jobs import add_event, create_job

    db = make_engine(live.env["NEOXQ_DATABASE_URL"])
    with session_scope(db) as s:
        job = create_job(session=s, owner="local", model="m", training_file="file-x",
                         validation_file=None, suffix=None, seed=0, hyperparameters={},
                         options={"method": "lora"})
        for step in range(1, 31):
            add_event(session=s, job_id=job.id, type="metrics", message=f"step {step}",
                      step=step, data={"step": step, "train_loss": 3.0 - step / 20,
                                       "valid_loss": 2.5 if step % 10 == 0 else None})
    db.dispose()
    curve = page.locator(f'#jobs tr[data-id="{job.id}"] svg.loss')
    curve.locator("path.train").wait_for(timeout=10_000)
    assert curve.locator("path.train").get_attribute("d").count("L") == 29
    assert curve.locator("circle.valid").count() == 3
    assert "1.5000" in page.locator(f'#jobs tr[data-id="{job.id}"]').inner_text()
    out = os.environ.get("NEOXQ_DASHBOARD_SCREENSHOT")
    if out:  # how docs/dashboard.png is refreshed
        shutil.copy(tmp_path / "dashboard.png", out)
