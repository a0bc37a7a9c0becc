#!/usr/bin/env bash
# The wave-2 H200 figures of bench/results/, in device commands of under 10 minutes each
# (the last session's: ~15 minutes of device time in all, on one 2xH200 machine):
#
#   bench/wave2_h200.sh engine  OUTDIR  # one H200: fused-kernel GPU test, bf16 vs fp8-all
#                                       # on (a, 512 prompts, with HF) and (b, first 400);
#                                       # (c) caching off / on / cascade
#   bench/wave2_h200.sh extras  OUTDIR  # one H200: structured-output cost, interactive
#                                       # priority under a batch, a fresh worker's first batch
#   bench/wave2_h200.sh service OUTDIR  # two H200s: bf16 (a) and (b) side by side, then
#                                       # 1 worker / 2 workers / 2 pipeline stages
#   bench/wave2_h200.sh pair    OUTDIR  # two H200s: (a) bf16 + fp8-all with HF on GPU 0
#                                       # beside bench.structured on GPU 1, then 1 vs 2
#                                       # workers on (a) 512 and (b) 1,000 through the queue
#   bench/wave2_h200.sh open    OUTDIR  # one H200: GPU tests, GELU epilogue, structured,
#                                       # (a) with the GELU fused / apart
#   bench/wave2_h200.sh record  OUTDIR  # one H200: (a) and (b), bf16 and fp8-all, HF on both;
#                                       # a fresh worker's first batch
#   bench/wave2_h200.sh norms   OUTDIR  # one H200: fused residual + LayerNorm kernel, (a)/(b)
#   bench/wave2_h200.sh waves   OUTDIR  # one H200: GPU tests; even against greedy waves
#                                       # on (a) 512 and (c) 400 in one process each;
#                                       # structured output with even waves on
#   bench/wave2_h200.sh serial  OUTDIR  # one H200: the MLP stream per decode bucket vs
#                                       # everywhere vs nowhere on (a); (b); the record
#                                       # run, bf16 / fp8-KV / fp8-all; a profile of (a)
#   bench/wave2_h200.sh store   OUTDIR  # one H200 (~10 minutes, two device calls: split
#                                       # before the record run): GPU tests; the fused
#                                       # k/v store and the GELU epilogue at every size
#                                       # against the old ways in one engine, (a) and (b);
#                                       # the record run
#   bench/wave2_h200.sh attnfirst OUTDIR  # one H200: GPU tests; (a) with the attention's
#                                       # stream first and the MLP forked at three points,
#                                       # against the default plan, in one engine
#   bench/wave2_h200.sh pp2     OUTDIR  # two H200s: PP=2 through the queue (start OUTDIR
#                                       # with a copy of bench/results/scale_h200.json to
#                                       # add it beside the 1 and 2 worker figures)
#
# On a machine without .git, NEOXQ_COMMIT names the commit; the product's wheels are
# carried (DESIGN.md, "Running the product on the GPU machine"; add llguidance and
# jsonschema for the structured-output bench) — the device tool's `carry` must name the
# wheel folder, it is git-ignored. Benchmarks that start workers (scale, priority,
# first_batch) place them on GPUs by index among CUDA_VISIBLE_DEVICES; run only one of
# them at a time next to engine-only benchmarks pinned to the other GPU.
set -uo pipefail
what=${1:?engine, extras or service}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "$what" in
engine)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused.py 2>&1 | tail -2
    timeout 200 python3 -m bench.throughput --workload a --num-prompts 512 --modes bf16,fp8-all \
        --out "$out/engine_a_fp8_h200.json" 2>&1 | grep -E "workload|HF" | tail -8
    timeout 210 python3 -m bench.throughput --workload b --num-prompts-b 400 \
        --modes bf16,fp8-all --skip-hf --out "$out/engine_b_fp8_h200.json" 2>&1 \
        | grep -E "workload b" | tail -4
    timeout 150 python3 -m bench.throughput --workload c --num-prompts-c 400 --skip-hf \
        --out "$out/cascade_h200.json" 2>&1 | grep -E "workload c" | tail -4
    ;;
extras)
    timeout 100 python3 -m bench.structured --out "$out/structured_h200.json" 2>&1 \
        | grep -v "^Warning" | tail -6
    timeout 235 python3 -m bench.priority --out "$out/priority_h200.json" 2>&1 | tail -8
    timeout 95 python3 -m bench.first_batch --modes on --num-prompts 256 \
        --out "$out/first_batch_h200.json" 2>&1 | tail -5
    ;;
