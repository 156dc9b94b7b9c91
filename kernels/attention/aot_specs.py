"""Ahead-of-time compile specs for the attention Triton kernels: one per kernel × GPU config the autotuner
can pick, for the static gates (tests/kernels/test_*_compile.py, the ptxas gate, benchmarks.kernels_static).

A spec is ``KernelSpec(name, fn, signature, constexprs, options, must_fit)``: ``fn`` is the bare
``@triton.jit`` function, ``signature`` maps runtime arguments to Triton types, ``constexprs`` fixes
every constexpr, ``options`` the launch options (num_warps, num_stages). Build them with
TRITON_INTERPRET=0 so the modules expose the GPU config lists.
"""

from __future__ import annotations

from kernels.compile_spec import KernelSpec

DIMS = (64, 128)  # the model's head dims (the issue-18 shapes: T 4096, 32 query / 8 KV heads, causal)
MASKED_DIM = 80  # a head dim padded to 128 (masked loads), first config only


def _sig(fn, dt: str, ints: tuple[str, ...], fp32_ptrs: tuple[str, ...]) -> dict:
    """Signature for all runtime args: pointers in `dt` except int maps / fp32 buffers, scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in ("pos_ptr", "k_head_ptr", "v_head_ptr", "order_ptr", "offsets_ptr", "first_bad_ptr"):
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
    """Every kernel × every GPU config the autotuner can pick, bf16 at d 64 and 128 with default
    (increasing) positions, plus explicit q_positions (HAS_POS, a different mask split) at d 128,
    the decoupled-map dK-only / dV-only launches and the optional non-deterministic single pass
    (ATOMIC_DQ, fused and dK-only) at d 64 and 128, a masked d 80, and fp32 at d 128 (which must
    fit only on the smallest pickable config: the autotuner skips fp32 configs that exceed shared
    memory)."""
    from kernels.attention import flash as fw
    from kernels.attention.flash_bwd import DELTA_BLOCK_M, _attn_bwd_delta
    from kernels.attention.flash_bwd_configs import DKDV_TABLE, DQ_TABLE, FP32_DKDV_CONFIG, FP32_DQ_CONFIG
    from kernels.attention.flash_bwd_dkdv import _attn_bwd_dkdv
    from kernels.attention.flash_bwd_dq import _attn_bwd_dq

    out = []
    both = {"DO_DK": True, "DO_DV": True, "ATOMIC_DQ": False}
    dk_only = {"DO_DK": True, "DO_DV": False, "ATOMIC_DQ": False}
    dv_only = {"DO_DK": False, "DO_DV": True, "ATOMIC_DQ": False}
    single_pass = [dict(both, ATOMIC_DQ=True), dict(dk_only, ATOMIC_DQ=True)]
    kernels = [
        ("fwd", fw._attn_fwd.fn, fw.FWD_TABLE, None, [{}], ("T", "S", "H"), ("lse_ptr",)),
        ("dq", _attn_bwd_dq.fn, DQ_TABLE, FP32_DQ_CONFIG, [{}], ("T", "S", "H"), ("lse_ptr", "delta_ptr")),
        (
            "dkdv",
            _attn_bwd_dkdv.fn,
            DKDV_TABLE,
            FP32_DKDV_CONFIG,
            [both, dk_only, dv_only, *single_pass],
            ("T", "S", "H", "G"),
            ("lse_ptr", "delta_ptr", "dq_ptr"),
        ),
    ]
    for kname, fn, table, fp32_cfg, flag_sets, ints, f32 in kernels:
        configs = [e[0] for e in table] + ([fp32_cfg] if fp32_cfg is not None else [])
        for i, cfg in enumerate(configs):
            if cfg is fp32_cfg:  # fp32 inputs run on this config only (flash.prune_by_head_dim), and it must fit
                # (fp32 never takes the single pass: flash_bwd runs it deterministically)
                runs = [("fp32", 128, fl, False) for fl in flag_sets if not fl.get("ATOMIC_DQ")]
                runs.append(("fp32", 128, flag_sets[0], True))
            else:
                runs = [("bf16", d, fl, False) for d in DIMS for fl in flag_sets]
                runs.append(("bf16", 128, flag_sets[0], True))
                runs.append(("bf16", MASKED_DIM, flag_sets[0], False))
                if fp32_cfg is None:
                    runs.append(("fp32", 128, flag_sets[0], False))
                # only where the autotuner may pick it: configs are pruned by head dim (flash.configs_for)
                runs = [
                    (dt, d, fl, pos)
                    for dt, d, fl, pos in runs
                    if any(c is cfg for c in fw.configs_for(table, fw.block_dim(d), fl.get("ATOMIC_DQ", False)))
                ]
            for dt, d, fl, has_pos in runs:
                consts = dict(
                    D=d,
                    DV=d,
                    CAUSAL=True,
                    HAS_POS=has_pos,
                    BLOCK_D=fw.block_dim(d),
                    BLOCK_DV=fw.block_dim(d),
                    **fl,
                    **cfg.kwargs,
                )
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                tag = "".join(f",{k}={v}" for k, v in fl.items()) + (",pos" if has_pos else "")
                # fp32 in the forward: only the smallest pickable config must fit (the autotuner skips the others)
                pick = fw.configs_for(table, fw.block_dim(d), fl.get("ATOMIC_DQ", False))
                must_fit = dt != "fp32" or cfg is fp32_cfg or cfg is pick[-1]
                out.append((f"{kname}[cfg{i},{dt},d={d}{tag}]", fn, _sig(fn, dt, ints, f32), consts, opts, must_fit))
    for d in DIMS:
        delta_consts = {"DV": d, "BLOCK_DV": d, "BLOCK_M": DELTA_BLOCK_M}
        out.append(
            (
                f"delta[bf16,d={d}]",
                _attn_bwd_delta,
                _sig(_attn_bwd_delta, "bf16", ("T", "H"), ("delta_ptr",)),
                delta_consts,
                {},
                True,
            )
        )
    return [KernelSpec(*spec) for spec in out]
