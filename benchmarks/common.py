"""Shared benchmark plumbing: environment description, output folders, paired ratios, CSV/PNG output.

Every benchmark writes into ``--out`` (default ``benchmarks/results/local/``, which git ignores); the
tracked ``benchmarks/results/`` is written only when asked (``--out benchmarks/results``). Ratios are
computed per interleaved pair of measurements (A then B, repeated) and summarised by their median and
min..max spread: machine noise that hits one pair hits both of its arms, which a ratio of two
medians would throw away. ``--check`` makes a missed target a non-zero exit.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"  # tracked results (committed CSVs and plots)
LOCAL_RESULTS = RESULTS / "local"  # the default output folder, not tracked


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--check`` for a benchmark's command line."""
    parser.add_argument(
        "--out",
        default=str(LOCAL_RESULTS),
        help="folder for the CSV and PNG (the tracked results: --out benchmarks/results)",
    )
    parser.add_argument("--check", action="store_true", help="exit non-zero when a target is missed")


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Per-pair ratios a_i / b_i of interleaved measurements → median, min, max and the count."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need equally many measurements of both arms, got {len(numerators)} and {len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": len(ratios)}


def target_line(name: str, summary: dict[str, float], target: float, higher_is_better: bool = True) -> tuple[str, bool]:
    """'name: median 1.14 (0.98..1.31 over 7 pairs), target >= 0.9: met' and whether it was met."""
    met = summary["median"] >= target if higher_is_better else summary["median"] <= target
    sign = ">=" if higher_is_better else "<="
    return (
        f"{name}: median {summary['median']:.3f} ({summary['min']:.3f}..{summary['max']:.3f} over "
        f"{summary['pairs']} pairs), target {sign} {target}: {'met' if met else 'NOT met'}",
        met,
    )


def environment() -> dict[str, str]:
    """Device name and library versions, written into every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__, "triton": triton_version}


def write_csv(name: str, rows: list[dict], out: str | Path | None = None) -> Path:
    """Rows → <out>/<name>.csv (out: the benchmark's --out; default the untracked benchmarks/results/local)."""
    out = Path(out or LOCAL_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_boxplot(
    groups: dict[str, list[float]], ylabel: str, title: str, name: str, out: str | Path | None = None
) -> Path:
    """Box plot of repeated measurements, one box per group → <out>/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out or LOCAL_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot(list(groups.values()), tick_labels=list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_mode_bars(
    rows: list[dict],
    key,
    label,
    value: str,
    ylabel: str,
    title: str,
    name: str,
    dpi: int = 110,
    out: str | Path | None = None,
) -> Path:
    """Grouped bars, one panel per mode (fwd, fwd+bwd): ``value`` per method for every ``key(row)``
    (x tick text ``label(key)``) → <out>/<name>.png, titled with the device and versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(key(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2 * len(keys) * 2), 4.5))
    width = 0.8 / len(methods)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for i, method in enumerate(methods):
            vals = [
                next((r[value] for r in rows if r["method"] == method and r["mode"] == mode and key(r) == k), 0)
                for k in keys
            ]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([label(k) for k in keys], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {mode}")
        ax.legend(fontsize=8)
    env = environment()
    fig.suptitle(f"{env['device']} | torch {env['torch']} | triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    out = Path(out or LOCAL_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
