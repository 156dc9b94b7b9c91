"""Reproduction suite: every method's small preset against its baseline, on CPU, over seeds → REPORT.md.

    make reproduce                                      # = python -m benchmarks.reproduce
    python -m benchmarks.reproduce --dry-run            # the plan and its estimated wall time
    python -m benchmarks.reproduce --methods emoe,sgt --seeds 1 --steps 40

Runs go to ``runs/reproduce/<method>/<variant>/seed<k>`` (baselines shared by several methods,
e.g. the dense and MoE models, to ``runs/reproduce/baselines/``); finished runs are skipped, so
an interrupted suite resumes where it stopped. Two runs at a time, ``trainer.threads=1`` each.
Afterwards ``benchmarks/results/reproduce/REPORT.md`` states, method by method, the paper's claim,
the measured numbers (mean ± std over seeds) and a verdict computed by the rule in
``benchmarks.reproduce_report.verdict``.

The spec table below (VARIANTS, METHODS, and the shortened schedule in ``common_overrides``)
is the whole definition of the suite. The presets' own step counts (300–1000) are cut to
``--steps`` (default 100) so that the suite fits about an hour on 2 CPU cores; warmup and SGT's
selection schedule are scaled by the same factor, so they keep their place in training.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = RUNS = ROOT / "runs" / "reproduce"
DEFAULT_RESULTS = RESULTS = Path(__file__).resolve().parent / "results" / "reproduce"
DEFAULT_STEPS = 100
STARTUP_S = 10  # per process: imports, data cache, model build, final checkpoint


def common_overrides(steps: int) -> list[str]:
    """The shortened schedule every training run gets (preset defaults: 300–500 steps, eval every 100)."""
    return [f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}", "trainer.eval_batches=8",
            f"trainer.checkpoint_every={max(1, steps // 2)}", "trainer.log_every=10", f"schedule.warmup_steps={max(1, steps // 8)}",
            "trainer.threads=1", "trainer.progress=false", "trainer.sample_tokens=0", "trainer.export_safetensors=false",
            "logger=none"]


def sgt_schedule(steps: int) -> list[str]:
    """The presets select at step 50 with 50-step windows out of 400; keep those fractions."""
    return [f"model.depth.first_selection_step={max(1, steps // 8)}", f"model.depth.window_size={max(1, steps // 8)}"]


# evaluate.py sweeps run on the final checkpoint (k' for elastic MoEs, test-time iterations for recurrence)
TOPK_SWEEP = ("analysis=elastic", "sweep.top_k=[1,2,3,4]", "sweep.expert_subsets=[8]", "sweep.depths=[4]", "eval_batches=8")
DEPTH_SWEEP = ("analysis=depth", "sweep.iterations=[1,2,4,8]", "eval_batches=8")


@dataclass(frozen=True)
class Variant:
    """One training configuration, trained once per seed into runs/reproduce/<folder>/seed<k>."""

    folder: str
    overrides: tuple[str, ...]
    sec_per_step: float            # measured at trainer.threads=1, two runs in parallel, 2-core CPU (for estimates)
    evaluate: tuple[str, ...] = ()  # evaluate.py arguments for the final checkpoint
    sgt: bool = False               # scale SGT's selection schedule to the step count


VARIANTS = {
    "dense": Variant("baselines/dense", ("experiment=dense_baseline",), 0.55),
    "moe": Variant("baselines/moe", ("experiment=moe_vs_dense",), 0.62, TOPK_SWEEP),
    "emoe": Variant("emoe/emoe", ("experiment=emoe",), 0.75, TOPK_SWEEP),
    "ernie_plain": Variant("ernie_elastic/plain", ("experiment=ernie_elastic", "elastic=none"), 0.60, TOPK_SWEEP),
    "ernie_elastic": Variant("ernie_elastic/elastic", ("experiment=ernie_elastic",), 0.55, TOPK_SWEEP),
    "moue": Variant("moue/moue", ("experiment=moue",), 0.75),
    "mohd_half": Variant("mohd/mohd_half", ("experiment=mohd_half",), 1.10),
    "mohd_3x": Variant("mohd/mohd_3x", ("experiment=mohd_3x",), 1.45),
    "loop_x4": Variant("looped/loop_x4", ("experiment=loop_x4",), 1.40),
    "itt_x4": Variant("looped/itt_x4", ("experiment=itt_x4",), 2.20),
    "recurrent": Variant("looped/recurrent", ("experiment=recurrent",), 2.10, DEPTH_SWEEP),
    "sgt_baseline": Variant("sgt/vanilla", ("experiment=sgt_baseline",), 0.80),
    "sgt": Variant("sgt/sgt", ("experiment=sgt",), 0.95, sgt=True),
    "sgt_low_entropy": Variant("sgt/low_entropy", ("experiment=sgt_low_entropy",), 0.95, sgt=True),
    "block_loop": Variant("sgt/block_loop", ("experiment=block_loop",), 1.10, sgt=True),
}


@dataclass(frozen=True)
class Check:
    """One comparison: metric of ``method`` against metric of ``baseline`` (each ``variant:metric``)."""

    question: str
    baseline: str
    method: str
    better: str = "lower"   # lower | higher | no_worse:<margin> (lower-is-better within a margin)
    paired: bool = False    # both arms measured on the same runs per seed (auto when the variant is the same)


@dataclass(frozen=True)
class Method:
    name: str
    claim: str
    variants: tuple[str, ...]          # training variants, baseline first ("" for pipeline-only methods)
    checks: tuple[Check, ...]
    pipeline: str = ""                 # dha_vs_gqa | merge: multi-stage recipes beyond train.py


METHODS = [
    Method("moe_vs_dense", "A routed MoE (top-2 of 8) beats a dense model with the same activated parameters and FLOPs "
           "(the premise of every MoE paper; METHODS.md §9.1 setup).", ("dense", "moe"),
           (Check("final val loss, equal steps and FLOPs", "dense:final", "moe:final"),)),
    Method("emoe", "EMoE (§1): plain top-k degrades when run with k' > k (the 'scaling wall'); EMoE keeps improving up to "
           "k' ≈ 2–3·k.", ("moe", "emoe"),
           (Check("loss change from k'=2 to k'=4 (lower: scales better)", "moe:topk_drop:2:4", "emoe:topk_drop:2:4"),
            Check("EMoE itself: loss at k'=4 vs k'=2", "emoe:topk:2", "emoe:topk:4"),
            Check("loss at the trained k=2, EMoE vs top-k (within 0.02)", "moe:topk:2", "emoe:topk:2", "no_worse:0.02"))),
    Method("ernie_elastic", "ERNIE 5.0 elastic training (§7): the full model stays within ~0.02 of the baseline, and "
           "sub-models at reduced top-k degrade far less than an un-elastic model run at reduced k.",
           ("ernie_plain", "ernie_elastic"),
           (Check("loss increase from k=4 (trained) to k=2", "ernie_plain:topk_drop:4:2", "ernie_elastic:topk_drop:4:2"),
            Check("loss increase from k=4 to k=1", "ernie_plain:topk_drop:4:1", "ernie_elastic:topk_drop:4:1"),
            Check("full-model final val loss (within 0.02)", "ernie_plain:final", "ernie_elastic:final", "no_worse:0.02"))),
    Method("moue", "MoUE (§2, abstract only; our design is a reconstruction): one universal expert pool shared across "
           "layers outperforms a matched MoE (up to +1.3%).", ("moe", "moue"),
           (Check("final val loss, matched activated FLOPs and total parameters", "moe:final", "moue:final"),)),
    Method("mohd", "MoHD (§3, reconstruction): sparsely activated hidden-dimension groups beat the vanilla model at equal "
           "activation (+1.7% with 50% active; +3.7% with 3× parameters at constant activation).",
           ("dense", "mohd_half", "mohd_3x"),
           (Check("mohd_half: final val loss, equal steps", "dense:final", "mohd_half:final"),
            Check("mohd_3x: final val loss, equal steps", "dense:final", "mohd_3x:final"),
            Check("mohd_half at the dense run's training FLOPs", "dense:final", "mohd_half:iso_flops:dense"),
            Check("mohd_3x at the dense run's training FLOPs", "dense:final", "mohd_3x:iso_flops:dense"))),
    Method("dha_vs_gqa", "DHA (§4): converting MHA to a 25% KV budget by head fusion starts much closer to MHA's loss "
           "than GQA mean-pooling and stays better after the same continued pretraining.", (),
           (Check("val loss right after conversion", "gqa:converted", "dha:converted", paired=True),
            Check("val loss after equal continued pretraining", "gqa:final", "dha:final", paired=True)), pipeline="dha_vs_gqa"),
    Method("itt", "ITT (§5): ITT×4 beats the vanilla model (≈ −0.8 PPL at ~1.75× FLOPs) and beats Loop×4 at ~70% of "
           "Loop's FLOPs.", ("dense", "loop_x4", "itt_x4"),
           (Check("ITT×4 vs vanilla, equal steps", "dense:final", "itt_x4:final"),
            Check("ITT×4 vs Loop×4, equal steps", "loop_x4:final", "itt_x4:final"),
            Check("ITT×4 at the vanilla run's training FLOPs", "dense:final", "itt_x4:iso_flops:dense"))),
    Method("recurrent", "Huginn recurrent depth (§8.5): a recurrent core trained with random iteration counts beats the "
           "same-size model and keeps improving with test-time iterations beyond the training mean r̄.",
           ("dense", "recurrent"),
           (Check("recurrent vs vanilla, equal parameters and steps", "dense:final", "recurrent:final"),
            Check("recurrent at the vanilla run's training FLOPs", "dense:final", "recurrent:iso_flops:dense"),
            Check("test-time iterations: r = r̄ = 4 vs r = 1", "recurrent:depth:1", "recurrent:depth:4"),
            Check("extrapolation: r = 2r̄ = 8 vs r = r̄", "recurrent:depth:4", "recurrent:depth:8"))),
    Method("sgt", "SGT (§6): looping the high-entropy heads of deep layers (+1–3% FLOPs) lowers loss vs vanilla, beats "
           "looping low-entropy heads, and beats whole-block looping at far lower FLOP overhead.",
           ("sgt_baseline", "sgt", "sgt_low_entropy", "block_loop"),
           (Check("SGT vs vanilla", "sgt_baseline:final", "sgt:final"),
            Check("high- vs low-entropy heads", "sgt_low_entropy:final", "sgt:final"),
            Check("SGT vs block loop", "block_loop:final", "sgt:final"))),
    Method("harc_merge", "HARC (§8.4): merging MoEs fine-tuned on different tasks breaks routing; calibrating the routers in "
           "closed form restores routing agreement and lowers the merged model's task losses vs the plain merge.", (),
           (Check("mean per-task val loss of the TIES merge", "plain_merge:merge_loss", "harc_merge:merge_loss", paired=True),
            Check("routing agreement with the fine-tunes", "plain_merge:merge_agreement", "harc_merge:merge_agreement",
                  "higher", paired=True)), pipeline="merge"),
]
METHOD_NAMES = [m.name for m in METHODS]
MERGE_BASE_STEPS_FACTOR, MERGE_FT_STEPS_FACTOR = 4, 2  # seq_len 64: ~4× cheaper steps; preset ratio 1000 : 500
MERGE_SEC_PER_STEP = 0.2


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
    from training.report import load_run

    if not (folder / "metrics.jsonl").exists():
        return None
    run = load_run(folder)
    return run.max_steps if run.incomplete_reason is None else None


def train_done(folder: Path, max_steps: int) -> bool:
    return trained_steps(folder) == max_steps


def set_paths(runs: Path, results: Path) -> None:
    """Point the suite at other folders (a smoke test must not leave 'finished' runs where the real suite looks)."""
    global RUNS, RESULTS
    RUNS, RESULTS = runs, results


def seed_dir(folder: str, seed: int) -> Path:
    return RUNS / folder / f"seed{seed}"


def plan(methods: list[Method], seeds: int, steps: int) -> list[Job]:
    """Every job the chosen methods need, each once (shared baselines are trained once)."""
    python, common = sys.executable, common_overrides(steps)
    jobs: dict[str, Job] = {}
    for method in methods:
        for name in method.variants:
            v = VARIANTS[name]
            for seed in range(seeds):
                folder = seed_dir(v.folder, seed)
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
                folder = seed_dir("dha_vs_gqa", seed)
                jobs[f"dha_vs_gqa/seed{seed}"] = Job(
                    f"dha_vs_gqa/seed{seed}", [python, "-m", "training.convert", "dha_vs_gqa", f"run_dir={folder}",
                                               f"fusion_steps={max(20, steps)}", *common, f"seed={seed}"],
                    lambda f=folder: (f / "summary.json").exists() and train_done(f / "mha", steps), folder, 3 * STARTUP_S + steps * 0.6 * 3 + max(20, steps) * 0.3)
        if method.pipeline == "merge":
            jobs.update({j.name: j for j in merge_jobs(seeds, steps, common)})
    return list(jobs.values())


def merge_jobs(seeds: int, steps: int, common: list[str]) -> list[Job]:
    """HARC chain per seed: base MoE (assoc_recall) → two fine-tunes from its last checkpoint → TIES merge + HARC."""
    python = sys.executable
    base_steps, ft_steps = MERGE_BASE_STEPS_FACTOR * steps, MERGE_FT_STEPS_FACTOR * steps
    short = [o for o in common if not o.startswith(("trainer.max_steps", "trainer.eval_every", "trainer.checkpoint_every"))]
    jobs = []
    for seed in range(seeds):
        root = RUNS / "harc_merge" / f"seed{seed}"
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
        jobs.append(Job(f"harc_merge/seed{seed}/merge", [python, "-m", "training.merge", f"base={base}", f"sources={','.join(sources)}",
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


def run_jobs(jobs: list[Job], parallel: int) -> list[str]:
    """Run the unfinished jobs, ``parallel`` at a time, dependencies first; returns the names of failed jobs."""
    from tqdm.auto import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = RUNS / "logs"
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: one per core)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimated wall time, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write REPORT.md from the runs that exist")
    parser.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="where the runs go (default runs/reproduce)")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="where REPORT.md goes (default benchmarks/results/reproduce)")
    args = parser.parse_args(argv)
    set_paths(Path(args.runs_dir).resolve(), Path(args.results_dir).resolve())
    chosen = args.methods.split(",") if args.methods else METHOD_NAMES
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown or args.seeds < 1 or args.steps < 8:
        parser.error(f"unknown methods {unknown}; choose from {METHOD_NAMES}" if unknown else "--seeds ≥ 1 and --steps ≥ 8")
    methods = [m for m in METHODS if m.name in chosen]
    jobs = plan(methods, args.seeds, args.steps)
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
    failed = [] if args.report_only else run_jobs(jobs, args.parallel)
    if not args.report_only:  # kept beside the runs, so that --report-only can still state it
        (RUNS / "suite_time.json").write_text(json.dumps({"wall_s": time.time() - started, "jobs_run": len(todo),
                                                           "finished": time.strftime("%Y-%m-%d %H:%M")}))
    from benchmarks.reproduce_report import write_suite_report

    path = write_suite_report(methods, args.seeds, args.steps, failed=failed)
    print(f"wrote {path}" + (f"; {len(failed)} jobs failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":  # run main() in the importable module, whose globals reproduce_report reads
    from benchmarks.reproduce import main as module_main

    sys.exit(module_main())
