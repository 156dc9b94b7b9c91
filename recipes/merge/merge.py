"""Merge MoE checkpoints fine-tuned from one base, then calibrate the routers with HARC.

    python -m recipes.merge.merge base=<run or .pt> sources=<run A>,<run B> out=<folder> [key=value ...]

Stage 1 merges every weight with a dense method on the task vectors τ_i = θ_i − θ_base:
``method=task_arithmetic`` (θ = θ_base + λ·Σ_i τ_i; Ilharco et al. 2023) or ``method=ties`` (per
tensor: keep the ``density`` fraction of each τ_i with the largest magnitude, elect each entry's
sign as the sign of Σ_i trimmed τ_i, average the trimmed entries that agree with it, θ = θ_base + λ·τ;
Yadav et al. 2023). ``scale`` is λ (default: 1/n_sources for task arithmetic, i.e. the average of
the fine-tuned models; 1 for TIES, whose disjoint mean is already an average). The routers are
merged the same way, which is the "plain merge" whose routing HARC repairs.

Stage 2 (``harc=true``, default) recomputes every router, layer by layer, with HARC
(``recipes.merge.harc``, METHODS.md §8.4) on ``calib_batches`` training batches of each source's own
data (the ``data`` config saved in its checkpoint). Options: ``harc.damping`` (γ, 1.0),
``harc.init`` (origin | average | zero; origin = the plainly merged router), ``harc.preconditioner``
(none | diagonal | kronecker), ``harc.max_iter`` (100), ``harc.tol`` (1e-6).

Report (printed and written to ``<out>/merge_report.json``): each task's validation loss for the
base, every source, the plain merge and the calibrated merge, and per-layer routing agreement
(mean shared fraction of a token's top-k experts) between the merged model and each source model
on that source's validation data, before and after calibration, and each model's budget
(``merge_budget``: training steps, tokens and FLOPs behind it, plus HARC's calibration forward passes).
``<out>/plain`` and ``<out>/harc``
are run folders holding the merged weights (``python -m training.eval.sample <out>/harc`` reads them).
Other options: ``batch_size`` (8), ``eval_batches`` (20), ``seed`` (0), ``device`` (cpu).

Legend: a state dict maps names to tensors; τ a task vector (fine-tuned − base) of one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from recipes.merge.harc import HARCOptions, calibrate_routers, moe_layers, routing_agreement, routing_ids
from training.checkpoint import files as ckpt

METHODS = ("task_arithmetic", "ties")


# ---------------------------------------------------------------------------------- stage 1


def ties_delta(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of the task vectors of one tensor: trim to the top ``density`` magnitudes, elect signs,
    disjoint mean."""
    trimmed = []
    for tau in deltas:
        keep = max(1, int(round(density * tau.numel())))
        threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    sources: list[dict[str, torch.Tensor]],
    method: Literal["task_arithmetic", "ties"] = "ties",
    scale: float | None = None,
    density: float = 0.2,
) -> dict[str, torch.Tensor]:
    """θ_base + λ·merge(τ_1 … τ_n) for every floating-point tensor; other entries are copied from the base."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {list(METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density={density} must be in (0, 1]")
    for i, source in enumerate(sources):
        if source.keys() != base.keys() or any(source[k].shape != base[k].shape for k in base):
            raise ValueError(f"source {i} has different tensors from the base; merging needs models fine-tuned from it")
    if scale is None:
        scale = 1.0 / len(sources) if method == "task_arithmetic" else 1.0
    merged = {}
    for key, theta in base.items():
        if not theta.is_floating_point():
            merged[key] = theta.clone()
            continue
        deltas = [s[key].float() - theta.float() for s in sources]
        delta = sum(deltas) if method == "task_arithmetic" else ties_delta(deltas, density)
        merged[key] = (theta.float() + scale * delta).to(theta.dtype)
    return merged


# ---------------------------------------------------------------------------------- the command


def _load_model(target: str | Path, device):
    from training.eval.loss import load_trained

    model, data, root, path = load_trained(target, device, with_train=True)
    state = ckpt.load_checkpoint(path)  # the one verified loader (again: config, step and, for .pt files, weights)
    if "model" not in state:  # a sharded folder: its weights are those load_trained just read into the model
        state["model"] = model.state_dict()
    return model, data, root, state


def _run_folder(target: str | Path) -> Path | None:
    """The run folder behind a checkpoint argument (a folder, or a file in its ``checkpoints/``), if it logged."""
    path = Path(target)
    folder = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    return folder if folder is not None and (folder / "metrics.jsonl").exists() else None


def _trained_budget(target: str | Path, step: int) -> dict:
    """Steps, tokens and training FLOPs up to checkpoint ``step`` of a run (its metrics.jsonl), or unknown.

    A fine-tune resumed from the base checkpoint logs from there on; its FLOPs up to ``step`` count the base
    steps at its first logged rate (training.eval.run_folders.Run.cumulative_flops), i.e. base + fine-tune.
    """
    from training.eval.run_folders import load_run

    folder = _run_folder(target)
    if folder is None:
        return {"steps": step, "tokens": None, "train_flops": None, "source": "no metrics.jsonl"}
    run = load_run(folder)
    return {"steps": step, "tokens": step * run.tokens_per_step, "train_flops": run.cumulative_flops(step)}


def merge_budget(base: dict, sources: list[dict], calibration_tokens: int, calibration_flops: float) -> dict:
    """Each model's budget: the base, every source (base + its fine-tune), the plain merge (the base plus every
    fine-tune; the merge itself is elementwise and not counted) and the HARC merge (that + its calibration).

    ``base``/``sources``: ``_trained_budget`` rows. Calibration: forward passes only (no optimizer step);
    the conjugate-gradient solves are not counted.
    """

    def plus(a, b):
        return None if a is None or b is None else a + b

    merged = dict(base)
    for source in sources:
        for key in ("steps", "tokens", "train_flops"):  # add each fine-tune's part beyond the base
            extra = None if source[key] is None or base[key] is None else source[key] - base[key]
            merged[key] = plus(merged[key], extra)
    budget = {"base": base, **{f"source{i}": s for i, s in enumerate(sources)}}
    budget["plain_merge"] = {**merged, "calibration_tokens": 0, "calibration_flops": 0.0}
    budget["harc_merge"] = {
        **merged,
        "calibration_tokens": calibration_tokens,
        "calibration_flops": calibration_flops,
        "total_flops": plus(merged["train_flops"], calibration_flops),
    }
    return budget


def _task_eval(model, tasks, batch_size: int, eval_batches: int, device) -> list[float]:
    from training.eval.loss import evaluate_loss

    return [
        evaluate_loss(model, data, root.data.seq_len, batch_size, eval_batches, device)["val_loss"]
        for data, root in tasks
    ]


def _val_batches(data, seq_len: int, batch_size: int, eval_batches: int) -> list[torch.Tensor]:
    from training.data.windows import iter_eval_batches

    return [x for x, _ in iter_eval_batches(data.val, data.val_mask, seq_len, batch_size, eval_batches)]


def _save(folder: Path, model, config: dict, step: int, note: dict) -> None:
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(folder, step, {"model": model.state_dict(), "config": config, "merge": note}, keep_last=1)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))


def run(
    base: str,
    sources: list[str],
    out: str,
    method: str = "ties",
    scale: float | None = None,
    density: float = 0.2,
    harc: bool = True,
    harc_options: HARCOptions | None = None,
    calib_batches: int = 8,
    batch_size: int = 8,
    eval_batches: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Merge, evaluate, calibrate, evaluate again; returns (and writes) the report."""
    from training.build import build_model
    from training.config import validate
    from training.data.windows import WindowSampler

    out_dir = Path(out)
    base_model, _, base_root, base_state = _load_model(base, device)
    loaded = [_load_model(s, device) for s in sources]
    for (_, _, _, state), name in zip(loaded, sources):
        ckpt.check_model_config(state, base_state["config"]["model"], name)
    tasks = [(data, root) for _, data, root, _ in loaded]
    source_models = [model for model, *_ in loaded]

    merged_sd = merge_state_dicts(base_state["model"], [state["model"] for *_, state in loaded], method, scale, density)
    merged = build_model(validate(loaded[0][3]["config"]), 0).to(device)
    merged.load_state_dict(merged_sd)
    merged.eval()

    val = [_val_batches(data, root.data.seq_len, batch_size, eval_batches) for data, root in tasks]
    source_ids = [routing_ids(m, batches, device) for m, batches in zip(source_models, val)]
    losses = {
        "base": _task_eval(base_model, tasks, batch_size, eval_batches, device),
        **{f"source{i}": _task_eval(m, tasks, batch_size, eval_batches, device) for i, m in enumerate(source_models)},
        "plain_merge": _task_eval(merged, tasks, batch_size, eval_batches, device),
    }
    agreement = {
        "plain_merge": [routing_agreement(routing_ids(merged, b, device), ids) for b, ids in zip(val, source_ids)]
    }
    config, step = loaded[0][3]["config"], loaded[0][3]["step"]
    note = {
        "base": str(base),
        "sources": [str(s) for s in sources],
        "method": method,
        "scale": scale,
        "density": density,
    }
    _save(out_dir / "plain", merged, config, step, note)

    report = {**note, "tasks": [root.data.name for _, root in tasks]}
    calibration_tokens, calibration_flops = 0, 0.0
    if harc:
        options = harc_options or HARCOptions()
        calibration = []
        for data, root in tasks:  # fixed training windows of each source domain
            sampler = WindowSampler(
                data.train, data.train_mask, root.data.seq_len, batch_size, seed, align=data.window_align
            )
            calibration.append([sampler.get_batch(i)[0] for i in range(calib_batches)])
        from training.accounting.account import account

        calibration_tokens = sum(x.numel() for batches in calibration for x in batches)
        # router_inputs runs the whole merged model once per MoE layer it calibrates
        forward_per_token = account(merged, base_root.data.seq_len).forward_flops_per_token
        calibration_flops = len(moe_layers(merged)) * calibration_tokens * forward_per_token
        report["harc_options"] = vars(options)
        report["harc_solver"] = calibrate_routers(merged, source_models, calibration, options, device)
        losses["harc_merge"] = _task_eval(merged, tasks, batch_size, eval_batches, device)
        agreement["harc_merge"] = [
            routing_agreement(routing_ids(merged, b, device), ids) for b, ids in zip(val, source_ids)
        ]
        _save(out_dir / "harc", merged, config, step, {**note, "harc": vars(options)})
    base_budget = _trained_budget(base, base_state["step"])
    budget = merge_budget(
        base_budget,
        [_trained_budget(s, st["step"]) for s, (*_, st) in zip(sources, loaded)],
        calibration_tokens,
        calibration_flops,
    )
    if not harc:
        budget.pop("harc_merge")
    report.update(losses=losses, routing_agreement=agreement, budget=budget)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "merge_report.json").write_text(json.dumps(report, indent=1))
    _print_report(report)
    return report


