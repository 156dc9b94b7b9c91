"""Convert a trained MHA checkpoint to DHA or GQA, continue pretraining, and the dha_vs_gqa recipe.

    python -m recipes.dha.convert mha_to_dha ckpt=runs/mha out=runs/mha_dha budget=0.25 [similarity=params|activations
        calib_batches=4 allocation=dp|uniform fusion_steps=300 fusion_tol=0.01 granularity=scalar|channel ...]
    python -m recipes.dha.convert mha_to_gqa ckpt=runs/mha out=runs/mha_gqa budget=0.25
    python -m recipes.dha.convert continue run=runs/mha_dha [steps=300]     # continued pretraining (CPT)
    python -m recipes.dha.convert dha_vs_gqa run_dir=runs/dha_vs_gqa [budget=0.25 ...] [hydra overrides of the MHA run]

A conversion writes a fresh run folder: ``checkpoints/step_00000000.pt`` holds the converted model,
its full config (model.attention = the DHA / GQA node), a fresh optimizer and ``trainer.max_steps
= cpt_steps``; ``continue`` (or ``Trainer`` on that folder) trains it from step 0, logging the
val loss right after conversion as the step-0 eval. ``conversion.json`` records the search, the
fusion history, the val losses and the KV-cache bytes per token. METHODS.md §4.

Matched budget in ``dha_vs_gqa``: DHA's fusion trains every weight for F steps (F = the fusion
steps actually taken, ≤ ``fusion_steps``) before its CPT, on batches of the same size and length.
The GQA arm gets those F steps too, as F more CPT steps (GQA CPT = cpt + F, DHA = F fusion + cpt),
so both arms see the same number of post-MHA optimizer steps and tokens. Their training FLOPs then
differ only by the per-token cost of the model being trained (fusion runs at MHA width, CPT at the
reduced KV width); ``summary.json`` ("training_budget") and the plot legend state each arm's steps,
tokens and FLOPs (flops_per_token as logged in metrics.jsonl; fusion steps at the MHA run's rate,
fusion-weight mixing not counted), and ``val_loss_at_fusion_budget`` is GQA's val loss after F CPT
steps, the budget-matched counterpart of DHA's ``val_loss_converted``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from arch.registry import ConfigError


@dataclass
class ConvertOptions:
    ckpt: str = ""  # MHA run folder or checkpoint file
    out: str = ""  # the new run folder
    budget: float = 0.25  # fraction of MHA's KV heads kept (Σ g^K + g^V ≤ budget·2·L·H)
    cpt_steps: int = 0  # trainer.max_steps of the converted run; 0 = the source run's
    device: str = "auto"
    # mha_to_dha only
    similarity: str = "params"  # params | activations (calibration batches from the train split)
    calib_batches: int = 4
    allocation: str = "dp"  # dp (per-layer counts by redundancy) | uniform
    fusion_steps: int = 300
    fusion_tol: float = 0.01
    fusion_lr: float = 1e-3
    omega_lr: float = 1e-2
    rho_init: float = 1.0
    rho_growth: float = 2.0
    al_every: int = 10
    granularity: str = "scalar"  # scalar | channel fusion weights
    train_base: bool = True

    HELP = {
        "ckpt": "MHA run folder or checkpoint file",
        "out": "the new run folder",
        "budget": "fraction of MHA's KV heads kept (sum of key and value heads <= budget * 2 * layers * heads)",
        "cpt_steps": "trainer.max_steps of the converted run; 0 = the source run's",
        "device": "auto, cpu or cuda",
        "similarity": "mha_to_dha: head similarity from params or activations (calibration batches)",
        "calib_batches": "mha_to_dha: calibration batches for similarity=activations",
        "allocation": "mha_to_dha: per-layer head counts by redundancy (dp) or uniform",
        "fusion_steps": "mha_to_dha: augmented-Lagrangian fusion steps",
        "fusion_tol": "mha_to_dha: fusion stop tolerance",
        "fusion_lr": "mha_to_dha: fusion learning rate",
        "omega_lr": "mha_to_dha: fusion-weight learning rate",
        "rho_init": "mha_to_dha: initial penalty",
        "rho_growth": "mha_to_dha: penalty growth",
        "al_every": "mha_to_dha: multiplier update interval",
        "granularity": "mha_to_dha: scalar or channel fusion weights",
        "train_base": "mha_to_dha: train all weights during fusion",
    }


@dataclass
class RecipeOptions:
    run_dir: str = ""
    budget: float = 0.25
    cpt_steps: int = 0  # 0 = the MHA run's trainer.max_steps ("the same number of steps")
    similarity: str = "params"
    allocation: str = "dp"
    fusion_steps: int = 300
    fusion_tol: float = 0.01
    granularity: str = "scalar"

    HELP = {
        "run_dir": "folder of the whole recipe (mha/, dha/, gqa/, summary.json)",
        "budget": "KV-head budget fraction",
        "cpt_steps": "continued-pretraining steps; 0 = the MHA run's trainer.max_steps",
        "similarity": "params or activations",
        "allocation": "dp or uniform",
        "fusion_steps": "DHA fusion steps",
        "fusion_tol": "fusion stop tolerance",
        "granularity": "scalar or channel fusion weights",
    }


def _fusion_config(o: ConvertOptions, batch_size: int, seed: int):
    from recipes.dha.fusion import FusionConfig

    if o.granularity not in ("scalar", "channel"):
        raise ConfigError(f"granularity={o.granularity!r} is invalid; allowed: ['scalar', 'channel']")
    return FusionConfig(
        steps=o.fusion_steps,
        tol=o.fusion_tol,
        lr=o.fusion_lr,
        omega_lr=o.omega_lr,
        rho_init=o.rho_init,
        rho_growth=o.rho_growth,
        al_every=o.al_every,
        granularity=o.granularity,
        train_base=o.train_base,
        batch_size=batch_size,
        seed=seed + 1,
    )


def _val_loss(model, data, root) -> float:
    from training.eval.loss import evaluate_loss

    t = root.trainer
    device = next(model.parameters()).device
    return evaluate_loss(model, data, root.data.seq_len, t.batch_size, t.eval_batches, device)["val_loss"]


def mha_to_dha(o: ConvertOptions) -> dict:
    """Search → fusion → collapse → a fresh run folder for CPT. Returns the conversion report."""
    from arch.attention.dha import kv_bytes_per_token
    from recipes.dha.fusion import collapse, fuse, wrap_for_fusion
    from recipes.dha.search import search
    from training.eval.loss import load_trained

    _require_paths(o)
    model, data, root, path = load_trained(o.ckpt, o.device, with_train=True)
    calib = None
    if o.similarity == "activations":
        from training.data.windows import WindowSampler

        sampler = WindowSampler(
            data.train,
            data.train_mask,
            root.data.seq_len,
            root.trainer.batch_size,
            root.seed + 2,
            align=data.window_align,
        )
        calib = [sampler.get_batch(i)[0].to(next(model.parameters()).device) for i in range(o.calib_batches)]
    result = search(model, o.budget, o.similarity, o.allocation, calib)
    fusion_cfg = _fusion_config(o, root.trainer.batch_size, root.seed)
    fused = wrap_for_fusion(model, result, o.granularity)
    start = _val_loss(fused, data, root)
    history = fuse(fused, data, root.data.seq_len, fusion_cfg)
    dha = collapse(fused)
    report = {
        "method": "dha",
        "source": str(path),
        "budget": o.budget,
        "budget_heads": result.budget_heads,
        "k_heads": result.counts["k"],
        "v_heads": result.counts["v"],
        "k_maps": result.groups["k"],
        "v_maps": result.groups["v"],
        "search_cost": result.total_cost,
        "val_loss_mha": _val_loss(model, data, root),
        "val_loss_fusion_start": start,
        "val_loss_fused": _val_loss(fused, data, root),
        "val_loss_converted": _val_loss(dha, data, root),
        "fusion_steps": history[-1]["step"],
        "fusion_disagreement": history[-1]["disagreement"],
        "kv_bytes_per_token_bf16": kv_bytes_per_token(dha),
        "kv_bytes_per_token_mha_bf16": kv_bytes_per_token(model),
        "similarity": {kind: [layer.similarity_HH for layer in result.layers[kind]] for kind in result.layers},
        "fusion_history": history,
    }
    write_run(o.out, root, dha, data, o.cpt_steps, report)
    return report


def mha_to_gqa(o: ConvertOptions) -> dict:
    """GQA baseline at the same budget: mean-pool contiguous groups, no fusion stage."""
    from arch.attention.dha import kv_bytes_per_token
    from recipes.dha.fusion import mean_pool_gqa
    from recipes.dha.search import budget_heads
    from training.eval.loss import load_trained

    _require_paths(o)
    model, data, root, path = load_trained(o.ckpt, o.device, with_train=True)
    L, H = root.model.n_layers, root.model.n_heads
    n_kv = budget_heads(o.budget, L, H) // (2 * L)
    gqa = mean_pool_gqa(model, n_kv)
    report = {
        "method": "gqa",
        "source": str(path),
        "budget": o.budget,
        "n_kv_heads": n_kv,
        "val_loss_mha": _val_loss(model, data, root),
        "val_loss_converted": _val_loss(gqa, data, root),
        "kv_bytes_per_token_bf16": kv_bytes_per_token(gqa),
        "kv_bytes_per_token_mha_bf16": kv_bytes_per_token(model),
    }
    write_run(o.out, root, gqa, data, o.cpt_steps, report)
    return report


def _require_paths(o: ConvertOptions) -> None:
    if not o.ckpt or not o.out:
        raise ConfigError("conversion needs ckpt=<MHA run folder or checkpoint> and out=<new run folder>")
    if Path(o.out, "checkpoints").exists():
        raise ConfigError(f"out={o.out} already holds checkpoints; pick a new folder (nothing was overwritten)")


def write_run(out: str, root, model, data, cpt_steps: int, report: dict) -> Path:
    """A run folder whose step-0 checkpoint is ``model`` with fresh optimizer state, ready for CPT."""
    from omegaconf import OmegaConf

    from training.checkpoint import files as ckpt
    from training.data.windows import WindowSampler
    from training.optim import build_optimizer

    config = asdict(root)
    config["model"]["attention"] = dict(model.cfg.attention)
    config["run_dir"] = str(out)
    config["seed"] = root.seed + 1  # CPT draws windows other than the source run's
    config["trainer"]["resume"] = "auto"
    config["trainer"]["max_steps"] = cpt_steps or root.trainer.max_steps
    sampler = WindowSampler(
        data.train, data.train_mask, root.data.seq_len, root.trainer.batch_size, config["seed"], align=data.window_align
    )
    optimizer = build_optimizer(model, root.optim, next(model.parameters()).device.type)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "schedule": {"name": root.schedule.name, "step": 0},
        "rng": ckpt.rng_state(),
        "nonfinite_skipped": 0,
        "config": config,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (Path(out) / "conversion.json").write_text(json.dumps(report, indent=1))
    return ckpt.save_checkpoint(out, 0, state, keep_last=root.trainer.keep_last)


def continue_training(run: str, steps: int = 0) -> dict:
    """CPT of a converted run folder (its config is the one stored in its checkpoint)."""
    from training.checkpoint import files as ckpt
    from training.trainer import train

    found = ckpt.find_resume_checkpoint(run)
    if found is None:
        raise ckpt.CheckpointError(f"no checkpoint in {run}; run mha_to_dha / mha_to_gqa with out={run} first")
    config = found[1]["config"]
    if steps:
        config["trainer"]["max_steps"] = steps
    return train(config)


def dha_vs_gqa(o: RecipeOptions, overrides: list[str]) -> dict:
    """Train MHA (experiment=dha_vs_gqa), convert both ways at o.budget, CPT both, plot and summarise."""
    from recipes.dha.comparison import loss_at_step, plot_comparison, training_budget
    from training.cli import compose
    from training.eval.run_folders import load_run
    from training.metrics import read_metrics
    from training.trainer import train

    if not o.run_dir:
        raise ConfigError("dha_vs_gqa needs run_dir=<folder for the three runs>")
    root_dir = Path(o.run_dir)
    config = compose(["experiment=dha_vs_gqa", f"run_dir={root_dir / 'mha'}", *overrides])
    mha = train(config)
    mha_run = load_run(root_dir / "mha")
    cpt_steps = o.cpt_steps or mha_run.max_steps
    common = dict(ckpt=str(root_dir / "mha"), budget=o.budget)
    reports = {
        "dha": mha_to_dha(
            ConvertOptions(
                out=str(root_dir / "dha"),
                similarity=o.similarity,
                allocation=o.allocation,
                fusion_steps=o.fusion_steps,
                fusion_tol=o.fusion_tol,
                granularity=o.granularity,
                cpt_steps=cpt_steps,
                **common,
            )
        )
    }
    fusion_done = int(reports["dha"]["fusion_steps"])  # the fusion may stop early on its tolerance
    # the matched budget: GQA continues the F steps DHA spent on fusion (see the module docstring)
    reports["gqa"] = mha_to_gqa(ConvertOptions(out=str(root_dir / "gqa"), cpt_steps=cpt_steps + fusion_done, **common))
    summary = {
        "mha_val_loss": mha["final_val_loss"],
        "budget": o.budget,
        "kv_bytes_per_token_bf16": {"mha": reports["dha"]["kv_bytes_per_token_mha_bf16"]["total"]},
    }
    for name, report in reports.items():
        cpt = continue_training(str(root_dir / name))
        curve = [(r["step"], r["val_loss"]) for r in read_metrics(root_dir / name) if "val_loss" in r]
        summary[name] = {
            "val_loss_converted": report["val_loss_converted"],
            "val_loss_after_cpt": cpt["final_val_loss"],
            "curve": curve,
        }
        summary["kv_bytes_per_token_bf16"][name] = report["kv_bytes_per_token_bf16"]["total"]
    summary["dha"].update(
        {k: reports["dha"][k] for k in ("k_heads", "v_heads", "fusion_steps", "fusion_disagreement", "val_loss_fused")}
    )
    summary["gqa"]["val_loss_at_fusion_budget"] = loss_at_step(summary["gqa"]["curve"], fusion_done)
    summary["training_budget"] = training_budget(
        mha_run, load_run(root_dir / "dha"), load_run(root_dir / "gqa"), fusion_done
    )
    summary["plot"] = str(plot_comparison(root_dir, summary))
    (root_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


COMMANDS = {
    "mha_to_dha": "convert an MHA run to DHA (head search, fusion, collapse) into a new run folder",
    "mha_to_gqa": "convert an MHA run to GQA (mean-pooled head groups) at the same KV budget",
    "continue": "continued pretraining of a converted run folder",
    "dha_vs_gqa": "the whole recipe: train MHA, convert both ways, continue both at a matched budget, plot "
    "(extra key=value: train.py overrides)",
}


def build_parser():
    from training.tool_args import add_dataclass_options, tool_parser

    parser = tool_parser("python -m recipes.dha.convert", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text, formatter_class=parser.formatter_class)
        if name == "continue":
            sub.add_argument("--run", required=True, help="the converted run folder")
            sub.add_argument("--steps", type=int, default=0, help="trainer.max_steps to continue to (0: the run's own)")
        else:
            add_dataclass_options(sub, RecipeOptions if name == "dha_vs_gqa" else ConvertOptions)
    return parser


def main(argv: list[str] | None = None) -> None:
    from training.tool_args import dataclass_from, parse

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # sub-command options are declared on the sub-parser: read them there, key=value included
    command = argv[0] if argv and argv[0] in COMMANDS else None
    sub = parser._subparsers._group_actions[0].choices[command] if command else None
    if sub is None:
        parser.parse_args(argv)  # prints usage / --help and exits
        return
    if command == "dha_vs_gqa":
        args, overrides = parse(sub, argv[1:], overrides=True)
    else:
        args, overrides = parse(sub, argv[1:]), []
    if command == "continue":
        print(json.dumps(continue_training(args.run, args.steps), indent=1))
    elif command == "dha_vs_gqa":
        summary = dha_vs_gqa(dataclass_from(args, RecipeOptions), overrides)
        print(
            json.dumps(
                {k: v for k, v in summary.items() if k not in ("dha", "gqa")}
                | {m: {k: v for k, v in summary[m].items() if k != "curve"} for m in ("dha", "gqa")},
                indent=1,
            )
        )
    else:
        report = (mha_to_dha if command == "mha_to_dha" else mha_to_gqa)(dataclass_from(args, ConvertOptions))
        print(json.dumps({k: v for k, v in report.items() if k not in ("similarity", "fusion_history")}, indent=1))


if __name__ == "__main__":
    from training.cli import report_errors

    with report_errors():
        main()
