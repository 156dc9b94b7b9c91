"""Looped-depth sweeps for ``evaluate.py``: val loss and FLOPs over test-time iteration counts
(``depth=recurrent`` / ``depth=loop``) and over ITT selection ratios (``depth=itt``).

Writes ``depth.csv`` and ``depth.png`` (val loss against forward FLOPs per token, each point
labelled with its setting). Defaults: iterations 1, 2, r̄/2, r̄, 2r̄, 4r̄ (recurrent) or 1 … 2n
repeats (loop); ITT ratios follow METHODS.md §5(d) Table 2 plus the all-0 (vanilla compute) point.
"""
from __future__ import annotations

import csv
from pathlib import Path

from training.config import ConfigError
from training.eval.loss import evaluate_loss
from training.accounting.account import account


def _sweep_value(cfg, key: str):
    sweep = cfg.get("sweep") if hasattr(cfg, "get") else None
    return sweep.get(key) if sweep is not None else None


def _settings(model, root, cfg) -> list[tuple[str, str, object]]:
    """(dimension, label, value) for every point of the sweep."""
    depth, name = model.depth, root.model.depth["name"]
    if name == "recurrent":
        r = depth.mean_recurrence
        values = _sweep_value(cfg, "iterations") or sorted({1, 2, max(1, r // 2), r, 2 * r, 4 * r})
        return [("iterations", str(int(v)), int(v)) for v in values]
    if name == "loop":
        values = _sweep_value(cfg, "iterations") or list(range(1, 2 * depth.repeats + 1))
        return [("repeats", str(int(v)), int(v)) for v in values]
    if name == "itt":
        n = depth.steps - 1
        trained = list(depth.ratios)
        grid = _sweep_value(cfg, "itt_ratios") or [trained, [0.5] * n, [0.7] * (n - 1) + [0.9], [0.9] * n,
                                                    [0.9] * (n - 1) + [0.0], [1.0] * n, [0.0] * n]
        unique = list(dict.fromkeys(tuple(float(x) for x in ratios) for ratios in grid))
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
    saved = {"iterations": getattr(depth, "eval_iterations", None), "repeats": getattr(depth, "repeats", None),
             "ratios": list(getattr(depth, "ratios", []))}
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
            rows.append({
                "dimension": dimension, "value": label, "trained": value == trained[dimension],
                "val_loss": result["val_loss"], "val_ppl": result["val_ppl"], "val_bpb": result["val_bpb"],
                "forward_flops_per_token": account(model, root.data.seq_len, training=False).forward_flops_per_token,
            })
    finally:
        _apply(depth, points[0][0], saved[points[0][0]])
    csv_path = out_dir / "depth.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"depth csv": csv_path, "depth plot": _plot(rows, out_dir / "depth.png", root)}


def _plot(rows, path: Path, root) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    flops = [r["forward_flops_per_token"] / 1e6 for r in rows]
    losses = [r["val_loss"] for r in rows]
    ax.scatter(flops, losses, c=["tab:red" if r["trained"] else "tab:blue" for r in rows], zorder=3)
    if rows[0]["dimension"] != "ratios":
        ax.plot(flops, losses, "-", color="tab:blue", alpha=0.5)
    for r, x, y in zip(rows, flops, losses):
        ax.annotate(r["value"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("forward MFLOPs per token")
    ax.set_ylabel("val loss")
    ax.set_title(f"{root.model.depth['name']}: {rows[0]['dimension']} sweep (red: training setting)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