def _print_report(report: dict) -> None:
    tasks = report["tasks"]
    print(f"\nper-task val loss (answers only for synthetic tasks); merge={report['method']}")
    print(f"{'model':<14}" + "".join(f"{t:>16}" for t in tasks))
    for name, values in report["losses"].items():
        print(f"{name:<14}" + "".join(f"{v:>16.4f}" for v in values))
    print("\nbudget: training steps, tokens and FLOPs behind each model (HARC: + calibration forward passes)")
    for name, b in report.get("budget", {}).items():
        tokens = "?" if b["tokens"] is None else f"{b['tokens']:,}"
        flops = "?" if b["train_flops"] is None else f"{b['train_flops']:.3e}"
        extra = (
            f", calibration {b['calibration_tokens']:,} tokens {b['calibration_flops']:.3e} FLOPs"
            if (b.get("calibration_tokens"))
            else ""
        )
        print(f"{name:<14}{b['steps']:>8} steps  {tokens:>12} tokens  {flops} train FLOPs{extra}")
    print("\nrouting agreement with each source on its own task, per layer")
    for name, per_task in report["routing_agreement"].items():
        for task, layers in zip(tasks, per_task):
            print(f"{name:<14}{task:>16}  " + " ".join(f"{a:.3f}" for a in layers))


