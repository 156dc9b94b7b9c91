"""Routing analysis for ``evaluate.py analysis=routing``: which experts each routed layer uses on
validation data, for every routed FFN (``moe``, ``emoe``, ``mhmoe``, ``moue``).

Writes, in the output folder:

- ``routing_load.png``: per-layer expert load heatmap, colour = fraction of the layer's routed
  slots (token × k choices; MH-MoE: sub-token × k) that went to each expert. MoUE columns are the
  shared pool's experts (pool index), then the layer's local experts; cells outside a layer's
  window (unreachable from it) are grey.
- ``routing_load_bars.png``: the same loads as bars, one panel per layer, with the uniform
  reference 1/E (MoUE: 1/(window + local experts), the experts that layer can reach).
- ``routing_coactivation.png``: one panel per layer (titled with it): the share of the layer's
  expert pairs chosen together by one token (diagonal left out).
- ``routing.csv``: layer, block, column, expert (pool/local index), kind, reachable, load fraction,
  uniform reference — one row per (layer, expert).

Each layer's routing is read from ``last_ids_NK`` after each eval forward; a layer that runs several
times in one forward (loops, ITT steps) reports its last call.

Legend: N routed rows (tokens, or sub-tokens for MH-MoE), K slots per row, L routed layers,
C columns of a layer (E experts; MoUE: M pool + local experts).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from arch.ffn.moe import MoEFFN
from arch.ffn.universal import UniversalMoEFFN
from training.config import ConfigError
from training.eval.sweep_table import aligned

ROUTED_BLOCKS = ("moe", "emoe", "mhmoe", "moue")


def routed_layers(model) -> list[torch.nn.Module]:
    """The routed FFN modules of ``model``, in layer order (each module once)."""
    layers = [m for m in model.modules() if isinstance(m, (MoEFFN, UniversalMoEFFN))]
    return sorted(layers, key=lambda m: m.layer_idx)


def _layout(module, block: str) -> dict:
    """Block name, column kinds, expert indices and the reachable mask (C,) of one routed layer."""
    if isinstance(module, UniversalMoEFFN):
        reachable_C = torch.zeros(module.E, dtype=torch.bool)
        reachable_C[module.window()] = True
        reachable_C[module.M :] = True
        kinds = ["pool"] * module.M + ["local"] * module.n_local
        experts = list(range(module.M)) + list(range(module.n_local))
        labels = [str(e) for e in range(module.M)] + [f"L{j}" for j in range(module.n_local)]
        return {"block": block, "kinds": kinds, "experts": experts, "labels": labels, "reachable_C": reachable_C}
    return {
        "block": block,
        "kinds": ["routed"] * module.E,
        "experts": list(range(module.E)),
        "labels": [str(e) for e in range(module.E)],
        "reachable_C": torch.ones(module.E, dtype=torch.bool),
    }


@torch.no_grad()
def collect_routing(model, data, root, cfg) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """Run the val batches; → (layers, load counts per layer (C,), co-activation counts per layer (C, C))."""
    from training.data.windows import iter_eval_batches

    layers = routed_layers(model)
    if not layers:
        raise ConfigError(
            f"analysis=routing needs an MoE model (a routed FFN: one of {list(ROUTED_BLOCKS)}); "
            f"this checkpoint has model.ffn.name={root.model.ffn['name']!r}"
        )
    counts = [torch.zeros(m.E) for m in layers]
    coact = [torch.zeros(m.E, m.E) for m in layers]
    device = next(model.parameters()).device
    model.eval()
    for x_BT, y_BT in iter_eval_batches(data.val, data.val_mask, root.data.seq_len, cfg.batch_size, cfg.eval_batches):
        for module in layers:
            module.last_ids_NK = None  # a layer that did not run must not report the previous batch
        model(x_BT.to(device), y_BT.to(device))
        for i, module in enumerate(layers):
            if module.last_ids_NK is None:
                continue
            ids_NK = module.last_ids_NK.cpu()
            valid_NK = ids_NK >= 0  # -1: slot dropped by capacity / handled elsewhere
            counts[i] += torch.bincount(ids_NK[valid_NK], minlength=module.E).float()
            onehot_NC = torch.zeros(ids_NK.shape[0], module.E)
            onehot_NC.scatter_(1, ids_NK.clamp(min=0), valid_NK.float())
            coact[i] += onehot_NC.T @ onehot_NC
    return layers, counts, coact


def routing_analysis(model, data, root, cfg, out_dir: Path) -> dict[str, Path]:
    """Per-layer expert load and co-activation on val data; prints a per-layer summary."""
    layers, counts, coact = collect_routing(model, data, root, cfg)
    layouts = [_layout(m, root.model.ffn["name"]) for m in layers]
    loads = [c / c.sum().clamp(min=1) for c in counts]
    names = [f"layer {m.layer_idx} ({lay['block']})" for m, lay in zip(layers, layouts)]
    _print_summary(names, loads, layouts)
    csv_path = out_dir / "routing.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["layer", "block", "column", "expert", "kind", "reachable", "load_fraction", "uniform_reference"]
        )
        for module, layout, load_C in zip(layers, layouts, loads):
            uniform = 1 / int(layout["reachable_C"].sum())
            for c in range(module.E):
                writer.writerow(
                    [
                        module.layer_idx,
                        layout["block"],
                        c,
                        layout["experts"][c],
                        layout["kinds"][c],
                        bool(layout["reachable_C"][c]),
                        round(float(load_C[c]), 6),
                        round(uniform, 6),
                    ]
                )
    title = f"{root.model.name} / ffn={root.model.ffn['name']}"
    return {
        "routing csv": csv_path,
        "routing load heatmap": _load_heatmap(names, loads, layouts, title, out_dir / "routing_load.png"),
        "routing load bars": _load_bars(names, loads, layouts, title, out_dir / "routing_load_bars.png"),
        "routing co-activation": _coactivation(names, coact, layouts, title, out_dir / "routing_coactivation.png"),
    }


def _print_summary(names, loads, layouts) -> None:
    """Per layer: reachable experts, max and min load as multiples of uniform, dead experts and the
    normalised load entropy (1 = balanced)."""
    print("routing (val data): load as a multiple of uniform 1/E over the experts a layer can reach")
    header = ("layer", "experts", "max/uniform", "min/uniform", "dead", "load entropy")
    body = []
    for name, load_C, layout in zip(names, loads, layouts):
        p = load_C[layout["reachable_C"]]
        n = p.numel()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(n)) if n > 1 else 1.0
        body.append(
            (
                name,
                str(n),
                f"{float(p.max()) * n:.2f}",
                f"{float(p.min()) * n:.2f}",
                str(int((p == 0).sum())),
                f"{entropy:.3f}",
            )
        )
    print("\n".join(aligned(header, body)))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xlabel(layouts, short: bool = False) -> str:
    if any(lay["block"] == "moue" for lay in layouts):
        if short:
            return "pool expert (Lj: local)"
        return "pool expert (Lj: the layer's local experts; grey: outside the layer's window)"
    return "expert"


def _xticks(ax, layout, size: int = 7) -> None:
    """Name every column when there are few enough to read (MoUE: pool indices, then L0, L1 …)."""
    labels = layout["labels"]
    if len(labels) <= 48:
        ax.set_xticks(range(len(labels)), labels, fontsize=size, rotation=90 if len(labels) > 16 else 0)
    if layout["block"] == "moue" and "L0" in labels:
        ax.axvline(labels.index("L0") - 0.5, color="black", lw=1)  # pool | local boundary


def _load_heatmap(names, loads, layouts, title, path: Path) -> Path:
    plt = _plt()
    import numpy as np

    width = max(load.numel() for load in loads)
    grid = np.full((len(loads), width), np.nan)  # NaN (grey): unreachable or absent column
    for i, (load_C, layout) in enumerate(zip(loads, layouts)):
        row = load_C.numpy().copy()
        row[~layout["reachable_C"].numpy()] = np.nan
        grid[i, : row.size] = row
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgray")
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * width, 1.6 + 0.45 * len(loads)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=0)
    fig.colorbar(image, ax=ax, label="fraction of routed slots")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    _xticks(ax, max(layouts, key=lambda lay: len(lay["labels"])))
    ax.set_xlabel(_xlabel(layouts), fontsize=8)
    ax.set_title(f"{title}: expert load per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _load_bars(names, loads, layouts, title, path: Path) -> Path:
    plt = _plt()
    rows, cols = _grid(len(loads))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name, load_C, layout in zip(axes.flat, names, loads, layouts):
        reachable = layout["reachable_C"]
        n = int(reachable.sum())
        colours = ["tab:blue" if r else "lightgray" for r in reachable.tolist()]
        ax.bar(range(load_C.numel()), load_C.numpy(), color=colours)
        reference = "1/(window+local)" if layout["block"] == "moue" else "1/E"
        ax.axhline(1 / n, color="tab:red", ls="--", lw=1, label=f"uniform {reference} = 1/{n}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(_xlabel([layout], short=True), fontsize=8)
        _xticks(ax, layout)
        ax.set_ylabel("fraction of routed slots", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(loads) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: expert load", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _coactivation(names, coact, layouts, title, path: Path) -> Path:
    plt = _plt()
    rows, cols = _grid(len(coact))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows), squeeze=False)
    for ax, name, pairs_CC, layout in zip(axes.flat, names, coact, layouts):
        pairs_CC = pairs_CC.clone()
        pairs_CC.fill_diagonal_(0)
        image = ax.imshow((pairs_CC / pairs_CC.sum().clamp(min=1)).numpy(), cmap="viridis", vmin=0)
        fig.colorbar(image, ax=ax, label="share of co-activated pairs", shrink=0.85)
        ax.set_title(f"{name}: co-activation", fontsize=9)
        ax.set_xlabel(_xlabel([layout], short=True), fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        _xticks(ax, layout)
        if len(layout["labels"]) <= 48:
            ax.set_yticks(range(len(layout["labels"])), layout["labels"], fontsize=7)
    for ax in list(axes.flat)[len(coact) :]:
        ax.axis("off")
    unit = "sub-token" if any(lay["block"] == "mhmoe" for lay in layouts) else "token"
    fig.suptitle(f"{title}: experts chosen by the same {unit}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
