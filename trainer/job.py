"""One fine-tuning job on one trainer: from its claimed lease to succeeded, failed,
cancelled, or handed on.

The training itself runs in a child process — ``python -m trainer.rank CONFIG``, i.e.
``train.finetune``'s own entry point (``neoxq finetune``'s code), under
``torch.distributed.run`` for ``--gpus N`` > 1 — with the job's directory as its ``out``:

- ``checkpoints/`` (DeepSpeed's, every ``save_every`` steps) is what a later trainer
  resumes from: every run passes ``resume=True``, so a job started again after its
  trainer died continues at its last checkpoint, with the same data order and optimizer
  state;
- ``log.jsonl`` (one line per logged step) becomes the job's ``metrics`` events, and
  each new checkpoint a checkpoint row with the losses at its step;
- on success the directory holds the merged model in neoxq's form, which is registered
  under ``ft:BASE:SUFFIX:JOBID`` for workers to load by name.

A child process gives the job what the trainer needs from it: a cancel is a signal to
its process group, ``--gpus N`` is a launcher away, the job's memory is freed when it
ends, and the child dies with the trainer (``trainer/rank.py``), so a SIGKILLed trainer
never leaves a run behind that would race the trainer taking its job over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from core.settings import Settings
from specs.status import JobStatus
from store.db import session_scope
from store.jobs import (
    Claim,
    add_checkpoint,
    add_event,
    finish_job,
    heartbeat,
    last_metrics_step,
    release_job,
    set_hyperparameters,
)
from store.registry import fine_tuned_name, get_model, register_fine_tuned
from store.tables import File, FineTuningCheckpoint, FineTuningJob
from trainer.rank import die_with_parent

log = logging.getLogger("neoxq.trainer")

TRAINER_LOG = "trainer.log"  # the child's stdout and stderr, appended run after run
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL, to a child that must stop
SYNC_EVERY_S = 0.5


@dataclass
class TrainerSetup:
    """What every job on this trainer gets: its ranks, device, and where jobs write."""

    trainer_id: str
    out_dir: Path
    gpus: int = 1
    device: str | None = None  # None: cuda when available (train.finetune's default)


class JobFailed(Exception):
    """The job cannot run: ``code`` and a message for the job's ``error``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def checkpoint_step(out: Path) -> int:
    """The step of the newest complete checkpoint under ``out`` (0 if none): DeepSpeed
    writes ``checkpoints/latest`` once a checkpoint is complete."""
    latest = out / "checkpoints" / "latest"
    try:
        tag = latest.read_text().strip()
    except OSError:
        return 0
    step = tag.removeprefix("step")
    return int(step) if step.isdigit() else 0


