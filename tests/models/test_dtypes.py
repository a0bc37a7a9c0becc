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


def test_every_command_takes_the_same_dtype_names() -> None:
    # `--dtype bf16` once worked in `evaluate` and was refused by `generate`: every
    # command's --dtype offers exactly the parser's names.
    import argparse

    from cli.main import build_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, object]]:
        found = []
        for action in parser._actions:  # argparse exposes no public walk
            if "--dtype" in action.option_strings:
                found.append((path, action.choices))
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, f"{path} {name}")
        return found

    options = walk(build_parser(), "neoxq")
    commands = {path for path, _ in options}
    assert {"neoxq generate", "neoxq convert", "neoxq worker", "neoxq evaluate",
            "neoxq finetune", "neoxq up", "neoxq run"} <= commands
    assert [(p, c) for p, c in options if tuple(c or ()) != DTYPE_NAMES] == []
