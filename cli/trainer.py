"""`neoxq trainer`: run fine-tuning jobs from the API's training queue on this host.

No torch import at module level; the trainer loads ``train/`` (the ``train`` extra:
deepspeed and peft) when it prepares its first job.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `trainer`."""
    p = subparsers.add_parser(
        "trainer",
        help="run fine-tuning jobs from the queue (POST /v1/fine_tuning/jobs)",
        description=(
            "Take fine-tuning jobs off the training queue (Redis) one at a time and run "
            "each with `neoxq finetune`'s code on this host's GPUs, writing its events, "
            "checkpoints and result to the store; a succeeded job's model is registered "
            "as ft:BASE:SUFFIX:JOBID for `neoxq worker --model` and batches. A trainer "
            "killed mid-job leaves the job running; this or another trainer resumes it "
            "from its last checkpoint once the dead one's heartbeat is "
            "NEOXQ_DEAD_WORKER_AFTER seconds old. Jobs' files (checkpoints, the result) go "
            "under --out-dir, which every trainer and worker must see at the same path."
        ),
    )
    p.add_argument("--gpus", type=int, default=1,
                   help="data-parallel ranks per job, one per GPU (with --device cpu: "
                   "N processes); default 1")
    p.add_argument("--out-dir", default=None,
                   help="where jobs write checkpoints and results (default "
                   "$NEOXQ_DATA_DIR/jobs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available")
    p.add_argument("--trainer-id", default=None, help="default HOST:PID")
    p.add_argument("--database-url", default=None, help="default $NEOXQ_DATABASE_URL")
    p.add_argument("--redis-url", default=None, help="default $NEOXQ_REDIS_URL")
    p.add_argument("--poll", type=float, default=2.0,
                   help="seconds between looks in the store for claimable jobs (a queued "
                   "job's message wakes the trainer at once)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the trainer until SIGTERM/SIGINT."""
    if args.gpus < 1:
        print(f"error: --gpus must be >= 1, got {args.gpus}")
        return 2
    from trainer.main import TrainerOptions, run_trainer

    return run_trainer(TrainerOptions(
        out_dir=args.out_dir, gpus=args.gpus, device=args.device, trainer_id=args.trainer_id,
        database_url=args.database_url, redis_url=args.redis_url, poll=args.poll,
        loglevel=args.loglevel))
