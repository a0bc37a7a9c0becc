"""api/render.py: OpenAI's legacy completion logprobs, whole and in a stream's pieces."""

from __future__ import annotations

from api.render import CompletionLogprobs, completion_logprobs


def _entry(raw: bytes, lp: float) -> dict:
    text = raw.decode("utf-8", "ignore") or "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return {"token_id": 1, "token": text, "bytes": list(raw), "logprob": lp,
            "top": [{"token_id": 1, "token": text, "bytes": list(raw), "logprob": lp}]}


def test_pieces_equal_the_whole_with_offsets_across_split_characters() -> None:
    # "h", "é" split over two tokens, "llo", "€" split over two, "!"
    raws = [b"h", b"\xc3", b"\xa9llo", b"\xe2\x82", b"\xac", b"!"]
    entries = [_entry(r, -0.5 * i) for i, r in enumerate(raws)]
    whole = completion_logprobs(entries, "Say:")
    assert whole is not None
    # A character split over tokens starts at the first of them.
    assert whole["text_offset"] == [4, 5, 5, 9, 9, 10]
    for cut in ([1, 2, 3], [2, 4], [5]):
        r = CompletionLogprobs("Say:")
        parts, at = [], 0
        for c in [*cut, len(entries)]:
            parts.append(r.next(entries[at:c]))
            at = c
        joined = {k: [x for p in parts if p for x in p[k]] for k in whole}
        assert joined == whole, cut
    assert CompletionLogprobs().next([]) is None and completion_logprobs(None) is None
