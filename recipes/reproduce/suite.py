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
``recipes.reproduce.report.verdict``.

The spec table in ``recipes.reproduce.methods`` (VARIANTS, METHODS, ``common_overrides``) is the
whole definition of the suite. The presets' own step counts (300–1000) are cut to ``--steps``
(small tier default 70) so that the suite fits 45 min on 2 CPU cores; warmup and SGT's
selection schedule are scaled by the same factor, so they keep their place in training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipes.reproduce.methods import (
    MERGE_BASE_STEPS_FACTOR,
    MERGE_FT_STEPS_FACTOR,
    MERGE_SEC_PER_STEP,
    METHOD_NAMES,
    METHODS,
    SAMPLER_JOB_S,
    VARIANTS,
    Check,
    Method,
    common_overrides,
    sgt_schedule,
)
from recipes.reproduce.report import write_suite_report

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = ROOT / "runs" / "reproduce"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
DEFAULT_STEPS = 70  # small tier: with MH-MoE, X-MoE, MoEC and the sampler added, 100 steps estimate 59 min; 70 fit 45
FULL_MIN_STEPS = 100
STARTUP_S = 10  # per process: imports, data cache, model build, final checkpoint
SMALL_BUDGET_S, FULL_BUDGET_S = 45 * 60, 2 * 3600
FULL_RUNS, FULL_RESULTS = ROOT / "runs" / "reproduce_full", ROOT / "benchmarks" / "results" / "reproduce_full"
FULL_SEEDS, FULL_MAX_STEPS = 3, 1000  # FULL_SEEDS: full_tier_steps' default; main() lets choose_full_tier pick
# the full tier's core claims: method → the checks it keeps (None: all)
FULL_TIER = {
    "moe_vs_dense": None,
    "emoe": None,
    "ernie_elastic": None,
    "itt": ("ITT×4 vs vanilla, equal steps", "ITT×4 vs Loop×4, equal steps"),
    "dha_vs_gqa": None,
    "sgt": ("high- vs low-entropy heads",),
}


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    name: str
    command: list[str]
    done: Callable[[], bool]
    folder: Path
    estimate_s: float
    after: tuple[str, ...] = ()
    resumable: bool = False  # train.py resume=auto continues an unfinished folder that has checkpoints
    max_steps: int | None = None  # a training job's trainer.max_steps (a folder trained to another count is redone)
    log: Path = field(default=None)


def trained_steps(folder: Path) -> int | None:
    """The run's configured trainer.max_steps, if it finished training to it."""
    from training.eval.run_folders import load_run

    if not (folder / "metrics.jsonl").exists():
        return None
    run = load_run(folder)
    return run.max_steps if run.incomplete_reason is None else None


def train_done(folder: Path, max_steps: int) -> bool:
    return trained_steps(folder) == max_steps


def seed_dir(runs: Path, folder: str, seed: int) -> Path:
    return runs / folder / f"seed{seed}"


def restrict(method: Method, questions: tuple[str, ...] | None) -> Method:
    """The method with only the named checks, and only the variants those checks read."""
    if questions is None:
        return method
    checks = tuple(c for c in method.checks if c.question in questions)
    missing = set(questions) - {c.question for c in checks}
    if missing:
        raise ValueError(f"questions {sorted(missing)} are not checks of {method.name}")
    used = {arm.split(":")[0] for c in checks for arm in (c.baseline, c.method)}
    return replace(method, checks=checks, variants=tuple(v for v in method.variants if v in used))


def full_tier_methods() -> list[Method]:
    return [restrict(m, FULL_TIER[m.name]) for m in METHODS if m.name in FULL_TIER]


def method_runs(runs: Path, steps: int, steps_by_method: dict[str, int] | None, name: str) -> tuple[Path, int]:
    """(runs root, steps) of one method: per-method step counts live in runs/steps<S>/ so equal S share runs."""
    if not steps_by_method:
        return runs, steps
    s = steps_by_method.get(name, steps)
    return runs / f"steps{s}", s


