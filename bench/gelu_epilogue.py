"""The tanh GELU as the up-projection's GEMM epilogue (``torch._addmm_activation``)
against the GEMM then ``F.gelu``, at the 20B's MLP shape (6,144 -> 24,576), bf16, on a
GPU: time per call at a few row counts, and which GELU the epilogue computes (max error
against the float32 tanh and exact GELUs of the same inputs).

    python -m bench.gelu_epilogue --out bench/results/gelu_epilogue_h200.json
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


def _ms(fn: Any, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="176,336,4096")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    from models.model import gelu_epilogue_ok

    h, f = 6144, 24576
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(f, h, generator=g, device=dev) * h ** -0.5).to(torch.bfloat16)
    b = (torch.randn(f, generator=g, device=dev) * 0.1).to(torch.bfloat16)
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, h, generator=g, device=dev).to(torch.bfloat16)
        plain = _ms(lambda x=x: F.gelu(F.linear(x, w, b), approximate="tanh"))
        fused = _ms(lambda x=x: torch._addmm_activation(b, x, w.t(), use_gelu=True))
        z = F.linear(x.float(), w.float(), b.float())
        got = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
        rows.append({"rows": m, "unfused_us": round(1e3 * plain, 1),
                     "fused_us": round(1e3 * fused, 1), "speedup": round(plain / fused, 3),
                     "max_err_vs_tanh": (got - F.gelu(z, approximate="tanh")).abs().max().item(),
                     "max_err_vs_exact": (got - F.gelu(z)).abs().max().item()})
        print(rows[-1])
    result = {"bench": "gelu_epilogue", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "epilogue_is_tanh_gelu": gelu_epilogue_ok(dev), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
