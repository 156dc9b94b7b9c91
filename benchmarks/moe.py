"""Expert-MLP benchmark: Triton grouped GEMMs vs the torch backend, a per-expert loop and the dense bound.

    python -m benchmarks.moe [--quick]

On CUDA: bf16, forward and forward+backward for every (D, F, E, k) in GPU_SHAPES at each N in
GPU_TOKENS with uniform-random top-k routing. Methods measured in the same run:
    triton  expert_mlp(backend="triton")
    torch   expert_mlp(backend="torch")   (sort + torch._grouped_mm where it works)
    loop    the torch backend with one matmul per expert
    dense   a dense SwiGLU/GELU FFN of hidden width k·F: the same FLOPs with no routing (the bound)
On CPU: the torch backend against the dense FFN at CPU_SHAPE (fp32, torch.utils.benchmark).

FLOPs (SwiGLU, H = 2F): forward = 2·N·k·D·(H + F) = 6·N·k·D·F; forward+backward = 3× forward.
GELU has H = F: forward = 4·N·k·D·F. Routing, activation and combine are not counted.
Writes benchmarks/results/moe_gpu.csv|png or moe_cpu.csv|png with device and torch/triton versions.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as Fn

from benchmarks.common import environment, save_mode_bars, write_csv
from kernels.moe import expert_mlp
from kernels.moe.torch_backend import expert_mlp_torch

GPU_SHAPES = [(1024, 512, 64, 8), (2048, 1408, 64, 6), (2048, 768, 128, 8), (4096, 14336, 8, 2)]  # (D, F, E, k)
GPU_TOKENS = [8192, 32768]
CPU_SHAPE = dict(N=4096, D=256, F=512, E=8, k=2)
ACTIVATION = "swiglu"


def flops_fwd(N, D, F, k, activation=ACTIVATION):
    return 2 * N * k * D * ((2 * F if activation == "swiglu" else F) + F)


def make_inputs(N, D, F, E, k, dtype, device, seed=0):
    """Uniform-random routing: top-k of i.i.d. logits, softmax gates; weights scaled for unit output."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(N, E, generator=g, device=device)
    gates, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    H = 2 * F if ACTIVATION == "swiglu" else F
    x = torch.randn(N, D, generator=g, device=device, dtype=dtype)
    w_in = (torch.randn(E, D, H, generator=g, device=device) / D**0.5).to(dtype)
    w_out = (torch.randn(E, F, D, generator=g, device=device) / F**0.5).to(dtype)
    return x, ids.to(torch.int32), gates.to(dtype), w_in, w_out


def dense_ffn(x, w_in, w_out):
    """Dense FFN of hidden width k·F: x (N, D), w_in (D, k·H), w_out (k·F, D)."""
    h = x @ w_in
    if ACTIVATION == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return (Fn.silu(g) * u) @ w_out
    return Fn.gelu(h) @ w_out


def methods(N, D, F, E, k, dtype, device):
    """name → (forward fn, differentiable inputs). Dense weights have the same active FLOPs."""
    x, ids, gates, w_in, w_out = make_inputs(N, D, F, E, k, dtype, device)
    params = [t.requires_grad_() for t in (x, gates, w_in, w_out)]
    H = w_in.shape[-1]
    dw_in = (torch.randn(D, k * H, device=device) / D**0.5).to(dtype).requires_grad_()
    dw_out = (torch.randn(k * F, D, device=device) / (k * F) ** 0.5).to(dtype).requires_grad_()
    dx = x.detach().clone().requires_grad_()
    out = {
        "torch": (lambda: expert_mlp(x, ids, gates, w_in, w_out, ACTIVATION, backend="torch"), params),
        "dense": (lambda: dense_ffn(dx, dw_in, dw_out), [dx, dw_in, dw_out]),
    }
    if device == "cuda":
        out["triton"] = (lambda: expert_mlp(x, ids, gates, w_in, w_out, ACTIVATION, backend="triton"), params)
        out["loop"] = (lambda: expert_mlp_torch(x, ids, gates, w_in, w_out, ACTIVATION, use_grouped_mm=False), params)
    return out


