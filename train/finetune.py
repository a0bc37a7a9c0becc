"""Fine-tuning a GPT-NeoX model: LoRA or full, through DeepSpeed, on one device or N.

One loop serves both methods. The network is ``models.model.NeoX`` — the module the
engine serves — with activation checkpointing per block; LoRA wraps its linears
(``train.lora``), full fine-tuning trains every weight. Either way ``deepspeed.initialize``
owns the optimizer step: ZeRO stage 0-3, bf16 with fp32 master weights, optional optimizer
offload to CPU, gradient accumulation, gradient clipping, data parallelism over the ranks
``torch.distributed.run`` starts, and checkpoints in DeepSpeed's own format. The optimizer
is torch's AdamW, so no DeepSpeed op is compiled (its FusedAdam and CPUAdam JIT-build with
nvcc/g++) and the same code runs on CPU (gloo) for the tests.

Determinism: rows are packed once, each epoch's order is a permutation fixed by (seed,
epoch), and every step reseeds torch from (seed, step, rank) — so a run resumed from a
checkpoint sees the same batches, dropout masks and optimizer state, and continues the
same loss curve.

Run ``python -m train.finetune CONFIG.json`` on each rank (what ``neoxq finetune --gpus
N`` starts under ``torch.distributed.run``); in-process callers use :func:`run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.config import NeoXConfig
from models.dtypes import parse_dtype
from models.loaders import load_config, load_model, load_spec_tokenizer, save_neoxq
from models.model import NeoX, PackedAttention
from train import lora as lora_lib
from train.data import DataError, PackedData, batch_rows, epoch_order, load_dataset

METHODS = ("lora", "full")
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "finetune.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
# Dense bf16 tensor-core peaks (TFLOP/s) by device name, for MFU; others need --peak-tflops.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs; written to ``OUT/finetune_config.json``."""

    model: str  # preset:NAME, an HF dir, a NeoX YAML or a neoxq dir
    train: str  # training file (chat / prompt-completion / text JSONL, or plain text)
    out: str  # output directory: the merged model, adapter, checkpoints, logs
    validation: str | None = None
    method: str = "lora"
    epochs: int = 1
    max_steps: int | None = None  # train exactly this many steps (overrides epochs)
    learning_rate: float | None = None  # peak; default 2e-4 for LoRA, 2e-5 for full
    # Sequences per optimizer step, or tokens with a "t" suffix ("65536t" = 32 rows of
    # 2048). Split into micro-batches x gradient accumulation x ranks.
    batch_size: str = "8"
    micro_batch_size: int | None = None  # rows per forward pass per rank
    max_length: int | None = None  # tokens per packed row; default min(2048, model context)
    overlong: str = "error"  # an example longer than max_length: error | truncate | split
    seed: int = 0
    warmup_steps: int | None = None  # default 3% of the steps; then cosine to 10%
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int | None = None  # default: log_every
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = False
    zero_stage: int | None = None  # default 2 for full, 1 for LoRA (its state is tiny)
    offload: bool = False  # optimizer states and step on the CPU (ZeRO >= 1)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "query_key_value"
    activation_checkpointing: bool = True
    device: str | None = None  # cuda | cpu (default: cuda when available)
    dtype: str | None = None  # any models.dtypes name (default bf16 on cuda)
    tokenizer: str | None = None
    model_seed: int = 0  # weights of preset:NAME models
    peak_tflops: float | None = None
    wandb_project: str | None = None
    save_model: bool = True  # write the final model (benchmarks turn it off)
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload and self.stage == 0:
            raise ValueError("offload needs ZeRO stage 1, 2 or 3 (--zero-stage)")
        if self.method == "lora":
            lora_lib.parse_targets(self.lora_targets)
        parse_batch_size(self.batch_size, 2048)
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def stage(self) -> int:
        return self.zero_stage if self.zero_stage is not None else (2 if self.method == "full"
                                                                     else 1)

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        return cls(**json.loads(text))


def parse_batch_size(spec: str, max_length: int) -> int:
    """Rows per optimizer step from ``N`` (sequences) or ``Nt`` (tokens, rounded up to
    whole rows of ``max_length``)."""
    s = str(spec).strip().lower()
    try:
        if s.endswith("t"):
            n = math.ceil(int(s[:-1]) / max_length)
        else:
            n = int(s)
    except ValueError:
        raise ValueError(f"batch_size: expected N sequences or Nt tokens (e.g. 16 or 65536t), "
                         f"got {spec!r}") from None
    if n < 1:
        raise ValueError(f"batch_size must be positive, got {spec!r}")
    return n


