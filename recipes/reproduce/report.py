"""REPORT.md for ``recipes.reproduce.suite``: the summary, the power table and one section per method.

Each check's verdict comes from ``recipes.reproduce.metrics`` (per-seed metrics, the paired rule); this module
puts it in tables with both arms' mean ± std and budget (steps, tokens, training FLOPs), the power calculation
(``recipes.reproduce.power``) per check, each method's variants or pipeline recipe, and its runs by variant.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from statistics import mean, stdev

from recipes.reproduce import power
from recipes.reproduce.methods import (
    MERGE_BASE_STEPS_FACTOR,
    MERGE_FT_STEPS_FACTOR,
    VARIANTS,
    Check,
    Method,
    common_overrides,
)
from recipes.reproduce.metrics import METRIC_LEGEND, VERDICT_RULE, evaluate_check, merge_report, run_folder
from training.eval import report
from training.eval.run_folders import Run, load_run

# ----------------------------------------------------------------------------- REPORT.md


def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f} (n={len(values)})"


def _budget(runs: Path, arm: str, seeds: int) -> str:
    """Steps, tokens and training FLOPs behind one arm (mean over its seeds), for the tables beside the loss."""
    variant, name, *args = arm.split(":")
    rows = []
    for seed in range(seeds):
        try:
            if variant in ("dha", "gqa"):
                budget = json.loads((runs / "dha_vs_gqa" / f"seed{seed}" / "summary.json").read_text())[
                    "training_budget"
                ]
                arm, fusion = budget[variant], budget["dha"]["fusion_steps"]
                per_step_tokens, per_step_flops = (
                    arm["tokens"] / max(1, arm["steps"]),
                    (arm["train_flops"] - arm["fusion_flops"]) / max(1, arm["cpt_steps"]),
                )
                if name == "converted":  # DHA: after its fusion; GQA: after nothing
                    rows.append(
                        (fusion, fusion * per_step_tokens, arm["fusion_flops"]) if variant == "dha" else (0, 0, 0.0)
                    )
                elif name == "at_fusion_budget":  # GQA after as many CPT steps as DHA's fusion took
                    rows.append((fusion, fusion * per_step_tokens, fusion * per_step_flops))
                else:
                    rows.append((arm["steps"], arm["tokens"], arm["train_flops"]))
            elif variant in ("plain_merge", "harc_merge"):  # merge_report.json: base + fine-tunes (+ calibration)
                merge = merge_report(runs, seed)["budget"][variant]
                if merge["train_flops"] is not None:
                    rows.append((merge["steps"], merge["tokens"], merge.get("total_flops", merge["train_flops"])))
            elif variant in VARIANTS:
                run = load_run(run_folder(runs, variant, seed))
                if run.incomplete_reason is None:
                    summary = run.summary()
                    if name == "iso_flops":  # the arm is read at the reference run's FLOPs
                        ref = load_run(run_folder(runs, args[0], seed)).summary()
                        rows.append((None, None, ref["train_flops"]))
                    else:
                        rows.append((summary["steps"], summary["tokens_seen"], summary["train_flops"]))
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            continue
    if not rows:
        return "budget n/a"
    steps = [r[0] for r in rows if r[0] is not None]
    tokens = [r[1] for r in rows if r[1] is not None]
    flops = mean(r[2] for r in rows)
    parts = ([f"{mean(steps):.0f} steps", f"{mean(tokens) / 1e6:.2f}M tok"] if steps else ["iso-FLOP point"]) + [
        f"{flops:.2e} FLOPs"
    ]
    return ", ".join(parts)


def _check_row(check: Check, result: dict, runs: Path, seeds: int) -> str:
    delta = "" if result["delta"] is None else f"{result['delta']:+.4f}"
    noise = "" if result["noise"] is None else f"{result['noise']:.4f}"
    rule = check.better if check.better in ("lower", "higher") else f"no worse by > {check.better.split(':')[1]}"
    return (
        f"| {check.question} | `{check.baseline}` {_ms(result['baseline'])}<br>{_budget(runs, check.baseline, seeds)} "
        f"| `{check.method}` {_ms(result['method'])}<br>{_budget(runs, check.method, seeds)} "
        f"| {rule} | {delta} | {noise} | **{result['verdict']}** |"
    )


CHECK_HEADER = [
    "| check | baseline (budget) | method (budget) | claimed | Δ (signed) | t·SE | verdict |",
    "|---|---|---|---|---|---|---|",
]

POWER_HEADER = [
    "| method | check | effect δ | σ_d (100 steps, committed) | σ_d here | n | detectable here | steps needed (n "
    "seeds) "
    "| seeds needed at 100 steps |",
    "|---|---|---|---|---|---|---|---|---|",
]


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def power_row(method: Method, check: Check, result: dict, seeds: int, steps: int) -> str:
    row = power.check_power(check, seeds, steps, result.get("sigma_d"))
    effect = "no numeric claim" if check.effect <= 0 else f"{check.effect:g}"
    seeds_needed = row["seeds_required_at_100"] or ("> 64" if row["steps_required"] else "—")
    return (
        f"| {method.name} | {check.question} | {effect} | {_num(check.sigma_100, '.4f')} | "
        f"{_num(result.get('sigma_d'), '.4f')} "
        f"| {result.get('n') or seeds} | {_num(row['detectable'], '.4f')} | {_num(row['steps_required'], '.0f')} "
        f"| {seeds_needed} |"
    )


POWER_TEXT = (
    "Each check's claimed effect δ (`Check.effect` in recipes/reproduce/methods.py: the paper's number where it gives "
    "one, else an [ASSUMED] 1% of the loss, or the claim's own margin for 'no worse' checks), the σ of its per-seed "
    "differences measured by the committed 100-step, 3-seed small tier, and the σ measured here. 'Detectable here' = "
    "(t₀.₉₅(n−1) + t₀.₈₀(n−1))·σ_d/√n, the smallest true effect this run finds with 80% power; a check whose δ is "
    "below it cannot decide at this budget. 'Steps needed' assumes σ_d ∝ 1/√steps at a constant δ (seed noise "
    "averages over the training tokens; the paper's effect does not shrink): S = 100·((t₀.₉₅ + "
    "t₀.₈₀)·σ_d(100)/(δ√n))². "
    "'Seeds needed at 100 steps' keeps σ_d fixed. Both are planning numbers under that stated assumption "
    "(recipes/reproduce/power.py); this report's own σ_d column tests it."
)


def method_groups(runs: Path, method: Method, seeds: int) -> dict[str, list[Run]]:
    """The run folders behind a method, grouped by variant, for training.eval.report's table and plots."""
    if method.pipeline == "dha_vs_gqa":
        names = {"mha (source)": "mha", "dha (CPT after conversion)": "dha", "gqa (CPT after conversion)": "gqa"}
        folders = {label: [runs / "dha_vs_gqa" / f"seed{s}" / v for s in range(seeds)] for label, v in names.items()}
    elif method.pipeline == "merge":
        folders = {
            label: [runs / "harc_merge" / f"seed{s}" / v for s in range(seeds)]
            for label, v in (
                ("base (assoc_recall)", "base"),
                ("fine-tune recall", "recall"),
                ("fine-tune mod_add", "modadd"),
            )
        }
    else:
        folders = {v: [run_folder(runs, v, s) for s in range(seeds)] for v in method.variants}
    return {label: [load_run(f) for f in paths if f.exists()] for label, paths in folders.items()}


