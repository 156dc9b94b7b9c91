"""Group-gathered matmuls for MoHD: validation, the Triton autograd ops, torch path and public API.

Legend (shape suffixes):
    N tokens   A selected groups per token (runtime; -1 = empty slot)   G groups
    K input width   M output width   b block width   gate_NG: the slots' gates scattered to groups

    group_in_matmul:  y[n]             = Σ_j gates[n, j] · x[n, blk(ids[n, j])] @ w[blk(ids[n, j]), :]
                      (b = K/G: a sublayer reading only the active sub-dimensions of its input)
    group_out_matmul: y[n, blk(ids[n, j])] = gates[n, j] · x[n] @ w[:, blk(ids[n, j])], other blocks 0
                      (b = M/G: a projection producing only the active sub-dimensions)

Each op's backward is the other op on wᵀ (plus a masked recompute for the gate gradient); the
weight gradient is one dense GEMM on gated inputs, which cuBLAS does at full speed. A group listed
twice for a token adds its gates (the same as a dense gate matrix would).
"""
from __future__ import annotations

import os

import torch

from kernels import resolve_backend
from kernels.mohd.reference import group_in_matmul_reference, group_out_matmul_reference

BACKENDS = ("triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: torch/reference only
ID_DTYPES = (torch.int32, torch.int64)


def dense_gates(ids_NA: torch.Tensor, gates_NA: torch.Tensor, n_groups: int) -> torch.Tensor:
    """gate_NG[n, e] = Σ_j gates[n, j] over the slots with ids[n, j] = e (differentiable in gates).
    Slots with id -1 or any id outside [0, G) add nothing (never an out-of-bounds index)."""
    keep_NA = (ids_NA >= 0) & (ids_NA < n_groups)
    return gates_NA.new_zeros(ids_NA.shape[0], n_groups).scatter_add(
        1, ids_NA.clamp(0, n_groups - 1).long(), torch.where(keep_NA, gates_NA, torch.zeros_like(gates_NA)))


def _gate_grad(dG_NG: torch.Tensor, ids_NA: torch.Tensor, dtype) -> torch.Tensor:
    G = dG_NG.shape[1]
    keep_NA = (ids_NA >= 0) & (ids_NA < G)
    return torch.where(keep_NA, dG_NG.gather(1, ids_NA.clamp(0, G - 1).long()), 0.0).to(dtype)


# the Triton launchers as torch.library ops (fake impls give shapes), so torch.compile traces the
# autograd.Functions below without a graph break
@torch.library.custom_op("sparse_arch::mohd_gated_in", mutates_args=())
def _gated_in_op(x_NK: torch.Tensor, gate_NG: torch.Tensor, w_KM: torch.Tensor) -> torch.Tensor:
    from kernels.mohd.gated_gemm import gated_in

    return gated_in(x_NK, gate_NG, w_KM)


@_gated_in_op.register_fake
def _(x_NK, gate_NG, w_KM):
    return x_NK.new_empty((x_NK.shape[0], w_KM.shape[1]))


@torch.library.custom_op("sparse_arch::mohd_gated_out", mutates_args=())
def _gated_out_op(x_NK: torch.Tensor, gate_NG: torch.Tensor, w_KM: torch.Tensor) -> torch.Tensor:
    from kernels.mohd.gated_gemm import gated_out

    return gated_out(x_NK, gate_NG, w_KM)


@_gated_out_op.register_fake
def _(x_NK, gate_NG, w_KM):
    return x_NK.new_empty((x_NK.shape[0], w_KM.shape[1]))


class GroupInMatmul(torch.autograd.Function):
    """Triton forward/backward of ``group_in_matmul``."""

    @staticmethod
    def forward(ctx, x_NK, ids_NA, gates_NA, w_KM, n_groups: int):
        gate_NG = dense_gates(ids_NA, gates_NA.float(), n_groups).contiguous()
        ctx.save_for_backward(x_NK, ids_NA, gate_NG, w_KM)
        ctx.n_groups, ctx.gate_dtype = n_groups, gates_NA.dtype
        return _gated_in_op(x_NK, gate_NG, w_KM)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NM):
        x_NK, ids_NA, gate_NG, w_KM = ctx.saved_tensors
        N, K, G = x_NK.shape[0], x_NK.shape[1], ctx.n_groups
        dy_NM = dy_NM.contiguous().to(x_NK.dtype)
        active_NG = dense_gates(ids_NA, torch.ones_like(gate_NG[:, :1]).expand_as(ids_NA), G).clamp(max=1)
        # t = dy @ wᵀ on the selected blocks only; dx and the gate gradient both come from it
        t_NGb = _gated_out_op(dy_NM, active_NG.contiguous(), w_KM.T).view(N, G, -1).float()
        x_NGb = x_NK.view(N, G, -1).float()
        dx = (t_NGb * gate_NG[..., None]).view(N, K).to(x_NK.dtype) if ctx.needs_input_grad[0] else None
        dgates = _gate_grad((t_NGb * x_NGb).sum(-1), ids_NA, ctx.gate_dtype) if ctx.needs_input_grad[2] else None
        dw = None
        if ctx.needs_input_grad[3]:
            dw = ((x_NGb * gate_NG[..., None]).view(N, K).to(x_NK.dtype).T @ dy_NM).to(w_KM.dtype)
        return dx, None, dgates, dw, None


