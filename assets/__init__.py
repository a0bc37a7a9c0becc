"""The data neoxq carries with it, so that a fresh clone (or an installed wheel) can
tokenize for GPT-NeoX-20B, evaluate and run its whole test suite with nothing outside
the repository.

=========================  ============================================  ============
file                       what                                          licence
=========================  ============================================  ============
``20B_tokenizer.json``     GPT-NeoX-20B tokenizer (50277 ids)            Apache-2.0
``lambada_test.jsonl``     LAMBADA test set, OpenAI's version (5153)     CC BY 4.0
``piqa/valid.jsonl`` +     PIQA validation questions and labels (1838)   AFL-3.0
``piqa/valid-labels.lst``
``tinyshakespeare.txt``    1.1 MB of Shakespeare (fine-tuning tests)     public domain
=========================  ============================================  ============

Attribution for each is in ``NOTICE.md`` beside the files; ``SHA256SUMS`` pins their
bytes (``sha256sum -c SHA256SUMS`` in this folder, or :func:`verify`). The folder has the
same layout as the reference copies, so any ``--data-dir`` holding those works too.

Imports nothing from the project and nothing outside the standard library.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TOKENIZER = DATA_DIR / "20B_tokenizer.json"
LAMBADA = DATA_DIR / "lambada_test.jsonl"
PIQA = DATA_DIR / "piqa" / "valid.jsonl"
PIQA_LABELS = DATA_DIR / "piqa" / "valid-labels.lst"
TINYSHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"
CHECKSUMS = DATA_DIR / "SHA256SUMS"


def read_checksums(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from a ``sha256sum``-format file."""
    sums: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}:{lineno}: expected '<sha256>  <file>', got {line!r:.80}")
        sums[name.lstrip("*")] = digest.lower()
    return sums


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(reference: str | Path | None = None) -> list[str]:
    """Check every bundled file against ``SHA256SUMS`` (and against ``reference``, another
    ``SHA256SUMS`` such as the upstream copies', when given). Returns the problems found,
    one sentence each; an empty list means every file is intact."""
    problems: list[str] = []
    own = read_checksums(CHECKSUMS)
    for name, digest in own.items():
        path = DATA_DIR / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from {CHECKSUMS}")
    if reference is not None:
        for name, digest in read_checksums(reference).items():
            if name not in own:
                problems.append(f"{name}: listed in {reference} but not bundled")
            elif own[name] != digest:
                problems.append(f"{name}: bundled sha256 differs from {reference}")
    return problems
