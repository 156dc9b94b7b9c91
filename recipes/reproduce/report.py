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

from recipes.reproduce.methods import MERGE_BASE_STEPS_FACTOR, MERGE_FT_STEPS_FACTOR, VARIANTS, Check, Method, common_overrides
from training.eval import report

METRIC_LEGEND = (
    "`final` = the run's final val loss; `topk:K` = val loss at inference top-k' = K and `topk_drop:K0:K1` = "
    "topk:K1 − topk:K0 of the same run (evaluate.py analysis=elastic); `depth:R` = val loss at R test-time iterations "
    "(evaluate.py analysis=depth); `iso_flops:REF` = val loss interpolated between evals at the training FLOPs that "
    "REF's run of the same seed spent in total (a per-FLOP comparison; it favours the cheaper arm, whose learning rate "
    "has decayed by then); `converted` = val loss right after the DHA/GQA conversion; `merge_loss` = mean over both "
    "tasks of the merged model's val loss, `merge_agreement` = its mean routing agreement with the fine-tunes."
)

VERDICT_RULE = (
    "Δ = mean(method) − mean(baseline) over seeds, signed so that a negative Δ is the direction the paper claims "
    "(lower loss, or higher agreement). Noise σ = pooled sample std of the two arms, √((s_b² + s_m²)/2); when both "
    "arms are measured on the same runs of a seed (one model at two k'; the DHA and GQA conversions of one MHA model; "
    "the plain and calibrated versions of one merge), σ = std of the per-seed differences / √2. "
    "**held** if Δ < −2σ; **not held** if Δ > +2σ; otherwise **inconclusive at this scale**. For a claim of "
    "'no worse within a margin m': held if Δ + 2σ ≤ m, not held if Δ − 2σ > m, else inconclusive. Fewer than two "
    "seeds per arm: inconclusive."
)


# ----------------------------------------------------------------------------- per-seed metrics

def run_folder(runs: Path, variant: str, seed: int) -> Path:
    if variant in ("mha", "dha", "gqa"):
        return runs / "dha_vs_gqa" / f"seed{seed}" / variant
    return runs / VARIANTS[variant].folder / f"seed{seed}"


def _final(runs: Path, variant: str, seed: int) -> float | None:
    run = report.load_run(run_folder(runs, variant, seed))
    return run.eval_rows[-1]["val_loss"] if run.incomplete_reason is None else None


def _csv_loss(path: Path, dimension: str, value: str) -> float:
    with open(path) as f:
        return next(float(r["val_loss"]) for r in csv.DictReader(f) if r["dimension"] == dimension and r["value"] == value)


def _iso_flops(runs: Path, variant: str, seed: int, reference: str) -> float | None:
    run, ref = report.load_run(run_folder(runs, variant, seed)), report.load_run(run_folder(runs, reference, seed))
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
            return json.loads((runs / "dha_vs_gqa" / f"seed{seed}" / "summary.json").read_text())[variant]["val_loss_converted"]
        if name == "merge_loss":
            return mean(_merge_report(runs, seed)["losses"][variant])
        if name == "merge_agreement":
            return mean(a for layers in _merge_report(runs, seed)["routing_agreement"][variant] for a in layers)
    except (FileNotFoundError, StopIteration, KeyError, json.JSONDecodeError):
        return None
    raise ValueError(f"unknown metric {name!r} in {arm!r}")


# ----------------------------------------------------------------------------- the verdict rule

