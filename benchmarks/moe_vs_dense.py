"""Training step time of the MoE model against the dense model with equal activated parameters.

Both are the framework's own ``Trainer.train_step`` on the embedded corpus: ``model=moe_tiny``
(8 experts, top-2, experts (8/3·D)/2 wide) against ``model=dense_tiny`` (same shape, dense
SwiGLU). Runs alternate; medians of the repeats are reported.

    python -m benchmarks.moe_vs_dense [--steps 20] [--repeats 5] [--d-model 128] [--n-layers 4]
Writes benchmarks/results/moe_vs_dense_cpu.csv (or _cuda) and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import add_output_options, environment, paired_ratios, save_boxplot, write_csv


def make_step(model: str, run_dir: str, d_model: int, n_layers: int):
    from training.cli import compose
    from training.trainer import Trainer

    cfg = compose(
        [
            f"model={model}",
            f"model.d_model={d_model}",
            f"model.n_layers={n_layers}",
            "trainer.progress=false",
            "logger=none",
            "trainer.max_steps=100000",
            f"run_dir={run_dir}",
        ]
    )
    trainer = Trainer(cfg)
    params = trainer.model.num_parameters()
    activated = trainer.flops_per_token / 6  # ≈ activated matmul parameters (+ attention)
    return (lambda: trainer.train_step()), trainer.tokens_per_step, params, activated


def seconds_per_step(step, n_steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n_steps


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    add_output_options(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        moe_step, tokens, moe_params, moe_active = make_step("moe_tiny", f"{tmp}/moe", args.d_model, args.n_layers)
        dense_step, _, dense_params, dense_active = make_step("dense_tiny", f"{tmp}/dense", args.d_model, args.n_layers)
        moe_times, dense_times = [], []
        for _ in range(args.repeats):
            moe_times.append(seconds_per_step(moe_step, args.steps))
            dense_times.append(seconds_per_step(dense_step, args.steps))
    moe_s, dense_s = statistics.median(moe_times), statistics.median(dense_times)
    env = environment()
    summary = paired_ratios(moe_times, dense_times)  # per interleaved pair: noise hits both arms of a pair
    ratio = summary["median"]
    row = {
        "d_model": args.d_model,
        "n_layers": args.n_layers,
        "tokens_per_step": tokens,
        "moe_params": moe_params,
        "dense_params": dense_params,
        "moe_train_flops_per_token": round(moe_active * 6),
        "dense_train_flops_per_token": round(dense_active * 6),
        "moe_step_s": round(moe_s, 5),
        "dense_step_s": round(dense_s, 5),
        "moe_over_dense_time": round(ratio, 4),
        "ratio_min": round(summary["min"], 4),
        "ratio_max": round(summary["max"], 4),
        "pairs": summary["pairs"],
        **env,
    }
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = write_csv(f"moe_vs_dense_{kind}", [row], args.out)
    save_boxplot(
        {"MoE top-2/8": [t * 1e3 for t in moe_times], "dense (equal active)": [t * 1e3 for t in dense_times]},
        "ms per training step",
        f"MoE / dense step time = {ratio:.3f}\n{env['device']}",
        f"moe_vs_dense_{kind}",
        args.out,
    )
    print(f"device: {env['device']}  torch {env['torch']}")
    print(f"MoE   (8 experts, top-2): {moe_params / 1e6:.2f}M params, {moe_s * 1e3:.1f} ms/step")
    print(f"dense (same activated):   {dense_params / 1e6:.2f}M params, {dense_s * 1e3:.1f} ms/step")
    print(
        f"step time ratio MoE / dense (per pair) = median {ratio:.3f} ({summary['min']:.3f}..{summary['max']:.3f} "
        f"over {summary['pairs']} pairs)  → {path}"
    )
    return ratio


if __name__ == "__main__":
    main()
