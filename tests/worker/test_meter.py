"""worker/meter.py: generated tokens/s as the worker counts them, with a fake clock."""

from __future__ import annotations

import pytest

from worker.meter import RATE_WINDOW, GenerationMeter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_in_flight_tokens_count_before_anything_finishes() -> None:
    clock = Clock()
    m = GenerationMeter(clock=clock)
    m.track("r1", "A", budget=100)
    m.track("r2", "A", budget=50)
    # 4 s of steady decoding, two sequences, 1 token each per 0.5 s step: 4 tok/s
    for step in range(1, 9):
        clock.t += 0.5
        m.observe({"r1": step, "r2": step})
    snap = m.snapshot()
    assert snap.tokens_generated == 16
    # the first tokens arrived with the first observation, 0.5 s into the run
    assert snap.tokens_per_s == pytest.approx(16 / 3.5)
    assert snap.batches["A"].tokens_per_s == pytest.approx(16 / 3.5)
    assert snap.batches["A"].inflight_tokens == 16
    assert snap.batch_rates()["A"] == {"tokens_per_s": round(16 / 3.5, 3),
                                       "inflight_tokens": 16, "inflight_items": 2,
                                       "inflight_budget": 150}


def test_finishing_together_makes_no_spike_and_the_rate_decays_when_idle() -> None:
    clock = Clock()
    m = GenerationMeter(clock=clock)
    for i in range(10):
        m.track(f"r{i}", "A")
    for step in range(1, 21):  # 10 s at 10 sequences x 2 tok/s = 20 tok/s
        clock.t += 0.5
        m.observe({f"r{i}": step for i in range(10)})
    before = m.snapshot().tokens_per_s
    for i in range(10):  # all finish at once, with no token beyond what was observed
        m.finish(f"r{i}", 20)
    after = m.snapshot()
    assert after.tokens_per_s == pytest.approx(before)  # counted once, when generated
    assert after.tokens_per_s == pytest.approx(20.0, rel=0.06)
    assert after.batches["A"].inflight_tokens == 0
    clock.t += RATE_WINDOW / 2
    assert 0 < m.snapshot().tokens_per_s < before
    clock.t += RATE_WINDOW
    idle = m.snapshot()
    assert idle.tokens_per_s == 0.0 and "A" not in idle.batches
    assert idle.tokens_generated == 200


def test_per_batch_rates_and_a_batch_that_starts_late() -> None:
    clock = Clock()
    m = GenerationMeter(clock=clock)
    m.track("a", "A")
    for step in range(1, 41):  # A: 2 tok/s for 20 s
        clock.t += 0.5
        m.observe({"a": step})
    m.track("b", "B")
    for step in range(1, 5):  # then B joins for 2 s at 6 tok/s, A goes on
        clock.t += 0.5
        m.observe({"a": 40 + step, "b": 3 * step})
    snap = m.snapshot()
    assert snap.batches["A"].tokens_per_s == pytest.approx(2.0, rel=0.1)
    # B's pace over its own 2 s, not diluted over the 10 s window
    assert snap.batches["B"].tokens_per_s == pytest.approx(12 / 1.5, rel=0.01)
    assert snap.tokens_per_s == pytest.approx(snap.batches["A"].tokens_per_s
                                              + 12 / RATE_WINDOW, rel=0.1)


def test_untracked_forgotten_and_shrinking_counts_are_ignored() -> None:
    clock = Clock()
    m = GenerationMeter(clock=clock)
    m.observe({"stranger": 5})
    m.track("r", "A")
    clock.t += 1
    m.observe({"r": 4})
    m.observe({"r": 3})  # a preempted sequence recomputes: never counted twice or back
    m.forget("r")
    m.observe({"r": 9})
    snap = m.snapshot()
    assert snap.tokens_generated == 4 and snap.batches["A"].inflight_tokens == 0


def test_requests_of_no_batch_count_in_the_worker_figures_only() -> None:
    """A synchronous request (no batch) adds to the worker's tokens/s and total, and
    appears in no batch's figures."""
    clock = Clock()
    m = GenerationMeter(clock=clock)
    m.track("b1", "A", budget=40)
    m.track("i1", None)
    for step in range(1, 9):
        clock.t += 0.5
        m.observe({"b1": step, "i1": 2 * step})
    m.finish("i1", 20)
    snap = m.snapshot()
    assert snap.tokens_generated == 8 + 20
    assert snap.tokens_per_s == pytest.approx(28 / 3.5)
    assert set(snap.batches) == {"A"}
    assert snap.batches["A"].inflight_tokens == 8 and snap.batches["A"].inflight_items == 1
    assert snap.batches["A"].tokens_per_s == pytest.approx(8 / 3.5)
