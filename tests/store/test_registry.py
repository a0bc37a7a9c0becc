"""The model registry under concurrent writers, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import Engine

from store.db import session_scope
from store.queries import insert_if_absent
from store.registry import BASE, announce_model
from store.tables import Model


def test_insert_if_absent_keeps_the_first_row(db: Engine) -> None:
    """What a worker that lost the race to announce a name runs: nothing changes and
    nothing fails."""
    with session_scope(db) as s:
        announce_model(session=s, name="m", checkpoint="first")
    with session_scope(db) as s:
        s.execute(insert_if_absent(s, Model, ["name"]).values(
            name="m", kind=BASE, checkpoint="second"))
    with session_scope(db) as s:
        m = s.get(Model, "m")
        assert m is not None and m.checkpoint == "first" and m.kind == BASE
        assert m.owner == "system" and m.created_at > 0


def test_workers_starting_together_announce_one_name(db: Engine) -> None:
    """Eight workers announce the same new name at the same moment, twenty times over:
    each announcement succeeds and one row per name is left."""
    errors: list[BaseException] = []

    def announce(name: str, barrier: threading.Barrier, k: int) -> None:
        try:
            barrier.wait()
            with session_scope(db) as s:
                announce_model(session=s, name=name, checkpoint=f"w{k}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for round_ in range(20):
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=announce, args=(f"m{round_}", barrier, k))
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    with session_scope(db) as s:
        assert s.query(Model).count() == 20
