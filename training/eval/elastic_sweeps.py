"""The work behind ``evaluate.py``: elastic sweeps (top-k', expert subsets, depth), their table,
CSV and plots; routing analysis lives in ``training.eval.routing``, looped depth in ``depth_sweeps``.

Every sweep point is one row: its setting, the active parameters and forward FLOPs per token that
``training.accounting.account`` gives for that sub-network (eval-mode routing), its val loss and
the loss difference to the trained setting of the same dimension (Δ > 0: worse than trained).
The same rows are printed as a table, written as CSV and plotted against the setting and against
active FLOPs (``training.eval.sweep_table``, shared with the depth sweeps).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from arch.layers import FULL_MODEL, ElasticSetting
from training.accounting.account import account
from training.config import ConfigError, elastic_dims
from training.eval.loss import evaluate_loss, load_trained
from training.eval.sweep_table import plot_sweep, print_table, with_deltas, write_csv


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
        requested = cfg.sweep.expert_subsets or [max(1, n_experts // 2)]
        sizes = sorted({int(s) for s in requested} | {n_experts}, reverse=True)
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
        rows.append(
            {
                "dimension": dimension,
                "setting": value,
                "trained": value == trained[dimension],
                "active_params": cost.active_params,
                "forward_flops_per_token": cost.forward_flops_per_token,
                "val_loss": sum(r["val_loss"] for r in losses) / len(losses),
                "val_bpb": sum(r["val_bpb"] for r in losses) / len(losses),
            }
        )
    rows = with_deltas(rows)
    print_table(rows, f"elastic sweep: {root.model.name} / {root.model.ffn['name']}")
    csv_path = write_csv(rows, out_dir / "elastic.csv")
    title = f"{root.model.name} / {root.model.ffn['name']}" + (" (elastic training)" if root.elastic.enabled else "")
    plot = plot_sweep(rows, out_dir / "elastic.png", title)
    if plot is None:  # e.g. a dense looped model: only the full stack here, its own sweep follows
        print("elastic.png not written: every elastic dimension has a single setting")
        return {"elastic csv": csv_path}
    return {"elastic csv": csv_path, "elastic plot": plot}
