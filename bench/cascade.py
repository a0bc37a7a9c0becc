"""Cascade (shared-prefix) decode attention vs plain paged decode, one layer, on a GPU.

Run on a CUDA machine:  python3 -m bench.cascade [--out bench/results/cascade_h200.json]
(about 1-2 minutes on an H200, most of it tuning and compiling kernel variants).

A workload-(c)-like decode step at the 20B's attention shape (64 heads x 96, block size
16, block tables as wide as a CUDA-graph step's): ``--batch`` sequences, each one of
``--groups`` shared ``--prefix``-token prefixes (the same block ids, as prefix caching
leaves them) and its own suffix of ``--suffix-min``..``--suffix-max`` tokens. Per cache
dtype (bf16, fp8): milliseconds per call of the tuned plain kernel (what the engine runs
without cascade) and of cascade attention with every :data:`models.cascade.
CASCADE_CONFIGS` variant, replayed from CUDA graphs; the KV bytes each reads and the
bandwidth that implies; the host cost of finding the groups; every output checked
against the torch reference on a few rows and against the plain kernel on all rows.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time

import numpy as np
import torch

from bench.common import git_commit, time_cuda_graph
from models.attention import (
    cascade_decode_triton,
    decode_choice,
    paged_decode_torch,
    paged_decode_triton,
    tune_decode_kernel,
)
from models.cascade import CASCADE_CONFIGS, CascadeMetadata, find_groups, layout, max_tiles

FP8 = torch.float8_e4m3fn
NH, HD, BS = 64, 96, 16
WIDTH = 2048 // BS  # block-table columns of a CUDA-graph step
DEVICE = "cuda"


def build_step(batch: int, groups: int, prefix: int, suffix: tuple[int, int],
               dtype: torch.dtype, seed: int = 0) -> dict:
    """The step's tensors (cache, tables, lengths, queries) and host tables/lengths."""
    rng = np.random.default_rng(seed)
    pb = prefix // BS
    lens = rng.integers(suffix[0], suffix[1] + 1, size=batch) + prefix
    own = [math.ceil(n / BS) - pb for n in lens]
    num_blocks = 1 + groups * pb + sum(own)
    perm = rng.permutation(num_blocks - 1) + 1
    tables = np.zeros((batch, WIDTH), dtype=np.int64)
    shared = perm[: groups * pb].reshape(groups, pb)
    at = groups * pb
    for i in range(batch):
        tables[i, :pb] = shared[i % groups]
        tables[i, pb: pb + own[i]] = perm[at: at + own[i]]
        at += own[i]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (num_blocks, NH, BS, HD)
    kc = torch.randn(shape, generator=g, device=DEVICE)
    vc = torch.randn(shape, generator=g, device=DEVICE)
    ks = vs = None
    q = torch.randn(batch, NH, HD, generator=g, device=DEVICE)
    if dtype == FP8:
        ks = kc.abs().amax(-1).clamp_min(1e-6) / 448
        vs = vc.abs().amax(-1).clamp_min(1e-6) / 448
        kc, vc = (kc / ks[..., None]).to(FP8), (vc / vs[..., None]).to(FP8)
        q = q.bfloat16()
    else:
        kc, vc, q = kc.to(dtype), vc.to(dtype), q.to(dtype)
    return {"q": q, "kc": kc, "vc": vc, "ks": ks, "vs": vs, "host_tables": tables,
            "host_lens": lens, "tables": torch.from_numpy(tables).to(DEVICE),
            "ctx": torch.from_numpy(lens).to(DEVICE)}


