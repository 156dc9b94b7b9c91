"""REPORT.md for ``recipes.reproduce.suite``: per-seed metrics from the run folders, the verdict rule, the tables.

Metrics are named ``variant:metric[:args]`` in the checks of ``recipes.reproduce.suite.METHODS``:
  final                 final val loss of the run (its last eval, at max_steps)
  topk:K                val loss at inference top-k' = K (evaluate.py analysis=elastic → eval/elastic.csv)
  topk_drop:K0:K1       topk:K1 − topk:K0 of the same run (how much the loss moves when k changes)
  depth:R               val loss at R test-time iterations (evaluate.py analysis=depth → eval/depth.csv)
  iso_flops:REF         val loss interpolated (linearly, between evals) at the training FLOPs REF's run of the
                        same seed spent in total: a per-FLOP comparison for methods that cost more per step
                        (biased against the costlier arm: its learning rate has not decayed yet at that point)
  converted             DHA/GQA: val loss right after conversion (summary.json of recipes.dha.convert dha_vs_gqa)
  at_fusion_budget      GQA: val loss after as many CPT steps as DHA spent on fusion (the budget-matched "converted")
  sampler:KEY           recipes.reproduce.sampler's sampler.json (passes / ms per token, NLL, for both samplers)
  merge_loss            HARC: mean over the two tasks of the merged model's val loss (merge_report.json)
  merge_agreement       HARC: mean routing agreement with the fine-tunes over tasks and layers
"""

from __future__ import annotations

import csv
import json
import math
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
from training.eval import report
from training.eval.run_folders import Run, load_run

METRIC_LEGEND = (
    "`final` = the run's final val loss; `topk:K` = val loss at inference top-k' = K and `topk_drop:K0:K1` = "
    "topk:K1 − topk:K0 of the same run (evaluate.py analysis=elastic); `depth:R` = val loss at R test-time iterations "
    "(evaluate.py analysis=depth); `iso_flops:REF` = val loss interpolated between evals at the training FLOPs that "
    "REF's run of the same seed spent in total (a per-FLOP comparison; it favours the cheaper arm, whose learning rate "
    "has decayed by then); `converted` = val loss right after the DHA/GQA conversion; `at_fusion_budget` = GQA's val "
    "loss "
    "after as many CPT steps as DHA's fusion took; `sampler:*` = the sampler job's numbers; `merge_loss` = mean over "
    "both "
    "tasks of the merged model's val loss, `merge_agreement` = its mean routing agreement with the fine-tunes."
)

VERDICT_RULE = (
    "Both arms of a check are trained from the same seed, so they see the same data order (and, for one model at two "
    "settings, are the same run). The rule works on the per-seed differences d_s = method_s − baseline_s, signed so "
    "that a negative Δ = mean(d) is the direction the paper claims (lower loss, or higher agreement): σ_d = their "
    "sample std, SE = σ_d/√n, and the one-sided test at 5% (the direction is fixed by the claim) uses t = t₀.₉₅(n−1) "
    "(2.92 for 3 seeds). **held** if Δ + t·SE < 0; **not held** if Δ − t·SE > 0; otherwise **inconclusive at this "
    "scale**. For a claim of 'no worse within a margin m': held if Δ + t·SE ≤ m, not held if Δ − t·SE > m. The "
    "'t·SE' column is that half-width. Fewer than two paired seeds: inconclusive."
)


# ----------------------------------------------------------------------------- per-seed metrics


def run_folder(runs: Path, variant: str, seed: int) -> Path:
    if variant in ("mha", "dha", "gqa"):
        return runs / "dha_vs_gqa" / f"seed{seed}" / variant
    return runs / VARIANTS[variant].folder / f"seed{seed}"


def _final(runs: Path, variant: str, seed: int) -> float | None:
    run = load_run(run_folder(runs, variant, seed))
    return run.eval_rows[-1]["val_loss"] if run.incomplete_reason is None else None


def _csv_loss(path: Path, dimension: str, value: str) -> float:
    """val_loss of one point of an evaluate.py sweep CSV (training.eval.sweep_table.SWEEP_COLUMNS)."""
    with open(path) as f:
        return next(
            float(r["val_loss"]) for r in csv.DictReader(f) if r["dimension"] == dimension and r["setting"] == value
        )


def _iso_flops(runs: Path, variant: str, seed: int, reference: str) -> float | None:
    run, ref = load_run(run_folder(runs, variant, seed)), load_run(run_folder(runs, reference, seed))
    if run.incomplete_reason or ref.incomplete_reason:
        return None
    target = ref.cumulative_flops(ref.eval_rows[-1]["step"])
    points = [(run.cumulative_flops(r["step"]), r["val_loss"]) for r in run.eval_rows]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= target <= f1:
            return l0 + (l1 - l0) * (target - f0) / (f1 - f0) if f1 > f0 else l1
    return None  # the method spent fewer FLOPs in total than the reference: no iso-FLOP point


