"""Reproduction suite: every method's small preset against its baseline, on CPU, over seeds → REPORT.md.

    make reproduce                                      # = python -m recipes.reproduce.suite
    python -m recipes.reproduce.suite --dry-run            # the plan and its estimated wall time
    python -m recipes.reproduce.suite --methods emoe,sgt --seeds 1 --steps 40

Runs go to ``runs/reproduce/<method>/<variant>/seed<k>`` (baselines shared by several methods,
e.g. the dense and MoE models, to ``runs/reproduce/baselines/``); finished runs are skipped, so
an interrupted suite resumes where it stopped. Two runs at a time, ``trainer.threads=1`` each.
Afterwards ``benchmarks/results/reproduce/REPORT.md`` states, method by method, the paper's claim,
the measured numbers (mean ± std over seeds) and a verdict computed by the rule in
``recipes.reproduce.report.verdict``.

The spec table below (VARIANTS, METHODS, and the shortened schedule in ``common_overrides``)
is the whole definition of the suite. The presets' own step counts (300–1000) are cut to
``--steps`` (default 100) so that the suite fits about an hour on 2 CPU cores; warmup and SGT's
selection schedule are scaled by the same factor, so they keep their place in training.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from recipes.reproduce.report import write_suite_report
from recipes.reproduce.methods import (
    MERGE_BASE_STEPS_FACTOR,
    MERGE_FT_STEPS_FACTOR,
    MERGE_SEC_PER_STEP,
    METHOD_NAMES,
    METHODS,
    VARIANTS,
    Method,
    common_overrides,
    sgt_schedule,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = ROOT / "runs" / "reproduce"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
DEFAULT_STEPS = 100
STARTUP_S = 10  # per process: imports, data cache, model build, final checkpoint


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    name: str
    command: list[str]
    done: Callable[[], bool]
    folder: Path
    estimate_s: float
    after: tuple[str, ...] = ()
    resumable: bool = False        # train.py resume=auto continues an unfinished folder that has checkpoints
    max_steps: int | None = None   # a training job's trainer.max_steps (a folder trained to another count is redone)
    log: Path = field(default=None)


def trained_steps(folder: Path) -> int | None:
    """The run's configured trainer.max_steps, if it finished training to it."""
    from training.eval.report import load_run

    if not (folder / "metrics.jsonl").exists():
        return None
    run = load_run(folder)
    return run.max_steps if run.incomplete_reason is None else None


def train_done(folder: Path, max_steps: int) -> bool:
    return trained_steps(folder) == max_steps


def seed_dir(runs: Path, folder: str, seed: int) -> Path:
    return runs / folder / f"seed{seed}"


def plan(methods: list[Method], seeds: int, steps: int, runs: Path = DEFAULT_RUNS) -> list[Job]:
    """Every job the chosen methods need, each once (shared baselines are trained once)."""
    python, common = sys.executable, common_overrides(steps)
    jobs: dict[str, Job] = {}
    for method in methods:
        for name in method.variants:
            v = VARIANTS[name]
            for seed in range(seeds):
                folder = seed_dir(runs, v.folder, seed)
                overrides = [*v.overrides, *common, *(sgt_schedule(steps) if v.sgt else []), f"seed={seed}", f"run_dir={folder}"]
                key = f"{v.folder}/seed{seed}"
                jobs.setdefault(key, Job(key, [python, "train.py", *overrides], lambda f=folder: train_done(f, steps), folder,
                                         STARTUP_S + steps * v.sec_per_step, resumable=True, max_steps=steps))
                if v.evaluate:
                    out = folder / "eval"
                    csv_name = "depth.csv" if "analysis=depth" in v.evaluate else "elastic.csv"
                    jobs.setdefault(key + "/eval", Job(key + "/eval", [python, "evaluate.py", f"ckpt={folder}", *v.evaluate, f"out_dir={out}"],
                                                       lambda o=out, c=csv_name: (o / c).exists(), out, STARTUP_S + 15, after=(key,)))
        if method.pipeline == "dha_vs_gqa":
            for seed in range(seeds):
                folder = seed_dir(runs, "dha_vs_gqa", seed)
                jobs[f"dha_vs_gqa/seed{seed}"] = Job(
                    f"dha_vs_gqa/seed{seed}", [python, "-m", "recipes.dha.convert", "dha_vs_gqa", f"run_dir={folder}",
                                               f"fusion_steps={max(20, steps)}", *common, f"seed={seed}"],
                    lambda f=folder: (f / "summary.json").exists() and train_done(f / "mha", steps), folder, 3 * STARTUP_S + steps * 0.6 * 3 + max(20, steps) * 0.3)
        if method.pipeline == "merge":
            jobs.update({j.name: j for j in merge_jobs(seeds, steps, common, runs)})
    return list(jobs.values())


