"""Fixtures for the fine-tuning tests: a small byte-level model and tinyshakespeare splits.

The model is the `tiny` preset's shape with a 320-row vocabulary (byte-level text needs
257 ids): the 50k-row head of the preset would make every CPU step ~100x slower.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import get_preset
from models.loaders import random_model, save_neoxq
from models.tokenizer import ByteTokenizer


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A neoxq directory: random tiny weights, byte-level tokenizer."""
    cfg = get_preset("tiny").replace(name="tiny-bytes", vocab_size=320, max_position=256)
    path = tmp_path_factory.mktemp("byte_model")
    save_neoxq(random_model(cfg, seed=0), ByteTokenizer(), path)
    return path


@pytest.fixture(scope="session")
def shakespeare(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, validation): 60 kB of tinyshakespeare and the 5 kB that follow it."""
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("shakespeare")
    (d / "train.txt").write_text(text[:60_000], encoding="utf-8")
    (d / "val.txt").write_text(text[60_000:65_000], encoding="utf-8")
    return d / "train.txt", d / "val.txt"
