"""MoHD FFN (scope ffn) benchmark: group-gated kernels vs groups-as-experts (kernels.moe) vs dense.

    python -m benchmarks.mohd [--quick]

Each shape is an FFN of model width D whose intermediate width F = G·g is split into G groups,
A of them active per token (the first A·φ shared). Methods measured in the same run:
    gated    kernels.mohd group_out_matmul → SwiGLU → group_in_matmul (backend triton on CUDA,
             the dense masked torch path on CPU)
    experts  kernels.moe.expert_mlp with the G groups as experts of width g, k = A (Triton on CUDA,
             sort + grouped matmuls on CPU)
    dense    a dense SwiGLU FFN of width A·g: the same activated FLOPs with no routing (the bound)
    full     a dense SwiGLU FFN of width F (what masking without sparsity costs)
Routing: "iid" (each token draws its routed groups independently) and "runs" (the same routed
groups for runs of 64 consecutive tokens, MoHD's "activation flow"; gated kernels skip tiles).

FLOPs (SwiGLU, activated): forward = 2·N·D·3·A·g; forward+backward = 3× forward.
Writes benchmarks/results/mohd_gpu.csv|png or mohd_cpu.csv|png with device and torch/triton versions.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as Fn

from benchmarks.common import add_output_options, environment, save_mode_bars, write_csv
from kernels.moe import expert_mlp
from kernels.mohd import group_in_matmul, group_out_matmul

GPU_SHAPES = [(1024, 16, 8, 6, 352), (2048, 16, 8, 6, 704), (4096, 16, 8, 6, 1408)]  # (D, G, A, n_shared, g)
GPU_TOKENS = [16384]
CPU_SHAPES = [(128, 16, 8, 6, 44), (256, 16, 8, 6, 88)]  # dense_tiny's mohd_half FFN, and 2× wider
CPU_TOKENS = [4096]
ROUTINGS = ("iid", "runs")


def make_ids(N, G, A, n_shared, routing, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = N if routing == "iid" else -(-N // 64)
    routed = torch.stack([torch.randperm(G - n_shared, generator=g)[: A - n_shared] for _ in range(rows)]) + n_shared
    if routing == "runs":
        routed = routed.repeat_interleave(64, 0)[:N]
    shared = torch.arange(n_shared).expand(N, n_shared)
    return torch.cat([shared, routed], 1).to(device)


def methods(N, D, G, A, n_shared, g, routing, dtype, device):
    """name → (forward fn, differentiable inputs); every method sees the same x."""
    gen = torch.Generator(device=device).manual_seed(0)
    F = G * g
    ids = make_ids(N, G, A, n_shared, routing, device)
    x = torch.randn(N, D, generator=gen, device=device, dtype=dtype).requires_grad_()
    coef = torch.rand(N, A, generator=gen, device=device, dtype=dtype).requires_grad_()
    ones = torch.ones(N, A, device=device, dtype=dtype)
    w_in = (torch.randn(D, 2 * F, generator=gen, device=device) / D**0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(F, D, generator=gen, device=device) / F**0.5).to(dtype).requires_grad_()
    backend = "triton" if device == "cuda" else "torch"

    def gated():
        h = group_out_matmul(x, ids, ones, w_in, G, backend).view(N, G, 2, g)
        a = (Fn.silu(h[:, :, 0]) * h[:, :, 1]).reshape(N, F)
        return group_in_matmul(a, ids, coef, w_out, G, backend)

    # groups as experts: w_in (G, D, 2g) = [gate g | up g] per group, w_out (G, g, D)
    e_in = w_in.detach().view(D, G, 2 * g).permute(1, 0, 2).contiguous().requires_grad_()
    e_out = w_out.detach().view(G, g, D).contiguous().requires_grad_()
    ids32 = ids.to(torch.int32)

    def experts():
        return expert_mlp(x, ids32, coef, e_in, e_out, "swiglu", backend)

    def dense_of(width):
        wi = (torch.randn(D, 2 * width, generator=gen, device=device) / D**0.5).to(dtype).requires_grad_()
        wo = (torch.randn(width, D, generator=gen, device=device) / width**0.5).to(dtype).requires_grad_()

        def run():
            gt, up = (x @ wi).chunk(2, -1)
            return (Fn.silu(gt) * up) @ wo

        return run, [x, wi, wo]

    return {
        "gated": (gated, [x, coef, w_in, w_out]),
        "experts": (experts, [x, coef, e_in, e_out]),
        "dense": dense_of(A * g),
        "full": dense_of(F),
    }


def fwd_bwd(fn, inputs):
    def run():
        y = fn()
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    return run


def time_cpu(fn) -> tuple[float, float]:
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median * 1e3, float("nan")


def time_gpu(fn) -> tuple[float, float]:
    """(median ms, peak MiB allocated during one call)."""
    import triton

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), peak


def run(device, quick: bool, rounds: int) -> list[dict]:
    """Methods alternate within each round (load from other processes hits all); medians reported."""
    shapes, tokens = (GPU_SHAPES, GPU_TOKENS) if device == "cuda" else (CPU_SHAPES, CPU_TOKENS)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = time_gpu if device == "cuda" else time_cpu
    rows = []
    for D, G, A, n_shared, g in shapes[:1] if quick else shapes:
        for N in tokens:
            for routing in ROUTINGS:
                for mode in ("fwd", "fwd+bwd"):
                    fns = {
                        k: (torch.no_grad()(f) if mode == "fwd" else fwd_bwd(f, i))
                        for k, (f, i) in methods(N, D, G, A, n_shared, g, routing, dtype, device).items()
                    }
                    times, peaks = {k: [] for k in fns}, {}
                    for _ in range(rounds):
                        for k, f in fns.items():
                            ms, peaks[k] = timer(f)
                            times[k].append(ms)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    fl = 2 * N * D * 3 * A * g * (3 if mode == "fwd+bwd" else 1)
                    for k, ms in med.items():
                        rows.append(
                            dict(
                                **environment(),
                                dtype=str(dtype)[6:],
                                N=N,
                                D=D,
                                G=G,
                                A=A,
                                n_shared=n_shared,
                                g=g,
                                routing=routing,
                                method=k,
                                mode=mode,
                                ms=round(ms, 4),
                                tflops_activated=round(fl / ms / 1e9, 4),
                                peak_mib=round(peaks[k], 1),
                                time_vs_dense=round(ms / med["dense"], 3),
                                time_vs_experts=round(ms / med["experts"], 3),
                            )
                        )
                    print(
                        f"D{D} G{G} A{A} g{g} N{N} {routing:4s} {mode:7s}: "
                        + "  ".join(f"{k} {ms:.2f} ms" for k, ms in med.items())
                    )
    return rows


def plot(rows, name, out=None):
    return save_mode_bars(
        rows,
        key=lambda r: (r["D"], r["g"], r["routing"]),
        label=lambda k: "D{} g{}\n{}".format(*k),
        value="ms",
        ylabel="ms (median)",
        title=f"MoHD FFN ({rows[0]['dtype']}, N={rows[0]['N']})",
        name=name,
        out=out,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--rounds", type=int, default=3)
    add_output_options(parser)
    args = parser.parse_args()
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(device, args.quick, args.rounds)
    name = "mohd_gpu" if device == "cuda" else "mohd_cpu"
    print(f"wrote {write_csv(name, rows, args.out)} and {plot(rows, name, args.out)}")


if __name__ == "__main__":
    main()