class GroupOutMatmul(torch.autograd.Function):
    """Triton forward/backward of ``group_out_matmul``."""

    @staticmethod
    def forward(ctx, x_NK, ids_NA, gates_NA, w_KM, n_groups: int):
        gate_NG = dense_gates(ids_NA, gates_NA.float(), n_groups).contiguous()
        ctx.save_for_backward(x_NK, ids_NA, gate_NG, w_KM)
        ctx.n_groups, ctx.gate_dtype = n_groups, gates_NA.dtype
        return _gated_out_op(x_NK, gate_NG, w_KM)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NM):
        x_NK, ids_NA, gate_NG, w_KM = ctx.saved_tensors
        N, M, G = x_NK.shape[0], w_KM.shape[1], ctx.n_groups
        dy_NM = dy_NM.contiguous().to(x_NK.dtype)
        dx = _gated_in_op(dy_NM, gate_NG, w_KM.T) if ctx.needs_input_grad[0] else None
        dgates = dw = None
        if ctx.needs_input_grad[2]:  # recompute x @ w on the selected blocks (cheaper than storing it)
            active_NG = dense_gates(ids_NA, torch.ones_like(gate_NG[:, :1]).expand_as(ids_NA), G).clamp(max=1)
            t_NGb = _gated_out_op(x_NK, active_NG.contiguous(), w_KM).view(N, G, -1).float()
            dgates = _gate_grad((t_NGb * dy_NM.view(N, G, -1).float()).sum(-1), ids_NA, ctx.gate_dtype)
        if ctx.needs_input_grad[3]:
            gated_dy = (dy_NM.view(N, G, -1).float() * gate_NG[..., None]).view(N, M).to(x_NK.dtype)
            dw = (x_NK.T @ gated_dy).to(w_KM.dtype)
        return dx, None, dgates, dw, None


def _torch_in(x_NK, ids_NA, gates_NA, w_KM, n_groups):
    N, K = x_NK.shape
    gate_NG1 = dense_gates(ids_NA, gates_NA, n_groups).to(x_NK.dtype)[..., None]
    # where, not a multiply: an unselected block of x adds exactly 0 even if it holds NaN/inf
    x_NGb = torch.where(gate_NG1 != 0, x_NK.view(N, n_groups, -1) * gate_NG1, 0.0)
    return x_NGb.view(N, K) @ w_KM


def _torch_out(x_NK, ids_NA, gates_NA, w_KM, n_groups):
    N, M = x_NK.shape[0], w_KM.shape[1]
    gate_NG1 = dense_gates(ids_NA, gates_NA, n_groups).to(x_NK.dtype)[..., None]
    y_NGb = (x_NK @ w_KM).view(N, n_groups, -1)
    return torch.where(gate_NG1 != 0, y_NGb * gate_NG1, 0.0).view(N, M)  # unselected blocks: exactly 0


def _fail(exc, op, name, msg):
    raise exc(f"{op}: {name} {msg}")