def build_parser():
    from training.tool_args import parse_bool, tool_parser

    parser = tool_parser("python -m recipes.merge.merge", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", required=True, help="the base run folder or checkpoint the sources were fine-tuned from"
    )
    parser.add_argument("--sources", required=True, help="comma-separated fine-tuned run folders or checkpoints")
    parser.add_argument("--out", required=True, help="output folder (plain/, harc/, merge_report.json)")
    parser.add_argument(
        "--method", default="ties", choices=["ties", "task_arithmetic"], help="dense merge of the task vectors"
    )
    parser.add_argument(
        "--scale", type=float, default=None, help="λ (default: 1/n_sources for task_arithmetic, 1 for ties)"
    )
    parser.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    parser.add_argument("--harc", type=parse_bool, default=True, help="calibrate the routers with HARC after merging")
    parser.add_argument("--calib_batches", type=int, default=8, help="HARC calibration batches per source")
    parser.add_argument("--batch_size", type=int, default=8, help="batch size of calibration and evaluation")
    parser.add_argument("--eval_batches", type=int, default=20, help="validation batches per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration batches")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    defaults = HARCOptions()
    for name, value in vars(defaults).items():
        parser.add_argument(
            f"--harc.{name}", dest=f"harc.{name}", type=type(value), default=value, help=f"HARC option {name}"
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    from training.cli import report_errors
    from training.config import ConfigError
    from training.tool_args import parse

    with report_errors():
        args = vars(parse(build_parser(), argv))
        harc_options = {k.split(".", 1)[1]: args.pop(k) for k in list(args) if k.startswith("harc.")}
        try:
            options = HARCOptions(**harc_options)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        base, sources, out = args.pop("base"), args.pop("sources").split(","), args.pop("out")
        run(base, sources, out, harc_options=options, **args)


if __name__ == "__main__":
    main()