def read_log(out: Path) -> list[dict[str, Any]]:
    """The complete lines of ``out/log.jsonl`` (a line being written is skipped)."""
    try:
        text = (out / "log.jsonl").read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _loss(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


class JobRun:
    """Runs one claimed job to its end on this trainer (:meth:`run`)."""

    def __init__(self, claim: Claim, *, db: Engine, settings: Settings, setup: TrainerSetup,
                 stopping: threading.Event) -> None:
        self.job: FineTuningJob = claim.job
        self.claim, self.db, self.settings = claim, db, settings
        self.setup, self.stopping = setup, stopping
        self.out = Path(self.job.out_dir or setup.out_dir / self.job.id)
        self.last_step = 0
        self.recorded: set[int] = set()
        self.file_names: dict[str, str] = {}  # stored path -> file id
        # Set by the heartbeat thread once this trainer no longer holds the job.
        self.lost = threading.Event()
        self.done = threading.Event()

    # ------------------------------------------------------------------ store writes

    def event(self, message: str, level: str = "info") -> None:
        log.info("%s: %s", self.job.id, message)
        with session_scope(self.db) as s:
            add_event(session=s, job_id=self.job.id, message=message, level=level)

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        log.error("%s failed: %s", self.job.id, message)
        with session_scope(self.db) as s:
            error = {"code": code, "message": message, "param": param}
            if finish_job(session=s, job_id=self.job.id, trainer_id=self.setup.trainer_id,
                          status=JobStatus.FAILED, error=error):
                add_event(session=s, job_id=self.job.id, level="error",
                          message=f"The job failed: {message}")

    # ------------------------------------------------------------------------ the run

    def run(self) -> None:
        """Start (or resume) training, follow it, and finish the job; the lease is
        refreshed by a thread of its own all along, so that nothing this thread does
        (imports, a slow store) makes a live trainer look dead."""
        beat = threading.Thread(target=self.heartbeats, name=f"heartbeat-{self.job.id}",
                                daemon=True)
        beat.start()
        try:
            self.run_held()
        finally:
            self.done.set()
            beat.join(timeout=30)

    def heartbeats(self) -> None:
        """Refresh the lease every ``heartbeat_interval`` until the run ends; set
        :attr:`lost` when the job was cancelled or taken over."""
        while not self.done.wait(self.settings.heartbeat_interval):
            try:
                with session_scope(self.db) as s:
                    held = heartbeat(session=s, job_id=self.job.id,
                                     trainer_id=self.setup.trainer_id)
            except Exception as exc:  # noqa: BLE001 - the store may come back in time
                log.warning("%s: heartbeat failed (%s)", self.job.id, exc)
                continue
            if not held:
                self.lost.set()
                return

    def still_held(self) -> bool:
        """Whether this trainer holds the job now (a synchronous heartbeat)."""
        if self.lost.is_set():
            return False
        with session_scope(self.db) as s:
            held = heartbeat(session=s, job_id=self.job.id, trainer_id=self.setup.trainer_id)
        if not held:
            self.lost.set()
        return held

    def run_held(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with session_scope(self.db) as s:
            self.last_step = last_metrics_step(session=s, job_id=self.job.id)
            self.recorded = set(s.scalars(select(FineTuningCheckpoint.step).where(
                FineTuningCheckpoint.job_id == self.job.id)))
        self.announce()
        try:
            config = self.prepare()
        except JobFailed as exc:
            self.fail(exc.code, exc.message, exc.param)
            return
        if not self.still_held():  # never start a run beside the trainer that took over
            self.lost_job()
            return
        child = self.launch(config)
        if self.follow(child) == "stopped":
            return  # another trainer's (or nobody's) job now: it writes no more here
        self.sync()
        if child.returncode == 0:
            self.succeed()
        else:
            self.fail("training_failed", self.failure_message(child.returncode))

    def announce(self) -> None:
        me = self.setup.trainer_id
        if not self.claim.resumed:
            self.event(f"Fine-tuning job started on trainer {me}")
            return
        step = checkpoint_step(self.out)
        why = (f"trainer {self.claim.previous} stopped heart-beating"
               if self.claim.previous else "its trainer stopped")
        if step:
            self.event(f"Resuming from the checkpoint at step {step} on trainer {me} "
                       f"({why})", level="warn")
        else:
            self.event(f"Restarting from step 0 on trainer {me} ({why} before its first "
                       "checkpoint)", level="warn")

    def prepare(self) -> Path:
        """Write the run's ``finetune_config.json`` (what the ranks read); raises
        :class:`JobFailed` for a job no trainer can run."""
        from train.finetune import FinetuneConfig, prepare_out

        job = self.job
        with session_scope(self.db) as s:
            base = get_model(session=s, name=job.model)
            files = {f.id: f for f in s.scalars(select(File).where(
                File.id.in_([job.training_file, job.validation_file or ""])))}
        if base is None or not base.checkpoint:
            raise JobFailed("model_not_found", f"no checkpoint is recorded for the base "
                            f"model {job.model!r}", "model")
        paths: dict[str, str | None] = {"training_file": None, "validation_file": None}
        for param in paths:
            file_id = getattr(job, param)
            if file_id is None:
                continue
            f = files.get(file_id)
            if f is None or not f.path or not Path(f.path).is_file():
                raise JobFailed("invalid_file", f"{param} {file_id}: its content is not "
                                "readable on this trainer (deleted, or on another host's "
                                "disk)", param)
            paths[param] = f.path
            self.file_names[f.path] = file_id  # errors name the file the user knows
        opts = dict(job.options or {})
        hp = dict(job.hyperparameters or {})
        kw: dict[str, Any] = {k: opts[k] for k in (
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "max_length",
            "max_steps", "overlong", "zero_stage", "offload", "warmup_steps",
            "weight_decay", "save_every", "log_every", "dtype") if k in opts}
        if hp.get("n_epochs", "auto") != "auto":
            kw["epochs"] = int(hp["n_epochs"])
        if hp.get("batch_size", "auto") != "auto":
            kw["batch_size"] = str(hp["batch_size"])
        try:
            cfg = FinetuneConfig(
                model=base.checkpoint, train=str(paths["training_file"]),
                validation=paths["validation_file"], out=str(self.out),
                method=opts.get("method", "lora"), seed=int(job.seed), resume=True,
                # validation loss where checkpoints are: OpenAI's checkpoint metrics
                eval_every=opts.get("save_every"), device=self.setup.device, quiet=True,
                **kw)
            multiplier = hp.get("learning_rate_multiplier", "auto")
            if multiplier != "auto":
                cfg.learning_rate = cfg.lr * float(multiplier)
        except ValueError as exc:
            raise JobFailed("invalid_hyperparameters", str(exc)) from None
        with session_scope(self.db) as s:
            set_hyperparameters(session=s, job_id=job.id, hyperparameters={
                "n_epochs": cfg.epochs, "batch_size": int(cfg.batch_size)
                if cfg.batch_size.isdigit() else cfg.batch_size,
                "learning_rate_multiplier": 1.0 if multiplier == "auto" else float(multiplier)})
        return prepare_out(cfg)

    def launch(self, config: Path) -> subprocess.Popen:
        """The ranks: ``python -m trainer.rank CONFIG``, or N of them under
        ``torch.distributed.run``; in a process group of their own (a cancel signals it)."""
        if self.setup.gpus > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={self.setup.gpus}", "-m", "trainer.rank", str(config)]
        else:
            cmd = [sys.executable, "-m", "trainer.rank", str(config)]
        out = open(self.out / TRAINER_LOG, "ab")  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            out.close()

    def follow(self, child: subprocess.Popen) -> str:
        """Wait for the child while syncing; returns ``"exited"``, or ``"stopped"`` when
        the job was cancelled, taken over, or this trainer stops."""
        while child.poll() is None:
            if self.stopping.wait(SYNC_EVERY_S):
                self.stop(child)
                self.sync()  # still the holder: the steps it made are recorded
                with session_scope(self.db) as s:
                    released = release_job(session=s, job_id=self.job.id,
                                           trainer_id=self.setup.trainer_id)
                if released:
                    self.event(f"Trainer {self.setup.trainer_id} stopped at step "
                               f"{self.last_step}; the next trainer resumes the job from its "
                               f"last checkpoint (step {checkpoint_step(self.out)})", "warn")
                return "stopped"
            if self.lost.is_set():
                self.stop(child)
                self.lost_job()
                return "stopped"
            self.sync()
        return "exited"

    def lost_job(self) -> None:
        """The lease is gone: the job was cancelled (its event is the API's), or another
        trainer took it over after this one missed heartbeats."""
        with session_scope(self.db) as s:
            job = s.get(FineTuningJob, self.job.id)
            status = job.status if job is not None else None
        if status == JobStatus.CANCELLED:
            self.event(f"Training stopped at step {self.last_step} (cancelled)")
        else:
            log.warning("%s: lease lost to another trainer; stopped training", self.job.id)

    def stop(self, child: subprocess.Popen) -> None:
        """SIGTERM to the ranks' process group, SIGKILL after :data:`STOP_GRACE_S`."""
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                pass
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def sync(self) -> None:
        """New ``log.jsonl`` lines -> ``metrics`` events; new checkpoints -> checkpoint
        rows with the losses logged at their step."""
        records = read_log(self.out)
        by_step = {int(r["step"]): r for r in records if isinstance(r.get("step"), int)}
        new = [r for step, r in sorted(by_step.items()) if step > self.last_step]
        latest = checkpoint_step(self.out)
        ckpts = sorted(int(p.name.removeprefix("step")) for p in
                       (self.out / "checkpoints").glob("step*")
                       if p.name.removeprefix("step").isdigit())
        ckpts = [c for c in ckpts if c <= latest and c not in self.recorded]
        if not new and not ckpts:
            return
        with session_scope(self.db) as s:
            for r in new:
                val = _loss(r.get("val_loss"))
                data = {"step": r["step"], "train_loss": _loss(r.get("train_loss")),
                        "valid_loss": val, "full_valid_loss": val, "epoch": r.get("epoch"),
                        "lr": r.get("lr"), "tokens_per_s": r.get("tokens_per_s"),
                        "total_steps": r.get("total_steps")}
                msg = f"Step {r['step']}" + (f"/{data['total_steps']}" if data["total_steps"]
                                             else "")
                if data["train_loss"] is not None:
                    msg += f": training loss={data['train_loss']:.4f}"
                if val is not None:
                    msg += f", validation loss={val:.4f}"
                add_event(session=s, job_id=self.job.id, type="metrics", message=msg,
                          step=int(r["step"]), data=data)
            for step in ckpts:
                r = by_step.get(step, {})  # no loss logged at a step off log_every
                val = _loss(r.get("val_loss"))
                add_checkpoint(session=s, job_id=self.job.id, step=step,
                               metrics={"train_loss": _loss(r.get("train_loss")),
                                        "valid_loss": val, "full_valid_loss": val},
                               path=str(self.out / "checkpoints" / f"step{step}"))
                add_event(session=s, job_id=self.job.id,
                          message=f"Checkpoint saved at step {step}")
        if new:
            self.last_step = int(new[-1]["step"])
        self.recorded.update(ckpts)

    def succeed(self) -> None:
        """Register the result under its ``ft:`` name and mark the job succeeded (both or
        neither: a job cancelled at the last moment registers nothing)."""
        job = self.job
        name = fine_tuned_name(base=job.model, suffix=job.suffix, job_id=job.id)
        with session_scope(self.db) as s:
            if not finish_job(session=s, job_id=job.id, trainer_id=self.setup.trainer_id,
                              status=JobStatus.SUCCEEDED, fine_tuned_model=name):
                return
            register_fine_tuned(session=s, name=name, base=job.model,
                                checkpoint=str(self.out.resolve()), job_id=job.id,
                                owner=job.owner)
            add_event(session=s, job_id=job.id, message=f"New fine-tuned model created: {name}")
            add_event(session=s, job_id=job.id, message="The job has successfully completed")
        log.info("%s succeeded: %s in %s", job.id, name, self.out)

    def failure_message(self, returncode: int) -> str:
        """What went wrong, from the ranks' own output (train.finetune prints
        ``error: ...`` for bad data and options), else how the process ended."""
        try:
            lines = (self.out / TRAINER_LOG).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
        if starts:  # the message may go on over several lines (every bad line of a file)
            text = "\n".join(lines[starts[-1]:starts[-1] + 25]).removeprefix("error: ")
            for path, file_id in self.file_names.items():
                text = text.replace(path, file_id)
            return text[:4000]
        if returncode < 0:
            return f"the training process was killed by signal {-returncode}"
        tail = [ln for ln in lines[-5:] if ln.strip()]
        return (f"the training process exited with status {returncode}"
                + (f": {tail[-1][:2000]}" if tail else ""))

