"""worker/runtime.py's Room: how many items, and tokens of items, a worker may claim."""

from __future__ import annotations

import threading
import time

from worker.runtime import Room


def test_room_hands_out_slots_and_tokens_and_takes_them_back() -> None:
    room = Room(10, tokens=800)
    assert room.least_tokens == 100
    assert room.take(4) == (4, 800)  # every free token: the claim gives back what it skips
    room.give(0, 800 - 700)  # the claim used 700 of them
    assert (room.free, room.tokens_free) == (6, 100)
    assert room.has_room(2) and not room.has_room(7)
    room.give(0, -150)  # a first item costlier than the tokens given: over budget
    assert room.tokens_free == -50 and not room.has_room(1)
    assert room.take(2, timeout=0.01) == (0, 0)  # no tokens worth a claim
    room.give(4, 700)  # the items finished
    assert room.take(3) == (3, 650) and room.tokens_free == 0


def test_a_waiting_claim_wakes_when_an_item_gives_its_tokens_back() -> None:
    room = Room(10, tokens=800)
    room.take(10)
    got: list[tuple[int, int]] = []
    t = threading.Thread(target=lambda: got.append(room.take(5, timeout=5)))
    t.start()
    time.sleep(0.05)
    room.give(1, 50)  # a slot, but too few tokens for a claim
    time.sleep(0.05)
    assert not got and room.waiting == 1
    room.give(1, 100)
    t.join(2)
    assert got == [(2, 150)]


def test_without_a_token_budget_only_slots_count() -> None:
    room = Room(3)
    assert room.take(5)[0] == 3 and room.take(1, timeout=0.01) == (0, 0)


def test_a_starved_engine_gets_a_claim_beyond_the_token_budget() -> None:
    """Costs count prompts whole; with shared prefixes an engine runs more than its
    budget: while it has started everything it was given, a claim's worth more may be
    taken, and no more once items wait in it."""
    started_all = [False]
    room = Room(100, tokens=800, starved=lambda: started_all[0])
    assert room.take(10) == (10, 800)
    assert not room.has_room(1) and room.take(1, timeout=0.01) == (0, 0)
    started_all[0] = True
    assert room.has_room(1)
    assert room.take(5) == (5, 100)  # a claim's worth (least_tokens) beyond the budget
    assert room.tokens_free == -100
    started_all[0] = False
    assert room.take(1, timeout=0.3) == (0, 0)