def merge_jobs(seeds: int, steps: int, common: list[str], runs: Path) -> list[Job]:
    """HARC chain per seed: base MoE (assoc_recall) → two fine-tunes from its last checkpoint → TIES merge + HARC."""
    python = sys.executable
    base_steps, ft_steps = MERGE_BASE_STEPS_FACTOR * steps, MERGE_FT_STEPS_FACTOR * steps
    short = [o for o in common if not o.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.checkpoint_every"))]
    jobs = []
    for seed in range(seeds):
        root = runs / "harc_merge" / f"seed{seed}"
        base = root / "base"
        base_overrides = ["experiment=merge_base", *short, f"trainer.max_steps={base_steps}", f"trainer.eval_every={base_steps // 4}",
                          f"trainer.checkpoint_every={base_steps}", f"seed={seed}", f"run_dir={base}"]
        jobs.append(Job(f"harc_merge/seed{seed}/base", [python, "train.py", *base_overrides], lambda f=base: train_done(f, base_steps),
                        base, STARTUP_S + base_steps * MERGE_SEC_PER_STEP, resumable=True, max_steps=base_steps))
        sources = []
        for task in ("recall", "modadd"):
            folder = root / task
            sources.append(str(folder))
            total = base_steps + ft_steps
            ft = [f"experiment=merge_ft_{task}", *short, f"trainer.max_steps={total}", f"trainer.eval_every={ft_steps // 2}",
                  f"trainer.checkpoint_every={total}", f"trainer.resume={base}/checkpoints/step_{base_steps:08d}.pt",
                  f"seed={seed}", f"run_dir={folder}"]
            jobs.append(Job(f"harc_merge/seed{seed}/{task}", [python, "train.py", *ft], lambda f=folder, t=total: train_done(f, t),
                            folder, STARTUP_S + ft_steps * MERGE_SEC_PER_STEP, after=(f"harc_merge/seed{seed}/base",)))
        out = root / "ties"
        jobs.append(Job(f"harc_merge/seed{seed}/merge", [python, "-m", "recipes.merge.merge", f"base={base}", f"sources={','.join(sources)}",
                                                         f"out={out}", "method=ties", f"seed={seed}", "eval_batches=10"],
                        lambda o=out: (o / "merge_report.json").exists(), out, STARTUP_S + 30,
                        after=(f"harc_merge/seed{seed}/recall", f"harc_merge/seed{seed}/modadd")))
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

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
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
                    running[job.name] = (job, subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
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
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimated wall time, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write REPORT.md from the runs that exist")
    parser.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="where the runs go (default runs/reproduce)")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="where REPORT.md goes (default benchmarks/results/reproduce)")
    args = parse(parser, argv)
    runs, results = Path(args.runs_dir).resolve(), Path(args.results_dir).resolve()
    chosen = args.methods.split(",") if args.methods else METHOD_NAMES
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown or args.seeds < 1 or args.steps < 8:
        parser.error(f"unknown methods {unknown}; choose from {METHOD_NAMES}" if unknown else "--seeds ≥ 1 and --steps ≥ 8")
    methods = [m for m in METHODS if m.name in chosen]
    jobs = plan(methods, args.seeds, args.steps, runs)
    todo = jobs_to_run(jobs)
    estimate = estimate_wall(todo, args.parallel)
    print(f"{len(jobs)} jobs ({len(jobs) - len(todo)} already done), {args.steps} steps per run, {args.seeds} seeds, "
          f"{args.parallel} at a time: about {estimate / 60:.0f} min on an idle 2-core CPU")
    if args.dry_run:
        for job in sorted(todo, key=lambda j: j.name):
            after = f"  (after {', '.join(job.after)})" if job.after else ""
            print(f"  {job.estimate_s / 60:5.1f} min  {job.name}{after}\n             {' '.join(job.command[1:])}")
        return 0
    started = time.time()
    failed = [] if args.report_only else run_jobs(jobs, args.parallel, runs)
    if not args.report_only:  # kept beside the runs, so that --report-only can still state it
        (runs / "suite_time.json").write_text(json.dumps({"wall_s": time.time() - started, "jobs_run": len(todo),
                                                           "finished": time.strftime("%Y-%m-%d %H:%M")}))
    path = write_suite_report(methods, args.seeds, args.steps, failed, runs, results)
    print(f"wrote {path}" + (f"; {len(failed)} jobs failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
