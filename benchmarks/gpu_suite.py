"""The prepared GPU suite: one command for the GPU machine (no Hydra, wandb or network needed).

    python -m benchmarks.gpu_suite [--out DIR] [--sections tests accuracy perf syncs graph_breaks mfu]
    python -m benchmarks.gpu_suite --dry-run      # CPU, Triton interpreter, tiny shapes (CI: < ~60 s)

Sections (each in try/except with its own time budget, every error recorded as a CSV row):
  tests         ``pytest -m gpu tests/kernels`` when pytest is installed (collect-only in --dry-run)
  accuracy      bf16 kernel error vs an fp32 reference ≤ 2× the same-precision torch path's error
                (expert_mlp: torch backend; attention: plain torch softmax(QKᵀ)V) — the GPU tests' rule
  perf          TFLOP/s per kernel and shape with triton.testing.do_bench, ratios to a dense cuBLAS FFN of
                equal FLOPs, to torch._grouped_mm, and (attention) to SDPA flash / cuDNN with enable_gqa;
                the autotune winners (``Autotuner.best_config``)
  syncs         host syncs per training step: torch.cuda.set_sync_debug_mode("warn") warnings, and host
                reads (Tensor.item / __bool__ / __int__ / __float__ / tolist / nonzero) per phase
  graph_breaks  torch._dynamo.explain of expert_mlp, attention and the model's loss
  mfu           training-step MFU of a ~124M-activated MoE LM built directly (arch.model, no Hydra)
Targets (printed "met"/"not met"): MoE expert MLP fwd+bwd ≥ 0.9× the dense GEMMs and ≥ 1.2× torch._grouped_mm
at MoE-A; attention fwd+bwd ≥ 1.0× SDPA flash at d 128, T 4096; MoE LM training ≥ 35 % MFU.

FLOPs: expert MLP (SwiGLU) forward 6·N·k·D·F, fwd+bwd 3× that; attention (FlashAttention's accounting)
forward 4·B·H·T·S·d/2 causal, fwd+bwd 3.5× forward; model 3 × forward FLOPs/token (training.flops).
Writes gpu_suite_<section>.csv (device name, torch and triton versions in every row) to --out
(default benchmarks/results/gpu_suite/, --dry-run: benchmarks/results/local/gpu_suite_dry/).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
import traceback
from pathlib import Path

# Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width; B batch, T queries,
# S keys, H query heads, Hk key/value heads, d head dim.
MOE_SHAPES = {  # the first one carries the targets
    "MoE-A": {"N": 16384, "D": 2048, "F": 1024, "E": 64, "k": 8},
    "Mixtral-like": {"N": 16384, "D": 4096, "F": 14336, "E": 8, "k": 2},
}
ATTN_SHAPES = {f"d{d}-T4096": {"B": 4, "T": 4096, "H": 32, "Hk": 8, "d": d} for d in (128, 64)}  # causal, GQA 32/8
ACC_MOE = {"N": 4096, "D": 1024, "F": 512, "E": 16, "k": 4}
ACC_ATTN = {"B": 2, "T": 1024, "H": 8, "Hk": 2, "d": 128}
# dense_124m's shape (conf/model/dense_124m.yaml) with the default MoE FFN: ~124M activated parameters
MFU_MODEL = {
    "d_model": 768,
    "n_layers": 12,
    "n_heads": 12,
    "vocab": 50304,
    "seq_len": 1024,
    "batch": 16,
    "E": 8,
    "k": 2,
    "steps": 8,
}
SYNC_MODEL = dict(MFU_MODEL, n_layers=2, batch=4)
# run in this order; pytest last, it gets what it is given (450 s in all: under 8 minutes with start-up)
BUDGET_S = {"accuracy": 45, "perf": 180, "syncs": 30, "graph_breaks": 45, "mfu": 60, "tests": 90}
# --dry-run: the same code paths at sizes the interpreter runs in seconds
DRY = {
    "MOE_SHAPES": {"tiny": {"N": 64, "D": 32, "F": 32, "E": 4, "k": 2}},
    "ATTN_SHAPES": {"tiny": {"B": 1, "T": 64, "H": 4, "Hk": 2, "d": 32}},
    "ACC_MOE": {"N": 48, "D": 32, "F": 16, "E": 4, "k": 2},
    "ACC_ATTN": {"B": 1, "T": 40, "H": 4, "Hk": 2, "d": 32},
    "MFU_MODEL": {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "vocab": 256,
        "seq_len": 32,
        "batch": 2,
        "E": 4,
        "k": 2,
        "steps": 1,
    },
    "SYNC_MODEL": {
        "d_model": 64,
        "n_layers": 1,
        "n_heads": 4,
        "vocab": 256,
        "seq_len": 16,
        "batch": 2,
        "E": 4,
        "k": 2,
        "steps": 1,
    },
}
TARGETS = [  # (name, section, selector, value column, threshold)
    (
        "MoE expert MLP fwd+bwd vs dense GEMMs (MoE-A)",
        "perf",
        {"kernel": "expert_mlp", "shape": "MoE-A"},
        "vs_dense",
        0.9,
    ),
    (
        "MoE expert MLP fwd+bwd vs torch._grouped_mm (MoE-A)",
        "perf",
        {"kernel": "expert_mlp", "shape": "MoE-A"},
        "vs_grouped_mm",
        1.2,
    ),
    (
        "attention fwd+bwd vs SDPA flash (d 128, T 4096)",
        "perf",
        {"kernel": "attention", "shape": "d128-T4096"},
        "vs_sdpa_flash",
        1.0,
    ),
    ("MoE LM training MFU", "mfu", {"precision": "bf16 weights"}, "mfu", 0.35),
]


class Suite:
    """Collects rows per section; every case runs in try/except and within its section's budget."""

    def __init__(self, device, dtype, dry: bool):
        self.device, self.dtype, self.dry, self.rows = device, dtype, dry, {}
        self.deadline = math.inf

    def add(self, section: str, **row) -> dict:
        self.rows.setdefault(section, []).append(row)
        return row

    def case(self, section: str, name: str, fn) -> None:
        """Run one case; its rows come back from fn (a list of dicts); an exception becomes an error row."""
        if time.perf_counter() > self.deadline:
            self.add(section, case=name, error="skipped: section time budget spent")
            return
        t0 = time.perf_counter()
        try:
            for row in fn():
                self.add(section, case=name, **row)
        except Exception as exc:  # noqa: BLE001 - one failing kernel must not lose the rest
            self.add(section, case=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3)
        print(f"  [{section}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    def section(self, name: str, budget_s: float, fn) -> None:
        print(f"== {name} (budget {budget_s:.0f} s)", flush=True)
        self.deadline = time.perf_counter() + budget_s
        try:
            fn(self)
        except Exception as exc:  # noqa: BLE001
            self.add(name, case="(section)", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3)
        self.deadline = math.inf

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def bench_ms(self, fn) -> float:
        """Median ms: triton.testing.do_bench on CUDA; on CPU (dry run) the median of 3 wall-clock runs."""
        fn()  # compile + autotune outside the measurement
        if self.device.type == "cuda":
            import triton

            return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
        times = []
        for _ in range(1 if self.dry else 3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def write_csvs(suite: Suite, out: Path) -> list[Path]:
    from benchmarks.common import environment

    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    paths = []
    for section, rows in suite.rows.items():
        path = out / f"gpu_suite_{section}.csv"
        fields = list(dict.fromkeys(k for r in rows for k in r)) + list(env)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows({**r, **env} for r in rows)
        paths.append(path)
    return paths


def check_targets(suite: Suite) -> list[dict]:
    """One row per target: the measured value, the threshold and met / not met (n/a when not measured)."""
    rows = []
    for name, section, sel, column, threshold in TARGETS:
        match = [r for r in suite.rows.get(section, []) if all(r.get(k) == v for k, v in sel.items()) and column in r]
        value = match[0][column] if match else None
        status = (
            "n/a (dry run)"
            if suite.dry
            else ("not measured" if value is None else ("met" if value >= threshold else "not met"))
        )
        rows.append(suite.add("targets", target=name, value=value, threshold=threshold, status=status))
    return rows


SUMMARY = {  # section → the columns printed at the end (all columns go to the CSV)
    "accuracy": ("case", "tensor", "dtype", "rel_rms", "torch_rel_rms", "passed"),
    "perf": ("case", "method", "ms", "tflops", "vs_dense", "vs_grouped_mm", "vs_sdpa_flash", "vs_sdpa_cudnn"),
    "syncs": ("case", "phase", "sync_warnings", "host_reads"),
    "graph_breaks": ("case", "graphs", "graph_breaks"),
    "mfu": ("case", "step_ms", "tokens_per_s", "tflops", "mfu"),
    "tests": ("case", "result"),
}


def print_summary(suite: Suite) -> None:
    for section, cols in SUMMARY.items():
        rows = suite.rows.get(section, [])
        if not rows:
            continue
        print(f"\n[{section}]")
        print(" | ".join(cols))
        for r in rows:
            if r.get("error"):
                print(f"{r.get('case')} | ERROR {r['error'][:160]}")
                continue
            print(" | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))


def main(argv=None) -> dict:
    from benchmarks.gpu_suite_kernels import accuracy, perf, tests
    from benchmarks.gpu_suite_model import graph_breaks, mfu, syncs

    sections = {
        "accuracy": accuracy,
        "perf": perf,
        "syncs": syncs,
        "graph_breaks": graph_breaks,
        "mfu": mfu,
        "tests": tests,
    }
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes, no targets")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sections", nargs="+", default=list(BUDGET_S), choices=list(BUDGET_S))
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--check", action="store_true", help="exit non-zero when a measured target is not met")
    args = parser.parse_args(argv)
    if args.dry_run:
        # must be set before any kernel module imports triton (sections import kernels lazily)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from benchmarks.common import LOCAL_RESULTS, RESULTS

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device: run on the GPU machine, or pass --dry-run")
    suite = Suite(device, torch.float16 if args.dry_run else torch.bfloat16, args.dry_run)
    shapes = (
        DRY
        if args.dry_run
        else {
            "MOE_SHAPES": MOE_SHAPES,
            "ATTN_SHAPES": ATTN_SHAPES,
            "ACC_MOE": ACC_MOE,
            "ACC_ATTN": ACC_ATTN,
            "MFU_MODEL": MFU_MODEL,
            "SYNC_MODEL": SYNC_MODEL,
        }
    )
    t0 = time.perf_counter()
    for name in args.sections:
        suite.section(name, BUDGET_S[name] * args.budget_scale, lambda s, n=name: sections[n](s, shapes))
    print_summary(suite)
    targets = check_targets(suite)
    for row in targets:
        print(f"target {row['target']}: {row['value']} (>= {row['threshold']}) → {row['status']}")
    out = args.out or (LOCAL_RESULTS / "gpu_suite_dry" if args.dry_run else RESULTS / "gpu_suite")
    for path in write_csvs(suite, out):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.check and any(r["status"] == "not met" for r in targets):
        raise SystemExit("--check: a target was not met")
    return suite.rows


if __name__ == "__main__":
    main()
