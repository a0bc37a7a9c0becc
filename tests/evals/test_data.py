"""Local data files: the real ones load; broken ones name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.data import DataError, load_lambada, load_piqa


def test_real_files_load(data_dir: Path) -> None:
    lambada = load_lambada(data_dir)
    piqa = load_piqa(data_dir)
    assert len(lambada) == 5153
    assert len(piqa) == 1838
    assert set(piqa[0]) == {"goal", "sol1", "sol2", "label"}
    assert piqa[0]["label"] == 0 and piqa[1]["label"] == 1


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lambada_test\.jsonl: LAMBADA test file not found"):
        load_lambada(tmp_path)
    with pytest.raises(DataError, match=r"piqa/valid\.jsonl: PIQA validation file not found"):
        load_piqa(tmp_path)


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"lambada_test\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"lambada_test\.jsonl:2: expected a JSON object"),
        ('{"txt": "a b"}', r"lambada_test\.jsonl:2: field 'text': expected a string, got missing"),
        ('{"text": 3}', r"lambada_test\.jsonl:2: field 'text': expected a string, got int"),
        ('{"text": "oneword"}', r"lambada_test\.jsonl:2: field 'text': expected words"),
        ("", r"lambada_test\.jsonl:2: empty line"),
    ],
)
def test_malformed_lambada_line(tmp_path: Path, line: str, message: str) -> None:
    _write(tmp_path / "lambada_test.jsonl", [json.dumps({"text": "a fine line"}), line])
    with pytest.raises(DataError, match=message):
        load_lambada(tmp_path)


def test_malformed_piqa(tmp_path: Path) -> None:
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    _write(tmp_path / "piqa/valid.jsonl", [good, json.dumps({"goal": "g", "sol1": "a"})])
    _write(tmp_path / "piqa/valid-labels.lst", ["0", "1"])
    with pytest.raises(DataError, match=r"valid\.jsonl:2: field 'sol2'"):
        load_piqa(tmp_path)
    _write(tmp_path / "piqa/valid.jsonl", [good, good])
    _write(tmp_path / "piqa/valid-labels.lst", ["0", "2"])
    with pytest.raises(DataError, match=r"valid-labels\.lst:2: expected a label 0 or 1, got '2'"):
        load_piqa(tmp_path)
    _write(tmp_path / "piqa/valid-labels.lst", ["0"])
    with pytest.raises(DataError, match=r"valid-labels\.lst: 1 labels for 2 questions"):
        load_piqa(tmp_path)
