"""Expert-MLP benchmark. CPU: the torch backend against Hugging Face's Mixtral sparse-MoE block.
CUDA: Triton grouped GEMMs vs the torch backend, a per-expert loop and the dense bound.

    python -m benchmarks.moe [--quick] [--check] [--out DIR] [--pairs 7] [--threads 2]

On CPU (fp32, ``--threads`` intra-op threads, forward+backward, same weights): for every shape in
CPU_SHAPES, "ours" = router linear + softmax + top-k (renormalised, as Mixtral does) +
``expert_mlp(backend="torch")`` and "theirs" = ``transformers``' ``MixtralSparseMoeBlock`` (eager
experts) with identical weights; the outputs and all gradients are checked to agree first. The two
are timed in interleaved pairs (ours, theirs, ours, theirs, ...) so load from other processes hits
both alike; each pair gives one ratio ours / theirs, and the median and min..max over pairs are
printed with the load average. Target: median ratio <= CPU_TARGET at every shape (``--check``
exits 1 when one is missed).

On CUDA: bf16, forward and forward+backward for every (D, F, E, k) in GPU_SHAPES at each N in
GPU_TOKENS with uniform-random top-k routing. Methods measured in the same run:
    triton  expert_mlp(backend="triton")
    torch   expert_mlp(backend="torch")   (sort + torch._grouped_mm where it works)
    loop    the torch backend with one matmul per expert
    dense   a dense SwiGLU/GELU FFN of hidden width k·F: the same FLOPs with no routing (the bound)

FLOPs (SwiGLU, H = 2F): forward = 2·N·k·D·(H + F) = 6·N·k·D·F; forward+backward = 3× forward.
GELU has H = F: forward = 4·N·k·D·F. Routing, activation and combine are not counted.
Writes moe_cpu.csv|png or moe_gpu.csv|png (device, torch/triton versions in every row) to ``--out``,
by default the untracked benchmarks/results/local/ (pass ``--out benchmarks/results`` for the
tracked results).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

from benchmarks.common import environment, save_boxplot, save_mode_bars
from kernels.moe import expert_mlp
from kernels.moe.torch_backend import expert_mlp_torch

GPU_SHAPES = [(1024, 512, 64, 8), (2048, 1408, 64, 6), (2048, 768, 128, 8), (4096, 14336, 8, 2)]  # (D, F, E, k)
GPU_TOKENS = [8192, 32768]
CPU_SHAPES = [  # the shape first; then wider, more experts with higher k, fewer tokens
    {"N": 4096, "D": 256, "F": 512, "E": 8, "k": 2},
    {"N": 4096, "D": 512, "F": 1024, "E": 8, "k": 2},
    {"N": 4096, "D": 256, "F": 256, "E": 16, "k": 4},
    {"N": 1024, "D": 256, "F": 512, "E": 8, "k": 2},
    {"N": 2048, "D": 384, "F": 192, "E": 32, "k": 8},
]
CPU_TARGET = 0.9  # ours / Mixtral block time, median over pairs
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "local"
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
                    rows.append(
                        dict(
                            **environment(),
                            dtype="bfloat16",
                            N=N,
                            D=D,
                            F=F,
                            E=E,
                            k=k,
                            method=name,
                            mode=mode,
                            ms=round(ms, 4),
                            tflops=round(fl / ms / 1e9, 2),
                            peak_mib=round(peak, 1),
                        )
                    )
                torch.cuda.empty_cache()
            for r in rows[-8:]:
                r["dense_time_over_this"] = round(t["dense", r["mode"]] / r["ms"], 3)  # ≥ 0.8 target for triton
                r["torch_time_over_this"] = round(t["torch", r["mode"]] / r["ms"], 3)  # ≥ 1.0 target for triton
            tb = t["triton", "fwd+bwd"]
            print(
                f"N={N} D={D} F={F} E={E} k={k}: fwd+bwd triton {tb:.2f} ms, "
                f"vs dense {t['dense', 'fwd+bwd'] / tb:.2f}x (>=0.8), vs torch {t['torch', 'fwd+bwd'] / tb:.2f}x "
                "(>=1.0), "
                f"vs loop {t['loop', 'fwd+bwd'] / tb:.2f}x"
            )
    return rows


class _Ours(torch.nn.Module):
    """Router (linear, fp32 softmax, top-k, renormalised: Mixtral's rule) + the torch expert MLP."""

    def __init__(self, w_router_ED, w_in_EDH, w_out_EFD, k):
        super().__init__()
        self.w_router_ED = torch.nn.Parameter(w_router_ED)
        self.w_in_EDH = torch.nn.Parameter(w_in_EDH)
        self.w_out_EFD = torch.nn.Parameter(w_out_EFD)
        self.k = k

    def forward(self, x_ND):
        probs_NE = torch.softmax(Fn.linear(x_ND, self.w_router_ED).float(), dim=-1)
        gates_NK, ids_NK = probs_NE.topk(self.k, dim=-1)
        gates_NK = (gates_NK / gates_NK.sum(-1, keepdim=True)).to(x_ND.dtype)
        return expert_mlp(x_ND, ids_NK, gates_NK, self.w_in_EDH, self.w_out_EFD, "swiglu", backend="torch")


def mixtral_pair(N, D, F, E, k, seed=0):
    """(ours, theirs, x) with identical weights: theirs is transformers' MixtralSparseMoeBlock."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=F,
        num_local_experts=E,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        num_hidden_layers=1,
        vocab_size=16,
    )
    cfg._experts_implementation = "eager"  # the block's own per-expert loop (what a standalone block runs)
    theirs = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the block allocates with torch.empty: give it real weights
        theirs.gate.weight.copy_(torch.randn(E, D, generator=g) / D**0.5)
        theirs.experts.gate_up_proj.copy_(torch.randn(E, 2 * F, D, generator=g) / D**0.5)
        theirs.experts.down_proj.copy_(torch.randn(E, D, F, generator=g) / F**0.5)
    # ours stores (E, D, 2F) [gate | up] and (E, F, D): the transposes of Mixtral's (out, in) layout
    ours = _Ours(
        theirs.gate.weight.detach().clone(),
        theirs.experts.gate_up_proj.detach().transpose(1, 2).contiguous(),
        theirs.experts.down_proj.detach().transpose(1, 2).contiguous(),
        k,
    )
    x = torch.randn(N, D, generator=g)
    return ours, theirs, x


def _step(module, x_ND, dy_ND, batched):
    """Forward + backward: the output and the gradients of x and every parameter."""
    x = x_ND.detach().requires_grad_()
    y = module(x[None] if batched else x)
    y = y.reshape(x.shape)
    params = list(module.parameters())
    return [y.detach()] + list(torch.autograd.grad(y, [x] + params, dy_ND))


def check_agree(ours, theirs, x, dy):
    """Outputs and gradients (x, router, w_in, w_out) agree to fp32 rounding; raises otherwise."""
    a, b = _step(ours, x, dy, False), _step(theirs, x, dy, True)
    b[3], b[4] = b[3].transpose(1, 2), b[4].transpose(1, 2)  # Mixtral layout → ours
    for name, u, v in zip(("y", "dx", "dw_router", "dw_in", "dw_out"), a, b):
        err = ((u - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
        if not err < 1e-4:
            raise RuntimeError(f"torch backend and Mixtral block disagree on {name}: max rel error {err:.2e}")


def _time(fn, reps) -> float:
    """Median seconds of `reps` calls."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_mixtral(pairs: int, reps: int, shapes=None) -> tuple[list[dict], dict[str, list[float]], bool]:
    """Interleaved (ours, theirs) timing per shape → (csv rows, ratios per shape, all targets met)."""
    rows, groups, ok = [], {}, True
    for s in shapes or CPU_SHAPES:
        ours, theirs, x = mixtral_pair(**s)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        check_agree(ours, theirs, x, dy)

        def f_ours(m=ours, x=x, dy=dy):
            return _step(m, x, dy, False)

        def f_theirs(m=theirs, x=x, dy=dy):
            return _step(m, x, dy, True)

        f_ours(), f_theirs()  # warm-up: allocator, first-call dispatch
        ratios, t_o, t_t = [], [], []
        for p in range(pairs):
            to, tt = _time(f_ours, reps), _time(f_theirs, reps)
            t_o.append(to), t_t.append(tt), ratios.append(to / tt)
            rows.append(
                dict(
                    **environment(),
                    dtype="float32",
                    **s,
                    pair=p,
                    ours_ms=round(to * 1e3, 3),
                    mixtral_ms=round(tt * 1e3, 3),
                    ratio=round(to / tt, 4),
                )
            )
        med = statistics.median(ratios)
        hit = med <= CPU_TARGET
        ok &= hit
        label = "N{N} D{D} F{F} E{E} k{k}".format(**s)
        groups[label.replace(" E", "\nE")] = ratios
        tflops = flops_fwd(s["N"], s["D"], s["F"], s["k"]) * 3 / statistics.median(t_o) / 1e12
        print(
            f"{label:28s} ours {statistics.median(t_o) * 1e3:8.1f} ms ({tflops:.3f} TFLOP/s)  "
            f"mixtral {statistics.median(t_t) * 1e3:8.1f} ms  ratio median {med:.3f} "
            f"[{min(ratios):.3f}..{max(ratios):.3f}] over {pairs} pairs  <= {CPU_TARGET}: {'yes' if hit else 'NO'}  "
            f"(loadavg {_loadavg()})",
            flush=True,
        )
    return rows, groups, ok


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:  # not Linux
        return "n/a"


def write_rows(out: Path, name: str, rows: list[dict]) -> Path:
    path = out / f"{name}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows, name, out=None):
    return save_mode_bars(
        rows,
        key=lambda r: (r["N"], r["D"], r["F"], r["E"], r["k"]),
        label=lambda s: "N{}\nD{} F{}\nE{} k{}".format(*s),
        value="tflops",
        ylabel="TFLOP/s",
        title=f"expert MLP ({rows[0]['dtype']})",
        name=name,
        dpi=120,
        out=out,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU: first shape and token count only; CPU: first shape")
    parser.add_argument("--check", action="store_true", help=f"CPU: exit 1 unless every median ratio <= {CPU_TARGET}")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV and PNG (default: %(default)s)"
    )
    parser.add_argument("--pairs", type=int, default=7, help="CPU: interleaved (ours, theirs) pairs per shape")
    parser.add_argument("--reps", type=int, default=3, help="CPU: calls per timing (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch intra-op threads")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() == DEFAULT_OUT and not (args.out / ".gitignore").exists():
        (args.out / ".gitignore").write_text("*\n")  # local results stay out of git
    env = environment()
    ok = True
    if torch.cuda.is_available():
        print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
        rows, name = run_gpu(args.quick), "moe_gpu"
        png = plot(rows, name, args.out)
    else:
        torch.set_num_threads(args.threads)
        env = environment()
        print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  loadavg {_loadavg()}")
        rows, groups, ok = run_mixtral(args.pairs, args.reps, CPU_SHAPES[:1] if args.quick else None)
        name = "moe_cpu"
        png = save_boxplot(
            groups,
            "time ours / Mixtral block",
            f"torch backend vs Mixtral sparse-MoE (fp32, {args.threads} threads; target <= {CPU_TARGET})",
            name,
            args.out,
        )
    print(f"wrote {write_rows(args.out, name, rows)} and {png}")
    if args.check and not ok:
        print(f"FAIL: a median ratio is above {CPU_TARGET}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
