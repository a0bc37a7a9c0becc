"""Reading the local evaluation files, with errors that name the file and the line.

The files are the ones lm-evaluation-harness downloads from the Hugging Face hub, kept
on disk so that evaluation touches no network. The project carries them (``assets/``,
:data:`DEFAULT_DATA_DIR`); any folder of the same layout can stand in (``--data-dir``):

- LAMBADA (OpenAI's version): ``lambada_test.jsonl``, one ``{"text": ...}`` per line.
- PIQA validation: ``piqa/valid.jsonl`` (``{"goal", "sol1", "sol2"}`` per line) and
  ``piqa/valid-labels.lst`` (one 0/1 label per line, same order).

Nothing here imports torch or lm_eval: the loaders serve both neoxq's own runner and
the lm-eval task objects built in :mod:`evals.harness`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import assets

# The copies the project carries: evaluation needs no --data-dir.
DEFAULT_DATA_DIR = assets.DATA_DIR
LAMBADA_FILE = "lambada_test.jsonl"
PIQA_FILE = "piqa/valid.jsonl"
PIQA_LABELS_FILE = "piqa/valid-labels.lst"


class DataError(ValueError):
    """A data file is missing or one of its lines is not what the task expects."""


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found (pass the folder that holds it as --data-dir)")
    return path


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every line a JSON object holding string ``fields``; blank lines are an error too,
    since a silently skipped line would shift PIQA's labels against its questions."""
    docs: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                raise DataError(f"{path}:{lineno}: empty line, expected a JSON object")
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(doc, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {doc!r:.60}")
            for field in fields:
                if not isinstance(doc.get(field), str):
                    got = "missing" if field not in doc else type(doc[field]).__name__
                    raise DataError(
                        f"{path}:{lineno}: field {field!r}: expected a string, got {got}"
                    )
            docs.append({field: doc[field] for field in fields})
    if not docs:
        raise DataError(f"{path}: file is empty")
    return docs


def load_lambada(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI) test documents ``{"text"}`` from ``DATA_DIR/lambada_test.jsonl``
    (``data_dir`` None: the bundled copy)."""
    data_dir = DEFAULT_DATA_DIR if data_dir is None else data_dir
    path = _require(Path(data_dir) / LAMBADA_FILE, "LAMBADA test file")
    docs = _read_jsonl(path, ("text",))
    for lineno, doc in enumerate(docs, 1):
        # The task splits on the last space: a text without one has no target word.
        if " " not in doc["text"].strip():
            raise DataError(f"{path}:{lineno}: field 'text': expected words separated by spaces")
    return docs


def load_piqa(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """PIQA validation documents ``{"goal", "sol1", "sol2", "label"}`` (``data_dir``
    None: the bundled copy)."""
    data_dir = DEFAULT_DATA_DIR if data_dir is None else data_dir
    path = _require(Path(data_dir) / PIQA_FILE, "PIQA validation file")
    labels_path = _require(Path(data_dir) / PIQA_LABELS_FILE, "PIQA labels file")
    docs = _read_jsonl(path, ("goal", "sol1", "sol2"))
    labels: list[int] = []
    with labels_path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            value = line.strip()
            if value not in ("0", "1"):
                raise DataError(f"{labels_path}:{lineno}: expected a label 0 or 1, got {value!r}")
            labels.append(int(value))
    if len(labels) != len(docs):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(docs)} questions in {path}"
        )
    for doc, label in zip(docs, labels, strict=True):
        doc["label"] = label
    return docs
