"""Shared benchmark plumbing: environment description and CSV/PNG output under benchmarks/results/."""
from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_boxplot(groups: dict[str, list[float]], ylabel: str, title: str, name: str) -> Path:
    """Box plot of repeated measurements, one box per group → benchmarks/results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot(list(groups.values()), tick_labels=list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_mode_bars(rows: list[dict], key, label, value: str, ylabel: str, title: str, name: str, dpi: int = 110) -> Path:
    """Grouped bars, one panel per mode (fwd, fwd+bwd): ``value`` per method for every ``key(row)``
    (x tick text ``label(key)``) → benchmarks/results/<name>.png, titled with the device and versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(key(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2 * len(keys) * 2), 4.5))
    width = 0.8 / len(methods)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for i, method in enumerate(methods):
            vals = [next((r[value] for r in rows if r["method"] == method and r["mode"] == mode and key(r) == k), 0)
                    for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([label(k) for k in keys], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {mode}")
        ax.legend(fontsize=8)
    env = environment()
    fig.suptitle(f"{env['device']} | torch {env['torch']} | triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
