"""Fault injection for the kill test: ``SPARSE_KILL_AT=<point>:<n>`` SIGKILLs this process at the n-th ``point``.

Points are named where a crash is most dangerous (inside a checkpoint save, between writing and
renaming, between a checkpoint and its ``latest`` pointer, in the middle of pruning). Unset (the
normal case) every call is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("SPARSE_KILL_AT", "")
_POINT, _, _COUNT = _SPEC.partition(":")
_AT = int(_COUNT) if _COUNT.isdigit() else 1
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Mark a crash point; dies here (SIGKILL, no cleanup) when SPARSE_KILL_AT names it."""
    if not _POINT or name != _POINT:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