def verdict(baseline: list[float | None], method: list[float | None], better: str, paired: bool) -> dict:
    """Apply VERDICT_RULE to per-seed values (index = seed; None = missing)."""
    b = [v for v in baseline if v is not None]
    m = [v for v in method if v is not None]
    result = {"baseline": b, "method": m, "delta": None, "noise": None, "verdict": "inconclusive at this scale"}
    if len(b) < 2 or len(m) < 2:
        result["verdict"] = "inconclusive at this scale (fewer than 2 seeds)"
        return result
    sign = -1.0 if better == "higher" else 1.0
    delta = sign * (mean(m) - mean(b))
    pairs = [(x, y) for x, y in zip(baseline, method) if x is not None and y is not None]
    if paired and len(pairs) >= 2:
        noise = stdev([y - x for x, y in pairs]) / math.sqrt(2)
    else:
        noise = math.sqrt((stdev(b) ** 2 + stdev(m) ** 2) / 2)
    margin = float(better.split(":")[1]) if better.startswith("no_worse") else 0.0
    if better.startswith("no_worse"):
        held, not_held = delta + 2 * noise <= margin, delta - 2 * noise > margin
    else:
        held, not_held = delta < -2 * noise, delta > 2 * noise
    result.update(delta=delta, noise=noise, verdict="held" if held else "not held" if not_held else "inconclusive at this scale")
    return result


def evaluate_check(runs: Path, check: Check, seeds: int) -> dict:
    base_variant, method_variant = check.baseline.split(":")[0], check.method.split(":")[0]
    values_b = [metric(runs, check.baseline, s) for s in range(seeds)]
    values_m = [metric(runs, check.method, s) for s in range(seeds)]
    return verdict(values_b, values_m, check.better, paired=check.paired or base_variant == method_variant)


# ----------------------------------------------------------------------------- REPORT.md

def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f} (n={len(values)})"


def _check_row(check: Check, result: dict) -> str:
    delta = "" if result["delta"] is None else f"{result['delta']:+.4f}"
    noise = "" if result["noise"] is None else f"{2 * result['noise']:.4f}"
    rule = check.better if check.better in ("lower", "higher") else f"no worse by > {check.better.split(':')[1]}"
    return (f"| {check.question} | `{check.baseline}` {_ms(result['baseline'])} | `{check.method}` {_ms(result['method'])} "
            f"| {rule} | {delta} | {noise} | **{result['verdict']}** |")


CHECK_HEADER = ["| check | baseline | method | claimed | Δ (signed) | 2σ | verdict |", "|---|---|---|---|---|---|---|"]


def method_groups(runs: Path, method: Method, seeds: int) -> dict[str, list[report.Run]]:
    """The run folders behind a method, grouped by variant, for training.eval.report's table and plots."""
    if method.pipeline == "dha_vs_gqa":
        names = {"mha (source)": "mha", "dha (CPT after conversion)": "dha", "gqa (CPT after conversion)": "gqa"}
        folders = {label: [runs / "dha_vs_gqa" / f"seed{s}" / v for s in range(seeds)] for label, v in names.items()}
    elif method.pipeline == "merge":
        folders = {label: [runs / "harc_merge" / f"seed{s}" / v for s in range(seeds)]
                   for label, v in (("base (assoc_recall)", "base"), ("fine-tune recall", "recall"), ("fine-tune mod_add", "modadd"))}
    else:
        folders = {v: [run_folder(runs, v, s) for s in range(seeds)] for v in method.variants}
    return {label: [report.load_run(f) for f in paths if f.exists()] for label, paths in folders.items()}


def pipeline_recipe(pipeline: str, steps: int) -> str:
    """What the multi-stage methods run, in words (the commands are in recipes.reproduce.suite.plan)."""
    if pipeline == "dha_vs_gqa":
        return (f"**Recipe** (per seed k): `python -m recipes.dha.convert dha_vs_gqa run_dir=runs/reproduce/dha_vs_gqa/seed<k> "
                f"fusion_steps={max(20, steps)} <common overrides> seed=<k>`: the MHA model (`experiment=dha_vs_gqa`, 8 heads) "
                f"trains {steps} steps, is converted to DHA (head-similarity search + fusion) and to GQA (mean-pooled groups) "
                f"at a 25% KV-head budget, and each conversion continues {steps} steps.")
    base, ft = MERGE_BASE_STEPS_FACTOR * steps, MERGE_FT_STEPS_FACTOR * steps
    return (f"**Recipe** (per seed k): `experiment=merge_base` trains {base} steps on associative recall; "
            f"`experiment=merge_ft_recall` and `experiment=merge_ft_modadd` each continue its last checkpoint {ft} steps; "
            "`python -m recipes.merge.merge base=… sources=recall,modadd method=ties` merges them (plain TIES merge), then "
            "calibrates the routers with HARC; both are evaluated on each task's validation answers.")


