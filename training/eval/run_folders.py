"""Run folders as :class:`Run` objects, and runs grouped for a report.

A run folder holds ``metrics.jsonl`` and ``config.yaml`` (or ``.hydra/config.yaml``), and
``.hydra/overrides.yaml`` when Hydra launched it. :func:`find_runs` finds run folders at or below the
given paths; :func:`group_runs` groups runs by the keys that differ between them (the overridden ones
when every run recorded its overrides), never by seed, run_dir or hydra keys. :mod:`training.eval.report`
turns the groups into tables and plots.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import yaml

NEVER_GROUP = ("seed", "run_dir", "hydra")  # a key equal to one of these, or under it, never groups
SKIP_DIRS = {"checkpoints", ".hydra", "wandb", "eval", "__pycache__"}
ACTIVE_PARAMS_KEY, TOTAL_PARAMS_KEY = "acct/active_params", "acct/total_params"


class ReportError(ValueError):
    """Bad input: no runs where runs were expected, an unknown --group-by key, …"""


@dataclass
class Run:
    """One run folder: its config (nested and flattened), command-line overrides and logged rows."""

    path: Path
    config: dict
    overrides: dict[str, str] | None
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    accounting: dict = field(default_factory=dict)  # acct/* keys (training.accounting.account, logged once at step 0)

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def max_steps(self) -> int | None:
        return self.config.get("trainer", {}).get("max_steps")

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.train_rows + self.eval_rows), default=0)

    @property
    def incomplete_reason(self) -> str | None:
        """None for a finished run; otherwise why it cannot be counted."""
        if not self.train_rows and not self.eval_rows:
            return "no metrics rows (crashed before training started?)"
        if not self.eval_rows:
            return f"no eval rows (stopped at step {self.last_step})"
        target = self.max_steps or self.last_step
        if self.eval_rows[-1]["step"] < target:
            return f"last eval at step {self.eval_rows[-1]['step']} of {target} (crashed or still running)"
        return None

    @property
    def tokens_per_step(self) -> int:
        t, d = self.config.get("trainer", {}), self.config.get("data", {})
        return int(t.get("batch_size", 0)) * int(t.get("grad_accum", 1)) * int(d.get("seq_len", 0))

    def cumulative_flops(self, step: float) -> float:
        """Training FLOPs spent up to ``step``: each train row's flops_per_token covers the steps since the
        previous row."""
        total, previous, rate = 0.0, 0, 0.0
        for row in self.train_rows:
            rate = row.get("flops_per_token", 0.0) * self.tokens_per_step
            if row["step"] >= step:
                return total + rate * (step - previous)
            total += rate * (row["step"] - previous)
            previous = row["step"]
        return total + rate * (step - previous)  # past the last logged row: its rate continues

    def summary(self) -> dict[str, Any]:
        final = self.eval_rows[-1] if self.eval_rows else {}
        steps = final.get("step", self.last_step)
        speeds = [r["tokens_per_s"] for r in self.train_rows if "tokens_per_s" in r]
        active = self.accounting.get(ACTIVE_PARAMS_KEY)
        return {
            "run": str(self.path),
            "seed": self.config.get("seed"),
            "steps": steps,
            "final_val_loss": final.get("val_loss"),
            "final_val_bpb": final.get("val_bpb"),
            "tokens_seen": steps * self.tokens_per_step,
            "train_flops": self.cumulative_flops(steps),
            "active_params": active,
            "total_params": self.accounting.get(TOTAL_PARAMS_KEY),
            "tokens_per_s": median(speeds) if speeds else None,
            "incomplete": self.incomplete_reason or "",
        }


# ----------------------------------------------------------------------------- loading


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Hydra override strings → {key: value}, with the ``+``/``++``/``~`` prefixes dropped."""
    parsed = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def load_run(path: Path) -> Run:
    config_file = path / "config.yaml" if (path / "config.yaml").exists() else path / ".hydra" / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else None
    by_step: dict[tuple[str, int], dict] = {}  # a resumed run re-logs steps: the last row wins
    accounting: dict = {}
    metrics = path / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        accounting.update({k: v for k, v in row.items() if k.startswith("acct/")})  # its own row, or a train row
        kind = "eval" if "val_loss" in row else "train" if "loss" in row else None
        if kind and "step" in row:
            by_step[(kind, row["step"])] = row
    rows = sorted(by_step.items(), key=lambda item: item[0][1])
    return Run(
        path,
        config,
        overrides,
        [r for (k, _), r in rows if k == "train"],
        [r for (k, _), r in rows if k == "eval"],
        accounting,
    )


def is_run_folder(path: Path) -> bool:
    return (
        (path / "metrics.jsonl").exists()
        or (path / "config.yaml").exists()
        or (path / ".hydra" / "config.yaml").exists()
    )


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run folder at or below each path; ReportError names a path that holds none."""
    runs, seen = [], set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ReportError(f"{root}: no such file or directory")
        found = [root] if is_run_folder(root) else sorted(p for p in _walk(root) if is_run_folder(p))
        if not found:
            raise ReportError(
                f"no runs found under {root}: expected a run folder (holding metrics.jsonl and config.yaml) "
                "or a folder containing run folders (e.g. multirun/<date>/0, 1, …)"
            )
        for folder in found:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(load_run(folder))
    return runs


def _walk(root: Path) -> Iterable[Path]:
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name not in SKIP_DIRS:
            yield child
            if not is_run_folder(child):  # runs do not nest
                yield from _walk(child)


# ----------------------------------------------------------------------------- grouping


def never_groups(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NEVER_GROUP)


def key_value(run: Run, key: str) -> str:
    """A run's value for a grouping key: its override if given, else the config's (``a/b`` → ``a.b.name``)."""
    if run.overrides and key in run.overrides:
        return run.overrides[key]
    flat = run.flat
    dotted = key.replace("/", ".")
    for candidate in (dotted, dotted + ".name"):
        if candidate in flat:
            return str(flat[candidate])
    return "(default)"


def grouping_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ between runs: overridden keys when every run recorded its overrides, else
    config keys."""
    if runs and all(r.overrides is not None for r in runs):
        candidates = list(dict.fromkeys(k for r in runs for k in r.overrides))
    else:
        candidates = list(dict.fromkeys(k for r in runs for k in r.flat))
    candidates = [k for k in candidates if not never_groups(k)]
    return [k for k in candidates if len({key_value(r, k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str] | None = None) -> dict[str, list[Run]]:
    """{label: runs}; the label is ``k1=v1, k2=v2`` over the grouping keys (``all runs`` if none differ)."""
    keys = grouping_keys(runs) if keys is None else keys
    for key in keys:
        if never_groups(key):
            raise ReportError(
                f"--group-by {key!r}: seeds, run_dir and hydra keys are aggregated over, never grouped by"
            )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        label = ", ".join(f"{k}={key_value(run, k)}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return dict(sorted(groups.items(), key=lambda item: _natural(item[0])))


def _natural(text: str) -> list:
    """Sort key in which 'top_k=10' follows 'top_k=2'."""
    import re

    return [
        (0, float(part), "") if re.fullmatch(r"-?\d+(\.\d+)?", part) else (1, 0.0, part)
        for part in re.split(r"([-\d.]+)", text)
        if part
    ]
