"""The outcome of the dha_vs_gqa recipe (:func:`recipes.dha.convert.dha_vs_gqa`): each arm's training budget,
GQA's val loss at DHA's fusion budget, and the comparison plot.

The matched budget itself (GQA continues the DHA fusion steps as extra CPT steps) is described in
:mod:`recipes.dha.convert`; here it is counted: steps, tokens and training FLOPs per arm for
``summary.json`` ("training_budget") and the plot legend.
"""

from __future__ import annotations

from pathlib import Path


def loss_at_step(curve: list[tuple[int, float]], step: float) -> float | None:
    """Val loss linearly interpolated between the evals of ``curve`` [(step, loss)] at ``step`` (None outside it)."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0) if s1 > s0 else l1
    return curve[0][1] if curve and curve[0][0] == step else None


def training_budget(mha, dha, gqa, fusion_steps: int) -> dict:
    """Steps, tokens and training FLOPs of each arm (training.eval.run_folders.Run objects), fusion counted for DHA.

    Fusion steps use the MHA run's batch shape and logged flops_per_token (fusion trains the MHA-width model);
    CPT steps and FLOPs are read from the converted runs' own metrics.
    """
    fusion_flops = mha.cumulative_flops(fusion_steps) if fusion_steps else 0.0
    out = {
        "mha": {
            "steps": mha.max_steps,
            "tokens": mha.max_steps * mha.tokens_per_step,
            "train_flops": mha.cumulative_flops(mha.max_steps),
        }
    }
    for name, run, extra_steps, extra_flops in (("dha", dha, fusion_steps, fusion_flops), ("gqa", gqa, 0, 0.0)):
        cpt = run.max_steps
        out[name] = {
            "fusion_steps": extra_steps,
            "cpt_steps": cpt,
            "steps": extra_steps + cpt,
            "tokens": (extra_steps + cpt) * run.tokens_per_step,
            "train_flops": extra_flops + run.cumulative_flops(cpt),
            "fusion_flops": extra_flops,
        }
    out["matched"] = (
        "post-MHA steps and tokens equal: GQA continues the DHA fusion steps as extra CPT steps; "
        "FLOPs differ by the per-token cost of the MHA-width fusion model"
    )
    return out


def plot_comparison(root_dir: Path, summary: dict) -> Path:
    """Val loss of DHA and GQA during CPT, with the MHA model's val loss as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fusion = summary["dha"].get("fusion_steps", 0)
    budget = summary.get("training_budget", {})
    for name, style in (("dha", "o-"), ("gqa", "s-")):
        steps, losses = zip(*summary[name]["curve"])
        if name == "dha":  # DHA's CPT starts after its fusion steps: plot it at post-MHA steps
            steps = [s + fusion for s in steps]
        label = f"DHA ({fusion} fusion + CPT)" if name == "dha" else "GQA (mean-pooled, CPT only)"
        if name in budget:
            b = budget[name]
            label += f": {b['steps']} steps, {b['tokens'] / 1e6:.2f}M tokens, {b['train_flops']:.2e} FLOPs"
        ax.plot(steps, losses, style, label=label)
    mha_label = "MHA (source)"
    if "mha" in budget:
        mha_label += f": {budget['mha']['steps']} steps, {budget['mha']['train_flops']:.2e} FLOPs"
    ax.axhline(summary["mha_val_loss"], color="k", ls="--", label=mha_label)
    ax.set_xlabel("optimizer steps after the MHA run (DHA: fusion, then CPT; GQA: CPT)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"MHA → DHA vs GQA at {summary['budget']:.0%} KV budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = root_dir / "dha_vs_gqa.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
