"""The upload line scanner finds the first too-long line wherever chunks are cut."""

from __future__ import annotations

import random

from api.uploads import LineScan


def scan(data: bytes, max_line: int, seed: int) -> int | None:
    rng = random.Random(seed)
    s, i = LineScan(max_line), 0
    while i < len(data):
        n = rng.randint(1, 40)
        s.feed(data[i:i + n])
        i += n
    return s.too_long


def test_line_scan_any_chunking() -> None:
    lines = [b"a" * n for n in (5, 10, 3, 11, 2, 30)]
    data = b"\n".join(lines) + b"\n"
    for seed in range(50):
        assert scan(data, 10, seed) == 4  # the 11-byte line
        assert scan(data, 30, seed) is None
        assert scan(data, 29, seed) == 6
    assert scan(b"x" * 100, 50, 0) == 1  # no newline at all
    assert scan(b"ok\n" + b"y" * 60, 50, 1) == 2  # the last line, unterminated
