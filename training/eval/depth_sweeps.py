"""Looped-depth sweeps for ``evaluate.py``: val loss and FLOPs over test-time iteration counts
(``depth=recurrent`` / ``depth=loop``) and over ITT selection ratios (``depth=itt``).

Prints the sweep table and writes ``depth.csv`` (the columns of every sweep: setting, active
params, forward FLOPs/token, val loss, Δ vs the trained setting) and ``depth.png`` (val loss against
the setting and against forward FLOPs per token, one point per setting). The trained setting is
always evaluated (it is the Δ reference). Defaults: iterations 1, 2, r̄/2, r̄, 2r̄, 4r̄ (recurrent) or 1 … 2n
repeats (loop); ITT ratios follow METHODS.md §5(d) Table 2 plus the all-0 (vanilla compute) point.
"""

from __future__ import annotations

from pathlib import Path

from training.accounting.account import account
from training.config import ConfigError
from training.eval.loss import evaluate_loss
from training.eval.sweep_table import plot_sweep, print_table, with_deltas, write_csv


def _sweep_value(cfg, key: str):
    sweep = cfg.get("sweep") if hasattr(cfg, "get") else None
    return sweep.get(key) if sweep is not None else None


def _settings(model, root, cfg) -> list[tuple[str, str, object]]:
    """(dimension, label, value) for every point of the sweep."""
    depth, name = model.depth, root.model.depth["name"]
    if name == "recurrent":
        r = depth.mean_recurrence
        values = _sweep_value(cfg, "iterations") or [1, 2, max(1, r // 2), r, 2 * r, 4 * r]
        return [("iterations", v, v) for v in sorted({int(v) for v in values} | {int(depth.eval_iterations)})]
    if name == "loop":
        values = _sweep_value(cfg, "iterations") or range(1, 2 * depth.repeats + 1)
        return [("repeats", v, v) for v in sorted({int(v) for v in values} | {int(depth.repeats)})]
    if name == "itt":
        n = depth.steps - 1
        trained = list(depth.ratios)
        grid = _sweep_value(cfg, "itt_ratios") or [
            trained,
            [0.5] * n,
            [0.7] * (n - 1) + [0.9],
            [0.9] * n,
            [0.9] * (n - 1) + [0.0],
            [1.0] * n,
            [0.0] * n,
        ]
        unique = list(dict.fromkeys(tuple(float(x) for x in ratios) for ratios in [trained, *grid]))
        return [("ratios", "/".join(f"{x:g}" for x in ratios), list(ratios)) for ratios in unique]
    return []


def _apply(depth, dimension: str, value) -> None:
    if dimension == "iterations":
        depth.set_iterations(value)
    elif dimension == "repeats":
        depth.set_repeats(value)
    else:
        depth.set_ratios(value)


def depth_sweeps(model, data, root, cfg, out_dir: Path) -> dict[str, Path]:
    """Run the sweep for this checkpoint's depth scheme ({} for depth=plain)."""
    points = _settings(model, root, cfg)
    if not points:
        return {}
    device = next(model.parameters()).device
    depth = model.depth
    saved = {
        "iterations": getattr(depth, "eval_iterations", None),
        "repeats": getattr(depth, "repeats", None),
        "ratios": list(getattr(depth, "ratios", [])),
    }
    trained = {"iterations": saved["iterations"], "repeats": saved["repeats"], "ratios": saved["ratios"]}
    rows = []
    model.eval()
    try:
        for dimension, label, value in points:
            try:
                _apply(depth, dimension, value)
            except ValueError as error:
                raise ConfigError(f"sweep value {label!r} for {dimension}: {error}") from error
            result = evaluate_loss(model, data, root.data.seq_len, cfg.batch_size, cfg.eval_batches, device)
            cost = account(model, root.data.seq_len, training=False)  # reads the iteration count / ratios just set
            rows.append(
                {
                    "dimension": dimension,
                    "setting": label,
                    "trained": _same(value, trained[dimension]),
                    "active_params": cost.active_params,
                    "forward_flops_per_token": cost.forward_flops_per_token,
                    "val_loss": result["val_loss"],
                    "val_bpb": result["val_bpb"],
                }
            )
    finally:
        _apply(depth, points[0][0], saved[points[0][0]])
    rows = with_deltas(rows)
    print_table(rows, f"depth sweep: {root.model.name} / depth={root.model.depth['name']}")
    csv_path = write_csv(rows, out_dir / "depth.csv")
    title = f"{root.model.name} / depth={root.model.depth['name']}: {points[0][0]} sweep"
    plot = plot_sweep(rows, out_dir / "depth.png", title)
    return {"depth csv": csv_path, "depth plot": plot}


def _same(value, trained) -> bool:
    if isinstance(value, (list, tuple)):
        return [float(x) for x in value] == [float(x) for x in trained]
    return value == trained