def model_flops_per_token(config: NeoXConfig, method: str, adapter_params: int = 0) -> float:
    """Model FLOPs per trained token, the numerator of MFU.

    N counts every weight that takes part in a matrix product (all parameters but the
    input embedding, a lookup). Full fine-tuning: 6·N (forward 2·N, backward 4·N — grads
    of activations and of weights). LoRA on a frozen base: 4·N for the base (forward, and
    backward through activations only: frozen weights get no gradient) plus 6 per
    adapter parameter. Attention's score/value products and the recomputation that
    activation checkpointing adds are not counted (model FLOPs, not hardware FLOPs).
    """
    n = config.num_params() - config.vocab_size * config.hidden_size
    if config.tie_embeddings:  # the tied head is still a matrix product
        n += config.vocab_size * config.hidden_size
    if method == "full":
        return 6.0 * n
    return 4.0 * n + 6.0 * adapter_params


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak over ``warmup`` steps, then cosine decay to 10%."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------ the run


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """torch.distributed's env:// rendezvous for a run of one rank outside a launcher."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op when a process
    group starts. Training never uses it (DeepSpeed's CPU inference all-reduce does; gloo
    runs our collectives), yet it is built on first use: ~45 s of g++ on two cores, and
    a build killed part-way (a job cancelled or timed out during it) leaves torch's build
    lock behind, on which every later rank on the machine then waits forever. Marking the
    op incompatible in DeepSpeed's own table of compatible ops skips it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


class Trainer:
    """One rank's share of a fine-tuning run. ``Trainer(cfg).train()`` does it all;
    benchmarks drive :meth:`train_step` themselves."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        import deepspeed

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dist = _Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                          int(os.environ.get("LOCAL_RANK", 0)))
        want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if want == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device cuda: no CUDA device is available")
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        self.dtype = parse_dtype(cfg.dtype, self.device)
        if cfg.stage == 0 and self.dtype != torch.float32:
            # DeepSpeed then wraps the optimizer in its FP16_UnfusedOptimizer, which keeps
            # 16-bit gradients: measured here, its steps drift from fp32's where ZeRO-1's
            # (fp32 master weights and gradients, one rank or many) track them.
            raise ValueError(f"ZeRO stage 0 trains {self.dtype} off course in DeepSpeed "
                             "(16-bit gradients); use --zero-stage 1 or more, or float32")
        if self.device.type == "cpu":
            skip_shm_comm_build()
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.dist.rank == 0

        # Data before weights: a bad line is reported before a 41 GB model loads.
        self.tokenizer = load_spec_tokenizer(cfg.model, tokenizer=cfg.tokenizer)
        self.config = load_config(cfg.model, tokenizer=self.tokenizer)
        self.max_length = cfg.max_length or min(2048, self.config.max_position)
        if self.max_length > self.config.max_position:
            raise ValueError(f"max_length {self.max_length} exceeds the model's context "
                             f"({self.config.max_position} positions)")
        self.train_fmt, self.train_data = load_dataset(cfg.train, self.tokenizer,
                                                       self.max_length, cfg.overlong)
        self.val_data: PackedData | None = None
        if cfg.validation:
            _, self.val_data = load_dataset(cfg.validation, self.tokenizer, self.max_length,
                                            cfg.overlong)

        # Batch geometry: rows per step = micro x accumulation x ranks.
        rows = parse_batch_size(cfg.batch_size, self.max_length)
        per_rank = math.ceil(rows / self.dist.world)
        self.micro = cfg.micro_batch_size or max(d for d in range(1, min(per_rank, 8) + 1)
                                                 if per_rank % d == 0)
        self.accum = math.ceil(per_rank / self.micro)
        self.batch = self.micro * self.accum * self.dist.world
        if self.batch != rows and self.is_main:
            print(f"batch size: {rows} rows rounded up to {self.batch} "
                  f"({self.micro} x {self.accum} accumulation x {self.dist.world} ranks)",
                  file=sys.stderr)
        self.steps_per_epoch = math.ceil(self.train_data.num_rows / self.batch)
        # max_steps, when given, overrides epochs (as many passes as those steps take).
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(
            0.03 * self.total_steps)

        net = load_model(cfg.model, device=self.device, dtype=self.dtype,
                         tokenizer=self.tokenizer, seed=cfg.model_seed).model
        net.checkpoint_blocks = cfg.activation_checkpointing
        self.peft_model: Any = None
        if cfg.method == "lora":
            torch.manual_seed(cfg.seed)  # the adapters' initial values
            self.peft_model = lora_lib.apply_lora(
                net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                lora_lib.parse_targets(cfg.lora_targets))
        else:
            net.requires_grad_(True)
        net.train()
        self.net: NeoX = net
        params = [p for p in net.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.flops_per_token = model_flops_per_token(
            self.config, cfg.method, self.trainable if cfg.method == "lora" else 0)
        # Weight decay on matrices only: biases and LayerNorm gains are not decayed.
        groups = [{"params": [p for p in params if p.ndim >= 2],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                      betas=(0.9, 0.95))
        sched = lr_lambda(self.total_steps, warmup)
        self.engine, _, _, _ = deepspeed.initialize(
            model=net, optimizer=optimizer, config=self.ds_config(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched))
        self.step = 0
        self.peak = cfg.peak_tflops or (self._known_peak() if self.device.type == "cuda"
                                        else None)

    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config this run passes to ``deepspeed.initialize``."""
        cfg = self.cfg
        zero: dict[str, Any] = {"stage": cfg.stage}
        if cfg.stage >= 2 and self.device.type == "cuda":
            zero["overlap_comm"] = True  # reduce-scatter gradients during the backward pass
        if cfg.offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": self.accum,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "fp16": {"enabled": self.dtype == torch.float16},
            "zero_optimization": zero,
            # torch's AdamW: no compiled ops (DeepSpeed's own Adam variants JIT-compile).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def _known_peak(self) -> float | None:
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    # ------------------------------------------------------------------------- batches

    def _tensors(self, data: PackedData, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(tokens, targets, positions, segments) for these rows; -1 is an empty row."""
        real = np.maximum(rows, 0)
        out = []
        for arr, empty in ((data.tokens, self.tokenizer.eos_id), (data.targets, -100),
                           (data.positions, 0), (data.segments, -1)):
            a = arr[real].copy()
            a[rows < 0] = empty
            out.append(torch.from_numpy(a).to(self.device, non_blocking=True))
        return tuple(out)

    def _loss_sum(self, data: PackedData, rows: np.ndarray) -> torch.Tensor:
        """Summed cross-entropy over the loss-carrying tokens of these rows."""
        tokens, targets, positions, segments = self._tensors(data, rows)
        logits = self.engine(tokens.view(-1), positions.view(-1), PackedAttention(segments))
        return F.cross_entropy(logits.float(), targets.view(-1), ignore_index=-100,
                               reduction="sum")

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def global_batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.train_data.num_rows, self.cfg.seed, epoch)
        return batch_rows(order, self.batch, index)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch; returns its mean loss and token count.

        Each micro-batch's summed loss is divided by the whole global batch's count of
        loss-carrying tokens (every rank knows it: all ranks pack the same data), times
        accumulation x ranks because DeepSpeed divides by both; so the step's gradient is
        exactly that of the mean over the global batch, however it is split.
        """
        rows = self.global_batch(self.step)
        n_targets = max(1, self.train_data.num_targets(rows))
        torch.manual_seed(hash((self.cfg.seed, self.step, self.dist.rank)) % 2**63)
        scale = self.accum * self.dist.world / n_targets
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for i in range(self.accum):
            at = (i * self.dist.world + self.dist.rank) * self.micro
            loss_sum = self._loss_sum(self.train_data, rows[at:at + self.micro])
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            total += loss_sum.detach()
        self.step += 1
        return {"loss": float(self._all_sum(total)) / n_targets,
                "tokens": float(self.train_data.num_tokens(rows))}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per loss-carrying token over the whole validation set."""
        data = self.val_data
        if data is None:
            return None
        self.engine.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        chunk = self.micro * self.dist.world
        for start in range(0, data.num_rows, chunk):
            rows = np.arange(start, start + chunk)
            rows[rows >= data.num_rows] = -1  # every rank runs the same number of passes
            mine = rows[self.dist.rank * self.micro:(self.dist.rank + 1) * self.micro]
            total += self._loss_sum(data, mine)
        self.engine.train()
        return float(self._all_sum(total)) / max(1, data.num_targets(np.arange(data.num_rows)))

    # --------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """DeepSpeed's own checkpoint (module, optimizer, scheduler) at this step; a LoRA
        run leaves the frozen base out. Keeps the newest ``keep_checkpoints``."""
        ckpt = self.out / CHECKPOINTS
        self.engine.save_checkpoint(str(ckpt), tag=f"step{self.step}",
                                    client_state={"step": self.step},
                                    exclude_frozen_parameters=self.cfg.method == "lora")
        if self.is_main:
            tags = sorted((p for p in ckpt.glob("step*") if p.is_dir()),
                          key=lambda p: int(p.name.removeprefix("step")))
            for old in tags[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        """Load the newest checkpoint, if any; returns whether one was found."""
        ckpt = self.out / CHECKPOINTS
        if not (ckpt / "latest").exists():
            return False
        path, client = self.engine.load_checkpoint(
            str(ckpt), load_module_strict=self.cfg.method != "lora")
        if path is None:
            raise ValueError(f"{ckpt}: the checkpoint named in 'latest' cannot be loaded")
        self.step = int(client["step"])
        return True

    # --------------------------------------------------------------------------- whole run

    def train(self) -> dict[str, Any]:
        """Train to the end, logging, checkpointing and writing the final model."""
        cfg = self.cfg
        ckpt = self.out / CHECKPOINTS
        if cfg.resume:
            resumed = self.resume()
            if self.is_main:
                print(f"resumed from step {self.step}" if resumed else
                      f"--resume: no checkpoint in {ckpt}; starting from step 0",
                      file=sys.stderr)
        elif (ckpt / "latest").exists():
            raise ValueError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to "
                             "continue it, or choose another --out")
        log = _Log(self.out / LOG_FILE, self.step, self.is_main, cfg)
        bar = _bar(self.total_steps, self.step, not self.is_main or cfg.quiet)
        eval_every = cfg.eval_every or cfg.log_every
        last: dict[str, Any] = {}
        window_tokens, window_start = 0.0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                r = self.train_step()
                window_tokens += r["tokens"]
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                done = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or done:
                    val = self.evaluate() if (self.step % eval_every == 0 or done) else None
                    mfu = (tok_s * self.flops_per_token / (self.peak * 1e12 * self.dist.world)
                           if self.peak else None)
                    last = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                            "train_loss": r["loss"], "val_loss": val,
                            "lr": self.engine.get_lr()[0], "tokens_per_s": tok_s, "mfu": mfu,
                            "total_steps": self.total_steps}
                    log.write(last)
                    window_tokens, window_start = 0.0, time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0 and not done:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            log.close()
        if cfg.save_every:
            self.save_checkpoint()
        if cfg.save_model:
            self.save_model()
        summary = {"steps": self.step, "train_format": self.train_fmt,
                   "train_rows": self.train_data.num_rows,
                   "train_documents": self.train_data.num_documents,
                   "batch_rows": self.batch, "micro_batch": self.micro,
                   "gradient_accumulation": self.accum, "ranks": self.dist.world,
                   "max_length": self.max_length, "trainable_parameters": self.trainable,
                   "zero_stage": cfg.stage, "final": last}
        if self.is_main:
            (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def save_model(self) -> None:
        """The trained network in neoxq's form in ``OUT`` (loads in generate, worker,
        evaluate); for LoRA also ``OUT/adapter``, and the merge of adapter into base."""
        import deepspeed

        net = self.net
        gather = (deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None)
                  if self.cfg.stage == 3 else contextlib.nullcontext())
        with gather:
            if self.is_main:
                if self.peft_model is not None:
                    lora_lib.save_adapter(self.peft_model, self.out / ADAPTER)
                    net = lora_lib.merge(self.peft_model)
                save_neoxq(net, self.tokenizer, self.out)
        if self.dist.world > 1:
            torch.distributed.barrier()


class _Log:
    """``OUT/log.jsonl`` (rank 0): one line per log step; a resumed run first drops the
    lines past its checkpoint. Mirrors each line to Weights & Biases when asked."""

    def __init__(self, path: Path, step: int, active: bool, cfg: FinetuneConfig) -> None:
        self.active, self.wandb = active, None
        if not active:
            return
        kept = []
        if path.exists() and step:
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.f = open(path, "a")  # noqa: SIM115 - closed in close()
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb needs the wandb package (pip install wandb)") from None
            # WANDB_MODE=offline works with no network; the run id is stable across resumes.
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(path.parent),
                                    config=dataclasses.asdict(cfg), resume="allow",
                                    id=f"neoxq-{zlib.crc32(str(path.parent.resolve()).encode()):08x}")

    def write(self, record: dict[str, Any]) -> None:
        if self.active:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if v is not None},
                               step=record["step"])

    def close(self) -> None:
        if self.active:
            self.f.close()
            if self.wandb is not None:
                self.wandb.finish()


def _bar(total: int, initial: int, disable: bool) -> Any:
    if disable:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def prepare_out(cfg: FinetuneConfig) -> Path:
    """Create ``OUT`` and write the run's config there (what every rank reads)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.to_json())
    return out / CONFIG_FILE


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune in this process (one rank, or one of the ranks a launcher started)."""
    with single_process_env():
        return Trainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    """``python -m train.finetune OUT/finetune_config.json``: one rank of a run."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m train.finetune CONFIG.json", file=sys.stderr)
        return 2
    cfg = FinetuneConfig.from_json(Path(args[0]).read_text())
    try:
        run(cfg)
    except (DataError, ValueError) as exc:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
