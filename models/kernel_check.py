"""Triton kernels that stand in for torch ops where they run: whether a device runs a
family of them correctly, checked once and remembered."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

_RESULTS: dict[tuple[str, str], bool] = {}


def kernels_ok(what: str, device: torch.device,
               self_check: Callable[[torch.device], bool]) -> bool:
    """Whether ``what`` (a family of kernels) runs on ``device`` and agrees with the
    torch ops: ``self_check(device)`` once per device (a few small launches and a sync),
    remembered; an exception (no triton, no compiler, an unsupported GPU) counts as no.
    Never checked while a CUDA graph is being captured (the torch ops run there, and a
    capture records whichever path is taken: check before capturing)."""
    key = (what, str(device))
    if key in _RESULTS:
        return _RESULTS[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    try:
        _RESULTS[key] = bool(self_check(device))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch ops
        warnings.warn(f"{what} unavailable on {device} ({exc!r}); using torch ops",
                      stacklevel=3)
        _RESULTS[key] = False
    return _RESULTS[key]
