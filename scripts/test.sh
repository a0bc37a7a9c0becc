#!/usr/bin/env bash
# One command for the whole CPU test suite on a fresh machine:
# install, start local services if needed, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -x --durations=15 "$@"
