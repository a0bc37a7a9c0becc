"""`neoxq finetune`: LoRA or full fine-tuning of any model the loaders take.

No torch import at module level (``neoxq --help`` must start fast); the training code
(``train/``, which needs the ``train`` extra: deepspeed and peft) loads when the command
runs. ``--gpus N`` > 1 starts N ranks under ``torch.distributed.run``; each reads the
run's config from ``OUT/finetune_config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from models.dtypes import DTYPE_NAMES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `finetune`."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model (LoRA or full, DeepSpeed, 1..N GPUs)",
        description=(
            "Train MODEL on a training file and write the result to --out in neoxq's "
            "fast-loading form, which `neoxq generate`, `neoxq worker` and `neoxq evaluate` "
            "load like any model. Training files: chat JSONL ({\"messages\": [...]}) or "
            "prompt/completion JSONL (loss on assistant/completion tokens only), {\"text\"} "
            "JSONL or a plain-text file (loss on every token). Examples are packed into "
            "rows of --max-length tokens; attention never crosses examples."
        ),
    )
    p.add_argument("model", help="preset:NAME, an HF directory, a GPT-NeoX YAML, or a neoxq "
                   "directory (e.g. an earlier fine-tune)")
    p.add_argument("--train", required=True, type=Path, help="training file (.jsonl or text)")
    p.add_argument("--validation", type=Path, help="validation file, same formats")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--method", default="lora", help="lora (default) or full")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training file")
    p.add_argument("--max-steps", type=int, help="train exactly N steps (overrides --epochs)")
    p.add_argument("--learning-rate", type=float,
                   help="peak learning rate (default 2e-4 for lora, 2e-5 for full); linear "
                   "warm-up over --warmup-steps, then cosine decay to 10%%")
    p.add_argument("--warmup-steps", type=int, help="default: 3%% of the steps")
    p.add_argument("--batch-size", default="8",
                   help="per optimizer step: N sequences, or Nt tokens (e.g. 65536t); "
                   "reached with gradient accumulation (default 8)")
    p.add_argument("--micro-batch-size", type=int,
                   help="sequences per forward pass per GPU (default: up to 8)")
    p.add_argument("--max-length", type=int,
                   help="tokens per packed sequence (default: min(2048, the model's context))")
    p.add_argument("--overlong", choices=("error", "truncate", "split"), default="error",
                   help="an example longer than --max-length: refuse the file naming its line "
                   "(default), truncate it (the end is dropped), or split it (text only)")
    p.add_argument("--seed", type=int, default=0, help="data order, dropout and LoRA init")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--log-every", type=int, default=10,
                   help="write a line to OUT/log.jsonl every N steps (default 10)")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps "
                   "(default: --log-every)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps into OUT/checkpoints (default: at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest N kept (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage (default: 2 for full, 1 for lora; 0 is for "
                   "float32 only)")
    p.add_argument("--offload", action="store_true",
                   help="keep optimizer states on the CPU and step there (ZeRO >= 1)")
    p.add_argument("--gpus", type=int, default=1,
                   help="data-parallel ranks on this host, one per GPU (without CUDA, or "
                   "with --device cpu: N processes)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="query_key_value",
                   help="comma-separated: query_key_value, dense, dense_h_to_4h, "
                   "dense_4h_to_h; or all")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing",
                   action="store_false",
                   help="keep every block's activations (faster, more memory)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json overriding the model's")
    p.add_argument("--model-seed", type=int, default=0, help="seed of preset:NAME weights")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak for MFU (default: known for H100/H200/A100)")
    p.add_argument("--wandb", metavar="PROJECT", dest="wandb_project",
                   help="also log to Weights & Biases (needs wandb; WANDB_MODE=offline works "
                   "without a network)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)


_PASSED = ("model", "method", "epochs", "max_steps", "learning_rate",
           "warmup_steps", "batch_size", "micro_batch_size", "max_length", "overlong", "seed",
           "weight_decay", "grad_clip", "log_every", "eval_every", "save_every",
           "keep_checkpoints", "resume", "zero_stage", "offload", "lora_rank", "lora_alpha",
           "lora_dropout", "lora_targets", "activation_checkpointing", "device", "dtype",
           "model_seed", "peak_tflops", "wandb_project", "quiet")


def run_finetune(args: argparse.Namespace) -> int:
    """Validate everything, then train in this process or under torch.distributed.run."""
    try:
        from train.data import DataError
        from train.finetune import FinetuneConfig, prepare_out, run
    except ImportError as exc:
        print(f"error: neoxq finetune needs the train extra ({exc.name} is missing): "
              "pip install 'neoxq[train]'", file=sys.stderr)
        return 1
    try:
        cfg = FinetuneConfig(
            train=str(args.train), out=str(args.out),
            validation=str(args.validation) if args.validation else None,
            tokenizer=str(args.tokenizer) if args.tokenizer else None,
            **{k: getattr(args, k) for k in _PASSED},
        )
        if args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        if args.gpus > 1 and args.device != "cpu":
            import torch

            have = torch.cuda.device_count()
            if args.device == "cuda" or have:
                if have < args.gpus:
                    raise ValueError(f"--gpus {args.gpus}: only {have} CUDA device(s) here")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config_path = prepare_out(cfg)
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(config_path, args.gpus)
    try:
        summary = run(cfg)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    final = summary.get("final", {})
    print(json.dumps({"out": str(args.out), "steps": summary["steps"],
                      "train_loss": final.get("train_loss"), "val_loss": final.get("val_loss")}))
    return 0


def _launch(config_path: Path, n: int) -> int:
    """N ranks on this host through torch.distributed.run (its rendezvous and process
    supervision); each rank runs ``python -m train.finetune CONFIG``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", "-m", "train.finetune", str(config_path)]
    return subprocess.call(cmd)
