"""Item claims (store/claims.py) and chunk planning for the live fleet (store/ingest.py),
on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import threading

from sqlalchemy import Engine, select, update

from core.payloads import ChunkPayload
from core.settings import Settings
from specs.status import ItemStatus
from store.claims import (
    claim_range,
    claim_unstarted,
    fair_share,
    release_items,
    release_worker,
    unfinished_in_range,
)
from store.db import session_scope
from store.ingest import ChunkPlanner, submit_batch
from store.queries import insert_results, register_worker
from store.records import ResultRow
from store.tables import Item, Worker, now

LIVE = 15.0


def batch_of(db: Engine, n: int) -> str:
    data = "\n".join(json.dumps({"prompt": f"p{i}", "max_tokens": 4}) for i in range(n))
    report = submit_batch(engine=db, source=io.BytesIO(data.encode()), enqueue=lambda p: None,
                          settings=Settings(database_url="sqlite://", chunk_items=1000))
    assert report.status == "in_progress"
    return report.batch_id


def live(db: Engine, *ids: str) -> None:
    with session_scope(db) as s:
        for w in ids:
            register_worker(session=s, worker_id=w, host="h", pid=1, model="m", devices=[],
                            pipeline_parallel=1)


def owners(db: Engine, batch_id: str) -> dict[int, str | None]:
    with session_scope(db) as s:
        return dict(s.execute(select(Item.index, Item.worker_id)
                              .where(Item.batch_id == batch_id)).tuples().all())


def test_holder_claims_from_the_front_idle_worker_from_the_back(db: Engine) -> None:
    b = batch_of(db, 20)
    live(db, "holder", "idle")
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=10, worker_id="holder", limit=4,
                          live_within=LIVE)
    assert [c[2] for c in got] == [0, 1, 2, 3] and all(c[6] == 1 for c in got)  # attempt 1
    with session_scope(db) as s:
        stolen = claim_unstarted(session=s, worker_id="idle", limit=3, live_within=LIVE)
    assert sorted(c[2] for c in stolen) == [17, 18, 19]
    with session_scope(db) as s:  # the holder's next claims skip what is taken
        got = claim_range(session=s, batch_id=b, start=0, end=20, worker_id="holder",
                          limit=100, live_within=LIVE)
    assert [c[2] for c in got] == list(range(4, 17))
    with session_scope(db) as s:
        assert claim_range(session=s, batch_id=b, start=0, end=20, worker_id="x", limit=5,
                           live_within=LIVE) == []
        assert claim_unstarted(session=s, worker_id="idle", limit=5, live_within=LIVE) == []
        assert unfinished_in_range(session=s, batch_id=b, start=0, end=20) == 20
    o = owners(db, b)
    assert [i for i, w in o.items() if w == "idle"] == [17, 18, 19]


def test_a_dead_workers_claims_are_taken_over_a_live_ones_are_not(db: Engine) -> None:
    b = batch_of(db, 6)
    live(db, "a", "b", "c")
    with session_scope(db) as s:
        claim_range(session=s, batch_id=b, start=0, end=3, worker_id="a", limit=3,
                    live_within=LIVE)
        claim_range(session=s, batch_id=b, start=3, end=6, worker_id="b", limit=3,
                    live_within=LIVE)
        # "a" stops beating: its last heartbeat is older than the live window.
        s.execute(update(Worker).where(Worker.id == "a").values(last_seen=now() - 60))
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=6, worker_id="c", limit=10,
                          live_within=LIVE)
    assert [c[2] for c in got] == [0, 1, 2] and all(c[6] == 2 for c in got)  # 2nd attempt
    with session_scope(db) as s:  # a stopped worker counts as gone at once
        s.execute(update(Worker).where(Worker.id == "b").values(status="stopped"))
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=6, worker_id="c", limit=10,
                          live_within=LIVE)
    assert [c[2] for c in got] == [3, 4, 5]
    # Idle workers never take running items, even a dead worker's: the holder does.
    with session_scope(db) as s:
        s.execute(update(Worker).where(Worker.id == "c").values(status="stopped"))
        assert claim_unstarted(session=s, worker_id="d", limit=10, live_within=LIVE) == []


def test_release_puts_items_back_and_finished_items_stay(db: Engine) -> None:
    b = batch_of(db, 4)
    live(db, "w")
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=4, worker_id="w", limit=4,
                          live_within=LIVE)
        insert_results(session=s, rows=[ResultRow(item_id=got[0][0], batch_id=b, index=0,
                                                  completion_tokens=1)])
    with session_scope(db) as s:
        # item 1 handed back on shutdown (not an attempt), item 2 failed (an attempt)
        assert release_items(session=s, item_ids=[got[1][0]], worker_id="w", uncount=True) == 1
        assert release_items(session=s, item_ids=[got[2][0], got[0][0]], worker_id="w") == 1
        assert release_items(session=s, item_ids=[got[3][0]], worker_id="other") == 0
    with session_scope(db) as s:
        rows = {i: (st, a, w) for i, st, a, w in s.execute(
            select(Item.index, Item.status, Item.attempts, Item.worker_id)
            .where(Item.batch_id == b)).tuples().all()}
    assert rows == {0: ("completed", 1, "w"), 1: ("queued", 0, None), 2: ("queued", 1, None),
                    3: ("running", 1, "w")}
    with session_scope(db) as s:
        assert release_worker(session=s, worker_id="w") == 1
        assert unfinished_in_range(session=s, batch_id=b, start=0, end=4) == 3


def test_racing_claimers_never_share_an_item(db: Engine) -> None:
    b = batch_of(db, 300)
    names = [f"w{i}" for i in range(4)]
    live(db, *names)
    got: dict[str, list[int]] = {w: [] for w in names}

    def grab(w: str) -> None:
        while True:
            with session_scope(db) as s:
                if w == "w0":
                    c = claim_range(session=s, batch_id=b, start=0, end=300, worker_id=w,
                                    limit=7, live_within=LIVE)
                else:
                    c = claim_unstarted(session=s, worker_id=w, limit=5, live_within=LIVE)
            if not c:
                return
            got[w] += [x[2] for x in c]

    threads = [threading.Thread(target=grab, args=(w,)) for w in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(i for v in got.values() for i in v)
    assert every == list(range(300))  # each item claimed exactly once
    assert owners(db, b) == {i: w for w, v in got.items() for i in v}


def test_chunks_are_cut_for_the_live_fleet() -> None:
    def plan(n: int, slots: int, max_items: int = 256, max_tokens: int = 65_536,
             tokens: int = 128) -> list[tuple[int, int]]:
        p = ChunkPlanner(max_items, max_tokens, {"max_tokens": tokens})
        for i in range(n):
            p.add(i, {})
        return p.finish(n, slots=slots)

    assert plan(1024, 1) == [(i, i + 256) for i in range(0, 1024, 256)]
    # 2 workers x 4 chunks each: eight chunks, one per slot, from the first second.
    assert plan(1024, 8) == [(i, i + 128) for i in range(0, 1024, 128)]
    assert len(plan(1000, 16)) == 16
    # Never below min_items (8) items per chunk, however many slots.
    assert plan(40, 64) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]
    # A big batch keeps the configured size.
    assert {e - s for s, e in plan(50_000, 8)} == {256, 50_000 % 256}
    # The token bound still closes chunks of long generations on one slot...
    assert plan(6, 1, max_items=100, max_tokens=250, tokens=100) == [(0, 3), (3, 6)]


def test_submit_cuts_chunks_for_the_workers_alive_now(db: Engine) -> None:
    s = Settings(database_url="sqlite://", chunk_items=256, worker_concurrency=4)
    data = "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(1024)).encode()

    def chunks() -> list[ChunkPayload]:
        sent: list[ChunkPayload] = []
        submit_batch(engine=db, source=io.BytesIO(data), enqueue=sent.append, settings=s)
        return sent

    assert len(chunks()) == 4  # no worker seen: chunk_items decides
    live(db, "a", "b")
    assert [c.end - c.start for c in chunks()] == [128] * 8
    live(db, "c")
    with session_scope(db) as ses:  # a stopped worker, and one not seen for a minute
        ses.execute(update(Worker).where(Worker.id == "a").values(status="stopped"))
        ses.execute(update(Worker).where(Worker.id == "c").values(last_seen=now() - 60))
    assert len(chunks()) == 4


def test_fair_share_is_a_live_workers_part_of_the_unfinished_items(db: Engine) -> None:
    b = batch_of(db, 10)
    live(db, "a", "b", "c")
    with session_scope(db) as s:
        assert fair_share(session=s, batch_id=b, live_within=LIVE) == 4  # ceil(10 / 3)
        claim_range(session=s, batch_id=b, start=0, end=4, worker_id="a", limit=4,
                    live_within=LIVE)
        # claimed items still count as unfinished; only queued ones when asked
        assert fair_share(session=s, batch_id=b, live_within=LIVE) == 4
        assert fair_share(session=s, batch_id=None, live_within=LIVE,
                          status=ItemStatus.QUEUED) == 2  # ceil(6 / 3)
        s.execute(update(Worker).where(Worker.id.in_(("b", "c"))).values(status="stopped"))
    with session_scope(db) as s:
        assert fair_share(session=s, batch_id=b, live_within=LIVE) == 10  # one worker left


def test_a_warming_worker_has_no_share_yet(db: Engine) -> None:
    """A worker warming its engine up heartbeats (alive) but takes no work: the others'
    shares are not cut for it until it is ready."""
    b = batch_of(db, 10)
    live(db, "a", "b")
    with session_scope(db) as s:
        s.execute(update(Worker).where(Worker.id == "b").values(status="warming"))
    with session_scope(db) as s:
        assert fair_share(session=s, batch_id=b, live_within=LIVE) == 10
        s.execute(update(Worker).where(Worker.id == "b").values(status="idle"))
    with session_scope(db) as s:
        assert fair_share(session=s, batch_id=b, live_within=LIVE) == 5


def test_costliest_items_are_claimed_first_within_a_token_budget(db: Engine) -> None:
    """Items cost their prompt (token ids exactly, text estimated) plus max_tokens x n;
    both kinds of claim take the costliest first, and a token budget bounds a claim
    (always at least one item)."""
    lines = [{"prompt": [5] * (10 + i), "max_tokens": 1 + 8 * (i % 5), "n": 1}
             for i in range(10)]
    lines[3]["n"] = 3
    lines.append({"prompt": "x" * 40, "max_tokens": 2})  # ~10 tokens of text
    data = "\n".join(json.dumps(x) for x in lines).encode()
    report = submit_batch(engine=db, source=io.BytesIO(data), enqueue=lambda p: None,
                          settings=Settings(database_url="sqlite://", chunk_items=1000))
    assert report.status == "in_progress", report.errors
    b = report.batch_id
    cost = {i: 11 + i + 8 * (i % 5) for i in range(10)}
    cost[3] = 13 + 3 * 25
    cost[10] = 10 + 2
    with session_scope(db) as s:
        assert dict(s.execute(select(Item.index, Item.cost).where(Item.batch_id == b))
                    .tuples().all()) == cost
    by_cost = sorted(cost, key=lambda i: (-cost[i], i))
    live(db, "holder", "idle")
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=6, worker_id="holder",
                          limit=10, live_within=LIVE, max_cost=120)
    # In [0, 6): 3 (88), 4 (47), 2 (29), ...: 88 + 47 passes 120.
    assert [c[2] for c in got] == [3] and got[0][7] == 88
    with session_scope(db) as s:
        got = claim_range(session=s, batch_id=b, start=0, end=6, worker_id="holder",
                          limit=2, live_within=LIVE, max_cost=10)  # one, over budget
    assert [c[2] for c in got] == [4]
    with session_scope(db) as s:
        stolen = claim_unstarted(session=s, worker_id="idle", limit=10, live_within=LIVE,
                                 max_cost=cost[9] + cost[8] + 1)
    assert [c[2] for c in stolen] == [9, 8]
    with session_scope(db) as s:
        rest = claim_unstarted(session=s, worker_id="idle", limit=100, live_within=LIVE)
    assert [c[2] for c in rest] == [i for i in by_cost if i not in (3, 4, 9, 8)]
