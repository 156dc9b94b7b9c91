"""The table, CSV and plot every ``evaluate.py`` sweep writes (elastic and depth sweeps).

A row: ``dimension`` (what is swept), ``setting`` (its value), ``trained`` (the setting the run was
trained/evaluated at), ``active_params`` and ``forward_flops_per_token`` (from
``training.accounting.account`` for that setting, eval-mode routing), ``val_loss``,
``delta_val_loss`` (val_loss − the trained row's of the same dimension) and ``val_bpb``.
"""

from __future__ import annotations

import csv
from pathlib import Path

# Columns of every sweep CSV (and of the printed table, minus dimension/trained/val_bpb).
SWEEP_COLUMNS = (
    "dimension",
    "setting",
    "trained",
    "active_params",
    "forward_flops_per_token",
    "val_loss",
    "delta_val_loss",
    "val_bpb",
)
_LABELS = {
    "top_k": "experts per token k'",
    "experts": "routable experts",
    "depth": "layers kept",
    "iterations": "test-time iterations",
    "repeats": "loop repeats",
    "ratios": "ITT selection ratios",
}


def with_deltas(rows: list[dict]) -> list[dict]:
    """Add ``delta_val_loss`` = val_loss − the trained row's of the same dimension (None if none is trained)."""
    reference = {r["dimension"]: r["val_loss"] for r in rows if r["trained"]}
    for r in rows:
        base = reference.get(r["dimension"])
        r["delta_val_loss"] = None if base is None else r["val_loss"] - base
    return [{key: r.get(key) for key in SWEEP_COLUMNS} for r in rows]


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def format_table(rows: list[dict], title: str) -> str:
    """A plain aligned table, one block per dimension; the trained setting is starred."""
    header = ("setting", "active params", "fwd FLOPs/token", "val loss", "Δ vs trained")
    lines = [title]
    for dimension in dict.fromkeys(r["dimension"] for r in rows):
        body = [
            (
                f"{_LABELS.get(dimension, dimension)} = {r['setting']}" + (" *" if r["trained"] else ""),
                _si(r["active_params"]),
                _si(r["forward_flops_per_token"]),
                f"{r['val_loss']:.4f}",
                "—" if r["delta_val_loss"] is None else f"{r['delta_val_loss']:+.4f}",
            )
            for r in rows
            if r["dimension"] == dimension
        ]
        lines += ["", *aligned(header, body)]
    lines.append(
        "(* trained setting; Δ > 0: higher loss than trained; FLOPs: forward matmuls + attention, eval routing)"
    )
    return "\n".join(lines)


def aligned(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """Header, rule and rows; the first column left-aligned, the others right-aligned."""
    widths = [max(len(c) for c in column) for column in zip(header, *body)]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, body)]


def print_table(rows: list[dict], title: str) -> None:
    print(format_table(rows, title), flush=True)


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path | None:
    """Top row: val loss against each dimension's setting; bottom row: against forward MFLOPs/token.
    Dimensions with a single point are left out (nothing to plot; None if no dimension is left);
    red marks the trained setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dimensions = [d for d in dict.fromkeys(r["dimension"] for r in rows) if sum(r["dimension"] == d for r in rows) > 1]
    if not dimensions:
        return None
    fig, axes = plt.subplots(2, len(dimensions), figsize=(4.6 * len(dimensions), 7.2), squeeze=False)
    for column, dimension in enumerate(dimensions):
        points = [r for r in rows if r["dimension"] == dimension]
        numeric = all(isinstance(r["setting"], (int, float)) for r in points)
        if numeric:
            points.sort(key=lambda r: r["setting"])
        xs = [r["setting"] if numeric else i for i, r in enumerate(points)]
        flops = [r["forward_flops_per_token"] / 1e6 for r in points]
        losses = [r["val_loss"] for r in points]
        colours = ["tab:red" if r["trained"] else "tab:blue" for r in points]
        for ax, x, xlabel in (
            (axes[0][column], xs, _LABELS.get(dimension, dimension)),
            (axes[1][column], flops, "active forward MFLOPs per token"),
        ):
            if numeric or ax is axes[1][column]:
                order = sorted(range(len(x)), key=lambda i: x[i])
                ax.plot([x[i] for i in order], [losses[i] for i in order], "-", color="tab:blue", alpha=0.5)
            ax.scatter(x, losses, c=colours, zorder=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val loss")
            ax.grid(alpha=0.3)
        if numeric:
            axes[0][column].xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            axes[0][column].set_xticks(xs, [str(r["setting"]) for r in points], rotation=30, fontsize=7)
        for r, x, y in zip(points, flops, losses):
            axes[1][column].annotate(str(r["setting"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axes[0][column].set_title(f"{_LABELS.get(dimension, dimension)} (red: trained)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
