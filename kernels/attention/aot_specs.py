"""Ahead-of-time compile specs for the attention Triton kernels: one per kernel × GPU config the autotuner
can pick, for the static gates (tests/kernels/test_*_compile.py, the ptxas gate, benchmarks.kernels_static).

A spec is ``KernelSpec(name, fn, signature, constexprs, options, must_fit)``: ``fn`` is the bare
``@triton.jit`` function, ``signature`` maps runtime arguments to Triton types, ``constexprs`` fixes
every constexpr, ``options`` the launch options (num_warps, num_stages). Build them with
TRITON_INTERPRET=0 so the modules expose the GPU config lists.
"""
from __future__ import annotations

from kernels.compile_spec import KernelSpec


EXTRA_DIMS = (64, 80)  # 80: a head dim padded to 128 (masked loads)


def _sig(fn, dt: str, ints: tuple[str, ...], fp32_ptrs: tuple[str, ...]) -> dict:
    """Signature for all runtime args: pointers in `dt` except int maps / fp32 buffers, scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in ("pos_ptr", "k_head_ptr", "v_head_ptr", "order_ptr", "offsets_ptr"):
            sig[name] = "*i32"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dt}"
        elif name in ("scale_log2", "scale"):
            sig[name] = "fp32"
        elif name in ints or name.startswith("stride_"):
            sig[name] = "i32"
    return sig


def aot_specs() -> list[KernelSpec]:
    """(name, kernel, signature, constexprs, options, must_fit) for every compile."""
    from kernels.attention import flash as fw
    from kernels.attention import flash_bwd as bw

    out = []
    kernels = [
        ("fwd", fw._attn_fwd.fn, fw.FWD_CONFIGS, {}, ("T", "S", "H"), ("lse_ptr",)),
        ("dq", bw._attn_bwd_dq.fn, bw.DQ_CONFIGS, {}, ("T", "S", "H"), ("lse_ptr", "delta_ptr")),
        ("dkdv", bw._attn_bwd_dkdv.fn, bw.DKDV_CONFIGS, {"DO_DK": True, "DO_DV": True}, ("T", "S", "H", "G"),
         ("lse_ptr", "delta_ptr")),
    ]
    for kname, fn, configs, flags, ints, f32 in kernels:
        for i, cfg in enumerate(configs):
            runs = [("bf16", 128, flags)]
            if i == 0:
                runs += [("bf16", d, flags) for d in EXTRA_DIMS]
                if kname == "dkdv":  # the decoupled-map launches: dK only, dV only
                    runs += [("bf16", 128, {"DO_DK": True, "DO_DV": False}),
                             ("bf16", 128, {"DO_DK": False, "DO_DV": True})]
            if i == len(configs) - 1:
                runs.append(("fp32", 128, flags))
            for dt, d, fl in runs:
                consts = dict(D=d, DV=d, CAUSAL=True, HAS_POS=True, BLOCK_D=fw.block_dim(d), BLOCK_DV=fw.block_dim(d),
                              **fl, **cfg.kwargs)
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                tag = ",".join(f"{k}={v}" for k, v in fl.items())
                must_fit = dt != "fp32" or i == len(configs) - 1
                out.append((f"{kname}[cfg{i},{dt},d={d}{',' + tag if tag else ''}]", fn, _sig(fn, dt, ints, f32),
                            consts, opts, must_fit))
    delta_consts = {"DV": 128, "BLOCK_DV": 128, "BLOCK_M": bw.DELTA_BLOCK_M}
    out.append(("delta[bf16]", bw._attn_bwd_delta, _sig(bw._attn_bwd_delta, "bf16", ("T", "H"), ("delta_ptr",)),
                delta_consts, {}, True))
    return [KernelSpec(*spec) for spec in out]
