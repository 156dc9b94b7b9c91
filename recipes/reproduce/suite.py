"""Reproduction suite: every method's small preset against its baseline, on CPU, over seeds → REPORT.md.

    make reproduce                                      # = python -m recipes.reproduce.suite (small tier)
    make reproduce SCALE=full                           # = ... --scale full: the core claims at powered budgets
    python -m recipes.reproduce.suite --dry-run            # the plan and its estimated wall time
    python -m recipes.reproduce.suite --methods emoe,sgt --seeds 1 --steps 40

Two tiers. ``--scale small`` (default): every method, ``--steps`` (70) per run, 3 seeds, ≤ 45 min on
2 cores by ``estimate_wall``. ``--scale full``: the core claims only (``FULL_TIER``: MoE vs dense,
EMoE's k' curve, ERNIE elastic sparsity, ITT vs vanilla and Loop, DHA vs GQA at matched budget, SGT
high vs low entropy), with the seed count and per-method steps that power the most checks by the power
calculation (``recipes.reproduce.power``, from the committed small-tier variance) while the whole tier
fits ``FULL_BUDGET_S`` (2 h on 2 cores) by the same estimator (``choose_full_tier``); runs under ``runs/reproduce_full/
steps<S>/`` (methods of equal S share baselines), report in ``benchmarks/results/reproduce_full/``;
resumable like the small tier.

Runs go to ``runs/reproduce/<method>/<variant>/seed<k>`` (baselines shared by several methods,
e.g. the dense and MoE models, to ``runs/reproduce/baselines/``); finished runs are skipped, so
an interrupted suite resumes where it stopped. Two runs at a time, ``trainer.threads=1`` each.
Afterwards ``benchmarks/results/reproduce/REPORT.md`` states, method by method, the paper's claim,
the measured numbers (mean ± std over seeds) and a verdict computed by the rule in
``recipes.reproduce.metrics.verdict``.

The spec table in ``recipes.reproduce.methods`` (VARIANTS, METHODS, ``common_overrides``) is the
whole definition of the suite. The presets' own step counts (300–1000) are cut to ``--steps``
(small tier default 70) so that the suite fits 45 min on 2 CPU cores; warmup and SGT's
selection schedule are scaled by the same factor, so they keep their place in training.

The plan (tiers, ``FULL_TIER``, per-method steps and seeds, the job list, ``estimate_wall``) lives in
``recipes.reproduce.plan``; this module runs its jobs (resumably) and is the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.reproduce.methods import METHOD_NAMES, METHODS
from recipes.reproduce.plan import (
    DEFAULT_RESULTS,
    DEFAULT_RUNS,
    DEFAULT_STEPS,
    FULL_BUDGET_S,
    FULL_RESULTS,
    FULL_RUNS,
    ROOT,
    Job,
    choose_full_tier,
    critical_path,
    estimate_wall,
    full_tier_methods,
    full_tier_steps,
    plan,
)
from recipes.reproduce.report import write_suite_report

# ----------------------------------------------------------------------------- running jobs


def jobs_to_run(jobs: list[Job]) -> list[Job]:
    """Unfinished jobs, plus every job downstream of one (its inputs are about to change)."""
    todo = {j.name for j in jobs if not j.done()}
    changed = True
    while changed:
        changed = False
        for job in jobs:
            if job.name not in todo and any(dep in todo for dep in job.after):
                todo.add(job.name)
                changed = True
    return [j for j in jobs if j.name in todo]


def run_jobs(jobs: list[Job], parallel: int, runs: Path) -> list[str]:
    """Run the unfinished jobs, ``parallel`` at a time, dependencies first; returns the names of failed jobs."""
    from tqdm.auto import tqdm

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    logs = runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    priority = critical_path(jobs)
    pending = sorted(jobs_to_run(jobs), key=lambda j: -priority[j.name])
    names = {j.name for j in pending}
    running: dict[str, tuple[Job, subprocess.Popen]] = {}
    failed: list[str] = []
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="reproduce", unit="run", dynamic_ncols=True)
    while pending or running:
        for name, (job, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            names.discard(name)
            if proc.returncode != 0 or not job.done():
                failed.append(name)
                tqdm.write(f"FAILED {name} (exit {proc.returncode}); log: {job.log}")
            bar.update(1)
        for job in list(pending):
            if len(running) >= parallel:
                break
            if any(dep in failed for dep in job.after):
                pending.remove(job)
                names.discard(job.name)
                failed.append(job.name)
                tqdm.write(f"skipped {job.name}: a job it needs failed")
                bar.update(1)
            elif not any(dep in names for dep in job.after):
                pending.remove(job)
                _clear_unfinished(job)
                job.log = logs / (job.name.replace("/", "__") + ".log")
                with open(job.log, "w") as log:
                    running[job.name] = (
                        job,
                        subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                    )
                bar.set_postfix_str(", ".join(running))
        time.sleep(0.5)
    bar.close()
    return failed


def _clear_unfinished(job: Job) -> None:
    """A half-written folder restarts from scratch, unless train.py can resume it from its own checkpoint."""
    if not job.folder.exists():
        return
    same_config = job.max_steps is not None and _configured_steps(job.folder) == job.max_steps
    if job.resumable and same_config and any((job.folder / "checkpoints").glob("step_*.pt")):
        return
    shutil.rmtree(job.folder)


def _configured_steps(folder: Path) -> int | None:
    import yaml

    config = folder / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("max_steps") if config.exists() else None


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m recipes.reproduce.suite", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale",
        choices=("small", "full"),
        default="small",
        help="small: every method at --steps (default); full: the core claims at powered per-method steps",
    )
    parser.add_argument(
        "--methods", help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all of the tier)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds 0..N-1 per variant (default 3; full tier: chosen by the power calculation)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps per run (default {DEFAULT_STEPS}; the full tier chooses its own)",
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: one per core)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and the estimated wall time, run nothing"
    )
    parser.add_argument("--report-only", action="store_true", help="write REPORT.md from the runs that exist")
    parser.add_argument(
        "--runs-dir", default=None, help="where the runs go (default runs/reproduce, full: runs/reproduce_full)"
    )
    parser.add_argument(
        "--results-dir",
        default=None,
        help="where REPORT.md goes (default benchmarks/results/reproduce, full: .../reproduce_full)",
    )
    args = parse(parser, argv)
    full = args.scale == "full"
    runs = Path(args.runs_dir or (FULL_RUNS if full else DEFAULT_RUNS)).resolve()
    results = Path(args.results_dir or (FULL_RESULTS if full else DEFAULT_RESULTS)).resolve()
    seeds = args.seeds if args.seeds is not None else 3
    tier = full_tier_methods() if full else METHODS
    names = [m.name for m in tier]
    chosen = args.methods.split(",") if args.methods else names
    unknown = [m for m in chosen if m not in names]
    if unknown or seeds < 1 or args.steps < 8:
        parser.error(
            f"unknown methods {unknown}; the {args.scale} tier has {names}"
            if unknown
            else "--seeds ≥ 1 and --steps ≥ 8"
        )
    methods = [m for m in tier if m.name in chosen]
    steps_by_method = None
    # The full tier's budget is planned over the whole tier, so --methods runs (or resumes) part of the
    # same plan: the same seeds and steps per method as the full run, not a re-plan of the subset.
    if full and args.seeds is None:  # seeds and steps from the power calculation
        seeds, steps_by_method = choose_full_tier(FULL_BUDGET_S, args.parallel, tier)
    elif full:
        steps_by_method = full_tier_steps(seeds, FULL_BUDGET_S, args.parallel, tier)
    if steps_by_method is not None:
        steps_by_method = {k: v for k, v in steps_by_method.items() if k in chosen}
    jobs = plan(methods, seeds, args.steps, runs, steps_by_method)
    todo = jobs_to_run(jobs)
    estimate = estimate_wall(todo, args.parallel)
    steps_text = (
        (", ".join(f"{k} {v}" for k, v in steps_by_method.items()) + " steps")
        if full
        else f"{args.steps} steps per run"
    )
    print(
        f"{args.scale} tier: {len(jobs)} jobs ({len(jobs) - len(todo)} already done), {steps_text}, {seeds} seeds, "
        f"{args.parallel} at a time: about {estimate / 60:.0f} min on an idle 2-core CPU"
    )
    if args.dry_run:
        for job in sorted(todo, key=lambda j: j.name):
            after = f"  (after {', '.join(job.after)})" if job.after else ""
            print(f"  {job.estimate_s / 60:5.1f} min  {job.name}{after}\n             {' '.join(job.command[1:])}")
        return 0
    started = time.time()
    failed = [] if args.report_only else run_jobs(jobs, args.parallel, runs)
    if not args.report_only:  # kept beside the runs, so that --report-only can still state it
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "suite_time.json").write_text(
            json.dumps(
                {
                    "wall_s": time.time() - started,
                    "jobs_run": len(todo),
                    "finished": time.strftime("%Y-%m-%d %H:%M"),
                    "estimate_s": estimate,
                }
            )
        )
    path = write_suite_report(
        methods,
        seeds,
        args.steps,
        failed,
        runs,
        results,
        steps_by_method=steps_by_method,
        scale=args.scale,
        estimate_s=estimate_wall(jobs, args.parallel),
    )
    print(f"wrote {path}" + (f"; {len(failed)} jobs failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
