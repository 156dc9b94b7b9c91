"""Torch backend for the expert MLP: one stable sort by expert, one gather, grouped matmuls and a
hand-written backward.

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   S rows processed (kept slots; all M on the grouped
    path, where dropped slots sit past offsets[E])   E experts   D model width
    F expert hidden width   H = 2F (SwiGLU: [gate | up]) or F (GELU)

Two ways to run the per-expert matmuls, chosen per call by ``_plan``:
  * loop: one ``torch.mm`` per expert on contiguous row slices of the sorted activations, sized by
    per-expert counts read on the host. Used on CPU (where ``.tolist()`` is a plain memory read,
    not a device sync) and for dtypes/devices where ``torch._grouped_mm`` does not work. fp32
    never reaches ``_grouped_mm`` (its meta function rejects fp32, which would break
    ``torch.compile``).
  * grouped: ``torch._grouped_mm`` with device-side offsets (bf16 on CUDA, and on CPU when a probe
    shows it works). All M slots are processed, dropped ones last: no size depends on device data,
    so nothing synchronises; rows past offsets[E] hold garbage and are masked with ``torch.where``.

Semantics (shared with the reference and the Triton path): a dropped slot (id -1) contributes
exactly nothing, whatever its gate holds (NaN/inf included; it is never read); a NaN/inf in a
token's x, a live slot's gate or an expert's weights reaches that token's output as IEEE
arithmetic says. Deterministic: every reduction has a fixed order (no atomics, no index_add),
so the same inputs give bitwise-equal outputs and gradients run to run.

``expert_mlp_torch_fwd`` / ``expert_mlp_torch_bwd`` are the two halves with fixed-shape saved
tensors (for a ``torch.library`` op with registered autograd); ``expert_mlp_torch`` is the
autograd-capable call ``kernels.moe.expert_mlp(backend="torch")`` uses.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as Fn

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


class _Plan(NamedTuple):
    """Where every processed row comes from and which expert owns it."""

    slot_S: torch.Tensor  # int64 slot index m = n·k + j of each row, grouped by expert
    tok_S: torch.Tensor  # int64 token of each row (slot_S // k)
    counts: list[int] | None  # host rows per expert (loop) or None (grouped)
    offsets_E: torch.Tensor | None  # int32 cumulative row ends per expert (grouped) or None
    keep_S: torch.Tensor | None  # bool, row is a kept slot (grouped) or None (all rows kept)


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype): the three grouped products the op uses, against a loop."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm") and dtype != torch.float32  # fp32: meta function rejects it
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(24, 16, generator=g).to(device, dtype)
                w = torch.randn(3, 16, 16, generator=g).to(device, dtype)
                dy = torch.randn(24, 16, generator=g).to(device, dtype)
                offs = torch.tensor([8, 8, 20], dtype=torch.int32, device=device)
                got = [torch._grouped_mm(a, w, offs=offs)[:20], torch._grouped_mm(a.t(), dy, offs=offs),
                       torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)[:20]]
                c = [8, 0, 12]
                want = [_loop_mm(a[:20], w, c), _loop_dw(a[:20], dy[:20], c, 3), _loop_mm(dy[:20], w.transpose(1, 2), c)]
                ok = all(torch.allclose(u.float(), v.float(), rtol=5e-2, atol=5e-2) for u, v in zip(got, want))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _loop_mm(a_SK, w_EKJ, counts, rows=None):
    """out[rows of e] = a[rows of e] @ w[e], written in place into one output (no cat). rows > S pads
    the output with zero rows (the dropped slots, kept so that saved tensors have a fixed shape)."""
    S = a_SK.shape[0]
    out_SJ = a_SK.new_empty(rows or S, w_EKJ.shape[2])
    out_SJ[S:].zero_()
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a_SK[start:start + c], w_EKJ[e], out=out_SJ[start:start + c])
        start += c
    return out_SJ


def _loop_dw(a_SK, g_SJ, counts, E):
    """dw[e] = a[rows of e]ᵀ @ g[rows of e]; experts with no rows get exact zeros."""
    dw_EKJ = a_SK.new_empty(E, a_SK.shape[1], g_SJ.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a_SK[start:start + c].t(), g_SJ[start:start + c], out=dw_EKJ[e])
        else:
            dw_EKJ[e].zero_()
        start += c
    return dw_EKJ


def _plan(ids_NK: torch.Tensor, E: int, dtype: torch.dtype, dims: tuple[int, ...], use_grouped_mm: bool) -> _Plan:
    """Stable sort of the slots by expert (dropped slots last) and the matmul strategy."""
    N, k = ids_NK.shape
    ids_M = ids_NK.reshape(-1)
    bins_M = torch.where(ids_M < 0, E, ids_M.long())  # dropped → bin E, sorted after every expert
    order_M = torch.argsort(bins_M, stable=True)  # stable: ties keep slot order → deterministic
    aligned = all(d % 8 == 0 for d in dims)  # CUDA grouped GEMMs want 16-byte aligned rows
    dev = ids_NK.device
    grouped = use_grouped_mm and aligned and (dev.type != "cpu" or dtype == torch.bfloat16) \
        and _grouped_mm_works(dev, dtype)
    if grouped:
        counts_E = torch.bincount(bins_M, minlength=E + 1)[:E]
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return _Plan(order_M, order_M // k, None, offsets_E, bins_M.index_select(0, order_M) < E)
    # loop path: on CPU this reads host memory; on CUDA (no working _grouped_mm) it is the one sync
    counts = torch.bincount(bins_M, minlength=E + 1).tolist()
    slot_S = order_M[: N * k - counts[E]]
    return _Plan(slot_S, slot_S // k, counts[:E], None, None)


def _mm(a_SK, w_EKJ, p: _Plan, rows=None):
    if p.counts is None:
        return torch._grouped_mm(a_SK, w_EKJ, offs=p.offsets_E)
    return _loop_mm(a_SK, w_EKJ, p.counts, rows)


def _dw(a_SK, g_SJ, p: _Plan, E: int):
    if p.counts is None:
        return torch._grouped_mm(a_SK.t(), g_SJ, offs=p.offsets_E)
    return _loop_dw(a_SK, g_SJ, p.counts, E)


def _live(t_S_, p: _Plan):
    """Zero the rows that are not kept slots (grouped path: garbage past offsets[E])."""
    if p.keep_S is None:
        return t_S_
    keep = p.keep_S.view(-1, *([1] * (t_S_.ndim - 1)))
    return torch.where(keep, t_S_, 0)


def _to_slots(t_SX, p: _Plan, M: int):
    """Rows in sorted order → slot order (M, X); slots without a row are exactly zero."""
    S = t_SX.shape[0]
    out = t_SX.new_empty(M, *t_SX.shape[1:]) if S == M else t_SX.new_zeros(M, *t_SX.shape[1:])
    return out.index_copy_(0, p.slot_S, t_SX)


def _combine(t_SD, p: _Plan, N: int, k: int):
    """y[n] = Σ_j t[row of slot (n, j)]: a fixed-order sum over k, no atomics."""
    t_MD = _to_slots(_live(t_SD, p), p, N * k)
    D = t_SD.shape[1]
    return t_MD.view(N, D) if k == 1 else t_MD.view(N, k, D).sum(1)


def _activation(h_SH, swiglu: bool):
    if swiglu:
        gate_SF, up_SF = h_SH.chunk(2, dim=1)
        return Fn.silu(gate_SF).mul_(up_SF)
    return Fn.gelu(h_SH)


def _check(x_ND, ids_NK, w_in_EDH, w_out_EFD):
    """Cheap Python-int checks the op-level validation may not have made (no device reads)."""
    if x_ND.device.type == "meta":
        raise ValueError("expert_mlp(backend='torch'): x is on the meta device; the torch backend needs real "
                         "tensors (use the op's fake implementation for shape propagation)")
    if min(w_in_EDH.shape) < 1 or min(w_out_EFD.shape) < 1 or ids_NK.shape[1] < 1:
        raise ValueError(f"expert_mlp(backend='torch'): sizes must be positive, got w_in {tuple(w_in_EDH.shape)}, "
                         f"w_out {tuple(w_out_EFD.shape)}, expert_ids {tuple(ids_NK.shape)}")


def expert_mlp_torch_fwd(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation="swiglu", use_grouped_mm=True,
                         save=True):
    """Forward. Returns (y_ND, h_MH, o_MD): the output plus, when ``save``, the pre-activation and the
    ungated expert output of every row in expert-sorted order (M rows; rows that are not kept slots
    are zero), which the backward reads. Fixed shapes, so a fake implementation can give them."""
    _check(x_ND, ids_NK, w_in_EDH, w_out_EFD)
    N, k = ids_NK.shape
    E, D, H = w_in_EDH.shape
    M = N * k
    p = _plan(ids_NK, E, x_ND.dtype, (D, H, w_out_EFD.shape[1]), use_grouped_mm)
    S = p.slot_S.shape[0]
    h_MH = _mm(x_ND.index_select(0, p.tok_S), w_in_EDH, p, M if save else None)
    o_MD = _mm(_activation(h_MH[:S], activation == "swiglu"), w_out_EFD, p, M if save else None)
    g_S1 = gates_NK.reshape(-1).index_select(0, p.slot_S).to(x_ND.dtype)[:, None]  # live slots' gates only
    y_ND = _combine(o_MD[:S] * g_S1, p, N, k)
    if not save:
        return y_ND, None, None
    return y_ND, _live(h_MH, p), _live(o_MD, p)


def expert_mlp_torch_bwd(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, o_MD, activation="swiglu",
                         use_grouped_mm=True):
    """Backward from the forward's saved (h_MH, o_MD). Returns (dx_ND, dgates_NK, dw_in_EDH, dw_out_EFD).

    With o = a @ w_out the ungated expert output and g the gate of a row:
        dgate = <o, dy>,  dw_out[e] = Σ aᵀ (g·dy),  da = (g·dy) @ w_outᵀ,  dh = act'(h) ⊙ da,
        dw_in[e] = Σ xᵀ dh,  dx[n] = Σ_j dh @ w_in[e]ᵀ.
    """
    N, k = ids_NK.shape
    E, D, H = w_in_EDH.shape
    p = _plan(ids_NK, E, x_ND.dtype, (D, H, w_out_EFD.shape[1]), use_grouped_mm)
    S = p.slot_S.shape[0]
    h_SH, o_SD = h_MH[:S], o_MD[:S]
    dy_SD = dy_ND.to(x_ND.dtype).index_select(0, p.tok_S)
    g_S1 = gates_NK.reshape(-1).index_select(0, p.slot_S).to(x_ND.dtype)[:, None]
    dg_S = _live((o_SD * dy_SD).sum(1), p)
    dgates_NK = _to_slots(dg_S, p, N * k).view(N, k).to(gates_NK.dtype)
    gdy_SD = _live(dy_SD * g_S1, p)
    da_SF = _mm(gdy_SD, w_out_EFD.transpose(1, 2), p)
    if activation == "swiglu":
        gate_SF, up_SF = h_SH.chunk(2, dim=1)
        sg_SF = Fn.silu(gate_SF)
        dh_SH = torch.empty_like(h_SH)
        torch.mul(da_SF, sg_SF, out=dh_SH[:, gate_SF.shape[1]:])  # d up = da · silu(gate)
        torch.ops.aten.silu_backward.grad_input(da_SF.mul_(up_SF), gate_SF, grad_input=dh_SH[:, :gate_SF.shape[1]])
        a_SF = sg_SF.mul_(up_SF)
    else:
        a_SF = Fn.gelu(h_SH)
        dh_SH = torch.ops.aten.gelu_backward(da_SF, h_SH)
    dh_SH = _live(dh_SH, p)
    dw_out = _dw(a_SF, gdy_SD, p, E)
    dw_in = _dw(x_ND.index_select(0, p.tok_S), dh_SH, p, E)
    dx_ND = _combine(_mm(dh_SH, w_in_EDH.transpose(1, 2), p), p, N, k)
    return dx_ND, dgates_NK, dw_in, dw_out


class _ExpertMLPTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm):
        y_ND, h_MH, o_MD = expert_mlp_torch_fwd(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm)
        ctx.save_for_backward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, o_MD)
        ctx.activation, ctx.use_grouped_mm = activation, use_grouped_mm
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):
        x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, o_MD = ctx.saved_tensors
        dx, dg, dw_in, dw_out = expert_mlp_torch_bwd(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, o_MD,
                                                     ctx.activation, ctx.use_grouped_mm)
        return dx, None, dg, dw_in, dw_out, None, None


def expert_mlp_torch(x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation="swiglu",
                     use_grouped_mm: bool = True):
    """Same contract as ``kernels.moe.expert_mlp`` (inputs already validated there). Differentiable in
    x, expert_weights, w_in and w_out. use_grouped_mm=False forces the per-expert loop."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x_ND, expert_weights_NK, w_in_EDH, w_out_EFD)):
        return expert_mlp_torch_fwd(x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation,
                                    use_grouped_mm, save=False)[0]
    return _ExpertMLPTorch.apply(x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm)
