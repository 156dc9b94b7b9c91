"""Attention kernels: forward and forward+backward TFLOP/s and peak memory against SDPA / flash-attn.

FLOPs (FlashAttention's accounting): forward = 4·B·H·T·S·d (QKᵀ and PV, 2 FLOPs per MAC),
halved when causal with T == S; forward+backward = 3.5 × forward (backward = 2.5 × forward:
recompute QKᵀ, dV, dP, dQ, dK). The same formula is used for every method, so work our
deterministic backward issues on top of those five products (QKᵀ and dO Vᵀ again in its dQ
pass, see kernels/attention/flash_bwd.py) is counted as overhead, not as work.

Maps (query heads → key / value heads): mha (Hk = Hv = H); gqa (4 query heads per KV head,
contiguous groups); decoupled (25 % of the key heads and 25 % of the value heads, independent
random non-contiguous maps). Methods on GPU: triton (ours, un-expanded K/V); sdpa (SDPA with the
flash backend where it applies, K/V expanded by index_select unless the map is MHA; peak memory
therefore includes the expansion); flash_attn (plain GQA maps, if installed). On CPU the script
only proves the harness: it times the reference and sdpa paths at a few small shapes.

    python -m benchmarks.attention            # GPU: the full shape list; CPU: small shapes
Writes benchmarks/results/attention_{gpu,cpu}.csv and .png.

Legend: B batch, T queries (= S keys), H query heads, Hk key heads, Hv value heads, d head dim.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, environment, write_csv
from kernels.attention import attention

TOKENS_PER_BATCH = 16 * 1024
GPU_SHAPES = [(T, H, d) for d in (64, 128) for H in (16, 32) for T in (512, 1024, 2048, 4096, 8192)]
CPU_SHAPES = [(T, 4, 32) for T in (64, 128, 256)]
MAPS = ("mha", "gqa", "decoupled")


def head_maps(name: str, H: int, device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(Hk, Hv, k_head_H, v_head_H) for a map name; decoupled maps are seeded random surjections."""
    if name == "mha":
        return H, H, torch.arange(H, device=device), torch.arange(H, device=device)
    Hk = H // 4
    if name == "gqa":
        m = torch.arange(H, device=device) // 4
        return Hk, Hk, m, m
    g = torch.Generator().manual_seed(H)
    k_head = torch.randperm(H, generator=g) % Hk  # every key head used 4 times, in scrambled order
    v_head = torch.randperm(H, generator=g) % Hk
    return Hk, Hk, k_head.to(device), v_head.to(device)


def attention_flops(B, T, S, H, d, causal=True) -> float:
    return 4 * B * H * T * S * d / (2 if causal and T == S else 1)


def sdpa_baseline(q, k, v, k_head, v_head, map_name):
    """SDPA on (expanded, unless MHA) K/V: what a model without our kernel would run."""
    if map_name != "mha":
        k, v = k.index_select(2, k_head), v.index_select(2, v_head)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def methods(map_name: str, device) -> dict:
    """name → fn(q, k, v, k_head, v_head); only those that apply to this map and device."""
    out = {}
    if device.type == "cuda":
        if map_name == "decoupled":
            out["triton"] = lambda q, k, v, kh, vh: attention(q, k, v, k_head=kh, v_head=vh, backend="triton")
        else:  # default maps, as the attention module passes them (no map validation sync)
            out["triton"] = lambda q, k, v, kh, vh: attention(q, k, v, backend="triton")
    else:
        out["reference"] = lambda q, k, v, kh, vh: attention(q, k, v, k_head=kh, v_head=vh, backend="reference")
    out["sdpa"] = lambda q, k, v, kh, vh: sdpa_baseline(q, k, v, kh, vh, map_name)
    if device.type == "cuda" and map_name != "decoupled":
        try:
            from flash_attn import flash_attn_func  # noqa: F401

            out["flash_attn"] = lambda q, k, v, kh, vh: attention(q, k, v, backend="flash_attn")
        except ImportError:
            pass
    return out


