"""Shared helpers for the MoE kernel tests: random problems, error metrics, NaN-poisoned torch.empty."""

from __future__ import annotations

import torch


def make_problem(N, D, F, E, k, dtype, activation="swiglu", pattern="random", seed=0):
    """Random inputs for expert_mlp. pattern: random | drop (some -1 slots) | empty_expert |
    one_expert (every kept slot on expert E-1) | all_dropped."""
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if activation == "swiglu" else F
    x = torch.randn(N, D, generator=g)
    # distinct experts per token, like a real top-k (k <= E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(torch.int32)
    if pattern == "drop":
        ids[torch.rand(N, k, generator=g) < 0.3] = -1
    elif pattern == "empty_expert":
        ids[ids == 1] = -1  # expert 1 gets no tokens
    elif pattern == "one_expert":
        ids[:, 0] = E - 1
        ids[:, 1:] = -1
    elif pattern == "all_dropped":
        ids[:] = -1
    gates = torch.rand(N, k, generator=g)
    w_in = torch.randn(E, D, H, generator=g) / D**0.5
    w_out = torch.randn(E, F, D, generator=g) / F**0.5
    return x.to(dtype), ids, gates, w_in.to(dtype), w_out.to(dtype)


def rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(out, ref, rtol_rms, atol_max, name=""):
    """Relative-RMS bound plus a max-abs bound scaled by the reference's magnitude; NaNs fail."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten torch.empty output?)"
    scale = ref.abs().max().item() or 1.0
    err = rel_rms(out, ref)
    max_abs = (out.double() - ref.double()).abs().max().item()
    assert err <= rtol_rms, f"{name}: relative RMS {err:.3e} > {rtol_rms:.1e}"
    assert max_abs <= atol_max * scale, f"{name}: max abs error {max_abs:.3e} > {atol_max:.1e} x {scale:.3e}"


def poisoned_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN (floats) or a huge sentinel (ints), so an output
    element a kernel forgot to write shows up as an error instead of a lucky zero."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(-(2**30)) if t.dtype in (torch.int32, torch.int64) else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))
