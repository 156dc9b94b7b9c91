"""Ahead-of-time GPU compile check for the MoHD group-gated GEMM kernels (no GPU needed).

Mirrors tests/kernels/test_moe_compile.py: every kernel is compiled for sm_80 and sm_90 at every
block config the autotuner can pick on a GPU (bf16, plus fp32 at the smallest config), in a
subprocess with TRITON_INTERPRET=0, and its shared memory must fit the device.
"""

from __future__ import annotations

import pytest

from kernels.mohd.aot_specs import aot_specs as _specs  # noqa: E402
from tests.kernels.aot import (
    ARCHS,
    assert_bf16_gemms_use_wgmma,
    assert_compiled_and_fit,
    compile_in_subprocess,
    compile_specs,
)


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
