"""The work behind ``evaluate.py``: elastic sweeps (top-k', expert subsets, depth), their table,
CSV and plots; routing analysis lives in ``training.eval.routing``, looped depth in ``depth_sweeps``.

Every sweep point is one row: its setting, the active parameters and forward FLOPs per token that
``training.accounting.account`` gives for that sub-network (eval-mode routing), its val loss and
the loss difference to the trained setting of the same dimension (Δ > 0: worse than trained).
The same rows are printed as a table, written as CSV and plotted against the setting and against
active FLOPs.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm.auto import tqdm

from arch.layers import FULL_MODEL, ElasticSetting
from training.accounting.account import account
from training.config import ConfigError, elastic_dims
from training.eval.loss import evaluate_loss, load_trained

# Columns of every sweep CSV (and of the printed table, minus dimension/trained/val_bpb).
SWEEP_COLUMNS = ("dimension", "setting", "trained", "active_params", "forward_flops_per_token",
                 "val_loss", "delta_val_loss", "val_bpb")
_LABELS = {"top_k": "experts per token k'", "experts": "routable experts", "depth": "layers kept",
           "iterations": "test-time iterations", "repeats": "loop repeats", "ratios": "ITT selection ratios"}


def run_evaluation(cfg) -> dict[str, Path]:
    if cfg.analysis not in ("elastic", "routing", "depth", "all"):
        raise ConfigError(f"analysis={cfg.analysis!r} is not one of ['elastic', 'routing', 'depth', 'all']")
    model, data, root, path = load_trained(cfg.ckpt, cfg.device)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {path} → {out_dir}")
    outputs = {}
    if cfg.analysis in ("elastic", "all"):
        outputs.update(elastic_sweep(model, data, root, cfg, out_dir))
    if cfg.analysis in ("routing", "all"):
        from training.eval.routing import routing_analysis

        outputs.update(routing_analysis(model, data, root, cfg, out_dir))
    if cfg.analysis in ("depth", "all") or (cfg.analysis == "elastic" and root.model.depth["name"] != "plain"):
        from training.eval.depth_sweeps import depth_sweeps  # iteration counts / ITT selection ratios

        outputs.update(depth_sweeps(model, data, root, cfg, out_dir))
    for name, file in outputs.items():
        print(f"{name}: {file}")
    return outputs


def _settings(root, cfg) -> list[tuple[str, int, list[ElasticSetting]]]:
    """(dimension, value, settings to average) for every point of the sweep; the trained value of
    every dimension is always included (it is the Δ reference)."""
    n_layers = root.model.n_layers
    _, n_experts, top_k = elastic_dims(root.model)
    points = []
    if n_experts:
        ks = sorted({int(k) for k in (cfg.sweep.top_k or range(1, min(n_experts, 3 * top_k) + 1))} | {top_k})
        for k in ks:
            if not 1 <= k <= n_experts:
                raise ConfigError(f"sweep.top_k contains {k}; allowed: 1..{n_experts} (model.ffn experts)")
        points += [("top_k", k, [ElasticSetting(top_k=k)]) for k in ks]
        sizes = sorted({int(s) for s in (cfg.sweep.expert_subsets or [max(1, n_experts // 2)])} | {n_experts}, reverse=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        for size in sizes:
            if not 1 <= size <= n_experts:
                raise ConfigError(f"sweep.expert_subsets contains {size}; allowed: 1..{n_experts}")
            if size == n_experts:
                points.append(("experts", n_experts, [FULL_MODEL]))
                continue
            masks = []
            for _ in range(cfg.sweep.subset_draws):
                mask = torch.zeros(n_experts, dtype=torch.bool)
                mask[torch.randperm(n_experts, generator=generator)[:size]] = True
                masks.append(ElasticSetting(expert_mask_E=mask))
            points.append(("experts", size, masks))
    # Dropping trailing layers is a meaningful probe of any plain stack; looped schemes sweep their
    # own depth (depth_sweeps) and keep only the full stack here unless trained elastically.
    probe = root.elastic.enabled or root.model.depth["name"] == "plain"
    depths = cfg.sweep.depths or ([n_layers, max(1, 3 * n_layers // 4), max(1, n_layers // 2)] if probe else [n_layers])
    for d in sorted({int(d) for d in depths} | {n_layers}, reverse=True):
        if not 1 <= d <= n_layers:
            raise ConfigError(f"sweep.depths contains {d}; allowed: 1..{n_layers}")
        points.append(("depth", d, [FULL_MODEL if d == n_layers else ElasticSetting(active_layers=tuple(range(d)))]))
    return points


def elastic_sweep(model, data, root, cfg, out_dir: Path) -> dict[str, Path]:
    device = next(model.parameters()).device
    _, n_experts, top_k = elastic_dims(root.model)
    trained = {"top_k": top_k, "experts": n_experts, "depth": root.model.n_layers}
    rows = []
    model.eval()
    for dimension, value, settings in tqdm(_settings(root, cfg), desc="elastic sweep", unit="setting", leave=False):
        losses = []
        for setting in settings:
            model.set_elastic(setting)
            losses.append(evaluate_loss(model, data, root.data.seq_len, cfg.batch_size, cfg.eval_batches, device))
        model.set_elastic(FULL_MODEL)
        cost = account(model, root.data.seq_len, elastic=settings[0], training=False)  # masks of one size cost the same
        rows.append({
            "dimension": dimension, "setting": value, "trained": value == trained[dimension],
            "active_params": cost.active_params, "forward_flops_per_token": cost.forward_flops_per_token,
            "val_loss": sum(r["val_loss"] for r in losses) / len(losses),
            "val_bpb": sum(r["val_bpb"] for r in losses) / len(losses),
        })
    rows = with_deltas(rows)
    print_table(rows, f"elastic sweep: {root.model.name} / {root.model.ffn['name']}")
    csv_path = write_csv(rows, out_dir / "elastic.csv")
    title = f"{root.model.name} / {root.model.ffn['name']}" + (" (elastic training)" if root.elastic.enabled else "")
    return {"elastic csv": csv_path, "elastic plot": plot_sweep(rows, out_dir / "elastic.png", title)}


# ---------------------------------------------------------------------- shared by every sweep
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
        body = [(f"{_LABELS.get(dimension, dimension)} = {r['setting']}" + (" *" if r["trained"] else ""),
                 _si(r["active_params"]), _si(r["forward_flops_per_token"]), f"{r['val_loss']:.4f}",
                 "—" if r["delta_val_loss"] is None else f"{r['delta_val_loss']:+.4f}")
                for r in rows if r["dimension"] == dimension]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        lines += ["", fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)]
    lines.append("(* trained setting; Δ > 0: higher loss than trained; FLOPs: forward matmuls + attention, eval routing)")
    return "\n".join(lines)


def print_table(rows: list[dict], title: str) -> None:
    print(format_table(rows, title), flush=True)


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path:
    """Top row: val loss against each dimension's setting; bottom row: against forward MFLOPs/token.
    Dimensions with a single point are left out (nothing to plot); red marks the trained setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dimensions = [d for d in dict.fromkeys(r["dimension"] for r in rows) if sum(r["dimension"] == d for r in rows) > 1]
    dimensions = dimensions or list(dict.fromkeys(r["dimension"] for r in rows))
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
        for ax, x, xlabel in ((axes[0][column], xs, _LABELS.get(dimension, dimension)),
                              (axes[1][column], flops, "active forward MFLOPs per token")):
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