def plan(
    methods: list[Method],
    seeds: int,
    steps: int,
    runs: Path = DEFAULT_RUNS,
    steps_by_method: dict[str, int] | None = None,
) -> list[Job]:
    """Every job the chosen methods need, each once (shared baselines are trained once)."""
    python = sys.executable
    jobs: dict[str, Job] = {}
    for method in methods:
        m_runs, m_steps = method_runs(runs, steps, steps_by_method, method.name)
        prefix = f"{m_runs.relative_to(runs)}/" if m_runs != runs else ""
        common = common_overrides(m_steps)
        for name in method.variants:
            v = VARIANTS[name]
            for seed in range(seeds):
                folder = seed_dir(m_runs, v.folder, seed)
                overrides = [
                    *v.overrides,
                    *common,
                    *(sgt_schedule(m_steps) if v.sgt else []),
                    f"seed={seed}",
                    f"run_dir={folder}",
                ]
                key = f"{prefix}{v.folder}/seed{seed}"
                jobs.setdefault(
                    key,
                    Job(
                        key,
                        [python, "train.py", *overrides],
                        lambda f=folder, n=m_steps: train_done(f, n),
                        folder,
                        STARTUP_S + m_steps * v.sec_per_step,
                        resumable=True,
                        max_steps=m_steps,
                    ),
                )
                if v.evaluate:
                    out = folder / "eval"
                    csv_name = "depth.csv" if "analysis=depth" in v.evaluate else "elastic.csv"
                    jobs.setdefault(
                        key + "/eval",
                        Job(
                            key + "/eval",
                            [python, "evaluate.py", f"ckpt={folder}", *v.evaluate, f"out_dir={out}"],
                            lambda o=out, c=csv_name: (o / c).exists(),
                            out,
                            STARTUP_S + 15,
                            after=(key,),
                        ),
                    )
                if method.pipeline == "sampler":
                    out = folder / "sampler"
                    jobs.setdefault(
                        key + "/sampler",
                        Job(
                            key + "/sampler",
                            [python, "-m", "recipes.reproduce.sampler", f"ckpt={folder}", f"out={out}", f"seed={seed}"],
                            lambda o=out: (o / "sampler.json").exists(),
                            out,
                            STARTUP_S + SAMPLER_JOB_S,
                            after=(key,),
                        ),
                    )
        if method.pipeline == "dha_vs_gqa":
            for seed in range(seeds):
                folder = seed_dir(m_runs, "dha_vs_gqa", seed)
                fusion = max(20, m_steps)
                # MHA run + DHA (fusion, then CPT) + GQA (CPT + the fusion steps, the matched budget)
                estimate = 3 * STARTUP_S + m_steps * 0.55 * 3 + fusion * (0.6 + 0.55)
                jobs[f"{prefix}dha_vs_gqa/seed{seed}"] = Job(
                    f"{prefix}dha_vs_gqa/seed{seed}",
                    [
                        python,
                        "-m",
                        "recipes.dha.convert",
                        "dha_vs_gqa",
                        f"run_dir={folder}",
                        f"fusion_steps={fusion}",
                        *common,
                        f"seed={seed}",
                    ],
                    lambda f=folder, n=m_steps: (f / "summary.json").exists() and train_done(f / "mha", n),
                    folder,
                    estimate,
                )
        if method.pipeline == "merge":
            jobs.update({j.name: j for j in merge_jobs(seeds, m_steps, common, m_runs, prefix)})
    return list(jobs.values())


def _required(check: Check, seeds: int) -> float | None:
    """Steps the check needs with ``seeds`` seeds (power.required_steps), None without a measured σ or a claim size."""
    from recipes.reproduce.power import required_steps

    if check.sigma_100 is None or check.effect <= 0:
        return None
    return required_steps(check.sigma_100, check.effect, seeds)


def powered_checks(methods: list[Method], seeds: int, steps_by_method: dict[str, int]) -> list[str]:
    """The checks whose power requirement the given per-method steps meet ("method: question")."""
    return [
        f"{m.name}: {c.question}"
        for m in methods
        for c in m.checks
        if (need := _required(c, seeds)) is not None and need <= steps_by_method[m.name]
    ]


def full_tier_steps(
    seeds: int = FULL_SEEDS, budget_s: float = FULL_BUDGET_S, parallel: int = 2, methods: list[Method] | None = None
) -> dict[str, int]:
    """Steps per full-tier method that power as many checks as fit ``budget_s`` by ``estimate_wall``.

    Each check needs ``power.required_steps`` (committed 100-step σ, claimed effect, ``seeds``), rounded up to 50;
    one above FULL_MAX_STEPS cannot be powered here. Every method starts at FULL_MIN_STEPS; then, greedily, the
    step increase that powers one more check for the least added wall time is taken while the tier still fits.
    """
    methods = methods if methods is not None else full_tier_methods()
    scratch = Path("/nonexistent-reproduce-plan")  # estimate only: nothing is created

    def wall(steps: dict[str, int]) -> float:
        return estimate_wall(plan(methods, seeds, FULL_MIN_STEPS, scratch, steps), parallel)

    levels = {
        m.name: sorted(
            {
                max(FULL_MIN_STEPS, 50 * math.ceil(need / 50))
                for c in m.checks
                if (need := _required(c, seeds)) is not None and need <= FULL_MAX_STEPS
            }
        )
        for m in methods
    }
    steps = {m.name: FULL_MIN_STEPS for m in methods}
    current = wall(steps)
    while True:
        options = []
        for name, targets in levels.items():
            higher = [t for t in targets if t > steps[name]]
            if higher:
                trial = {**steps, name: higher[0]}
                options.append((wall(trial) - current, name, higher[0]))
        fitting = [o for o in options if current + o[0] <= budget_s]
        if not fitting:
            return steps
        cost, name, target = min(fitting)
        steps[name], current = target, current + cost


