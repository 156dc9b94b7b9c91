"""The kernel sections of benchmarks.gpu_suite (see its docstring): tests (the GPU pytest lane), accuracy
and perf of expert_mlp and attention, and the inputs, reference paths and baselines they share with
benchmarks.gpu_suite_model. Each section is ``fn(suite, shapes)`` and adds rows through ``suite.case``;
kernels are imported inside the functions so --dry-run can set TRITON_INTERPRET first.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width; B batch, T queries,
S keys, H query heads, Hk key/value heads, d head dim.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

ROOT = Path(__file__).resolve().parents[1]


def perf_dtype(suite):
    # the interpreter computes bf16 wrongly and slowly; the dry run proves the code path in fp32
    return torch.float32 if suite.dry else torch.bfloat16


# ----------------------------------------------------------------------------- inputs
def moe_inputs(N, D, F, E, k, dtype, device, seed=0):
    """Uniform-random top-k routing with softmax gates; weights scaled for unit-variance outputs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gates_NK, ids_NK = torch.softmax(torch.randn(N, E, generator=g), -1).topk(k, dim=-1)
    x_ND = torch.randn(N, D, generator=g)
    w_in_EDH = torch.randn(E, D, 2 * F, generator=g) / D**0.5
    w_out_EFD = torch.randn(E, F, D, generator=g) / F**0.5
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(x_ND), ids_NK.to(device=device, dtype=torch.int32), cast(gates_NK), cast(w_in_EDH), cast(w_out_EFD)


def attn_inputs(B, T, H, Hk, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, h, d, generator=g).to(device=device, dtype=dtype) for h in (H, Hk, Hk, H))
    return q, k, v, do


def rel_rms(a, ref) -> float:
    return ((a.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp(min=1e-30)).item()


def grads_of(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


# ----------------------------------------------------------------------------- tests
def tests(suite, shapes):
    """The GPU-marked pytest lane in a subprocess (collect-only in the dry run)."""

    def run():
        try:
            import pytest  # noqa: F401
        except ImportError:
            return [{"result": "pytest not installed: the accuracy section covers the bf16 rule"}]
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"]
        if suite.dry:
            cmd.append("--collect-only")
        budget = max(10.0, suite.deadline - time.perf_counter())
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget, check=False)
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        return [
            {
                "result": summary,
                "returncode": proc.returncode,
                "failed_tail": proc.stdout[-800:] if proc.returncode else "",
            }
        ]

    suite.case("tests", "pytest -m gpu tests/kernels", run)


# ----------------------------------------------------------------------------- accuracy
def accuracy(suite, shapes):
    """bf16 (fp16 in the dry run) kernel error vs fp32 ≤ 2× the same-precision torch path's error."""
    dt, dev = suite.dtype, suite.device

    def moe():
        from kernels.moe import expert_mlp

        s = shapes["ACC_MOE"]
        inputs = moe_inputs(**s, dtype=torch.float32, device=dev)
        x, ids, gates, w_in, w_out = inputs
        dy = torch.randn(s["N"], s["D"], generator=torch.Generator().manual_seed(3)).to(dev)
        run = lambda backend: lambda x, g, wi, wo: expert_mlp(x, ids, g, wi, wo, "swiglu", backend=backend)
        leaves = (x, gates, w_in, w_out)
        ref = grads_of(run("torch"), leaves, dy)
        base = grads_of(run("torch"), [t.to(dt) for t in leaves], dy.to(dt))
        got = grads_of(run("triton"), [t.to(dt) for t in leaves], dy.to(dt))
        return [
            _rule_row("expert_mlp", name, g, b, r)
            for name, g, b, r in zip(("y", "dx", "dgates", "dw_in", "dw_out"), got, base, ref)
        ]

    def attn():
        from kernels.attention import attention

        s = shapes["ACC_ATTN"]
        q, k, v, do = attn_inputs(**s, dtype=torch.float32, device=dev)
        group = s["H"] // s["Hk"]

        def plain(q, k, v):  # softmax(QKᵀ)V in the inputs' dtype, causal, GQA by expansion
            ke, ve = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
            scores = torch.einsum("bthd,bshd->bhts", q, ke) * s["d"] ** -0.5
            mask = torch.ones(s["T"], s["T"], dtype=torch.bool, device=q.device).tril()
            return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, float("-inf")).softmax(-1), ve)

        ref = grads_of(plain, (q, k, v), do)
        low = [t.to(dt) for t in (q, k, v)]
        base = grads_of(plain, low, do.to(dt))
        got = grads_of(lambda q, k, v: attention(q, k, v, backend="triton"), low, do.to(dt))
        return [
            _rule_row("attention", name, g, b, r) for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref)
        ]

    suite.case("accuracy", "expert_mlp", moe)
    suite.case("accuracy", "attention", attn)


