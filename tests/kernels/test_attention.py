"""Triton attention (under the interpreter on CPU) against the fp32 reference: forward, lse and
gradients of q, k, v for MHA / GQA / MQA / decoupled non-contiguous maps, causal and not, T < S
decoding, sorted random q_positions subsets, odd lengths and padded head dims, fp32 and fp16.

Legend: B batch, T queries, S keys, H query heads, Hk key heads, Hv value heads, d / dv head dims.
torch.empty is NaN-poisoned during the Triton calls so an element a kernel forgot to write fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import attention, attention_reference, last_row_attention_entropy, last_row_entropy_reference

# name → (H, Hk, Hv, k_head, v_head); None = default GQA map
MAPS = {
    "mha": (4, 4, 4, None, None),
    "gqa": (4, 2, 2, None, None),
    "mqa": (4, 1, 1, None, None),
    # non-contiguous, k and v maps differ, Hk != Hv, key head 1 and value head 2 unused (zero grads)
    "decoupled": (4, 3, 3, [2, 0, 2, 0], [1, 1, 0, 1]),
}
# name → (T, S, causal, positions): positions "default" (S - T + i) or "subset" (sorted random)
POSITIONS = {
    "causal": (19, 19, True, "default"),
    "decode": (5, 23, True, "default"),
    "subset": (7, 29, True, "subset"),
    "full": (11, 17, False, "default"),
    "cross": (13, 6, False, "default"),  # non-causal with T > S
}
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 1e-2)}  # (relative RMS, max abs / max |ref|)


def rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, name):
    rtol_rms, atol_max = TOL[dtype]
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten torch.empty output?)"
    scale = ref.abs().max().item() or 1.0
    err, max_abs = rel_rms(out, ref), (out.double() - ref.double()).abs().max().item()
    assert err <= rtol_rms, f"{name}: relative RMS {err:.3e} > {rtol_rms:.1e}"
    assert max_abs <= atol_max * scale, f"{name}: max abs {max_abs:.3e} > {atol_max:.1e} x {scale:.3e}"


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN (floats) or a huge sentinel (ints)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(torch.iinfo(t.dtype).max)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))


def make_problem(B, T, S, H, Hk, Hv, d, dv, positions, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g).to(dtype)
    k = torch.randn(B, S, Hk, d, generator=g).to(dtype)
    v = torch.randn(B, S, Hv, dv, generator=g).to(dtype)
    do = torch.randn(B, T, H, dv, generator=g).to(dtype)
    pos = None
    if positions == "subset":  # token-sparse loop: each batch row re-attends from its own sorted subset
        pos = torch.stack([torch.randperm(S, generator=g)[:T].sort().values for _ in range(B)])
    return q, k, v, do, pos


def run(backend, q, k, v, do, **kw):
    """out, lse and (dq, dk, dv) for one backend; inputs are leaf copies."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = attention(q, k, v, return_lse=True, backend=backend, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), lse.detach(), grads


def ref_run(q, k, v, do, k_head, v_head, pos, causal, H, Hk, Hv):
    """fp32 reference with explicit maps and positions (independent of the kernel's defaults)."""
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    k_head = torch.arange(H) // (H // Hk) if k_head is None else torch.tensor(k_head)
    v_head = torch.arange(H) // (H // Hv) if v_head is None else torch.tensor(v_head)
    pos = (S - T + torch.arange(T)).expand(B, T) if pos is None else pos
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q, k, v, k_head, v_head, pos, causal, q.shape[-1] ** -0.5)
    return out.detach(), lse.detach(), torch.autograd.grad(out, (q, k, v), do.float())


