"""Tokenizers: the real GPT-NeoX-20B file (checked against transformers' fast tokenizer)
and the byte-level fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_path)


def test_20b_tokenizer_facts(tok: Tokenizer) -> None:
    assert tok.vocab_size == 50277
    assert tok.eos_id == 0
    assert tok.name == "20B_tokenizer.json"
    assert tok.encode("Hello world") == [12092, 1533]


def test_matches_transformers(tok: Tokenizer, data_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "20B_tokenizer.json"))
    text = (data_dir / "tinyshakespeare.txt").read_text()[:5000]
    lines = [ln for ln in text.splitlines() if ln][:50]
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode_batch(lines) == [ref.encode(x, add_special_tokens=False) for x in lines]
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids) == text


def test_decode_special_and_padded_ids(tok: Tokenizer) -> None:
    ids = [0, *tok.encode(" the end")]
    assert tok.decode(ids) == "<|endoftext|> the end"
    assert tok.decode(ids, skip_special_tokens=True) == " the end"
    # Rows 50277..50431 of the padded 20B embedding have no token: they decode to nothing.
    assert tok.decode([*tok.encode("a"), 50300, 50431]) == "a"


def test_load_from_directory_and_missing(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    assert load_tokenizer(tmp_path).vocab_size == 50277
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)


def test_byte_level_round_trip() -> None:
    b = load_tokenizer(None)
    assert isinstance(b, ByteTokenizer) and isinstance(b, Tokenizer)
    assert b.eos_id == 0 and b.vocab_size == 257 and b.name == "byte-level"
    text = "héllo, wörld — 日本 🙂"
    ids = b.encode(text)
    assert len(ids) == len(text.encode()) and min(ids) >= 1
    assert b.decode(ids) == text
    assert b.encode_batch(["a", "b"]) == [[98], [99]]
    # EOS and ids beyond the bytes vanish; broken UTF-8 becomes U+FFFD, never an error.
    assert b.decode([0, *b.encode("x"), 5000]) == "x"
    assert b.decode([0xC3 + 1]) == "\ufffd"


@pytest.mark.parametrize(("eos", "offset", "vocab"), [(2, 3, 259), (50256, 0, 50257)])
def test_byte_level_eos_matches_config(eos: int, offset: int, vocab: int) -> None:
    b = ByteTokenizer(eos)
    assert b.eos_id == eos and b.offset == offset and b.vocab_size == vocab
    assert eos not in b.encode("any text at all \x00\xff")
    assert b.decode(b.encode("ok")) == "ok"
