"""The import table of docs/ARCHITECTURE.md, enforced with import-linter (contracts in
pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_api_does_not_load_torch() -> None:
    code = "import sys, api, core, store; import api.app; assert 'torch' not in sys.modules"
    api_app = ROOT / "api" / "app.py"
    if not api_app.exists():
        code = "import sys, api, core, store; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
