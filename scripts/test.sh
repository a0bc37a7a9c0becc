#!/usr/bin/env bash
# One command for the whole CPU test suite on a fresh machine:
# install, start local services if needed, lint, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/services.sh
.venv/bin/ruff check .
# -n 3 on any machine: many long tests mostly wait (on worker subprocesses, leases,
# timeouts), so even 2 cores keep 3 of them moving; `-n 0` after it runs serially.
# --maxschedchunk 1: tests are handed out one at a time as processes free up (xdist's
# default first hands each process a quarter of its share in a row: one process got
# every slow test, collected first, and ran on for minutes after the others).
.venv/bin/python -m pytest -q -x -n 3 --maxschedchunk 1 --durations=15 "$@"