def check_against_reference(map_name, pos_name, dtype, d=16, dv=16, B=2, seed=0, **extra):
    H, Hk, Hv, k_head, v_head = MAPS[map_name]
    T, S, causal, positions = POSITIONS[pos_name]
    q, k, v, do, pos = make_problem(B, T, S, H, Hk, Hv, d, dv, positions, dtype, seed)
    kw = dict(
        causal=causal,
        k_head=None if k_head is None else torch.tensor(k_head),
        v_head=None if v_head is None else torch.tensor(v_head),
        q_positions=pos,
        **extra,
    )
    out, lse, grads = run("triton", q, k, v, do, **kw)
    r_out, r_lse, r_grads = ref_run(q, k, v, do, k_head, v_head, pos, causal, H, Hk, Hv)
    assert out.dtype == dtype and out.shape == (B, T, H, dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
    assert_close(out, r_out, dtype, "out")
    assert_close(lse, r_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == dtype, name
        assert_close(g, rg, dtype, name)
    return grads


@pytest.mark.parametrize("pos_name", sorted(POSITIONS))
@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_triton_fp32_matches_reference(map_name, pos_name, poisoned_empty):
    grads = check_against_reference(map_name, pos_name, torch.float32)
    if map_name == "decoupled":  # key head 1 / value head 2 are read by no query head
        assert grads[1][:, :, 1].abs().max() == 0 and grads[2][:, :, 2].abs().max() == 0


@pytest.mark.parametrize("pos_name", sorted(POSITIONS))
@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_triton_fp16_matches_reference(map_name, pos_name, poisoned_empty):
    check_against_reference(map_name, pos_name, torch.float16)


@pytest.mark.parametrize(
    "map_name,pos_name",
    [("gqa", "causal"), ("decoupled", "subset"), ("mha", "full"), ("mqa", "decode"), ("decoupled", "cross")],
)
def test_triton_single_pass_atomic_dq(map_name, pos_name, poisoned_empty):
    """deterministic=False: dQ added with atomics inside the dK/dV launch (FA2's single pass)."""
    check_against_reference(map_name, pos_name, torch.float32, deterministic=False)


@pytest.mark.parametrize("d,dv", [(24, 40), (8, 16), (64, 64), (128, 128)])
def test_triton_padded_and_unequal_head_dims(d, dv, poisoned_empty):
    """The model's head dims 64 / 128, and d, dv below or between the power-of-2 tiles
    (masked loads) with dv != d."""
    check_against_reference("decoupled", "causal", torch.float32, d=d, dv=dv, B=1, seed=1)


def test_triton_many_blocks_and_heads_per_group(poisoned_empty):
    """Longer sequence (several key and query blocks) and 6 query heads on 1 key / 2 value heads."""
    H, T, S = 6, 37, 45
    q, k, v, do, _ = make_problem(1, T, S, H, 1, 2, 16, 16, "default", torch.float32, seed=2)
    v_head = [1, 0, 1, 1, 0, 1]
    out, lse, grads = run("triton", q, k, v, do, v_head=torch.tensor(v_head))
    r_out, r_lse, r_grads = ref_run(q, k, v, do, None, v_head, None, True, H, 1, 2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (r_out, r_lse, *r_grads)):
        assert_close(a, b, torch.float32, name)


def test_strided_inputs_and_scale(poisoned_empty):
    """k, v as views of one packed tensor (as the attention module makes them), a transposed
    upstream gradient, a custom scale, and return_lse=False."""
    g = torch.Generator().manual_seed(3)
    B, T, H, Hk, d = 2, 13, 4, 2, 16
    q = torch.randn(B, T, H, d, generator=g)
    kv = torch.randn(B, T, 2, Hk, d, generator=g)
    do = torch.randn(B, H, T, d, generator=g).transpose(1, 2)  # (B, T, H, d) view, non-contiguous
    grads = {}
    for backend in ("triton", "reference"):
        q_, kv_ = q.clone().requires_grad_(), kv.clone().requires_grad_()
        k, v = kv_.unbind(2)
        out = attention(q_, k, v, softmax_scale=0.3, backend=backend)
        grads[backend] = (out.detach(), *torch.autograd.grad(out, (q_, kv_), do))
    for name, a, b in zip(("out", "dq", "dkv"), grads["triton"], grads["reference"]):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("map_name,pos_name", [("decoupled", "subset"), ("gqa", "decode"), ("mha", "full")])
def test_sdpa_backend_matches_reference(map_name, pos_name):
    H, Hk, Hv, k_head, v_head = MAPS[map_name]
    T, S, causal, positions = POSITIONS[pos_name]
    q, k, v, do, pos = make_problem(2, T, S, H, Hk, Hv, 16, 8, positions, torch.float32)
    kw = dict(
        causal=causal,
        k_head=None if k_head is None else torch.tensor(k_head),
        v_head=None if v_head is None else torch.tensor(v_head),
        q_positions=pos,
    )
    out, lse, grads = run("sdpa", q, k, v, do, **kw)
    r_out, r_lse, r_grads = ref_run(q, k, v, do, k_head, v_head, pos, causal, H, Hk, Hv)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (r_out, r_lse, *r_grads)):
        assert_close(a, b, torch.float32, name)


def test_auto_is_sdpa_on_cpu_and_causal_defaults():
    """auto on CPU = SDPA; T == S default positions = ordinary causal attention."""
    q, k, v, _, _ = make_problem(1, 9, 9, 2, 2, 2, 8, 8, "default", torch.float32)
    out = attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("map_name", ["gqa", "decoupled"])
def test_last_row_entropy(backend, map_name, poisoned_empty):
    H, Hk, _, k_head, _ = MAPS[map_name]
    q, k, _, _, _ = make_problem(2, 5, 21, H, Hk, Hk, 16, 16, "default", torch.float32)
    q = q * 3  # spread the entropies away from 1
    kh = torch.arange(H) // (H // Hk) if k_head is None else torch.tensor(k_head)
    ent = last_row_attention_entropy(q, k, k_head=None if k_head is None else kh, backend=backend)
    ref = last_row_entropy_reference(q, k, kh, 16**-0.5)
    assert ent.shape == (2, H) and ent.dtype == torch.float32
    torch.testing.assert_close(ent, ref, atol=1e-5, rtol=1e-5)
    # cross-check against the full attention probabilities of the last row
    p = torch.softmax(16**-0.5 * torch.einsum("bhd,bshd->bhs", q[:, -1], k[:, :, kh]), dim=-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1) / math.log(21), atol=1e-5, rtol=1e-5)
    assert ((ent > 0) & (ent < 1)).all()


def test_last_row_entropy_single_key_is_zero():
    q, k, _, _, _ = make_problem(1, 1, 1, 2, 2, 2, 8, 8, "default", torch.float32)
    assert last_row_attention_entropy(q, k).eq(0).all()
