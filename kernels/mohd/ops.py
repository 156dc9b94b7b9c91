"""Group-gathered matmuls for MoHD: validation, the autograd ops (Triton or torch twins) and public API.

Legend (shape suffixes):
    N tokens   A selected groups per token (runtime; -1 = empty slot)   G groups
    K input width   M output width   b block width   gate_NG: the slots' gates scattered to groups

    group_in_matmul:  y[n]             = Σ_j gates[n, j] · x[n, blk(ids[n, j])] @ w[blk(ids[n, j]), :]
                      (b = K/G: a sublayer reading only the active sub-dimensions of its input)
    group_out_matmul: y[n, blk(ids[n, j])] = gates[n, j] · x[n] @ w[:, blk(ids[n, j])], other blocks 0
                      (b = M/G: a projection producing only the active sub-dimensions)

Each op's backward is the other op on wᵀ (plus a masked recompute for the gate gradient). The
in-op's weight gradient is one dense GEMM on masked, gated inputs; the out-op's is a masked GEMM per
group (Triton: _gated_wgrad_out_kernel), since a token's x row must reach only its selected column
blocks. A group listed twice for a token adds its gates (the same as a dense gate matrix would).
backend='torch' runs the same autograd.Functions with torch twins of the kernels.

NaN / inf contract (identical on triton, torch and reference; tests/kernels/test_mohd_fuzz.py):
    * token n selects group e when a slot of n holds id e; ids -1 or outside [0, G) are dropped
      (act as -1; SPARSE_ARCH_DEBUG_CHECKS=1 raises instead, on every backend).
    * unselected blocks contribute exactly nothing, whatever they hold: x's unselected blocks and
      w's blocks of groups token n did not select (in-op), y[n]'s unselected output blocks (out-op),
      a dropped slot's gate; likewise in backward: dx of unselected blocks is exactly 0, and dw's
      block of group e gets nothing from a token that did not select e (finite dy assumed).
    * a NaN/inf in a selected block of x[n], in w's block of a selected group, or in a live gate
      makes the affected outputs of token n non-finite (as the plain definition's arithmetic does).
    * N = 0 gives an empty (0, M) result and zero-size gradients.
    * corner: the Triton/torch paths treat a group whose summed gate is exactly 0 as unselected,
      so a non-finite value there gives 0 where the reference's 0·NaN gives NaN (finite values: same).
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
        1, ids_NA.clamp(0, n_groups - 1).long(), torch.where(keep_NA, gates_NA, torch.zeros_like(gates_NA))
    )


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


def _torch_gated_in(x_NK, gate_NG, w_KM):
    """Torch twin of gated_gemm.gated_in: one (N, b) @ (b, M) matmul per group, masked by torch.where
    on the output so a row that does not use group e adds exactly 0 even when x[n, blk(e)] or
    w[blk(e)] hold NaN/inf (a dense masked matmul would give 0 · NaN = NaN)."""
    N, K = x_NK.shape
    G = gate_NG.shape[1]
    b = K // G
    y_NM = gate_NG.new_zeros(N, w_KM.shape[1])
    for e in range(G):
        g_N1 = gate_NG[:, e, None]
        part_NM = (x_NK[:, e * b : (e + 1) * b] @ w_KM[e * b : (e + 1) * b]).to(y_NM.dtype)
        y_NM = y_NM + torch.where(g_N1 != 0, part_NM * g_N1, 0.0)
    return y_NM.to(x_NK.dtype)


def _torch_gated_out(x_NK, gate_NG, w_KM):
    """Torch twin of gated_gemm.gated_out: a dense x @ w, then unselected blocks set to exactly 0."""
    N, M, G = x_NK.shape[0], w_KM.shape[1], gate_NG.shape[1]
    g_NG1 = gate_NG[..., None]
    y_NGb = (x_NK @ w_KM).to(gate_NG.dtype).view(N, G, M // G)
    return torch.where(g_NG1 != 0, y_NGb * g_NG1, 0.0).view(N, M).to(x_NK.dtype)


def _torch_wgrad_out(x_NK, gate_NG, dy_NM):
    """dw[:, blk(e)] = Σ_{n: gate[n, e] != 0} x[n]ᵀ · gate[n, e] · dy[n, blk(e)]: the out-op's weight
    gradient with every token that did not select e left out (masked, not multiplied by 0, so a
    NaN/inf in such a token's x never reaches blk(e)). One masked GEMM per group."""
    G = gate_NG.shape[1]
    b = dy_NM.shape[1] // G
    cols = []
    for e in range(G):
        on_N1 = gate_NG[:, e, None] != 0
        x_sel_NK = torch.where(on_N1, x_NK, 0.0)
        dy_sel_Nb = torch.where(on_N1, dy_NM[:, e * b : (e + 1) * b].to(gate_NG.dtype) * gate_NG[:, e, None], 0.0)
        cols.append(x_sel_NK.T @ dy_sel_Nb.to(x_NK.dtype))
    return torch.cat(cols, dim=1)  # G >= 1 (validated)


def _prims(use_triton: bool):
    """(gated_in, gated_out): the Triton custom ops or their exact torch twins."""
    return (_gated_in_op, _gated_out_op) if use_triton else (_torch_gated_in, _torch_gated_out)


def _gate_dtype(x_NK):
    return torch.float64 if x_NK.dtype == torch.float64 else torch.float32  # Triton kernels read fp32 gates


def _active(ids_NA, like_NG, n_groups):
    """1 where token n has a live slot on group e, else 0 (the selection, independent of gate values)."""
    ones_NA = torch.ones(ids_NA.shape, dtype=like_NG.dtype, device=like_NG.device)
    return dense_gates(ids_NA, ones_NA, n_groups).clamp(max=1).contiguous()


@torch.library.custom_op("sparse_arch::mohd_gated_wgrad_out", mutates_args=())
def _gated_wgrad_out_op(x_NK: torch.Tensor, gate_NG: torch.Tensor, dy_NM: torch.Tensor) -> torch.Tensor:
    from kernels.mohd.gated_gemm import gated_wgrad_out

    return gated_wgrad_out(x_NK, gate_NG, dy_NM)


@_gated_wgrad_out_op.register_fake
def _(x_NK, gate_NG, dy_NM):
    return x_NK.new_empty((x_NK.shape[1], dy_NM.shape[1]))


class GroupInMatmul(torch.autograd.Function):
    """Forward/backward of ``group_in_matmul`` (Triton kernels, or their torch twins for backend='torch')."""

    @staticmethod
    def forward(ctx, x_NK, ids_NA, gates_NA, w_KM, n_groups: int, use_triton: bool = True):
        gate_NG = dense_gates(ids_NA, gates_NA.to(_gate_dtype(x_NK)), n_groups).contiguous()
        ctx.save_for_backward(x_NK, ids_NA, gate_NG, w_KM)
        ctx.n_groups, ctx.gate_dtype, ctx.use_triton = n_groups, gates_NA.dtype, use_triton
        return _prims(use_triton)[0](x_NK, gate_NG, w_KM)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NM):
        x_NK, ids_NA, gate_NG, w_KM = ctx.saved_tensors
        N, K, G = x_NK.shape[0], x_NK.shape[1], ctx.n_groups
        b = K // G
        dy_NM = dy_NM.contiguous().to(x_NK.dtype)
        active_NG = _active(ids_NA, gate_NG, G)
        on_NG1 = (gate_NG != 0)[..., None]
        # t = dy @ wᵀ on the selected blocks only (exactly 0 elsewhere); dx and the gate gradient use it
        t_NGb = _prims(ctx.use_triton)[1](dy_NM, active_NG, w_KM.T).view(N, G, b).to(gate_NG.dtype)
        x_NGb = x_NK.view(N, G, b).to(gate_NG.dtype)
        dx = dgates = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.where(on_NG1, t_NGb * gate_NG[..., None], 0.0).view(N, K).to(x_NK.dtype)
        if ctx.needs_input_grad[2]:
            dgates = _gate_grad((t_NGb * x_NGb).sum(-1), ids_NA, ctx.gate_dtype)
        if ctx.needs_input_grad[3]:  # where, not a multiply: unselected x blocks (even inf) add exactly 0
            xg_NK = torch.where(on_NG1, x_NGb * gate_NG[..., None], 0.0).view(N, K).to(x_NK.dtype)
            dw = (xg_NK.T @ dy_NM).to(w_KM.dtype)
        return dx, None, dgates, dw, None, None


