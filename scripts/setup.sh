#!/usr/bin/env bash
# Create .venv and install neoxq into it. One argument picks what:
#
#   bash scripts/setup.sh          # worker: run models (neoxq run/up/worker/generate/evaluate)
#   bash scripts/setup.sh light    # light: API + client (submit/poll/results), no torch
#   bash scripts/setup.sh train    # train: worker + neoxq finetune (deepspeed, peft)
#   bash scripts/setup.sh dev      # dev: worker + eval + train + test tools (what scripts/test.sh uses)
#
# torch is installed first, pinned to the CPU build available locally, so that the
# project's torch range does not pull a multi-GB CUDA build (on a GPU host, install your
# CUDA torch first and this step keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-worker}
case "$MODE" in
    light) EXTRAS="" ;;
    worker) EXTRAS="[worker]" ;;
    train) EXTRAS="[train]" ;;
    dev) EXTRAS="[dev]" ;;
    *) echo "usage: bash scripts/setup.sh [light|worker|train|dev]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$MODE" != light ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==${NEOXQ_TORCH_VERSION:-2.13.0}"
fi
# DS_BUILD_OPS=0: DeepSpeed (train extra) installs as pure Python, no op compiled.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".$EXTRAS"
[ "$MODE" = dev ] || exit 0
# Headless Chromium for the dashboard's browser test (Debian's package; Playwright drives
# it, so `playwright install` and its downloads are never needed), and a compose client so
# that docker-compose.yml is validated: the Docker CLI's `docker compose` (v2) if present,
# else Debian's docker-compose (1.29 on bookworm, which reads the same file; Debian ships no
# v2). Best effort: without them those tests skip.
apt_install() {  # apt-get install, refreshing the package lists once if needed
    apt-get install -y -q "$@" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$@" >/dev/null 2>&1; }
}
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    [ -x /usr/bin/chromium ] || apt_install chromium \
        || echo "setup.sh: could not install chromium (the browser test will skip)" >&2
    # --no-install-recommends: the compose client only, not a docker engine
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
        || apt_install --no-install-recommends docker-compose \
        || echo "setup.sh: could not install docker-compose (compose validation skips)" >&2
fi
