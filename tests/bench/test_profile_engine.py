"""bench.profile_engine's trace arithmetic: busy time, overlap and kernel kinds."""

from __future__ import annotations

from bench.profile_engine import gpu_timeline, kernel_kind


def test_gpu_timeline_counts_busy_overlap_and_kinds() -> None:
    events = [
        # a GEMM 0-10 us, attention beside it 5-15, a gap, then a copy 20-22
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_192x80", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "paged_decode_kernel", "ts": 5, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 20, "dur": 2},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host: ignored
    ]
    t = gpu_timeline({"traceEvents": events})
    assert t["window_ms"] == 0.022 and t["activities"] == 3
    assert abs(t["busy_ms"] - 0.017) < 1e-9 and abs(t["overlap_ms"] - 0.005) < 1e-9
    assert t["by_kind_ms"] == {"attention": 0.01, "copy": 0.002, "gemm": 0.01}
    assert gpu_timeline({"traceEvents": []})["busy_share"] == 0.0


def test_kernel_kinds() -> None:
    assert kernel_kind("void cutlass::Kernel2<...>") == "gemm"
    assert kernel_kind("merge_kernel") == "attention"
    assert kernel_kind("Memset (Device)") == "copy"
    assert kernel_kind("vectorized_layer_norm_kernel") == "other"
