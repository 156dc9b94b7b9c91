"""Static kernel report (no GPU): registers, spills, shared memory and PTX features per kernel config.

    python -m benchmarks.kernels_static [--out DIR] [--arch 90 80] [--no-cache] [--check]

Compiles every ``KernelSpec`` of kernels.{moe,mohd,attention}.aot_specs for sm_90a and sm_80 and
runs the triton wheel's ``ptxas -v`` (kernels/aot/ptxas.py; cached under .cache/static-gates/),
writes ``kernels_static.csv`` to DIR (default benchmarks/results/local/, git-ignored;
``--out benchmarks/results`` writes the tracked table) and prints it. When the MoE package offers
them, it also prints the modelled DRAM bytes per grouped GEMM at the Mixtral-like shape (column-major
vs grouped tile order; ``kernels.moe.traffic.modelled_dram_bytes``) and the saved-activation bytes
per MoE layer. ``--check`` exits non-zero when an autotune-choosable config spills (on either arch);
``tests/kernels/test_static_gates.py`` turns the same rows into pass/fail gates.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
from pathlib import Path

from benchmarks.common import add_output_options, environment
from kernels.aot.compile import ARCHS
from kernels.aot.ptxas import gpu_name, static_records

COLUMNS = [
    "kernel",
    "config",
    "dtype",
    "arch",
    "registers",
    "spill_store_bytes",
    "spill_load_bytes",
    "shared_bytes",
    "wgmma",
    "mma_sync",
    "cp_async",
    "autotune_choosable",
    "tma",
    "error",
]
DTYPES = ("bf16", "fp16", "fp32")
# Shapes of issue 18: the traffic model runs at Mixtral-like, saved activations at both
SHAPES = {
    "MoE-A": {"D": 2048, "F": 1024, "E": 64, "k": 8, "N": 16384},
    "Mixtral-like": {"D": 4096, "F": 14336, "E": 8, "k": 2, "N": 16384},
}
TILE = {"tile_m": 128, "tile_n": 128, "tile_k": 64}
GEMMS = ("fwd_in", "fwd_out", "dx_out", "dx_in", "dw_in", "dw_out")  # used when traffic.py names none


def to_row(r: dict) -> dict:
    """A static record → one CSV row. ``config``: the spec's bracket tags (dtype dropped) + its tiles."""
    base, _, tags = r["name"].partition("[")
    tags = [t for t in tags.rstrip("]").split(",") if t]
    dtype = next((t for t in tags if t in DTYPES), "")
    config = ",".join(t for t in tags if t not in DTYPES)
    row = {
        "kernel": f"{r['package']}.{base}",
        "config": f"{config} ({r['tiles']})".strip() if r.get("tiles") else config,
        "dtype": dtype,
        "arch": gpu_name(r["cc"]),
        "autotune_choosable": r["must_fit"],
        "error": r.get("error", ""),
    }
    if "error" not in r:
        row.update(
            registers=r["registers"],
            spill_store_bytes=r["spill_store_bytes"],
            spill_load_bytes=r["spill_load_bytes"],
            shared_bytes=r["shared"],
            wgmma=r["wgmma"],
            mma_sync=r["mma_sync"],
            cp_async=r["cp_async"],
            tma=r["tma"],
        )
    return row


def write(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernels_static.csv"
    env = environment()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + list(env))
        writer.writeheader()
        writer.writerows({**row, **env} for row in rows)
    return path


def _short(config: str) -> str:
    return config.replace("BLOCK_", "").replace("=True", "=T").replace("=False", "=F")[:62]


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'kernel':<24} {'config':<62} {'dtype':<5} {'arch':<6} {'regs':>4} {'spill st/ld B':>13} {'smem B':>7} "
        f"{'wgmma':<5} {'mma':<5} {'cp.as':<5} {'pick':<4}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["error"]:
            print(f"{r['kernel']:<24} {_short(r['config']):<62} {r['dtype']:<5} {r['arch']:<6} ERROR {r['error'][:80]}")
            continue
        spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        flag = "  <-- spills" if r["autotune_choosable"] and (r["spill_store_bytes"] or r["spill_load_bytes"]) else ""
        print(
            f"{r['kernel']:<24} {_short(r['config']):<62} {r['dtype']:<5} {r['arch']:<6} "
            f"{r['registers']:>4} {spill:>13} "
            f"{r['shared_bytes']:>7} {r['wgmma']!s:<5} {r['mma_sync']!s:<5} {r['cp_async']!s:<5} "
            f"{r['autotune_choosable']!s:<4}{flag}"
        )