def _merge_report(runs: Path, seed: int) -> dict:
    return json.loads((runs / "harc_merge" / f"seed{seed}" / "ties" / "merge_report.json").read_text())


def metric(runs: Path, arm: str, seed: int) -> float | None:
    """One arm's value for one seed, or None if its run is missing or unfinished."""
    variant, name, *args = arm.split(":")
    try:
        if name == "final":
            return _final(runs, variant, seed)
        if name == "topk":
            return _csv_loss(run_folder(runs, variant, seed) / "eval" / "elastic.csv", "top_k", args[0])
        if name == "topk_drop":
            path = run_folder(runs, variant, seed) / "eval" / "elastic.csv"
            return _csv_loss(path, "top_k", args[1]) - _csv_loss(path, "top_k", args[0])
        if name == "depth":
            return _csv_loss(run_folder(runs, variant, seed) / "eval" / "depth.csv", "iterations", args[0])
        if name == "iso_flops":
            return _iso_flops(runs, variant, seed, args[0])
        if name == "converted":
            return json.loads((runs / "dha_vs_gqa" / f"seed{seed}" / "summary.json").read_text())[variant][
                "val_loss_converted"
            ]
        if name == "at_fusion_budget":
            return json.loads((runs / "dha_vs_gqa" / f"seed{seed}" / "summary.json").read_text())[variant][
                "val_loss_at_fusion_budget"
            ]
        if name == "sampler":
            return float(
                json.loads((run_folder(runs, variant, seed) / "sampler" / "sampler.json").read_text())[args[0]]
            )
        if name == "merge_loss":
            return mean(_merge_report(runs, seed)["losses"][variant])
        if name == "merge_agreement":
            return mean(a for layers in _merge_report(runs, seed)["routing_agreement"][variant] for a in layers)
    except (FileNotFoundError, StopIteration, KeyError, json.JSONDecodeError):
        return None
    raise ValueError(f"unknown metric {name!r} in {arm!r}")


# ----------------------------------------------------------------------------- the verdict rule


def verdict(baseline: list[float | None], method: list[float | None], better: str, paired: bool = True) -> dict:
    """Apply VERDICT_RULE to per-seed values (index = seed; None = missing).

    ``paired=False`` (arms from unrelated seeds; none of the suite's checks) uses the Welch standard error
    √(s_b²/n_b + s_m²/n_m) with t at min(n_b, n_m) − 1 degrees of freedom instead of the per-seed differences.
    """
    b = [v for v in baseline if v is not None]
    m = [v for v in method if v is not None]
    pairs = [(x, y) for x, y in zip(baseline, method) if x is not None and y is not None]
    result = {
        "baseline": b,
        "method": m,
        "delta": None,
        "noise": None,
        "sigma_d": None,
        "n": len(pairs) if paired else min(len(b), len(m)),
        "verdict": "inconclusive at this scale",
    }
    if (paired and len(pairs) < 2) or len(b) < 2 or len(m) < 2:
        result["verdict"] = "inconclusive at this scale (fewer than 2 seeds)"
        return result
    sign = -1.0 if better == "higher" else 1.0
    if paired:
        diffs = [sign * (y - x) for x, y in pairs]
        delta, sigma_d = mean(diffs), stdev(diffs)
        se, t = sigma_d / math.sqrt(len(diffs)), power.critical(len(diffs))
    else:
        delta, sigma_d = sign * (mean(m) - mean(b)), None
        se, t = math.sqrt(stdev(b) ** 2 / len(b) + stdev(m) ** 2 / len(m)), power.critical(min(len(b), len(m)))
    half = t * se
    margin = float(better.split(":")[1]) if better.startswith("no_worse") else 0.0
    held = delta + half <= margin if better.startswith("no_worse") else delta + half < 0
    not_held = delta - half > margin
    result.update(
        delta=delta,
        noise=half,
        sigma_d=sigma_d,
        verdict="held" if held else "not held" if not_held else "inconclusive at this scale",
    )
    return result


def evaluate_check(runs: Path, check: Check, seeds: int) -> dict:
    values_b = [metric(runs, check.baseline, s) for s in range(seeds)]
    values_m = [metric(runs, check.method, s) for s in range(seeds)]
    # every check is paired: same seed → same data order (and the same run when the variant is the same)
    return verdict(values_b, values_m, check.better, paired=True)


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
                merge = _merge_report(runs, seed)["budget"][variant]
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
    """What the multi-stage methods run, in words (the commands are in recipes.reproduce.suite.plan)."""
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
