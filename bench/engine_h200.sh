#!/usr/bin/env bash
# The engine's H200 figures (bench/results/engine_h200.json), old and new engine measured
# on the same machine in one device session, as two commands (each stays under the
# device's 10-minute limit per command):
#
#   bench/engine_h200.sh new OUTDIR   # GPU tests of the decode kernel (every config the
#                                     # tuner may pick), then this engine on (a), (b, the
#                                     # first 1000 prompts) and (c, 500 prompts, prefix
#                                     # caching on then off)
#   bench/engine_h200.sh old OUTDIR   # the previous engine on (a) and (b, 1000 prompts):
#                                     # its models/ and bench/ copied into .old/ first, e.g.
#                                     # git archive OLD models bench | tar -x -C .old
#
# HF baselines are not re-run here (see the README); NEOXQ_COMMIT names the commit on a
# machine without .git.
set -euo pipefail
what=${1:?new or old}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "$what" in
new)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_attention.py \
        tests/models/test_engine.py 2>&1 | tee "$out/gpu_tests.log" | tail -5 \
        || echo "GPU TESTS FAILED (the benchmark still runs: its tuner skips wrong configs)"
    python3 -m bench.throughput --workload all --num-prompts-b 1000 --num-prompts-c 500 \
        --skip-hf --out "$out/engine_new.json" 2>&1 | tee "$out/engine_new.log"
    ;;
old)
    # .old first on the path: its bench and models, not this checkout's.
    python3 - "$out/engine_old.json" <<'EOF' 2>&1 | tee "$out/engine_old.log"
import sys

sys.path.insert(0, ".old")
from bench import throughput as T  # noqa: E402 - the old tree's

assert T.__file__.startswith(".old") or "/.old/" in T.__file__, T.__file__
workload = T.workload
# (b) on its first 1000 prompts, as the README's figures; (a) whole.
T.workload = lambda name, n, pos, vocab, seed=0: workload(
    name, 1000 if name == "b" else n, pos, vocab, seed)
T.main(["--workload", "both", "--skip-hf", "--out", sys.argv[1]])
EOF
    ;;
*)
    echo "usage: $0 new|old OUTDIR" >&2
    exit 2
    ;;
esac