def fwd_bwd(fn, inputs):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, torch.ones_like(y))
    return run


def time_cpu(fn) -> float:
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e3


def time_gpu(fn) -> tuple[float, float]:
    """(median ms, peak MiB allocated during one call)."""
    import triton

    fn()  # compile + autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), peak


def run_cpu(rounds: int = 5) -> list[dict]:
    """Methods alternate within each round so load from other processes hits all of them; the
    per-method median over rounds is reported."""
    s = CPU_SHAPE
    rows = []
    fl_fwd = flops_fwd(s["N"], s["D"], s["F"], s["k"])
    for mode in ("fwd", "fwd+bwd"):
        fns = {name: (torch.no_grad()(fn) if mode == "fwd" else fwd_bwd(fn, inputs))
               for name, (fn, inputs) in methods(s["N"], s["D"], s["F"], s["E"], s["k"], torch.float32, "cpu").items()}
        for f in fns.values():
            f()  # warm-up (grouped_mm probe, allocator)
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, f in fns.items():
                times[name].append(time_cpu(f))
        med = {name: statistics.median(v) for name, v in times.items()}
        for name, ms in med.items():
            fl = fl_fwd * (3 if mode == "fwd+bwd" else 1)
            rows.append(dict(**environment(), dtype="float32", **s, method=name, mode=mode, ms=round(ms, 3),
                             tflops=round(fl / ms / 1e9, 4), time_vs_dense=round(ms / med["dense"], 3)))
        ratio = med["torch"] / med["dense"]
        print(f"CPU {mode}: torch backend {med['torch']:.1f} ms, dense FFN {med['dense']:.1f} ms, "
              f"ratio {ratio:.2f} (target <= 1.3: {'PASS' if ratio <= 1.3 else 'FAIL'})")
    return rows


def run_gpu(quick: bool) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for D, F, E, k in GPU_SHAPES[:1] if quick else GPU_SHAPES:
        for N in GPU_TOKENS[:1] if quick else GPU_TOKENS:
            t = {}
            for name, (fn, inputs) in methods(N, D, F, E, k, dtype, "cuda").items():
                for mode, f in (("fwd", torch.no_grad()(fn)), ("fwd+bwd", fwd_bwd(fn, inputs))):
                    ms, peak = time_gpu(f)
                    fl = flops_fwd(N, D, F, k) * (3 if mode == "fwd+bwd" else 1)
                    t[name, mode] = ms
                    rows.append(dict(**environment(), dtype="bfloat16", N=N, D=D, F=F, E=E, k=k, method=name,
                                     mode=mode, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 2), peak_mib=round(peak, 1)))
                torch.cuda.empty_cache()
            for r in rows[-8:]:
                r["dense_time_over_this"] = round(t["dense", r["mode"]] / r["ms"], 3)  # ≥ 0.8 target for triton
                r["torch_time_over_this"] = round(t["torch", r["mode"]] / r["ms"], 3)  # ≥ 1.0 target for triton
            tb = t["triton", "fwd+bwd"]
            print(f"N={N} D={D} F={F} E={E} k={k}: fwd+bwd triton {tb:.2f} ms, "
                  f"vs dense {t['dense', 'fwd+bwd'] / tb:.2f}x (>=0.8), vs torch {t['torch', 'fwd+bwd'] / tb:.2f}x (>=1.0), "
                  f"vs loop {t['loop', 'fwd+bwd'] / tb:.2f}x")
    return rows


def plot(rows, name):
    return save_mode_bars(
        rows, key=lambda r: (r["N"], r["D"], r["F"], r["E"], r["k"]), label=lambda s: "N{}\nD{} F{}\nE{} k{}".format(*s),
        value="tflops", ylabel="TFLOP/s", title=f"expert MLP ({rows[0]['dtype']})", name=name, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU: first shape and token count only")
    args = parser.parse_args()
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    if torch.cuda.is_available():
        rows, name = run_gpu(args.quick), "moe_gpu"
    else:
        rows, name = run_cpu(), "moe_cpu"
    print(f"wrote {write_csv(name, rows)} and {plot(rows, name)}")


if __name__ == "__main__":
    main()