def _check(op, x, ids, gates, w, n_groups, grouped_dim):
    """Validate before any kernel runs; every message names the argument and the bad value."""
    for name, t in dict(x=x, ids=ids, gates=gates, w=w).items():
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, op, name, f"must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            _fail(ValueError, op, name, f"is on {t.device} but x is on {x.device}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(TypeError, op, "x", f"dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if w.dtype != x.dtype:
        _fail(TypeError, op, "w", f"dtype {w.dtype} must match x.dtype {x.dtype}")
    if ids.dtype not in ID_DTYPES:
        _fail(TypeError, op, "ids", f"dtype must be int32 or int64, got {ids.dtype}")
    if not gates.is_floating_point():
        _fail(TypeError, op, "gates", f"dtype must be floating point, got {gates.dtype}")
    if x.ndim != 2 or w.ndim != 2 or w.shape[0] != x.shape[1]:
        _fail(ValueError, op, "w", f"must be 2-D (K={x.shape[-1]}, M) for x of shape (N, K); got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or ids.shape[1] < 1:
        _fail(ValueError, op, "ids", f"must have shape (N={x.shape[0]}, A>=1), got {tuple(ids.shape)}")
    if gates.shape != ids.shape:
        _fail(ValueError, op, "gates", f"shape {tuple(gates.shape)} must equal ids shape {tuple(ids.shape)}")
    if not isinstance(n_groups, int) or n_groups < 1:
        _fail(ValueError, op, "n_groups", f"must be a positive int, got {n_groups!r}")
    width = x.shape[1] if grouped_dim == "K" else w.shape[1]
    if width % n_groups:
        _fail(ValueError, op, f"{grouped_dim}={width}", f"must be divisible by n_groups={n_groups}")
    if not x.is_contiguous():
        _fail(ValueError, op, "x", f"must be contiguous (call .contiguous()); got strides {x.stride()}")
    if x.device.type == "meta":
        _fail(ValueError, op, "x", "is on the meta device: real data is needed (use a cpu or cuda tensor)")
    if os.environ.get("SPARSE_ARCH_DEBUG_CHECKS", "0") == "1" and ids.numel():
        # debug only (one host sync); otherwise an id outside [-1, G) acts like -1 (see dense_gates)
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < -1 or hi >= n_groups:
            _fail(ValueError, op, "ids", f"values must be in [0, n_groups={n_groups}) or -1, found {lo if lo < -1 else hi}")


def _dispatch(op, fn_triton, fn_torch, fn_ref, x, ids, gates, w, n_groups, backend):
    if x.dtype == torch.float64 and backend == "triton":
        _fail(TypeError, op, "x", "dtype float64 is not supported by backend='triton'; use 'torch' or 'reference'")
    backend = resolve_backend(backend, x.device, BACKENDS, cpu_default="torch")
    if backend == "reference":
        return fn_ref(x, ids, gates, w, n_groups)
    if backend == "torch" or x.dtype == torch.float64 or x.shape[0] == 0:
        return fn_torch(x, ids, gates, w, n_groups)
    return fn_triton.apply(x, ids, gates, w, n_groups)


def group_in_matmul(x, ids, gates, w, n_groups: int, backend: str = "auto"):
    """Matmul reading only the selected column blocks of x (and row blocks of w).

    Args:
        x:        (N, K) float16/bfloat16/float32 (float64: torch/reference), contiguous; K = G·b.
        ids:      (N, A) int32/int64 group ids in [0, G) or -1 (empty slot); A is a runtime value.
        gates:    (N, A) floating scale per slot; gradients flow into it.
        w:        (K, M), x's dtype, any strides (e.g. a Linear's weight.T).
        n_groups: G. backend: "triton" | "torch" (dense masked matmul) | "reference" | "auto".
    Returns: y (N, M) = Σ_j gates[:, j] · x[:, blk(ids_j)] @ w[blk(ids_j), :] in x's dtype.
    NaN / inf: a non-finite value in a selected block of x[n] (or its gate) makes y[n] non-finite;
    x's unselected blocks contribute exactly nothing (all backends). Non-finite rows of w in a group
    token n did not select: nothing on the Triton and reference paths; the torch path's dense
    matmul multiplies them by 0 and gives NaN (keep weights finite, as training does).
    Raises: TypeError for types/dtypes, ValueError for shapes, devices, contiguity, ids, backend.
    """
    _check("group_in_matmul", x, ids, gates, w, n_groups, "K")
    return _dispatch("group_in_matmul", GroupInMatmul, _torch_in, group_in_matmul_reference, x, ids, gates, w, n_groups, backend)


def group_out_matmul(x, ids, gates, w, n_groups: int, backend: str = "auto"):
    """Matmul producing only the selected column blocks of y (the others are exactly 0).

    Args as ``group_in_matmul`` except that M = G·b is the grouped width.
    Returns: y (N, M) with y[:, blk(e)] = (Σ_{j: ids_j = e} gates[:, j]) · x @ w[:, blk(e)].
    NaN / inf: a block whose summed gate is 0 (unselected) is exactly 0 on every backend, even when
    x[n], w or the gate hold NaN/inf; a non-finite x[n] or gate makes x[n]'s selected blocks non-finite.
    """
    _check("group_out_matmul", x, ids, gates, w, n_groups, "M")
    return _dispatch("group_out_matmul", GroupOutMatmul, _torch_out, group_out_matmul_reference, x, ids, gates, w, n_groups, backend)
