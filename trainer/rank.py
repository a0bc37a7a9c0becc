"""``python -m trainer.rank CONFIG``: one rank of a fine-tuning job, run by a trainer.

It is ``python -m train.finetune CONFIG`` (the code ``neoxq finetune`` runs) plus one
promise: the rank dies with the process that started it. A trainer killed with SIGKILL
must not leave its training running, since another trainer is about to resume the job
from its last checkpoint into the same directory: two runs at once would overwrite
each other's checkpoints. Linux's parent-death signal makes the kernel keep that
promise (the trainer, or ``torch.distributed.run`` between them, dies -> SIGKILL here).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op
    elsewhere). Exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Arm the parent-death signal, then run ``train.finetune``'s entry point."""
    die_with_parent()
    from train.finetune import main as finetune_main

    return finetune_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
