"""Whether a parallel-residual block's GEMMs run faster merged: a diagnostic for the
engine's layer layout. Run on a GPU:  python3 -m bench.gemm_merge --out x.json

In a GPT-NeoX block the attention and the MLP read the same residual stream through two
LayerNorms that differ only in their gains and biases. Folded into the weights after
them, both read one normalised input, so the QKV projection and the MLP's up-projection
can be one GEMM (N = 3H + 4H), and the attention's output projection and the MLP's
down-projection one GEMM over the concatenated inputs (K = H + 4H). At decode batch
sizes cuBLAS covers N = 3H with too few tiles to fill the SMs evenly; one wider GEMM
fills them better, at the price of a separate GELU (the fused epilogue would apply to
the QKV columns too).

For each batch size M this times, replayed from a CUDA graph with distinct weight
copies (so weights come from HBM, as in the model):
- ``up_apart``: QKV GEMM + up-projection with its GELU as the cuBLASLt epilogue (what
  the engine runs; up to 512 rows only, GEMM + GELU above, before 939a4ae);
- ``up_merged``: the one wide GEMM + the tanh GELU of its MLP columns;
- ``down_apart``: output projection + down-projection, each with its bias;
- ``down_merged``: one GEMM over [attention output | MLP activation];
and reports microseconds per layer and the whole-model milliseconds per step (x layers).
On a CPU it runs the same loop on a small model's shapes (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import git_commit
from bench.gemm_sweep import COPIES, bench_target, seconds_per_call
from models.config import get_preset


def variants(m: int, h: int, f: int, device: torch.device, dtype: torch.dtype,
             ) -> dict[str, Any]:
    """name -> a function running that variant once per weight copy."""
    def w(n: int, k: int) -> list[torch.Tensor]:
        return [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(COPIES)]

    qkv, up, cat = w(3 * h, h), w(f, h), w(3 * h + f, h)
    dense, down, down_cat = w(h, h), w(h, f), w(h, h + f)
    b_qkv, b_up = torch.zeros(3 * h, device=device, dtype=dtype), \
        torch.zeros(f, device=device, dtype=dtype)
    b_cat, b_h = torch.zeros(3 * h + f, device=device, dtype=dtype), \
        torch.zeros(h, device=device, dtype=dtype)
    x = torch.randn(m, h, device=device, dtype=dtype)
    a = torch.randn(m, h, device=device, dtype=dtype)
    g = torch.randn(m, f, device=device, dtype=dtype)
    ag = torch.randn(m, h + f, device=device, dtype=dtype)
    fused = device.type == "cuda"

    def up_apart() -> None:
        for i in range(COPIES):
            F.linear(x, qkv[i], b_qkv)
            if fused:
                torch._addmm_activation(b_up, x, up[i].t(), use_gelu=True)
            else:
                F.gelu(F.linear(x, up[i], b_up), approximate="tanh")

    def up_merged() -> None:
        for i in range(COPIES):
            out = F.linear(x, cat[i], b_cat)
            F.gelu(out[:, 3 * h:], approximate="tanh")

    def down_apart() -> None:
        for i in range(COPIES):
            F.linear(a, dense[i], b_h)
            F.linear(g, down[i], b_h)

    def down_merged() -> None:
        for i in range(COPIES):
            F.linear(ag, down_cat[i], b_h)

    return {"up_apart": up_apart, "up_merged": up_merged, "down_apart": down_apart,
            "down_merged": down_merged}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a preset (default gpt-neox-20b; CPU: tiny)")
    ap.add_argument("--sizes", default="64,96,128,160,192,208,256,272,320,384,512,1024,4096")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device, preset, dtype = bench_target(args.device, args.model)
    cuda = device.type == "cuda"
    cfg = get_preset(preset)
    rows = []
    for m in [int(s) for s in args.sizes.split(",")]:
        per: dict[str, float] = {}
        for name, fn in variants(m, cfg.hidden_size, cfg.intermediate_size, device,
                                 dtype).items():
            per[name] = 1e6 * seconds_per_call(fn, device, args.reps) / COPIES
        row = {"m": m, "per_layer_us": per,
               "step_ms": {k: cfg.num_layers * v / 1e3 for k, v in per.items()},
               "up_merged_over_apart": per["up_apart"] / per["up_merged"],
               "down_merged_over_apart": per["down_apart"] / per["down_merged"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "gemm_merge", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "model": preset, "dtype": str(dtype).split(".")[-1],
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
