"""The work behind ``evaluate.py``: elastic sweeps (top-k', expert subsets, depth) and routing analysis."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from tqdm.auto import tqdm

from arch.layers import FULL_MODEL, ElasticSetting
from training.config import ConfigError, elastic_dims
from training.eval.loss import evaluate_loss, load_trained


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
        outputs.update(routing_analysis(model, data, root, cfg, out_dir))
    if cfg.analysis in ("depth", "all") or (cfg.analysis == "elastic" and root.model.depth["name"] != "plain"):
        from training.eval.depth_sweeps import depth_sweeps  # iteration counts / ITT selection ratios

        outputs.update(depth_sweeps(model, data, root, cfg, out_dir))
    for name, file in outputs.items():
        print(f"{name}: {file}")
    return outputs


def _settings(root, cfg) -> list[tuple[str, int, list[ElasticSetting]]]:
    """(dimension, value, settings to average) for every point of the sweep."""
    n_layers = root.model.n_layers
    _, n_experts, top_k = elastic_dims(root.model)
    points = []
    if n_experts:
        ks = cfg.sweep.top_k or list(range(1, min(n_experts, 3 * top_k) + 1))
        points += [("top_k", int(k), [ElasticSetting(top_k=int(k))]) for k in ks]
        sizes = cfg.sweep.expert_subsets or sorted({n_experts, max(1, n_experts // 2)}, reverse=True)
        generator = torch.Generator().manual_seed(cfg.seed)
        for size in sizes:
            if int(size) >= n_experts:
                points.append(("experts", n_experts, [FULL_MODEL]))
                continue
            masks = []
            for _ in range(cfg.sweep.subset_draws):
                mask = torch.zeros(n_experts, dtype=torch.bool)
                mask[torch.randperm(n_experts, generator=generator)[: int(size)]] = True
                masks.append(ElasticSetting(expert_mask_E=mask))
            points.append(("experts", int(size), masks))
    depths = cfg.sweep.depths or ([n_layers, max(1, 3 * n_layers // 4), max(1, n_layers // 2)] if root.elastic.enabled else [n_layers])
    for d in sorted({int(d) for d in depths}, reverse=True):
        if not 1 <= d <= n_layers:
            raise ConfigError(f"sweep.depths contains {d}; allowed: 1..{n_layers}")
        points.append(("depth", d, [FULL_MODEL if d == n_layers else ElasticSetting(active_layers=tuple(range(d)))]))
    return points


def elastic_sweep(model, data, root, cfg, out_dir: Path) -> dict[str, Path]:
    device = next(model.parameters()).device
    _, n_experts, top_k = elastic_dims(root.model)
    rows = []
    for dimension, value, settings in tqdm(_settings(root, cfg), desc="elastic sweep", unit="setting"):
        losses = []
        for setting in settings:
            model.set_elastic(setting)
            losses.append(evaluate_loss(model, data, root.data.seq_len, cfg.batch_size, cfg.eval_batches, device))
        model.set_elastic(FULL_MODEL)
        trained = {"top_k": top_k, "experts": n_experts, "depth": root.model.n_layers}[dimension]
        rows.append({
            "dimension": dimension, "value": value, "trained_value": trained,
            "val_loss": sum(r["val_loss"] for r in losses) / len(losses),
            "val_bpb": sum(r["val_bpb"] for r in losses) / len(losses),
        })
    csv_path = out_dir / "elastic.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"elastic csv": csv_path, "elastic plot": _plot_sweep(rows, out_dir / "elastic.png", root)}


def _plot_sweep(rows, path: Path, root) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dimensions = list(dict.fromkeys(r["dimension"] for r in rows))
    labels = {"top_k": "experts per token k'", "experts": "routable experts", "depth": "layers kept"}
    fig, axes = plt.subplots(1, len(dimensions), figsize=(4.5 * len(dimensions), 3.8), squeeze=False)
    for ax, dimension in zip(axes[0], dimensions):
        points = sorted((r["value"], r["val_loss"]) for r in rows if r["dimension"] == dimension)
        trained = next(r["trained_value"] for r in rows if r["dimension"] == dimension)
        ax.plot(*zip(*points), "o-")
        ax.axvline(trained, color="gray", ls="--", label=f"training value ({trained})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(labels[dimension])
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{root.model.name} / {root.model.ffn['name']}" + (" (elastic training)" if root.elastic.enabled else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def routing_analysis(model, data, root, cfg, out_dir: Path) -> dict[str, Path]:
    """Per-layer expert load and expert co-activation (pairs chosen by the same token) on val data."""
    from training.data.shards import iter_eval_batches

    moe_layers = [m for m in model.modules() if hasattr(m, "last_ids_NK") or type(m).__name__ == "MoEFFN"]
    if not moe_layers:
        raise ConfigError(f"analysis=routing needs an MoE model; this checkpoint has model.ffn.name={root.model.ffn['name']!r}")
    E = moe_layers[0].E
    load_LE = torch.zeros(len(moe_layers), E)
    coact_EE = torch.zeros(E, E)
    device = next(model.parameters()).device
    model.eval()
    for x_BT, y_BT in iter_eval_batches(data.val, data.val_mask, root.data.seq_len, cfg.batch_size, cfg.eval_batches):
        model(x_BT.to(device), y_BT.to(device))
        for layer, module in enumerate(moe_layers):
            ids_NK = module.last_ids_NK.cpu()
            valid = ids_NK >= 0
            load_LE[layer] += torch.bincount(ids_NK[valid], minlength=E).float()
            onehot_NE = torch.zeros(ids_NK.shape[0], E)
            onehot_NE.scatter_(1, ids_NK.clamp(min=0), valid.float())
            coact_EE += onehot_NE.T @ onehot_NE
    load_LE = load_LE / load_LE.sum(1, keepdim=True).clamp(min=1)
    coact_EE.fill_diagonal_(0)
    csv_path = out_dir / "routing.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *[f"expert{e}" for e in range(E)]])
        for layer, row in enumerate(load_LE.tolist()):
            writer.writerow([layer, *[round(v, 6) for v in row]])
    return {
        "routing csv": csv_path,
        "routing load heatmap": _heatmap(load_LE, "expert", "MoE layer", "fraction of routed slots", out_dir / "routing_load.png"),
        "routing co-activation": _heatmap(coact_EE / coact_EE.sum().clamp(min=1), "expert", "expert", "co-activation share", out_dir / "routing_coactivation.png"),
    }


def _heatmap(matrix, xlabel, ylabel, title, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * matrix.shape[1], 1.2 + 0.45 * matrix.shape[0]))
    image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
