"""Ahead-of-time compile specs for the mohd Triton kernels: one per kernel × GPU config the autotuner
can pick, for the static gates (tests/kernels/test_*_compile.py, the ptxas gate, benchmarks.kernels_static).

A spec is ``KernelSpec(name, fn, signature, constexprs, options, must_fit)``: ``fn`` is the bare
``@triton.jit`` function, ``signature`` maps runtime arguments to Triton types, ``constexprs`` fixes
every constexpr, ``options`` the launch options (num_warps, num_stages). Build them with
TRITON_INTERPRET=0 so the modules expose the GPU config lists.
"""

from __future__ import annotations

from kernels.compile_spec import KernelSpec


def aot_specs() -> list[KernelSpec]:
    """(name, kernel, signature, constexprs, options) for the three kernels × GPU configs (× weight layouts)."""
    from kernels.mohd import gated_gemm as gg

    out = []
    # every config the dtype-aware early_config_prune lets the autotuner pick
    variants = [(i, cfg, "fp32" if gg.fp32_config_ok(cfg) else "bf16") for i, cfg in enumerate(gg.GEMM_CONFIGS)]
    for i, cfg, dt in variants:
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        for kname, kern, width in (
            ("gated_in", gg._gated_in_kernel, "B_IN"),
            ("gated_out", gg._gated_out_kernel, "B_OUT"),
        ):
            sig = {
                "x_ptr": f"*{dt}",
                "w_ptr": f"*{dt}",
                "gate_ptr": "*fp32",
                "y_ptr": f"*{dt}",
                "N": "i32",
                "K": "i32",
                "M": "i32",
                "G": "i32",
                width: "i32",
            }
            # forward: w row-major (stride_wm = 1); backward: w transposed (stride_wk = 1)
            for unit, other in (("stride_wm", "stride_wk"), ("stride_wk", "stride_wm")):
                out.append(
                    (
                        f"{kname}[{unit}=1,cfg{i},{dt}]",
                        kern.fn,
                        dict(sig, **{other: "i32"}),
                        {unit: 1, **cfg.kwargs},
                        opts,
                    )
                )
        # backward of the out-op: dw from x, the gates and dy (all contiguous: no strides to vary)
        sig = {
            "x_ptr": f"*{dt}",
            "gate_ptr": "*fp32",
            "dy_ptr": f"*{dt}",
            "dw_ptr": f"*{dt}",
            "N": "i32",
            "K": "i32",
            "M": "i32",
            "G": "i32",
            "B_OUT": "i32",
        }
        out.append((f"gated_wgrad_out[cfg{i},{dt}]", gg._gated_wgrad_out_kernel.fn, sig, dict(cfg.kwargs), opts))
    return [KernelSpec(*spec) for spec in out]