def _rule_row(kernel, name, got, base, ref) -> dict:
    err, err_torch = rel_rms(got, ref), rel_rms(base, ref)
    ok = bool(torch.isfinite(got).all()) and err <= 2 * err_torch + 1e-6
    return {
        "kernel": kernel,
        "tensor": name,
        "dtype": str(got.dtype).replace("torch.", ""),
        "rel_rms": err,
        "torch_rel_rms": err_torch,
        "passed": ok,
    }


# ----------------------------------------------------------------------------- perf
def _fwd_bwd(fn, leaves):
    def run():
        y = fn()
        torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run


def grouped_mm_mlp(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD):
    """Sort by expert → torch._grouped_mm (gate/up) → SwiGLU → torch._grouped_mm (down) → weighted scatter-add."""
    _N, k = ids_NK.shape
    E = w_in_EDH.shape[0]
    order_M = ids_NK.flatten().argsort(stable=True)
    tok_M = order_M // k
    offs_E = torch.bincount(ids_NK.flatten(), minlength=E).cumsum(0).to(torch.int32)
    h_MH = torch._grouped_mm(x_ND[tok_M], w_in_EDH, offs=offs_E)
    g_MF, u_MF = h_MH.chunk(2, dim=-1)
    o_MD = torch._grouped_mm(Fn.silu(g_MF) * u_MF, w_out_EFD, offs=offs_E)
    o_MD = o_MD * gates_NK.flatten()[order_M, None]
    return torch.zeros_like(x_ND).index_add(0, tok_M, o_MD)


def dense_ffn(x_ND, w1_DH, w2_FD):
    g, u = (x_ND @ w1_DH).chunk(2, dim=-1)
    return (Fn.silu(g) * u) @ w2_FD


WINNER_MODULES = {
    "expert_mlp": ("kernels.moe.grouped_gemm", "kernels.moe.grouped_gemm_bwd"),
    "attention": ("kernels.attention.flash", "kernels.attention.flash_bwd_dq", "kernels.attention.flash_bwd_dkdv"),
}


def autotune_winners(kernel: str) -> str:
    """name: best_config of every Triton autotuner of `kernel`'s modules (the last key it was tuned for)."""
    import importlib

    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return ""
    found = []
    for mod_name in WINNER_MODULES.get(kernel, ()):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in vars(mod).items():
            best = getattr(obj, "best_config", None) if isinstance(obj, Autotuner) else None
            if best is not None:
                found.append(f"{name}: {best}")
    return "; ".join(found)