def summary(rows: list[dict]) -> None:
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch and r["autotune_choosable"] and not r["error"]]
        spilling = [r for r in mine if r["spill_store_bytes"] or r["spill_load_bytes"]]
        errors = sum(1 for r in rows if r["arch"] == arch and r["error"])
        print(f"{arch}: {len(spilling)} of {len(mine)} autotune-choosable configs spill, {errors} compile errors")


def _call_with(fn, values: dict):
    """Call `fn` with the keyword arguments it names from `values` (the model functions' exact signatures
    are owned by kernels/moe; match by parameter name so either spelling works)."""
    params = inspect.signature(fn).parameters
    return fn(**{p: values[p] for p in params if p in values})


def print_traffic() -> None:
    """Modelled DRAM bytes per grouped GEMM (old vs grouped order) at Mixtral-like, if kernels.moe.traffic exists."""
    try:
        traffic = importlib.import_module("kernels.moe.traffic")
    except ImportError:
        print("\n(kernels.moe.traffic not present: no DRAM traffic model to print)")
        return
    if not hasattr(traffic, "modelled_dram_bytes"):
        print("\n(kernels.moe.traffic has no modelled_dram_bytes)")
        return
    shape = SHAPES["Mixtral-like"]
    ideal = getattr(traffic, "ideal_dram_bytes", None)
    print(f"\nModelled DRAM bytes per grouped GEMM, Mixtral-like {shape}, tiles {TILE}, bf16:")
    print(
        f"{'gemm':<12} {'column_major':>16} {'grouped':>16} {'grouped/old':>11} {'ideal':>16} {'old/ideal':>9} "
        f"{'grouped/ideal':>13}"
    )
    for gemm in getattr(traffic, "GEMMS", GEMMS):
        try:
            values = {**shape, **TILE, "gemm": gemm, "dtype_bytes": 2}
            old, new = (
                _call_with(traffic.modelled_dram_bytes, {**values, "order": order})
                for order in ("column_major", "grouped")
            )
            best = _call_with(ideal, values) if ideal else None
            tail = f"{best:>16,} {old / best:>9.2f} {new / best:>13.2f}" if best else ""
            print(f"{gemm:<12} {old:>16,} {new:>16,} {new / old:>11.2f} {tail}")
        except Exception as exc:  # noqa: BLE001 - the model is optional; show why a row is missing
            print(f"{gemm:<12} error: {type(exc).__name__}: {exc}")


def print_saved_activations() -> None:
    """Saved-activation bytes per MoE layer (before/after recomputation), if kernels.moe offers a function."""
    import torch

    for module in ("kernels.moe.traffic", "kernels.moe.ops", "kernels.moe.memory", "kernels.moe"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        fn = next((getattr(mod, n) for n in ("saved_activation_bytes", "saved_bytes") if hasattr(mod, n)), None)
        if fn is None:
            continue
        versions = ("before", "after") if "version" in inspect.signature(fn).parameters else (None,)
        print(f"\nSaved-activation bytes per MoE layer, bf16 ({module}.{fn.__name__}):")
        for name, shape in SHAPES.items():
            try:
                got = {
                    v: _call_with(fn, {"dtype": torch.bfloat16, "dtype_bytes": 2, "version": v, **shape})
                    for v in versions
                }
                print(f"  {name}: " + ", ".join(f"{v or 'bytes'} {b:,} ({b / 2**20:,.0f} MiB)" for v, b in got.items()))
            except Exception as exc:  # noqa: BLE001
                print(f"  {name}: error: {type(exc).__name__}: {exc}")
        return
    print("\n(no saved-activation bytes function in kernels.moe)")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_options(parser)  # --out (default the git-ignored benchmarks/results/local), --check
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(ARCHS, reverse=True), choices=sorted(ARCHS))
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    args = parser.parse_args(argv)
    rows = [to_row(r) for r in static_records(ccs=tuple(args.arch), use_cache=not args.no_cache)]
    print_table(rows)
    summary(rows)
    print_traffic()
    print_saved_activations()
    path = write(rows, Path(args.out))
    print(f"\nwrote {path}")
    spilling = [
        r for r in rows if r["autotune_choosable"] and (r["error"] or r["spill_store_bytes"] or r["spill_load_bytes"])
    ]
    if args.check and spilling:
        raise SystemExit(f"--check: {len(spilling)} autotune-choosable configs spill or failed to compile")
    return path


if __name__ == "__main__":
    main()
