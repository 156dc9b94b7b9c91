"""Torch backend for the expert MLP: one stable sort by expert, one gather, grouped matmuls and a
hand-written backward.

Legend (shape suffixes):
    N tokens   k slots/token   M = N·k slots   S rows processed (kept slots; all M on the grouped
    path, where dropped slots sit past offsets[E])   E experts   D model width
    F expert hidden width   H = 2F (SwiGLU: [gate | up]) or F (GELU)

Two ways to run the per-expert matmuls, chosen per call by ``_plan``:
  * loop: one matmul per expert on contiguous row slices of the sorted activations, sized by
    per-expert counts read on the host, written into one output (no cat). fp32 on CPU goes through
    oneDNN (see ``_onednn_works``), everything else through ``torch.mm``. Used on CPU (where
    ``.tolist()`` is a plain memory read, not a device sync) and for dtypes/devices where
    ``torch._grouped_mm`` does not work. fp32 never reaches ``_grouped_mm`` (its meta function
    rejects fp32, which would break ``torch.compile``).
  * grouped: ``torch._grouped_mm`` with device-side offsets (bf16 on CUDA, and on CPU when a probe
    shows it works). All M slots are processed, dropped ones last: no size depends on device data,
    so nothing synchronises; rows past offsets[E] hold garbage and are masked with ``torch.where``.

Semantics (shared with the reference and the Triton path): a dropped slot (id -1) contributes
exactly nothing, whatever its gate holds (NaN/inf included; it is never read), and its gate
gradient is 0; a token with no live slot gets exactly 0 whatever its x holds; a NaN in a token's x,
a live slot's gate or a used expert's weights gives NaN in that token's output (and the gradients
it reaches); an expert with no rows gets exactly zero weight gradients, NaN weights or not; an id
outside [-1, E) is dropped like -1. Deterministic: every reduction has a fixed order (no atomics,
no index_add), so the same inputs give bitwise-equal outputs and gradients run to run.

``expert_mlp_torch_fwd`` / ``expert_mlp_torch_bwd`` are the two halves with fixed-shape saved
tensors (for a ``torch.library`` op with registered autograd); ``expert_mlp_torch`` is the
autograd-capable call ``kernels.moe.expert_mlp(backend="torch")`` uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as Fn

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}
USE_ONEDNN = True  # fp32 CPU matmuls through oneDNN when it works (tests flip this to cover both)
_ONEDNN_OK: list[bool] = []


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
                got = [
                    torch._grouped_mm(a, w, offs=offs)[:20],
                    torch._grouped_mm(a.t(), dy, offs=offs),
                    torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)[:20],
                ]
                seg = [(0, 8), (8, 8), (8, 20)]  # expert 1 has no rows
                want = [
                    torch.cat([a[i:j] @ w[e] for e, (i, j) in enumerate(seg)]),
                    torch.stack([a[i:j].t() @ dy[i:j] for i, j in seg]),
                    torch.cat([dy[i:j] @ w[e].t() for e, (i, j) in enumerate(seg)]),
                ]
                ok = all(torch.allclose(u.float(), v.float(), rtol=5e-2, atol=5e-2) for u, v in zip(got, want))
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _onednn_works() -> bool:
    """oneDNN's fp32 matmul (``mkldnn._linear_pointwise``) exists and agrees with torch.mm. Why: on
    AMD CPUs MKL's sgemm runs its AVX2 path, and oneDNN (which dispatches on the ISA, not the
    vendor) was measured 1.4-2.2x faster for every product here on the 2-core Zen 5 CI machine."""
    if not _ONEDNN_OK:
        ok = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if ok:
            try:
                g = torch.Generator().manual_seed(0)
                a, b = torch.randn(37, 24, generator=g), torch.randn(24, 40, generator=g)
                got = torch.ops.mkldnn._linear_pointwise(a.t().contiguous().t(), b.t(), None, "none", [], "")
                ok = bool(torch.allclose(got, a @ b, rtol=1e-5, atol=1e-5))
            except (RuntimeError, TypeError, NotImplementedError, AttributeError):
                ok = False
        _ONEDNN_OK.append(ok)
    return _ONEDNN_OK[0]


def _matmul(a_XK, b_KJ):
    """a @ b for any strides: oneDNN for fp32 on CPU (when it works), else torch.mm."""
    if USE_ONEDNN and a_XK.dtype == torch.float32 and a_XK.device.type == "cpu" and _onednn_works():
        return torch.ops.mkldnn._linear_pointwise(a_XK, b_KJ.t(), None, "none", [], "")
    return torch.mm(a_XK, b_KJ)


def _plan(ids_NK: torch.Tensor, E: int, dtype: torch.dtype, dims: tuple[int, ...], use_grouped_mm: bool) -> _Plan:
    """Stable sort of the slots by expert (dropped slots last) and the matmul strategy."""
    N, k = ids_NK.shape
    ids_M = ids_NK.reshape(-1)
    # dropped (-1) and out-of-range ids (the op drops them without a sync) → bin E, after every expert
    bins_M = torch.where((ids_M < 0) | (ids_M >= E), E, ids_M.long())
    order_M = torch.argsort(bins_M, stable=True)  # stable: ties keep slot order → deterministic
    aligned = all(d % 8 == 0 for d in dims)  # CUDA grouped GEMMs want 16-byte aligned rows
    dev = ids_NK.device
    grouped = (
        use_grouped_mm and aligned and (dev.type != "cpu" or dtype == torch.bfloat16) and _grouped_mm_works(dev, dtype)
    )
    if grouped:
        # row ends per expert by binary search in the sorted bins: no bincount (whose output size
        # depends on the data, a sync on CUDA) and no atomics
        sorted_bins_M = bins_M.index_select(0, order_M)
        ends_E = torch.searchsorted(sorted_bins_M, torch.arange(E, device=dev), right=True)
        return _Plan(order_M, order_M // k, None, ends_E.to(torch.int32), sorted_bins_M < E)
    # loop path: on CPU this reads host memory; on CUDA (no working _grouped_mm) it is the one sync
    counts = torch.bincount(bins_M, minlength=E + 1).tolist()
    slot_S = order_M[: N * k - counts[E]]
    return _Plan(slot_S, slot_S // k, counts[:E], None, None)


def _split(t_S_, p: _Plan):
    """Rows grouped by expert → the parts the matmuls work on: one view per expert (loop path,
    no copy) or the whole tensor (grouped path)."""
    return t_S_.split(p.counts) if p.counts is not None else (t_S_,)


def _mm(parts_K, w_EKJ, p: _Plan):
    """Per part: rows of expert e @ w[e]. The loop path keeps one output per expert, so the matmul
    library writes its own fresh output and nothing is copied into a big buffer afterwards."""
    if p.counts is None:
        return (torch._grouped_mm(parts_K[0], w_EKJ, offs=p.offsets_E),)
    return tuple(_matmul(a, w_EKJ[e]) if a.shape[0] else a.new_empty(0, w_EKJ.shape[2]) for e, a in enumerate(parts_K))


def _dw(parts_K, parts_J, p: _Plan, E: int):
    """dw[e] = (rows of e of a)ᵀ @ (rows of e of g); experts with no rows get exact zeros."""
    if p.counts is None:
        return torch._grouped_mm(parts_K[0].t(), parts_J[0], offs=p.offsets_E)
    a0, g0 = parts_K[0], parts_J[0]
    return torch.stack(
        [_matmul(a.t(), g) if a.shape[0] else a0.new_zeros(a0.shape[1], g0.shape[1]) for a, g in zip(parts_K, parts_J)]
    )


def _live(t_S_, p: _Plan):
    """Zero the rows that are not kept slots (grouped path: garbage past offsets[E])."""
    if p.keep_S is None:
        return t_S_
    return torch.where(p.keep_S.view(-1, *([1] * (t_S_.ndim - 1))), t_S_, 0)


def _to_slots(parts_X, p: _Plan, M: int):
    """Rows grouped by expert → slot order (M, X); slots without a row are exactly zero."""
    S, X = p.slot_S.shape[0], parts_X[0].shape[1:]
    out = parts_X[0].new_empty(M, *X) if S == M else parts_X[0].new_zeros(M, *X)
    for t, slots in zip(parts_X, _split(p.slot_S, p)):
        out.index_copy_(0, slots, _live(t, p))
    return out


def _combine(parts_D, p: _Plan, N: int, k: int):
    """y[n] = Σ_j t[row of slot (n, j)]: a fixed-order sum over k, no atomics."""
    t_MD = _to_slots(parts_D, p, N * k)
    D = t_MD.shape[1]
    return t_MD.view(N, D) if k == 1 else t_MD.view(N, k, D).sum(1)


def _activation(h_SH, swiglu: bool):
    if swiglu:
        gate_SF, up_SF = h_SH.chunk(2, dim=1)
        return Fn.silu(gate_SF).mul_(up_SF)
    return Fn.gelu(h_SH)


def _act_backward(da_SF, h_SH, swiglu: bool):
    """(dh, a): the pre-activation gradient and the recomputed activation."""
    if not swiglu:
        return torch.ops.aten.gelu_backward(da_SF, h_SH), Fn.gelu(h_SH)
    gate_SF, up_SF = h_SH.chunk(2, dim=1)
    F = gate_SF.shape[1]
    sg_SF = Fn.silu(gate_SF)
    dh_SH = torch.empty_like(h_SH)
    torch.mul(da_SF, sg_SF, out=dh_SH[:, F:])  # d up = da · silu(gate)
    torch.ops.aten.silu_backward.grad_input(da_SF.mul_(up_SF), gate_SF, grad_input=dh_SH[:, :F])
    return dh_SH, sg_SF.mul_(up_SF)


def _check(x_ND, ids_NK, w_in_EDH, w_out_EFD):
    """Cheap Python-int checks the op-level validation may not have made (no device reads)."""
    if x_ND.device.type == "meta":
        raise ValueError(
            "expert_mlp(backend='torch'): x is on the meta device; the torch backend needs real "
            "tensors (use the op's fake implementation for shape propagation)"
        )
    if min(w_in_EDH.shape) < 1 or min(w_out_EFD.shape) < 1 or ids_NK.shape[1] < 1:
        raise ValueError(
            f"expert_mlp(backend='torch'): sizes must be positive, got w_in {tuple(w_in_EDH.shape)}, "
            f"w_out {tuple(w_out_EFD.shape)}, expert_ids {tuple(ids_NK.shape)}"
        )


def _forward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, swiglu, use_grouped_mm):
    """→ (y_ND, plan, h parts, o parts): o is the ungated expert output the gate gradient needs."""
    _check(x_ND, ids_NK, w_in_EDH, w_out_EFD)
    N, k = ids_NK.shape
    E, D, H = w_in_EDH.shape
    p = _plan(ids_NK, E, x_ND.dtype, (D, H, w_out_EFD.shape[1]), use_grouped_mm)
    h = _mm(_split(x_ND.index_select(0, p.tok_S), p), w_in_EDH, p)
    o = _mm([_activation(t, swiglu) for t in h], w_out_EFD, p)
    g = _split(gates_NK.reshape(-1).index_select(0, p.slot_S).to(x_ND.dtype)[:, None], p)  # live slots only
    return _combine([oe * ge for oe, ge in zip(o, g)], p, N, k), p, h, o


def _backward(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, p: _Plan, h, o, swiglu):
    """With o = a @ w_out the ungated expert output and g the gate of a row:
    dgate = <o, dy>,  dw_out[e] = Σ aᵀ (g·dy),  da = (g·dy) @ w_outᵀ,  dh = act'(h) ⊙ da,
    dw_in[e] = Σ xᵀ dh,  dx[n] = Σ_j dh @ w_in[e]ᵀ."""
    N, k = ids_NK.shape
    E = w_in_EDH.shape[0]
    dy_SD = dy_ND.to(x_ND.dtype).index_select(0, p.tok_S)
    g_S1 = gates_NK.reshape(-1).index_select(0, p.slot_S).to(x_ND.dtype)[:, None]
    dy = _split(dy_SD, p)
    dgates_NK = _to_slots([(oe * de).sum(1) for oe, de in zip(o, dy)], p, N * k).view(N, k).to(gates_NK.dtype)
    gdy = _split(_live(dy_SD * g_S1, p), p)
    dh, a = zip(*[_act_backward(da, he, swiglu) for da, he in zip(_mm(gdy, w_out_EFD.transpose(1, 2), p), h)])
    dh = [_live(t, p) for t in dh]
    dw_out = _dw(a, gdy, p, E)
    dw_in = _dw(_split(x_ND.index_select(0, p.tok_S), p), dh, p, E)
    dx_ND = _combine(_mm(dh, w_in_EDH.transpose(1, 2), p), p, N, k)
    return dx_ND, dgates_NK, dw_in, dw_out


def _rows(parts, p: _Plan, M: int):
    """Parts → one (M, X) tensor in expert-sorted row order, rows that are not kept slots zero."""
    t = torch.cat([_live(t, p) for t in parts]) if len(parts) > 1 else _live(parts[0], p)
    return t if t.shape[0] == M else torch.cat([t, t.new_zeros(M - t.shape[0], *t.shape[1:])])


def expert_mlp_torch_fwd(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation="swiglu", use_grouped_mm=True):
    """Forward for a ``torch.library`` op. Returns (y_ND, h_MH, o_MD): the output plus the
    pre-activation and the ungated expert output of every row in expert-sorted order (M rows; rows
    that are not kept slots are zero), which ``expert_mlp_torch_bwd`` reads. Fixed shapes, so a fake
    implementation can give them (the autograd path below keeps per-expert parts instead: no copy)."""
    y_ND, p, h, o = _forward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation == "swiglu", use_grouped_mm)
    M = ids_NK.numel()
    return y_ND, _rows(h, p, M), _rows(o, p, M)


def expert_mlp_torch_bwd(
    dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, h_MH, o_MD, activation="swiglu", use_grouped_mm=True
):
    """Backward from ``expert_mlp_torch_fwd``'s (h_MH, o_MD) → (dx_ND, dgates_NK, dw_in_EDH, dw_out_EFD)."""
    E, D, H = w_in_EDH.shape
    p = _plan(ids_NK, E, x_ND.dtype, (D, H, w_out_EFD.shape[1]), use_grouped_mm)
    S = p.slot_S.shape[0]
    return _backward(
        dy_ND,
        x_ND,
        ids_NK,
        gates_NK,
        w_in_EDH,
        w_out_EFD,
        p,
        _split(h_MH[:S], p),
        _split(o_MD[:S], p),
        activation == "swiglu",
    )