def pipeline_recipe(pipeline: str, steps: int) -> str:
    """What the multi-stage methods run, in words (the commands are in recipes.reproduce.plan.plan)."""
    if pipeline == "dha_vs_gqa":
        f = max(20, steps)
        return (
            f"**Recipe** (per seed k): `python -m recipes.dha.convert dha_vs_gqa run_dir=…/dha_vs_gqa/seed<k> "
            f"fusion_steps={f} <common overrides> seed=<k>`: the MHA model (`experiment=dha_vs_gqa`, 8 heads) "
            f"trains {steps} steps, is converted to DHA (head-similarity search + up to {f} fusion steps that train "
            "all "
            "weights) and to GQA (mean-pooled groups) at a 25% KV-head budget. **Matched budget:** DHA continues "
            f"{steps} "
            f"CPT steps, GQA {steps} + F (F = the fusion steps DHA took), so both arms get the same post-MHA steps and "
            "tokens; FLOPs differ only by the MHA-width cost of the fusion steps (each arm's budget is in the table)."
        )
    if pipeline == "sampler":
        return (
            "**Sampler job** (per seed k, after the recurrent run): `python -m recipes.reproduce.sampler ckpt=<run> "
            "out=<run>/sampler`: greedy decoding of 4 validation prompts × 32 tokens at 16 test-time iterations "
            "(4·r̄) with "
            "the sequential sampler (KV cache, 16 core iterations per token) and the parallel sampler "
            "(arch.depth.sampler, "
            "code defaults: inner_recurrence 4, exit threshold 0.03); it counts sequential core passes per generated "
            "token, wall time per token, the token agreement between the two, and the NLL of each continuation under "
            "the model at 16 iterations. No training beyond the recurrent run."
        )
    base, ft = MERGE_BASE_STEPS_FACTOR * steps, MERGE_FT_STEPS_FACTOR * steps
    return (
        f"**Recipe** (per seed k): `experiment=merge_base` trains {base} steps on associative recall; "
        f"`experiment=merge_ft_recall` and `experiment=merge_ft_modadd` each continue its last checkpoint {ft} steps; "
        "`python -m recipes.merge.merge base=… sources=recall,modadd method=ties` merges them (plain TIES merge), then "
        "calibrates the routers with HARC; both are evaluated on each task's validation answers. **Budget:** both arms "
        "are the same merged weights (same base and fine-tune steps); HARC adds no training, only forward passes on "
        "calibration batches."
    )


