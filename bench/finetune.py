"""Fine-tuning benchmark: `neoxq finetune`'s trainer on the GPU machine.

Three parts, each in its own process so that GPU memory and peaks are its own:

- ``lora20b`` — LoRA on the GPT-NeoX-20B shape (random bf16 weights) on one GPU,
  sequences of 2,048 tokens: training tokens/s, MFU against the bf16 GEMM rate measured
  in the same process and against the datasheet peak, peak memory; with and without
  activation checkpointing.
- ``zero`` — full fine-tuning of a Pythia-2.8B-shaped model with DeepSpeed ZeRO-2 on 2
  GPUs (``torch.distributed.run``): tokens/s, MFU (6·N per token), peak memory per GPU.
- ``scratch`` — a Pythia-160M-shaped model trained from random weights on
  tinyshakespeare (GPT-NeoX-20B tokenizer; last 10% held out) for a few hundred steps:
  the validation loss curve, and samples from the saved model through `neoxq generate`.

Model FLOPs per token (``train.finetune.model_flops_per_token``): N = parameters in
matrix products (all but the input embedding). Full: 6·N. LoRA on a frozen base: 4·N
(forward, and backward through activations only) + 6 per adapter parameter. Attention
scores and checkpointing's recomputation are not counted.

``python -m bench.finetune`` runs all parts (lora20b and scratch side by side on GPUs 0
and 1, then zero on both) and writes ``bench/results/finetune_h200.json``;
``--parts`` picks some; ``--smoke`` runs tiny shapes on CPU to check the script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, git_commit

PARTS = ("lora20b", "scratch", "zero")
FLOPS_NOTE = ("model FLOPs per token: N = parameters in matrix products (all but the input "
              "embedding); full fine-tuning 6*N; LoRA on a frozen base 4*N (forward, and "
              "backward through activations only) + 6 per adapter parameter; attention "
              "scores and activation checkpointing's recomputation not counted")
SAMPLE_PROMPTS = ("ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:")


def _gemm_rate(device: Any) -> float:
    """bf16 GEMM FLOP/s of an 8192³ product (the ceiling MFU is also quoted against)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return rate