class _ExpertMLPTorch(torch.autograd.Function):
    """forward + setup_context (not ctx in forward), so torch.func transforms (vjp) work on it."""

    @staticmethod
    def forward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm):
        y_ND, _, h, o = _forward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation == "swiglu", use_grouped_mm)
        return (y_ND, *h, *o)  # h, o: per-expert parts the backward reads (non-differentiable outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, *output[1:])
        ctx.parts, ctx.swiglu, ctx.use_grouped_mm = (len(output) - 1) // 2, activation == "swiglu", use_grouped_mm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND, *_):
        x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, *ho = ctx.saved_tensors
        E, D, H = w_in_EDH.shape
        p = _plan(ids_NK, E, x_ND.dtype, (D, H, w_out_EFD.shape[1]), ctx.use_grouped_mm)  # cheap: one argsort
        h, o = ho[: ctx.parts], ho[ctx.parts :]
        dx, dg, dw_in, dw_out = _backward(dy_ND, x_ND, ids_NK, gates_NK, w_in_EDH, w_out_EFD, p, h, o, ctx.swiglu)
        return dx, None, dg, dw_in, dw_out, None, None


def expert_mlp_torch(
    x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation="swiglu", use_grouped_mm: bool = True
):
    """Same contract as ``kernels.moe.expert_mlp`` (inputs already validated there). Differentiable in
    x, expert_weights, w_in and w_out. use_grouped_mm=False forces the per-expert loop."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x_ND, expert_weights_NK, w_in_EDH, w_out_EFD)):
        return _forward(
            x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation == "swiglu", use_grouped_mm
        )[0]
    return _ExpertMLPTorch.apply(
        x_ND, expert_ids_NK, expert_weights_NK, w_in_EDH, w_out_EFD, activation, use_grouped_mm
    )[0]