def sdpa_context(device):
    """Pin SDPA to its flash kernel on CUDA (falls back to the default choice on CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def time_ms(fn, device) -> float:
    """Median milliseconds: triton.testing.do_bench on GPU, torch.utils.benchmark on CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def measure(T, H, d, map_name, device, dtype, tokens) -> list[dict]:
    B = max(1, tokens // T)
    Hk, Hv, k_head, v_head = head_maps(map_name, H, device)
    q = torch.randn(B, T, H, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hv, d, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, T, H, d, device=device, dtype=dtype)
    flops = attention_flops(B, T, T, H, d)
    rows = []
    for name, fn in methods(map_name, device).items():

        def fwd(fn=fn):
            with torch.no_grad(), sdpa_context(device):
                return fn(q, k, v, k_head, v_head)

        def fwd_bwd(fn=fn):
            with sdpa_context(device):
                out = fn(q, k, v, k_head, v_head)
            torch.autograd.grad(out, (q, k, v), do)

        for pass_name, f, mult in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.5)):
            peak_mb = float("nan")
            if device.type == "cuda":  # peak above the inputs, one call after warm-up
                f()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                f()
                torch.cuda.synchronize()
                peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = time_ms(f, device)
            rows.append(
                {
                    "pass": pass_name,
                    "method": name,
                    "map": map_name,
                    "B": B,
                    "T": T,
                    "H": H,
                    "Hk": Hk,
                    "Hv": Hv,
                    "d": d,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": round(ms, 4),
                    "tflops": round(mult * flops / ms / 1e9, 4),
                    "peak_mem_mb": round(peak_mb, 1),
                    "kv_mb": round((k.numel() + v.numel()) * k.element_size() / 2**20, 1),
                }
            )
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_sdpa = method TFLOP/s / sdpa TFLOP/s at the same shape, map and pass."""
    key = lambda r: (r["pass"], r["map"], r["T"], r["H"], r["d"])  # noqa: E731
    sdpa = {key(r): r["tflops"] for r in rows if r["method"] == "sdpa"}
    for r in rows:
        r["ratio_vs_sdpa"] = round(r["tflops"] / sdpa[key(r)], 4) if sdpa.get(key(r)) else ""


def plot(rows: list[dict], path, env) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = sorted({r["pass"] for r in rows})
    cols = sorted({(r["H"], r["d"]) for r in rows})
    fig, axes = plt.subplots(len(passes), len(cols), figsize=(4.2 * len(cols), 3.6 * len(passes)), squeeze=False)
    for i, pass_name in enumerate(passes):
        for j, (H, d) in enumerate(cols):
            ax = axes[i][j]
            sel = [r for r in rows if (r["pass"], r["H"], r["d"]) == (pass_name, H, d)]
            for method, map_name in sorted({(r["method"], r["map"]) for r in sel}):
                pts = sorted((r["T"], r["tflops"]) for r in sel if (r["method"], r["map"]) == (method, map_name))
                ax.plot(*zip(*pts), marker="o", label=f"{method}/{map_name}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("T (= S), causal")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{pass_name}  H={H} d={d}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{env['device']}  torch {env['torch']}  triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokens = TOKENS_PER_BATCH if on_gpu else 256
    tag = "gpu" if on_gpu else "cpu"
    env = environment()
    rows = []
    for T, H, d in shapes:
        for map_name in MAPS:
            for r in measure(T, H, d, map_name, device, dtype, tokens):
                rows.append({**r, **env})
                print(
                    f"{r['pass']:8s} {r['method']:10s} {r['map']:9s} B={r['B']:<3d} T={T:<5d} H={H:<3d} d={d:<4d}"
                    f" {r['ms']:9.3f} ms  {r['tflops']:8.3f} TFLOP/s  peak {r['peak_mem_mb']} MB",
                    flush=True,
                )
    add_ratios(rows)
    path = write_csv(f"attention_{tag}", rows)
    plot(rows, RESULTS / f"attention_{tag}.png", env)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  → {path}")
    if on_gpu:  # decoupled maps: K/V and peak memory of ours (un-expanded) vs SDPA on expanded K/V
        for r in rows:
            if r["map"] == "decoupled" and r["pass"] == "fwd_bwd":
                print(
                    f"  memory {r['method']:10s} T={r['T']:<5d} H={r['H']:<3d} d={r['d']:<4d} K/V {r['kv_mb']} MB"
                    f"  peak above inputs {r['peak_mem_mb']} MB"
                )
    for r in rows:
        if r["method"] != "sdpa" and r["ratio_vs_sdpa"] != "":
            print(
                f"  {r['pass']:8s} {r['method']:10s} {r['map']:9s} T={r['T']:<5d} H={r['H']:<3d} d={r['d']:<4d}"
                f" ratio vs sdpa {r['ratio_vs_sdpa']:.3f}"
            )
    return rows


if __name__ == "__main__":
    main()