def write_suite_report(
    methods: list[Method],
    seeds: int,
    steps: int,
    failed: list[str],
    runs: Path,
    results: Path,
    *,
    steps_by_method: dict[str, int] | None = None,
    scale: str = "small",
    estimate_s: float | None = None,
) -> Path:
    """REPORT.md: header, verdict rule, summary, power calculation, one section per method (budgets beside losses)."""
    import torch

    results.mkdir(parents=True, exist_ok=True)
    summary = [
        "| method | steps | check | baseline (budget) | method (budget) | Δ | t·SE | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    power_rows, sections, counts = [*POWER_HEADER], [], {"held": 0, "not held": 0, "inconclusive": 0}
    for method in methods:
        m_steps = (steps_by_method or {}).get(method.name, steps)
        m_runs = runs / f"steps{m_steps}" if steps_by_method else runs
        check_results = [(c, evaluate_check(m_runs, c, seeds)) for c in method.checks]
        for check, result in check_results:
            delta = "" if result["delta"] is None else f"{result['delta']:+.4f}"
            noise = "" if result["noise"] is None else f"{result['noise']:.4f}"
            counts["inconclusive" if result["verdict"].startswith("inconclusive") else result["verdict"]] += 1
            summary.append(
                f"| {method.name} | {m_steps} | {check.question} | "
                f"{_ms(result['baseline'])}<br>{_budget(m_runs, check.baseline, seeds)} "
                f"| {_ms(result['method'])}<br>{_budget(m_runs, check.method, seeds)} | {delta} | {noise} | "
                f"**{result['verdict']}** |"
            )
            power_rows.append(power_row(method, check, result, seeds, m_steps))
        groups = {k: v for k, v in method_groups(m_runs, method, seeds).items() if v}
        section = [
            f"## {method.name}",
            "",
            f"**Claim.** {method.claim}",
            "",
            f"**Budget.** {m_steps} optimizer steps per training "
            f"run, {seeds} seeds; every arm's steps, tokens and training FLOPs stand beside its loss below.",
            "",
        ]
        if method.variants:
            section += ["**Variants** (each run also gets the common overrides below):", ""]
            section += [
                f"- `{v}`: `{' '.join(VARIANTS[v].overrides)}`"
                + (" + SGT schedule scaled" if VARIANTS[v].sgt else "")
                + (f"; then `evaluate.py {' '.join(VARIANTS[v].evaluate)}`" if VARIANTS[v].evaluate else "")
                for v in method.variants
            ]
            section.append("")
        if method.pipeline:
            section += [pipeline_recipe(method.pipeline, m_steps), ""]
        section += [*CHECK_HEADER, *(_check_row(c, r, m_runs, seeds) for c, r in check_results), ""]
        if groups:
            out = results / method.name
            rows = report.write_report(groups, out, title=f"{method.name}: runs by variant")["rows"]
            section += [
                "Runs by variant (training.eval.report; train FLOPs as logged, flops_per_token × tokens):",
                "",
                report.markdown_table(rows),
                "",
                f"![val loss vs steps]({method.name}/val_loss_vs_steps.png) ![val loss vs "
                f"FLOPs]({method.name}/val_loss_vs_flops.png)",
                "",
            ]
        sections.append("\n".join(section))
    device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    timing = runs / "suite_time.json"
    wall = json.loads(timing.read_text()) if timing.exists() else None
    wall_text = (
        f"Wall time of the last suite run: {wall['wall_s'] / 60:.1f} min ({wall['jobs_run']} jobs, finished "
        f"{wall['finished']})."
        if wall
        else ""
    )
    estimate_text = (
        f" The suite's estimator puts this tier at {estimate_s / 60:.0f} min on an idle 2-core CPU."
        if estimate_s
        else ""
    )
    steps_text = (
        (
            ", ".join(f"{k} {v}" for k, v in steps_by_method.items()) + " optimizer steps per training run (chosen by "
            "the power calculation below, cut to fit 2 h)"
        )
        if steps_by_method
        else f"{steps} optimizer steps per training run"
    )
    total = sum(counts.values())
    all_steps = sorted(set(steps_by_method.values())) if steps_by_method else [steps]
    low, high = all_steps[0], all_steps[-1]
    tokens_text = (
        f"≈{steps * 4096 / 1e6:.2f}M in {steps} steps"
        if low == high
        else f"≈{low * 4096 / 1e6:.2f}–{high * 4096 / 1e6:.2f}M in {low}–{high} steps"
    )
    header = [
        f"# Reproduction report ({scale} tier)",
        "",
        f"Generated by `python -m recipes.reproduce.suite --scale {scale}` on {time.strftime('%Y-%m-%d %H:%M')}: "
        f"{steps_text} "
        f"(presets: 300–1000), {seeds} seeds (0..{seeds - 1}), {device}, one thread per run, two runs at a time. "
        f"{wall_text}{estimate_text} Tiny scale (Shakespeare runs see 16 × 256 = 4096 training tokens per step, "
        f"{tokens_text}): a verdict says whether the claim shows up at this scale, not "
        "whether the paper is right.",
        "",
        f"Verdicts: {counts['held']} held, {counts['not held']} not held, {counts['inconclusive']} inconclusive of "
        f"{total} checks.",
        "",
        f"Common overrides (at {high} steps; `trainer.max_steps` etc. scale with each method's steps): "
        f"`{' '.join(common_overrides(high))}`.",
        "",
        "## Verdict rule",
        "",
        VERDICT_RULE,
        "",
        "Arms are written `variant:metric`: " + METRIC_LEGEND,
        "",
        "## Summary",
        "",
        *summary,
        "",
        "## Power calculation",
        "",
        POWER_TEXT,
        "",
        *power_rows,
        "",
    ]
    if failed:
        header += [
            "## Failed jobs",
            "",
            *(f"- `{name}` (log: `{runs.name}/logs/{name.replace('/', '__')}.log`)" for name in failed),
            "",
        ]
    path = results / "REPORT.md"
    path.write_text("\n".join(header + sections) + "\n")
    return path
