"""The one dtype parser: every spelling, the device default, and one error for the rest."""

from __future__ import annotations

import pytest
import torch

from models.dtypes import DTYPE_NAMES, canonical_dtype_name, parse_dtype


@pytest.mark.parametrize(("name", "dtype"), [
    ("float32", torch.float32), ("fp32", torch.float32), ("float", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), ("half", torch.float16),
    ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16),
])
def test_every_spelling(name, dtype) -> None:
    assert parse_dtype(name) is dtype


def test_every_listed_name_parses() -> None:
    assert {parse_dtype(n) for n in DTYPE_NAMES} == {torch.float32, torch.bfloat16,
                                                     torch.float16}


def test_auto_depends_on_the_device() -> None:
    assert parse_dtype(None, "cuda") is torch.bfloat16
    assert parse_dtype("auto", "cuda:1") is torch.bfloat16
    assert parse_dtype(None, "cpu") is torch.float32
    assert canonical_dtype_name(None, torch.device("cpu")) == "float32"


@pytest.mark.parametrize("bad", ["int8", "float64", "", torch.int64])
def test_unknown_names_are_one_error(bad) -> None:
    with pytest.raises(ValueError, match="dtype: one of float32, bfloat16, float16, fp32"):
        parse_dtype(bad)
