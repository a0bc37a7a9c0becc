"""Checkpoint loading benchmark: seconds, GB/s and peak host memory.

CPU mode (default) — a random Pythia-1.4B-shape checkpoint in neoxq's form and as an HF
``model.safetensors``, each loaded in a fresh process (cold page cache, then warm), with
HF ``from_pretrained`` on the same file as the baseline and a raw read of the files as
the ceiling::

    python -m bench.load            # -> bench/results/load_pythia1.4b_cpu.json

20B mode (GPU machine) — a random GPT-NeoX-20B-shape checkpoint (41 GB bf16) drawn on the
GPU and written in neoxq's form to local disk, then loaded onto the GPU in bf16::

    python -m bench.load --mode 20b --dir /tmp/neoxq-20b   # -> bench/results/load_20b.json

Peak host memory is the loading process's ``VmHWM`` (and ``ru_maxrss``), measured in a
fresh subprocess per load so that nothing else's allocations count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import git_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GB = 1e9


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:.0f}s] {msg}", flush=True)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------ the child


def child(args: argparse.Namespace) -> None:
    """Load once and print one JSON line of measurements (runs in a fresh process)."""
    import torch

    from models.loaders import load_model
    from models.tokenizer import ByteTokenizer

    if args.device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # CUDA context before the clock starts
    dtype = getattr(torch, args.dtype)
    rss_before = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    if args.how == "hf-from-pretrained":
        from transformers import GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM.from_pretrained(args.spec, dtype=dtype, device_map=args.device)
    elif args.how == "raw-read":
        from models.loaders import _pread_all

        buf = bytearray(1 << 30)
        view = memoryview(buf)
        total = 0
        for f in sorted(Path(args.spec).glob("*.safetensors")):
            size = f.stat().st_size
            fd = os.open(f, os.O_RDONLY)
            for off in range(0, size, len(buf)):
                n = min(len(buf), size - off)
                _pread_all(fd, view[:n], off, f, "raw")
            os.close(fd)
            total += size
        model = None
    else:
        model = load_model(args.spec, device=args.device, dtype=dtype,
                           tokenizer=ByteTokenizer(0)).model
    if args.device == "cuda":
        torch.cuda.synchronize()
    lazy_seconds = time.perf_counter() - t0
    if model is not None:
        # Memory-mapped CPU weights (ours and HF's) are read on first touch: touch every
        # tensor so that "seconds" means ready to run, for every loader alike.
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        if args.device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if model is not None:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        nbytes = total
    out = {
        "seconds": round(seconds, 3),
        "bytes": nbytes,
        "gb_per_s": round(nbytes / GB / seconds, 3),
        "peak_rss_gb": round(_status_kb("VmHWM") * 1024 / GB, 3),
        "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
        "rss_before_load_gb": round(rss_before / GB, 3),
    }
    out["peak_rss_over_start_gb"] = round(out["peak_rss_gb"] - out["rss_before_load_gb"], 3)
    out["seconds_before_touching_weights"] = round(lazy_seconds, 3)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(how: str, spec: Path | str, device: str, dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.load", "--child", how, "--spec", str(spec),
           "--device", device, "--dtype", dtype]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{how} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"how": how, **json.loads(line.removeprefix("RESULT "))}


def evict(path: Path) -> bool:
    """Drop a directory's files from the page cache (clean pages; no root needed)."""
    ok = True
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


# ----------------------------------------------------------------------------- the parent


