"""torch.library registration of the Triton attention: ``sparse_arch::attention_fwd`` / ``attention_bwd``.

Legend (shape suffixes):
    B batch   T queries   S keys   H query heads   Hk key heads   Hv value heads
    d query/key head dim   dv value head dim

Custom ops with fake (meta) implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces a model that calls the Triton attention as one graph
node per direction (no graph break), and AOTAutograd sees the backward as the ``attention_bwd``
op. The implementations run the Triton kernels where Triton can run (CUDA, or CPU under
``TRITON_INTERPRET=1``) and otherwise the plain-torch reference (CPU without the interpreter),
so the op is usable, and checkable with ``torch.library.opcheck``, on every device.
Inputs reach these ops already validated and normalised by kernels.attention.ops.
"""

from __future__ import annotations

import torch

from kernels import triton_runnable
from kernels.attention.reference import attention_reference


def _positions(pos_BT, B: int, T: int, S: int, device) -> torch.Tensor:
    return (S - T + torch.arange(T, device=device)).expand(B, T) if pos_BT is None else pos_BT.long()


def _use_triton(q: torch.Tensor) -> bool:
    return triton_runnable(q.device) and q.dtype != torch.float64


@torch.library.custom_op("sparse_arch::attention_fwd", mutates_args=())
def attention_fwd(
    q_BTHd: torch.Tensor,
    k_BSHkd: torch.Tensor,
    v_BSHvdv: torch.Tensor,
    k_head_H: torch.Tensor,
    v_head_H: torch.Tensor,
    pos_BT: torch.Tensor | None,
    first_bad_BH: torch.Tensor,
    causal: bool,
    scale: float,
    shared_map: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out_BTHdv (q's dtype), lse_BHT (fp32). Maps / positions / first_bad_BH int32 (see flash.py).
    `shared_map` (k_head == v_head and Hk == Hv, decided on the host) and `deterministic` are
    for the backward."""
    if _use_triton(q_BTHd):
        from kernels.attention.flash import flash_fwd

        return flash_fwd(q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, causal, scale, first_bad_BH)
    B, T, S = q_BTHd.shape[0], q_BTHd.shape[1], k_BSHkd.shape[1]
    out, lse = attention_reference(
        q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, _positions(pos_BT, B, T, S, q_BTHd.device), causal, scale
    )
    return out.to(q_BTHd.dtype), lse.float()


@attention_fwd.register_fake
def _(q_BTHd, k_BSHkd, v_BSHvdv, k_head_H, v_head_H, pos_BT, first_bad_BH, causal, scale, shared_map, deterministic):
    B, T, H, _ = q_BTHd.shape
    out = q_BTHd.new_empty(B, T, H, v_BSHvdv.shape[3])
    return out, q_BTHd.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("sparse_arch::attention_bwd", mutates_args=())
def attention_bwd(
    do_BTHdv: torch.Tensor,
    q_BTHd: torch.Tensor,
    k_BSHkd: torch.Tensor,
    v_BSHvdv: torch.Tensor,
    out_BTHdv: torch.Tensor,
    lse_BHT: torch.Tensor,
    k_head_H: torch.Tensor,
    v_head_H: torch.Tensor,
    pos_BT: torch.Tensor | None,
    first_bad_BH: torch.Tensor,
    causal: bool,
    scale: float,
    shared_map: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_BTHd, dk_BSHkd, dv_BSHvdv in the inputs' dtypes (flash_bwd.py: `deterministic`)."""
    if _use_triton(q_BTHd):
        from kernels.attention.flash_bwd import flash_bwd

        return flash_bwd(
            do_BTHdv.to(q_BTHd.dtype),
            q_BTHd,
            k_BSHkd,
            v_BSHvdv,
            out_BTHdv,
            lse_BHT,
            k_head_H,
            v_head_H,
            pos_BT,
            causal,
            scale,
            shared_map,
            first_bad_BH,
            deterministic,
        )
    B, T, S = q_BTHd.shape[0], q_BTHd.shape[1], k_BSHkd.shape[1]
    with torch.enable_grad():  # recompute through the reference (the fallback is for checks, not speed)
        q, k, v = (x.detach().requires_grad_() for x in (q_BTHd, k_BSHkd, v_BSHvdv))
        out, _ = attention_reference(q, k, v, k_head_H, v_head_H, _positions(pos_BT, B, T, S, q.device), causal, scale)
        grads = torch.autograd.grad(out, (q, k, v), do_BTHdv.to(out.dtype))
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q_BTHd, k_BSHkd, v_BSHvdv)))


@attention_bwd.register_fake
def _(
    do_BTHdv,
    q_BTHd,
    k_BSHkd,
    v_BSHvdv,
    out_BTHdv,
    lse_BHT,
    k_head_H,
    v_head_H,
    pos_BT,
    first_bad_BH,
    causal,
    scale,
    shared_map,
    deterministic,
):
    return torch.empty_like(q_BTHd), torch.empty_like(k_BSHkd), torch.empty_like(v_BSHvdv)


def _setup_context(ctx, inputs, output):
    q, k, v, k_head_H, v_head_H, pos_BT, first_bad_BH, causal, scale, shared_map, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, k_head_H, v_head_H, pos_BT, first_bad_BH)
    ctx.causal, ctx.scale, ctx.shared_map, ctx.deterministic = causal, scale, shared_map, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout_BTHdv, _dlse_BHT):
    q, k, v, out, lse, k_head_H, v_head_H, pos_BT, first_bad_BH = ctx.saved_tensors
    dq, dk, dv = attention_bwd(
        dout_BTHdv,
        q,
        k,
        v,
        out,
        lse,
        k_head_H,
        v_head_H,
        pos_BT,
        first_bad_BH,
        ctx.causal,
        ctx.scale,
        ctx.shared_map,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