service)
    # Two GPUs (nvidia-h200-x2): the bf16 engine on each GPU side by side, then scaling.
    (CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m bench.throughput --workload a \
        --num-prompts 512 --modes bf16 --out "$out/engine_a_h200.json" > "$out/a.log" 2>&1 &)
    CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m bench.throughput --workload b \
        --num-prompts-b 400 --modes bf16 --skip-hf --out "$out/engine_b_h200.json" \
        > "$out/b.log" 2>&1
    sleep 2
    timeout 380 python3 -m bench.scale --configs 1 2 pp2 --num-prompts-a 512 \
        --num-prompts-b 500 --out "$out/scale_h200.json" 2>&1 | tail -12
    ;;
pair)
    (CUDA_VISIBLE_DEVICES=0 timeout 175 python3 -m bench.throughput --workload a \
        --num-prompts 512 --modes bf16,fp8-all --out "$out/engine_a_fp8_h200.json" \
        > "$out/a.log" 2>&1 &)
    CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m bench.structured \
        --out "$out/structured_h200.json" > "$out/structured.log" 2>&1
    while pgrep -f "bench.throughput" > /dev/null; do sleep 2; done
    timeout 450 python3 -m bench.scale --configs 1 2 --num-prompts-a 512 \
        --num-prompts-b 1000 --out "$out/scale_h200.json" 2>&1 | tail -8
    ;;
open)
    # One H200 (~6 minutes): the GPU tests of the fused GELU and branch plans, the GELU
    # epilogue's cost, structured output, and (a) with the MLP's GELU fused and apart.
    timeout 120 python3 -m pytest -q -p no:cacheprovider -s tests/models/test_fused.py \
        tests/models/test_engine.py -k "gpu or cuda" 2>&1 | grep -E "passed|failed|GELU"
    timeout 60 python3 -m bench.gelu_epilogue --out "$out/gelu_epilogue_h200.json" 2>&1 | tail -3
    timeout 150 python3 -m bench.structured --out "$out/structured_h200.json" 2>&1 \
        | grep -E "over_unconstrained"
    for fused in on off; do
        flag=""; [ "$fused" = off ] && flag="--no-fused-gelu"
        timeout 90 python3 -m bench.throughput --workload a --num-prompts 512 --skip-hf $flag \
            --out "$out/engine_a_gelu_$fused.json" 2>&1 | grep -E "workload a ours" | cut -c1-160
    done
    ;;
attnfirst)
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused.py \
        tests/models/test_engine.py -k "gpu or cuda" 2>&1 | grep -E "passed|failed|Error"
    timeout 440 python3 -m bench.throughput --workload a --num-prompts 512 --skip-hf \
        --variants "branch=attn/0/attn-first;branch=qkv/0/attn-first;branch=input/0/attn-first;branch=attn/0/attn-first/everywhere;base" \
        --out "$out/engine_a_attn_first_h200.json" 2>&1 | grep -E "workload a|decode graphs" \
        | cut -c1-300
    ;;
record)
    # One H200 (~7 minutes): the record (a) and (b) runs, bf16 and fp8-all in one process,
    # HF on both; a fresh worker's first batch (its warm-up covers every decode bucket).
    timeout 330 python3 -m bench.throughput --workload both --num-prompts 512 \
        --num-prompts-b 400 --modes bf16,fp8-all \
        --out "$out/engine_h200.json" 2>&1 | grep -E "workload . ours|HF|mode |decode graphs" \
        | cut -c1-1200
    timeout 150 python3 -m bench.first_batch --modes on --num-prompts 256 \
        --out "$out/first_batch_h200.json" 2>&1 | tail -5
    ;;
norms)
    # One H200 (~5 minutes): the fused residual-sum + LayerNorm kernel's GPU tests, (a)
    # with it (HF beside) and without it, (b) with it.
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused.py \
        tests/models/test_engine.py -k "gpu or cuda" 2>&1 | grep -E "passed|failed"
    timeout 150 python3 -m bench.throughput --workload a --num-prompts 512 \
        --out "$out/engine_a_norms_on_h200.json" 2>&1 | grep -E "workload a ours|HF" | cut -c1-160
    timeout 80 python3 -m bench.throughput --workload a --num-prompts 512 --skip-hf \
        --no-fused-norms --out "$out/engine_a_norms_off_h200.json" 2>&1 \
        | grep -E "workload a ours" | cut -c1-160
    timeout 120 python3 -m bench.throughput --workload b --num-prompts-b 400 --skip-hf \
        --out "$out/engine_b_norms_on_h200.json" 2>&1 | grep -E "workload b ours" | cut -c1-160
    ;;