class GroupOutMatmul(torch.autograd.Function):
    """Forward/backward of ``group_out_matmul`` (Triton kernels, or their torch twins for backend='torch')."""

    @staticmethod
    def forward(ctx, x_NK, ids_NA, gates_NA, w_KM, n_groups: int, use_triton: bool = True):
        gate_NG = dense_gates(ids_NA, gates_NA.to(_gate_dtype(x_NK)), n_groups).contiguous()
        ctx.save_for_backward(x_NK, ids_NA, gate_NG, w_KM)
        ctx.n_groups, ctx.gate_dtype, ctx.use_triton = n_groups, gates_NA.dtype, use_triton
        return _prims(use_triton)[1](x_NK, gate_NG, w_KM)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NM):
        x_NK, ids_NA, gate_NG, w_KM = ctx.saved_tensors
        N, M, G = x_NK.shape[0], w_KM.shape[1], ctx.n_groups
        gated_in, gated_out = _prims(ctx.use_triton)
        dy_NM = dy_NM.contiguous().to(x_NK.dtype)
        dx = gated_in(dy_NM, gate_NG, w_KM.T) if ctx.needs_input_grad[0] else None
        dgates = dw = None
        if ctx.needs_input_grad[2]:  # recompute x @ w on the selected blocks (cheaper than storing it)
            t_NGb = gated_out(x_NK, _active(ids_NA, gate_NG, G), w_KM).view(N, G, M // G).to(gate_NG.dtype)
            dgates = _gate_grad((t_NGb * dy_NM.view(N, G, M // G).to(gate_NG.dtype)).sum(-1), ids_NA, ctx.gate_dtype)
        if ctx.needs_input_grad[3]:
            dw = _wgrad_out(x_NK, gate_NG, dy_NM, ctx.use_triton).to(w_KM.dtype)
        return dx, None, dgates, dw, None, None


def _wgrad_out(x_NK, gate_NG, dy_NM, use_triton):
    if use_triton:
        return _gated_wgrad_out_op(x_NK, gate_NG, dy_NM)
    return _torch_wgrad_out(x_NK, gate_NG, dy_NM)


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
        _fail(
            ValueError,
            op,
            "w",
            f"must be 2-D (K={x.shape[-1]}, M) for x of shape (N, K); got x {tuple(x.shape)}, w {tuple(w.shape)}",
        )
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
            _fail(
                ValueError,
                op,
                "ids",
                f"values must be in [0, n_groups={n_groups}) or -1, found {lo if lo < -1 else hi}",
            )


def _dispatch(op, fn_autograd, fn_ref, x, ids, gates, w, n_groups, backend):
    if x.dtype == torch.float64 and backend == "triton":
        _fail(TypeError, op, "x", "dtype float64 is not supported by backend='triton'; use 'torch' or 'reference'")
    backend = resolve_backend(backend, x.device, BACKENDS, cpu_default="torch")
    if backend == "reference":
        return fn_ref(x, ids, gates, w, n_groups)
    # N = 0 needs no kernel launch: the torch twins give the empty result and zero-size gradients
    use_triton = backend == "triton" and x.dtype != torch.float64 and x.shape[0] > 0
    return fn_autograd.apply(x, ids, gates, w, n_groups, use_triton)


def group_in_matmul(x, ids, gates, w, n_groups: int, backend: str = "auto"):
    """Matmul reading only the selected column blocks of x (and row blocks of w).

    Args:
        x:        (N, K) float16/bfloat16/float32 (float64: torch/reference), contiguous; K = G·b.
        ids:      (N, A) int32/int64 group ids in [0, G) or -1 (empty slot); A is a runtime value.
        gates:    (N, A) floating scale per slot; gradients flow into it.
        w:        (K, M), x's dtype, any strides (e.g. a Linear's weight.T).
        n_groups: G. backend: "triton" | "torch" (dense masked matmul) | "reference" | "auto".
    Returns: y (N, M) = Σ_j gates[:, j] · x[:, blk(ids_j)] @ w[blk(ids_j), :] in x's dtype.
    NaN / inf (module docstring, all backends): x[n]'s unselected blocks and w's rows of groups n
    did not select contribute exactly nothing; a non-finite selected block of x[n], w or a live gate
    makes y[n] non-finite. Ids outside [0, G) act as -1. N = 0 gives a (0, M) result.
    Raises: TypeError for types/dtypes, ValueError for shapes, devices, contiguity, ids, backend.
    """
    _check("group_in_matmul", x, ids, gates, w, n_groups, "K")
    return _dispatch("group_in_matmul", GroupInMatmul, group_in_matmul_reference, x, ids, gates, w, n_groups, backend)


def group_out_matmul(x, ids, gates, w, n_groups: int, backend: str = "auto"):
    """Matmul producing only the selected column blocks of y (the others are exactly 0).

    Args as ``group_in_matmul`` except that M = G·b is the grouped width.
    Returns: y (N, M) with y[:, blk(e)] = (Σ_{j: ids_j = e} gates[:, j]) · x @ w[:, blk(e)].
    NaN / inf (module docstring, all backends): an unselected block of y[n] is exactly 0 even when
    x[n], w or a dropped slot's gate hold NaN/inf, and its gradients are exactly 0; a non-finite x[n],
    live gate or selected w block makes y[n]'s selected blocks non-finite. Ids outside [0, G) act as -1.
    """
    _check("group_out_matmul", x, ids, gates, w, n_groups, "M")
    return _dispatch(
        "group_out_matmul", GroupOutMatmul, group_out_matmul_reference, x, ids, gates, w, n_groups, backend
    )
