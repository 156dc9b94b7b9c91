"""Ahead-of-time compile specs for the moe Triton kernels: one per kernel × GPU config the autotuner
can pick, for the static gates (tests/kernels/test_*_compile.py, the ptxas gate, benchmarks.kernels_static).

A spec is ``KernelSpec(name, fn, signature, constexprs, options, must_fit)``: ``fn`` is the bare
``@triton.jit`` function, ``signature`` maps runtime arguments to Triton types, ``constexprs`` fixes
every constexpr, ``options`` the launch options (num_warps, num_stages). Build them with
TRITON_INTERPRET=0 so the modules expose the GPU config lists.
"""

from __future__ import annotations

from kernels.compile_spec import KernelSpec

E_WORST = 256  # routing histogram width grows with E; compile the widest case
# the GEMMs' tile map holds E_POW2 per-expert counts: the training shapes' widths (Mixtral-like E 8,
# MoE-A E 64) and the widest case
GEMM_E_POW2 = (8, 64, E_WORST)


def aot_specs() -> list[KernelSpec]:
    """(name, kernel, signature, constexprs, options) for every kernel × GPU config in use."""
    from kernels.moe import grouped_gemm as fw
    from kernels.moe import grouped_gemm_bwd as bw
    from kernels.moe import routing as rt

    r_bins = 512  # next_pow2(E_WORST + 2)
    out = [
        (
            "histogram",
            rt._histogram_kernel,
            {"ids_ptr": "*i64", "hist_ptr": "*i32", "M": "i32", "E": "i32"},
            {"R": r_bins, "BLOCK": rt.ROUTE_BLOCK},
            {},
        ),
        (
            "scan",
            rt._scan_kernel,
            {
                "hist_ptr": "*i32",
                "base_ptr": "*i32",
                "counts_ptr": "*i32",
                "offsets_ptr": "*i32",
                "invalid_ptr": "*i32",
                "NB": "i32",
                "M": "i32",
                "E": "i32",
            },
            {"R": r_bins, "ROWS": rt.SCAN_ROWS, "BLOCK": rt.ROUTE_BLOCK},
            {"num_warps": 8},
        ),
        (
            "scatter",
            rt._scatter_kernel,
            {"ids_ptr": "*i64", "base_ptr": "*i32", "sorted_ptr": "*i32", "M": "i32", "E": "i32"},
            {"R": r_bins, "BLOCK": rt.ROUTE_BLOCK},
            {"num_warps": 8},
        ),
        (
            "combine",
            fw._combine_kernel,
            {"o_ptr": "*bf16", "ids_ptr": "*i64", "y_ptr": "*bf16", "K_SLOTS": "i32", "D": "i32", "E": "i32"},
            {"BLOCK_D": 1024},
            {},
        ),
    ]
    meta = {"slot_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32"}
    # bf16 (the training dtype) at every config and tile-map width; fp32 at the configs its
    # early_config_prune keeps (grouped_gemm._fp32_prune), widest tile map only
    variants = [
        (i, cfg, "bf16", ep)
        for i, cfg in enumerate(fw.GEMM_CONFIGS)
        for ep in GEMM_E_POW2
        if not fw.fp32_config_ok(cfg)
    ]
    variants += [(i, cfg, "fp32", E_WORST) for i, cfg in enumerate(fw.GEMM_CONFIGS) if fw.fp32_config_ok(cfg)]
    for i, cfg, dt, ep in variants:
        blocks = dict(cfg.kwargs, GROUP_M=fw.GROUP_M)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        tag = f"cfg{i},{dt},E_POW2={ep}"
        for swiglu in (True, False):
            sig = {
                "x_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "h_ptr": f"*{dt}",
                "a_ptr": f"*{dt}",
                **meta,
                "M": "i32",
                "K_SLOTS": "i32",
                "D": "i32",
                "F": "i32",
                "E": "i32",
                "stride_we": "i32",
                "stride_wd": "i32",
            }
            # the JIT turns unit strides into constexpr 1 (contiguous w_in rows): do the same
            out.append(
                (
                    f"gather_act_fwd[swiglu={swiglu},{tag}]",
                    fw._gather_act_fwd.fn,
                    sig,
                    {"stride_wh": 1, "SWIGLU": swiglu, "STORE_H": True, "E_POW2": ep, **blocks},
                    opts,
                )
            )
            sig = {
                "dy_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "h_ptr": f"*{dt}",
                "dh_ptr": f"*{dt}",
                "a_ptr": f"*{dt}",
                "dgate_ptr": "*fp32",
                "slot_ptr": "*i32",
                "gate_ptr": "*fp32",
                "counts_ptr": "*i32",
                "offsets_ptr": "*i32",
                "K_SLOTS": "i32",
                "D": "i32",
                "F": "i32",
                "E": "i32",
                "stride_we": "i32",
                "stride_wf": "i32",
                "DG_COLS": "i32",
            }
            out.append(
                (
                    f"gather_act_bwd[swiglu={swiglu},{tag}]",
                    bw._gather_act_bwd.fn,
                    sig,
                    {"stride_wd": 1, "SWIGLU": swiglu, "E_POW2": ep, "CHUNK": bw.DGATE_CHUNK, **blocks},
                    opts,
                )
            )
        sig = {
            "a_ptr": f"*{dt}",
            "w_ptr": f"*{dt}",
            "out_ptr": f"*{dt}",
            "slot_ptr": "*i32",
            "gate_ptr": "*fp32",
            "counts_ptr": "*i32",
            "offsets_ptr": "*i32",
            "K_IN": "i32",
            "N_OUT": "i32",
            "E": "i32",
            "stride_we": "i32",
        }
        # forward: w_out rows contiguous (stride_wn = 1); dx: w_in transposed (stride_wk = 1)
        for unit, other, gate in (("stride_wn", "stride_wk", True), ("stride_wk", "stride_wn", False)):
            out.append(
                (
                    f"scatter_gemm[{unit}=1,{tag}]",
                    fw._scatter_gemm.fn,
                    dict(sig, **{other: "i32"}),
                    {unit: 1, "HAS_GATE": gate, "E_POW2": ep, **blocks},
                    opts,
                )
            )
        if ep != E_WORST:
            continue  # the weight-gradient kernels have no tile map over experts
        # dw_in (A = x gathered); dw_out (B = dy gathered; A = a for GELU, silu(g)·u recomputed from h)
        for a_g, b_g, act in ((True, False, 0), (False, True, 0), (False, True, 1)):
            sig = {
                "a_ptr": f"*{dt}",
                "b_ptr": f"*{dt}",
                "out_ptr": f"*{dt}",
                "slot_ptr": "*i32",
                "gate_ptr": "*fp32",
                "offsets_ptr": "*i32",
                "K_SLOTS": "i32",
                "I": "i32",
                "J": "i32",
                "GROUP_M": "i32",
            }
            dw_blocks = {k: v for k, v in blocks.items() if k != "GROUP_M"}  # a runtime value here
            out.append(
                (
                    f"grouped_dw[a_gather={a_g},a_act={act},cfg{i},{dt}]",
                    bw._grouped_dw.fn,
                    sig,
                    {"A_GATHER": a_g, "B_GATHER": b_g, "B_GATE": b_g, "A_ACT": act, **dw_blocks},
                    opts,
                )
            )
    return [KernelSpec(*spec) for spec in out]