def _meta(device: str) -> dict[str, Any]:
    import torch

    commit = git_commit()
    if device == "cuda":
        dev = torch.cuda.get_device_name()
    else:
        names = [ln.split(":", 1)[1].strip() for ln in
                 Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        dev = f"{names[0] if names else platform.processor()} x{os.cpu_count()} (CPU)"
    mem = _status_meminfo_gb()
    return {
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev,
        "host": {"cpus": os.cpu_count(), "ram_gb": mem},
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _status_meminfo_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / GB, 1)
    return 0.0


def _dir_stats(path: Path) -> dict[str, Any]:
    files = [f for f in path.iterdir() if f.suffix == ".safetensors"]
    sizes = [f.stat().st_size for f in files]
    return {"files": len(files), "bytes": sum(sizes), "largest_file_bytes": max(sizes)}


def write_checkpoints(preset: str, dtype: str, device: str, work: Path,
                      hf_too: bool) -> tuple[Path, Path | None, dict[str, Any]]:
    """Random weights drawn on ``device``, written in neoxq's form (and optionally HF's)."""
    import torch

    from models.config import get_preset
    from models.loaders import random_model, save_neoxq, write_safetensors
    from models.tokenizer import ByteTokenizer

    t0 = time.perf_counter()
    model = random_model(get_preset(preset), device=device, dtype=getattr(torch, dtype), seed=0)
    if device == "cuda":
        torch.cuda.synchronize()
    drawn = time.perf_counter() - t0
    log(f"drew {preset} on {device} in {drawn:.1f}s; writing neoxq form to {work}")
    fast = work / "neoxq"
    done = [0]

    def progress(name: str) -> None:
        done[0] += 1
        if done[0] % 8 == 0:
            log(f"  wrote {done[0]} files")

    t1 = time.perf_counter()
    save_neoxq(model, ByteTokenizer(0), fast, progress=progress, threads=4)
    written = time.perf_counter() - t1
    info = {"preset": preset, "dtype": dtype, "draw_seconds": round(drawn, 2),
            "write_seconds": round(written, 2), "neoxq": _dir_stats(fast)}
    info["write_gb_per_s"] = round(info["neoxq"]["bytes"] / GB / written, 3)
    log(f"wrote {info['neoxq']['bytes'] / GB:.1f} GB in {written:.1f}s")
    hf = None
    if hf_too:
        hf = work / "hf"
        hf.mkdir(parents=True, exist_ok=True)
        names = {n: (n if n == "embed_out.weight" else f"gpt_neox.{n}")
                 for n in model.state_dict()}
        write_safetensors(hf / "model.safetensors",
                          {names[n]: t for n, t in model.state_dict().items()})
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = dtype
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        info["hf"] = _dir_stats(hf)
        log(f"wrote HF model.safetensors ({info['hf']['bytes'] / GB:.1f} GB)")
    info["params"] = model.config.num_params()
    del model  # the loads below run in children; free this copy first
    if device == "cuda":
        torch.cuda.empty_cache()
    return fast, hf, info


def cpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.dir)
    fast, hf, info = write_checkpoints(args.preset or "pythia-1.4b", "float32", "cpu", work,
                                       hf_too=True)
    assert hf is not None
    runs = []
    for how, spec in [("neoxq", fast), ("hf-safetensors", hf), ("raw-read", fast)]:
        for cache in ("cold", "warm"):
            if cache == "cold" and not evict(spec):
                continue
            r = run_child("load" if how != "raw-read" else how, spec, "cpu", "float32")
            runs.append({"format": how, "cache": cache, **r})
            log(f"{how:16s} {cache}: {r['seconds']:.2f}s {r['gb_per_s']:.2f} GB/s "
                f"peak RSS {r['peak_rss_gb']:.2f} GB (+{r['peak_rss_over_start_gb']:.2f})")
    if not args.no_baseline:
        try:
            import transformers  # noqa: F401

            for cache in ("cold", "warm"):
                if cache == "cold" and not evict(hf):
                    continue
                r = run_child("hf-from-pretrained", hf, "cpu", "float32")
                runs.append({"format": "hf-safetensors", "cache": cache, **r})
                log(f"HF from_pretrained {cache}: {r['seconds']:.2f}s "
                    f"peak RSS {r['peak_rss_gb']:.2f} GB")
        except ImportError:
            log("transformers not installed: no baseline")
    return {"checkpoint": info, "runs": runs}


def gpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.dir)
    start = time.perf_counter()
    preset = args.preset or "gpt-neox-20b"
    dev = args.load_device
    fast, _, info = write_checkpoints(preset, "bfloat16", dev, work, hf_too=False)
    runs = []
    # Most important first; the cold raw read (the disk's ceiling) only if time allows,
    # so that the whole mode stays under ~4 minutes.
    plan = [("load", "cold"), ("load", "warm"), ("raw-read", "warm"), ("raw-read", "cold")]
    if args.no_cold:
        plan = [p for p in plan if p[1] == "warm"]
    for how, cache in plan:
        if how == "raw-read" and cache == "cold" and time.perf_counter() - start > 150:
            log("skipping the cold raw read (time box)")
            continue
        if cache == "cold" and not evict(fast):
            log("could not evict the page cache; skipping cold run")
            continue
        r = run_child(how, fast, dev, "bfloat16")
        runs.append({"format": "neoxq" if how == "load" else how, "cache": cache, **r})
        log(f"{how} {cache}: {r['seconds']:.2f}s {r['gb_per_s']:.2f} GB/s peak host RSS "
            f"{r['peak_rss_gb']:.2f} GB (+{r['peak_rss_over_start_gb']:.2f} during load)")
    r = run_child("load", f"preset:{preset}", dev, "bfloat16")
    runs.append({"format": "preset (random on GPU)", "cache": "-", **r})
    log(f"preset:{preset} built on the GPU in {r['seconds']:.2f}s")
    log(f"20B mode total {time.perf_counter() - start:.0f}s")
    # The seed's write-up: the released 20B took "about half an hour" to load.
    return {"checkpoint": info, "runs": runs, "reference_seed_load_seconds": 1800}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("cpu", "20b"), default="cpu")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--no-cold", action="store_true", help="skip cold-page-cache runs")
    p.add_argument("--no-baseline", action="store_true", help="skip HF from_pretrained")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--preset", default=None, help="another shape (smoke tests)")
    p.add_argument("--load-device", default="cuda", help=argparse.SUPPRESS)  # CPU dry runs
    # child process arguments
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.how = args.child
        child(args)
        return 0
    args.dir = args.dir or f"/tmp/neoxq-load-{args.mode}"
    if Path(args.dir).exists():
        shutil.rmtree(args.dir)
    device = args.load_device if args.mode == "20b" else "cpu"
    meta = _meta(device)
    try:
        body = gpu_mode(args) if args.mode == "20b" else cpu_mode(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    result = {"benchmark": "load", "mode": args.mode, **meta, **body}
    result["summary"] = _summary(body)
    name = "load_20b.json" if args.mode == "20b" else "load_pythia1.4b_cpu.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    print(json.dumps(result["summary"], indent=2), flush=True)
    return 0


def _summary(body: dict[str, Any]) -> dict[str, Any]:
    """Ratios in one run: neoxq vs the HF baseline and vs a raw read of the same bytes."""
    runs = body["runs"]

    def pick(fmt: str, cache: str, how: str | None = None) -> dict[str, Any] | None:
        return next((r for r in runs if r["format"] == fmt and r["cache"] == cache
                     and (how is None or r["how"] == how)), None)

    s: dict[str, Any] = {"model_gb": round(body["checkpoint"]["neoxq"]["bytes"] / GB, 2),
                         "largest_file_gb": round(
                             body["checkpoint"]["neoxq"]["largest_file_bytes"] / GB, 3)}
    for cache in ("cold", "warm"):
        ours = pick("neoxq", cache)
        if ours is None:
            continue
        s[f"neoxq_{cache}_seconds"] = ours["seconds"]
        s[f"neoxq_{cache}_gb_per_s"] = ours["gb_per_s"]
        s[f"neoxq_{cache}_peak_host_rss_gb"] = ours["peak_rss_gb"]
        s[f"neoxq_{cache}_host_rss_growth_gb"] = ours["peak_rss_over_start_gb"]
        raw = pick("raw-read", cache)
        if raw:
            s[f"{cache}_fraction_of_raw_read"] = round(raw["seconds"] / ours["seconds"], 3)
        hf = pick("hf-safetensors", cache, "hf-from-pretrained")
        if hf:
            s[f"{cache}_speedup_vs_hf_from_pretrained"] = round(hf["seconds"] / ours["seconds"], 2)
            s[f"hf_from_pretrained_{cache}_peak_rss_gb"] = hf["peak_rss_gb"]
    return s


if __name__ == "__main__":
    sys.exit(main())
