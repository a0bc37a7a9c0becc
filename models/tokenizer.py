"""Tokenizers: Hugging Face ``tokenizers`` JSON files, and a byte-level fallback.

GPT-NeoX-20B and Pythia ship one ``tokenizer.json`` (50277 ids, ``<|endoftext|>`` = 0).
Random-weight presets have no tokenizer of their own; they get :class:`ByteTokenizer`,
which maps each UTF-8 byte to one id so that any text round-trips without a vocab file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# End-of-text markers tried, in order, when a tokenizer file does not say which id ends text.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (``bytes_to_unicode``), inverted: the printable
    character a vocabulary entry uses for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


def token_text(data: bytes) -> str:
    """A token's bytes as OpenAI shows a token: its text, or ``bytes:\\xNN...`` when
    the bytes are not complete UTF-8 (a character split over several tokens)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Tokenizer:
    """A Hugging Face ``tokenizers`` JSON tokenizer.

    ``encode`` adds no special tokens (GPT-NeoX prompts start with the first text
    token, as HF ``generate`` sees them); ``decode`` keeps special tokens unless told
    otherwise (as ``transformers`` does) and drops ids the vocabulary does not have
    (rows of a padded embedding).
    """

    def __init__(self, path: str | Path, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path: Path | None = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({exc})") from None
        self.name = self.path.name
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            found = (self._tok.token_to_id(t) for t in EOS_TOKENS)
            eos_id = next((i for i in found if i is not None), 0)
        self.eos_id: int = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tokenizers parallelises the batch call in Rust.
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def special_ids(self) -> set[int]:
        """Ids of special tokens (``<|endoftext|>``, ``<|padding|>``): control tokens,
        not text (the 20B's added runs of spaces are text)."""
        return {k for k, v in self._tok.get_added_tokens_decoder().items() if v.special}

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for (b"" for an id outside the vocabulary): an
        added token's text, or its byte-level BPE characters mapped back to bytes."""
        if not hasattr(self, "_added"):
            self._added = {k: v.content for k, v in self._tok.get_added_tokens_decoder()
                           .items()}
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self._tok.id_to_token(i)
        if piece is None:
            return b""
        if all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.decode([i]).encode("utf-8")  # not a byte-level vocabulary

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte, offset past the end-of-text id.

    A :class:`Tokenizer` (same interface) that needs no file.

    With ``eos_id`` = 0 (GPT-NeoX's) byte ``b`` is id ``b + 1``. Ids that are not a
    byte (EOS, rows of a larger embedding) decode to nothing; invalid UTF-8 decodes
    to U+FFFD, so any id sequence a random model emits is printable.
    """

    name = "byte-level"

    def __init__(self, eos_id: int = 0) -> None:  # no file to read, unlike the base class
        if eos_id < 0:
            raise ValueError(f"eos_id must be >= 0, got {eos_id}")
        self.path = None
        self.eos_id = eos_id
        # Put the bytes after the EOS id when it is small, else below it.
        self.offset = eos_id + 1 if eos_id < 256 else 0
        self.vocab_size = max(self.offset + 256, eos_id + 1)

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        lo, hi = self.offset, self.offset + 256
        data = bytes(i - lo for i in ids if lo <= i < hi and i != self.eos_id)
        return data.decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str | None:
        if i == self.eos_id:
            return "<|endoftext|>"
        if self.offset <= i < self.offset + 256:
            return chr(i - self.offset)
        return None

    def token_bytes(self, i: int) -> bytes:
        if i == self.eos_id:
            return b"<|endoftext|>"
        if self.offset <= i < self.offset + 256:
            return bytes([i - self.offset])
        return b""

    def __repr__(self) -> str:
        return f"ByteTokenizer(eos_id={self.eos_id})"


def load_tokenizer(path: str | Path | None, eos_id: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` (a file, or a directory holding one); ``None`` gives the
    byte-level fallback whose EOS is ``eos_id`` (default 0, GPT-NeoX's)."""
    if path is None:
        return ByteTokenizer(0 if eos_id is None else eos_id)
    return Tokenizer(path, eos_id=eos_id)
