"""The data the project carries (assets/): intact, identical to the reference copies
where those exist, attributed, and shipped in the wheel."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

import assets
from evals.data import load_lambada, load_piqa
from models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The upstream reference copies, beside a checkout of this session's layout; a fresh clone
# has none, and then only the bundled SHA256SUMS is checked.
REFERENCE = Path(os.environ.get("NEOXQ_REFERENCE_DATA", ROOT.parent / "shared" / "data"))


def test_bundled_files_match_their_checksums() -> None:
    names = set(assets.read_checksums(assets.CHECKSUMS))
    assert names == {"20B_tokenizer.json", "lambada_test.jsonl", "tinyshakespeare.txt",
                     "piqa/valid.jsonl", "piqa/valid-labels.lst"}
    sums = REFERENCE / "SHA256SUMS"
    # Against the reference copies' list too where it exists (a fresh clone has none).
    assert assets.verify(sums if sums.is_file() else None) == []


def test_verify_names_a_changed_file(tmp_path: Path) -> None:
    ref = tmp_path / "SHA256SUMS"
    ref.write_text(assets.CHECKSUMS.read_text().replace("4aa8d02c", "00000000", 1)
                   + "f" * 64 + "  extra.txt\n")
    problems = assets.verify(ref)
    assert any("lambada_test.jsonl: bundled sha256 differs" in p for p in problems)
    assert any("extra.txt: listed in" in p for p in problems)
    bad = tmp_path / "BAD"
    bad.write_text("not a checksum line\n")
    with pytest.raises(ValueError, match="BAD:1"):
        assets.read_checksums(bad)


def test_contents_are_what_the_docs_say() -> None:
    assert load_tokenizer(assets.TOKENIZER).vocab_size == 50277
    assert len(load_lambada()) == 5153
    piqa = load_piqa()
    assert len(piqa) == 1838 and {d["label"] for d in piqa} == {0, 1}
    assert assets.TINYSHAKESPEARE.stat().st_size > 1_000_000


def test_licences_attributed_and_packaged() -> None:
    notice = (assets.DATA_DIR / "NOTICE.md").read_text()
    for needle in ("Apache License 2.0", "CC BY 4.0", "AFL-3.0", "public domain",
                   "Paperno", "Bisk", "EleutherAI"):
        assert needle in notice
    assert "Apache License" in (assets.DATA_DIR / "LICENSES" / "Apache-2.0.txt").read_text()
    # Every bundled file is matched by a package-data pattern, so the wheel carries it.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["assets"]
    for path in assets.DATA_DIR.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py":
            rel = path.relative_to(assets.DATA_DIR)
            assert any(rel.match(p) for p in patterns), f"{rel} not in package-data"


def test_readme_names_only_paths_inside_the_repository() -> None:
    # A clone has no ../shared: the README may point a reader only at files it carries.
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"\.\./|shared/data", readme)
    top = {p.name for p in ROOT.iterdir()}
    named = {m.split(":")[0].rstrip(",.") for m in re.findall(r"`([^`\s]+)`", readme)}
    repo_paths = {m for m in named if "/" in m and m.split("/")[0] in top
                  and not any(c in m for c in "*{<$")}
    assert len(repo_paths) > 20  # the check reads what it should
    assert sorted(m for m in repo_paths if not (ROOT / m).exists()) == []
