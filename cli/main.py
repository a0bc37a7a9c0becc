"""The `neoxq` command: a thin dispatcher over one module per command group.

Each command module exposes ``add_parser(subparsers) -> None`` and sets
``func`` on its parser. Modules must not import torch at import time, so that
``neoxq submit`` starts in well under a second; heavy imports happen inside
the command's function.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Packages only the `neoxq[worker]` install brings (pyproject's worker extra): a command
# that needs one says which install to add instead of printing a traceback.
WORKER_PACKAGES = frozenset({"torch", "numpy", "safetensors", "tokenizers", "yaml"})

# command-group modules, in the order their commands appear in --help
COMMAND_MODULES = (
    "cli.generate",  # generate, convert
    "cli.serve",  # worker, db
    "cli.serve_api",  # api, keys
    "cli.client",  # submit, status, results, errors, cancel, batches, workers, models
    "cli.jobs",  # jobs create|list|status|events|cancel
    "cli.evaluate",  # evaluate
    "cli.finetune",  # finetune
    "cli.trainer",  # trainer
    "cli.up",  # up, run
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser from every command module that exists."""
    parser = argparse.ArgumentParser(
        prog="neoxq", description="Batch text generation for GPT-NeoX models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `neoxq` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("NEOXQ_LOG_FORMAT", "text").lower() != "text":  # structured logs
        from cli.logs import configure_logging

        configure_logging()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`neoxq results ID | head`): stop quietly, as cat does. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in WORKER_PACKAGES:
            raise
        print(f"error: `neoxq {args.command}` needs {exc.name}, which the light install "
              "leaves out: pip install 'neoxq[worker]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
