"""Triton kernels, their plain-torch references and autograd wrappers.

This module is the one place that decides whether Triton is usable and whether it runs under
the interpreter (``TRITON_INTERPRET=1``, used by the CPU test suite). Kernel modules import
``HAS_TRITON`` / ``INTERPRET`` from here instead of probing on their own.
"""

from __future__ import annotations

import os

try:  # triton is Linux-only; the framework still runs (torch backends) without it
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable(device) -> bool:
    """True when a Triton kernel can run for tensors on `device` (CUDA, or CPU under the interpreter)."""
    import torch

    if not HAS_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def resolve_backend(backend: str, device, allowed: tuple[str, ...], cpu_default: str = "torch") -> str:
    """Map ``backend="auto"`` to Triton on CUDA and `cpu_default` elsewhere; validate explicit choices."""
    import torch

    if backend not in allowed + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {sorted(allowed + ('auto',))}")
    if backend == "auto":
        return "triton" if (torch.device(device).type == "cuda" and HAS_TRITON and "triton" in allowed) else cpu_default
    if backend == "triton" and not triton_runnable(device):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (got device {device}) or TRITON_INTERPRET=1 on CPU; "
            f"use backend='auto' or one of {[b for b in allowed if b != 'triton']}"
        )
    return backend
