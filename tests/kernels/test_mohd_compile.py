"""Ahead-of-time GPU compile check for the MoHD group-gated GEMM kernels (no GPU needed).

Mirrors tests/kernels/test_moe_compile.py: every kernel is compiled for sm_80 and sm_90 at every
block config the autotuner can pick on a GPU (bf16, plus fp32 at the smallest config), in a
subprocess with TRITON_INTERPRET=0, and its shared memory must fit the device.
"""
from __future__ import annotations

import pytest

from tests.kernels.aot import ARCHS, assert_bf16_gemms_use_wgmma, assert_compiled_and_fit, compile_in_subprocess, compile_specs


def _specs():
    """(name, kernel, signature, constexprs, options) for both kernels × GPU configs × weight layouts."""
    from kernels.mohd import gated_gemm as gg

    out = []
    last = len(gg.GEMM_CONFIGS) - 1
    variants = [(i, cfg, "bf16") for i, cfg in enumerate(gg.GEMM_CONFIGS)] + [(last, gg.GEMM_CONFIGS[last], "fp32")]
    for i, cfg, dt in variants:
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        for kname, kern, width in (("gated_in", gg._gated_in_kernel, "B_IN"), ("gated_out", gg._gated_out_kernel, "B_OUT")):
            sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "gate_ptr": "*fp32", "y_ptr": f"*{dt}",
                   "N": "i32", "K": "i32", "M": "i32", "G": "i32", width: "i32"}
            # forward: w row-major (stride_wm = 1); backward: w transposed (stride_wk = 1)
            for unit, other in (("stride_wm", "stride_wk"), ("stride_wk", "stride_wm")):
                out.append((f"{kname}[{unit}=1,cfg{i},{dt}]", kern.fn, dict(sig, **{other: "i32"}),
                            {unit: 1, **cfg.kwargs}, opts))
    return out


def _compile_all(cc: int) -> dict:
    return compile_specs(_specs(), cc)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def compiled(request):
    return request.param, compile_in_subprocess("tests.kernels.test_mohd_compile", request.param)


def test_every_kernel_compiles_and_fits_shared_memory(compiled):
    cc, results = compiled
    assert_compiled_and_fit(results, cc, len(_specs()))


def test_hopper_matmuls_use_wgmma(compiled):
    cc, results = compiled
    if cc != 90:
        pytest.skip("wgmma is Hopper-only")
    assert_bf16_gemms_use_wgmma(results)
