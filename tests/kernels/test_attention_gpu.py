"""GPU lane for the Triton attention (skipped without CUDA): bf16 under the FlashAttention rule.

FlashAttention's tolerance rule (Dao-AILab/flash-attention tests/test_flash_attn.py): the
kernel's error against an fp32 reference must be at most 2× the error of the same-precision
torch computation (bf16 scores, softmax and PV, autograd for the gradients) against that
reference, for the output and for dq, dk, dv. The interpreter computes bf16 wrongly, so this
is the only bf16 check.

Legend: B batch, T queries, S keys, H query heads, Hk key heads, Hv value heads, d / dv head dims.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import attention, attention_reference, last_row_attention_entropy, last_row_entropy_reference

pytestmark = pytest.mark.gpu

# (name, B, T, S, H, Hk, Hv, k_head, v_head, positions, causal)
CASES = [
    ("mha-causal", 2, 1023, 1023, 8, 8, 8, None, None, "default", True),
    ("gqa-causal", 2, 1023, 1023, 8, 2, 2, None, None, "default", True),
    ("mqa-decode", 2, 77, 1100, 8, 1, 1, None, None, "default", True),
    ("decoupled-causal", 2, 777, 777, 8, 2, 3, [1, 0, 1, 1, 0, 1, 0, 0], [2, 2, 0, 1, 0, 2, 1, 0], "default", True),
    ("decoupled-subset", 2, 301, 1029, 8, 2, 2, [1, 0, 0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 1, 1, 0], "subset", True),
    ("gqa-full", 1, 500, 641, 8, 4, 4, None, None, "default", False),
]


def _maps(H, Hk, Hv, k_head, v_head, device):
    kh = torch.arange(H) // (H // Hk) if k_head is None else torch.tensor(k_head)
    vh = torch.arange(H) // (H // Hv) if v_head is None else torch.tensor(v_head)
    return kh.to(device), vh.to(device)


def torch_same_precision(q, k, v, kh, vh, pos_BT, causal, scale):
    """softmax(QKᵀ)V entirely in the inputs' dtype (no upcast): the baseline error of the rule."""
    k_e, v_e = k.index_select(2, kh), v.index_select(2, vh)
    scores_BHTS = torch.einsum("bthd,bshd->bhts", q, k_e) * scale
    if causal:
        visible = torch.arange(k.shape[1], device=q.device)[None, None, :] <= pos_BT[:, :, None]
        scores_BHTS = scores_BHTS.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores_BHTS, dim=-1), v_e)


def _grads(fn, inputs, do):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, do)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bf16_flash_attention_rule(case, d, deterministic):
    _, B, T, S, H, Hk, Hv, k_head, v_head, positions, causal = case
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, H, d, device=dev, generator=g).to(dt)
    k = torch.randn(B, S, Hk, d, device=dev, generator=g).to(dt)
    v = torch.randn(B, S, Hv, d, device=dev, generator=g).to(dt)
    do = torch.randn(B, T, H, d, device=dev, generator=g).to(dt)
    kh, vh = _maps(H, Hk, Hv, k_head, v_head, dev)
    if positions == "subset":
        pos = torch.stack([torch.randperm(S, device=dev, generator=g)[:T].sort().values for _ in range(B)])
    else:
        pos = (S - T + torch.arange(T, device=dev)).expand(B, T)
    scale = d**-0.5
    kw = dict(
        causal=causal,
        k_head=None if k_head is None else kh,
        v_head=None if v_head is None else vh,
        q_positions=pos if positions == "subset" else None,
        backend="triton",
        deterministic=deterministic,
    )

    out, grads = _grads(lambda q, k, v: attention(q, k, v, **kw), (q, k, v), do)
    ref, ref_grads = _grads(
        lambda q, k, v: attention_reference(q, k, v, kh, vh, pos, causal, scale)[0],
        (q.float(), k.float(), v.float()),
        do.float(),
    )
    pt, pt_grads = _grads(lambda q, k, v: torch_same_precision(q, k, v, kh, vh, pos, causal, scale), (q, k, v), do)

    for name, a, r, p in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (pt, *pt_grads)):
        assert torch.isfinite(a).all(), name
        err = (a.float() - r).abs().max().item()
        base = (p.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: kernel max error {err:.3e} > 2 x torch bf16 error {base:.3e}"


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 5e-3)])  # fp32 dots use TF32
def test_fp16_fp32_against_reference(dtype, tol):
    dev = "cuda"
    B, T, S, H, Hk, Hv, d = 2, 333, 333, 16, 1, 4, 96  # 16 query heads on one key head, padded d
    q, k, v = (torch.randn(*s, device=dev, dtype=dtype) for s in ((B, T, H, d), (B, S, Hk, d), (B, S, Hv, d)))
    do = torch.randn(B, T, H, d, device=dev, dtype=dtype)
    vh = torch.randperm(H, device=dev) % Hv
    out, grads = _grads(lambda q, k, v: attention(q, k, v, v_head=vh, backend="triton"), (q, k, v), do)
    kh = torch.zeros(H, dtype=torch.long, device=dev)
    pos = (S - T + torch.arange(T, device=dev)).expand(B, T)
    ref, ref_grads = _grads(
        lambda q, k, v: attention_reference(q, k, v, kh, vh, pos, True, d**-0.5)[0],
        (q.float(), k.float(), v.float()),
        do.float(),
    )
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        rel = ((a.float() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item()
        assert rel <= tol, f"{name}: relative RMS {rel:.2e}"


def test_auto_is_triton_on_cuda_and_entropy():
    dev = "cuda"
    q = torch.randn(2, 64, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 64, 2, 64, device=dev, dtype=torch.bfloat16)
    out = attention(q, k, k)
    ref = attention(q, k, k, backend="sdpa")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    kh = torch.arange(8, device=dev) // 4
    ent = last_row_attention_entropy(q * 4, k)  # auto → triton on CUDA
    # fp32 dots run as TF32 on GPU (TRITON_F32_DEFAULT=ieee makes them exact): ~1e-3 on scores
    torch.testing.assert_close(ent, last_row_entropy_reference(q * 4, k, kh, 64**-0.5), atol=1e-2, rtol=0)


@pytest.mark.parametrize("maps", ["default", "device"])
def test_no_host_sync_forward_backward(maps):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: the Triton
    forward + backward with default maps or device-resident decoupled maps and positions has none."""
    dev, dt = "cuda", torch.bfloat16
    B, T, H, Hk, d = 2, 256, 8, 2, 64
    q, k, v = (torch.randn(B, T, h, d, device=dev, dtype=dt, requires_grad=True) for h in (H, Hk, Hk))
    kw = {}
    if maps == "device":
        kw = dict(
            k_head=torch.tensor([1, 0, 1, 1, 0, 1, 0, 0], device=dev),
            v_head=torch.tensor([0, 0, 1, 1, 0, 1, 1, 0], device=dev),
            q_positions=torch.arange(T, device=dev).expand(B, T).contiguous(),
        )
    attention(q, k, v, backend="triton", **kw).sum().backward()  # autotune / compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention(q, k, v, backend="triton", **kw)
        torch.autograd.grad(out.sum(), (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode("default")