waves)
    # One H200 (~6 minutes): the GPU tests (graph timings reach the scheduler), then each
    # workload with even waves and again greedily on the same engine (--compare-waves);
    # structured output (its waves must not change).
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_engine.py \
        -k "gpu or cuda" 2>&1 | grep -E "passed|failed"
    timeout 130 python3 -m bench.throughput --workload a --num-prompts 512 --skip-hf \
        --compare-waves --out "$out/engine_a_waves_h200.json" 2>&1 \
        | grep -E "workload a|decode graphs" | cut -c1-400
    timeout 150 python3 -m bench.throughput --workload c --num-prompts-c 400 --skip-hf \
        --c-ours-only --compare-waves --out "$out/engine_c_waves_h200.json" 2>&1 \
        | grep -E "workload c" | cut -c1-400
    timeout 110 python3 -m bench.structured --out "$out/structured_h200.json" 2>&1 \
        | grep -E "over_unconstrained"
    ;;
store)
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_fused.py \
        tests/models/test_engine.py -k "gpu or cuda" 2>&1 | grep -E "passed|failed"
    timeout 240 python3 -m bench.throughput --workload a --num-prompts 512 --skip-hf \
        --variants "kv_store=apart;gelu_rows=512;kv_store=apart,gelu_rows=512" \
        --out "$out/engine_a_variants_h200.json" 2>&1 | grep -E "workload a" | cut -c1-200
    timeout 230 python3 -m bench.throughput --workload b --num-prompts-b 400 --skip-hf \
        --variants "kv_store=apart,gelu_rows=512" --out "$out/engine_b_variants_h200.json" \
        2>&1 | grep -E "workload b" | cut -c1-200
    timeout 560 python3 -m bench.throughput --workload both --num-prompts 512 \
        --num-prompts-b 400 --modes bf16,fp8-kv,fp8-all --out "$out/engine_h200.json" 2>&1 \
        | grep -E "workload . ours|HF|mode " | cut -c1-200
    ;;
pp2)
    # Two H200s: one worker in 2 pipeline stages through the queue, for the scaling table.
    timeout 450 python3 -m bench.scale --configs pp2 --num-prompts-a 512 \
        --num-prompts-b 1000 --out "$out/scale_h200.json" 2>&1 | tail -6
    ;;
serial)
    # One H200 (~12 minutes, two device calls: split after the (b) run): the CUDA engine
    # tests; the MLP stream chosen per decode bucket against the stream in every bucket
    # and in none, on (a) in one process with HF; (b); then the record run (bf16, fp8-KV,
    # fp8-all on (a) and (b), HF on both) and a profile of (a)'s decode waves.
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_engine.py \
        -k "gpu or cuda" 2>&1 | grep -E "passed|failed"
    timeout 260 python3 -m bench.throughput --workload a --num-prompts 512 \
        --branch-plans input/0,input/0/everywhere,none \
        --out "$out/engine_a_serial_h200.json" 2>&1 | grep -E "workload a ours|HF|branch plan"
    timeout 130 python3 -m bench.throughput --workload b --num-prompts-b 400 --skip-hf \
        --out "$out/engine_b_serial_h200.json" 2>&1 | grep -E "workload b ours"
    timeout 530 python3 -m bench.throughput --workload both --num-prompts 512 \
        --num-prompts-b 400 --modes bf16,fp8-kv,fp8-all --out "$out/engine_h200.json" 2>&1 \
        | grep -E "workload . ours|HF|mode " | cut -c1-260
    timeout 150 python3 -m bench.profile_engine --overlapped \
        --out "$out/profile_overlapped_waves_h200.json" 2>&1 | grep -E "decode_" | cut -c1-400
    ;;
*)
    echo "usage: $0 engine|extras|service|pair|open|record|norms|waves|serial|pp2 OUTDIR" >&2
    exit 2
    ;;
esac