def choose_full_tier(
    budget_s: float = FULL_BUDGET_S, parallel: int = 2, methods: list[Method] | None = None, seed_range=range(3, 9)
) -> tuple[int, dict[str, int]]:
    """(seeds, steps per method) powering the most checks within the budget; ties go to fewer seeds.

    More seeds can be cheaper than more steps: the t quantiles of a paired test with few seeds are large (n = 3:
    t₀.₉₅ + t₀.₈₀ = 3.98, n = 6: 2.94), and under σ ∝ 1/√steps the cost n·S of a given power falls with n.
    """
    methods = methods if methods is not None else full_tier_methods()
    best = None
    for seeds in seed_range:
        steps = full_tier_steps(seeds, budget_s, parallel, methods)
        score = len(powered_checks(methods, seeds, steps))
        if best is None or score > best[0]:
            best = (score, seeds, steps)
    return best[1], best[2]


def merge_jobs(seeds: int, steps: int, common: list[str], runs: Path, prefix: str = "") -> list[Job]:
    """HARC chain per seed: base MoE (assoc_recall) → two fine-tunes from its last checkpoint → TIES merge + HARC."""
    python = sys.executable
    base_steps, ft_steps = MERGE_BASE_STEPS_FACTOR * steps, MERGE_FT_STEPS_FACTOR * steps
    short = [
        o for o in common if not o.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.checkpoint_every"))
    ]
    jobs = []
    for seed in range(seeds):
        root = runs / "harc_merge" / f"seed{seed}"
        name = f"{prefix}harc_merge/seed{seed}"
        base = root / "base"
        base_overrides = [
            "experiment=merge_base",
            *short,
            f"trainer.max_steps={base_steps}",
            f"trainer.eval_every={base_steps // 4}",
            f"trainer.checkpoint_every={base_steps}",
            f"seed={seed}",
            f"run_dir={base}",
        ]
        jobs.append(
            Job(
                f"{name}/base",
                [python, "train.py", *base_overrides],
                lambda f=base: train_done(f, base_steps),
                base,
                STARTUP_S + base_steps * MERGE_SEC_PER_STEP,
                resumable=True,
                max_steps=base_steps,
            )
        )
        sources = []
        for task in ("recall", "modadd"):
            folder = root / task
            sources.append(str(folder))
            total = base_steps + ft_steps
            ft = [
                f"experiment=merge_ft_{task}",
                *short,
                f"trainer.max_steps={total}",
                f"trainer.eval_every={ft_steps // 2}",
                f"trainer.checkpoint_every={total}",
                f"trainer.resume={base}/checkpoints/step_{base_steps:08d}.pt",
                f"seed={seed}",
                f"run_dir={folder}",
            ]
            jobs.append(
                Job(
                    f"{name}/{task}",
                    [python, "train.py", *ft],
                    lambda f=folder, t=total: train_done(f, t),
                    folder,
                    STARTUP_S + ft_steps * MERGE_SEC_PER_STEP,
                    after=(f"{name}/base",),
                )
            )
        out = root / "ties"
        jobs.append(
            Job(
                f"{name}/merge",
                [
                    python,
                    "-m",
                    "recipes.merge.merge",
                    f"base={base}",
                    f"sources={','.join(sources)}",
                    f"out={out}",
                    "method=ties",
                    f"seed={seed}",
                    "eval_batches=10",
                ],
                lambda o=out: (o / "merge_report.json").exists(),
                out,
                STARTUP_S + 30,
                after=(f"{name}/recall", f"{name}/modadd"),
            )
        )
    return jobs


def critical_path(jobs: list[Job]) -> dict[str, float]:
    """Each job's estimate plus its longest chain of dependents: start long chains first."""
    children: dict[str, list[Job]] = {}
    for job in jobs:
        for dep in job.after:
            children.setdefault(dep, []).append(job)
    memo: dict[str, float] = {}

    def tail(job: Job) -> float:
        if job.name not in memo:
            memo[job.name] = job.estimate_s + max((tail(c) for c in children.get(job.name, [])), default=0.0)
        return memo[job.name]

    return {job.name: tail(job) for job in jobs}


def estimate_wall(jobs: list[Job], parallel: int) -> float:
    """Simulated makespan of the scheduler below (list scheduling by critical path)."""
    priority = critical_path(jobs)
    pending = sorted(jobs, key=lambda j: -priority[j.name])
    finish: dict[str, float] = {}
    slots = [0.0] * parallel
    while pending:
        slot = min(range(parallel), key=lambda i: slots[i])
        ready = [j for j in pending if all(d in finish or d not in priority for d in j.after)]
        job = min(ready, key=lambda j: max([slots[slot]] + [finish[d] for d in j.after if d in finish]))
        start = max([slots[slot]] + [finish[d] for d in job.after if d in finish])
        finish[job.name] = slots[slot] = start + job.estimate_s
        pending.remove(job)
    return max(finish.values(), default=0.0)


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
