"""Fault injection for the kill test: ``SPARSE_KILL_AT=<point>:<n>`` SIGKILLs this process at the n-th ``point``.

Points are named where a crash is most dangerous (inside a checkpoint save, between writing and
renaming, between a checkpoint and its ``latest`` pointer, in the middle of pruning). Point names
contain ``:`` themselves; the count is what follows the last one. Unset (the normal case) every
call is one comparison.
"""

from __future__ import annotations

import os
import signal

_armed: tuple[str, int] | None = None
_seen: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Arm ``<point>:<n>`` (n defaults to 1); None or "" disarms."""
    global _armed
    _seen.clear()
    if not spec:
        _armed = None
        return
    name, _, count = spec.rpartition(":")
    _armed = (name, int(count)) if count.isdigit() and name else (spec, 1)


def point(name: str) -> None:
    """Mark a crash point; dies here (SIGKILL, no cleanup) when armed for it."""
    if _armed is None or name != _armed[0]:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("SPARSE_KILL_AT"))