def perf(suite, shapes):
    dt, dev = perf_dtype(suite), suite.device

    def moe(s):
        from kernels.moe import expert_mlp

        N, D, F, _E, k = (s[c] for c in "NDFEk")
        flops = 3 * 6 * N * k * D * F  # fwd 2·N·k·D·(2F + F), fwd+bwd 3×
        x, ids, gates, w_in, w_out = moe_inputs(**s, dtype=dt, device=dev)
        leaves = [t.requires_grad_() for t in (x, gates, w_in, w_out)]
        w1 = (torch.randn(D, 2 * k * F, device=dev) / D**0.5).to(dt).requires_grad_()
        w2 = (torch.randn(k * F, D, device=dev) / (k * F) ** 0.5).to(dt).requires_grad_()
        xd = x.detach().clone().requires_grad_()
        fns = {
            "triton": (lambda: expert_mlp(x, ids, gates, w_in, w_out, "swiglu", backend="triton"), leaves),
            "dense": (lambda: dense_ffn(xd, w1, w2), [xd, w1, w2]),
        }
        if hasattr(torch, "_grouped_mm"):
            fns["grouped_mm"] = (lambda: grouped_mm_mlp(x, ids, gates, w_in, w_out), leaves)
        return _timed_rows(suite, "expert_mlp", fns, flops, ("dense", "grouped_mm"))

    def attn(s):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from kernels.attention import attention

        B, T, H, Hk, d = (s[c] for c in ("B", "T", "H", "Hk", "d"))
        flops = 3.5 * 4 * B * H * T * T * d / 2  # causal, fwd+bwd = 3.5 × fwd
        q, k, v, _ = (t.requires_grad_() for t in attn_inputs(**s, dtype=dt, device=dev))
        fns = {"triton": (lambda: attention(q, k, v, backend="triton"), [q, k, v])}
        backends = (
            {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
            if dev.type == "cuda"
            else {"sdpa_math": SDPBackend.MATH}
        )
        for name, backend in backends.items():
            fns[name] = (_sdpa(backend, sdpa_kernel, q, k, v, H // Hk), [q, k, v])
        return _timed_rows(suite, "attention", fns, flops, tuple(backends))

    # interleaved so the first shape of each list (the targets' shapes) runs before the budget can run out
    cases = [("expert_mlp", n, s, moe) for n, s in shapes["MOE_SHAPES"].items()]
    attn_cases = [("attention", n, s, attn) for n, s in shapes["ATTN_SHAPES"].items()]
    for pair in zip(cases, attn_cases):
        for kernel, name, s, fn in pair:
            suite.case("perf", f"{kernel} {name}", lambda s=s, n=name, fn=fn: [{"shape": n, **r} for r in fn(s)])
    for kernel, name, s, fn in cases[len(attn_cases) :] + attn_cases[len(cases) :]:
        suite.case("perf", f"{kernel} {name}", lambda s=s, n=name, fn=fn: [{"shape": n, **r} for r in fn(s)])


def _sdpa(backend, sdpa_kernel, q, k, v, group):
    """SDPA pinned to one backend with enable_gqa; if that backend refuses GQA, K/V are expanded instead
    (the expansion is then part of the timed work, as it would be in a model)."""

    def run(gqa):
        with sdpa_kernel([backend]):
            ke, ve = (k, v) if gqa else (k.repeat_interleave(group, 2), v.repeat_interleave(group, 2))
            return Fn.scaled_dot_product_attention(
                q.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), is_causal=True, enable_gqa=gqa
            )

    try:
        with torch.no_grad():
            run(True)
        return lambda: run(True)
    except RuntimeError:
        return lambda: run(False)


def _timed_rows(suite, kernel, fns, flops, baselines) -> list[dict]:
    """One row per method (fwd+bwd ms, TFLOP/s, error if it failed); the triton row carries the ratios."""
    rows, ms = [], {}
    for method, (fn, leaves) in fns.items():
        try:
            ms[method] = suite.bench_ms(_fwd_bwd(fn, leaves))
            rows.append(
                {
                    "kernel": kernel,
                    "method": method,
                    "mode": "fwd+bwd",
                    "ms": ms[method],
                    "tflops": flops / ms[method] / 1e9,
                    "flops": flops,
                }
            )
        except Exception as exc:  # noqa: BLE001 - a baseline that does not apply here must not lose the rest
            rows.append(
                {
                    "kernel": kernel,
                    "method": method,
                    "mode": "fwd+bwd",
                    "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                }
            )
        if method == "triton":
            winners = autotune_winners(kernel)
        suite.sync()
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()
    for row in rows:
        if row["method"] == "triton" and "ms" in row:
            row["autotune_winner"] = winners
            for base in baselines:
                if base in ms:
                    row[f"vs_{base}"] = ms[base] / row["ms"]  # > 1: ours is faster
    return rows
