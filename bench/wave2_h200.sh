#!/usr/bin/env bash
# The wave-2 H200 figures, in three device commands (each under the device's 10-minute
# limit per command), all in one device session:
#
#   bench/wave2_h200.sh engine  OUTDIR  # GPU tests of models/, decode-kernel bandwidth
#                                       # (old vs new configs), bf16 / fp8-kv / fp8-all on
#                                       # workloads (a, 512 prompts) and (b, first 400) with
#                                       # HF baselines -> engine_h200.json; overlap on/off
#   bench/wave2_h200.sh extras  OUTDIR  # (c) caching off / on / cascade, FP8 accuracy,
#                                       # structured-output cost, interactive priority
#                                       # under a batch (through the worker)
#   bench/wave2_h200.sh service OUTDIR  # a fresh worker's first batch vs its second
#
# On a machine without .git, NEOXQ_COMMIT names the commit; the product's wheels are
# carried (DESIGN.md, "Running the product on the GPU machine"; add llguidance and
# jsonschema for the structured-output bench).
set -uo pipefail
what=${1:?engine, extras or service}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "$what" in
engine)
    timeout 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_fp8.py \
        tests/models/test_overlap.py tests/models/test_engine.py tests/models/test_sampling.py \
        tests/models/test_cascade.py 2>&1 | tee "$out/gpu_tests.log" | tail -8
    timeout 70 python3 -m bench.check_attention --out "$out/check_attention_h200.json" 2>&1 \
        | tail -8
    timeout 330 python3 -m bench.throughput --workload both --num-prompts 512 \
        --num-prompts-b 400 --modes bf16,fp8-kv,fp8-all --hf-prompts-b 16 \
        --out "$out/engine_h200.json" 2>&1 | tee "$out/engine.log" \
        | grep -v "decode kernel" | tail -30
    timeout 60 python3 -m bench.throughput --workload a --num-prompts 512 --compare-overlap \
        --skip-hf --out "$out/overlap_h200.json" 2>&1 | grep -i "overlap\|ours" | tail -6
    ;;
extras)
    timeout 100 python3 -m bench.throughput --workload c --num-prompts-c 600 --skip-hf \
        --out "$out/cascade_h200.json" 2>&1 | grep -v "decode kernel" | tail -8
    timeout 150 python3 -m bench.fp8_accuracy --out "$out/fp8_accuracy.json" 2>&1 | tail -12
    timeout 90 python3 -m bench.structured --out "$out/structured_h200.json" 2>&1 \
        | grep -v "^Warning" | tail -25
    timeout 220 python3 -m bench.priority --out "$out/priority_h200.json" 2>&1 | tail -20
    ;;
service)
    timeout 280 python3 -m bench.first_batch --out "$out/first_batch_h200.json" 2>&1 | tail -12
    ;;
*)
    echo "usage: $0 engine|extras|service OUTDIR" >&2
    exit 2
    ;;
esac