def write_suite_report(methods: list[Method], seeds: int, steps: int, failed: list[str], runs: Path, results: Path) -> Path:
    import torch

    results.mkdir(parents=True, exist_ok=True)
    summary = ["| method | check | baseline | method | Δ | 2σ | verdict |", "|---|---|---|---|---|---|---|"]
    sections = []
    for method in methods:
        check_results = [(c, evaluate_check(runs, c, seeds)) for c in method.checks]
        for check, result in check_results:
            delta = "" if result["delta"] is None else f"{result['delta']:+.4f}"
            noise = "" if result["noise"] is None else f"{2 * result['noise']:.4f}"
            summary.append(f"| {method.name} | {check.question} | {_ms(result['baseline'])} | {_ms(result['method'])} "
                           f"| {delta} | {noise} | **{result['verdict']}** |")
        groups = {k: v for k, v in method_groups(runs, method, seeds).items() if v}
        section = [f"## {method.name}", "", f"**Claim.** {method.claim}", ""]
        if method.variants:
            section += ["**Variants** (each run also gets the common overrides below):", ""]
            section += [f"- `{v}`: `{' '.join(VARIANTS[v].overrides)}`" + (" + SGT schedule scaled" if VARIANTS[v].sgt else "")
                        + (f"; then `evaluate.py {' '.join(VARIANTS[v].evaluate)}`" if VARIANTS[v].evaluate else "")
                        for v in method.variants]
            section.append("")
        if method.pipeline:
            section += [pipeline_recipe(method.pipeline, steps), ""]
        section += [*CHECK_HEADER, *(_check_row(c, r) for c, r in check_results), ""]
        if groups:
            out = results / method.name
            rows = report.write_report(groups, out, title=f"{method.name}: runs by variant")["rows"]
            section += ["Runs by variant (training.eval.report: same steps and tokens per arm; FLOPs as logged):", "",
                        report.markdown_table(rows), "",
                        f"![val loss vs steps]({method.name}/val_loss_vs_steps.png) ![val loss vs FLOPs]({method.name}/val_loss_vs_flops.png)", ""]
        sections.append("\n".join(section))
    device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    timing = runs / "suite_time.json"
    wall = json.loads(timing.read_text()) if timing.exists() else None
    wall_text = (f"Wall time of the last suite run: {wall['wall_s'] / 60:.1f} min ({wall['jobs_run']} jobs, finished "
                 f"{wall['finished']})." if wall else "")
    header = [
        "# Reproduction report", "",
        f"Generated by `python -m recipes.reproduce.suite` on {time.strftime('%Y-%m-%d %H:%M')}: {steps} optimizer steps per "
        f"training run (presets: 300–1000), {seeds} seeds (0..{seeds - 1}), {device}, one thread per run, two runs at a time. "
        f"{wall_text} The numbers are tiny-scale (≈{steps * 16 * 256 / 1e6:.1f}M "
        "training tokens per Shakespeare run): a verdict says whether the claim shows up at this scale, not whether the "
        "paper is right.", "",
        f"Common overrides: `{' '.join(common_overrides(steps))}`.", "",
        "## Verdict rule", "", VERDICT_RULE, "",
        "Arms are written `variant:metric`: " + METRIC_LEGEND, "",
        "## Summary", "", *summary, "",
        "Not covered (no preset to reproduce): MH-MoE, X-MoE and MoEC routing options, and the parallel sampler of "
        "recurrent-depth models (a decoding-speed claim).", "",
    ]
    if failed:
        header += ["## Failed jobs", "", *(f"- `{name}` (log: `runs/reproduce/logs/{name.replace('/', '__')}.log`)" for name in failed), ""]
    path = results / "REPORT.md"
    path.write_text("\n".join(header + sections) + "\n")
    return path
