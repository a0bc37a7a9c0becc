"""Training files: formats, loss masks, packing, and errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.loaders import load_model
from models.model import DenseAttention, PackedAttention
from models.tokenizer import ByteTokenizer, Tokenizer
from train.data import IGNORE, DataError, load_dataset, pack, read_examples


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def _loss_text(tok: Tokenizer, tokens: list[int], loss: list[bool]) -> str:
    return tok.decode([t for t, w in zip(tokens, loss, strict=True) if w])


def test_prompt_completion_masks_the_prompt(tmp_path: Path, tok: Tokenizer) -> None:
    f = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "Translate: cat ->", "completion": " chat"},
                                      {"prompt": "2 + 2 =", "completion": " 4"}])
    fmt, examples = read_examples(f, tok, 64)
    assert fmt == "prompt_completion"
    ex = examples[0]
    n_prompt = len(tok.encode("Translate: cat ->"))
    assert ex.tokens == tok.encode("Translate: cat ->") + tok.encode(" chat") + [tok.eos_id]
    assert not any(ex.loss[:n_prompt])  # no prompt token is a target
    assert all(ex.loss[n_prompt:])
    assert _loss_text(tok, ex.tokens, ex.loss) == " chat<|endoftext|>"


def test_chat_trains_on_weighted_assistant_messages_only(tmp_path: Path, tok: Tokenizer) -> None:
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there", "weight": 0},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour"}]},
        {"role": "assistant", "content": "Blue"},
    ]}])
    fmt, [ex] = read_examples(f, tok, 256)
    assert fmt == "chat"
    assert _loss_text(tok, ex.tokens, ex.loss) == " Blue<|endoftext|>"
    text = tok.decode(ex.tokens)
    assert text.startswith("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello there")
    assert "User: Name a colour\n\nAssistant: Blue<|endoftext|>" in text


def test_text_lines_and_plain_text_train_on_every_token(tmp_path: Path, tok: Tokenizer) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "To be, or not to be"}])
    fmt, [ex] = read_examples(f, tok, 64)
    assert fmt == "text" and all(ex.loss)
    plain = tmp_path / "p.txt"
    plain.write_text("word " * 100)
    fmt, pieces = read_examples(plain, tok, 32)
    assert fmt == "plain_text" and len(pieces) > 2
    assert all(len(p.tokens) <= 32 and all(p.loss) for p in pieces)
    assert sum(len(p.tokens) for p in pieces) == len(tok.encode("word " * 100)) + 1


def test_packing_keeps_documents_whole_and_apart() -> None:
    bt = ByteTokenizer()
    from train.data import Example

    docs = [Example(bt.encode(s) + [0], [False] * 2 + [True] * (len(s) - 1), i + 1)
            for i, s in enumerate(["abcdefghij", "klmno", "pqrstuvw", "xyz", "0123456789ab"])]
    packed = pack(docs, 16)
    seen = []
    for r in range(packed.num_rows):
        seg = packed.segments[r]
        for s in range(seg.max() + 1):
            cols = np.flatnonzero(seg == s)
            assert (np.diff(cols) == 1).all()  # one contiguous run per document
            assert (packed.positions[r, cols] == np.arange(len(cols))).all()
            seen.append(bt.decode(packed.tokens[r, cols].tolist()))
            # the last token of a document predicts nothing (no target crosses documents)
            assert packed.targets[r, cols[-1]] == IGNORE
            for j in cols[:-1]:
                want = packed.tokens[r, j + 1]
                assert packed.targets[r, j] in (want, IGNORE)
        assert (packed.targets[r, seg < 0] == IGNORE).all()
    assert sorted(seen) == sorted(bt.decode(d.tokens) for d in docs)
    # targets are exactly the next tokens that carry loss
    total = sum(sum(d.loss[1:]) for d in docs)
    assert packed.num_targets(np.arange(packed.num_rows)) == total


def test_packed_attention_equals_each_document_alone() -> None:
    model = load_model("preset:tiny-sequential").model
    rng = np.random.default_rng(0)
    lengths = [7, 12, 5]
    docs = [torch.from_numpy(rng.integers(1, 300, n)) for n in lengths]
    tokens = torch.cat(docs + [torch.zeros(6, dtype=torch.int64)])  # 24 real + 6 padding
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(6, dtype=torch.int64)])
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                         + [torch.full((6,), -1)])
    with torch.no_grad():
        packed = model(tokens, positions, PackedAttention(segments[None]))
        at = 0
        for d in docs:
            alone = model(d, torch.arange(len(d)), DenseAttention(1, len(d)))
            torch.testing.assert_close(packed[at:at + len(d)], alone, rtol=1e-5, atol=1e-5)
            at += len(d)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("lines, expected", [
    ([{"prompt": "a"}], "pc.jsonl:1: field 'completion': missing"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}],
     "pc.jsonl:2: field 'prompt': expected a string, got int"),
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     "pc.jsonl:1: field 'messages': no assistant message to train on"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}],
     "pc.jsonl:1: field 'messages[0]'.role: expected one of system, user, assistant"),
    ([{"text": "a"}, "{not json"], "pc.jsonl:2: not valid JSON"),
    ([{"text": "a"}, {"prompt": "a", "completion": "b"}],
     "pc.jsonl:2: a prompt_completion line in a text file"),
    ([{"input": "a"}], "pc.jsonl:1: expected 'messages' (chat), 'prompt' and 'completion', "
     "or 'text'; found fields input"),
    ([[1, 2]], "pc.jsonl:1: expected a JSON object, got list"),
])
def test_bad_lines_are_named(tmp_path: Path, lines: list[object], expected: str) -> None:
    f = _jsonl(tmp_path / "pc.jsonl", lines)
    with pytest.raises(DataError) as exc:
        read_examples(f, ByteTokenizer(), 64)
    assert expected in str(exc.value)


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    good = {"prompt": "p", "completion": "c"}
    f = _jsonl(tmp_path / "pc.jsonl", [good, {"prompt": "p"}, good, {"completion": 1}, good])
    with pytest.raises(DataError) as exc:
        read_examples(f, ByteTokenizer(), 64)
    msg = str(exc.value)
    assert msg.startswith("2 bad line(s)")
    assert "pc.jsonl:2:" in msg and "pc.jsonl:4:" in msg and "pc.jsonl:3:" not in msg


def test_empty_file_is_refused(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.txt"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(DataError, match="empty"):
            read_examples(tmp_path / name, ByteTokenizer(), 64)


def test_overlong_lines_refused_truncated_or_split(tmp_path: Path) -> None:
    bt = ByteTokenizer()
    f = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "p" * 10, "completion": "c" * 10},
                                      {"prompt": "p" * 10, "completion": "c" * 100}])
    with pytest.raises(DataError) as exc:
        read_examples(f, bt, 64)
    assert "pc.jsonl:2: 111 tokens, longer than max_length 64" in str(exc.value)
    _, [a, b] = read_examples(f, bt, 64, overlong="truncate")
    assert len(a.tokens) == 21 and len(b.tokens) == 64
    assert b.tokens[:10] == bt.encode("p" * 10) and not any(b.loss[:10])
    # a prompt that alone fills max_length leaves nothing to learn: refused
    with pytest.raises(DataError, match="pc.jsonl:1: nothing left to train on"):
        read_examples(f, bt, 8, overlong="truncate")
    with pytest.raises(DataError, match="text lines only"):
        read_examples(f, bt, 64, overlong="split")
    t = _jsonl(tmp_path / "t.jsonl", [{"text": "x" * 150}])
    _, pieces = read_examples(t, bt, 64, overlong="split")
    assert [len(p.tokens) for p in pieces] == [64, 64, 23]


def test_load_dataset_packs(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "q" * 5, "completion": "a" * 5}] * 10)
    fmt, packed = load_dataset(f, ByteTokenizer(), 32)
    assert fmt == "prompt_completion" and packed.num_documents == 10
    assert packed.num_rows == 5  # 11 tokens each: two fit in a 32-token row
    # each predicts its 5 completion tokens and the end-of-text token
    assert packed.num_targets(np.arange(packed.num_rows)) == 10 * 6