def _timed(trainer: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Run warm-up steps, then time ``steps`` steps (each ends in a host sync: the loss)."""
    import torch

    losses = [trainer.train_step()["loss"] for _ in range(warmup)]
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
    tokens = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        r = trainer.train_step()
        tokens += r["tokens"]
        losses.append(r["loss"])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    wall = time.perf_counter() - t
    tok_s = tokens / wall
    out = {"timed_steps": steps, "warmup_steps": warmup, "wall_s": wall,
           "tokens_per_step": tokens / steps, "tokens_per_s": tok_s, "losses": losses,
           "flops_per_token": trainer.flops_per_token,
           "model_tflops_per_gpu": tok_s * trainer.flops_per_token / trainer.dist.world / 1e12}
    if trainer.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    return out


def _trainer(cfg_kw: dict[str, Any]) -> Any:
    from train.finetune import FinetuneConfig, Trainer

    return Trainer(FinetuneConfig(**cfg_kw))


def part_lora20b(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    """One LoRA configuration (``--lora-checkpointing 0|1``), in a process of its own."""
    import torch

    from train.finetune import single_process_env

    smoke = args.smoke
    ckpt = bool(args.lora_checkpointing)
    model = "preset:tiny" if smoke else "preset:gpt-neox-20b"
    seq = 128 if smoke else 2048
    gemm = None if smoke else _gemm_rate(torch.device("cuda"))
    t0 = time.perf_counter()
    try:
        with single_process_env():
            trainer = _trainer(dict(
                model=model, train=str(data), out=str(work / f"lora_{int(ckpt)}"),
                method="lora", max_length=seq, batch_size=str(args.lora_batch),
                micro_batch_size=args.lora_micro, max_steps=1000, learning_rate=1e-4,
                activation_checkpointing=ckpt, save_model=False, quiet=True,
                device="cpu" if smoke else "cuda", tokenizer=args.tokenizer,
                dtype="float32" if smoke else "bfloat16"))
            setup_s = time.perf_counter() - t0
            r = _timed(trainer, args.warmup, args.lora_steps)
    except torch.OutOfMemoryError as exc:
        return {"activation_checkpointing": ckpt, "error": f"out of memory: {exc}"[:300]}
    r.update(model=model, seq_len=seq, dtype="bfloat16", setup_s=setup_s,
             activation_checkpointing=ckpt, micro_batch=trainer.micro,
             gradient_accumulation=trainer.accum, trainable_parameters=trainer.trainable,
             lora={"rank": trainer.cfg.lora_rank, "alpha": trainer.cfg.lora_alpha,
                   "dropout": trainer.cfg.lora_dropout, "targets": trainer.cfg.lora_targets})
    if gemm:
        r["gemm_flops_per_s"] = gemm
        r["mfu_vs_measured_gemm"] = r["model_tflops_per_gpu"] * 1e12 / gemm
        r["mfu_vs_989_tflops"] = r["model_tflops_per_gpu"] / 989.4
    print(f"lora20b ckpt={ckpt}: {r['tokens_per_s']:.0f} tok/s, "
          f"{r['model_tflops_per_gpu']:.1f} TFLOP/s", file=sys.stderr, flush=True)
    return r


def part_zero(args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any] | None:
    """One rank of the ZeRO run (started under torch.distributed.run)."""
    import torch

    smoke = args.smoke
    model = "preset:tiny" if smoke else "preset:pythia-2.8b"
    seq = 128 if smoke else 2048
    trainer = _trainer(dict(
        model=model, train=str(data), out=str(work / "zero"), method="full", zero_stage=2,
        max_length=seq, batch_size=str(args.zero_batch), micro_batch_size=args.zero_micro,
        max_steps=1000, learning_rate=1e-5, activation_checkpointing=args.zero_checkpointing,
        save_model=False, quiet=True, device="cpu" if smoke else "cuda",
        tokenizer=None if smoke else args.tokenizer, dtype="float32" if smoke else "bfloat16"))
    r = _timed(trainer, args.warmup, args.zero_steps)
    peaks = torch.tensor([r.get("peak_memory_gib", 0.0)], device=trainer.device)
    gathered = [torch.zeros_like(peaks) for _ in range(trainer.dist.world)]
    torch.distributed.all_gather(gathered, peaks)
    if not trainer.is_main:
        return None
    r.update(model=model, seq_len=seq, zero_stage=2, ranks=trainer.dist.world,
             micro_batch=trainer.micro, gradient_accumulation=trainer.accum,
             activation_checkpointing=args.zero_checkpointing,
             parameters=trainer.config.num_params(),
             peak_memory_gib_per_gpu=[float(g) for g in gathered])
    r.pop("peak_memory_gib", None)
    if not smoke:
        r["mfu_vs_989_tflops"] = r["model_tflops_per_gpu"] / 989.4
        r["gemm_flops_per_s"] = _gemm_rate(trainer.device)
        r["mfu_vs_measured_gemm"] = r["model_tflops_per_gpu"] * 1e12 / r["gemm_flops_per_s"]
    return r


def part_scratch(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from train.finetune import LOG_FILE, run

    smoke = args.smoke
    import assets

    text = assets.TINYSHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, val = work / "shakespeare_train.txt", work / "shakespeare_val.txt"
    train.write_text(text[:cut] if not smoke else text[:20000], encoding="utf-8")
    val.write_text(text[cut:] if not smoke else text[cut:cut + 5000], encoding="utf-8")
    out = args.scratch_out or work / "scratch160m"
    t = time.perf_counter()
    summary = run(_scratch_config(args, train, val, out))
    wall = time.perf_counter() - t
    curve = [json.loads(ln) for ln in (out / LOG_FILE).read_text().splitlines()]
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    gen = work / "samples.jsonl"
    cmd = [sys.executable, "-m", "cli.main", "generate", str(out), "-i", str(prompts),
           "-o", str(gen), "--max-tokens", "48", "--temperature", "0.8", "--top-p", "0.95",
           "--seed", "0", "--quiet"] + (["--device", "cpu"] if smoke else [])
    subprocess.run(cmd, check=True, cwd=ROOT)
    samples = [{"prompt": s["context"], "text": s["text"]}
               for s in map(json.loads, gen.read_text().splitlines())]
    return {"model": "preset:pythia-160m" if not smoke else "preset:tiny",
            "tokenizer": "GPT-NeoX-20B (assets/20B_tokenizer.json)",
            "data": "tinyshakespeare.txt: first 90% train, last 10% validation",
            "wall_s": wall, "summary": summary, "val_loss_curve": [
                {k: r[k] for k in ("step", "train_loss", "val_loss", "tokens_per_s", "mfu")}
                for r in curve], "samples": samples,
            "sampling": "neoxq generate --temperature 0.8 --top-p 0.95 --max-tokens 48 --seed 0"}


def _scratch_config(args: argparse.Namespace, train: Path, val: Path, out: Path) -> Any:
    from train.finetune import FinetuneConfig

    smoke = args.smoke
    return FinetuneConfig(
        model="preset:tiny" if smoke else "preset:pythia-160m", train=str(train),
        validation=str(val), out=str(out), method="full", zero_stage=1,
        max_length=256 if not smoke else 64, batch_size="16" if not smoke else "4",
        max_steps=args.scratch_steps, learning_rate=6e-4, warmup_steps=20 if not smoke else 1,
        weight_decay=0.1, log_every=args.scratch_log_every, activation_checkpointing=False,
        tokenizer=args.tokenizer, quiet=True, device="cpu" if smoke else "cuda",
        dtype="float32" if smoke else "bfloat16")


def _write_data(work: Path, tokens: int, tokenizer: str) -> Path:
    """A plain-text training file: tinyshakespeare, repeated to ``tokens`` tokens' worth."""
    import assets

    text = assets.TINYSHAKESPEARE.read_text(encoding="utf-8")
    # ~3.3 characters per token for this text with the 20B tokenizer
    reps = max(1, int(tokens * 3.4 / len(text)) + 1)
    path = work / "bench_train.txt"
    path.write_text(text * reps, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    import assets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--part", help=argparse.SUPPRESS)  # one part, in a child process
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/finetune_h200.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--tokenizer", default=str(assets.TOKENIZER))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-steps", type=int, default=6)
    p.add_argument("--lora-batch", type=int, default=4)
    p.add_argument("--lora-micro", type=int, default=2)
    p.add_argument("--lora-checkpointing", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--zero-steps", type=int, default=8)
    p.add_argument("--zero-batch", type=int, default=16)
    p.add_argument("--zero-micro", type=int, default=4)
    p.add_argument("--zero-checkpointing", action="store_true")
    # 200 steps x 16 rows x 256 tokens: ~2.7 passes over the 0.3M training tokens
    p.add_argument("--scratch-steps", type=int, default=200)
    p.add_argument("--scratch-log-every", type=int, default=20)
    p.add_argument("--scratch-out", type=Path, help="keep the from-scratch model here")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokenizer = None

    if args.part:  # a child: run one part, write its JSON
        work = args.work
        data = work / "bench_train.txt"
        if args.part == "lora20b":
            res: Any = part_lora20b(args, data, work)
        elif args.part == "zero":
            res = part_zero(args, data, work)
        else:
            res = part_scratch(args, work)
        if res is not None:
            args.json.write_text(json.dumps(res, indent=2))
        return 0

    parts = [x for x in args.parts.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="neoxq_ftbench_"))
    _write_data(work, 400_000 if not args.smoke else 20_000, args.tokenizer)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    given = list(argv if argv is not None else sys.argv[1:])
    for i, a in enumerate(given):  # children get every option but --parts (either form)
        if a == "--parts":
            given[i:i + 2] = ["", ""]
        elif a.startswith("--parts="):
            given[i] = ""
    child = [sys.executable, "-m", "bench.finetune", "--work", str(work)] + [a for a in given if a]

    def start(part: str, gpu: str | None, ranks: int = 1, name: str | None = None,
              extra: tuple[str, ...] = ()) -> subprocess.Popen:
        e = dict(env)
        if gpu is not None and not args.smoke:
            e["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = child + ["--part", part, "--json", str(work / f"{name or part}.json"), *extra]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", *cmd[1:]]
        print(f"== {name or part}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.Popen(cmd, cwd=ROOT, env=e)

    t0 = time.perf_counter()
    rcs: dict[str, int] = {}

    def lora_both() -> None:  # two configurations one after the other on GPU 0
        for ck in ("1", "0"):
            key = f"lora20b_ckpt{ck}"
            rcs[key] = start("lora20b", "0", name=key,
                             extra=("--lora-checkpointing", ck)).wait()

    # lora20b and scratch need one GPU each: side by side; zero then takes both.
    scratch = start("scratch", "1" if "lora20b" in parts else "0") if "scratch" in parts else None
    if "lora20b" in parts:
        lora_both()
    if scratch is not None:
        rcs["scratch"] = scratch.wait()
    _write_result(args, work, parts, rcs, t0)
    if "zero" in parts:
        rcs["zero"] = start("zero", None, ranks=2).wait()
    result = _write_result(args, work, parts, rcs, t0)
    print(json.dumps({k: v for k, v in result.items() if k not in PARTS}, indent=1))
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


def _write_result(args: argparse.Namespace, work: Path, parts: list[str], rcs: dict[str, int],
                  t0: float) -> dict[str, Any]:
    """The result file, rewritten after each phase (a run cut short keeps what it did)."""
    result: dict[str, Any] = {
        "benchmark": "bench/finetune.py", "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "wall_s": time.perf_counter() - t0,
        "flops_note": FLOPS_NOTE,
        "exit_codes": rcs,
    }
    try:
        import deepspeed
        import peft
        import torch

        result.update(torch=torch.__version__, deepspeed=deepspeed.__version__,
                      peft=peft.__version__,
                      device=torch.cuda.get_device_name(0) if torch.cuda.is_available()
                      else "cpu", gpus=torch.cuda.device_count())
    except ImportError:
        pass

    def read(name: str) -> Any:
        f = work / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    for part in parts:
        if part == "lora20b":
            result[part] = {"checkpointing": read("lora20b_ckpt1"),
                            "no_checkpointing": read("lora20b_ckpt0")}
        else:
            result[part] = read(part)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