def bench_dtype(dtype: torch.dtype, args: argparse.Namespace) -> dict:
    name = "fp8" if dtype == FP8 else "bf16"
    t0 = time.time()
    tune_decode_kernel(NH, HD, BS, dtype, DEVICE, query_dtype=torch.bfloat16)
    tune_s = time.time() - t0
    s = build_step(args.batch, args.groups, args.prefix, (args.suffix_min, args.suffix_max),
                   dtype)
    q, kc, vc, ks, vs, tables, ctx = (s[k] for k in ("q", "kc", "vc", "ks", "vs", "tables",
                                                     "ctx"))
    t0 = time.perf_counter()
    for _ in range(20):
        groups = find_groups(s["host_tables"], s["host_lens"], BS)
    find_ms = (time.perf_counter() - t0) / 20 * 1e3
    n_tiles = max_tiles(args.batch)
    starts, tiles, rows = layout(groups, args.batch, n_tiles)
    meta = CascadeMetadata(starts=torch.from_numpy(starts).to(DEVICE),
                           tiles=torch.from_numpy(tiles).view(n_tiles, 4).to(DEVICE),
                           rows=torch.from_numpy(rows).to(DEVICE))
    elem = 1 if dtype == FP8 else 2
    per_token = 2 * NH * HD * elem + (2 * NH * 4 if dtype == FP8 else 0)  # K+V (+ scales)
    plain_bytes = int(s["host_lens"].sum()) * per_token
    casc_bytes = (args.groups * args.prefix
                  + int((s["host_lens"] - args.prefix).sum())) * per_token
    pick = decode_choice(NH, HD, BS, dtype, args.batch, WIDTH * BS)
    plain = paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks, v_scale=vs)
    rows_chk = list(range(0, args.batch, max(1, args.batch // 8)))
    w = math.ceil(int(ctx.max()) / BS)
    ref = paged_decode_torch(q[rows_chk].float(), kc, vc, tables[rows_chk, :w], ctx[rows_chk],
                             k_scale=ks, v_scale=vs)
    plain_err = (plain[rows_chk].float() - ref).abs().max().item()
    t_plain = time_cuda_graph(lambda: paged_decode_triton(q, kc, vc, tables, ctx, k_scale=ks,
                                                v_scale=vs))
    out: dict = {
        "tune_s": tune_s, "find_groups_ms": find_ms,
        "groups": [(len(r), p) for r, p in groups],
        "plain": {"choice": [pick.config._asdict(), pick.splits], "ms": t_plain * 1e3,
                  "kv_bytes": plain_bytes, "TB_per_s": plain_bytes / t_plain / 1e12,
                  "max_abs_err": plain_err},
        "cascade": [],
    }
    print(f"[{name}] plain: {t_plain * 1e3:.3f} ms/layer ({plain_bytes / t_plain / 1e12:.2f} "
          f"TB/s), groups {out['groups']}, find_groups {find_ms:.3f} ms", flush=True)
    for cfg in CASCADE_CONFIGS:
        row: dict = {"config": cfg._asdict()}
        try:
            got = cascade_decode_triton(q, kc, vc, tables, ctx, meta, k_scale=ks, v_scale=vs,
                                        cascade_config=cfg)
            row["max_abs_err"] = (got[rows_chk].float() - ref).abs().max().item()
            row["max_abs_diff_plain"] = (got.float() - plain.float()).abs().max().item()
            t = time_cuda_graph(lambda cfg=cfg: cascade_decode_triton(
                q, kc, vc, tables, ctx, meta, k_scale=ks, v_scale=vs, cascade_config=cfg))
            row.update(ms=t * 1e3, kv_bytes=casc_bytes, TB_per_s=casc_bytes / t / 1e12,
                       speedup=t_plain / t)
            print(f"[{name}] cascade {tuple(cfg)}: {t * 1e3:.3f} ms/layer = "
                  f"{t_plain / t:.2f}x plain, err {row['max_abs_err']:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile/run
            row["error"] = repr(exc)[:500]
            print(f"[{name}] cascade {tuple(cfg)}: {row['error']}", flush=True)
        out["cascade"].append(row)
    timed = [r for r in out["cascade"] if "ms" in r]
    if timed:
        out["best"] = min(timed, key=lambda r: r["ms"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix-min", type=int, default=64)
    ap.add_argument("--suffix-max", type=int, default=192)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    result = {"commit": git_commit(), "device": torch.cuda.get_device_name(),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "torch": torch.__version__, "shape": vars(args) | {"heads": NH, "head_dim": HD,
                                                                   "block_size": BS},
              "dtypes": {}}
    ok = True
    for dtype in (torch.bfloat16, FP8):
        r = bench_dtype(dtype, args)
        result["dtypes"]["fp8" if dtype == FP8 else "bf16"] = r
        ok = ok and r["plain"]["max_abs_err"] < 2e-2 and all(
            "error" not in c and c["max_abs_err"] < 2e-2 for c in r["cascade"])
    result["ok"] = ok
    result["seconds"] = time.time() - t0
    print(f"{'ALL OK' if ok else 'FAILED'} in {result['seconds']:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
