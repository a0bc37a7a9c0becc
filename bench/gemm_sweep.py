"""How fast the decode step's GEMMs run at each batch size: a diagnostic for choosing the
engine's decode batch sizes. Run on a GPU:  python3 -m bench.gemm_sweep --out x.json

At ~256 sequences the 20B's decode GEMMs are compute-bound, and cuBLAS covers the token
dimension with tiles of 80-144 rows: a batch that is not a multiple of the tile computes
the rest of the last tile for nothing. For each batch size M this times the four linear
layers of one block at their real shapes (``torch.nn.functional.linear`` with bias, in
the model dtype, replayed from a CUDA graph as decode steps are) and reports, for the
whole model (x layers), the GEMM milliseconds per decode step, per token, and the share
of the bf16 GEMM rate measured in the same run. On a CPU it runs the same loop on a small
model's shapes (a smoke test of the script; the figures mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import git_commit, time_cuda_graph
from bench.throughput import measure_ceilings
from models.config import get_preset


def block_shapes(preset: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(layers, [(name, out_features, in_features)]) of one block's linear layers."""
    cfg = get_preset(preset)
    h, f = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers, [("query_key_value", 3 * h, h), ("dense", h, h),
                            ("dense_h_to_4h", f, h), ("dense_4h_to_h", h, f)]


# Distinct weight copies the timed loop cycles through, so a layer's weights come from
# HBM as in the model (one 6144x6144 bf16 matrix would otherwise stay in the 50 MB L2).
COPIES = 4


def inductor_linear() -> Any:
    """``F.linear`` compiled by Inductor with max-autotune: on first use at each shape it
    times its own Triton GEMM templates (persistent TMA ones included) against cuBLAS and
    keeps the fastest (its AUTOTUNE lines on stderr list them)."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    inductor.triton.enable_persistent_tma_matmul = True
    # One compile per (batch size, layer shape): past dynamo's recompile limit (8) a
    # shape would silently run eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, 256)

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)

    return torch.compile(linear, mode="max-autotune-no-cudagraphs", dynamic=False)


def plain_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.linear`` as a GEMM whose output starts as the broadcast bias (beta = 1), not
    cuBLASLt's bias epilogue (what torch runs for a 1-D bias): a different kernel choice."""
    return torch.addmm(b.expand(x.shape[0], w.shape[0]), x, w.t())


def seconds_per_call(fn: Any, device: torch.device, reps: int) -> float:
    """Seconds a call of ``fn`` takes after a first, untimed one (compiles, tunes): on a
    GPU replayed from a CUDA graph, as decode steps are; on a CPU in a plain loop."""
    fn()
    if device.type == "cuda":
        return time_cuda_graph(fn, reps)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_target(device_arg: str, model_arg: str | None,
                 ) -> tuple[torch.device, str, torch.dtype]:
    """The device, the preset (default: the 20B on a GPU, tiny on a CPU) and the dtype
    (bf16 on a GPU, float32 on a CPU) a GEMM diagnostic runs at."""
    device = torch.device(device_arg)
    cuda = device.type == "cuda"
    return (device, model_arg or ("gpt-neox-20b" if cuda else "tiny"),
            torch.bfloat16 if cuda else torch.float32)


def sweep(preset: str, sizes: list[int], device: torch.device, dtype: torch.dtype,
          reps: int, linear: Any = F.linear) -> list[dict[str, Any]]:
    layers, shapes = block_shapes(preset)
    weights = [(name, [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                       for _ in range(COPIES)],
                torch.zeros(n, device=device, dtype=dtype)) for name, n, k in shapes]
    rows = []
    for m in sizes:
        per: dict[str, float] = {}
        flops = 0
        for name, ws, b in weights:
            x = torch.randn(m, ws[0].shape[1], device=device, dtype=dtype)

            def run(x: torch.Tensor = x, ws: list[torch.Tensor] = ws,
                    b: torch.Tensor = b) -> None:
                for w in ws:
                    linear(x, w, b)

            # The first call compiles and tunes, where linear does that on first use.
            per[name] = seconds_per_call(run, device, reps) / COPIES
            flops += 2 * m * ws[0].shape[0] * ws[0].shape[1]
        step = layers * sum(per.values())
        rows.append({"m": m, "step_ms": 1e3 * step, "us_per_token": 1e6 * step / m,
                     "tflops": layers * flops / step / 1e12,
                     "per_layer_us": {k: 1e6 * v for k, v in per.items()}})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a preset (default gpt-neox-20b; CPU: tiny)")
    ap.add_argument("--sizes", default="128:513:16",
                    help="START:STOP:STEP of batch sizes, or a comma-separated list")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--blas", default="default",
                    help="comma-separated torch BLAS back ends to sweep: default, cublas, "
                         "cublaslt (torch.backends.cuda.preferred_blas_library), or "
                         "inductor (see inductor_linear), plain (see plain_linear)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device, preset, dtype = bench_target(args.device, args.model)
    cuda = device.type == "cuda"
    if ":" in args.sizes:
        start, stop, step = (int(v) for v in args.sizes.split(":"))
        sizes = list(range(start, stop, step))
    else:
        sizes = [int(v) for v in args.sizes.split(",")]
    gemm = measure_ceilings(device)["gemm_flops_per_s"] / 1e12 if cuda else None
    blases = args.blas.split(",")
    by_blas: dict[str, list[dict[str, Any]]] = {}
    for blas in blases:
        linear = F.linear
        if blas == "inductor":
            linear = inductor_linear()
        elif blas == "plain":
            linear = plain_linear
        elif blas != "default":
            torch.backends.cuda.preferred_blas_library(blas)
        rows = by_blas[blas] = sweep(preset, sizes, device, dtype, args.reps, linear)
        for r in rows:
            if gemm:
                r["share_of_gemm_rate"] = r["tflops"] / gemm
            print(f"{blas:8s} M={r['m']:4d}  {r['step_ms']:7.2f} ms/step  "
                  f"{r['us_per_token']:7.2f} us/token  {r['tflops']:6.1f} TFLOP/s"
                  + (f"  {r['share_of_gemm_rate']:.0%}" if gemm else ""))
    rows = by_blas[blases[0]]
    result = {"bench": "gemm_sweep", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "model": preset, "dtype": str(dtype)[6:],
              "gemm_tflops": gemm, "rows": rows, "by_blas": by_blas}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
