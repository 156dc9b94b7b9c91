"""The reproduction suite's plan: its tiers, each method's steps and seeds, the job list and its wall-time estimate.

``plan`` turns the spec table of ``recipes.reproduce.methods`` into jobs (training runs, evaluate.py
sweeps, the sampler, the DHA/GQA and HARC pipelines), each trained once however many methods share
it. ``FULL_TIER`` names the full tier's core claims; ``choose_full_tier`` picks its seeds and
per-method steps by the power calculation (``recipes.reproduce.power``) within ``FULL_BUDGET_S`` by
``estimate_wall``, the simulated makespan of ``recipes.reproduce.suite.run_jobs``' scheduler.
Nothing here runs a job or creates a folder.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipes.reproduce.methods import (
    MERGE_BASE_STEPS_FACTOR,
    MERGE_FT_STEPS_FACTOR,
    MERGE_SEC_PER_STEP,
    METHODS,
    SAMPLER_JOB_S,
    VARIANTS,
    Check,
    Method,
    common_overrides,
    sgt_schedule,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = ROOT / "runs" / "reproduce"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
DEFAULT_STEPS = 70  # small tier: with MH-MoE, X-MoE, MoEC and the sampler added, 100 steps estimate 59 min; 70 fit 45
FULL_MIN_STEPS = 100
STARTUP_S = 10  # per process: imports, data cache, model build, final checkpoint
SMALL_BUDGET_S, FULL_BUDGET_S = 45 * 60, 2 * 3600
FULL_RUNS, FULL_RESULTS = ROOT / "runs" / "reproduce_full", ROOT / "benchmarks" / "results" / "reproduce_full"
FULL_SEEDS, FULL_MAX_STEPS = 3, 1000  # FULL_SEEDS: full_tier_steps' default; suite.main() lets choose_full_tier pick
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
    """Simulated makespan of suite.run_jobs' scheduler (list scheduling by critical path)."""
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
