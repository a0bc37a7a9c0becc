"""Command-line options several commands share, defined once.

``--kv-cache-dtype`` and ``--quantization`` mean the same on ``neoxq worker``,
``generate``, ``run``, ``up`` and ``evaluate``; their accepted values live in
:mod:`models.dtypes` (which imports no torch, so ``--help`` stays instant).
"""

from __future__ import annotations

import argparse
from typing import Any

from models.dtypes import KV_CACHE_DTYPES, QUANTIZATIONS


def add_fp8_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """Add ``--kv-cache-dtype`` and ``--quantization`` (both off by default)."""
    parser.add_argument(
        "--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
        help="KV-cache storage: auto (the weights' dtype) or fp8 (float8 e4m3 with a scale "
             "per token and head: half the bytes, about twice the sequences in memory)")
    parser.add_argument(
        "--quantization", default="none", choices=QUANTIZATIONS,
        help="linear-layer weights: none, or fp8 (float8 e4m3 per output channel, "
             "activations per token, FP8 GEMMs on GPUs that have them; embedding, norms "
             "and head stay in --dtype)")


def fp8_argv(kv_cache_dtype: str | None, quantization: str | None) -> list[str]:
    """The worker command-line flags for these values (none for the defaults)."""
    argv: list[str] = []
    if kv_cache_dtype and kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", kv_cache_dtype]
    if quantization and quantization != "none":
        argv += ["--quantization", quantization]
    return argv
