"""Per-seed metrics read from the reproduction suite's run folders, and the paired verdict rule applied to them.

Metrics are named ``variant:metric[:args]`` in the checks of ``recipes.reproduce.methods.METHODS``:
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

``METRIC_LEGEND`` and ``VERDICT_RULE`` say the same in REPORT.md's words (``recipes.reproduce.report``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from statistics import mean, stdev

from recipes.reproduce import power
from recipes.reproduce.methods import VARIANTS, Check
from training.eval.run_folders import load_run

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


def merge_report(runs: Path, seed: int) -> dict:
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
            return mean(merge_report(runs, seed)["losses"][variant])
        if name == "merge_agreement":
            return mean(a for layers in merge_report(runs, seed)["routing_agreement"][variant] for a in layers)
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
